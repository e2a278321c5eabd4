"""LUQ on the real testbed VLM (DINOv2-S + SmolLM2-135M, LLaVA-style): easy-VQA accuracy and SmolLM2 perplexity
versus average honest bits, for LUQ at several k (the k lowest-entropy decoder layers at ultra-low bits, the rest
at 4 bits), uniform 4-bit (k = 0) and uniform ultra-low (k = 30). Writes ``benchmarks/results/luq_testbed.md``.

    python python/luq_table.py --limit 200                                    # default grid
    python python/luq_table.py --limit 16 --ks 0,30 --n-calib 8 --out /tmp/t.md   # smoke run

What it does:

1. Entropy: ``bivlm_kernels.quant.luq.layer_entropies`` on ``--n-entropy`` image+text calibration samples (easy-VQA
   *train*), K-means K=100, seed 42, n_init 10 at ``input_layernorm`` (the paper's settings); the histogram
   estimator runs beside it and the table gives the rank correlation of the two.
2. ``swap`` assembly (the authors' scripts): the language model quantized twice, all ``--high-method`` and all
   ``--low-method``, on ``--n-calib`` calibration samples with image share ``--mix``; each k is assembled from
   the two in place (``SwapPair``), so every row costs one evaluation, no re-quantization.
3. Per model: easy-VQA accuracy on the first ``--limit`` test questions (``bivlm_kernels.evaluation.vqa_accuracy``,
   closed-set over the 13 answers) and perplexity on the shipped eval text (``evaluation.perplexity``, first
   ``--ppl-tokens`` tokens, windows of ``--ppl-window``). ``--reverse-ks``: the same k with the *highest*-entropy
   layers at low bits (the paper's ablation).

Bits: over the LLM decoder Linear weights (vision tower, projector, embeddings, lm_head excluded, as in LUQ).
The testbed runs in fp32 on the CPU, so the quantizer stores fp32 codebooks/scales; "honest" is what the model
holds, "honest@fp16" the same layout with fp16 tables (``LayerSpec.bits_per_weight(float16)``), "nominal" the code
bits only. SmolLM2 is the Q4_1-dequantized model ("Q4_1 source"); its hidden size 576 takes group size 64.
"""
import argparse
import copy
import datetime
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--limit", type=int, default=200, help="easy-VQA test questions (the first N; default 200)")
    p.add_argument("--ks", default="0,5,10,15,20,25,30", help="numbers of ultra-low layers, comma-separated")
    p.add_argument("--reverse-ks", default="", help="k values also run highest-entropy-first (ablation)")
    p.add_argument("--low-method", default="billm")
    p.add_argument("--low-bits", type=int, default=None, help="default: the low method's own (BiLLM: 2-bit lut)")
    p.add_argument("--high-method", default="gptq")
    p.add_argument("--high-bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64, help="64: SmolLM2's 576 is not a multiple of 128")
    p.add_argument("--n-calib", type=int, default=32, help="PTQ calibration samples (default 32, ours)")
    p.add_argument("--mix", type=float, default=0.5, help="share of image+text calibration samples (LUQ alpha)")
    p.add_argument("--n-entropy", type=int, default=100, help="image+text samples for the entropy pass "
                   "(100 as the authors' script)")
    p.add_argument("--no-histogram", action="store_true", help="skip the histogram-estimator comparison")
    p.add_argument("--ppl-tokens", type=int, default=4096, help="eval-text tokens for perplexity (0: all)")
    p.add_argument("--ppl-window", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--projector", default=None, help="projector weights (default: the shipped "
                   "bivlm_kernels/models/data/projector.safetensors)")
    p.add_argument("--untrained-projector", action="store_true",
                   help="smoke test of the script before the projector is trained (accuracy meaningless)")
    p.add_argument("--json", default=None, help="also write the raw results as JSON here")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "luq_testbed.md"))
    return p.parse_args()


def csv(s):
    return [int(x) for x in s.split(",") if x.strip()]


def kendall_tau(a, b):
    n, s = len(a), 0
    for i in range(n):
        for j in range(i + 1, n):
            s += ((a[i] - a[j]) * (b[i] - b[j]) > 0) - ((a[i] - a[j]) * (b[i] - b[j]) < 0)
    return s / (n * (n - 1) / 2)


def main():
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from bivlm_kernels import evaluation
    from bivlm_kernels.models import testbed
    from bivlm_kernels.quant import luq
    t_all = time.time()

    model, proc = testbed.load_testbed(projector=False)
    proj_meta = None
    if not args.untrained_projector:
        proj_meta = testbed.load_projector(model, args.projector or testbed.PROJECTOR_PATH)
    names, _ = luq.decoder_layers(model)
    L = len(names)
    ks = csv(args.ks)
    rks = csv(args.reverse_ks)
    bad = [k for k in ks + rks if not 0 <= k <= L]
    if bad:
        raise SystemExit(f"--ks / --reverse-ks values {bad} out of range 0..{L}")

    def evaluate(m):
        acc = evaluation.vqa_accuracy(m, proc, limit=args.limit, batch_size=args.batch_size)
        ppl = evaluation.perplexity(m, proc.tokenizer, window=args.ppl_window,
                                    max_tokens=args.ppl_tokens or None)
        return {"accuracy": acc["accuracy"], "open_accuracy": acc["open_accuracy"], "n": acc["n"],
                "perplexity": ppl["perplexity"], "ppl_tokens": ppl["tokens"]}

    # ---- fp32 reference
    t0 = time.time()
    ref = evaluate(model)
    print(f"fp32: {ref} ({time.time() - t0:.0f} s)", flush=True)

    # ---- entropy
    ent_data = testbed.calibration_data(proc, n=args.n_entropy, mix=1.0, seed=1)
    t0 = time.time()
    ent = luq.layer_entropies(model, ent_data)              # the paper's defaults
    t_km = time.time() - t0
    t0 = time.time()
    ent_h = None if args.no_histogram else luq.layer_entropies(model, ent_data, estimator="histogram")
    t_h = time.time() - t0
    tau = float("nan") if ent_h is None else kendall_tau(ent.entropies, ent_h.entropies)
    print(ent.table(), flush=True)
    print(f"k-means {t_km:.0f} s, histogram {t_h:.0f} s, Kendall tau {tau:.3f}", flush=True)

    # ---- both uniform quantizations (swap assembly)
    from bivlm_kernels.quant import ComponentConfig
    calib = luq.mix_calibration(testbed.calibration_data(proc, n=args.n_calib, mix=args.mix, seed=0), args.mix)
    low = ComponentConfig(args.low_method, bits=args.low_bits, group_size=args.group_size)
    high = ComponentConfig(args.high_method, bits=args.high_bits, group_size=args.group_size)
    t0 = time.time()
    pair = luq.SwapPair.quantize(model, calib, low, high, names=names)
    t_q = time.time() - t0
    print(f"quantized both ({t_q:.0f} s)", flush=True)

    def write(rows, final):
        cmd = "python python/luq_table.py " + " ".join(sys.argv[1:])
        lines = [
            "# LUQ on the testbed VLM (DINOv2-S + SmolLM2-135M, Q4_1 source)", "",
            f"- command: `{cmd}`",
            f"- date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; torch "
            f"{torch.__version__}; CPU ({platform.processor() or platform.machine()}, "
            f"{torch.get_num_threads()} threads)",
            *(["- **SMOKE TEST: untrained projector, accuracy meaningless**"] if args.untrained_projector else
              [f"- projector: `{args.projector or 'shipped'}` (metadata: {proj_meta})"]),
            f"- low: `{args.low_method}` (bits {args.low_bits or 'method default'}); high: `{args.high_method}` "
            f"{args.high_bits}-bit; group size {args.group_size}; swap assembly; PTQ calibration {len(calib)} samples "
            f"({sum(s.get('pixel_values') is not None for s in calib)} image+text, the rest text-only; mix "
            f"{args.mix}); quantizing both took {t_q:.0f} s",
            f"- easy-VQA: first {args.limit} test questions, closed-set over the 13 answers (open = argmax over the "
            f"vocabulary); perplexity: first {rows[0]['ppl_tokens'] if rows else '?'} predicted tokens of the "
            f"eval text, windows of {args.ppl_window}",
            f"- bits over the {L} decoder layers' Linear weights only. honest = buffers as stored (fp32 tables: the "
            f"testbed runs in fp32); honest@fp16 = the same layout with fp16 tables; nominal = code bits", "",
            "| model | k low | bits honest | honest@fp16 | nominal | easy-VQA acc | open acc | perplexity |",
            "|---|---|---|---|---|---|---|---|",
            f"| fp32 | – | 32 | 16 | 32 | {ref['accuracy']:.3f} | {ref['open_accuracy']:.3f} | "
            f"{ref['perplexity']:.2f} |",
        ]
        for r in rows:
            label = ("uniform " + (f"{args.high_method} {args.high_bits}-bit" if r["k"] == 0 else
                                   f"{args.low_method} {args.low_bits or 'default'}-bit")) if r["k"] in (0, L) else \
                f"LUQ ({r['first']}-entropy first)"
            lines.append(f"| {label} | {r['k']} | {r['honest']:.3f} | {r['honest16']:.3f} | {r['nominal']:.3f} | "
                         f"{r['accuracy']:.3f} | {r['open_accuracy']:.3f} | {r['perplexity']:.2f} |")
        lines += ["", f"## Layer entropies (K-means K=100, seed 42, n_init 10, `input_layernorm`, "
                      f"{ent.n_tokens} tokens from {len(ent_data)} image+text samples; {t_km:.0f} s)", "",
                  f"Ascending order: {ent.order}. " + ("Histogram estimator not run." if ent_h is None else
                  f"Histogram estimator ({t_h:.0f} s) order: {ent_h.order}; Kendall tau "
                  f"between the two estimators' entropies: {tau:.3f}."), "",
                  f"| layer | entropy (bits) | rank | histogram entropy | rel. err low ({args.low_method} "
                  f"{args.low_bits or 'default'}-bit) | rel. err high ({args.high_method} {args.high_bits}-bit) |",
                  "|---|---|---|---|---|---|"]
        rank = ent.rank()
        for i in range(L):
            hh = "–" if ent_h is None else f"{ent_h.entropies[i]:.4f}"
            lines.append(f"| {i} | {ent.entropies[i]:.4f} | {rank[i]} | {hh} | {e_low[i]:.4f} | "
                         f"{e_high[i]:.4f} |")
        lines += ["", "rel. err: mean over the layer's Linears of the driver's relative output error on the "
                  "calibration inputs, in each uniform run.", "",
                  (f"Total wall time {time.time() - t_all:.0f} s." if final else
                   f"**Partial: interrupted after {len(rows)} of {len(ks) + len(rks)} rows.**")]
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
        if final:
            print("\n".join(lines))
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"fp32": ref, "rows": rows, "entropy": ent.to_dict(),
                           "entropy_histogram": None if ent_h is None else ent_h.to_dict(),
                           "kendall_tau": tau, "rel_err_low": e_low, "rel_err_high": e_high}, f, indent=1)

    def err(rep):
        return luq._errors_by_block(rep, names)
    e_low, e_high = err(pair.low_report), err(pair.high_report)

    rows = []
    for k, order_name, order in [(k, "lowest", ent.order) for k in ks] + \
                                [(k, "highest", ent.order[::-1]) for k in rks]:
        pair.assemble(order[:k])
        t0 = time.time()
        r = evaluate(pair.model)
        blocks = [pair.model.get_submodule(n) for n in names]
        bb = [luq.block_bits(b) for b in blocks]
        w = sum(b["weights"] for b in bb)
        r.update(k=k, first=order_name, layers=sorted(order[:k]),
                 honest=sum(b["bytes"] for b in bb) * 8 / w,
                 honest16=sum(b["bytes_fp16"] for b in bb) * 8 / w,
                 nominal=sum(b["nominal_bits"] * b["weights"] for b in bb) / w,
                 seconds=time.time() - t0)
        rows.append(r)
        print(f"k={k} ({order_name} first): {r}", flush=True)
        write(rows, final=False)        # partial results survive an interrupted run
    write(rows, final=True)


if __name__ == "__main__":
    main()
