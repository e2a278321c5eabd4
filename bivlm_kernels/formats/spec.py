"""Format names and versions, argument checks, and the layer layout (:class:`SegmentSpec`, :class:`LayerSpec`):
what the quantizer emits and a checkpoint's config records. The spec itself is :mod:`bivlm_kernels.formats`'s
docstring."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from . import tables

FORMAT_NAME = "bivlm-packed"
FORMAT_VERSION = 2          # the newest this library writes; files are stamped with the oldest that reads them
READ_VERSIONS = (1, 2)      # 2 adds g = 16 and compressed tables (bivlm_kernels.formats.tables); 1 reads unchanged


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


# Layer dtypes by the names configs and checkpoints record (the one table of them).
DTYPES_BY_NAME = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


# ---------------------------------------------------------------------------------------------------------
# layer layout: what the quantizer emits, what a checkpoint's config records
# ---------------------------------------------------------------------------------------------------------

INT_BUFFERS = ("qweight", "qtable")     # int32 buffers of a segment; the others are floats of the layer dtype


@dataclass(frozen=True)
class SegmentSpec:
    """One column range of the (permuted) K axis: ``width`` columns at ``bits`` bits, stored as ``kind``, with
    float tables (``table_bits = 0``) or compressed ones (:mod:`bivlm_kernels.formats.tables`)."""
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
