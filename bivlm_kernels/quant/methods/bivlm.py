"""Bi-VLM (Wang et al., AAAI-26, arXiv 2509.18763): Gaussian-quantile partition + saliency-aware hybrid binarization.

No official code exists and the method section was not available (PAPERS.md §1), so this is our most plausible
reading, with every unknown a config field. Per matrix:

* **Partition.** ``mu``, ``sigma`` of the weights (scope ``stats_scope``); ``p_uns = (1 - p_sal) / n_inlier``;
  thresholds ``z_k = Phi^-1((1 + k p_uns) / 2)``, ``k = 0..n_inlier`` (``z_0 = 0``); inlier band
  ``U_k = {z_(k-1) sigma < |w - mu| <= z_k sigma}``, each of Gaussian mass ``p_uns``; salient
  ``S = {|w - mu| > z_n sigma}``, the two-sided tail of mass ``p_sal`` (``saliency="zscore"``), or the top ``p_sal``
  share of ``w^2 / d^2`` (``saliency="hessian"``, BiLLM's metric; bands then partition the rest).
  Example: ``p_sal = 0.01``, ``n_inlier = 3`` -> 0.426 sigma, 0.954 sigma, 2.576 sigma.
* **Hybrid binarization.** Band ``U_k``: ``mu + alpha_k sign(w - mu)`` with one shared ``alpha_k`` (``mean|w - mu|``
  over the band, scope ``inlier_scope``), so the inliers take the ``2 n_inlier`` values ``{mu +- alpha_k}``.
  Salient: residual binarization of order ``salient_order`` with per-row ``(mu, alpha)`` per block (more
  precision: ``2**order`` values of their own).
* **Compensation.** GPTQ-style (``compensation="gptq"``): scalers of a block are fixed at the block start from the
  current weights, then columns are quantized one by one and each column's error is pushed onto the rest
  through ``U`` (upper Cholesky of ``H^-1``); ``"block"`` quantizes a block at once (BiLLM-style), ``"off"`` none.

**Packed form (ours).** A (row, group) has ``L = 2 n_inlier + 2**salient_order`` possible values but the 2-bit lut
holds 4. When ``L <= 4`` (e.g. ``n_inlier=1, salient_order=1``) the codebook is exactly the Bi-VLM values. Otherwise
the ``L`` levels are merged, per (row, group) and at the block start, into the 4-entry codebook minimizing the
weighted squared error (optimal contiguous 1-D clustering, ``merge_levels``; weights = Hessian-weighted counts of
the elements at each level); every weight is then coded by its Bi-VLM level's cluster, and compensation sees
these packed values, so ``dequantize()`` *is* the algorithm's output. With the default ``n_inlier=2`` the 4 inlier
levels ``mu +- alpha_1, mu +- alpha_2`` are one natural codebook and the rare salient levels mostly fold into the
outer band (widening it).

**Salient codes.** A weight that is salient when it is coded takes the *nearest* entry of its group's codebook,
not its residual level's cluster: the residual levels are fitted, per row, to the salient weights of the block
start, and compensation pushes other weights past the salient threshold later. With the level rule, a -3 sigma
weight in a row whose only salient weight was +3 sigma took +3 sigma's level (a sign flip; 3.3 % of the salient
codes on three real SmolLM2 down_proj layers), and which weights flipped depended on the last bits of the
arithmetic: SmolLM2 layer 2's down_proj (two input channels ~1000x the mean Hessian diagonal) came out at a
relative error of 0.047 or 0.153 under 1e-6 perturbations of its Hessian, and the testbed perplexity at 2 bits
anywhere from 187 to 6577 by machine (issue 29; tests/test_quality_guards.py pins it now). Honest cost: 2 + 64/g bits per weight in fp16 (2.5 at g = 128), no perm.
``info`` records the empirical share of each band and of the salient set, both of the weights as given
(``initial_*``: the partition itself) and at quantization time (``band_shares``, ``salient_share``,
``salient_count``; with compensation the weights absorb errors and drift outward, so these differ), the intended
masses and the thresholds.
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
                      residual_binarize, residual_levels, rounded)


@dataclasses.dataclass
class BiVLMConfig(MethodConfig):
    """Bi-VLM options. **Every default below is ours, not the paper's** (PAPERS.md §1 table, [I]):

    * ``p_sal`` 0.01: salient share (the reported LM outlier share; 0.05 for a vision tower), in (0, 0.2);
    * ``n_inlier`` 2: inlier bands (the inlier codebook then fits 2 bits), 1..4;
    * ``stats_scope`` "row": where ``mu, sigma`` are measured ("row", "matrix" = the paper's per-layer reading,
      "block" = per ``blocksize`` columns), on the weights before compensation. Chosen by measurement
      (``benchmarks/results/method_errors.md``): with one ``sigma`` per matrix, rows of small weights fall
      entirely into the inner band and get ~1 bit (SmolLM2 L0.o_proj: 0.40 relative error vs 0.08 per row);
      per-row ``mu`` and ``alpha_k`` cost nothing here, since codebooks are per row anyway;
    * ``saliency`` "zscore": ``|w - mu| / sigma`` (or "hessian": ``w^2 / d^2`` as BiLLM);
    * ``salient_order`` 2: residual binarization order of the salient weights, per row per block, 1..3;
    * ``inlier_scope`` "row": one ``alpha_k`` per band per row per block of ``blocksize`` columns ("block": shared
      by all rows of a block, the PAPERS.md table's reading; "matrix": one per band); chosen by measurement too;
    * ``compensation`` "gptq" (GPTQ-style, ``blocksize`` 128, ``percdamp`` 0.01), or "block", or "off";
    * ``merge_weight`` "hessian": how levels are weighted when more than 4 must share a 2-bit codebook ("count");
    * ``bits`` 2, ``group_size`` 128: the packed lut segment (``group_size`` must divide ``blocksize``);
    * ``bits`` 1: the sub-2-bit layout (:func:`bivlm_columns`): the ``salient_col_share`` (0.1) of the input
      columns that hold the most salient weights at 2 bits, the rest binarized; ``n_inlier``, ``inlier_scope``
      and ``merge_weight`` do not apply (one band per (row, group): one bit has no room for a band mask).
    """
    bits: int = 2
    salient_col_share: float = 0.1
    p_sal: float = 0.01
    n_inlier: int = 2
    stats_scope: str = "row"
    saliency: str = "zscore"
    salient_order: int = 2
    inlier_scope: str = "row"
    compensation: str = "gptq"
    blocksize: int = 128
    percdamp: float = 0.01
    merge_weight: str = "hessian"
    layer_name: Optional[str] = None   # only for warning messages


def band_thresholds(p_sal: float, n_inlier: int) -> torch.Tensor:
    """``z_0 .. z_n`` (in units of sigma): ``z_k = Phi^-1((1 + k p_uns) / 2)``, ``p_uns = (1 - p_sal) / n``."""
    p_uns = (1.0 - p_sal) / n_inlier
    k = torch.arange(n_inlier + 1, dtype=torch.float64)
    z = torch.special.ndtri((1.0 + k * p_uns) / 2.0)
    z[0] = 0.0
    return z.float()


def _stats(W: torch.Tensor, scope: str, blocksize: int):
    """``mu``, ``sigma`` broadcastable to ``W`` for the chosen scope."""
    if scope == "matrix":
        return W.mean().view(1, 1), W.std().clamp_min(1e-12).view(1, 1)
    if scope == "row":
        return W.mean(1, keepdim=True), W.std(1, keepdim=True).clamp_min(1e-12)
    mu, sd = torch.empty(1, W.shape[1], device=W.device), torch.empty(1, W.shape[1], device=W.device)
    for s in range(0, W.shape[1], blocksize):
        b = W[:, s:s + blocksize]
        mu[:, s:s + blocksize], sd[:, s:s + blocksize] = b.mean(), b.std().clamp_min(1e-12)
    return mu, sd


def _membership(w, mu, sd, z, sal_thr, d):
    """Band index 0..n-1 for inliers, n for salient, for weights ``w`` ``[N, m]`` (``d`` ``[m]`` for hessian)."""
    n = z.numel() - 1
    t = (w - mu).abs() / sd
    band = torch.bucketize(t, z[1:-1].contiguous(), right=False).clamp_(max=n - 1)   # (z_{k-1}, z_k] -> k-1
    if sal_thr is None:
        sal = t > z[-1]
    else:
        sal = (w ** 2 / d[None, :] ** 2) > sal_thr
    return torch.where(sal, torch.full_like(band, n), band)


def _residual_assign(w, mus, alphas):
    """Level index of ``w`` ``[N, m]`` under fixed residual-binarization params ``[o, N]`` (ties -> +1)."""
    idx = torch.zeros(w.shape, dtype=torch.long, device=w.device)
    r = w
    for i in range(mus.shape[0]):
        s = (r - mus[i][:, None]) >= 0
        idx = idx * 2 + s.long()
        r = r - mus[i][:, None] - alphas[i][:, None] * (2 * s.float() - 1)
    return idx


def _code(w, salient, level, codebook, cmap):
    """Codebook index of weights ``w`` ``[N, m]`` of one group: an inlier takes its level's entry (``cmap``
    ``[N, L]`` of ``level``), a ``salient`` one the entry of ``codebook`` ``[N, 4]`` nearest to it (the residual
    levels fit only the salient weights of the block start; see "Salient codes" in the module docstring)."""
    near = (w[:, :, None] - codebook[:, None, :]).abs().argmin(-1)
    return torch.where(salient, near, cmap.gather(1, level))


def bivlm_quantize(W: torch.Tensor, H: Optional[torch.Tensor], cfg: BiVLMConfig) -> QuantizedWeight:
    """Bi-VLM on ``W`` ``[N, K]`` (``H`` may be None when nothing needs it); returns the packed weight."""
    N, K = W.shape
    g, bs, n, o = cfg.group_size, cfg.blocksize, cfg.n_inlier, cfg.salient_order
    check_k(K, g)
    dev = W.device
    if H is not None:
        W, U, hinfo = prepare_hessian(W, H, cfg.percdamp, name=cfg.layer_name)
        dead, pd, dU = hinfo["dead"], hinfo["percdamp"], torch.diag(U)
    else:
        W, U, dead, pd, dU = W.clone().float(), None, 0, None, torch.ones(K, device=dev)
    z = band_thresholds(cfg.p_sal, n).to(dev)
    mu, sd = _stats(W, cfg.stats_scope, bs)
    mu_full, sd_full = mu.expand(N, K), sd.expand(N, K)
    sal_thr = None
    if cfg.saliency == "hessian":
        S = (W ** 2 / dU[None, :] ** 2).reshape(-1)
        kth = max(1, int(round((1 - cfg.p_sal) * S.numel())))
        sal_thr = S.kthvalue(kth).values
    mem0 = _membership(W, mu_full, sd_full, z, sal_thr, dU)         # the partition of the weights as given
    shares0 = (torch.bincount(mem0.reshape(-1), minlength=n + 1).double() / mem0.numel()).tolist()
    if cfg.inlier_scope == "matrix":
        dev_abs = (W - mu_full).abs()
        alpha_matrix = torch.stack([
            dev_abs[mem0 == k].mean() if (mem0 == k).any() else 0.5 * (z[k] + z[k + 1]) * sd_full.mean()
            for k in range(n)])
    codes = torch.zeros(N, K, dtype=torch.long, device=dev)
    codebook = torch.zeros(N, K // g, 4, device=dev)
    counts = torch.zeros(n + 1, dtype=torch.float64)
    loss = torch.zeros((), device=dev)
    L = 2 * n + (1 << o)
    for st in range(0, K, bs):
        ed = min(st + bs, K)
        Wb = W[:, st:ed].clone()
        mub, sdb, d = mu_full[:, st:ed], sd_full[:, st:ed], dU[st:ed]
        mem = _membership(Wb, mub, sdb, z, sal_thr, d)
        # --- scalers of this block, from its current weights
        dabs = (Wb - mub).abs()
        if cfg.inlier_scope == "matrix":
            alpha = alpha_matrix[None, :].expand(N, n)
        else:
            dim = 1 if cfg.inlier_scope == "row" else (0, 1)
            cols = []
            for k in range(n):
                m = (mem == k).float()
                cnt = m.sum(dim=dim, keepdim=cfg.inlier_scope == "row")
                fallback = 0.5 * (z[k] + z[k + 1]) * sdb.mean()     # empty band: its mid-threshold (ours)
                a = torch.where(cnt > 0, (dabs * m).sum(dim=dim, keepdim=cfg.inlier_scope == "row")
                                / cnt.clamp_min(1), fallback)
                cols.append(a.reshape(-1, 1).expand(N, 1))
            alpha = torch.cat(cols, 1)                                          # [N, n]
        _, mus, alphas, _ = residual_binarize(Wb, mem == n, o)                  # salient, per row
        # levels [N, L]: band k -> (mu - a_k, mu + a_k) at 2k, 2k+1; salient -> 2n + residual index
        mu_row = mub[:, :1]                                                     # mu is constant along a block
        inl = torch.stack([mu_row - alpha, mu_row + alpha], -1).reshape(N, 2 * n)
        levels = torch.cat([inl, residual_levels(mus, alphas)], 1)

        def level_index(w, mcol):
            band = torch.clamp(mcol, max=n - 1)
            li = 2 * band + (w >= mu_row).long()
            return torch.where(mcol == n, 2 * n + _residual_assign(w, mus, alphas), li)

        lidx = level_index(Wb, mem)
        wcol = (1.0 / d ** 2) if (cfg.merge_weight == "hessian" and H is not None) else torch.ones_like(d)
        cbs, cmaps = [], []
        for g0 in range(0, ed - st, g):
            sl = slice(g0, g0 + g)
            wts = torch.zeros(N, L, device=dev).scatter_add_(1, lidx[:, sl], wcol[sl].expand(N, -1).contiguous())
            cb, cmap = merge_levels(levels, wts, 4)
            cbs.append(rounded(cb, dtype=cfg.dtype)), cmaps.append(cmap)
            codebook[:, (st + g0) // g] = cbs[-1]

        def code_of(w, mcol, gl):
            return _code(w, mcol == n, level_index(w, mcol), cbs[gl], cmaps[gl])

        Ub = U[st:ed, st:ed] if U is not None else None
        E = torch.zeros_like(Wb)
        if cfg.compensation == "gptq":
            for i in range(ed - st):
                w = Wb[:, i:i + 1]
                mcol = _membership(w, mub[:, i:i + 1], sdb[:, i:i + 1], z, sal_thr, d[i:i + 1])
                counts += torch.bincount(mcol.reshape(-1).cpu(), minlength=n + 1).double()
                gl = i // g
                c = code_of(w, mcol, gl)
                q = cbs[gl].gather(1, c)
                codes[:, st + i] = c[:, 0]
                err = (w[:, 0] - q[:, 0]) / Ub[i, i]
                Wb[:, i:] -= err[:, None] * Ub[i, i:][None, :]
                E[:, i] = err
        else:
            counts += torch.bincount(mem.reshape(-1).cpu(), minlength=n + 1).double()
            for gl, g0 in enumerate(range(0, ed - st, g)):
                sl = slice(g0, g0 + g)
                c = code_of(Wb[:, sl], mem[:, sl], gl)
                codes[:, st + g0: st + g0 + g] = c
                E[:, sl] = (Wb[:, sl] - cbs[gl].gather(1, c)) / d[None, sl]
        loss += (E ** 2).sum() / 2
        if cfg.compensation != "off" and U is not None:
            W[:, ed:] -= E @ U[st:ed, ed:]
    seg = QuantizedSegment(2, codes, codebook=codebook.to(cfg.dtype))
    qw = QuantizedWeight([seg], g)
    shares = (counts / counts.sum()).tolist()
    p_uns = (1 - cfg.p_sal) / n
    qw.info.update(method="bivlm", band_shares=shares[:n], salient_share=shares[n], salient_count=int(counts[n]),
                   initial_band_shares=shares0[:n], initial_salient_share=shares0[n],
                   intended_band_share=p_uns, intended_salient_share=cfg.p_sal, thresholds_sigma=z[1:].tolist(),
                   levels_per_group=L, exact_codebook=L <= 4, bivlm_loss=float(loss), dead=dead, percdamp=pd,
                   **bits_info(qw, cfg.dtype))
    return qw


def bivlm_columns(W: torch.Tensor, H: Optional[torch.Tensor], cfg: BiVLMConfig) -> QuantizedWeight:
    """``bits=1``: the Gaussian-quantile salient set, gathered into whole columns (layout in :mod:`._salient`).

    Salient weights are found as at 2 bits (``|w - mu| > z sigma`` with ``z = Phi^-1(1 - p_sal / 2)``, or the
    top ``p_sal`` of ``w^2 / d^2``). Column ``j`` scores ``sum_rows [salient] (w - mu)^2 / d_j^2`` (the error
    binarizing its salient weights would leave, as the Hessian weighs it); the ``salient_col_share`` of K rounded
    to whole groups with the highest scores become the 2-bit segment (residual binarization of order
    ``salient_order``), the others take one ``mu +- alpha`` per (row, group). Compensation "gptq" (also what
    "block" means here) or "off"."""
    N, K = W.shape
    g = cfg.group_size
    check_k(K, g)
    comp = cfg.compensation != "off"
    if H is not None:
        W0, U0, _ = prepare_hessian(W, H, cfg.percdamp, name=cfg.layer_name)
        dU = torch.diag(U0)
    else:
        W0, dU = W.float(), torch.ones(K, device=W.device)
    mu, sd = _stats(W0, cfg.stats_scope, cfg.blocksize)
    sal_thr = None
    if cfg.saliency == "hessian":
        S = (W0 ** 2 / dU[None, :] ** 2).reshape(-1)
        sal_thr = S.kthvalue(max(1, int(round((1 - cfg.p_sal) * S.numel())))).values
    z = band_thresholds(cfg.p_sal, 1).to(W.device)
    sal = _membership(W0, mu.expand(N, K), sd.expand(N, K), z, sal_thr, dU) == 1
    score = (sal * (W0 - mu) ** 2).sum(0) / dU ** 2
    ns = round_to_groups(cfg.salient_col_share * K, K, g)
    cols = torch.topk(score, ns).indices
    qw = salient_column_quantize(W, H, cols, g, cfg.blocksize, cfg.percdamp, cfg.dtype, cfg.salient_order, comp,
                                 cfg.layer_name)
    covered = float(sal[:, cols].sum() / sal.sum().clamp_min(1))
    qw.info.update(method="bivlm", layout="salient-columns", initial_salient_share=float(sal.float().mean()),
                   salient_weights_in_salient_columns=covered)
    return qw


@register_method
class BiVLM(Method):
    """Bi-VLM (our reading, PAPERS.md §1) emitting a 2-bit lut segment (``bits=2``) or the sub-2-bit
    salient-column layout (``bits=1``); options in :class:`BiVLMConfig`."""
    name = "bivlm"
    config_cls = BiVLMConfig
    needs_hessian = True

    def validate(self) -> None:
        c = self.config
        check_config(c, self.name, (1, 2))
        if not isinstance(c.p_sal, (int, float)) or not 0 < c.p_sal < 0.2:
            raise ValueError(f"p_sal must be in (0, 0.2), got {c.p_sal!r}")
        if not isinstance(c.n_inlier, int) or isinstance(c.n_inlier, bool) or not 1 <= c.n_inlier <= 4:
            raise ValueError(f"n_inlier must be an int in 1..4, got {c.n_inlier!r}")
        if not isinstance(c.salient_order, int) or not 1 <= c.salient_order <= 3:
            raise ValueError(f"salient_order must be an int in 1..3, got {c.salient_order!r}")
        if c.bits == 1 and c.salient_order not in (1, 2):
            raise ValueError(f"bits=1 stores the salient columns in a 1- or 2-bit segment, so salient_order must be "
                             f"1 or 2; got {c.salient_order!r}")
        if not isinstance(c.salient_col_share, (int, float)) or not 0 <= c.salient_col_share <= 1:
            raise ValueError(f"salient_col_share must be in [0, 1], got {c.salient_col_share!r}")
        check_choice(c.stats_scope, "stats_scope", ("matrix", "row", "block"))
        check_choice(c.saliency, "saliency", ("zscore", "hessian"))
        check_choice(c.inlier_scope, "inlier_scope", ("block", "row", "matrix"))
        check_choice(c.compensation, "compensation", ("gptq", "block", "off"))
        check_choice(c.merge_weight, "merge_weight", ("hessian", "count"))
        if not isinstance(c.blocksize, int) or c.blocksize <= 0 or c.blocksize % c.group_size:
            raise ValueError(f"blocksize must be a positive multiple of group_size={c.group_size}, "
                             f"got {c.blocksize!r}")
        check_percdamp(c.percdamp)
        # the Hessian is needed only for compensation, Hessian saliency or Hessian-weighted merging
        self.needs_hessian = (c.compensation != "off" or c.saliency == "hessian"
                              or (c.bits == 2 and c.merge_weight == "hessian"
                                  and 2 * c.n_inlier + (1 << c.salient_order) > 4))

    def _quantize(self, W: torch.Tensor, H: Optional[torch.Tensor]) -> QuantizedWeight:
        if self.config.bits == 1:
            return bivlm_columns(W, H, self.config)
        return bivlm_quantize(W, H, self.config)
