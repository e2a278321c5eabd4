"""CPU benchmark: QuantLinear on the C++ CPU kernels vs dense ``F.linear`` (fp32, bf16) and torch's int4
weight-only CPU kernel (``aten._weight_int4pack_mm_for_cpu``, the in-process peer of the 4-bit format).

    python benchmarks/bench_cpu.py                 # full grid, writes benchmarks/results/cpu_kernels.md
    python benchmarks/bench_cpu.py --quick         # 4096x4096 and 576x1536, M in {1, 64}, all threads
    python benchmarks/bench_cpu.py --quick --shapes 4096x4096,11008x4096,576x1536   # the floors' shapes

Each run also writes the table as an SVG bar chart next to it (``plot_cpu.py``).

Per (shape N x K, M, threads): medians in µs per call of ``torch.utils.benchmark`` blocks, all candidates timed
in turn over 5 rounds (interleaved, so background load hits them alike). At M < 64 every timed statement runs
several copies of the layer in turn (enough copies for about 64 MiB of weights) and is divided by the number of
copies, so small packed layers are not timed from a warm cache while dense fp32 is timed from DRAM. QuantLinear layers: group size 128, round-to-nearest weights (``from_linear``), fp32 layers
(fp32 codebooks/scales, fp32 x) and bf16 layers (bf16 tables, bf16 x, computed in fp32). int4: the same 4-bit
codes, scales and zeros repacked for torch's kernel, bf16 x and bf16 scales/zeros (its fast path: with fp32 x
the same call took 61-73 ms instead of ~5 ms at 4096x4096, M = 1); checked against our reference before timing.

Extra memory per call is measured with ``torch.profiler`` (profile_memory): the bytes of every CPU allocation
made inside one call, frees not subtracted (an upper bound on the peak), output included.

The machine this was written on is a shared 2-core VM: other jobs ran during every measurement (the load
average at start and end is recorded). Ratios within one run are what the issue's floors compare.
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import RESULTS_DIR, command_line, fmt, git_info, md_table  # noqa: E402
import plot_cpu  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torch.utils.benchmark as tb  # noqa: E402

from bivlm_kernels import ops  # noqa: E402
from bivlm_kernels.backends import reference as ref_ops  # noqa: E402
from bivlm_kernels.nn import QuantLinear  # noqa: E402

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (576, 1536)]
QUICK_SHAPES = [(4096, 4096), (576, 1536)]
MS = [1, 4, 16, 64, 256]
GROUP = 128
CYCLE_BYTES = 64 << 20


def cpu_info() -> dict:
    model, flags, ids = platform.processor() or "unknown", set(), {}
    try:
        for line in open("/proc/cpuinfo"):
            key, _, val = line.partition(":")
            key = key.strip()
            if key == "model name":
                model = val.strip()
            elif key in ("cpu family", "model", "cpu MHz") and key not in ids:
                ids[key] = val.strip()          # "AMD EPYC" alone does not say Zen 1 (family 23 model 1) or Zen 3
            elif key == "flags":
                flags = set(val.split())
    except OSError:
        pass
    if ids:
        model += " (" + ", ".join(f"{k} {v}" for k, v in ids.items()) + ")"
    want = ("avx", "avx2", "fma", "f16c", "bmi2", "avx512f", "avx512bw", "avx512_bf16", "avx512_vnni", "amx_bf16")
    return {"model": model, "cores": os.cpu_count(), "flags": " ".join(f for f in want if f in flags)}


def copies_for(nbytes: int) -> int:
    return max(1, min(32, math.ceil(CYCLE_BYTES / max(nbytes, 1))))


def interleaved_us(fns: dict, block_s: float, rounds: int = 5) -> dict:
    """{name: (fn, calls per fn())} -> {name: median µs per call}. The candidates are timed in turn, round after
    round (``torch.utils.benchmark.Timer.timeit`` blocks of about block_s each), so that load from other jobs on a
    shared machine hits all of them alike; the median over the rounds is reported."""
    timers, number = {}, {}
    for name, (fn, _calls) in fns.items():
        fn()                                                  # warm-up (first-call lazy loads)
        # Timer runs its statement with num_threads threads (default 1, whatever set_num_threads said):
        # pass the current count, or every "all threads" row silently measures one thread.
        timers[name] = tb.Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
        one = timers[name].timeit(1).median
        number[name] = max(1, int(block_s / max(one, 1e-7)))
        if one > 0.5:
            rounds = min(rounds, 3)                           # very slow candidates (torch int4 at large M)
    samples = {name: [] for name in fns}
    for _ in range(rounds):
        for name, t in timers.items():
            samples[name].append(t.timeit(number[name]).median / fns[name][1])
    return {name: statistics.median(v) * 1e6 for name, v in samples.items()}


def int4_pack(layer: QuantLinear):
    """Our 4-bit codes/scales/zeros as torch's int4 CPU layout: w = (q - 8) * s + z_t with z_t = (8 - zero) * s."""
    seg = layer.segments[0]
    from bivlm_kernels import formats
    codes = formats.unpack(seg.qweight, 4, layer.in_features).to(torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    s, z = seg.scales.float(), seg.zeros.float()
    sz = torch.stack([s.T, ((8 - z) * s).T], -1).to(torch.bfloat16).contiguous()      # [K/g, N, 2]
    return packed, sz


def allocated_bytes(fn) -> int:
    """Bytes allocated inside fn (torch.profiler, profile_memory): the sum of every op's own allocations, frees
    not subtracted -- an upper bound on the peak extra memory of the call (output included)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return sum(max(e.self_cpu_memory_usage, 0) for e in prof.events() if e.name != "[memory]")


def repack_bytes(layer: QuantLinear, m: int) -> int:
    """Bytes of the table-lookup repack this layer keeps cached (once per layer, not per call) when a call with M
    rows takes that path; 0 otherwise."""
    from bivlm_kernels.backends import cpu as _cpu_extension
    seg = layer.segments[0]
    if m > _cpu_extension.configure()["tmac_max_m"][seg.bits]:
        return 0
    tables = (seg.scales, seg.zeros) if seg.bits == 4 else (seg.codebook, None)
    reps = torch.ops.bivlm_cpu.tmac_repack(seg.qweight, tables[0], tables[1], seg.bits, seg.group_size)
    return sum(t.numel() * t.element_size() for t in reps)


def bench_shape(n, k, ms, threads_list, block_s, rows, mem_rows):
    torch.manual_seed(0)
    lin = torch.nn.Linear(k, n, bias=False)
    w32 = lin.weight.detach().contiguous()
    c_dense = copies_for(w32.numel() * 4)
    dense32 = [w32.clone() for _ in range(c_dense)]
    dense16 = [w.to(torch.bfloat16) for w in dense32[:copies_for(w32.numel() * 2)]]
    q = {b: QuantLinear.from_linear(lin, b, GROUP, dtype=torch.float32) for b in (1, 2, 4)}
    qb = {b: copy.deepcopy(q[b]).to(torch.bfloat16) for b in (1, 2, 4)}      # Module.to is in place

    def cyc(layer):
        nbytes = sum(t.numel() * t.element_size() for t in layer.buffers())
        return [layer] + [copy.deepcopy(layer) for _ in range(copies_for(nbytes) - 1)]

    qc = {b: cyc(q[b]) for b in q}
    qbc = {b: cyc(qb[b]) for b in qb}
    i4 = [int4_pack(layer) for layer in qc[4]]
    x_check = torch.randn(3, k).to(torch.bfloat16)
    ref = ref_ops.affine_linear(x_check.float(), q[4].segments[0].qweight, q[4].segments[0].scales,
                                      q[4].segments[0].zeros, 4, GROUP)
    got = torch.ops.aten._weight_int4pack_mm_for_cpu(x_check, i4[0][0], GROUP, i4[0][1]).float()
    int4_err = ((got - ref).norm() / ref.norm()).item()
    assert int4_err < 2e-2, f"torch int4 repack does not reproduce our 4-bit weight (rel. err {int4_err:.2e})"

    for threads in threads_list:
        torch.set_num_threads(threads)
        for m in ms:
            x32 = torch.randn(m, k)
            x16 = x32.to(torch.bfloat16)
            r = {"shape": f"{n}x{k}", "M": m, "threads": threads}
            # Weight copies matter where a call is memory-bound (small M); at M >= 64 one copy each.
            cut = (lambda lst: lst) if m < 64 else (lambda lst: lst[:1])
            fns = {"fp32": (lambda: [F.linear(x32, w) for w in cut(dense32)], len(cut(dense32))),
                   "bf16": (lambda: [F.linear(x16, w) for w in cut(dense16)], len(cut(dense16))),
                   "int4": (lambda: [torch.ops.aten._weight_int4pack_mm_for_cpu(x16, p, GROUP, sz)
                                     for p, sz in cut(i4)], len(cut(i4)))}
            for b in (1, 2, 4):
                fns[f"q{b}"] = (lambda b=b: [l(x32) for l in cut(qc[b])], len(cut(qc[b])))
                fns[f"qb{b}"] = (lambda b=b: [l(x16) for l in cut(qbc[b])], len(cut(qbc[b])))
            with torch.no_grad():
                r.update(interleaved_us(fns, block_s))
            rows.append(r)
            print(f"{r['shape']:>11} M={m:<4} t={threads}  fp32 {r['fp32']:9.1f}  bf16 {r['bf16']:9.1f}  "
                  f"int4 {r['int4']:9.1f}  q1 {r['q1']:8.1f}  q2 {r['q2']:8.1f}  q4 {r['q4']:8.1f}  "
                  f"(x fp32: {r['fp32'] / r['q1']:.1f} {r['fp32'] / r['q2']:.1f} {r['fp32'] / r['q4']:.1f})",
                  flush=True)
    torch.set_num_threads(threads_list[-1])
    for m in (1, 256) if 256 in ms else (ms[0], ms[-1]):
        x32 = torch.randn(m, k)
        for b in (1, 2, 4):
            with torch.no_grad():
                peak = allocated_bytes(lambda: q[b](x32))
            mem_rows.append({"shape": f"{n}x{k}", "M": m, "bits": b, "peak": peak,
                             "out": m * n * 4, "weight": n * k * 4, "repack": repack_bytes(q[b], m)})


def write_md(path: Path, rows, mem_rows, info, args, load0, load1, seconds):
    from bivlm_kernels.backends import cpu as _cpu_extension
    cfg = _cpu_extension.configure()
    env = (f"- CPU: {info['model']}, {info['cores']} cores; flags: {info['flags']}\n"
           f"- kernels: bivlm_kernels._C_cpu, ISA {cfg['isa']}; table lookup for M <= {cfg['tmac_max_m']} "
           f"(by bits), else decode GEMV for M <= {cfg['gemv_max_m']}, tile {cfg['tile_bytes'] >> 10} KiB above\n"
           f"- torch {torch.__version__} ({torch.backends.mkldnn.is_available() and 'oneDNN' or ''} "
           f"{'MKL' if torch.backends.mkl.is_available() else ''}), Python {platform.python_version()}\n"
           f"- git: {info['git']['git_commit'][:12]} (dirty: {info['git']['git_dirty']})\n"
           f"- command: `{command_line()}` ({seconds:.0f} s)\n"
           f"- load average (1 min) at start / end: {load0:.2f} / {load1:.2f} -- a shared machine: other jobs "
           f"ran during the measurements, so absolute times are noisy; ratios come from one run\n")
    cols = [("shape N×K", "shape"), ("M", "M"), ("thr", "threads"),
            ("fp32 µs", lambda r: fmt(r["fp32"], ".0f")), ("bf16 µs", lambda r: fmt(r["bf16"], ".0f")),
            ("torch int4 (bf16 x) µs", lambda r: fmt(r["int4"], ".0f"))]
    for b in (1, 2, 4):
        cols.append((f"Q{b} fp32 µs (×fp32)", lambda r, b=b: f"{r[f'q{b}']:.0f} ({r['fp32'] / r[f'q{b}']:.1f}x)"))
    for b in (1, 2, 4):
        cols.append((f"Q{b} bf16 µs (×fp32)", lambda r, b=b: f"{r[f'qb{b}']:.0f} ({r['fp32'] / r[f'qb{b}']:.1f}x)"))
    cols.append(("Q4 speedup over int4 (fp32 / bf16 layer)",
                 lambda r: f"{r['int4'] / r['q4']:.2f}x / {r['int4'] / r['qb4']:.2f}x"))
    mem_cols = [("shape N×K", "shape"), ("M", "M"), ("bits", "bits"),
                ("allocated in the call (≥ peak)", lambda r: f"{r['peak'] / 2 ** 20:.2f} MiB"),
                ("of which output M·N·4", lambda r: f"{r['out'] / 2 ** 20:.2f} MiB"),
                ("dense fp32 weight (for scale)", lambda r: f"{r['weight'] / 2 ** 20:.0f} MiB"),
                ("lookup repack, cached once per layer", lambda r: f"{r['repack'] / 2 ** 20:.2f} MiB")]
    text = ("# CPU kernels: QuantLinear vs dense F.linear and torch int4 (weight-only)\n\n" + env +
            "\nMedians over 5 interleaved rounds of torch.utils.benchmark blocks (µs per call; at M < 64 weights "
            "cycled over ≥ 64 MiB of copies); "
            "(×fp32) = speedup over dense fp32 F.linear at the same shape, M and threads. Group size 128, "
            "RTN weights; Q* fp32 = fp32 layer and x, Q* bf16 = bf16 layer and x (fp32 math).\n\n" +
            md_table(rows, cols) +
            "\n## Extra memory per call (torch.profiler: all allocations inside one QuantLinear call, fp32 layer)\n\n" +
            md_table(mem_rows, mem_cols))
    path.write_text(text)
    print(f"wrote {path}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="4096x4096 and 576x1536, M in {1, 64}, all threads")
    p.add_argument("--threads", default=None, help="comma list (default: 1 and all; --quick: all)")
    p.add_argument("--shapes", default=None, help="comma list of NxK (default: the grid's, or --quick's)")
    p.add_argument("--block", type=float, default=None, help="seconds per timed block (default 0.1, quick 0.05)")
    p.add_argument("--out", default=None, help="markdown file (default benchmarks/results/cpu_kernels[_quick].md)")
    args = p.parse_args(argv)
    if not ops.cpu_kernels_available():
        print("SKIP: bivlm_kernels._C_cpu is not built (pip install --no-build-isolation -e .)")
        return 1
    all_threads = torch.get_num_threads()
    threads = [int(t) for t in args.threads.split(",")] if args.threads else \
        ([all_threads] if args.quick else sorted({1, all_threads}))
    shapes, ms = (QUICK_SHAPES, [1, 64]) if args.quick else (SHAPES, MS)
    if args.shapes:
        shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")]
    block_s = args.block or (0.05 if args.quick else 0.1)
    out = Path(args.out) if args.out else RESULTS_DIR / ("cpu_kernels_quick.md" if args.quick else "cpu_kernels.md")
    info = {**cpu_info(), "git": git_info()}
    load0, t0 = os.getloadavg()[0], time.time()
    rows, mem_rows = [], []
    for n, k in shapes:
        bench_shape(n, k, ms, threads, block_s, rows, mem_rows)
    write_md(out, rows, mem_rows, info, args, load0, os.getloadavg()[0], time.time() - t0)
    plot_cpu.main([str(out)])                           # the same table as an SVG bar chart, next to it
    return 0


if __name__ == "__main__":
    sys.exit(main())
