"""Issue 16, items 5, 7 and 8 (runtime side): strict bits/group_size types, one content check for
``from_quantized`` and ``load_state_dict``, and clear errors where internal ones used to surface."""
import pytest
import torch
from torch import nn

from bivlm_kernels import formats
from bivlm_kernels.formats import LayerSpec, QuantizedSegment, QuantizedWeight, SegmentSpec
from bivlm_kernels.nn import QuantLinear


def _mixed_layer():
    """A 2/1-bit mixed layer with a permutation and a bias, filled (not all zeros)."""
    k, n, g = 128, 8, 64
    segs = [QuantizedSegment(2, torch.randint(0, 4, (n, 64)), codebook=torch.randn(n, 1, 4)),
            QuantizedSegment(1, torch.randint(0, 2, (n, 64)), codebook=torch.randn(n, 1, 2))]
    return QuantLinear.from_quantized(QuantizedWeight(segs, g, perm=torch.randperm(k)), bias=torch.randn(n),
                                      dtype=torch.float32)


# ------------------------------------------------------------------ item 5: load_state_dict checks contents

@pytest.mark.parametrize("corrupt, match", [
    (lambda sd: sd["perm"].__setitem__(1, sd["perm"][0].item()), "perm.*exactly once"),           # duplicate
    (lambda sd: sd["perm"].__setitem__(0, 1000), "perm.*exactly once"),                            # out of range
    (lambda sd: sd["segments.0.codebook"].view(-1).__setitem__(3, float("nan")), "codebook.*NaN or inf"),
    (lambda sd: sd["segments.1.codebook"].view(-1).__setitem__(0, float("inf")), "codebook.*NaN or inf"),
    (lambda sd: sd["bias"].__setitem__(0, float("nan")), "bias.*NaN or inf"),
])
def test_load_state_dict_refuses_bad_contents(corrupt, match):
    q = _mixed_layer()
    sd = {k: v.clone() for k, v in q.state_dict().items()}
    corrupt(sd)
    fresh = QuantLinear.from_spec(q.spec, dtype=torch.float32)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        fresh.load_state_dict(sd)
    # nothing was half-loaded
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())


def test_load_state_dict_refuses_values_beyond_the_layer_dtype():
    q = _mixed_layer()
    sd = q.state_dict()
    sd["segments.0.codebook"][0, 0, 0] = 1e6                     # finite in fp32, inf in fp16
    fresh = QuantLinear.from_spec(q.spec, dtype=torch.float16)
    with pytest.raises(ValueError, match="beyond the largest torch.float16"):
        fresh.load_state_dict(sd)


def test_from_quantized_and_load_share_one_check():
    """The same corruption is refused by both entry points, with the same rule in the message."""
    k, n = 128, 4
    seg = QuantizedSegment(1, torch.randint(0, 2, (n, k)), codebook=torch.randn(n, 1, 2))
    dup = torch.arange(k)
    dup[5] = 6
    with pytest.raises(ValueError, match="exactly once"):
        QuantLinear.from_quantized(QuantizedWeight([seg], 128, perm=dup))
    good = QuantLinear.from_quantized(QuantizedWeight([seg], 128, perm=torch.randperm(k)))
    sd = good.state_dict()
    sd["perm"] = dup.to(torch.int32)
    with pytest.raises(ValueError, match="exactly once"):
        QuantLinear.from_spec(good.spec, dtype=torch.float32).load_state_dict(sd)
    # a valid state dict still loads bit for bit
    fresh = QuantLinear.from_spec(good.spec, dtype=torch.float32)
    fresh.load_state_dict(good.state_dict())
    x = torch.randn(3, k)
    assert torch.equal(fresh(x), good(x))


# ------------------------------------------------------------------ item 7: strict bits / group_size types

@pytest.mark.parametrize("kw", [dict(bits=True), dict(bits=2.7), dict(bits=2.0), dict(bits="2"),
                                dict(group_size=64.0), dict(group_size=True),
                                dict(segments=[(True, 64)]), dict(segments=[(2.0, 64)]),
                                dict(segments=[(2, 64.0)])])
def test_quantlinear_strict_types(kw):
    with pytest.raises((TypeError, ValueError)):
        QuantLinear(64, 8, **{"group_size": 64, **kw})


@pytest.mark.parametrize("bad", [True, 2.0, 3, "2"])
def test_pack_unpack_check_bits(bad):
    with pytest.raises(ValueError, match="bits"):
        formats.pack(torch.zeros(2, 8, dtype=torch.int64), bad)
    with pytest.raises(ValueError, match="bits"):
        formats.unpack(torch.zeros(2, 1, dtype=torch.int32), bad, 8)


def test_layer_spec_from_dict_does_not_coerce():
    good = LayerSpec(128, 8, 64, (SegmentSpec(1, 128),)).to_dict()
    assert LayerSpec.from_dict(good).to_dict() == good
    for bad in (dict(good, group_size=64.0), dict(good, in_features=True), dict(good, has_perm="no"),
                dict(good, segments=[dict(good["segments"][0], bits=1.9)]),
                dict(good, segments=[dict(good["segments"][0], bits="1")]),
                dict(good, segments="1x128"), [good]):
        with pytest.raises(ValueError, match="corrupt layer spec"):
            LayerSpec.from_dict(bad)


# ------------------------------------------------------------------ item 8: clear errors, not internal ones

def test_zero_dim_input_is_a_clear_error():
    q = QuantLinear(64, 8, group_size=64, dtype=torch.float32)
    with pytest.raises(ValueError, match="at least one dimension"):
        q(torch.tensor(1.0))


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_huge_finite_weights_are_refused_clearly(bits):
    lin = nn.Linear(64, 8)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([3e38, -3e38]).repeat(8, 32))
    with pytest.raises(ValueError, match="overflows float32"):
        QuantLinear.from_linear(lin, bits, 64)


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_pack_unpack_zero_rows(bits):
    packed = formats.pack(torch.zeros(0, 40, dtype=torch.int64), bits)
    assert packed.shape == (0, formats.packed_width(40, bits))
    assert formats.unpack(packed, bits, 40).shape == (0, 40)


def test_lut_values_out_of_range_codes():
    cb = torch.randn(2, 1, 2)
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 1\]"):
        formats.lut_values(torch.full((2, 64), 2), cb, 64)
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 1\]"):
        formats.lut_values(torch.full((2, 64), -1), cb, 64)
    with pytest.raises(ValueError, match="do not match"):
        formats.lut_values(torch.zeros(2, 64, dtype=torch.int64), torch.randn(2, 2, 2), 64)


@pytest.mark.parametrize("kw", [dict(bits=True), dict(bits=2.0), dict(group_size=64.0), dict(group_size=True)])
def test_quant_config_strict_types(kw):
    from bivlm_kernels.quant import QuantConfig
    with pytest.raises(ValueError):
        QuantConfig.from_method("rtn", **{"bits": 2, "group_size": 64, **kw})


@pytest.mark.parametrize("field, value", [("n_samples", True), ("seq_len", 2.0), ("mix", True), ("mix", "0.5")])
def test_calibration_config_strict_types(field, value):
    from bivlm_kernels.quant import QuantConfig
    with pytest.raises(ValueError, match=f"calibration.{field}"):
        QuantConfig(calibration={field: value}).validate()


def test_checkpoint_load_runs_the_same_content_check(tmp_path):
    """Item 5 through a file: a duplicate perm index or a NaN codebook entry in a .safetensors is refused."""
    from safetensors.torch import load_file, save_file

    from bivlm_kernels import checkpoint
    model = nn.Sequential(_mixed_layer(), nn.ReLU())
    path = str(tmp_path / "m.safetensors")
    checkpoint.save(model, path)
    tensors, meta = load_file(path), checkpoint.read_metadata(path)
    for key, corrupt, match in (("0.perm", lambda t: t.__setitem__(0, t[1].item()), "'0.perm'.*exactly once"),
                                ("0.segments.0.codebook", lambda t: t.view(-1).__setitem__(0, float("nan")),
                                 "'0.segments.0.codebook' contains NaN")):
        bad = {k: v.clone() for k, v in tensors.items()}
        corrupt(bad[key])
        save_file(bad, str(tmp_path / "bad.safetensors"), metadata=meta)
        with pytest.raises(ValueError, match=match):
            checkpoint.load(nn.Sequential(nn.Linear(128, 8), nn.ReLU()), str(tmp_path / "bad.safetensors"))
