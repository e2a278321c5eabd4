"""The one interface every quantization method implements, and the registry that names them.

``get_method("gptq", bits=4, group_size=128).quantize(W, H)`` returns a
:class:`~bivlm_kernels.formats.QuantizedWeight` (integer codes + codebooks or scales/zeros, optional column
permutation and mixed-bit segments) that ``QuantLinear.from_quantized`` packs. Methods are pure math on one
weight matrix; the layer-sequential driver (Hessians, model walking) lives elsewhere.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from ..formats import QuantizedWeight


@dataclasses.dataclass
class MethodConfig:
    """Options shared by every method; subclasses add their own fields (with documented defaults)."""
    bits: int = 2
    group_size: int = 128
    dtype: torch.dtype = torch.float16     # dtype of the emitted codebooks / scales


class Method:
    """Base class: subclasses set ``name``, ``config_cls`` and ``needs_hessian`` and implement ``_quantize``."""
    name: str = ""
    config_cls = MethodConfig
    needs_hessian: bool = False

    def __init__(self, **options):
        fields = {f.name for f in dataclasses.fields(self.config_cls)}
        unknown = sorted(set(options) - fields)
        if unknown:
            raise ValueError(f"unknown option(s) {unknown} for method {self.name!r}; allowed: {sorted(fields)}")
        self.config = self.config_cls(**options)
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the option and allowed values for an unsupported configuration."""

    def quantize(self, W: torch.Tensor, H: Optional[torch.Tensor] = None) -> QuantizedWeight:
        """Quantize ``W`` ``[N, K]`` given the input Hessian ``H`` ``[K, K]`` (``2/n * X^T X``, fp32)."""
        if W.dim() != 2:
            raise ValueError(f"W must be 2-D [out_features, in_features], got shape {tuple(W.shape)}")
        if not torch.isfinite(W).all():
            raise ValueError("W contains NaN or inf")
        if self.needs_hessian:
            if H is None:
                raise ValueError(f"method {self.name!r} needs a Hessian (calibration data); got H=None")
            if H.shape != (W.shape[1], W.shape[1]):
                raise ValueError(f"H must be [{W.shape[1]}, {W.shape[1]}], got {tuple(H.shape)}")
        return self._quantize(W.float(), None if H is None else H.float())

    def _quantize(self, W: torch.Tensor, H: Optional[torch.Tensor]) -> QuantizedWeight:
        raise NotImplementedError


METHODS: dict = {}


def register_method(cls):
    """Class decorator: make a method available by its ``name``."""
    METHODS[cls.name] = cls
    return cls


def get_method(name: str, **options) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; available: {sorted(METHODS)}")
    return METHODS[name](**options)
