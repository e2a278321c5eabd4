"""LUQ's assembly: the driver runs behind the two layouts, and the config they are described by.

``"swap"`` (faithful to the authors' scripts): quantize the whole LLM twice, all at ``high_method``/``high_bits``
and all at ``low_method``/``low_bits`` (:class:`SwapPair`), and move the first ``k`` layers of the order from the
low model into the high one - each moved layer was calibrated on low-bit predecessors, not on the mixed model.
Both runs are known before selection, so an honest budget is met *exactly* with the measured bytes of every
layer, and quality checks cost no re-quantization. ``"sequential"`` (ours): one layer-sequential run of the
driver with per-layer overrides (:func:`layer_override_pattern`), each layer calibrated inside the mixed model;
the honest bits of the low layers are then estimated before quantizing (:func:`_probe_honest_bits`, a
calibration-free probe of one decoder layer), and the report says what was reached.
"""
from __future__ import annotations

import copy
import re
from typing import Iterable, List, Optional, Sequence

import torch
from torch import nn

from ...models import decoder_layers
from ..config import ComponentConfig, QuantConfig, pick_group_size
from ..driver import quantize_model
from ..methods._common import check_choice
from .report import block_bits

ASSEMBLIES = ("swap", "sequential")
BUDGET_BITS = ("honest", "nominal")


def _block_list(model: nn.Module, names: Sequence[str]) -> nn.ModuleList:
    """The ``nn.ModuleList`` that holds the decoder layers (the parent of ``names``)."""
    parent = names[0].rpartition(".")[0]
    mods = model.get_submodule(parent)
    if not isinstance(mods, nn.ModuleList):
        raise ValueError(f"decoder layers of {type(model).__name__} are not held in an nn.ModuleList ({parent!r})")
    return mods


def _component(method: str, bits: int, group_size: int, options: Optional[dict]):
    return ComponentConfig(method=method, bits=bits, group_size=group_size, options=dict(options or {}))


def _config(base_config, language, overrides: Optional[dict] = None):
    """``base_config`` (vision / projector / exclusions / device kept) with the language component replaced."""
    if base_config is None:
        cfg = QuantConfig(language=language, vision=None, projector=None)
    else:
        cfg = copy.deepcopy(QuantConfig.coerce(base_config))
        cfg.language = language
    if overrides:
        cfg.overrides = {**overrides, **cfg.overrides}
    cfg.validate()
    return cfg


def _run_driver(model, config, data, progress: bool = True):
    """``quantize_model`` -> ``(model, report)``."""
    return quantize_model(model, config, data, progress=progress)


def layer_override_pattern(name: str) -> str:
    """Regex matching the Linears inside decoder layer ``name`` exactly (``layers.1.`` but not ``layers.10.``)."""
    return "^" + re.escape(name) + r"\."


def assemble_swap(high_model: nn.Module, low_model: nn.Module, low_layers: Iterable[int]) -> nn.Module:
    """Move decoder layers ``low_layers`` of ``low_model`` into ``high_model`` (in place; returns it).

    Both models must come from the same architecture (two quantizations of one model). The moved blocks are
    shared with ``low_model`` afterwards: do not use ``low_model`` for anything else.
    """
    names_h, blocks_h = decoder_layers(high_model)
    names_l, blocks_l = decoder_layers(low_model)
    if names_h != names_l:
        raise ValueError("high_model and low_model have different decoder layers; swap needs two quantizations "
                         "of the same model")
    mods = _block_list(high_model, names_h)
    for i in low_layers:
        if not 0 <= int(i) < len(mods):
            raise ValueError(f"layer {i} out of range (0..{len(mods) - 1})")
        mods[int(i)] = blocks_l[int(i)]
    return high_model


class SwapPair:
    """The two uniform quantizations behind the ``swap`` assembly, to assemble any set of low layers in place.

    ``SwapPair.quantize(model, data, low, high)`` quantizes a deep copy of ``model`` with ``low`` and ``model``
    itself with ``high`` (``ComponentConfig``s for the language model; ``base_config`` as in
    :func:`luq_quantize`). ``assemble(layers)`` puts the low version of exactly those decoder layers (indices)
    into ``pair.model`` and the high version of all others; it can be called any number of times.
    """

    def __init__(self, model, names, low_blocks, high_blocks, low_report=None, high_report=None):
        self.model, self.names = model, list(names)
        self.low_blocks, self.high_blocks = list(low_blocks), list(high_blocks)
        self.low_report, self.high_report = low_report, high_report
        self._mods = _block_list(model, self.names)
        self.low_layers: List[int] = []

    @classmethod
    def quantize(cls, model, calibration_data, low, high, base_config=None, names=None,
                 progress: bool = True) -> "SwapPair":
        names = names or decoder_layers(model)[0]
        low_model, low_report = _run_driver(copy.deepcopy(model), _config(base_config, low), calibration_data,
                                            progress)
        model, high_report = _run_driver(model, _config(base_config, high), calibration_data, progress)
        return cls(model, names, [low_model.get_submodule(n) for n in names],
                   [model.get_submodule(n) for n in names], low_report, high_report)

    def assemble(self, low_layers: Iterable[int]) -> nn.Module:
        low = {int(i) for i in low_layers}
        bad = sorted(i for i in low if not 0 <= i < len(self.names))
        if bad:
            raise ValueError(f"layers {bad} out of range (0..{len(self.names) - 1})")
        for i in range(len(self.names)):
            self._mods[i] = self.low_blocks[i] if i in low else self.high_blocks[i]
        self.low_layers = sorted(low)
        return self.model

    def layer_bits(self, kind: str = "honest") -> tuple:
        """Per-layer bits/weight ``(low, high)``: ``kind="honest"`` (all buffers) or ``"nominal"`` (codes)."""
        check_choice(kind, "kind", BUDGET_BITS)
        key = "honest_bits" if kind == "honest" else "nominal_bits"
        return [block_bits(b)[key] for b in self.low_blocks], [block_bits(b)[key] for b in self.high_blocks]

    def average_bits(self, kind: str = "honest") -> float:
        """Bits/weight over the decoder Linear weights of the model as currently assembled."""
        check_choice(kind, "kind", BUDGET_BITS)
        rows = [block_bits(self.model.get_submodule(n)) for n in self.names]
        if kind == "honest":
            return sum(r["bytes"] for r in rows) * 8 / sum(r["weights"] for r in rows)
        return sum(r["nominal_bits"] * r["weights"] for r in rows) / sum(r["weights"] for r in rows)


def _probe_honest_bits(block: nn.Module, method: str, bits: int, group_size: int, options: Optional[dict]) -> float:
    """Calibration-free estimate (H = identity) of the honest bits/weight ``method`` gives the Linears of
    ``block``: layouts with data-dependent parts (BiLLM's salient columns) may differ after calibration."""
    n_w, nbits = 0, 0.0
    for name, m in block.named_modules():
        if type(m) is not nn.Linear:
            continue
        g = pick_group_size(group_size, m.in_features, name)
        w = m.out_features * m.in_features
        n_w += w
        if g is None:
            nbits += m.weight.element_size() * 8 * w
            continue
        # tables are stored in the weight's dtype, as the driver does
        dt = m.weight.dtype if m.weight.dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float16
        meth = _component(method, bits, g, options).build_method(dtype=dt)
        H = torch.eye(m.in_features) if meth.needs_hessian else None
        qw = meth.quantize(m.weight.detach().float().cpu(), H)
        nbits += qw.layer_spec().bits_per_weight(dt) * w
    if n_w == 0:
        raise ValueError("decoder layer has no nn.Linear to probe")
    return nbits / n_w
