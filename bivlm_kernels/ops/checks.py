"""Argument checks of the ``bivlm`` ops: one place, used by the fakes and by every real implementation."""
from __future__ import annotations

import torch

from .. import formats

def _check_weight(kind, qweight, tables, bits, group_size):
    """Check the packed buffers of one segment; return (N, K)."""
    formats.check_bits(bits, kind)
    formats.check_group_size(group_size, bits=bits)
    if not isinstance(qweight, torch.Tensor) or qweight.dtype != torch.int32:
        raise TypeError(f"qweight must be an int32 tensor, got {getattr(qweight, 'dtype', type(qweight))}")
    first = tables[0]
    names = ("codebook",) if kind == "lut" else ("scales", "zeros")
    for name, t in zip(names, tables):
        if t.dtype not in formats.FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
        if t.dtype != first.dtype:
            raise TypeError(f"{name} dtype {t.dtype} differs from {names[0]} dtype {first.dtype}")
        if t.device != qweight.device:
            raise ValueError(f"{name} is on {t.device} but qweight is on {qweight.device}")
    if kind == "lut":
        if first.dim() != 3 or first.shape[2] != 1 << bits:
            raise ValueError(f"codebook must have shape [N, K/group_size, {1 << bits}] for bits={bits}, "
                             f"got {tuple(first.shape)}")
    else:
        if first.dim() != 2 or tables[1].shape != first.shape:
            raise ValueError(f"scales and zeros must both have shape [N, K/group_size], "
                             f"got {tuple(first.shape)} and {tuple(tables[1].shape)}")
    n, k = first.shape[0], first.shape[1] * group_size
    expect = (n, formats.packed_width(k, bits))
    if qweight.dim() != 2 or tuple(qweight.shape) != expect:
        raise ValueError(f"qweight must have shape [N, K*bits/32] = {list(expect)} for N={n}, K={k}, "
                         f"bits={bits}; got {tuple(qweight.shape)}")
    return n, k


def _check_linear(kind, x, qweight, tables, bits, group_size, bias, out_dtype):
    n, k = _check_weight(kind, qweight, tables, bits, group_size)
    _check_x(x, tables[0], n, k, bias, out_dtype)
    return n, k


def _check_x(x, table, n, k, bias, out_dtype):
    """x, bias and out_dtype of a linear op whose weight is [n, k] with tables like ``table``."""
    if not isinstance(x, torch.Tensor) or x.dtype not in formats.FLOAT_DTYPES:
        raise TypeError(f"x must be a float16, bfloat16 or float32 tensor, got {getattr(x, 'dtype', type(x))}")
    if x.dtype != table.dtype:
        raise TypeError(f"x has dtype {x.dtype} but the weight tables have {table.dtype}; "
                        f"cast one of them (e.g. layer.to({x.dtype}))")
    if x.device != table.device:
        raise ValueError(f"x is on {x.device} but the weight is on {table.device}")
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"x's last dimension must be in_features={k}, got shape {tuple(x.shape)}")
    if bias is not None:
        if bias.shape != (n,) or bias.dtype != x.dtype or bias.device != x.device:
            raise ValueError(f"bias must be [{n}] with x's dtype {x.dtype} and device {x.device}, "
                             f"got {tuple(bias.shape)} {bias.dtype} {bias.device}")
    if out_dtype is not None and out_dtype not in formats.FLOAT_DTYPES:
        raise TypeError(f"out_dtype must be None, float16, bfloat16 or float32, got {out_dtype}")


def _check_segmented(x, perm, qweights, codebooks, bits, group_size, bias, out_dtype):
    """Arguments of segmented_lut_linear; return (N, K) with K the sum of the segment widths."""
    if not isinstance(qweights, (list, tuple)) or not qweights or \
            not (len(qweights) == len(codebooks) == len(bits)):
        raise ValueError(f"qweights, codebooks and bits must be non-empty lists of one length, got "
                         f"{len(qweights) if isinstance(qweights, (list, tuple)) else type(qweights).__name__}, "
                         f"{len(codebooks)}, {len(bits)}")
    n, k = None, 0
    for i, (qw, cb, b) in enumerate(zip(qweights, codebooks, bits)):
        ni, ki = _check_weight("lut", qw, (cb,), b, group_size)
        if n is not None and ni != n:
            raise ValueError(f"segment {i} has {ni} output rows, segment 0 has {n}")
        if cb.dtype != codebooks[0].dtype:
            raise TypeError(f"codebooks[{i}] dtype {cb.dtype} differs from codebooks[0] dtype {codebooks[0].dtype}")
        n, k = ni, k + ki
    _check_x(x, codebooks[0], n, k, bias, out_dtype)
    if perm is not None:
        if perm.dtype not in (torch.int32, torch.int64) or perm.dim() != 1 or perm.numel() != k \
                or perm.device != x.device:
            raise ValueError(f"perm must be None or a 1-D int32/int64 tensor of length K={k} on {x.device}, "
                             f"got {perm.dtype} {tuple(perm.shape)} on {perm.device}")
    return n, k


def check_args(op_name: str, *args):
    """Validate the arguments of op ``op_name`` exactly as the op itself does; return (N, K)."""
    if op_name == "lut_linear":
        x, qw, cb, bits, g, bias, od = args
        return _check_linear("lut", x, qw, (cb,), bits, g, bias, od)
    if op_name == "affine_linear":
        x, qw, s, z, bits, g, bias, od = args
        return _check_linear("affine", x, qw, (s, z), bits, g, bias, od)
    if op_name == "segmented_lut_linear":
        return _check_segmented(*args)
    if op_name == "dequantize_lut":
        qw, cb, bits, g = args
        return _check_weight("lut", qw, (cb,), bits, g)
    qw, s, z, bits, g = args
    return _check_weight("affine", qw, (s, z), bits, g)
