"""What every ``bivlm`` subcommand shares: ``--version``, ``-v/-q``, ``--debug``, ``--seed``, ``--threads`` (the method listing is :mod:`.methods`).

``-v``, ``-q`` and ``--debug`` are accepted before and after the subcommand (``bivlm -v quantize`` and
``bivlm quantize -v``); the subcommand's copy wins when both are given.
"""
from __future__ import annotations

import argparse
import logging
import sys

from .checks import UsageError


def version_text() -> str:
    """``bivlm --version``: ours, and the versions of what the results depend on (read from package
    metadata, so nothing heavy is imported)."""
    from importlib import metadata

    from .. import __version__

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
