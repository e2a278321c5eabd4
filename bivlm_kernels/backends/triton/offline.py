"""Compile the kernels for a GPU architecture without a GPU, and look at what came out.

Triton ships ``ptxas`` and ``cuobjdump``, so ``triton.compile`` can build sm_90 cubins on any machine. This is how
the default tiles were chosen here (no GPU was available): registers, spills, shared memory and the instruction
mix of the main loop are read from the cubin. Run it in a process *without* ``TRITON_INTERPRET=1``::

    python -m bivlm_kernels.backends.triton.offline            # default configs, 1/2/4 bits, fp16, a few M
"""
from __future__ import annotations

import collections
import os
import re
import subprocess
import tempfile
from typing import Optional

import torch

from .autotune import Config, default_config

_TT = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
# What Triton's launcher specializes on real shapes: 16-byte aligned pointers, K-derived sizes divisible by 16.
_ALIGNED = ("x_ptr", "qw_ptr", "t0_ptr", "t1_ptr", "bias_ptr", "out_ptr", "N", "KW", "G", "stride_xm", "stride_om")


def compile_linear(cfg: Config, bits: int, dtype: torch.dtype, group_size: int = 128, has_bias: bool = True,
                   even_k: bool = True, arch: int = 90):
    """``triton.compile`` one linear kernel configuration for ``sm_<arch>``; returns the CompiledKernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from . import kernel_tc, kernels
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("offline compilation needs a process without TRITON_INTERPRET=1")
    per_word = 32 // bits
    tt = _TT[dtype]
    sig = {"x_ptr": f"*{tt}", "qw_ptr": "*i32", "t0_ptr": f"*{tt}", "t1_ptr": f"*{tt}", "bias_ptr": f"*{tt}",
           "out_ptr": "*fp32" if cfg.split_k > 1 else f"*{tt}", "M": "i32", "N": "i32", "KW": "i32", "G": "i32",
           "stride_xm": "i32", "stride_om": "i32"}
    if cfg.kernel == "tc":
        fn = kernel_tc.tc_kernel
        sig["bit_mask"] = "i32"
        const = dict(BITS=bits, GROUP=group_size, BLOCK_N=cfg.block_n, SPLIT_K=cfg.split_k, HAS_BIAS=has_bias,
                     INTERP=False)
    else:
        fn = kernels.decode_kernel if cfg.kernel == "decode" else kernels.dot_kernel
        const = dict(LUT=bits <= 2, BITS=bits, GROUP=group_size, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                     BLOCK_KW=cfg.block_k // per_word, SPLIT_K=cfg.split_k, EVEN_K=even_k, HAS_BIAS=has_bias,
                     INTERP=False)
        if cfg.kernel == "dot":
            const.update(GROUP_M=cfg.group_m, PRECISION="ieee" if dtype == torch.float32 else "tf32")
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in _ALIGNED}
    src = ASTSource(fn=fn, signature={**sig, **{k: "constexpr" for k in const}}, constexprs=const, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})


def _tool(name: str) -> str:
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def inspect(compiled, path: Optional[str] = None) -> dict:
    """Registers, stack (spills), shared memory and the SASS instruction mix of the longest loop."""
    with tempfile.TemporaryDirectory() as tmp:
        path = path or os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        res = subprocess.run([_tool("cuobjdump"), "-res-usage", path], capture_output=True, text=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "-sass", path], capture_output=True, text=True).stdout
    regs, stack = (int(v) for v in re.search(r"REG:(\d+).*?STACK:(\d+)", res).groups())
    ops, loop = [], None
    for line in sass.splitlines():
        m = re.match(r"\s+/\*([0-9a-f]+)\*/\s+(@!?U?P\w+\s+)?([A-Z0-9_]+)[^;]*?(0x[0-9a-f]+)?\s*;", line)
        if not m:
            continue
        addr, op = int(m.group(1), 16), m.group(3)
        ops.append((addr, op))
        if op == "BRA" and m.group(4) and int(m.group(4), 16) < addr:          # backward branch: a loop
            if loop is None or addr - int(m.group(4), 16) > loop[1] - loop[0]:
                loop = (int(m.group(4), 16), addr)
    mix = collections.Counter(op for a, op in ops if loop and loop[0] <= a <= loop[1])
    return {"registers": regs, "stack": stack, "shared": compiled.metadata.shared,
            "loop_instructions": sum(mix.values()), "loop_mix": dict(mix.most_common(10))}


def main():
    k = n = 4096
    for bits in (1, 2, 4):
        for m in (1, 2, 16, 64, 1024):
            key = (bits <= 2, bits, 128, torch.float16, n, k, m if m <= 256 else 256)
            cfg = default_config(key)
            info = inspect(compile_linear(cfg, bits, torch.float16))
            codes_per_thread = cfg.block_n * cfg.block_k / (32 * cfg.num_warps)
            if cfg.kernel == "decode":
                codes_per_thread *= cfg.block_m
            print(f"bits={bits} M={m:<5d} {cfg}\n    regs={info['registers']} stack={info['stack']} "
                  f"shared={info['shared']} loop={info['loop_instructions']} instructions "
                  f"({info['loop_instructions'] / codes_per_thread:.2f} per code"
                  f"{' and row' if cfg.kernel == 'decode' else ''}) {info['loop_mix']}", flush=True)


if __name__ == "__main__":
    main()
