"""Small shims over transformers call conventions that changed between the versions we support.

transformers 5.2x renamed the KV-cache keyword and output field from ``past_key_values`` to ``cache`` (the old
keyword still works, with a deprecation warning, until 5.40). Our own calls go through these helpers, so they
use whichever name the installed version declares and never trigger the warning. Importing this module does not
import transformers.
"""
from __future__ import annotations

import inspect

__all__ = ["cache_kwarg", "output_cache", "find_cache", "is_cache"]


def cache_kwarg(forward) -> str:
    """The keyword under which ``forward`` (a model's forward) takes the KV cache: ``cache`` or the older
    ``past_key_values``."""
    try:
        params = inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def output_cache(out):
    """The KV cache of a model output (``out.cache`` on new versions, ``out.past_key_values`` on old ones)."""
    fields = out.keys() if hasattr(out, "keys") else ()
    if "cache" in fields:
        return out["cache"]
    return getattr(out, "past_key_values", None)


def is_cache(v) -> bool:
    """Whether ``v`` is a transformers KV ``Cache`` (False without transformers installed: then there is none)."""
    try:
        from transformers.cache_utils import Cache
    except ImportError:
        return False
    return isinstance(v, Cache)


def find_cache(args, kwargs):
    """The transformers ``Cache`` among a module call's arguments, found by type rather than by keyword (a
    decoder layer gets it as ``past_key_value``, ``past_key_values`` or ``cache`` depending on the version, and
    possibly positionally); ``None`` when there is none."""
    for v in list(kwargs.values()) + list(args[1:]):
        if is_cache(v):
            return v
    return None
