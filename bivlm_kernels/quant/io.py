"""``save_quantized`` / ``load_quantized``: a quantized Hugging Face model as a directory.

Layout (all written into a temporary sibling directory, renamed into place at the end, so ``path`` never
holds a half-written checkpoint)::

    path/config.json              the HF model config (model.config.save_pretrained)
    path/generation_config.json   when the model has one
    path/quantization.json        format name/version, bivlm_kernels version, model class, dtype,
                                  the QuantConfig and the per-layer report
    path/model.safetensors        every tensor, packed QuantLinear buffers included, with the layout of each
                                  quantized layer in its header (bivlm_kernels.checkpoint)
    (processor / tokenizer files when a processor is passed)

``load_quantized`` rebuilds the model from ``config.json`` (without random init), swaps in empty
``QuantLinear`` layers of the recorded layout and loads the tensors strictly: the loaded model gives the same
outputs bit for bit.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile

import torch
from torch import nn

from .. import checkpoint, formats
from ..nn import QuantLinear

QUANT_FILE = "quantization.json"
WEIGHTS_FILE = "model.safetensors"
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _model_dtype(model: nn.Module) -> str:
    for p in model.parameters():
        if p.dtype.is_floating_point:
            return str(p.dtype).replace("torch.", "")
    return "float32"


def save_quantized(model: nn.Module, path: str, *, overwrite: bool = False, config=None, report=None,
                   processor=None) -> str:
    """Write the quantized ``model`` to the directory ``path``; return ``path``.

    ``config`` / ``report`` default to what :func:`quantize_model` recorded on the model. ``processor``
    (optional) is saved beside it. An existing ``path`` is an error unless ``overwrite=True``.
    """
    from .. import __version__
    if not any(isinstance(m, QuantLinear) for m in model.modules()):
        raise ValueError(f"{type(model).__name__} contains no QuantLinear layer; quantize it first "
                         f"(bivlm_kernels.quant.quantize_model)")
    if not hasattr(model, "config") or not hasattr(model.config, "save_pretrained"):
        raise TypeError(f"save_quantized needs a Hugging Face model with a .config; "
                        f"got {type(model).__name__} (use bivlm_kernels.checkpoint.save for other modules)")
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"output path {path!r} already exists; pass overwrite=True (CLI: --overwrite) "
                              f"to replace it")
    recorded = getattr(model, "bivlm_quantization", {}) or {}
    if config is not None and hasattr(config, "to_dict"):
        config = config.to_dict()
    if report is not None and hasattr(report, "to_dict"):
        report = report.to_dict()
    cls = type(model)
    meta = {
        "format": formats.FORMAT_NAME, "format_version": formats.FORMAT_VERSION,
        "bivlm_kernels_version": __version__,
        "model_class": cls.__name__, "model_module": cls.__module__,
        "dtype": _model_dtype(model),
        "quant_config": config if config is not None else recorded.get("config"),
        "report": report if report is not None else recorded.get("report"),
    }
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(path) + ".partial-", dir=parent)
    try:
        model.config.save_pretrained(tmp)
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(tmp)
        if processor is not None:
            processor.save_pretrained(tmp)
        checkpoint.save(model, os.path.join(tmp, WEIGHTS_FILE),
                        extra_metadata={"quant_config": json.dumps(meta["quant_config"])})
        with open(os.path.join(tmp, QUANT_FILE), "w") as f:
            json.dump(meta, f, indent=2)
        # Swap into place: an old checkpoint is moved aside first and deleted only once the new one is there.
        old = None
        if os.path.exists(path):
            old = tempfile.mkdtemp(prefix=os.path.basename(path) + ".old-", dir=parent)
            os.rmdir(old)
            os.replace(path, old)
        os.replace(tmp, path)
        tmp = None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True) if os.path.isdir(old) else os.remove(old)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def read_quant_info(path: str) -> dict:
    """``quantization.json`` of a checkpoint directory, with the format name and version checked."""
    qfile = os.path.join(path, QUANT_FILE)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no quantized checkpoint directory at {path!r}")
    if not os.path.isfile(qfile):
        raise ValueError(f"{path!r} is not a bivlm_kernels checkpoint: {QUANT_FILE} is missing")
    try:
        with open(qfile) as f:
            info = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{qfile!r} is corrupt: {e}") from None
    if not isinstance(info, dict) or info.get("format") != formats.FORMAT_NAME:
        raise ValueError(f"{qfile!r} is not a {formats.FORMAT_NAME} checkpoint "
                         f"(format={info.get('format') if isinstance(info, dict) else None!r})")
    if info.get("format_version") != formats.FORMAT_VERSION:
        raise ValueError(f"{qfile!r} has format_version {info.get('format_version')!r}; this bivlm_kernels "
                         f"reads version {formats.FORMAT_VERSION} only")
    for key in ("model_class", "dtype"):
        if key not in info:
            raise ValueError(f"{qfile!r} lacks {key!r}")
    return info


def _model_class(info: dict):
    import transformers
    name = info["model_class"]
    cls = getattr(transformers, name, None)     # only classes transformers exports: no arbitrary imports
    if cls is None:
        raise ValueError(f"model class {name!r} (module {info.get('model_module')!r}) is not a transformers "
                         f"class this installation knows (transformers {transformers.__version__})")
    return cls


def load_quantized(path: str, device=None) -> nn.Module:
    """Rebuild a model saved by :func:`save_quantized` (in eval mode, optionally moved to ``device``)."""
    from transformers import AutoConfig
    path = os.path.abspath(os.fspath(path))
    info = read_quant_info(path)
    wfile = os.path.join(path, WEIGHTS_FILE)
    if not os.path.isfile(wfile):
        raise ValueError(f"{path!r} is incomplete: {WEIGHTS_FILE} is missing")
    cls = _model_class(info)
    config = AutoConfig.from_pretrained(path)
    dtype = _DTYPES.get(info["dtype"])
    if dtype is None:
        raise ValueError(f"{QUANT_FILE} has dtype {info['dtype']!r}; expected one of {list(_DTYPES)}")
    try:
        from transformers.initialization import no_init_weights
    except ImportError:                          # older transformers
        from transformers.modeling_utils import no_init_weights
    # Weights are overwritten by the checkpoint: skip random init (non-persistent buffers such as rotary
    # frequencies are computed in __init__, not by the init functions).
    with no_init_weights():
        model = cls._from_config(config, dtype=dtype)
    # Tied weights (lm_head = embed_tokens) are stored once; without init they are not tied yet.
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    try:
        checkpoint.load(model, wfile)
    except ValueError:
        raise
    except Exception as e:                       # truncated / corrupt safetensors file
        raise ValueError(f"cannot read checkpoint {wfile!r}: {type(e).__name__}: {e}") from e
    gfile = os.path.join(path, "generation_config.json")
    if os.path.isfile(gfile) and getattr(model, "generation_config", None) is not None:
        from transformers import GenerationConfig
        model.generation_config = GenerationConfig.from_pretrained(path)
    model.bivlm_quantization = {"config": info.get("quant_config"), "report": info.get("report")}
    model.eval()
    if device is not None:
        model.to(device)
    return model
