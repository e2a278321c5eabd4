"""Shared plumbing of the benchmark scripts: environment record, timers, copy bandwidth, budget, tables, plots.

Nothing here measures a kernel by itself; ``bench_kernels.py`` and ``bench_e2e.py`` do. What this module
guarantees is that every result file says where it came from (device, clocks, versions, git commit, the exact
command) and that no GPU number is ever produced without a GPU: on a machine without CUDA the scripts either
skip, print their plan (``--dry-run``) or run a clearly labelled CPU smoke test of their code paths (``--smoke``).

Timing on a GPU: :func:`time_gpu` uses ``triton.testing.do_bench`` (median and 20/80 % quantiles of CUDA-event
timings, L2 flushed before every timed call by writing a 256 MB buffer) and falls back to an equivalent
CUDA-event loop with its own L2 flush when Triton is missing. The callables timed here run *several* layer
copies in sequence (weights cycled beyond the L2), so callers divide by the number of calls they make.
"""
from __future__ import annotations

import csv
import datetime as _dt
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
if str(REPO_ROOT) not in sys.path:          # run as `python benchmarks/x.py` from a checkout, not installed
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

SMOKE_BANNER = ("CPU SMOKE TEST of the harness code paths (tiny shapes, CPU backends, wall-clock timer). "
                "These are NOT GPU measurements and must never be committed as results.")
NO_GPU_MESSAGE = ("SKIP: no CUDA device here, so no GPU timing was measured. "
                  "Run on a GPU, or use --dry-run (print the plan) / --smoke (CPU check of the code paths).")


# ---------------------------------------------------------------------------------------------------------
# environment record
# ---------------------------------------------------------------------------------------------------------

def command_line() -> str:
    """The exact command that produced a result, as it would be typed (interpreter + script + arguments)."""
    exe = Path(sys.executable).name if Path(sys.executable).name.startswith("python") else sys.executable
    argv0 = sys.argv[0]
    try:
        argv0 = os.path.relpath(argv0, os.getcwd())
    except ValueError:
        pass
    return " ".join(shlex.quote(a) for a in [exe, argv0, *sys.argv[1:]])


def _run(cmd: Sequence[str], cwd: Optional[Path] = None) -> Optional[str]:
    try:
        out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_info() -> dict:
    commit = _run(["git", "rev-parse", "HEAD"], REPO_ROOT)
    dirty = _run(["git", "status", "--porcelain", "--untracked-files=no"], REPO_ROOT)
    return {"git_commit": commit or "unknown",
            "git_dirty": "unknown" if dirty is None else ("yes (uncommitted changes to tracked files)"
                                                          if dirty else "no")}


NVSMI_FIELDS = ("name", "driver_version", "clocks.sm", "clocks.max.sm", "clocks.mem", "clocks.max.mem",
                "power.draw", "power.limit", "temperature.gpu", "persistence_mode",
                "clocks_throttle_reasons.active")


def nvidia_smi(index: int = 0) -> dict:
    """Clocks, power and driver from nvidia-smi (empty dict where it is missing)."""
    out = _run(["nvidia-smi", f"--id={index}", "--query-gpu=" + ",".join(NVSMI_FIELDS),
                "--format=csv,noheader"])
    if not out:
        return {}
    vals = [v.strip() for v in out.splitlines()[0].split(",")]
    return dict(zip(NVSMI_FIELDS, vals)) if len(vals) == len(NVSMI_FIELDS) else {"raw": out}


def clocks_note(smi: dict) -> str:
    if not smi:
        return "nvidia-smi unavailable: clocks unknown; clocks were not locked by the harness"
    return (f"clocks not locked by the harness; at start SM {smi.get('clocks.sm', '?')} "
            f"(max {smi.get('clocks.max.sm', '?')}), memory {smi.get('clocks.mem', '?')} "
            f"(max {smi.get('clocks.max.mem', '?')}), power {smi.get('power.draw', '?')} / "
            f"{smi.get('power.limit', '?')}, {smi.get('temperature.gpu', '?')} C, persistence "
            f"{smi.get('persistence_mode', '?')}, throttle reasons {smi.get('clocks_throttle_reasons.active', '?')}")


def backend_inventory(device: torch.device) -> dict:
    """Which bivlm kernel paths exist for each op on ``device`` (imports the Triton / CUDA loaders)."""
    from bivlm_kernels import ops
    return {op: ops.available_backends(op, device) for op in ("lut_linear", "affine_linear")}


def env_info(device: torch.device, smoke: bool = False) -> dict:
    """Everything a result needs to be reproducible and comparable."""
    import bivlm_kernels
    info = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "command": command_line(),
        "cwd": os.getcwd(),
        **git_info(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda or "none",
        "bivlm_kernels": getattr(bivlm_kernels, "__version__", "?"),
        "host_cpu": platform.processor() or platform.machine(),
    }
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = "not installed"
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        smi = nvidia_smi(device.index or 0)
        info.update({
            "device": p.name,
            "device_capability": f"sm_{p.major}{p.minor}",
            "device_sms": p.multi_processor_count,
            "device_memory_gib": round(p.total_memory / 2 ** 30, 1),
            "device_l2_mib": round(getattr(p, "L2_cache_size", 0) / 2 ** 20, 1),
            "driver": smi.get("driver_version", "unknown"),
            "clocks_note": clocks_note(smi),
        })
    else:
        info.update({"device": f"CPU ({platform.machine()})", "clocks_note": "n/a (no GPU)"})
    env = {k: os.environ[k] for k in ENV_VARS if k in os.environ}
    info["env_vars"] = ", ".join(f"{k}={v}" for k, v in env.items()) or "none of " + ", ".join(ENV_VARS)
    info["bivlm_backends"] = "; ".join(f"{op}: {', '.join(b)}" for op, b in backend_inventory(device).items())
    info["cuda_extension_built"] = _extension_built()
    if smoke:
        info["WARNING"] = SMOKE_BANNER
    return info


ENV_VARS = ("BIVLM_BACKEND", "BIVLM_TRITON_AUTOTUNE", "TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES",
            "PYTORCH_CUDA_ALLOC_CONF")


def save_triton_tuned_configs(path: Path) -> Optional[int]:
    """Write the Triton launch configs tuned during this run (which config produced each number), if any."""
    mod = sys.modules.get("bivlm_kernels.backends.triton.autotune")
    if mod is None or not hasattr(mod, "save_tuned_configs"):
        return None
    try:
        return mod.save_tuned_configs(str(path))
    except Exception as e:  # noqa: BLE001 - a convenience; never lose results for it
        print(f"[bench] could not save Triton tuned configs: {type(e).__name__}: {e}", flush=True)
        return None


def load_triton_tuned_configs(path: Optional[str]) -> Optional[int]:
    """Load Triton launch configs saved by an earlier run (skips re-tuning); None if not loaded."""
    if not path:
        return None
    if not Path(path).exists():
        print(f"[bench] no Triton config file at {path}; Triton will tune on first use", flush=True)
        return None
    try:
        from bivlm_kernels.backends.triton import autotune
        return autotune.load_tuned_configs(str(path))
    except Exception as e:  # noqa: BLE001
        print(f"[bench] could not load Triton tuned configs: {type(e).__name__}: {e}", flush=True)
        return None


def _extension_built() -> str:
    try:
        import importlib.util
        return "yes" if importlib.util.find_spec("bivlm_kernels._C") is not None else "no"
    except (ImportError, ValueError):
        return "no"


def env_markdown(info: dict, title: str) -> str:
    lines = [f"# {title}", ""]
    if "WARNING" in info:
        lines += [f"> **{info['WARNING']}**", ""]
    lines += ["| | |", "|---|---|"]
    for k, v in info.items():
        if k != "WARNING":
            lines.append(f"| {k} | `{v}` |" if k == "command" else f"| {k} | {v} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------------------

def time_gpu(fn: Callable[[], object], warmup_ms: float = 25, rep_ms: float = 100) -> tuple:
    """(median, p20, p80) in ms of one call of ``fn`` on the current CUDA device, L2 flushed before each call."""
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is not None:
        q = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
        return tuple(float(v) for v in q)
    return _time_cuda_events(fn, warmup_ms, rep_ms)


def _time_cuda_events(fn, warmup_ms, rep_ms):
    flush = torch.empty(256 * 2 ** 20, dtype=torch.int8, device="cuda")
    fn()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(5):
        flush.zero_()
        fn()
    e.record()
    torch.cuda.synchronize()
    est = max(s.elapsed_time(e) / 5, 1e-3)
    for _ in range(max(1, int(warmup_ms / est))):
        fn()
    n = max(1, int(rep_ms / est))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for i in range(n):
        flush.zero_()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    return _quantiles([a.elapsed_time(b) for a, b in zip(starts, ends)])


def _quantiles(times: list) -> tuple:
    times = sorted(times)
    def q(p):
        return times[min(len(times) - 1, max(0, int(round(p * (len(times) - 1)))))]
    return statistics.median(times), q(0.2), q(0.8)


def time_cpu(fn: Callable[[], object], reps: int = 5) -> tuple:
    """(median, p20, p80) wall-clock ms on the CPU: smoke tests only, never reported as GPU results."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return _quantiles(times)


class Graphed:
    """``fn`` captured once into a CUDA graph (after warm-up on a side stream); call it to replay."""

    def __init__(self, fn: Callable[[], object], warmup: int = 3):
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(warmup):
                fn()
        torch.cuda.current_stream().wait_stream(s)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = fn()                 # keep the graph's outputs alive with it
        torch.cuda.synchronize()

    def __call__(self):
        self.graph.replay()


def measure_copy_bandwidth(device: torch.device, nbytes: int = 2 ** 30) -> dict:
    """Device-to-device copy bandwidth (read + write bytes / time) of a large ``Tensor.copy_``: the roofline.

    On CPU (smoke runs) a 64 MiB host copy is timed instead and labelled as such.
    """
    if device.type != "cuda":
        nbytes = 64 * 2 ** 20
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    src.fill_(1)
    if device.type == "cuda":
        med, _, _ = time_gpu(lambda: dst.copy_(src), warmup_ms=50, rep_ms=300)
    else:
        med, _, _ = time_cpu(lambda: dst.copy_(src), reps=5)
    del src, dst
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"copy_bytes": nbytes, "copy_ms": med, "copy_GBps": 2 * nbytes / (med * 1e-3) / 1e9}


# ---------------------------------------------------------------------------------------------------------
# budget, output
# ---------------------------------------------------------------------------------------------------------

class Budget:
    """Wall-clock budget: ``exceeded()`` once ``seconds`` have passed since construction (None = unlimited)."""

    def __init__(self, seconds: Optional[float]):
        self.seconds = seconds
        self.t0 = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def left(self) -> float:
        return math.inf if self.seconds is None else self.seconds - self.elapsed()

    def exceeded(self) -> bool:
        return self.left() <= 0


def prepare_out_dir(out: Optional[str], smoke: bool, default_name: str) -> Path:
    """The output folder; smoke runs default to a temporary folder and may never write under results/."""
    if out is None:
        if smoke:
            import tempfile
            return Path(tempfile.mkdtemp(prefix=f"bivlm_{default_name}_smoke_"))
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d_%H%M")
        out = str(RESULTS_DIR / f"{default_name}_{stamp}")
    path = Path(out).resolve()
    if smoke and (path == RESULTS_DIR or RESULTS_DIR in path.parents):
        raise SystemExit(f"refusing to write CPU smoke output under {RESULTS_DIR}: smoke runs are not results; "
                         f"pass --out somewhere else (e.g. /tmp/...)")
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_csv(path: Path, rows: Iterable[dict], columns: Sequence[str]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({c: _csv_val(r.get(c)) for c in columns})


def _csv_val(v):
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6g}"
    return "" if v is None else v


def md_table(rows: Sequence[dict], columns: Sequence[tuple]) -> str:
    """``columns``: (header, key or callable(row) -> str)."""
    head = "| " + " | ".join(h for h, _ in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = []
    for r in rows:
        cells = []
        for _, key in columns:
            v = key(r) if callable(key) else r.get(key)
            cells.append("" if v is None else str(v))
        body.append("| " + " | ".join(cells) + " |")
    return "\n".join([head, sep, *body]) + "\n"


def fmt(v, spec: str = ".3g", suffix: str = "") -> str:
    if v is None or (isinstance(v, float) and (math.isnan(v) or math.isinf(v))):
        return "–"
    return f"{v:{spec}}{suffix}"


def cuda_or_none() -> Optional[torch.device]:
    """The CUDA device to benchmark on, or None. Never initialises CUDA when it is absent."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return None


def dispatch(args, dry_run, run) -> int:
    """The scripts' common entry: plan only (--dry-run), CPU smoke run (--smoke), or the GPU run; skip with a
    message (exit 0) where there is no GPU."""
    if args.dry_run:
        return dry_run(args)
    if args.smoke:
        import torch
        return run(args, torch.device("cpu"))
    device = cuda_or_none()
    if device is None:
        print(NO_GPU_MESSAGE, flush=True)
        return 0
    return run(args, device)
