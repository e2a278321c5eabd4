"""``bivlm`` command line: ``bivlm quantize`` (a model -> a quantized checkpoint) and ``bivlm eval``.

    bivlm quantize --model PATH --method gptq --bits 4 --components language --out ckpt/
    bivlm quantize --method bivlm --out ckpt/              # the testbed model and its calibration data
    bivlm eval ...                                         # see `bivlm eval --help`

Heavy imports (transformers, the testbed) happen inside the subcommands, so ``--help`` is instant.

Every option is checked before a model is loaded (:mod:`bivlm_kernels.cli_checks`): a bad one is one line on
stderr naming the option, the value and what is allowed, exit status 2. An unexpected error later is one line
too, exit status 1; ``bivlm --debug ...`` shows its traceback instead.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

from . import cli_checks as checks
from .cli_checks import UsageError
from .cli_setup import add_run_flags, add_shared_flags, lazy_epilog, quantize_epilog, setup_run
from .cli_inputs import calib_from_file as _calib_from_file, load_model as _load_model
from .cli_inputs import model_class as _model_class, testbed as _testbed, testbed_text as _testbed_text

METHOD_CHOICES = ("rtn", "gptq", "billm", "bivlm", "luq")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block), raised as UsageError (exit status 2)."""

    def error(self, message):
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


def _build_parser(with_eval: bool = False) -> argparse.ArgumentParser:
    p = _Parser(prog="bivlm", description="Ultra-low-bit (1/2/4-bit) post-training quantization "
                "of VLMs into packed QuantLinear layers.")
    add_shared_flags(p, top=True)
    sub = p.add_subparsers(dest="command", metavar="{quantize,eval,methods}")

    q = sub.add_parser("quantize", help="quantize a model and save a checkpoint directory",
                       description="Quantize a Hugging Face (V)LM layer by layer and save it with save_quantized.",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    lazy_epilog(q, quantize_epilog)          # the method listing, built only for --help
    add_shared_flags(q, top=False)
    add_run_flags(q)
    q.add_argument("--model", metavar="PATH", help="local Hugging Face model directory (default: the testbed "
                   "model from bivlm_kernels.models.testbed)")
    q.add_argument("--method", choices=METHOD_CHOICES, default="bivlm", help="quantization method (default bivlm)")
    q.add_argument("--bits", type=int, choices=(1, 2, 4), default=None,
                   help="code bits per weight (default: the method's own)")
    q.add_argument("--group-size", type=int, choices=(32, 64, 128, 256), default=128,
                   help="group size along in_features (default 128; a layer it does not divide gets the largest "
                   "supported one that does)")
    q.add_argument("--components", default="language",
                   help="comma-separated components to quantize: vision,projector,language (default language)")
    q.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="method option, repeatable (VALUE parsed as JSON when it can be, e.g. percdamp=0.01)")
    q.add_argument("--exclude", action="append", default=[], metavar="REGEX",
                   help="keep layers whose name matches in full precision (repeatable)")
    q.add_argument("--out", required=True, metavar="DIR", help="output checkpoint directory")
    q.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    q.add_argument("--device", default=None, help="device for the block being quantized (e.g. cuda); "
                   "default: where the model is")
    q.add_argument("--n-calib", type=int, default=32, help="number of calibration samples (default 32)")
    q.add_argument("--seq-len", type=int, default=512, help="max tokens of a text-only calibration sample")
    q.add_argument("--mix", type=float, default=0.5, help="image/text ratio alpha: share of calibration samples "
                   "with their image (default 0.5)")
    q.add_argument("--calib-file", metavar="JSONL", help="calibration samples, one JSON object per line with "
                   "'text' and optionally 'image' (a path); default: the testbed's calibration data")
    q.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default=None,
                   help="dtype to load --model in (default: its config's)")
    q.add_argument("--no-progress", action="store_true", help="no progress bars (-q implies it)")
    q.add_argument("--eval-limit", type=int, default=200, metavar="N",
                   help="testbed only (no --model): easy-VQA accuracy on the first N test questions before and "
                        "after quantization (default 200; 0 skips)")
    lq = q.add_argument_group("LUQ (--method luq): lowest-entropy decoder layers at ultra-low bits, the rest high")
    lq.add_argument("--low-method", choices=("billm", "bivlm", "rtn", "gptq"), default="billm",
                    help="method of the ultra-low-bit layers (default billm, LUQ's)")
    lq.add_argument("--low-bits", type=int, choices=(1, 2), default=None, help="default: the low method's own")
    lq.add_argument("--high-method", choices=("gptq", "rtn"), default="gptq", help="default gptq")
    lq.add_argument("--high-bits", type=int, choices=(2, 4), default=4)
    budget = lq.add_mutually_exclusive_group()
    budget.add_argument("--target-avg-bits", type=float, default=None,
                        help="memory budget: average bits per LLM decoder Linear weight (see --budget-bits)")
    budget.add_argument("--n-low", type=int, default=None, help="put exactly this many layers at low bits")
    lq.add_argument("--budget-bits", choices=("honest", "nominal"), default="honest",
                    help="count --target-avg-bits in honest (all buffers) or nominal (code) bits")
    lq.add_argument("--assembly", choices=("swap", "sequential"), default="swap",
                    help="swap: two uniform runs, layers copied (LUQ's scripts); sequential: one mixed run")
    lq.add_argument("--entropy-estimator", choices=("kmeans", "histogram"), default="kmeans")
    lq.add_argument("--entropy-hook", choices=("input_layernorm", "block_output"), default="input_layernorm")

    e = sub.add_parser("eval", help="evaluate a (quantized) model (bivlm_kernels.evaluation); "
                       "`bivlm eval --help` lists its options")
    add_shared_flags(e, top=False)
    add_run_flags(e)
    if with_eval:
        # Imported only for `bivlm eval ...`, so that `bivlm --help` and `bivlm quantize` stay light.
        try:
            from .evaluation import add_eval_arguments
        except ImportError as err:
            e.set_defaults(_eval_import_error=str(err))
        else:
            add_eval_arguments(e)
    m = sub.add_parser("methods", help="list the quantization methods and their --option settings",
                       description="The methods of bivlm quantize --method, each option with its default, "
                       "read from the method config dataclasses.")
    add_shared_flags(m, top=False)
    m.add_argument("--short", action="store_true", help="one line per method, without the explanations")
    return p


def _usage(message: str) -> UsageError:
    return UsageError(f"bivlm quantize: {message}")


def _parse_options(items: List[str]) -> dict:
    out = {}
    for it in items:
        key, sep, val = it.partition("=")
        if not sep or not key:
            raise _usage(f"--option must be KEY=VALUE, got {it!r}")
        try:
            out[key] = json.loads(val)
        except json.JSONDecodeError:
            out[key] = val
    return out


def _check_quantize_args(args):
    """Every check that needs no model: returns (config, calibration pairs or None, model class or None,
    safetensors flag). Raises UsageError naming the option."""
    from .quant import QuantConfig
    checks.check_at_least("--n-calib", args.n_calib, 1)
    checks.check_at_least("--seq-len", args.seq_len, 1)
    checks.check_fraction("--mix", args.mix)
    checks.check_at_least("--eval-limit", args.eval_limit, 0)
    checks.check_at_least("--n-low", args.n_low, 0)
    if args.target_avg_bits is not None and not (args.target_avg_bits > 0 and args.target_avg_bits < 64):
        raise _usage(f"--target-avg-bits must be a number in (0, 64), got {args.target_avg_bits!r}")
    checks.check_regexes("--exclude", args.exclude)
    luq = args.method == "luq"
    if luq and args.target_avg_bits is None and args.n_low is None:
        raise _usage("--method luq needs --target-avg-bits or --n-low")
    if not luq:
        given = [o for o, v in (("--target-avg-bits", args.target_avg_bits), ("--n-low", args.n_low),
                                ("--low-bits", args.low_bits)) if v is not None]
        if given:
            raise _usage(f"{', '.join(given)} only appl{'y' if len(given) > 1 else 'ies'} to --method luq "
                         f"(got --method {args.method})")
    from .quant.config import COMPONENTS
    comps = [c.strip() for c in str(args.components).split(",") if c.strip()]
    if not comps or set(comps) - set(COMPONENTS):
        raise _usage(f"--components {args.components!r}: unknown component(s) "
                     f"{sorted(set(comps) - set(COMPONENTS)) or comps}; allowed: a comma-separated list of "
                     f"{', '.join(COMPONENTS)}")
    if args.dtype and not args.model:
        raise _usage(f"--dtype {args.dtype} only applies to --model (the testbed loads in float32)")
    try:
        # LUQ: the high setting is the base config (vision/projector too, if --components lists them)
        config = QuantConfig.from_method(args.high_method if luq else args.method,
                                         bits=args.high_bits if luq else args.bits, group_size=args.group_size,
                                         components=args.components, **_parse_options(args.option))
    except (ValueError, TypeError) as e:
        raise _usage(str(e)) from None
    config.exclude = list(args.exclude)
    config.device = args.device
    config.calibration.n_samples, config.calibration.seq_len = args.n_calib, args.seq_len
    config.calibration.mix, config.calibration.seed = args.mix, args.seed
    checks.check_device("--device", args.device)
    checks.check_out_dir("--out", args.out, args.overwrite)
    checks.check_input_file("--calib-file", args.calib_file)
    pairs = _calib_from_file(args.calib_file) if args.calib_file else None
    cls, safetensors = None, False
    if args.model:
        safetensors = checks.inspect_model_dir("--model", args.model)["safetensors"]
        cls = _model_class(args.model)
        if pairs is None:
            pairs = _testbed_text(args.n_calib)
    return config, pairs, cls, safetensors


def _quantize(args) -> int:
    from .quant import build_calibration_data, quantize_model, save_quantized
    config, pairs, cls, safetensors = _check_quantize_args(args)     # nothing heavy before this line
    luq = args.method == "luq"
    if args.model:
        model, processor = _load_model(args.model, cls, args.dtype, safetensors, progress=not args.no_progress)
    else:
        load_testbed, tb_calib = _testbed()
        try:
            model, processor = load_testbed()
        except (ImportError, FileNotFoundError) as e:
            raise _usage(f"cannot load the testbed model ({e}); pass --model PATH") from None
        if pairs is None:
            pairs = tb_calib(processor, n=args.n_calib, mix=args.mix, seed=args.seed)
    pairs = list(pairs)
    accuracy = None
    if not args.model and args.eval_limit > 0:
        from .evaluation import vqa_accuracy

        def accuracy(m):
            acc = vqa_accuracy(m, processor, limit=args.eval_limit, progress=not args.no_progress)
            return 100 * acc["accuracy"]
        acc_before = accuracy(model)
        print(f"easy-VQA accuracy before quantization (first {args.eval_limit} test questions): {acc_before:.1f}%")
    # The testbed may hand over ready input dicts or (image, text) pairs.
    if pairs and isinstance(pairs[0], dict):
        batches = pairs[:args.n_calib]
    else:
        if processor is None:
            raise _usage(f"--model {args.model!r} has no processor/tokenizer files to build calibration batches")
        batches = build_calibration_data(processor, pairs, n_samples=args.n_calib, mix=args.mix,
                                         seq_len=args.seq_len, seed=args.seed)
    try:
        if luq:
            from .quant.luq import luq_quantize
            model, report = luq_quantize(
                model, batches, low_method=args.low_method, low_bits=args.low_bits, high_method=args.high_method,
                high_bits=args.high_bits, target_avg_bits=args.target_avg_bits, n_low=args.n_low,
                budget_bits=args.budget_bits, assembly=args.assembly, mix=None,     # batches already mixed
                estimator=args.entropy_estimator, hook=args.entropy_hook, group_size=args.group_size,
                base_config=config, progress=not args.no_progress)
        else:
            model, report = quantize_model(model, config, batches, progress=not args.no_progress)
    except ValueError as e:
        raise _usage(str(e)) from None
    print(report.table())
    if luq:                 # LUQ's table is per decoder layer: the driver's group size notes go below it
        from .quant.report import QuantReport
        recorded = (getattr(model, "bivlm_quantization", None) or {}).get("report")
        for line in QuantReport.from_dict(recorded).group_size_notes() if recorded else []:
            print(line)
    if accuracy is not None:
        print(f"easy-VQA accuracy (first {args.eval_limit} test questions): {acc_before:.1f}% before -> "
              f"{accuracy(model):.1f}% after, at {report.average_bits:.3f} honest bits/weight")
    # Save the processor/tokenizer beside the model when it can save itself (HF processors can).
    proc = processor if hasattr(processor, "save_pretrained") else getattr(processor, "tokenizer", None)
    proc = proc if hasattr(proc, "save_pretrained") else None
    path = save_quantized(model, args.out, overwrite=args.overwrite, processor=proc)
    print(f"saved to {path}")
    return 0


def _check_eval_args(args) -> None:
    """The options of ``bivlm eval`` that can be checked before the testbed is built (a minute)."""
    from . import formats

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


def _eval(args) -> int:
    err = getattr(args, "_eval_import_error", None)
    if err is not None:
        raise UsageError(f"bivlm eval: bivlm_kernels.evaluation is unavailable ({err})")
    _check_eval_args(args)
    from .evaluation import run_eval
    return int(run_eval(args) or 0)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""


def main(argv: Optional[List[str]] = None) -> int:
    """``bivlm``. A bad command line prints one line to stderr and raises ``UsageError`` (a ``SystemExit`` with
    status 2, as argparse does); an unexpected error prints one line and returns 1 (``--debug``: re-raised)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _build_parser(with_eval="eval" in argv)
    args = None
    try:
        args = parser.parse_args(argv)
        setup_run(args)
        if args.command == "quantize":
            return _quantize(args)
        if args.command == "eval":
            return _eval(args)
        if args.command == "methods":
            from .cli_setup import print_methods
            return print_methods(args)
        parser.print_help()
        return 2
    except UsageError as e:
        message, command = _first_line(e), getattr(args, "command", None)
        if command and not message.startswith("bivlm"):
            message = f"bivlm {command}: {message}"
        print(message, file=sys.stderr)
        raise UsageError(message) from None
    except KeyboardInterrupt:
        print("bivlm: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if args is not None and args.debug:
            raise
        command = getattr(args, "command", None) or ""
        print(f"bivlm {command}: error: {type(e).__name__}: {_first_line(e)} (rerun with bivlm --debug "
              f"{command} ... for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
