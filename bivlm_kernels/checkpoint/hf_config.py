"""The ``quantization_config`` a bivlm checkpoint writes into ``config.json`` and its one check: read by
``load_quantized``, by the transformers integration and by the vLLM plugin (integrations import it from here, not
from each other)."""
from __future__ import annotations

from .. import formats
from .file import check_layout

QUANT_METHOD = "bivlm"


def check_quantization_config(cfg: dict) -> None:
    """The one check of a ``quantization_config`` (format name and version, table dtype, per-layer layouts),
    used by the transformers config above and by the vLLM plugin."""
    fmt, version = cfg.get("format"), cfg.get("format_version")
    if fmt != formats.FORMAT_NAME:
        raise ValueError(f"quantization_config: format {fmt!r}; this bivlm_kernels reads {formats.FORMAT_NAME!r}")
    formats.check_version(version, "quantization_config")
    if cfg.get("dtype") not in formats.DTYPES_BY_NAME:
        raise ValueError(f"quantization_config: dtype must be one of {list(formats.DTYPES_BY_NAME)}, "
                         f"got {cfg.get('dtype')!r}")
    layers = cfg.get("layers")
    if not layers:
        raise ValueError("quantization_config: 'layers' must map module names to layer layouts, got "
                         f"{layers!r}")
    check_layout(layers, "quantization_config: 'layers'", "quantization_config: layer")


def quantization_config(layout: dict, dtype: str) -> dict:
    """The ``quantization_config`` dict ``save_quantized`` writes into ``config.json``."""
    return {"quant_method": QUANT_METHOD, "format": formats.FORMAT_NAME,
            "format_version": formats.layout_version(layout),
            "dtype": dtype, "layers": layout}
