"""``save_quantized`` / ``load_quantized``: a quantized Hugging Face model as a directory.

Layout (all written into a temporary sibling directory, renamed into place at the end, so ``path`` never
holds a half-written checkpoint)::

    path/config.json              the HF model config (model.config.save_pretrained) with ``architectures`` and a
                                  ``quantization_config`` (quant_method "bivlm", per-layer layouts): with
                                  bivlm_kernels imported, ``AutoModel*.from_pretrained(path)`` loads it
    path/generation_config.json   when the model has one
    path/quantization.json        format name/version, bivlm_kernels version, model class, dtype,
                                  the QuantConfig and the per-layer report
    path/model.safetensors        every tensor, packed QuantLinear buffers included, with the layout of each
                                  quantized layer in its header (bivlm_kernels.checkpoint)
    (processor / tokenizer files when a processor is passed)

``load_quantized`` rebuilds the model from ``config.json`` (without random init), swaps in empty
``QuantLinear`` layers of the recorded layout and loads the tensors strictly: the loaded model gives the same
outputs bit for bit.

Safety (:mod:`bivlm_kernels.checkpoint.safe_write`): an empty path, the current directory, a filesystem root or the home
directory is refused; ``overwrite=True`` replaces only a bivlm checkpoint (a valid ``quantization.json``) or an
empty directory; the swap restores the old checkpoint if installing the new one fails. Leftovers of an
interrupted save, ``NAME.partial-*`` and ``NAME.old-*`` beside ``path``, are removed by the next successful
save of ``NAME`` (``NAME.old-*`` only by one with ``overwrite=True``).
"""
from __future__ import annotations

import json
import os
import shutil

from torch import nn

from .. import formats
from ..formats import DTYPES_BY_NAME
from ..nn import QuantLinear
from . import file as checkpoint, safe_write
from .hf_config import quantization_config

QUANT_FILE = "quantization.json"
WEIGHTS_FILE = "model.safetensors"


def _model_dtype(model: nn.Module) -> str:
    for p in model.parameters():
        if p.dtype.is_floating_point:
            return str(p.dtype).replace("torch.", "")
    return "float32"


def _add_hf_quantization_config(config_file: str, model: nn.Module, dtype: str) -> None:
    """``architectures`` and the ``quantization_config`` that lets ``from_pretrained`` rebuild the QuantLinear
    layers (:mod:`bivlm_kernels.integrations.hf_quantizer`), added to the ``config.json`` that ``save_pretrained`` wrote."""
    with open(config_file) as f:
        cfg = json.load(f)
    cfg["architectures"] = [type(model).__name__]
    cfg["quantization_config"] = quantization_config(checkpoint.quant_layout(model), dtype)
    with open(config_file, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")


def save_quantized(model: nn.Module, path: str, *, overwrite: bool = False, config=None, report=None,
                   processor=None) -> str:
    """Write the quantized ``model`` to the directory ``path``; return ``path``.

    ``config`` / ``report`` default to what :func:`quantize_model` recorded on the model. ``processor``
    (optional) is saved beside it. An existing ``path`` is an error unless ``overwrite=True``, and even then
    only a bivlm checkpoint directory or an empty directory is replaced (see the module docstring).
    """
    from .. import __version__
    if not any(isinstance(m, QuantLinear) for m in model.modules()):
        raise ValueError(f"{type(model).__name__} contains no QuantLinear layer; quantize it first "
                         f"(bivlm_kernels.quant.quantize_model)")
    if not hasattr(model, "config") or not hasattr(model.config, "save_pretrained"):
        raise TypeError(f"save_quantized needs a Hugging Face model with a .config; "
                        f"got {type(model).__name__} (use bivlm_kernels.checkpoint.save for other modules)")
    path = safe_write.check_output_path(path)
    safe_write.check_replaceable(path, overwrite, is_checkpoint_dir, what="checkpoint directory")
    recorded = getattr(model, "bivlm_quantization", {}) or {}
    if config is not None and hasattr(config, "to_dict"):
        config = config.to_dict()
    if report is not None and hasattr(report, "to_dict"):
        report = report.to_dict()
    cls = type(model)
    meta = {
        "format": formats.FORMAT_NAME, "format_version": formats.layout_version(checkpoint.quant_layout(model)),
        "bivlm_kernels_version": __version__,
        "model_class": cls.__name__, "model_module": cls.__module__,
        "dtype": _model_dtype(model),
        "quant_config": config if config is not None else recorded.get("config"),
        "report": report if report is not None else recorded.get("report"),
    }
    tmp = safe_write.make_partial_dir(path)
    try:
        model.config.save_pretrained(tmp)
        _add_hf_quantization_config(os.path.join(tmp, "config.json"), model, checkpoint._layer_dtype(model))
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(tmp)
        if processor is not None:
            processor.save_pretrained(tmp)
        checkpoint.save(model, os.path.join(tmp, WEIGHTS_FILE),
                        extra_metadata={"quant_config": json.dumps(meta["quant_config"])})
        with open(os.path.join(tmp, QUANT_FILE), "w") as f:      # written last: its presence means complete
            json.dump(meta, f, indent=2)
        safe_write.fsync_tree(tmp)
        # Checked again right before the swap: the path may have changed while we wrote.
        safe_write.check_replaceable(path, overwrite, is_checkpoint_dir, what="checkpoint directory")
        safe_write.install_dir(tmp, path)
        tmp = None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    safe_write.clean_leftovers(path, is_checkpoint_dir, include_old=overwrite)
    return path


def is_checkpoint_dir(path: str) -> bool:
    """Whether ``path`` is a directory holding a ``quantization.json`` of this package (any format version):
    what ``overwrite=True`` may replace."""
    qfile = os.path.join(path, QUANT_FILE)
    if not os.path.isdir(path) or os.path.islink(path) or not os.path.isfile(qfile):
        return False
    try:
        with open(qfile) as f:
            info = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(info, dict) and info.get("format") == formats.FORMAT_NAME


def _leftovers(path: str) -> list:
    parent, base = os.path.split(os.path.abspath(path))
    try:
        return sorted(e for e in os.listdir(parent) if e.startswith(base + ".old-"))
    except OSError:
        return []


# quantization.json fields and their types (None allowed where listed)
_INFO_TYPES = {"model_class": (str,), "model_module": (str, type(None)), "dtype": (str,),
               "bivlm_kernels_version": (str, type(None)), "quant_config": (dict, type(None)),
               "report": (dict, type(None))}


def read_quant_info(path: str) -> dict:
    """``quantization.json`` of a checkpoint directory, with the format name and version checked."""
    qfile = os.path.join(path, QUANT_FILE)
    if not os.path.isdir(path):
        old = _leftovers(path)
        hint = (f"; an interrupted save left the previous checkpoint as {old[-1]!r} beside it: rename it back"
                if old else "")
        raise FileNotFoundError(f"no quantized checkpoint directory at {path!r}{hint}")
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
    if isinstance(info.get("format_version"), bool) or not isinstance(info.get("format_version"), int):
        raise ValueError(f"{qfile!r} has format_version {info.get('format_version')!r}; expected an int, one "
                         f"of {list(formats.READ_VERSIONS)}")
    formats.check_version(info["format_version"], repr(qfile))
    for key in ("model_class", "dtype"):
        if key not in info:
            raise ValueError(f"{qfile!r} lacks {key!r}")
    for key, types in _INFO_TYPES.items():
        if key in info and not isinstance(info[key], types):
            raise ValueError(f"{qfile!r}: {key!r} must be "
                             f"{' or '.join('null' if t is type(None) else t.__name__ for t in types)}, "
                             f"got {type(info[key]).__name__} {info[key]!r:.80}")
    if info["dtype"] not in DTYPES_BY_NAME:
        raise ValueError(f"{qfile!r} has dtype {info['dtype']!r}; expected one of {list(DTYPES_BY_NAME)}")
    return info


def _model_class(info: dict):
    import transformers
    name = info["model_class"]
    cls = getattr(transformers, name, None)     # only classes transformers exports: no arbitrary imports
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        if cls is not None:
            raise ValueError(f"{QUANT_FILE}: model_class {name!r} is not a transformers model class "
                             f"(transformers.{name} is a {type(cls).__name__})")
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
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as e:                       # missing / malformed config.json
        raise ValueError(f"{path!r}: config.json cannot be read ({type(e).__name__}: {e})") from None
    dtype = DTYPES_BY_NAME.get(info["dtype"])
    if dtype is None:
        raise ValueError(f"{QUANT_FILE} has dtype {info['dtype']!r}; expected one of {list(DTYPES_BY_NAME)}")
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
