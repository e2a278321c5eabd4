"""Triton tensor-core decode for 1-bit lut weights at M <= 16 (``tc1_kernel``), on the neutral layout.

The CUDA-core ``decode_kernel`` spends >= 1 FFMA per weight and row, and ``dot_kernel`` selects a codebook entry
per weight and stores it to shared memory one 16-bit value at a time (sm_90 SASS: 4.5 and 7.6 instructions per
weight). This kernel computes ``y = x @ W.T`` as ``W @ x.T`` (weights as the left, register operand of
``tl.dot``; x padded to 16 rows is the small right operand) and turns two codes into two fp16/bf16 +-1 values
with two integer instructions, applying the codebook after the product, once per (row, group):

    w = c0 if code 0 else c1  =  mu + h * s,   mu = (c0 + c1) / 2,  h = (c1 - c0) / 2,  s = 2 * code - 1
    y[m, n] = sum over groups g of  h[n, g] * sum_k s[n, k] x[m, k]  +  mu[n, g] * sum_k x[m, k]

The sum over s * x is one ``tl.dot`` per group (fp32 accumulation); the two fp32 rank-1 updates follow it. s is
exact in fp16 and bf16, so the only rounding beyond the reference's is the order of the fp32 sums.

Sign injection. Bits i and i + 16 of a word (columns 32 w + i and 32 w + i + 16) become one 32-bit register
holding two 16-bit -1.0 whose sign bits are flipped by the code bits::

    word        | c31 ... c16 | c15 ... c0 |             (the checkpoint's layout, LSB first)
    word << (15 - i):  bit i + 16 -> bit 31, bit i -> bit 15
    & 0x80008000, ^ NEG_ONE (0xBC00BC00 fp16, 0xBF80BF80 bf16):
    pair(i)     | s[i + 16] (16 bit) | s[i] (16 bit) |   = +-1.0, +-1.0

One shift and one LOP3 per two weights: the mask is a kernel argument, so the compiler cannot fold it into
the XOR's immediate (with both as immediates it emits two LOP3s).

Tile order. The 16 pairs of a word are joined so that each pair stays one register: the decoded tile's column
``t = 2 i + h`` of word w holds weight column ``32 w + i + 16 h``. The x tile is permuted the same way in
registers (reshape + permute of the small ``[16, GROUP]`` tile), so the dot's K order is the pair order::

    tile column t:   0    1    2    3   ...   30   31
    weight column:   0   16    1   17   ...   15   31      (+ 32 w)

One loop step is one group (``GROUP`` columns, ``GROUP / 32`` words per row). ``SPLIT_K`` programs share a
row block and accumulate with fp32 atomics (the launcher zeroes the buffer), as in ``kernels._epilogue``.
Measured with ``benchmarks/sass_budget.py`` (sm_90 SASS of the loop, no GPU needed).
"""
import triton
import triton.language as tl

from .kernels import _epilogue


@triton.jit
def _pair(words, i: tl.constexpr, sign_mask, NEG_ONE: tl.constexpr):
    """Columns (i, i + 16) of each word as two 16-bit +-1 in one int32 (see the module docstring)."""
    return ((words << (15 - i)) & sign_mask) ^ NEG_ONE


@triton.jit
def _lo(p):
    return p.to(tl.int16)


@triton.jit
def _hi(p):
    return (p >> 16).to(tl.int16)


@triton.jit
def _tree16(v0, v1, v2, v3, v4, v5, v6, v7, v8, v9, va, vb, vc, vd, ve, vf):
    """``[..., 16]`` from 16 tensors, in argument order. ``tl.join`` appends its axis last, so the last join
    is the fastest axis: it joins the even and the odd arguments, and so on down."""
    e = tl.join(tl.join(tl.join(v0, v8), tl.join(v4, vc)), tl.join(tl.join(v2, va), tl.join(v6, ve)))
    o = tl.join(tl.join(tl.join(v1, v9), tl.join(v5, vd)), tl.join(tl.join(v3, vb), tl.join(v7, vf)))
    return tl.join(e, o)


@triton.jit
def _decode(words, sign_mask, NEG_ONE: tl.constexpr, BN: tl.constexpr, GROUP: tl.constexpr,
            dtype: tl.constexpr):
    """``[BN, GW]`` words -> ``[BN, GROUP]`` +-1 in ``dtype``, in tile order (column t = 2 i + h)."""
    p0 = _pair(words, 0, sign_mask, NEG_ONE)
    p1 = _pair(words, 1, sign_mask, NEG_ONE)
    p2 = _pair(words, 2, sign_mask, NEG_ONE)
    p3 = _pair(words, 3, sign_mask, NEG_ONE)
    p4 = _pair(words, 4, sign_mask, NEG_ONE)
    p5 = _pair(words, 5, sign_mask, NEG_ONE)
    p6 = _pair(words, 6, sign_mask, NEG_ONE)
    p7 = _pair(words, 7, sign_mask, NEG_ONE)
    p8 = _pair(words, 8, sign_mask, NEG_ONE)
    p9 = _pair(words, 9, sign_mask, NEG_ONE)
    pa = _pair(words, 10, sign_mask, NEG_ONE)
    pb = _pair(words, 11, sign_mask, NEG_ONE)
    pc = _pair(words, 12, sign_mask, NEG_ONE)
    pd = _pair(words, 13, sign_mask, NEG_ONE)
    pe = _pair(words, 14, sign_mask, NEG_ONE)
    pf = _pair(words, 15, sign_mask, NEG_ONE)
    lo = _tree16(_lo(p0), _lo(p1), _lo(p2), _lo(p3), _lo(p4), _lo(p5), _lo(p6), _lo(p7),
                 _lo(p8), _lo(p9), _lo(pa), _lo(pb), _lo(pc), _lo(pd), _lo(pe), _lo(pf))
    hi = _tree16(_hi(p0), _hi(p1), _hi(p2), _hi(p3), _hi(p4), _hi(p5), _hi(p6), _hi(p7),
                 _hi(p8), _hi(p9), _hi(pa), _hi(pb), _hi(pc), _hi(pd), _hi(pe), _hi(pf))
    return tl.reshape(tl.join(lo, hi), (BN, GROUP)).to(dtype, bitcast=True)


@triton.jit
def tc1_kernel(x_ptr, qw_ptr, cb_ptr, bias_ptr, out_ptr,
               M, N, KW, G, stride_xm, stride_om, sign_mask,
               GROUP: tl.constexpr,        # columns per group = per loop step (a multiple of 32)
               BLOCK_N: tl.constexpr,      # output features per program
               SPLIT_K: tl.constexpr,      # programs along K (groups g = pid_k, pid_k + SPLIT_K, ...)
               HAS_BIAS: tl.constexpr, INTERP: tl.constexpr):
    """grid = (cdiv(N, BLOCK_N), SPLIT_K); M <= 16. ``sign_mask`` must be 0x80008000 (as an int32)."""
    BM: tl.constexpr = 16                                   # tl.dot's smallest dimension: x rows padded
    GW: tl.constexpr = GROUP // 32
    dtype: tl.constexpr = x_ptr.dtype.element_ty
    NEG_ONE: tl.constexpr = -1140802560 if dtype == tl.float16 else -1082081408   # 0xBC00BC00 / 0xBF80BF80
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rn_ld = tl.minimum(rn, N - 1)
    rm = tl.arange(0, BM)
    rm_ld = tl.minimum(rm, M - 1)                           # rows past M repeat row M - 1; never stored
    qw_rows = qw_ptr + rn_ld.to(tl.int64)[:, None] * KW + tl.arange(0, GW)[None, :]       # [BN, GW]
    x_rows = x_ptr + rm_ld.to(tl.int64)[:, None] * stride_xm + tl.arange(0, GROUP)[None, :]  # [BM, GROUP]
    cb_rows = cb_ptr + rn_ld.to(tl.int64) * (G * 2)                                     # [BN]

    acc = tl.zeros((BLOCK_N, BM), dtype=tl.float32)
    for g in range(pid_k, G, SPLIT_K):
        words = tl.load(qw_rows + g * GW)
        w = _decode(words, sign_mask, NEG_ONE, BLOCK_N, GROUP, dtype)                 # [BN, GROUP] +-1
        x = tl.load(x_rows + g * GROUP)                                                 # [BM, GROUP]
        sx = tl.sum(x.to(tl.float32), axis=1)                                          # [BM]
        x = tl.reshape(tl.permute(tl.reshape(x, (BM, GW, 2, 16)), (0, 1, 3, 2)), (BM, GROUP))
        if INTERP:
            # the interpreter's bf16 dot runs on raw bits (see kernels.py); +-1 and x are exact in fp32
            part = tl.dot(w.to(tl.float32), tl.trans(x.to(tl.float32)), input_precision="ieee")
        else:
            part = tl.dot(w, tl.trans(x))                                               # [BN, BM] fp32
        c0 = tl.load(cb_rows + g * 2).to(tl.float32)
        c1 = tl.load(cb_rows + g * 2 + 1).to(tl.float32)
        acc += (c1 - c0)[:, None] * part                    # 2 h and 2 mu: the 0.5 is applied once, below
        acc += (c1 + c0)[:, None] * sx[None, :]

    _epilogue(tl.trans(acc * 0.5), rm, rn, M, N, bias_ptr, out_ptr, stride_om, pid_k, SPLIT_K, HAS_BIAS,
              INTERP)
