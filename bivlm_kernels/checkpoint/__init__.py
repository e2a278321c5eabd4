"""What is on disk: one ``.safetensors`` file with the layer layouts in its header (:mod:`.file`: ``save`` /
``load``), an HF-style directory that ``from_pretrained`` and vLLM read (:mod:`.directory`: ``save_quantized`` /
``load_quantized``), the ``quantization_config`` both write (:mod:`.hf_config`), and writes that never lose a
user's data (:mod:`.safe_write`). Below the quantizer: a checkpoint needs the layer (``nn``), never the quantizer.
"""
from .directory import QUANT_FILE, is_checkpoint_dir, load_quantized, read_quant_info, save_quantized
from .file import (RESERVED_KEYS, check_layout, is_checkpoint_file, load, quant_layout, read_layout, read_metadata,
                   save, swap_in_empty_layers)
from .hf_config import QUANT_METHOD, check_quantization_config, quantization_config

__all__ = ["QUANT_FILE", "is_checkpoint_dir", "load_quantized", "read_quant_info", "save_quantized", "RESERVED_KEYS",
           "check_layout", "is_checkpoint_file", "load", "quant_layout", "read_layout", "read_metadata", "save",
           "swap_in_empty_layers", "QUANT_METHOD", "check_quantization_config", "quantization_config"]
