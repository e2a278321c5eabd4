"""End-to-end tests of the quantizer driver, adapters, checkpoints and CLI on tiny random-init HF models.

Tiny configs of the three supported VLM classes (LLaVA with a CLIP tower, Qwen2-VL, Qwen2.5-VL), widths that
are multiples of 32 so that every supported group size divides them; each model quantizes in about a second.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

from bivlm_kernels import formats  # noqa: E402
from bivlm_kernels.models import find_components  # noqa: E402
from bivlm_kernels.nn import QuantLinear, rtn_quantize  # noqa: E402
from bivlm_kernels.quant import (METHODS, ComponentConfig, Method, MethodConfig, QuantConfig,  # noqa: E402
                                 build_calibration_data, load_quantized, quantize_model, register_method,
                                 save_quantized)
from bivlm_kernels.quant.hessian import HessianAccumulator  # noqa: E402

IMG, TOK_IMG, VOCAB = 290, 291, 300       # image token id (Qwen: image pad), vocab size
VSTART, VEND = 292, 293                   # Qwen vision start / end tokens


# ---------------------------------------------------------------------------------------------------------
# a driver-test method: RTN through the Method interface, recording the Hessians it is given
# ---------------------------------------------------------------------------------------------------------

@register_method
class _RecordingRTN(Method):
    """RTN that keeps every H it receives (the tests check that the driver calibrates sequentially)."""
    name = "_test_rtn"
    config_cls = MethodConfig
    needs_hessian = True
    seen: dict = {}

    def _quantize(self, W, H):
        _RecordingRTN.seen[len(_RecordingRTN.seen)] = H.clone()
        return rtn_quantize(W, self.config.bits, self.config.group_size, self.config.dtype)


REAL_METHODS = sorted(m for m in METHODS if not m.startswith("_"))


# ---------------------------------------------------------------------------------------------------------
# tiny models and synthetic calibration batches
# ---------------------------------------------------------------------------------------------------------

TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256)


def tiny_model(arch: str, layers: int = 2):
    """Tiny random-init model; ``layers`` decoder/vision blocks each (2 for the sequential tests)."""
    torch.manual_seed(0)
    TEXT = dict(globals()["TEXT"], num_hidden_layers=layers)
    if arch == "llava":
        cfg = transformers.LlavaConfig(
            vision_config=dict(model_type="clip_vision_model", hidden_size=64, intermediate_size=128,
                               num_hidden_layers=layers, num_attention_heads=4, image_size=32, patch_size=8,
                               projection_dim=64),
            text_config=dict(model_type="llama", **TEXT), image_token_index=IMG, vocab_size=VOCAB)
        return transformers.LlavaForConditionalGeneration(cfg).eval()
    text = dict(TEXT, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    ids = dict(image_token_id=IMG, video_token_id=TOK_IMG, vision_start_token_id=VSTART, vision_end_token_id=VEND)
    if arch == "qwen2_vl":
        vis = dict(depth=layers, embed_dim=64, hidden_size=64, num_heads=4, mlp_ratio=2, patch_size=4,
                   temporal_patch_size=2, spatial_merge_size=2)
        return transformers.Qwen2VLForConditionalGeneration(
            transformers.Qwen2VLConfig(text_config=text, vision_config=vis, **ids)).eval()
    # Qwen2.5-VL: window attention in block 0, full attention in block 1 (different cu_seqlens per block).
    vis = dict(depth=layers, hidden_size=64, intermediate_size=128, out_hidden_size=64, num_heads=4, patch_size=4,
               temporal_patch_size=2, spatial_merge_size=2, window_size=16, fullatt_block_indexes=[layers - 1])
    return transformers.Qwen2_5_VLForConditionalGeneration(
        transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vis, **ids)).eval()


def image_batch(arch: str, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    words = torch.randint(3, 280, (6,), generator=g)
    if arch == "llava":
        n_img = (32 // 8) ** 2
        ids = torch.cat([torch.tensor([1]), torch.full((n_img,), IMG), words])[None]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                "pixel_values": torch.randn(1, 3, 32, 32, generator=g)}
    grid = torch.tensor([[1, 8, 8]])                    # 64 patches of 4x4 px, 2 frames; 16 tokens after merging
    ids = torch.cat([torch.tensor([1, VSTART]), torch.full((16,), IMG), torch.tensor([VEND]), words])[None]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "mm_token_type_ids": (ids == IMG).int(),
            "pixel_values": torch.randn(64, 3 * 2 * 4 * 4, generator=g), "image_grid_thw": grid}


def text_batch(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 280, (1, 10), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def calib(arch: str) -> list:
    # mix 2/3: two image+text samples, one text-only
    return [image_batch(arch, 1), text_batch(2), image_batch(arch, 3)]


ARCHS = ("llava", "qwen2_vl", "qwen2_5_vl")


def all_components(method: str, bits=None) -> QuantConfig:
    comp = dict(method=method, bits=bits, group_size=64)
    return QuantConfig(vision=dict(comp), projector=dict(comp), language=dict(comp))


def block_linears(model) -> dict:
    out = {}
    for comp in find_components(model).values():
        for prefix, block in zip(comp.block_names, comp.blocks):
            for n, m in block.named_modules():
                if isinstance(m, (nn.Linear, QuantLinear)):
                    out[f"{prefix}.{n}" if n else prefix] = m
    return out


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


# ---------------------------------------------------------------------------------------------------------
# adapters
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch,paths", [
    ("llava", ("model.vision_tower.encoder.layers", "model.multi_modal_projector", "model.language_model.layers")),
    ("qwen2_vl", ("model.visual.blocks", "model.visual.merger", "model.language_model.layers")),
    ("qwen2_5_vl", ("model.visual.blocks", "model.visual.merger", "model.language_model.layers")),
])
def test_adapters_find_components(arch, paths):
    comps = find_components(tiny_model(arch))
    assert list(comps) == ["vision", "projector", "language"]
    assert comps["vision"].block_names == [f"{paths[0]}.0", f"{paths[0]}.1"]
    assert comps["projector"].block_names == [paths[1]]
    assert comps["language"].block_names == [f"{paths[2]}.0", f"{paths[2]}.1"]
    assert "lm_head" not in {n for c in comps.values() for n in c.linears()}


def test_generic_adapter_llama_and_dinov2():
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TEXT))
    comps = find_components(llama)
    assert list(comps) == ["language"] and comps["language"].block_names == ["model.layers.0", "model.layers.1"]
    dino = transformers.Dinov2Model(transformers.Dinov2Config(hidden_size=64, num_hidden_layers=3,
                                                              num_attention_heads=4, intermediate_size=128,
                                                              image_size=28, patch_size=14))
    comps = find_components(dino)
    assert comps["language"].block_names == ["encoder.layer.0", "encoder.layer.1", "encoder.layer.2"]


def test_model_without_layers_is_rejected():
    with pytest.raises(ValueError, match="no quantizable layers"):
        find_components(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()))
    with pytest.raises(ValueError, match="no quantizable layers"):
        quantize_model(nn.Sequential(nn.Conv2d(3, 8, 3)), QuantConfig(language=dict(method="_test_rtn", bits=2)),
                       [{"x": torch.zeros(1)}])


# ---------------------------------------------------------------------------------------------------------
# end to end
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_end_to_end_rtn_save_load_generate(arch, tmp_path):
    model = tiny_model(arch)
    batches = calib(arch)
    ref = logits(model, batches[0])
    n_linear = len(block_linears(model))
    model, report = quantize_model(model, all_components("rtn", bits=2), batches, progress=False)

    # every Linear inside the blocks of all three components is a QuantLinear, lm_head is not
    layers = block_linears(model)
    assert len(layers) == n_linear and all(isinstance(m, QuantLinear) for m in layers.values())
    assert type(model.lm_head) is nn.Linear
    # one report row per replaced layer, with the layer's own honest bits
    assert [r.name for r in report.layers] == list(layers)
    for r in report.layers:
        ql = layers[r.name]
        assert r.weight_bits == pytest.approx(ql.weight_bits)
        assert r.nominal_bits == 2 and r.weight_bits > 2
        assert 0 < r.rel_error < 1.5 and r.n_tokens > 0
    assert report.bytes_after < report.bytes_before
    assert report.model_bytes_after < report.model_bytes_before
    assert "average" in str(report) and report.layers[0].name in report.table()

    out = logits(model, batches[0])
    assert not torch.equal(out, ref) and torch.isfinite(out).all()

    path = save_quantized(model, str(tmp_path / "ckpt"))
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]                  # no temp dir left behind
    info = json.load(open(os.path.join(path, "quantization.json")))
    assert info["model_class"] == type(model).__name__ and info["format"] == formats.FORMAT_NAME
    assert len(info["report"]["layers"]) == len(report.layers)
    loaded = load_quantized(path)
    for b in batches:
        assert torch.equal(logits(loaded, b), logits(model, b))

    gen_kw = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
    g1 = model.generate(**batches[0], **gen_kw)
    g2 = loaded.generate(**batches[0], **gen_kw)
    assert g1.shape[1] == batches[0]["input_ids"].shape[1] + 3 and torch.equal(g1, g2)


@pytest.mark.parametrize("method", REAL_METHODS)
@pytest.mark.parametrize("arch", ARCHS)
def test_every_registered_method(arch, method, tmp_path):
    model = tiny_model(arch, layers=1)          # one block per component: BiLLM's search is slow on CPU
    batches = calib(arch)
    model, report = quantize_model(model, all_components(method), batches, progress=False)
    layers = block_linears(model)
    assert all(isinstance(m, QuantLinear) for m in layers.values())
    assert {r.name for r in report.layers} == set(layers) and all(r.method == method for r in report.layers)
    for r in report.layers:
        assert r.weight_bits == pytest.approx(layers[r.name].weight_bits)
        assert r.rel_error == r.rel_error                          # measured (not NaN)
    path = save_quantized(model, str(tmp_path / "ckpt"))
    loaded = load_quantized(path)
    assert torch.equal(logits(loaded, batches[0]), logits(model, batches[0]))
    g = loaded.generate(**batches[2], max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert g.shape[1] == batches[2]["input_ids"].shape[1] + 2


@pytest.mark.parametrize("method,options", [("gptq", {}), ("billm", {}), ("bivlm", {"salient_col_share": 0.5})])
def test_one_bit_layouts_save_load_generate(method, options, tmp_path):
    """bits=1 through the driver: GPTQ one 1-bit segment; BiLLM/Bi-VLM the salient-column layout (perm, 2-bit +
    1-bit segments at group 32) survive save/load bit-exactly and generate."""
    model = tiny_model("llava", layers=1)
    batches = calib("llava")
    comp = dict(method=method, bits=1, group_size=32, options=options)
    model, report = quantize_model(model, QuantConfig(language=comp), batches, progress=False)
    layers = [m for m in block_linears(model).values() if isinstance(m, QuantLinear)]
    assert layers and all(r.method == method for r in report.layers)
    kinds = {tuple(s.bits for s in m.spec.segments) for m in layers}
    if method == "gptq":
        assert kinds == {(1,)} and not any(m.spec.has_perm for m in layers)
    else:
        assert all(m.spec.has_perm == (len(m.spec.segments) == 2) for m in layers)   # perm iff salient columns
        assert (2, 1) in kinds                                    # some layer has salient columns
    if method == "bivlm":                                         # share 0.5: half of every K, whole groups
        assert all(m.spec.segments[0].width == m.in_features // 2 for m in layers)
    path = save_quantized(model, str(tmp_path / "ckpt"))
    loaded = load_quantized(path)
    assert torch.equal(logits(loaded, batches[0]), logits(model, batches[0]))
    g = loaded.generate(**batches[2], max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert g.shape[1] == batches[2]["input_ids"].shape[1] + 2


@pytest.mark.parametrize("arch", ARCHS)
def test_calibration_is_sequential(arch):
    """The Hessian of each block's first linear must equal the one seen by the finished quantized model: the
    driver fed block i+1 what the quantized block i emits, with the right per-block kwargs (Qwen2.5-VL's
    windowed vs full-attention vision blocks get different cu_seqlens)."""
    model = tiny_model(arch)
    batches = calib(arch)
    _RecordingRTN.seen.clear()
    model, report = quantize_model(model, all_components("_test_rtn", bits=1), batches, progress=False)
    seen = {r.name: _RecordingRTN.seen[i] for i, r in enumerate(report.layers)}
    firsts = {"llava": ["model.vision_tower.encoder.layers.1.self_attn.q_proj",
                        "model.language_model.layers.1.self_attn.q_proj", "model.multi_modal_projector.linear_1"],
              "qwen2_vl": ["model.visual.blocks.1.attn.qkv", "model.language_model.layers.1.self_attn.q_proj",
                           "model.visual.merger.mlp.0"],
              "qwen2_5_vl": ["model.visual.blocks.1.attn.qkv", "model.language_model.layers.1.self_attn.q_proj",
                             "model.visual.merger.mlp.0"]}[arch]
    accs = {n: HessianAccumulator(model.get_submodule(n).in_features) for n in firsts}
    hooks = [model.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: accs[n].add_batch(i[0]))
             for n in firsts]
    for b in batches:
        logits(model, b)
    for h in hooks:
        h.remove()
    for n in firsts:
        torch.testing.assert_close(seen[n], accs[n].H, rtol=1e-4, atol=1e-5, msg=n)


def test_recorded_block_inputs_hold_no_kv_cache():
    """Pins the hook against transformers' call conventions: the cache keyword was renamed (past_key_values ->
    cache in 5.2x) and LLaVA now builds a cache although use_cache=False cannot be passed by signature; a
    recorded cache is appended to on every re-run of the block, so the driver drops any Cache by type."""
    from transformers.cache_utils import DynamicCache
    from bivlm_kernels.quant.capture import _stateless
    kw = _stateless({"cache": DynamicCache(), "a_future_name": DynamicCache(), "use_cache": True, "x": 1})
    assert kw == {"cache": None, "a_future_name": None, "use_cache": False, "x": 1}

def test_per_component_settings_and_overrides():
    model = tiny_model("llava")
    cfg = QuantConfig(vision=None, projector=dict(method="rtn", bits=4, group_size=64),
                      language=dict(method="rtn", bits=1, group_size=64),
                      exclude=[r"layers\.1\.mlp\.down_proj$"],
                      overrides={r"layers\.0\.self_attn\.q_proj$": {"bits": 2, "group_size": 32},
                                 r"layers\.0\.mlp\.up_proj$": None})
    model, report = quantize_model(model, cfg, calib("llava"), progress=False)
    layers = block_linears(model)
    vision = {n: m for n, m in layers.items() if ".vision_tower." in n}
    assert vision and all(type(m) is nn.Linear for m in vision.values())      # vision None: full precision
    assert all(r.component != "vision" for r in report.layers)
    proj = model.model.multi_modal_projector.linear_1
    assert isinstance(proj, QuantLinear) and proj.spec.segments[0].bits == 4
    lm = model.model.language_model.layers
    assert lm[1].self_attn.q_proj.spec.segments[0].bits == 1
    assert lm[0].self_attn.q_proj.spec.segments[0].bits == 2 and lm[0].self_attn.q_proj.group_size == 32
    assert type(lm[1].mlp.down_proj) is nn.Linear and type(lm[0].mlp.up_proj) is nn.Linear
    assert any("layers.1.mlp.down_proj" in s for s in report.skipped)


def test_group_size_fallback_logged(caplog):
    """in_features 96 is no multiple of 128 or 64: the largest supported group size dividing it (32) is used."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**dict(TEXT, hidden_size=96,
                                                                          intermediate_size=128))).eval()
    with caplog.at_level("INFO", logger="bivlm_kernels.quant.config"):
        model, report = quantize_model(model, QuantConfig(language=dict(method="rtn", bits=2, group_size=128)),
                                       [text_batch(0)], progress=False)
    g = {r.name.rsplit(".", 1)[-1]: r.group_size for r in report.layers}
    assert g["q_proj"] == 32 and g["down_proj"] == 128
    assert "using group_size=32" in caplog.text


def test_tied_embeddings_round_trip(tmp_path):
    """A causal LM with lm_head tied to embed_tokens (SmolLM2, the testbed) saves the shared tensor once."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TEXT, tie_word_embeddings=True)).eval()
    model, _ = quantize_model(model, QuantConfig(language=dict(method="rtn", bits=4, group_size=32)),
                              [text_batch(0), text_batch(1)], progress=False)
    loaded = load_quantized(save_quantized(model, str(tmp_path / "tied")))
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    b = text_batch(5)
    assert torch.equal(logits(loaded, b), logits(model, b))


def test_method_name_string_config():
    model = tiny_model("llava")
    model, report = quantize_model(model, "rtn", calib("llava"), progress=False)
    assert report.layers and all(r.component == "language" for r in report.layers)


def test_build_calibration_data_mix():
    class Proc:                         # a stand-in processor: records what it is asked to encode
        image_processor = object()
        image_token = "<image>"
        chat_template = None

        def __call__(self, text, images=None, return_tensors=None, **kw):
            ids = torch.tensor([[1, 2, 3]])
            out = {"input_ids": ids}
            if images is not None:
                assert text[0].startswith("<image>\n")
                out["pixel_values"] = torch.zeros(1, 3, 4, 4)
            return out

    pairs = [("img", f"text {i}") for i in range(8)]
    data = build_calibration_data(Proc(), pairs, n_samples=8, mix=0.25)
    assert len(data) == 8 and sum("pixel_values" in d for d in data) == 2
    assert sum("pixel_values" in d for d in build_calibration_data(Proc(), pairs, mix=1.0)) == 8
    with pytest.raises(ValueError, match="mix"):
        build_calibration_data(Proc(), pairs, mix=1.5)


# ---------------------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------------------

def test_bad_configs():
    with pytest.raises(ValueError, match=r"unknown method 'nope'.*available"):
        QuantConfig.from_method("nope")
    with pytest.raises(ValueError, match="unknown option"):
        QuantConfig.from_method("rtn", not_an_option=1)
    with pytest.raises(ValueError, match="bits"):
        QuantConfig(language=dict(method="rtn", bits=3)).validate()
    with pytest.raises(ValueError, match="group_size"):
        QuantConfig(language=dict(method="rtn", group_size=100)).validate()
    with pytest.raises(ValueError, match="unknown component"):
        QuantConfig.from_method("rtn", components="language,audio")
    with pytest.raises(ValueError, match="nothing to quantize"):
        QuantConfig(language=None).validate()
    with pytest.raises(ValueError, match="mix"):
        QuantConfig(calibration={"mix": 2.0}).validate()
    with pytest.raises(ValueError, match="unknown component option"):
        ComponentConfig.from_dict({"method": "rtn", "bitz": 2})
    with pytest.raises(ValueError, match="regex"):
        QuantConfig(exclude=["("])


def test_bad_calibration_data():
    model = tiny_model("llava")
    cfg = QuantConfig(language=dict(method="rtn", bits=2, group_size=64))
    with pytest.raises(ValueError, match="empty"):
        quantize_model(model, cfg, [])
    with pytest.raises(ValueError, match="None"):
        quantize_model(model, cfg, None)
    with pytest.raises(TypeError, match=r"calibration_data\[0\]"):
        quantize_model(model, cfg, [torch.zeros(3)])
    bad = image_batch("llava", 0)
    bad["pixel_values"] = torch.randn(1, 3, 16, 16)          # wrong image size for this vision tower
    with pytest.raises(ValueError, match="does not fit"):
        quantize_model(model, cfg, [bad])
    vis = QuantConfig(vision=dict(method="rtn", bits=2, group_size=64), language=None)
    with pytest.raises(ValueError, match="no calibration batch reached the vision"):
        quantize_model(model, vis, [text_batch(0)])
    # image features and image tokens disagree: the projector would quantize, the language model cannot be
    # reached; the pre-flight check fails before anything changes
    short = image_batch("llava", 0)
    short["input_ids"] = short["input_ids"][:, :10]
    short["attention_mask"] = short["attention_mask"][:, :10]
    both = QuantConfig(projector=dict(method="rtn", bits=2, group_size=64),
                       language=dict(method="rtn", bits=2, group_size=64))
    with pytest.raises(ValueError, match="does not fit"):
        quantize_model(model, both, [short])
    # nothing was quantized by any of the failed calls
    assert not any(isinstance(m, QuantLinear) for m in model.modules())


def test_checkpoint_errors(tmp_path, monkeypatch):
    model, _ = quantize_model(tiny_model("llava"), QuantConfig(language=dict(method="rtn", bits=1, group_size=64)),
                              calib("llava"), progress=False)
    with pytest.raises(ValueError, match="no QuantLinear"):
        save_quantized(tiny_model("llava"), str(tmp_path / "none"))
    path = save_quantized(model, str(tmp_path / "ckpt"))
    with pytest.raises(FileExistsError, match="overwrite"):
        save_quantized(model, path)
    save_quantized(model, path, overwrite=True)

    # a failure while writing leaves neither a checkpoint nor a temp dir
    import bivlm_kernels.checkpoint as ckpt
    monkeypatch.setattr(ckpt.file, "save", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        save_quantized(model, str(tmp_path / "half"))
    with pytest.raises(OSError, match="disk full"):
        save_quantized(model, path, overwrite=True)                # the old checkpoint survives
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    load_quantized(path)

    # corrupt weights file
    with open(os.path.join(path, "model.safetensors"), "r+b") as f:
        f.truncate(100)
    with pytest.raises(ValueError, match="model.safetensors"):
        load_quantized(path)
    # config that no longer matches the weights
    save_quantized(model, path, overwrite=True)
    cfg = json.load(open(os.path.join(path, "config.json")))
    cfg["text_config"]["intermediate_size"] = 192
    json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
    with pytest.raises(ValueError, match="checkpoint layer"):
        load_quantized(path)
    # other format version, missing files
    save_quantized(model, path, overwrite=True)
    info = json.load(open(os.path.join(path, "quantization.json")))
    json.dump(dict(info, format_version=99), open(os.path.join(path, "quantization.json"), "w"))
    with pytest.raises(ValueError, match="format_version"):
        load_quantized(path)
    os.remove(os.path.join(path, "quantization.json"))
    with pytest.raises(ValueError, match="quantization.json"):
        load_quantized(path)
    with pytest.raises(FileNotFoundError):
        load_quantized(str(tmp_path / "nowhere"))


# ---------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------

def test_cli_help():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(__file__)),
                                                       os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-m", "bivlm_kernels.cli", "--help"], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 0 and "quantize" in r.stdout and "eval" in r.stdout
    r = subprocess.run([sys.executable, "-m", "bivlm_kernels.cli", "quantize", "--help"], capture_output=True,
                       text=True, env=env, timeout=120)
    assert r.returncode == 0 and "--method" in r.stdout and "--n-calib" in r.stdout


def test_cli_quantize_local_model(tmp_path, capsys):
    """``bivlm quantize --model DIR --calib-file JSONL``: a tiny Llama with a word-level tokenizer."""
    tokenizers = pytest.importorskip("tokenizers")
    from bivlm_kernels.cli import main
    vocab = {w: i for i, w in enumerate(["[UNK]", "[PAD]"] + [f"w{i}" for i in range(200)])}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")
    src = tmp_path / "src"
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**TEXT)).save_pretrained(src)
    fast.save_pretrained(src)
    calib_file = tmp_path / "calib.jsonl"
    calib_file.write_text("\n".join(json.dumps({"text": " ".join(f"w{(i * 7 + j) % 200}" for j in range(12))})
                                    for i in range(4)))
    out = tmp_path / "out"
    args = ["quantize", "--model", str(src), "--method", "rtn", "--bits", "2", "--group-size", "64",
            "--calib-file", str(calib_file), "--n-calib", "4", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "model.layers.1.mlp.down_proj" in printed and "bits/weight" in printed
    loaded = load_quantized(str(out))
    assert isinstance(loaded.model.layers[0].self_attn.q_proj, QuantLinear)
    with pytest.raises(SystemExit, match="already exists"):
        main(args)
    with pytest.raises(SystemExit, match="unknown option"):
        main(args + ["--overwrite", "--option", "nonsense=1"])
