"""Which kernel runs a ``bivlm`` op: the backend table, backend selection (``BIVLM_BACKEND``, ``set_backend``,
group sizes a compiled path lacks) and :func:`run`, the one implementation behind every op."""
from __future__ import annotations

import contextlib
import importlib
import os
from typing import Callable, Optional

import torch

from .. import formats
from .checks import check_args

BACKENDS = ("auto", "reference", "cpu", "triton", "cuda")
OP_NAMES = ("lut_linear", "affine_linear", "dequantize_lut", "dequantize_affine")   # one kernel per backend each
# segmented_lut_linear has a one-pass kernel only on the CPU backend; elsewhere it runs as per-segment lut_linear.
ALL_OP_NAMES = OP_NAMES + ("segmented_lut_linear",)


def sum_segments(lut_linear_fn, x, perm, qweights, codebooks, bits, group_size, bias, out_dtype):
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


def segmented_by_parts(*args):
    """segmented_lut_linear on a path without a one-pass kernel: that path's lut_linear per segment."""
    return sum_segments(lambda *a: run("lut_linear", *a), *args)


_KERNELS = {name: {} for name in ALL_OP_NAMES}     # backend -> kernel; the reference registers first
_backend = os.environ.get("BIVLM_BACKEND", "auto")
_loaded = {"triton": False, "cuda": False, "cpu": False}
# The backends register themselves (backends/): the reference when the package is imported, the others on
# first use through these module names (a plugin load, not an import of a higher layer).
_MODULES = {"triton": "bivlm_kernels.backends.triton", "cuda": "bivlm_kernels.backends.cuda.register",
            "cpu": "bivlm_kernels.backends.cpu"}


def register_backend_kernel(op_name: str, backend: str, fn: Callable) -> None:
    """Plug a kernel (same signature as the op) into the dispatch table (used by every module of backends/)."""
    if op_name not in ALL_OP_NAMES or backend not in BACKENDS[1:]:
        raise ValueError(f"op_name must be one of {ALL_OP_NAMES} and backend one of {BACKENDS[1:]}; "
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
        return (kernel or segmented_by_parts)(*args)
    return _KERNELS[op_name][select_backend(op_name, args[0].device, g)](*args)


def cpu_kernels_available() -> bool:
    """Whether the C++ CPU kernels (``bivlm_kernels._C_cpu``) are built and loaded (imports them once)."""
    _load("cpu")
    return "cpu" in _KERNELS["lut_linear"]
