"""LUQ (bivlm_kernels.quant.luq): entropy, selection, assembly, on tiny random-init HF models (CPU, fast)."""
import math

import pytest
import torch

pytest.importorskip("transformers")

from bivlm_kernels.quant import luq  # noqa: E402


# ------------------------------------------------------------------------------------------------ tiny models
def tiny_llama(n_layers=4, hidden=64, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, hidden_size=hidden, intermediate_size=128, num_hidden_layers=n_layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def text_batches(n=6, seq=12, vocab=96, pad_last=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(0, vocab, (1, seq), generator=g)
        mask = torch.ones_like(ids)
        if i % 2 and pad_last:
            mask[:, -pad_last:] = 0            # right padding on every other batch
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def tiny_llava(seed=0):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
    torch.manual_seed(seed)
    text = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=96)
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                              image_size=16, patch_size=4, projection_dim=64)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=99, image_seq_length=16,
                      vision_feature_layer=-1, vision_feature_select_strategy="default")
    return LlavaForConditionalGeneration(cfg).eval()


def llava_batches(n=4, seed=2, text_only=0):
    """``n`` image+text samples (16 image tokens + 8 text tokens) and ``text_only`` text-only ones."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.cat([torch.full((1, 16), 99), torch.randint(0, 98, (1, 8), generator=g)], 1)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids),
                    "pixel_values": torch.randn(1, 3, 16, 16, generator=g)})
    for _ in range(text_only):
        ids = torch.randint(0, 98, (1, 10), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return out


# ------------------------------------------------------------------------------------------------ entropy
@pytest.mark.parametrize("estimator", ["kmeans", "histogram"])
@pytest.mark.parametrize("hook", ["input_layernorm", "block_output"])
def test_entropy_deterministic(estimator, hook):
    model, data = tiny_llama(), text_batches()
    kw = dict(hook=hook, estimator=estimator, n_clusters=8, n_init=2, n_bins=16)
    a = luq.layer_entropies(model, data, **kw)
    b = luq.layer_entropies(model, data, **kw)
    assert a.entropies == b.entropies and a.order == b.order
    assert len(a) == 4 and sorted(a.order) == [0, 1, 2, 3]
    assert [a.entropies[i] for i in a.order] == sorted(a.entropies)
    cap = math.log2(8 if estimator == "kmeans" else 16)
    assert all(0 < h <= cap + 1e-9 for h in a.entropies)
    # 6 batches x 12 tokens, 3 padded positions in each of 3 batches are dropped
    assert a.n_tokens == 6 * 12 - 3 * 3
    assert luq.LayerEntropies.from_dict(a.to_dict()) == a


def test_hooks_see_different_activations():
    model, data = tiny_llama(), text_batches()
    _, x_in = luq.collect_activations(model, data, hook="input_layernorm")
    _, x_out = luq.collect_activations(model, data, hook="block_output")
    # input_layernorm of layer i+1 normalises block i's output: same tokens, different vectors
    assert x_in[1].shape == x_out[0].shape
    assert not torch.allclose(x_in[1], x_out[0])
    ln = model.model.layers[1].input_layernorm
    assert torch.allclose(ln(x_out[0]), x_in[1], atol=1e-5)


def test_padding_dropped_and_max_tokens():
    model = tiny_llama()
    data = text_batches(n=2, seq=10, pad_last=4)
    names, acts = luq.collect_activations(model, data)
    assert names == [f"model.layers.{i}" for i in range(4)]
    assert acts[0].shape == (10 + 6, 64) and acts[0].dtype == torch.float32
    _, capped = luq.collect_activations(model, data, max_tokens=7, seed=3)
    assert capped[2].shape == (7, 64)
    # the same token subset for every layer: rows of layer 1's input_layernorm output stay rows of acts
    assert all(any(torch.equal(r, full) for full in acts[2]) for r in capped[2])


def test_histogram_entropy_sanity():
    g = torch.Generator().manual_seed(0)
    uniform = torch.rand(4000, 32, generator=g) * 2 - 1
    concentrated = torch.randn(4000, 32, generator=g) * 1e-3
    concentrated[:200] = torch.randn(200, 32, generator=g)       # 5 % spread out, the rest near one point
    hu = luq.histogram_entropy(uniform, n_bins=32)
    hc = luq.histogram_entropy(concentrated, n_bins=32)
    assert hu > hc + 1.0
    assert hu <= 5.0 + 1e-9                                       # log2(32)
    assert luq.histogram_entropy(torch.ones(10, 4)) == 0.0         # one point: zero entropy


def test_kmeans_entropy_sanity():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 16, generator=g) * 10
    four = centers[torch.arange(400) % 4] + 0.01 * torch.randn(400, 16, generator=g)
    # 4 equal, well-separated blobs clustered with K = 4: exactly 2 bits
    assert abs(luq.kmeans_entropy(four, n_clusters=4, seed=42, n_init=2) - 2.0) < 1e-6
    with pytest.raises(ValueError, match="n_clusters"):
        luq.kmeans_entropy(four[:3], n_clusters=4)


def test_llava_pools_image_and_text_tokens():
    model = tiny_llava()
    data = llava_batches(n=3)
    ent = luq.layer_entropies(model, data, estimator="histogram", n_bins=8)
    assert ent.layer_names == [f"model.language_model.layers.{i}" for i in range(4)]
    assert ent.n_tokens == 3 * 24                                 # 16 image + 8 text tokens per sample


def test_entropy_bad_input():
    model = tiny_llama()
    with pytest.raises(ValueError, match="hook"):
        luq.layer_entropies(model, text_batches(), hook="output")
    with pytest.raises(ValueError, match="estimator"):
        luq.layer_entropies(model, text_batches(), estimator="gmm")
    with pytest.raises(ValueError, match="empty"):
        luq.layer_entropies(model, [], estimator="histogram")
    with pytest.raises(ValueError, match="out of range"):
        luq.layer_entropies(model, text_batches(), layers=[7], estimator="histogram")
    with pytest.raises(ValueError, match="max_tokens"):
        luq.collect_activations(model, text_batches(), max_tokens=0)


# ------------------------------------------------------------------------------------------------ selection
def test_select_budget_exact():
    order = [2, 0, 3, 1]
    # equal layers, nominal 1 / 4 bits: averages 4, 3.25, 2.5, 1.75, 1 for k = 0..4
    assert luq.select_layers(order, 4, 1, 4, target_avg_bits=2.5) == 2              # exactly on the budget
    assert luq.select_layers(order, 4, 1, 4, target_avg_bits=2.4999) == 3
    assert luq.select_layers(order, 4, 1, 4, target_avg_bits=4.0) == 0
    assert luq.select_layers(order, 4, 1, 4, target_avg_bits=1.0) == 4
    with pytest.raises(ValueError, match="cannot be met"):
        luq.select_layers(order, 4, 1, 4, target_avg_bits=0.9)


def test_select_budget_weighted_honest_per_layer():
    order = [3, 1, 0, 2]
    sizes = [100, 300, 100, 500]
    low = [1.25, 1.30, 1.25, 1.40]                   # honest bits of each layer at the low setting
    high = [4.25, 4.25, 4.50, 4.25]
    for target in [4.3, 3.0, 2.5, 2.0, 1.5]:
        k = luq.select_layers(order, 4, low, high, target_avg_bits=target, layer_sizes=sizes)
        avg = lambda j: luq.prefix_bits(order, j, low, high, sizes)[0]   # noqa: E731
        assert avg(k) <= target and (k == 0 or avg(k - 1) > target)    # fits, and one layer fewer does not
    # bytes budget: total = sum(size * bits) / 8
    k = luq.select_layers(order, 4, low, high, target_bytes=300.0, layer_sizes=sizes)
    assert luq.prefix_bits(order, k, low, high, sizes)[1] <= 300.0 < luq.prefix_bits(order, k - 1, low, high,
                                                                                      sizes)[1]
    # the largest layer (3, size 500) goes first: k = 1 already saves the most
    assert luq.prefix_bits(order, 1, low, high, sizes)[1] == pytest.approx(
        (100 * 4.25 + 300 * 4.25 + 100 * 4.5 + 500 * 1.40) / 8)


@pytest.mark.parametrize("boundary", [0, 1, 7, 16, 29, 30])
def test_select_binary_search_exact_boundary(boundary):
    calls = []

    def quality(k):                                  # monotone: passes (<= 1.0) up to the boundary
        calls.append(k)
        return 0.5 + (k > boundary)
    k = luq.select_layers(list(range(30)), 30, 1, 4, quality_fn=quality, threshold=1.0)
    assert k == boundary
    assert len(calls) == len(set(calls)) <= math.ceil(math.log2(31)) + 1


def test_select_quality_and_budget_and_higher_is_better():
    order = list(range(8))
    # budget: avg <= 2.5 needs k >= 4 (equal layers, 1 vs 4 bits): the quality search stops there
    assert luq.select_layers(order, 8, 1, 4, target_avg_bits=2.5, quality_fn=lambda k: 0.0, threshold=1.0) == 4
    assert luq.select_layers(order, 8, 1, 4, target_avg_bits=2.5, quality_fn=lambda k: float(k), threshold=2) == 2
    acc = lambda k: 0.9 - 0.05 * k                   # noqa: E731  accuracy, higher is better
    assert luq.select_layers(order, 8, 1, 4, quality_fn=acc, threshold=0.7, higher_is_better=True) == 4


def test_select_bad_input():
    with pytest.raises(ValueError, match="permutation"):
        luq.select_layers([0, 0, 1], 3, 1, 4, target_avg_bits=2)
    with pytest.raises(ValueError, match="nothing to select"):
        luq.select_layers([0, 1], 2, 1, 4)
    with pytest.raises(ValueError, match="together"):
        luq.select_layers([0, 1], 2, 1, 4, quality_fn=lambda k: 0.0)
    with pytest.raises(ValueError, match="bits_low"):
        luq.select_layers([0, 1], 2, [1, 1, 1], 4, target_avg_bits=2)


def test_mix_calibration():
    data = llava_batches(n=4, text_only=6)
    half = luq.mix_calibration(data, 0.5)
    assert sum(s.get("pixel_values") is not None for s in half) == 4 and len(half) == 8
    assert len(luq.mix_calibration(data, 1.0)) == 4
    assert len(luq.mix_calibration(data, 0.0)) == 6
    assert luq.mix_calibration(data, None) == data
    with pytest.raises(ValueError, match="mix"):
        luq.mix_calibration(data, 1.5)


# ------------------------------------------------------------------------------------------------ end to end
def _need_driver():
    pytest.importorskip("bivlm_kernels.quant.driver")
    from bivlm_kernels.quant import METHODS
    if "rtn" not in METHODS:
        pytest.skip("no rtn method registered yet")


@pytest.mark.parametrize("assembly", ["swap", "sequential"])
def test_luq_quantize_saves_loads_generates(tmp_path, assembly):
    _need_driver()
    import bivlm_kernels
    from bivlm_kernels.nn import QuantLinear
    model = tiny_llava()
    data = llava_batches(n=3, text_only=3)
    with torch.no_grad():
        ref_logits = model(**data[0]).logits
    # nominal budget 2.5 with 1 / 4 bits over 4 equal layers -> k = 2
    model, rep = luq.luq_quantize(model, data, low_method="rtn", low_bits=1, high_method="rtn", high_bits=4,
                                  target_avg_bits=2.5, budget_bits="nominal", assembly=assembly,
                                  estimator="kmeans", n_clusters=8, n_init=2, group_size=64, progress=False)
    assert rep.k == 2
    low = set(rep.order[:2])
    for r in rep.layers:
        assert r.setting == ("low" if r.index in low else "high")
        assert r.nominal_bits == (1.0 if r.index in low else 4.0)
        assert r.honest_bits > r.nominal_bits                    # codebooks / scales cost something
        assert math.isfinite(r.rel_error) and r.rel_error > 0
    assert rep.average_nominal_bits == pytest.approx(2.5)
    # fp32 model, group 64: codebook (2 x fp32) / scale + zero (2 x fp32) per 64 weights add 1 bit/weight
    assert rep.average_bits == pytest.approx((2 * (1 + 1) + 2 * (4 + 1)) / 4)
    lang = model.model.language_model.layers
    for i, blk in enumerate(lang):
        bits = {m.spec.segments[0].bits for m in blk.modules() if isinstance(m, QuantLinear)}
        assert bits == ({1} if i in low else {4})
    assert "LUQ" in rep.table()

    with torch.no_grad():
        out = model(**data[0]).logits
    assert out.shape == ref_logits.shape and torch.isfinite(out).all()
    path = tmp_path / "luq"
    bivlm_kernels.save_quantized(model, str(path))
    loaded = bivlm_kernels.load_quantized(str(path))
    with torch.no_grad():
        assert torch.equal(loaded(**data[0]).logits, out)
    gen = loaded.generate(**data[0], max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert gen.shape == (1, data[0]["input_ids"].shape[1] + 3)


def test_luq_swap_quality_search_and_order():
    _need_driver()
    model = tiny_llama()
    data = text_batches(n=3)
    ent = luq.layer_entropies(model, data, estimator="histogram", n_bins=16)
    seen = []

    def quality(m):
        # the number of 1-bit decoder layers currently in the model: a monotone "loss"
        from bivlm_kernels.nn import QuantLinear
        n = sum(any(isinstance(x, QuantLinear) and x.spec.segments[0].bits == 1 for x in blk.modules())
                for blk in m.model.layers)
        seen.append(n)
        return float(n)
    model, rep = luq.luq_quantize(model, data, low_method="rtn", low_bits=1, high_method="rtn", high_bits=4,
                                  quality_fn=quality, threshold=3, entropy=ent, mix=None, group_size=64,
                                  progress=False)
    assert rep.k == 3 and set(seen) <= set(range(5))
    assert [r.index for r in rep.layers if r.setting == "low"] == sorted(ent.order[:3])
    assert rep.selection and all(rep.selection[k] == k for k in rep.selection)


def test_luq_honest_budget_swap():
    _need_driver()
    model = tiny_llama()
    data = text_batches(n=3)
    model, rep = luq.luq_quantize(model, data, low_method="rtn", low_bits=1, high_method="rtn", high_bits=4,
                                  target_avg_bits=3.0, estimator="histogram", mix=None, group_size=64,
                                  progress=False)
    # honest bits measured on the layers: the chosen k fits, k - 1 would not
    assert rep.average_bits <= 3.0
    per_low = rep.layers[rep.order[0]].honest_bits
    per_high = [r.honest_bits for r in rep.layers if r.setting == "high"][0]
    sizes = [r.weights for r in rep.layers]
    avg_k_minus_1 = luq.prefix_bits(rep.order, rep.k - 1, per_low, per_high, sizes)[0]
    assert avg_k_minus_1 > 3.0


def test_luq_bad_input():
    model = tiny_llama()
    with pytest.raises(ValueError, match="assembly"):
        luq.luq_quantize(model, text_batches(), target_avg_bits=2, assembly="merge")
    with pytest.raises(ValueError, match="how many layers"):
        luq.luq_quantize(model, text_batches())
    with pytest.raises(ValueError, match="budget_bits"):
        luq.luq_quantize(model, text_batches(), target_avg_bits=2, budget_bits="exact")
