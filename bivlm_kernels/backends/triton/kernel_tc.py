"""Triton tensor-core decode at M <= 16 (``tc_kernel``) for 1/2-bit lut and 4-bit affine weights, neutral layout.

The CUDA-core ``decode_kernel`` spends >= 1 FFMA per weight and row, and ``dot_kernel`` builds every weight
(a select or an unpack + FMA) and stores it to shared memory 2 bytes at a time (sm_90 SASS: 4.5-10.6
instructions per weight). This kernel computes ``y = x @ W.T`` as ``W @ x.T`` (weights are the left, register
operand of ``tl.dot``; x padded to 16 rows is the small right operand), turns two codes into two 16-bit values
that are an affine function of the code bits with two integer instructions, and applies the per-group
parameters in fp32 after the product, once per (row, group). With ``sx = sum_k x[m, k]`` over the group and
``P = tl.dot`` of a decoded plane with x:

    1-bit lut:    w = c0 or c1 = mu + h s,  s = +-1 decoded        y += 2h P + 2mu sx              (then * 1/2)
    2-bit lut:    w = c[q] = A + B s0 + C s1 + D s0 s1  (exact)    y += 4B P0 + 4C P1 + 4D P01 + 4A sx (* 1/4)
                  s0, s1 = +-1 per code bit, s0 s1 = +-1 from (bit0 XOR bit1): three planes, three dots
    4-bit affine: w = (q - z) s,  v = MAGIC + q decoded            y += s P - s (MAGIC + z) sx

(4A, 4B, 4C, 4D = sums and differences of the four entries: the Walsh-Hadamard transform of the codebook.)
The decoded values are exact in fp16 and bf16 (+-1; MAGIC + q with MAGIC = 1024 (fp16) or 128 (bf16), an
integer the format represents exactly together with q < 16), so the only rounding beyond the reference's is the
order of the fp32 sums (and, at 4 bits, MAGIC * sx cancelling in fp32: ~10 of fp32's 24 bits).

Decode. Two codes whose bits lie 16 apart in a word become one 32-bit register holding two 16-bit values::

    1 bit:  word | c31 ... c16 | c15 ... c0 |           pair i = columns (i, i + 16), i < 16
            ((word << (15 - i)) & 0x80008000) ^ 0xBC00BC00 (fp16; 0xBF80BF80 bf16): -1.0 with the code bit as sign
    2 bit:  word | c15 | ... | c8 | c7 | ... | c0 |     pair i = columns (i, i + 8), i < 8; code j at bits 2j, 2j+1
            plane s0: word << (15 - 2i), plane s1: word << (14 - 2i), plane s0 s1: (word ^ word >> 1) << (15 - 2i),
            each & 0x80008000, ^ -1.0 (s0, s1) or ^ +1.0 (s0 s1)
    4 bit:  word | c7 | c6 | c5 | c4 | c3 | c2 | c1 | c0 |   pair i = columns (i, i + 4), i < 4
            ((word >> 4 i) & 0x000F000F) | 0x64006400 (fp16; 0x43004300 bf16): MAGIC + q in each half (Marlin's trick)

One shift and one LOP3 per two weights and plane. The mask is a kernel argument (``bit_mask``), so the compiler
cannot fold it into the other constant (with both as immediates it emits two LOP3s:
``benchmarks/triton_variants.py``).

Tile order. The pairs of a word are joined so that each pair stays one register: the decoded tile's column
``t = 2 i + h`` of word w holds weight column ``P w + i + (P / 2) h`` (P = codes per word). The x tile is permuted
the same way in registers (reshape + permute of the small ``[16, GROUP]`` tile), so the dot's K order is the
pair order::

    1 bit, tile column t:   0   1   2   3  ...  30  31        4 bit:   0   1   2   3   4   5   6   7
           weight column:   0  16   1  17  ...  15  31   (+32 w)       0   4   1   5   2   6   3   7   (+8 w)

One loop step is one group (``GROUP`` columns). ``SPLIT_K`` programs share a row block and accumulate with fp32
atomics (the launcher zeroes the buffer), as in ``kernels._epilogue``. Instruction counts of the loop: see
``benchmarks/sass_budget.py`` (sm_90 SASS, no GPU needed).
"""
import triton
import triton.language as tl

from .kernels import _epilogue


@triton.jit
def _signs(words, SHIFT: tl.constexpr, bit_mask, ONE: tl.constexpr):
    """Bits 15 - SHIFT and 31 - SHIFT of each word moved to the sign bits (15, 31) of two 16-bit ``ONE``s (+-1.0):
    one int32 holding two +-1. 1 bit: SHIFT = 15 - i gives columns (i, i + 16)."""
    return ((words << SHIFT) & bit_mask) ^ ONE


@triton.jit
def _pair4(words, i: tl.constexpr, bit_mask, MAGIC: tl.constexpr):
    """4 bit: columns (i, i + 4) of each word as two 16-bit MAGIC + q in one int32."""
    return ((words >> (4 * i)) & bit_mask) | MAGIC


@triton.jit
def _lo(p):
    return p.to(tl.int16)


@triton.jit
def _hi(p):
    return (p >> 16).to(tl.int16)


@triton.jit
def _tree4(v0, v1, v2, v3):
    """``[..., 4]`` from 4 tensors in argument order. ``tl.join`` appends its axis last, so the last join is the
    fastest axis: it joins the even and the odd arguments, and so on down."""
    return tl.join(tl.join(v0, v2), tl.join(v1, v3))


@triton.jit
def _tree16(v0, v1, v2, v3, v4, v5, v6, v7, v8, v9, va, vb, vc, vd, ve, vf):
    """``[..., 16]`` from 16 tensors in argument order (as ``_tree4``)."""
    e = tl.join(tl.join(tl.join(v0, v8), tl.join(v4, vc)), tl.join(tl.join(v2, va), tl.join(v6, ve)))
    o = tl.join(tl.join(tl.join(v1, v9), tl.join(v5, vd)), tl.join(tl.join(v3, vb), tl.join(v7, vf)))
    return tl.join(e, o)


@triton.jit
def _decode1(words, bit_mask, NEG_ONE: tl.constexpr):
    """``[BN, GW]`` words -> ``[BN, GW, 32]`` int16 +-1 patterns in tile order (column t = 2 i + h)."""
    p0 = _signs(words, 15, bit_mask, NEG_ONE)
    p1 = _signs(words, 14, bit_mask, NEG_ONE)
    p2 = _signs(words, 13, bit_mask, NEG_ONE)
    p3 = _signs(words, 12, bit_mask, NEG_ONE)
    p4 = _signs(words, 11, bit_mask, NEG_ONE)
    p5 = _signs(words, 10, bit_mask, NEG_ONE)
    p6 = _signs(words, 9, bit_mask, NEG_ONE)
    p7 = _signs(words, 8, bit_mask, NEG_ONE)
    p8 = _signs(words, 7, bit_mask, NEG_ONE)
    p9 = _signs(words, 6, bit_mask, NEG_ONE)
    pa = _signs(words, 5, bit_mask, NEG_ONE)
    pb = _signs(words, 4, bit_mask, NEG_ONE)
    pc = _signs(words, 3, bit_mask, NEG_ONE)
    pd = _signs(words, 2, bit_mask, NEG_ONE)
    pe = _signs(words, 1, bit_mask, NEG_ONE)
    pf = _signs(words, 0, bit_mask, NEG_ONE)
    lo = _tree16(_lo(p0), _lo(p1), _lo(p2), _lo(p3), _lo(p4), _lo(p5), _lo(p6), _lo(p7),
                 _lo(p8), _lo(p9), _lo(pa), _lo(pb), _lo(pc), _lo(pd), _lo(pe), _lo(pf))
    hi = _tree16(_hi(p0), _hi(p1), _hi(p2), _hi(p3), _hi(p4), _hi(p5), _hi(p6), _hi(p7),
                 _hi(p8), _hi(p9), _hi(pa), _hi(pb), _hi(pc), _hi(pd), _hi(pe), _hi(pf))
    return tl.join(lo, hi)


@triton.jit
def _tree8(v0, v1, v2, v3, v4, v5, v6, v7):
    """``[..., 8]`` from 8 tensors in argument order (as ``_tree4``)."""
    return tl.join(_tree4(v0, v2, v4, v6), _tree4(v1, v3, v5, v7))


@triton.jit
def _plane2(words, SHIFT: tl.constexpr, bit_mask, ONE: tl.constexpr):
    """2 bits: one +-1 plane of the 16 codes of each word -> ``[BN, GW, 16]`` int16 in tile order. Pair i = codes
    (i, i + 8); the plane's bit of code i sits at 2 i + 15 - SHIFT, so ``word << (SHIFT - 2 i)`` moves the pair's
    two bits to 15 and 31."""
    p0 = _signs(words, SHIFT, bit_mask, ONE)
    p1 = _signs(words, SHIFT - 2, bit_mask, ONE)
    p2 = _signs(words, SHIFT - 4, bit_mask, ONE)
    p3 = _signs(words, SHIFT - 6, bit_mask, ONE)
    p4 = _signs(words, SHIFT - 8, bit_mask, ONE)
    p5 = _signs(words, SHIFT - 10, bit_mask, ONE)
    p6 = _signs(words, SHIFT - 12, bit_mask, ONE)
    p7 = _signs(words, SHIFT - 14, bit_mask, ONE)
    return tl.join(_tree8(_lo(p0), _lo(p1), _lo(p2), _lo(p3), _lo(p4), _lo(p5), _lo(p6), _lo(p7)),
                   _tree8(_hi(p0), _hi(p1), _hi(p2), _hi(p3), _hi(p4), _hi(p5), _hi(p6), _hi(p7)))


@triton.jit
def _decode4(words, bit_mask, MAGIC: tl.constexpr):
    """``[BN, GW]`` words -> ``[BN, GW, 8]`` int16 MAGIC + q patterns in tile order."""
    p0 = _pair4(words, 0, bit_mask, MAGIC)
    p1 = _pair4(words, 1, bit_mask, MAGIC)
    p2 = _pair4(words, 2, bit_mask, MAGIC)
    p3 = _pair4(words, 3, bit_mask, MAGIC)
    return tl.join(_tree4(_lo(p0), _lo(p1), _lo(p2), _lo(p3)), _tree4(_hi(p0), _hi(p1), _hi(p2), _hi(p3)))


@triton.jit
def _dot(v, xt, BN: tl.constexpr, GROUP: tl.constexpr, dtype: tl.constexpr, INTERP: tl.constexpr):
    """Decoded int16 patterns ``[BN, GW, ...]`` as ``[BN, GROUP]`` values times ``xt [GROUP, 16]``, fp32."""
    w = tl.reshape(v, (BN, GROUP)).to(dtype, bitcast=True)
    if INTERP:
        # the interpreter's bf16 dot runs on raw bits (see kernels.py); w and x are exact in fp32
        return tl.dot(w.to(tl.float32), xt.to(tl.float32), input_precision="ieee")
    return tl.dot(w, xt)


@triton.jit
def tc_kernel(x_ptr, qw_ptr, t0_ptr, t1_ptr, bias_ptr, out_ptr,
              M, N, KW, G, stride_xm, stride_om, bit_mask,
              BITS: tl.constexpr,         # 1, 2: lut (t0 = codebook [N, G, 2 ** BITS]); 4: affine (t0 = scales,
              #                             t1 = zeros)
              GROUP: tl.constexpr,        # columns per group = per loop step (a multiple of 32 // BITS, >= 16)
              BLOCK_N: tl.constexpr,      # output features per program
              SPLIT_K: tl.constexpr,      # programs along K (groups g = pid_k, pid_k + SPLIT_K, ...)
              HAS_BIAS: tl.constexpr, INTERP: tl.constexpr):
    """grid = (cdiv(N, BLOCK_N), SPLIT_K); M <= 16. ``bit_mask``: 0x80008000 (1, 2 bits) / 0x000F000F (4 bits)."""
    BM: tl.constexpr = 16                                   # tl.dot's smallest dimension: x rows padded
    PW: tl.constexpr = 32 // BITS                           # codes per word
    GW: tl.constexpr = GROUP // PW                          # words per group and row
    dtype: tl.constexpr = x_ptr.dtype.element_ty
    FP16: tl.constexpr = dtype == tl.float16
    NEG_ONE: tl.constexpr = -1140802560 if FP16 else -1082081408     # 0xBC00BC00 / 0xBF80BF80: two -1.0
    POS_ONE: tl.constexpr = 1006648320 if FP16 else 1065369472       # 0x3C003C00 / 0x3F803F80: two +1.0
    MAGIC: tl.constexpr = 0x64006400 if FP16 else 0x43004300         # two 1024.0 / two 128.0
    MAGIC_F: tl.constexpr = 1024.0 if FP16 else 128.0
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rn_ld = tl.minimum(rn, N - 1)
    rm = tl.arange(0, BM)
    rm_ld = tl.minimum(rm, M - 1)                           # rows past M repeat row M - 1; never stored
    qw_rows = qw_ptr + rn_ld.to(tl.int64)[:, None] * KW + tl.arange(0, GW)[None, :]         # [BN, GW]
    x_rows = x_ptr + rm_ld.to(tl.int64)[:, None] * stride_xm + tl.arange(0, GROUP)[None, :]  # [BM, GROUP]
    # per-(row, group) tables at row * G + g: the codebook's 2 ** BITS entries (lut) or scale and zero (4 bit)
    t0_rows = t0_ptr + rn_ld.to(tl.int64) * (G * ((1 << BITS) if BITS <= 2 else 1))         # [BN]
    t1_rows = t1_ptr + rn_ld.to(tl.int64) * G

    acc = tl.zeros((BLOCK_N, BM), dtype=tl.float32)
    for g in range(pid_k, G, SPLIT_K):
        words = tl.load(qw_rows + g * GW)
        x = tl.load(x_rows + g * GROUP)                                                     # [BM, GROUP]
        sx = tl.sum(x.to(tl.float32), axis=1)                                              # [BM]
        xt = tl.trans(tl.reshape(tl.permute(tl.reshape(x, (BM, GW, 2, PW // 2)), (0, 1, 3, 2)), (BM, GROUP)))
        if BITS == 2:
            # c[q] = A + B s0 + C s1 + D s0 s1 (s = +-1 per bit): three +-1 planes, three dots, exact
            s0 = _plane2(words, 15, bit_mask, NEG_ONE)
            s1 = _plane2(words, 14, bit_mask, NEG_ONE)
            s01 = _plane2(words ^ (words >> 1), 15, bit_mask, POS_ONE)   # +1 ^ (b0 ^ b1)
            p0 = _dot(s0, xt, BLOCK_N, GROUP, dtype, INTERP)
            p1 = _dot(s1, xt, BLOCK_N, GROUP, dtype, INTERP)
            p01 = _dot(s01, xt, BLOCK_N, GROUP, dtype, INTERP)
            e0 = tl.load(t0_rows + g * 4).to(tl.float32)
            e1 = tl.load(t0_rows + g * 4 + 1).to(tl.float32)
            e2 = tl.load(t0_rows + g * 4 + 2).to(tl.float32)
            e3 = tl.load(t0_rows + g * 4 + 3).to(tl.float32)
            acc += ((e1 - e0) + (e3 - e2))[:, None] * p0            # 4 B, 4 C, 4 D, 4 A: the 1/4 comes below
            acc += ((e2 - e0) + (e3 - e1))[:, None] * p1
            acc += ((e0 - e1) + (e3 - e2))[:, None] * p01
            acc += ((e0 + e1) + (e2 + e3))[:, None] * sx[None, :]
        else:
            if BITS == 1:
                v = _decode1(words, bit_mask, NEG_ONE)
            else:
                v = _decode4(words, bit_mask, MAGIC)
            part = _dot(v, xt, BLOCK_N, GROUP, dtype, INTERP)                               # [BN, BM] fp32
        if BITS == 1:
            c0 = tl.load(t0_rows + g * 2).to(tl.float32)
            c1 = tl.load(t0_rows + g * 2 + 1).to(tl.float32)
            acc += (c1 - c0)[:, None] * part                # 2 h and 2 mu: the 1/2 is applied once, below
            acc += (c1 + c0)[:, None] * sx[None, :]
        elif BITS == 4:
            s = tl.load(t0_rows + g).to(tl.float32)
            z = tl.load(t1_rows + g).to(tl.float32)
            acc += s[:, None] * part
            acc -= (s * (MAGIC_F + z))[:, None] * sx[None, :]

    if BITS == 1:
        acc = acc * 0.5
    elif BITS == 2:
        acc = acc * 0.25
    _epilogue(tl.trans(acc), rm, rn, M, N, bias_ptr, out_ptr, stride_om, pid_k, SPLIT_K, HAS_BIAS, INTERP)
