"""Machine model of the static SASS budget (``sass_budget.py``): bits per weight, the issue rate, the
instructions-per-weight budget, the issue- and memory-bound ceilings over fp16, and register-limited occupancy.

Pure arithmetic on the issue's numbers (H100 / H200 bandwidths, 132 SMs at 1.755 GHz, 90 % of the copy bandwidth),
kept apart from the SASS parsing and the compilers so that the budget can be read and tested on its own; the
derivation is in the docstring of ``sass_budget.py``.
"""
from __future__ import annotations

from typing import Optional, Tuple

# The issue's numbers.
SMS, SCHEDULERS, WARP = 132, 4, 32
CLOCK_GHZ = 1.755
COPY_FRACTION = 0.9
GPUS = {"H200": 4.8e12, "H100": 3.35e12}      # HBM bandwidth, bytes/s (H100 SXM)
SHAPE = (28672, 8192)                         # N x K of the ceiling columns
LATENCY_US = 0.6                              # assumed loaded DRAM latency for Little's law (not measured)
BITS = (1, 2, 4)
MS = (1, 2, 4, 8, 16)
GROUPS = (128, 64)
DTYPES = ("fp16", "bf16")


def bits_per_weight(bits: int, g: int, entry_bits: int = 16) -> float:
    """Code bits plus the per-group table: lut (b <= 2) 2^b entries, affine (b = 4) a scale and a zero."""
    tables = (1 << bits) if bits <= 2 else 2
    return bits + tables * entry_bits / g


def issue_rate(clock_ghz: float = CLOCK_GHZ) -> float:
    """Thread-instructions per second the whole GPU can issue (one warp instruction per scheduler per clock)."""
    return SMS * SCHEDULERS * clock_ghz * 1e9 * WARP


def budget(bits: int, g: int, bandwidth: float, clock_ghz: float = CLOCK_GHZ) -> float:
    """Instructions per weight that still let the kernel stream at COPY_FRACTION of ``bandwidth``."""
    return issue_rate(clock_ghz) * bits_per_weight(bits, g) / (8 * COPY_FRACTION * bandwidth)


def ceilings(ipw: float, bits: int, g: int, m: int, bandwidth: float, clock_ghz: float = CLOCK_GHZ,
             shape: Tuple[int, int] = SHAPE, stream_bpw: Optional[float] = None) -> dict:
    """Issue- and memory-bound times (us) of one call and the speedup ceilings over fp16. stream_bpw: the bits
    per weight the kernel reads when its repacked layout streams more than the format holds."""
    n, k = shape
    io = 2 * m * k + 2 * m * n
    bw = COPY_FRACTION * bandwidth
    t_issue = n * k * ipw / issue_rate(clock_ghz)
    t_mem = (n * k * (stream_bpw or bits_per_weight(bits, g)) / 8 + io) / bw
    t_fp16 = (2 * n * k + io) / bw
    return {"t_issue_us": t_issue * 1e6, "t_mem_us": t_mem * 1e6, "t_fp16_us": t_fp16 * 1e6,
            "ceiling": t_fp16 / max(t_issue, t_mem), "mem_ceiling": t_fp16 / t_mem}


def resident_warps(regs: int, block_warps: int = 4, max_warps: int = 64, max_blocks: int = 32) -> int:
    """Warps per SM allowed by the register file (64K registers, 8-register / 256-per-warp granularity)."""
    per_warp = -(-max(regs, 1) * WARP // 256) * 256
    blocks = min(max_blocks, (65536 // per_warp) // block_warps, max_warps // block_warps)
    return blocks * block_warps


def little_need_kib(bandwidth: float, latency_us: float = LATENCY_US) -> float:
    """Bytes each SM must keep in flight to sustain ``bandwidth`` at ``latency_us`` (Little's law), KiB."""
    return bandwidth * latency_us * 1e-6 / SMS / 1024
