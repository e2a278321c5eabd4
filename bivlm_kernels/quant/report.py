"""Per-layer and whole-model report of a quantization run (what ``quantize_model`` returns beside the model).

Every number of bits here is honest: ``weight_bits`` counts all packed buffers of the layer (codes, codebooks,
scales, zeros, permutation), exactly as :attr:`bivlm_kernels.nn.QuantLinear.weight_bits`; ``nominal_bits`` (code
bits only, what papers call "1-bit") stands beside it.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import List, Optional

from torch import nn


@dataclass
class LayerReport:
    name: str                 # full module name, e.g. "model.language_model.layers.0.self_attn.q_proj"
    component: str            # "vision", "projector" or "language"
    method: str
    out_features: int
    in_features: int
    group_size: int
    nominal_bits: float       # code bits per weight
    weight_bits: float        # honest bits per weight (all buffers but the bias)
    rel_error: float          # ||X W^T - X What^T|| / ||X W^T|| on the calibration inputs of this layer
    seconds: float
    bytes_before: int         # the original weight's bytes (its dtype)
    bytes_after: int          # packed buffers' bytes (bias excluded on both sides)
    n_tokens: int = 0         # calibration rows the layer's Hessian saw
    group_size_asked: Optional[int] = None   # the configured group size, when it did not divide in_features


@dataclass
class QuantReport:
    layers: List[LayerReport] = field(default_factory=list)
    skipped: List[str] = field(default_factory=list)    # layers kept in full precision, with the reason
    model_bytes_before: int = 0
    model_bytes_after: int = 0
    seconds: float = 0.0

    # ------------------------------------------------------------------ summary numbers
    @property
    def n_weights(self) -> int:
        return sum(r.out_features * r.in_features for r in self.layers)

    @property
    def bytes_before(self) -> int:
        return sum(r.bytes_before for r in self.layers)

    @property
    def bytes_after(self) -> int:
        return sum(r.bytes_after for r in self.layers)

    @property
    def average_bits(self) -> float:
        """Honest bits per weight over all quantized layers (weighted by their size)."""
        return self.bytes_after * 8 / self.n_weights if self.n_weights else float("nan")

    def summary(self) -> dict:
        return {"layers": len(self.layers), "skipped": len(self.skipped), "weights": self.n_weights,
                "bytes_before": self.bytes_before, "bytes_after": self.bytes_after,
                "average_bits": self.average_bits, "model_bytes_before": self.model_bytes_before,
                "model_bytes_after": self.model_bytes_after, "seconds": self.seconds}

    # ------------------------------------------------------------------ output
    def table(self) -> str:
        """A fixed-width table: one row per layer, then the totals."""
        head = f"{'layer':<58} {'method':<8} {'shape':>11} {'g':>4} {'bits':>5} {'bpw':>6} {'rel.err':>8} {'s':>6}"
        lines = [head, "-" * len(head)]
        for r in self.layers:
            name = r.name if len(r.name) <= 58 else "..." + r.name[-55:]
            lines.append(f"{name:<58} {r.method:<8} {f'{r.out_features}x{r.in_features}':>11} {r.group_size:>4} "
                         f"{r.nominal_bits:>5.2f} {r.weight_bits:>6.3f} {r.rel_error:>8.4f} {r.seconds:>6.2f}")
        lines.append("-" * len(head))
        s = self.summary()
        mean_err = (sum(r.rel_error for r in self.layers) / len(self.layers)) if self.layers else float("nan")
        lines.append(f"{len(self.layers)} layers quantized, {len(self.skipped)} kept in full precision; "
                     f"average {s['average_bits']:.3f} bits/weight (honest), mean rel. error {mean_err:.4f}")
        lines.append(f"quantized layers: {_mb(s['bytes_before'])} -> {_mb(s['bytes_after'])}; whole model: "
                     f"{_mb(s['model_bytes_before'])} -> {_mb(s['model_bytes_after'])}; {s['seconds']:.1f} s")
        lines += self.group_size_notes()
        return "\n".join(lines)

    def group_size_notes(self) -> List[str]:
        """One line per (asked, used) group size pair where the asked one did not divide ``in_features``."""
        changed = {}                             # (asked, used) -> in_features of each such layer
        for r in self.layers:
            if r.group_size_asked not in (None, r.group_size):
                changed.setdefault((r.group_size_asked, r.group_size), []).append(r.in_features)
        return [f"group size {asked} asked, {used} used for {len(ks)} layer{'s' if len(ks) > 1 else ''} "
                f"(in_features {', '.join(map(str, sorted(set(ks))))}: not a multiple of {asked})"
                for (asked, used), ks in sorted(changed.items())]

    def __str__(self) -> str:
        return self.table()

    def to_dict(self) -> dict:
        return {"layers": [_clean(asdict(r)) for r in self.layers], "skipped": list(self.skipped),
                "summary": _clean(self.summary())}

    @classmethod
    def from_dict(cls, d: dict) -> "QuantReport":
        s = d.get("summary", {})
        return cls([LayerReport(**r) for r in d.get("layers", [])], list(d.get("skipped", [])),
                   int(s.get("model_bytes_before", 0)), int(s.get("model_bytes_after", 0)),
                   float(s.get("seconds", 0.0)))


def _mb(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def _clean(d: dict) -> dict:
    # JSON has no NaN: write None for a rel. error that could not be measured.
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


def module_bytes(m: nn.Module) -> int:
    """Bytes of every parameter and buffer of ``m``, tied tensors once (a report's ``model_bytes_*``)."""
    seen, n = set(), 0
    for t in list(m.parameters()) + list(m.buffers()):
        if t.data_ptr() not in seen:           # tied weights count once
            seen.add(t.data_ptr())
            n += t.numel() * t.element_size()
    return n
