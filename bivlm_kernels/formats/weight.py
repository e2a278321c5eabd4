"""What a quantization method returns: unpacked codes and tables per segment (:class:`QuantizedSegment`), the
layer (:class:`QuantizedWeight`), and the honest bit count of a module."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from . import tables
from .packing import affine_values, lut_values, unpermute
from .spec import LayerSpec, SegmentSpec, check_bits

@dataclass
class QuantizedSegment:
    """Unpacked result of quantizing one segment: integer codes plus their codebook or scales/zeros."""
    bits: int
    codes: torch.Tensor                       # [N, width] integers in 0 .. 2**bits - 1
    codebook: Optional[torch.Tensor] = None   # lut:    [N, width / g, 2**bits]
    scales: Optional[torch.Tensor] = None     # affine: [N, width / g]
    zeros: Optional[torch.Tensor] = None      # affine: [N, width / g]
    table_bits: int = 0                       # > 0: compressed tables, the float ones above are their expansion
    table_form: str = "grid"                  # compressed: "entries" or "grid" (bivlm_kernels.formats.tables)
    fields: Optional[torch.Tensor] = None     # compressed: integer table fields [N, width / g, E]
    tgrid: Optional[torch.Tensor] = None      # compressed: the row grids [N, 2]

    @property
    def kind(self) -> str:
        return "lut" if self.codebook is not None else "affine"

    @classmethod
    def compressed(cls, bits: int, kind: str, form: str, codes: torch.Tensor, fields: torch.Tensor,
                   tgrid: torch.Tensor, table_bits: int) -> "QuantizedSegment":
        """A segment with compressed tables; its float tables are the exact expansion the kernels will read."""
        check_bits(bits, kind)
        tables.check_form(form, kind)
        if table_bits not in tables.TABLE_BITS[1:]:
            raise ValueError(f"table_bits must be one of {tables.TABLE_BITS[1:]}, got {table_bits!r}")
        expanded = tables.expand_fields(kind, form, bits, fields, tgrid)
        names = ("codebook",) if kind == "lut" else ("scales", "zeros")
        return cls(bits, codes, **dict(zip(names, expanded)), table_bits=table_bits, table_form=form,
                   fields=fields, tgrid=tgrid)


@dataclass
class QuantizedWeight:
    """What every quantization method returns for one ``nn.Linear`` (see :meth:`QuantLinear.from_quantized`).

    ``perm`` (optional, ``[K]``) reorders the input columns; the segments then cover the permuted columns in
    order. ``dequantize()`` gives the fp32 weight in the original column order.
    """
    segments: list
    group_size: int
    perm: Optional[torch.Tensor] = None
    info: dict = field(default_factory=dict)   # free-form method statistics (band shares, salient count, ...)

    def layer_spec(self, has_bias: bool = False) -> LayerSpec:
        n = self.segments[0].codes.shape[0]
        segs = tuple(SegmentSpec(s.bits, s.codes.shape[1], s.kind, s.table_bits, s.table_form)
                     for s in self.segments)
        return LayerSpec(sum(s.width for s in segs), n, self.group_size, segs, self.perm is not None, has_bias)

    def dequantize(self) -> torch.Tensor:
        g = self.group_size
        w_perm = torch.cat([lut_values(s.codes, s.codebook, g) if s.kind == "lut"
                            else affine_values(s.codes, s.scales, s.zeros, g) for s in self.segments], dim=1)
        return unpermute(w_perm, self.perm)


def check_perm(perm: torch.Tensor, k: int) -> None:
    """A permutation must be a 1-D integer tensor holding each of 0 .. k-1 once."""
    if perm.dtype not in (torch.int32, torch.int64) or perm.dim() != 1 or perm.numel() != k:
        raise ValueError(f"perm must be a 1-D int32/int64 tensor of length in_features={k}, "
                         f"got {perm.dtype} {tuple(perm.shape)}")
    if not torch.equal(torch.sort(perm.long().cpu()).values, torch.arange(k)):
        raise ValueError("perm must contain every column index 0 .. in_features-1 exactly once")


def bits_per_weight(module: torch.nn.Module) -> float:
    """Honest bits per weight of a quantized module: all buffers but ``bias``, over ``N * K`` weights."""
    nbytes = sum(b.numel() * b.element_size() for name, b in module.named_buffers()
                 if name.rsplit(".", 1)[-1] != "bias")
    return nbytes * 8 / (module.out_features * module.in_features)


def segment_bounds(widths: Sequence[int]) -> list:
    """Column ranges ``[(k0, k1), ...]`` of consecutive segments."""
    out, k0 = [], 0
    for w in widths:
        out.append((k0, k0 + w))
        k0 += w
    return out
