"""The ``bivlm`` operators: defined once, with a fake, a pure-PyTorch reference and pluggable GPU kernels.

Ops (``torch.ops.bivlm.*``)::

    lut_linear(x, qweight, codebook, bits, group_size, bias=None, out_dtype=None)        b in {1, 2}
    affine_linear(x, qweight, scales, zeros, bits, group_size, bias=None, out_dtype=None) b = 4
    dequantize_lut(qweight, codebook, bits, group_size)            -> [N, K] in codebook's dtype
    dequantize_affine(qweight, scales, zeros, bits, group_size)    -> [N, K] in scales' dtype
    segmented_lut_linear(x, perm, qweights, codebooks, bits, group_size, bias=None, out_dtype=None)
        the sub-2-bit layout in one call: x[..., perm] once, lut segments side by side along the permuted K
        (segment i: qweights[i], codebooks[i], bits[i]), one fp32 accumulator

``x`` is ``[..., K]`` (fp16, bf16 or fp32, same dtype as the codebook/scales), the result ``[..., N]`` in
``out_dtype`` (default: x's dtype). The formats are specified in :mod:`bivlm_kernels.formats`.

Which kernel runs: the per-device implementation asks :func:`select_backend`:

* ``"auto"`` (default): on CUDA tensors the compiled CUDA kernel if the extension is built and has the op,
  else the Triton kernel if Triton is installed, else the reference; on CPU tensors the C++ CPU kernels
  (``bivlm_kernels._C_cpu``, built by every ``pip install --no-build-isolation``) if built, else the reference.
* ``"reference"`` / ``"cpu"`` / ``"triton"`` / ``"cuda"``: force one path (tests and benchmarks); forcing an
  unavailable path raises instead of silently falling back. Triton on CPU tensors runs only under
  ``TRITON_INTERPRET=1``.

Set it with :func:`set_backend`, the context manager :func:`use_backend`, or ``BIVLM_BACKEND`` in the
environment. The reference (dequantize to fp32, then ``F.linear`` in fp32) is the oracle and the fallback.
``segmented_lut_linear`` runs the CPU kernel's single pass where one is selected; on every other path it is the
per-segment ``lut_linear`` calls of that path, summed in fp32.
"""
from __future__ import annotations

import contextlib
import importlib
import os
from typing import Callable, Optional

import torch

from . import formats

BACKENDS = ("auto", "reference", "cpu", "triton", "cuda")

_lib = torch.library.Library("bivlm", "DEF")
_lib.define("lut_linear(Tensor x, Tensor qweight, Tensor codebook, int bits, int group_size, "
            "Tensor? bias=None, ScalarType? out_dtype=None) -> Tensor")
_lib.define("affine_linear(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, int bits, int group_size, "
            "Tensor? bias=None, ScalarType? out_dtype=None) -> Tensor")
_lib.define("dequantize_lut(Tensor qweight, Tensor codebook, int bits, int group_size) -> Tensor")
_lib.define("dequantize_affine(Tensor qweight, Tensor scales, Tensor zeros, int bits, int group_size) -> Tensor")
_lib.define("segmented_lut_linear(Tensor x, Tensor? perm, Tensor[] qweights, Tensor[] codebooks, int[] bits, "
            "int group_size, Tensor? bias=None, ScalarType? out_dtype=None) -> Tensor")
OP_NAMES = ("lut_linear", "affine_linear", "dequantize_lut", "dequantize_affine")   # one kernel per backend each
# segmented_lut_linear has a one-pass kernel only on the CPU backend; elsewhere it runs as per-segment lut_linear.
ALL_OP_NAMES = OP_NAMES + ("segmented_lut_linear",)


# ---------------------------------------------------------------------------------------------------------
# argument checks: one place, used by the fakes and by every real implementation
# ---------------------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------------------
# reference kernels (pure PyTorch, fp32 math): CPU path and test oracle
# ---------------------------------------------------------------------------------------------------------

def _linear_fp32(x, w, bias, out_dtype):
    y = torch.nn.functional.linear(x.float(), w, None if bias is None else bias.float())
    return y.to(out_dtype or x.dtype)


def reference_lut_linear(x, qweight, codebook, bits, group_size, bias=None, out_dtype=None):
    return _linear_fp32(x, formats.dequantize_lut(qweight, codebook, bits, group_size), bias, out_dtype)


def reference_affine_linear(x, qweight, scales, zeros, bits, group_size, bias=None, out_dtype=None):
    w = formats.dequantize_affine(qweight, scales, zeros, bits, group_size)
    return _linear_fp32(x, w, bias, out_dtype)


def reference_dequantize_lut(qweight, codebook, bits, group_size):
    return formats.dequantize_lut(qweight, codebook, bits, group_size).to(codebook.dtype)


def reference_dequantize_affine(qweight, scales, zeros, bits, group_size):
    return formats.dequantize_affine(qweight, scales, zeros, bits, group_size).to(scales.dtype)


def reference_segmented_lut_linear(x, perm, qweights, codebooks, bits, group_size, bias=None, out_dtype=None):
    """x[..., perm], then the segments' fp32 products summed, bias added in fp32, rounded once."""
    return _sum_segments(reference_lut_linear, x, perm, qweights, codebooks, bits, group_size, bias, out_dtype)


def _sum_segments(lut_linear_fn, x, perm, qweights, codebooks, bits, group_size, bias, out_dtype):
    if perm is not None:
        x = x.index_select(-1, perm)
    y, k0 = None, 0
    for qw, cb, b in zip(qweights, codebooks, bits):
        k1 = k0 + cb.shape[1] * group_size
        part = lut_linear_fn(x[..., k0:k1], qw, cb, b, group_size, None, torch.float32)
        y, k0 = part if y is None else y + part, k1
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype or x.dtype)


def _segmented_by_parts(*args):
    """segmented_lut_linear on a path without a one-pass kernel: that path's lut_linear per segment."""
    return _sum_segments(lambda *a: run("lut_linear", *a), *args)


# ---------------------------------------------------------------------------------------------------------
# backend registry and selection
# ---------------------------------------------------------------------------------------------------------

_KERNELS = {name: {"reference": globals()[f"reference_{name}"]} for name in ALL_OP_NAMES}
_backend = os.environ.get("BIVLM_BACKEND", "auto")
_loaded = {"triton": False, "cuda": False, "cpu": False}
_MODULES = {"triton": "bivlm_kernels.triton", "cuda": "bivlm_kernels._extension",
            "cpu": "bivlm_kernels._cpu_extension"}


def register_backend_kernel(op_name: str, backend: str, fn: Callable) -> None:
    """Plug a kernel (same signature as the op) into the dispatch table (used by the Triton, _C, _C_cpu loaders)."""
    if op_name not in ALL_OP_NAMES or backend not in ("triton", "cuda", "cpu"):
        raise ValueError(f"op_name must be one of {ALL_OP_NAMES} and backend 'triton', 'cuda' or 'cpu'; "
                         f"got {op_name!r}, {backend!r}")
    _KERNELS[op_name][backend] = fn


def set_backend(name: str) -> None:
    """Force one kernel path for every op: one of ``BACKENDS``."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    _backend = name


def get_backend() -> str:
    return _backend


@contextlib.contextmanager
def use_backend(name: str):
    """``with use_backend("triton"): ...`` forces a path inside the block."""
    old = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(old)


def _load(backend: str) -> None:
    """Import the module that registers a backend's kernels, once; a failed import just leaves it absent."""
    if _loaded[backend]:
        return
    _loaded[backend] = True
    try:
        importlib.import_module(_MODULES[backend])
    except ImportError:
        pass


def available_backends(op_name: str, device: torch.device) -> list:
    """Paths that can run ``op_name`` on ``device`` now, in auto-dispatch priority order."""
    table = _KERNELS[op_name]
    out = []
    if device.type == "cuda":
        _load("triton"), _load("cuda")
        out += [b for b in ("cuda", "triton") if b in table]
    elif device.type == "cpu":
        _load("cpu")
        if "cpu" in table:
            out.append("cpu")
        if os.environ.get("TRITON_INTERPRET") == "1":
            _load("triton")
            if "triton" in table:
                out.append("triton")
    return out + ["reference"]


# Group sizes a compiled path handles (absent: every size of formats.GROUP_SIZES). The CUDA kernels have no
# g = 16 instantiation yet; such a layer runs on the next path in line (Triton, else the reference).
BACKEND_GROUP_SIZES = {"cuda": (32, 64, 128, 256)}


def select_backend(op_name: str, device: torch.device, group_size: Optional[int] = None) -> str:
    """The backend that will run ``op_name`` on ``device`` (see the module docstring) for ``group_size``."""
    want = _backend
    if want == "reference" or (want == "auto" and device.type not in ("cuda", "cpu")):
        return "reference"
    full = available_backends(op_name, device)
    avail = [b for b in full
             if group_size is None or group_size in BACKEND_GROUP_SIZES.get(b, formats.GROUP_SIZES)]
    if want == "auto":
        return avail[0] if device.type == "cuda" or avail[0] == "cpu" else "reference"
    if want in full and want not in avail:
        raise RuntimeError(f"backend {want!r} was forced but has no kernel for group_size={group_size}; "
                           f"its group sizes: {BACKEND_GROUP_SIZES[want]} (available for this layer: {avail})")
    if want not in avail:
        raise RuntimeError(f"backend {want!r} was forced but cannot run {op_name} on {device} "
                           f"(available: {avail}); build the CUDA extension (CUDA tensors) or the CPU "
                           f"extension (CPU tensors: pip install --no-build-isolation -e .), install triton, "
                           f"or set TRITON_INTERPRET=1 for Triton on CPU")
    return want


_ARITY = {"lut_linear": 7, "affine_linear": 8, "dequantize_lut": 4, "dequantize_affine": 5,
          "segmented_lut_linear": 8}
_GROUP_ARG = {"lut_linear": 4, "affine_linear": 5, "dequantize_lut": 3, "dequantize_affine": 4,
              "segmented_lut_linear": 5}       # position of group_size in each op's arguments


def run(op_name: str, *args):
    """Validate, pick reference / CPU / Triton / CUDA, run. All arguments positional, defaults included.

    This is the op's implementation for every device. ``QuantLinear`` also calls it directly in eager mode
    when no gradient is needed, skipping the ~20 µs round trip through the dispatcher into Python; under
    torch.compile (and for autograd) it goes through ``torch.ops.bivlm.*``.
    """
    check_args(op_name, *args)
    g = args[_GROUP_ARG[op_name]]
    if op_name == "segmented_lut_linear":      # one pass where a path has it, else that path's per-segment op
        kernel = _KERNELS[op_name].get(select_backend("lut_linear", args[0].device, g))
        return (kernel or _segmented_by_parts)(*args)
    return _KERNELS[op_name][select_backend(op_name, args[0].device, g)](*args)


def _dispatching(op_name: str):
    def impl(*args):
        args = args + (None,) * (_ARITY[op_name] - len(args))   # the dispatcher drops trailing defaults
        return run(op_name, *args)
    impl.__name__ = f"{op_name}_impl"
    return impl


for _name in ALL_OP_NAMES:
    torch.library.impl(f"bivlm::{_name}", "CompositeExplicitAutograd", _dispatching(_name), lib=_lib)


# ---------------------------------------------------------------------------------------------------------
# fakes: shape and dtype only, for torch.compile and meta tensors
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


# Short Python names: ``bivlm_kernels.ops.lut_linear(x, ...)`` is ``torch.ops.bivlm.lut_linear(x, ...)``.
lut_linear = torch.ops.bivlm.lut_linear
affine_linear = torch.ops.bivlm.affine_linear
dequantize_lut = torch.ops.bivlm.dequantize_lut
dequantize_affine = torch.ops.bivlm.dequantize_affine
segmented_lut_linear = torch.ops.bivlm.segmented_lut_linear


def cpu_kernels_available() -> bool:
    """Whether the C++ CPU kernels (``bivlm_kernels._C_cpu``) are built and loaded (imports them once)."""
    _load("cpu")
    return "cpu" in _KERNELS["lut_linear"]
