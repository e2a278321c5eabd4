"""Routing of the CUDA backend's ``lut_linear`` / ``affine_linear`` to the tensor-core kernels (``bivlm_cuda::tc_linear``).

A call goes to a tensor-core kernel when the format is one they cover (lut 1 or 2 bits, affine 4, g = 64 or 128,
fp16 / bf16 tables), 1 <= M <= 16 rows of x, and ``BIVLM_CUDA_TC`` is not ``0``. Its operands are the load-time
"tc1" / "tc2" / "tc4" repack of the
layer's v1 buffers (:mod:`bivlm_kernels.repack`), built on the first call and cached while those buffers are
unchanged (:mod:`bivlm_kernels.repack_cache`): about the size of the packed weight once more, on the GPU (the 1-bit
repack's table is twice the format's: D in fp32 beside the two entries).

Importable without the compiled extension (the routing and the repack are pure PyTorch), so CPU tests exercise
everything but the kernel: :func:`reference_tc_linear` is the op's meaning on the repacked operands.
"""
from __future__ import annotations

import os

import torch

from . import ops, repack, repack_cache

MAX_M = 16          # csrc/bivlm_kernels.h kGemvMaxM
enabled = os.environ.get("BIVLM_CUDA_TC", "1") != "0"


def tc_operands(x: torch.Tensor, qweight: torch.Tensor, tables, bits: int, group_size: int):
    """(qtc, table) when this call goes to the tensor-core kernel, else None. ``tables``: (codebook,) or
    (scales, zeros). Arguments already checked."""
    k = x.shape[-1]
    if not enabled or not repack.tc_supported(bits, group_size, tables[0].dtype) or k == 0:
        return None
    if not 1 <= x.numel() // k <= MAX_M:
        return None
    return repack_cache.get(f"tc{bits}", (qweight, *tables),
                            lambda: repack.repack_tables(bits, qweight, tables, k, group_size))


def reference_tc_linear(x, qtc, table, n, k, bits, group_size, bias=None, out_dtype=None):
    """What ``tc_linear`` computes: the reference op of the un-repacked weight."""
    if bits == 4:
        qweight, scales, zeros = repack.unrepack_tc4(qtc, table, n, k, group_size)
        return ops.reference_affine_linear(x, qweight, scales, zeros, bits, group_size, bias, out_dtype)
    qweight, codebook = repack.unrepack_tc(qtc, table, n, k, group_size, bits)
    return ops.reference_lut_linear(x, qweight, codebook, bits, group_size, bias, out_dtype)


def routed_lut_linear(tc_kernel, lut_kernel):
    """The cuda backend's lut_linear: ``tc_kernel`` (the tc_linear signature) where it applies, else
    ``lut_kernel`` (the lut_linear signature)."""
    def lut_linear(x, qweight, codebook, bits, group_size, bias=None, out_dtype=None):
        rep = tc_operands(x, qweight, (codebook,), bits, group_size)
        if rep is None:
            return lut_kernel(x, qweight, codebook, bits, group_size, bias, out_dtype)
        return tc_kernel(x, rep[0], rep[1], qweight.shape[0], x.shape[-1], bits, group_size, bias, out_dtype)
    return lut_linear


def routed_affine_linear(tc_kernel, affine_kernel):
    """The cuda backend's affine_linear, routed the same way."""
    def affine_linear(x, qweight, scales, zeros, bits, group_size, bias=None, out_dtype=None):
        rep = tc_operands(x, qweight, (scales, zeros), bits, group_size)
        if rep is None:
            return affine_kernel(x, qweight, scales, zeros, bits, group_size, bias, out_dtype)
        return tc_kernel(x, rep[0], rep[1], qweight.shape[0], x.shape[-1], bits, group_size, bias, out_dtype)
    return affine_linear
