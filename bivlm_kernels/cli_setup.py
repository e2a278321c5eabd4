"""What every ``bivlm`` subcommand shares: ``--version``, ``-v/-q``, ``--debug``, ``--seed``, ``--threads``, and
the method listing of ``bivlm methods`` / ``bivlm quantize --help`` (generated from the method config
dataclasses, so it cannot drift from the code).

``-v``, ``-q`` and ``--debug`` are accepted before and after the subcommand (``bivlm -v quantize`` and
``bivlm quantize -v``); the subcommand's copy wins when both are given.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import textwrap

from .cli_checks import UsageError

# Fields of a method config the CLI sets itself: not --option material.
_NOT_OPTIONS = ("bits", "group_size", "dtype", "layer_name")


def version_text() -> str:
    """``bivlm --version``: ours, and the versions of what the results depend on (read from package
    metadata, so nothing heavy is imported)."""
    from importlib import metadata

    from . import __version__

    def v(dist):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "not installed"
    py = ".".join(map(str, sys.version_info[:3]))
    return f"bivlm {__version__} (torch {v('torch')}, transformers {v('transformers')}, Python {py})"


class _Version(argparse.Action):
    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_text())
        parser.exit()


def add_shared_flags(parser: argparse.ArgumentParser, top: bool) -> None:
    """-v/-q/--debug on the top parser (``top``) and again on each subcommand (default SUPPRESS there, so
    that a flag given before the subcommand is not reset by the subparser)."""
    d = (lambda x: x) if top else (lambda x: argparse.SUPPRESS)
    if top:
        parser.add_argument("--version", action=_Version, help="print the versions and exit")
    parser.add_argument("-v", "--verbose", action="count", default=d(0),
                        help="log per-layer decisions (-vv: debug logging)")
    parser.add_argument("-q", "--quiet", action="store_true", default=d(False),
                        help="only errors and results: no progress bars, no warnings logged")
    parser.add_argument("--debug", action="store_true", default=d(False),
                        help="show the Python traceback of an unexpected error" if top else argparse.SUPPRESS)


def add_run_flags(parser: argparse.ArgumentParser) -> None:
    """--seed and --threads of the subcommands that compute something."""
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of every random choice (calibration sampling, torch/numpy/random RNGs); "
                        "default 0. Same --seed and --threads on the same machine: identical results")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="CPU threads of torch (default: torch's own choice, all cores); results can differ "
                        "in the last bits between thread counts")


def setup_run(args) -> None:
    """Logging level, progress switch, thread count and RNG seeds, from the parsed flags."""
    verbose, quiet = getattr(args, "verbose", 0) or 0, getattr(args, "quiet", False)
    if verbose and quiet:
        raise UsageError("-v/--verbose and -q/--quiet contradict each other; give one")
    level = logging.ERROR if quiet else {0: logging.WARNING, 1: logging.INFO}.get(verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if verbose or quiet:                      # also when logging was configured before (basicConfig: no-op)
        logging.getLogger("bivlm_kernels").setLevel(level)
    if quiet and hasattr(args, "no_progress"):
        args.no_progress = True
    seed, threads = getattr(args, "seed", None), getattr(args, "threads", None)
    if seed is not None and not 0 <= seed < 2**32:
        raise UsageError(f"--seed must be an integer in [0, 2**32 - 1], got {seed}")
    if threads is not None and threads < 1:
        raise UsageError(f"--threads must be an integer >= 1, got {threads}")
    if threads is not None:
        import torch
        torch.set_num_threads(threads)
    if seed is not None:
        seed_everything(seed)


def seed_everything(seed: int) -> None:
    import random

    import torch
    random.seed(seed)
    torch.manual_seed(seed)                   # CPU and every CUDA device
    try:
        import numpy
        numpy.random.seed(seed)
    except ImportError:
        pass


# ------------------------------------------------------------------------------------------------ methods
def _fmt(value) -> str:
    """A default as --option KEY=VALUE takes it (JSON where it can be)."""
    if isinstance(value, str):
        return value                           # --option parses a non-JSON VALUE as a string
    if isinstance(value, tuple):
        value = list(value)
    try:
        return json.dumps(value, separators=(",", ":"))
    except TypeError:
        return str(value)


def method_options(name: str) -> dict:
    """``{option: default}`` of a registered method, the fields the CLI sets itself left out."""
    from .quant.base import METHODS
    return {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
            for f in dataclasses.fields(METHODS[name].config_cls) if f.name not in _NOT_OPTIONS}


def methods_text(full: bool = False) -> str:
    """One entry per registered method: its default --bits and its --option KEY=DEFAULT list; ``full`` adds
    the config class's docstring (what each option means)."""
    from .quant import methods as _registers  # noqa: F401  (importing registers the methods)
    from .quant.base import METHODS
    out = []
    for name in sorted(METHODS):
        cls = METHODS[name].config_cls
        bits = next(f.default for f in dataclasses.fields(cls) if f.name == "bits")
        opts = " ".join(f"{k}={_fmt(v)}" for k, v in method_options(name).items()) or "(none)"
        out.append(textwrap.fill(f"{name:<6} --bits default {bits}; --option {opts}", width=100,
                                 initial_indent="  ", subsequent_indent=" " * 9, break_on_hyphens=False))
        if full and cls.__doc__:
            out.append(textwrap.indent(textwrap.dedent("    " + cls.__doc__.strip()), "      "))
    out.append("  luq    a mix of two of the above (see the LUQ options); --option goes to --high-method")
    return "\n".join(out)


def quantize_epilog() -> str:
    return ("method options (--option KEY=VALUE; `bivlm methods` explains each):\n" + methods_text())


def print_methods(args) -> int:
    print(methods_text(full=not getattr(args, "short", False)))
    return 0


def lazy_epilog(parser: argparse.ArgumentParser, make) -> None:
    """Build ``parser``'s epilog only when its help is printed (it imports the method registry)."""
    original = parser.format_help

    def format_help():
        if parser.epilog is None:
            parser.epilog = make()
        return original()
    parser.format_help = format_help
