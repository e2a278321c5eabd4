"""Safetensors checkpoints of models that contain ``QuantLinear`` layers.

A checkpoint is one ``.safetensors`` file holding the model's whole state (packed buffers included) and, in
its header metadata, the format name and version and the layout of every quantized layer::

    {"format": "bivlm-packed", "format_version": "1", "dtype": "float16",
     "layers": "{\"model.layers.0.mlp.up_proj\": {\"in_features\": 576, ..., \"segments\": [...]}, ...}"}

:func:`load` swaps the listed ``nn.Linear`` modules of a freshly built (unquantized) model for empty
``QuantLinear`` layers of the recorded layout, then loads the tensors strictly: a missing or unexpected key,
a shape mismatch or another format version is a ``ValueError`` naming it, never a half-loaded model.
"""
from __future__ import annotations

import json
import os
from typing import Optional

import torch
from torch import nn

from . import formats
from .nn import QuantLinear

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def quant_layout(model: nn.Module) -> dict:
    """``{module name: LayerSpec dict}`` for every ``QuantLinear`` in ``model``."""
    return {name: m.spec.to_dict() for name, m in model.named_modules() if isinstance(m, QuantLinear)}


def _layer_dtype(model: nn.Module) -> str:
    for m in model.modules():
        if isinstance(m, QuantLinear):
            return str(m.dtype).replace("torch.", "")
    raise ValueError("model contains no QuantLinear layer; nothing quantized to save")


def save(model: nn.Module, path: str, extra_metadata: Optional[dict] = None) -> None:
    """Write ``model``'s state and its quantized layout to ``path`` (a ``.safetensors`` file)."""
    from safetensors.torch import save_model
    meta = {"format": formats.FORMAT_NAME, "format_version": str(formats.FORMAT_VERSION),
            "dtype": _layer_dtype(model), "layers": json.dumps(quant_layout(model))}
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in (extra_metadata or {}).items()})
    tmp = path + ".partial"
    save_model(model, tmp, metadata=meta)          # handles tied (shared) tensors
    os.replace(tmp, path)                           # never leave a half-written checkpoint at `path`


def read_metadata(path: str) -> dict:
    """Header metadata of a checkpoint, with the format name and version checked."""
    from safetensors import safe_open
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path!r}")
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != formats.FORMAT_NAME:
        raise ValueError(f"{path!r} is not a {formats.FORMAT_NAME} checkpoint (format={meta.get('format')!r})")
    if meta.get("format_version") != str(formats.FORMAT_VERSION):
        raise ValueError(f"{path!r} has format_version {meta.get('format_version')!r}; this bivlm_kernels "
                         f"reads version {formats.FORMAT_VERSION} only")
    if "layers" not in meta or meta.get("dtype") not in _DTYPES:
        raise ValueError(f"{path!r} metadata lacks 'layers' or a valid 'dtype' (one of {list(_DTYPES)})")
    return meta


def swap_in_empty_layers(model: nn.Module, layout: dict, dtype: torch.dtype) -> None:
    """Replace each named ``nn.Linear`` of ``model`` by an empty ``QuantLinear`` of the recorded layout."""
    for name, d in layout.items():
        spec = formats.LayerSpec.from_dict(d)
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"checkpoint layer {name!r} does not exist in the model") from None
        if not isinstance(old, (nn.Linear, QuantLinear)) or \
                (old.in_features, old.out_features) != (spec.in_features, spec.out_features):
            raise ValueError(f"checkpoint layer {name!r} is {spec.out_features}x{spec.in_features}, "
                             f"but the model has {type(old).__name__} "
                             f"{getattr(old, 'out_features', '?')}x{getattr(old, 'in_features', '?')}")
        device = next(iter(old.buffers()), next(iter(old.parameters()), None))
        device = device.device if device is not None else None
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, QuantLinear.from_spec(spec, dtype=dtype, device=device))


def load(model: nn.Module, path: str) -> nn.Module:
    """Load a checkpoint written by :func:`save` into ``model`` (the same architecture, unquantized)."""
    from safetensors.torch import load_model
    meta = read_metadata(path)
    swap_in_empty_layers(model, json.loads(meta["layers"]), _DTYPES[meta["dtype"]])
    missing, unexpected = load_model(model, path, strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint {path!r} does not match the model: missing keys {sorted(missing)[:8]}"
                         f"{'...' if len(missing) > 8 else ''}, unexpected keys {sorted(unexpected)[:8]}"
                         f"{'...' if len(unexpected) > 8 else ''}")
    return model
