"""Shared math of the methods: option checks, min-max grids, residual binarization, codebook level merging."""
from __future__ import annotations

import itertools
from typing import Sequence

import torch

from ... import formats


def check_config(cfg, method: str, allowed_bits: Sequence[int]) -> None:
    """ValueError naming the option for a bits / group_size / dtype the method or the format does not support."""
    if not isinstance(cfg.bits, int) or isinstance(cfg.bits, bool) or cfg.bits not in allowed_bits:
        raise ValueError(f"bits={cfg.bits!r} is not supported by method {method!r}; allowed: {list(allowed_bits)}")
    formats.check_group_size(cfg.group_size, bits=cfg.bits)
    if cfg.dtype not in formats.FLOAT_DTYPES:
        raise ValueError(f"dtype={cfg.dtype!r} is not supported; allowed: {list(formats.FLOAT_DTYPES)}")


def check_choice(value, name: str, choices) -> None:
    """ValueError naming the option when ``value`` is not one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not supported; allowed: {list(choices)}")


def check_percdamp(percdamp) -> None:
    """GPTQ's Hessian damping, as a fraction of the mean diagonal: a number in [0, 1)."""
    if not isinstance(percdamp, (int, float)) or not 0 <= percdamp < 1:
        raise ValueError(f"percdamp must be in [0, 1), got {percdamp!r}")


def check_k(k: int, group_size: int) -> None:
    if k % group_size:
        raise ValueError(f"in_features ({k}) must be a multiple of group_size ({group_size}); "
                         f"pick group_size from {[g for g in formats.GROUP_SIZES if k % g == 0] or 'none'}")


def rounded(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` as the layer will store it (``dtype``), back in fp32: methods compensate the *stored* values."""
    return x.to(dtype).float()


def grid_levels(lo: torch.Tensor, scale: torch.Tensor, bits: int, kind: str, dtype: torch.dtype) -> torch.Tensor:
    """The ``2**bits`` values a grid can take per row, exactly as dequantization will produce them: ``[N, 2**b]``."""
    c = torch.arange(1 << bits, dtype=torch.float32, device=lo.device)
    if kind == "lut":
        return rounded(lo + scale * c, dtype)
    s, z = rounded(scale, dtype), rounded(-lo / scale, dtype)
    return (c - z) * s


def grid_quantize(x: torch.Tensor, lo: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Nearest grid code (round to nearest, clamped) for ``x`` ``[N, m]`` on grid ``(lo, scale)`` ``[N, 1]``."""
    return torch.round((x - lo) / scale).clamp_(0, (1 << bits) - 1).long()


def gptq_columns(W: torch.Tensor, U, group_size: int, blocksize: int, new_group):
    """GPTQ's column loop, shared by every method that codes columns one by one against per-group codebooks.

    ``W`` ``[N, K]`` fp32 is updated in place (it receives the compensation); ``U`` is the upper Cholesky factor of
    ``H^-1`` in the same column order, or None for no compensation. When column ``col`` starts a group,
    ``new_group(col, cur)`` gets the group's current (already compensated) weights ``cur`` ``[N, g]``, possibly
    reaching past this block, and returns ``(levels [N, L], code_of)``: the values the packed layer will produce
    and a function from a column ``[N]`` to its codes ``[N]``. Each column's error ``(w - q) / U_jj`` is pushed
    onto the rest of its block at once and onto later blocks once per block (lazy batch update).
    Returns ``(codes [N, K], loss)`` with ``loss = sum err^2 / 2`` (0 without compensation).
    """
    N, K = W.shape
    codes = torch.zeros(N, K, dtype=torch.long, device=W.device)
    loss = torch.zeros((), device=W.device)
    levels = code_of = None
    for i1 in range(0, K, blocksize):
        i2 = min(i1 + blocksize, K)
        W1 = W[:, i1:i2].clone()
        E1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            col = i1 + i
            if col % group_size == 0:
                levels, code_of = new_group(col, torch.cat([W1[:, i:], W[:, i2:]], 1)[:, :group_size])
            w = W1[:, i]
            c = code_of(w)
            codes[:, col] = c
            if U is None:
                continue
            q = levels.gather(1, c[:, None])[:, 0]
            err = (w - q) / U[col, col]
            loss += (err ** 2).sum() / 2
            W1[:, i:] -= err[:, None] * U[col, col:i2][None, :]
            E1[:, i] = err
        if U is not None:
            W[:, i2:] -= E1 @ U[i1:i2, i2:]
    return codes, float(loss)


def residual_binarize(x: torch.Tensor, mask: torch.Tensor, order: int):
    """BiLLM ``high_order_residual``: per row, ``order`` rounds of ``mu = mean R``, ``alpha = mean|R - mu|``,
    ``B = alpha * sign(R - mu) + mu``, ``R <- R - B`` over the masked entries (rows with none: mu = alpha = 0).

    Returns ``(approx, mus, alphas, signs)``: ``approx`` ``[N, M]`` (zero outside ``mask``; ``sign(0) = 0`` as
    in the reference), ``mus``/``alphas`` ``[order, N]``, ``signs`` ``[order, N, M]`` in {-1, 0, 1}.
    """
    m = mask.float()
    cnt = m.sum(1)
    safe = cnt.clamp_min(1)
    out = torch.zeros_like(x)
    mus, alphas, signs = [], [], []
    for _ in range(order):
        r = (x - out) * m
        mu = torch.where(cnt > 0, r.sum(1) / safe, torch.zeros_like(cnt))
        c = (r - mu[:, None]) * m
        alpha = torch.where(cnt > 0, c.abs().sum(1) / safe, torch.zeros_like(cnt))
        s = torch.sign(c)
        out = out + (alpha[:, None] * s + mu[:, None]) * m
        mus.append(mu), alphas.append(alpha), signs.append(s * m)
    return out, torch.stack(mus), torch.stack(alphas), torch.stack(signs)


def residual_levels(mus: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor:
    """The ``2**order`` values residual binarization can produce per row, ``[N, 2**order]``; level index
    ``sum_i 2**(order-1-i) * [s_i > 0]`` (first round's sign is the most significant bit)."""
    order = mus.shape[0]
    base = mus.sum(0)
    lv = []
    for bits in itertools.product((0, 1), repeat=order):
        v = base.clone()
        for i, b in enumerate(bits):
            v = v + (alphas[i] if b else -alphas[i])
        lv.append(v)
    return torch.stack(lv, 1)


def residual_level_index(signs: torch.Tensor) -> torch.Tensor:
    """Level index (see :func:`residual_levels`) of every element from its signs ``[order, N, M]``.
    A zero sign (an exact tie with the mean) is read as +1: the packed format has no 'mean' code."""
    order = signs.shape[0]
    idx = torch.zeros(signs.shape[1:], dtype=torch.long, device=signs.device)
    for i in range(order):
        idx = idx * 2 + (signs[i] >= 0).long()
    return idx


_COMBOS: dict = {}


def _cut_combos(n_levels: int, n_out: int, device) -> torch.Tensor:
    key = (n_levels, n_out, str(device))
    if key not in _COMBOS:
        combos = list(itertools.combinations(range(1, n_levels), n_out - 1))
        _COMBOS[key] = torch.tensor(combos, dtype=torch.long, device=device).reshape(len(combos), n_out - 1)
    return _COMBOS[key]


def merge_levels(levels: torch.Tensor, weights: torch.Tensor, n_out: int):
    """Best ``n_out``-entry codebook for values that take one of ``L`` known levels, per row.

    ``levels`` ``[R, L]`` (any order, duplicates allowed), ``weights`` ``[R, L] >= 0`` (how much each level
    matters: element count or Hessian-weighted count). With ``L <= n_out`` the codebook holds the levels exactly.
    Otherwise the sorted levels are split into ``n_out`` contiguous clusters minimizing the weighted squared
    error (exhaustive over the ``C(L-1, n_out-1)`` cut sets, which is optimal for 1-D clustering), each
    represented by its weighted mean (plain mean when its weight is 0). Returns ``(codebook [R, n_out]``
    ascending, ``code [R, L]`` the codebook index of every input level).
    """
    R, L = levels.shape
    if L <= n_out:
        order = torch.argsort(levels, 1)
        sl = torch.gather(levels, 1, order)
        cb = torch.cat([sl, sl[:, -1:].expand(R, n_out - L)], 1)
        code = torch.empty_like(order)
        code.scatter_(1, order, torch.arange(L, device=levels.device).expand(R, L))
        return cb, code
    order = torch.argsort(levels, 1)
    sl = torch.gather(levels, 1, order)
    sw = torch.gather(weights, 1, order).clamp_min(0)
    # prefix sums over sorted levels: weight, weighted value, weighted square, count, plain value
    z = torch.zeros(R, 1, dtype=sl.dtype, device=sl.device)
    cw = torch.cat([z, sw.cumsum(1)], 1)
    cwx = torch.cat([z, (sw * sl).cumsum(1)], 1)
    cwxx = torch.cat([z, (sw * sl * sl).cumsum(1)], 1)
    cx = torch.cat([z, sl.cumsum(1)], 1)
    combos = _cut_combos(L, n_out, levels.device)                       # [C, n_out - 1]
    C = combos.shape[0]
    starts = torch.cat([torch.zeros(C, 1, dtype=torch.long, device=levels.device), combos], 1)   # [C, n_out]
    ends = torch.cat([combos, torch.full((C, 1), L, dtype=torch.long, device=levels.device)], 1)

    def seg(p):  # p [R, L+1] prefix -> [R, C, n_out] segment sums
        return p[:, ends] - p[:, starts]

    w, wx, wxx = seg(cw), seg(cwx), seg(cwxx)
    cost = (wxx - wx * wx / w.clamp_min(1e-30)).clamp_min(0).sum(-1)     # [R, C]
    best = cost.argmin(1)                                                 # [R]
    bs, be = starts[best], ends[best]                                     # [R, n_out]
    rows = torch.arange(R, device=levels.device)[:, None]
    wsum = cw[rows, be] - cw[rows, bs]
    mean_w = (cwx[rows, be] - cwx[rows, bs]) / wsum.clamp_min(1e-30)
    mean_x = (cx[rows, be] - cx[rows, bs]) / (be - bs).to(sl.dtype)
    cb = torch.where(wsum > 0, mean_w, mean_x)
    # sorted position j belongs to cluster #(cuts <= j)
    pos = torch.arange(L, device=levels.device)
    sorted_code = (combos[best][:, :, None] <= pos[None, None, :]).sum(1)  # [R, L]
    code = torch.empty_like(sorted_code)
    code.scatter_(1, order, sorted_code)
    return cb, code


def bits_info(qw, dtype: torch.dtype) -> dict:
    """``info`` keys every method records: nominal code bits and honest bits per weight (``formats`` counting:
    codes, codebooks/scales/zeros in ``dtype``, perm; bias excluded)."""
    spec = qw.layer_spec()
    return {"nominal_bits": spec.nominal_bits, "honest_bits": spec.bits_per_weight(dtype)}
