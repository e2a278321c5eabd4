"""A/B helper for the CPU decode kernels on cold weights: time of one QuantLinear call (M = 1) averaged over 16
distinct 4096x4096 layers (about 96 MiB of 2-bit codes and tables, beyond the L3), median and min of 15 rounds.

    python benchmarks/ab_cpu_cold.py BITS [THREADS]

Used in benchmarks/results/cpu_floors.md, with the built ``_C_cpu`` library swapped between runs (before / after a
kernel change). A timing tool, not a test.
"""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bivlm_kernels import QuantLinear  # noqa: E402


def main():
    bits = int(sys.argv[1])
    torch.set_num_threads(int(sys.argv[2]) if len(sys.argv) > 2 else 1)
    torch.manual_seed(0)
    base = torch.nn.Linear(4096, 4096, bias=False)
    layers = [QuantLinear.from_linear(base, bits=bits, group_size=128) for _ in range(16)]
    x = torch.randn(1, 4096)
    with torch.no_grad():
        for q in layers:                      # first calls: caches and repacks
            q(x)
        ts = []
        for _ in range(15):
            t0 = time.perf_counter()
            for q in layers:
                q(x)
            ts.append((time.perf_counter() - t0) / len(layers))
    ts.sort()
    print(f"bits={bits} threads={torch.get_num_threads()} median {ts[len(ts) // 2] * 1e6:.0f} us  "
          f"min {ts[0] * 1e6:.0f} us")


if __name__ == "__main__":
    main()
