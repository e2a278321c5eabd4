#!/usr/bin/env bash
# The one GPU check of issue 15, in one command that ends within 9 minutes:
#
#     OUT=/some/dir bash benchmarks/device_check.sh            # on the GPU machine, from the repository root
#     OUT=/tmp/dc   bash benchmarks/device_check.sh --dry-run  # anywhere: the steps, caps and commands; runs nothing
#
# Steps (each under its own `timeout`; a failed step is logged and the next one still runs):
#   1 env      nvidia-smi (name, driver, clocks, memory), nvcc, python/torch/triton/transformers, commit -> env.txt
#   2 build    the CUDA extension bivlm_kernels._C for sm_90 only, in place, all cores          -> build.log
#   3 sass     benchmarks/sass_budget.py --arch 90 (compile only), in the background from step 2 on
#              (the build leaves most cores idle); stopped before the benchmark if still running -> sass_budget.md
#   4 tests    tests/test_cuda.py, then the GPU tests of tests/test_triton.py (gpu_*)          -> tests.log
#   5 bench    bench_kernels.py on 28672x8192, 8192x8192, 4096x11008, M in {1, 16}, fp16, eager + CUDA graph,
#              every format on the cuda and triton paths, fp16 F.linear in the same run       -> bench/
#   6 summary  step status and durations, test counts, the benchmark tables                    -> summary.md
#
# Time: the whole script keeps to DC_TOTAL_S (510 s) of wall time. Each step's cap is the smaller of its own
# maximum and what the deadline leaves after the minimum the later steps need, so time the build does not use
# goes to the benchmark. Defaults: build <= 240 s, tests <= 120 s (test_cuda.py <= 75 s of it), benchmark
# <= 180 s (at least 60 s), summary 15 s. Exit status: 1 if the build or a test run failed (or test_cuda.py did
# not finish), after everything is written; 2 for a usage error or a bad $OUT; 3 when no GPU is found.
#
# The device tool returns at most 8 files from $OUT, so the script keeps 7 main files plain (summary.md, env.txt,
# build.log, tests.log, sass_budget.md, bench/kernels.md, bench/kernels.csv) and packs the rest (junit XML,
# kernels_env.json, triton_tuned_configs.json, the benchmark and sass logs) into extra.tar.gz; DC_PACK=0 keeps
# them plain. Nothing is deleted except those packed files; the build writes only bivlm_kernels/_C*.so and
# build/device_check/.
#
# Knobs (environment): PYTHON (python3), DC_TOTAL_S, DC_BUILD_S, DC_TESTS_S, DC_TESTS_CUDA_S, DC_BENCH_S,
# DC_BENCH_MIN_S, DC_SASS_S, DC_ARCH (9.0), DC_TEST_WORKERS (8; pytest-xdist where installed, 0 = serial),
# DC_TRITON_AUTOTUNE (0: Triton's default launch configs, no tuning), DC_SHAPES, DC_M, DC_FORMATS, DC_BACKENDS,
# DC_BUILD (1; 0 keeps the bivlm_kernels._C already built), DC_SASS (1; 0 skips it), DC_PACK (1), DC_GIT_COMMIT (recorded when the tree has no .git), DC_ALLOW_NO_GPU (0),
# DC_BENCH_EXTRA (more bench_kernels.py arguments; `--smoke` with DC_ALLOW_NO_GPU=1 runs the script on a CPU).
set -uo pipefail        # no -e on purpose: every step runs and logs even when an earlier one failed

usage() { sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }

DRY=0
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY=1 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "device_check.sh: unknown argument '$arg' (use --dry-run or --help)" >&2; exit 2 ;;
    esac
done

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO" || exit 2
if [[ ! -f setup.py || ! -f benchmarks/bench_kernels.py ]]; then
    echo "device_check.sh: $REPO does not look like the bivlm_kernels repository (no setup.py)" >&2
    exit 2
fi

# ---- $OUT --------------------------------------------------------------------------------------------------
if [[ -z "${OUT:-}" ]]; then
    echo "device_check.sh: \$OUT is not set. Give it a writable folder for the logs and tables, e.g." >&2
    echo "    OUT=/tmp/dc bash benchmarks/device_check.sh [--dry-run]" >&2
    exit 2
fi
if [[ -e "$OUT" && ! -d "$OUT" ]]; then
    echo "device_check.sh: \$OUT=$OUT exists but is not a directory; refusing to write there" >&2
    exit 2
fi
if (( ! DRY )) && ! nvidia-smi -L >/dev/null 2>&1 && [[ "${DC_ALLOW_NO_GPU:-0}" != 1 ]]; then
    echo "device_check.sh: no GPU here (nvidia-smi -L fails). This check needs the GPU machine; use --dry-run" \
         "to see the plan (DC_ALLOW_NO_GPU=1 runs it anyway)." >&2
    exit 3
fi
if (( ! DRY )); then
    mkdir -p "$OUT" 2>/dev/null
    probe="$OUT/.device_check_write_probe"
    if [[ ! -d "$OUT" || ! -w "$OUT" ]] || ! : > "$probe" 2>/dev/null; then
        echo "device_check.sh: \$OUT=$OUT is not a writable directory; refusing to run" >&2
        exit 2
    fi
    rm -f "$probe"
    OUT="$(cd "$OUT" && pwd)"
elif [[ -d "$OUT" && ! -w "$OUT" ]]; then
    echo "device_check.sh: \$OUT=$OUT is not writable; refusing" >&2
    exit 2
fi

# ---- settings ----------------------------------------------------------------------------------------------
PY="${PYTHON:-python3}"
NPROC="$(nproc 2>/dev/null || echo 4)"
TOTAL_S="${DC_TOTAL_S:-510}"            # 9 min = 540 s; 30 s left for the machine's start-up and the copy back
BUILD_S="${DC_BUILD_S:-240}"
TESTS_S="${DC_TESTS_S:-120}"
TESTS_CUDA_S="${DC_TESTS_CUDA_S:-75}"
BENCH_S="${DC_BENCH_S:-180}"
BENCH_MIN_S="${DC_BENCH_MIN_S:-60}"
BENCH_TAIL_S=40                         # bench start-up + the point in flight + writing, inside the bench cap
SUMMARY_S=15
SASS_S="${DC_SASS_S:-200}"
ARCH="${DC_ARCH:-9.0}"
WORKERS="${DC_TEST_WORKERS:-8}"
SHAPES="${DC_SHAPES:-28672x8192,8192x8192,4096x11008}"
MS="${DC_M:-1,16}"
FORMATS="${DC_FORMATS:-lut1,lut2,affine4,mixed}"
BACKENDS="${DC_BACKENDS:-cuda,triton}"
BUILD_DIR="build/device_check"          # created by this script (ignored by git); build temp files only
export PYTHONUNBUFFERED=1
unset SHOW                              # run_step prints $SHOW instead of the command when set
export BIVLM_TRITON_AUTOTUNE="${DC_TRITON_AUTOTUNE:-0}"

T0=$(date +%s)
DEADLINE=$((T0 + TOTAL_S))
now() { date +%s; }
min() { if (( $1 < $2 )); then echo "$1"; else echo "$2"; fi; }
# cap MAX RESERVE: a step's time limit: its maximum, or what the deadline leaves after RESERVE seconds.
# In a dry run every earlier step is assumed to use its whole cap (the worst case is what is printed).
VCLOCK=$T0
cap() {
    local t; if (( DRY )); then t=$VCLOCK; else t=$(now); fi
    local left=$((DEADLINE - t - $2)); (( left < 0 )) && left=0
    min "$1" "$left"
}

say() { echo "[device_check $(( $( (( DRY )) && echo "$VCLOCK" || now) - T0 ))s] $*"; }

# Python under SIGTERM -> KeyboardInterrupt, so that `timeout` ends pytest the way Ctrl-C does (the junit XML and
# the summary are still written). SIGINT cannot be used: a background job of a non-interactive shell ignores it.
PYTERM='import signal, sys, runpy; signal.signal(signal.SIGTERM, signal.default_int_handler); sys.argv = sys.argv[1:]; runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)'

STEP_NAMES=(); STEP_STATUS=(); STEP_SECS=(); STEP_CAPS=(); STEP_OUTS=()
record() { STEP_NAMES+=("$1"); STEP_STATUS+=("$2"); STEP_SECS+=("$3"); STEP_CAPS+=("$4"); STEP_OUTS+=("$5"); }
status_of() {   # rc cap -> text
    case "$1" in
        0) echo ok ;;
        124|137) echo "TIMEOUT (cap $2 s)" ;;
        *) echo "FAILED (exit $1)" ;;
    esac
}
quote() {    # the command as one would type it: plain words as they are, anything else shell-quoted
    local a s=""
    for a in "$@"; do if [[ "$a" =~ ^[][A-Za-z0-9_./,:=+@%-]+$ ]]; then s+="$a "; else s+="$(printf '%q' "$a") "; fi; done
    echo "${s% }"
}

# run_step NAME CAP LOG CMD...: run CMD under `timeout CAP`, appending to LOG; sets STEP_RC.
run_step() {
    local name="$1" c="$2" log="$3"; shift 3
    if (( DRY )); then
        say "step $name: cap ${c} s -> ${log#"$OUT"/}"
        echo "      ${SHOW:-$(quote "$@")}"
        VCLOCK=$((VCLOCK + c)); STEP_RC=0; return
    fi
    if (( c < 10 )); then
        say "step $name: SKIPPED (only ${c} s left before the deadline)"
        record "$name" "SKIPPED (no time left)" 0 "$c" "${log#"$OUT"/}"; STEP_RC=125; return
    fi
    say "step $name: start (cap ${c} s) -> ${log#"$OUT"/}"
    { echo "# $(date -u '+%F %T UTC') step $name, cap ${c} s"; echo "# ${SHOW:-$(quote "$@")}"; } >>"$log"
    local t=$(now)
    timeout -k 15 -s TERM "$c" "$@" >>"$log" 2>&1
    STEP_RC=$?
    local d=$(( $(now) - t )) st; st="$(status_of "$STEP_RC" "$c")"
    echo "# step $name: $st in ${d} s" >>"$log"
    record "$name" "$st" "$d" "$c" "${log#"$OUT"/}"
    say "step $name: $st in ${d} s"
    if (( STEP_RC != 0 )); then tail -n 15 "$log" | sed 's/^/      | /'; fi
}

if (( DRY )); then
    echo "device_check.sh --dry-run: the plan; nothing is built, tested or timed, nothing is written."
    echo "  repo $REPO; OUT=$OUT$([[ -d "$OUT" ]] || echo ' (would be created)'); python: $PY; $NPROC cores here"
    echo "  tools here: nvidia-smi $(command -v nvidia-smi >/dev/null && echo present || echo absent)," \
         "nvcc $(command -v nvcc >/dev/null && echo present || echo absent)"
    echo "  deadline ${TOTAL_S} s; the times below assume every step uses its whole cap (the worst case)"
fi
(( DRY )) || mkdir -p "$OUT/bench" "$BUILD_DIR"

# ---- 1 env -------------------------------------------------------------------------------------------------
ENV_TXT="$OUT/env.txt"
NVSMI_Q="name,driver_version,pci.bus_id,clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,memory.total,memory.used,power.draw,power.limit,temperature.gpu,persistence_mode"
PYVERS='import importlib.metadata as md, platform, sys
print("python", platform.python_version(), sys.executable)
for name in ("torch", "triton", "transformers", "numpy", "setuptools", "ninja", "pytest", "pytest-xdist"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "not installed")
import torch
print("torch.version.cuda", torch.version.cuda, "| cuda available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    l2 = getattr(p, "L2_cache_size", 0) / 2 ** 20
    print("device", p.name, f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs",
          f"{p.total_memory / 2**30:.1f} GiB", f"L2 {l2:.0f} MiB")'
env_report() {
    echo "== device_check.sh, start $(date -u '+%F %T UTC')"
    echo "== settings: total ${TOTAL_S}s, build<=${BUILD_S}s, tests<=${TESTS_S}s (cuda<=${TESTS_CUDA_S}s)," \
         "bench<=${BENCH_S}s (>=${BENCH_MIN_S}s), sass<=${SASS_S}s; arch ${ARCH}; MAX_JOBS ${NPROC};" \
         "BIVLM_TRITON_AUTOTUNE=${BIVLM_TRITON_AUTOTUNE}; shapes ${SHAPES}; M ${MS}; formats ${FORMATS};" \
         "backends ${BACKENDS}"
    echo "== git"
    local c; c="$(git rev-parse HEAD 2>/dev/null)"
    if [[ -n "$c" ]]; then
        echo "commit $c; $(git status --porcelain --untracked-files=no 2>/dev/null | wc -l) tracked files modified"
    else
        echo "commit ${DC_GIT_COMMIT:-unknown (no git checkout here; pass DC_GIT_COMMIT=<sha>)}"
    fi
    echo "== host"; uname -a; echo "cores $NPROC"; free -g 2>/dev/null | head -2; df -h . 2>/dev/null | tail -1
    echo "== nvidia-smi --query-gpu=$NVSMI_Q"
    timeout 20 nvidia-smi --query-gpu="$NVSMI_Q" --format=csv 2>&1
    echo "== nvidia-smi"; timeout 20 nvidia-smi 2>&1
    echo "== nvidia-smi -q -d CLOCK,PERFORMANCE"; timeout 20 nvidia-smi -q -d CLOCK,PERFORMANCE 2>&1
    echo "== nvcc ($(command -v nvcc || echo 'not on PATH'))"; timeout 20 nvcc --version 2>&1
    echo "== python ($PY)"; timeout 60 "$PY" -c "$PYVERS" 2>&1
}
if (( DRY )); then
    say "step env: nvidia-smi --query-gpu=$NVSMI_Q; nvidia-smi; nvcc --version; $PY versions; git rev-parse HEAD -> env.txt"
    VCLOCK=$((VCLOCK + 10))             # a few seconds in practice (each command has its own 20-60 s timeout)
else
    say "step env -> env.txt"
    t=$(now); env_report >"$ENV_TXT" 2>&1; rc=$?
    record env "$(status_of "$rc" 60)" $(( $(now) - t )) 60 env.txt
    grep -E '^(NVIDIA|name|commit|device|torch |triton |Cuda compilation)' "$ENV_TXT" | head -8 | sed 's/^/      /'
fi

# ---- 2 build (and 3 sass in the background) ----------------------------------------------------------------
BUILD_CAP=$(cap "$BUILD_S" $((TESTS_S + BENCH_MIN_S + SUMMARY_S)))
SASS_CMD=("$PY" benchmarks/sass_budget.py --arch 90 --no-eager --out "$OUT/sass_budget.md")
SASS_PID=""
if [[ "${DC_SASS:-1}" == 1 ]]; then
    if (( DRY )); then
        say "step sass (background, from the build on; cap ${SASS_S} s, stopped before the bench) -> sass_budget.md"
        echo "      $(quote "${SASS_CMD[@]}")"
    else
        say "step sass: start in the background (cap ${SASS_S} s) -> sass_budget.md, sass_budget.log"
        SASS_T=$(now); SASS_DONE="$BUILD_DIR/sass.done"; rm -f "$SASS_DONE"
        ( timeout -k 10 -s TERM "$SASS_S" "${SASS_CMD[@]}" >"$OUT/sass_budget.log" 2>&1 &
          echo $! >"$BUILD_DIR/sass.pid"; wait $!; echo "$? $(date +%s)" >"$SASS_DONE" ) &
        SASS_PID=$!
    fi
fi
BUILD_CMD=(env BIVLM_BUILD_CUDA=1 BIVLM_BUILD_CPU=0 TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS="$NPROC"
           "$PY" setup.py build_ext --inplace --build-temp "$BUILD_DIR/temp")
if [[ "${DC_BUILD:-1}" == 1 ]]; then
    run_step build "$BUILD_CAP" "$OUT/build.log" "${BUILD_CMD[@]}"
else                                    # DC_BUILD=0: test whatever bivlm_kernels._C is already there
    say "step build: SKIPPED (DC_BUILD=0)"; STEP_RC=0
    (( DRY )) || { echo "# build skipped (DC_BUILD=0)" >"$OUT/build.log"; record build "SKIPPED (DC_BUILD=0)" 0 0 build.log; }
fi
BUILD_OK=0
if (( ! DRY )); then
    if (( STEP_RC == 0 )) && "$PY" -c "import bivlm_kernels._C as c; print('bivlm_kernels._C imports:', c.__file__)" \
            >>"$OUT/build.log" 2>&1; then
        BUILD_OK=1
    elif (( STEP_RC == 0 )); then
        STEP_STATUS[-1]="FAILED (built, but bivlm_kernels._C does not import)"
        say "build: bivlm_kernels._C does not import (see build.log)"
    fi
fi

# ---- 4 tests -----------------------------------------------------------------------------------------------
TESTS_CAP=$(cap "$TESTS_S" $((BENCH_MIN_S + SUMMARY_S)))
XDIST=()
if (( WORKERS > 0 )) && { (( DRY )) || "$PY" -c "import xdist" >/dev/null 2>&1; }; then XDIST=(-n "$WORKERS"); fi
PYTEST=("$PY" -c "$PYTERM" pytest -v -rfEs --durations=10 -p no:cacheprovider "${XDIST[@]}")
T_START=$( (( DRY )) && echo "$VCLOCK" || now)
SHOW_PYTEST="$PY -m pytest -v -rfEs --durations=10 -p no:cacheprovider ${XDIST[*]}"   # what the wrapper runs
SHOW="$SHOW_PYTEST tests/test_cuda.py --junitxml=$OUT/tests_cuda.xml   (SIGTERM -> KeyboardInterrupt)" \
run_step tests_cuda "$(min "$TESTS_CUDA_S" "$TESTS_CAP")" "$OUT/tests.log" \
    "${PYTEST[@]}" tests/test_cuda.py --junitxml="$OUT/tests_cuda.xml"
CUDA_TESTS_RC=$STEP_RC
USED=$(( $( (( DRY )) && echo "$VCLOCK" || now) - T_START ))
SHOW="$SHOW_PYTEST tests/test_triton.py -k gpu_ --junitxml=$OUT/tests_triton.xml   (likewise)" \
run_step tests_triton "$((TESTS_CAP - USED))" "$OUT/tests.log" \
    "${PYTEST[@]}" tests/test_triton.py -k gpu_ --junitxml="$OUT/tests_triton.xml"
TRITON_TESTS_RC=$STEP_RC

# ---- sass: let it finish briefly, then stop it (the benchmark wants a quiet CPU) -----------------------------
if [[ -n "$SASS_PID" ]]; then
    for _ in $(seq 1 20); do kill -0 "$SASS_PID" 2>/dev/null || break; sleep 1; done
    if kill -0 "$SASS_PID" 2>/dev/null; then
        kill -TERM "$(cat "$BUILD_DIR/sass.pid")" 2>/dev/null     # that `timeout` passes it on to sass_budget.py
        wait "$SASS_PID" 2>/dev/null
        record sass "STOPPED before the bench (did not finish)" $(( $(now) - SASS_T )) "$SASS_S" sass_budget.md
    else
        wait "$SASS_PID"
        read -r rc t_end <"$SASS_DONE" 2>/dev/null || { rc=1; t_end=$(now); }
        record sass "$(status_of "$rc" "$SASS_S")" $(( t_end - SASS_T )) "$SASS_S" sass_budget.md
    fi
    say "step sass: ${STEP_STATUS[-1]} in ${STEP_SECS[-1]} s"
fi

# ---- 5 bench -----------------------------------------------------------------------------------------------
BENCH_CAP=$(cap "$BENCH_S" "$SUMMARY_S")
BUDGET=$(( BENCH_CAP - BENCH_TAIL_S )); (( BUDGET < 20 )) && BUDGET=20
BENCH_ARGS=(--shapes "$SHAPES" --m "$MS" --dtype float16 --formats "$FORMATS" --backends "$BACKENDS"
            --cuda-graph --quick --no-plots --budget-s "$BUDGET")
read -r -a EXTRA <<<"${DC_BENCH_EXTRA:-}"    # e.g. --smoke: exercise this script's paths on a CPU machine
BENCH_ARGS+=("${EXTRA[@]}")
run_step bench "$BENCH_CAP" "$OUT/bench/bench.log" "$PY" benchmarks/bench_kernels.py "${BENCH_ARGS[@]}" \
    --out "$OUT/bench"
if (( DRY )) && [[ "${DC_DRY_BENCH_PLAN:-1}" == 1 ]]; then
    echo "  the benchmark's plan (bench_kernels.py --dry-run, CPU only):"
    timeout 120 "$PY" benchmarks/bench_kernels.py "${BENCH_ARGS[@]}" --dry-run 2>&1 | sed 's/^/      /'
fi

# ---- 6 summary ---------------------------------------------------------------------------------------------
PACK_LIST=(tests_cuda.xml tests_triton.xml sass_budget.log bench/bench.log bench/kernels_env.json
           bench/triton_tuned_configs.json)
if (( DRY )); then
    say "step summary (cap ${SUMMARY_S} s) -> summary.md; then pack ${PACK_LIST[*]} into extra.tar.gz"
    say "worst case ends at $((VCLOCK - T0 + SUMMARY_S)) s (deadline ${TOTAL_S} s, issue 15: under 540 s)"
    exit 0
fi

EXIT=0
(( BUILD_OK )) || EXIT=1
(( CUDA_TESTS_RC == 0 )) || EXIT=1
case "$TRITON_TESTS_RC" in 0|124|137|125) ;; *) EXIT=1 ;; esac     # cut by its cap or no time left: reported only

PACKED=()
if [[ "${DC_PACK:-1}" == 1 ]]; then
    present=(); for f in "${PACK_LIST[@]}"; do [[ -f "$OUT/$f" ]] && present+=("$f"); done
    if (( ${#present[@]} )) && tar -czf "$OUT/extra.tar.gz" -C "$OUT" "${present[@]}" 2>/dev/null; then
        for f in "${present[@]}"; do rm -f "$OUT/$f"; done            # only the files this script wrote
        PACKED=("${present[@]}")
    fi
fi

JUNIT_PY='import sys, tarfile, io, xml.etree.ElementTree as ET
out, packed = sys.argv[1], set(sys.argv[2:])
def load(name):
    try:
        if name in packed:
            with tarfile.open(out + "/extra.tar.gz") as t:
                return ET.parse(io.BytesIO(t.extractfile(name).read())).getroot()
        return ET.parse(out + "/" + name).getroot()
    except Exception as e:
        return e
print("| run | tests | passed | failed | errors | skipped |\n|---|---|---|---|---|---|")
failed = []
for run, name in (("tests/test_cuda.py", "tests_cuda.xml"), ("tests/test_triton.py -k gpu_", "tests_triton.xml")):
    root = load(name)
    if isinstance(root, Exception):
        print(f"| {run} | no junit XML ({type(root).__name__}: the run was killed or did not start) | | | | |")
        continue
    s = root if root.tag == "testsuite" else root.find("testsuite")
    n, f, e, k = (int(s.get(a, 0)) for a in ("tests", "failures", "errors", "skipped"))
    print(f"| {run} | {n} | {n - f - e - k} | {f} | {e} | {k} |")
    for tc in s.iter("testcase"):
        for tag in ("failure", "error"):
            el = tc.find(tag)
            if el is not None:
                msg = (el.get("message") or "").splitlines()[0][:150] if el.get("message") else ""
                test = str(tc.get("classname")) + "::" + str(tc.get("name"))
                failed.append(f"- {tag}: `{test}` {msg}")
skips = {}
for run, name in (("cuda", "tests_cuda.xml"), ("triton", "tests_triton.xml")):
    root = load(name)
    if not isinstance(root, Exception):
        for el in root.iter("skipped"):
            m = (el.get("message") or "?")[:160]
            skips[m] = skips.get(m, 0) + 1
if failed:
    print("\nFailed (first 30):\n" + "\n".join(failed[:30]))
if skips:
    print("\nSkip reasons:\n" + "\n".join(f"- {n} x {m}" for m, n in sorted(skips.items(), key=lambda x: -x[1])[:8]))'

SUMMARY="$OUT/summary.md"
{
    echo "# Device check (issue 15): $(date -u '+%F %T UTC')"
    echo
    echo "- command: \`OUT=... bash benchmarks/device_check.sh\` from the repository root; exit status $EXIT"
    echo "- $(grep -m1 -E '^commit' "$ENV_TXT" 2>/dev/null || echo 'commit unknown')"
    echo "- GPU: $(timeout 10 nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,memory.total \
        --format=csv,noheader 2>/dev/null | head -1 || echo 'nvidia-smi failed')"
    echo "- $(grep -m1 -E '^device ' "$ENV_TXT" 2>/dev/null || echo 'device: see env.txt')"
    echo "- $(grep -m1 -E '^torch ' "$ENV_TXT" 2>/dev/null), $(grep -m1 -E '^triton ' "$ENV_TXT" 2>/dev/null)," \
         "$(grep -m1 -E 'Cuda compilation' "$ENV_TXT" 2>/dev/null || echo 'nvcc unknown')"
    echo "- wall time $(( $(now) - T0 )) s of a ${TOTAL_S} s deadline; BIVLM_TRITON_AUTOTUNE=$BIVLM_TRITON_AUTOTUNE"
    echo
    echo "## Steps"
    echo
    echo "| step | status | seconds | cap s | output |"
    echo "|---|---|---|---|---|"
    for i in "${!STEP_NAMES[@]}"; do
        echo "| ${STEP_NAMES[$i]} | ${STEP_STATUS[$i]} | ${STEP_SECS[$i]} | ${STEP_CAPS[$i]} | ${STEP_OUTS[$i]} |"
    done
    echo
    echo "## Tests"
    echo
    timeout 30 "$PY" -c "$JUNIT_PY" "$OUT" "${PACKED[@]}" 2>&1 || echo "(junit XML not summarised)"
    echo
    echo "## Kernel benchmark (bench/kernels.md)"
    echo
    echo "\`$(quote python3 benchmarks/bench_kernels.py "${BENCH_ARGS[@]}") --out \$OUT/bench\`"
    echo
    if [[ -f "$OUT/bench/kernels.md" ]]; then
        grep -E '^\| (device|copy_bandwidth_GBps|bivlm_backends|interrupted|elapsed_s) \|' "$OUT/bench/kernels.md" \
            | sed 's/^| \([^|]*\) | \(.*\) |$/- \1: \2/' || true
        echo
        awk '/^## (Performance floors|Speedup over fp16|Paths not measured|Not run)/ {p = 1; print; next}
             /^## / {p = 0} p' "$OUT/bench/kernels.md"
    else
        echo "no bench/kernels.md (the benchmark did not run or wrote nothing; see bench/bench.log)"
    fi
    echo
    echo "## Files in \$OUT"
    echo
    (cd "$OUT" && find . -type f ! -name summary.md | sed 's|^\./||' | sort | while read -r f; do
        echo "- $f ($(du -k "$f" | cut -f1) KiB)"; done)
    echo "- summary.md"
    (( ${#PACKED[@]} )) && echo "- extra.tar.gz holds: ${PACKED[*]}"
} >"$SUMMARY" 2>&1

NFILES=$(find "$OUT" -type f | wc -l)
(( NFILES > 8 )) && say "note: $NFILES files under \$OUT; the device tool returns at most 8"
say "done in $(( $(now) - T0 )) s, exit $EXIT; $SUMMARY:"
cat "$SUMMARY"
exit "$EXIT"
