"""Token pruning on the real testbed VLM (DINOv2-S + SmolLM2-135M, LLaVA-style): easy-VQA accuracy versus keep
ratio, per criterion, image- versus text-token pruning, for fp32 and quantized language models, plus the
measured prefill time. Writes ``benchmarks/results/pruning_testbed.md``.

    python python/pruning_table.py --limit 200 --batch-size 32 --threads 1 --timing-runs 5   # the recorded grid
                                                                  # (fp32, gptq4, bivlm2; ~24 min, shared 2 cores)
    python python/pruning_table.py --limit 16 --models fp32 --criteria norm --out /tmp/t.md   # smoke run

Accuracy is the testbed's closed-set metric (``bivlm_kernels.evaluation.vqa_accuracy``): of the 13 answers'
first tokens, the highest logit at the prompt's last position must be the right one; the fp32 unpruned number is
cross-checked against ``vqa_accuracy`` itself. The testbed prompt has 16 ``<image>`` tokens, so ratios round
(``bivlm_kernels.models.token_pruning.keep_count_for``: 50/25/10/5 % -> 8/4/2/1 tokens); the tables give the kept counts.
Text pruning ranks every prompt token but the last (chat-template tokens included) and keeps the same ratio.

Quantized models (language-model linears only; lm_head, vision tower and projector stay fp32; group size 64
because SmolLM2's hidden size 576 is not a multiple of 128): ``rtnB`` via ``bivlm_kernels.nn.quantize_linears_``
(no calibration), ``gptqB`` / ``billmB`` / ``bivlmB`` via ``bivlm_kernels.quant.quantize_model`` on the testbed's
calibration data (``--n-calib`` samples, mix 0.5, seed 0). Accuracy runs
on the dequantized weights (same function as the packed layers' reference kernel, ~4x faster on the CPU).

Prefill time: one question (batch 1), image features precomputed (the vision tower is not affected by pruning),
so it is the language model's prefill incl. embeddings and the lm_head at the last position; wall clock on the
CPU, median of ``--timing-runs`` after a warm-up.
"""
import argparse
import copy
import datetime
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bivlm_kernels.models.token_pruning import CRITERIA, enable_token_pruning, keep_count_for  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--limit", type=int, default=200, help="easy-VQA test questions (the first N; default 200)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--ratios", default="1,0.5,0.25,0.1,0.05", help="keep ratios, comma-separated")
    p.add_argument("--criteria", default=",".join(CRITERIA), help=f"comma-separated subset of {CRITERIA}")
    p.add_argument("--text-criteria", default="attention,random",
                   help="criteria for the text-token ablation (empty: skip it)")
    p.add_argument("--models", default="fp32,gptq4,bivlm2",
                   help="fp32, rtnB (RTN without calibration, B in 1/2/4), or METHODB with METHOD one of "
                        "gptq/billm/bivlm/rtn-calibrated via the quantizer (e.g. gptq4, bivlm2, bivlm1)")
    p.add_argument("--n-calib", type=int, default=32, help="calibration samples for quantizer models")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--layer", type=int, default=2, help="first decoder layer that sees the pruned sequence")
    p.add_argument("--timing-runs", type=int, default=7)
    p.add_argument("--timing-criteria", default="attention,norm")
    p.add_argument("--time-models", default="fp32", help="models whose prefill is timed (packed QuantLinear for "
                   "rtnB: its CPU reference kernel dequantizes every call, so it is slow)")
    p.add_argument("--no-cross-check", dest="cross_check", action="store_false",
                   help="skip re-running fp32 through bivlm_kernels.evaluation.vqa_accuracy")
    p.add_argument("--projector", default=None, metavar="PATH",
                   help="projector weights to load instead of the shipped models/data/projector.safetensors")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "pruning_testbed.md"))
    return p.parse_args()


def csv(s, cast=str):
    return [cast(x) for x in s.split(",") if x.strip()]


def dense_copy(model):
    """``model`` with every QuantLinear replaced by an ``nn.Linear`` holding its dequantized weight: the same
    function as the reference kernel (dequantize, then matmul) without re-dequantizing on every call, which
    makes the accuracy sweep ~4x faster on the CPU."""
    from bivlm_kernels.nn import QuantLinear
    m = copy.deepcopy(model)
    for name, mod in list(m.named_modules()):
        if isinstance(mod, QuantLinear):
            lin = torch.nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None)
            with torch.no_grad():
                lin.weight.copy_(mod.dequantize().float())
                if mod.bias is not None:
                    lin.bias.copy_(mod.bias.float())
            parent, _, child = name.rpartition(".")
            setattr(m.get_submodule(parent), child, lin)
    return m


def build_models(names, group_size, projector=None, n_calib=32):
    """{name: (model used for accuracy, packed model, description)}."""
    from bivlm_kernels.models import testbed
    from bivlm_kernels.nn import QuantLinear, quantize_linears_
    vlm, proc = testbed.load_testbed(projector=projector is None)
    if projector is not None:
        testbed.load_projector(vlm, projector)
    out, calib = {}, None
    for name in names:
        if name == "fp32":
            out[name] = (vlm, vlm, "fp32 (Q4_1-source SmolLM2, see testbed)")
            continue
        method = name.rstrip("0123456789")
        bits = name[len(method):]
        if method not in ("rtn", "gptq", "billm", "bivlm") or bits not in ("1", "2", "4"):
            raise SystemExit(f"--models: unknown model {name!r} (fp32, or rtn/gptq/billm/bivlm + 1/2/4 bits)")
        bits = int(bits)
        m = copy.deepcopy(vlm)
        if method == "rtn":
            quantize_linears_(m, bits, group_size, filter_fn=lambda n, mod: n.startswith("model.language_model."))
            how = f"RTN {bits}-bit g{group_size} (`quantize_linears_`, no calibration)"
        else:
            from bivlm_kernels.quant import QuantConfig, quantize_model
            if calib is None:
                calib = testbed.calibration_data(proc, n_calib, mix=0.5, seed=0)
            cfg = QuantConfig.from_method(method, bits=bits, group_size=group_size, components="language")
            m, _ = quantize_model(m, cfg, calib, progress=False)
            how = (f"{method} {bits}-bit g{group_size} (`quantize_model`, {n_calib} calibration samples, "
                   f"mix 0.5, seed 0)")
        ql = [mod for mod in m.modules() if isinstance(mod, QuantLinear)]
        n_w = sum(q.in_features * q.out_features for q in ql)
        bpw = sum(q.weight_bits * q.in_features * q.out_features for q in ql) / max(n_w, 1)
        out[name] = (dense_copy(m), m, f"{how}, {len(ql)} language-model linears, {bpw:.2f} honest bits/weight "
                     f"over them; accuracy on the dequantized weights, timing on the packed QuantLinear model")
    return out, proc


def make_batches(proc, limit, batch_size, image=True):
    """Encoded test questions (right-padded), with the first answer token as target; ``image=False``: the same
    questions without the image (no ``<image>`` tokens), the how-much-does-the-image-matter control."""
    from bivlm_kernels.models import testbed
    qs, ans, img_ids, paths, answers = testbed.easy_vqa_split("test")
    n = min(limit, len(qs)) if limit else len(qs)
    first_tok = {a: proc.tokenizer(a)["input_ids"][0] for a in answers}
    batches = []
    for i in range(0, n, batch_size):
        idx = range(i, min(i + batch_size, n))
        enc = proc([proc.prompt(qs[j], image=image) for j in idx],
                   [paths[img_ids[j]] for j in idx] if image else None)
        enc["target"] = torch.tensor([first_tok[ans[j]] for j in idx])
        batches.append(enc)
    cand = torch.tensor([first_tok[a] for a in answers])
    return batches, cand


@torch.no_grad()
def image_outputs(model, enc):
    cfg = model.config
    return model.model.get_image_features(pixel_values=enc["pixel_values"].to(model.dtype),
                                          vision_feature_layer=cfg.vision_feature_layer,
                                          vision_feature_select_strategy=cfg.vision_feature_select_strategy,
                                          return_dict=True)


@torch.no_grad()
def last_logits(model, enc, feats, handle):
    """Logits at each prompt's last real position (mapped through the pruning when active)."""
    out = model.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                      mm_encoder_outputs=None if feats is None else {"image": feats})
    last = enc["attention_mask"].sum(1) - 1
    idx = handle.last.index_of(last) if handle is not None else last
    h = out.last_hidden_state[torch.arange(len(last)), idx]
    return model.lm_head(h)


def accuracy(model, batches, feats, cand_tok, prune):
    """(closed-set accuracy over the 13 answers, open-vocabulary accuracy, mean kept, mean candidates)."""
    correct = open_ok = n = 0
    kept, cand = [], []
    for enc, f in zip(batches, feats or [None] * len(batches)):
        if prune is None:
            logits = last_logits(model, enc, f, None)
        else:
            with enable_token_pruning(model, **prune) as h:
                logits = last_logits(model, enc, f, h)
            kept += h.last.kept
            cand += h.last.candidates
        pred = cand_tok[logits[:, cand_tok].argmax(-1)]
        correct += int((pred == enc["target"]).sum())
        open_ok += int((logits.argmax(-1) == enc["target"]).sum())
        n += len(enc["target"])
    return (correct / n, open_ok / n, statistics.mean(kept) if kept else None,
            statistics.mean(cand) if cand else None)


@torch.no_grad()
def prefill_time(model, enc, feats, prune, runs):
    """Median wall-clock ms of one prompt's prefill (batch 1, last-position logits only)."""
    one = {k: v[:1] for k, v in enc.items() if k in ("input_ids", "attention_mask")}
    f1 = copy.copy(feats)
    f1.pooler_output = feats.pooler_output[:1]
    h = enable_token_pruning(model, **prune) if prune else None
    try:
        ts = []
        for _ in range(runs + 1):
            t0 = time.perf_counter()
            model(**one, mm_encoder_outputs={"image": f1}, logits_to_keep=1)
            ts.append(time.perf_counter() - t0)
    finally:
        if h is not None:
            h.remove()
    return statistics.median(ts[1:]) * 1e3


def main():
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ratios = csv(args.ratios, float)
    for r in ratios:
        if not 0 < r <= 1:
            raise SystemExit(f"--ratios: each ratio must be in (0, 1], got {r}")
    pruned = [r for r in ratios if r != 1.0]
    criteria, text_criteria = csv(args.criteria), csv(args.text_criteria)
    for c in criteria + text_criteria + csv(args.timing_criteria):
        if c not in CRITERIA:
            raise SystemExit(f"unknown criterion {c!r}; choose from {CRITERIA}")
    t_start = time.time()
    models, proc = build_models(csv(args.models), args.group_size, args.projector, args.n_calib)
    batches, cand_tok = make_batches(proc, args.limit, args.batch_size)
    fp = next(iter(models.values()))[0]
    t0 = time.perf_counter()
    feats = [image_outputs(fp, enc) for enc in batches]         # vision tower + projector stay fp32
    n_q = sum(len(e["target"]) for e in batches)
    vision_ms = (time.perf_counter() - t0) * 1e3 / n_q
    text_only, _ = make_batches(proc, args.limit, args.batch_size, image=False)
    n_img = int((batches[0]["input_ids"][0] == proc.image_token_id).sum())
    seq = int(batches[0]["attention_mask"][0].sum())

    from bivlm_kernels.evaluation import majority_baseline
    majority = majority_baseline(n_q)["accuracy"]
    acc, times, ev = {}, {}, None     # acc: (model, target, criterion, ratio) -> (closed, open, kept, cand)

    def write(status):
        """(Re)write the markdown with what has been measured so far (a partial run keeps its numbers)."""
        import transformers
        cmd = "python python/pruning_table.py " + " ".join(sys.argv[1:])

        def pct(key):                      # a cell, "-" while not measured yet
            return f"{100 * acc[key][0]:.1f}" if key in acc else "-"

        L = ["# Token pruning on the testbed VLM (easy-VQA)\n",
             f"- status: {status}",
             f"- command: `{cmd}`",
             f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; torch {torch.__version__}, "
             f"transformers {transformers.__version__}; CPU only ({platform.machine()}, {torch.get_num_threads()} "
             f"torch threads, {os.cpu_count()} cores shared with other jobs); run took "
             f"{(time.time() - t_start) / 60:.1f} min",
             f"- model: testbed LLaVA (DINOv2-S + SmolLM2-135M, 30 decoder layers); {n_img} `<image>` tokens in a "
             f"{seq}-token prompt (first question); tokens pruned before decoder layer {args.layer} "
             f"(`bivlm_kernels.models.token_pruning.enable_token_pruning(model, layer={args.layer}, keep=r, criterion=c, target=t)`)",
             f"- projector: {args.projector or 'the shipped bivlm_kernels/models/data/projector.safetensors'}",
             f"- data: first {n_q} easy-VQA test questions. Accuracy = the testbed's closed-set metric (of the 13 "
             f"answers' first tokens, the highest logit at the prompt's last position is the right one); "
             f"open-vocabulary accuracy (argmax over the whole vocabulary) in the log only"]
        for mname, (_, _, desc) in models.items():
            L.append(f"- `{mname}`: {desc}")
        if isinstance(ev, dict):
            L.append(f"- cross-check: `bivlm_kernels.evaluation.vqa_accuracy(share_prefix=False)`, fp32 unpruned, same "
                     f"questions: {100 * ev['accuracy']:.1f}% (this script: {pct(('fp32', '-', '-', 1.0))}%)")
        elif ev:
            L.append(f"- cross-check with bivlm_kernels.evaluation: {ev}")
        L.append("")

        head = "".join(f" {100 * r:g}% ({keep_count_for(n_img, r)}/{n_img}) |" for r in pruned)
        L += ["## Accuracy (%) versus kept image tokens (kept/total per question)\n",
              f"Controls on the same questions: majority answer {100 * majority:.1f}%; without the image (text-only "
              "prompt): " + ", ".join(f"{m} {pct((m, 'no image', '-', 1.0))}%" for m in models) + ".\n",
              f"| model | criterion | 100% ({n_img}/{n_img}) |{head}", "|---|---|" + "---|" * (len(pruned) + 1)]
        for mname in models:
            base = pct((mname, "-", "-", 1.0))
            for crit in criteria:
                cells = [pct((mname, "image", crit, r)) for r in pruned]
                L.append(f"| {mname} | {crit} | {base} | " + " | ".join(cells) + " |")
        if text_criteria:
            L += ["\n## Ablation: pruning text tokens instead (accuracy %, mean kept/prunable text tokens)\n",
                  "| model | criterion | 100% | " + " | ".join(f"{100 * r:g}%" for r in pruned) + " |",
                  "|---|---|" + "---|" * (len(pruned) + 1)]
            for mname in models:
                base = pct((mname, "-", "-", 1.0))
                for crit in text_criteria:
                    keys = [(mname, "text", crit, r) for r in pruned]
                    cells = [f"{pct(k)} ({acc[k][2]:.1f}/{acc[k][3]:.1f})" if k in acc else "-" for k in keys]
                    L.append(f"| {mname} | {crit} | {base} | " + " | ".join(cells) + " |")
        if times:
            L += [f"\n## Prefill time (ms; batch 1; CPU wall clock, median of {args.timing_runs} after a warm-up; "
                  f"image features precomputed: the vision tower took {vision_ms:.0f} ms/image, batched)\n",
                  "| model | criterion | 100% | " + " | ".join(f"{100 * r:g}%" for r in pruned) + " |",
                  "|---|---|" + "---|" * (len(pruned) + 1)]
            for mname in csv(args.time_models):
                if (mname, "-", 1.0) not in times:
                    continue
                base = times[(mname, "-", 1.0)]
                for crit in csv(args.timing_criteria):
                    cells = [f"{times[(mname, crit, r)]:.0f} ({base / times[(mname, crit, r)]:.2f}x)" for r in pruned]
                    L.append(f"| {mname} | {crit} | {base:.0f} | " + " | ".join(cells) + " |")
            L.append(f"\nThe {n_img} image tokens are {100 * n_img / seq:.0f}% of this prompt, which bounds the saving "
                     "here; the machine was shared, so the times are noisy. LLaVA-1.5 (576 image tokens of ~600) "
                     "is where pruning pays.")
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write("\n".join(L) + "\n")

    # ---- prefill time first (short), then the cross-check, then the accuracy sweep, model by model
    for mname in csv(args.time_models):
        if mname not in models:
            continue
        packed = models[mname][1]
        times[(mname, "-", 1.0)] = prefill_time(packed, batches[0], feats[0], None, args.timing_runs)
        for crit in csv(args.timing_criteria):
            for r in pruned:
                prune = dict(layer=args.layer, keep=r, criterion=crit)
                times[(mname, crit, r)] = prefill_time(packed, batches[0], feats[0], prune, args.timing_runs)
        print(f"{mname}: prefill timed", flush=True)
    if "fp32" in models and args.cross_check:
        try:
            from bivlm_kernels import evaluation
            ev = evaluation.vqa_accuracy(models["fp32"][0], proc, limit=n_q, share_prefix=False)
        except Exception as err:                   # optional; say why it is missing
            ev = f"not run ({type(err).__name__}: {err})"
    for mname, (model, _, _) in models.items():
        acc[(mname, "-", "-", 1.0)] = accuracy(model, batches, feats, cand_tok, None)
        acc[(mname, "no image", "-", 1.0)] = accuracy(model, text_only, None, cand_tok, None)
        print(f"{mname}: unpruned {100 * acc[(mname, '-', '-', 1.0)][0]:.1f}%", flush=True)
        for target, crits in (("image", criteria), ("text", text_criteria)):
            for crit in crits:
                for r in pruned:
                    prune = dict(layer=args.layer, keep=r, criterion=crit, target=target)
                    acc[(mname, target, crit, r)] = res = accuracy(model, batches, feats, cand_tok, prune)
                    print(f"{mname} {target:5s} {crit:10s} keep {r:.2f}: {100 * res[0]:.1f}% "
                          f"(open {100 * res[1]:.1f}%, kept {res[2]:.1f}/{res[3]:.1f})", flush=True)
                    write("partial: the run was still going when this was written")
    write("complete")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
