"""The C++ CPU kernels (bivlm_kernels._C_cpu) against the pure-PyTorch reference.

Grid: bits {1, 2, 4} x group sizes {32, 64, 128, 256} x dtypes x M from 1 to 300 (both sides of the decode-GEMV /
tile-GEMM crossover) x odd N, strided and batched x, bias, out_dtype, the sub-2-bit segmented op, the scalar
fallback, torch.compile, and a seeded fuzz; g = 16 (2 and 4 bit, K a multiple of 16 but not of 32) over the direct
and the table-lookup kernels, AVX2 and scalar, and its refusal at 1 bit.

Tolerance (``assert_within_bound``): both the kernel and the reference sum K fp32 products, each with an error of
at most about K * u * sum_k |x_k| |w_k| (u = 2^-24, the fp32 unit roundoff). The kernels regroup the sum -- the
1-bit mask kernel computes c0 * S_g + (c1 - c0) * P_g per group, the 4-bit kernel scale * (sum c x - zero * S_g)
-- so the bound is taken with |w| replaced by its group maximum. The test allows 2 * K * u * that sum (both
sides) plus one rounding of the output dtype. An error in decoding (a wrong code, group or table entry) moves a
result by about |w| |x| (~1e-1 relative), orders of magnitude above this (~1e-4 relative at K = 768).
"""
import random

import pytest
import torch

from bivlm_kernels import formats, ops
from bivlm_kernels.backends import reference as ref_ops
from bivlm_kernels.nn import QuantLinear

pytestmark = pytest.mark.skipif(
    not ops.cpu_kernels_available(),
    reason="the CPU extension bivlm_kernels._C_cpu is not built (pip install --no-build-isolation -e .; "
           "BIVLM_BUILD_CPU=1 to make a failed build an error)")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
GROUPS = [32, 64, 128, 256]
U32 = 2.0 ** -24


def cpu_ext():
    from bivlm_kernels.backends import cpu as _cpu_extension
    return _cpu_extension


def make_weight(n, k, bits, g, dtype, gen=None):
    """Random packed weight: (qweight, tables) for lut (b = 1, 2) or affine (b = 4)."""
    qweight = formats.pack(torch.randint(0, 1 << bits, (n, k), generator=gen), bits)
    if bits < 4:
        return qweight, ((torch.randn(n, k // g, 1 << bits, generator=gen) * 0.05).to(dtype),)
    return qweight, ((torch.rand(n, k // g, generator=gen) * 0.01 + 1e-3).to(dtype),
                     (torch.rand(n, k // g, generator=gen) * 15).to(dtype))


def dense(qweight, tables, bits, g):
    return (formats.dequantize_lut(qweight, *tables, bits, g) if bits < 4
            else formats.dequantize_affine(qweight, *tables, bits, g))


def run_both(x, qweight, tables, bits, g, bias=None, out_dtype=None):
    """(CPU kernel, reference) of the op for this format."""
    name = "lut_linear" if bits < 4 else "affine_linear"
    args = (x, qweight, *tables, bits, g, bias, out_dtype)
    with ops.use_backend("cpu"):
        y = getattr(ops, name)(*args)
    return y, getattr(ref_ops, name)(*args)


def assert_within_bound(y, ref, x, w, g, out_dtype):
    """|y - ref| <= 2 K u (|x| @ max_group|w|^T) + one rounding of out_dtype (see the module docstring)."""
    assert y.shape == ref.shape and y.dtype == ref.dtype
    n, k = w.shape
    wmax = w.abs().view(n, k // g, g).amax(-1, keepdim=True).expand(n, k // g, g).reshape(n, k)
    scale = x.float().abs().reshape(-1, k) @ wmax.T
    tol = 2 * k * U32 * scale.reshape(ref.shape) + 1e-30
    eps_out = torch.finfo(out_dtype).eps if out_dtype != torch.float32 else 0.0
    tol = tol + eps_out * ref.float().abs()
    err = (y.float() - ref.float()).abs()
    worst = (err / tol).max().item()
    assert worst <= 1.0, f"error {err.max().item():.3g} exceeds the fp32 accumulation bound (ratio {worst:.2f})"


# ------------------------------------------------------------------------------------------------ linear ops

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("g", GROUPS)
@pytest.mark.parametrize("bits", [1, 2, 4])
def test_linear_grid(bits, g, dtype):
    n, k = 37, 3 * g                     # odd N (the 4- and 2-row blocks leave tails), K = 3 groups
    qweight, tables = make_weight(n, k, bits, g, dtype)
    w = dense(qweight, tables, bits, g)
    bias = torch.randn(n).to(dtype)
    for m in (1, 2, 3, 5, 8, 16, 17, 64, 300):          # 16 = largest decode-GEMV M by default
        x = torch.randn(m, k).to(dtype)
        for b, od in ((bias, None), (None, torch.float32)):
            y, ref = run_both(x, qweight, tables, bits, g, b, od)
            assert_within_bound(y, ref, x, w, g, od or dtype)


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_strided_batched_and_sliced_x(bits):
    n, k, g = 19, 256, 64
    qweight, tables = make_weight(n, k, bits, g, torch.float32)
    w = dense(qweight, tables, bits, g)
    big = torch.randn(3, 5, 2 * k)
    cases = [big[..., ::2], big[..., 7:7 + k], big[:1, :1, :k], big[:, 1, k:], big.transpose(0, 1)[..., :k]]
    for x in cases:
        y, ref = run_both(x, qweight, tables, bits, g)
        assert y.shape == (*x.shape[:-1], n)
        assert_within_bound(y, ref, x, w, g, torch.float32)


def test_empty_and_single_row():
    qweight, tables = make_weight(1, 64, 2, 32, torch.float32)
    y, ref = run_both(torch.randn(0, 64), qweight, tables, 2, 32)
    assert y.shape == ref.shape == (0, 1)
    y, ref = run_both(torch.randn(4, 64), qweight, tables, 2, 32)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_tile_path_with_small_tiles(bits):
    """M above the GEMV limit with tiles of 8 rows: several full tiles and a partial one."""
    ext = cpu_ext()
    old = ext.configure()
    n, k, g = 45, 256, 128
    qweight, tables = make_weight(n, k, bits, g, torch.bfloat16)
    w = dense(qweight, tables, bits, g)
    x = torch.randn(40, k).to(torch.bfloat16)
    bias = torch.randn(n).to(torch.bfloat16)
    try:
        ext.configure(tile_bytes=8 * 4 * k)
        y, ref = run_both(x, qweight, tables, bits, g, bias, torch.float32)
    finally:
        ext.configure(tile_bytes=old["tile_bytes"])
    assert_within_bound(y, ref, x, w, g, torch.float32)


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_scalar_fallback(bits):
    ext = cpu_ext()
    n, k, g = 21, 192, 64
    qweight, tables = make_weight(n, k, bits, g, torch.float16)
    w = dense(qweight, tables, bits, g)
    try:
        assert ext.configure(force_scalar=1)["isa"] == "scalar"
        for m in (1, 4, 40):
            x = torch.randn(m, k).to(torch.float16)
            y, ref = run_both(x, qweight, tables, bits, g, None, torch.float32)
            assert_within_bound(y, ref, x, w, g, torch.float32)
    finally:
        ext.configure(force_scalar=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [1, 2, 4])
def test_dequantize_bit_exact(bits, dtype):
    for g in GROUPS:
        qweight, tables = make_weight(13, 2 * g, bits, g, dtype)
        name = "dequantize_lut" if bits < 4 else "dequantize_affine"
        with ops.use_backend("cpu"):
            got = getattr(ops, name)(qweight, *tables, bits, g)
        want = getattr(ref_ops, name)(qweight, *tables, bits, g)
        assert got.dtype == want.dtype and torch.equal(got, want)


def test_fp16_tables_subnormal_and_special_values():
    """The C++ fp16 -> fp32 conversion (scalar fallback, mask kernel) on subnormals, zero signs, extremes."""
    vals = torch.tensor([0.0, -0.0, 6e-8, -6e-8, 1e-5, 65504.0, -65504.0, 1.0], dtype=torch.float16)
    n, k, g = 4, 32, 32
    cb = vals.view(4, 1, 2).clone()
    qweight = formats.pack(torch.randint(0, 2, (n, k)), 1)
    want = ref_ops.dequantize_lut(qweight, cb, 1, g)
    ext = cpu_ext()
    for scalar in (0, 1):
        try:
            ext.configure(force_scalar=scalar)
            with ops.use_backend("cpu"):
                assert torch.equal(ops.dequantize_lut(qweight, cb, 1, g), want)
                x = torch.ones(1, k, dtype=torch.float16)
                torch.testing.assert_close(ops.lut_linear(x, qweight, cb, 1, g, None, torch.float32),
                                           ref_ops.lut_linear(x, qweight, cb, 1, g, None, torch.float32))
        finally:
            ext.configure(force_scalar=0)


# ------------------------------------------------------------------------------------------------ sub-2-bit

def make_segmented(n, widths_bits, g, dtype, perm=True, gen=None):
    qweights, codebooks, bits = [], [], []
    for width, b in widths_bits:
        q, (cb,) = make_weight(n, width, b, g, dtype, gen)
        qweights.append(q), codebooks.append(cb), bits.append(b)
    k = sum(w for w, _ in widths_bits)
    p = torch.randperm(k, generator=gen).to(torch.int32) if perm else None
    w = torch.cat([formats.dequantize_lut(q, cb, b, g) for q, cb, b in zip(qweights, codebooks, bits)], 1)
    return p, qweights, codebooks, bits, w


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("perm", [True, False])
def test_segmented_matches_reference(dtype, perm):
    g = 64
    p, qws, cbs, bits, w = make_segmented(29, [(128, 2), (320, 1)], g, dtype, perm)
    bias = torch.randn(29).to(dtype)
    for m in (1, 3, 16, 40):
        x = torch.randn(m, 448).to(dtype)
        args = (x, p, qws, cbs, bits, g, bias, None)
        with ops.use_backend("cpu"):
            y = ops.segmented_lut_linear(*args)
        ref = ref_ops.segmented_lut_linear(*args)
        xp = x if p is None else x.index_select(-1, p)
        assert_within_bound(y, ref, xp, w, g, dtype)


def test_segmented_by_parts_equals_one_pass_and_opcheck():
    g = 32
    p, qws, cbs, bits, _ = make_segmented(11, [(64, 2), (96, 1), (32, 2)], g, torch.float32)
    x = torch.randn(2, 3, 192, requires_grad=True)
    bias = torch.randn(11, requires_grad=True)
    args = (x, p, qws, cbs, bits, g, bias, None)
    with ops.use_backend("cpu"):
        one = ops.segmented_lut_linear(*args)
    parts = ops.segmented_by_parts(*args)              # per-segment lut_linear (the GPU paths)
    torch.testing.assert_close(one, parts, rtol=1e-5, atol=1e-5)
    torch.library.opcheck(ops.segmented_lut_linear, args)
    one.sum().backward()
    x2, b2 = x.detach().clone().requires_grad_(), bias.detach().clone().requires_grad_()
    ref_ops.segmented_lut_linear(x2, p, qws, cbs, bits, g, b2, None).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(bias.grad, b2.grad)


def test_quantlinear_sub2bit_layout_one_call(monkeypatch):
    """A perm + 2-bit + 1-bit QuantLinear runs one segmented op on the CPU kernel and matches the reference."""
    g, n, k = 64, 24, 256
    qw = formats.QuantizedWeight(
        [formats.QuantizedSegment(2, torch.randint(0, 4, (n, 64)), codebook=torch.randn(n, 1, 4) * 0.05),
         formats.QuantizedSegment(1, torch.randint(0, 2, (n, 192)), codebook=torch.randn(n, 3, 2) * 0.05)],
        g, perm=torch.randperm(k))
    layer = QuantLinear.from_quantized(qw, bias=torch.randn(n), dtype=torch.float32)
    calls = []
    real = ops._KERNELS["segmented_lut_linear"]["cpu"]
    monkeypatch.setitem(ops._KERNELS["segmented_lut_linear"], "cpu", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(5, k)
    y = layer(x)
    assert calls == [1]
    with ops.use_backend("reference"):
        ref = layer(x)
    w = layer.dequantize()
    assert_within_bound(y, ref, x, w, g, torch.float32)


# ------------------------------------------------------------------------------------------------ selection

def test_auto_selects_cpu_and_reference_stays_reachable():
    assert ops.select_backend("lut_linear", torch.device("cpu")) == "cpu"
    assert ops.select_backend("affine_linear", torch.device("cpu")) == "cpu"
    with ops.use_backend("reference"):
        assert ops.select_backend("lut_linear", torch.device("cpu")) == "reference"
    with ops.use_backend("cpu"):
        with pytest.raises(RuntimeError, match="backend 'cpu' was forced but cannot run lut_linear on meta"):
            ops.select_backend("lut_linear", torch.device("meta"))
    assert cpu_ext().configure()["isa"] in ("avx2", "scalar")


def test_compile_fullgraph_on_cpu_kernels():
    g = 64
    q = QuantLinear.from_quantized(formats.QuantizedWeight(
        [formats.QuantizedSegment(2, torch.randint(0, 4, (16, 64)), codebook=torch.randn(16, 1, 4)),
         formats.QuantizedSegment(1, torch.randint(0, 2, (16, 128)), codebook=torch.randn(16, 2, 2))],
        g, perm=torch.randperm(192)), dtype=torch.float32)
    lin = QuantLinear.from_linear(torch.nn.Linear(192, 8), 4, group_size=g, dtype=torch.float32)

    def f(x):
        return lin(torch.relu(q(x)).repeat(1, 12))

    x = torch.randn(3, 192)
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), f(x))
    with ops.use_backend("reference"):
        torch.testing.assert_close(f(x), compiled(x), rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------ fuzz

def test_seeded_fuzz():
    rng = random.Random(1234)
    gen = torch.Generator().manual_seed(1234)
    for _ in range(60):
        bits, g = rng.choice([1, 2, 4]), rng.choice(GROUPS)
        dtype = rng.choice(DTYPES)
        n, k = rng.randint(1, 70), g * rng.randint(1, 4)
        m = rng.choice([1, 1, 2, 3, 4, 7, 15, 16, 17, 33, 100, 300])
        qweight, tables = make_weight(n, k, bits, g, dtype, gen)
        w = dense(qweight, tables, bits, g)
        x = torch.randn(m, 2 * k, generator=gen).to(dtype)[:, rng.choice([0, k])::1][:, :k] \
            if rng.random() < 0.5 else torch.randn(m, k, generator=gen).to(dtype)
        bias = torch.randn(n, generator=gen).to(dtype) if rng.random() < 0.5 else None
        od = rng.choice([None, torch.float32])
        y, ref = run_both(x, qweight, tables, bits, g, bias, od)
        assert_within_bound(y, ref, x, w, g, od or dtype)


# ------------------------------------------------------------------------------------------------ table lookup
# The table-lookup kernels (csrc/cpu/tmac.h) behind lut_linear / affine_linear / segmented_lut_linear: by default
# for 1 bit at small M; here forced for every bit width and M (configure(tmac_max_m=...)), so the same grid runs
# through the repack, the per-call tables and the lookup kernels.

@pytest.fixture
def tmac_everywhere():
    ext = cpu_ext()
    old = ext.configure()["tmac_max_m"]
    ext.configure(tmac_max_m={1: 10 ** 6, 2: 10 ** 6, 4: 10 ** 6})
    yield ext
    ext.configure(tmac_max_m=old)


def tmac_counting(monkeypatch):
    """Count tmac_linear / tmac_repack calls made through the CPU backend wrappers."""
    ext = cpu_ext()
    calls = {"linear": 0, "repack": 0}
    for attr, name in (("_tmac_linear", "linear"), ("_tmac_linear1", "linear"), ("_tmac_repack", "repack")):
        real = getattr(ext, attr)

        def fn(*a, real=real, name=name):
            calls[name] += 1
            return real(*a)
        monkeypatch.setattr(ext, attr, fn)
    return calls


@pytest.mark.parametrize("bits", [1, 2, 4])
@pytest.mark.parametrize("g", GROUPS)
def test_tmac_repack_layout(bits, g):
    """The repack against the neutral layout: every plane bit of every (row, column), every coefficient."""
    n, k = 21, 2 * g                                   # 21 rows: 3 blocks of 8, the last one padded
    qweight, tables = make_weight(n, k, bits, g, torch.bfloat16)
    codes, coefs = torch.ops.bivlm_cpu.tmac_repack(qweight, tables[0], tables[1] if bits == 4 else None, bits, g)
    nb, planes = 3, {1: 1, 2: 2, 4: 4}[bits]
    assert codes.shape == (nb, k // 32, planes, 8) and coefs.shape == (nb, k // g, 4 if bits == 2 else 2, 8)
    want_codes = formats.unpack(qweight, bits, k)
    for p in range(planes):
        rows = codes[:, :, p, :].permute(0, 2, 1).reshape(nb * 8, k // 32)
        assert torch.equal(formats.unpack(rows[:n].contiguous(), 1, k), (want_codes >> p) & 1)
        assert not rows[n:].any()
    cf = coefs.permute(0, 3, 1, 2).reshape(nb * 8, k // g, -1)
    t = [x.float() for x in tables]
    if bits == 4:
        want = torch.stack([t[0], t[0] * t[1]], -1)
    elif bits == 1:
        c0, c1 = t[0].unbind(-1)
        want = torch.stack([c1 - c0, c0], -1)
    else:
        c0, c1, c2, c3 = t[0].unbind(-1)
        want = torch.stack([c1 - c0, c2 - c0, ((c3 - c2) - c1) + c0, c0], -1)
    assert torch.equal(cf[:n], want) and not cf[n:].any()


@pytest.mark.parametrize("scalar", [0, 1])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("g", GROUPS)
@pytest.mark.parametrize("bits", [1, 2, 4])
def test_tmac_linear_grid(bits, g, dtype, scalar, tmac_everywhere, monkeypatch):
    calls = tmac_counting(monkeypatch)
    n, k = 37, 3 * g                     # odd N: 5 blocks of 8 rows, the last with 5; K = 3 groups
    qweight, tables = make_weight(n, k, bits, g, dtype)
    w = dense(qweight, tables, bits, g)
    bias = torch.randn(n).to(dtype)
    try:
        tmac_everywhere.configure(force_scalar=scalar)
        ms = (1, 3, 16, 64, 300) if not scalar else (1, 3, 16)
        for m in ms:
            x = torch.randn(m, k).to(dtype)
            for b, od in ((bias, None), (None, torch.float32)):
                y, ref = run_both(x, qweight, tables, bits, g, b, od)
                assert_within_bound(y, ref, x, w, g, od or dtype)
    finally:
        tmac_everywhere.configure(force_scalar=0)
    assert calls["linear"] == 2 * len(ms) and calls["repack"] == 1       # repacked once, then cached


def test_tmac_large_m_in_table_chunks(tmac_everywhere):
    """Tables for a few rows of x at a time (tile_bytes bounds them): M = 300 over several chunks."""
    old = tmac_everywhere.configure()["tile_bytes"]
    n, k, g = 29, 256, 64
    try:
        tmac_everywhere.configure(tile_bytes=7 * k * 2 * 4)        # 7 rows of tables per chunk
        for bits in (1, 2, 4):
            qweight, tables = make_weight(n, k, bits, g, torch.float32)
            x = torch.randn(300, k)
            y, ref = run_both(x, qweight, tables, bits, g)
            assert_within_bound(y, ref, x, dense(qweight, tables, bits, g), g, torch.float32)
    finally:
        tmac_everywhere.configure(tile_bytes=old)


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_tmac_strided_and_batched_x(bits, tmac_everywhere):
    n, k, g = 19, 256, 64
    qweight, tables = make_weight(n, k, bits, g, torch.float32)
    w = dense(qweight, tables, bits, g)
    big = torch.randn(3, 5, 2 * k)
    for x in [big[..., ::2], big[..., 7:7 + k], big[:1, :1, :k], big[:, 1, k:], big.transpose(0, 1)[..., :k]]:
        y, ref = run_both(x, qweight, tables, bits, g)
        assert y.shape == (*x.shape[:-1], n)
        assert_within_bound(y, ref, x, w, g, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("perm", [True, False])
def test_tmac_segmented(dtype, perm, tmac_everywhere, monkeypatch):
    calls = tmac_counting(monkeypatch)
    g = 64
    p, qws, cbs, bits, w = make_segmented(29, [(128, 2), (320, 1)], g, dtype, perm)
    bias = torch.randn(29).to(dtype)
    for m in (1, 3, 16, 64, 300):
        x = torch.randn(m, 448).to(dtype)
        args = (x, p, qws, cbs, bits, g, bias, None)
        with ops.use_backend("cpu"):
            y = ops.segmented_lut_linear(*args)
        ref = ref_ops.segmented_lut_linear(*args)
        xp = x if p is None else x.index_select(-1, p)
        assert_within_bound(y, ref, xp, w, g, dtype)
    assert calls["linear"] == 5 and calls["repack"] == 2


def test_tmac_default_dispatch_cache_and_in_place_writes(monkeypatch):
    """By default 1-bit M = 1 runs the lookup kernels on a repack built once; an in-place write to the packed
    buffers (load_state_dict, copy_) rebuilds it; inference tensors, which the cache cannot track, take the
    direct kernels; 1-bit at M above tmac_max_m and 4 bit at M = 1 take the direct kernels too."""
    calls = tmac_counting(monkeypatch)
    ext = cpu_ext()
    n, k, g = 24, 128, 32
    qweight, (cb,) = make_weight(n, k, 1, g, torch.float32)
    x = torch.randn(1, k)
    for _ in range(3):
        y, ref = run_both(x, qweight, (cb,), 1, g)
        assert_within_bound(y, ref, x, dense(qweight, (cb,), 1, g), g, torch.float32)
    assert calls == {"linear": 3, "repack": 1}
    q2, (cb2,) = make_weight(n, k, 1, g, torch.float32)
    qweight.copy_(q2)
    cb.copy_(cb2)
    y, ref = run_both(x, qweight, (cb,), 1, g)
    assert_within_bound(y, ref, x, dense(qweight, (cb,), 1, g), g, torch.float32)
    assert calls == {"linear": 4, "repack": 2}
    big = ext.configure()["tmac_max_m"][1] + 1
    run_both(torch.randn(big, k), qweight, (cb,), 1, g)
    q4, t4 = make_weight(n, k, 4, g, torch.float32)
    run_both(x, q4, t4, 4, g)
    with torch.inference_mode():
        qi, ci = qweight.clone(), cb.clone()
    y, ref = run_both(x, qi, (ci,), 1, g)
    assert_within_bound(y, ref, x, dense(qi, (ci,), 1, g), g, torch.float32)
    assert calls == {"linear": 4, "repack": 2}


def test_tmac_configure_rejects_unknown_bits():
    with pytest.raises(ValueError, match="tmac_max_m keys"):
        cpu_ext().configure(tmac_max_m={3: 4})


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_tmac_seeded_fuzz(bits, tmac_everywhere):
    rng = random.Random(17 + bits)
    gen = torch.Generator().manual_seed(17 + bits)
    for _ in range(20):
        g, dtype = rng.choice(GROUPS), rng.choice(DTYPES)
        n, k = rng.randint(1, 70), g * rng.randint(1, 4)
        m = rng.choice([1, 1, 2, 3, 5, 8, 16, 17, 33, 64])
        qweight, tables = make_weight(n, k, bits, g, dtype, gen)
        x = torch.randn(m, k, generator=gen).to(dtype)
        bias = torch.randn(n, generator=gen).to(dtype) if rng.random() < 0.5 else None
        y, ref = run_both(x, qweight, tables, bits, g, bias, None)
        assert_within_bound(y, ref, x, dense(qweight, tables, bits, g), g, dtype)


def test_direct_segmented_transposed_x_at_column_offsets():
    """The direct kernels on the sub-2-bit layout at g = 128, lookups off: 2-bit segments at column offsets 0 and
    640 read the 8-word-transposed x (Activations::xt) from their own columns."""
    ext = cpu_ext()
    old = ext.configure()["tmac_max_m"]
    g = 128
    p, qws, cbs, bits, w = make_segmented(13, [(256, 2), (384, 1), (128, 2)], g, torch.bfloat16)
    try:
        ext.configure(tmac_max_m={1: 0, 2: 0, 4: 0})
        for m in (1, 2, 5, 16):
            x = torch.randn(m, 768).to(torch.bfloat16)
            args = (x, p, qws, cbs, bits, g, None, torch.float32)
            with ops.use_backend("cpu"):
                y = ops.segmented_lut_linear(*args)
            ref = ref_ops.segmented_lut_linear(*args)
            assert_within_bound(y, ref, x.index_select(-1, p), w, g, torch.float32)
    finally:
        ext.configure(tmac_max_m=old)


@pytest.mark.parametrize("tmac", [True, False])
def test_row_split_over_threads(tmac):
    """Small calls stay on one thread (min_task_work); with it at 1 and 2 threads every call splits its output
    rows over tasks, whose boundaries (8-row blocks, 4-row blocks, odd tails) must not change a result."""
    ext = cpu_ext()
    old, threads = ext.configure(), torch.get_num_threads()
    try:
        ext.configure(min_task_work=1, tmac_max_m={1: 10 ** 6 if tmac else 0, 2: 10 ** 6 if tmac else 0,
                                                   4: 10 ** 6 if tmac else 0})
        torch.set_num_threads(2)
        for bits in (1, 2, 4):
            for n in (37, 61):
                g = 64
                qweight, tables = make_weight(n, 4 * g, bits, g, torch.float32)
                w = dense(qweight, tables, bits, g)
                for m in (1, 3, 16, 64):
                    x = torch.randn(m, 4 * g)
                    y, ref = run_both(x, qweight, tables, bits, g)
                    assert_within_bound(y, ref, x, w, g, torch.float32)
    finally:
        torch.set_num_threads(threads)
        ext.configure(min_task_work=old["min_task_work"], tmac_max_m=old["tmac_max_m"])


# ------------------------------------------------------------------------------------------------ g = 16
# g = 16 (2 and 4 bit only): one word per group at 2 bits, two at 4; K a multiple of 16 but not of 32, so the
# lookup path's last 32-column code word is half full and a group is half a code word (csrc/cpu/tmac.h).

G16_BITS = [2, 4]


@pytest.fixture(params=["direct", "tmac"])
def g16_path(request):
    """Both kernel families: the direct kernels (lookups off) or the table-lookup kernels forced for every M."""
    ext = cpu_ext()
    old = ext.configure()["tmac_max_m"]
    on = 10 ** 6 if request.param == "tmac" else 0
    ext.configure(tmac_max_m={1: on, 2: on, 4: on})
    yield request.param
    ext.configure(tmac_max_m=old, force_scalar=0)


def g16_inputs(m, k, dtype, gen, kind):
    """x [m, k]: contiguous, a strided column view, or a column slice of a wider row."""
    big = torch.randn(m, 2 * k + 16, generator=gen).to(dtype)
    return {"contig": big[:, :k].contiguous(), "strided": big[:, : 2 * k : 2], "sliced": big[:, 16:16 + k]}[kind]


@pytest.mark.parametrize("scalar", [0, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits", G16_BITS)
def test_g16_linear_grid(bits, dtype, scalar, g16_path):
    ext, g, gen = cpu_ext(), 16, torch.Generator().manual_seed(160 + bits)
    n, k = 37, 5 * 16                    # odd N; K = 80: 5 groups, 2.5 lookup words
    qweight, tables = make_weight(n, k, bits, g, dtype, gen)
    w = dense(qweight, tables, bits, g)
    bias = torch.randn(n, generator=gen).to(dtype)
    assert ext.configure(force_scalar=scalar)["force_scalar"] == bool(scalar)
    for m in (1, 3, 16, 17, 70):          # 70 > 64: the tile + at::mm path (direct)
        for kind in ("contig", "strided", "sliced"):
            x = g16_inputs(m, k, dtype, gen, kind)
            for b, od in ((bias, None), (None, torch.float32)):
                y, ref = run_both(x, qweight, tables, bits, g, b, od)
                assert_within_bound(y, ref, x, w, g, od or dtype)


@pytest.mark.parametrize("scalar", [0, 1])
@pytest.mark.parametrize("bits", G16_BITS)
def test_g16_dequantize_bit_exact(bits, scalar):
    ext = cpu_ext()
    try:
        ext.configure(force_scalar=scalar)
        for dtype in DTYPES:
            qweight, tables = make_weight(13, 48, bits, 16, dtype)
            name = "dequantize_lut" if bits < 4 else "dequantize_affine"
            with ops.use_backend("cpu"):
                got = getattr(ops, name)(qweight, *tables, bits, 16)
            want = getattr(ref_ops, name)(qweight, *tables, bits, 16)
            assert got.dtype == want.dtype and torch.equal(got, want)
    finally:
        ext.configure(force_scalar=0)


@pytest.mark.parametrize("bits", G16_BITS)
def test_g16_tmac_repack_layout(bits):
    """K = 48: codes [NB, 2, planes, 8], the second word's columns 48 .. 63 zero; one coefficient set per group."""
    n, k, g = 21, 48, 16
    qweight, tables = make_weight(n, k, bits, g, torch.float32)
    codes, coefs = torch.ops.bivlm_cpu.tmac_repack(qweight, tables[0], tables[1] if bits == 4 else None, bits, g)
    planes = {2: 2, 4: 4}[bits]
    assert codes.shape == (3, 2, planes, 8) and coefs.shape == (3, 3, 4 if bits == 2 else 2, 8)
    want_codes = formats.unpack(qweight, bits, k)
    for p in range(planes):
        rows = codes[:, :, p, :].permute(0, 2, 1).reshape(24, 2)
        assert torch.equal(formats.unpack(rows[:n].contiguous(), 1, 64)[:, :k], (want_codes >> p) & 1)
        assert not (rows[:, 1] >> 16).any() and not rows[n:].any()


@pytest.mark.parametrize("scalar", [0, 1])
@pytest.mark.parametrize("perm", [True, False])
def test_g16_segmented(perm, scalar, g16_path):
    """The sub-2-bit op at g = 16 (every segment 2-bit: 1 bit cannot take g = 16), segments of 48 and 80 columns
    (column offsets not multiples of 32)."""
    ext, g, gen = cpu_ext(), 16, torch.Generator().manual_seed(7)
    p, qws, cbs, bits, w = make_segmented(29, [(48, 2), (80, 2), (16, 2)], g, torch.bfloat16, perm, gen)
    bias = torch.randn(29, generator=gen).to(torch.bfloat16)
    ext.configure(force_scalar=scalar)
    for m in (1, 5, 70):
        x = g16_inputs(m, 144, torch.bfloat16, gen, "strided")
        args = (x, p, qws, cbs, bits, g, bias, None)
        with ops.use_backend("cpu"):
            y = ops.segmented_lut_linear(*args)
        ref = ref_ops.segmented_lut_linear(*args)
        assert_within_bound(y, ref, x if p is None else x.index_select(-1, p), w, g, torch.bfloat16)


def test_g16_seeded_fuzz(g16_path):
    """Fresh random shapes at g = 16: N odd or not, K = 16 * (1 .. 9), any M, dtype, bias, layout of x, ISA."""
    ext = cpu_ext()
    rng = random.Random(1616)
    gen = torch.Generator().manual_seed(1616)
    for _ in range(30):
        bits, dtype = rng.choice(G16_BITS), rng.choice(DTYPES)
        n, k, m = rng.randint(1, 70), 16 * rng.randint(1, 9), rng.choice([1, 2, 3, 7, 16, 17, 33, 65, 100])
        ext.configure(force_scalar=rng.randint(0, 1))
        qweight, tables = make_weight(n, k, bits, 16, dtype, gen)
        x = g16_inputs(m, k, dtype, gen, rng.choice(["contig", "strided", "sliced"]))
        bias = torch.randn(n, generator=gen).to(dtype) if rng.random() < 0.5 else None
        od = rng.choice([None, torch.float32])
        y, ref = run_both(x, qweight, tables, bits, 16, bias, od)
        assert_within_bound(y, ref, x, dense(qweight, tables, bits, 16), 16, od or dtype)


def test_g16_refused_at_1_bit():
    """1 bit at g = 16 is refused with a ValueError naming group_size and the allowed values, by the ops (the
    format's check) and by the C++ ops themselves (called directly)."""
    qweight, cb = formats.pack(torch.randint(0, 2, (3, 32)), 1), torch.randn(3, 2, 2)
    x = torch.randn(1, 32)
    with ops.use_backend("cpu"), pytest.raises(ValueError, match="group_size"):
        ops.lut_linear(x, qweight, cb, 1, 16)
    match = r"group_size must be one of 32, 64, 128, 256 for bits=1.*got 16"
    C = torch.ops.bivlm_cpu
    for call in (lambda: C.lut_linear(x, qweight, cb, 1, 16), lambda: C.dequantize_lut(qweight, cb, 1, 16),
                 lambda: C.segmented_lut_linear(x, None, [qweight], [cb], [1], 16),
                 lambda: C.tmac_repack(qweight, cb, None, 1, 16)):
        with pytest.raises(ValueError, match=match):
            call()
    for g in (8, 48):                    # not a group size at any width
        with pytest.raises(ValueError, match="group_size must be one of 16, 32, 64, 128, 256 for bits=2"):
            C.dequantize_lut(formats.pack(torch.randint(0, 4, (3, 96)), 2), torch.randn(3, 96 // g, 4), 2, g)
