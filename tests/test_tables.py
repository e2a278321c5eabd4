"""Format version 2: compressed per-group tables (bivlm_kernels.formats.tables), g = 16, and version-1 files unchanged."""
import os

import pytest
import torch

from bivlm_kernels import QuantLinear, checkpoint, formats, ops
from bivlm_kernels.formats import tables
from bivlm_kernels.formats import LayerSpec, QuantizedSegment, QuantizedWeight, SegmentSpec

DATA = os.path.join(os.path.dirname(__file__), "data")
CASES = [("lut", "entries", 1), ("lut", "entries", 2), ("lut", "grid", 1), ("lut", "grid", 2), ("affine", "grid", 4)]


def _segment(kind, form, bits, n, width, g, tb, dtype, gen):
    e = tables.fields_per_group(form, bits)
    fields = torch.randint(0, 1 << tb, (n, width // g, e), generator=gen)
    if form == "grid":
        fields[..., 0].clamp_(min=1)
        grid = (torch.rand(n, 2, generator=gen) * 0.05 + 0.01)
    else:
        grid = torch.stack([-torch.rand(n, generator=gen), torch.rand(n, generator=gen) * 0.2 / (1 << tb) * 16], 1)
    codes = torch.randint(0, 1 << bits, (n, width), generator=gen)
    return QuantizedSegment.compressed(bits, kind, form, codes, fields, grid.to(dtype), tb)


@pytest.mark.parametrize("tb", [4, 6, 8])
def test_pack_round_trip_and_bit_positions(tb):
    gen = torch.Generator().manual_seed(tb)
    f = torch.randint(0, 1 << tb, (5, 7, 3), generator=gen)            # 21 fields: last word partly used
    q = tables.pack_fields(f, tb)
    assert q.dtype == torch.int32 and q.shape == (5, {4: 3, 6: 5, 8: 6}[tb])   # 32 // t fields per word
    if tb == 6:                                                        # 5 fields per word, top 2 bits zero
        assert int((q.to(torch.int64) >> 30).abs().max()) == 0
    assert torch.equal(tables.unpack_fields(q, tb, 7, 3), f)
    # documented position: field f of a row at bit (f % (32 // t)) * t of word f // (32 // t)
    one = torch.zeros(1, 7, 3, dtype=torch.long)
    one[0, 2, 1] = 1                                                   # field index 2 * 3 + 1 = 7
    per = 32 // tb
    word = tables.pack_fields(one, tb)[0].to(torch.int64) & 0xFFFFFFFF
    expect = torch.zeros_like(word)
    expect[7 // per] = 1 << ((7 % per) * tb)
    assert torch.equal(word, expect)


def test_pack_rejects_out_of_range_and_bad_bits():
    with pytest.raises(ValueError, match=r"table fields must lie in \[0, 15\]"):
        tables.pack_fields(torch.full((1, 1, 2), 16), 4)
    with pytest.raises(ValueError, match="table_bits must be one of"):
        tables.pack_fields(torch.zeros(1, 1, 2, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="table_form must be one of \\['grid'\\] for a affine"):
        SegmentSpec(4, 32, "affine", 4, "entries")


def test_expansion_formulas():
    grid = torch.tensor([[0.5, 0.25]])
    f = torch.tensor([[[3, 2]]])
    (book,) = tables.expand_fields("lut", "grid", 2, f, grid)                       # c * 1.5 - 0.5
    assert torch.equal(book, torch.tensor([[[-0.5, 1.0, 2.5, 4.0]]]))
    (book,) = tables.expand_fields("lut", "entries", 1, torch.tensor([[[1, 6]]]), grid)   # 0.5 + 0.25 t
    assert torch.equal(book, torch.tensor([[[0.75, 2.0]]]))
    s, z = tables.expand_fields("affine", "grid", 4, torch.tensor([[[3, 2], [0, 5]]]), grid)
    assert torch.equal(s, torch.tensor([[1.5, 0.0]])) and torch.allclose(z, torch.tensor([[0.5 / 1.5, 0.0]]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("kind,form,bits", CASES)
@pytest.mark.parametrize("tb", [4, 6, 8])
def test_layer_matches_reference(kind, form, bits, tb, dtype):
    g = 32 if bits == 1 else 16
    n, k = 37, 5 * g if bits != 1 else 96                              # odd N; K not a multiple of 32 at g16
    gen = torch.Generator().manual_seed(hash((kind, form, bits, tb)) % 1000)
    seg = _segment(kind, form, bits, n, k, g, tb, dtype, gen)
    bias = torch.randn(n, generator=gen).to(dtype)
    layer = QuantLinear.from_quantized(QuantizedWeight([seg], g), bias=bias, dtype=dtype)
    assert sorted(layer.state_dict()) == ["bias", "segments.0.qtable", "segments.0.qweight", "segments.0.tgrid"]
    assert "v2" in repr(layer) and layer.spec.format_version == 2
    e = tables.fields_per_group(form, bits)
    words = -(-(k // g) * e // (32 // tb))
    stored = n * (k * bits // 32 + words) * 32 + n * 2 * dtype.itemsize * 8       # codes, qtable, tgrid
    assert layer.weight_bits == pytest.approx(stored / (n * k))
    w = QuantizedWeight([seg], g).dequantize()
    for m in (1, 5, 70):
        x = torch.randn(m, k, generator=gen).to(dtype)
        ref = torch.nn.functional.linear(x.float(), w, bias.float())
        with torch.no_grad():
            y = layer(x)
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        assert torch.allclose(y.float(), ref, rtol=tol, atol=tol * ref.abs().max()), (m, (y.float() - ref).abs().max())
    # state_dict round trip: identical outputs
    fresh = QuantLinear.from_spec(layer.spec, dtype=dtype)
    fresh.load_state_dict(layer.state_dict())
    x = torch.randn(3, k, generator=gen).to(dtype)
    with torch.no_grad():
        assert torch.equal(fresh(x), layer(x))


def test_expansion_cache_sees_in_place_writes():
    gen = torch.Generator().manual_seed(0)
    seg = _segment("lut", "grid", 2, 8, 32, 16, 4, torch.float32, gen)
    layer = QuantLinear.from_quantized(QuantizedWeight([seg], 16), dtype=torch.float32)
    x = torch.randn(2, 32, generator=gen)
    y0 = layer(x)
    with torch.no_grad():
        layer.segments[0].tgrid.mul_(2)             # scales and mins doubled: the whole weight doubles
    assert torch.allclose(layer(x), 2 * y0, rtol=1e-5, atol=1e-6)


def test_validation_of_compressed_buffers():
    gen = torch.Generator().manual_seed(0)
    seg = _segment("lut", "entries", 2, 8, 32, 16, 4, torch.float16, gen)
    layer = QuantLinear.from_quantized(QuantizedWeight([seg], 16), dtype=torch.float16)
    sd = layer.state_dict()
    bad = dict(sd, **{"segments.0.qtable": sd["segments.0.qtable"].float()})
    with pytest.raises(ValueError, match="'segments.0.qtable' must be int32"):
        QuantLinear.from_spec(layer.spec, dtype=torch.float16).load_state_dict(bad)
    big = sd["segments.0.tgrid"].clone()
    big[:, 1] = 60000.0                                   # lo + 15 * 60000 overflows fp16
    with pytest.raises(ValueError, match="expands to tables that are not finite"):
        QuantLinear.from_spec(layer.spec, dtype=torch.float16).load_state_dict(dict(sd, **{"segments.0.tgrid": big}))
    with pytest.raises(ValueError, match="built in the layer's dtype"):
        QuantLinear.from_quantized(QuantizedWeight([seg], 16), dtype=torch.float32)


def test_group_size_16_needs_two_bits_or_more():
    with pytest.raises(ValueError, match=r"group_size 16 is too small for bits=1.*allowed for bits=1: \[32, 64"):
        LayerSpec(32, 4, 16, (SegmentSpec(1, 32),))
    with pytest.raises(ValueError, match="group_size 16 is too small"):
        QuantLinear.from_linear(torch.nn.Linear(32, 4), 1, 16)
    layer = QuantLinear.from_linear(torch.nn.Linear(48, 5), 2, 16)    # v1 float tables at g16: version 2
    assert layer.spec.format_version == 2
    x = torch.randn(4, 48)
    assert torch.allclose(layer(x), torch.nn.functional.linear(x, layer.dequantize(), layer.bias), atol=1e-5)


def test_backend_without_a_group_size_falls_back(monkeypatch):
    monkeypatch.setitem(ops.BACKEND_GROUP_SIZES, "cpu", (32, 64, 128, 256))
    monkeypatch.setattr(ops.dispatch, "available_backends", lambda op, dev: ["cpu", "reference"])
    assert ops.select_backend("lut_linear", torch.device("cpu"), 16) == "reference"
    assert ops.select_backend("lut_linear", torch.device("cpu"), 32) == "cpu"
    with ops.use_backend("cpu"):
        with pytest.raises(RuntimeError, match="no kernel for group_size=16"):
            ops.select_backend("lut_linear", torch.device("cpu"), 16)


def test_layout_versions(tmp_path):
    v1 = LayerSpec(64, 8, 32, (SegmentSpec(2, 64),)).to_dict()
    v2 = LayerSpec(64, 8, 16, (SegmentSpec(2, 64, "lut", 4, "grid"),)).to_dict()
    assert "table_bits" not in v1["segments"][0]                       # version-1 specs are written unchanged
    assert formats.layout_version({"a": v1}) == 1 and formats.layout_version({"a": v1, "b": v2}) == 2
    assert LayerSpec.from_dict(v2) == LayerSpec(64, 8, 16, (SegmentSpec(2, 64, "lut", 4, "grid"),))
    with pytest.raises(ValueError, match=r"reads versions \[1, 2\]"):
        formats.check_version("3", "x")
    net = torch.nn.Sequential(QuantLinear.from_linear(torch.nn.Linear(64, 8), 2, 32))
    checkpoint.save(net, str(tmp_path / "v1.safetensors"))
    assert checkpoint.read_metadata(str(tmp_path / "v1.safetensors"))["format_version"] == "1"
    gen = torch.Generator().manual_seed(0)
    net2 = torch.nn.Sequential(QuantLinear.from_quantized(
        QuantizedWeight([_segment("lut", "grid", 2, 8, 64, 16, 4, torch.float16, gen)], 16), dtype=torch.float16))
    checkpoint.save(net2, str(tmp_path / "v2.safetensors"))
    assert checkpoint.read_metadata(str(tmp_path / "v2.safetensors"))["format_version"] == "2"
    back = checkpoint.load(torch.nn.Sequential(torch.nn.Linear(64, 8)), str(tmp_path / "v2.safetensors"))
    x = torch.randn(2, 64).half()
    with torch.no_grad():
        assert torch.equal(back(x), net2(x))


def _v1_net():
    class Net(torch.nn.Module):            # the module tree tests/data/make_v1_fixture.py saved
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(96, 40), torch.nn.Linear(128, 24, bias=False)
            self.c, self.d = torch.nn.Linear(64, 33), torch.nn.Linear(96, 17)

        def forward(self, x):
            return self.a(x[..., :96]), self.b(x[..., :128]), self.c(x[..., :64]), self.d(x[..., :96])
    return Net()


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_version_1_checkpoint_from_before_version_2_loads_identically(backend):
    """Written by the code of commit db8dc3e (format v1 only): the same outputs, bit for bit, on the reference
    path; on the default path within the kernels' tolerance."""
    net = checkpoint.load(_v1_net(), os.path.join(DATA, "v1_checkpoint.safetensors"))
    want = torch.load(os.path.join(DATA, "v1_checkpoint_outputs.pt"))
    with ops.use_backend(backend), torch.no_grad():
        got = net(want["x"])
    for g, w in zip(got, want["y"]):
        if backend == "reference":
            assert torch.equal(g, w)
        else:
            assert torch.allclose(g.float(), w.float(), rtol=1e-2, atol=1e-2 * w.float().abs().max())


def test_header_older_than_its_layers_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file
    gen = torch.Generator().manual_seed(0)
    net = torch.nn.Sequential(QuantLinear.from_quantized(
        QuantizedWeight([_segment("lut", "grid", 2, 8, 64, 16, 4, torch.float16, gen)], 16), dtype=torch.float16))
    path = str(tmp_path / "v2.safetensors")
    checkpoint.save(net, path)
    meta = dict(checkpoint.read_metadata(path), format_version="1")
    save_file(load_file(path), str(tmp_path / "lying.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match="says format_version 1 but its layers need version 2"):
        checkpoint.read_metadata(str(tmp_path / "lying.safetensors"))


def test_vllm_plugin_refuses_compressed_tables():
    from bivlm_kernels.integrations import vllm_plugin                    # the layout check needs no vLLM install
    with pytest.raises(ValueError, match="compressed tables .* not supported in vLLM yet"):
        vllm_plugin._check_fusable([LayerSpec(64, 8, 16, (SegmentSpec(2, 64, "lut", 4, "grid"),))], "x")


def test_compressed_layer_compiles_fullgraph():
    gen = torch.Generator().manual_seed(0)
    layer = QuantLinear.from_quantized(
        QuantizedWeight([_segment("lut", "grid", 2, 24, 64, 16, 4, torch.float32, gen)], 16), dtype=torch.float32)
    x = torch.randn(3, 64, generator=gen)
    compiled = torch.compile(layer, fullgraph=True)      # the expansion is traced inline (no cache lookup)
    with torch.no_grad():
        assert torch.allclose(compiled(x), layer(x), atol=1e-5)


@pytest.mark.parametrize("bad", ["nan", "shape"])
def test_loaded_weights_are_checked_like_every_load_path(bad):
    """process_weights_after_loading runs formats.validation.check_layer_tensors on the fused rows (no vLLM)."""
    from bivlm_kernels.formats import LayerSpec, SegmentSpec
    from bivlm_kernels.integrations import vllm_plugin
    spec = LayerSpec(in_features=64, out_features=8, group_size=32, segments=(SegmentSpec(2, 64),))
    method = vllm_plugin._LinearMethod([spec, spec], "model.layers.0.mlp.gate_up_proj")
    seg = torch.nn.Module()
    seg.qweight = torch.nn.Parameter(torch.zeros(16, 4, dtype=torch.int32), requires_grad=False)
    seg.codebook = torch.nn.Parameter(torch.randn(16, 2, 4), requires_grad=False)
    layer = torch.nn.Module()
    layer.segments = torch.nn.ModuleList([seg])
    method.process_weights_after_loading(layer)              # a good layer passes
    if bad == "nan":
        seg.codebook.data[3, 1, 2] = float("nan")
    else:
        seg.codebook = torch.nn.Parameter(torch.randn(16, 1, 4), requires_grad=False)
    with pytest.raises(ValueError, match="gate_up_proj: codebook"):
        method.process_weights_after_loading(layer)
