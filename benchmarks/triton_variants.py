#!/usr/bin/env python
"""What the Triton 1-bit tensor-core decode costs, and why it stays above the CUDA kernel: sm_90 SASS of variants.

Compiles the 1-bit loop of ``bivlm_kernels.backends.triton.kernel_tc.tc_kernel`` and variants of it for sm_90 without a GPU
(``triton.compile`` with a ``GPUTarget``, as ``offline.py``) and prints the main loop's instructions per weight
and its mix, at 28672x8192-like shapes (the loop does not depend on N, K), fp16, g = 128, 128 rows x 8 warps, one
stage unless said. Each variant changes one thing, so its row shows what that thing costs::

    python benchmarks/triton_variants.py            # ~1 minute; writes nothing

Variants (see ``VARIANTS``): the shipped kernel; the sign mask as an immediate; decode by broadcasting every
word to its 32 columns (the obvious Triton code); the natural K order (pairs split into two registers); the
column sums of x precomputed outside the kernel (an extra launch); fp32 (h, mu) tables precomputed at load time.
Run it in a process without ``TRITON_INTERPRET=1``.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from bivlm_kernels.backends.triton import offline  # noqa: E402
from bivlm_kernels.backends.triton.kernel_tc import _decode1  # noqa: E402

_NEG_ONE = tl.constexpr(-1140802560)      # 0xBC00BC00: two fp16 -1.0


@triton.jit
def _decode(words, bit_mask, NEG_ONE: tl.constexpr, BN: tl.constexpr, GROUP: tl.constexpr, dtype: tl.constexpr):
    """tc_kernel's 1-bit decode: [BN, GW] words -> [BN, GROUP] +-1 in tile order."""
    return tl.reshape(_decode1(words, bit_mask, NEG_ONE), (BN, GROUP)).to(dtype, bitcast=True)


@triton.jit
def _decode_broadcast(words, BN: tl.constexpr, GROUP: tl.constexpr, GW: tl.constexpr):
    """Each word broadcast to its 32 columns, one shift + mask + xor per weight (natural order)."""
    wb = tl.reshape(tl.broadcast_to(words[:, :, None], (BN, GW, 32)), (BN, GROUP))
    bits = (wb >> (tl.arange(0, GROUP) % 32)[None, :]) & 1
    return (-17408 ^ (bits << 15)).to(tl.int16).to(tl.float16, bitcast=True)           # 0xBC00 ^ sign


@triton.jit
def _decode_natural(words, sign_mask, BN: tl.constexpr, GROUP: tl.constexpr):
    """Pairs (i, i + 16) as in tc_kernel, but joined into the natural K order: every register mixes two pairs."""
    w = _decode(words, sign_mask, _NEG_ONE, BN, GROUP, tl.float16)          # tile order
    # natural order = the tile order's inverse permutation, applied to the decoded tile in registers
    GW: tl.constexpr = GROUP // 32
    return tl.reshape(tl.permute(tl.reshape(w, (BN, GW, 16, 2)), (0, 1, 3, 2)), (BN, GROUP))


@triton.jit
def variant_kernel(x_ptr, qw_ptr, cb_ptr, hm_ptr, sx_ptr, out_ptr, M, N, KW, G, stride_xm, sign_mask,
                   GROUP: tl.constexpr, BLOCK_N: tl.constexpr, VARIANT: tl.constexpr):
    BM: tl.constexpr = 16
    GW: tl.constexpr = GROUP // 32
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rn_ld = tl.minimum(rn, N - 1)
    rm = tl.arange(0, BM)
    rm_ld = tl.minimum(rm, M - 1)
    qw_rows = qw_ptr + rn_ld.to(tl.int64)[:, None] * KW + tl.arange(0, GW)[None, :]
    x_rows = x_ptr + rm_ld.to(tl.int64)[:, None] * stride_xm + tl.arange(0, GROUP)[None, :]
    acc = tl.zeros((BLOCK_N, BM), dtype=tl.float32)
    for g in range(0, G):
        words = tl.load(qw_rows + g * GW)
        x = tl.load(x_rows + g * GROUP)
        if VARIANT == "immediate_mask":
            w = _decode(words, -2147450880, _NEG_ONE, BLOCK_N, GROUP, tl.float16)
        elif VARIANT == "broadcast":
            w = _decode_broadcast(words, BLOCK_N, GROUP, GW)
        elif VARIANT == "natural_order":
            w = _decode_natural(words, sign_mask, BLOCK_N, GROUP)
        else:
            w = _decode(words, sign_mask, _NEG_ONE, BLOCK_N, GROUP, tl.float16)
        if VARIANT == "sx_precomputed":
            sx = tl.load(sx_ptr + rm_ld * G + g)
        else:
            sx = tl.sum(x.to(tl.float32), axis=1)
        if VARIANT != "broadcast" and VARIANT != "natural_order":
            x = tl.reshape(tl.permute(tl.reshape(x, (BM, GW, 2, 16)), (0, 1, 3, 2)), (BM, GROUP))
        part = tl.dot(w, tl.trans(x))
        if VARIANT == "fp32_tables":
            hm = tl.load(hm_ptr + (rn_ld * G + g)[:, None] * 2 + tl.arange(0, 2)[None, :])
            d, s = tl.split(hm)
        else:
            c0 = tl.load(cb_ptr + (rn_ld * G + g) * 2).to(tl.float32)
            c1 = tl.load(cb_ptr + (rn_ld * G + g) * 2 + 1).to(tl.float32)
            d = c1 - c0
            s = c1 + c0
        acc += d[:, None] * part
        acc += s[:, None] * sx[None, :]
    tl.store(out_ptr + rm[None, :] * N + rn[:, None], (acc * 0.5).to(tl.float16), mask=(rm < M)[None, :])


VARIANTS = {
    "shipped": "the shipped 1-bit decode (tc_kernel's loop, rebuilt here without split-K)",
    "immediate_mask": "sign mask 0x80008000 as an immediate: the compiler emits AND + XOR, two LOP3 per pair",
    "broadcast": "word broadcast to 32 columns, shift/mask/xor per weight (no pairs), natural K order",
    "natural_order": "pairs decoded, then permuted back to the natural K order (x unpermuted)",
    "sx_precomputed": "column sums of x per group read from a buffer (needs a separate launch per call)",
    "fp32_tables": "(c1 - c0, c1 + c0) as fp32 per (row, group), repacked at load time",
}


def compile_variant(variant: str, stages: int = 1, block_n: int = 128, warps: int = 8):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    fn = variant_kernel
    sig = {"x_ptr": "*fp16", "qw_ptr": "*i32", "cb_ptr": "*fp16", "hm_ptr": "*fp32", "sx_ptr": "*fp32",
           "out_ptr": "*fp16", "M": "i32", "N": "i32", "KW": "i32", "G": "i32", "stride_xm": "i32",
           "sign_mask": "i32"}
    const = dict(GROUP=128, BLOCK_N=block_n, VARIANT=variant)
    aligned = ("x_ptr", "qw_ptr", "cb_ptr", "hm_ptr", "sx_ptr", "out_ptr", "N", "KW", "G", "stride_xm")
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in aligned}
    src = ASTSource(fn=fn, signature={**sig, **{k: "constexpr" for k in const}}, constexprs=const, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("run without TRITON_INTERPRET=1 (this compiles for sm_90)", file=sys.stderr)
        return 2
    wpi = 128 * 128 / (32 * 8)
    print(f"triton {triton.__version__}, sm_90, fp16, g = 128, 128 rows x 8 warps, {wpi:.0f} weights per thread "
          "per loop step\n")
    print("| variant | stages | instr/w | regs | loop mix (per weight) | what changes |")
    print("|---|---|---|---|---|---|")
    for variant, what in VARIANTS.items():
        for stages in ((1, 2) if variant == "shipped" else (1,)):
            info = offline.inspect(compile_variant(variant, stages))
            mix = ", ".join(f"{k} {v / wpi:.2f}" for k, v in list(info["loop_mix"].items())[:7])
            print(f"| {variant} | {stages} | {info['loop_instructions'] / wpi:.2f} | {info['registers']} | {mix} "
                  f"| {what} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
