"""Find the quantizable parts of a model: vision tower blocks, projector, language-model decoder layers.

The driver quantizes a model component by component, block by block; an adapter only says which modules are
the blocks. Module paths in transformers 5.x (read off the classes, see ``tests/test_quantize_model.py``):

===================================== ============================== ======================== ==============================
class                                 vision blocks                  projector                language decoder layers
===================================== ============================== ======================== ==============================
LlavaForConditionalGeneration         model.vision_tower.encoder     model.multi_modal_       model.language_model.layers
                                      .layers                        projector
Qwen2VLForConditionalGeneration       model.visual.blocks            model.visual.merger      model.language_model.layers
Qwen2_5_VLForConditionalGeneration    model.visual.blocks            model.visual.merger      model.language_model.layers
===================================== ============================== ======================== ==============================

The Qwen "merger" (2x2 patch merge + MLP into the LM width) sits inside ``model.visual`` but plays the LLaVA
projector's role, so it is the projector component here. ``lm_head`` is never a block: like GPTQ and BiLLM we
keep it in full precision.

Any other model goes through :func:`generic_components`: the longest ``nn.ModuleList`` of identical blocks
that contain ``nn.Linear`` layers is the "language" component (a LlamaForCausalLM's ``model.layers``, a
Dinov2Model's ``encoder.layer``, a BERT encoder), and attributes named like a vision tower / projector are
picked up when present.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

from torch import nn

from ..nn import QuantLinear


@dataclass
class Component:
    """One component: its blocks in forward order, each with its full module name."""
    name: str                              # "vision", "projector" or "language"
    blocks: List[nn.Module]
    block_names: List[str]

    def linears(self) -> Dict[str, nn.Linear]:
        """Every ``nn.Linear`` inside the blocks, by full module name."""
        out = {}
        for prefix, block in zip(self.block_names, self.blocks):
            if isinstance(block, nn.Linear):
                out[prefix] = block
            for n, m in block.named_modules():
                if n and type(m) is nn.Linear:
                    out[f"{prefix}.{n}"] = m
        return out


def _get(model: nn.Module, path: str) -> Optional[nn.Module]:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def _has_linear(m: nn.Module) -> bool:
    # QuantLinear counts too, so an already (partly) quantized model keeps its components.
    return any(type(x) is nn.Linear or isinstance(x, QuantLinear) for x in m.modules())


def _blocks(model: nn.Module, path: str) -> Optional[Component]:
    mod = _get(model, path)
    if isinstance(mod, nn.ModuleList) and len(mod) and _has_linear(mod):
        return Component("", list(mod), [f"{path}.{i}" for i in range(len(mod))])
    return None


def _longest_block_list(root: nn.Module, prefix: str) -> Optional[Component]:
    """The longest ``nn.ModuleList`` of same-type blocks with linear layers under ``root`` (outermost first)."""
    best = None
    for n, m in root.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) and len({type(b) for b in m}) == 1 and _has_linear(m):
            if best is None or len(m) > len(best[1]):
                best = (n, m)
    if best is None:
        return None
    n, m = best
    full = f"{prefix}.{n}" if n else prefix
    return Component("", list(m), [f"{full}.{i}" for i in range(len(m))])


def _blocks_under(model: nn.Module, root_path: str) -> Optional[Component]:
    """Fallback when the tower is another class than the usual one (LLaVA with a DINOv2/SigLIP tower, ...)."""
    root = _get(model, root_path)
    return None if root is None else _longest_block_list(root, root_path)


def _single(model: nn.Module, path: str) -> Optional[Component]:
    mod = _get(model, path)
    if mod is not None and _has_linear(mod):
        return Component("", [mod], [path])
    return None


# Per architecture: (vision blocks, projector, language layers), each a module path. Several candidate paths per
# slot so that the bare ``*Model`` classes (no ``model.`` prefix) work as well.
_PATHS = {
    "llava": (["model.vision_tower.encoder.layers", "vision_tower.encoder.layers",
               "model.vision_tower.vision_model.encoder.layers", "vision_tower.vision_model.encoder.layers"],
              ["model.multi_modal_projector", "multi_modal_projector"],
              ["model.language_model.layers", "language_model.layers", "model.language_model.model.layers"]),
    "qwen2_vl": (["model.visual.blocks", "visual.blocks"],
                 ["model.visual.merger", "visual.merger"],
                 ["model.language_model.layers", "language_model.layers"]),
}
# Roots searched with _blocks_under when none of the exact paths exists: (vision roots, language roots).
_ROOTS = {
    "llava": (["model.vision_tower", "vision_tower"], ["model.language_model", "language_model"]),
    "qwen2_vl": (["model.visual", "visual"], ["model.language_model", "language_model"]),
}
_CLASS_KEYS = {
    "LlavaForConditionalGeneration": "llava", "LlavaModel": "llava",
    "Qwen2VLForConditionalGeneration": "qwen2_vl", "Qwen2VLModel": "qwen2_vl",
    "Qwen2_5_VLForConditionalGeneration": "qwen2_vl", "Qwen2_5_VLModel": "qwen2_vl",
}


def _first(model, paths, fn) -> Optional[Component]:
    for p in paths:
        c = fn(model, p)
        if c is not None:
            return c
    return None


def _known_components(model: nn.Module, key: str) -> Dict[str, Component]:
    vis, proj, lang = _PATHS[key]
    vis_roots, lang_roots = _ROOTS[key]
    found = {"vision": _first(model, vis, _blocks) or _first(model, vis_roots, _blocks_under),
             "projector": _first(model, proj, _single),
             "language": _first(model, lang, _blocks) or _first(model, lang_roots, _blocks_under)}
    out = {}
    for name, comp in found.items():
        if comp is not None:
            comp.name = name
            out[name] = comp
    return out


# Generic path: attribute names that mark a vision tower or a projector.
_VISION_NAMES = ("vision_tower", "visual", "vision_model", "vision_encoder")
_PROJECTOR_NAMES = ("multi_modal_projector", "mm_projector", "merger", "connector", "visual_projection")


def generic_components(model: nn.Module) -> Dict[str, Component]:
    """Components of a model with no dedicated adapter (see the module docstring)."""
    lists = [(n, m) for n, m in model.named_modules()
             if isinstance(m, nn.ModuleList) and len(m) and _has_linear(m)
             and len({type(b) for b in m}) == 1]
    vision_lists = [(n, m) for n, m in lists if any(v in n.split(".") for v in _VISION_NAMES)]
    other_lists = [(n, m) for n, m in lists if (n, m) not in vision_lists]
    # Skip lists nested inside another block list (e.g. a ModuleList of experts inside a decoder layer).
    def outermost(cands):
        names = [n for n, _ in cands]
        return [(n, m) for n, m in cands if not any(n != o and n.startswith(o + ".") for o in names)]

    out = {}
    other_lists = outermost(other_lists)
    if other_lists:
        n, m = max(other_lists, key=lambda t: len(t[1]))
        out["language"] = Component("language", list(m), [f"{n}.{i}" for i in range(len(m))])
    vision_lists = outermost(vision_lists)
    if vision_lists:
        n, m = max(vision_lists, key=lambda t: len(t[1]))
        out["vision"] = Component("vision", list(m), [f"{n}.{i}" for i in range(len(m))])
    for n, m in model.named_modules():
        if n and n.split(".")[-1] in _PROJECTOR_NAMES and _has_linear(m):
            out["projector"] = Component("projector", [m], [n])
            break
    return out


_ADAPTERS: Dict[str, Callable[[nn.Module], Dict[str, Component]]] = {}


def register_adapter(class_name: str, fn: Callable[[nn.Module], Dict[str, Component]]) -> None:
    """Teach :func:`find_components` a new model class (by class name)."""
    _ADAPTERS[class_name] = fn


def find_components(model: nn.Module) -> Dict[str, Component]:
    """``{"vision": Component, "projector": Component, "language": Component}`` (those the model has), in
    forward order. Raises ``ValueError`` for a model with no recognizable blocks."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    cls = type(model).__name__
    if cls in _ADAPTERS:
        comps = _ADAPTERS[cls](model)
    elif cls in _CLASS_KEYS:
        comps = _known_components(model, _CLASS_KEYS[cls])
    else:
        comps = generic_components(model)
    if not comps:
        raise ValueError(
            f"no quantizable layers found in {cls}: expected a vision tower, a projector or a ModuleList of "
            f"decoder blocks containing nn.Linear layers (known classes: {sorted(set(_CLASS_KEYS) | set(_ADAPTERS))}; "
            f"others need a ModuleList of identical blocks; add one with register_adapter)")
    order = ("vision", "projector", "language")
    return {k: comps[k] for k in order if k in comps}


def decoder_layers(model: nn.Module):
    """``(names, blocks)`` of the language model's decoder layers, in forward order: the ``"language"``
    component of :func:`find_components`. ``QuantLinear`` counts as a linear layer there, so this works on an
    already quantized model too (LUQ assembles and measures quantized models)."""
    try:
        comps = find_components(model)
    except ValueError:
        comps = {}
    if "language" not in comps:
        raise ValueError(f"no language-model decoder layers found in {type(model).__name__}: expected an "
                         f"nn.ModuleList of decoder blocks (e.g. model.layers, model.language_model.layers)")
    lang = comps["language"]
    return list(lang.block_names), list(lang.blocks)
