"""Triton backend of the ``bivlm`` ops: importing this module registers it with :mod:`bivlm_kernels.ops`.

Raises ``ImportError`` when Triton is missing (or fails to import), so ``ops`` treats the backend as absent.
Importing queries no GPU: configurations are chosen on first call (see :mod:`.autotune`). On CPU the kernels run
only under ``TRITON_INTERPRET=1``, which must be set before this module is first imported.

Public helpers: :func:`save_tuned_configs`, :func:`load_tuned_configs`, :func:`clear_tuned_configs`,
:class:`Config`, and :func:`linear` / :func:`dequantize` (launch with an explicit config).
"""
try:
    import triton  # noqa: F401
    import triton.language  # noqa: F401
except Exception as e:  # noqa: BLE001 -- any failure means "no Triton backend"
    raise ImportError(f"bivlm_kernels.backends.triton needs a working triton install: {e}") from e

from ... import ops
from . import autotune, launch
from .autotune import (DECODE_MAX_M, M_BUCKETS, Config, clear_tuned_configs, default_config,
                       load_tuned_configs, m_bucket, save_tuned_configs)
from .launch import dequantize, linear

for _name in ops.OP_NAMES:
    ops.register_backend_kernel(_name, "triton", getattr(launch, _name))

__all__ = ["Config", "DECODE_MAX_M", "M_BUCKETS", "clear_tuned_configs", "default_config", "dequantize", "linear",
           "load_tuned_configs", "m_bucket", "save_tuned_configs"]
