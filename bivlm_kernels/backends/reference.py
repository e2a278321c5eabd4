"""The reference backend: pure PyTorch, fp32 math (dequantize, then ``F.linear``). The oracle every kernel is
tested against, and the fallback where no compiled path runs. Registered when the package is imported."""
from __future__ import annotations

import torch

from .. import formats
from ..ops import dispatch
from ..ops.dispatch import sum_segments

def _linear_fp32(x, w, bias, out_dtype):
    y = torch.nn.functional.linear(x.float(), w, None if bias is None else bias.float())
    return y.to(out_dtype or x.dtype)


def lut_linear(x, qweight, codebook, bits, group_size, bias=None, out_dtype=None):
    return _linear_fp32(x, formats.dequantize_lut(qweight, codebook, bits, group_size), bias, out_dtype)


def affine_linear(x, qweight, scales, zeros, bits, group_size, bias=None, out_dtype=None):
    w = formats.dequantize_affine(qweight, scales, zeros, bits, group_size)
    return _linear_fp32(x, w, bias, out_dtype)


def dequantize_lut(qweight, codebook, bits, group_size):
    return formats.dequantize_lut(qweight, codebook, bits, group_size).to(codebook.dtype)


def dequantize_affine(qweight, scales, zeros, bits, group_size):
    return formats.dequantize_affine(qweight, scales, zeros, bits, group_size).to(scales.dtype)


def segmented_lut_linear(x, perm, qweights, codebooks, bits, group_size, bias=None, out_dtype=None):
    """x[..., perm], then the segments' fp32 products summed, bias added in fp32, rounded once."""
    return sum_segments(lut_linear, x, perm, qweights, codebooks, bits, group_size, bias, out_dtype)


for _name in dispatch.ALL_OP_NAMES:
    dispatch.register_backend_kernel(_name, "reference", globals()[_name])
