"""GTQ: GPTQ with fitted, compressed per-group tables (ours; the answer to "fp16 tables cost a third of the bits").

Per layer ``W`` ``[N, K]`` with Hessian ``H``:

1. **Plan the row grids.** Fit every group of the original weights (importance ``H_kk``-weighted, see
   :mod:`._tablefit`): a uniform grid ``(scale, min)`` or free entries (k-means). With ``table_bits = t > 0``
   the row's two grid constants (``tgrid``) are chosen to span those fits, so each group's table becomes
   ``t``-bit integers (format version 2, :mod:`bivlm_kernels.formats.tables`).
2. **GPTQ.** Columns are coded in order with GPTQ's error compensation (``gptq_columns``); when a group starts,
   its table is fitted again on the already-compensated weights, *on the row grid*: among the integer fields
   around the rounded fit, the ones whose expanded levels (exactly what the kernels read) give the smallest
   weighted error. Codes are the nearest of those levels.

Bits: ``b + E * t / g + 2 * 16 / K`` per weight (E = 2 for ``grid``, ``2**b`` for ``entries``; fp16 grids; t = 6
packs 5 fields per 32-bit word, so 6.4 bits per field, rounded up to whole words per row), e.g. 2-bit g16 grid t4:
2.5 + 0.06 on 576-wide rows; 2-bit g16 entries t4: 3.0 + 0.06; 4-bit g32 grid t4: 4.25 + 0.06; 4-bit g32 grid t6
(Q4_K's 6-bit scales and mins): 4.44 + 0.06 at K = 576, 4.42 + 0.02 at K = 1536.
``table_bits = 0`` keeps float tables (version 1) with the same fitting.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from ...formats import DTYPES_BY_NAME, QuantizedSegment, QuantizedWeight, tables
from ..base import Method, MethodConfig, register_method
from ..hessian import prepare_hessian
from . import _tablefit as tf
from ._refit import refit_fields
from ._common import bits_info, check_choice, check_config, check_k, check_percdamp, gptq_columns, rounded



@dataclasses.dataclass
class GTQConfig(MethodConfig):
    """GTQ options. ``bits`` 1, 2 (lut) or 4 (affine); ``group_size`` 16 (2 and 4 bits) to 256.

    ``form``: ``"grid"`` (uniform levels ``c * scale - min`` per group) or ``"entries"`` (any ``2**bits`` levels
    per group, lut only). ``table_bits``: 4, 6 or 8 (compressed tables), 0 (float tables). ``weighted``: fit tables
    to the Hessian-diagonal-weighted error (True) or the plain one. ``compensate``: GPTQ error compensation
    (True) or round-to-nearest on the fitted tables. ``percdamp`` / ``blocksize`` as GPTQ; ``act_order``: code
    the columns in decreasing ``H_kk`` order, groups formed in that order (stored as ``perm``: 32 / N bits more).
    ``refit`` (compressed tables only): once every code is known, refit all the row's tables to the full-Hessian
    output error and round them with compensation (:mod:`._refit`); a row keeps them only if its error drops.
    ``table_dtype``
    (``"float16"``, ``"bfloat16"``, ``"float32"`` or None = the layer's dtype): the precision the tables are
    rounded to; a narrower one than the layer's is only allowed in an fp32 layer (it then stores them exactly),
    e.g. fp16 tables in the fp32 testbed, so that its bits and its quality are those of an fp16 model's tables.
    """
    bits: int = 2
    group_size: int = 16
    form: str = "grid"
    table_bits: int = 4
    weighted: bool = True
    compensate: bool = True
    percdamp: float = 0.01
    blocksize: int = 128
    act_order: bool = False
    refit: bool = False
    table_dtype: Optional[str] = None     # round tables to this ("float16" ...) in an fp32 layer; None: the layer's
    layer_name: Optional[str] = None


def gtq_quantize(W: torch.Tensor, H: torch.Tensor, cfg: GTQConfig) -> QuantizedWeight:
    """GTQ on ``W`` ``[N, K]`` with Hessian ``H`` ``[K, K]`` (see the module doc)."""
    N, K = W.shape
    g, bits, form, tb = cfg.group_size, cfg.bits, cfg.form, cfg.table_bits
    dtype = cfg.dtype if cfg.table_dtype is None else DTYPES_BY_NAME[cfg.table_dtype]
    if dtype != cfg.dtype and cfg.dtype != torch.float32:
        raise ValueError(f"table_dtype={cfg.table_dtype!r} needs an fp32 layer (it is {cfg.dtype}): only fp32 "
                         f"stores every {dtype} value exactly")
    check_k(K, g)
    kind = "lut" if bits in (1, 2) else "affine"
    G = K // g
    d = torch.diag(H).clone()
    live = d > 0
    d[~live] = d[live].mean() if live.any() else 1.0
    imp = d if cfg.weighted else torch.ones_like(d)
    perm = torch.argsort(d, descending=True) if cfg.act_order else None
    if perm is not None:                       # columns (and the groups they form) in decreasing H_kk order
        W, imp = W[:, perm], imp[perm]
        H = H[perm][:, perm]

    def fit(x, w):
        if form == "grid":
            s, m = tf.fit_grid(x, w, bits)
            return torch.stack([s, m], 1)
        return tf.fit_entries(x, w, 1 << bits)

    tgrid = None
    if tb:
        first = fit(W.reshape(N * G, g), imp.view(1, G, g).expand(N, G, g).reshape(N * G, g))
        # rounded to the table dtype, held in the layer's: the expansion below is exactly the layer's
        tgrid = tf.plan_grids(first.view(N, G, -1), form, tb, dtype).to(cfg.dtype)
    Wc, U, hinfo = prepare_hessian(W, H, cfg.percdamp, name=cfg.layer_name)
    E = tables.fields_per_group(form, bits) if tb else 0
    fields = torch.zeros(N, G, E, dtype=torch.long, device=W.device)
    floats = torch.zeros(N, G, 2 if form == "grid" else 1 << bits, device=W.device)

    def new_group(col, cur):
        j = col // g
        w = imp[col:col + g][None, :].expand(N, g)
        f = fit(cur, w)
        if tb:
            fields[:, j] = tf.best_fields(cur, w, kind, form, bits, tb, tgrid, f)
            lv = tf.levels(kind, form, bits, fields[:, j], tgrid)
        else:
            floats[:, j] = f
            lv = _float_levels(kind, form, bits, f, dtype)
        return lv, (lambda col_w, lv=lv: tf.nearest(col_w[:, None], lv)[:, 0])

    codes, loss = gptq_columns(Wc, U if cfg.compensate else None, g, cfg.blocksize, new_group)
    extra = {}
    if cfg.refit:
        fields, e0, e1 = refit_fields(W, H, codes, fields, tgrid, kind, form, bits, g, tb)
        extra = {"refit_gain": float(1 - e1.sum() / e0.sum().clamp_min(1e-30)),
                 "refit_rows": float((e1 < e0).float().mean())}
    if tb:
        seg = QuantizedSegment.compressed(bits, kind, form, codes, fields, tgrid, tb)
    else:
        seg = _float_segment(kind, form, bits, codes, floats, dtype)   # from_quantized casts: exact
    qw = QuantizedWeight([seg], g, perm=None if perm is None else perm.to(torch.int32))
    qw.info.update(method="gtq", form=form, table_bits=tb, gptq_loss=loss, **extra, **hinfo, **bits_info(qw, dtype))
    return qw


def _float_levels(kind, form, bits, f, dtype):
    """Levels of float (version-1) tables as stored in ``dtype``: ``[R, 2**b]``."""
    c = torch.arange(1 << bits, dtype=torch.float32, device=f.device)
    if form == "entries":
        return rounded(f, dtype)
    if kind == "lut":
        return rounded(c * f[:, :1] - f[:, 1:], dtype)
    s = rounded(f[:, 0], dtype)
    z = rounded(f[:, 1] / f[:, 0], dtype)
    return (c - z[:, None]) * s[:, None]


def _float_segment(kind, form, bits, codes, floats, dtype):
    if kind == "affine":
        return QuantizedSegment(bits, codes, scales=floats[..., 0].to(dtype),
                                zeros=(floats[..., 1] / floats[..., 0]).to(dtype))
    n, groups = floats.shape[:2]
    book = torch.stack([_float_levels(kind, form, bits, f, dtype) for f in floats.unbind(1)], 1)
    return QuantizedSegment(bits, codes, codebook=book.view(n, groups, -1).to(dtype))


@register_method
class GTQ(Method):
    """GPTQ with fitted, compressed per-group tables; options in :class:`GTQConfig`."""
    name = "gtq"
    config_cls = GTQConfig
    needs_hessian = True

    def validate(self) -> None:
        c = self.config
        check_config(c, self.name, (1, 2, 4))
        check_choice(c.form, "form", ("grid", "entries") if c.bits in (1, 2) else ("grid",))
        tables.check_table_bits(c.table_bits)
        check_choice(c.table_dtype, "table_dtype", (None, *DTYPES_BY_NAME))
        for name in ("weighted", "compensate", "act_order", "refit"):
            if not isinstance(getattr(c, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(c, name)!r}")
        if not isinstance(c.blocksize, int) or isinstance(c.blocksize, bool) or c.blocksize <= 0:
            raise ValueError(f"blocksize must be a positive int, got {c.blocksize!r}")
        check_percdamp(c.percdamp)
        if c.refit and not c.table_bits:
            raise ValueError(f"refit needs compressed tables (table_bits one of {tables.TABLE_BITS[1:]}), "
                             f"got table_bits={c.table_bits!r}")

    def _quantize(self, W: torch.Tensor, H: Optional[torch.Tensor]) -> QuantizedWeight:
        return gtq_quantize(W, H, self.config)
