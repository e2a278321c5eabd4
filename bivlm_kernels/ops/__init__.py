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

import torch

from . import library  # noqa: F401  (defines torch.ops.bivlm.*)
from .checks import check_args
from .dispatch import (_KERNELS, ALL_OP_NAMES, BACKEND_GROUP_SIZES, BACKENDS, OP_NAMES, available_backends,
                       cpu_kernels_available, get_backend, register_backend_kernel, run, segmented_by_parts,
                       select_backend, set_backend, use_backend)  # noqa: F401  (_KERNELS: tests read the table)

# Short Python names: ``bivlm_kernels.ops.lut_linear(x, ...)`` is ``torch.ops.bivlm.lut_linear(x, ...)``.
lut_linear = torch.ops.bivlm.lut_linear
affine_linear = torch.ops.bivlm.affine_linear
dequantize_lut = torch.ops.bivlm.dequantize_lut
dequantize_affine = torch.ops.bivlm.dequantize_affine
segmented_lut_linear = torch.ops.bivlm.segmented_lut_linear

__all__ = ["ALL_OP_NAMES", "BACKEND_GROUP_SIZES", "BACKENDS", "OP_NAMES", "available_backends", "check_args",
           "cpu_kernels_available", "get_backend", "register_backend_kernel", "run", "segmented_by_parts",
           "select_backend", "set_backend", "use_backend", "lut_linear", "affine_linear", "dequantize_lut",
           "dequantize_affine", "segmented_lut_linear"]
