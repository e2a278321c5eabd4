"""Token pruning (bivlm_kernels.models.token_pruning) on tiny random-init LLaVA, Qwen2-VL and Qwen2.5-VL models.

The oracle is the *unpatched* model with an explicit attention mask in layers >= L that hides the dropped
prompt positions as keys: no gathering, original positions, full KV cache. A correctly pruned model must give
the same logits at every kept position, and the same generated tokens and per-step logits.
"""
import pytest
import torch

pytest.importorskip("transformers")
from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,  # noqa: E402
                          Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig,
                          Qwen2VLForConditionalGeneration)

from bivlm_kernels.models.token_pruning import enable_token_pruning, keep_count_for  # noqa: E402
from bivlm_kernels.models.hf_compat import cache_kwarg, find_cache, output_cache  # noqa: E402

N_LAYERS = 4
N_IMG = 16                                          # image tokens per image in every tiny model
PAD, BOS, EOS = 0, 1, 2


# ------------------------------------------------------------------------------------------------ tiny models
def _llava(attn):
    v = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         image_size=16, patch_size=4)                       # 4x4 patches = 16 tokens
    t = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=N_LAYERS,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                    pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
    cfg = LlavaConfig(vision_config=v, text_config=t, image_token_index=99, image_seq_length=N_IMG,
                      vision_feature_select_strategy="default", vision_feature_layer=-1)
    return cfg


def _qwen(cfg_cls):
    vis = dict(depth=1, hidden_size=32, num_heads=2, patch_size=2, spatial_merge_size=2, temporal_patch_size=2,
               in_channels=3)
    if cfg_cls is Qwen2_5_VLConfig:
        vis.update(intermediate_size=64, out_hidden_size=32, fullatt_block_indexes=[0], window_size=8)
    else:
        vis.update(embed_dim=32)
    txt = dict(vocab_size=120, hidden_size=32, intermediate_size=64, num_hidden_layers=N_LAYERS,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=PAD,
               bos_token_id=BOS, eos_token_id=EOS,
               rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]})
    return cfg_cls(vision_config=vis, text_config=txt, image_token_id=110, video_token_id=111,
                   vision_start_token_id=112, vision_end_token_id=113)


_CACHE = {}


def make(kind, attn="sdpa"):
    """(model, inputs): a 2-row batch, left-padded row 0, one image per row, image tokens at different offsets."""
    if (kind, attn) not in _CACHE:
        torch.manual_seed(0)
        if kind == "llava":
            cfg = _llava(attn)
            cls = LlavaForConditionalGeneration
        else:
            cfg = _qwen(Qwen2VLConfig if kind == "qwen2_vl" else Qwen2_5_VLConfig)
            cls = Qwen2VLForConditionalGeneration if kind == "qwen2_vl" else Qwen2_5_VLForConditionalGeneration
        cfg._attn_implementation = attn
        model = cls(cfg).eval()
        g = torch.Generator().manual_seed(1)
        if kind == "llava":
            img = [99] * N_IMG
            rows = [[PAD, PAD, BOS, 5] + img + [7, 8, 9, 10], [BOS, 5, 6, 4] + img + [7, 8, 11, 12]]
            extra = {"pixel_values": torch.randn(2, 3, 16, 16, generator=g)}
        else:
            img = [112] + [110] * N_IMG + [113]
            rows = [[PAD, PAD, BOS, 5] + img + [7, 8, 9, 10], [BOS, 5, 6, 4] + img + [7, 8, 11, 12]]
            extra = {"pixel_values": torch.randn(2 * 64, 24, generator=g),        # 8x8 patches, merged 2x2
                     "image_grid_thw": torch.tensor([[1, 8, 8], [1, 8, 8]])}
        ids = torch.tensor(rows)
        inputs = {"input_ids": ids, "attention_mask": (ids != PAD).long(), **extra}
        if kind != "llava":
            inputs["mm_token_type_ids"] = (ids == 110).int()
        _CACHE[(kind, attn)] = (model, inputs)
    return _CACHE[(kind, attn)]


KINDS = ["llava", "qwen2_vl", "qwen2_5_vl"]


# ------------------------------------------------------------------------------------------------ oracle
class MaskedReference:
    """Hooks on the unpatched model: layers >= ``layer`` get an explicit 4-D mask hiding the dropped prompt
    positions (and padding) as keys, in prefill and decode alike."""

    def __init__(self, model, layer, kept_positions, prompt_len):
        self.dropped = [sorted(set(range(prompt_len)) - set(r.tolist())) for r in kept_positions]
        self.am = None
        self.hooks = [model.model.register_forward_pre_hook(self._base, with_kwargs=True)]
        for lyr in model.model.language_model.layers[layer:]:
            self.hooks.append(lyr.register_forward_pre_hook(self._layer, with_kwargs=True))

    def _base(self, module, args, kwargs):
        self.am = kwargs.get("attention_mask")

    def _layer(self, module, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        b, q = h.shape[:2]
        cache = find_cache(args, kwargs)
        kv = q + (cache.get_seq_length(module.self_attn.layer_idx) if cache is not None else 0)
        allowed = (torch.arange(kv)[None, :] <= torch.arange(kv - q, kv)[:, None])[None].repeat(b, 1, 1)
        if self.am is not None:
            allowed &= self.am[:, None, :kv].bool()
        for i, d in enumerate(self.dropped):
            allowed[i, :, d] = False
        mask = torch.zeros(b, 1, q, kv, dtype=h.dtype).masked_fill(~allowed[:, None], torch.finfo(h.dtype).min)
        return args, dict(kwargs, attention_mask=mask)

    def remove(self):
        for h in self.hooks:
            h.remove()


def _gen(model, inputs, n=5):
    out = model.generate(**inputs, max_new_tokens=n, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, pad_token_id=PAD)
    return out.sequences, torch.stack(out.logits, 1)


# ------------------------------------------------------------------------------------------------ tests
def test_keep_count_rounding():
    # round half up, at least one: the percentages the testbed table uses, on its 16 image tokens
    assert [keep_count_for(16, r) for r in (1.0, 0.5, 0.25, 0.1, 0.05)] == [16, 8, 4, 2, 1]
    assert keep_count_for(10, 0.25) == 3 and keep_count_for(10, 0.24) == 2 and keep_count_for(3, 0.01) == 1
    assert keep_count_for(16, keep_count=5) == 5 and keep_count_for(4, keep_count=9) == 4
    assert keep_count_for(0, 0.5) == 0


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("keep,count", [(0.25, None), (0.05, None), (None, 5)])
def test_keeps_requested_count(kind, keep, count):
    model, inputs = make(kind)
    s = inputs["input_ids"].shape[1]
    with torch.no_grad(), enable_token_pruning(model, layer=2, keep=keep, keep_count=count,
                                               criterion="norm") as h:
        logits = model(**inputs).logits
    want = count if count is not None else keep_count_for(N_IMG, keep)
    rec = h.last
    assert rec.candidates == [N_IMG, N_IMG] and rec.kept == [want, want]
    assert rec.pruned_len == s - (N_IMG - want) == logits.shape[1]
    ids = inputs["input_ids"]
    for b in range(2):
        kept_ids = ids[b, rec.kept_positions[b]]
        assert int((kept_ids == model.config.image_token_id).sum()) == want
        # every non-image token survives, in order
        assert torch.equal(kept_ids[kept_ids != model.config.image_token_id],
                           ids[b][ids[b] != model.config.image_token_id])


@pytest.mark.parametrize("kind,attn", [("llava", "sdpa"), ("llava", "eager"), ("qwen2_vl", "sdpa"),
                                       ("qwen2_5_vl", "sdpa")])
@pytest.mark.parametrize("criterion", ["attention", "norm", "similarity", "random"])
def test_prefill_matches_masked_reference(kind, attn, criterion):
    model, inputs = make(kind, attn)
    s = inputs["input_ids"].shape[1]
    with torch.no_grad():
        with enable_token_pruning(model, layer=2, keep=0.25, criterion=criterion) as h:
            pruned = model(**inputs).logits
        ref_hooks = MaskedReference(model, 2, h.last.kept_positions, s)
        try:
            ref = model(**inputs).logits
        finally:
            ref_hooks.remove()
    kp = h.last.kept_positions
    am = inputs["attention_mask"]
    for b in range(2):
        real = am[b, kp[b]].bool()
        torch.testing.assert_close(pruned[b][real], ref[b, kp[b]][real], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("target", ["image", "text"])
def test_generate_matches_masked_reference(kind, target):
    # decode steps attend to the shortened cache and new tokens keep their unpruned positions (incl. Qwen's
    # rope_deltas): the oracle keeps the whole cache and only masks the dropped positions
    model, inputs = make(kind)
    s = inputs["input_ids"].shape[1]
    with torch.no_grad():
        with enable_token_pruning(model, layer=1, keep=0.25, criterion="attention", target=target) as h:
            seq, logits = _gen(model, inputs)
        assert len(h.records) == 1                      # pruned once, at prefill
        ref_hooks = MaskedReference(model, 1, h.last.kept_positions, s)
        try:
            ref_seq, ref_logits = _gen(model, inputs)
        finally:
            ref_hooks.remove()
    assert torch.equal(seq, ref_seq)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    assert h.last.pruned_len < s


@pytest.mark.parametrize("kind", KINDS)
def test_keep_one_is_identical_and_remove_restores(kind):
    model, inputs = make(kind)
    with torch.no_grad():
        base = model(**inputs).logits
        base_seq, base_logits = _gen(model, inputs)
        with enable_token_pruning(model, layer=2, keep=1.0) as h:
            assert torch.equal(model(**inputs).logits, base)
            seq, logits = _gen(model, inputs)
        assert h.last.kept == h.last.candidates == [N_IMG, N_IMG]
        assert torch.equal(seq, base_seq) and torch.equal(logits, base_logits)
        # after remove (the with block): unpatched behaviour, even right after a pruning run
        h2 = enable_token_pruning(model, layer=2, keep=0.1)
        assert model(**inputs).logits.shape[1] < base.shape[1]
        h2.remove()
        assert torch.equal(model(**inputs).logits, base)
        assert not any(lyr._forward_pre_hooks for lyr in model.model.language_model.layers)
        assert not model.model._forward_pre_hooks
        h2.remove()                                     # idempotent


def test_text_target_keeps_images_and_last_token():
    model, inputs = make("llava")
    ids, am = inputs["input_ids"], inputs["attention_mask"]
    with torch.no_grad(), enable_token_pruning(model, layer=2, keep=0.5, criterion="norm", target="text") as h:
        logits = model(**inputs).logits
    rec = h.last
    # prunable text: attended non-image tokens but the last one -> rows have 5 and 7
    assert rec.candidates == [5, 7] and rec.kept == [3, 4]
    # rows drop 2 and 3 text tokens; row 0 drops one padding position more to keep the batch rectangular
    assert rec.pruned_len == ids.shape[1] - 3 == logits.shape[1]
    for b in range(2):
        kept = rec.kept_positions[b]
        assert int((ids[b, kept] == 99).sum()) == N_IMG
        assert int(kept[-1]) == ids.shape[1] - 1
        assert int(am[b, kept].sum()) == N_IMG + rec.kept[b] + 1


def test_criteria_rank_what_they_claim():
    model, inputs = make("llava", "eager")
    img = inputs["input_ids"] == 99
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True, output_attentions=True)
    h_in = out.hidden_states[2]                         # input of decoder layer 2
    att = out.attentions[1]                             # eager weights of layer 1: [B, H, S, S]
    s = img.shape[1]
    for b in range(2):
        pos = img[b].nonzero()[:, 0]
        last_img = int(pos.max())
        queries = torch.arange(last_img + 1, s)         # the question after the image
        want = {
            "norm": h_in[b, pos].norm(dim=-1),
            "attention": att[b][:, queries].mean(dim=(0, 1))[pos],
        }
        hn = torch.nn.functional.normalize(h_in[b, pos], dim=-1)
        want["similarity"] = -(hn @ torch.nn.functional.normalize(hn.mean(0), dim=0))
        for crit, score in want.items():
            with torch.no_grad(), enable_token_pruning(model, layer=2, keep_count=4, criterion=crit) as h:
                model(**inputs)
            kept = set(h.last.kept_positions[b].tolist()) & set(pos.tolist())
            assert kept == set(pos[score.topk(4).indices].tolist()), crit
            if crit == "attention":
                torch.testing.assert_close(h.last.scores[b, pos], score, rtol=1e-4, atol=1e-6)


def test_random_is_seeded():
    model, inputs = make("llava")
    runs = []
    for seed in (0, 0, 1):
        with torch.no_grad(), enable_token_pruning(model, layer=2, keep=0.25, criterion="random", seed=seed) as h:
            model(**inputs)
        runs.append(h.last.kept_positions)
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


def test_bad_arguments():
    model, _ = make("llava")
    for kw, name in [(dict(keep=0.0), "keep"), (dict(keep=-0.5), "keep"), (dict(keep=1.5), "keep"),
                     (dict(keep=True), "keep"), (dict(keep_count=0), "keep_count"),
                     (dict(layer=0), "layer"), (dict(layer=N_LAYERS), "layer"), (dict(layer=-1), "layer"),
                     (dict(criterion="entropy"), "criterion"), (dict(target="audio"), "target")]:
        with pytest.raises(ValueError, match=name):
            enable_token_pruning(model, **kw)
    with pytest.raises(ValueError, match="attention.*norm"):
        enable_token_pruning(model, criterion="bogus")
    with pytest.raises(TypeError, match="language_model"):
        enable_token_pruning(torch.nn.Linear(2, 2))
    h = enable_token_pruning(model)
    try:
        with pytest.raises(RuntimeError, match="already enabled"):
            enable_token_pruning(model)
    finally:
        h.remove()


def test_needs_input_ids():
    model, inputs = make("llava")
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    with torch.no_grad(), enable_token_pruning(model, layer=2, keep=0.5):
        with pytest.raises(ValueError, match="input_ids"):
            model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"])
        model(**inputs)
        # the language model called directly after a full forward must not reuse that forward's input_ids
        with pytest.raises(ValueError, match="input_ids"):
            model.model.language_model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"])


def test_map_positions_right_padded():
    # the testbed pads on the right: the last real token moves left by the number of pruned tokens
    from bivlm_kernels.models.token_pruning import map_positions
    model, inputs = make("llava")
    ids = torch.tensor([[BOS, 5] + [99] * N_IMG + [7, 8, 9, 10], [BOS, 5] + [99] * N_IMG + [7, 8, PAD, PAD]])
    enc = {"input_ids": ids, "attention_mask": (ids != PAD).long(), "pixel_values": inputs["pixel_values"]}
    last = enc["attention_mask"].sum(1) - 1
    assert torch.equal(map_positions(model, last), last)                 # no pruning: unchanged
    with torch.no_grad():
        full = model.model(**enc).last_hidden_state[torch.arange(2), last]
        with enable_token_pruning(model, layer=2, keep=1.0):
            same = model.model(**enc).last_hidden_state[torch.arange(2), map_positions(model, last)]
        with enable_token_pruning(model, layer=2, keep_count=2) as h:
            h_pruned = model.model(**enc).last_hidden_state
            j = map_positions(model, last)
            with pytest.raises(ValueError, match="not all kept"):
                h.last.index_of(torch.tensor([3, 3]))                 # image positions, pruned
    assert torch.equal(same, full)
    assert j.tolist() == (last - (N_IMG - 2)).tolist()
    assert torch.equal(h.last.kept_positions[torch.arange(2), j], last)
    assert not torch.allclose(h_pruned[torch.arange(2), j], full)     # pruning changed what the token sees


def test_continuing_a_pruned_cache_with_other_rows_fails_clearly():
    model, inputs = make("llava")
    with torch.no_grad(), enable_token_pruning(model, layer=2, keep=0.25):
        out = model(**inputs, use_cache=True)
        cache = output_cache(out)
        cache.reorder_cache(torch.tensor([0, 1, 1]))
        nxt = torch.tensor([[7, 8], [7, 8], [7, 8]])
        am = torch.cat([inputs["attention_mask"][[0, 1, 1]], torch.ones(3, 2, dtype=torch.long)], 1)
        with pytest.raises(RuntimeError, match="batch changed"):
            model(input_ids=nxt, attention_mask=am, **{cache_kwarg(model.forward): cache})
