"""Pack / unpack of the code words and the fp32 dequantizers (the oracle of every kernel); layout drawn in
:mod:`bivlm_kernels.formats`."""
from __future__ import annotations

from typing import Optional

import torch

from .spec import check_bits, check_group_size, check_int, packed_width

# ---------------------------------------------------------------------------------------------------------
# pack / unpack
# ---------------------------------------------------------------------------------------------------------

def _shifts(bits: int, device) -> torch.Tensor:
    return torch.arange(0, 32, bits, dtype=torch.int64, device=device)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes ``[N, K]`` (values in ``0 .. 2**bits - 1``) into int32 ``[N, ceil(K*bits/32)]``.

    Any K works (the tail of the last word is zero). Raises ``ValueError`` on codes out of range.
    """
    check_bits(bits)
    if not isinstance(codes, torch.Tensor) or codes.dim() != 2:
        raise ValueError(f"codes must be a 2-D tensor [N, K], got "
                         f"{tuple(codes.shape) if isinstance(codes, torch.Tensor) else type(codes).__name__}")
    if codes.dtype.is_floating_point or codes.dtype == torch.bool or codes.is_complex():
        raise TypeError(f"codes must be an integer tensor, got {codes.dtype}")
    n, k = codes.shape
    c = codes.to(torch.int64)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= (1 << bits)):
        raise ValueError(f"codes must lie in [0, {(1 << bits) - 1}] for bits={bits}; "
                         f"got min {int(c.min())}, max {int(c.max())}")
    per_word = 32 // bits
    words = packed_width(k, bits)
    c = torch.nn.functional.pad(c, (0, words * per_word - k)).view(n, words, per_word)
    packed = (c << _shifts(bits, c.device)).sum(-1)          # disjoint bit fields: sum == bitwise or
    # Values up to 2**32 - 1 live in int64; reinterpret the low 32 bits as int32 (two's complement).
    packed = torch.where(packed >= 2 ** 31, packed - 2 ** 32, packed)
    return packed.to(torch.int32)


def unpack(qweight: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of :func:`pack`: int32 ``[N, W]`` -> int64 codes ``[N, k]``."""
    check_bits(bits)
    check_int(k, "k", minimum=0)
    if qweight.dtype != torch.int32:
        raise TypeError(f"qweight must be int32, got {qweight.dtype}")
    if qweight.dim() != 2 or qweight.shape[1] != packed_width(k, bits):
        raise ValueError(f"qweight must have shape [N, {packed_width(k, bits)}] for k={k}, bits={bits}; "
                         f"got {tuple(qweight.shape)}")
    mask = (1 << bits) - 1
    # Mask after the (sign-extending) shift, so negative words unpack correctly.
    codes = (qweight.to(torch.int64).unsqueeze(-1) >> _shifts(bits, qweight.device)) & mask
    return codes.reshape(qweight.shape[0], qweight.shape[1] * (32 // bits))[:, :k]   # explicit: N may be 0


# ---------------------------------------------------------------------------------------------------------
# dequantize (fp32, the oracle for every kernel)
# ---------------------------------------------------------------------------------------------------------

def _check_grouped(codes: torch.Tensor, table: torch.Tensor, group_size: int, table_name: str) -> tuple:
    """``codes`` ``[N, K]`` integer with K a multiple of ``group_size``; ``table`` ``[N, K / g, ...]``."""
    if codes.dim() != 2 or codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise ValueError(f"codes must be a 2-D integer tensor [N, K], got {codes.dtype} {tuple(codes.shape)}")
    check_group_size(group_size)
    n, k = codes.shape
    if k % group_size or tuple(table.shape[:2]) != (n, k // group_size):
        raise ValueError(f"codes {tuple(codes.shape)} and {table_name} {tuple(table.shape)} do not match: "
                         f"K must be a multiple of group_size={group_size} and {table_name} [N, K / g, ...]")
    return n, k


def _lut_gather(codes: torch.Tensor, codebook: torch.Tensor, group_size: int) -> torch.Tensor:
    n, k = codes.shape
    idx = codes.long().view(n, k // group_size, group_size)
    return torch.gather(codebook.float(), 2, idx).view(n, k)


def lut_values(codes: torch.Tensor, codebook: torch.Tensor, group_size: int) -> torch.Tensor:
    """Unpacked codes ``[N, K]`` -> fp32 ``w[n, k] = codebook[n, k // g, code[n, k]]``.

    Codes outside ``0 .. codebook.shape[-1] - 1`` are a ``ValueError`` (not an index error inside gather)."""
    _check_grouped(codes, codebook, group_size, "codebook")
    if codebook.dim() != 3:
        raise ValueError(f"codebook must be 3-D [N, K / g, 2**bits], got {tuple(codebook.shape)}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= codebook.shape[-1]):
        raise ValueError(f"codes must lie in [0, {codebook.shape[-1] - 1}] for a codebook of "
                         f"{codebook.shape[-1]} entries; got min {int(codes.min())}, max {int(codes.max())}")
    return _lut_gather(codes, codebook, group_size)


def affine_values(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """Unpacked codes ``[N, K]`` -> fp32 ``w[n, k] = (code - zeros[n, k // g]) * scales[n, k // g]``."""
    n, k = _check_grouped(codes, scales, group_size, "scales")
    if tuple(zeros.shape) != tuple(scales.shape) or scales.dim() != 2:
        raise ValueError(f"scales and zeros must both be [N, K / g], got {tuple(scales.shape)} and "
                         f"{tuple(zeros.shape)}")
    c = codes.float().view(n, k // group_size, group_size)
    return ((c - zeros.float().unsqueeze(-1)) * scales.float().unsqueeze(-1)).view(n, k)


def dequantize_lut(qweight: torch.Tensor, codebook: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Packed lut weight -> fp32 ``[N, K]`` with ``K = codebook.shape[1] * g``."""
    k = codebook.shape[1] * group_size
    return _lut_gather(unpack(qweight, bits, k), codebook, group_size)     # unpacked codes are in range


def dequantize_affine(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                      group_size: int) -> torch.Tensor:
    """Packed affine weight -> fp32 ``[N, K]`` with ``K = scales.shape[1] * g``."""
    k = scales.shape[1] * group_size
    return affine_values(unpack(qweight, bits, k), scales, zeros, group_size)


def unpermute(w_perm: torch.Tensor, perm: Optional[torch.Tensor]) -> torch.Tensor:
    """Weight columns in permuted order -> original order (column ``perm[j]`` of W is column ``j`` of w_perm)."""
    if perm is None:
        return w_perm
    w = torch.empty_like(w_perm)
    w[:, perm.long()] = w_perm
    return w
