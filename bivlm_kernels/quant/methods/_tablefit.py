"""Fitting one table per group, importance-weighted, knowing how the table will be stored.

Shapes: ``x`` ``[R, g]`` holds R groups of g weights, ``w`` ``[R, g]`` their importance (the Hessian diagonal:
an error on column k costs about ``H_kk * err^2`` in the layer's output). Two table forms
(:mod:`bivlm_kernels.formats.tables`):

* ``grid``: levels ``c * s - m`` for codes ``c = 0 .. 2**b - 1`` (scale ``s > 0``, min ``m >= 0``: the min is
  stored unsigned, as in llama.cpp's K-quants). :func:`fit_grid` searches a few candidate scales around the
  min-max one, assigns codes, and solves the weighted least squares for ``(s, m)`` given the codes.
* ``entries``: any ``2**b`` levels. :func:`fit_entries` runs a weighted 1-D Lloyd (k-means) from quantiles.

Stored tables round these fits; :func:`best_fields` picks, among integer fields around the rounded fit, those
whose *expanded* levels (exactly what the kernels will read) give the smallest weighted error.
"""
from __future__ import annotations

import torch

from ...formats import tables


def nearest(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Index of the nearest level: ``x`` ``[R, g]``, ``levels`` ``[R, L]`` -> ``[R, g]``."""
    return (x[..., None] - levels[:, None, :]).abs().argmin(-1)


def weighted_error(x: torch.Tensor, w: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """``sum_k w_k (x_k - nearest level)^2`` per row ``[R]``."""
    q = levels.gather(1, nearest(x, levels))
    return (w * (x - q) ** 2).sum(-1)


def _wls(x, w, codes):
    """Weighted least squares ``x ~ s * codes - m`` per row: returns ``(s, m)`` (``m`` unclamped)."""
    sw, sx, sc = w.sum(-1), (w * x).sum(-1), (w * codes).sum(-1)
    scc, sxc = (w * codes * codes).sum(-1), (w * x * codes).sum(-1)
    det = sw * scc - sc * sc
    ok = det > 1e-30 * sw * scc
    s = torch.where(ok, (sw * sxc - sx * sc) / torch.where(ok, det, torch.ones_like(det)), torch.zeros_like(det))
    lo = torch.where(ok, (scc * sx - sc * sxc) / torch.where(ok, det, torch.ones_like(det)),
                     sx / sw.clamp_min(1e-30))
    return s, -lo


def fit_grid(x: torch.Tensor, w: torch.Tensor, bits: int, steps: int = 12) -> tuple:
    """Best weighted ``(s, m)`` per row with ``s > 0`` and ``m >= 0`` (see the module doc)."""
    cmax = (1 << bits) - 1
    lo = x.amin(-1).clamp(max=0)
    rng = (x.amax(-1) - lo).clamp_min(1e-12)
    best_s, best_m = rng / cmax, -lo
    best_e = _grid_error(x, w, best_s, best_m, cmax)
    for i in range(-2, steps):                 # candidate scales (cmax + 0.1 i) / range: llama.cpp's search idea
        codes = torch.round((x - lo[:, None]) * ((cmax + 0.1 * i) / rng)[:, None]).clamp(0, cmax)
        s, m = _wls(x, w, codes)
        s, m = s.clamp_min(1e-12), m.clamp_min(0)
        e = _grid_error(x, w, s, m, cmax)
        better = e < best_e
        best_e, best_s, best_m = (torch.where(better, a, b) for a, b in ((e, best_e), (s, best_s), (m, best_m)))
    return best_s, best_m


def _grid_error(x, w, s, m, cmax):
    q = (torch.round((x + m[:, None]) / s[:, None]).clamp(0, cmax)) * s[:, None] - m[:, None]
    return (w * (x - q) ** 2).sum(-1)


def fit_entries(x: torch.Tensor, w: torch.Tensor, n: int, iters: int = 10) -> torch.Tensor:
    """Weighted 1-D k-means per row: ``n`` sorted levels ``[R, n]``, started at the (2i+1)/2n quantiles."""
    q = torch.arange(1, 2 * n, 2, dtype=x.dtype, device=x.device) / (2 * n)
    c = torch.quantile(x, q, dim=-1).T.contiguous()
    for _ in range(iters):
        c = _lloyd_step(x, w, c)
    return c.sort(-1).values


def _lloyd_step(x, w, c):
    onehot = torch.nn.functional.one_hot(nearest(x, c), c.shape[-1]).to(x.dtype) * w[..., None]
    num, den = (onehot * x[..., None]).sum(1), onehot.sum(1)
    return torch.where(den > 0, num / den.clamp_min(1e-30), c)


def plan_grids(fits: torch.Tensor, form: str, table_bits: int, dtype: torch.dtype) -> torch.Tensor:
    """Per-row grid constants ``tgrid`` ``[N, 2]`` (in ``dtype``) from the unconstrained fits of all the row's
    groups ``fits`` ``[N, G, 2]`` (grid: ``(s, m)``) or ``[N, G, E]`` (entries): the grid spans every fit."""
    tmax = (1 << table_bits) - 1
    if form == "grid":
        d = fits.amax(1) / tmax                                 # [N, 2]: scale step, min step
    else:
        lo, hi = fits.amin((1, 2)), fits.amax((1, 2))
        d = torch.stack([lo, (hi - lo) / tmax], 1)
    d = d.to(dtype)
    tiny = torch.finfo(dtype).tiny
    if form == "grid":
        d = torch.where(d > 0, d, torch.full_like(d, tiny))
    else:
        d[:, 1] = torch.where(d[:, 1] > 0, d[:, 1], torch.full_like(d[:, 1], tiny))
    return d


def best_fields(x: torch.Tensor, w: torch.Tensor, kind: str, form: str, bits: int, table_bits: int,
                tgrid: torch.Tensor, fit: torch.Tensor, refine: int = 2) -> torch.Tensor:
    """Integer fields ``[R, E]`` near ``fit`` (``[R, 2]`` grid or ``[R, E]`` entries, unconstrained) whose
    expanded levels minimize the weighted error of ``x``; ``tgrid`` ``[R, 2]`` (the rows' grids)."""
    tmax = (1 << table_bits) - 1
    g = tgrid.float()
    if form == "grid":
        base = torch.stack([torch.round(fit[:, 0] / g[:, 0]).clamp(1, tmax),
                            torch.round(fit[:, 1] / g[:, 1]).clamp(0, tmax)], 1)
        best_f, best_e = base, None
        for ds in (-1, 0, 1):
            for dm in (-1, 0, 1):
                f = torch.stack([(base[:, 0] + ds).clamp(1, tmax), (base[:, 1] + dm).clamp(0, tmax)], 1)
                e = weighted_error(x, w, levels(kind, form, bits, f, tgrid))
                if best_e is None:
                    best_e, best_f = e, f
                else:
                    better = e < best_e
                    best_e, best_f = torch.where(better, e, best_e), torch.where(better[:, None], f, best_f)
        return best_f.long()
    c = fit
    best_f, best_e = None, None
    for _ in range(refine + 1):                # round, then re-centre each entry on its rounded cluster, repeat
        f = torch.round((c - g[:, :1]) / g[:, 1:]).clamp(0, tmax)
        lv = levels(kind, form, bits, f, tgrid)
        e = weighted_error(x, w, lv)
        if best_e is None:
            best_e, best_f = e, f
        else:
            better = e < best_e
            best_e, best_f = torch.where(better, e, best_e), torch.where(better[:, None], f, best_f)
        c = _lloyd_step(x, w, lv)
    return best_f.long()


def levels(kind: str, form: str, bits: int, fields: torch.Tensor, tgrid: torch.Tensor) -> torch.Tensor:
    """The ``2**b`` values codes take, exactly as the expanded tables give them: ``[R, 2**b]`` fp32."""
    t = tables.expand_fields(kind, form, bits, fields[:, None, :], tgrid)
    if kind == "lut":
        return t[0][:, 0].float()
    s, z = t[0][:, 0].float(), t[1][:, 0].float()
    c = torch.arange(1 << bits, dtype=torch.float32, device=fields.device)
    return (c - z[:, None]) * s[:, None]
