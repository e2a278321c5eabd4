"""The packed weight format ``bivlm-packed`` (versions 1 and 2): spec, pack/unpack, dequantize, honest bit count.

Version 2 adds two things and changes nothing of version 1 (a version-1 file loads unchanged, and a layout that
uses neither is still written as version 1): group size 16 for 2- and 4-bit segments, and **compressed tables**
(a segment's codebooks or scales stored as 4-, 6- or 8-bit integers on a per-row float grid, specified and drawn in
:mod:`bivlm_kernels.tables`). Kernels read the float tables below; a compressed segment is expanded to them.

Pure PyTorch, no GPU needed. Every kernel (CUDA, Triton) and the reference op read exactly this layout; kernels
may repack at load time, checkpoints never do.

Spec
====

A linear layer ``y = x @ W.T + b`` with ``N = out_features`` and ``K = in_features`` is stored as

* an optional column permutation ``perm`` (int32 ``[K]``): the layer computes on ``x[..., perm]``;
* one or more **segments** that split the (permuted) K axis into consecutive column ranges, each with its own
  bit width. A single-segment layer covers all of K. Mixed segments are how salient columns get 2 bits while
  the rest get 1 bit: ``y = sum_s x[..., perm][..., k0_s:k1_s] @ W_s.T`` (accumulated in fp32);
* an optional ``bias`` ``[N]`` (not counted as weight bits: an fp16 ``nn.Linear`` has it too).

Each segment of width ``Ks`` (a multiple of ``group_size``), ``b`` bits, holds::

    qweight   int32  [N, ceil(Ks * b / 32)]   codes packed along K, least significant bits first
    kind "lut"    (b in {1, 2}):  codebook  float [N, Ks / g, 2**b]      w[n, k] = codebook[n, k // g, code]
    kind "affine" (b = 4):        scales    float [N, Ks / g]
                                  zeros     float [N, Ks / g]            w[n, k] = (code - zeros[n, k // g])
                                                                                    * scales[n, k // g]

"float" is the layer's dtype (fp16, bf16 or fp32), the same for every floating buffer of a layer.

Bit layout of one int32 word (bit 31 on the left). Column ``k`` of a row sits in word ``k // (32 // b)`` at bit
``(k % (32 // b)) * b``; unused high bits of the last word of a row (when ``Ks * b`` is not a multiple of 32)
are zero::

    b = 1:  | c31 | c30 | ... | c2 | c1 | c0 |          32 codes, 1 bit each
    b = 2:  | c15 | c14 | ... |  c1  |  c0  |           16 codes, 2 bits each (c0 = bits 1..0)
    b = 4:  |  c7  |  c6  | ... |  c1  |  c0  |         8 codes, 4 bits each  (c0 = bits 3..0)

Value mapping of codes:

* ``lut``, b = 1: code 0 -> ``codebook[..., 0]``, code 1 -> ``codebook[..., 1]``. Binarizers of this package
  write ``(mu - alpha, mu + alpha)``, so code 1 is the larger value (``w >= mu``).
* ``lut``, b = 2: code c -> ``codebook[..., c]``; any 4 values (residual binarization ``mu +- a1 +- a2``,
  Bi-VLM's bands ``mu +- a_in, mu +- a_out``, a uniform grid ...).
* ``affine``, b = 4: code c in 0..15 -> ``(c - zero) * scale``; ``zero`` is a float, not rounded.

Honest size: :func:`bits_per_weight` = (bytes of every buffer except bias) * 8 / (N * K), so it includes codes,
codebooks, scales, zeros (or compressed tables and their grids) and the permutation. For g = 128 and fp16:
1-bit lut 1.25, 2-bit lut 2.5, 4-bit affine 4.25 bits per weight; a perm adds 32 / N. Compressed (version 2),
2-bit g = 16 with a 4-bit (scale, min) grid per group: 2.5 + 32 / Ks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from . import tables

FORMAT_NAME = "bivlm-packed"
FORMAT_VERSION = 2          # the newest this library writes; files are stamped with the oldest that reads them
READ_VERSIONS = (1, 2)      # 2 adds g = 16 and compressed tables (bivlm_kernels.tables); 1 reads unchanged


def layout_version(layers: dict) -> int:
    """The format version a checkpoint of these layer layouts (``LayerSpec.to_dict`` values) needs."""
    return max((LayerSpec.from_dict(d).format_version for d in layers.values()), default=1)


def check_version(version, where: str) -> int:
    """A format version this library reads (as written in a header: ``"1"`` or ``1``), else ValueError."""
    if str(version) not in [str(v) for v in READ_VERSIONS]:
        raise ValueError(f"{where} has format_version {version!r}; this bivlm_kernels reads versions "
                         f"{list(READ_VERSIONS)}")
    return int(version)

LUT_BITS = (1, 2)          # bit widths stored with a per-group codebook
AFFINE_BITS = (4,)         # bit widths stored with per-group scale and zero
GROUP_SIZES = (16, 32, 64, 128, 256)   # 16: 2- and 4-bit only (see check_group_size)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
KINDS = ("lut", "affine")


def check_int(value, name: str, minimum: Optional[int] = None) -> int:
    """A true ``int`` (``bool``, floats and strings refused: ``int(2.7)`` would silently be 2)."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_bits(bits: int, kind: Optional[str] = None, name: str = "bits") -> str:
    """Validate a bit width (and kind); return the kind that stores it. ``bool`` and ``float`` are refused."""
    if not isinstance(bits, int) or isinstance(bits, bool):
        raise ValueError(f"{name} must be an int, one of {LUT_BITS + AFFINE_BITS}; "
                         f"got {type(bits).__name__} {bits!r}")
    if kind is None:
        kind = "lut" if bits in LUT_BITS else "affine"
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    allowed = LUT_BITS if kind == "lut" else AFFINE_BITS
    if not isinstance(bits, int) or isinstance(bits, bool) or bits not in allowed:
        raise ValueError(f"{name} must be one of {LUT_BITS + AFFINE_BITS} "
                         f"(lut: {LUT_BITS}, affine: {AFFINE_BITS}); got {bits!r} for kind {kind!r}")
    return kind


def check_group_size(group_size: int, k: Optional[int] = None, name: str = "in_features",
                     bits: Optional[int] = None) -> None:
    """Validate a group size (for ``bits`` if given) and, if given, that ``k`` columns split into whole groups.

    g = 16 is refused at 1 bit: a packed word (32 codes) must lie inside one group, which every kernel relies on.
    """
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size not in GROUP_SIZES:
        raise ValueError(f"group_size must be one of {GROUP_SIZES}, got {group_size!r}")
    if bits is not None and group_size * bits < 32:
        raise ValueError(f"group_size {group_size} is too small for bits={bits}: one int32 word of "
                         f"{32 // bits} codes must lie inside one group; allowed for bits={bits}: "
                         f"{[g for g in GROUP_SIZES if g * bits >= 32]}")
    if k is not None and (k <= 0 or k % group_size):
        raise ValueError(f"{name} ({k}) must be a positive multiple of group_size ({group_size})")


def check_float_dtype(dtype: torch.dtype, name: str = "dtype") -> None:
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be one of torch.float16, torch.bfloat16, torch.float32; got {dtype}")


def packed_width(k: int, bits: int) -> int:
    """Number of int32 words per row for ``k`` codes of ``bits`` bits."""
    return -(-k * bits // 32)


# ---------------------------------------------------------------------------------------------------------
# pack / unpack
# ---------------------------------------------------------------------------------------------------------

def _shifts(bits: int, device) -> torch.Tensor:
    return torch.arange(0, 32, bits, dtype=torch.int64, device=device)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes ``[N, K]`` (values in ``0 .. 2**bits - 1``) into int32 ``[N, ceil(K*bits/32)]``.

    Any K works (the tail of the last word is zero). Raises ``ValueError`` on codes out of range.
    """
    check_bits(bits)
    if not isinstance(codes, torch.Tensor) or codes.dim() != 2:
        raise ValueError(f"codes must be a 2-D tensor [N, K], got "
                         f"{tuple(codes.shape) if isinstance(codes, torch.Tensor) else type(codes).__name__}")
    if codes.dtype.is_floating_point or codes.dtype == torch.bool or codes.is_complex():
        raise TypeError(f"codes must be an integer tensor, got {codes.dtype}")
    n, k = codes.shape
    c = codes.to(torch.int64)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= (1 << bits)):
        raise ValueError(f"codes must lie in [0, {(1 << bits) - 1}] for bits={bits}; "
                         f"got min {int(c.min())}, max {int(c.max())}")
    per_word = 32 // bits
    words = packed_width(k, bits)
    c = torch.nn.functional.pad(c, (0, words * per_word - k)).view(n, words, per_word)
    packed = (c << _shifts(bits, c.device)).sum(-1)          # disjoint bit fields: sum == bitwise or
    # Values up to 2**32 - 1 live in int64; reinterpret the low 32 bits as int32 (two's complement).
    packed = torch.where(packed >= 2 ** 31, packed - 2 ** 32, packed)
    return packed.to(torch.int32)


def unpack(qweight: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of :func:`pack`: int32 ``[N, W]`` -> int64 codes ``[N, k]``."""
    check_bits(bits)
    check_int(k, "k", minimum=0)
    if qweight.dtype != torch.int32:
        raise TypeError(f"qweight must be int32, got {qweight.dtype}")
    if qweight.dim() != 2 or qweight.shape[1] != packed_width(k, bits):
        raise ValueError(f"qweight must have shape [N, {packed_width(k, bits)}] for k={k}, bits={bits}; "
                         f"got {tuple(qweight.shape)}")
    mask = (1 << bits) - 1
    # Mask after the (sign-extending) shift, so negative words unpack correctly.
    codes = (qweight.to(torch.int64).unsqueeze(-1) >> _shifts(bits, qweight.device)) & mask
    return codes.reshape(qweight.shape[0], qweight.shape[1] * (32 // bits))[:, :k]   # explicit: N may be 0


# ---------------------------------------------------------------------------------------------------------
# dequantize (fp32, the oracle for every kernel)
# ---------------------------------------------------------------------------------------------------------

def _check_grouped(codes: torch.Tensor, table: torch.Tensor, group_size: int, table_name: str) -> tuple:
    """``codes`` ``[N, K]`` integer with K a multiple of ``group_size``; ``table`` ``[N, K / g, ...]``."""
    if codes.dim() != 2 or codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise ValueError(f"codes must be a 2-D integer tensor [N, K], got {codes.dtype} {tuple(codes.shape)}")
    check_group_size(group_size)
    n, k = codes.shape
    if k % group_size or tuple(table.shape[:2]) != (n, k // group_size):
        raise ValueError(f"codes {tuple(codes.shape)} and {table_name} {tuple(table.shape)} do not match: "
                         f"K must be a multiple of group_size={group_size} and {table_name} [N, K / g, ...]")
    return n, k


def _lut_gather(codes: torch.Tensor, codebook: torch.Tensor, group_size: int) -> torch.Tensor:
    n, k = codes.shape
    idx = codes.long().view(n, k // group_size, group_size)
    return torch.gather(codebook.float(), 2, idx).view(n, k)


def lut_values(codes: torch.Tensor, codebook: torch.Tensor, group_size: int) -> torch.Tensor:
    """Unpacked codes ``[N, K]`` -> fp32 ``w[n, k] = codebook[n, k // g, code[n, k]]``.

    Codes outside ``0 .. codebook.shape[-1] - 1`` are a ``ValueError`` (not an index error inside gather)."""
    _check_grouped(codes, codebook, group_size, "codebook")
    if codebook.dim() != 3:
        raise ValueError(f"codebook must be 3-D [N, K / g, 2**bits], got {tuple(codebook.shape)}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= codebook.shape[-1]):
        raise ValueError(f"codes must lie in [0, {codebook.shape[-1] - 1}] for a codebook of "
                         f"{codebook.shape[-1]} entries; got min {int(codes.min())}, max {int(codes.max())}")
    return _lut_gather(codes, codebook, group_size)


def affine_values(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """Unpacked codes ``[N, K]`` -> fp32 ``w[n, k] = (code - zeros[n, k // g]) * scales[n, k // g]``."""
    n, k = _check_grouped(codes, scales, group_size, "scales")
    if tuple(zeros.shape) != tuple(scales.shape) or scales.dim() != 2:
        raise ValueError(f"scales and zeros must both be [N, K / g], got {tuple(scales.shape)} and "
                         f"{tuple(zeros.shape)}")
    c = codes.float().view(n, k // group_size, group_size)
    return ((c - zeros.float().unsqueeze(-1)) * scales.float().unsqueeze(-1)).view(n, k)


def dequantize_lut(qweight: torch.Tensor, codebook: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Packed lut weight -> fp32 ``[N, K]`` with ``K = codebook.shape[1] * g``."""
    k = codebook.shape[1] * group_size
    return _lut_gather(unpack(qweight, bits, k), codebook, group_size)     # unpacked codes are in range


def dequantize_affine(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                      group_size: int) -> torch.Tensor:
    """Packed affine weight -> fp32 ``[N, K]`` with ``K = scales.shape[1] * g``."""
    k = scales.shape[1] * group_size
    return affine_values(unpack(qweight, bits, k), scales, zeros, group_size)


def unpermute(w_perm: torch.Tensor, perm: Optional[torch.Tensor]) -> torch.Tensor:
    """Weight columns in permuted order -> original order (column ``perm[j]`` of W is column ``j`` of w_perm)."""
    if perm is None:
        return w_perm
    w = torch.empty_like(w_perm)
    w[:, perm.long()] = w_perm
    return w


# ---------------------------------------------------------------------------------------------------------
# layer layout: what the quantizer emits, what a checkpoint's config records
# ---------------------------------------------------------------------------------------------------------

INT_BUFFERS = ("qweight", "qtable")     # int32 buffers of a segment; the others are floats of the layer dtype


@dataclass(frozen=True)
class SegmentSpec:
    """One column range of the (permuted) K axis: ``width`` columns at ``bits`` bits, stored as ``kind``, with
    float tables (``table_bits = 0``) or compressed ones (:mod:`bivlm_kernels.tables`)."""
    bits: int
    width: int
    kind: str = "lut"
    table_bits: int = 0
    table_form: str = "grid"            # only read when table_bits > 0

    def __post_init__(self):
        check_bits(self.bits, self.kind)
        check_int(self.width, "segment width", minimum=1)
        tables.check_table_bits(self.table_bits)
        tables.check_form(self.table_form, self.kind)

    def buffer_shapes(self, n: int, group_size: int) -> dict:
        shapes = {"qweight": (n, packed_width(self.width, self.bits))}
        groups = self.width // group_size
        if self.table_bits:
            shapes["qtable"] = (n, tables.qtable_width(groups, self.table_form, self.bits, self.table_bits))
            shapes["tgrid"] = (n, 2)
        elif self.kind == "lut":
            shapes["codebook"] = (n, groups, 1 << self.bits)
        else:
            shapes["scales"] = (n, groups)
            shapes["zeros"] = (n, groups)
        return shapes


@dataclass(frozen=True)
class LayerSpec:
    """Everything needed to allocate a quantized layer's empty buffers (and to check a checkpoint)."""
    in_features: int
    out_features: int
    group_size: int
    segments: tuple
    has_perm: bool = False
    has_bias: bool = False

    def __post_init__(self):
        for name in ("in_features", "out_features"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        check_group_size(self.group_size, self.in_features)
        if not self.segments or not all(isinstance(s, SegmentSpec) for s in self.segments):
            raise ValueError("segments must hold at least one SegmentSpec (and nothing else)")
        if not isinstance(self.has_perm, bool) or not isinstance(self.has_bias, bool):
            raise ValueError(f"has_perm and has_bias must be bools, got {self.has_perm!r}, {self.has_bias!r}")
        for i, s in enumerate(self.segments):
            check_bits(s.bits, s.kind, name=f"segments[{i}].bits")
            check_group_size(self.group_size, s.width, name=f"segments[{i}].width", bits=s.bits)
        total = sum(s.width for s in self.segments)
        if total != self.in_features:
            raise ValueError(f"segment widths sum to {total}, but in_features is {self.in_features}")

    @property
    def format_version(self) -> int:
        """1 when a version-1 reader can load this layout; 2 with g = 16 or compressed tables."""
        return 2 if self.group_size < 32 or any(s.table_bits for s in self.segments) else 1

    @property
    def nominal_bits(self) -> float:
        """Code bits per weight only (no scales): what papers call '1-bit' or '1.1-bit'."""
        return sum(s.bits * s.width for s in self.segments) / self.in_features

    def to_dict(self) -> dict:
        return {"in_features": self.in_features, "out_features": self.out_features,
                "group_size": self.group_size, "has_perm": self.has_perm, "has_bias": self.has_bias,
                "segments": [{"bits": s.bits, "width": s.width, "kind": s.kind,
                              **({"table_bits": s.table_bits, "table_form": s.table_form} if s.table_bits else {})}
                             for s in self.segments]}

    @classmethod
    def from_dict(cls, d: dict) -> "LayerSpec":
        """The inverse of :meth:`to_dict`, strict: no coercion (``"2"``, ``2.7`` or ``true`` as bits, a
        string as has_perm ... are a ``ValueError`` naming the spec, never a silently different layout)."""
        try:
            if not isinstance(d, dict) or not isinstance(d.get("segments"), list):
                raise TypeError("a layer spec must be a dict with a 'segments' list")
            if not all(isinstance(s, dict) for s in d["segments"]):
                raise TypeError("each segment must be a dict {bits, width, kind}")
            segs = tuple(SegmentSpec(s["bits"], s["width"], s["kind"], s.get("table_bits", 0),
                                     s.get("table_form", "grid")) for s in d["segments"])
            return cls(d["in_features"], d["out_features"], d["group_size"], segs,
                       d.get("has_perm", False), d.get("has_bias", False))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"corrupt layer spec {d!r}: {type(e).__name__}: {e}") from None

    def bits_per_weight(self, dtype: torch.dtype = torch.float16) -> float:
        """Honest bits per weight of this layout, counted exactly like :func:`bits_per_weight` of a module."""
        esize = torch.empty((), dtype=dtype).element_size()
        nbytes = 4 * self.in_features if self.has_perm else 0
        for s in self.segments:
            for name, shape in s.buffer_shapes(self.out_features, self.group_size).items():
                nbytes += math.prod(shape) * (4 if name in INT_BUFFERS else esize)
        return nbytes * 8 / (self.out_features * self.in_features)


@dataclass
class QuantizedSegment:
    """Unpacked result of quantizing one segment: integer codes plus their codebook or scales/zeros."""
    bits: int
    codes: torch.Tensor                       # [N, width] integers in 0 .. 2**bits - 1
    codebook: Optional[torch.Tensor] = None   # lut:    [N, width / g, 2**bits]
    scales: Optional[torch.Tensor] = None     # affine: [N, width / g]
    zeros: Optional[torch.Tensor] = None      # affine: [N, width / g]
    table_bits: int = 0                       # > 0: compressed tables, the float ones above are their expansion
    table_form: str = "grid"                  # compressed: "entries" or "grid" (bivlm_kernels.tables)
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
