"""LUQ: entropy-guided layerwise ultra-low-bit quantization (Bhatnagar et al., TMLR 2026; PAPERS.md §2).

Three steps, each usable on its own::

    ent = layer_entropies(model, calib)            # one entropy per LLM decoder layer + ascending order
    k = select_layers(ent.order, len(ent), bits_low=1.08, bits_high=4, target_avg_bits=2.54)
    model, report = luq_quantize(model, calib, target_avg_bits=2.54)   # entropy + selection + assembly

One submodule per step: :mod:`.entropy` (activations, K-means / histogram estimators, :class:`LayerEntropies`),
:mod:`.selection` (:func:`prefix_bits`, :func:`select_layers`), :mod:`.assembly` (the ``swap`` and
``sequential`` layouts, :class:`SwapPair`, the honest-bit probe, the driver configs) and :mod:`.report`
(:func:`block_bits`, :class:`LUQReport`). This module runs them in order (:func:`luq_quantize`) and re-exports
their public names, so ``bivlm_kernels.quant.luq.X`` works for all of them.

**Calibration mix** (``mix``): LUQ calibrates the PTQ methods on image+text samples mixed with ratio alpha
(:func:`~bivlm_kernels.quant.calibration.mix_calibration`, default 0.5). The entropy pass uses the multimodal
samples (all samples for a text-only model), as the paper does.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

from torch import nn

from ...models import decoder_layers
from ..calibration import mix_calibration
from ..config import ComponentConfig
from ..methods._common import check_choice
from ..report import module_bytes
from .assembly import (ASSEMBLIES, BUDGET_BITS, SwapPair, _component, _config, _probe_honest_bits,
                       _run_driver, assemble_swap, layer_override_pattern)
from .entropy import (ESTIMATORS, HOOKS, LayerEntropies, collect_activations, histogram_entropy, kmeans_entropy,
                      layer_entropies)
from .report import LUQLayer, LUQReport, _errors_by_block, _merged_report, block_bits
from .selection import prefix_bits, select_layers

log = logging.getLogger(__name__)

__all__ = ["luq_quantize", "layer_entropies", "collect_activations", "kmeans_entropy", "histogram_entropy",
           "LayerEntropies", "prefix_bits", "select_layers", "mix_calibration", "decoder_layers", "block_bits",
           "LUQLayer", "LUQReport", "assemble_swap", "SwapPair", "layer_override_pattern", "HOOKS",
           "ESTIMATORS", "ASSEMBLIES", "BUDGET_BITS"]


@dataclass
class _Plan:
    """What :func:`luq_quantize` was asked: the two settings, the driver's frame, and how ``k`` is chosen."""
    low: ComponentConfig
    high: ComponentConfig
    base_config: object
    progress: bool
    budget_bits: str
    n_low: Optional[int]
    target_avg_bits: Optional[float]
    target_bytes: Optional[float]
    quality_fn: Optional[Callable[[nn.Module], float]]
    threshold: Optional[float]
    higher_is_better: bool
    evaluations: dict = field(default_factory=dict)     # quality values seen, {k: value}

    def target(self) -> dict:
        """The budget / threshold used, as the report records it."""
        t = {k: v for k, v in (("avg_bits", self.target_avg_bits), ("bytes", self.target_bytes),
                               ("n_low", self.n_low), ("threshold", self.threshold)) if v is not None}
        t["budget_bits"] = self.budget_bits
        return t

    def low_overrides(self, names: Sequence[str], low_layers: Sequence[int]) -> dict:
        """Driver overrides that put decoder layers ``low_layers`` at the low setting."""
        return {layer_override_pattern(names[i]): {"method": self.low.method, "bits": self.low.bits,
                                                   "options": dict(self.low.options)} for i in low_layers}

    def choose_k(self, order: List[int], b_low, b_high, sizes, candidate: Callable[[int], nn.Module]) -> int:
        """``n_low``, or :func:`select_layers` with per-layer bits ``b_low`` / ``b_high``; the quality check
        runs ``quality_fn`` on ``candidate(k)``, the model with the first ``k`` layers of ``order`` low."""
        if self.n_low is not None:
            return self.n_low

        def quality_at(k: int) -> float:
            q = float(self.quality_fn(candidate(k)))
            self.evaluations[k] = q
            return q
        return select_layers(order, len(sizes), b_low, b_high, self.target_avg_bits, self.target_bytes,
                             quality_at if self.quality_fn else None, self.threshold, sizes, self.higher_is_better)


def _check_targets(assembly, budget_bits, n_low, target_avg_bits, target_bytes, quality_fn, threshold) -> None:
    """ValueError for an unknown assembly / budget kind, or a combination that does not say how to pick ``k``."""
    check_choice(assembly, "assembly", ASSEMBLIES)
    check_choice(budget_bits, "budget_bits", BUDGET_BITS)
    given = [x for x in (n_low, target_avg_bits, target_bytes) if x is not None]
    if n_low is not None and len(given) > 1:
        raise ValueError("n_low fixes k: do not combine it with target_avg_bits / target_bytes")
    if n_low is not None and quality_fn is not None:
        raise ValueError("n_low fixes k: do not combine it with quality_fn")
    if not given and quality_fn is None:
        raise ValueError("say how many layers go ultra-low: n_low, target_avg_bits, target_bytes or "
                         "quality_fn + threshold")
    if (quality_fn is None) != (threshold is None):
        raise ValueError("quality_fn and threshold go together: give both or neither")


def _entropy_order(model, calibration_data, entropy, entropy_data, n_layers: int, **kw) -> LayerEntropies:
    """``entropy`` if given, else :func:`layer_entropies` (keywords ``kw``) on ``entropy_data``, by default
    the multimodal samples of ``calibration_data`` (all of them for a text-only model)."""
    if entropy is None:
        ent_data = entropy_data
        if ent_data is None:
            mm = [s for s in calibration_data if s.get("pixel_values") is not None]
            ent_data = mm or calibration_data
        entropy = layer_entropies(model, ent_data, **kw)
    if len(entropy) != n_layers:
        raise ValueError(f"entropy has {len(entropy)} layers, the model has {n_layers} decoder layers")
    return entropy


def _run_swap(model, calib, plan: _Plan, names, order, sizes):
    """Both uniform runs (the low one on a deep copy of the *unquantized* model), ``k``, then the assembly:
    ``(model, k, quant_reports, per-layer errors)``."""
    pair = SwapPair.quantize(model, calib, plan.low, plan.high, plan.base_config, names, plan.progress)
    b_low, b_high = pair.layer_bits(plan.budget_bits)
    k = plan.choose_k(order, b_low, b_high, sizes, lambda j: pair.assemble(order[:j]))
    pair.assemble(order[:k])
    errs_low, errs_high = _errors_by_block(pair.low_report, names), _errors_by_block(pair.high_report, names)
    errors = [errs_low[i] if i in set(order[:k]) else errs_high[i] for i in range(len(names))]
    return pair.model, k, {"high": pair.high_report, "low": pair.low_report}, errors


def _run_sequential(model, calib, plan: _Plan, names, blocks, order, sizes):
    """Per-layer bits estimated (probe or nominal), ``k`` selected, then one layer-sequential run with per-layer
    overrides: ``(model, k, quant_reports, per-layer errors)``."""
    low, high = plan.low, plan.high
    if plan.budget_bits == "honest":
        b_low = _probe_honest_bits(blocks[0], low.method, low.bits, low.group_size, low.options)
        b_high = _probe_honest_bits(blocks[0], high.method, high.bits, high.group_size, high.options)
    else:
        b_low, b_high = float(low.bits), float(high.bits)
    pristine = copy.deepcopy(model) if plan.quality_fn is not None else None

    def mixed_config(k: int):
        return _config(plan.base_config, high, plan.low_overrides(names, order[:k]))

    k = plan.choose_k(order, b_low, b_high, sizes,
                      lambda j: _run_driver(copy.deepcopy(pristine), mixed_config(j), calib, plan.progress)[0])
    model, mixed_report = _run_driver(model, mixed_config(k), calib, plan.progress)
    return model, k, {"mixed": mixed_report}, _errors_by_block(mixed_report, names)


def _build_report(model, plan: _Plan, names, entropy: LayerEntropies, k: int, assembly: str, quant_reports: dict,
                  errors) -> LUQReport:
    """The LUQ report, measured on the assembled model, and what ``save_quantized`` records
    (``model.bivlm_quantization``)."""
    order, rank, low_set = list(entropy.order), entropy.rank(), set(entropy.order[:k])
    rows = []
    for i, name in enumerate(names):
        bb = block_bits(model.get_submodule(name))
        low = i in low_set
        rows.append(LUQLayer(i, name, float(entropy.entropies[i]), rank[i], "low" if low else "high",
                             plan.low.method if low else plan.high.method, bb["honest_bits"], bb["nominal_bits"],
                             bb["weights"], bb["bytes"], errors[i]))
    report = LUQReport(rows, k, order, assembly, entropy.to_dict(), plan.target(), plan.evaluations,
                       quant_reports, module_bytes(model))
    # What save_quantized records: the equivalent single config (high + per-layer low overrides), the driver's
    # per-Linear rows of the layers actually in the model, and the LUQ report under the key "luq".
    equivalent = _config(plan.base_config, plan.high, plan.low_overrides(names, order[:k]))
    merged = _merged_report(quant_reports, names, low_set)
    if merged is not None and "mixed" not in quant_reports:
        merged.model_bytes_after = module_bytes(model)
    rec = {"config": equivalent.to_dict(), "report": merged.to_dict() if merged is not None else None}
    if rec["report"] is not None:
        rec["report"]["luq"] = report.to_dict()
    model.bivlm_quantization = rec
    return report


def luq_quantize(model: nn.Module, calibration_data: Sequence[dict], low_method: str = "billm",
                 low_bits: Optional[int] = None,
                 high_method: str = "gptq", high_bits: int = 4, target_avg_bits: Optional[float] = None,
                 target_bytes: Optional[float] = None, budget_bits: str = "honest", n_low: Optional[int] = None,
                 quality_fn: Optional[Callable[[nn.Module], float]] = None, threshold: Optional[float] = None,
                 higher_is_better: bool = False, assembly: str = "swap", mix: Optional[float] = 0.5,
                 entropy: Optional[LayerEntropies] = None, entropy_data: Optional[Sequence[dict]] = None,
                 hook: str = "input_layernorm", estimator: str = "kmeans", n_clusters: int = 100, seed: int = 42,
                 n_init: int = 10, max_tokens: Optional[int] = None, group_size: int = 128,
                 low_options: Optional[dict] = None, high_options: Optional[dict] = None, base_config=None,
                 progress: bool = True):
    """LUQ end to end: entropy order -> selection of ``k`` -> assembly; returns ``(model, LUQReport)``.

    * Methods: ``low_method`` (default ``"billm"``, the paper's; or ``"bivlm"``, ``"rtn"``) at ``low_bits``
      (``None``: the method's own, e.g. BiLLM's packed 2-bit lut, whose *nominal* BiLLM rate is ~1.1 bits) and
      ``high_method`` (default ``"gptq"``) at ``high_bits`` (4), both with ``group_size`` (a layer it does not
      divide gets the largest supported one that does) and ``low_options`` / ``high_options``.

    * How many layers go low: ``n_low`` (fixed ``k``), or a memory budget ``target_avg_bits`` /
      ``target_bytes`` over the LLM decoder Linear weights (``budget_bits="honest"``: measured/estimated bytes of
      every buffer; ``"nominal"``: code bits, the paper's arithmetic), and/or ``quality_fn(model) -> float`` with
      ``threshold`` (lower is better unless ``higher_is_better``), checked on assembled candidates by binary
      search over ``k`` (see :func:`select_layers`). With ``assembly="sequential"`` each quality check is a full
      quantization run.
    * ``entropy``: a precomputed :class:`LayerEntropies` (else computed here on ``entropy_data``, default: the
      multimodal samples of ``calibration_data``, with ``hook``/``estimator``/``n_clusters``/``seed``/...).
    * ``mix``: share of image+text samples in the PTQ calibration set (see :func:`mix_calibration`).
    * ``base_config``: a :class:`~bivlm_kernels.quant.QuantConfig` (or method name) whose vision / projector /
      exclusion / device settings are kept; its language component is replaced by LUQ's two settings.
    * ``progress``: the driver's tqdm bars.

    ``model`` is quantized in place (``swap`` also quantizes a deep copy for the low run).
    """
    _check_targets(assembly, budget_bits, n_low, target_avg_bits, target_bytes, quality_fn, threshold)
    calibration_data = list(calibration_data)
    if not calibration_data:
        raise ValueError("calibration_data is empty")
    plan = _Plan(_component(low_method, low_bits, group_size, low_options),
                 _component(high_method, high_bits, group_size, high_options), base_config, progress,
                 budget_bits, n_low, target_avg_bits, target_bytes, quality_fn, threshold, higher_is_better)
    _config(base_config, plan.low)               # validate both settings before any forward pass
    _config(base_config, plan.high)
    names, blocks = decoder_layers(model)
    if n_low is not None and not (isinstance(n_low, int) and 0 <= n_low <= len(blocks)):
        raise ValueError(f"n_low must be an int in [0, {len(blocks)}], got {n_low!r}")

    # 1. entropy order on the multimodal samples (on the unquantized model)
    entropy = _entropy_order(model, calibration_data, entropy, entropy_data, len(blocks), hook=hook,
                             estimator=estimator, n_clusters=n_clusters, seed=seed, n_init=n_init,
                             max_tokens=max_tokens)
    order = list(entropy.order)
    calib = mix_calibration(calibration_data, mix, seed=0)
    sizes = [block_bits(b)["weights"] for b in blocks]

    # 2. quantize and assemble: two uniform runs + swap, or one layer-sequential mixed run
    if assembly == "swap":
        model, k, quant_reports, errors = _run_swap(model, calib, plan, names, order, sizes)
    else:
        model, k, quant_reports, errors = _run_sequential(model, calib, plan, names, blocks, order, sizes)

    # 3. report, measured on the assembled model
    report = _build_report(model, plan, names, entropy, k, assembly, quant_reports, errors)
    if target_avg_bits is not None:
        reached = report.average_bits if budget_bits == "honest" else report.average_nominal_bits
        if reached > target_avg_bits * (1 + 1e-6):
            log.warning("LUQ: reached %.4f %s bits/weight, above target_avg_bits=%s (the %s assembly estimates "
                        "honest bits before quantizing)", reached, budget_bits, target_avg_bits, assembly)
    return model, report
