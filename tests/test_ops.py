"""The bivlm ops: reference == dequantize-then-F.linear, opcheck, backend selection, bad input."""
import pytest
import torch
import torch.nn.functional as F

from bivlm_kernels import formats, ops

DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def make_lut(n, k, bits, g, dtype):
    qweight = formats.pack(torch.randint(0, 1 << bits, (n, k)), bits)
    return qweight, (torch.randn(n, k // g, 1 << bits) * 0.05).to(dtype)


def make_affine(n, k, g, dtype):
    qweight = formats.pack(torch.randint(0, 16, (n, k)), 4)
    return qweight, (torch.rand(n, k // g) * 0.01 + 1e-3).to(dtype), (torch.rand(n, k // g) * 15).to(dtype)


def explicit(x, w, bias):
    """Dequantized weight through F.linear in fp32, in x's dtype: the definition the op must meet."""
    return F.linear(x.float(), w, None if bias is None else bias.float()).to(x.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 3, 16, 257])
@pytest.mark.parametrize("bits,g", [(1, 32), (1, 128), (2, 64), (2, 256)])
def test_lut_linear_reference_equals_explicit(dtype, m, bits, g):
    n, k = 33, 512
    qweight, cb = make_lut(n, k, bits, g, dtype)
    x, bias = torch.randn(m, k).to(dtype), torch.randn(n).to(dtype)
    y = ops.lut_linear(x, qweight, cb, bits, g, bias)
    assert y.dtype == dtype and y.shape == (m, n)
    torch.testing.assert_close(y, explicit(x, formats.dequantize_lut(qweight, cb, bits, g), bias))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 3, 16, 257])
@pytest.mark.parametrize("g", [32, 128])
def test_affine_linear_reference_equals_explicit(dtype, m, g):
    n, k = 70, 256
    qweight, s, z = make_affine(n, k, g, dtype)
    x = torch.randn(m, k).to(dtype)
    y = ops.affine_linear(x, qweight, s, z, 4, g)
    torch.testing.assert_close(y, explicit(x, formats.dequantize_affine(qweight, s, z, 4, g), None))


def test_leading_dims_out_dtype_and_dequantize_ops():
    n, k, g = 17, 128, 64
    qweight, cb = make_lut(n, k, 2, g, torch.bfloat16)
    x = torch.randn(2, 3, 5, k, dtype=torch.bfloat16)
    y = ops.lut_linear(x, qweight, cb, 2, g, None, torch.float32)
    w = formats.dequantize_lut(qweight, cb, 2, g)
    assert y.dtype == torch.float32 and y.shape == (2, 3, 5, n)
    torch.testing.assert_close(y, x.float() @ w.T)
    wd = ops.dequantize_lut(qweight, cb, 2, g)
    assert wd.dtype == torch.bfloat16 and torch.equal(wd, w.to(torch.bfloat16))
    qa, s, z = make_affine(n, k, g, torch.float16)
    assert torch.equal(ops.dequantize_affine(qa, s, z, 4, g), formats.dequantize_affine(qa, s, z, 4, g).half())


def _opcheck_cases():
    n, k, g = 9, 128, 32
    qw1, cb1 = make_lut(n, k, 1, g, torch.float16)
    qw2, cb2 = make_lut(n, k, 2, g, torch.float32)
    qa, s, z = make_affine(n, k, g, torch.bfloat16)
    x16, x32, xbf = (torch.randn(4, k, dtype=d) for d in (torch.float16, torch.float32, torch.bfloat16))
    return [
        (ops.lut_linear, (x16, qw1, cb1, 1, g)),
        (ops.lut_linear, (x32.view(2, 2, k), qw2, cb2, 2, g, torch.randn(n), torch.float16)),
        (ops.affine_linear, (xbf, qa, s, z, 4, g, torch.randn(n, dtype=torch.bfloat16))),
        (ops.dequantize_lut, (qw2, cb2, 2, g)),
        (ops.dequantize_affine, (qa, s, z, 4, g)),
    ]


@pytest.mark.parametrize("case", range(5))
def test_opcheck(case):
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("kind", ["lut", "affine"])
def test_gradients_flow_to_x_and_bias(kind):
    n, k, g = 12, 128, 64
    if kind == "lut":
        qweight, cb = make_lut(n, k, 2, g, torch.float32)
        tables, op, w = (cb,), ops.lut_linear, formats.dequantize_lut(qweight, cb, 2, g)
        bits = 2
    else:
        qweight, s, z = make_affine(n, k, g, torch.float32)
        tables, op, w = (s, z), ops.affine_linear, formats.dequantize_affine(qweight, s, z, 4, g)
        bits = 4
    x = torch.randn(2, 3, k, requires_grad=True)
    bias = torch.randn(n, requires_grad=True)
    grad = torch.randn(2, 3, n)
    op(x, qweight, *tables, bits, g, bias).backward(grad)
    x2, b2 = x.detach().clone().requires_grad_(), bias.detach().clone().requires_grad_()
    F.linear(x2, w, b2).backward(grad)
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(bias.grad, b2.grad)
    torch.library.opcheck(op, (x, qweight, *tables, bits, g, bias))


def test_fake_gives_shapes_on_meta():
    n, k, g = 40, 256, 128
    qweight, cb = make_lut(n, k, 1, g, torch.float16)
    x = torch.empty(7, k, dtype=torch.float16, device="meta")
    y = ops.lut_linear(x, qweight.to("meta"), cb.to("meta"), 1, g)
    assert y.device.type == "meta" and y.shape == (7, n)


def test_compile_fullgraph():
    n, k, g = 24, 128, 64
    qweight, cb = make_lut(n, k, 2, g, torch.float32)

    def f(x):
        return torch.relu(ops.lut_linear(x, qweight, cb, 2, g))

    x = torch.randn(5, k)
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), f(x))


# ------------------------------------------------------------------------------------------------ bad input

def test_bad_inputs_name_the_argument():
    n, k, g = 8, 128, 64
    qweight, cb = make_lut(n, k, 2, g, torch.float16)
    x = torch.randn(2, k, dtype=torch.float16)
    cases = [
        (TypeError, "x has dtype torch.float32", (x.float(), qweight, cb, 2, g)),
        (TypeError, "x must be a float16", (x.to(torch.float64), qweight, cb, 2, g)),
        (ValueError, "last dimension must be in_features=128", (x[:, :64], qweight, cb, 2, g)),
        (ValueError, "bits must be one of", (x, qweight, cb, 3, g)),
        (ValueError, "group_size must be one of", (x, qweight, cb, 2, 48)),
        (ValueError, r"codebook must have shape \[N, K/group_size, 4\]", (x, qweight, cb[..., :2], 2, g)),
        (ValueError, "qweight must have shape", (x, qweight[:, :-1], cb, 2, g)),
        (TypeError, "qweight must be an int32", (x, qweight.long(), cb, 2, g)),
        (ValueError, r"bias must be \[8\]", (x, qweight, cb, 2, g, torch.zeros(7, dtype=torch.float16))),
        (TypeError, "out_dtype must be", (x, qweight, cb, 2, g, None, torch.int32)),
        (ValueError, "x is on meta", (x.to("meta"), qweight, cb, 2, g)),
    ]
    for exc, msg, args in cases:
        with pytest.raises(exc, match=msg):
            ops.lut_linear(*args)
    qa, s, z = make_affine(n, k, g, torch.float16)
    with pytest.raises(ValueError, match="scales and zeros must both have shape"):
        ops.affine_linear(x, qa, s, z[:, :1], 4, g)
    with pytest.raises(ValueError, match="bits must be one of"):
        ops.affine_linear(x, qa, s, z, 2, g)            # 2-bit is lut only
    with pytest.raises(TypeError, match="zeros dtype"):
        ops.affine_linear(x, qa, s, z.float(), 4, g)


def test_backend_selection():
    n, k, g = 8, 64, 32
    qweight, cb = make_lut(n, k, 1, g, torch.float32)
    x = torch.randn(2, k)
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.set_backend("fast")
    assert ops.select_backend("lut_linear", torch.device("cpu")) == \
        ("cpu" if ops.cpu_kernels_available() else "reference")
    with ops.use_backend("reference"):
        assert ops.select_backend("lut_linear", torch.device("cpu")) == "reference"
    with ops.use_backend("cuda"):
        assert ops.get_backend() == "cuda"
        with pytest.raises(RuntimeError, match="backend 'cuda' was forced but cannot run lut_linear on cpu"):
            ops.lut_linear(x, qweight, cb, 1, g)
    assert ops.get_backend() == "auto"
    with ops.use_backend("reference"):
        torch.testing.assert_close(ops.lut_linear(x, qweight, cb, 1, g),
                                   x @ formats.dequantize_lut(qweight, cb, 1, g).T)
    with pytest.raises(ValueError, match="op_name must be one of"):
        ops.register_backend_kernel("lut_linear", "numpy", lambda *a: None)
