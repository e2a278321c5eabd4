"""``bivlm quantize``: every option checked before a model is loaded, then the quantizer and the checkpoint."""
from __future__ import annotations

import json
from typing import List

from . import checks
from .checks import usage
from .inputs import calib_from_file as _calib_from_file, load_model as _load_model
from .inputs import model_class as _model_class, testbed as _testbed, testbed_text as _testbed_text


def _parse_options(items: List[str]) -> dict:
    out = {}
    for it in items:
        key, sep, val = it.partition("=")
        if not sep or not key:
            raise usage("quantize", f"--option must be KEY=VALUE, got {it!r}")
        try:
            out[key] = json.loads(val)
        except json.JSONDecodeError:
            out[key] = val
    return out


def _check_quantize_args(args):
    """Every check that needs no model: returns (config, calibration pairs or None, model class or None,
    safetensors flag). Raises UsageError naming the option."""
    from ..quant import QuantConfig
    checks.check_at_least("--n-calib", args.n_calib, 1)
    checks.check_at_least("--seq-len", args.seq_len, 1)
    checks.check_fraction("--mix", args.mix)
    checks.check_at_least("--eval-limit", args.eval_limit, 0)
    checks.check_at_least("--n-low", args.n_low, 0)
    if args.target_avg_bits is not None and not (args.target_avg_bits > 0 and args.target_avg_bits < 64):
        raise usage("quantize", f"--target-avg-bits must be a number in (0, 64), got {args.target_avg_bits!r}")
    checks.check_regexes("--exclude", args.exclude)
    luq = args.method == "luq"
    if luq and args.target_avg_bits is None and args.n_low is None:
        raise usage("quantize", "--method luq needs --target-avg-bits or --n-low")
    if not luq:
        given = [o for o, v in (("--target-avg-bits", args.target_avg_bits), ("--n-low", args.n_low),
                                ("--low-bits", args.low_bits)) if v is not None]
        if given:
            raise usage("quantize", f"{', '.join(given)} only appl{'y' if len(given) > 1 else 'ies'} to --method luq "
                         f"(got --method {args.method})")
    from ..quant.config import COMPONENTS
    comps = [c.strip() for c in str(args.components).split(",") if c.strip()]
    if not comps or set(comps) - set(COMPONENTS):
        raise usage("quantize", f"--components {args.components!r}: unknown component(s) "
                     f"{sorted(set(comps) - set(COMPONENTS)) or comps}; allowed: a comma-separated list of "
                     f"{', '.join(COMPONENTS)}")
    if args.dtype and not args.model:
        raise usage("quantize", f"--dtype {args.dtype} only applies to --model (the testbed loads in float32)")
    try:
        # LUQ: the high setting is the base config (vision/projector too, if --components lists them)
        config = QuantConfig.from_method(args.high_method if luq else args.method,
                                         bits=args.high_bits if luq else args.bits, group_size=args.group_size,
                                         components=args.components, **_parse_options(args.option))
    except (ValueError, TypeError) as e:
        raise usage("quantize", str(e)) from None
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


def run_quantize(args) -> int:
    from ..quant import build_calibration_data, quantize_model, save_quantized
    config, pairs, cls, safetensors = _check_quantize_args(args)     # nothing heavy before this line
    luq = args.method == "luq"
    if args.model:
        model, processor = _load_model(args.model, cls, args.dtype, safetensors, progress=not args.no_progress)
    else:
        load_testbed, tb_calib = _testbed()
        try:
            model, processor = load_testbed()
        except (ImportError, FileNotFoundError) as e:
            raise usage("quantize", f"cannot load the testbed model ({e}); pass --model PATH") from None
        if pairs is None:
            pairs = tb_calib(processor, n=args.n_calib, mix=args.mix, seed=args.seed)
    pairs = list(pairs)
    accuracy = None
    if not args.model and args.eval_limit > 0:
        from ..evaluation import vqa_accuracy

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
            raise usage("quantize", f"--model {args.model!r} has no processor/tokenizer files to build calibration batches")
        batches = build_calibration_data(processor, pairs, n_samples=args.n_calib, mix=args.mix,
                                         seq_len=args.seq_len, seed=args.seed)
    try:
        if luq:
            from ..quant.luq import luq_quantize
            model, report = luq_quantize(
                model, batches, low_method=args.low_method, low_bits=args.low_bits, high_method=args.high_method,
                high_bits=args.high_bits, target_avg_bits=args.target_avg_bits, n_low=args.n_low,
                budget_bits=args.budget_bits, assembly=args.assembly, mix=None,     # batches already mixed
                estimator=args.entropy_estimator, hook=args.entropy_hook, group_size=args.group_size,
                base_config=config, progress=not args.no_progress)
        else:
            model, report = quantize_model(model, config, batches, progress=not args.no_progress)
    except ValueError as e:
        raise usage("quantize", str(e)) from None
    print(report.table())
    if luq:                 # LUQ's table is per decoder layer: the driver's group size notes go below it
        from ..quant.report import QuantReport
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
