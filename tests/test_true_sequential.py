"""QuantConfig(true_sequential=True): within a block, each stage's Hessians come from the already-quantized
earlier stages (GPTQ's true-sequential), on a tiny LLaVA."""
import pytest
import torch

from test_quantize_model import _RecordingRTN, calib, tiny_model  # noqa: E402  (same tiny models and method)

from bivlm_kernels.quant import QuantConfig, quantize_model
from bivlm_kernels.quant.hessian import HessianAccumulator


def _run(true_sequential):
    model = tiny_model("llava")
    batches = calib("llava")
    _RecordingRTN.seen.clear()
    cfg = QuantConfig(language=dict(method="_test_rtn", bits=1, group_size=64), true_sequential=true_sequential)
    model, report = quantize_model(model, cfg, batches, progress=False)
    seen = {r.name: _RecordingRTN.seen[i] for i, r in enumerate(report.layers)}
    # the Hessian every quantized linear sees in the finished model
    accs = {n: HessianAccumulator(model.get_submodule(n).in_features) for n in seen}
    hooks = [model.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: accs[n].add_batch(i[0]))
             for n in seen]
    with torch.no_grad():
        for b in batches:
            model(**b)
    for h in hooks:
        h.remove()
    return report, seen, {n: a.H for n, a in accs.items()}


def _close(a, b):
    return torch.allclose(a, b, rtol=1e-4, atol=1e-5)


def test_every_linear_is_calibrated_on_the_quantized_stages_before_it():
    report, seen, final = _run(True)
    names = [r.name.rsplit(".", 2)[-2] + "." + r.name.rsplit(".", 1)[-1] for r in report.layers]
    assert names[:7] == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]            # forward order, by stage
    for n in seen:                                   # what each linear was calibrated on is what it now sees
        assert _close(seen[n], final[n]), n


def test_without_it_later_stages_saw_the_full_precision_block():
    _, seen, final = _run(False)
    later = [n for n in seen if n.endswith(("o_proj", "down_proj"))]
    assert later and not any(_close(seen[n], final[n]) for n in later)      # the check above can fail
    first = [n for n in seen if n.endswith("q_proj")]
    assert all(_close(seen[n], final[n]) for n in first)                     # block inputs: sequential either way


def test_true_sequential_is_checked_and_recorded():
    with pytest.raises(ValueError, match="true_sequential must be True or False"):
        QuantConfig(language=dict(method="rtn"), true_sequential="yes").validate()
    cfg = QuantConfig(language=dict(method="rtn"), true_sequential=True)
    assert QuantConfig.from_dict(cfg.to_dict()).true_sequential is True
