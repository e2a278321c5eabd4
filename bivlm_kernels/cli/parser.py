"""The ``bivlm`` argument parser: subcommands, their options and one-line usage errors."""
from __future__ import annotations

import argparse

from .checks import UsageError
from .methods import lazy_epilog, quantize_epilog
from .runtime import add_run_flags, add_shared_flags

METHOD_CHOICES = ("rtn", "gptq", "billm", "bivlm", "luq")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block), raised as UsageError (exit status 2)."""

    def error(self, message):
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


def build_parser(with_eval: bool = False) -> argparse.ArgumentParser:
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
            from .eval import add_eval_arguments
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
