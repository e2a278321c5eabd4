#!/usr/bin/env python
"""Kernel microbenchmarks: packed 1/2/4-bit and mixed-segment linear layers against fp16 ``F.linear``.

For every available kernel path (CUDA extension, Triton, and the reference at small sizes) x format x shape x M,
in one run on one GPU:

* ``fp16``   dense ``torch.nn.functional.linear(x, W)`` (the baseline, in ``--dtype``), measured in the same run;
* ``lut1``   1-bit LUT (per-group codebook), ``torch.ops.bivlm.lut_linear``;
* ``lut2``   2-bit LUT, ``torch.ops.bivlm.lut_linear``;
* ``affine4`` 4-bit affine (scale + zero per group), ``torch.ops.bivlm.affine_linear``;
* ``mixed``  a :class:`bivlm_kernels.nn.QuantLinear` with a column permutation, ~10 % of the columns (rounded to
  whole groups) at 2 bits and the rest at 1 bit: the module's full forward, because that is what a mixed layer
  costs (``cuda`` at M <= 16: the one-launch segmented kernel + the split-K reduce; elsewhere index_select + two
  segment ops with fp32 accumulation).

Method (also written into every result file):

* weights are random packed codes and random codebooks/scales (speed does not depend on the values); each
  format gets enough distinct copies that one timed call sequence streams more than ``--l2-factor`` x the L2
  size, and ``triton.testing.do_bench`` additionally flushes the L2 before every timed sequence;
* a timed sequence calls the layer once per copy; the reported time is the median over sequences divided by the
  number of copies (µs per call). ``eager`` mode includes the Python/dispatch cost of each call; ``graph`` mode
  (``--cuda-graph``) replays the same sequence captured in one CUDA graph, which removes launch overhead;
* effective GB/s = bytes of ALL buffers a call must touch once (packed codes + codebooks/scales/zeros + perm +
  activations x [M, K] + output y [M, N]) / time; ``% copy BW`` = that / the device-to-device copy bandwidth
  measured at start (read + write bytes of a 1 GiB ``Tensor.copy_`` / time), the practical memory roofline;
* ``mem-ideal`` = (fp16 bytes of the same call) / (packed bytes): the speedup a purely memory-bound kernel at
  100 % of the roofline would reach at that M; at large M the problem is compute-bound and it does not apply;
* every quantized point is checked against ``F.linear(x, dequantized W)`` (relative Frobenius error of the
  output); a point whose error exceeds 2e-2 is flagged ``WRONG`` so that a fast wrong kernel is never a result.

Without a GPU the script prints that it skips (exit 0); ``--dry-run`` prints the plan; ``--smoke`` runs the
code paths on tiny shapes on the CPU with the reference backend and a wall-clock timer (labelled as such,
written to a temporary folder, never under ``benchmarks/results``).
"""
from __future__ import annotations

import argparse
import csv
import gc
import itertools
import json
import math
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import bench_common as bc  # noqa: E402  (puts the repo root on sys.path)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bivlm_kernels import ops  # noqa: E402
from bivlm_kernels.nn import QuantLinear  # noqa: E402

SHAPES_CSV = bc.BENCH_DIR / "shapes.csv"
ALL_M = (1, 4, 16, 64, 256, 1024, 4096)
QUICK_M = (1, 16, 1024)
SMOKE_SHAPES = (("smoke_a", 256, 512), ("smoke_b", 384, 256))
SMOKE_M = (1, 4)
DENSE = "fp16"             # the baseline's format label (its dtype is --dtype)
WRONG_REL_ERR = 2e-2


@dataclass(frozen=True)
class Format:
    name: str
    desc: str
    op: str                 # the bivlm op whose backends can run it
    mixed: bool = False

    def segments(self, k: int, g: int) -> list:
        if self.name == "lut1":
            return [(1, k)]
        if self.name == "lut2":
            return [(2, k)]
        if self.name == "affine4":
            return [(4, k)]
        salient = min(k - g, max(g, int(round(0.1 * k / g)) * g))     # ~10 % of K, whole groups, >= 1 group
        return [(2, salient), (1, k - salient)]


FORMATS = {f.name: f for f in (
    Format("lut1", "1-bit LUT (codebook per group)", "lut_linear"),
    Format("lut2", "2-bit LUT (codebook per group)", "lut_linear"),
    Format("affine4", "4-bit affine (scale+zero per group)", "affine_linear"),
    Format("mixed", "QuantLinear: perm + ~10% cols 2-bit LUT + rest 1-bit LUT", "lut_linear", mixed=True),
)}

COLUMNS = ("mode", "backend", "format", "shape", "N", "K", "M", "dtype", "group_size", "us", "us_p20", "us_p80",
           "dense_us", "speedup", "mem_ideal_speedup", "GBps", "copy_frac", "TFLOPs", "bytes_per_call",
           "weight_bytes", "dense_weight_bytes", "weight_compression", "bits_per_weight", "copies", "rel_err",
           "status", "wall_s")


# ---------------------------------------------------------------------------------------------------------
# shapes and plan
# ---------------------------------------------------------------------------------------------------------

def load_shapes(path: Path = SHAPES_CSV) -> list:
    with open(path) as f:
        rows = list(csv.DictReader(line for line in f if not line.startswith("#")))
    return [{"name": r["name"], "N": int(r["N"]), "K": int(r["K"]), "quick": r.get("quick", "0") == "1",
             "model": r.get("model", ""), "layer": r.get("layer", "")} for r in rows]


def select_shapes(spec: Optional[str], quick: bool) -> list:
    table = load_shapes()
    if spec in (None, ""):
        return [s for s in table if s["quick"]] if quick else table
    if spec == "all":
        return table
    by_name = {s["name"]: s for s in table}
    out = []
    for tok in spec.split(","):
        tok = tok.strip()
        if tok in by_name:
            out.append(by_name[tok])
        elif "x" in tok and all(p.isdigit() for p in tok.split("x")):
            n, k = (int(p) for p in tok.split("x"))
            match = [s for s in table if (s["N"], s["K"]) == (n, k)]
            out.append(match[0] if match else {"name": tok, "N": n, "K": k, "quick": False})
        else:
            raise SystemExit(f"unknown shape {tok!r}: use a name from {SHAPES_CSV.name} "
                             f"({', '.join(by_name)}), NxK (out x in), or 'all'")
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Shapes are N x K = out_features x in_features, listed in "
                                       f"{SHAPES_CSV.relative_to(bc.REPO_ROOT)}.")
    p.add_argument("--backends", default="cuda,triton,reference",
                   help="kernel paths to measure (comma list of cuda, triton, reference); unavailable ones are "
                        "reported and skipped (default: %(default)s)")
    p.add_argument("--formats", default=",".join(FORMATS),
                   help=f"comma list of {', '.join(FORMATS)} (fp16 F.linear always runs) (default: %(default)s)")
    p.add_argument("--shapes", default=None,
                   help="comma list of shape names from shapes.csv or NxK; 'all' (default: all, or the quick "
                        "ones with --quick)")
    p.add_argument("--m", default=None, help=f"comma list of M (tokens) (default: {','.join(map(str, ALL_M))}; "
                                            f"--quick: {','.join(map(str, QUICK_M))})")
    p.add_argument("--dtype", default="float16", choices=("float16", "bfloat16"),
                   help="activation / codebook / baseline dtype (default: %(default)s)")
    p.add_argument("--group-size", type=int, default=128, help="quantization group size (default: %(default)s)")
    p.add_argument("--quick", action="store_true",
                   help="the shapes marked quick in shapes.csv, M in {1,16,1024}, shorter timing windows")
    p.add_argument("--cuda-graph", action="store_true",
                   help="also measure CUDA-graph replay of every point (both modes are reported, labelled)")
    p.add_argument("--call", default="op", choices=("op", "module"),
                   help="single-segment formats: call the torch.ops.bivlm op directly (kernel cost) or through "
                        "QuantLinear.forward (module cost); mixed always uses the module (default: %(default)s)")
    p.add_argument("--reference-max-m", type=int, default=4,
                   help="measure the (slow) reference path only for M <= this (default: %(default)s)")
    p.add_argument("--reference-max-nk", type=float, default=5e7,
                   help="... and only for N*K <= this (default: %(default)g)")
    p.add_argument("--l2-factor", type=float, default=2.0,
                   help="cycle through enough weight copies to stream this many times the L2 size per timed "
                        "sequence (default: %(default)s)")
    p.add_argument("--max-copies", type=int, default=128, help="cap on weight copies (default: %(default)s)")
    p.add_argument("--warmup-ms", type=float, default=None, help="do_bench warm-up window (default 25, quick 15)")
    p.add_argument("--rep-ms", type=float, default=None, help="do_bench timing window (default 100, quick 50)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="stop starting new points after this many seconds; unmeasured points are listed")
    p.add_argument("--out", default=None,
                   help="output folder (default: benchmarks/results/kernels_<UTC date>; smoke: a temp folder)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--triton-configs", default=None,
                   help="JSON of Triton launch configs saved by an earlier run (triton_tuned_configs.json) to "
                        "load instead of tuning on first use")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dry-run", action="store_true", help="print the plan (points, copies, estimate) and exit")
    p.add_argument("--smoke", action="store_true",
                   help="CPU check of the code paths: tiny shapes, reference backend, wall-clock timer; the "
                        "output is labelled as not GPU results and goes to a temp folder")
    a = p.parse_args(argv)
    a.formats = [f.strip() for f in a.formats.split(",") if f.strip()]
    bad = [f for f in a.formats if f not in FORMATS]
    if bad:
        p.error(f"unknown formats {bad}; choose from {list(FORMATS)}")
    a.backends = [b.strip() for b in a.backends.split(",") if b.strip()]
    bad = [b for b in a.backends if b not in ("cuda", "triton", "reference")]
    if bad:
        p.error(f"unknown backends {bad}; choose from cuda, triton, reference")
    if a.smoke:
        a.shapes_list = [{"name": n, "N": nn, "K": k, "quick": True} for n, nn, k in SMOKE_SHAPES]
        a.m_list = [int(m) for m in a.m.split(",")] if a.m else list(SMOKE_M)
        a.backends = [b for b in a.backends if b == "reference" or
                      (b == "triton" and ops.available_backends("lut_linear", torch.device("cpu"))[0] == "triton")]
        a.cuda_graph = False
    else:
        a.shapes_list = select_shapes(a.shapes, a.quick)
        a.m_list = [int(m) for m in a.m.split(",")] if a.m else list(QUICK_M if a.quick else ALL_M)
    if a.warmup_ms is None:
        a.warmup_ms = 15 if a.quick else 25
    if a.rep_ms is None:
        a.rep_ms = 50 if a.quick else 100
    a.torch_dtype = getattr(torch, a.dtype)
    a.modes = ["eager", "graph"] if a.cuda_graph else ["eager"]
    return a


def backends_for(args, device) -> tuple:
    """({op: [backend, ...]} to run, [notes about requested-but-missing paths])."""
    runnable, notes = {}, []
    for op in ("lut_linear", "affine_linear"):
        avail = ops.available_backends(op, device)
        runnable[op] = [b for b in args.backends if b in avail]
        for b in args.backends:
            if b not in avail:
                why = {"cuda": "CUDA extension bivlm_kernels._C not built or lacks the op",
                       "triton": "Triton kernels not installed/registered for this op"}.get(b, "unavailable")
                notes.append(f"{b} / {op}: not measured ({why})")
    return runnable, notes


def plan(args, runnable) -> list:
    """Every point to measure, grouped by shape then M then mode; the dense baseline first in each group."""
    points = []
    for s in args.shapes_list:
        for m in args.m_list:
            for mode in args.modes:
                points.append((s["name"], m, mode, DENSE, "torch"))
                for fname in args.formats:
                    for b in runnable[FORMATS[fname].op]:
                        if b == "reference" and not args.smoke and (
                                m > args.reference_max_m or s["N"] * s["K"] > args.reference_max_nk):
                            continue
                        points.append((s["name"], m, mode, fname, b))
    return points


# ---------------------------------------------------------------------------------------------------------
# layers
# ---------------------------------------------------------------------------------------------------------

def random_quant_layer(fmt: Format, n: int, k: int, g: int, dtype, device) -> QuantLinear:
    """An empty QuantLinear filled with random codes and plausible codebooks/scales (no calibration)."""
    layer = QuantLinear(k, n, group_size=g, bias=False, dtype=dtype, device=device,
                        segments=fmt.segments(k, g), perm=fmt.mixed)
    with torch.no_grad():
        for seg in layer.segments:
            seg.qweight.copy_(torch.randint(-2 ** 31, 2 ** 31, tuple(seg.qweight.shape), dtype=torch.int32,
                                            device=device))
            if seg.kind == "lut":
                cb = torch.randn(tuple(seg.codebook.shape), device=device) * 0.02
                seg.codebook.copy_(cb.sort(dim=-1).values.to(dtype))
            else:
                seg.scales.copy_((torch.rand(tuple(seg.scales.shape), device=device) * 4e-3 + 1e-3).to(dtype))
                seg.zeros.copy_(torch.full(tuple(seg.zeros.shape), 7.5, device=device).to(dtype))
        if layer.perm is not None:
            layer.perm.copy_(torch.randperm(k, device=device).to(torch.int32))
    return layer


def buffer_bytes(layer: torch.nn.Module) -> int:
    """Bytes of every weight buffer (codes, codebooks, scales, zeros, perm; not bias)."""
    return sum(b.numel() * b.element_size() for name, b in layer.named_buffers()
               if name.rsplit(".", 1)[-1] != "bias")


def make_call(layer: QuantLinear, call: str):
    """x -> y for one layer copy: the bare op for single-segment layers (``--call op``), else the module."""
    if call == "op" and len(layer.segments) == 1 and layer.perm is None:
        seg = layer.segments[0]
        if seg.kind == "lut":
            qw, cb, bits, g = seg.qweight, seg.codebook, seg.bits, seg.group_size
            return lambda x: ops.lut_linear(x, qw, cb, bits, g)
        qw, sc, ze, bits, g = seg.qweight, seg.scales, seg.zeros, seg.bits, seg.group_size
        return lambda x: ops.affine_linear(x, qw, sc, ze, bits, g)
    return layer


def n_copies(bytes_per_copy: int, l2_bytes: int, args) -> int:
    return int(min(args.max_copies, max(2, math.ceil(args.l2_factor * l2_bytes / max(bytes_per_copy, 1)))))


class ShapeState:
    """All weight copies of one shape: dense fp16 and each quantized format, plus a dequantized copy 0."""

    def __init__(self, shape: dict, fmts: list, args, device, l2_bytes: int):
        n, k, dt = shape["N"], shape["K"], args.torch_dtype
        self.n, self.k = n, k
        self.dense_weight_bytes = n * k * torch.empty((), dtype=dt).element_size()
        c = n_copies(self.dense_weight_bytes, l2_bytes, args)
        self.dense = [torch.randn(n, k, device=device, dtype=dt) * 0.02 for _ in range(c)]
        self.quant, self.wdeq, self.wbytes, self.bpw = {}, {}, {}, {}
        for fname in fmts:
            fmt = FORMATS[fname]
            first = random_quant_layer(fmt, n, k, args.group_size, dt, device)
            self.wbytes[fname] = buffer_bytes(first)
            self.bpw[fname] = self.wbytes[fname] * 8 / (n * k)
            c = n_copies(self.wbytes[fname], l2_bytes, args)
            self.quant[fname] = [first] + [random_quant_layer(fmt, n, k, args.group_size, dt, device)
                                           for _ in range(c - 1)]
            with ops.use_backend("reference"), torch.no_grad():
                self.wdeq[fname] = first.dequantize().to(dt)


# ---------------------------------------------------------------------------------------------------------
# measuring
# ---------------------------------------------------------------------------------------------------------

def timed(fn, mode: str, args, device) -> tuple:
    """(median, p20, p80) ms of one call of ``fn`` (a whole cycled sequence), in ``mode``."""
    if device.type != "cuda":
        return bc.time_cpu(fn, reps=3)
    if mode == "graph":
        g = bc.Graphed(fn)
        try:
            return bc.time_gpu(g, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms)
        finally:
            del g
    return bc.time_gpu(fn, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms)


def rel_err(y: torch.Tensor, y_ref: torch.Tensor) -> float:
    y, y_ref = y.float(), y_ref.float()
    return float(torch.linalg.vector_norm(y - y_ref) / torch.linalg.vector_norm(y_ref).clamp_min(1e-30))


def measure_point(st: ShapeState, x, m, mode, fname, backend, args, device, dense_us, known_err) -> dict:
    """One row: time ``fname`` on ``backend`` at this M in ``mode``; check it against the dequantized weight
    (in eager mode; graph rows reuse the eager check, ``known_err``)."""
    esize = x.element_size()
    act_bytes = (m * st.k + m * st.n) * esize
    row = {"mode": mode, "backend": backend, "format": fname, "N": st.n, "K": st.k, "M": m,
           "dtype": args.dtype, "group_size": args.group_size, "dense_weight_bytes": st.dense_weight_bytes}
    if fname == DENSE:
        ws = st.dense
        def fn():
            y = None
            for w in ws:
                y = F.linear(x, w)
            return y
        wbytes, copies = st.dense_weight_bytes, len(ws)
        row.update(bits_per_weight=8.0 * esize)
        ctx = _null()
    else:
        calls = [make_call(layer, args.call) for layer in st.quant[fname]]
        def fn():
            y = None
            for c in calls:
                y = c(x)
            return y
        wbytes, copies = st.wbytes[fname], len(calls)
        row.update(bits_per_weight=st.bpw[fname])
        ctx = ops.use_backend(backend)
    with ctx, torch.no_grad():
        err = known_err
        if fname != DENSE and mode == "eager":
            err = rel_err(calls[0](x), F.linear(x, st.wdeq[fname]))
        med, p20, p80 = timed(fn, mode, args, device)
    us = med * 1e3 / copies
    total = wbytes + act_bytes
    row.update(us=us, us_p20=p20 * 1e3 / copies, us_p80=p80 * 1e3 / copies, bytes_per_call=total,
               weight_bytes=wbytes, weight_compression=st.dense_weight_bytes / wbytes, copies=copies,
               GBps=total / (us * 1e-6) / 1e9, TFLOPs=2.0 * m * st.n * st.k / (us * 1e-6) / 1e12,
               rel_err=err, mem_ideal_speedup=(st.dense_weight_bytes + act_bytes) / total)
    if fname == DENSE:
        row["dense_us"], row["speedup"] = us, 1.0
    elif dense_us:
        row["dense_us"], row["speedup"] = dense_us, dense_us / us
    if fname == DENSE:
        row["status"] = "ok"
    elif err is None:
        row["status"] = "unchecked (eager check failed)"
    else:
        row["status"] = "ok" if err <= WRONG_REL_ERR else f"WRONG (rel_err > {WRONG_REL_ERR:g})"   # NaN: WRONG
    return row


def _recover(device) -> None:
    """After a failed point: release cached memory (a sticky CUDA error, e.g. an illegal address, will make
    every later point fail too; their rows then say so)."""
    if device.type == "cuda":
        try:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        except Exception:  # noqa: BLE001
            pass


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def run(args, device) -> int:
    torch.manual_seed(args.seed)
    smoke = device.type != "cuda"
    out = bc.prepare_out_dir(args.out, smoke, "kernels")
    info = bc.env_info(device, smoke=smoke)
    if device.type == "cuda" and args.triton_configs:
        n_cfg = bc.load_triton_tuned_configs(args.triton_configs)
        info["triton_configs_loaded"] = f"{n_cfg} from {args.triton_configs}" if n_cfg is not None else "none"
    runnable, notes = backends_for(args, device)
    points = plan(args, runnable)
    budget = bc.Budget(args.budget_s)
    print(f"[bench_kernels] {info['device']}; {len(points)} points; output -> {out}", flush=True)
    for n_ in notes:
        print(f"[bench_kernels] {n_}", flush=True)
    copy = bc.measure_copy_bandwidth(device)
    info.update({"copy_bandwidth_GBps": round(copy["copy_GBps"], 1),
                 "copy_bandwidth_how": f"{'device-to-device' if not smoke else 'HOST (smoke)'} "
                                       f"Tensor.copy_ of {copy['copy_bytes'] / 2 ** 20:.0f} MiB, "
                                       f"(read+write bytes)/median time",
                 "timer": ("wall-clock perf_counter (CPU smoke)" if smoke else
                           "triton.testing.do_bench median, L2 flushed per timed sequence, weights cycled"),
                 "modes": ", ".join(args.modes), "call": args.call, "dtype": args.dtype,
                 "group_size": args.group_size})
    print(f"[bench_kernels] copy bandwidth {copy['copy_GBps']:.0f} GB/s", flush=True)
    l2 = (getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2 ** 20)
          if device.type == "cuda" else 0)          # smoke: the minimum of 2 copies
    rows, not_run = [], []
    shapes = {s["name"]: s for s in args.shapes_list}
    interrupted = False
    try:
        for sname, group in itertools.groupby(points, key=lambda p: p[0]):
            group = list(group)
            if budget.exceeded():
                not_run += group
                continue
            shape = shapes[sname]
            fmts = sorted({p[3] for p in group if p[3] != DENSE}, key=list(FORMATS).index)
            t0 = time.monotonic()
            try:
                st = ShapeState(shape, fmts, args, device, l2)
            except torch.cuda.OutOfMemoryError as e:      # pragma: no cover - GPU only
                print(f"[bench_kernels] {sname}: out of memory building weights ({e}); skipped", flush=True)
                not_run += group
                continue
            print(f"[bench_kernels] {sname} ({shape['N']}x{shape['K']}): weights ready in "
                  f"{time.monotonic() - t0:.1f}s; copies dense {len(st.dense)}, "
                  + ", ".join(f"{f} {len(st.quant[f])}" for f in fmts), flush=True)
            x, cur_m, dense_us, err_cache = None, None, {}, {}
            for (_, m, mode, fname, backend) in group:
                if budget.exceeded():
                    not_run.append((sname, m, mode, fname, backend))
                    continue
                if m != cur_m:
                    x = torch.randn(m, shape["K"], device=device, dtype=args.torch_dtype)
                    cur_m, dense_us, err_cache = m, {}, {}
                t1 = time.monotonic()
                try:
                    row = measure_point(st, x, m, mode, fname, backend, args, device, dense_us.get(mode),
                                        err_cache.get((fname, backend)))
                except Exception as e:  # noqa: BLE001 - one failing kernel must not end the run
                    msg = str(e).splitlines()[0][:160] if str(e) else ""
                    row = {"mode": mode, "backend": backend, "format": fname, "N": shape["N"], "K": shape["K"],
                           "M": m, "dtype": args.dtype, "group_size": args.group_size,
                           "status": f"error: {type(e).__name__}: {msg}"}
                    _recover(device)
                row["shape"], row["wall_s"] = sname, round(time.monotonic() - t1, 2)
                if fname == DENSE:
                    dense_us[mode] = row.get("us")
                elif mode == "eager" and row.get("rel_err") is not None:
                    err_cache[(fname, backend)] = row["rel_err"]
                rows.append(row)
                print("  " + _line(row), flush=True)
                bc.write_csv(out / "kernels.csv", rows, COLUMNS)       # a killed run keeps every measured point
            del st, x
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            write_outputs(out, rows, info, args, notes, not_run, smoke, copy, final=False)
    except KeyboardInterrupt:       # Ctrl-C, or SIGTERM from a time limit (see __main__): keep what was measured
        interrupted = True
        done = {(r["shape"], r["M"], r["mode"], r["format"], r["backend"]) for r in rows} | set(not_run)
        not_run += [p for p in points if p not in done]
        info["interrupted"] = (f"yes, after {budget.elapsed():.0f}s: the tables hold the points measured "
                               f"until then")
        print(f"[bench_kernels] interrupted after {budget.elapsed():.0f}s; writing the {len(rows)} measured "
              f"points", flush=True)
    if device.type == "cuda":
        info["clocks_note_end"] = bc.clocks_note(bc.nvidia_smi(device.index or 0))
    info["elapsed_s"] = round(budget.elapsed(), 1)
    if device.type == "cuda":
        n_cfg = bc.save_triton_tuned_configs(out / "triton_tuned_configs.json")
        if n_cfg is not None:
            info["triton_tuned_configs"] = f"{n_cfg} configs saved to triton_tuned_configs.json"
    write_outputs(out, rows, info, args, notes, not_run, smoke, copy, final=True)
    print(f"[bench_kernels] done in {budget.elapsed():.0f}s: {len(rows)} points measured, {len(not_run)} not "
          f"run; {out / 'kernels.md'}", flush=True)
    if smoke:
        print(f"[bench_kernels] {bc.SMOKE_BANNER}", flush=True)
    return 130 if interrupted else 0


def _line(r: dict) -> str:
    if r.get("us") is None:
        return f"{r['shape']:>20} M={r['M']:<5} {r['mode']:<5} {r['backend']:<9} {r['format']:<8} {r['status']}"
    return (f"{r['shape']:>20} M={r['M']:<5} {r['mode']:<5} {r['backend']:<9} {r['format']:<8} "
            f"{r['us']:9.1f} us  x{bc.fmt(r.get('speedup'), '.2f')}  {r['GBps']:7.0f} GB/s  "
            f"err {bc.fmt(r.get('rel_err'), '.1e')}  {r['status']}")


# ---------------------------------------------------------------------------------------------------------
# outputs
# ---------------------------------------------------------------------------------------------------------

TARGETS = (
    # (issue, backend, format, shape (N, K), M, floor, graph allowed)
    ("3", "cuda", "lut1", (28672, 8192), 1, 10.0, False),
    ("3", "cuda", "lut2", (28672, 8192), 1, 6.0, False),
    ("3", "cuda", "lut1", (11008, 4096), 1, 6.0, True),
    ("3", "cuda", "lut2", (11008, 4096), 1, 4.5, True),
    ("3", "cuda", "lut1", (4096, 11008), 1, 6.0, True),
    ("3", "cuda", "lut2", (4096, 11008), 1, 4.5, True),
    ("4", "triton", "lut1", (28672, 8192), 1, 7.0, False),
    ("4", "triton", "lut2", (28672, 8192), 1, 4.5, False),
)


def target_rows(rows: list) -> list:
    """The performance floors of issues 3 (CUDA) and 4 (Triton), checked against this run's measurements."""
    idx = {(r["backend"], r["format"], r["N"], r["K"], r["M"], r["mode"]): r for r in rows if r.get("speedup")}

    def sp(b, f, n, k, m, mode):
        r = idx.get((b, f, n, k, m, mode))
        return None if r is None or r["status"] != "ok" else r["speedup"]

    out = []
    for issue, b, f, (n, k), m, floor, graph_ok in TARGETS:
        e, g = sp(b, f, n, k, m, "eager"), sp(b, f, n, k, m, "graph")
        if e is None and g is None:
            continue
        counted = [v for v in (e, g if graph_ok else None) if v is not None]
        best = max(counted) if counted else None
        out.append({"target": f"issue {issue}: M={m} {n}x{k} {f} >= {floor}x" + (" (graph allowed)" if graph_ok
                                                                              else " (eager)"),
                    "backend": b, "eager": e, "graph": g, "met": _met(best, floor)})
    for b in ("cuda", "triton"):
        for f in ("lut1", "lut2"):                           # M=16 keeps >= 80 % of the M=1 speedup (issue 3)
            for (bb, ff, n, k, m, mode), r in idx.items():
                if (bb, ff, m) == (b, f, 16) and b == "cuda":
                    one = sp(b, f, n, k, 1, mode)
                    if one and r["status"] == "ok":
                        out.append({"target": f"issue 3: M=16 {n}x{k} {f} >= 0.8 x M=1 speedup ({mode})",
                                    "backend": b, mode: r["speedup"], "floor": 0.8 * one,
                                    "met": _met(r["speedup"], 0.8 * one)})
        large = [r for (bb, _f, _n, _k, m, _mo), r in idx.items() if bb == b and m >= 1024 and r["status"] == "ok"]
        if large:
            worst = min(large, key=lambda r: r["speedup"])
            floor = 0.9 if b == "cuda" else 0.8
            out.append({"target": f"issue {'3' if b == 'cuda' else '4'}: M>=1024 every format/shape >= {floor}x "
                                  f"(worst: {worst['format']} {worst['N']}x{worst['K']} M={worst['M']} "
                                  f"{worst['mode']})", "backend": b, worst["mode"]: worst["speedup"],
                        "met": _met(worst["speedup"], floor)})
    ratios = []
    for (b, f, n, k, m, mode), r in idx.items():
        c = idx.get(("cuda", f, n, k, m, mode))
        if b == "triton" and c is not None and r["status"] == "ok" and c["status"] == "ok":
            ratios.append((r["speedup"] / c["speedup"], f, n, k, m, mode))
    if ratios:
        w = min(ratios)
        out.append({"target": f"issue 4: Triton >= 0.7 x CUDA speed everywhere (worst: {w[1]} {w[2]}x{w[3]} "
                              f"M={w[4]} {w[5]}: {w[0]:.2f})", "backend": "triton", "met": _met(w[0], 0.7)})
    return out


def overview_table(rows: list) -> str:
    """One line per (shape, M, mode), one column per measured path/format: speedup over fp16 ``F.linear`` of
    the same run, µs per call in brackets (the compact table ``device_check.sh`` puts in its summary)."""
    paths = list(dict.fromkeys((r["backend"], r["format"]) for r in rows if r["format"] != DENSE))
    if not paths:
        return ""
    cells = {(r["shape"], r["M"], r["mode"], r["backend"], r["format"]): r for r in rows}
    groups = list(dict.fromkeys((r["shape"], r["N"], r["K"], r["M"], r["mode"]) for r in rows))

    def cell(r):
        if r is None:
            return "–"
        if r.get("us") is None:
            return "error"
        if r.get("status") != "ok" and r["format"] != DENSE:
            return "WRONG" if str(r.get("status", "")).startswith("WRONG") else "unchecked"
        return f"{bc.fmt(r.get('speedup'), '.2f', 'x')} ({r['us']:.1f})"

    head = "| N x K | M | mode | fp16 µs | " + " | ".join(f"{b} {f}" for b, f in paths) + " |"
    lines = [head, "|" + "---|" * (4 + len(paths))]
    for sname, n, k, m, mode in groups:
        dense = cells.get((sname, m, mode, "torch", DENSE))
        lines.append(f"| {n}x{k} | {m} | {mode} | {bc.fmt(None if dense is None else dense.get('us'), '.1f')} | "
                     + " | ".join(cell(cells.get((sname, m, mode, b, f))) for b, f in paths) + " |")
    return "\n".join(lines) + "\n"


def _met(v, floor) -> str:
    return "–" if v is None else ("yes" if v >= floor else "**no**")


def write_outputs(out: Path, rows, info, args, notes, not_run, smoke, copy, final: bool) -> None:
    """Tables after every shape (so a killed run keeps what it measured), plots at the end."""
    title = "bivlm kernel benchmark" + (" — CPU SMOKE TEST, NOT GPU RESULTS" if smoke else "")
    if not final:
        title += " (PARTIAL: run still in progress or interrupted)"
    md = [bc.env_markdown(info, title)]
    md.append("## Method\n\n" + METHOD_TEXT.format(l2=args.l2_factor, wrong=WRONG_REL_ERR) + "\n")
    if notes:
        md.append("## Paths not measured\n\n" + "\n".join(f"- {n}" for n in notes) + "\n")
    tr = target_rows(rows)
    if tr:
        md.append("## Performance floors (issues 3 and 4)\n\n" + bc.md_table(tr, [
            ("target", "target"), ("path", "backend"), ("eager", lambda r: bc.fmt(r.get("eager"), ".2f", "x")),
            ("graph", lambda r: bc.fmt(r.get("graph"), ".2f", "x")), ("met", "met")]))
    ov = overview_table(rows)
    if ov:
        md.append("## Speedup over fp16 F.linear (µs per call in brackets)\n\n" + ov)
    cols = [("M", "M"), ("mode", "mode"), ("path", "backend"), ("format", "format"),
            ("bits/w", lambda r: bc.fmt(r.get("bits_per_weight"), ".3g")),
            ("µs", lambda r: bc.fmt(r.get("us"), ".1f")), ("fp16 µs", lambda r: bc.fmt(r.get("dense_us"), ".1f")),
            ("speedup", lambda r: bc.fmt(r.get("speedup"), ".2f", "x")),
            ("mem-ideal", lambda r: bc.fmt(r.get("mem_ideal_speedup"), ".1f", "x")),
            ("GB/s", lambda r: bc.fmt(r.get("GBps"), ".0f")),
            ("% copy BW", lambda r: bc.fmt(None if r.get("GBps") is None else
                                           100 * r["GBps"] / copy["copy_GBps"], ".0f", "%")),
            ("TFLOP/s", lambda r: bc.fmt(r.get("TFLOPs"), ".1f")),
            ("weight MB (fp16 MB)", lambda r: "–" if r.get("weight_bytes") is None else
             f"{r['weight_bytes'] / 1e6:.3g} ({r['dense_weight_bytes'] / 1e6:.3g})"),
            ("copies", "copies"), ("rel err", lambda r: bc.fmt(r.get("rel_err"), ".1e")), ("status", "status")]
    for r in rows:
        if r.get("GBps") is not None:
            r["copy_frac"] = r["GBps"] / copy["copy_GBps"]
    for sname, grp in itertools.groupby(rows, key=lambda r: r["shape"]):
        grp = list(grp)
        md.append(f"## {sname}: N={grp[0]['N']} x K={grp[0]['K']}\n\n" + bc.md_table(grp, cols))
    if not_run:
        md.append(f"## Not run\n\n{len(not_run)} planned points were not measured (time budget "
                  f"{args.budget_s}s exhausted, run interrupted, or weights did not fit), e.g. "
                  + ", ".join(f"{s} M={m} {mo} {b}/{f}" for s, m, mo, f, b in not_run[:8]) + "\n")
    bc.write_csv(out / "kernels.csv", rows, COLUMNS)
    (out / "kernels_env.json").write_text(json.dumps(info, indent=2) + "\n")
    (out / "kernels.md").write_text("\n".join(md))
    if final and not args.no_plots and rows:
        try:
            plot(out, rows, args, copy, smoke)
        except Exception as e:  # noqa: BLE001 - plots are a convenience, never lose the tables for them
            print(f"[bench_kernels] plotting failed: {type(e).__name__}: {e}", flush=True)


METHOD_TEXT = """\
- Baseline: `torch.nn.functional.linear(x, W)` with a dense `W` in the same dtype, same run, same M.
- Quantized weights: random packed codes + random codebooks/scales in the `bivlm-packed` v1 layout (speed does
  not depend on the values). Single-segment formats call the `torch.ops.bivlm` op directly (`call`), `mixed`
  runs `QuantLinear.forward` (cuda, M <= 16: one segmented launch + reduce; else perm index_select + 2 segment
  ops, fp32 accumulation).
- Each timed sequence calls the layer once on each of `copies` distinct weight copies (together more than
  {l2}x the L2 size), and do_bench flushes the L2 before every sequence: weights always come from HBM.
  µs = median sequence time / copies (p20/p80 in the CSV). `eager`: every call is launched from Python
  (includes dispatch overhead); `graph`: the same sequence replayed from one CUDA graph.
- GB/s = (all weight buffers: codes + codebooks/scales/zeros + perm, + x [M,K] + y [M,N]) / µs.
  % copy BW = GB/s / the measured copy bandwidth (the practical memory roofline).
  mem-ideal = fp16 bytes / packed bytes at this M: the speedup of a purely memory-bound kernel at the roofline.
  TFLOP/s = 2·M·N·K / µs. bits/w = all weight buffer bits / (N·K) (honest bits per weight).
- rel err = ‖y − F.linear(x, dequantized W)‖ / ‖F.linear(x, dequantized W)‖ on copy 0; above {wrong}
  the point is flagged WRONG.
"""


def plot(out: Path, rows, args, copy, smoke: bool) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    for metric, ylabel, fname in (("speedup", "speedup vs fp16 F.linear", "speedup_vs_m"),
                                  ("copy_frac", "fraction of copy bandwidth", "roofline_vs_m")):
        for mode in args.modes:
            cols = min(3, len(shapes))
            nrows = math.ceil(len(shapes) / cols)
            fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 3.8 * nrows), squeeze=False)
            for ax, sname in zip(axes.flat, shapes):
                sel = [r for r in rows if r["shape"] == sname and r["mode"] == mode and r.get(metric) is not None
                       and r.get("status") == "ok" and (r["format"] != DENSE or metric != "speedup")]
                for key in dict.fromkeys((r["backend"], r["format"]) for r in sel):
                    pts = sorted((r["M"], r[metric]) for r in sel if (r["backend"], r["format"]) == key)
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{key[0]}/{key[1]}")
                ax.axhline(1.0, color="gray", lw=0.8, ls="--")
                ax.set_xscale("log", base=2)
                ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
                if metric == "speedup":
                    ax.set_yscale("log", base=2)
                    ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
                n_k = next((f"{r['N']}x{r['K']}" for r in rows if r["shape"] == sname), "")
                ax.set_title(f"{sname} ({n_k})", fontsize=9)
                ax.set_xlabel("M (tokens)")
                ax.set_ylabel(ylabel, fontsize=8)
                ax.grid(True, which="both", lw=0.3)
                ax.legend(fontsize=6)
            for ax in list(axes.flat)[len(shapes):]:
                ax.axis("off")
            dev = "CPU SMOKE TEST - NOT GPU RESULTS" if smoke else torch.cuda.get_device_name()
            fig.suptitle(f"bivlm {ylabel}, {mode} mode, {args.dtype}, g{args.group_size} — {dev}", fontsize=10)
            fig.tight_layout()
            fig.savefig(out / f"{fname}_{mode}.png", dpi=110)
            plt.close(fig)


def dry_run(args) -> int:
    device = bc.cuda_or_none() or torch.device("cpu")
    on_gpu = device.type == "cuda"
    if on_gpu or args.smoke:
        runnable, notes = backends_for(args, device)
    else:   # plan as it would be on a GPU with every requested path present
        runnable = {op: list(args.backends) for op in ("lut_linear", "affine_linear")}
        notes = ["no GPU here: the plan assumes every requested path is available"]
    points = plan(args, runnable)
    l2 = (torch.cuda.get_device_properties(device).L2_cache_size if on_gpu else 50 * 2 ** 20)
    esize = torch.empty((), dtype=args.torch_dtype).element_size()
    print(f"plan: {len(points)} points; shapes {[s['name'] for s in args.shapes_list]}; M {args.m_list}; "
          f"modes {args.modes}; formats {args.formats}; dtype {args.dtype}; g{args.group_size}; "
          f"L2 {'measured' if on_gpu else 'assumed (H100)'} {l2 / 2 ** 20:.0f} MiB")
    for n in notes:
        print("note:", n)
    for s in args.shapes_list:
        n, k = s["N"], s["K"]
        parts = [f"fp16 {n_copies(n * k * esize, l2, args)}x{n * k * esize / 1e6:.1f}MB"]
        for f in args.formats:
            from bivlm_kernels.formats import LayerSpec, SegmentSpec, check_bits
            spec = LayerSpec(k, n, args.group_size, tuple(SegmentSpec(b, w, check_bits(b))
                                                          for b, w in FORMATS[f].segments(k, args.group_size)),
                             has_perm=FORMATS[f].mixed)
            wb = spec.bits_per_weight(args.torch_dtype) * n * k / 8
            parts.append(f"{f} {n_copies(int(wb), l2, args)}x{wb / 1e6:.2f}MB "
                         f"({spec.bits_per_weight(args.torch_dtype):.3f} b/w)")
        npts = sum(1 for p in points if p[0] == s["name"])
        print(f"  {s['name']:>20} {n}x{k}: {npts} points; copies: " + ", ".join(parts))
    per_point = 1.5 * (args.warmup_ms + args.rep_ms) / 1e3 + 0.3     # + estimate runs, L2 flushes, capture
    est = len(points) * per_point + 3 * len(args.shapes_list)
    print(f"estimated time: ~{est / 60:.1f} min of timing windows and setup, plus Triton JIT/autotuning "
          f"(not estimable here); cap it with --budget-s")
    for p in points if len(points) <= 60 else points[:30] + [("...",) * 5] + points[-10:]:
        print("   ", " ".join(str(v) for v in p))
    return 0


def main(argv=None) -> int:
    return bc.dispatch(parse_args(argv), dry_run, run)


if __name__ == "__main__":
    # A time limit (`timeout`, benchmarks/device_check.sh) stops the run with SIGTERM: treat it as Ctrl-C so that
    # the measured points are written as tables (run() catches KeyboardInterrupt) instead of being lost.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    sys.exit(main())
