"""RTN: round-to-nearest per group, no calibration data (the baseline every calibrated method must beat)."""
from __future__ import annotations

from typing import Optional

import torch

from ...formats import QuantizedWeight
from ...formats.rtn import rtn_quantize
from ..base import Method, MethodConfig, register_method
from ._common import bits_info, check_config, check_k


@register_method
class RTN(Method):
    """Per group of ``group_size`` columns and per row, without a Hessian:

    * 1 bit: sign binarization around the group mean, codebook ``(mu - alpha, mu + alpha)`` with
      ``alpha = mean|w - mu|`` (the L1-optimal scale for fixed signs), code 1 where ``w >= mu``;
    * 2 bits: uniform min-max grid of 4 levels, stored as a lut codebook;
    * 4 bits: min-max affine, ``w = (code - zero) * scale`` with a float zero.

    This is exactly :func:`bivlm_kernels.nn.rtn_quantize` (what ``QuantLinear.from_linear`` uses).
    """
    name = "rtn"
    config_cls = MethodConfig
    needs_hessian = False

    def validate(self) -> None:
        check_config(self.config, self.name, (1, 2, 4))

    def _quantize(self, W: torch.Tensor, H: Optional[torch.Tensor]) -> QuantizedWeight:
        check_k(W.shape[1], self.config.group_size)
        qw = rtn_quantize(W, self.config.bits, self.config.group_size, self.config.dtype)
        qw.info.update(method=self.name, **bits_info(qw, self.config.dtype))
        return qw
