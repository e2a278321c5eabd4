"""Run a small case of every CUDA kernel of ``bivlm_kernels._C`` once, checking each result against the reference.

Meant for the memory checker on a GPU machine (every kernel instantiation family is touched: GEMV with 16-byte and
4-byte weight loads, every M bucket, split-K with the reduce kernel, direct fp32 output, the dequantize kernel and
the large-M dequantize + cuBLAS path, for every bit width and dtype)::

    compute-sanitizer --tool memcheck python python/memcheck_cuda.py
    compute-sanitizer --tool racecheck python python/memcheck_cuda.py     # optional; the kernels use no smem

Exits non-zero on a wrong result; compute-sanitizer reports memory errors itself (exit code via --error-exitcode).
"""
import sys

import torch

from bivlm_kernels import formats, ops
from bivlm_kernels.backends import reference as ref_ops

FORMATS = (("lut", 1), ("lut", 2), ("affine", 4))
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# (n, k, group_size): k=160/g32 -> rows of 5 (1-bit) / 10 (2-bit) words: the 4-byte-load kernel;
# n=7 -> split-K; n=1001 -> one pass.
SHAPES = ((7, 160, 32), (7, 1024, 128), (1001, 512, 64), (33, 512, 256))
MS = (1, 2, 3, 5, 9, 16, 17)   # every GEMV M bucket (1, 2, 4, 8, 16) and the large-M path


def weight(kind, bits, n, k, g, dtype):
    codes = torch.randint(0, 1 << bits, (n, k), device="cuda")
    qweight = formats.pack(codes, bits)
    if kind == "lut":
        return qweight, (torch.randn(n, k // g, 1 << bits, device="cuda").to(dtype),)
    return qweight, ((torch.rand(n, k // g, device="cuda") * 0.02 + 0.005).to(dtype),
                     (torch.rand(n, k // g, device="cuda") * 15).to(dtype))


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def main() -> int:
    if not torch.cuda.is_available():
        print("memcheck_cuda: no CUDA device; nothing to run")
        return 0
    import bivlm_kernels._C  # noqa: F401  (fails loudly if the extension is not built)
    torch.manual_seed(0)
    cuda = torch.ops.bivlm_cuda
    bad = 0
    runs = 0
    for kind, bits in FORMATS:
        for dtype in DTYPES:
            tol = 1e-5 if dtype == torch.float32 else 1e-2
            for n, k, g in SHAPES:
                qweight, tables = weight(kind, bits, n, k, g, dtype)
                if kind == "lut":
                    got = cuda.dequantize_lut(qweight, tables[0], bits, g)
                    want = ref_ops.dequantize_lut(qweight, tables[0], bits, g)
                else:
                    got = cuda.dequantize_affine(qweight, *tables, bits, g)
                    want = ref_ops.dequantize_affine(qweight, *tables, bits, g)
                runs += 1
                if not torch.equal(got, want):
                    print(f"FAIL dequantize {kind}{bits} {dtype} n={n} k={k} g={g}")
                    bad += 1
                bias = torch.randn(n, device="cuda").to(dtype)
                for m in MS:
                    for out_dtype in (None, torch.float32):
                        x = torch.randn(m, k, device="cuda").to(dtype)
                        if kind == "lut":
                            y = cuda.lut_linear(x, qweight, tables[0], bits, g, bias, out_dtype)
                            ref = ref_ops.lut_linear(x, qweight, tables[0], bits, g, bias, torch.float32)
                        else:
                            y = cuda.affine_linear(x, qweight, *tables, bits, g, bias, out_dtype)
                            ref = ref_ops.affine_linear(x, qweight, *tables, bits, g, bias, torch.float32)
                        runs += 1
                        if y.dtype != (out_dtype or dtype) or rel(y, ref) > tol:
                            print(f"FAIL linear {kind}{bits} {dtype} n={n} k={k} g={g} m={m} "
                                  f"out_dtype={out_dtype}: rel err {rel(y, ref):.3e}")
                            bad += 1
    torch.cuda.synchronize()
    print(f"memcheck_cuda: {runs} kernel calls, {bad} wrong results")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
