"""Refitting a layer's compressed tables after GPTQ, with the codes held fixed (GTQ's ``refit`` option).

GPTQ picks each group's table *before* coding the group, from weights that later columns' compensation no longer
sees. Once every code is known, the layer's output error is a quadratic in the table values alone: per row ``n``

    w_hat = A p        A [K, P]: column k of the row uses only its group's parameters
    grid    p = (s_j, m_j) per group j,       w_hat_k = c_k * s_j - m_j
    entries p = (e_j0 .. e_j,L-1) per group,  w_hat_k = e_j,c_k

    err(p) = (w - A p)^T H (w - A p)           the objective GPTQ itself minimizes (H = the layer's Hessian)

so the best tables solve ``(A^T H A) p = A^T H w`` (P = 2 G or L G unknowns per row, a few dozen). They are then
stored as integer fields on the row's grid (``tgrid``) by GPTQ's own rounding in parameter space: fields are
rounded one at a time and each rounding error is compensated on the fields not yet rounded, through the
Cholesky factor of ``(A^T H A)^-1``. A row keeps its new fields only if its exact error (the expanded levels the
kernels read) went down, so the refit never makes a row worse.
"""
from __future__ import annotations

import torch

from ..hessian import fix_dead_inputs
from ._tablefit import levels


def _gram_grid(C: torch.Tensor, H: torch.Tensor, hw: torch.Tensor, g: int):
    """Normal equations for ``w_hat = c * s - m``: ``C`` codes ``[R, K]`` fp32, ``hw = w H`` ``[R, K]``.
    Returns ``(Gm [R, P, P], b [R, P])`` with parameters ordered ``(s_0, m_0, s_1, m_1, ...)``."""
    R, K = C.shape
    G = K // g
    Cb = C.view(R, G, g)
    Hb = H.view(K, G, g)
    # Y[r, k, h] = sum_b H[k, (h, b)] c[r, (h, b)]: one batched matmul over the groups h
    Y = torch.bmm(Hb.permute(1, 0, 2), Cb.permute(1, 2, 0)).permute(2, 1, 0)        # [R, K, G]
    Yb = Y.reshape(R, G, g, G)
    ss = torch.einsum("rja,rjah->rjh", Cb, Yb)                                       # sum c_a H_ab c_b
    ms = -Yb.sum(2)                                     # ms[r, j, h] = -sum_{a in j, b in h} H_ab c_b: m_j, s_h
    mm = H.view(G, g, G, g).sum((1, 3))                                              # sum H_ab
    Gm = torch.empty(R, G, 2, G, 2, dtype=C.dtype, device=C.device)
    Gm[:, :, 0, :, 0] = ss
    Gm[:, :, 1, :, 0] = ms
    Gm[:, :, 0, :, 1] = ms.transpose(1, 2)
    Gm[:, :, 1, :, 1] = mm
    hb = hw.view(R, G, g)
    b = torch.stack([(Cb * hb).sum(-1), -hb.sum(-1)], -1)                            # [R, G, 2]
    return Gm.view(R, 2 * G, 2 * G), b.view(R, 2 * G)


def _gram_entries(C: torch.Tensor, H: torch.Tensor, hw: torch.Tensor, g: int, L: int):
    """Normal equations for ``w_hat_k = e[j, c_k]``; parameters ordered ``(e_00 .. e_0,L-1, e_10, ...)``."""
    R, K = C.shape
    G = K // g
    O = torch.nn.functional.one_hot(C.long(), L).to(H.dtype).view(R, G, g, L)
    Hb = H.view(K, G, g)
    # Y[r, k, h, m] = sum_b H[k, (h, b)] [c_(h, b) == m]
    Y = torch.bmm(Hb.permute(1, 0, 2), O.permute(1, 2, 0, 3).reshape(G, g, R * L))   # [G, K, R*L]
    Y = Y.view(G, G, g, R, L).permute(3, 1, 2, 0, 4)                                 # [R, j, a, h, m]
    Gm = torch.einsum("rjal,rjahm->rjlhm", O, Y)
    b = torch.einsum("rjal,rja->rjl", O, hw.view(R, G, g))
    return Gm.reshape(R, G * L, G * L), b.reshape(R, G * L)


def refit_fields(W: torch.Tensor, H: torch.Tensor, codes: torch.Tensor, fields: torch.Tensor,
                 tgrid: torch.Tensor, kind: str, form: str, bits: int, g: int, table_bits: int,
                 chunk: int = 64, damp: float = 1e-4):
    """New fields ``[N, G, E]`` for ``codes`` ``[N, K]`` (see the module doc), and the per-row exact errors
    ``(before [N], after [N])``. ``W``/``H`` in the codes' column order; ``tgrid`` ``[N, 2]``."""
    W, H, _ = fix_dead_inputs(W, H)
    N, K = W.shape
    G = K // g
    L = 1 << bits
    tmax = (1 << table_bits) - 1
    t = tgrid.float()
    out = fields.clone()
    before = torch.empty(N, device=W.device)
    after = torch.empty(N, device=W.device)
    for r0 in range(0, N, chunk):
        r1 = min(r0 + chunk, N)
        w, c, f0, tg = W[r0:r1], codes[r0:r1].float(), fields[r0:r1].float(), t[r0:r1]
        R = r1 - r0
        hw = w @ H
        if form == "grid":
            Gm, b = _gram_grid(c, H, hw, g)
            step = tg.repeat(1, G)                                # s on tgrid[:, 0], m on tgrid[:, 1]
            off = torch.zeros_like(step)
            lo = torch.tensor([1.0, 0.0], device=W.device).repeat(G)
            p0 = f0.reshape(R, -1) * step
        else:
            Gm, b = _gram_entries(c, H, hw, g, L)
            step = tg[:, 1:].expand(R, G * L)
            off = tg[:, :1].expand(R, G * L)
            lo = torch.zeros(G * L, device=W.device)
            p0 = off + f0.reshape(R, -1) * step
        P = Gm.shape[-1]
        dg = torch.diagonal(Gm, dim1=1, dim2=2)
        reg = damp * dg.mean(-1, keepdim=True) + 1e-12
        A = Gm + torch.diag_embed(reg.expand(R, P))               # pulled gently towards the current tables
        p = p0 + torch.linalg.solve(A, (b - (Gm @ p0[..., None])[..., 0])[..., None])[..., 0]
        # GPTQ in parameter space: U^T U = A^-1, round in order, push each error onto the rest
        U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(A)), upper=True)
        f = torch.empty_like(p)
        for i in range(P):
            f[:, i] = torch.round((p[:, i] - off[:, i]) / step[:, i]).clamp(lo[i], tmax)
            err = (p[:, i] - (off[:, i] + f[:, i] * step[:, i])) / U[:, i, i]
            p[:, i + 1:] -= err[:, None] * U[:, i, i + 1:]
        f = f.long().view(R, G, -1)
        e0 = _exact_error(w, H, c, f0.long(), tgrid[r0:r1], kind, form, bits)
        e1 = _exact_error(w, H, c, f, tgrid[r0:r1], kind, form, bits)
        better = e1 < e0
        out[r0:r1] = torch.where(better[:, None, None], f, fields[r0:r1])
        before[r0:r1], after[r0:r1] = e0, torch.minimum(e0, e1)
    return out, before, after


def _exact_error(w, H, c, f, tgrid, kind, form, bits):
    """``(w - w_hat) H (w - w_hat)^T`` per row with ``w_hat`` from the expanded tables (what the kernels read)."""
    R, G, E = f.shape
    lv = levels(kind, form, bits, f.reshape(R * G, E), tgrid.repeat_interleave(G, 0))     # [R * G, 2**b]
    d = w - lv.gather(1, c.long().view(R * G, -1)).view(R, -1)
    return ((d @ H) * d).sum(-1)
