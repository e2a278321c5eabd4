"""Quality evaluation on the real testbed (:mod:`bivlm_kernels.models.testbed`): easy-VQA accuracy, language-model
perplexity on shipped English text, per-layer relative output error, always next to honest bits per weight.

* ``vqa_accuracy``: the first ``limit`` questions of the easy-VQA *test* split (9,673 in all). The prediction is
  the answer (of the 13) whose first token has the highest logit at the last prompt position (closed-set
  scoring; the 13 first tokens are distinct). ``open_accuracy`` is also returned: argmax over the whole
  vocabulary equals the right answer's first token.
* ``majority_baseline``: always answering the most common *train* answer, on the same test questions.
* ``perplexity``: next-token perplexity of the language model on ``bivlm_kernels/data/text/eval`` (the GPL-3.0
  text), in non-overlapping windows; calibration uses different files.
* ``layer_errors``: ``||Q(x) - L(x)|| / ||L(x)||`` per quantized layer, with ``x`` the *full-precision* model's
  input to that layer (a local error, not the accumulated one).

``bivlm eval`` (``add_eval_arguments`` / ``run_eval``) prints one row per model, the fp32 testbed first.
"""
from __future__ import annotations

import collections
import math
import sys
import time
from typing import Dict, List, Optional

import torch
from torch import nn

from .models.hf_compat import cache_kwarg, output_cache


# ------------------------------------------------------------------------------------------------ VQA
def majority_baseline(limit: Optional[int] = None) -> dict:
    """Accuracy of always giving the most common train answer, on the first ``limit`` test questions."""
    from .models import testbed
    _, train_ans, _, _, _ = testbed.easy_vqa_split("train")
    _, test_ans, _, _, _ = testbed.easy_vqa_split("test")
    test_ans = test_ans[:limit] if limit else test_ans
    answer = collections.Counter(train_ans).most_common(1)[0][0]
    return {"answer": answer, "accuracy": sum(a == answer for a in test_ans) / len(test_ans), "n": len(test_ans)}


@torch.no_grad()
def last_token_logits(model, inputs: dict) -> torch.Tensor:
    """Logits ``[B, V]`` at each sequence's last real token (inputs right-padded), without computing the
    ``lm_head`` over every position."""
    from .models.token_pruning import map_positions
    mask = inputs["attention_mask"]
    out = model.model(**inputs)
    h = out.last_hidden_state
    last = map_positions(model, mask.sum(1) - 1)      # token pruning (if enabled) shortened the sequence
    return model.lm_head(h[torch.arange(h.shape[0]), last]).float()


@torch.no_grad()
def _answer_logits_shared_prefix(model, processor, questions: List[str], image_ids: List[int],
                                 pixel: Dict[int, torch.Tensor]) -> torch.Tensor:
    """Last-position logits ``[B, V]`` for a batch of questions, running each distinct image's prompt prefix
    (chat header + 16 image tokens, ~20 of ~36 tokens) once and reusing its KV cache for all its questions.
    Same result as the plain forward up to float rounding (``tests/test_testbed.py`` checks it)."""
    tok = processor.tokenizer
    prefix_ids = tok(processor.prefix(True))["input_ids"]
    suffixes = []
    for q in questions:
        ids = tok(processor.prompt(q))["input_ids"]
        if ids[:len(prefix_ids)] != prefix_ids:
            raise RuntimeError("prompt tokenization does not start with the prefix tokens; cannot share it")
        suffixes.append(ids[len(prefix_ids):])
    uniq = list(dict.fromkeys(image_ids))
    dtype = next(model.parameters()).dtype
    pre = torch.tensor([prefix_ids] * len(uniq))
    out = model.model(input_ids=pre, attention_mask=torch.ones_like(pre),
                      pixel_values=torch.stack([pixel[i] for i in uniq]).to(dtype), use_cache=True)
    cache = output_cache(out)
    cache.reorder_cache(torch.tensor([uniq.index(i) for i in image_ids]))      # one cache row per question
    width = max(len(s) for s in suffixes)
    pad = tok.pad_token_id
    suf = torch.tensor([s + [pad] * (width - len(s)) for s in suffixes])
    suf_mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in suffixes])
    mask = torch.cat([torch.ones(len(suffixes), len(prefix_ids), dtype=suf_mask.dtype), suf_mask], 1)
    lm = model.model.language_model
    h = lm(input_ids=suf, attention_mask=mask, use_cache=True, **{cache_kwarg(lm.forward): cache}).last_hidden_state
    return model.lm_head(h[torch.arange(len(suffixes)), suf_mask.sum(1) - 1]).float()


@torch.no_grad()
def vqa_accuracy(model, processor, limit: Optional[int] = None, batch_size: int = 32, split: str = "test",
                 progress: bool = False, share_prefix: bool = True) -> dict:
    """easy-VQA accuracy of ``model`` (the testbed VLM, possibly quantized) on the first ``limit`` questions.

    ``share_prefix`` runs each image's prompt prefix (~20 of ~36 tokens) once per batch; ``False`` runs
    every prompt in full. Returns ``{"accuracy", "open_accuracy", "n", "seconds", "per_answer": {answer:
    accuracy}, "predictions": [answer, ...]}``.
    """
    from .models import testbed
    qs, ans, img_ids, paths, answers = testbed.easy_vqa_split(split)
    if limit is not None:
        if limit <= 0:
            raise ValueError(f"limit must be positive, got {limit}")
        qs, ans, img_ids = qs[:limit], ans[:limit], img_ids[:limit]
    cand = torch.tensor([processor.tokenizer(a)["input_ids"][0] for a in answers])
    if len(set(cand.tolist())) != len(answers):
        raise RuntimeError("the answers' first tokens are not distinct; closed-set scoring would be ambiguous")
    model.eval()
    from .models.token_pruning import active_pruning
    if share_prefix and active_pruning(model) is not None:
        # a shared prefix would be pruned before the question is seen, and its cache is then reordered
        share_prefix = False
    pix_cache: Dict[int, torch.Tensor] = {}
    correct = open_correct = 0
    per = collections.defaultdict(lambda: [0, 0])
    predictions = []
    t0 = time.time()
    it = range(0, len(qs), batch_size)
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc="easy-VQA", unit="batch", file=sys.stderr)
    dtype = next(model.parameters()).dtype
    for s in it:
        idx = range(s, min(s + batch_size, len(qs)))
        for i in idx:                                   # each image is preprocessed once
            if img_ids[i] not in pix_cache:
                pix_cache[img_ids[i]] = processor.pixel_values([paths[img_ids[i]]])[0]
        if share_prefix:
            logits = _answer_logits_shared_prefix(model, processor, [qs[i] for i in idx],
                                                  [img_ids[i] for i in idx], pix_cache)
        else:
            enc = processor([processor.prompt(qs[i]) for i in idx])
            enc["pixel_values"] = torch.stack([pix_cache[img_ids[i]] for i in idx]).to(dtype)
            logits = last_token_logits(model, enc)
        pred = logits[:, cand].argmax(-1).tolist()
        top = logits.argmax(-1).tolist()
        for j, i in enumerate(idx):
            ok = answers[pred[j]] == ans[i]
            predictions.append(answers[pred[j]])
            correct += ok
            open_correct += top[j] == cand[answers.index(ans[i])].item()
            per[ans[i]][0] += ok
            per[ans[i]][1] += 1
    n = len(qs)
    return {"accuracy": correct / n, "open_accuracy": open_correct / n, "n": n, "seconds": time.time() - t0,
            "per_answer": {a: c / t for a, (c, t) in sorted(per.items())}, "predictions": predictions}


# ------------------------------------------------------------------------------------------------ perplexity
@torch.no_grad()
def perplexity(model, tokenizer, text: Optional[str] = None, window: int = 512, max_tokens: Optional[int] = None,
               batch_size: int = 4, progress: bool = False) -> dict:
    """Next-token perplexity of ``model``'s language model on ``text`` (default: the shipped eval text), in
    non-overlapping windows of ``window`` tokens (each window's first token is not predicted).

    Works for the testbed VLM (text-only inputs) and for a plain causal LM. Returns ``{"perplexity",
    "tokens", "seconds"}``.
    """
    from .models import testbed
    if text is None:
        text = testbed.read_text("eval")
    ids = tokenizer(text, return_tensors="pt")["input_ids"][0]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    n_win = len(ids) // window
    if n_win == 0:
        raise ValueError(f"text has {len(ids)} tokens, fewer than one window of {window}")
    wins = ids[:n_win * window].view(n_win, window)
    model.eval()
    nll, count, t0 = 0.0, 0, time.time()
    it = range(0, n_win, batch_size)
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc="perplexity", unit="batch", file=sys.stderr)
    for s in it:
        x = wins[s:s + batch_size]
        logits = model(input_ids=x, attention_mask=torch.ones_like(x)).logits.float()
        nll += torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                 x[:, 1:].reshape(-1), reduction="sum").item()
        count += x[:, 1:].numel()
    return {"perplexity": math.exp(nll / count), "tokens": count, "seconds": time.time() - t0}


# ------------------------------------------------------------------------------------------------ layers
def _quant_linear_cls():
    from .nn import QuantLinear
    return QuantLinear


@torch.no_grad()
def layer_errors(reference: nn.Module, quantized: nn.Module, inputs: List[dict]) -> List[dict]:
    """Relative output error ``||Q(x) - L(x)|| / ||L(x)||`` of every ``QuantLinear`` of ``quantized``, with ``x``
    the input that the same-named layer of ``reference`` (the unquantized model) receives on ``inputs``.

    Returns ``[{"name", "bits_per_weight", "rel_error"}]`` in module order.
    """
    QuantLinear = _quant_linear_cls()
    qmods = {n: m for n, m in quantized.named_modules() if isinstance(m, QuantLinear)}
    stats = {n: [0.0, 0.0] for n in qmods}
    handles = []
    for name, mod in reference.named_modules():
        if name in qmods:
            def hook(m, args, out, name=name):
                d = qmods[name](args[0]).float() - out.float()
                stats[name][0] += d.pow(2).sum().item()
                stats[name][1] += out.float().pow(2).sum().item()
            handles.append(mod.register_forward_hook(hook))
    try:
        reference.eval()
        for batch in inputs:
            reference(**batch)
    finally:
        for h in handles:
            h.remove()
    return [{"name": n, "bits_per_weight": qmods[n].weight_bits,
             "rel_error": math.sqrt(e / max(r, 1e-30))} for n, (e, r) in stats.items()]


COMPONENTS = {"vision": "model.vision_tower.", "projector": "model.multi_modal_projector.",
              "lm": "model.language_model."}


def component_of(name: str) -> str:
    for comp, prefix in COMPONENTS.items():
        if name.startswith(prefix):
            return comp
    return "lm_head" if name.startswith("lm_head") else "other"


def bits_summary(model: nn.Module) -> dict:
    """Honest storage of the linear layers' weights: ``quantized_bpw`` averages ``QuantLinear.weight_bits``
    over the quantized layers weighted by their size (N*K); ``quantized_bpw_fp16`` is the same layout with
    fp16 tables (what an fp16 model stores; the fp32 testbed stores fp32 tables); ``linear_bpw`` also counts the
    layers left in floating point at their dtype's width (the tied ``lm_head`` included; embeddings and norms
    excluded)."""
    QuantLinear = _quant_linear_cls()
    q_bits = q_w = f_bits = f_w = q16_bits = 0.0
    comps = collections.Counter()
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            n = m.in_features * m.out_features
            q_bits += m.weight_bits * n
            q16_bits += m.spec.bits_per_weight(torch.float16) * n
            q_w += n
            comps[component_of(name)] += 1
        elif isinstance(m, nn.Linear):
            f_bits += m.weight.numel() * m.weight.element_size() * 8
            f_w += m.weight.numel()
    return {"quantized_bpw": q_bits / q_w if q_w else None, "quantized_weights": int(q_w),
            "quantized_bpw_fp16": q16_bits / q_w if q_w else None,
            "linear_bpw": (q_bits + f_bits) / (q_w + f_w), "quantized_fraction": q_w / (q_w + f_w),
            "quantized_layers": dict(comps)}


def rtn_filter(scope: str):
    """``filter_fn`` for ``quantize_linears_``: which components get RTN. ``lm_head`` (tied to the input
    embedding) stays in floating point in every scope, as usual in weight-only PTQ."""
    allowed = {"lm": {"lm"}, "vision": {"vision"}, "projector": {"projector"},
               "all": {"lm", "vision", "projector"}}[scope]
    return lambda name, m: component_of(name) in allowed
