"""GPTQ (Frantar et al., 2023; IST-DASLab/gptq): column-by-column quantization with Hessian error compensation.

Per column ``j`` (in act-order if asked): quantize, ``err = (w_j - q_j) / U_jj``, subtract ``err * U_j,j+1:`` from
the remaining columns of the block; after each block of ``blocksize`` columns push the block's errors to all later
columns at once (lazy batch update). ``U`` is the upper Cholesky factor of ``(H + damp I)^-1``. The grid of a
group is chosen when the group's first column is reached, from the already-updated weights (standard GPTQ).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from ...formats import QuantizedSegment, QuantizedWeight
from ...formats.rtn import minmax_grid
from ..base import Method, MethodConfig, register_method
from ..hessian import prepare_hessian
from ._common import (bits_info, check_config, check_k, check_percdamp, gptq_columns, grid_levels, grid_quantize,
                      rounded)


@dataclasses.dataclass
class GPTQConfig(MethodConfig):
    """GPTQ options. ``bits`` 1 (lut ``mu +- alpha``, RTN's binarizer), 2 (lut codebook of the 4 grid levels) or
    4 (affine); ``group_size`` 128 by default.

    ``blocksize`` 128 and ``percdamp`` 0.01 are the reference defaults; ``act_order`` (False) quantizes columns
    in decreasing ``diag(H)`` order and then emits ``perm`` with the groups formed in permuted order (the
    reference's non-static-groups behaviour; the packed format stores exactly that). The grid is min-max with a
    float zero (ours: the reference rounds the zero to an integer and forces 0 into the range; our format stores
    a float zero, and the same grid as RTN makes GPTQ-vs-RTN a test of compensation alone).
    """
    bits: int = 4
    blocksize: int = 128
    percdamp: float = 0.01
    act_order: bool = False
    layer_name: Optional[str] = None   # only for warning messages (the driver may set it per layer)


def gptq_quantize(W: torch.Tensor, H: torch.Tensor, bits: int = 4, group_size: int = 128, blocksize: int = 128,
                  percdamp: float = 0.01, act_order: bool = False, dtype: torch.dtype = torch.float16,
                  name: Optional[str] = None) -> QuantizedWeight:
    """GPTQ on ``W`` ``[N, K]`` with Hessian ``H`` ``[K, K]``; returns the packed-format result (see module doc)."""
    N, K = W.shape
    check_k(K, group_size)
    kind = "lut" if bits in (1, 2) else "affine"
    perm = None
    if act_order:
        d = torch.diag(H).clone()
        d[d == 0] = 1          # as the reference: dead columns get H_jj = 1 before sorting
        perm = torch.argsort(d, descending=True)
    W, U, hinfo = prepare_hessian(W, H, percdamp, perm=perm, name=name)
    G = K // group_size
    los = torch.zeros(N, G, device=W.device)
    scales = torch.zeros(N, G, device=W.device)
    books = torch.zeros(N, G, 1 << bits, device=W.device) if kind == "lut" else None

    def new_group(col, cur):
        gi = col // group_size
        if bits == 1:      # RTN's binarizer: (mu - alpha, mu + alpha), code 1 where w >= mu
            mu = cur.mean(1, keepdim=True)
            alpha = (cur - mu).abs().mean(1, keepdim=True)
            levels = rounded(torch.cat([mu - alpha, mu + alpha], 1), dtype)
            code_of = lambda w: (w >= mu[:, 0]).long()             # noqa: E731
        else:
            lo, sc = minmax_grid(cur, bits)
            levels = grid_levels(lo, sc, bits, kind, dtype)
            los[:, gi], scales[:, gi] = lo[:, 0], sc[:, 0]
            code_of = lambda w: grid_quantize(w[:, None], lo, sc, bits)[:, 0]   # noqa: E731
        if kind == "lut":
            books[:, gi] = levels        # exactly the values the packed layer will produce
        return levels, code_of

    codes, loss = gptq_columns(W, U, group_size, blocksize, new_group)
    if kind == "lut":
        seg = QuantizedSegment(bits, codes, codebook=books.to(dtype))
    else:
        seg = QuantizedSegment(bits, codes, scales=scales.to(dtype), zeros=(-los / scales).to(dtype))
    qw = QuantizedWeight([seg], group_size, perm=None if perm is None else perm.to(torch.int32))
    qw.info.update(method="gptq", act_order=act_order, gptq_loss=loss, **hinfo, **bits_info(qw, dtype))
    return qw


@register_method
class GPTQ(Method):
    """GPTQ with lazy block updates and optional act-order; options in :class:`GPTQConfig`."""
    name = "gptq"
    config_cls = GPTQConfig
    needs_hessian = True

    def validate(self) -> None:
        c = self.config
        check_config(c, self.name, (1, 2, 4))
        if not isinstance(c.blocksize, int) or c.blocksize <= 0:
            raise ValueError(f"blocksize must be a positive int, got {c.blocksize!r}")
        check_percdamp(c.percdamp)

    def _quantize(self, W: torch.Tensor, H: Optional[torch.Tensor]) -> QuantizedWeight:
        c = self.config
        return gptq_quantize(W, H, c.bits, c.group_size, c.blocksize, c.percdamp, c.act_order, c.dtype, c.layer_name)
