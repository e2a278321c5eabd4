"""Compressed per-group tables (``bivlm-packed`` version 2): the codebook entries or scales of every group stored
as small integers on one float grid per row.

Why: at g = 64 a 2-bit layer with fp16 codebooks spends 1.0 of its 3.0 bits on tables (4 x 16 bits per 64
weights). With ``table_bits = 4`` the same four entries cost 16 bits per group, so g = 16 fits in 3.06 bits and
g = 32 in 2.5; llama.cpp's K-quants do the same (4- or 6-bit scales under an fp16 super-block scale).

A segment with ``table_bits = t`` (t in :data:`TABLE_BITS`, 0 = the float tables of version 1) and a table
``form`` (:data:`TABLE_FORMS`) stores, instead of ``codebook`` or ``scales`` / ``zeros``::

    qtable  int32 [N, ceil(G * E / (32 // t))] G = Ks / g groups, E fields per group, t bits each, packed
                                              like codes (field f of a row at bit (f % (32 // t)) * t of
                                              word f // (32 // t), least significant first; t = 6 puts
                                              five fields in a word and leaves its top 2 bits zero)
    tgrid   float [N, 2]                      the row's two grid constants, in the layer's dtype

Field ``f = j * E + e`` of a row is field ``e`` of group ``j``::

    form "entries", b = 2 (E = 4 entries), t = 4: one int32 word holds two groups
        | j+1,e3 | j+1,e2 | j+1,e1 | j+1,e0 | j,e3 | j,e2 | j,e1 | j,e0 |
    form "grid" (E = 2: scale field s, min field m), t = 4: one int32 word holds four groups
        | j+3,m | j+3,s | j+2,m | j+2,s | j+1,m | j+1,s | j,m | j,s |
    form "grid", t = 6 (llama.cpp's Q4_K uses 6-bit scales and mins): fields 5w .. 5w+4 in word w
        |00| f+4 | f+3 | f+2 | f+1 |  f  |      (f = 5w; bits 31-30 unused, counted in the honest bits)

Meaning (computed in fp32, then rounded once to the layer's dtype: the *expanded* version-1 tables, which every
kernel consumes):

* form ``entries`` (lut segments, any 2**b values per group: Bi-VLM's bands, ``mu +- a1 +- a2``, k-means):
  ``codebook[n, j, e] = tgrid[n, 0] + tgrid[n, 1] * field(n, j, e)``                     (lo + step * t)
* form ``grid`` (a uniform grid per group, as llama.cpp's K-quants): ``scale = tgrid[n, 0] * field(n, j, s)``,
  ``min = tgrid[n, 1] * field(n, j, m)``, level ``c`` is ``c * scale - min``. A lut segment (b <= 2) expands it
  to ``codebook[n, j, c] = c * scale - min``; an affine segment (b = 4) to ``scales[n, j] = scale`` and
  ``zeros[n, j] = min / scale`` (0 where the scale is 0).

Honest bits count ``qtable`` and ``tgrid`` (every buffer but the bias), as always.
"""
from __future__ import annotations

import torch

TABLE_BITS = (0, 4, 6, 8)    # 0: float tables (version 1)
TABLE_FORMS = ("entries", "grid")


def check_table_bits(table_bits: int, name: str = "table_bits") -> int:
    if not isinstance(table_bits, int) or isinstance(table_bits, bool) or table_bits not in TABLE_BITS:
        raise ValueError(f"{name} must be one of {TABLE_BITS} (0: float tables), got {table_bits!r}")
    return table_bits


def check_form(form: str, kind: str, name: str = "table_form") -> str:
    """``entries`` needs a lut segment (an affine segment has no entries to store); ``grid`` fits both."""
    allowed = TABLE_FORMS if kind == "lut" else ("grid",)
    if form not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)} for a {kind} segment, got {form!r}")
    return form


def fields_per_group(form: str, bits: int) -> int:
    """E: the 2**b codebook entries (``entries``) or the (scale, min) pair (``grid``)."""
    return (1 << bits) if form == "entries" else 2


def qtable_width(groups: int, form: str, bits: int, table_bits: int) -> int:
    """int32 words per row of ``qtable`` (``32 // t`` fields per word)."""
    return -(-groups * fields_per_group(form, bits) // (32 // table_bits))


def pack_fields(fields: torch.Tensor, table_bits: int) -> torch.Tensor:
    """Integer fields ``[N, G, E]`` in ``0 .. 2**t - 1`` -> int32 ``qtable`` ``[N, W]``."""
    check_table_bits(table_bits)
    if table_bits == 0:
        raise ValueError("table_bits=0 means float tables: nothing to pack")
    if fields.dim() != 3 or fields.dtype.is_floating_point or fields.dtype == torch.bool:
        raise ValueError(f"fields must be an integer tensor [N, G, E], got {fields.dtype} {tuple(fields.shape)}")
    f = fields.to(torch.int64).reshape(fields.shape[0], -1)
    if f.numel() and (int(f.min()) < 0 or int(f.max()) >= (1 << table_bits)):
        raise ValueError(f"table fields must lie in [0, {(1 << table_bits) - 1}] for table_bits={table_bits}; "
                         f"got min {int(f.min())}, max {int(f.max())}")
    per = 32 // table_bits
    words = -(-f.shape[1] // per)
    f = torch.nn.functional.pad(f, (0, words * per - f.shape[1])).view(f.shape[0], words, per)
    shifts = torch.arange(per, dtype=torch.int64, device=f.device) * table_bits
    w = (f << shifts).sum(-1)                                  # disjoint bit fields: sum == or
    return torch.where(w >= 2 ** 31, w - 2 ** 32, w).to(torch.int32)


def unpack_fields(qtable: torch.Tensor, table_bits: int, groups: int, per_group: int) -> torch.Tensor:
    """Inverse of :func:`pack_fields`: int32 ``[N, W]`` -> int64 ``[N, groups, per_group]``."""
    check_table_bits(table_bits)
    if qtable.dtype != torch.int32 or qtable.dim() != 2:
        raise ValueError(f"qtable must be a 2-D int32 tensor, got {qtable.dtype} {tuple(qtable.shape)}")
    shifts = torch.arange(32 // table_bits, dtype=torch.int64, device=qtable.device) * table_bits
    f = (qtable.to(torch.int64).unsqueeze(-1) >> shifts) & ((1 << table_bits) - 1)
    return f.reshape(qtable.shape[0], -1)[:, :groups * per_group].reshape(qtable.shape[0], groups, per_group)


def expand_fields(kind: str, form: str, bits: int, fields: torch.Tensor, tgrid: torch.Tensor) -> tuple:
    """Integer fields ``[N, G, E]`` and grid ``[N, 2]`` -> the float tables in ``tgrid``'s dtype:
    ``(codebook,)`` for lut, ``(scales, zeros)`` for affine (see the module doc)."""
    f, g = fields.float(), tgrid.float()
    if form == "entries":
        return ((g[:, 0, None, None] + g[:, 1, None, None] * f).to(tgrid.dtype),)
    scale = g[:, 0, None] * f[..., 0]
    mins = g[:, 1, None] * f[..., 1]
    if kind == "lut":
        c = torch.arange(1 << bits, dtype=torch.float32, device=f.device)
        return ((c * scale[..., None] - mins[..., None]).to(tgrid.dtype),)
    zero = torch.where(scale != 0, mins / torch.where(scale != 0, scale, torch.ones_like(scale)),
                       torch.zeros_like(scale))
    return scale.to(tgrid.dtype), zero.to(tgrid.dtype)


def expand(kind: str, form: str, bits: int, qtable: torch.Tensor, tgrid: torch.Tensor, table_bits: int,
           groups: int) -> tuple:
    """Packed ``qtable`` + ``tgrid`` -> the version-1 float tables every kernel reads."""
    fields = unpack_fields(qtable, table_bits, groups, fields_per_group(form, bits))
    return expand_fields(kind, form, bits, fields, tgrid)
