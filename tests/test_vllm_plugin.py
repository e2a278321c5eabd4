"""The vLLM plugin (bivlm_kernels/integrations/vllm_plugin.py) on real vLLM layers, on the CPU.

vLLM is not installed in CI (a multi-GB GPU build): these tests skip there. Run them in a vLLM environment:
``python -m venv v && v/bin/pip install vllm pytest && PYTHONPATH=. v/bin/python -m pytest tests/test_vllm_plugin.py``
(last run: vllm 0.33.0, torch 2.14.0, CPU only; vLLM's own kernels are not needed for these layers).
"""
import tempfile

import pytest
import torch

vllm = pytest.importorskip("vllm", reason="vLLM is not installed (GPU-sized install; see the module docstring)")

from bivlm_kernels import checkpoint  # noqa: E402
from bivlm_kernels.checkpoint import quantization_config  # noqa: E402
from bivlm_kernels.integrations import vllm_plugin  # noqa: E402
from bivlm_kernels.nn import QuantLinear  # noqa: E402

H, HEADS, KV, HD = 128, 4, 2, 32
PREFIX = "model.layers.0.self_attn"


@pytest.fixture(scope="module")
def vllm_ctx():
    from vllm.config import DeviceConfig, VllmConfig, set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    with set_current_vllm_config(VllmConfig(device_config=DeviceConfig(device="cpu"))):
        init_distributed_environment(world_size=1, rank=0, local_rank=0,
                                     distributed_init_method=f"file://{tempfile.mktemp()}", backend="gloo")
        initialize_model_parallel(1, 1)
        yield


def _layers(bits_qkv=2, perm_q=False):
    torch.manual_seed(0)
    mods = {"q_proj": QuantLinear.from_linear(torch.nn.Linear(H, HEADS * HD, bias=False), bits_qkv, 64,
                                              dtype=torch.float32),
            "k_proj": QuantLinear.from_linear(torch.nn.Linear(H, KV * HD, bias=False), bits_qkv, 64,
                                              dtype=torch.float32),
            "v_proj": QuantLinear.from_linear(torch.nn.Linear(H, KV * HD, bias=False), bits_qkv, 64,
                                              dtype=torch.float32),
            "o_proj": QuantLinear.from_linear(torch.nn.Linear(HEADS * HD, H, bias=True), 4, 64,
                                              dtype=torch.float32)}
    holder = torch.nn.Module()
    for n, m in mods.items():
        holder.add_module(n, m)
    cfg = quantization_config(checkpoint.quant_layout(holder), "float32")
    cfg["layers"] = {f"{PREFIX}.{n}": d for n, d in cfg["layers"].items()}
    if perm_q:
        cfg["layers"][f"{PREFIX}.q_proj"]["has_perm"] = True
    vllm_plugin.register()
    from vllm.model_executor.layers.quantization import get_quantization_config
    return mods, get_quantization_config("bivlm").from_config(cfg)


def test_fused_qkv_and_row_layer_match_quantlinear(vllm_ctx):
    from vllm.model_executor.layers.linear import QKVParallelLinear, RowParallelLinear
    mods, qc = _layers()
    qkv = QKVParallelLinear(H, HD, HEADS, KV, bias=False, quant_config=qc, prefix=f"{PREFIX}.qkv_proj",
                            params_dtype=torch.float32)
    o = RowParallelLinear(HEADS * HD, H, bias=True, quant_config=qc, prefix=f"{PREFIX}.o_proj",
                          params_dtype=torch.float32)
    params = dict(qkv.named_parameters())
    assert sorted(params) == ["segments.0.codebook", "segments.0.qweight"]
    for sid, name in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj")):
        for bname, t in mods[name].named_buffers():
            params[bname].weight_loader(params[bname], t, sid)
    op = dict(o.named_parameters())
    for bname, t in mods["o_proj"].named_buffers():
        op[bname].weight_loader(op[bname], t)
    for layer in (qkv, o):
        layer.quant_method.process_weights_after_loading(layer)
    x = torch.randn(3, H)
    y, _ = qkv(x)
    assert torch.equal(y, torch.cat([mods[n](x) for n in ("q_proj", "k_proj", "v_proj")], -1))
    h = torch.randn(5, HEADS * HD)
    y2, _ = o(h)
    torch.testing.assert_close(y2, mods["o_proj"](h), rtol=1e-5, atol=1e-5)


def test_refusals(vllm_ctx):
    from vllm.model_executor.layers.linear import QKVParallelLinear
    _, qc = _layers(perm_q=True)
    with pytest.raises(ValueError, match="permutation"):
        QKVParallelLinear(H, HD, HEADS, KV, bias=False, quant_config=qc, prefix=f"{PREFIX}.qkv_proj",
                          params_dtype=torch.float32)
    with pytest.raises(ValueError, match="format"):
        type(qc).from_config({"quant_method": "bivlm", "format": "bivlm-packed", "format_version": 99,
                              "layers": {}})
    layers = {f"{PREFIX}.q_proj": qc.layers[f"{PREFIX}.q_proj"]}
    with pytest.raises(ValueError, match="only"):
        vllm_plugin.part_specs(layers, f"{PREFIX}.qkv_proj")
    assert vllm_plugin.part_specs(layers, f"{PREFIX}.o_proj") is None

