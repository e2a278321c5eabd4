"""``models.decoder_layers`` finds the language model's decoder layers of an already quantized model.

LUQ measures and assembles models whose decoder layers hold only ``QuantLinear`` (no ``nn.Linear`` left), so
the adapters must count ``QuantLinear`` as a linear layer; LUQ once kept a fallback finder for that case.
"""
import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

from bivlm_kernels.models import decoder_layers, find_components  # noqa: E402
from bivlm_kernels.nn import QuantLinear  # noqa: E402
from bivlm_kernels.quant import QuantConfig, luq, quantize_model  # noqa: E402

TEXT = dict(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=96)


def tiny(arch: str):
    torch.manual_seed(0)
    if arch == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**TEXT)).eval()
    vision = dict(model_type="clip_vision_model", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=2, image_size=16, patch_size=4, projection_dim=64)
    cfg = transformers.LlavaConfig(vision_config=vision, text_config=dict(model_type="llama", **TEXT),
                                   image_token_index=99, image_seq_length=16)
    return transformers.LlavaForConditionalGeneration(cfg).eval()


def batches(arch: str) -> list:
    g = torch.Generator().manual_seed(1)
    text = torch.randint(0, 98, (1, 8), generator=g)
    if arch == "llama":
        return [{"input_ids": text, "attention_mask": torch.ones_like(text)}]
    ids = torch.cat([torch.full((1, 16), 99), text], 1)
    return [{"input_ids": ids, "attention_mask": torch.ones_like(ids),
             "pixel_values": torch.randn(1, 3, 16, 16, generator=g)}]


@pytest.mark.parametrize("arch", ["llama", "llava"])
def test_decoder_layers_of_a_fully_quantized_model(arch):
    model = tiny(arch)
    names, _ = decoder_layers(model)
    comp = dict(method="rtn", bits=2, group_size=64)
    cfg = QuantConfig(language=dict(comp), vision=dict(comp) if arch == "llava" else None,
                      projector=dict(comp) if arch == "llava" else None)
    model, _ = quantize_model(model, cfg, batches(arch), progress=False)
    q_names, q_blocks = decoder_layers(model)
    assert q_names == names
    assert all(b is model.get_submodule(n) for n, b in zip(q_names, q_blocks))
    # only QuantLinear is left in the decoder layers: the adapters found them through QuantLinear
    assert not any(type(m) is nn.Linear for b in q_blocks for m in b.modules())
    assert all(any(isinstance(m, QuantLinear) for m in b.modules()) for b in q_blocks)
    assert find_components(model)["language"].block_names == q_names
    assert luq.decoder_layers is decoder_layers


def test_decoder_layers_error_without_language_layers():
    with pytest.raises(ValueError, match="no language-model decoder layers"):
        decoder_layers(nn.Sequential(nn.Conv2d(3, 8, 3)))
