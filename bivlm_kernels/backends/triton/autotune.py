"""Launch configurations for the Triton kernels: M buckets, deterministic defaults, tuning, save/load.

A configuration is chosen per key ``(lut, bits, group_size, dtype, N, K, m_bucket)`` where ``m_bucket`` is one of
:data:`M_BUCKETS` (the smallest bucket >= M; every M above 256 shares the last one). The launcher does one dict
get per call; only a miss comes here:

* ``BIVLM_TRITON_AUTOTUNE=0``, the interpreter (``TRITON_INTERPRET=1``), CPU tensors or a CUDA graph capture
  in progress -> :func:`default_config` (deterministic; a pure function of the key);
* otherwise the candidates of :func:`candidates` that fit in shared memory are timed with
  ``triton.testing.do_bench`` on the call's own tensors and the fastest is kept for the key.

Tuned tables live in memory. :func:`save_tuned_configs` / :func:`load_tuned_configs` write and read them as
JSON, one table per GPU name; nothing is read at import. Tune (or load) before capturing CUDA graphs.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from typing import Callable, Dict, Optional

import torch

from ...formats import DTYPES_BY_NAME

log = logging.getLogger(__name__)

M_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# Default dispatch: lut and 4-bit affine in fp16/bf16 at M <= 16 -> tc kernel (kernel_tc.py, g = 128: ~3 (1 and
# 4 bits) / 6.8 (2 bits) instructions per weight at every M <= 16). Otherwise M <= DECODE_MAX_M -> CUDA-core
# decode kernel, else tensor-core dot kernel. From the sm_90 SASS of the loops (offline compile, no GPU here):
# decode costs ~4.5 (1 bit) / 8 (2 bit) / 8.6 (4 bit) instructions per code at M = 1 and ~3.2 / 5.3 / 5.3 per
# code and row at M = 2, growing with M, while the dot kernel's dequantization costs ~7.6-10 per code whatever
# M <= BLOCK_M. To be measured on an H100; the tuner may pick any of them for buckets <= 16.
DECODE_MAX_M = 2
# SM count assumed by the default configs (H100 SXM). A constant, so defaults never query the GPU.
NUM_SMS_DEFAULT = 132
# Shared memory assumed when no device can be asked (H100: 227 KiB per block).
SMEM_DEFAULT = 232448

BUCKET_OF = tuple(next(b for b in M_BUCKETS if b >= m) for m in range(M_BUCKETS[-1] + 1))


def m_bucket(m: int) -> int:
    """The autotuning key of ``m`` rows: smallest of :data:`M_BUCKETS` that is >= m (256 for anything larger)."""
    return BUCKET_OF[m] if m <= M_BUCKETS[-1] else M_BUCKETS[-1]


KERNELS = ("decode", "dot", "tc", "dense")


def tc_applies(lut: bool, bits: int, group_size: int, dtype: torch.dtype, m: int) -> bool:
    """Whether ``tc_kernel`` can run this call: 1/2-bit lut or 4-bit affine, fp16/bf16 x, M <= 16, a group of at
    least 16 columns and whole words (block_k = group_size)."""
    return (((lut and bits <= 2) or (not lut and bits == 4)) and dtype in (torch.float16, torch.bfloat16)
            and m <= 16 and group_size >= 16 and group_size % (32 // bits) == 0)


@dataclass(frozen=True)
class Config:
    """One launch configuration. ``block_k`` counts columns of K (a multiple of 32 // bits)."""
    kernel: str          # "decode" (CUDA cores), "dot" (tensor cores), "tc" (tensor cores, lut / 4-bit affine at
    #                      M <= 16) or "dense" (dequantize + F.linear)
    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {', '.join(map(repr, KERNELS))}, got {self.kernel!r}")
        for name in ("block_m", "block_n", "block_k", "split_k", "group_m", "num_warps"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1 or v & (v - 1):
                raise ValueError(f"{name} must be a positive power of two, got {v!r}")
        if self.block_k < (16 if self.kernel == "tc" else 32):
            raise ValueError(f"block_k must be >= 32 (one word of 1-bit codes; 16 for tc: one 4-bit group), "
                             f"got {self.block_k}")
        if self.kernel == "dot" and (self.block_m < 16 or self.block_n < 16):
            raise ValueError("dot configs need block_m, block_n >= 16 (tl.dot minimum)")
        if self.kernel == "tc" and (self.block_m != 16 or self.block_n < 16):
            raise ValueError("tc configs need block_m == 16 (x padded to 16 rows) and block_n >= 16, "
                             f"got block_m={self.block_m}, block_n={self.block_n}")


Key = tuple   # (lut: bool, bits, group_size, dtype, N, K, m_bucket)

CONFIGS: Dict[Key, Config] = {}       # the launcher reads this dict directly


def _pow2_floor(v: int) -> int:
    return 1 << (max(int(v), 1).bit_length() - 1)


def _split_for(tiles: int, k_blocks: int, num_sms: int) -> int:
    """Smallest power-of-two split of K that gives >= 2 programs per SM (never more splits than K blocks)."""
    split = 1
    while split * 2 <= k_blocks and tiles * split < 2 * num_sms:
        split *= 2
    return split


# Decode tiles (BLOCK_N, words per row per step) by (bits, BLOCK_M), 4 warps: the fewest instructions per code
# in the sm_90 SASS of the loop among the tiles tried (offline.py), without spills and at <= ~200 registers:
# M = 1: 4.5 (1 bit), 8.1 (2 bit), 8.6 (4 bit) instructions per code; M = 2: 3.2 / 5.3 / 5.3 per code and row.
_DECODE_TILES = {(1, 1): (64, 4), (2, 1): (64, 4), (4, 1): (128, 4),
                 (1, 2): (32, 4), (2, 2): (16, 8), (4, 2): (32, 8)}


def default_config(key: Key, num_sms: int = NUM_SMS_DEFAULT) -> Config:
    """Deterministic configuration for ``key`` (used by tests, the interpreter, and when tuning is off)."""
    lut, bits, group_size, dtype, n, k, mb = key
    per_word = 32 // bits
    kw = k // per_word
    if tc_applies(lut, bits, group_size, dtype, mb) and not (bits == 2 and group_size < 128 and mb == 1):
        # (2 bits at g < 128: the decode kernel's 8.1 beats tc's 8.8 at M = 1, not at M = 2 (10.6))
        # 128 rows x one group per step, 8 warps: the fewest instructions per weight among the tiles tried
        # (sm_90 SASS, g128 fp16: 2.78; 64 rows x 4 warps 3.44; 128 x 4 warps and 256 x 8 warps store the
        # decoded tile 2 bytes at a time, 3.5-3.7). Two stages: the next group's words and x arrive by cp.async
        # while this one is decoded (3.03 per weight; one stage 2.78 but a single load in flight per warp).
        block_n = 128 if n > 64 else 64
        split = _split_for(-(-n // block_n), -(-k // group_size), num_sms)
        return Config("tc", 16, block_n, group_size, split, 1, 8 if block_n == 128 else 4, 2)
    if mb <= DECODE_MAX_M:
        block_n, bkw = _DECODE_TILES.get((bits, mb), (16, 4))
        bkw = min(bkw, _pow2_floor(kw))
        split = _split_for(-(-n // block_n), -(-kw // bkw), num_sms)
        return Config("decode", mb, block_n, bkw * per_word, split, 1, 4, 1)
    if dtype == torch.float32:
        bm, bn, bk, warps, stages = min(64, max(16, mb)), 64, 32, 4, 2
    elif mb <= 64:
        bm, bn, bk, warps, stages = max(16, mb), 64, 128, 4, 3
    elif mb <= 128 or bits == 2:
        # 2 bits needs BLOCK_K >= 8 words (128 columns) for good code (~8.6 instructions per weight vs ~15 at
        # 64 columns, sm_90 SASS); 256 x 128 x 128 would not fit in shared memory at 3 stages.
        bm, bn, bk, warps, stages = 128, 128, (128 if bits == 2 else 64), 8, 3
    else:
        # 256 x 128 tiles: the per-weight dequantization (~8 (1 bit) / ~11.5 (4 bit) instructions, sm_90 SASS)
        # is amortized over 256 rows, below the wgmma time of the tile (<= 227 registers, ~120 KiB shared).
        bm, bn, bk, warps, stages = 256, 128, 64, 8, 3
    bk = max(bk, per_word)
    split = 1
    if mb <= 64:
        split = _split_for(-(-n // bn), -(-kw // (bk // per_word)), num_sms)
    return Config("dot", bm, bn, bk, split, 8, warps, stages)


def candidates(key: Key):
    """Configurations worth timing for ``key`` (before the shared-memory / shape pruning): a few dozen, since
    each one is compiled and timed on the first call of a key (tune once, then save/load)."""
    lut, bits, group_size, dtype, n, k, mb = key
    per_word = 32 // bits
    out = []
    if tc_applies(lut, bits, group_size, dtype, mb):
        for bn, warps in ((64, 4), (128, 8)):
            for split in (1, 2, 4, 8, 16):
                for stages in (1, 2, 3):
                    out.append(Config("tc", 16, bn, group_size, split, 1, warps, stages))
    if mb <= 16:
        for bn in (16, 32, 64):
            for bk_words in (4, 8):
                for split in (1, 2, 4, 8):
                    out.append(Config("decode", mb, bn, bk_words * per_word, split, 1, 4, 1))
    big = dtype != torch.float32
    if mb <= 64:
        tiles = [(bm, bn, 4) for bm in sorted({max(16, mb // 2), max(16, mb)}) for bn in (64, 128)]
        splits = (1, 2, 4, 8)
    else:
        tiles = [(128, 128, 8), (128, 256, 8)] + ([(256, 128, 8)] if big else [])
        splits = (1,)
    for bm, bn, warps in tiles:
        for bk in ((64, 128) if big else (32, 64)):
            for split in splits:
                for stages in (3, 4):
                    out.append(Config("dot", bm, bn, max(bk, per_word), split, 8, warps, stages))
    if mb >= 64:
        out.append(Config("dense", 16, 16, 32))      # dequantize to a dense buffer + cuBLAS
    return out


def smem_bytes(cfg: Config, bits: int, dtype: torch.dtype) -> int:
    """Rough shared memory of a dot config: pipelined x tile + packed words + tables, plus the staged operand."""
    if cfg.kernel != "dot":
        return 0
    es = torch.empty((), dtype=dtype).element_size()
    words = cfg.block_k * bits // 32
    tables = (1 << bits) if bits <= 2 else 2
    per_stage = cfg.block_m * cfg.block_k * es + words * cfg.block_n * (4 + tables * es)
    return cfg.num_stages * per_stage + cfg.block_k * cfg.block_n * es


def fits(cfg: Config, key: Key, max_smem: int) -> bool:
    """Shape and resource pruning: no tile (or split) much bigger than the problem, shared memory that fits,
    and a bounded register tile for the decode kernel."""
    lut, bits, group_size, dtype, n, k, mb = key
    per_word = 32 // bits
    if cfg.kernel == "dense":
        return True
    if cfg.block_k % per_word or cfg.block_k > k:
        return False
    if cfg.block_n > max(16, 2 * n) or cfg.split_k > -(-k // cfg.block_k):
        return False
    if cfg.kernel == "tc":
        return cfg.block_k == group_size and tc_applies(lut, bits, group_size, dtype, mb)
    if cfg.kernel == "decode":
        # fp32 values held per thread: the [BM, BN, BK] accumulator and the [BN, BK] decoded tile.
        tile = cfg.block_n * cfg.block_k
        return (cfg.block_m + 1) * tile // (32 * cfg.num_warps) <= 128
    return smem_bytes(cfg, bits, dtype) <= max_smem


def _tuning_enabled(device: torch.device) -> bool:
    if os.environ.get("BIVLM_TRITON_AUTOTUNE", "1") == "0" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    if device.type != "cuda":
        return False
    return not torch.cuda.is_current_stream_capturing()


def _max_smem(device: torch.device) -> int:
    try:
        import triton
        props = triton.runtime.driver.active.utils.get_device_properties(device.index or 0)
        return int(props["max_shared_mem"])
    except Exception:      # noqa: BLE001 -- an estimate is fine for pruning
        return SMEM_DEFAULT


def choose(key: Key, device: torch.device, run: Callable[[Config], object]) -> Config:
    """Configuration for a key the table does not hold yet: tuned on ``device`` when allowed, else the default.

    ``run(cfg)`` launches the kernel once with ``cfg`` on the caller's tensors (it is what gets timed).
    """
    if not _tuning_enabled(device):
        cfg = default_config(key)
        CONFIGS[key] = cfg
        return cfg
    from triton.testing import do_bench
    num_sms = torch.cuda.get_device_properties(device).multi_processor_count
    max_smem = _max_smem(device)
    best, best_ms = default_config(key, num_sms), float("inf")
    tried = [best] + [c for c in candidates(key) if fits(c, key, max_smem)]
    for cfg in dict.fromkeys(tried):
        try:
            ms = do_bench(lambda: run(cfg), warmup=5, rep=20)
        except Exception as e:   # noqa: BLE001 -- out of resources, compile errors: skip the candidate
            log.debug("bivlm triton: config %s failed for %s: %s", cfg, key, e)
            continue
        if ms < best_ms:
            best, best_ms = cfg, ms
    log.info("bivlm triton: tuned %s -> %s (%.1f us)", _key_str(key), best, best_ms * 1e3)
    CONFIGS[key] = best
    return best


# ---------------------------------------------------------------------------------------------------------
# save / load (explicit only)
# ---------------------------------------------------------------------------------------------------------



def _key_str(key: Key) -> str:
    lut, bits, g, dtype, n, k, mb = key
    return f"{'lut' if lut else 'affine'}|{bits}|{g}|{str(dtype).replace('torch.', '')}|{n}|{k}|{mb}"


def _key_parse(s: str) -> Key:
    kind, bits, g, dt, n, k, mb = s.split("|")
    if kind not in ("lut", "affine") or dt not in DTYPES_BY_NAME or int(mb) not in M_BUCKETS:
        raise ValueError(f"bad tuned-config key {s!r}")
    return (kind == "lut", int(bits), int(g), DTYPES_BY_NAME[dt], int(n), int(k), int(mb))


def _gpu_name(gpu_name: Optional[str]) -> str:
    return gpu_name if gpu_name is not None else torch.cuda.get_device_name()


def save_tuned_configs(path: str, gpu_name: Optional[str] = None) -> int:
    """Merge the in-memory table into the JSON file ``path`` under ``gpu_name`` (default: the current GPU's
    name). Returns the number of entries written for that GPU."""
    name = _gpu_name(gpu_name)
    data = {}
    if os.path.exists(path):
        with open(path) as f:
            data = json.load(f)
    table = data.setdefault(name, {})
    table.update({_key_str(k): asdict(c) for k, c in CONFIGS.items()})
    with open(path, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
    return len(table)


def load_tuned_configs(path: str, gpu_name: Optional[str] = None) -> int:
    """Load the entries stored for ``gpu_name`` (default: the current GPU's name) from ``path`` into the
    in-memory table (they replace existing entries). Returns how many were loaded; 0 if the GPU is absent."""
    name = _gpu_name(gpu_name)
    with open(path) as f:
        data = json.load(f)
    table = data.get(name, {})
    for k, c in table.items():
        CONFIGS[_key_parse(k)] = Config(**c)
    return len(table)


def clear_tuned_configs() -> None:
    """Forget every chosen configuration (the next call per key chooses again)."""
    CONFIGS.clear()
