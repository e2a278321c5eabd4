"""BiLLM (Huang et al., ICML 2024; ``Aaronhuang-778/BiLLM`` @ f7f9e14): a faithful port, plus its packed form.

Per block of ``blocksize`` (128) columns, on the block's current weights ``W_b`` and ``d = diag(U)`` (``U`` the
upper Cholesky factor of ``H^-1``), exactly as ``BRAGPTQ.fasterquant`` with ``method=braq``, ``metric=hessian``:

1. saliency ``S = W_b^2 / d^2``;
2. salient columns: the ``i`` (1..49) of the top-50 columns by ``sum_rows |S|`` minimizing
   ``MSE(S, braq2(S, m3) + braq2(S, ~m3))``; salient = whole columns (``mask3``);
3. bell-shaped split: ``p`` among the 81 quantiles q = 0.10, 0.11, ..., 0.90 of ``|S * ~m3|`` (salient zeros
   included) minimizing ``MSE(S, braq1(S, m1) + braq1(S, m2) + braq2(S, m3))`` with ``m2 = |S| >= p``,
   ``m1 = |S| < p`` (both outside ``m3``);
4. the masks apply to ``W_b``: ``Q = braq_o1(W_b, m1) + braq_o2(W_b, m2) + braq_o3(W_b, m3)``, orders (1, 1, 2),
   per-row ``(mu, alpha)`` per mask (residual binarization), all columns at once (no intra-block update);
5. ``E = (W_b - Q) / d``; ``W[:, e:] -= E @ U[s:e, e:]`` (errors reach later blocks only).

**Packed form (ours).** Per row and block BiLLM uses 8 values: ``mu_1 +- a_1`` (m1), ``mu_2 +- a_2`` (m2) and
``mu_3 + mu_3' +- a_3 +- a_3'`` (m3), and every weight needs a 3-way mask choice plus its sign(s). The packed
format gives a group of ``group_size`` columns one codebook of at most 4 values per row, and salient column
counts (1..49 per block) are not multiples of a group (>= 32), so no layout reproduces all 8 values exactly.
We store one 2-bit lut segment (no perm): per (row, group) the 8 BiLLM levels are merged into the 4-entry
codebook that minimizes the Hessian-weighted squared error (optimal contiguous 1-D clustering of 8 points,
weights ``sum 1/d_j^2`` of the elements at each level, see ``merge_levels``); each weight gets the code of its
level's cluster. Where a (row, group) uses at most 4 distinct levels the codebook is BiLLM's values exactly.
With ``feedback=True`` (default, ours) the block's *packed* values drive the compensation of later blocks, so
the layer compensates the error it actually makes; ``feedback=False`` propagates BiLLM's own values, so that
``dequantized`` is bit-for-bit the reference algorithm. Honest cost: 2 code bits + 4 codebook entries per
(row, group), e.g. 2.5 bits/weight at g = 128 in fp16 (3.0 at g = 64); BiLLM's own accounting is recorded beside
it (``billm_param_bits = 1 + r_sal``, ``billm_physical_bits`` = signs + fp16 scalers + bitmap + column flags).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from ...formats import QuantizedSegment, QuantizedWeight
from ..base import Method, MethodConfig, register_method
from ..hessian import prepare_hessian
from ._salient import round_to_groups, salient_column_quantize
from ._common import (bits_info, check_choice, check_config, check_k, check_percdamp, merge_levels,
                      residual_binarize, residual_level_index, residual_levels, rounded)


@dataclasses.dataclass
class BiLLMConfig(MethodConfig):
    """BiLLM options; reference defaults unless marked *ours*.

    ``blocksize`` 128, ``percdamp`` 0.01, ``salient_metric`` "hessian" (or "magnitude": ``S = W``),
    ``up_lim`` 50 (top columns searched), ``orders`` (1, 1, 2) for (m1, m2, m3), ``disable_gptq`` False (True:
    BiLLM's RTN variant, no compensation). ``bits`` 2 and ``group_size`` 128 describe the packed segment
    (*ours*: 2 bits is the smallest lut holding the mask split; ``group_size`` must divide ``blocksize``);
    ``bits=1`` is the sub-2-bit layout (salient columns 2-bit, the rest 1-bit, :func:`billm_columns`).
    ``feedback`` True (*ours*, see module doc), ``merge_weight`` "hessian" (*ours*; or "count").
    """
    bits: int = 2
    blocksize: int = 128
    percdamp: float = 0.01
    salient_metric: str = "hessian"
    up_lim: int = 50
    orders: tuple = (1, 1, 2)
    disable_gptq: bool = False
    feedback: bool = True
    merge_weight: str = "hessian"
    layer_name: Optional[str] = None   # only for warning messages


@dataclasses.dataclass
class BiLLMResult:
    qweight: QuantizedWeight        # the packed form
    dequantized: torch.Tensor       # BiLLM's own fake-quant weight [N, K] (fp32, before the level merge)


# ----------------------------------------------------------------------------------------------- searches
def _braq(x: torch.Tensor, mask: torch.Tensor, order: int) -> torch.Tensor:
    """Residual binarization values over the last dim, any leading (batch) dims; zero outside the mask."""
    m = mask.to(x.dtype)
    cnt = m.sum(-1, keepdim=True)
    safe = cnt.clamp_min(1)
    out = torch.zeros(torch.broadcast_shapes(x.shape, m.shape), dtype=x.dtype, device=x.device)
    for _ in range(order):
        r = (x - out) * m
        mu = torch.where(cnt > 0, r.sum(-1, keepdim=True) / safe, 0.0)
        c = (r - mu) * m
        alpha = torch.where(cnt > 0, c.abs().sum(-1, keepdim=True) / safe, 0.0)
        out = out + (alpha * torch.sign(c) + mu) * m
    return out


def _mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return ((a - b) ** 2).mean(dim=(-2, -1))


def salient_columns(S: torch.Tensor, up_lim: int = 50, chunk: int = 16) -> torch.Tensor:
    """``structural_searching`` part 1: boolean ``[ncols]`` of the salient columns of one block's ``S``."""
    n, m = S.shape
    up = min(up_lim, m)
    _, top = torch.topk(S.abs().sum(0), up)
    best_i, best = 1, float("inf")
    cands = list(range(1, up))
    for c0 in range(0, len(cands), chunk):
        ii = cands[c0:c0 + chunk]
        masks = torch.zeros(len(ii), 1, m, dtype=torch.bool, device=S.device)
        for j, i in enumerate(ii):
            masks[j, 0, top[:i]] = True
        err = _mse(S, _braq(S, masks, 2) + _braq(S, ~masks, 2))
        for i, e in zip(ii, err.tolist()):
            if e < best:                 # strict: the first minimum wins, as in the reference
                best, best_i = e, i
    _, cols = torch.topk(S.abs().sum(0), best_i)
    mask = torch.zeros(m, dtype=torch.bool, device=S.device)
    mask[cols] = True
    return mask


def split_value(S: torch.Tensor, m3: torch.Tensor, orders=(1, 1, 2), chunk: int = 9) -> torch.Tensor:
    """``structural_searching`` part 2: the bell-shaped split ``p`` (a 0-d tensor) for one block."""
    search = (S * ~m3).abs()
    q = torch.linspace(0.10, 0.90, 81, device=S.device)
    cands = torch.quantile(search.reshape(-1), q)
    g3 = _braq(S, m3, orders[2])
    best_p, best = cands[0], float("inf")
    for c0 in range(0, 81, chunk):
        p = cands[c0:c0 + chunk].view(-1, 1, 1)
        m2 = (search >= p) & ~m3
        m1 = (search < p) & ~m3
        err = _mse(S, _braq(S, m1, orders[0]) + _braq(S, m2, orders[1]) + g3)
        for j, e in enumerate(err.tolist()):
            if e < best:
                best, best_p = e, cands[c0 + j]
    return best_p


def billm_masks(Wb: torch.Tensor, d: torch.Tensor, metric: str = "hessian", up_lim: int = 50, orders=(1, 1, 2)):
    """``structural_guassian_distribution``: ``(mask1, mask2, mask3)`` ``[N, ncols]`` for one block."""
    S = Wb ** 2 / d[None, :] ** 2 if metric == "hessian" else Wb
    col = salient_columns(S, up_lim)
    m3 = col[None, :].expand_as(S)
    p = split_value(S, m3, orders)
    a = (S * ~m3).abs()
    return (a < p) & ~m3, (a >= p) & ~m3, m3.clone()


# ----------------------------------------------------------------------------------------------- main loop
def billm_quantize(W: torch.Tensor, H: torch.Tensor, blocksize: int = 128, percdamp: float = 0.01,
                   salient_metric: str = "hessian", up_lim: int = 50, orders=(1, 1, 2), disable_gptq: bool = False,
                   group_size: int = 128, dtype: torch.dtype = torch.float16, feedback: bool = True,
                   merge_weight: str = "hessian", layer_name: Optional[str] = None) -> BiLLMResult:
    """BiLLM on ``W`` ``[N, K]`` with Hessian ``H``: BiLLM's own weight and the packed 2-bit form (module doc)."""
    N, K = W.shape
    check_k(K, group_size)
    W, U, hinfo = prepare_hessian(W, H, percdamp, name=layer_name)
    dU = torch.diag(U)
    Q_billm = torch.zeros_like(W)
    codes = torch.zeros(N, K, dtype=torch.long, device=W.device)
    G = K // group_size
    codebook = torch.zeros(N, G, 4, device=W.device)
    n_sal = 0
    loss = torch.zeros((), device=W.device)
    for st in range(0, K, blocksize):
        ed = min(st + blocksize, K)
        Wb, d = W[:, st:ed], dU[st:ed]
        masks = billm_masks(Wb, d, salient_metric, up_lim, orders)
        n_sal += int(masks[2][0].sum())
        Qb = torch.zeros_like(Wb)
        lv, idx, off = [], torch.zeros(Wb.shape, dtype=torch.long, device=W.device), 0
        for m, o in zip(masks, orders):
            vals, mus, alphas, signs = residual_binarize(Wb, m, o)
            Qb += vals
            lv.append(residual_levels(mus, alphas))
            idx = torch.where(m, off + residual_level_index(signs), idx)
            off += 1 << o
        levels = torch.cat(lv, 1)                                   # [N, L]
        Pb = torch.zeros_like(Wb)
        wcol = (1.0 / d ** 2) if merge_weight == "hessian" else torch.ones_like(d)
        for g0 in range(0, ed - st, group_size):
            sl = slice(g0, g0 + group_size)
            wts = torch.zeros_like(levels).scatter_add_(1, idx[:, sl], wcol[sl].expand(N, -1).contiguous())
            cb, cmap = merge_levels(levels, wts, 4)
            cb = rounded(cb, dtype)
            c = cmap.gather(1, idx[:, sl])
            gi = (st + g0) // group_size
            codebook[:, gi] = cb
            codes[:, st + g0: st + g0 + group_size] = c
            Pb[:, sl] = cb.gather(1, c)
        Q_billm[:, st:ed] = Qb
        used = Pb if feedback else Qb
        E = (Wb - used) / d[None, :]
        loss += (E ** 2).sum() / 2
        if not disable_gptq:
            W[:, ed:] -= E @ U[st:ed, ed:]
    seg = QuantizedSegment(2, codes, codebook=codebook.to(dtype))
    qw = QuantizedWeight([seg], group_size)
    r_sal = n_sal / K
    # BiLLM's physical storage per weight (PAPERS.md 3, [I]): signs 1 + r_sal, 8 fp16 scalers per row per block,
    # mask1/mask2 bitmap on the non-salient part, one salient flag per column (amortized over rows).
    nblk = -(-K // blocksize)
    physical = 1 + r_sal + 8 * 16 * nblk / K + (1 - r_sal) + 1 / N
    P = qw.dequantize()
    qw.info.update(method="billm", salient_columns=n_sal, r_sal=r_sal, billm_param_bits=1 + r_sal,
                   billm_physical_bits=physical, feedback=feedback, billm_loss=float(loss),
                   merge_deviation=float((P - Q_billm).norm() / Q_billm.norm().clamp_min(1e-30)),
                   **hinfo, **bits_info(qw, dtype))
    return BiLLMResult(qw, Q_billm)


def billm_columns(W: torch.Tensor, H: torch.Tensor, cfg: BiLLMConfig) -> QuantizedWeight:
    """``bits=1``: BiLLM's salient-column search sets how many columns are salient, the sub-2-bit layout of
    :mod:`._salient` stores them (module doc there). Per block of the weights as given, ``salient_columns`` picks
    BiLLM's count; the total, rounded to whole groups, is taken as the top columns of ``sum_rows S`` over the whole
    matrix (the permutation is global). The bell-shaped split of the other columns needs a per-element bitmap and
    is dropped: they get one order-1 binarization per (row, group). Compensation: GPTQ's, column by column
    (``disable_gptq=True``: none)."""
    N, K = W.shape
    g = cfg.group_size
    check_k(K, g)
    W0, U0, _ = prepare_hessian(W, H, cfg.percdamp, name=cfg.layer_name)
    d = torch.diag(U0)
    S = W0 ** 2 / d[None, :] ** 2 if cfg.salient_metric == "hessian" else W0
    searched = sum(int(salient_columns(S[:, st:st + cfg.blocksize], cfg.up_lim).sum())
                   for st in range(0, K, cfg.blocksize))
    ns = round_to_groups(searched, K, g)
    sal = torch.topk(S.abs().sum(0), ns).indices
    qw = salient_column_quantize(W, H, sal, g, cfg.blocksize, cfg.percdamp, cfg.dtype, cfg.orders[2],
                                 not cfg.disable_gptq, cfg.layer_name)
    qw.info.update(method="billm", layout="salient-columns", billm_searched_columns=searched)
    return qw


@register_method
class BiLLM(Method):
    """BiLLM (faithful search and compensation) emitting a 2-bit lut segment (``bits=2``, module docstring) or the
    sub-2-bit salient-column layout (``bits=1``, :func:`billm_columns`)."""
    name = "billm"
    config_cls = BiLLMConfig
    needs_hessian = True

    def validate(self) -> None:
        c = self.config
        check_config(c, self.name, (1, 2))
        check_choice(c.salient_metric, "salient_metric", ("hessian", "magnitude"))
        check_choice(c.merge_weight, "merge_weight", ("hessian", "count"))
        if not isinstance(c.blocksize, int) or c.blocksize <= 0 or c.blocksize % c.group_size:
            raise ValueError(f"blocksize must be a positive multiple of group_size={c.group_size}, "
                             f"got {c.blocksize!r}")
        if not isinstance(c.up_lim, int) or c.up_lim < 2:
            raise ValueError(f"up_lim must be an int >= 2, got {c.up_lim!r}")
        if (not isinstance(c.orders, (tuple, list)) or len(c.orders) != 3
                or any(not isinstance(o, int) or not 1 <= o <= 3 for o in c.orders)):
            raise ValueError(f"orders must be 3 ints in 1..3 (mask1, mask2, mask3), got {c.orders!r}")
        if c.bits == 1 and c.orders[2] not in (1, 2):
            raise ValueError(f"bits=1 stores the salient columns in a 1- or 2-bit segment, so orders[2] must be 1 "
                             f"or 2; got orders={c.orders!r}")
        check_percdamp(c.percdamp)

    def _quantize(self, W: torch.Tensor, H: Optional[torch.Tensor]) -> QuantizedWeight:
        c = self.config
        if c.bits == 1:
            return billm_columns(W, H, c)
        return billm_quantize(W, H, c.blocksize, c.percdamp, c.salient_metric, c.up_lim, tuple(c.orders),
                              c.disable_gptq, c.group_size, c.dtype, c.feedback, c.merge_weight,
                              c.layer_name).qweight
