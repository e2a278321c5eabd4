"""Input Hessians of a linear layer and their preparation for GPTQ-style error compensation.

For ``y = x @ W.T`` the layer-wise objective ``||X W^T - X Q^T||^2`` has Hessian ``H = 2 X^T X`` (per input
column pair). :class:`HessianAccumulator` builds it batch by batch with the running formula of GPTQ and BiLLM;
:func:`prepare_hessian` turns it into the upper Cholesky factor of ``H^-1`` that every compensating method uses.
"""
from __future__ import annotations

import logging
import math
from typing import Optional

import torch

log = logging.getLogger(__name__)


class HessianAccumulator:
    """Running ``H = (2 / n) * sum_batches X^T X`` over calibration batches (GPTQ / BiLLM ``add_batch``).

    ``add_batch(x)`` takes activations ``x`` of shape ``[..., K]``. As in the reference code, ``n`` counts
    *sequences*, not tokens: a 3-D or higher ``x`` adds ``prod(x.shape[:-2])`` samples, a 2-D ``x`` adds one.
    Every token row enters ``X^T X``. The overall scale of ``H`` does not change GPTQ/BiLLM results (damping is
    relative to ``mean(diag H)``); only the relative weight of batches does.
    """

    def __init__(self, k: int, device=None):
        if not isinstance(k, int) or k <= 0:
            raise ValueError(f"k (in_features) must be a positive int, got {k!r}")
        self.k = k
        self.H = torch.zeros(k, k, dtype=torch.float32, device=device)
        self.n = 0

    def add_batch(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.k:
            raise ValueError(f"x's last dimension must be in_features={self.k}, got shape {tuple(x.shape)}")
        b = 1 if x.dim() <= 2 else math.prod(x.shape[:-2])
        x = x.reshape(-1, self.k).to(self.H.device, torch.float32)
        if not torch.isfinite(x).all():
            raise ValueError("calibration activations contain NaN or inf")
        # H <- H * n / (n + b); n <- n + b; H += (2 / n) X^T X   (BiLLM/GPTQ add_batch, verbatim math)
        self.H.mul_(self.n / (self.n + b))
        self.n += b
        x = math.sqrt(2.0 / self.n) * x
        self.H.addmm_(x.t(), x)


def fix_dead_inputs(W: torch.Tensor, H: torch.Tensor):
    """Inputs never active (``H_jj == 0``): ``H_jj <- 1`` and ``W[:, j] <- 0`` (GPTQ/BiLLM). Returns copies."""
    W, H = W.clone().float(), H.clone().float()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    return W, H, int(dead.sum())


def inverse_cholesky_upper(H: torch.Tensor, percdamp: float = 0.01, name: Optional[str] = None,
                           max_tries: int = 6):
    """Upper Cholesky factor ``U`` of ``(H + damp I)^-1`` (``U^T U = H^-1``), ``damp = percdamp * mean(diag H)``.

    A Hessian that is not positive definite even after damping (too few calibration tokens, fp16 activations,
    duplicated inputs) is retried with 10x more damping, up to ``max_tries`` times (ours; the reference code
    crashes), each retry logged as a warning naming the layer and the damping. If all fail, ``H`` is replaced
    by its (positive) diagonal, i.e. compensation degrades to per-column scaling. Returns ``(U, percdamp_used)``.
    """
    if not (isinstance(percdamp, (int, float)) and 0 <= percdamp):
        raise ValueError(f"percdamp must be a non-negative number, got {percdamp!r}")
    k = H.shape[0]
    mean_diag = torch.diag(H).mean()
    if not torch.isfinite(mean_diag) or mean_diag <= 0:
        mean_diag = torch.tensor(1.0, device=H.device)
    pd = float(percdamp)
    where = f"layer {name!r}" if name else "this layer"
    eye = torch.eye(k, device=H.device, dtype=H.dtype)
    for attempt in range(max_tries):
        Hd = H + (pd * mean_diag) * eye
        L, info = torch.linalg.cholesky_ex(Hd)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0 and torch.isfinite(U).all():
                return U, pd
        new_pd = max(pd * 10, 1e-6) if pd > 0 else 1e-4
        log.warning("Hessian of %s is not positive definite with percdamp=%g; retrying with percdamp=%g",
                    where, pd, new_pd)
        pd = new_pd
    log.warning("Hessian of %s is still not positive definite (percdamp=%g); falling back to its diagonal",
                where, pd)
    d = torch.diag(H).clamp_min(1e-8 * float(mean_diag)) + pd * mean_diag
    return torch.diag(d.rsqrt()), pd


def prepare_hessian(W: torch.Tensor, H: torch.Tensor, percdamp: float = 0.01, perm: Optional[torch.Tensor] = None,
                    name: Optional[str] = None):
    """Dead-input fix, optional column permutation, damping and the upper Cholesky factor of ``H^-1``.

    Returns ``(W, U, info)``: ``W`` a float32 copy (dead columns zeroed, columns in ``perm`` order if given),
    ``U`` ``[K, K]`` with ``U^T U = (H + damp I)^-1`` in the same order (GPTQ's ``Hinv``; ``d_j = U_jj``), and
    ``info`` = ``{"dead": count, "percdamp": damping used}``. Never raises on a non-PD ``H`` (see
    :func:`inverse_cholesky_upper`).
    """
    if H.shape != (W.shape[1], W.shape[1]):
        raise ValueError(f"H must be [{W.shape[1]}, {W.shape[1]}], got {tuple(H.shape)}")
    if not torch.isfinite(H).all():
        raise ValueError(f"Hessian of {name or 'this layer'} contains NaN or inf")
    W, H, dead = fix_dead_inputs(W, H)
    if perm is not None:
        W, H = W[:, perm], H[perm][:, perm]
    U, pd = inverse_cholesky_upper(H, percdamp, name)
    return W, U, {"dead": dead, "percdamp": pd}
