"""Loads the compiled CPU extension ``bivlm_kernels._C_cpu`` and plugs its kernels into :mod:`bivlm_kernels.ops`.

Imported lazily by ``ops`` the first time a CPU tensor meets a ``bivlm`` op (never by ``import bivlm_kernels``);
raises ImportError (which ops treats as "no CPU kernels") when the extension was not built. The CPU features
(AVX2 or the scalar fallback) are asked by the extension on its first kernel call, not here.

Two kernel families sit behind each linear op (``csrc/cpu/README.md``):

* the table-lookup kernels (``tmac_linear``, T-MAC style in exact fp32) for M up to ``tmac_max_m[bits]``: they
  read a row-interleaved repack of the codes, built from the layer's packed buffers on its first call and kept in
  :mod:`bivlm_kernels.backends.repack_cache` (valid while the buffers are unchanged; inference tensors, which the cache
  cannot track, are not repacked and take the other family);
* the direct kernels (``lut_linear`` / ``affine_linear`` / ``segmented_lut_linear`` of ``_C_cpu``: decode GEMV on
  the neutral layout, dequantized tiles + ``at::mm`` for large M) for everything else.
"""
import logging

import torch

from .. import ops
from . import repack_cache

log = logging.getLogger(__name__)

try:
    from .. import _C_cpu  # noqa: F401  (its static initializers register torch.ops.bivlm_cpu.*)
except ImportError as e:
    log.info("bivlm_kernels._C_cpu not available (%s); CPU tensors use the reference kernels", e)
    raise

_C = torch.ops.bivlm_cpu
# The ops' overloads, called directly: ~8 us less per call than through the overload packet (torch.ops.x.y).
_lut_linear, _affine_linear = _C.lut_linear.default, _C.affine_linear.default
_segmented_lut_linear = _C.segmented_lut_linear.default
_tmac_linear, _tmac_repack = _C.tmac_linear.default, _C.tmac_repack.default
_tmac_linear1 = _C.tmac_linear1.default       # one segment, no perm: no list arguments

# Largest M per bit width run by the table-lookup kernels (their cost grows with M; above, the direct kernels).
# Measured on the 2-core AMD EPYC (Zen 3) of benchmarks/results/cpu_kernels*.md, QuantLinear calls, 2 threads:
# 1 bit 4096x4096 M = 1 / 2 / 3: 1.12 / 1.72 / 2.43 ms against 1.72 / 1.85 / 2.13 ms for the direct kernels
# (576x1536: even at M = 1, 78 vs 80 us, behind at M = 2); 2 and 4 bit lose already at M = 1 (three / four planes).
_TMAC_MAX_M = {1: 2, 2: 0, 4: 0}


def _tracked(*tensors) -> bool:
    """Whether the repack cache can track these tensors (it cannot see in-place writes to inference tensors)."""
    return not any(t.is_inference() for t in tensors)


def _repacked(tag, qweight, tables, bits, group_size):
    t1 = tables[1] if len(tables) > 1 else None
    return repack_cache.get(tag, (qweight, *tables),
                            lambda: tuple(_tmac_repack(qweight, tables[0], t1, bits, group_size)))


def _m(x) -> int:
    return x.numel() // x.shape[-1] if x.shape[-1] else 0


def lut_linear(x, qweight, codebook, bits, group_size, bias=None, out_dtype=None):
    if _m(x) > _TMAC_MAX_M[bits] or not _tracked(qweight, codebook):
        return _lut_linear(x, qweight, codebook, bits, group_size, bias, out_dtype)
    codes, coefs = _repacked("cpu-tmac", qweight, (codebook,), bits, group_size)
    return _tmac_linear1(x, codes, coefs, bits, qweight.shape[0], group_size, bias, out_dtype)


def affine_linear(x, qweight, scales, zeros, bits, group_size, bias=None, out_dtype=None):
    if _m(x) > _TMAC_MAX_M[bits] or not _tracked(qweight, scales, zeros):
        return _affine_linear(x, qweight, scales, zeros, bits, group_size, bias, out_dtype)
    codes, coefs = _repacked("cpu-tmac", qweight, (scales, zeros), bits, group_size)
    return _tmac_linear1(x, codes, coefs, bits, qweight.shape[0], group_size, bias, out_dtype)


def _segmented_use_tmac(m, codebooks, bits, group_size) -> bool:
    """The sub-2-bit layout through the lookup kernels when each of its segments would take them, or when at least
    60 % of its columns are 1-bit (the usual salient-2-bit + 1-bit split): the lookups cost about 0.55x of the
    direct 1-bit kernel per 1-bit weight and 1.6x of the direct 2-bit kernel per 2-bit weight (M = 1, measured),
    so from that share on one lookup pass beats the direct kernels."""
    if m <= min(_TMAC_MAX_M[b] for b in bits):
        return True
    ks = [c.shape[1] * group_size for c in codebooks]
    one = sum(k for k, b in zip(ks, bits) if b == 1)
    return m <= _TMAC_MAX_M[1] and 10 * one >= 6 * sum(ks)


def segmented_lut_linear(x, perm, qweights, codebooks, bits, group_size, bias=None, out_dtype=None):
    m = _m(x)
    if not _segmented_use_tmac(m, codebooks, bits, group_size) or not _tracked(*qweights, *codebooks):
        return _segmented_lut_linear(x, perm, qweights, codebooks, bits, group_size, bias, out_dtype)
    reps = [_repacked("cpu-tmac", q, (c,), b, group_size) for q, c, b in zip(qweights, codebooks, bits)]
    return _tmac_linear(x, perm, [r[0] for r in reps], [r[1] for r in reps], list(bits), qweights[0].shape[0],
                          group_size, bias, out_dtype)


_WRAPPED = {"lut_linear": lut_linear, "affine_linear": affine_linear, "segmented_lut_linear": segmented_lut_linear}
for _name in ops.ALL_OP_NAMES:
    if hasattr(_C, _name):
        ops.register_backend_kernel(_name, "cpu", _WRAPPED.get(_name, getattr(_C, _name).default))


def configure(gemv_max_m: int = -1, tile_bytes: int = -1, force_scalar: int = -1, tmac_max_m=None,
              min_task_work: int = -1) -> dict:
    """Dispatch knobs of the CPU kernels (tests and benchmarks); a negative value / None keeps a setting.

    ``tmac_max_m``: {bits: largest M} for the table-lookup kernels (0: never); ``gemv_max_m``: largest M run by
    the direct decode GEMV (above: dequantized fp32 tiles + ``at::mm``); ``tile_bytes``: size of that tile (and
    the bound on the lookup tables built at once); ``force_scalar``: 1 runs the portable scalar kernels instead of
    AVX2; ``min_task_work``: least weights x rows of x per thread (smaller calls stay on one thread). Returns the
    settings now in force and the instruction set in use.
    """
    if tmac_max_m is not None:
        bad = set(tmac_max_m) - set(_TMAC_MAX_M)
        if bad:
            raise ValueError(f"tmac_max_m keys must be bit widths {sorted(_TMAC_MAX_M)}, got {sorted(bad)}")
        _TMAC_MAX_M.update({b: int(v) for b, v in tmac_max_m.items()})
    m, tb, fs, avx2, mtw = _C.configure(gemv_max_m, tile_bytes, force_scalar, min_task_work)
    return {"gemv_max_m": m, "tile_bytes": tb, "force_scalar": bool(fs), "isa": "avx2" if avx2 else "scalar",
            "tmac_max_m": dict(_TMAC_MAX_M), "min_task_work": mtw}
