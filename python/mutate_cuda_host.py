"""Plant bugs one at a time in a copy of csrc/cuda/ and show that the host-build tests (tests/test_cuda_host.py) catch
each one. Not run in CI (each mutant rebuilds part of the host build: ~1-3 minutes apiece on 2 cores).

    python python/mutate_cuda_host.py                 # all mutants, writes benchmarks/results/cuda_host_mutations.md
    python python/mutate_cuda_host.py --only dropped_bias,wrong_group_index --no-write

Each mutant is an exact text replacement (the script fails loudly if the text is not found, so a mutant cannot
silently stop applying when the kernels change). The baseline build directory (build/cuda_host, built first if
needed) is copied with its time stamps, so only the translation units that depend on the mutated file rebuild.
A mutant is caught when at least one test fails; a mutant that does not compile is reported as such (the
compiler caught it, not the tests) and counts as not caught.
"""
import argparse
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "cuda_host_mutations.md"
CSRC = ROOT / "csrc" / "cuda"   # the sources of the host build (tests/cuda_host/Makefile SRC)

# name, file under csrc/cuda/, old text, new text, the bug it models
MUTANTS = [
    ("split_range_off_by_one", "gemv.cuh",
     "const int we = min(p.kw, wb + p.words_per_split);",
     "const int we = min(p.kw, wb + p.words_per_split - 1);",
     "split-K range ends one word early (only the 4-byte-load kernel with > 1 split loses a word)"),
    ("wrong_group_index", "gemv.cuh",
     "const int grp = wi >> p.wpg_shift;",
     "const int grp = w0 >> p.wpg_shift;",
     "GEMV table of the chunk's first word for all its words (wrong when a group is < 4 words: 1-bit g32/g64, "
     "2-bit g32)"),
    ("dropped_bias", "common.cuh",
     "if (add_bias) v += to_float(bias[row]);",
     "if (add_bias) v += 0.0f * to_float(bias[row]);",
     "bias never added"),
    ("warp_sum_half", "common.cuh",
     "for (int off = 16; off > 0; off >>= 1)",
     "for (int off = 8; off > 0; off >>= 1)",
     "warp reduction over 16 of the 32 lanes"),
    ("reduce_drops_split0", "gemv_dispatch.cu",
     "for (int s = 0; s < splits; ++s) v += ws[s * mn + i];",
     "for (int s = 1; s < splits; ++s) v += ws[s * mn + i];",
     "split-K reduce skips the first partial"),
    ("vec4_without_alignment", "gemv_dispatch.cu",
     "return kw % 4 == 0 && aligned16(w.qweight);",
     "return kw % 4 == 0;",
     "16-byte weight loads chosen for a base that is only 4-byte aligned (a misaligned-address fault on a GPU)"),
    ("x_alignment_not_refused", "gemv_dispatch.cu",
     "if (!aligned16(x) || ",
     "if (",
     "launch_gemv accepts an x that is not 16-byte aligned"),
    ("wrong_rounding_dequant", "common.cuh",
     "w[t] = __fmul_rn(__fsub_rn(code_to_float(c), e[1]), e[0]);",
     "w[t] = fmaf(code_to_float(c), e[0], -e[1] * e[0]);",
     "affine dequantize contracted into an FMA: rounds differently from the reference's (c - z) * s"),
    ("swapped_mma_fragment_lane", "ptx_mma.cuh",
     "const MmaSlot& s = *static_cast<const MmaSlot*>(slots[l]);\n    const int g = l >> 2, t = l & 3;",
     "const MmaSlot& s = *static_cast<const MmaSlot*>(slots[l]);\n    const int g = (l >> 2) ^ 1, t = l & 3;",
     "mma.sync host: the fragments of lane groups 0 and 1 (and 2/3, ...) swapped"),
    ("swapped_ldmatrix_lane", "ptx_mma.cuh",
     "const int r = l >> 2, c = 2 * (l & 3);",
     "const int r = l & 7, c = 2 * (l >> 3);",
     "ldmatrix host: lane -> (row, column pair) mapping transposed"),
    ("tc1_slot_group", "gemv_tc1.cuh",
     "const float* dp = dq + ((gf + (2 * t) % S) / 2) * 128;",
     "const float* dp = dq + ((gf + (2 * t) % 1) / 2) * 128;",
     "1-bit tensor-core epilogue reads D of the slot block's first groups for every lane's columns"),
    ("tc1_position_constant", "gemv_tc1.cuh",
     "p == 9 ? 0x44004400u : 0x48004800u;",
     "p == 9 ? 0x46004600u : 0x48004800u;",
     "1-bit fp16 decode: the constant of bit position 9 gives {6, 4} (step -2) instead of {4, 6}"),
    ("tc1_rotation", "gemv_tc1.cuh",
     "(q << 11) | (q >> 21);",
     "(q << 11) | (q >> 20);",
     "1-bit fp16 decode: the fourth version of the word is not a rotation (one wrong bit per half)"),
    ("tc1_prologue_step_type", "gemv_tc1.cuh",
     "tc_mma(c[nt], ac[2 * (pp & 1)], b0, T());",
     "tc_mma(c[nt], ac[0], b0, T());",
     "1-bit prologue sums V with the v0 pattern of step type 0 for every first half-pair"),
    ("tc1_table_piece_dropped", "gemv_tc1.cuh",
     "for (int ap = 0; ap < AP; ++ap) ptx::mma_m16n8k16_bf16(y[r][nt], a[ap], b, y[r][nt]);",
     "for (int ap = 0; ap < AP; ++ap) if (l == 0) ptx::mma_m16n8k16_bf16(y[r][nt], a[ap], b, y[r][nt]);",
     "1-bit table product keeps only the first bf16 piece of 2 S + V and -V (2^-9 relative)"),
    ("tc1_tail_reads_past_k", "gemv_tc1.cuh",
     "if (tail) use = use && c * CK + gi * G < p.k;",
     "if (tail) use = use && c * CK + gi * G < p.k + CK;",
     "1-bit kernel reads x past K in the last chunk (out of bounds: the sanitizer's to catch)"),
    ("tc1_partial_block_lost", "gemv_tc1.cuh",
     "if (c_begin < c_end && (c_end * CK) % BK != 0) tc1_fold_slots<S>(dq, (c_end * CK / BK) * BK / G, t, y, d);",
     "if (false) tc1_fold_slots<S>(dq, (c_end * CK / BK) * BK / G, t, y, d);",
     "the slot block cut by the end of a split is never folded into y"),
    ("tc2_selector_constant", "gemv_tc2.cuh",
     "const uint32_t sel = tq * 0x11u + 0x10101010u;",
     "const uint32_t sel = tq * 0x11u + 0x01100110u;",
     "2-bit PRMT selector picks the entries' bytes in the wrong order"),
    ("tc2_group_of_step", "gemv_tc2.cuh",
     "const int gi = (w * 32 + hs * 16) / G;",
     "const int gi = 0;",
     "2-bit tensor-core kernel uses the chunk's first group's codebook for its second group (g64)"),
    ("tc4_high_nibble_scale", "gemv_tc4.cuh",
     "a[1] = ptx::hfma2<false>(ptx::lop3<0xEA>(q, 0x00F000F0u, 0x64006400u), 0x2C002C00u, 0xD400D400u);",
     "a[1] = ptx::hfma2<false>(ptx::lop3<0xEA>(q, 0x00F000F0u, 0x64006400u), 0x2C002C00u, 0xD000D000u);",
     "4-bit fp16 decode subtracts the wrong magic for the high nibbles"),
    ("tc4_zero_term", "gemv_tc4.cuh",
     "c0[e2][0] = -lo.x * lo.y, h[e2][0] = lo.x;",
     "c0[e2][0] = -lo.x * lo.x, h[e2][0] = lo.x;",
     "4-bit epilogue uses scale * scale instead of scale * zero for row gid"),
    ("seg_accumulate_overwrites", "gemv_tc_seg.cuh",
     "tc1_body<T, MT, G, kTcSegWarps, true>(p, a1, b1, TcOut{split, first && split == 0, !first}, smem);",
     "tc1_body<T, MT, G, kTcSegWarps, true>(p, a1, b1, TcOut{split, first && split == 0, false}, smem);",
     "segmented kernel: the 1-bit segment overwrites the 2-bit segment's partial instead of adding to it"),
    ("seg_gather_perm_lane", "gemv_tc_seg.cuh",
     "c[0] = min(pv.x, k_last), c[1] = min(pv.y, k_last),",
     "c[0] = min(pv.y, k_last), c[1] = min(pv.x, k_last),",
     "segmented gather swaps two perm entries (x of column 1 where column 0 belongs)"),
    ("seg_slice_offset", "gemv_tc_seg.cuh",
     "gather(q.w2, q.s2.k + a1 * 256, n1);",
     "gather(q.w2, q.s2.k + a1 * 128, n1);",
     "segmented gather reads the 1-bit slice at the 2-bit chunk size (wrong columns from the second split on)"),
    ("seg_rows_past_m", "gemv_tc_seg.cuh",
     "for (int mi = 0; mi < MT; ++mi) xr[mi] = static_cast<unsigned>(min(mi, m - 1) * q.s2.ldx);",
     "for (int mi = 0; mi < MT; ++mi) xr[mi] = static_cast<unsigned>(min(mi, m) * q.s2.ldx);",
     "segmented gather reads rows of x past m (out of bounds: the sanitizer's to catch)"),
    ("seg_bias_every_split", "gemv_tc_seg.cuh",
     "tc2_body<T, MT, G, kTcSegWarps, true>(p, a2, b2, TcOut{split, split == 0, false});",
     "tc2_body<T, MT, G, kTcSegWarps, true>(p, a2, b2, TcOut{split, true, false});",
     "segmented kernel: every split's 2-bit body adds the bias"),
    ("wrong_rounding_fp16_ties", "host/fp16.h",
     "if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;",
     "if (rest >= 0x1000u) ++h;",
     "float -> half rounds ties away from zero instead of to even"),
    ("wrong_rounding_bf16_truncates", "host/fp16.h",
     "const uint32_t rounded = u + 0x7fffu + ((u >> 16) & 1u);",
     "const uint32_t rounded = u;",
     "float -> bfloat16 truncates"),
]


def run(cmd, env=None, timeout=3600):
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


def ensure_baseline(jobs):
    build = ROOT / "build" / "cuda_host"
    r = run(["make", "-s", "-C", str(ROOT / "tests" / "cuda_host"), f"-j{jobs}"])
    if r.returncode != 0:
        sys.exit(f"baseline host build failed:\n{r.stderr}")
    return build


def mutate(workdir, base_build, name, rel, old, new, jobs, seed):
    src = workdir / "cuda"
    build = workdir / "build"
    shutil.copytree(CSRC, src, copy_function=shutil.copy2)
    shutil.copytree(base_build, build, copy_function=shutil.copy2,
                    ignore=shutil.ignore_patterns("*.cubin"))
    # The dependency files name the original objects and sources: point them at the copy, so that the objects
    # depending on the mutated file (header or not) are rebuilt.
    for d in build.glob("*.d"):
        d.write_text(d.read_text().replace(str(base_build), str(build)).replace(str(CSRC), str(src)))
    path = src / rel
    text = path.read_text()
    if text.count(old) != 1:
        sys.exit(f"mutant {name}: the text to replace occurs {text.count(old)} times in csrc/cuda/{rel}")
    time.sleep(1.1)   # a later mtime than the copied objects
    path.write_text(text.replace(old, new))
    env = dict(os.environ, BIVLM_CUDA_HOST_SRC=str(src), BIVLM_CUDA_HOST_BUILD=str(build),
               BIVLM_FUZZ_SEED=str(seed), BIVLM_HOST_JOBS=str(jobs))
    env.pop("BIVLM_CUDA_HOST_TESTED", None)
    r = run([sys.executable, "-m", "pytest", str(ROOT / "tests" / "test_cuda_host.py"), "-q", "-rfE",
             "-p", "no:cacheprovider", f"--basetemp={workdir / 'pytest'}"], env=env)
    out = r.stdout + r.stderr
    failed = [t for t in re.findall(r"^(?:FAILED|ERROR) (\S+)", out, re.M)]
    if "host build failed" in out and not re.search(r"^E\s+.*(mismatch|FAIL |bivlm host build:)", out, re.M):
        return "did not compile", [], ""
    # The first line that says what went wrong: a mismatching case, a failed C++ check, an emulator abort or a
    # sanitizer report (pytest prints assertion messages with an "E" prefix).
    detail = re.search(r"^E\s+((?:linear|dequantize|reduce)\(.*|FAIL .*|bivlm host build: .*|.*AddressSanitizer.*"
                       r"|.*runtime error.*)$", out, re.M)
    return ("caught" if failed else "NOT caught"), failed, detail.group(1) if detail else ""


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="comma-separated mutant names")
    ap.add_argument("--jobs", type=int, default=1, help="make -j for each rebuild (default 1: shared machines)")
    ap.add_argument("--seed", type=int, default=12345, help="BIVLM_FUZZ_SEED of every run")
    ap.add_argument("--no-write", action="store_true", help=f"do not write {RESULTS.relative_to(ROOT)}")
    args = ap.parse_args()
    chosen = [m for m in MUTANTS if not args.only or m[0] in args.only.split(",")]
    base = ensure_baseline(args.jobs)
    rows = []
    for name, rel, old, new, what in chosen:
        t0 = time.time()
        with tempfile.TemporaryDirectory(prefix=f"bivlm_mut_{name}_") as tmp:
            verdict, failed, first = mutate(pathlib.Path(tmp), base, name, rel, old, new, args.jobs, args.seed)
        tests = sorted({t.split("::")[-1] for t in failed})
        first = re.sub(r"/tmp/bivlm_mut_\w+?/", "<copy>/", first)[:220]
        rows.append((name, rel, what, verdict, tests, first))
        print(f"{name:32s} {verdict:16s} {time.time() - t0:6.0f} s  {', '.join(tests)}", flush=True)
    caught = sum(1 for r in rows if r[3] == "caught")
    print(f"{caught} of {len(rows)} mutants caught")
    if not args.no_write:
        lines = ["# Planted bugs in csrc/cuda/ and the host-build tests that catch them", "",
                 "`python python/mutate_cuda_host.py` (seed " + str(args.seed) + "): each mutant is one text "
                 "replacement in a copy of `csrc/cuda/`, rebuilt and run through all of `tests/test_cuda_host.py` "
                 "(host build under ASan + UBSan). Caught = at least one test failed.", "",
                 "| mutant | file | bug | result | failing tests | first report |", "|---|---|---|---|---|---|"]
        for name, rel, what, verdict, tests, first in rows:
            msg = first.replace("|", "\\|")
            lines.append(f"| `{name}` | `csrc/cuda/{rel}` | {what} | **{verdict}** | {', '.join(tests)} | {msg} |")
        lines += ["", f"**{caught} of {len(rows)} caught.**", ""]
        RESULTS.write_text("\n".join(lines))
    return 0 if caught == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
