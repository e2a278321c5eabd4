"""Loads the compiled CUDA extension ``bivlm_kernels._C`` and plugs its kernels into :mod:`bivlm_kernels.ops`.

Imported lazily by ``ops`` the first time a CUDA tensor meets a ``bivlm`` op; raises ImportError (which ops
treats as "no CUDA kernels") when the extension was not built. Never imported by ``import bivlm_kernels``.
"""
import logging

import torch

from ... import ops
from . import routing

log = logging.getLogger(__name__)

try:
    from ... import _C  # noqa: F401  (its static initializers register torch.ops.bivlm_cuda.*)
except ImportError as e:
    log.info("bivlm_kernels._C not available (%s); CUDA tensors use Triton or the reference", e)
    raise

for _name in ops.OP_NAMES:
    if hasattr(torch.ops.bivlm_cuda, _name):
        ops.register_backend_kernel(_name, "cuda", getattr(torch.ops.bivlm_cuda, _name))
if hasattr(torch.ops.bivlm_cuda, "tc_linear"):   # 1/2/4 bits, g64/g128, M <= 16: the tensor-core kernels
    ops.register_backend_kernel("lut_linear", "cuda", routing.routed_lut_linear(
        torch.ops.bivlm_cuda.tc_linear, torch.ops.bivlm_cuda.lut_linear))
    ops.register_backend_kernel("affine_linear", "cuda", routing.routed_affine_linear(
        torch.ops.bivlm_cuda.tc_linear, torch.ops.bivlm_cuda.affine_linear))
if hasattr(torch.ops.bivlm_cuda, "seg_tc_linear"):   # the sub-2-bit layout in one launch
    ops.register_backend_kernel("segmented_lut_linear", "cuda", routing.routed_segmented_lut_linear(
        torch.ops.bivlm_cuda.seg_tc_linear, ops.segmented_by_parts))
