"""The one content check of a quantized layer, shared by ``QuantLinear.from_quantized`` and
``QuantLinear.load_state_dict`` (so a checkpoint is held to exactly the rules a freshly quantized layer is).

For every tensor given, by buffer name (``perm``, ``bias``, ``segments.{i}.qweight`` / ``codebook`` /
``scales`` / ``zeros`` / ``qtable`` / ``tgrid``), :func:`check_layer_tensors` checks

* the shape the layer's :class:`~bivlm_kernels.formats.LayerSpec` implies;
* the dtype: ``qweight`` int32, ``perm`` int32/int64, the tables and the bias floating point;
* the contents: ``perm`` a permutation of ``0 .. K-1`` (a duplicate index silently gives wrong outputs, an
  out-of-range one fails deep inside ``index_select``); codebooks, scales, zeros and the bias finite and
  representable in the layer's dtype (a NaN entry gives NaN outputs; 1e5 in an fp16 layer becomes inf).

Codes: every bit pattern of a packed word is a valid code for 1, 2 and 4 bits (``2**b`` codebook entries, or
0..15 for affine) and segment widths are multiples of the group size (>= 32), so packed words hold no padding
bits: there is nothing left to check in ``qweight`` beyond its shape and dtype. Unpacked codes are
range-checked by :func:`bivlm_kernels.formats.pack` and :func:`~bivlm_kernels.formats.lut_values`.

Costs one pass over the tables and a sort of ``perm`` per layer: load time only, never in ``forward``.
"""
from __future__ import annotations

from typing import Callable, Mapping, Optional

import torch

from . import tables
from .spec import INT_BUFFERS, LayerSpec
from .weight import check_perm

_TABLES = ("codebook", "scales", "zeros")


def expected_buffers(spec: LayerSpec) -> dict:
    """``{buffer name: (shape, role)}`` of a layer of layout ``spec``; role is qweight / table / perm / bias."""
    out = {}
    for i, s in enumerate(spec.segments):
        for name, shape in s.buffer_shapes(spec.out_features, spec.group_size).items():
            out[f"segments.{i}.{name}"] = (tuple(shape), "qweight" if name in INT_BUFFERS else "table")
    if spec.has_perm:
        out["perm"] = ((spec.in_features,), "perm")
    if spec.has_bias:
        out["bias"] = ((spec.out_features,), "bias")
    return out


def _check_floats(t: torch.Tensor, what: str, dtype: Optional[torch.dtype]) -> None:
    if not t.dtype.is_floating_point:
        raise ValueError(f"{what} must be a floating-point tensor, got {t.dtype}")
    if t.numel() == 0:
        return
    if not torch.isfinite(t).all():
        raise ValueError(f"{what} contains NaN or inf")
    if dtype is not None and dtype != t.dtype:
        big = float(t.detach().abs().max())
        if big > torch.finfo(dtype).max:
            raise ValueError(f"{what} holds {big:.3g}, beyond the largest {dtype} ({torch.finfo(dtype).max:.3g}): "
                             f"it would become inf in this layer")


def check_layer_tensors(spec: LayerSpec, tensors: Mapping[str, torch.Tensor], *,
                        dtype: Optional[torch.dtype] = None,
                        label: Callable[[str], str] = repr) -> None:
    """Raise ``ValueError`` naming the tensor (``label(buffer name)``) for the first wrong shape, dtype or
    content among ``tensors``. Buffers absent from ``tensors`` are skipped (a non-strict load reports them as
    missing keys); names the layout does not have are ignored here (the loader reports unexpected keys).
    ``dtype`` is the layer's float dtype, the tables are checked to fit it."""
    expected = expected_buffers(spec)
    for name, t in tensors.items():
        if name not in expected:
            continue
        shape, role = expected[name]
        what = label(name)
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{what} must be a tensor, got {type(t).__name__}")
        if t.is_meta:                               # no data to look at (shape-only loads)
            if tuple(t.shape) != shape:
                raise ValueError(f"{what} has shape {tuple(t.shape)}, expected {shape}")
            continue
        if role == "perm":                          # check_perm names shape, dtype and duplicates itself
            try:
                check_perm(t, spec.in_features)
            except ValueError as e:
                raise ValueError(f"{what}: {e}") from None
            continue
        if tuple(t.shape) != shape:
            raise ValueError(f"{what} has shape {tuple(t.shape)}, but this layer (in_features="
                             f"{spec.in_features}, out_features={spec.out_features}, group_size={spec.group_size}, "
                             f"segments {[(s.bits, s.width) for s in spec.segments]}) expects {shape}")
        if role == "qweight":
            if t.dtype != torch.int32:
                raise ValueError(f"{what} must be int32, got {t.dtype}")
        else:
            _check_floats(t, what, dtype)
    _check_expansions(spec, tensors, dtype, label)


def _check_expansions(spec: LayerSpec, tensors: Mapping[str, torch.Tensor], dtype, label) -> None:
    """A compressed segment's expanded tables must be finite too (lo + 255 * step can overflow fp16)."""
    for i, s in enumerate(spec.segments):
        qt, grid = tensors.get(f"segments.{i}.qtable"), tensors.get(f"segments.{i}.tgrid")
        if not s.table_bits or qt is None or grid is None or qt.is_meta or grid.is_meta:
            continue
        grid = grid if dtype is None else grid.to(dtype)
        for t in tables.expand(s.kind, s.table_form, s.bits, qt, grid, s.table_bits,
                               s.width // spec.group_size):
            if not torch.isfinite(t).all():
                raise ValueError(f"{label(f'segments.{i}.tgrid')} with {label(f'segments.{i}.qtable')} expands to "
                                 f"tables that are not finite in {grid.dtype}")
