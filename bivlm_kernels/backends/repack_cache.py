"""A cache of load-time repacks of packed weights, keyed by the tensors they were built from.

Kernels may consume a layer's codes and tables in another order than the neutral ``bivlm-packed`` v1 layout
(fragment order for the tensor cores, row-interleaved for the CPU lookup kernels). Building that repack costs a
pass over the weight, so it is done on the first call and kept here; checkpoints never see it.

An entry is valid only while every source tensor is the same Python object with the same version counter (an
in-place write such as ``copy_`` or ``load_state_dict`` bumps it) and the same data pointer, shape, dtype and device.
Entries hold weak references only: when the first source tensor is freed, its entries go with it. Inference
tensors have no version counter, so an in-place write to one could not be seen: their repacks are rebuilt on every
call (correct, slow) instead of cached.

    rep = repack_cache.get("tc1", (qweight, codebook), lambda: build(qweight, codebook))
"""
from __future__ import annotations

import threading
import warnings
import weakref
from typing import Any, Callable, Dict, Sequence, Tuple

import torch

_lock = threading.Lock()
_entries: Dict[Tuple, Tuple[Tuple, Any]] = {}
_warned: set = set()


def _fingerprint(t: torch.Tensor):
    """What must be unchanged for a repack of ``t`` to stay valid, or None when ``t`` cannot be tracked."""
    try:
        version = t._version
    except RuntimeError:          # inference tensor: no version counter
        return None
    return (version, t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype, t.device)


def get(tag: str, tensors: Sequence[torch.Tensor], build: Callable[[], Any]) -> Any:
    """The cached ``build()`` for these source tensors (built now when missing or stale)."""
    prints = tuple(_fingerprint(t) for t in tensors)
    if any(p is None for p in prints):
        if tag not in _warned:
            _warned.add(tag)
            warnings.warn(f"repack_cache: the weight buffers are inference tensors (created under "
                          f"torch.inference_mode()), whose in-place writes cannot be tracked: the {tag!r} repack is "
                          f"rebuilt on every call. Create or load the model outside inference_mode to cache it.",
                          RuntimeWarning, stacklevel=3)
        return build()
    key = (tag,) + tuple(id(t) for t in tensors)
    with _lock:
        hit = _entries.get(key)
    if hit is not None:
        (refs, old_prints), value = hit[0], hit[1]
        if old_prints == prints and all(r() is t for r, t in zip(refs, tensors)):
            return value
    value = build()
    if hit is not None and all(r() is t for r, t in zip(hit[0][0], tensors)):
        refs = hit[0][0]                  # same tensors, written in place: their finalizer is registered
        new = False
    else:
        refs, new = tuple(weakref.ref(t) for t in tensors), True
    with _lock:
        _entries[key] = ((refs, prints), value)
    if new:
        weakref.finalize(tensors[0], _drop, key, refs[0])
    return value


def _drop(key, ref0) -> None:
    with _lock:
        hit = _entries.get(key)
        if hit is not None and hit[0][0][0] is ref0:
            del _entries[key]


def clear() -> None:
    """Forget every repack (tests; or to free memory)."""
    with _lock:
        _entries.clear()


def size() -> int:
    with _lock:
        return len(_entries)
