"""The CUDA kernels of ``csrc/cuda/`` executed on the CPU: the host build (``csrc/cuda/host/``, ``tests/cuda_host/``)
under AddressSanitizer + UndefinedBehaviorSanitizer, driven through the same C ABI (``csrc/cuda/bivlm_kernels.h``)
that ``torch_ops.cpp`` calls, against the pure-PyTorch reference.

* ``make -C tests/cuda_host`` compiles every ``csrc/cuda/*.cu`` as C++ (g++) against the emulation layer.
* The cases (a grid over every instantiated configuration plus a seeded random fuzz, fresh data each run; seed in
  ``BIVLM_FUZZ_SEED``, printed) are written to a file; the driver runs them all in one sanitized process with every
  buffer allocated at exactly its contract size; the outputs are compared here.
* Oracle: the reference dequantization (``formats.dequantize_*``), then the product in float64. Dequantize and the
  split-K reduce must be bit-exact; the linear path must lie within the output rounding plus an fp32 accumulation
  bound (see ``_linear_tolerance``).

``.ci/run`` runs this file first (``-s``: it prints the case counts) and then sets ``BIVLM_CUDA_HOST_TESTED=1`` so
the README's test command does not run it a second time. Environment: ``CXX`` (default g++),
``BIVLM_CUDA_HOST_SRC`` / ``BIVLM_CUDA_HOST_BUILD`` (a mutated copy of csrc/cuda/ and its build directory, used by
``python/mutate_cuda_host.py``), ``BIVLM_FUZZ_CASES`` (default 320).
"""
import itertools
import os
import pathlib
import random
import re
import shutil
import struct
import subprocess

import pytest
import torch

from bivlm_kernels import formats, ops
from bivlm_kernels.backends import reference as ref_ops
from bivlm_kernels.backends.cuda import tc_repack as repack

ROOT = pathlib.Path(__file__).resolve().parents[1]
SRC = pathlib.Path(os.environ.get("BIVLM_CUDA_HOST_SRC", ROOT / "csrc" / "cuda"))
BUILD = pathlib.Path(os.environ.get("BIVLM_CUDA_HOST_BUILD", ROOT / "build" / "cuda_host"))
CXX = os.environ.get("CXX", "g++")
FUZZ_CASES = int(os.environ.get("BIVLM_FUZZ_CASES", "320"))
SEED = int(os.environ.get("BIVLM_FUZZ_SEED", str(random.SystemRandom().randrange(2**31))))

if os.environ.get("BIVLM_CUDA_HOST_TESTED") == "1":
    pytest.skip("the host build already ran in an earlier step of .ci/run", allow_module_level=True)
if shutil.which(CXX) is None:
    pytest.skip(f"no C++ compiler {CXX!r} for the host build of csrc/cuda/", allow_module_level=True)

# ASan: stop at the first report, leaks are reports too; UBSan: stop with a stack trace.
SAN_ENV = {"ASAN_OPTIONS": "halt_on_error=1:detect_leaks=1:abort_on_error=0",
           "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1"}
SAN_REPORT = re.compile(r"ERROR: (Address|Leak)Sanitizer|runtime error:|bivlm host build:")

DTYPES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}
ELEM = {torch.float16: 2, torch.bfloat16: 2, torch.float32: 4}
FORMATS = {"lut1": ("lut", 1), "lut2": ("lut", 2), "affine4": ("affine", 4)}
GROUPS = (32, 64, 128, 256)
MT_BUCKETS = ((1,), (2,), (3, 4), (5, 6, 7, 8), (9, 12, 13, 16))   # m -> MT = 1, 2, 4, 8, 16


def _driver():
    BUILD.mkdir(parents=True, exist_ok=True)
    jobs = os.environ.get("BIVLM_HOST_JOBS", "2")
    r = subprocess.run(["make", "-s", "-C", str(ROOT / "tests" / "cuda_host"), f"-j{jobs}", f"SRC={SRC}",
                        f"BUILD={BUILD}", f"CXX={CXX}"], capture_output=True, text=True)
    assert r.returncode == 0, f"host build failed:\n{r.stdout}\n{r.stderr}"
    return BUILD / "bivlm_host_tests"


@pytest.fixture(scope="module")
def driver():
    return _driver()


def _run(driver, *args, timeout=600):
    env = dict(os.environ, **SAN_ENV)
    return subprocess.run([str(driver), *args], capture_output=True, text=True, env=env, timeout=timeout)


def _sanitizer_reports(text):
    return len(SAN_REPORT.findall(text))


# ---------------------------------------------------------------------------------------------------------
# primitives, the emulated machine, refusals, faults
# ---------------------------------------------------------------------------------------------------------

def test_selftest(driver):
    """Each ptx.cuh primitive and fp16/bf16 conversion against its plain definition; the emulated machine."""
    r = _run(driver, "selftest")
    assert r.returncode == 0 and " 0 failures" in r.stdout, r.stdout + r.stderr[-4000:]
    assert _sanitizer_reports(r.stderr) == 0, r.stderr[-4000:]
    print("\n" + r.stdout.strip().splitlines()[-1])


def test_refusals(driver):
    """Every argument the C ABI refuses returns cudaErrorInvalidValue and launches nothing."""
    r = _run(driver, "refusals")
    assert r.returncode == 0 and " 0 failures" in r.stdout, r.stdout + r.stderr[-4000:]
    assert _sanitizer_reports(r.stderr) == 0, r.stderr[-4000:]
    print("\n" + r.stdout.strip().splitlines()[-1])


FAULTS = {
    "misaligned_load": "misaligned address .* ld.global.nc.v4",
    "misaligned_store": "misaligned address .* st.global.v4",
    "heap_overread": "AddressSanitizer: heap-buffer-overflow",
    "int_overflow": "runtime error: signed integer overflow",
    "exited_lane": "names lane 0, which has exited",
    "outside_mask": "reads lane 16, which is not in the mask",
    "not_in_mask": "calling lane 0 is not in its mask",
    "mixed_collectives": "lanes of one warp in different collectives",
    "deadlock": "deadlock",
}


@pytest.mark.parametrize("name", sorted(FAULTS))
def test_fault_aborts(driver, name):
    """Misuse a GPU turns into a fault or a hang aborts the host build with a message naming it."""
    r = _run(driver, "fault", name, timeout=120)
    assert r.returncode != 0, f"{name} did not abort: {r.stdout}"
    assert re.search(FAULTS[name], r.stderr), r.stderr[-3000:]


def test_device_wrappers_assemble():
    """The device side of every wrapper (inline PTX the kernels may not use yet) compiles for sm_80 and sm_90."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not found: the device side of ptx.cuh is only checked where the CUDA toolkit is")
    BUILD.mkdir(parents=True, exist_ok=True)
    for arch in ("sm_80", "sm_90"):
        r = subprocess.run([nvcc, "-cubin", "-std=c++17", "-O3", f"-arch={arch}", f"-I{SRC}", "-Xcompiler", "-Wall",
                            "--Werror", "all-warnings", "-o", str(BUILD / f"ptx_device_check_{arch}.cubin"),
                            str(ROOT / "tests" / "cuda_host" / "ptx_device_check.cu")],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr


# ---------------------------------------------------------------------------------------------------------
# kernel cases through the C ABI
# ---------------------------------------------------------------------------------------------------------

def _bytes(t):
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _blob(t):
    b = b"" if t is None else _bytes(t)
    return struct.pack("<q", len(b)) + b


class Case:
    """One call of the C ABI with its inputs (torch tensors) and what to compare."""

    def __init__(self, op, **kw):
        self.op = op
        self.__dict__.update(kw)

    def header(self):
        h = [0] * 16
        h[0] = {"linear": 1, "dequantize": 2, "reduce": 3, "tc": 4, "seg": 5}[self.op]
        if self.op == "seg":
            h[2:11] = [self.g, DTYPES[self.dtype], self.m, self.n, self.k2, self.ldx, int(self.bias is not None),
                       self.sm, DTYPES[self.out_dtype]]
            h[12], h[13], h[15] = self.k1, int(self.perm is not None), 7
        elif self.op == "reduce":
            h[10], h[12], h[15] = DTYPES[self.out_dtype], self.splits, 1
        else:
            kind, bits = FORMATS[self.fmt]
            h[1:8] = [bits, self.g, DTYPES[self.dtype], getattr(self, "m", 0), self.n, self.k, getattr(self, "ldx", 0)]
            h[8] = int(getattr(self, "bias", None) is not None)
            h[9] = getattr(self, "sm", 1)
            h[10] = DTYPES[getattr(self, "out_dtype", self.dtype)]
            h[11] = getattr(self, "q_offset", 0)
            h[15] = {"linear": 5, "tc": 4}.get(self.op, 3)
        return struct.pack("<16q", *h)

    def payload(self):
        if self.op == "reduce":
            return _blob(self.ws)
        if self.op == "seg":
            x_flat = self.x_full.reshape(-1)[: (self.m - 1) * self.ldx + self.k]
            parts = []
            for bits, kk, qw, cb in ((2, self.k2, self.qw2, self.cb2), (1, self.k1, self.qw1, self.cb1)):
                parts += list(repack.repack_tables(bits, qw, (cb,), kk, self.g)) if kk else [None, None]
            return b"".join(_blob(t) for t in [x_flat, self.perm] + parts + [self.bias])
        t0, t1 = (self.tables + (None,))[:2]
        if self.op == "dequantize":
            return _blob(self.qweight) + _blob(t0) + _blob(t1)
        # x: exactly the (m - 1) * ldx + k elements the kernel may read.
        x_flat = self.x_full.reshape(-1)[: (self.m - 1) * self.ldx + self.k]
        if self.op == "tc":
            qtc, table = repack.repack_tables(FORMATS[self.fmt][1], self.qweight, self.tables, self.k, self.g)
            return _blob(x_flat) + _blob(qtc) + _blob(table) + _blob(self.bias)
        return _blob(x_flat) + _blob(self.qweight) + _blob(t0) + _blob(t1) + _blob(self.bias)

    def describe(self):
        keys = ("fmt", "g", "dtype", "m", "n", "k", "k2", "k1", "ldx", "sm", "out_dtype", "q_offset", "splits")
        parts = [f"{k}={getattr(self, k)}" for k in keys if hasattr(self, k)]
        if self.op in ("linear", "tc", "seg"):
            parts.append(f"bias={self.bias is not None}")
        if self.op == "seg":
            parts.append(f"perm={self.perm is not None}")
        return f"{self.op}(" + ", ".join(parts) + ")"


def _weight(gen, fmt, n, k, g, dtype):
    kind, bits = FORMATS[fmt]
    codes = torch.randint(0, 1 << bits, (n, k), generator=gen)
    qweight = formats.pack(codes, bits)
    if kind == "lut":
        return qweight, (torch.randn(n, k // g, 1 << bits, generator=gen).to(dtype),)
    scales = (torch.rand(n, k // g, generator=gen) * 0.02 + 0.005).to(dtype)
    zeros = (torch.rand(n, k // g, generator=gen) * 15).to(dtype)
    return qweight, (scales, zeros)


def _linear_case(gen, fmt, g, dtype, m, n, k, *, ldx_pad=0, bias=True, sm=1, out_dtype=None, q_offset=0):
    qweight, tables = _weight(gen, fmt, n, k, g, dtype)
    align = 16 // ELEM[dtype]
    ldx = k + ldx_pad * align
    return Case("linear", fmt=fmt, g=g, dtype=dtype, m=m, n=n, k=k, ldx=ldx, sm=sm,
                out_dtype=out_dtype or dtype, q_offset=q_offset, qweight=qweight, tables=tables,
                x_full=torch.randn(m, ldx, generator=gen).to(dtype),
                bias=torch.randn(n, generator=gen).to(dtype) if bias else None)


def _splitk_k(fmt):
    """A K with about four splits of whole 16-byte warp steps (128 words per row per step)."""
    return {"lut1": 16384, "lut2": 8192, "affine4": 4096}[fmt]


def _vec1_k(fmt, g):
    """A K whose rows are not a multiple of 4 words (the 4-byte-load kernel), where the format allows one."""
    bits = FORMATS[fmt][1]
    for groups in (1, 3, 5, 7):
        if (g * groups * bits // 32) % 4:
            return g * groups
    return None   # 4-bit: always a multiple of 4 words; the VEC = 1 kernel is reached by a misaligned base


def grid_cases(gen):
    """Every GEMV instantiation (dtype x bits x MT bucket x VEC) with the paths rotated over them: direct output,
    fp32 output, split-K + reduce, out dtype other than x's; strided x; with and without bias; every group size.
    Then dequantize for every (format, group, dtype) and the reduce for every out dtype."""
    cases, i = [], 0
    for fmt in FORMATS:
        for dtype in DTYPES:
            for bucket in MT_BUCKETS:
                for vec in (4, 1):
                    g = GROUPS[i % 4]
                    m = bucket[i % len(bucket)]
                    path = i % 4   # 0 direct, 1 split-K, 2 fp32 / other out dtype, 3 strided x direct
                    other = torch.float32 if dtype != torch.float32 else torch.float16
                    q_offset = 0
                    if vec == 1:
                        k = _vec1_k(fmt, g)
                        if k is None or path == 1:
                            q_offset, k = 1, 2 * g
                    else:
                        k = max(4 * g, 512)
                    if path == 1:
                        k = _splitk_k(fmt)
                    n = 5 if path == 1 else 67
                    cases.append(_linear_case(gen, fmt, g, dtype, m, n, k, ldx_pad=3 if path == 3 else 0,
                                              bias=i % 3 != 0, sm=132 if path == 1 else 1,
                                              out_dtype=other if path == 2 else dtype, q_offset=q_offset))
                    i += 1
    for fmt in FORMATS:
        for g in GROUPS:
            for dtype in DTYPES:
                n, k = 3 + (i % 29), g * (1 + i % 5)
                qweight, tables = _weight(gen, fmt, n, k, g, dtype)
                cases.append(Case("dequantize", fmt=fmt, g=g, dtype=dtype, n=n, k=k, qweight=qweight, tables=tables))
                i += 1
    for od in DTYPES:
        for splits, mn in ((1, 1), (2, 255), (7, 257), (32, 1000)):
            cases.append(Case("reduce", out_dtype=od, splits=splits, ws=torch.randn(splits, mn, generator=gen) * 50))
    return cases


def _tc_case(gen, g, dtype, m, n, k, fmt="lut1", **kw):
    c = _linear_case(gen, fmt, g, dtype, m, n, k, **kw)
    c.op = "tc"
    return c


def tc_grid_cases(gen):
    """The tensor-core GEMVs (1 and 2 bits): dtype x g x MT bucket, paths rotated (direct, split-K, fp32 / other
    out dtype, strided x), N not a multiple of 16 or 64, K not a multiple of the chunk and (1 bit) slot blocks cut
    by the end of K."""
    cases, i = [], 0
    for fmt, dtype in itertools.product(("lut1", "lut2", "affine4"), (torch.float16, torch.bfloat16)):
        for g in (64, 128):
            for bucket in MT_BUCKETS:
                for path in range(4):
                    m = bucket[i % len(bucket)]
                    k = (576, 1280, 640, 2304)[i % 4] if g == 64 else (640, 1152, 1536, 2304)[i % 4]
                    n = (67, 16, 130, 1)[i % 4]
                    sm = 1
                    if path == 1:
                        n, k, sm = 5 + i % 3, 16384 + 2 * g, 132
                    other = torch.float32 if i % 2 else (torch.bfloat16 if dtype == torch.float16 else torch.float16)
                    cases.append(_tc_case(gen, g, dtype, m, n, k, fmt, ldx_pad=3 if path == 3 else 0,
                                          bias=i % 3 != 0, sm=sm, out_dtype=other if path == 2 else dtype))
                    i += 1
    return cases


def tc_fuzz_cases(gen, count):
    rnd = random.Random(int(torch.randint(0, 2**31, (1,), generator=gen)))
    cases = []
    for _ in range(count):
        g = rnd.choice((64, 128))
        dtype = rnd.choice((torch.float16, torch.bfloat16))
        m = rnd.randint(1, 16)
        if rnd.random() < 0.2:
            n, k = rnd.randint(1, 12), g * rnd.randint(4096 // g, 16384 // g)
        else:
            n, k = int(2 ** rnd.uniform(0, 8)), g * rnd.randint(1, 2048 // g)
        od = rnd.choice([dtype, dtype, torch.float32])
        cases.append(_tc_case(gen, g, dtype, m, n, k, rnd.choice(("lut1", "lut2", "affine4")), ldx_pad=rnd.choice([0, 0, 1, 5]), bias=rnd.random() < 0.5,
                              sm=rnd.choice([1, 2, 8, 132]), out_dtype=od))
    return cases


def _seg_case(gen, g, dtype, m, n, k2, k1, *, perm=True, ldx_pad=0, bias=True, sm=1, out_dtype=None):
    """The sub-2-bit layout: a 2-bit segment over k2 permuted columns, a 1-bit one over the next k1. x rows have
    any stride (the gather reads 2-byte elements)."""
    qw2, (cb2,) = _weight(gen, "lut2", n, k2, g, dtype) if k2 else (None, (None,))
    qw1, (cb1,) = _weight(gen, "lut1", n, k1, g, dtype) if k1 else (None, (None,))
    k = k2 + k1
    ldx = k + ldx_pad
    return Case("seg", fmt="seg", g=g, dtype=dtype, m=m, n=n, k=k, k2=k2, k1=k1, ldx=ldx, sm=sm,
                out_dtype=out_dtype or dtype, qw2=qw2, cb2=cb2, qw1=qw1, cb1=cb1,
                perm=torch.randperm(k, generator=gen).to(torch.int32) if perm else None,
                x_full=torch.randn(m, ldx, generator=gen).to(dtype),
                bias=torch.randn(n, generator=gen).to(dtype) if bias else None)


def seg_grid_cases(gen):
    """The segmented kernel: dtype x g x MT bucket, paths rotated: both segments with a perm, no perm, 1-bit only,
    2-bit only, split-K (long K, many SMs), strided x; N not a multiple of 16 or 512; slices cut by the end of K."""
    cases, i = [], 0
    for dtype, g in itertools.product((torch.float16, torch.bfloat16), (64, 128)):
        for bucket in MT_BUCKETS:
            for path in range(5):
                m = bucket[i % len(bucket)]
                k2, k1 = [(g, 5 * g), (2 * g, 9 * g), (0, 7 * g), (3 * g, 0), (4 * g, 16384 + g)][path]
                n = (67, 16, 530, 1, 9)[path]
                cases.append(_seg_case(gen, g, dtype, m, n, k2, k1, perm=path != 1, ldx_pad=(0, 1, 0, 8, 3)[path],
                                       bias=i % 3 != 0, sm=132 if path == 4 else (1, 8)[i % 2],
                                       out_dtype=torch.float32 if i % 4 == 1 else dtype))
                i += 1
    return cases


def seg_fuzz_cases(gen, count):
    rnd = random.Random(int(torch.randint(0, 2**31, (1,), generator=gen)))
    cases = []
    for _ in range(count):
        g = rnd.choice((64, 128))
        dtype = rnd.choice((torch.float16, torch.bfloat16))
        k2 = g * rnd.choice((0, 1, 1, 2, 3, 8))
        k1 = g * rnd.randint(0 if k2 else 1, (16384 if rnd.random() < 0.2 else 2048) // g)
        cases.append(_seg_case(gen, g, dtype, rnd.randint(1, 16), int(2 ** rnd.uniform(0, 9)), k2, k1,
                               perm=rnd.random() < 0.85, ldx_pad=rnd.choice((0, 0, 1, 5)), bias=rnd.random() < 0.5,
                               sm=rnd.choice((1, 2, 8, 132)), out_dtype=rnd.choice((dtype, dtype, torch.float32))))
    return cases


def fuzz_cases(gen, count):
    """Random linear calls (the bulk) with dequantize and reduce calls mixed in."""
    rnd = random.Random(int(torch.randint(0, 2**31, (1,), generator=gen)))
    cases = []
    for _ in range(count):
        fmt = rnd.choice(list(FORMATS))
        g = rnd.choice(GROUPS)
        dtype = rnd.choice(list(DTYPES))
        roll = rnd.random()
        if roll < 0.12:
            n, k = rnd.randint(1, 96), g * rnd.randint(1, 12)
            qweight, tables = _weight(gen, fmt, n, k, g, dtype)
            cases.append(Case("dequantize", fmt=fmt, g=g, dtype=dtype, n=n, k=k, qweight=qweight, tables=tables))
            continue
        if roll < 0.16:
            splits, mn = rnd.randint(1, 32), rnd.randint(1, 3000)
            cases.append(Case("reduce", out_dtype=dtype, splits=splits, ws=torch.randn(splits, mn, generator=gen)))
            continue
        m = rnd.randint(1, 16)
        if rnd.random() < 0.2:   # long K, few rows: split-K territory
            n, k = rnd.randint(1, 12), g * rnd.randint(16384 // g // 4, 16384 // g)
        else:
            n, k = int(2 ** rnd.uniform(0, 8)), g * rnd.randint(1, max(1, 2048 // g))
        od = rnd.choice([dtype, dtype, dtype, torch.float32, rnd.choice(list(DTYPES))])
        cases.append(_linear_case(gen, fmt, g, dtype, m, n, k, ldx_pad=rnd.choice([0, 0, 1, 5]),
                                  bias=rnd.random() < 0.5, sm=rnd.choice([1, 2, 8, 132]), out_dtype=od,
                                  q_offset=int(rnd.random() < 0.2)))
    return cases


def _run_cases(driver, cases, tmp_path):
    inp, out = tmp_path / "cases.bin", tmp_path / "out.bin"
    with open(inp, "wb") as f:
        f.write(b"BVHC" + struct.pack("<i", len(cases)))
        for c in cases:
            f.write(c.header() + c.payload())
    r = _run(driver, "cases", str(inp), str(out))
    reports = _sanitizer_reports(r.stderr)
    assert r.returncode == 0 and reports == 0, (
        f"driver failed (rc={r.returncode}, {reports} sanitizer reports, seed {SEED}):\n{r.stderr[-6000:]}")
    data, pos, results = out.read_bytes(), 0, []
    for _ in cases:
        e0, e1, splits, vec4, nbytes = struct.unpack_from("<5q", data, pos)
        pos += 40
        results.append((e0, e1, splits, vec4, data[pos:pos + nbytes]))
        pos += nbytes
    kernels = (out.parent / (out.name + ".kernels")).read_text().splitlines()
    return results, kernels, r.stdout


U_OUT = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8, torch.float32: 0.0}
TINY = {torch.float16: 2.0 ** -24, torch.bfloat16: 2.0 ** -133, torch.float32: 2.0 ** -149}


def _linear_tolerance(c, w, splits):
    """|y - exact| <= u_out (|exact| + acc) + acc + tiny, with
    acc = gamma_n (|x| |W|^T + |bias|) [+ 2^-24 |x| (|z s| + 2 |W|)^T for affine: the GEMV decodes c*s + (-z*s) with
    one FFMA where the reference computes (c - z) * s], n = K/32 + 128 + 8 + splits: each lane accumulates at most
    K/32 + VEC * codes-per-word terms (one rounding each, FMA), then 5 shuffle additions, the bias and the split-K
    sum. u_out: unit roundoff of the output dtype (0 for fp32); tiny: half the smallest subnormal step."""
    x = c.x_full[:, : c.k].double()
    n_terms = c.k // 32 + 128 + 8 + splits
    u = 2.0 ** -24
    gamma = n_terms * u / (1 - n_terms * u)
    acc = gamma * (x.abs() @ w.abs().T)
    if c.bias is not None:
        acc += gamma * c.bias.double().abs()
    if c.fmt == "affine4":
        s, z = (t.double().repeat_interleave(c.g, dim=1) for t in c.tables)
        acc += u * (x.abs() @ ((z * s).abs() + 2 * w.abs()).T)
    return acc


def _tc_tolerance(c, splits):
    """The tensor-core paths' fp32 bound (one rounding per k16 step: the host's model of the mma).
    1 bit (gemv_tc1.cuh): per group the tensor cores sum v x with v = v0 + 2 b, |v| <= 10 (fp16; bf16 6), then
    2 y += D acc per group, plus the table product c0 (2 S + V) - c1 V in bf16 pieces (|S| <= sum |x|,
    |V| <= 8 sum |x|): every term is bounded by 10 (|c0| + |c1|) |x| (|D| <= |c0| + |c1|), with
    n = g/16 + 2 + 4 K/g + 8 + splits roundings (the piece splits cost 2^-26 relative, less than one).
    4 bits: y += s D - s z S per group, terms bounded by s (15 + |z|) |x|, n = g/16 + 2 + K/g + 8 + splits."""
    x = c.x_full[:, : c.k].double()
    if c.fmt == "lut1":
        cb = c.tables[0].double()
        mag = (10 * (cb[..., 0].abs() + cb[..., 1].abs())).repeat_interleave(c.g, dim=1)
        n_terms = c.g // 16 + 2 + 4 * c.k // c.g + 8 + splits
    else:   # affine4: y = s sum c x - s z S per group
        sc, z = (t.double() for t in c.tables)
        mag = (sc.abs() * (15 + z.abs())).repeat_interleave(c.g, dim=1)
        n_terms = c.g // 16 + 2 + c.k // c.g + 8 + splits
    u = 2.0 ** -24
    acc = n_terms * u / (1 - n_terms * u) * (x.abs() @ mag.T)
    if c.bias is not None:
        acc += n_terms * u * c.bias.double().abs()
    return acc


def _check(c, res):
    """None when the kernel result is right, else a message."""
    e0, e1, splits, vec4, raw = res
    if e0 != 0 or e1 != 0:
        return f"returned errors {e0}, {e1}"
    if c.op == "dequantize":
        kind, bits = FORMATS[c.fmt]
        ref = (ref_ops.dequantize_lut(c.qweight, *c.tables, bits, c.g) if kind == "lut"
               else ref_ops.dequantize_affine(c.qweight, *c.tables, bits, c.g))
        got = torch.frombuffer(bytearray(raw), dtype=c.dtype).reshape(c.n, c.k)
        bad = (got.view(torch.uint8).reshape(c.n, -1) != ref.view(torch.uint8).reshape(c.n, -1)).any(dim=1)
        return None if not bad.any() else f"not bit-exact in {int(bad.sum())} of {c.n} rows"
    if c.op == "reduce":
        acc = torch.zeros(c.ws.shape[1], dtype=torch.float32)
        for s in range(c.splits):   # the kernel's fixed order, fp32 additions
            acc = acc + c.ws[s]
        ref = acc.to(c.out_dtype)
        got = torch.frombuffer(bytearray(raw), dtype=c.out_dtype)
        return None if torch.equal(got.view(torch.uint8), ref.view(torch.uint8)) else "reduce not bit-exact"
    got = torch.frombuffer(bytearray(raw), dtype=c.out_dtype).reshape(c.m, c.n).double()
    if c.op == "seg":
        return _compare(c, got, *_seg_check(c, splits), splits, vec4)
    kind, bits = FORMATS[c.fmt]
    w = (formats.dequantize_lut(c.qweight, *c.tables, bits, c.g) if kind == "lut"
         else formats.dequantize_affine(c.qweight, *c.tables, bits, c.g)).double()
    exact = c.x_full[:, : c.k].double() @ w.T
    if c.bias is not None:
        exact += c.bias.double()
    acc = _tc_tolerance(c, splits) if c.op == "tc" and c.fmt != "lut2" else _linear_tolerance(c, w, splits)
    return _compare(c, got, exact, acc, splits, vec4)


def _seg_check(c, splits):
    """The segmented kernel against x[:, perm] [W2 | W1]^T + bias in float64; its bound: the 2-bit segment's as
    the GEMV's (exact entries, fp32 sums), the 1-bit segment's as _tc_tolerance, plus the one addition that joins
    the two partials of a split."""
    xp = c.x_full[:, : c.k] if c.perm is None else c.x_full[:, : c.k][:, c.perm.long()]
    exact = torch.zeros(c.m, c.n, dtype=torch.float64)
    acc = torch.zeros(c.m, c.n, dtype=torch.float64)
    if c.k2:
        w2 = formats.dequantize_lut(c.qw2, c.cb2, 2, c.g).double()
        sub = Case("linear", fmt="lut2", g=c.g, k=c.k2, x_full=xp[:, : c.k2], bias=None, tables=(c.cb2,))
        exact += xp[:, : c.k2].double() @ w2.T
        acc += _linear_tolerance(sub, w2, splits + 1)
    if c.k1:
        w1 = formats.dequantize_lut(c.qw1, c.cb1, 1, c.g).double()
        sub = Case("tc", fmt="lut1", g=c.g, k=c.k1, x_full=xp[:, c.k2:], bias=None, tables=(c.cb1,))
        exact += xp[:, c.k2:].double() @ w1.T
        acc += _tc_tolerance(sub, splits + 1)
    if c.bias is not None:
        exact += c.bias.double()
        acc += (c.k // 32 + 200 + splits) * 2.0 ** -24 * c.bias.double().abs()
    return exact, acc


def _compare(c, got, exact, acc, splits, vec4):
    """None when |got - exact| <= u_out (|exact| + acc) + acc + tiny everywhere, else a message."""
    tol = U_OUT[c.out_dtype] * (exact.abs() + acc) + acc + TINY[c.out_dtype]
    err = (got - exact).abs()
    bad = ~(err <= tol)   # NaN (an output never written) counts as bad
    if bad.any():
        i, j = [int(v) for v in bad.nonzero()[0]]
        return (f"{int(bad.sum())} of {c.m * c.n} outputs out of tolerance (splits={splits}, vec4={vec4}); "
                f"first y[{i},{j}] = {float(got[i, j])!r}, exact {float(exact[i, j])!r}, tol {float(tol[i, j]):.3g}")
    return None


def _instantiations():
    """Every kernel instantiation csrc/cuda/ compiles, as the demangled names launched_kernels() prints."""
    names = set()
    for t in ("__half", "__nv_bfloat16", "float"):
        for bits in (1, 2, 4):
            for mt in (1, 2, 4, 8, 16):
                for vec in (4, 1):
                    names.add(f"bivlm::detail::gemv_kernel<{t}, {bits}, {mt}, {vec}>")
            names.add(f"bivlm::detail::dequantize_kernel<{t}, {bits}>")
        names.add(f"bivlm::detail::splitk_reduce_kernel<{t}>")
    for t in ("__half", "__nv_bfloat16"):
        for mt in (1, 2, 4, 8, 16):
            for g in (64, 128):
                names.add(f"bivlm::detail::gemv_tc_b1_kernel<{t}, {mt}, {g}>")
                names.add(f"bivlm::detail::gemv_tc_kernel<{t}, 4, {mt}, {g}>")
                names.add(f"bivlm::detail::gemv_tc_b2_kernel<{t}, {mt}, {g}>")
                names.add(f"bivlm::detail::gemv_tc_seg_kernel<{t}, {mt}, {g}>")
    return names


def test_kernels_against_reference(driver, tmp_path):
    """The grid and >= 300 fuzz cases in one sanitized run; every instantiated kernel launched; 0 mismatches."""
    gen = torch.Generator().manual_seed(SEED)
    grid = grid_cases(gen) + tc_grid_cases(gen) + seg_grid_cases(gen)
    fuzz = fuzz_cases(gen, FUZZ_CASES) + tc_fuzz_cases(gen, FUZZ_CASES // 4) + seg_fuzz_cases(gen, FUZZ_CASES // 8)
    cases = grid + fuzz
    results, kernels, stdout = _run_cases(driver, cases, tmp_path)
    mismatches = []
    for c, res in zip(cases, results):
        msg = _check(c, res)
        if msg is not None:
            mismatches.append(f"{c.describe()}: {msg}")
    launched = {re.sub(r"^void |\(.*$", "", line.split(" ", 1)[1]) for line in kernels}
    missing = sorted(_instantiations() - launched)
    # Every __global__ in csrc/cuda/ must be launched by some case: a kernel added without host coverage fails here.
    declared = set()
    for f in list(SRC.glob("*.cu")) + list(SRC.glob("*.cuh")):
        declared |= set(re.findall(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)?(\w+)", f.read_text()))
    uncovered = sorted(k for k in declared if not any(f"::{k}<" in n or n.endswith(f"::{k}") for n in launched))
    paths = {"split-K": sum(1 for c, r in zip(cases, results) if c.op == "linear" and r[2] > 1),
             "tensor-core split-K": sum(1 for c, r in zip(cases, results) if c.op == "tc" and r[2] > 1),
             "segmented split-K": sum(1 for c, r in zip(cases, results) if c.op == "seg" and r[2] > 1),
             "4-byte loads": sum(1 for c, r in zip(cases, results) if c.op == "linear" and not r[3]),
             "strided x": sum(1 for c in cases if c.op == "linear" and c.ldx > c.k),
             "bias": sum(1 for c in cases if c.op == "linear" and c.bias is not None),
             "out dtype != x dtype": sum(1 for c in cases if c.op == "linear" and c.out_dtype != c.dtype)}
    by_op = {op: sum(1 for c in cases if c.op == op) for op in ("linear", "tc", "seg", "dequantize", "reduce")}
    print(f"\ncuda host build: {len(cases)} cases ({len(grid)} grid + {len(fuzz)} fuzz, seed {SEED}; "
          + ", ".join(f"{k} {v}" for k, v in by_op.items()) + "; linear paths: "
          + ", ".join(f"{k} {v}" for k, v in paths.items()) + f"), {len(launched)} kernel instantiations, "
          f"{len(mismatches)} mismatches, 0 sanitizer reports")
    assert not mismatches, f"{len(mismatches)} mismatches (seed {SEED}):\n" + "\n".join(mismatches[:20])
    assert not missing, f"instantiated kernels never launched: {missing}"
    assert not uncovered, f"kernels in csrc/cuda/ without host-build coverage: {uncovered}"
