"""Tests of the compiled CUDA kernels (``bivlm_kernels._C``, sources in ``csrc/cuda/``) against the reference.

Skipped (with the reason) where there is no CUDA device or the extension is not built. On a GPU machine::

    BIVLM_BUILD_CUDA=1 pip install --no-build-isolation -e .
    pytest tests/test_cuda.py -q

Tolerance for the linear ops: the relative Frobenius error of the kernel's output versus the fp32 oracle (the
reference op with an fp32 output) must be at most 2x the error of ``F.linear`` in the same dtype on the
dequantized weight (rounded to that dtype), plus a tiny floor -- i.e. the kernel may not be less accurate than
what a dense fp16/bf16 layer would give on the same weight. The dequantize ops must be bit-exact.
"""
import functools

import pytest
import torch
import torch.nn.functional as F

from bivlm_kernels import formats, ops
from bivlm_kernels.backends import reference as ref_ops
from bivlm_kernels.nn import QuantLinear


def _skip_reason():
    if not torch.cuda.is_available():
        return "needs a CUDA device (torch.cuda.is_available() is False)"
    try:
        import bivlm_kernels._C  # noqa: F401
    except (ImportError, OSError) as e:
        return (f"CUDA extension bivlm_kernels._C is not built ({e}); "
                f"build it with BIVLM_BUILD_CUDA=1 pip install --no-build-isolation -e .")
    return None


_SKIP = _skip_reason()
pytestmark = pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")

# Format name -> (kind, bits)
FORMATS = {"lut1": ("lut", 1), "lut2": ("lut", 2), "affine4": ("affine", 4)}
GROUP_SIZES = (32, 64, 128, 256)
MS = (1, 2, 3, 7, 16, 17, 64, 255, 1024)   # 1..16: GEMV kernel; 17+: dequantize + cuBLAS (kGemvMaxM = 16)
# (N, K): odd N; K = 160 exercises the 4-byte-load kernel (1-bit g32: 5 words per row, 2-bit g32: 10);
# N = 7 forces split-K; K = 28672 is the largest real VLM/LLM inner dimension we target.
SHAPES = ((7, 128), (129, 160), (1001, 1024), (4097, 4096), (255, 28672))
FLOAT_TOL_FLOOR = 1e-6


def _cases():
    for fmt in FORMATS:
        for dtype in (torch.float16, torch.bfloat16):
            for n, k in SHAPES:
                for g in GROUP_SIZES:
                    if k % g:
                        continue
                    if k == 28672 and g != 128:      # keep the big shape to one group size (GPU time)
                        continue
                    yield pytest.param(fmt, g, dtype, n, k, id=f"{fmt}-g{g}-{str(dtype)[6:]}-n{n}-k{k}")


def _weight(fmt, n, k, g, dtype, seed=0):
    """Fresh random packed weight: uniform random codes, non-zero random codebooks / scales / zeros."""
    kind, bits = FORMATS[fmt]
    gen = torch.Generator(device="cuda").manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (n, k), device="cuda", generator=gen)
    qweight = formats.pack(codes, bits)
    if kind == "lut":
        codebook = torch.randn(n, k // g, 1 << bits, device="cuda", generator=gen).to(dtype)
        return qweight, (codebook,)
    scales = (torch.rand(n, k // g, device="cuda", generator=gen) * 0.02 + 0.005).to(dtype)
    zeros = (torch.rand(n, k // g, device="cuda", generator=gen) * 15).to(dtype)
    return qweight, (scales, zeros)


def _linear(fmt, x, qweight, tables, g, bias=None, out_dtype=None):
    kind, bits = FORMATS[fmt]
    op = ops.lut_linear if kind == "lut" else ops.affine_linear
    return op(x, qweight, *tables, bits, g, bias, out_dtype)


def _dequant_fp32(fmt, qweight, tables, g):
    kind, bits = FORMATS[fmt]
    if kind == "lut":
        return formats.dequantize_lut(qweight, tables[0], bits, g)
    return formats.dequantize_affine(qweight, tables[0], tables[1], bits, g)


def _reference(fmt, x, qweight, tables, g, bias):
    kind, bits = FORMATS[fmt]
    if kind == "lut":
        return ref_ops.lut_linear(x, qweight, tables[0], bits, g, bias, torch.float32)
    return ref_ops.affine_linear(x, qweight, tables[0], tables[1], bits, g, bias, torch.float32)


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


@functools.lru_cache(maxsize=1)
def _cached_weight(fmt, n, k, g, dtype):
    return _weight(fmt, n, k, g, dtype)


# ---------------------------------------------------------------------------------------------------------
# linear ops against the reference
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt,g,dtype,n,k", list(_cases()))
def test_linear_matches_reference(fmt, g, dtype, n, k):
    qweight, tables = _cached_weight(fmt, n, k, g, dtype)
    w_dense = _dequant_fp32(fmt, qweight, tables, g).to(dtype)      # the weight a dense layer would hold
    bias = torch.randn(n, device="cuda").to(dtype)
    failures = []
    for m in MS:
        x = torch.randn(m, k, device="cuda").to(dtype)
        use_bias = bias if m % 2 else None                          # odd M with bias, even M without
        with ops.use_backend("cuda"):
            y = _linear(fmt, x, qweight, tables, g, use_bias)
        assert y.dtype == dtype and y.shape == (m, n)
        ref = _reference(fmt, x, qweight, tables, g, use_bias)
        base = F.linear(x, w_dense, use_bias)
        err, base_err = _rel(y, ref), _rel(base, ref)
        if not torch.isfinite(y).all() or err > 2 * base_err + FLOAT_TOL_FLOOR:
            failures.append(f"m={m}: rel err {err:.3e} > 2 x F.linear's {base_err:.3e}")
    assert not failures, f"{fmt} g={g} {dtype} n={n} k={k}: " + "; ".join(failures)


@pytest.mark.parametrize("fmt", ("lut1", "lut2", "affine4"))
@pytest.mark.parametrize("g", (64, 128))
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
def test_tensor_core_path_against_cuda_core_and_reference(fmt, g, dtype):
    """1/2-bit lut and 4-bit affine at M <= 16 go to the tensor-core kernels (tc_linear on the cached repack): the error is that
    of the CUDA-core GEMV (BIVLM_CUDA_TC=0's path) within 2x, both against the fp32 oracle; the repack is built once."""
    from bivlm_kernels.backends import repack_cache
    from bivlm_kernels.backends.cuda import routing as tc_dispatch
    repack_cache.clear()
    n, k = 3001, 4352                      # N not a multiple of 64, K not a multiple of 256
    qweight, tables = _weight(fmt, n, k, g, dtype, seed=3)
    bias = torch.randn(n, device="cuda").to(dtype)
    for m in (1, 2, 3, 5, 8, 13, 16):
        x = torch.randn(m, k, device="cuda").to(dtype)
        ref = _reference(fmt, x, qweight, tables, g, bias)
        with ops.use_backend("cuda"):
            y_tc = _linear(fmt, x, qweight, tables, g, bias)
            tc_dispatch.enabled = False
            try:
                y_cc = _linear(fmt, x, qweight, tables, g, bias)
            finally:
                tc_dispatch.enabled = True
        assert torch.isfinite(y_tc).all()
        assert _rel(y_tc, ref) <= 2 * _rel(y_cc, ref) + 1e-3 * (dtype == torch.bfloat16) + FLOAT_TOL_FLOOR, m
    assert repack_cache.size() == 1


@pytest.mark.parametrize("g", (64, 128))
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
def test_segmented_one_launch_against_parts_and_reference(g, dtype):
    """The sub-2-bit layout (perm, 2-bit segment, 1-bit segment) at M <= 16 runs as seg_tc_linear (one decode
    launch + the split-K reduce): its error is that of the per-segment path (BIVLM_CUDA_TC=0) within 2x."""
    from bivlm_kernels.backends import repack_cache
    from bivlm_kernels.backends.cuda import routing as tc_dispatch
    repack_cache.clear()
    n, k2, k1 = 3001, 3 * g, 4096 + g
    gen = torch.Generator().manual_seed(5)
    qws, cbs = [], []
    for b, kk in ((2, k2), (1, k1)):
        qws.append(formats.pack(torch.randint(0, 1 << b, (n, kk), generator=gen), b).cuda())
        cbs.append(torch.randn(n, kk // g, 1 << b, generator=gen).to(dtype).cuda())
    perm = torch.randperm(k2 + k1, generator=gen).to(torch.int32).cuda()
    bias = torch.randn(n, device="cuda").to(dtype)
    for m in (1, 3, 8, 16):
        x = torch.randn(m, k2 + k1, device="cuda").to(dtype)
        args = (x, perm, qws, cbs, [2, 1], g, bias, None)
        ref = ref_ops.segmented_lut_linear(*args[:-1], torch.float32)
        with ops.use_backend("cuda"):
            y = ops.run("segmented_lut_linear", *args)
            tc_dispatch.enabled = False
            try:
                y_parts = ops.run("segmented_lut_linear", *args)
            finally:
                tc_dispatch.enabled = True
        assert torch.isfinite(y).all()
        assert _rel(y, ref) <= 2 * _rel(y_parts, ref) + 1e-3 * (dtype == torch.bfloat16) + FLOAT_TOL_FLOOR, m
    assert repack_cache.size() == 2


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("m", (1, 5, 16, 40))
@pytest.mark.parametrize("n", (7, 2049))   # 7: split-K partials; 2049: one pass writing fp32 directly
def test_linear_fp32_output(fmt, m, n):
    """out_dtype=float32 (used for mixed-segment accumulation) on half and bf16 inputs."""
    k, g = 1024, 128
    for dtype in (torch.float16, torch.bfloat16):
        qweight, tables = _weight(fmt, n, k, g, dtype)
        x = torch.randn(m, k, device="cuda").to(dtype)
        bias = torch.randn(n, device="cuda").to(dtype)
        with ops.use_backend("cuda"):
            y = _linear(fmt, x, qweight, tables, g, bias, torch.float32)
        assert y.dtype == torch.float32
        ref = _reference(fmt, x, qweight, tables, g, bias)
        base = F.linear(x, _dequant_fp32(fmt, qweight, tables, g).to(dtype), bias)
        assert _rel(y, ref) <= 2 * _rel(base, ref) + FLOAT_TOL_FLOOR


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("m", (1, 3, 16, 17, 100))
def test_linear_fp32_activations(fmt, m):
    """fp32 activations/tables (the Python op accepts them): compared with TF32 disabled for the oracle."""
    n, k, g = 333, 512, 64
    qweight, tables = _weight(fmt, n, k, g, torch.float32)
    x = torch.randn(2, m, k, device="cuda")
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with ops.use_backend("cuda"):
            y = _linear(fmt, x, qweight, tables, g)
        ref = _reference(fmt, x, qweight, tables, g, None)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    assert y.shape == (2, m, n) and y.dtype == torch.float32
    assert _rel(y, ref) <= 1e-5


@pytest.mark.parametrize("m", (1, 16, 64))
def test_linear_other_out_dtype_and_batch_dims(m):
    """A 3-D x, and out_dtype different from x's (bf16 in, fp16 out) through the split-K reduce kernel."""
    n, k, g = 300, 768, 128
    qweight, tables = _weight("lut2", n, k, g, torch.bfloat16)
    x = torch.randn(3, m, k, device="cuda").to(torch.bfloat16)
    with ops.use_backend("cuda"):
        y = _linear("lut2", x, qweight, tables, g, None, torch.float16)
    assert y.shape == (3, m, n) and y.dtype == torch.float16
    ref = _reference("lut2", x, qweight, tables, g, None)
    assert _rel(y, ref) <= 5e-3      # M = 192: bf16 GEMM rounding (~2^-9) then fp16


def test_strided_and_misaligned_x():
    """x[..., k0:k1] views (mixed segments) run without a copy; a misaligned view is copied, not misread."""
    n, k, g = 129, 256, 64
    qweight, tables = _weight("lut1", n, k, g, torch.float16)
    big = torch.randn(4, 3 * k + 8, device="cuda").to(torch.float16)
    for x in (big[:, k:2 * k], big[:, 1:k + 1], big[:1, 8:k + 8]):
        with ops.use_backend("cuda"):
            y = _linear("lut1", x, qweight, tables, g)
        ref = _reference("lut1", x, qweight, tables, g, None)
        assert _rel(y, ref) <= 2e-3


def test_empty_batch():
    qweight, tables = _weight("lut1", 64, 256, 128, torch.float16)
    x = torch.randn(0, 256, device="cuda").to(torch.float16)
    y = torch.ops.bivlm_cuda.lut_linear(x, qweight, tables[0], 1, 128)
    assert y.shape == (0, 64)


# ---------------------------------------------------------------------------------------------------------
# dequantize ops: bit-exact
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("g", GROUP_SIZES)
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16, torch.float32))
@pytest.mark.parametrize("n,k", ((1, 256), (129, 512), (1001, 4096)))
def test_dequantize_bit_exact(fmt, g, dtype, n, k):
    kind, bits = FORMATS[fmt]
    qweight, tables = _weight(fmt, n, k, g, dtype)
    if kind == "lut":
        got = torch.ops.bivlm_cuda.dequantize_lut(qweight, tables[0], bits, g)
        want = ref_ops.dequantize_lut(qweight, tables[0], bits, g)
    else:
        got = torch.ops.bivlm_cuda.dequantize_affine(qweight, *tables, bits, g)
        want = ref_ops.dequantize_affine(qweight, *tables, bits, g)
    assert got.dtype == dtype and got.shape == (n, k)
    assert torch.equal(got, want)


# ---------------------------------------------------------------------------------------------------------
# op contract: opcheck, torch.compile, CUDA graphs
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("m", (1, 33))
def test_opcheck_cuda_path(fmt, m):
    kind, bits = FORMATS[fmt]
    n, k, g = 65, 256, 64
    qweight, tables = _weight(fmt, n, k, g, torch.float16)
    x = torch.randn(m, k, device="cuda").to(torch.float16)
    bias = torch.randn(n, device="cuda").to(torch.float16)
    with ops.use_backend("cuda"):
        if kind == "lut":
            torch.library.opcheck(torch.ops.bivlm.lut_linear.default, (x, qweight, tables[0], bits, g, bias, None))
            torch.library.opcheck(torch.ops.bivlm.lut_linear.default,
                                  (x, qweight, tables[0], bits, g, None, torch.float32))
            torch.library.opcheck(torch.ops.bivlm.dequantize_lut.default, (qweight, tables[0], bits, g))
        else:
            torch.library.opcheck(torch.ops.bivlm.affine_linear.default, (x, qweight, *tables, bits, g, bias, None))
            torch.library.opcheck(torch.ops.bivlm.dequantize_affine.default, (qweight, *tables, bits, g))


def _layer(bits, k=512, n=384, segments=None, perm=False):
    torch.manual_seed(1)
    if segments is None:
        lin = torch.nn.Linear(k, n, bias=True, device="cuda", dtype=torch.float16)
        return QuantLinear.from_linear(lin, bits, group_size=128)
    from bivlm_kernels.formats import QuantizedSegment, QuantizedWeight
    segs = []
    for b, width in segments:
        codes = torch.randint(0, 1 << b, (n, width), device="cuda")
        if b in (1, 2):
            segs.append(QuantizedSegment(b, codes, codebook=torch.randn(n, width // 128, 1 << b, device="cuda").half()))
        else:
            segs.append(QuantizedSegment(b, codes, scales=(torch.rand(n, width // 128, device="cuda") * 0.02 + 0.01).half(),
                                         zeros=(torch.rand(n, width // 128, device="cuda") * 15).half()))
    p = torch.randperm(k, device="cuda").to(torch.int32) if perm else None
    return QuantLinear.from_quantized(QuantizedWeight(segs, 128, perm=p),
                                      bias=torch.randn(n, device="cuda").half())


@pytest.mark.parametrize("bits", (1, 2, 4))
@pytest.mark.parametrize("m", (1, 64))
def test_torch_compile_fullgraph(bits, m):
    layer = _layer(bits)
    x = torch.randn(2, m, 512, device="cuda").half()
    with ops.use_backend("reference"):
        want = layer(x)
    with ops.use_backend("cuda"):
        eager = layer(x)
        compiled = torch.compile(layer, fullgraph=True)
        got = compiled(x)
    assert _rel(eager, want) <= 2e-3
    assert _rel(got, eager) <= 1e-6


@pytest.mark.parametrize("m", (1, 8, 64))
@pytest.mark.parametrize("mixed", (False, True))
def test_cuda_graph_capture_replay(m, mixed):
    layer = _layer(1, k=1024) if not mixed else _layer(None, k=1024, segments=[(2, 256), (1, 640), (4, 128)],
                                                       perm=True)
    static_x = torch.randn(m, 1024, device="cuda").half()
    with ops.use_backend("cuda"):
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):                      # warm up (lazy extension load, allocator) outside capture
                layer(static_x)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = layer(static_x)
        for _ in range(2):
            new_x = torch.randn(m, 1024, device="cuda").half()
            static_x.copy_(new_x)
            graph.replay()
            eager = layer(new_x)
            torch.cuda.synchronize()
            torch.testing.assert_close(static_y, eager, rtol=1e-3, atol=1e-3)
    with ops.use_backend("reference"):
        assert _rel(static_y, layer(static_x)) <= 2e-3


# ---------------------------------------------------------------------------------------------------------
# bad inputs: the C++ checks raise (RuntimeError), never crash
# ---------------------------------------------------------------------------------------------------------

def _good_lut():
    n, k, g = 65, 256, 64
    qweight, (cb,) = _weight("lut2", n, k, g, torch.float16)
    x = torch.randn(3, k, device="cuda").half()
    return x, qweight, cb, 2, g


def test_bad_inputs_raise():
    x, qw, cb, bits, g = _good_lut()
    op = torch.ops.bivlm_cuda.lut_linear
    op(x, qw, cb, bits, g)                                                 # the good call works
    bad_calls = {
        "x dtype": lambda: op(x.float(), qw, cb, bits, g),
        "x on cpu": lambda: op(x.cpu(), qw, cb, bits, g),
        "x wrong k": lambda: op(x[:, :128].contiguous(), qw, cb, bits, g),
        "qweight int64": lambda: op(x, qw.long(), cb, bits, g),
        "qweight shape": lambda: op(x, qw[:, :-1].contiguous(), cb, bits, g),
        "qweight non-contiguous": lambda: op(x, qw.t().contiguous().t(), cb, bits, g),
        "qweight on cpu": lambda: op(x, qw.cpu(), cb, bits, g),
        "codebook entries": lambda: op(x, qw, cb[..., :2].contiguous(), bits, g),
        "codebook dtype": lambda: op(x, qw, cb.float(), bits, g),
        "bits 3": lambda: op(x, qw, cb, 3, g),
        "bits 4 for lut": lambda: op(x, qw, cb, 4, g),
        "group 48": lambda: op(x, qw, cb, bits, 48),
        "bias shape": lambda: op(x, qw, cb, bits, g, torch.zeros(3, device="cuda").half()),
        "bias dtype": lambda: op(x, qw, cb, bits, g, torch.zeros(cb.shape[0], device="cuda")),
        "out_dtype int": lambda: op(x, qw, cb, bits, g, None, torch.int32),
        "all cpu": lambda: op(x.cpu(), qw.cpu(), cb.cpu(), bits, g),
    }
    for name, call in bad_calls.items():
        with pytest.raises(RuntimeError):
            call()
        torch.cuda.synchronize()                                           # no sticky CUDA error left behind
    with pytest.raises(RuntimeError, match=r"k=256"):
        op(x[:, :128].contiguous(), qw, cb, bits, g)


def test_bad_affine_inputs_raise():
    qw, (s, z) = _weight("affine4", 65, 256, 64, torch.float16)
    x = torch.randn(2, 256, device="cuda").half()
    op = torch.ops.bivlm_cuda.affine_linear
    op(x, qw, s, z, 4, 64)
    for call in (lambda: op(x, qw, s, z[:, :-1].contiguous(), 4, 64),
                 lambda: op(x, qw, s, z.float(), 4, 64),
                 lambda: op(x, qw, s, z, 2, 64),
                 lambda: torch.ops.bivlm_cuda.dequantize_affine(qw, s, z.cpu(), 4, 64),
                 lambda: torch.ops.bivlm_cuda.dequantize_lut(qw, s, 1, 64)):
        with pytest.raises(RuntimeError):
            call()
    torch.cuda.synchronize()
