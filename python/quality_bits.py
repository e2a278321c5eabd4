"""Quality per honest bit on the testbed LM: our configurations at matched honest bits (fp16 tables) against
llama.cpp's quantizers on the same model and text (PEERS.md), with the spread over calibration seeds.

    python python/quality_bits.py --rows all --seeds 0,1,2 --limit 200 \\
        --out benchmarks/results/quality_bits.md

Each row is one named configuration (``ROWS``): a method with options for the language model, optionally with
per-layer overrides (a regex on the layer name -> other bits / options); the vision tower and projector stay
fp32. Honest bits average ``LayerSpec.bits_per_weight(float16)`` over the 210 LM linears, size-weighted (codes,
tables, grids, perm: everything but the bias). Perplexity: the README's 1,022 GPL-3.0 tokens
(``evaluation.perplexity``); easy-VQA: the first ``--limit`` test questions. Every number of a row is the
median over the seeds, with min and max.
"""
import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

# llama.cpp (commit 0c1e570, "flat" 256-weight runs, imatrix from our calibration text): PEERS.md, 2026-11-30
PEERS = [("IQ2_XXS", 2.06, 412), ("IQ2_XS", 2.31, 140), ("Q2_K", 2.63, 62), ("IQ3_XXS", 3.06, 40.8),
         ("Q3_K", 3.44, 26.8), ("Q4_0 + imatrix", 4.5, 22.7), ("IQ4_NL", 4.5, 22.5)]

FP16 = {"table_dtype": "float16"}
# name -> (bits, group size, options, overrides {layer regex: {"bits", "group_size", "options"}}, target[, run]);
# run: settings of that row that override the command line ({"n_calib": ...}), or {"component": "vision"}: quantize
# the vision tower (72 linears, DINOv2-S) instead of the language model (no llama.cpp peer: target None)
ROWS = {
    "1.5": (1, 32, {"form": "entries", "table_bits": 8, **FP16}, {},
            "< 6.5e3 at <= 1.75 bits (10x below Bi-VLM's 6.5e4)"),
    "2.3": (2, 32, {"form": "grid", "table_bits": 4, **FP16},
            {r"self_attn\.(k|v|o)_proj$": {"bits": 2, "group_size": 64,
                                            "options": {"form": "grid", "table_bits": 4, **FP16}}},
            "< 140 at <= 2.31 bits (IQ2_XS)"),
    "2.6": (2, 16, {"form": "grid", "table_bits": 4, **FP16}, {}, "< 62 at <= 2.63 bits (Q2_K)"),
    "3.0": (2, 16, {"form": "grid", "table_bits": 4, **FP16},
            {r"mlp\.down_proj$": {"bits": 4, "group_size": 32, "options": {"form": "grid", "table_bits": 4, **FP16}}},
            "< 40.8 at <= 3.06 bits (IQ3_XXS)"),
    "4.5": (4, 32, {"form": "grid", "table_bits": 6, **FP16}, {}, "< 22.5 at <= 4.5 bits (IQ4_NL)",
            {"n_calib": 128}),
    "v1.5": (1, 32, {"form": "entries", "table_bits": 8, **FP16}, {}, None, {"component": "vision", "n_calib": 128}),
    "v2.6": (2, 16, {"form": "grid", "table_bits": 4, **FP16}, {}, None, {"component": "vision", "n_calib": 128}),
}


def run_row(name, seed, args, ref, proc):
    import copy

    import torch
    from bivlm_kernels import evaluation
    from bivlm_kernels.models import testbed
    from bivlm_kernels.quant import ComponentConfig, QuantConfig, quantize_model
    bits, g, opts, over = ROWS[name][:4]
    n_calib = _run_settings(name).get("n_calib", args.n_calib)
    torch.manual_seed(seed)
    model = copy.deepcopy(ref)                  # the fp32 testbed, built once per script run
    calib = testbed.calibration_data(proc, n_calib, mix=args.mix, seed=seed)
    comp = _run_settings(name).get("component", "language")
    cfg = QuantConfig(**{"language": None, comp: ComponentConfig("gtq", bits=bits, group_size=g, options=dict(opts))},
                      overrides={k: dict(v, options=dict(v.get("options", {})), method="gtq")
                                 for k, v in over.items()})
    t0 = time.time()
    model, _ = quantize_model(model, cfg, calib, progress=False)
    t_q = time.time() - t0
    ev = evaluation.perplexity(model, proc.tokenizer, max_tokens=args.ppl_tokens)
    ppl = ev["perplexity"]
    acc = evaluation.vqa_accuracy(model, proc, limit=args.limit)["accuracy"] if args.limit else float("nan")
    b = evaluation.bits_summary(model)
    assert b["quantized_layers"] == ({"lm": 210} if comp == "language" else {"vision": 72}), b["quantized_layers"]
    return {"row": name, "seed": seed, "bits16": b["quantized_bpw_fp16"], "ppl": ppl, "vqa": acc,
            "quant_s": t_q, "n_calib": n_calib, "ppl_tokens": ev["tokens"]}


def _run_settings(name):
    return ROWS[name][5] if len(ROWS[name]) > 5 else {}


_FP32_PPL = {1022: 21.06, 6643: 22.47}     # the fp32 testbed on the first 1,024 tokens / the whole eval text


def _tokens(results):
    """Predicted tokens of the perplexity (records before ``ppl_tokens`` was kept used the whole text: 6,643)."""
    n = sorted({r.get("ppl_tokens", 6643) for r in results})
    if len(n) != 1:
        raise ValueError(f"these runs measured perplexity on different token counts {n}: not one table")
    return n[0]


def _ppl(v):
    return f"{v:.2f}" if v < 100 else f"{v:.1f}"


def summary(vals, fmt):
    vals = sorted(vals)
    med = statistics.median(vals)
    return f"{fmt(med)} ({fmt(vals[0])} – {fmt(vals[-1])})" if len(vals) > 1 else fmt(med)


def write(results, args, final):
    import torch
    import transformers
    tokens = _tokens(results)
    lines = ["# Quality per honest bit: testbed LM, fp16 tables, against llama.cpp\n",
             f"- torch {torch.__version__}, transformers {transformers.__version__}, CPU ({platform.machine()}, "
             f"{_cpu_model()}; torch threads as in the commands at the end). Method "
             f"`gtq` (bivlm_kernels/quant/methods/gtq.py); each row is the median over calibration seeds "
             f"{sorted({r['seed'] for r in results})} (min – max in brackets).",
             "- Honest bits: every buffer but the bias of the quantized linears (the 210 LM linears; the 72 vision "
             "linears in the `v` rows, whose perplexity is the fp32 LM's), with the tables and grids in fp16 "
             "(they are rounded to fp16 by `table_dtype='float16'`), size-weighted.",
             f"- Perplexity: the first {tokens} predicted tokens of the README's GPL-3.0 text (fp32: "
             f"{_FP32_PPL.get(tokens, '?')}), as for the llama.cpp rows. easy-VQA: first {args.limit} "
             f"test questions (fp32: 76.0 %). {args.n_calib} calibration samples (unless the row says otherwise), "
             f"mix {args.mix}.", ""]
    if not final:
        lines.insert(1, "**Partial: the run was still going when this was written.**\n")
    lines += ["| row | configuration | honest bits | perplexity | easy-VQA | target | met |",
              "|---|---|---|---|---|---|---|"]
    for name in args.rows:
        rs = [r for r in results if r["row"] == name]
        if not rs:
            continue
        bits, g, opts, over, target = ROWS[name][:5]
        conf = f"{bits}-bit g{g} {opts.get('form')} t{opts.get('table_bits')}"
        for pat, o in over.items():
            conf += f"; `{pat}`: {o['bits']}-bit g{o['group_size']}".replace("|", "\\|")   # a table cell
        if opts.get("act_order"):
            conf += ", act_order"
        calib = sorted({r.get("n_calib", 32) for r in rs})        # records before n_calib was kept: 32
        if calib != [args.n_calib]:
            conf += f", {'/'.join(map(str, calib))} calibration samples"
        if _run_settings(name).get("component") == "vision":
            conf += "; vision tower only"
        ppls, b = [r["ppl"] for r in rs], max(r["bits16"] for r in rs)
        met = "–"
        if target is not None:
            lim_b, lim_p = _target(target)
            met = "yes" if b <= lim_b and max(ppls) < lim_p else "no"
        lines.append(f"| {name} | {conf} | {b:.3f} | {summary(ppls, _ppl)} | "
                     f"{summary([r['vqa'] for r in rs], lambda v: f'{100 * v:.1f}%')} | {target or '–'} | {met} |")
    lines += ["", "llama.cpp on the same model and text, as fixed reference points (source: the project's PEERS.md "
              "and issue 19, which give no measurement date; read 2026-12-01. llama.cpp commit 0c1e570 from the "
              "llama-cpp-python 0.3.36 source package, every matrix quantized \"flat\" in 256-weight runs with an "
              "importance matrix from our calibration text, perplexity by our `evaluation.perplexity`):", "",
              "| llama.cpp type | honest bits | perplexity |", "|---|---|---|"]
    lines += [f"| {t} | {b} | {p} |" for t, b, p in PEERS]
    lines += ["", f"Generated {datetime.date.today()} by `python python/quality_bits.py {' '.join(sys.argv[1:])}`."]
    for cmd in getattr(args, "part_commands", []):
        lines.append(f"- from the runs of `{cmd}`")
    lines += ["", "Raw runs: " + json.dumps(results)]
    text = "\n".join(lines) + "\n"
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    if final:
        print(text)


def _cpu_model():
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown model"


def _target(t):
    """'< 62 at <= 2.63 bits (...)' -> (2.63, 62)."""
    p = float(t.split("<")[1].split("at")[0])
    b = float(t.split("<=")[1].split("bits")[0])
    return b, p


def merge(args):
    """The table of runs already made (``--from``): their raw records and the commands that made them."""
    results, args.part_commands = [], []
    for path in args.parts:
        text = open(path).read()
        results += json.loads(text.split("Raw runs: ", 1)[1].strip())
        args.part_commands += [line.split("`")[1] for line in text.splitlines() if line.startswith("Generated")]
    args.rows = [r for r in args.rows if any(x["row"] == r for x in results)]
    write(results, args, final=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="all", help=f"comma-separated names of {list(ROWS)} or 'all'")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--limit", type=int, default=200, help="easy-VQA questions (0: skip)")
    p.add_argument("--n-calib", type=int, default=32, help="calibration samples (a row may set its own)")
    p.add_argument("--mix", type=float, default=0.5)
    p.add_argument("--ppl-tokens", type=int, default=1024,
                   help="perplexity on the first this many tokens of the eval text (1024: the README's and the "
                        "llama.cpp peers' 1,022 predicted tokens)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default=None)
    p.add_argument("--from", dest="parts", nargs="+", default=None,
                   help="do not run: merge the raw runs recorded in these output files into one table")
    args = p.parse_args()
    args.rows = list(ROWS) if args.rows == "all" else args.rows.split(",")
    bad = [r for r in args.rows if r not in ROWS]
    if bad:
        p.error(f"unknown row(s) {bad}; allowed: {list(ROWS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.parts:
        return merge(args)
    import torch
    from bivlm_kernels.models import testbed
    if args.threads:
        torch.set_num_threads(args.threads)
    ref, proc = testbed.load_testbed()
    results = []
    for name in args.rows:
        for seed in seeds:
            results.append(run_row(name, seed, args, ref, proc))
            print(json.dumps(results[-1]), flush=True)
            write(results, args, final=False)
    write(results, args, final=True)


if __name__ == "__main__":
    main()
