"""QuantLinear: drop-in behaviour, mixed segments, dtype/device moves, checkpoints, bad input."""
import copy
import json
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bivlm_kernels import checkpoint, formats
from bivlm_kernels.formats import QuantizedSegment, QuantizedWeight
from bivlm_kernels.nn import QuantLinear, quantize_linears_


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bits", [1, 2, 4])
def test_from_linear_forward_matches_dequantized(dtype, bits):
    lin = nn.Linear(256, 70)
    q = QuantLinear.from_linear(lin, bits, group_size=64, dtype=dtype)
    assert (q.in_features, q.out_features) == (256, 70) and q.dtype == dtype
    x = torch.randn(2, 5, 256).to(dtype)
    y = q(x)
    assert y.dtype == dtype and y.shape == (2, 5, 70)
    w32 = copy.deepcopy(q).float().dequantize()     # fp32 tables are exact copies; fp32 dequantization
    torch.testing.assert_close(y, F.linear(x.float(), w32, q.bias.float()).to(dtype))


def test_from_linear_error_decreases_with_bits():
    lin = nn.Linear(512, 128)
    errs = [rel_err(QuantLinear.from_linear(lin, b, 128, dtype=torch.float32).dequantize(), lin.weight)
            for b in (1, 2, 4)]
    assert errs[0] > errs[1] > errs[2] and errs[2] < 0.1, errs


def test_one_bit_codebook_convention():
    lin = nn.Linear(64, 4)
    q = QuantLinear.from_linear(lin, 1, 64, dtype=torch.float32)
    cb = q.segments[0].codebook
    assert (cb[..., 1] > cb[..., 0]).all()          # code 1 is the larger value (mu + alpha)
    codes = formats.unpack(q.segments[0].qweight, 1, 64)
    mu = lin.weight.detach().mean(1, keepdim=True)
    assert torch.equal(codes.bool(), lin.weight.detach() >= mu)


def test_mixed_segments_with_perm():
    n, k, g = 40, 384, 128
    perm = torch.randperm(k)
    qw = QuantizedWeight([QuantizedSegment(2, torch.randint(0, 4, (n, 128)), codebook=torch.randn(n, 1, 4)),
                          QuantizedSegment(1, torch.randint(0, 2, (n, 256)), codebook=torch.randn(n, 2, 2))],
                         g, perm=perm)
    bias = torch.randn(n)
    q = QuantLinear.from_quantized(qw, bias=bias)
    assert q.perm.dtype == torch.int32 and len(q.segments) == 2
    assert torch.equal(q.dequantize(), qw.dequantize())
    x = torch.randn(3, k)
    torch.testing.assert_close(q(x), x @ qw.dequantize().T + bias)
    assert "bits=2blutx128+1blutx256" in q.extra_repr() and "perm=True" in q.extra_repr()
    assert q.weight_bits == pytest.approx(q.spec.bits_per_weight(torch.float32))


def test_dtype_and_device_moves_keep_codes():
    q = QuantLinear.from_linear(nn.Linear(128, 16), 2, 64, dtype=torch.float32)
    qweight = q.segments[0].qweight.clone()
    for conv, dt in [(lambda m: m.half(), torch.float16), (lambda m: m.bfloat16(), torch.bfloat16),
                     (lambda m: m.to(torch.float32), torch.float32)]:
        conv(q)
        assert q.dtype == dt and q.bias.dtype == dt
        assert q.segments[0].qweight.dtype == torch.int32 and torch.equal(q.segments[0].qweight, qweight)
    q.to("meta")
    assert q.segments[0].qweight.device.type == "meta"


def test_state_dict_round_trip_into_empty_layer():
    lin = nn.Linear(256, 48, bias=False)
    q = QuantLinear.from_linear(lin, 1, 128, dtype=torch.float16)
    fresh = QuantLinear(256, 48, bits=1, group_size=128, bias=False, dtype=torch.float16)
    fresh.load_state_dict(q.state_dict())
    x = torch.randn(4, 256, dtype=torch.float16)
    assert torch.equal(fresh(x), q(x))
    assert set(q.state_dict()) == {"segments.0.qweight", "segments.0.codebook"}


def test_state_dict_shape_mismatch_is_named():
    q = QuantLinear.from_linear(nn.Linear(256, 48), 2, 128)
    other = QuantLinear(256, 48, bits=1, group_size=128)
    with pytest.raises(ValueError, match="'segments.0.qweight' has shape"):
        other.load_state_dict(q.state_dict())


def _model():
    return nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 96), nn.LayerNorm(96), nn.Linear(96, 8))


def test_safetensors_checkpoint_round_trip(tmp_path):
    model = _model()
    names = quantize_linears_(model, 2, 64, filter_fn=lambda name, m: name != "4", dtype=torch.float32)
    assert names == ["0", "2"]                      # "4" filtered out, stays nn.Linear
    model[2] = QuantLinear.from_linear(nn.Linear(64, 96), 4, 32, dtype=torch.float32)
    path = str(tmp_path / "m.safetensors")
    checkpoint.save(model, path)
    meta = checkpoint.read_metadata(path)
    assert json.loads(meta["layers"])["2"]["segments"] == [{"bits": 4, "width": 64, "kind": "affine"}]
    loaded = checkpoint.load(_model(), path)
    assert isinstance(loaded[0], QuantLinear) and isinstance(loaded[4], nn.Linear)
    x = torch.randn(5, 128)
    assert torch.equal(loaded(x), model(x))


def test_checkpoint_errors(tmp_path):
    from safetensors.torch import load_file, save_file
    model = _model()
    quantize_linears_(model, 1, 32, dtype=torch.float32)
    path = str(tmp_path / "m.safetensors")
    checkpoint.save(model, path)
    tensors = load_file(path)
    meta = checkpoint.read_metadata(path)

    def rewrite(name, t=tensors, m=meta):
        p = str(tmp_path / name)
        save_file(t, p, metadata=m)
        return p

    with pytest.raises(ValueError, match="format_version '3'"):
        checkpoint.load(_model(), rewrite("v3.safetensors", m={**meta, "format_version": "3"}))
    with pytest.raises(ValueError, match="not a bivlm-packed checkpoint"):
        checkpoint.load(_model(), rewrite("other.safetensors", m={"format": "gguf"}))
    missing = {k: v for k, v in tensors.items() if k != "0.segments.0.codebook"}
    with pytest.raises(ValueError, match=r"missing keys \['0.segments.0.codebook'\]"):
        checkpoint.load(_model(), rewrite("missing.safetensors", t=missing))
    with pytest.raises(ValueError, match=r"unexpected keys \['extra'\]"):
        checkpoint.load(_model(), rewrite("extra.safetensors", t={**tensors, "extra": torch.zeros(1)}))
    with pytest.raises(ValueError, match="does not exist in the model"):
        checkpoint.load(nn.Sequential(nn.Linear(128, 64)), path)
    with pytest.raises(ValueError, match="no QuantLinear"):
        checkpoint.save(_model(), str(tmp_path / "plain.safetensors"))
    with pytest.raises(FileNotFoundError):
        checkpoint.load(_model(), str(tmp_path / "nope.safetensors"))


def test_quantize_linears_skips_unaligned_layers(caplog):
    model = nn.Sequential(nn.Linear(100, 64), nn.Linear(64, 8))
    with caplog.at_level(logging.INFO, logger="bivlm_kernels.nn"):
        names = quantize_linears_(model, 4, 64)
    assert names == ["1"] and isinstance(model[0], nn.Linear)
    assert "in_features=100 is not a multiple of group_size=64" in caplog.text


def test_compile_fullgraph_layer():
    q = QuantLinear.from_linear(nn.Linear(128, 32), 1, 64, dtype=torch.float32)
    x = torch.randn(3, 128)
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(q, fullgraph=True, backend="aot_eager")(x), q(x))


# ------------------------------------------------------------------------------------------------ bad input

def test_bad_constructor_and_forward_inputs():
    lin = nn.Linear(256, 16)
    with pytest.raises(ValueError, match="bits must be one of"):
        QuantLinear.from_linear(lin, 3)
    with pytest.raises(ValueError, match="group_size must be one of"):
        QuantLinear.from_linear(lin, 1, group_size=100)
    with pytest.raises(ValueError, match=r"in_features \(200\) must be a positive multiple of group_size"):
        QuantLinear.from_linear(nn.Linear(200, 16), 1, group_size=64)
    with pytest.raises(TypeError, match="must be an nn.Linear"):
        QuantLinear.from_linear(nn.Conv1d(4, 4, 1), 1)
    bad = nn.Linear(128, 4)
    with torch.no_grad():
        bad.weight[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        QuantLinear.from_linear(bad, 2, 64)
    with pytest.raises(TypeError, match="dtype must be one of"):
        QuantLinear(128, 4, dtype=torch.int8)
    q = QuantLinear.from_linear(lin, 1, 128, dtype=torch.float16)
    with pytest.raises(ValueError, match="last dimension must be in_features=256"):
        q(torch.randn(2, 255, dtype=torch.float16))
    with pytest.raises(TypeError, match="x has dtype torch.float32"):
        q(torch.randn(2, 256))
    with pytest.raises(ValueError, match="x is on meta"):
        q(torch.randn(2, 256, dtype=torch.float16, device="meta"))
    qw = QuantizedWeight([QuantizedSegment(1, torch.randint(0, 2, (4, 128)), codebook=torch.randn(4, 1, 2))],
                         64)                        # codebook for g=128, layer says g=64
    with pytest.raises(ValueError, match=r"codebook must have shape \[4, 2, 2\]"):
        QuantLinear.from_quantized(qw)
    qw = QuantizedWeight([QuantizedSegment(1, torch.randint(0, 2, (4, 128)), codebook=torch.randn(4, 1, 2))],
                         128, perm=torch.arange(128).flip(0)[:127])
    with pytest.raises(ValueError, match="perm must be a 1-D"):
        QuantLinear.from_quantized(qw)
    qw = QuantizedWeight([QuantizedSegment(1, torch.full((4, 128), 2), codebook=torch.randn(4, 1, 2))], 128)
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 1\]"):
        QuantLinear.from_quantized(qw)


def test_drop_in_pickle_weight_and_repr():
    """What nn.Linear users touch: torch.save(model) round trips (no torch.ops handle stored), a read-only
    dequantized `weight`, and the table dtype in print(layer)."""
    import io
    torch.manual_seed(3)
    lin = nn.Linear(128, 24)
    model = nn.Sequential(QuantLinear.from_linear(lin, 2, 64, dtype=torch.float32))
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    again = torch.load(buf, weights_only=False)
    x = torch.randn(5, 128)
    assert torch.equal(again(x), model(x))
    ql = model[0]
    assert torch.equal(ql.weight, ql.dequantize()) and ql.weight.shape == (24, 128)
    with pytest.raises(AttributeError, match="read-only"):
        ql.weight = torch.zeros(24, 128)
    assert "dtype=float32" in repr(ql)
