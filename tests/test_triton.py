"""Triton backend vs the fp32 reference.

On CPU the kernels run under Triton's interpreter (``TRITON_INTERPRET=1``, set by conftest.py before this module
imports them): small shapes only. The ``gpu_*`` tests repeat the comparison at real sizes on a CUDA device.

Tolerance (as flash-attention's tests): the relative Frobenius error of the kernel against the fp32 reference
must be at most twice the error of torch's own ``F.linear`` in the activation dtype on the same dequantized
weight, plus a tiny floor (for fp32, where torch's error can be exactly 0).
"""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")

import bivlm_kernels  # noqa: E402
from bivlm_kernels import formats, ops  # noqa: E402
from bivlm_kernels.backends import reference as ref_ops  # noqa: E402
from bivlm_kernels.formats import QuantizedSegment, QuantizedWeight  # noqa: E402
from bivlm_kernels.nn import QuantLinear  # noqa: E402
import bivlm_kernels.backends.triton as bt  # noqa: E402
from bivlm_kernels.backends.triton import autotune  # noqa: E402
from bivlm_kernels.backends.triton.autotune import Config  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (GPU variants at real sizes)")
DEV = "cuda" if HAS_CUDA else "cpu"
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
FLOOR = 5e-6


# ---------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------

def make_weight(bits, n, k, g, dtype, device=DEV):
    """Random packed weight: (lut, qweight, t0, t1, dense fp32 weight from the reference dequantizer)."""
    codes = torch.randint(0, 1 << bits, (n, k), device=device)
    qweight = formats.pack(codes, bits)
    if bits in formats.LUT_BITS:
        codebook = torch.randn(n, k // g, 1 << bits, device=device).to(dtype)
        return True, qweight, codebook, codebook, formats.dequantize_lut(qweight, codebook, bits, g)
    scales = (torch.rand(n, k // g, device=device) * 0.05 + 0.01).to(dtype)
    zeros = (torch.rand(n, k // g, device=device) * 15).to(dtype)
    return False, qweight, scales, zeros, formats.dequantize_affine(qweight, scales, zeros, bits, g)


def reference(lut, x, qweight, t0, t1, bits, g, bias):
    if lut:
        return ref_ops.lut_linear(x, qweight, t0, bits, g, bias, torch.float32)
    return ref_ops.affine_linear(x, qweight, t0, t1, bits, g, bias, torch.float32)


def rel_err(y, ref):
    return ((y.float() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def assert_matches(y, x, w32, bias, ref, out_dtype):
    """y (kernel output) vs ref (fp32 oracle), tolerance from torch's own error in x's dtype."""
    assert y.dtype == out_dtype and y.shape == ref.shape
    assert torch.isfinite(y).all()
    torch_y = F.linear(x, w32.to(x.dtype), bias)
    tol = 2 * rel_err(torch_y, ref) + FLOOR
    err = rel_err(y, ref)
    assert err <= tol, f"relative error {err:.3e} > tolerance {tol:.3e} (torch {x.dtype}: {tol / 2:.3e})"


def run_linear(bits, g, dtype, lead, n, k, has_bias, out_dtype, config=None, x=None):
    lut, qweight, t0, t1, w32 = make_weight(bits, n, k, g, dtype)
    if x is None:
        x = torch.randn(*lead, k, device=DEV).to(dtype)
    bias = torch.randn(n, device=DEV).to(dtype) if has_bias else None
    y = bt.linear(lut, x, qweight, t0, t1, bits, g, bias, out_dtype, config=config)
    ref = reference(lut, x, qweight, t0, t1, bits, g, bias)
    assert_matches(y, x, w32, bias, ref, out_dtype or dtype)
    return y


# ---------------------------------------------------------------------------------------------------------
# linear ops, default (untuned) configs: the dispatch by M picks the decode or the dot kernel
# ---------------------------------------------------------------------------------------------------------

# M = 1 -> decode kernel; 3, 16, 17, 80 -> dot kernel (DECODE_MAX_M = 2); (2, 8) and (2, 40) test batch dims.
LEADS = [(1,), (3,), (2, 8), (17,), (2, 40)]


@pytest.mark.parametrize("lead", LEADS, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", [1, 2, 4])
def test_linear_default_configs(bits, dtype, lead):
    # Vary the remaining options deterministically over the grid so every one is seen with every format.
    i = LEADS.index(lead)
    g = (32, 64, 128, 256)[(i + bits) % 4]
    n = (33, 70)[i % 2]
    out_dtype = torch.float32 if (i + bits) % 3 == 0 else None
    run_linear(bits, g, dtype, lead, n, 256, has_bias=(i + bits) % 2 == 0, out_dtype=out_dtype)


# every (bits, g) the format allows: g = 16 only at 2 and 4 bits (a packed word lies inside one group)
BITS_G = [(b, g) for b in (1, 2, 4) for g in formats.GROUP_SIZES if g * b >= 32]


@pytest.mark.parametrize("bits,g", BITS_G)
def test_linear_group_sizes(bits, g):
    for lead, n in (((1,), 70), ((17,), 33)):
        run_linear(bits, g, torch.float16, lead, n, max(256, 2 * g), has_bias=True, out_dtype=None)


def test_dispatch_threshold_picks_kernels():
    """Default configs: lut and 4-bit affine in fp16/bf16 at M <= 16 -> tc (g = 128 here; 2 bits at g < 128 and
    M = 1 keeps the decode kernel); otherwise decode kernel up to DECODE_MAX_M rows, tensor-core dot kernel
    above."""
    assert bt.default_config((True, 2, 64, torch.float16, 4096, 4096, 1)).kernel == "decode"
    assert bt.default_config((True, 2, 64, torch.float16, 4096, 4096, 2)).kernel == "tc"
    for bits, dtype in ((1, torch.float16), (1, torch.bfloat16), (1, torch.float32), (2, torch.float16),
                        (4, torch.bfloat16), (4, torch.float32)):
        for m in (1, 2, 3, 4, 5, 16, 17, 64, 255, 1024):
            key = (bits != 4, bits, 128, dtype, 4096, 4096, bt.m_bucket(m))
            cfg = bt.default_config(key)
            if dtype != torch.float32 and m <= 16:
                assert cfg.kernel == "tc" and cfg.block_k == 128 and cfg.block_m == 16
            else:
                assert cfg.kernel == ("decode" if m <= bt.DECODE_MAX_M else "dot")
            assert cfg.block_m >= min(m, 16) or cfg.kernel == "dot"
            assert autotune.fits(cfg, key, autotune.SMEM_DEFAULT)


# tc: 1/2-bit lut and 4-bit affine on tensor cores at M <= 16 (kernel_tc.py). Odd N (a ragged last row block),
# group sizes from one word per group (32 at 1 bit, 16 at 2 bits; 16 = 2 words at 4 bits) to 256, split-K with
# the bias added once, fp32 output, one and two stages, both 16-bit dtypes.
TC_CASES = [
    # (lead, N, K, g, block_n, split, bias, out fp32)
    ((1,), 70, 256, 128, 64, 1, True, False),
    ((5,), 33, 384, 64, 64, 2, False, True),
    ((16,), 130, 256, 32, 128, 4, True, False),
    ((2, 3), 64, 512, 256, 64, 1, False, False),
    ((7,), 200, 640, 128, 128, 2, True, True),          # 5 groups over 2 splits: groups 0, 2, 4 / 1, 3
    ((1,), 1, 64, 32, 16, 2, True, False),              # one output row, every block mostly padding
]
TC4_CASES = [((3,), 45, 96, 16, 16, 2, True, False)]    # 2 and 4 bits only: g = 16 (1 / 2 words per group)


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("bits,case", [(1, c) for c in range(len(TC_CASES))]
                         + [(b, c) for b in (2, 4) for c in range(len(TC_CASES) + len(TC4_CASES))])
def test_tc_kernel(bits, case, dtype):
    lead, n, k, g, bn, split, bias, out32 = (TC_CASES + TC4_CASES)[case]
    cfg = Config("tc", 16, bn, g, split_k=split, num_warps=4, num_stages=1 + case % 2)
    run_linear(bits, g, dtype, lead, n, k, has_bias=bias, out_dtype=torch.float32 if out32 else None, config=cfg)


def test_tc4_large_zero_and_scales():
    """4 bits: MAGIC + q is decoded and MAGIC * sum(x) removed in fp32; with zeros near 15, large scales and
    x of one sign (sum(x) large against the result) the error must stay within the tolerance."""
    lut, qweight, sc, ze, _ = make_weight(4, 40, 512, 128, torch.float16)
    sc.fill_(7.0)
    ze.fill_(14.5)
    w32 = formats.dequantize_affine(qweight, sc, ze, 4, 128)
    x = (torch.rand(2, 512, device=DEV) + 0.5).half()
    y = bt.linear(False, x, qweight, sc, ze, 4, 128, None, torch.float32, config=Config("tc", 16, 64, 128))
    assert_matches(y, x, w32, None, reference(False, x, qweight, sc, ze, 4, 128, None), torch.float32)


def test_tc_extreme_codebooks():
    """Codebook entries far apart in magnitude (c0 ~ 1e3, c1 ~ 1e-3) and equal entries: w = mu + h s in fp32
    per group must still give the selected entry's contribution (no fp16 rounding of mu or h)."""
    lut, qweight, cb, _, _ = make_weight(1, 40, 256, 64, torch.float16)
    cb[..., 0] = 1000.0
    cb[..., 1] = -0.001
    cb[:5] = 0.25                                               # c0 == c1: h = 0
    w32 = formats.dequantize_lut(qweight, cb, 1, 64)
    x = torch.randn(3, 256, device=DEV).half()
    y = bt.linear(True, x, qweight, cb, cb, 1, 64, None, torch.float32, config=Config("tc", 16, 64, 64))
    assert_matches(y, x, w32, None, reference(True, x, qweight, cb, cb, 1, 64, None), torch.float32)


def test_tc_config_errors():
    """A tc config on a call it cannot run is a ValueError naming what it needs, not a wrong answer."""
    with pytest.raises(ValueError, match="block_m == 16"):
        Config("tc", 8, 64, 128)
    lut, qweight, sc, ze, _ = make_weight(4, 33, 256, 128, torch.float16)
    x = torch.randn(2, 256, device=DEV).half()
    with pytest.raises(ValueError, match="1/2-bit lut or 4-bit affine"):
        bt.linear(True, x, qweight, sc, sc, 4, 128, None, None, config=Config("tc", 16, 64, 128))
    lut, qweight, cb, _, _ = make_weight(1, 33, 256, 128, torch.float16)
    for bad_x, cfg in ((torch.randn(17, 256, device=DEV).half(), Config("tc", 16, 64, 128)),
                       (x.float(), Config("tc", 16, 64, 128)), (x, Config("tc", 16, 64, 64))):
        with pytest.raises(ValueError, match="M <= 16"):
            bt.linear(True, bad_x, qweight, cb.to(bad_x.dtype), cb.to(bad_x.dtype), 1, 128, None, None, config=cfg)
    small = (True, 1, 128, torch.float16, 4096, 4096, 16)
    cands = [c for c in autotune.candidates(small) if autotune.fits(c, small, autotune.SMEM_DEFAULT)]
    assert any(c.kernel == "tc" for c in cands) and any(c.kernel in ("decode", "dot") for c in cands)
    assert not autotune.fits(Config("tc", 16, 64, 64), small, autotune.SMEM_DEFAULT)     # block_k != g


# ---------------------------------------------------------------------------------------------------------
# explicit configurations: both kernels, split-K on/off, ragged K and N, several M blocks
# ---------------------------------------------------------------------------------------------------------

CONFIGS = [
    # (lead, K, g, config)
    ((1,), 256, 64, Config("decode", 1, 16, 128, split_k=1)),
    ((1,), 320, 64, Config("decode", 1, 32, 256, split_k=2)),      # K words not a multiple of the step
    ((3,), 256, 32, Config("decode", 2, 16, 128, split_k=1)),      # two M blocks, the last one ragged
    ((3,), 320, 64, Config("decode", 4, 64, 128, split_k=4)),
    ((16,), 256, 128, Config("decode", 16, 16, 64, split_k=1)),
    ((17,), 256, 128, Config("dot", 16, 16, 64, split_k=1)),       # ragged second M block
    ((2,), 320, 64, Config("dot", 16, 32, 128, split_k=2)),        # small M on tensor cores, ragged K
    ((2, 20), 256, 256, Config("dot", 32, 64, 32, split_k=4, group_m=2)),
    ((70,), 256, 32, Config("dot", 64, 32, 256, split_k=1, group_m=1)),
    ((2, 35), 256, 64, Config("dense", 16, 16, 32)),                # dequantize + F.linear
]


@pytest.mark.parametrize("case", range(len(CONFIGS)))
@pytest.mark.parametrize("bits", [1, 2, 4])
def test_linear_explicit_configs(bits, case):
    lead, k, g, cfg = CONFIGS[case]
    dtype = DTYPES[(case + bits) % 3]
    run_linear(bits, g, dtype, lead, 33 if case % 2 else 70, k, has_bias=case % 2 == 0,
               out_dtype=torch.float32 if case % 3 == 0 else None, config=cfg)


def test_noncontiguous_and_strided_x():
    """x with a row stride (a K-slice of a wider tensor) and x with a non-unit K stride."""
    wide = torch.randn(3, 5, 512, device=DEV).half()
    run_linear(1, 128, torch.float16, None, 33, 256, True, None, x=wide[..., 128:384])   # row-strided view
    run_linear(2, 64, torch.float16, None, 33, 256, False, None, x=wide[..., ::2])       # K stride 2
    run_linear(4, 32, torch.float16, None, 33, 256, False, None, x=wide.transpose(0, 1)[..., :256])


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_tiny_shapes(bits):
    """One output row, one group of 32 columns (a single word for 1 bit): every block is mostly padding."""
    for lead in ((1,), (2,), (20,)):
        run_linear(bits, 32, torch.float16, lead, 1, 32, has_bias=True, out_dtype=None)


def test_empty_batch():
    lut, qweight, cb, _, _ = make_weight(1, 33, 128, 32, torch.float16)
    y = bt.launch.lut_linear(torch.randn(0, 4, 128, device=DEV).half(), qweight, cb, 1, 32, None, None)
    assert y.shape == (0, 4, 33)


def test_split_k_bias_added_once_and_out_dtype():
    """Split-K accumulates with atomics: the bias must be added by one split only; fp16 output is cast."""
    lut, qweight, cb, _, w32 = make_weight(2, 33, 512, 64, torch.float16)
    x = torch.randn(2, 512, device=DEV).half()
    bias = torch.full((33,), 100.0, device=DEV).half()
    for split in (1, 2, 4):
        y = bt.linear(True, x, qweight, cb, cb, 2, 64, bias, None, config=Config("decode", 2, 16, 64, split))
        assert y.dtype == torch.float16
        assert_matches(y, x, w32, bias, reference(True, x, qweight, cb, cb, 2, 64, bias), torch.float16)


# ---------------------------------------------------------------------------------------------------------
# dequantize: bit-exact
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits,g", BITS_G)
def test_dequantize_bit_exact(bits, g, dtype):
    lut, qweight, t0, t1, _ = make_weight(bits, 70, 512, g, dtype)
    if lut:
        got, want = bt.launch.dequantize_lut(qweight, t0, bits, g), ref_ops.dequantize_lut(qweight, t0, bits, g)
    else:
        got = bt.launch.dequantize_affine(qweight, t0, t1, bits, g)
        want = ref_ops.dequantize_affine(qweight, t0, t1, bits, g)
    assert got.dtype == dtype and got.shape == (70, 512)
    assert torch.equal(got, want)


# ---------------------------------------------------------------------------------------------------------
# through the op dispatcher and QuantLinear
# ---------------------------------------------------------------------------------------------------------

def test_registered_for_all_ops():
    for name in ops.OP_NAMES:
        assert ops._KERNELS[name]["triton"] is getattr(bt.launch, name)
    if not HAS_CUDA:
        # on CPU tensors the compiled CPU kernels (when built) come first, then Triton's interpreter
        want = (["cpu"] if ops.cpu_kernels_available() else []) + ["triton", "reference"]
        assert ops.available_backends("lut_linear", torch.device("cpu")) == want


def test_through_dispatcher():
    lut, qweight, cb, _, w32 = make_weight(1, 33, 256, 64, torch.float16)
    _, qw4, s, z, w4 = make_weight(4, 33, 256, 64, torch.float16)
    x = torch.randn(2, 3, 256, device=DEV).half()
    bias = torch.randn(33, device=DEV).half()
    with ops.use_backend("triton"):
        assert ops.select_backend("lut_linear", x.device) == "triton"
        y1 = torch.ops.bivlm.lut_linear(x, qweight, cb, 1, 64, bias, torch.float32)
        y4 = torch.ops.bivlm.affine_linear(x, qw4, s, z, 4, 64)
        d1 = torch.ops.bivlm.dequantize_lut(qweight, cb, 1, 64)
        d4 = torch.ops.bivlm.dequantize_affine(qw4, s, z, 4, 64)
    assert_matches(y1, x, w32, bias, reference(True, x, qweight, cb, cb, 1, 64, bias), torch.float32)
    assert_matches(y4, x, w4, None, reference(False, x, qw4, s, z, 4, 64, None), torch.float16)
    assert torch.equal(d1, ref_ops.dequantize_lut(qweight, cb, 1, 64))
    assert torch.equal(d4, ref_ops.dequantize_affine(qw4, s, z, 4, 64))
    with ops.use_backend("triton"), pytest.raises(ValueError):   # the op's own checks still run first
        torch.ops.bivlm.lut_linear(x[..., :128], qweight, cb, 1, 64)


def test_torch_compile_traces_the_op():
    lut, qweight, cb, _, w32 = make_weight(2, 33, 128, 32, torch.float16)
    x = torch.randn(3, 128, device=DEV).half()

    def f(x):
        return torch.ops.bivlm.lut_linear(x, qweight, cb, 2, 32) * 2

    with ops.use_backend("triton"):
        y = torch.compile(f, backend="aot_eager", fullgraph=True)(x)
    assert_matches(y / 2, x, w32, None, reference(True, x, qweight, cb, cb, 2, 32, None), torch.float16)


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_quantlinear_from_linear(bits):
    lin = torch.nn.Linear(256, 70, bias=True, device=DEV)
    q = QuantLinear.from_linear(lin, bits, group_size=64, dtype=torch.bfloat16)
    x = torch.randn(2, 5, 256, device=DEV).bfloat16()
    with ops.use_backend("reference"):
        ref = q(x.float().bfloat16())
        w_ref = q.dequantize()
    with ops.use_backend("triton"):
        y = q(x)
        w = q.dequantize()
    assert torch.equal(w, w_ref)
    ref32 = F.linear(x.float(), w_ref.float(), q.bias.float())
    assert_matches(y, x, w_ref.float(), q.bias, ref32, torch.bfloat16)
    assert rel_err(y, ref32) <= 2 * rel_err(ref, ref32) + FLOOR


def test_quantlinear_mixed_segments_with_perm():
    """Salient columns at 2 bits, the rest at 1 bit, a column permutation, bias; plus a 4-bit variant."""
    n, k, g = 70, 384, 64
    perm = torch.randperm(k, device=DEV)
    segs = [QuantizedSegment(2, torch.randint(0, 4, (n, 64), device=DEV),
                             codebook=torch.randn(n, 1, 4, device=DEV).half()),
            QuantizedSegment(1, torch.randint(0, 2, (n, 256), device=DEV),
                             codebook=torch.randn(n, 4, 2, device=DEV).half()),
            QuantizedSegment(4, torch.randint(0, 16, (n, 64), device=DEV),
                             scales=(torch.rand(n, 1, device=DEV) * 0.05).half(),
                             zeros=(torch.rand(n, 1, device=DEV) * 15).half())]
    qw = QuantizedWeight(segs, g, perm=perm)
    bias = torch.randn(n, device=DEV).half()
    layer = QuantLinear.from_quantized(qw, bias=bias)
    w32 = qw.dequantize()
    with ops.use_backend("reference"):
        w_ref = layer.dequantize()
    for lead in ((1,), (3,), (2, 9)):
        x = torch.randn(*lead, k, device=DEV).half()
        with ops.use_backend("triton"):
            y = layer(x)
            w = layer.dequantize()
        assert torch.equal(w, w_ref)
        ref = F.linear(x.float(), w32, bias.float())
        assert_matches(y, x, w32, bias, ref, torch.float16)


# ---------------------------------------------------------------------------------------------------------
# import behaviour, autotune bookkeeping
# ---------------------------------------------------------------------------------------------------------

def _run_python(code, interpret=True):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(bivlm_kernels.__file__)),
                                                      os.environ.get("PYTHONPATH", "")]))
    if not interpret:
        env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


def test_import_without_triton_raises_import_error():
    r = _run_python("import sys; sys.modules['triton'] = None\n"
                    "try:\n    import bivlm_kernels.backends.triton\nexcept ImportError as e:\n    print('IMPORTERROR', e)\n"
                    "import bivlm_kernels, torch\n"
                    "print('REF', bivlm_kernels.ops.available_backends('lut_linear', torch.device('cpu')))")
    assert "IMPORTERROR" in r.stdout, r.stdout + r.stderr
    ref = "REF ['cpu', 'reference']" if ops.cpu_kernels_available() else "REF ['reference']"
    assert ref in r.stdout, r.stdout + r.stderr       # no triton among them


@pytest.mark.parametrize("interpret", [True, False], ids=["interpreter", "jit"])
def test_import_queries_no_gpu(interpret):
    r = _run_python("import torch\n"
                    "def boom(*a, **k): raise AssertionError('GPU queried at import')\n"
                    "for name in ('is_available', 'device_count', 'get_device_name', 'get_device_properties',\n"
                    "             'current_device', '_lazy_init', 'init'):\n"
                    "    setattr(torch.cuda, name, boom)\n"
                    "import bivlm_kernels.backends.triton as bt\n"
                    "print('OK', len(bt.autotune.CONFIGS))", interpret)
    assert "OK 0" in r.stdout, r.stdout + r.stderr


def test_m_buckets_and_config_validation():
    assert [bt.m_bucket(m) for m in (1, 2, 3, 5, 16, 17, 255, 256, 257, 4096)] == \
        [1, 2, 4, 8, 16, 32, 256, 256, 256, 256]
    for bad in (dict(kernel="gemv"), dict(block_n=24), dict(block_k=16), dict(kernel="dot", block_m=8)):
        with pytest.raises(ValueError):
            Config(**{**dict(kernel="decode", block_m=1, block_n=32, block_k=128), **bad})
    key = (True, 1, 128, torch.float16, 4096, 4096, 256)
    assert bt.default_config(key) == bt.default_config(key)
    huge = Config("dot", 256, 256, 128, num_stages=4)
    assert not autotune.fits(huge, key, 100 * 1024) and autotune.smem_bytes(huge, 1, torch.float16) > 100 * 1024
    cands = [c for c in autotune.candidates(key) if autotune.fits(c, key, autotune.SMEM_DEFAULT)]
    assert cands and all(c.kernel in ("dot", "dense") for c in cands) and Config("dense", 16, 16, 32) in cands
    small = (True, 2, 64, torch.float16, 4096, 4096, 1)
    assert any(c.kernel == "decode" for c in autotune.candidates(small))


def test_interpreter_uses_default_configs():
    if HAS_CUDA:
        pytest.skip("checks the CPU/interpreter path")
    autotune.clear_tuned_configs()
    run_linear(1, 64, torch.float16, (3,), 33, 128, False, None)
    (key, cfg), = autotune.CONFIGS.items()
    assert key == (True, 1, 64, torch.float16, 33, 128, 4) and cfg == bt.default_config(key)


def test_save_load_tuned_configs(tmp_path):
    autotune.clear_tuned_configs()
    key = (False, 4, 128, torch.bfloat16, 11008, 4096, 16)
    cfg = Config("dot", 16, 64, 128, split_k=4, num_warps=4, num_stages=3)
    autotune.CONFIGS[key] = cfg
    path = str(tmp_path / "tuned.json")
    assert bt.save_tuned_configs(path, gpu_name="NVIDIA H100 80GB HBM3") == 1
    autotune.CONFIGS[(True, 1, 64, torch.float16, 4096, 4096, 1)] = Config("decode", 1, 32, 512)
    assert bt.save_tuned_configs(path, gpu_name="other GPU") == 2
    autotune.clear_tuned_configs()
    assert bt.load_tuned_configs(path, gpu_name="unknown GPU") == 0 and not autotune.CONFIGS
    assert bt.load_tuned_configs(path, gpu_name="NVIDIA H100 80GB HBM3") == 1
    assert autotune.CONFIGS == {key: cfg}
    assert set(json.load(open(path))) == {"NVIDIA H100 80GB HBM3", "other GPU"}
    autotune.clear_tuned_configs()


# ---------------------------------------------------------------------------------------------------------
# GPU: real sizes
# ---------------------------------------------------------------------------------------------------------

GPU_MS = (1, 3, 16, 17, 64, 255, 1024)


@requires_cuda
@pytest.mark.parametrize("m", GPU_MS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bits", [1, 2, 4])
def test_gpu_linear_real_sizes(bits, dtype, m, monkeypatch):
    monkeypatch.setenv("BIVLM_TRITON_AUTOTUNE", "0")      # defaults: deterministic and fast to test
    for n, k, g in ((4096, 4096, 128), (11008, 4096, 64), (4096, 11008, 256)):
        run_linear(bits, g, dtype, (m,), n, k, has_bias=m % 2 == 1, out_dtype=None)


@requires_cuda
@pytest.mark.parametrize("bits", [1, 2, 4])
def test_gpu_candidate_configs_agree(bits, monkeypatch):
    """A sample of the tuner's candidates (both kernels, split-K) on one real shape."""
    n, k, g = 4096, 4096, 128
    for m in (1, 16, 255):
        key = (bits <= 2, bits, g, torch.float16, n, k, bt.m_bucket(m))
        cands = [c for c in autotune.candidates(key) if autotune.fits(c, key, autotune.SMEM_DEFAULT)]
        for cfg in cands[:: max(1, len(cands) // 12)]:
            run_linear(bits, g, torch.float16, (m,), n, k, has_bias=True, out_dtype=None, config=cfg)


@requires_cuda
@pytest.mark.parametrize("bits", [1, 2, 4])
def test_gpu_dequantize_bit_exact(bits):
    for dtype in (torch.float16, torch.bfloat16):
        lut, qweight, t0, t1, _ = make_weight(bits, 4096, 4096, 128, dtype)
        if lut:
            assert torch.equal(bt.launch.dequantize_lut(qweight, t0, bits, 128),
                               ref_ops.dequantize_lut(qweight, t0, bits, 128))
        else:
            assert torch.equal(bt.launch.dequantize_affine(qweight, t0, t1, bits, 128),
                               ref_ops.dequantize_affine(qweight, t0, t1, bits, 128))


@requires_cuda
def test_gpu_autotune_and_save_load(monkeypatch, tmp_path):
    """The tuner times (a few of) its candidates on the call's tensors, keeps the fastest, saves/loads it."""
    monkeypatch.setenv("BIVLM_TRITON_AUTOTUNE", "1")
    full = autotune.candidates
    monkeypatch.setattr(autotune, "candidates", lambda key: full(key)[::8])
    autotune.clear_tuned_configs()
    for m in (1, 300):
        run_linear(2, 128, torch.float16, (m,), 2048, 1024, has_bias=True, out_dtype=None)
    assert len(autotune.CONFIGS) == 2
    tuned = dict(autotune.CONFIGS)
    path = str(tmp_path / "tuned.json")
    bt.save_tuned_configs(path)
    autotune.clear_tuned_configs()
    assert bt.load_tuned_configs(path) == 2 and autotune.CONFIGS == tuned
    autotune.clear_tuned_configs()


@requires_cuda
def test_gpu_cuda_graph_capture(monkeypatch):
    monkeypatch.setenv("BIVLM_TRITON_AUTOTUNE", "0")
    lut, qweight, cb, _, w32 = make_weight(1, 4096, 4096, 128, torch.float16)
    x = torch.randn(1, 4096, device="cuda").half()
    with ops.use_backend("triton"):
        torch.ops.bivlm.lut_linear(x, qweight, cb, 1, 128)          # choose + compile outside the capture
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            y = torch.ops.bivlm.lut_linear(x, qweight, cb, 1, 128)
    x.copy_(torch.randn_like(x))
    g.replay()
    assert_matches(y, x, w32, None, reference(True, x, qweight, cb, cb, 1, 128, None), torch.float16)


# ---------------------------------------------------------------------------------------------------------
# offline sm_90 compile (no GPU needed): catches what the interpreter cannot (layouts, registers, wgmma)
# ---------------------------------------------------------------------------------------------------------

_COMPILE_ALL = os.environ.get("BIVLM_TRITON_COMPILE_TEST") == "1"


@pytest.mark.parametrize("bits", [1, 2, 4] if _COMPILE_ALL else [1])
def test_compiles_for_sm90_without_spills(bits):
    """Default configs compile for sm_90 with ptxas (bundled with Triton), spill nothing, and the large-M
    config runs on wgmma. One bit width by default (CPU time); BIVLM_TRITON_COMPILE_TEST=1 checks all."""
    ms = (1, 2, 16, 1024) if _COMPILE_ALL else (1, 1024)
    code = (
        "import json, torch\n"
        "from bivlm_kernels.backends.triton import offline, default_config\n"
        "out = {}\n"
        f"for m in {ms!r}:\n"
        f"    key = ({bits} <= 2, {bits}, 128, torch.float16, 4096, 4096, min(m, 256))\n"
        f"    ck = offline.compile_linear(default_config(key), {bits}, torch.float16)\n"
        "    info = offline.inspect(ck)\n"
        "    out[m] = dict(info, wgmma='wgmma' in ck.asm['ptx'])\n"
        "print('RESULT', json.dumps(out))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(bivlm_kernels.__file__)),
                                         os.environ.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    assert line, r.stdout[-2000:] + r.stderr[-4000:]
    res = json.loads(line[0][len("RESULT "):])
    for m, info in res.items():
        assert info["stack"] == 0, f"M={m}: {info['stack']} bytes of stack (register spills): {info}"
        assert info["registers"] <= 255 and info["loop_instructions"] > 0
    assert res["1024"]["wgmma"], "the large-M dot config should use wgmma on sm_90"
