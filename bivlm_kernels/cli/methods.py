"""``bivlm methods`` and the method list at the end of ``bivlm quantize --help``: generated from the method
config dataclasses, so it cannot drift from the code."""
from __future__ import annotations

import argparse
import dataclasses
import json
import textwrap

# Fields of a method config the CLI sets itself: not --option material.
_NOT_OPTIONS = ("bits", "group_size", "dtype", "layer_name")


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
    from ..quant.base import METHODS
    return {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
            for f in dataclasses.fields(METHODS[name].config_cls) if f.name not in _NOT_OPTIONS}


def methods_text(full: bool = False) -> str:
    """One entry per registered method: its default --bits and its --option KEY=DEFAULT list; ``full`` adds
    the config class's docstring (what each option means)."""
    from ..quant import methods as _registers  # noqa: F401  (importing registers the methods)
    from ..quant.base import METHODS
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
