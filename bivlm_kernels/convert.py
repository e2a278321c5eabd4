"""Back to dense: replace every ``QuantLinear`` of a model by an ``nn.Linear`` holding its dequantized weight.

For code that needs plain layers again (fine-tuning, export, a tool that reads ``module.weight``). The result
computes what the packed model computed up to the kernel's summation order (the weight is exactly the
dequantized one), and stores full-precision weights: the memory savings are gone.
"""
from __future__ import annotations

import torch
from torch import nn

from .nn import QuantLinear

__all__ = ["dequantize_model"]


@torch.no_grad()
def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace, in place, each ``QuantLinear`` of ``model`` by an ``nn.Linear`` with the dequantized weight
    (in ``dtype``, default the layer's table dtype) and the same bias; returns ``model``. A bare
    ``QuantLinear`` passed as ``model`` is returned converted."""
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype or None, got {dtype!r}")
    if isinstance(model, QuantLinear):
        return _dense(model, dtype)
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, QuantLinear)]
    for name, ql in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, _dense(ql, dtype))
    if hasattr(model, "bivlm_quantization"):
        del model.bivlm_quantization
    return model


def _dense(ql: QuantLinear, dtype) -> nn.Linear:
    w = ql.dequantize()
    dtype = dtype or w.dtype
    lin = nn.Linear(ql.in_features, ql.out_features, bias=ql.bias is not None, device=w.device, dtype=dtype)
    lin.weight.copy_(w.to(dtype))
    if ql.bias is not None:
        lin.bias.copy_(ql.bias.to(dtype))
    lin.train(ql.training)
    return lin
