"""Python launchers: one function per ``bivlm`` op, with exactly the op's signature.

Arguments arrive validated by ``ops.check_args``. Per call: flatten x to ``[M, K]`` (a view when possible),
one dict get for the configuration (a miss goes to :mod:`.autotune`), allocate the output, launch. Split-K
configurations accumulate into a zeroed fp32 output (cast afterwards if another ``out_dtype`` was asked).
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton

from . import autotune
from .autotune import Config
from .kernel_tc import tc_kernel
from .kernels import decode_kernel, dequant_kernel, dot_kernel

# Evaluated once at import (an environment read, no device query): see kernels.py on INTERP.
_INTERP = os.environ.get("TRITON_INTERPRET") == "1"
_CONFIGS = autotune.CONFIGS        # read on every call (the thin path): public in autotune
_BUCKET_OF = autotune.BUCKET_OF
_LAST_BUCKET = autotune.M_BUCKETS[-1]
# tc_kernel's bit masks, passed as an argument on purpose (kernel_tc.py): 0x80008000 (1 bit), 0x000F000F (4 bit)
_TC_MASK = {1: -2147450880, 2: -2147450880, 4: 0x000F000F}


def _launch(cfg: Config, lut: bool, x2, qweight, t0, t1, bits, group_size, bias, out_dtype):
    """Run one configuration on ``x2 [M, K]`` (unit stride along K); returns ``[M, N]`` in ``out_dtype``."""
    m, k = x2.shape
    n = qweight.shape[0]
    if cfg.kernel == "dense":
        # Large M: dense weight in x's dtype (a temporary [N, K] buffer), then cuBLAS.
        w = dequantize(lut, qweight, t0, t1, bits, group_size)
        return torch.nn.functional.linear(x2, w, bias).to(out_dtype)
    per_word = 32 // bits
    kw = k // per_word
    bkw = cfg.block_k // per_word
    split = cfg.split_k
    if split > 1:
        out = torch.zeros((m, n), dtype=torch.float32, device=x2.device)
    else:
        out = torch.empty((m, n), dtype=out_dtype, device=x2.device)
    common = dict(LUT=lut, BITS=bits, GROUP=group_size, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                  BLOCK_KW=bkw, SPLIT_K=split, EVEN_K=kw % bkw == 0, HAS_BIAS=bias is not None,
                  INTERP=_INTERP, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    args = (x2, qweight, t0, t1, bias if bias is not None else t0, out,
            m, n, kw, k // group_size, x2.stride(0), out.stride(0))
    if cfg.kernel == "tc":
        if cfg.block_k != group_size or not autotune.tc_applies(lut, bits, group_size, x2.dtype, m):
            raise ValueError(f"config {cfg} (tc) needs a 1/2-bit lut or 4-bit affine weight, fp16/bf16 x, M <= 16 "
                             f"and block_k == group_size; got lut={lut}, bits={bits}, dtype={x2.dtype}, M={m}, "
                             f"group_size={group_size}")
        tc_kernel[(triton.cdiv(n, cfg.block_n), split)](
            *args, _TC_MASK[bits], BITS=bits, GROUP=group_size, BLOCK_N=cfg.block_n, SPLIT_K=split,
            HAS_BIAS=bias is not None, INTERP=_INTERP, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    elif cfg.kernel == "decode":
        grid = (triton.cdiv(n, cfg.block_n), split, triton.cdiv(m, cfg.block_m))
        decode_kernel[grid](*args, **common)
    else:
        grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n), split)
        dot_kernel[grid](*args, GROUP_M=cfg.group_m,
                         PRECISION="ieee" if x2.dtype == torch.float32 else "tf32", **common)
    if split > 1 and out_dtype != torch.float32:
        out = out.to(out_dtype)
    return out


def linear(lut: bool, x, qweight, t0, t1, bits, group_size, bias=None, out_dtype=None,
           config: Optional[Config] = None):
    """``x [..., K] @ W.T (+ bias)`` for a lut (``t0`` = codebook) or affine (``t0, t1`` = scales, zeros) weight.

    ``config`` forces a launch configuration (tests, benchmarks); by default the tuned / default one for the
    shape's M bucket is used.
    """
    k = x.shape[-1]
    n = qweight.shape[0]
    out_dtype = out_dtype or x.dtype
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if m == 0:
        return x.new_empty((*x.shape[:-1], n), dtype=out_dtype)
    if not (qweight.is_contiguous() and t0.is_contiguous() and t1.is_contiguous()):
        qweight, t0, t1 = qweight.contiguous(), t0.contiguous(), t1.contiguous()
    if bias is not None and not bias.is_contiguous():
        bias = bias.contiguous()
    if config is None:
        key = (lut, bits, group_size, x.dtype, n, k, _BUCKET_OF[m] if m <= _LAST_BUCKET else _LAST_BUCKET)
        config = _CONFIGS.get(key)
        if config is None:
            config = autotune.choose(key, x.device, lambda c: _launch(c, lut, x2, qweight, t0, t1, bits,
                                                                      group_size, bias, out_dtype))
    out = _launch(config, lut, x2, qweight, t0, t1, bits, group_size, bias, out_dtype)
    return out.view(*x.shape[:-1], n)


def dequantize(lut: bool, qweight, t0, t1, bits, group_size):
    """Dense ``[N, K]`` weight in the tables' dtype."""
    qweight, t0, t1 = qweight.contiguous(), t0.contiguous(), t1.contiguous()
    n, kw = qweight.shape
    k = kw * (32 // bits)
    out = torch.empty((n, k), dtype=t0.dtype, device=qweight.device)
    if n == 0:
        return out
    block_n, block_kw = 32, 8
    grid = (triton.cdiv(n, block_n), triton.cdiv(kw, block_kw))
    dequant_kernel[grid](qweight, t0, t1, out, n, kw, k // group_size, LUT=lut, BITS=bits, GROUP=group_size,
                         BLOCK_N=block_n, BLOCK_KW=block_kw, INTERP=_INTERP, num_warps=4)
    return out


# ---------------------------------------------------------------------------------------------------------
# the four ops, with the exact op signatures (registered by bivlm_kernels.backends.triton.__init__)
# ---------------------------------------------------------------------------------------------------------

def lut_linear(x, qweight, codebook, bits, group_size, bias=None, out_dtype=None):
    return linear(True, x, qweight, codebook, codebook, bits, group_size, bias, out_dtype)


def affine_linear(x, qweight, scales, zeros, bits, group_size, bias=None, out_dtype=None):
    return linear(False, x, qweight, scales, zeros, bits, group_size, bias, out_dtype)


def dequantize_lut(qweight, codebook, bits, group_size):
    return dequantize(True, qweight, codebook, codebook, bits, group_size)


def dequantize_affine(qweight, scales, zeros, bits, group_size):
    return dequantize(False, qweight, scales, zeros, bits, group_size)
