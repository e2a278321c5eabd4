"""Quantization methods; importing this package registers them (``get_method("rtn" | "gptq" | "billm" |
"bivlm" | "gtq", **options)``)."""
from . import billm, bivlm, gptq, gtq, rtn  # noqa: F401  (registration side effect)
from .billm import BiLLM, BiLLMConfig, BiLLMResult, billm_quantize
from .bivlm import BiVLM, BiVLMConfig, bivlm_quantize
from .gptq import GPTQ, GPTQConfig, gptq_quantize
from .gtq import GTQ, GTQConfig, gtq_quantize
from .rtn import RTN

__all__ = ["RTN", "GPTQ", "GPTQConfig", "gptq_quantize", "BiLLM", "BiLLMConfig", "BiLLMResult", "billm_quantize",
           "BiVLM", "BiVLMConfig", "bivlm_quantize", "GTQ", "GTQConfig", "gtq_quantize"]
