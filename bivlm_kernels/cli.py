"""``bivlm`` command line: ``bivlm quantize`` (a model -> a quantized checkpoint) and ``bivlm eval``.

    bivlm quantize --model PATH --method gptq --bits 4 --components language --out ckpt/
    bivlm quantize --method bivlm --out ckpt/              # the testbed model and its calibration data
    bivlm eval ...                                         # see `bivlm eval --help`

Heavy imports (transformers, the testbed) happen inside the subcommands, so ``--help`` is instant.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import List, Optional

METHOD_CHOICES = ("rtn", "gptq", "billm", "bivlm", "luq")


def _build_parser(with_eval: bool = False) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bivlm", description="Ultra-low-bit (1/2/4-bit) post-training quantization "
                                "of VLMs into packed QuantLinear layers.")
    p.add_argument("-v", "--verbose", action="store_true", help="log per-layer decisions (group size fallbacks...)")
    sub = p.add_subparsers(dest="command", metavar="{quantize,eval}")

    q = sub.add_parser("quantize", help="quantize a model and save a checkpoint directory",
                       description="Quantize a Hugging Face (V)LM layer by layer and save it with save_quantized.")
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
    q.add_argument("--no-progress", action="store_true", help="no tqdm bars")
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
    if with_eval:
        # Imported only for `bivlm eval ...`, so that `bivlm --help` and `bivlm quantize` stay light.
        try:
            from .evaluation import add_eval_arguments
        except ImportError as err:
            e.set_defaults(_eval_import_error=str(err))
        else:
            add_eval_arguments(e)
    return p


def _parse_options(items: List[str]) -> dict:
    out = {}
    for it in items:
        key, sep, val = it.partition("=")
        if not sep or not key:
            raise SystemExit(f"bivlm quantize: --option must be KEY=VALUE, got {it!r}")
        try:
            out[key] = json.loads(val)
        except json.JSONDecodeError:
            out[key] = val
    return out


def _load_model(path: str, dtype: Optional[str]):
    """A local HF model directory -> (model, processor or tokenizer)."""
    import torch
    import transformers
    from transformers import AutoConfig
    if not os.path.isdir(path):
        raise SystemExit(f"bivlm quantize: --model {path!r} is not a directory (a local Hugging Face model "
                         f"directory is expected; nothing is downloaded)")
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    archs = getattr(config, "architectures", None) or []
    cls = next((getattr(transformers, a) for a in archs if hasattr(transformers, a)), None)
    if cls is None:
        raise SystemExit(f"bivlm quantize: {path!r} config.json names architectures {archs}, none of which "
                         f"this transformers ({transformers.__version__}) provides")
    kw = {"local_files_only": True}
    if dtype:
        kw["dtype"] = getattr(torch, dtype)
    model = cls.from_pretrained(path, **kw).eval()
    processor = None
    for auto in ("AutoProcessor", "AutoTokenizer"):
        try:
            processor = getattr(transformers, auto).from_pretrained(path, local_files_only=True)
            break
        except Exception:          # no processor files of that kind: try the next
            continue
    return model, processor


def _calib_from_file(path: str) -> list:
    pairs = []
    with open(path) as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                text = rec["text"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise SystemExit(f"bivlm quantize: {path}:{i + 1} must be a JSON object with a 'text' key") from None
            img = rec.get("image")
            if img is not None:
                from PIL import Image
                img = Image.open(os.path.join(os.path.dirname(path), img)).convert("RGB")
            pairs.append((img, text))
    if not pairs:
        raise SystemExit(f"bivlm quantize: {path} holds no calibration samples")
    return pairs


def _testbed():
    try:
        from .models.testbed import calibration_data, load_testbed
    except ImportError as e:
        raise SystemExit(f"bivlm quantize: no --model given and the testbed is unavailable ({e}); pass "
                         f"--model PATH (a local Hugging Face model directory), or install the testbed extras "
                         f"(pip install 'bivlm_kernels[testbed]')") from None
    return load_testbed, calibration_data


def _testbed_text(n: int) -> list:
    """Text-only calibration samples for a --model without --calib-file: the testbed's shipped text."""
    try:
        from .models.testbed import read_text
        text = read_text("calib")
    except (ImportError, FileNotFoundError) as e:
        raise SystemExit(f"bivlm quantize: --model without --calib-file uses the testbed's calibration text, "
                         f"which is unavailable ({e}); pass --calib-file JSONL") from None
    chunks = [c.strip() for c in text.split("\n\n") if len(c.strip()) > 200]
    if not chunks:
        raise SystemExit("bivlm quantize: the testbed calibration text is empty; pass --calib-file JSONL")
    return [(None, chunks[i % len(chunks)]) for i in range(n)]


def _quantize(args) -> int:
    from .quant import QuantConfig, build_calibration_data, quantize_model, save_quantized
    if args.n_calib <= 0:
        raise SystemExit(f"bivlm quantize: --n-calib must be positive, got {args.n_calib}")
    if os.path.exists(args.out) and not args.overwrite:
        raise SystemExit(f"bivlm quantize: --out {args.out!r} already exists; pass --overwrite to replace it")
    luq = args.method == "luq"
    if luq and args.target_avg_bits is None and args.n_low is None:
        raise SystemExit("bivlm quantize: --method luq needs --target-avg-bits or --n-low")
    try:
        # LUQ: the high setting is the base config (vision/projector too, if --components lists them)
        config = QuantConfig.from_method(args.high_method if luq else args.method,
                                         bits=args.high_bits if luq else args.bits, group_size=args.group_size,
                                         components=args.components, **_parse_options(args.option))
    except ValueError as e:
        raise SystemExit(f"bivlm quantize: {e}") from None
    config.exclude = list(args.exclude)
    config.device = args.device
    config.calibration.n_samples, config.calibration.seq_len = args.n_calib, args.seq_len
    config.calibration.mix = args.mix

    if args.model:
        model, processor = _load_model(args.model, args.dtype)
        if args.calib_file:
            pairs = _calib_from_file(args.calib_file)
        else:
            pairs = _testbed_text(args.n_calib)
    else:
        load_testbed, tb_calib = _testbed()
        try:
            model, processor = load_testbed()
        except (ImportError, FileNotFoundError) as e:
            raise SystemExit(f"bivlm quantize: cannot load the testbed model ({e}); pass --model PATH") from None
        if args.calib_file:
            pairs = _calib_from_file(args.calib_file)
        else:
            pairs = tb_calib(processor, n=args.n_calib, mix=args.mix)
    pairs = list(pairs)
    accuracy = None
    if not args.model and args.eval_limit > 0:
        from .evaluation import vqa_accuracy

        def accuracy(m):
            return 100 * vqa_accuracy(m, processor, limit=args.eval_limit)["accuracy"]
        acc_before = accuracy(model)
        print(f"easy-VQA accuracy before quantization (first {args.eval_limit} test questions): {acc_before:.1f}%")
    # The testbed may hand over ready input dicts or (image, text) pairs.
    if pairs and isinstance(pairs[0], dict):
        batches = pairs[:args.n_calib]
    else:
        if processor is None:
            raise SystemExit("bivlm quantize: no processor/tokenizer found to build calibration batches")
        batches = build_calibration_data(processor, pairs, n_samples=args.n_calib, mix=args.mix,
                                         seq_len=args.seq_len)
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
        raise SystemExit(f"bivlm quantize: {e}") from None
    print(report.table())
    if accuracy is not None:
        print(f"easy-VQA accuracy (first {args.eval_limit} test questions): {acc_before:.1f}% before -> "
              f"{accuracy(model):.1f}% after, at {report.average_bits:.3f} honest bits/weight")
    # Save the processor/tokenizer beside the model when it can save itself (HF processors can).
    proc = processor if hasattr(processor, "save_pretrained") else getattr(processor, "tokenizer", None)
    proc = proc if hasattr(proc, "save_pretrained") else None
    path = save_quantized(model, args.out, overwrite=args.overwrite, processor=proc)
    print(f"saved to {path}")
    return 0


def _eval(args) -> int:
    err = getattr(args, "_eval_import_error", None)
    if err is not None:
        raise SystemExit(f"bivlm eval: bivlm_kernels.evaluation is unavailable ({err})")
    from .evaluation import run_eval
    return int(run_eval(args) or 0)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _build_parser(with_eval="eval" in argv)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.command == "quantize":
        return _quantize(args)
    if args.command == "eval":
        return _eval(args)
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
