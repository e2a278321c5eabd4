#!/usr/bin/env python
"""Static SASS budget of the decode kernels: instructions per weight in the main K loop, without a GPU.

A count of instructions in a binary is a static property, not a timing. This tool compiles every decode
configuration for sm_90 (and sm_80), disassembles it, finds the main K loop and divides its instruction count by
the weights one thread decodes per iteration. From that it derives the issue-bound and memory-bound times of a
28672 x 8192 layer on an H100 and an H200 and the speedup ceilings over fp16. ``--check`` exits 1 when a CUDA
decode configuration (sm_90) is over its budget or spills (today it is: see ``benchmarks/results/sass_budget.md``).

    python benchmarks/sass_budget.py                                   # table to stdout
    python benchmarks/sass_budget.py --out benchmarks/results/sass_budget.md
    python benchmarks/sass_budget.py --check --no-triton --arch 90     # exit 1 if over budget / spills

What is compiled
----------------
* CUDA: ``nvcc -cubin -O3 -std=c++17 --expt-relaxed-constexpr -Icsrc/cuda -arch=sm_XX -Xptxas -v csrc/cuda/gemv_b{1,2,4}.cu``
  (the flags of ``setup.py``; ``-lineinfo`` does not change code). Each TU instantiates
  ``bivlm::detail::gemv_kernel<T, BITS, MT, VEC>`` (csrc/cuda/gemv.cuh); rows: T in {half, bf16}, MT = M in
  {1, 2, 4, 8, 16} (the launcher's bucket), VEC = 4 (16-byte weight loads). The group size g is a run-time
  argument of that kernel, so g = 64 and g = 128 run the same code; they differ in bits per weight (the budget)
  and in how many table reloads execute (below). Cubins and ptxas logs are cached under ``--cache-dir`` (default
  ``build/sass_budget``), keyed by the sources, flags and nvcc version.
* Triton: ``bivlm_kernels.backends.triton.offline.compile_linear`` (``triton.compile`` with a ``GPUTarget``) of the config
  ``autotune.default_config`` picks at N = 28672, K = 8192 (decode kernel for M <= 2, dot kernel above), for
  g in {64, 128} (GROUP is a constexpr there), and ``offline.inspect`` for registers, stack and the loop count.

How the loop is found and counted
---------------------------------
``cuobjdump -sass`` (Triton's wheel ships it; else the CUDA toolkit's or ``pip install nvidia-cuda-cuobjdump``).
The main loop is the longest backward branch of the kernel (``BRA`` to a lower address; the rule of
``offline.inspect``); its static count is every instruction from the target to the branch. Predicated-off
instructions still take an issue slot, so they count. Blocks jumped over by a forward branch inside the loop
do not always run; they are classified by content:

* weight prefetch (holds a streaming ``LDG.E.EF`` load, ``__ldcs``): runs every iteration but the last -> counted;
* row-of-x blocks (hold FFMA/HFMA2/HMMA): run when i < M; every row here has M = MT -> counted;
* table reload (other loads, no FMA/MMA, no streaming load): the CUDA GEMV reloads a row's table at a word that
  starts a group (``(wi & wpg_mask) == 0``, j = 1..VEC-1; j = 0 is unconditional). With wpg = g*BITS/32 words per
  group, VEC/wpg - 1 of the VEC - 1 conditional reloads run per chunk when wpg < VEC, none otherwise: only 1-bit
  g = 64 (wpg = 2) runs one of the three. ``instr/w`` subtracts the reloads that do not run; ``static`` is the
  whole loop span (an upper bound). Unknown kernels get no subtraction.

Weights per iteration. One iteration of gemv_kernel's loop decodes, per thread, ROWS rows x VEC words x 32/BITS
codes (ROWS = 4 for MT <= 2 else 2): 512 / 256 / 128 weights at 1 / 2 / 4 bits for MT <= 2, half that above.
The unrolling is checked on the binary: the streaming qweight loads in the loop (``LDG.E.EF.128``, the prefetch
of the next chunk, one per row) carry 16 * (#loads) bytes = 16 * #loads * 8 / BITS weights per thread. If nvcc
unrolled the K loop u times that is u x the formula, and the binary's number is used (column ``unroll``; a
value other than 1 is flagged). Triton: BLOCK_N x BLOCK_K / (32 x num_warps) weights per thread per iteration
(the loop steps BLOCK_KW words of BLOCK_N rows; tc's step is one group, BLOCK_K = the group size); Triton's
loads are not classified.

Budget and ceilings (derived, not hard-coded)
---------------------------------------------
Bits per weight including tables (16-bit entries): lut b in {1, 2}: b + 2^b * 16 / g; affine 4: 4 + 2 * 16 / g.
g = 128: 1.25, 2.5, 4.25; g = 64: 1.5, 3.0, 4.5. Issue rate R = 132 SMs x 4 schedulers x f_clk x 32 threads
(f_clk = 1.755 GHz: 29.65 T thread-instructions/s). Streaming at 90 % of the copy bandwidth BW a weight takes
bpw / 8 / (0.9 BW) seconds, in which R x that instructions can issue:

    budget = R * bpw / (8 * 0.9 * BW)     H200 (BW = 4.8 TB/s), g = 128: 1.07 (1 bit), 2.14 (2 bit), 3.64 (4 bit)
                                          H100 (3.35 TB/s):              1.54,         3.07,         5.22

The issue's "about 1.2 / 2.4 / 4.0" (H100: 1.7 / 3.4 / 5.8) is the same formula at f_clk = 1.98 GHz (the H100 /
H200 maximum boost clock); ``--clock-ghz 1.98`` reproduces it. The default keeps the issue's stated ~1.76 GHz,
the stricter of the two. ``--check`` compares the executed-path ``instr/w`` of every CUDA sm_90 row with the H200
budget at its g.

Times at N x K = 28672 x 8192, M rows: t_issue = N K instr/w / R; t_mem = (N K bpw / 8 + 2 M K + 2 M N) / (0.9 BW);
fp16 t_fp16 = (2 N K + 2 M K + 2 M N) / (0.9 BW) (fp16 GEMV at the same fraction of the roofline). Ceiling =
t_fp16 / max(t_issue, t_mem); ``mem ceil`` = t_fp16 / t_mem. Loads in flight (CUDA rows): the loop's streaming
weight bytes per thread (the prefetch of the next chunk) x the threads the register count lets reside on an SM
(4-warp blocks, 64K registers), against Little's law BW x latency / 132 SMs at an assumed 0.6 us.

Thin eager path: the host time of one ``QuantLinear.forward`` (64 x 64, 1 bit, g = 64, fp16, M = 1, CPU,
reference backend, inference mode), median over many calls, with the kernel replaced by a stub that returns a
preallocated tensor: the checks, backend selection and op call that every call pays (the issue's goal: <= 10 us);
``ops.run`` with the stub splits it into the module's part and the op's. (The forward with the real reference
kernel and the kernel alone are printed too; their difference is not the overhead: the two timings see different
cache states, which on a loaded machine is more than the overhead itself.) The timing is
``bench_eager.eager_us``.

Measuring a new kernel: the CUDA TUs are ``csrc/cuda/*_b{1,2,4}.cu``; every kernel in their cubins that no row
measures is listed at the end of the report. Give a new one a name pattern and a weights-per-iteration formula
next to ``_GEMV`` / ``gemv_weights_per_iter`` in ``sass_build.py`` (the streaming-load check then confirms the
unrolling; keep loading qweight with ``ld.global.cs`` or extend ``sass_parse.is_weight_load``) and pick it per M in
``sass_build.cuda_rows`` as the dispatcher does.

What this cannot tell: latency, occupancy effects and load-in-flight stalls (a kernel within budget can still
miss the roofline), dual issue / pipe contention (all instructions are weighted 1), clocks under load, and any
branch outcome other than the ones modelled above (M < MT within a bucket runs fewer row blocks).

Files: this one is the command line and the markdown report (measure, check, write); the parts it runs are
``sass_model.py`` (the machine model: bits per weight, budget, ceilings, occupancy), ``sass_parse.py`` (SASS text
-> instructions, main loop, loop statistics), ``sass_build.py`` (nvcc / cuobjdump / Triton compiles; the CUDA,
tensor-core and Triton rows), ``sass_seg.py`` (the segmented kernel's rows) and ``bench_eager.py`` (the thin eager
path's timing). None of them imports this one.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import os
import platform
import shlex
import sys
from typing import Iterable, List, Optional

import sass_seg
from bench_eager import eager_us
from sass_build import PIP_HINT, ROOT, _run, cuda_rows, find_cuobjdump, find_nvcc, tool_version, triton_rows
from sass_model import (BITS, CLOCK_GHZ, COPY_FRACTION, DTYPES, GPUS, GROUPS, LATENCY_US, MS, SCHEDULERS, SHAPE, SMS,
                        WARP, bits_per_weight, budget, ceilings, issue_rate, little_need_kib, resident_warps)


# ---- report ---------------------------------------------------------------------------------------------------------
def _f(v, fmt=".2f"):
    return "—" if v is None or v != v else format(v, fmt)


def dominant(mix: dict, weights: float, k: int = 5) -> str:
    """The k most frequent opcodes of the loop, as instructions per weight."""
    return ", ".join(f"{op} {c / weights:.2f}" for op, c in list(mix.items())[:k]) if weights else ""


def table(rows: List[dict], clock: float, sm90: bool) -> List[str]:
    """Markdown rows; sm_90 tables carry the H200 budget mark (✓ / ✗) and the H100 / H200 ceilings."""
    head = ["path", "bits", "dtype", "M", "g", "config", "w/iter", "instr/w", "static"]
    head += (["budget H200"] if sm90 else []) + ["regs", "spill"]
    if sm90:
        head += ["KiB in flight/SM",
                 "t_issue H200 µs", "t_mem H200 µs", "ceil H200", "mem ceil H200", "ceil H100", "mem ceil H100"]
    head += ["loop mix (static, per weight)"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        bud = budget(r["bits"], r["g"], GPUS["H200"], clock)
        spill = r["spill"] if r["spill"] is not None else (r["stack"] or 0)
        spill_s = f"{spill} B" + (f", {r['local_ops']} LDL/STL" if r["local_ops"] else "")
        ipw = _f(r["ipw"]) + ((" ✗" if r["ipw"] > bud else " ✓") if sm90 else "")
        if r["unroll"] not in (0, 1):
            ipw += f" (unroll {r['unroll']:g}!)"
        if r["stats"] and r["stats"].get("inner_loops"):
            ipw += " (inner loop: undercounted!)"
        mix = r["stats"]["mix"] if r["stats"] else {}
        cells = [r["path"], str(r["bits"]), r["dtype"], str(r["m"]), str(r["g"]), r["config"],
                 f"{r['weights_per_iter']:g}", ipw, _f(r["static_ipw"])]
        cells += ([_f(bud)] if sm90 else []) + [str(r["registers"]), spill_s]
        if sm90:
            h200 = ceilings(r["ipw"], r["bits"], r["g"], r["m"], GPUS["H200"], clock, stream_bpw=r.get("stream_bpw"))
            h100 = ceilings(r["ipw"], r["bits"], r["g"], r["m"], GPUS["H100"], clock, stream_bpw=r.get("stream_bpw"))
            st = r["stats"] or {}
            flight = (st.get("weight_bytes", 0) * WARP * resident_warps(r["registers"]) / 1024
                      if r["path"] == "cuda" and r["registers"] else None)
            cells += [_f(flight, ".0f"), _f(h200["t_issue_us"], ".1f"), _f(h200["t_mem_us"], ".1f"),
                      _f(h200["ceiling"], ".1f") + "x",
                      _f(h200["mem_ceiling"], ".1f") + "x", _f(h100["ceiling"], ".1f") + "x",
                      _f(h100["mem_ceiling"], ".1f") + "x"]
        cells.append(dominant(mix, r["weights_per_iter"]))
        out.append("| " + " | ".join(cells) + " |")
    return out


def summary(rows: List[dict], clock: float, dtype: str = "fp16", g: int = 128) -> List[str]:
    """bits x M grid of sm_90 'instr/w (H200 ceiling)' per path, for one dtype and group size."""
    out = []
    for path in ("cuda", "cuda-tc", "triton"):
        sel = {(r["bits"], r["m"]): r for r in rows
               if r["path"] == path and r["arch"] == 90 and r["dtype"] == dtype and r["g"] == g}
        if not sel:
            continue
        out += [f"| {path} sm_90 {dtype} g{g}: instr/w (H200 ceiling) | " + " | ".join(f"M = {m}" for m in MS)
                + " | budget H200 |", "|---|" + "---|" * (len(MS) + 1)]
        for b in BITS:
            cells = []
            for m in MS:
                r = sel.get((b, m))
                if r is None:
                    cells.append("—")
                    continue
                ceil = ceilings(r["ipw"], b, g, m, GPUS["H200"], clock, stream_bpw=r.get("stream_bpw"))["ceiling"]
                cells.append(f"{r['ipw']:.2f} ({ceil:.1f}x)")
            out.append(f"| {b} bit | " + " | ".join(cells) + f" | {budget(b, g, GPUS['H200'], clock):.2f} |")
        out.append("")
    return out


def seg_table(rows: List[dict], clock: float) -> List[str]:
    """Markdown rows of the segmented kernel (sm_90): each loop's instr/w, and their sum against the limit at every
    salient share f of ``sass_seg``."""
    head = ["dtype", "M", "g", "1-bit loop", "2-bit loop", "gather"]
    for f in sass_seg.SHARES:
        head += [f"instr/w f={f:g}", f"limit f={f:g}", f"ceil H200 f={f:g}"]
    head += ["regs", "spill"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in sorted(rows, key=lambda r: (DTYPES.index(r["dtype"]), r["m"], -r["g"])):
        if r["arch"] != 90:
            continue
        cells = [r["dtype"], str(r["m"]), str(r["g"]), _f(r["ipw1"]), _f(r["ipw2"]), _f(r["gather"], ".3f")]
        for f in sass_seg.SHARES:
            ipw, lim = sass_seg.combined(r, f, clock)
            ceil = ceilings(ipw, 1, r["g"], r["m"], GPUS["H200"], clock,
                            stream_bpw=sass_seg.stream_bpw(f, r["g"]))["ceiling"]
            cells += [_f(ipw) + (" ✓" if ipw <= lim else " ✗"), _f(lim), _f(ceil, ".1f") + "x"]
        cells += [str(r["registers"]), f"{r['spill']} B"]
        out.append("| " + " | ".join(cells) + " |")
    return out


def superseded(r: dict, rows: Iterable[dict]) -> bool:
    """A CUDA-core GEMV row whose configuration the dispatcher sends to the tensor-core kernel instead
    (csrc/cuda/torch_ops.cpp: gemv_tc_supported -> launch_gemv_tc)."""
    return r["path"] == "cuda" and any(
        o["path"] == "cuda-tc" and all(o[k] == r[k] for k in ("arch", "bits", "dtype", "m", "g")) for o in rows)


def failures(rows: Iterable[dict], clock: float) -> List[str]:
    rows = list(rows)
    bad = []
    for r in rows:
        if r["path"] not in ("cuda", "cuda-tc") or superseded(r, rows):
            continue
        tag = f"cuda sm_{r['arch']} bits={r['bits']} {r['dtype']} M={r['m']} g={r['g']}"
        if r["ipw"] != r["ipw"]:
            bad.append(f"{tag}: no main loop found in {r.get('kernel', '?')}")
        if r["spill"] or r["local_ops"]:
            bad.append(f"{tag}: spills ({r['spill']} bytes, {r['local_ops']} LDL/STL)")
        if r["arch"] == 90 and r["ipw"] > budget(r["bits"], r["g"], GPUS["H200"], clock):
            bad.append(f"{tag}: {r['ipw']:.2f} instructions per weight > budget "
                       f"{budget(r['bits'], r['g'], GPUS['H200'], clock):.2f}")
    return bad


READING = "## Reading"   # a hand-written section of --out that a rerun keeps (everything from this heading on)


@dataclasses.dataclass
class Measurement:
    """What one run measured: the tools, every row (in the report's order) and what it could not measure."""
    cuobjdump: str
    nvcc: Optional[str]
    rows: List[dict]            # CUDA, tensor-core and Triton rows (sass_build)
    seg: List[dict]             # the segmented kernel's rows (sass_seg)
    unmeasured: List[str]       # kernels in the cubins that no row measures
    notes: List[str]
    eager: Optional[dict]       # bench_eager.eager_us(); None with --no-eager


class CannotMeasure(Exception):
    """A missing tool or a failed compile: the run stops with exit status 2."""


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", help="also write the markdown report here")
    ap.add_argument("--check", action="store_true", help="exit 1 if a CUDA decode config is over budget or spills")
    ap.add_argument("--arch", type=int, nargs="+", default=[90, 80], help="SM architectures (default: 90 80)")
    ap.add_argument("--no-triton", action="store_true", help="skip the Triton kernels")
    ap.add_argument("--no-eager", action="store_true", help="skip the QuantLinear.forward host timing")
    ap.add_argument("--clock-ghz", type=float, default=CLOCK_GHZ, help=f"issue clock (default {CLOCK_GHZ})")
    ap.add_argument("--cache-dir", default=os.path.join(ROOT, "build", "sass_budget"))
    return ap.parse_args(argv)


def measure(args: argparse.Namespace) -> Measurement:
    """Compile and count every kernel the arguments select (and time the thin eager path unless --no-eager)."""
    cuobjdump, nvcc = find_cuobjdump(), find_nvcc()
    if cuobjdump is None:
        raise CannotMeasure(f"no cuobjdump found. Install one:\n    {PIP_HINT}")
    if nvcc is None:
        msg = "no nvcc (set CUDA_HOME or put nvcc on PATH): CUDA kernels are not measured"
        if args.check:
            raise CannotMeasure(msg)
        print(f"sass_budget: {msg}", file=sys.stderr)

    rows: List[dict] = []
    seg: List[dict] = []
    unmeasured: List[str] = []
    notes: List[str] = []
    for arch in args.arch:
        if nvcc:
            try:
                r, u = cuda_rows(arch, args.cache_dir, nvcc, cuobjdump)
                rows += r
                unmeasured += [f"sm_{arch} {n}" for n in u]
                seg += sass_seg.seg_rows(arch, args.cache_dir, nvcc, cuobjdump)
            except RuntimeError as e:   # e.g. csrc/ in the middle of an edit
                raise CannotMeasure(str(e)) from e
        if not args.no_triton:
            try:
                rows += triton_rows(arch, args.cache_dir)
            except ImportError as e:
                notes.append(f"Triton not measured: {e}")
    order = {"cuda": 0, "cuda-tc": 1, "triton": 2}
    rows.sort(key=lambda r: (order[r["path"]], r["bits"], DTYPES.index(r["dtype"]), r["m"], -r["g"]))
    return Measurement(cuobjdump, nvcc, rows, seg, unmeasured, notes, None if args.no_eager else eager_us())


def check(m: Measurement, clock: float) -> List[str]:
    """The ``--check`` failures: CUDA and segmented-kernel configurations over budget, spilling or without a loop."""
    return failures(m.rows, clock) + sass_seg.failures(m.seg, clock)


def report(m: Measurement, args: argparse.Namespace, bad: List[str], argv=None) -> str:
    """The markdown report; ``bad`` is ``check``'s list (its count closes the report)."""
    clock, nvcc, cuobjdump, rows = args.clock_ghz, m.nvcc, m.cuobjdump, m.rows
    lines = [f"# Static SASS budget of the decode kernels ({datetime.date.today().isoformat()})", "",
             f"Command: `python {' '.join(shlex.quote(a) for a in ['benchmarks/sass_budget.py', *sys.argv[1:]])}`"
             if argv is None else "", "",
             f"Tools: nvcc {tool_version(nvcc) if nvcc else 'absent'}; cuobjdump {tool_version(cuobjdump)} "
             f"(`{os.path.relpath(cuobjdump, ROOT) if cuobjdump.startswith(ROOT) else cuobjdump}`); "
             + _versions() + f"; host {platform.machine()} Python {platform.python_version()}. "
             + _source_state(), "",
             f"Model: {SMS} SMs x {SCHEDULERS} schedulers x {clock} GHz x 32 = {issue_rate(clock) / 1e12:.2f} T "
             f"thread-instructions/s; streaming at {COPY_FRACTION:.0%} of the HBM bandwidth (H200 4.8 TB/s, "
             f"H100 3.35 TB/s); budget = rate x bpw / (8 x 0.9 x BW) (the issue's rounded 1.2 / 2.4 / 4.0 are this "
             f"formula at 1.98 GHz: `--clock-ghz 1.98`); shape {SHAPE[0]}x{SHAPE[1]}. "
             "Memory times and ceilings use the bytes a kernel streams: the 1-bit tensor-core repack reads 64 table "
             "bits per (row, group) (D in fp32 and the two entries), 1.5 bits per weight at g = 128 where the format "
             "holds 1.25; the budgets stay those of the format's bits (stricter). "
             "`instr/w` = main-loop instructions on the executed path per weight (✓ within / ✗ over the H200 "
             "budget); `static` = the whole loop span per weight. `KiB in flight/SM` = the loop's streaming weight "
             "loads per thread x threads resident by registers (4-warp blocks); Little's law at "
             f"{LATENCY_US} µs (assumed latency) needs {little_need_kib(GPUS['H200']):.0f} KiB per SM on an H200, "
             f"{little_need_kib(GPUS['H100']):.0f} on an H100. See the module docstring of "
             "`benchmarks/sass_budget.py` for the method.", ""]
    lines.append("Budgets (instructions per weight): " + "; ".join(
        f"{b}-bit g{g} ({bits_per_weight(b, g):g} bpw): H200 {budget(b, g, GPUS['H200'], clock):.2f}, "
        f"H100 {budget(b, g, GPUS['H100'], clock):.2f}" for b in BITS for g in GROUPS))
    lines.append("")
    lines += ["## Summary", ""] + summary(rows, clock)
    for arch in args.arch:
        sel = [r for r in rows if r["arch"] == arch]
        if sel:
            lines += [f"## sm_{arch}" + ("" if arch == 90 else " (registers and spills; ceilings are for sm_90)"), ""]
            lines += table(sel, clock, sm90=arch == 90) + [""]
    if m.seg:
        lines += ["## The sub-2-bit layout in one launch (`gemv_tc_seg_kernel`, sm_90)", "",
                  "f = the 2-bit (salient) share of the columns; `instr/w` = (1 - f) x 1-bit loop + f x 2-bit loop + "
                  "gather, each measured in the fused kernel's own SASS; `limit` = 1.1 x ((1 - f) x 1-bit budget + "
                  "f x 2-bit budget); the ceiling counts the streamed bits (1-bit repack, 2-bit repack, the int32 "
                  "perm). See `benchmarks/sass_seg.py`.", ""]
        lines += seg_table(m.seg, clock) + [""]
    if m.eager is not None:
        e = m.eager
        what = "`QuantLinear.forward`, 64x64, 1 bit g64, fp16, M = 1, reference backend"
        lines += ["## Thin eager path (host, CPU)", "",
                  "| what | µs per call (median) |", "|---|---|",
                  f"| {what} | {e['forward_us']:.1f} |",
                  f"| the reference kernel alone (`backends.reference.lut_linear`, same tensors) | {e['kernel_us']:.1f} |",
                  f"| **forward with the kernel stubbed out** (returns a preallocated tensor): the host path "
                  f"(goal ≤ 10) | {e['overhead_us']:.1f} |",
                  f"| `ops.run(\"lut_linear\", ...)` with the stub: argument checks + backend selection + call | "
                  f"{e['run_us']:.1f} |",
                  "", f"{e['calls']} calls after 200 warm-up, torch threads = {e['threads']}, "
                      f"load average {os.getloadavg()[0]:.1f} (a shared machine: read ±20 %).", ""]
    if m.unmeasured:
        lines += ["Kernels in the cubins that no row measures (add them to `benchmarks/sass_build.py`): "
                  + ", ".join(f"`{u}`" for u in m.unmeasured), ""]
    lines += [n + "" for n in m.notes]
    lines.append(f"`--check`: {len(bad)} CUDA configuration(s) over budget or spilling." if bad else
                 "`--check`: every CUDA configuration is within budget and spill-free.")
    return "\n".join(lines) + "\n"


def write(text: str, out: Optional[str]) -> None:
    """Print the report and, with --out, write it there, keeping the hand-written READING section of the old file."""
    print(text)
    if out:
        kept = ""
        if os.path.isfile(out):
            with open(out) as f:
                old = f.read()
            if READING in old:
                kept = "\n" + old[old.index(READING):]
        with open(out, "w") as f:
            f.write(text + kept)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        m = measure(args)
    except CannotMeasure as e:
        print(f"sass_budget: {e}", file=sys.stderr)
        return 2
    bad = check(m, args.clock_ghz)
    write(report(m, args, bad, argv), args.out)
    if args.check and bad:
        print("\n".join(bad), file=sys.stderr)
        return 1
    return 0


def _source_state() -> str:
    """The commit measured, whether csrc/ or the Triton kernels had uncommitted edits, and a hash of them."""
    def git(*a):
        r = _run(["git", "-C", ROOT, *a])
        return r.stdout.strip() if r.returncode == 0 else "?"
    paths = ["csrc", "bivlm_kernels/backends/triton"]
    h = hashlib.sha256()
    for p in paths:
        for dirpath, _, files in sorted(os.walk(os.path.join(ROOT, p))):
            for name in sorted(files):
                if name.endswith((".cu", ".cuh", ".h", ".py")):
                    with open(os.path.join(dirpath, name), "rb") as f:
                        h.update(name.encode() + f.read())
    dirty = git("status", "--porcelain", "--", *paths)
    return (f"Sources: commit {git('rev-parse', '--short', 'HEAD')}"
            + (" with uncommitted edits to csrc/ or bivlm_kernels/backends/triton/" if dirty else "")
            + f" (sha256 of those sources {h.hexdigest()[:12]}).")


def _versions() -> str:
    out = []
    for mod in ("torch", "triton"):
        try:
            out.append(f"{mod} {__import__(mod).__version__}")
        except ImportError:
            out.append(f"{mod} absent")
    return ", ".join(out)


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    sys.exit(main())


