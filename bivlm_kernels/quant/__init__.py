"""The quantizer: methods (Bi-VLM, BiLLM, GPTQ, RTN), the layer-sequential driver, checkpoints.

    from bivlm_kernels.quant import QuantConfig, quantize_model, save_quantized, load_quantized
    model, report = quantize_model(model, "gptq", calibration_batches)     # or a QuantConfig
    print(report)                                                          # per-layer table + totals
    save_quantized(model, "out/")
    model = load_quantized("out/")

Importing this package imports transformers only when a function needs it.
"""
from .base import METHODS, Method, MethodConfig, get_method, register_method
from .calibration import build_calibration_data, mix_calibration, mix_text_and_images
from .config import COMPONENTS, CalibrationConfig, ComponentConfig, QuantConfig, pick_group_size
from .driver import quantize_model
from ..checkpoint.directory import load_quantized, read_quant_info, save_quantized
from .report import LayerReport, QuantReport

from . import methods  # noqa: F401  (the methods register themselves in METHODS on import)
from .luq import SwapPair, layer_entropies, luq_quantize, select_layers

__all__ = ["METHODS", "Method", "MethodConfig", "get_method", "register_method", "COMPONENTS",
           "CalibrationConfig", "ComponentConfig", "QuantConfig", "pick_group_size", "quantize_model",
           "save_quantized", "load_quantized", "read_quant_info", "build_calibration_data",
           "mix_calibration", "mix_text_and_images", "LayerReport", "QuantReport", "luq_quantize", "layer_entropies",
           "select_layers", "SwapPair"]
