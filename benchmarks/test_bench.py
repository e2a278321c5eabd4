"""pytest-benchmark entries for a representative subset of the kernel and decode benchmarks.

``pytest benchmarks/ --benchmark-only`` on a GPU machine times, per shape and M, fp16 ``F.linear`` and every
quantized format on every available path (grouped so the comparison table puts them side by side); every
benchmark first checks the kernel's output against the dequantized weight and fails on a wrong result. Without
a GPU each benchmark skips with the reason. The full grid, tables and plots come from ``run_all.py``.

The ``test_harness_*`` tests (no ``benchmark`` fixture) check the harness itself on the CPU (plan, smoke run,
output labelling, floor bookkeeping); ``--benchmark-only`` skips them. This folder is not part of the main test
suite: ``pytest`` at the repository root collects only ``tests/`` (``testpaths``).
"""
from __future__ import annotations

import math

import pytest
import torch

import bench_common as bc
import bench_kernels as bk

HAS_CUDA = torch.cuda.is_available()
NO_GPU = "needs a CUDA device: GPU benchmarks are not measured on a machine without one"

SHAPES = (("llava7b_qkvo", 4096, 4096), ("llava7b_down", 4096, 11008), ("llama70b_gate_up", 28672, 8192))
MS = (1, 16, 1024)
PATHS = [("fp16", "torch")] + [(f, b) for f in bk.FORMATS for b in ("cuda", "triton")]


def _have_benchmark_plugin():
    try:
        import pytest_benchmark  # noqa: F401
        return True
    except ImportError:
        return False


needs_plugin = pytest.mark.skipif(not _have_benchmark_plugin(), reason="pytest-benchmark is not installed")
needs_gpu = pytest.mark.skipif(not HAS_CUDA, reason=NO_GPU)


@pytest.fixture(scope="module")
def shape_cache():
    """One ShapeState (weights of every format) per shape, kept while the module's tests run."""
    cache = {}
    yield cache
    cache.clear()
    if HAS_CUDA:
        torch.cuda.empty_cache()


def _state(cache, name, n, k):
    if name not in cache:
        cache.clear()                                    # one shape resident at a time
        if HAS_CUDA:
            torch.cuda.empty_cache()
        args = bk.parse_args(["--shapes", f"{n}x{k}"])
        l2 = torch.cuda.get_device_properties(0).L2_cache_size
        cache[name] = (bk.ShapeState({"name": name, "N": n, "K": k}, list(bk.FORMATS), args, torch.device("cuda"),
                                     l2), args)
    return cache[name]


@needs_plugin
@needs_gpu
@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("fmt,backend", PATHS, ids=[f"{f}-{b}" for f, b in PATHS])
@pytest.mark.parametrize("shape", SHAPES, ids=[s[0] for s in SHAPES])
def test_linear(benchmark, shape_cache, shape, fmt, backend, m):
    name, n, k = shape
    if backend != "torch":
        op = bk.FORMATS[fmt].op
        avail = bc.backend_inventory(torch.device("cuda"))[op]
        if backend not in avail:
            pytest.skip(f"{backend} path for {op} is not available here (available: {avail})")
    st, args = _state(shape_cache, name, n, k)
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    if fmt == "fp16":
        calls = [lambda x, w=w: torch.nn.functional.linear(x, w) for w in st.dense]
        ctx, wbytes = bk._null(), st.dense_weight_bytes
    else:
        calls = [bk.make_call(layer, "op") for layer in st.quant[fmt]]
        ctx, wbytes = bk.ops.use_backend(backend), st.wbytes[fmt]

    def run():
        for c in calls:
            c(x)
        torch.cuda.synchronize()

    benchmark.group = f"{name} {n}x{k} M={m}"
    with ctx, torch.no_grad():
        if fmt != "fp16":
            err = bk.rel_err(calls[0](x), torch.nn.functional.linear(x, st.wdeq[fmt]))
            assert err < bk.WRONG_REL_ERR, f"{backend}/{fmt} output differs from the dequantized weight: {err:.3g}"
        benchmark.pedantic(run, rounds=20, warmup_rounds=3, iterations=1)
    if benchmark.stats is not None:
        us = benchmark.stats.stats.median * 1e6 / len(calls)
        total = wbytes + (m * k + m * n) * 2
        benchmark.extra_info.update(us_per_call=round(us, 2), copies=len(calls), weight_bytes=wbytes,
                                    GBps=round(total / (us * 1e-6) / 1e9, 1),
                                    note="wall clock incl. launch and one synchronize per sequence of copies")


@needs_plugin
@needs_gpu
@pytest.mark.parametrize("fmt", ("fp16", "lut1", "lut2", "affine4"))
def test_decode_step(benchmark, fmt):
    """One decode step of a 4-layer slice of the 7B-shaped model (auto kernel path, eager)."""
    import bench_e2e as be
    args = be.parse_args(["--layers", "4", "--formats", fmt, "--gen", "64", "--no-graph"])
    dev = torch.device("cuda")
    model, cfg = be.build_model(args, dev)
    if fmt != "fp16":
        be.quantize_random_(model, fmt, args, dev)
    with torch.no_grad():
        dec = be.Decoder(model, cfg, args, dev)
        first = dec.prefill()
        dec.ids.copy_(first)

        dec._reset(dec.p)
        dec._set_pos(dec.p)

        def step():                 # the cache fills one position per call: 24 calls stay within gen=64
            dec.step()
            torch.cuda.synchronize()

        benchmark.group = "decode step, 4 layers of the 7B shape, batch 1"
        benchmark.pedantic(step, rounds=20, warmup_rounds=3, iterations=1)
    del dec, model
    torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------------
# harness self-checks (CPU)
# ---------------------------------------------------------------------------------------------------------

def test_harness_dry_run(capsys):
    assert bk.main(["--dry-run", "--quick", "--cuda-graph"]) == 0
    out = capsys.readouterr().out
    assert "plan:" in out and "llama70b_gate_up" in out


def test_harness_shapes_csv():
    shapes = {s["name"]: (s["N"], s["K"]) for s in bk.load_shapes()}
    assert set(shapes.values()) == {(4096, 4096), (11008, 4096), (4096, 11008), (3584, 3584), (18944, 3584),
                                    (3584, 18944), (28672, 8192)}


@pytest.mark.skipif(HAS_CUDA, reason="checks the no-GPU skip path")
def test_harness_skips_without_gpu(capsys, tmp_path):
    assert bk.main(["--out", str(tmp_path / "k")]) == 0
    assert "SKIP" in capsys.readouterr().out
    assert not (tmp_path / "k").exists()


def test_harness_kernel_smoke(tmp_path):
    """The whole measuring path on tiny shapes with the reference backend; labelled as not GPU results."""
    out = tmp_path / "k"
    assert bk.main(["--smoke", "--formats", "lut1,affine4,mixed", "--m", "1", "--out", str(out)]) == 0
    md = (out / "kernels.md").read_text()
    assert "NOT GPU RESULTS" in md and "WRONG (" not in md
    rows = list(__import__("csv").DictReader(open(out / "kernels.csv")))
    assert {r["format"] for r in rows} == {"fp16", "lut1", "affine4", "mixed"}
    for r in rows:
        assert r["status"] == "ok", r
        assert float(r["us"]) > 0 and float(r["GBps"]) > 0
    mixed = next(r for r in rows if r["format"] == "mixed")
    assert 1.25 < float(mixed["bits_per_weight"]) < 2.5
    if _have("matplotlib"):
        assert (out / "speedup_vs_m_eager.png").stat().st_size > 0


def test_harness_smoke_never_writes_results():
    with pytest.raises(SystemExit, match="refusing"):
        bc.prepare_out_dir(str(bc.RESULTS_DIR / "x"), smoke=True, default_name="kernels")


def test_harness_e2e_smoke(tmp_path):
    import bench_e2e as be
    out = tmp_path / "e"
    assert be.main(["--smoke", "--formats", "fp16,lut1", "--out", str(out)]) == 0
    md = (out / "e2e.md").read_text()
    assert "NOT GPU RESULTS" in md
    rows = list(__import__("csv").DictReader(open(out / "e2e.csv")))
    assert [r["format"] for r in rows] == ["fp16", "lut1"] and all(r["status"] == "ok" for r in rows)
    assert all(float(r["tokens_per_s"]) > 0 for r in rows)


def test_harness_decoder_matches_full_forward():
    """The static-cache decode loop (the one the CUDA graph replays) generates what a full forward would."""
    import bench_e2e as be
    args = be.parse_args(["--smoke"])
    args.torch_dtype, args.gen = torch.float32, 4
    model, cfg = be.build_model(args, torch.device("cpu"))
    with torch.no_grad():
        dec = be.Decoder(model, cfg, args, torch.device("cpu"))
        first = dec.prefill()
        toks, _, _ = dec.generate(first, args.gen, "eager", be.CpuTimer())
        seq, ref = torch.cat([dec.prompt_ids, first], 1), []
        for _ in range(args.gen):
            nxt = model(input_ids=seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            ref.append(nxt)
            seq = torch.cat([seq, nxt], 1)
    assert torch.equal(toks, torch.cat(ref, 1))


def test_harness_floors():
    """Floors of issues 3/4 are read from the rows, eager vs graph as the issue allows."""
    def row(b, f, n, k, m, mode, sp):
        return {"backend": b, "format": f, "N": n, "K": k, "M": m, "mode": mode, "speedup": sp, "status": "ok"}
    rows = [row("cuda", "lut1", 28672, 8192, 1, "eager", 11.0), row("cuda", "lut1", 28672, 8192, 1, "graph", 12.0),
            row("cuda", "lut1", 11008, 4096, 1, "eager", 5.0), row("cuda", "lut1", 11008, 4096, 1, "graph", 6.5),
            row("cuda", "lut1", 11008, 4096, 16, "eager", 3.0), row("cuda", "lut1", 4096, 4096, 1024, "eager", 0.95),
            row("triton", "lut1", 4096, 4096, 1024, "eager", 0.5)]
    got = {r["target"].split(" (")[0]: r["met"] for r in bk.target_rows(rows)}
    assert got["issue 3: M=1 28672x8192 lut1 >= 10.0x"] == "yes"
    assert got["issue 3: M=1 11008x4096 lut1 >= 6.0x"] == "yes"          # graph replay allowed there
    assert got["issue 3: M=16 11008x4096 lut1 >= 0.8 x M=1 speedup"] == "**no**"
    assert any(k.startswith("issue 4: M>=1024") and v == "**no**" for k, v in got.items())
    assert any(k.startswith("issue 4: Triton >= 0.7") and v == "**no**" for k, v in got.items())


def _have(mod):
    try:
        __import__(mod)
        return True
    except ImportError:
        return False


def test_harness_budget():
    b = bc.Budget(0)
    assert b.exceeded() and bc.Budget(None).left() == math.inf


def test_harness_interrupt_keeps_measured_points(tmp_path, monkeypatch):
    """Ctrl-C / SIGTERM from a time limit mid-run: the points measured so far are written, the rest listed."""
    real, calls = bk.measure_point, []

    def measure(*a, **k):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(bk, "measure_point", measure)
    out = tmp_path / "k"
    assert bk.main(["--smoke", "--formats", "lut1", "--m", "1", "--no-plots", "--out", str(out)]) == 130
    md = (out / "kernels.md").read_text()
    assert "| interrupted | yes" in md and "## Not run" in md and "PARTIAL" not in md
    assert len(list(__import__("csv").DictReader(open(out / "kernels.csv")))) == 2
    assert "## Speedup over fp16 F.linear" in md


def test_harness_overview_table():
    def row(b, f, m, mode, us, sp, status="ok"):
        return {"shape": "s", "N": 8, "K": 16, "M": m, "mode": mode, "backend": b, "format": f, "us": us,
                "speedup": sp, "status": status}
    rows = [row("torch", "fp16", 1, "eager", 10.0, 1.0), row("cuda", "lut1", 1, "eager", 2.0, 5.0),
            row("cuda", "lut2", 1, "eager", 3.0, 3.3, "WRONG (rel_err > 0.02)"), row("torch", "fp16", 1, "graph", 8.0, 1.0)]
    lines = bk.overview_table(rows).splitlines()
    assert lines[0] == "| N x K | M | mode | fp16 µs | cuda lut1 | cuda lut2 |"
    assert lines[2] == "| 8x16 | 1 | eager | 10.0 | 5.00x (2.0) | WRONG |"
    assert lines[3] == "| 8x16 | 1 | graph | 8.0 | – | – |"


# ---------------------------------------------------------------------------------------------------------
# device_check.sh (the one-command GPU check of issue 15): its dry run and its refusals, on the CPU
# ---------------------------------------------------------------------------------------------------------

DEVICE_CHECK = bc.BENCH_DIR / "device_check.sh"


def _device_check(env_extra, *args):
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "OUT" and not k.startswith("DC_")}
    env.update(PYTHON=sys.executable, **env_extra)
    return subprocess.run(["bash", str(DEVICE_CHECK), *args], cwd=bc.REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=240)


def test_device_check_dry_run(tmp_path):
    out = tmp_path / "dc"
    r = _device_check({"OUT": str(out)}, "--dry-run")
    assert r.returncode == 0, r.stdout + r.stderr
    text = r.stdout
    steps = [line.split("step ")[1].split(":")[0].split(" ")[0] for line in text.splitlines()
             if "] step " in line]
    assert steps == ["env", "sass", "build", "tests_cuda", "tests_triton", "bench", "summary"], steps
    assert "TORCH_CUDA_ARCH_LIST=9.0" in text and "BIVLM_BUILD_CUDA=1" in text and "build_ext --inplace" in text
    assert "tests/test_cuda.py" in text and "tests/test_triton.py -k gpu_" in text
    for flag in ("--shapes 28672x8192,8192x8192,4096x11008", "--m 1,16", "--cuda-graph", "--budget-s",
                 "--dtype float16"):
        assert flag in text, flag
    assert "plan: 108 points" in text                     # the bench's own --dry-run, run by the script
    worst = int(text.split("worst case ends at ")[1].split(" s")[0])
    assert worst <= 540
    assert not out.exists()                               # a dry run writes nothing


def test_device_check_refuses_without_out(tmp_path):
    r = _device_check({}, "--dry-run")
    assert r.returncode == 2 and "$OUT is not set" in r.stderr
    f = tmp_path / "a_file"
    f.write_text("x")
    r = _device_check({"OUT": str(f)}, "--dry-run")
    assert r.returncode == 2 and "not a directory" in r.stderr
    assert f.read_text() == "x"
    r = _device_check({"OUT": str(tmp_path)}, "--bogus")
    assert r.returncode == 2 and "unknown argument" in r.stderr


@pytest.mark.skipif(HAS_CUDA, reason="checks the refusal on a machine without a GPU")
def test_device_check_refuses_without_gpu(tmp_path):
    import shutil
    if shutil.which("nvidia-smi"):
        pytest.skip("nvidia-smi is present here")
    r = _device_check({"OUT": str(tmp_path / "o")})
    assert r.returncode == 3 and "no GPU here" in r.stderr
    assert not (tmp_path / "o").exists()


def test_harness_cpu_timer_keeps_thread_count():
    """bench_cpu times its "threads = T" rows with T threads: torch.utils.benchmark.Timer defaults to one thread
    whatever set_num_threads said, which once made every 2-thread row of cpu_kernels*.md a 1-thread one."""
    import bench_cpu
    before = torch.get_num_threads()
    want = 2 if before != 2 else 3
    seen = []
    try:
        torch.set_num_threads(want)
        bench_cpu.interleaved_us({"probe": (lambda: seen.append(torch.get_num_threads()), 1)}, 1e-4, rounds=2)
    finally:
        torch.set_num_threads(before)
    assert seen and set(seen) == {want}, f"timed with {sorted(set(seen))} threads, asked for {want}"


def test_harness_plot_cpu_bars_follow_the_times(tmp_path):
    """plot_cpu recomputes each bar from the µs columns (dense fp32 / candidate): a 4x-faster layer's bar is 4x
    as tall as a 1x one's, and the SVG parses."""
    import re
    import xml.dom.minidom
    import plot_cpu
    head = ("| shape N×K | M | thr | fp32 µs | bf16 µs | torch int4 (bf16 x) µs | Q1 fp32 µs (×fp32) | "
            "Q2 fp32 µs (×fp32) | Q4 fp32 µs (×fp32) |\n|---|---|---|---|---|---|---|---|---|\n")
    table = tmp_path / "t.md"
    table.write_text("# x\n\n" + head + "| 64x64 | 1 | 1 | 400 | 1 | 400 | 100 (9.9x) | 200 (9.9x) | 400 (9.9x) |\n")
    assert plot_cpu.main([str(table)]) == 0
    text = table.with_suffix(".svg").read_text()
    xml.dom.minidom.parseString(text)
    bar = r'height="([0-9.]+)" fill="[^"]+"><title>[^<]*?(1-bit|2-bit|4-bit|torch int4): '
    bars = {t: float(h) for h, t in re.findall(bar, text)}
    assert set(bars) == {"1-bit", "2-bit", "4-bit", "torch int4"}
    assert bars["1-bit"] == pytest.approx(4 * bars["4-bit"], rel=1e-2)
    assert bars["2-bit"] == pytest.approx(2 * bars["4-bit"], rel=1e-2)
    assert bars["torch int4"] == pytest.approx(bars["4-bit"], rel=1e-2)
