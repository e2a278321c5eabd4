"""Loads the compiled CPU extension ``bivlm_kernels._C_cpu`` and plugs its kernels into :mod:`bivlm_kernels.ops`.

Imported lazily by ``ops`` the first time a CPU tensor meets a ``bivlm`` op (never by ``import bivlm_kernels``);
raises ImportError (which ops treats as "no CPU kernels") when the extension was not built. The CPU features
(AVX2 or the scalar fallback) are asked by the extension on its first kernel call, not here.
"""
import logging

import torch

from . import ops

log = logging.getLogger(__name__)

try:
    from . import _C_cpu  # noqa: F401  (its static initializers register torch.ops.bivlm_cpu.*)
except ImportError as e:
    log.info("bivlm_kernels._C_cpu not available (%s); CPU tensors use the reference kernels", e)
    raise

for _name in ops.ALL_OP_NAMES:
    if hasattr(torch.ops.bivlm_cpu, _name):
        ops.register_backend_kernel(_name, "cpu", getattr(torch.ops.bivlm_cpu, _name))


def configure(gemv_max_m: int = -1, tile_bytes: int = -1, force_scalar: int = -1) -> dict:
    """Dispatch knobs of the CPU kernels (tests and benchmarks); a negative value keeps a setting.

    ``gemv_max_m``: largest M run by the decode GEMV (above: dequantized fp32 tiles + ``at::mm``);
    ``tile_bytes``: size of that tile; ``force_scalar``: 1 runs the portable scalar kernels instead of AVX2.
    Returns the settings now in force and the instruction set in use.
    """
    m, tb, fs, avx2 = torch.ops.bivlm_cpu.configure(gemv_max_m, tile_bytes, force_scalar)
    return {"gemv_max_m": m, "tile_bytes": tb, "force_scalar": bool(fs), "isa": "avx2" if avx2 else "scalar"}
