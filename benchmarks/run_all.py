#!/usr/bin/env python
"""Run the whole benchmark (kernel grid + end-to-end decode) on one GPU within a time budget.

    python benchmarks/run_all.py --out benchmarks/results/h100_$(date -u +%Y%m%d)            # full
    python benchmarks/run_all.py --quick --out benchmarks/results/h100_$(date -u +%Y%m%d)_quick

Writes under ``--out``: ``kernels/`` (kernels.md, kernels.csv, kernels_env.json, speedup_vs_m_*.png,
roofline_vs_m_*.png), ``e2e/`` (e2e.md, e2e.csv, e2e_env.json), ``run_all.log`` (everything printed) and
``README.md`` (device, versions, commit, the exact commands, the performance-floor table and the end-to-end
table). Each part runs in its own process with a share of ``--budget-min``: a part that runs out of time stops
starting new points and still writes what it measured; a part that hangs is killed after its share plus a grace
period, and its partial tables stay.

Without a GPU this prints that it skips (exit 0); ``--dry-run`` prints both plans; ``--smoke`` runs both parts'
CPU smoke tests into a temporary folder (never under benchmarks/results).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import bench_common as bc  # noqa: E402

import torch  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="output folder (default: benchmarks/results/run_<UTC date>)")
    p.add_argument("--quick", action="store_true",
                   help="quick shapes, M in {1,16,1024}, e2e fp16/lut1/lut2 with the auto path (~6-8 min)")
    p.add_argument("--budget-min", type=float, default=None,
                   help="total wall-clock budget in minutes (default: 20, quick: 8)")
    p.add_argument("--kernel-share", type=float, default=0.6,
                   help="fraction of the budget for the kernel grid (default: %(default)s)")
    p.add_argument("--no-graph", action="store_true", help="eager timings only (no CUDA-graph replay mode)")
    p.add_argument("--skip-kernels", action="store_true")
    p.add_argument("--skip-e2e", action="store_true")
    p.add_argument("--kernel-args", default="", help="extra arguments for bench_kernels.py (one string)")
    p.add_argument("--e2e-args", default="", help="extra arguments for bench_e2e.py (one string)")
    p.add_argument("--grace-s", type=float, default=240.0,
                   help="a part still running this long after its share of the budget is killed "
                        "(default: %(default)s)")
    p.add_argument("--dry-run", action="store_true", help="print both plans and exit")
    p.add_argument("--smoke", action="store_true", help="CPU smoke tests of both parts (not results)")
    a = p.parse_args(argv)
    if a.budget_min is None:
        a.budget_min = 8.0 if a.quick else 20.0
    return a


def _gpu_paths() -> list:
    """Real GPU kernel paths present for both ops (cuda / triton)."""
    inv = bc.backend_inventory(torch.device("cuda"))
    return [b for b in ("cuda", "triton") if all(b in v for v in inv.values())]


def commands(args, out: Path, gpu: bool) -> list:
    """[(name, argv, budget_s)] for the parts to run."""
    py = sys.executable
    total = args.budget_min * 60
    k_budget = total * (args.kernel_share if not args.skip_e2e else 1.0)
    cmds = []
    if not args.skip_kernels:
        k = [py, str(bc.BENCH_DIR / "bench_kernels.py"), "--out", str(out / "kernels")]
        if args.quick:
            k.append("--quick")
        if not args.no_graph:
            k.append("--cuda-graph")
        k += args.kernel_args.split()
        cmds.append(("kernels", k, k_budget))
    if not args.skip_e2e:
        e = [py, str(bc.BENCH_DIR / "bench_e2e.py"), "--out", str(out / "e2e")]
        if args.quick:
            e.append("--quick")
        if args.no_graph:
            e.append("--no-graph")
        if gpu and "--backends" not in args.e2e_args:
            paths = _gpu_paths()
            if not paths:                  # the reference on a 7B model would only measure the fallback
                e += ["--formats", "fp16"]
            elif not args.quick:
                e += ["--backends", ",".join(paths)]
        e += args.e2e_args.split()
        if not args.skip_kernels and "--triton-configs" not in args.e2e_args:
            e += ["--triton-configs", str(out / "kernels" / "triton_tuned_configs.json")]
        cmds.append(("e2e", e, None))
    return cmds


def run_part(name, argv, budget_s, log, grace: float = 240.0) -> dict:
    """Run one part, teeing its output to the console and the log; kill it after budget + grace."""
    if budget_s is not None:
        argv = argv + ["--budget-s", f"{budget_s:.0f}"]
    line = f"$ {' '.join(argv)}"
    print(line, flush=True)
    log.write(line + "\n")
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            cwd=bc.REPO_ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def pump():                                      # tee the child's output, line by line
        for chunk in proc.stdout:
            sys.stdout.write(chunk)
            sys.stdout.flush()
            log.write(chunk)
            log.flush()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    killed = False
    try:
        proc.wait(timeout=None if budget_s is None else budget_s + grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        killed = True
        msg = f"[run_all] {name} exceeded its share + {grace:.0f}s grace and was killed; partial tables kept\n"
        sys.stdout.write(msg)
        log.write(msg)
    reader.join(timeout=30)
    rc = proc.wait()
    return {"name": name, "command": " ".join(argv), "rc": rc, "killed": killed,
            "seconds": round(time.monotonic() - t0, 1)}


def _section(md: str, heading: str) -> str:
    """The '## heading...' section of a markdown file (up to the next '## ')."""
    parts = md.split("\n## ")
    for p in parts[1:]:
        if p.startswith(heading):
            return "## " + p.strip() + "\n"
    return ""


def write_summary(out: Path, info: dict, results: list, smoke: bool) -> None:
    title = "bivlm benchmark run" + (" — CPU SMOKE TEST, NOT GPU RESULTS" if smoke else "")
    md = [bc.env_markdown(info, title), "## Parts\n"]
    for r in results:
        status = "killed after its time share (partial tables kept)" if r["killed"] else f"exit {r['rc']}"
        md.append(f"- **{r['name']}** ({r['seconds']} s, {status}): `{r['command']}`")
    md.append("")
    kmd = out / "kernels" / "kernels.md"
    if kmd.exists():
        text = kmd.read_text()
        md.append("Kernel tables: [kernels/kernels.md](kernels/kernels.md), CSV: "
                  "[kernels/kernels.csv](kernels/kernels.csv); plots: "
                  + ", ".join(f"[{p.name}](kernels/{p.name})" for p in sorted((out / "kernels").glob("*.png")))
                  + "\n")
        for h in ("Performance floors", "Paths not measured", "Not run"):
            sec = _section(text, h)
            if sec:
                md.append(sec.replace("## ", "## Kernels: ", 1))
        for png in sorted((out / "kernels").glob("speedup_vs_m_*.png")):
            md.append(f"![{png.stem}](kernels/{png.name})\n")
    emd = out / "e2e" / "e2e.md"
    if emd.exists():
        text = emd.read_text()
        md.append("End-to-end tables: [e2e/e2e.md](e2e/e2e.md)\n")
        for h in ("Results", "Paths not measured", "Not run"):
            sec = _section(text, h)
            if sec:
                md.append(sec.replace("## ", "## End-to-end: ", 1))
    (out / "README.md").write_text("\n".join(md) + "\n")


def main(argv=None) -> int:
    args = parse_args(argv)
    gpu = bc.cuda_or_none() is not None
    if args.dry_run:
        for name, argv_, budget in commands(args, Path("<out>"), gpu):
            print(f"== {name} (budget {'rest' if budget is None else f'{budget:.0f} s'}): {' '.join(argv_)}",
                  flush=True)
            subprocess.run([a for a in argv_ if a not in ("--out", "<out>/kernels", "<out>/e2e")] + ["--dry-run"],
                           cwd=bc.REPO_ROOT, check=False)
        return 0
    if not gpu and not args.smoke:
        print(bc.NO_GPU_MESSAGE, flush=True)
        return 0
    out = bc.prepare_out_dir(args.out, args.smoke, "run")
    budget = bc.Budget(args.budget_min * 60)
    info = bc.env_info(bc.cuda_or_none() if gpu and not args.smoke else torch.device("cpu"), smoke=args.smoke)
    info["budget_min"] = args.budget_min
    results = []
    with open(out / "run_all.log", "a") as log:
        for name, argv_, share in commands(args, out, gpu and not args.smoke):
            if args.smoke:
                argv_ = argv_ + ["--smoke"]
                argv_ = [a for a in argv_ if a not in ("--cuda-graph",)]
            if share is None:                        # the last part gets what is left
                share = max(60.0, budget.left())
            results.append(run_part(name, argv_, share, log, grace=args.grace_s))
    info["elapsed_s"] = round(budget.elapsed(), 1)
    write_summary(out, info, results, args.smoke)
    print(f"[run_all] done in {budget.elapsed() / 60:.1f} min -> {out / 'README.md'}", flush=True)
    return 0 if all(r["rc"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
