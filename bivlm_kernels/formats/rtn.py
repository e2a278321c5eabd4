"""Calibration-free encoders of the format: round to nearest on a per-group min-max grid (2 and 4 bits) and
mean / abs-mean sign binarization (1 bit). ``QuantLinear.from_linear`` and the RTN method use them; GPTQ uses the
same grid (:func:`minmax_grid`), so RTN and GPTQ differ only in error compensation."""
from __future__ import annotations

import torch

from .spec import check_bits, check_group_size
from .weight import QuantizedSegment, QuantizedWeight


def minmax_grid(x: torch.Tensor, bits: int):
    """Per-row min-max uniform grid of ``2**bits`` levels over the columns of ``x`` ``[N, g]`` (lowest level =
    min, highest = max, float zero). Returns fp32 ``(lo, scale)`` ``[N, 1]``."""
    qmax = (1 << bits) - 1
    lo, hi = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
    scale = ((hi - lo) / qmax).clamp_min(1e-8)
    return lo, scale


def rtn_quantize(w: torch.Tensor, bits: int, group_size: int, dtype: torch.dtype = torch.float16
                 ) -> QuantizedWeight:
    """Round-to-nearest (2/4 bits) or mean/abs-mean sign binarization (1 bit) per group of ``group_size``."""
    kind = check_bits(bits)
    n, k = w.shape
    check_group_size(group_size, k)
    wg = w.float().reshape(n, k // group_size, group_size)
    if bits == 1:
        mu = wg.mean(-1, keepdim=True)
        alpha = (wg - mu).abs().mean(-1, keepdim=True)
        codes = (wg >= mu).to(torch.int64)
        seg = QuantizedSegment(1, codes.view(n, k), codebook=torch.cat([mu - alpha, mu + alpha], -1).to(dtype))
        return QuantizedWeight([seg], group_size)
    lo, scale = minmax_grid(wg.reshape(-1, group_size), bits)
    lo, scale = lo.view(n, -1, 1), scale.view(n, -1, 1)
    qmax = (1 << bits) - 1
    codes = torch.round((wg - lo) / scale).clamp_(0, qmax).to(torch.int64).view(n, k)
    if kind == "lut":
        levels = lo + scale * torch.arange(qmax + 1, dtype=torch.float32, device=w.device)
        return QuantizedWeight([QuantizedSegment(bits, codes, codebook=levels.to(dtype))], group_size)
    return QuantizedWeight([QuantizedSegment(bits, codes, scales=scale.squeeze(-1).to(dtype),
                                             zeros=(-lo / scale).squeeze(-1).to(dtype))], group_size)
