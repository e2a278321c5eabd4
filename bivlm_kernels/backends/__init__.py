"""The kernel backends, one per ``BIVLM_BACKEND`` value: each registers its kernels into ``ops.dispatch``.

``reference`` (pure PyTorch, the oracle) registers when the package is imported; ``cpu`` (``_C_cpu``), ``cuda`` (``_C``)
and ``triton`` load on first use (``ops.dispatch._load``); ``repack_cache`` keeps their load-time layouts.
"""
