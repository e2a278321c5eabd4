"""The sub-2-bit packed form that BiLLM and Bi-VLM emit at ``bits=1``: salient columns 2-bit, the rest 1-bit.

Both papers call their models "~1.1-bit", but they store salient weights with more bits and the inliers with one,
and they pick salient *elements* with a bitmap that costs about a bit more per weight. The packed format has no
per-element mask; it has a column permutation and segments of different widths. So at ``bits=1`` the salient set
is made of whole input columns (BiLLM's own salient set is whole columns already), moved to the front by ``perm``::

    x[..., perm]:  | salient columns (ns)          | all other columns (K - ns)                |
    segment 0:     | 2-bit lut, per (row, group):  |                                           |
                   | mu +- a1 +- a2 (order-2       |                                           |
                   | residual binarization, exact) |                                           |
    segment 1:                                     | 1-bit lut, per (row, group): mu +- alpha  |

``ns`` is a multiple of ``group_size`` (0 allowed: one 1-bit segment and no perm), so no group straddles the two
segments.
Compensation is GPTQ's, in the permuted order: a group's codebook is fixed when its first column is reached (from
the already-compensated weights), each column takes the nearest codebook value, and its error is pushed onto the
columns after it. Honest cost (fp16 tables, g = 128): ``(2.5 ns + 1.25 (K - ns)) / K + 32 / N`` bits per weight,
the last term being the int32 ``perm``; e.g. 1.33 for ns = K / 16 and N = 4096.
"""
from __future__ import annotations

from typing import Optional

import torch

from ...formats import QuantizedSegment, QuantizedWeight
from ..hessian import prepare_hessian
from ._common import bits_info, gptq_columns, residual_binarize, residual_levels, rounded


def round_to_groups(n_cols: float, k: int, group_size: int) -> int:
    """A salient column count rounded to the nearest multiple of ``group_size`` within ``[0, k]``."""
    return int(min(k, max(0, group_size * round(n_cols / group_size))))


def salient_column_quantize(W: torch.Tensor, H: Optional[torch.Tensor], salient: torch.Tensor, group_size: int,
                            blocksize: int = 128, percdamp: float = 0.01, dtype: torch.dtype = torch.float16,
                            salient_order: int = 2, compensation: bool = True,
                            name: Optional[str] = None) -> QuantizedWeight:
    """Quantize ``W`` ``[N, K]`` into the layout above; ``salient`` holds the salient column indices (their count a
    multiple of ``group_size``). ``H`` may be None only with ``compensation=False``. ``info`` records the loss."""
    N, K = W.shape
    sal = torch.unique(salient.long().to(W.device))
    ns = sal.numel()
    if ns % group_size or ns > K:
        raise ValueError(f"the salient column count ({ns}) must be a multiple of group_size ({group_size}) "
                         f"and at most in_features ({K})")
    rest = torch.ones(K, dtype=torch.bool, device=W.device)
    rest[sal] = False
    perm = torch.cat([sal, torch.nonzero(rest)[:, 0]])
    if compensation:
        W, U, hinfo = prepare_hessian(W, H, percdamp, perm=perm, name=name)
    else:
        W, U, hinfo = W.float()[:, perm].clone(), None, {}
    books = {}                                   # group index -> codebook [N, 2 or 4]

    def new_group(col, cur):
        order = salient_order if col < ns else 1
        _, mus, alphas, _ = residual_binarize(cur, torch.ones_like(cur, dtype=torch.bool), order)
        levels = rounded(residual_levels(mus, alphas), dtype)        # [N, 2**order], the stored values
        books[col // group_size] = levels
        return levels, lambda w: (w[:, None] - levels).abs().argmin(1)

    codes, loss = gptq_columns(W, U, group_size, blocksize, new_group)
    segs = []
    for k0, k1, bits in ((0, ns, salient_order), (ns, K, 1)):
        if k1 > k0:
            cb = torch.stack([books[gi] for gi in range(k0 // group_size, k1 // group_size)], 1)
            segs.append(QuantizedSegment(bits, codes[:, k0:k1], codebook=cb.to(dtype)))
    # no salient column: the order is the identity, so store no perm (it would cost 32 / N bits for nothing)
    qw = QuantizedWeight(segs, group_size, perm=perm.to(torch.int32) if ns else None)
    qw.info.update(salient_columns=ns, salient_column_share=ns / K, gptq_loss=loss, **hinfo,
                   **bits_info(qw, dtype))
    return qw
