"""bivlm_kernels: packed 1/2/4-bit weights, kernels and drop-in layers for ultra-low-bit VLM quantization.

Importing needs neither a GPU nor the compiled extension and queries no device: kernels load on first use.
"""
from . import formats, ops
from .backends import reference as _reference  # noqa: F401,E402  (registers the oracle kernels)
from .formats import FORMAT_NAME, FORMAT_VERSION, QuantizedSegment, QuantizedWeight, bits_per_weight
from .nn import QuantLinear, quantize_linears_, rtn_quantize

__version__ = "0.1.0"

# `from_pretrained` of bivlm checkpoints: registers the transformers quantizer once transformers is imported
# (no transformers import here).
from .integrations import hf_quantizer as _hf_quantizer  # noqa: E402

_hf_quantizer.install()

__all__ = ["formats", "ops", "QuantLinear", "quantize_linears_", "rtn_quantize", "QuantizedWeight",
           "QuantizedSegment", "bits_per_weight", "FORMAT_NAME", "FORMAT_VERSION", "save_quantized",
           "load_quantized", "__version__"]


def __getattr__(name):
    # The quantizer (and transformers behind it) is imported only when these are asked for.
    if name in ("save_quantized", "load_quantized"):
        from . import quant
        return getattr(quant, name)
    raise AttributeError(f"module 'bivlm_kernels' has no attribute {name!r}")
