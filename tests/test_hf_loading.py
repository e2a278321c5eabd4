"""bivlm checkpoints load where users load models: ``AutoModel*.from_pretrained`` through the registered
``bivlm`` quantizer (bivlm_kernels/integrations/hf_quantizer.py)."""
import json
import os
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

import bivlm_kernels  # noqa: E402,F401  (registers the quantizer)
from bivlm_kernels import QuantLinear  # noqa: E402
from bivlm_kernels.quant import QuantConfig, load_quantized, quantize_model, save_quantized  # noqa: E402

from test_quantize_model import calib, tiny_model  # noqa: E402

ARCHS = ("llava", "qwen2_vl")


def _quantized(arch):
    model = tiny_model(arch)
    cfg = QuantConfig(language=dict(method="rtn", bits=2, group_size=32),
                      projector=dict(method="rtn", bits=4, group_size=32))
    model, _ = quantize_model(model, cfg, calib(arch), progress=False)
    return model


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def _quant_names(model):
    return sorted(n for n, m in model.named_modules() if isinstance(m, QuantLinear))


@pytest.mark.parametrize("arch", ARCHS)
def test_from_pretrained_rebuilds_quantlinear_and_round_trips(arch, tmp_path):
    model = _quantized(arch)
    save_quantized(model, str(tmp_path / "q"))
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    assert cfg["architectures"] == [type(model).__name__]
    assert cfg["quantization_config"]["quant_method"] == "bivlm"
    assert sorted(cfg["quantization_config"]["layers"]) == _quant_names(model)

    loaded = transformers.AutoModelForImageTextToText.from_pretrained(str(tmp_path / "q"))
    assert type(loaded) is type(model)
    assert _quant_names(loaded) == _quant_names(model)
    batch = calib(arch)[0]
    ref = _logits(model, batch)
    assert torch.equal(_logits(loaded, batch), ref)          # bit-identical, packed tensors landed
    assert loaded.get_memory_footprint() < model.get_memory_footprint() * 1.01

    out = loaded.generate(**batch, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == batch["input_ids"].shape[1] + 3

    loaded.save_pretrained(str(tmp_path / "again"))
    again = transformers.AutoModelForImageTextToText.from_pretrained(str(tmp_path / "again"))
    assert torch.equal(_logits(again, batch), ref)
    # and the no-transformers-quantizer path reads the same directory
    assert torch.equal(_logits(load_quantized(str(tmp_path / "q")), batch), ref)


def test_without_the_package_transformers_says_it_skips_bivlm(tmp_path):
    """What we cannot prevent, pinned: without `import bivlm_kernels`, transformers does not know the method
    and says so (the warning names `bivlm`), instead of loading silently."""
    model = _quantized("llava")
    save_quantized(model, str(tmp_path / "q"))
    code = ("import transformers, sys\n"
            "transformers.logging.set_verbosity_warning()\n"
            f"m = transformers.AutoModelForImageTextToText.from_pretrained({str(tmp_path / 'q')!r})\n"
            "assert 'bivlm_kernels' not in sys.modules\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": ""}, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Unknown quantization type, got bivlm" in r.stderr


def test_registration_is_lazy():
    r = subprocess.run([sys.executable, "-c",
                        "import sys, importlib.util, bivlm_kernels; assert 'transformers' not in sys.modules\n"
                        # an availability check before the import must not use the hook up
                        "assert importlib.util.find_spec('transformers') is not None\n"
                        "import transformers\n"
                        "from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING as M\n"
                        "assert 'bivlm' in M, sorted(M)\n"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


def test_old_checkpoint_without_quantization_config_still_loads(tmp_path):
    model = _quantized("llava")
    save_quantized(model, str(tmp_path / "q"))
    cfg_file = tmp_path / "q" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    del cfg["quantization_config"]
    cfg_file.write_text(json.dumps(cfg))
    batch = calib("llava")[0]
    assert torch.equal(_logits(load_quantized(str(tmp_path / "q")), batch), _logits(model, batch))


def test_bad_quantization_config_is_refused(tmp_path):
    model = _quantized("llava")
    save_quantized(model, str(tmp_path / "q"))
    cfg_file = tmp_path / "q" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["quantization_config"]["format_version"] = 99
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="format_version|version 99"):
        transformers.AutoModelForImageTextToText.from_pretrained(str(tmp_path / "q"))


def test_dequantize_back_to_linear(tmp_path):
    from bivlm_kernels.nn import dequantize_model
    model = _quantized("llava")
    batch = calib("llava")[0]
    ref = _logits(model, batch)
    names = _quant_names(model)
    weights = {n: model.get_submodule(n).dequantize() for n in names}
    save_quantized(model, str(tmp_path / "q"))
    dense = dequantize_model(model)
    assert not _quant_names(dense)
    for n in names:
        lin = dense.get_submodule(n)
        assert type(lin) is torch.nn.Linear and torch.equal(lin.weight, weights[n])
    torch.testing.assert_close(_logits(dense, batch), ref, rtol=1e-4, atol=1e-4)
    # through transformers' own API on a from_pretrained model
    loaded = transformers.AutoModelForImageTextToText.from_pretrained(str(tmp_path / "q"))
    loaded = loaded.dequantize()
    assert not _quant_names(loaded) and not getattr(loaded, "is_quantized", False)
    torch.testing.assert_close(_logits(loaded, batch), ref, rtol=1e-4, atol=1e-4)
