"""The ``bivlm`` operator library: schemas, the one implementation (``dispatch.run``) for every device, fakes
(shape and dtype only, for torch.compile and meta tensors) and autograd."""
from __future__ import annotations

import torch

from .checks import check_args
from .dispatch import _ARITY, ALL_OP_NAMES, run

_lib = torch.library.Library("bivlm", "DEF")
_lib.define("lut_linear(Tensor x, Tensor qweight, Tensor codebook, int bits, int group_size, "
            "Tensor? bias=None, ScalarType? out_dtype=None) -> Tensor")
_lib.define("affine_linear(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, int bits, int group_size, "
            "Tensor? bias=None, ScalarType? out_dtype=None) -> Tensor")
_lib.define("dequantize_lut(Tensor qweight, Tensor codebook, int bits, int group_size) -> Tensor")
_lib.define("dequantize_affine(Tensor qweight, Tensor scales, Tensor zeros, int bits, int group_size) -> Tensor")
_lib.define("segmented_lut_linear(Tensor x, Tensor? perm, Tensor[] qweights, Tensor[] codebooks, int[] bits, "
            "int group_size, Tensor? bias=None, ScalarType? out_dtype=None) -> Tensor")


def _dispatching(op_name: str):
    def impl(*args):
        args = args + (None,) * (_ARITY[op_name] - len(args))   # the dispatcher drops trailing defaults
        return run(op_name, *args)
    impl.__name__ = f"{op_name}_impl"
    return impl


for _name in ALL_OP_NAMES:
    torch.library.impl(f"bivlm::{_name}", "CompositeExplicitAutograd", _dispatching(_name), lib=_lib)


# ---------------------------------------------------------------------------------------------------------
@torch.library.register_fake("bivlm::lut_linear", lib=_lib)
def _(x, qweight, codebook, bits, group_size, bias=None, out_dtype=None):
    n, _k = check_args("lut_linear", x, qweight, codebook, bits, group_size, bias, out_dtype)
    return x.new_empty((*x.shape[:-1], n), dtype=out_dtype or x.dtype)


@torch.library.register_fake("bivlm::affine_linear", lib=_lib)
def _(x, qweight, scales, zeros, bits, group_size, bias=None, out_dtype=None):
    n, _k = check_args("affine_linear", x, qweight, scales, zeros, bits, group_size, bias, out_dtype)
    return x.new_empty((*x.shape[:-1], n), dtype=out_dtype or x.dtype)


@torch.library.register_fake("bivlm::segmented_lut_linear", lib=_lib)
def _(x, perm, qweights, codebooks, bits, group_size, bias=None, out_dtype=None):
    n, _k = check_args("segmented_lut_linear", x, perm, qweights, codebooks, bits, group_size, bias, out_dtype)
    return x.new_empty((*x.shape[:-1], n), dtype=out_dtype or x.dtype)


@torch.library.register_fake("bivlm::dequantize_lut", lib=_lib)
def _(qweight, codebook, bits, group_size):
    n, k = check_args("dequantize_lut", qweight, codebook, bits, group_size)
    return codebook.new_empty((n, k))


@torch.library.register_fake("bivlm::dequantize_affine", lib=_lib)
def _(qweight, scales, zeros, bits, group_size):
    n, k = check_args("dequantize_affine", qweight, scales, zeros, bits, group_size)
    return scales.new_empty((n, k))


# ---------------------------------------------------------------------------------------------------------
# autograd: gradients flow to x and bias (e.g. adapters trained on top of a frozen quantized layer);
# the packed weight is frozen, so its tables get no gradient.
# ---------------------------------------------------------------------------------------------------------

def _setup_context(n_tables):
    def setup(ctx, inputs, output):
        x, qweight, *rest = inputs
        tables, (bits, group_size, bias, _out_dtype) = rest[:n_tables], rest[n_tables:]
        ctx.save_for_backward(qweight, *tables)
        ctx.bits, ctx.group_size, ctx.x_dtype = bits, group_size, x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
    return setup


def _backward(dequantize, n_tables):
    def backward(ctx, grad):
        qweight, *tables = ctx.saved_tensors
        w = dequantize(qweight, *tables, ctx.bits, ctx.group_size)          # [N, K] in the tables' dtype
        grad_x = (grad.to(w.dtype) @ w).to(ctx.x_dtype)
        grad_bias = None
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2 + n_tables + 2]:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0).to(ctx.bias_dtype)
        return (grad_x, None) + (None,) * n_tables + (None, None, grad_bias, None)
    return backward


torch.library.register_autograd("bivlm::lut_linear", _backward(torch.ops.bivlm.dequantize_lut, 1),
                                setup_context=_setup_context(1), lib=_lib)
torch.library.register_autograd("bivlm::affine_linear", _backward(torch.ops.bivlm.dequantize_affine, 2),
                                setup_context=_setup_context(2), lib=_lib)


def _segmented_setup(ctx, inputs, output):
    x, perm, qweights, codebooks, bits, group_size, bias, _out_dtype = inputs
    ctx.save_for_backward(*qweights, *codebooks, *(() if perm is None else (perm,)))
    ctx.n_seg, ctx.has_perm, ctx.bits, ctx.group_size = len(qweights), perm is not None, list(bits), group_size
    ctx.x_dtype, ctx.bias_dtype = x.dtype, None if bias is None else bias.dtype


def _segmented_backward(ctx, grad):
    saved, s = ctx.saved_tensors, ctx.n_seg
    w = torch.cat([torch.ops.bivlm.dequantize_lut(qw, cb, b, ctx.group_size)
                   for qw, cb, b in zip(saved[:s], saved[s:2 * s], ctx.bits)], dim=1)   # [N, K] permuted
    grad_xp = grad.to(w.dtype) @ w
    grad_x = grad_xp
    if ctx.has_perm:                                   # x_p = x[..., perm]  =>  grad_x[..., perm] = grad_xp
        grad_x = torch.empty_like(grad_xp).index_copy_(-1, saved[2 * s].long(), grad_xp)
    grad_bias = None
    if ctx.bias_dtype is not None and ctx.needs_input_grad[6]:
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0).to(ctx.bias_dtype)
    return grad_x.to(ctx.x_dtype), None, [None] * s, [None] * s, None, None, grad_bias, None


torch.library.register_autograd("bivlm::segmented_lut_linear", _segmented_backward,
                                setup_context=_segmented_setup, lib=_lib)
