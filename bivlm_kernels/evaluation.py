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

import argparse
import collections
import copy
import math
import os
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


# ------------------------------------------------------------------------------------------------ CLI
def add_eval_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of ``bivlm eval``."""
    parser.add_argument("--model", metavar="PATH", default=None,
                        help="quantized testbed checkpoint: a directory from bivlm_kernels.save_quantized (bivlm "
                        "quantize --out) or a .safetensors file from bivlm_kernels.checkpoint.save; omit for fp32")
    parser.add_argument("--rtn-bits", type=int, choices=(1, 2, 4), default=None,
                        help="evaluate a calibration-free RTN variant (QuantLinear.from_linear) at these bits")
    parser.add_argument("--rtn-scope", choices=("lm", "vision", "projector", "all"), default="lm",
                        help="components quantized by --rtn-bits (default: lm; lm_head always stays fp)")
    parser.add_argument("--group-size", type=int, default=64,
                        help="group size for --rtn-bits (must divide 384 and 576 to cover every layer; default 64)")
    parser.add_argument("--limit", type=int, default=None, metavar="N",
                        help="first N easy-VQA test questions (default: all 9,673)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--ppl-tokens", type=int, default=None, metavar="T",
                        help="first T tokens of the perplexity text (default: all, about 8k)")
    parser.add_argument("--no-ppl", action="store_true", help="skip perplexity")
    parser.add_argument("--no-fp32", action="store_true", help="skip the fp32 reference row")
    parser.add_argument("--layer-errors", type=int, default=0, metavar="K",
                        help="also print the K quantized layers with the largest relative output error")
    parser.add_argument("--prune-keep", type=float, default=None, metavar="R",
                        help="token pruning (bivlm_kernels.models.token_pruning) during easy-VQA: keep this fraction of the "
                        "image tokens, in (0, 1] (default: no pruning)")
    parser.add_argument("--prune-layer", type=int, default=2,
                        help="first decoder layer that sees the pruned sequence (default 2)")
    parser.add_argument("--prune-criterion", choices=("attention", "norm", "similarity", "random"),
                        default="attention", help="ranking of the tokens to keep (default attention)")
    parser.add_argument("--prune-target", choices=("image", "text"), default="image",
                        help="prune image tokens (default) or, as an ablation, text tokens")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (bivlm -q implies it)")
    parser.add_argument("--cache-dir", default=None, help="where the converted DINOv2 is cached "
                        "(default $BIVLM_CACHE or ~/.cache/bivlm_kernels)")
    return parser


def _evaluate_row(label, model, proc, args, out) -> dict:
    row = {"label": label, **bits_summary(model)}
    progress = not getattr(args, "no_progress", False)
    pruning = None
    if getattr(args, "prune_keep", None) is not None:
        from .models.token_pruning import enable_token_pruning
        pruning = enable_token_pruning(model, layer=args.prune_layer, keep=args.prune_keep,
                                       criterion=args.prune_criterion, target=args.prune_target)
    try:                                      # pruning only during VQA: perplexity reads every position
        acc = vqa_accuracy(model, proc, limit=args.limit, batch_size=args.batch_size, progress=progress)
    finally:
        if pruning is not None:
            pruning.remove()
    row.update(accuracy=acc["accuracy"], open_accuracy=acc["open_accuracy"], n=acc["n"])
    if pruning is not None and pruning.records:
        kept = sum(sum(r.kept) for r in pruning.records) / sum(len(r.kept) for r in pruning.records)
        cand = sum(sum(r.candidates) for r in pruning.records) / sum(len(r.kept) for r in pruning.records)
        row.update(prune_kept=kept, prune_candidates=cand)
    if not args.no_ppl:
        row["perplexity"] = perplexity(model, proc.tokenizer, max_tokens=args.ppl_tokens,
                                       progress=progress)["perplexity"]
    q = row["quantized_bpw"]
    print(f"== {label} ==", file=out)
    if q is None:
        print(f"bits/weight: {row['linear_bpw']:.2f} (no quantized layers)", file=out)
    else:
        print(f"bits/weight: {q:.3f} over the quantized layers {row['quantized_layers']} "
              f"({100 * row['quantized_fraction']:.1f}% of linear weights; {row['linear_bpw']:.2f} over all "
              f"linear weights)", file=out)
    print(f"accuracy: {100 * row['accuracy']:.1f}% ({row['n']} easy-VQA test questions; open-vocabulary "
          f"{100 * row['open_accuracy']:.1f}%)", file=out)
    if "prune_kept" in row:
        print(f"token pruning: {args.prune_target} tokens kept {row['prune_kept']:.1f} of "
              f"{row['prune_candidates']:.1f} per question (layer {args.prune_layer}, {args.prune_criterion})",
              file=out)
    if "perplexity" in row:
        print(f"perplexity: {row['perplexity']:.3f}", file=out)
    out.flush()
    return row


def run_eval(args, out=None) -> int:
    """``bivlm eval``: the fp32 testbed row, then the quantized model (``--model`` or ``--rtn-bits``) if given.
    Returns the exit status."""
    out = out or sys.stdout
    if args.model and args.rtn_bits:
        print("error: give --model or --rtn-bits, not both", file=sys.stderr)
        return 2
    if args.limit is not None and args.limit <= 0:
        print(f"error: --limit must be positive, got {args.limit}", file=sys.stderr)
        return 2
    if getattr(args, "prune_keep", None) is not None and not 0.0 < args.prune_keep <= 1.0:
        print(f"error: --prune-keep must be in (0, 1], got {args.prune_keep}", file=sys.stderr)
        return 2
    from .models import testbed
    missing = testbed.missing_packages()
    if missing:
        print(f"error: the testbed needs {missing}; install with:\n  {testbed.PIP_DEPS}\n  {testbed.PIP_WHEELS}",
              file=sys.stderr)
        return 1
    ref, proc = testbed.load_testbed(cache_dir=args.cache_dir)
    base = majority_baseline(args.limit)
    print(f"easy-VQA majority baseline (always {base['answer']!r}): {100 * base['accuracy']:.1f}% "
          f"on {base['n']} questions", file=out)
    rows = []
    if not args.no_fp32 or not (args.model or args.rtn_bits):
        rows.append(_evaluate_row("fp32 testbed (SmolLM2 Q4_1 source)", ref, proc, args, out))
    quant = None
    if args.model:
        try:
            if os.path.isdir(args.model):       # a directory written by bivlm_kernels.save_quantized
                from . import load_quantized
                quant = load_quantized(args.model)
            else:                               # a single .safetensors written by bivlm_kernels.checkpoint.save
                from . import checkpoint
                quant = checkpoint.load(copy.deepcopy(ref), args.model)
        except (ValueError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        label = f"checkpoint {args.model}"
    elif args.rtn_bits:
        from .nn import quantize_linears_
        quant = copy.deepcopy(ref)
        try:
            done = quantize_linears_(quant, args.rtn_bits, args.group_size, filter_fn=rtn_filter(args.rtn_scope))
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if not done:
            print(f"error: no layer of scope {args.rtn_scope!r} has in_features divisible by "
                  f"--group-size {args.group_size}", file=sys.stderr)
            return 2
        label = f"RTN {args.rtn_bits}-bit, {args.rtn_scope}, group {args.group_size}"
    if quant is not None:
        rows.append(_evaluate_row(label, quant, proc, args, out))
        if args.layer_errors:
            calib = testbed.calibration_data(proc, 8, mix=0.5, seed=1)
            errs = sorted(layer_errors(ref, quant, calib), key=lambda r: -r["rel_error"])
            print(f"largest relative output errors (8 calibration samples):", file=out)
            for r in errs[:args.layer_errors]:
                print(f"  {r['name']:60s} {r['bits_per_weight']:.3f} b/w  {r['rel_error']:.4f}", file=out)
    print("\n| model | bits/weight (quantized layers) | easy-VQA accuracy | perplexity |", file=out)
    print("|---|---|---|---|", file=out)
    for r in rows:
        bpw = "32 (fp32)" if r["quantized_bpw"] is None else f"{r['quantized_bpw']:.3f}"
        ppl = f"{r['perplexity']:.3f}" if "perplexity" in r else "-"
        print(f"| {r['label']} | {bpw} | {100 * r['accuracy']:.1f}% | {ppl} |", file=out)
    return 0


def main(argv=None) -> int:
    """``python -m bivlm_kernels.evaluation`` (same options as ``bivlm eval``)."""
    p = add_eval_arguments(argparse.ArgumentParser(prog="bivlm eval", description=__doc__,
                                                   formatter_class=argparse.RawDescriptionHelpFormatter))
    return run_eval(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
