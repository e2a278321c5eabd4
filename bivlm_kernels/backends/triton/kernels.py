"""Triton kernels for the ``bivlm-packed`` format (see :mod:`bivlm_kernels.formats`).

Three kernels, all reading the neutral checkpoint layout directly (no repacking):

* ``decode_kernel``  -- small M (decode): memory-bound. Each program owns ``BLOCK_N`` output rows,
  streams their packed int32 words once, decodes them with bit operations in registers and accumulates with
  fp32 FMAs on the CUDA cores. Split-K (grid axis 1, fp32 atomics) gives enough programs for small N.
* ``dot_kernel``     -- larger M: dequantizes a ``[BLOCK_K, BLOCK_N]`` weight tile into registers in the
  activation dtype and feeds ``tl.dot`` (tensor cores: wgmma on sm_90); optional split-K for medium M.
* ``dequant_kernel`` -- writes the dense weight ``[N, K]`` (``dequantize_lut`` / ``dequantize_affine``).

A fourth, ``tc_kernel`` (1-bit lut and 4-bit affine at M <= 16 on tensor cores, the per-group parameters applied
after the product), lives in :mod:`.kernel_tc`.

Unpacking. A row of ``qweight`` is ``KW = K * BITS / 32`` int32 words; ``PER_WORD = 32 // BITS`` codes per word,
code ``j`` of word ``w`` is column ``k = w * PER_WORD + j`` at bit ``j * BITS`` (LSB first; the word is drawn
once, in :mod:`bivlm_kernels.formats`): ``code j = (word >> BITS * j) & (2**BITS - 1)``.

Kernels load a tile of whole words ``[.., BLOCK_KW]`` (contiguous along K: vectorizable loads) and broadcast it
against ``shifts = arange(PER_WORD) * BITS`` on a new axis, giving a ``[.., BLOCK_KW, PER_WORD]`` tile whose
flattening is exactly K order. The shift amounts are compile-time constants per register, so the bit tricks
below cost one or two instructions per code:

* lut codes are never shifted out: ``word & (1 << s)`` / ``word & (2 << s)`` test the code's bits in place and
  pick among the codebook entries with selects (exact);
* 1-bit decode moves the bit to the sign position (``word << (31 - j)``) and XORs it into ``-h`` (below);
* 4-bit codes are unpacked as ``(word >> s) & 15`` (``>>`` on int32 is arithmetic: mask *after* the shift) and
  made float without I2F (``_codes_f32``).

A group (>= 32 columns) always holds whole words, so the codebook / scale of a code depends only on its word:
tables are loaded once per word (``[.., BLOCK_KW]``), never per code.

Out-of-range rows/words are handled by clamping the load indices (loads need no masks and stay vectorized)
and masking only the stores; clamped K words meet x = 0, so they add nothing.

``INTERP`` is True only under ``TRITON_INTERPRET=1`` (CPU tests). Triton 3.8's interpreter truncates
fp32 -> bf16 casts and runs a bf16 ``tl.dot`` on the raw uint16 bits; the INTERP branches round to nearest even
by hand and run that dot in fp32 on bf16-rounded values, which is the same math the GPU does. They are pruned at
compile time on a GPU.
"""
import triton
import triton.language as tl


# ---------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------

@triton.jit
def _unpack(words, shifts, MASK: tl.constexpr):
    """int32 words ``[A, B, 1]``-broadcastable against ``shifts`` -> codes in ``0 .. MASK`` (mask after shift)."""
    return (words >> shifts) & MASK


@triton.jit
def _codes_f32(codes):
    """Exact int -> fp32 for codes < 2**23 without I2F (a quarter-rate-or-slower conversion on sm_80/sm_90):
    OR the code into the mantissa of 2**23 (bit pattern 0x4B000000) and subtract 2**23 (one LOP3 + one FADD)."""
    return (codes | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _tables(t0_ptr, t1_ptr, off, LUT: tl.constexpr, BITS: tl.constexpr, NATIVE: tl.constexpr = False):
    """Per-(row, group) parameters at table offsets ``off = row * G + group``, as fp32 (codebook entries in
    their own dtype if NATIVE: a select among them is already the exact weight).

    lut:    (c0, c1, c2, c3) = codebook[row, group, 0..3]   (c2, c3 repeat c0, c1 for 1 bit; unused)
    affine: (scale, zero, scale, zero)
    """
    if LUT:
        base = t0_ptr + off * (1 << BITS)
        dt: tl.constexpr = t0_ptr.dtype.element_ty if NATIVE else tl.float32
        p0 = tl.load(base).to(dt)
        p1 = tl.load(base + 1).to(dt)
        if BITS == 2:
            p2 = tl.load(base + 2).to(dt)
            p3 = tl.load(base + 3).to(dt)
        else:
            p2 = p0
            p3 = p1
    else:
        p0 = tl.load(t0_ptr + off).to(tl.float32)
        p1 = tl.load(t1_ptr + off).to(tl.float32)
        p2 = p0
        p3 = p1
    return p0, p1, p2, p3


@triton.jit
def _dequant(words, shifts, p0, p1, p2, p3, LUT: tl.constexpr, BITS: tl.constexpr, EXACT: tl.constexpr = True):
    """Weight of the code at bit ``shifts`` of ``words`` (broadcast against each other). lut tests the code's
    bits in place (no shift) and selects among the entries (exact). affine unpacks, then ``(q - z) * s`` in
    fp32 as the reference does (EXACT), or ``q * s - z * s`` (one FMA; within an fp32 rounding)."""
    if LUT:
        b0 = (words & (1 << shifts)) != 0
        if BITS == 1:
            w = tl.where(b0, p1, p0)
        else:
            w = tl.where((words & (2 << shifts)) != 0, tl.where(b0, p3, p2), tl.where(b0, p1, p0))
    else:
        q = _codes_f32(_unpack(words, shifts, (1 << BITS) - 1))
        if EXACT:
            w = (q - p1) * p0
        else:
            w = q * p0 - p1 * p0
    return w


@triton.jit
def _rne_bf16(v):
    """Round fp32 to the nearest-even bf16 value, kept in fp32 (interpreter only, see module docstring)."""
    bits = v.to(tl.int32, bitcast=True)
    bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & -65536
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _cast(v, dtype: tl.constexpr, INTERP: tl.constexpr):
    """fp32 -> ``dtype`` with round-to-nearest-even on every backend."""
    if INTERP:
        if dtype == tl.bfloat16:
            v = _rne_bf16(v)
    return v.to(dtype)


@triton.jit
def _epilogue(res, rm, rn, M, N, bias_ptr, out_ptr, stride_om, pid_k,
              SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, INTERP: tl.constexpr):
    """Add bias (once: by split 0), then store ``res [BLOCK_M, BLOCK_N]`` or atomically add it (split-K)."""
    if HAS_BIAS:
        b = tl.load(bias_ptr + tl.minimum(rn, N - 1)).to(tl.float32)
        if SPLIT_K > 1:
            b = b * (pid_k == 0).to(tl.float32)
        res += b[None, :]
    ptrs = out_ptr + rm.to(tl.int64)[:, None] * stride_om + rn[None, :]
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    if SPLIT_K > 1:
        tl.atomic_add(ptrs, res, mask=mask, sem="relaxed")     # fp32 buffer, zeroed by the launcher
    else:
        tl.store(ptrs, _cast(res, out_ptr.dtype.element_ty, INTERP), mask=mask)


@triton.jit
def _decode_loads(x_tile, qw_rows, tab_rows, t0_ptr, t1_ptr, kw0, KW, rw, LUT: tl.constexpr, BITS: tl.constexpr,
                  PER_WORD: tl.constexpr, WORDS_PER_GROUP: tl.constexpr, EVEN_K: tl.constexpr):
    """Loads of one decode step starting at word ``kw0``: packed words ``[BN, BKW]``, x ``[BM, BKW, PW]`` as
    fp32 (zero past K), and the per-word tables. Word indices are clamped, so any ``kw0`` is safe to load."""
    wi = kw0 + rw
    if EVEN_K:
        wi_ld = wi
        xm = tl.load(x_tile + kw0 * PER_WORD).to(tl.float32)
    else:
        wi_ld = tl.minimum(wi, KW - 1)
        x_off = tl.minimum(kw0, KW - 1) * PER_WORD
        xm = tl.load(x_tile + x_off, mask=(wi < KW)[None, :, None], other=0.0).to(tl.float32)
    words = tl.load(qw_rows + wi_ld[None, :])
    p0, p1, p2, p3 = _tables(t0_ptr, t1_ptr, tab_rows + (wi_ld // WORDS_PER_GROUP)[None, :], LUT, BITS)
    return words, xm, p0, p1, p2, p3


# ---------------------------------------------------------------------------------------------------------
# decode: CUDA-core GEMV for small M
# ---------------------------------------------------------------------------------------------------------

@triton.jit
def decode_kernel(x_ptr, qw_ptr, t0_ptr, t1_ptr, bias_ptr, out_ptr,
                  M, N, KW, G, stride_xm, stride_om,
                  LUT: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr,
                  BLOCK_M: tl.constexpr,      # rows of x per program (small: the accumulator scales with it)
                  BLOCK_N: tl.constexpr,      # output features per program
                  BLOCK_KW: tl.constexpr,     # packed words per row per step (BLOCK_KW * 4 bytes per row)
                  SPLIT_K: tl.constexpr,      # programs along K; > 1 accumulates with fp32 atomics
                  EVEN_K: tl.constexpr,       # KW % BLOCK_KW == 0: no K masks at all
                  HAS_BIAS: tl.constexpr, INTERP: tl.constexpr):
    """grid = (cdiv(N, BLOCK_N), SPLIT_K, cdiv(M, BLOCK_M)).

    Per step the ``[BN, BKW, PW]`` code tile is decoded once to fp32 and used for the BLOCK_M rows of x:
    1 bit: ``w = mu +- h`` (below): SHF + LOP3 per code; 2 bits: two in-place bit tests and selects; 4 bits:
    unpack + ``q * s - z * s`` (one FMA). The accumulator keeps the full ``[BM, BN, BKW, PW]`` shape and is
    reduced once after the loop: Triton spreads the code axis over lanes, so a per-step reduction would cost
    cross-lane shuffles for every word (it did: ~2000 instructions per step on sm_90 in a first version).
    sm_90 SASS of the loop with the default tiles: ~4.5 (1 bit), ~8 (2 bit), ~8.6 (4 bit) instructions per
    code at M = 1, of which 3 / ~5 / ~6 are the decode + FMA themselves (see ``offline.py``).
    """
    PER_WORD: tl.constexpr = 32 // BITS
    WORDS_PER_GROUP: tl.constexpr = GROUP // PER_WORD
    MASK: tl.constexpr = (1 << BITS) - 1
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)

    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rn_ld = tl.minimum(rn, N - 1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rm_ld = tl.minimum(rm, M - 1)
    rw = tl.arange(0, BLOCK_KW)
    rj = tl.arange(0, PER_WORD)
    shifts = (rj * BITS)[None, None, :]
    qw_rows = qw_ptr + rn_ld.to(tl.int64)[:, None] * KW                       # [BN, 1]
    tab_rows = rn_ld[:, None] * G                                              # [BN, 1]
    # x tile [BM, BKW, PW] of the current step: row m, column kw0 * PW + w * PW + j
    x_tile = (x_ptr + rm_ld.to(tl.int64)[:, None, None] * stride_xm
              + (rw[:, None] * PER_WORD + rj[None, :])[None, :, :])

    acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_KW, PER_WORD), dtype=tl.float32)
    acc_mu = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_KW), dtype=tl.float32)          # 1-bit only: sum mu * x
    STEP: tl.constexpr = SPLIT_K * BLOCK_KW
    # Register double buffering: the loads of step i + 1 are issued before the math of step i, so a warp
    # keeps its next tile in flight while it computes (Triton's pipeliner does not touch these loads: no dot).
    # Loads past the end (the prefetch after the last step) are clamped to the last full step when K is even
    # (no masks at all), else clamped and masked.
    kw_first = pid_k * BLOCK_KW
    if EVEN_K:
        kw_ld = tl.minimum(kw_first, KW - BLOCK_KW)
    else:
        kw_ld = kw_first
    words, xm, p0, p1, p2, p3 = _decode_loads(x_tile, qw_rows, tab_rows, t0_ptr, t1_ptr, kw_ld, KW, rw,
                                              LUT, BITS, PER_WORD, WORDS_PER_GROUP, EVEN_K)
    for kw0 in range(kw_first, KW, STEP):
        if EVEN_K:
            kw_ld = tl.minimum(kw0 + STEP, KW - BLOCK_KW)
        else:
            kw_ld = kw0 + STEP
        n_words, n_xm, n_p0, n_p1, n_p2, n_p3 = _decode_loads(
            x_tile, qw_rows, tab_rows, t0_ptr, t1_ptr, kw_ld, KW, rw, LUT, BITS, PER_WORD, WORDS_PER_GROUP, EVEN_K)
        if LUT and BITS == 2:
            w = _dequant(words[:, :, None], shifts, p0[:, :, None], p1[:, :, None], p2[:, :, None],
                         p3[:, :, None], LUT, BITS)
        elif LUT:
            # w = mu +- h with mu = (c0 + c1) / 2, h = (c1 - c0) / 2. The mu part needs only sum_j x_j (per
            # word, shared by all rows); the +-h part flips the sign bit of -h with the code bit moved to
            # bit 31: one SHF + one LOP3 per code, no int->float conversion, no select.
            sign = (words[:, :, None] << (31 - shifts)) & -2147483648            # bit j -> bit 31
            neg_h = (0.5 * (p0 - p1)).to(tl.int32, bitcast=True)               # -h: code 0 keeps it
            w = (neg_h[:, :, None] ^ sign).to(tl.float32, bitcast=True)
            acc_mu += (0.5 * (p0 + p1))[None, :, :] * tl.sum(xm, axis=2)[:, None, :]
        else:
            q = _codes_f32(_unpack(words[:, :, None], shifts, MASK))
            w = q * p0[:, :, None] - (p1 * p0)[:, :, None]                     # q * s - z * s
        acc += w[None, :, :, :] * xm[:, None, :, :]
        words, xm, p0, p1, p2, p3 = n_words, n_xm, n_p0, n_p1, n_p2, n_p3

    res = tl.sum(tl.sum(acc, axis=3), axis=2)                                  # [BM, BN]
    if LUT and BITS == 1:
        res += tl.sum(acc_mu, axis=2)
    _epilogue(res, rm, rn, M, N, bias_ptr, out_ptr, stride_om, pid_k, SPLIT_K, HAS_BIAS, INTERP)


# ---------------------------------------------------------------------------------------------------------
# GEMM: dequantized tile -> tl.dot
# ---------------------------------------------------------------------------------------------------------

@triton.jit
def dot_kernel(x_ptr, qw_ptr, t0_ptr, t1_ptr, bias_ptr, out_ptr,
               M, N, KW, G, stride_xm, stride_om,
               LUT: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_KW: tl.constexpr,       # packed words per step: BLOCK_K = BLOCK_KW * (32 // BITS) columns
               GROUP_M: tl.constexpr,        # L2 swizzle: GROUP_M row blocks walk the same weight columns
               SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr, HAS_BIAS: tl.constexpr,
               PRECISION: tl.constexpr,      # tl.dot input_precision: "ieee" for fp32 x, else "tf32" (unused)
               INTERP: tl.constexpr):
    """grid = (cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N), SPLIT_K). acc[m, n] += x[m, k] * w[n, k] via tl.dot."""
    PER_WORD: tl.constexpr = 32 // BITS
    WORDS_PER_GROUP: tl.constexpr = GROUP // PER_WORD
    MASK: tl.constexpr = (1 << BITS) - 1
    BLOCK_K: tl.constexpr = BLOCK_KW * PER_WORD
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm_ld = tl.minimum(rm, M - 1)
    rn_ld = tl.minimum(rn, N - 1)
    rk = tl.arange(0, BLOCK_K)
    rw = tl.arange(0, BLOCK_KW)
    shifts = (tl.arange(0, PER_WORD) * BITS)[None, :, None]
    x_rows = x_ptr + rm_ld.to(tl.int64)[:, None] * stride_xm                   # [BM, 1]
    qw_cols = qw_ptr + rn_ld.to(tl.int64)[None, :] * KW                       # [1, BN]
    tab_cols = rn_ld[None, :] * G                                              # [1, BN]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kw0 in range(pid_k * BLOCK_KW, KW, SPLIT_K * BLOCK_KW):
        wi = kw0 + rw
        kk = kw0 * PER_WORD + rk
        if EVEN_K:
            wi_ld = wi
            a = tl.load(x_rows + kk[None, :])                                  # [BM, BK]
        else:
            wi_ld = tl.minimum(wi, KW - 1)
            a = tl.load(x_rows + kk[None, :], mask=(kk < KW * PER_WORD)[None, :], other=0.0)
        words = tl.load(qw_cols + wi_ld[:, None])                              # [BKW, BN] int32
        # 1-bit lut: select between the two codebook entries in their own dtype (exact, no conversion per
        # weight). 2-bit selects compile to worse code on 16-bit values (sm_90 SASS), so they stay in fp32.
        # Steps start at multiples of BLOCK_KW; both are powers of two, so a step with BLOCK_KW <= words per
        # group lies inside one group: [1, BN] tables (sm_90: ~8.3 instead of ~10.7 instructions per code).
        if BLOCK_KW <= WORDS_PER_GROUP:
            toff = tab_cols + kw0 // WORDS_PER_GROUP
        else:
            toff = tab_cols + (wi_ld // WORDS_PER_GROUP)[:, None]
        p0, p1, p2, p3 = _tables(t0_ptr, t1_ptr, toff, LUT, BITS, NATIVE=LUT and BITS == 1)
        w = _dequant(words[:, None, :], shifts, p0[:, None, :], p1[:, None, :], p2[:, None, :],
                     p3[:, None, :], LUT, BITS, EXACT=False)                   # [BKW, PW, BN]
        w = tl.reshape(w, (BLOCK_K, BLOCK_N))                                  # row k = word * PW + j
        if INTERP and a.dtype == tl.bfloat16:
            acc += tl.dot(a.to(tl.float32), _rne_bf16(w.to(tl.float32)), input_precision="ieee")
        else:
            acc = tl.dot(a, _cast(w, a.dtype, INTERP), acc, input_precision=PRECISION)

    _epilogue(acc, rm, rn, M, N, bias_ptr, out_ptr, stride_om, pid_k, SPLIT_K, HAS_BIAS, INTERP)


# ---------------------------------------------------------------------------------------------------------
# dequantize
# ---------------------------------------------------------------------------------------------------------

@triton.jit
def dequant_kernel(qw_ptr, t0_ptr, t1_ptr, out_ptr, N, KW, G,
                   LUT: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr, INTERP: tl.constexpr):
    """grid = (cdiv(N, BLOCK_N), cdiv(KW, BLOCK_KW)); out [N, K] in the tables' dtype, bit-exact vs reference."""
    PER_WORD: tl.constexpr = 32 // BITS
    WORDS_PER_GROUP: tl.constexpr = GROUP // PER_WORD
    MASK: tl.constexpr = (1 << BITS) - 1
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    wi = tl.program_id(1) * BLOCK_KW + tl.arange(0, BLOCK_KW)
    rj = tl.arange(0, PER_WORD)
    rn_ld = tl.minimum(rn, N - 1)
    wi_ld = tl.minimum(wi, KW - 1)
    words = tl.load(qw_ptr + rn_ld.to(tl.int64)[:, None] * KW + wi_ld[None, :])   # [BN, BKW]
    p0, p1, p2, p3 = _tables(t0_ptr, t1_ptr, rn_ld[:, None] * G + (wi_ld // WORDS_PER_GROUP)[None, :],
                             LUT, BITS)
    w = _dequant(words[:, :, None], (rj * BITS)[None, None, :], p0[:, :, None], p1[:, :, None], p2[:, :, None],
                 p3[:, :, None], LUT, BITS)                                    # [BN, BKW, PW]
    ptrs = (out_ptr + rn.to(tl.int64)[:, None, None] * (KW * PER_WORD)
            + (wi * PER_WORD)[None, :, None] + rj[None, None, :])
    mask = (rn < N)[:, None, None] & (wi < KW)[None, :, None]
    tl.store(ptrs, _cast(w, out_ptr.dtype.element_ty, INTERP), mask=mask)
