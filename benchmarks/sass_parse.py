"""SASS parsing for the static budget (``sass_budget.py``): ``cuobjdump -sass`` text -> instructions per function,
the main loop (the longest backward branch), and the counts over it.

Separate from the compilers (``sass_build.py``) so that it runs, and is tested, on any listing without nvcc; the
rules (which blocks count, how loads are told apart) are explained in the docstring of ``sass_budget.py``.
"""
from __future__ import annotations

import collections
import dataclasses
import re
from typing import Dict, List, Optional, Tuple


@dataclasses.dataclass
class Instr:
    addr: int
    pred: str          # "" or "@P0", "@!UP1", ...
    op: str            # full opcode with modifiers, e.g. "LDG.E.EF.128"
    args: str

    @property
    def base(self) -> str:
        return self.op.split(".")[0]

    def branch_target(self) -> Optional[int]:
        if self.base != "BRA":
            return None
        m = re.search(r"(0x[0-9a-f]+)\s*$", self.args.strip())
        return int(m.group(1), 16) if m else None


_FUNC = re.compile(r"^\s*Function\s*:\s*(\S+)")
_INSTR = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


def parse_sass(text: str) -> Dict[str, List[Instr]]:
    """``cuobjdump -sass`` text -> {function name: instructions in address order}."""
    funcs: Dict[str, List[Instr]] = {}
    cur: Optional[List[Instr]] = None
    for line in text.splitlines():
        f = _FUNC.match(line)
        if f:
            cur = funcs.setdefault(f.group(1), [])
            continue
        m = _INSTR.match(line)
        if m and cur is not None:
            cur.append(Instr(int(m.group(1), 16), (m.group(2) or "").strip(), m.group(3), m.group(4).strip()))
    return funcs


def find_loop(instrs: List[Instr]) -> Optional[Tuple[int, int]]:
    """Indices (first, last) of the longest backward-branch loop, or None. The branch is the last instruction."""
    index = {ins.addr: i for i, ins in enumerate(instrs)}
    best = None
    for i, ins in enumerate(instrs):
        t = ins.branch_target()
        if t is not None and t < ins.addr and t in index:
            if best is None or i - index[t] > best[1] - best[0]:
                best = (index[t], i)
    return best


FMA_OPS = ("FFMA", "HFMA2", "HMMA", "IMMA", "HGMMA", "DFMA")


def is_weight_load(ins: Instr) -> bool:
    """Streaming global load (``ld.global.cs`` / ``__ldcs`` -> ``LDG.E.EF``): how the kernels read qweight."""
    return ins.base == "LDG" and ".EF" in ins.op


def load_bytes(ins: Instr) -> int:
    for w in ("128", "64"):
        if f".{w}" in ins.op:
            return int(w) // 8
    return 2 if (".U16" in ins.op or ".S16" in ins.op) else 1 if (".U8" in ins.op or ".S8" in ins.op) else 4


def classify_region(body: List[Instr]) -> str:
    """What a block jumped over by a forward branch holds: 'prefetch', 'compute', 'reload' or 'other'."""
    if any(is_weight_load(i) for i in body):
        return "prefetch"
    if any(i.base == "FFMA" for i in body) and not any(i.base in ("HMMA", "HGMMA", "IMMA") for i in body):
        return "epilogue"     # the tensor-core GEMVs' slot-block epilogue (FFMAs into y, no mma)
    if any(i.base in FMA_OPS for i in body):
        return "compute"
    if any(i.base in ("LDG", "LD", "LDS", "LDC") for i in body):
        return "reload"
    return "other"


def loop_stats(instrs: List[Instr]) -> Optional[dict]:
    """Counts over the main loop: static total, opcode mix, weight-load bytes, conditional table reloads,
    inner backward branches; plus local-memory (spill) instructions of the whole function."""
    loop = find_loop(instrs)
    local = sum(1 for i in instrs if i.base in ("LDL", "STL"))
    if loop is None:
        return None
    lo, hi = loop
    body = instrs[lo:hi + 1]
    index = {ins.addr: i for i, ins in enumerate(instrs)}
    reload_idx, epi_idx = set(), set()
    regions = collections.Counter()
    inner = 0
    for i in range(lo, hi):
        t = instrs[i].branch_target()
        if t is None or t not in index:
            continue
        j = index[t]
        if j <= i:
            inner += j >= lo
            continue
        if j > hi + 1 or not instrs[i].pred:  # leaves the loop, or an unconditional jump (else-branch)
            continue
        kind = classify_region(instrs[i + 1:j])
        regions[kind] += 1
        if kind == "reload":
            reload_idx.update(range(i + 1, j))
        if kind == "epilogue":
            epi_idx.update(range(i + 1, j))
    mix = collections.Counter(i.base for i in body)
    wl = [i for i in body if is_weight_load(i)]
    return {"static": len(body), "reload": len(reload_idx), "reload_regions": regions["reload"],
            "epilogue": len(epi_idx), "epilogue_regions": regions["epilogue"],
            "regions": dict(regions), "weight_loads": len(wl), "weight_bytes": sum(load_bytes(i) for i in wl),
            "inner_loops": inner, "local_ops": local, "mix": dict(mix.most_common())}
