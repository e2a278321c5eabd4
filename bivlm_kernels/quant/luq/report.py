"""LUQ step 3: what the assembled model holds, per decoder layer (bits, bytes, error), and the merged report.

:func:`block_bits` measures one decoder layer's Linear weights (honest bytes of every buffer and nominal code
bits); :class:`LUQReport` is what :func:`~bivlm_kernels.quant.luq.luq_quantize` returns beside the model; the
driver's per-Linear rows of the two runs are merged into one ``QuantReport`` for ``save_quantized``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Sequence

import torch
from torch import nn

from ...nn import QuantLinear
from ..report import QuantReport


def _linears(block: nn.Module) -> List[nn.Module]:
    return [m for m in block.modules() if isinstance(m, (nn.Linear, QuantLinear))]


def block_bits(block: nn.Module) -> dict:
    """Weights, honest bytes and nominal code bits of one decoder layer's Linear weights (bias excluded).

    A layer left as ``nn.Linear`` counts at its storage dtype (16 or 32 bits) in both columns.
    ``bytes_fp16`` / ``honest_bits_fp16``: the same layout with fp16 codebooks / scales (what the layer takes
    after ``.half()``), for models quantized in fp32.
    """
    n_w, nbytes, nbytes16, nominal = 0, 0.0, 0.0, 0.0
    for m in _linears(block):
        w = m.out_features * m.in_features
        n_w += w
        if isinstance(m, QuantLinear):
            nbytes += m.weight_bits * w / 8
            nbytes16 += m.spec.bits_per_weight(torch.float16) * w / 8
            nominal += m.spec.nominal_bits * w
        else:
            eb = m.weight.element_size() * 8
            nbytes += eb * w / 8
            nbytes16 += min(eb, 16) * w / 8
            nominal += eb * w
    n = max(n_w, 1)
    return {"weights": n_w, "bytes": nbytes, "honest_bits": nbytes * 8 / n, "nominal_bits": nominal / n,
            "bytes_fp16": nbytes16, "honest_bits_fp16": nbytes16 * 8 / n}


@dataclass
class LUQLayer:
    index: int
    name: str
    entropy: float
    rank: int                 # position in the ascending-entropy order
    setting: str              # "low" or "high"
    method: str
    honest_bits: float
    nominal_bits: float
    weights: int
    bytes: float
    rel_error: float          # mean relative output error of the layer's Linears (driver report); nan if unknown


@dataclass
class LUQReport:
    layers: List[LUQLayer]
    k: int                    # layers at ultra-low bits
    order: List[int]
    assembly: str
    entropy: dict             # LayerEntropies.to_dict()
    target: dict              # the budget / threshold used
    selection: dict = field(default_factory=dict)   # quality evaluations {k: value}
    quant_reports: dict = field(default_factory=dict)  # {"high": QuantReport, "low": QuantReport} or {"mixed": ...}
    model_bytes: int = 0      # the whole assembled model (parameters + buffers, tied tensors once)

    @property
    def weights(self) -> int:
        return sum(r.weights for r in self.layers)

    @property
    def bytes(self) -> float:
        return sum(r.bytes for r in self.layers)

    @property
    def average_bits(self) -> float:
        """Honest bits per weight over the LLM decoder Linear weights."""
        return self.bytes * 8 / self.weights

    @property
    def average_nominal_bits(self) -> float:
        return sum(r.nominal_bits * r.weights for r in self.layers) / self.weights

    def summary(self) -> dict:
        return {"k": self.k, "n_layers": len(self.layers), "assembly": self.assembly,
                "average_bits": self.average_bits, "average_nominal_bits": self.average_nominal_bits,
                "bytes": self.bytes, "weights": self.weights, "model_bytes": self.model_bytes,
                **{f"target_{k}": v for k, v in self.target.items()}}

    def table(self) -> str:
        head = (f"{'layer':>5} {'entropy':>8} {'rank':>5} {'set':>4} {'method':<8} {'bits':>5} {'bpw':>6} "
                f"{'rel.err':>8}  name")
        lines = [head, "-" * len(head)]
        for r in self.layers:
            lines.append(f"{r.index:>5} {r.entropy:>8.4f} {r.rank:>5} {r.setting:>4} {r.method:<8} "
                         f"{r.nominal_bits:>5.2f} {r.honest_bits:>6.3f} {r.rel_error:>8.4f}  {r.name}")
        lines.append("-" * len(head))
        lines.append(f"LUQ ({self.assembly}): {self.k}/{len(self.layers)} layers ultra-low; LLM decoder Linear "
                     f"weights: {self.average_bits:.3f} bits/weight honest ({self.average_nominal_bits:.3f} nominal), "
                     f"{self.bytes / 2**20:.2f} MiB; whole model {self.model_bytes / 2**20:.2f} MiB")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def to_dict(self) -> dict:
        def clean(v):
            return None if isinstance(v, float) and not math.isfinite(v) else v
        return {"summary": self.summary(), "order": list(self.order), "entropy": self.entropy,
                "target": dict(self.target), "selection": {str(k): v for k, v in self.selection.items()},
                "layers": [{k: clean(v) for k, v in r.__dict__.items()} for r in self.layers]}


def _errors_by_block(report, names: Sequence[str]) -> List[float]:
    """Mean ``rel_error`` of the driver's per-Linear report rows, grouped by decoder layer."""
    errs = [[] for _ in names]
    if report is None:
        return [float("nan")] * len(names)
    prefixes = [n + "." for n in names]
    for r in getattr(report, "layers", []):
        for i, p in enumerate(prefixes):
            if r.name.startswith(p):
                errs[i].append(float(r.rel_error))
                break
    return [sum(e) / len(e) if e else float("nan") for e in errs]


def _merged_report(quant_reports: dict, names: Sequence[str], low_set: set):
    """One driver ``QuantReport`` for the assembled model: low-run rows for the low layers, high-run rows
    for everything else (``mixed`` is already one)."""
    if "mixed" in quant_reports:
        return quant_reports["mixed"]
    high, low = quant_reports.get("high"), quant_reports.get("low")
    if high is None or low is None:
        return None
    low_prefixes = tuple(names[i] + "." for i in sorted(low_set))
    rows = [r for r in high.layers if not (low_prefixes and r.name.startswith(low_prefixes))]
    rows += [r for r in low.layers if low_prefixes and r.name.startswith(low_prefixes)]
    pos = {n: i for i, n in enumerate(r.name for r in high.layers)}
    rows.sort(key=lambda r: pos.get(r.name, len(pos)))
    return QuantReport(rows, list(high.skipped), high.model_bytes_before, 0, high.seconds + low.seconds)
