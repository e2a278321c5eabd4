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

from .. import formats
from ..formats import DTYPES_BY_NAME as _DTYPES
from ..nn import QuantLinear, replace_module
from . import safe_write
# Header keys this module writes and reads back; extra_metadata may not change them (a "dtype" of the user's
# would make an fp32 model reload as fp16 without a word).
RESERVED_KEYS = ("format", "format_version", "dtype", "layers")


def quant_layout(model: nn.Module) -> dict:
    """``{module name: LayerSpec dict}`` for every ``QuantLinear`` in ``model``."""
    return {name: m.spec.to_dict() for name, m in model.named_modules() if isinstance(m, QuantLinear)}


def _layer_dtype(model: nn.Module) -> str:
    for m in model.modules():
        if isinstance(m, QuantLinear):
            return str(m.dtype).replace("torch.", "")
    raise ValueError("model contains no QuantLinear layer; nothing quantized to save")


def save(model: nn.Module, path: str, extra_metadata: Optional[dict] = None) -> None:
    """Write ``model``'s state and its quantized layout to ``path`` (a ``.safetensors`` file).

    ``path`` may be new or an existing checkpoint of this format (replaced); any other existing file, a
    directory, a link or an empty path is refused. The file is written to a temporary file in the same
    directory, fsync'ed and renamed into place (see :mod:`bivlm_kernels.checkpoint.safe_write`), so ``path`` always holds
    a complete checkpoint. ``extra_metadata`` adds header keys (values JSON-encoded unless str); the keys in
    :data:`RESERVED_KEYS` are refused.
    """
    from safetensors.torch import save_model
    path = safe_write.check_output_path(path)
    if extra_metadata is not None and not isinstance(extra_metadata, dict):
        raise TypeError(f"extra_metadata must be a dict, got {type(extra_metadata).__name__}")
    extra = dict(extra_metadata or {})
    bad = sorted(k for k in extra if not isinstance(k, str))
    if bad:
        raise TypeError(f"extra_metadata keys must be str, got {bad!r}")
    clash = sorted(set(extra) & set(RESERVED_KEYS))
    if clash:
        raise ValueError(f"extra_metadata may not set the reserved header key(s) {clash}; reserved: "
                         f"{list(RESERVED_KEYS)}")
    layout = quant_layout(model)
    meta = {"format": formats.FORMAT_NAME, "format_version": str(formats.layout_version(layout)),
            "dtype": _layer_dtype(model), "layers": json.dumps(layout)}
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in extra.items()})
    if os.path.isdir(path) and not os.path.islink(path):
        raise IsADirectoryError(f"path {path!r} is a directory; checkpoint.save writes one .safetensors file "
                                f"(use bivlm_kernels.save_quantized for a checkpoint directory)")
    safe_write.check_replaceable(path, True, is_checkpoint_file, what="checkpoint file", allow_empty_dir=False)
    safe_write.write_file(path, lambda tmp: save_model(model, tmp, metadata=meta))   # handles tied tensors
    safe_write.clean_leftovers(path, lambda p: False, include_old=False, is_our_file=is_checkpoint_file)


def _header_metadata(path: str) -> Optional[dict]:
    """The ``__metadata__`` of a safetensors file read from its header alone (works on a file whose tensor
    data was cut short), or None when the header is not readable."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 2 <= n <= 100_000_000 or n > os.path.getsize(path) - 8:
                return None
            header = json.loads(f.read(n))
    except (OSError, ValueError):
        return None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return meta if isinstance(meta, dict) else None


def is_checkpoint_file(path: str) -> bool:
    """Whether ``path`` is a regular file whose header says it is a ``bivlm-packed`` checkpoint."""
    if not os.path.isfile(path) or os.path.islink(path):
        return False
    meta = _header_metadata(path)
    return meta is not None and meta.get("format") == formats.FORMAT_NAME


def read_metadata(path: str) -> dict:
    """Header metadata of a checkpoint, with the format name and version checked."""
    from safetensors import safe_open
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path!r}")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:                          # truncated / not a safetensors file at all
        raise ValueError(f"cannot read checkpoint {path!r}: {type(e).__name__}: {e}") from None
    if meta.get("format") != formats.FORMAT_NAME:
        raise ValueError(f"{path!r} is not a {formats.FORMAT_NAME} checkpoint (format={meta.get('format')!r})")
    formats.check_version(meta.get("format_version"), repr(path))
    if "layers" not in meta or meta.get("dtype") not in _DTYPES:
        raise ValueError(f"{path!r} metadata lacks 'layers' or a valid 'dtype' (one of {list(_DTYPES)})")
    need = formats.layout_version(read_layout(meta, path))
    if need > int(meta["format_version"]):
        raise ValueError(f"{path!r} says format_version {meta['format_version']} but its layers need version "
                         f"{need} (g = 16 or compressed tables): the header is wrong")
    return meta


def read_layout(meta: dict, path: str = "checkpoint") -> dict:
    """The ``layers`` header entry as ``{module name: LayerSpec dict}``, with its types checked."""
    try:
        layout = json.loads(meta["layers"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path!r} header entry 'layers' is not valid JSON: {e}") from None
    return check_layout(layout, f"{path!r} header entry 'layers'", f"{path!r} layer")


def check_layout(layout, what: str, layer_label: str) -> dict:
    """``layout`` ({module name: LayerSpec dict}) with its types and every layer spec checked; ``what`` and
    ``layer_label`` name it in the error (the checkpoint header, a config.json ``quantization_config``)."""
    if not isinstance(layout, dict) or not all(isinstance(k, str) and isinstance(v, dict)
                                               for k, v in layout.items()):
        raise ValueError(f"{what} must map module names to layer specs (a JSON object "
                         f"of objects), got {type(layout).__name__}")
    for name, d in layout.items():
        try:
            formats.LayerSpec.from_dict(d)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{layer_label} {name!r}: {e}") from None
    return layout


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
        replace_module(model, name, QuantLinear.from_spec(spec, dtype=dtype, device=device))


def load(model: nn.Module, path: str) -> nn.Module:
    """Load a checkpoint written by :func:`save` into ``model`` (the same architecture, unquantized)."""
    from safetensors.torch import load_model
    meta = read_metadata(path)
    swap_in_empty_layers(model, read_layout(meta, path), _DTYPES[meta["dtype"]])
    missing, unexpected = load_model(model, path, strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint {path!r} does not match the model: missing keys {sorted(missing)[:8]}"
                         f"{'...' if len(missing) > 8 else ''}, unexpected keys {sorted(unexpected)[:8]}"
                         f"{'...' if len(unexpected) > 8 else ''}")
    return model
