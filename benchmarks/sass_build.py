"""Compilation and measurement rows of the static SASS budget (``sass_budget.py``): finds nvcc and cuobjdump,
compiles the CUDA TUs (``nvcc -cubin``, cached) and the Triton kernels (``triton.compile`` for a ``GPUTarget``),
and turns each kernel's main loop into a row: the CUDA-core GEMV, the tensor-core kernels and Triton.

Everything that knows a kernel (its name pattern, its weights per iteration, which of its blocks run) lives here,
next to the compiler calls that produce it; the counting itself is ``sass_parse.py``, the budget ``sass_model.py``.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from typing import Dict, List, Optional, Tuple

from sass_model import BITS, DTYPES, GROUPS, MS, SHAPE, WARP
from sass_parse import loop_stats, parse_sass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

NVCC_FLAGS = ["-O3", "-std=c++17", "--expt-relaxed-constexpr"]
PIP_HINT = "pip install nvidia-cuda-cuobjdump   (or install a CUDA toolkit / triton, whose wheel ships cuobjdump)"


# ---- tools ---------------------------------------------------------------------------------------------------------
def find_cuobjdump() -> Optional[str]:
    cands = [shutil.which("cuobjdump")]
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home:
            cands.append(os.path.join(home, "bin", "cuobjdump"))
    try:
        import triton
        cands.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    except ImportError:
        pass
    try:
        import nvidia.cuda_cuobjdump as pkg  # pip install nvidia-cuda-cuobjdump
        cands.append(os.path.join(list(pkg.__path__)[0], "bin", "cuobjdump"))
    except ImportError:
        pass
    return next((c for c in cands if c and os.path.isfile(c) and os.access(c, os.X_OK)), None)


def find_nvcc() -> Optional[str]:
    cands = [shutil.which("nvcc")] + [os.path.join(h, "bin", "nvcc") for h in
                                      (os.environ.get("CUDA_HOME"), "/usr/local/cuda") if h]
    return next((c for c in cands if c and os.path.isfile(c)), None)


def tool_version(path: str) -> str:
    out = subprocess.run([path, "--version"], capture_output=True, text=True).stdout.strip().splitlines()
    return next((line for line in out if "release" in line), out[-1] if out else "?").strip()


def _run(cmd: List[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


# ---- CUDA ------------------------------------------------------------------------------------------------------------
_GEMV = re.compile(r"gemv_kernelI(6__half|13__nv_bfloat16|f)Li(\d+)ELi(\d+)ELi(\d+)E")
_DT = {"6__half": "fp16", "13__nv_bfloat16": "bf16", "f": "fp32"}
_TC = re.compile(r"gemv_tc_kernelI(6__half|13__nv_bfloat16)Li(\d+)ELi(\d+)ELi(\d+)E")     # <T, BITS, MT, G>
_TC1 = re.compile(r"gemv_tc_b1_kernelI(6__half|13__nv_bfloat16)Li(\d+)ELi(\d+)E")           # <T, MT, G>
_TC2 = re.compile(r"gemv_tc_b2_kernelI(6__half|13__nv_bfloat16)Li(\d+)ELi(\d+)E")           # <T, MT, G>


def tc_shape(mt: int, bits: int) -> Tuple[int, int, int]:
    """(n8 tiles, group slots S, m16 tiles per warp R) of the slot-block kernels for bucket MT: 1 bit
    gemv_tc_b1_kernel (gemv_tc1.cuh Tc1Shape), 4 bits gemv_tc_kernel (gemv_tc4.cuh; TcShape in gemv_tc_common.cuh)."""
    return (2 if mt > 8 else 1), (1 if mt >= 8 else 8 // mt), (2 if mt > 8 and bits == 4 else 4)


def tc_rows(name: str, m, instrs, props, arch: int, fixed_bits: int = 0) -> List[dict]:
    """One row for a tensor-core instantiation (g is a template argument). Each iteration of its loop decodes the
    streaming loads' 128 / bits weights per 16 bytes. The 1/4-bit kernel's slot-block epilogue (the forward-branch
    blocks that read S from shared memory) runs (chunks per iteration) x (256 / bits) / (S g) times per iteration,
    whatever the number of copies the unrolling made; ``static`` counts every copy once. The 2-bit kernel has no
    epilogue (executed = static)."""
    two_bit = fixed_bits == 2
    if fixed_bits:
        dt, bits, mt, g = _DT[m.group(1)], fixed_bits, int(m.group(2)), int(m.group(3))
    else:
        dt, bits, mt, g = _DT[m.group(1)], int(m.group(2)), int(m.group(3)), int(m.group(4))
    st = loop_stats(instrs)
    p = props.get(name, {})
    nt, slots, r_tiles = tc_shape(mt, bits)
    if two_bit:
        r_tiles, slots = 4, 1
    wpi = st["weight_bytes"] * 8 // bits if st else 0
    executed = float("nan")
    if st and wpi:
        chunk_k = 256 // bits
        chunks = wpi / (r_tiles * 128 / bits)
        runs = chunks * chunk_k / (slots * g) if slots * g >= chunk_k else 0.0   # below: unconditional
        per_copy = st["epilogue"] / st["epilogue_regions"] if st["epilogue_regions"] else 0.0
        executed = st["static"] - st["epilogue"] + runs * per_copy
    # The 1-bit repack streams D (fp32) and (c0, c1) per (row, group): 64 table bits, not the format's 32.
    stream_bpw = 1 + 64 / g if bits == 1 else None
    return [dict(path="cuda-tc", arch=arch, bits=bits, dtype=dt, m=mt, g=g, vec=4, kernel=name, stream_bpw=stream_bpw,
                 config=f"tc{bits}<{dt},{mt},{g}> R={r_tiles}" + ("" if two_bit else f" S={slots}"),
                 weights_per_iter=wpi or float("nan"),
                 unroll=1, static_ipw=st["static"] / wpi if wpi else float("nan"),
                 ipw=executed / wpi if wpi else float("nan"), registers=p.get("registers"), stack=p.get("stack", 0),
                 spill=p.get("spill_stores", 0) + p.get("spill_loads", 0),
                 local_ops=st["local_ops"] if st else 0, stats=st)]


def gemv_weights_per_iter(bits: int, mt: int, vec: int) -> int:
    """ROWS rows x VEC words x 32/BITS codes per thread per iteration of gemv_kernel's K loop."""
    rows = 4 if mt <= 2 else 2
    return rows * vec * 32 // bits


def gemv_reload_fraction(bits: int, g: int, vec: int) -> float:
    """Share of the VEC - 1 conditional table reloads of one chunk that run at group size g."""
    wpg = g * bits // 32
    if vec <= 1 or wpg >= vec:
        return 0.0
    return (vec // wpg - 1) / (vec - 1)


def compile_cubin(src: str, arch: int, cache: str, nvcc: str) -> Tuple[str, str]:
    """``nvcc -cubin`` of one .cu (including csrc/) for sm_<arch>, cached by the sources, flags and nvcc version;
    returns (cubin path, ``-Xptxas -v`` log)."""
    csrc = os.path.join(ROOT, "csrc", "cuda")
    cmd = [nvcc, "-cubin", *NVCC_FLAGS, "-I" + csrc, f"-arch=sm_{arch}", "-Xptxas", "-v"]
    h = hashlib.sha256(" ".join(cmd[1:]).encode() + tool_version(nvcc).encode())
    with open(src, "rb") as f:
        h.update(f.read())
    for name in sorted(os.listdir(csrc)):
        if name.endswith((".cuh", ".h")):
            with open(os.path.join(csrc, name), "rb") as f:
                h.update(name.encode() + f.read())
    stem = os.path.splitext(os.path.basename(src))[0]
    base = os.path.join(cache, f"{stem}_sm{arch}_{h.hexdigest()[:16]}")
    if not os.path.isfile(base + ".cubin"):
        os.makedirs(cache, exist_ok=True)
        print(f"  nvcc {os.path.basename(src)} sm_{arch} ...", file=sys.stderr, flush=True)
        r = _run(["nice", "-n", "10", *cmd, "-o", base + ".cubin.partial", src])
        if r.returncode != 0:
            raise RuntimeError(f"nvcc failed on {src} (sm_{arch}):\n{r.stderr[-3000:]}")
        with open(base + ".ptxas.log", "w") as f:
            f.write(r.stderr)
        os.replace(base + ".cubin.partial", base + ".cubin")
    with open(base + ".ptxas.log") as f:
        return base + ".cubin", f.read()


def parse_ptxas(log: str) -> Dict[str, dict]:
    """``-Xptxas -v`` -> {function: {registers, stack, spill_stores, spill_loads}}."""
    out: Dict[str, dict] = {}
    cur = None
    for line in log.splitlines():
        m = re.search(r"Function properties for (\S+)", line) or re.search(r"Compiling entry function '(\S+)'", line)
        if m:
            cur = out.setdefault(m.group(1), {})
            continue
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            cur.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            cur["registers"] = int(m.group(1))
    return out


def cuda_sources(bits: int) -> List[str]:
    """The TUs of one bit width: csrc/cuda/gemv_b{bits}.cu and any other csrc/cuda/*_b{bits}.cu a later kernel adds."""
    import glob
    return sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", f"*_b{bits}.cu")))


def cuda_rows(arch: int, cache: str, nvcc: str, cuobjdump: str) -> Tuple[List[dict], List[str]]:
    """One row per (bits, dtype, MT, g) of the VEC = 4 GEMV; plus the names of kernels nobody measures."""
    rows, unmeasured = [], []
    for bits in BITS:
        for src in cuda_sources(bits):
            cubin, log = compile_cubin(src, arch, cache, nvcc)
            r, u = measure_cubin(cubin, log, cuobjdump, arch)
            rows += [x for x in r if x["dtype"] in DTYPES and x["vec"] == 4 and x["m"] in MS]
            unmeasured += u
    return rows, sorted(set(unmeasured))


def measure_cubin(cubin: str, ptxas_log: str, cuobjdump: str, arch: int) -> Tuple[List[dict], List[str]]:
    """Rows (one per g in GROUPS) for every gemv_kernel instantiation in a cubin; names of the other kernels."""
    rows, unmeasured = [], []
    props = parse_ptxas(ptxas_log)
    funcs = parse_sass(_run([cuobjdump, "-sass", cubin]).stdout)
    for name, instrs in sorted(funcs.items()):
        tc = _TC.search(name)
        if tc:
            rows += tc_rows(name, tc, instrs, props, arch)
            continue
        tc1 = _TC1.search(name)
        if tc1:
            rows += tc_rows(name, tc1, instrs, props, arch, fixed_bits=1)
            continue
        tc2 = _TC2.search(name)
        if tc2:
            rows += tc_rows(name, tc2, instrs, props, arch, fixed_bits=2)
            continue
        m = _GEMV.search(name)
        if not m:
            unmeasured.append(name)
            continue
        dt, b, mt, vec = _DT[m.group(1)], int(m.group(2)), int(m.group(3)), int(m.group(4))
        st = loop_stats(instrs)
        p = props.get(name, {})
        formula = gemv_weights_per_iter(b, mt, vec)
        from_sass = st["weight_bytes"] * 8 // b if st else 0
        wpi = from_sass or formula
        for g in GROUPS:
            executed = st["static"] - (1 - gemv_reload_fraction(b, g, vec)) * st["reload"] if st else float("nan")
            rows.append(dict(path="cuda", arch=arch, bits=b, dtype=dt, m=mt, g=g, vec=vec, kernel=name,
                             config=f"gemv<{dt},{b},{mt},{vec}> ROWS={4 if mt <= 2 else 2}",
                             weights_per_iter=wpi, unroll=(from_sass / formula) if formula else 0,
                             static_ipw=st["static"] / wpi if st else float("nan"),
                             ipw=executed / wpi, registers=p.get("registers"), stack=p.get("stack", 0),
                             spill=p.get("spill_stores", 0) + p.get("spill_loads", 0),
                             local_ops=st["local_ops"] if st else 0, stats=st))
    return rows, unmeasured


# ---- Triton -------------------------------------------------------------------------------------------------------
def triton_rows(arch: int, cache: str) -> List[dict]:
    import torch
    import triton
    from bivlm_kernels.backends.triton import offline
    from bivlm_kernels.backends.triton.autotune import default_config
    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16}
    h = hashlib.sha256(triton.__version__.encode())
    for name in ("kernels.py", "kernel_tc.py"):
        with open(os.path.join(ROOT, "bivlm_kernels", "triton", name), "rb") as f:
            h.update(f.read())
    src_hash = h.hexdigest()[:16]
    rows = []
    n, k = SHAPE
    for bits in BITS:
        for dt in DTYPES:
            for m in MS:
                for g in GROUPS:
                    cfg = default_config((bits <= 2, bits, g, dtypes[dt], n, k, m))
                    if cfg.kernel == "dense":
                        continue
                    key = hashlib.sha256(f"{src_hash} {arch} {bits} {dt} {g} {cfg}".encode()).hexdigest()[:16]
                    path = os.path.join(cache, f"triton_{key}.json")
                    if os.path.isfile(path):
                        with open(path) as f:
                            info = json.load(f)
                    else:
                        print(f"  triton {cfg.kernel} bits={bits} {dt} M={m} g={g} sm_{arch} ...", file=sys.stderr,
                              flush=True)
                        ck = offline.compile_linear(cfg, bits, dtypes[dt], group_size=g, arch=arch)
                        info = offline.inspect(ck)
                        cubin = os.path.join(cache, f"triton_{key}.cubin")
                        with open(cubin, "wb") as f:
                            f.write(ck.asm["cubin"])
                        sass = _run([offline._tool("cuobjdump"), "-sass", cubin]).stdout
                        fn = next(iter(parse_sass(sass).values()), [])
                        info["local_ops"] = sum(1 for i in fn if i.base in ("LDL", "STL"))
                        os.makedirs(cache, exist_ok=True)
                        with open(path, "w") as f:
                            json.dump(info, f)
                    wpi = cfg.block_n * cfg.block_k / (WARP * cfg.num_warps)
                    ipw = info["loop_instructions"] / wpi
                    rows.append(dict(path="triton", arch=arch, bits=bits, dtype=dt, m=m, g=g,
                                     config=f"{cfg.kernel} {cfg.block_m}x{cfg.block_n}x{cfg.block_k} "
                                            f"s{cfg.split_k} w{cfg.num_warps} st{cfg.num_stages}",
                                     weights_per_iter=wpi, unroll=1.0, static_ipw=ipw, ipw=ipw,
                                     registers=info["registers"], stack=info["stack"], spill=None,
                                     local_ops=info["local_ops"], stats={"mix": info["loop_mix"]}))
    return rows
