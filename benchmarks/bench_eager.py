"""Host overhead of the thin eager path: the time one ``QuantLinear.forward`` spends outside its kernel.

For the "Thin eager path" table of ``sass_budget.py`` (the issue's goal: <= 10 us per call). A timing on the CPU,
unlike the static counts around it, hence a module of its own; the method is in the docstring of ``eager_us``
and of ``sass_budget.py``.
"""
from __future__ import annotations

import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def eager_us(calls: int = 3000) -> dict:
    """Median host time (us) of QuantLinear.forward, 64 x 64, 1 bit, M = 1, CPU: with the reference kernel, the
    reference kernel alone, and forward / ops.run with the kernel replaced by a stub that returns a preallocated
    output -- the last two are the host path itself (checks, backend selection, op call), the kernel excluded."""
    import torch
    sys.path.insert(0, ROOT)
    from bivlm_kernels import ops
    from bivlm_kernels.backends import reference as ref_ops
    from bivlm_kernels.nn import QuantLinear
    torch.manual_seed(0)
    layer = QuantLinear.from_linear(torch.nn.Linear(64, 64), bits=1, group_size=64, dtype=torch.float16)
    x = torch.randn(1, 64, dtype=torch.float16)
    seg = layer.segments[0]

    def median(fn):
        for _ in range(200):
            fn()
        ts = []
        for _ in range(calls):
            t0 = time.perf_counter_ns()
            fn()
            ts.append(time.perf_counter_ns() - t0)
        return statistics.median(ts) / 1e3

    args = (x, seg.qweight, seg.codebook, 1, 64, layer.bias, None)
    out = torch.empty(1, 64, dtype=torch.float16)
    real = ops._KERNELS["lut_linear"]["reference"]
    with ops.use_backend("reference"), torch.inference_mode():
        fwd = median(lambda: layer(x))
        ref = median(lambda: ref_ops.lut_linear(*args))
        ops._KERNELS["lut_linear"]["reference"] = lambda *a: out
        try:
            fwd_stub = median(lambda: layer(x))
            run_stub = median(lambda: ops.run("lut_linear", *args))
        finally:
            ops._KERNELS["lut_linear"]["reference"] = real
    return {"forward_us": fwd, "kernel_us": ref, "overhead_us": fwd_stub, "run_us": run_stub, "calls": calls,
            "threads": torch.get_num_threads()}
