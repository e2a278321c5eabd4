"""``bivlm eval``: easy-VQA accuracy and perplexity of the testbed, fp32 or quantized (the metrics are
:mod:`bivlm_kernels.evaluation`); also ``python -m bivlm_kernels.cli.eval``."""
from __future__ import annotations

import argparse
import copy
import os
import sys

from .. import evaluation
from . import checks
from .checks import UsageError


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
    row = {"label": label, **evaluation.bits_summary(model)}
    progress = not getattr(args, "no_progress", False)
    pruning = None
    if getattr(args, "prune_keep", None) is not None:
        from ..models.token_pruning import enable_token_pruning
        pruning = enable_token_pruning(model, layer=args.prune_layer, keep=args.prune_keep,
                                       criterion=args.prune_criterion, target=args.prune_target)
    try:                                      # pruning only during VQA: perplexity reads every position
        acc = evaluation.vqa_accuracy(model, proc, limit=args.limit, batch_size=args.batch_size, progress=progress)
    finally:
        if pruning is not None:
            pruning.remove()
    row.update(accuracy=acc["accuracy"], open_accuracy=acc["open_accuracy"], n=acc["n"])
    if pruning is not None and pruning.records:
        kept = sum(sum(r.kept) for r in pruning.records) / sum(len(r.kept) for r in pruning.records)
        cand = sum(sum(r.candidates) for r in pruning.records) / sum(len(r.kept) for r in pruning.records)
        row.update(prune_kept=kept, prune_candidates=cand)
    if not args.no_ppl:
        row["perplexity"] = evaluation.perplexity(model, proc.tokenizer, max_tokens=args.ppl_tokens,
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
    from ..models import testbed
    missing = testbed.missing_packages()
    if missing:
        print(f"error: the testbed needs {missing}; install with:\n  {testbed.PIP_DEPS}\n  {testbed.PIP_WHEELS}",
              file=sys.stderr)
        return 1
    ref, proc = testbed.load_testbed(cache_dir=args.cache_dir)
    base = evaluation.majority_baseline(args.limit)
    print(f"easy-VQA majority baseline (always {base['answer']!r}): {100 * base['accuracy']:.1f}% "
          f"on {base['n']} questions", file=out)
    rows = []
    if not args.no_fp32 or not (args.model or args.rtn_bits):
        rows.append(_evaluate_row("fp32 testbed (SmolLM2 Q4_1 source)", ref, proc, args, out))
    quant = None
    if args.model:
        try:
            if os.path.isdir(args.model):       # a directory written by bivlm_kernels.save_quantized
                from .. import load_quantized
                quant = load_quantized(args.model)
            else:                               # a single .safetensors written by bivlm_kernels.checkpoint.save
                from .. import checkpoint
                quant = checkpoint.load(copy.deepcopy(ref), args.model)
        except (ValueError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        label = f"checkpoint {args.model}"
    elif args.rtn_bits:
        from ..nn import quantize_linears_
        quant = copy.deepcopy(ref)
        try:
            done = quantize_linears_(quant, args.rtn_bits, args.group_size, filter_fn=evaluation.rtn_filter(args.rtn_scope))
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
            errs = sorted(evaluation.layer_errors(ref, quant, calib), key=lambda r: -r["rel_error"])
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


def _check_eval_args(args) -> None:
    """The options of ``bivlm eval`` that can be checked before the testbed is built (a minute)."""
    from .. import formats

    def usage(message):
        return UsageError(f"bivlm eval: {message}")
    if getattr(args, "model", None) and getattr(args, "rtn_bits", None):
        raise usage("give --model or --rtn-bits, not both")
    for option, value, minimum in (("--limit", "limit", 1), ("--batch-size", "batch_size", 1),
                                   ("--ppl-tokens", "ppl_tokens", 1), ("--layer-errors", "layer_errors", 0),
                                   ("--prune-layer", "prune_layer", 0)):
        checks.check_at_least(option, getattr(args, value, None), minimum)
    keep = getattr(args, "prune_keep", None)
    if keep is not None and not 0.0 < keep <= 1.0:
        raise usage(f"--prune-keep must be in (0, 1], got {keep!r}")
    if getattr(args, "rtn_bits", None):
        try:
            formats.check_group_size(args.group_size)
        except ValueError as e:
            raise usage(f"--group-size: {e}") from None
    checks.check_eval_model("--model", getattr(args, "model", None))


def run_eval_command(args) -> int:
    err = getattr(args, "_eval_import_error", None)
    if err is not None:
        raise UsageError(f"bivlm eval: bivlm_kernels.evaluation is unavailable ({err})")
    _check_eval_args(args)
    return int(run_eval(args) or 0)


def main(argv=None) -> int:
    """``python -m bivlm_kernels.cli.eval`` (same options as ``bivlm eval``)."""
    p = add_eval_arguments(argparse.ArgumentParser(prog="bivlm eval", description=evaluation.__doc__,
                                                   formatter_class=argparse.RawDescriptionHelpFormatter))
    return run_eval(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
