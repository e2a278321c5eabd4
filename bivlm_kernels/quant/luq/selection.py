"""LUQ step 2: how many of the lowest-entropy decoder layers go to ultra-low bits.

Candidates are prefixes of the entropy order: the ``k`` lowest-entropy layers at ultra-low bits, the rest at 4
bits (``L + 1`` candidates). A memory budget (average bits per LLM decoder Linear weight, weighted by parameter
count, or total bytes) picks the *smallest* ``k`` that fits - every larger ``k`` fits too and only costs
quality, so "grow the low-bit set until the budget holds" stops there. A quality check (``quality_fn(k) <=
threshold``, assumed monotone in ``k``) picks the largest ``k`` that still passes, by binary search
(``ceil(log2(L + 1))`` evaluations). With both, the quality search runs over ``[0, k_budget]``: the result is
the first of the two stopping rules the paper's loop would hit. Pure arithmetic on numbers: no model here.
"""
from __future__ import annotations

import logging
from typing import Callable, List, Optional, Sequence

log = logging.getLogger(__name__)

_TOL = 1e-9           # relative slack when comparing a budget with a sum of floats


def _per_layer(v, n: int, name: str) -> List[float]:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return [float(v)] * n
    v = [float(x) for x in v]
    if len(v) != n:
        raise ValueError(f"{name} must be a number or a sequence of n_layers={n} values, got {len(v)}")
    return v


def _check_order(order: Sequence[int], n_layers: int) -> List[int]:
    order = [int(i) for i in order]
    if sorted(order) != list(range(n_layers)):
        raise ValueError(f"order must be a permutation of range(n_layers={n_layers}), got {order}")
    return order


def prefix_bits(order: Sequence[int], k: int, bits_low, bits_high=4, layer_sizes=None) -> tuple:
    """``(average bits per weight, total bytes)`` with the first ``k`` layers of ``order`` at ``bits_low`` and
    the rest at ``bits_high`` (numbers, or per-layer sequences indexed by layer), weighted by ``layer_sizes``
    (weights per layer; default: all equal, i.e. the paper's ``(k b_low + (L - k) b_high) / L``)."""
    n = len(order)
    order = _check_order(order, n)
    lo, hi = _per_layer(bits_low, n, "bits_low"), _per_layer(bits_high, n, "bits_high")
    sizes = _per_layer(1 if layer_sizes is None else layer_sizes, n, "layer_sizes")
    if any(s <= 0 for s in sizes):
        raise ValueError(f"layer_sizes must be positive, got {sizes}")
    low = set(order[:k])
    total = sum(s * (lo[i] if i in low else hi[i]) for i, s in enumerate(sizes))
    return total / sum(sizes), total / 8


def select_layers(order: Sequence[int], n_layers: int, bits_low, bits_high=4,
                  target_avg_bits: Optional[float] = None, target_bytes: Optional[float] = None,
                  quality_fn: Optional[Callable[[int], float]] = None, threshold: Optional[float] = None,
                  layer_sizes=None, higher_is_better: bool = False) -> int:
    """Number ``k`` of lowest-entropy layers (a prefix of ``order``) to put at ultra-low bits.

    * ``bits_low`` / ``bits_high``: bits per weight of a layer at the low / high setting - numbers (nominal
      bits, e.g. 1 and 4, or a method's typical honest bits) or per-layer sequences indexed by layer (the
      honest bits measured on quantized layers); ``layer_sizes``: weights per layer (default all equal).
    * ``target_avg_bits`` / ``target_bytes`` (memory budget): the smallest ``k`` whose average bits /
      total bytes (``sum size * bits / 8``, in the unit of ``layer_sizes``) is within the budget. Raises
      ``ValueError`` if not even ``k = n_layers`` fits.
    * ``quality_fn(k) -> float`` with ``threshold``: the largest ``k`` with ``quality_fn(k) <= threshold``
      (``>=`` with ``higher_is_better``), by binary search assuming the check passes for every ``k`` below the
      boundary and fails above it; each ``k`` is evaluated at most once. If even ``k = 0`` fails, 0 is
      returned with a warning.
    * both: the quality search runs over ``[0, k_budget]`` (stop at whichever rule the growing loop hits first).
    """
    order = _check_order(order, n_layers)
    if target_avg_bits is not None and target_bytes is not None:
        raise ValueError("give target_avg_bits or target_bytes, not both")
    if (quality_fn is None) != (threshold is None):
        raise ValueError("quality_fn and threshold go together: give both or neither")
    budget = target_avg_bits if target_avg_bits is not None else target_bytes
    if budget is None and quality_fn is None:
        raise ValueError("nothing to select on: give target_avg_bits, target_bytes or quality_fn + threshold")
    hi_k = n_layers
    if budget is not None:
        if not (isinstance(budget, (int, float)) and budget > 0):
            raise ValueError(f"the memory budget must be a positive number, got {budget!r}")
        which = 0 if target_avg_bits is not None else 1
        vals = [prefix_bits(order, k, bits_low, bits_high, layer_sizes)[which] for k in range(n_layers + 1)]
        fits = [k for k, v in enumerate(vals) if v <= budget * (1 + _TOL)]
        if not fits:
            unit = "average bits" if which == 0 else "bytes"
            raise ValueError(f"memory budget {budget} {unit} cannot be met: even all {n_layers} layers at "
                             f"bits_low give {min(vals):.6g} {unit}")
        hi_k = min(fits)
        if quality_fn is None:
            return hi_k
    cache = {}

    def ok(k: int) -> bool:
        if k not in cache:
            q = float(quality_fn(k))
            cache[k] = q >= threshold if higher_is_better else q <= threshold
            log.info("LUQ selection: k=%d quality=%.6g -> %s", k, q, "pass" if cache[k] else "fail")
        return cache[k]

    lo, hi = 0, hi_k          # invariant: ok(lo) assumed, every k > hi fails or is out of the budget
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid - 1
    if lo == 0 and not ok(0):
        log.warning("LUQ selection: the quality threshold %s is not met even with no ultra-low-bit layer "
                    "(k=0); selecting k=0", threshold)
    return lo
