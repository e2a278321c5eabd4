"""``bivlm`` command line: ``bivlm quantize`` (a model -> a quantized checkpoint) and ``bivlm eval``.

    bivlm quantize --model PATH --method gptq --bits 4 --components language --out ckpt/
    bivlm quantize --method bivlm --out ckpt/              # the testbed model and its calibration data
    bivlm eval ...                                         # see `bivlm eval --help`

Heavy imports (transformers, the testbed) happen inside the subcommands, so ``--help`` is instant.

Every option is checked before a model is loaded (:mod:`.checks`): a bad one is one line on
stderr naming the option, the value and what is allowed, exit status 2. An unexpected error later is one line
too, exit status 1; ``bivlm --debug ...`` shows its traceback instead.
"""
from __future__ import annotations

import sys
from typing import List, Optional

from .checks import UsageError
from .eval import run_eval_command as _eval
from .parser import build_parser
from .quantize import run_quantize as _quantize
from .runtime import setup_run


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""


def main(argv: Optional[List[str]] = None) -> int:
    """``bivlm``. A bad command line prints one line to stderr and raises ``UsageError`` (a ``SystemExit`` with
    status 2, as argparse does); an unexpected error prints one line and returns 1 (``--debug``: re-raised)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(with_eval="eval" in argv)
    args = None
    try:
        args = parser.parse_args(argv)
        setup_run(args)
        if args.command == "quantize":
            return _quantize(args)
        if args.command == "eval":
            return _eval(args)
        if args.command == "methods":
            from .methods import print_methods
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

