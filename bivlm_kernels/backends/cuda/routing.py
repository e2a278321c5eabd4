"""Routing of the CUDA backend's ``lut_linear`` / ``affine_linear`` to the tensor-core kernels (``bivlm_cuda::tc_linear``),
and of ``segmented_lut_linear`` (the sub-2-bit layout: perm, a 2-bit and a 1-bit segment) to the one-launch
segmented kernel (``bivlm_cuda::seg_tc_linear``).

A call goes to a tensor-core kernel when the format is one they cover (lut 1 or 2 bits, affine 4, g = 64 or 128,
fp16 / bf16 tables), 1 <= M <= 16 rows of x, and ``BIVLM_CUDA_TC`` is not ``0``. Its operands are the load-time
"tc1" / "tc2" / "tc4" repack of the
layer's v1 buffers (:mod:`bivlm_kernels.repack`), built on the first call and cached while those buffers are
unchanged (:mod:`bivlm_kernels.backends.repack_cache`): about the size of the packed weight once more, on the GPU (the 1-bit
repack's table is twice the format's: D in fp32 beside the two entries).

Importable without the compiled extension (the routing and the repack are pure PyTorch), so CPU tests exercise
everything but the kernel: :func:`reference_tc_linear` is the op's meaning on the repacked operands.
"""
from __future__ import annotations

import os

import torch

from ... import formats
from .. import reference, repack_cache
from . import tc_repack

MAX_M = 16          # csrc/cuda/bivlm_kernels.h kGemvMaxM
enabled = os.environ.get("BIVLM_CUDA_TC", "1") != "0"


def tc_operands(x: torch.Tensor, qweight: torch.Tensor, tables, bits: int, group_size: int):
    """(qtc, table) when this call goes to the tensor-core kernel, else None. ``tables``: (codebook,) or
    (scales, zeros). Arguments already checked."""
    k = x.shape[-1]
    if not enabled or not tc_repack.tc_supported(bits, group_size, tables[0].dtype) or k == 0:
        return None
    if not 1 <= x.numel() // k <= MAX_M:
        return None
    return _repacked(bits, qweight, tables, k, group_size)


def _repacked(bits, qweight, tables, k, group_size):
    """The cached tensor-core repack of one weight (one cache entry whichever op asks for it)."""
    return repack_cache.get(f"tc{bits}", (qweight, *tables),
                            lambda: tc_repack.repack_tables(bits, qweight, tables, k, group_size))


def _kernel_perm(perm):
    """perm as the segmented kernel reads it (int32, contiguous, 16-byte aligned: a fresh copy), checked once to
    be a permutation (the kernel clamps entries to K but would compute with a wrong one) and cached."""
    def build():
        formats.check_perm(perm, perm.numel())
        return torch.empty(perm.numel(), dtype=torch.int32, device=perm.device).copy_(perm)
    return repack_cache.get("perm32", (perm,), build)


def reference_tc_linear(x, qtc, table, n, k, bits, group_size, bias=None, out_dtype=None):
    """What ``tc_linear`` computes: the reference op of the un-repacked weight."""
    if bits == 4:
        qweight, scales, zeros = tc_repack.unrepack_tc4(qtc, table, n, k, group_size)
        return reference.affine_linear(x, qweight, scales, zeros, bits, group_size, bias, out_dtype)
    qweight, codebook = tc_repack.unrepack_tc(qtc, table, n, k, group_size, bits)
    return reference.lut_linear(x, qweight, codebook, bits, group_size, bias, out_dtype)


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


def seg_operands(x, perm, qweights, codebooks, bits, group_size):
    """(perm int32, qtc2, table2, qtc1, table1, k2, k1) when the segmented kernel covers this call, else None: the
    segments are [2-bit, 1-bit], [2-bit] or [1-bit] lut (the layout BiLLM and Bi-VLM emit at bits=1), in a format
    the tensor-core kernels cover, 1 <= M <= 16. The repacks are the ones lut_linear's route caches (same tags)."""
    k = x.shape[-1]
    bits = list(bits)
    if not enabled or bits not in ([2, 1], [2], [1]) or k == 0 or not 1 <= x.numel() // k <= MAX_M:
        return None
    if not tc_repack.tc_supported(1, group_size, codebooks[0].dtype):
        return None
    segs = {2: None, 1: None}
    for qw, cb, b in zip(qweights, codebooks, bits):
        ks = cb.shape[1] * group_size
        segs[b] = (_repacked(b, qw, (cb,), ks, group_size), ks)
    if perm is not None:
        perm = _kernel_perm(perm)
    (q2, t2), k2 = segs[2] if segs[2] else ((None, None), 0)
    (q1, t1), k1 = segs[1] if segs[1] else ((None, None), 0)
    return perm, q2, t2, q1, t1, k2, k1


def reference_seg_tc_linear(x, perm, qtc2, table2, qtc1, table1, n, k2, k1, group_size, bias=None,
                            out_dtype=None):
    """What ``seg_tc_linear`` computes: the reference segmented op of the un-repacked segments."""
    qweights, codebooks, bits = [], [], []
    for qtc, table, ks, b in ((qtc2, table2, k2, 2), (qtc1, table1, k1, 1)):
        if ks:
            qw, cb = tc_repack.unrepack_tc(qtc, table, n, ks, group_size, b)
            qweights.append(qw), codebooks.append(cb), bits.append(b)
    return reference.segmented_lut_linear(x, perm, qweights, codebooks, bits, group_size, bias, out_dtype)


def routed_segmented_lut_linear(seg_kernel, by_parts):
    """The cuda backend's segmented_lut_linear: ``seg_kernel`` (the seg_tc_linear signature) where it applies,
    else ``by_parts`` (the segmented_lut_linear signature: per-segment lut_linear calls summed in fp32)."""
    def segmented_lut_linear(x, perm, qweights, codebooks, bits, group_size, bias=None, out_dtype=None):
        rep = seg_operands(x, perm, qweights, codebooks, bits, group_size)
        if rep is None:
            return by_parts(x, perm, qweights, codebooks, bits, group_size, bias, out_dtype)
        return seg_kernel(x, *rep[:5], qweights[0].shape[0], rep[5], rep[6], group_size, bias, out_dtype)
    return segmented_lut_linear
