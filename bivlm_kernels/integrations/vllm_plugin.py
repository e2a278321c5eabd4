"""vLLM plugin: a ``bivlm`` quantization config and linear method over the packed buffers and the ``bivlm`` ops.

Registered through the ``vllm.general_plugins`` entry point (``setup.py``), so ``vllm serve DIR`` finds
``quant_method: "bivlm"`` in a checkpoint written by ``save_quantized``. Importing this module imports vLLM;
nothing else in the package does.

What it supports (and refuses, with a message naming the layer):

* tensor parallel size 1 (the packed codes and per-group tables are not split across ranks yet);
* every quantized layer of the checkpoint; layers not in the layout stay vLLM's unquantized linears;
* vLLM's fused layers (``qkv_proj`` = q/k/v, ``gate_up_proj`` = gate/up) when their parts share one layout
  without a permutation: the parts' rows are then simply stacked along N. Layouts with a column permutation
  (BiLLM / Bi-VLM ``bits=1``) in a fused layer would need one perm per part and are refused.

Each layer gets a ``segments.0`` submodule holding ``qweight`` and ``codebook`` (lut) or ``scales`` /
``zeros`` (affine) as parameters, named as in the checkpoint, plus a row-offset weight loader for the fused
parts. ``apply`` calls the same ``bivlm`` ops as ``QuantLinear`` (decode kernels for small M, dequantize +
GEMM for large M on CUDA; the CPU kernels or the reference on CPU).
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .. import formats, ops
from ..formats.validation import check_layer_tensors
from ..checkpoint.hf_config import QUANT_METHOD, check_quantization_config

# vLLM's fused linears -> the checkpoint's (HF) module names of their parts, in vLLM's shard order.
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
_SHARD = {"q": 0, "k": 1, "v": 2}


def register() -> None:
    """The ``vllm.general_plugins`` entry point: registers the config class with vLLM (idempotent)."""
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, register_quantization_config
    if QUANT_METHOD not in QUANTIZATION_METHODS:
        register_quantization_config(QUANT_METHOD)(_config_class())


def _config_class():
    from vllm.model_executor.layers.linear import LinearBase, LinearMethodBase, UnquantizedLinearMethod
    method_cls = type("BivlmLinearMethod", (_LinearMethod, LinearMethodBase), {})
    from vllm.model_executor.layers.quantization.base_config import QuantizationConfig

    class BivlmVllmConfig(QuantizationConfig):
        """``quantization_config`` of a bivlm checkpoint (see :mod:`bivlm_kernels.integrations.hf_quantizer`)."""

        def __init__(self, layers: dict, dtype: str):
            super().__init__()
            self.layers, self.dtype = dict(layers), dtype

        def get_name(self):
            return QUANT_METHOD

        def get_supported_act_dtypes(self):
            return [torch.float16, torch.bfloat16, torch.float32]

        @classmethod
        def get_min_capability(cls):
            return 70

        @staticmethod
        def get_config_filenames():
            return []

        @classmethod
        def from_config(cls, config: dict):
            check_quantization_config(config)          # the same check as transformers' side
            return cls(config["layers"], config["dtype"])

        def apply_vllm_mapper(self, hf_to_vllm_mapper):
            mapped = {}
            for name, d in self.layers.items():
                new = hf_to_vllm_mapper._map_name(name)
                if new is not None:
                    mapped[new] = d
            self.layers = mapped

        def get_quant_method(self, layer, prefix: str):
            if not isinstance(layer, LinearBase):
                return None
            specs = part_specs(self.layers, prefix)
            if specs is None:
                return UnquantizedLinearMethod()
            return method_cls(specs, prefix)

    return BivlmVllmConfig


def part_specs(layers: dict, prefix: str):
    """The LayerSpecs of the checkpoint layers behind vLLM layer ``prefix`` (one, or the parts of a fused
    layer in shard order); ``None`` when the layer is not quantized. Refuses partially quantized fused layers."""
    if prefix in layers:
        return [formats.LayerSpec.from_dict(layers[prefix])]
    parent, _, leaf = prefix.rpartition(".")
    parts = FUSED.get(leaf)
    if parts is None:
        return None
    names = [f"{parent}.{p}" if parent else p for p in parts]
    found = [n in layers for n in names]
    if not any(found):
        return None
    if not all(found):
        raise ValueError(f"bivlm: {prefix} fuses {names}, but only {[n for n, f in zip(names, found) if f]} "
                         f"are quantized in the checkpoint; quantize all parts or none")
    return [formats.LayerSpec.from_dict(layers[n]) for n in names]


def _check_fusable(specs, prefix):
    s0 = specs[0]
    for s in specs:
        if s.has_perm or len(s.segments) != 1:
            raise ValueError(f"bivlm: {prefix}: layers with a column permutation or several segments (the "
                             f"sub-2-bit layout of BiLLM / Bi-VLM bits=1) are not supported in vLLM yet")
        if s.segments[0].table_bits:
            raise ValueError(f"bivlm: {prefix}: compressed tables (format v2, table_bits="
                             f"{s.segments[0].table_bits}) are not supported in vLLM yet; load the checkpoint with "
                             f"transformers / load_quantized")
        if (s.in_features, s.group_size, s.segments[0].bits, s.segments[0].kind) != \
                (s0.in_features, s0.group_size, s0.segments[0].bits, s0.segments[0].kind):
            raise ValueError(f"bivlm: {prefix}: the fused parts have different layouts "
                             f"({[(s.segments[0].bits, s.group_size) for s in specs]}); cannot stack them")


class _LinearMethod:
    """vLLM linear method over one packed segment (fused parts stacked along N); mixed into vLLM's
    ``LinearMethodBase`` when registered."""

    def __init__(self, specs, prefix: str):
        _check_fusable(specs, prefix)
        self.specs, self.prefix = specs, prefix
        seg = specs[0].segments[0]
        self.bits, self.kind, self.group_size = seg.bits, seg.kind, specs[0].group_size

    def create_weights(self, layer, input_size_per_partition, output_partition_sizes, input_size, output_size,
                       params_dtype, **extra):
        from vllm.distributed import get_tensor_model_parallel_world_size
        if get_tensor_model_parallel_world_size() != 1:
            raise ValueError("bivlm: tensor parallel size > 1 is not supported yet (packed codes and group "
                             "tables are not split across ranks)")
        want = [s.out_features for s in self.specs]
        if list(output_partition_sizes) != want or input_size_per_partition != self.specs[0].in_features:
            raise ValueError(f"bivlm: {self.prefix}: vLLM builds outputs {list(output_partition_sizes)} x "
                             f"{input_size_per_partition} inputs, the checkpoint has {want} x "
                             f"{self.specs[0].in_features}")
        n = sum(want)
        seg_spec = self.specs[0].segments[0]
        offsets = [sum(want[:i]) for i in range(len(want))]
        seg = nn.Module()
        for name, shape in seg_spec.buffer_shapes(n, self.group_size).items():
            dt = torch.int32 if name in formats.INT_BUFFERS else params_dtype
            p = nn.Parameter(torch.empty(shape, dtype=dt), requires_grad=False)
            p.weight_loader = _row_loader(offsets, want, self.prefix, name)
            seg.register_parameter(name, p)
        layer.segments = nn.ModuleList([seg])

    def apply(self, layer, x, bias=None):
        p = layer.segments[0]
        if self.kind == "lut":
            return ops.lut_linear(x, p.qweight, p.codebook, self.bits, self.group_size, bias)
        return ops.affine_linear(x, p.qweight, p.scales, p.zeros, self.bits, self.group_size, bias)

    def process_weights_after_loading(self, layer):
        """The checkpoint's content, checked as every other load path checks it (``check_layer_tensors``), on
        the fused layer's rows."""
        spec = dataclasses.replace(self.specs[0], out_features=sum(sp.out_features for sp in self.specs))
        tensors = {f"segments.0.{name}": t for name, t in layer.segments[0].named_parameters()}
        check_layer_tensors(spec, tensors, label=lambda name: f"bivlm: {self.prefix}: {name.rsplit('.', 1)[-1]}")


def _row_loader(offsets, sizes, prefix, name):
    """Weight loader: copies one checkpoint part (or the whole, unfused tensor) into its rows."""
    def load(param, loaded, shard_id=None):
        if shard_id is None:
            i = 0 if len(sizes) == 1 else None
            if i is None:
                if loaded.shape != param.shape:
                    raise ValueError(f"bivlm: {prefix}.{name}: fused tensor {tuple(loaded.shape)} does not "
                                     f"match {tuple(param.shape)}")
                param.data.copy_(loaded)
                return
        else:
            i = _SHARD[shard_id] if isinstance(shard_id, str) else int(shard_id)
        rows = slice(offsets[i], offsets[i] + sizes[i])
        if loaded.shape != param.data[rows].shape or loaded.dtype != param.dtype and name == "qweight":
            raise ValueError(f"bivlm: {prefix}.{name} part {shard_id!r}: got {tuple(loaded.shape)} "
                             f"{loaded.dtype}, expected {tuple(param.data[rows].shape)} {param.dtype}")
        param.data[rows].copy_(loaded)
    return load
