"""Static SASS budget of the segmented kernel (``csrc/cuda/gemv_tc_seg.cuh``: the sub-2-bit layout in one launch), for
``benchmarks/sass_budget.py``: its rows, their limit at a salient share f, and the ``--check`` failures.

A module of its own because the fused kernel is not measured as one loop: each of its loops is found and counted
separately (with ``sass_parse`` and the tensor-core rows of ``sass_build``) and combined by the share f.

The kernel has three kinds of loop, found in each instantiation's SASS by content:

* the gather (holds 2-byte x loads ``LDG.E.U16`` and shared stores): per iteration 4 columns per perm load
  (``LDG.E.128``) for MT rows; its cost per weight is the loop's instructions per column over the 512 rows of a
  block (the largest of the gather loops: the unrolled one and its remainder, of both slices; static: the
  identity-perm branch counts too);
* the 2-bit body's main loop (streaming weight loads, more PRMT than LOP3): as the 2-bit tensor-core rows
  (``sass_build.tc_rows``);
* the 1-bit body's main loop (streaming weight loads, more LOP3 than PRMT): as the 1-bit rows (slot-block
  epilogues counted as they execute).

For a salient share f of the columns (the 2-bit segment; BiLLM / Bi-VLM's example K / 16):

    instr/w = (1 - f) ipw_1 + f ipw_2 + gather          limit = 1.1 ((1 - f) budget_1 + f budget_2)

(the issue's "within 10 % of the 1-bit budget plus its 2-bit share"), and the memory ceiling counts the bits the
kernel streams: (1 - f)(1 + 64 / g) + f (2 + 64 / g) + 32 / N (the int32 perm). Not counted (as for every row):
the work outside the loops -- the 1-bit body's S / V prologue and table product, the stores, the barrier.
"""
from __future__ import annotations

import collections
import os
import re
from typing import List, Tuple

from sass_build import _DT, ROOT, _run, compile_cubin, parse_ptxas, tc_rows
from sass_model import GPUS, SHAPE, budget
from sass_parse import is_weight_load, parse_sass

SHARES = (1 / 16, 1 / 8)
ROWS_PER_BLOCK = 512          # csrc/cuda/bivlm_kernels.h kTcSegThreads / 32 warps x 4 m16 tiles x 16 rows
_SEG = re.compile(r"gemv_tc_seg_kernelI(6__half|13__nv_bfloat16)Li(\d+)ELi(\d+)E")   # <T, MT, G>


def _loops(instrs):
    index = {ins.addr: i for i, ins in enumerate(instrs)}
    for i, ins in enumerate(instrs):
        t = ins.branch_target()
        if t is not None and t < ins.addr and t in index:
            yield index[t], i


def seg_row(name, m, instrs, props, arch) -> dict:
    dt, mt, g = _DT[m.group(1)], int(m.group(2)), int(m.group(3))
    gather, body = [], {}
    for lo, hi in _loops(instrs):
        span = instrs[lo:hi + 1]
        mix = collections.Counter(i.base for i in span)
        if any(i.base == "LDG" and ".U16" in i.op for i in span) and mix["STS"]:
            perm_loads = sum(1 for i in span if i.base == "LDG" and ".128" in i.op)
            if perm_loads:
                gather.append(len(span) / (4 * perm_loads))
        elif any(is_weight_load(i) for i in span):
            kind = 2 if mix["PRMT"] > mix["LOP3"] else 1
            if kind not in body or hi - lo > body[kind][1] - body[kind][0]:
                body[kind] = (lo, hi)
    ipw = {}
    for bits, (lo, hi) in body.items():   # that loop alone, measured as the plain kernels' rows are (m: <T, MT, G>)
        ipw[bits] = tc_rows(name, m, instrs[lo:hi + 1], props, arch, fixed_bits=bits)[0]["ipw"]
    p = props.get(name, {})
    return dict(arch=arch, dtype=dt, m=mt, g=g, kernel=name, ipw1=ipw.get(1, float("nan")),
                ipw2=ipw.get(2, float("nan")), gather=max(gather) / ROWS_PER_BLOCK if gather else float("nan"),
                registers=p.get("registers"), spill=p.get("spill_stores", 0) + p.get("spill_loads", 0),
                local_ops=sum(1 for i in instrs if i.base in ("LDL", "STL")))


def seg_rows(arch: int, cache: str, nvcc: str, cuobjdump: str) -> List[dict]:
    cubin, log = compile_cubin(os.path.join(ROOT, "csrc", "cuda", "gemv_tc_seg.cu"), arch, cache, nvcc)
    props = parse_ptxas(log)
    rows = []
    for name, instrs in sorted(parse_sass(_run([cuobjdump, "-sass", cubin]).stdout).items()):
        m = _SEG.search(name)
        if m:
            rows.append(seg_row(name, m, instrs, props, arch))
    return rows


def combined(r: dict, f: float, clock: float) -> Tuple[float, float]:
    """(instr/w, limit) at salient share f."""
    ipw = (1 - f) * r["ipw1"] + f * r["ipw2"] + r["gather"]
    lim = 1.1 * ((1 - f) * budget(1, r["g"], GPUS["H200"], clock) + f * budget(2, r["g"], GPUS["H200"], clock))
    return ipw, lim


def stream_bpw(f: float, g: int, n: int = SHAPE[0]) -> float:
    return (1 - f) * (1 + 64 / g) + f * (2 + 64 / g) + 32 / n


def failures(rows: List[dict], clock: float) -> List[str]:
    bad = []
    for r in rows:
        tag = f"cuda-seg sm_{r['arch']} {r['dtype']} M={r['m']} g={r['g']}"
        if r["spill"] or r["local_ops"]:
            bad.append(f"{tag}: spills ({r['spill']} bytes, {r['local_ops']} LDL/STL)")
        if r["arch"] != 90:
            continue
        if any(v != v for v in (r["ipw1"], r["ipw2"], r["gather"])):
            bad.append(f"{tag}: a loop was not found (1-bit {r['ipw1']}, 2-bit {r['ipw2']}, gather {r['gather']})")
            continue
        for f in SHARES:
            ipw, lim = combined(r, f, clock)
            if ipw > lim:
                bad.append(f"{tag} f={f:g}: {ipw:.3f} instructions per weight > {lim:.3f}")
    return bad
