"""``QuantLinear``: a drop-in ``nn.Linear`` whose weight lives in the packed ``bivlm-packed`` format.

Buffers (all in ``state_dict``; float ones follow ``.half()`` / ``.to(dtype)``, int32 codes never change)::

    perm                      int32 [K]            optional: the layer computes on x[..., perm]
    segments.{i}.qweight      int32 [N, ceil(Ks*b/32)]
    segments.{i}.codebook     float [N, Ks/g, 2**b]          lut segments (b in {1, 2})
    segments.{i}.scales       float [N, Ks/g]                affine segments (b = 4)
    segments.{i}.zeros        float [N, Ks/g]
    segments.{i}.qtable       int32 [N, W]         compressed tables (format v2, table_bits > 0) instead of the
    segments.{i}.tgrid        float [N, 2]         three above: see bivlm_kernels.formats.tables
    bias                      float [N]            optional

A compressed segment's float tables are expanded on the first call and cached while its buffers are unchanged
(``repack_cache``; about the size of the version-1 tables, in memory only); every kernel reads the expansion.

Forward: ``y = sum_i op_i(x[..., perm][..., k0_i:k1_i]) + bias`` with fp32 accumulation across segments: one
``bivlm`` op call for a single-segment layer or an all-lut layout (``segmented_lut_linear``: the sub-2-bit
layout), else one call per segment.
"""
from __future__ import annotations

import logging
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from . import formats, ops
from .backends import repack_cache
from .formats import LayerSpec, QuantizedSegment, QuantizedWeight, SegmentSpec, tables, validation
from .formats.rtn import rtn_quantize

log = logging.getLogger(__name__)


class _Segment(nn.Module):
    """Packed buffers of one column range; holds no logic beyond calling its op."""

    def __init__(self, spec: SegmentSpec, n: int, group_size: int, dtype, device):
        super().__init__()
        self.bits, self.kind, self.width, self.group_size = spec.bits, spec.kind, spec.width, group_size
        self.table_bits, self.table_form = spec.table_bits, spec.table_form
        self._op_name = "lut_linear" if spec.kind == "lut" else "affine_linear"
        for name, shape in spec.buffer_shapes(n, group_size).items():
            dt = torch.int32 if name in formats.INT_BUFFERS else dtype
            self.register_buffer(name, torch.zeros(shape, dtype=dt, device=device))

    def tables(self) -> tuple:
        """The float tables the ops take: ``(codebook,)`` or ``(scales, zeros)``; compressed ones expanded."""
        b = self._buffers
        if not self.table_bits:
            return (b["codebook"],) if self.kind == "lut" else (b["scales"], b["zeros"])
        qt, grid = b["qtable"], b["tgrid"]
        expand = lambda: tables.expand(self.kind, self.table_form, self.bits, qt, grid,   # noqa: E731
                                       self.table_bits, self.width // self.group_size)
        if torch.compiler.is_compiling():
            return expand()
        return repack_cache.get("tables", (qt, grid), expand)

    @property
    def _op(self):
        # Looked up per call, not stored: a torch.ops handle does not pickle (torch.save(model) must work).
        return getattr(ops, self._op_name)

    def forward(self, x, bias=None, out_dtype=None):
        args = (x, self.qweight, *self.tables(), self.bits, self.group_size, bias, out_dtype)
        if torch.compiler.is_compiling() or (x.requires_grad and torch.is_grad_enabled()):
            return self._op(*args)                 # traceable / differentiable: through torch.ops.bivlm
        return ops.run(self._op_name, *args)       # eager inference: same checks and kernel, no dispatcher hop

    def dequantize(self) -> torch.Tensor:
        if self.kind == "lut":
            return ops.dequantize_lut(self.qweight, *self.tables(), self.bits, self.group_size)
        return ops.dequantize_affine(self.qweight, *self.tables(), self.bits, self.group_size)


class QuantLinear(nn.Module):
    """Linear layer with 1-, 2- or 4-bit packed weights (see :mod:`bivlm_kernels.formats`).

    ``QuantLinear(in_features, out_features, bits=1, group_size=128, bias=True, dtype=torch.float16)``
    allocates empty (zero) buffers of the right shapes, ready for ``load_state_dict``. For mixed bit widths pass
    ``segments=[(bits, width), ...]`` (widths along the permuted K, summing to ``in_features``) and
    ``perm=True`` if the checkpoint has a column permutation. Build filled layers with :meth:`from_linear`
    (round-to-nearest / sign binarization) or :meth:`from_quantized` (what the quantizer emits).
    """

    def __init__(self, in_features: int, out_features: int, bits: int = 1, group_size: int = 128,
                 bias: bool = True, dtype: torch.dtype = torch.float16, device=None,
                 segments: Optional[Sequence] = None, perm: bool = False):
        super().__init__()
        formats.check_float_dtype(dtype)
        if segments is None:
            segments = [(bits, in_features)]
        # Strict types: no int() before the check (bits=True or 2.7 would silently become 1 or 2).
        segs = tuple(s if isinstance(s, SegmentSpec) else SegmentSpec(s[0], s[1], formats.check_bits(s[0]))
                     for s in segments)
        for name, flag in (("bias", bias), ("perm", perm)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be True or False, got {type(flag).__name__}")
        self.spec = LayerSpec(in_features, out_features, group_size, segs, perm, bias)
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.segments = nn.ModuleList(_Segment(s, out_features, group_size, dtype, device) for s in segs)
        self._bounds = formats.segment_bounds([s.width for s in segs])
        # Thin eager path for the common layout (one segment, no perm): forward reads this segment's buffers
        # directly instead of going through two Module calls. Kept out of _modules (not a second child).
        self.__dict__["_seg0"] = self.segments[0] if len(segs) == 1 and not perm else None
        if perm:
            self.register_buffer("perm", torch.arange(in_features, dtype=torch.int32, device=device))
        else:
            self.perm = None
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device))
        else:
            self.bias = None

    @classmethod
    def from_spec(cls, spec: LayerSpec, dtype: torch.dtype = torch.float16, device=None) -> "QuantLinear":
        """Empty layer for a checkpoint's recorded layout (see ``LayerSpec.to_dict``)."""
        return cls(spec.in_features, spec.out_features, group_size=spec.group_size, bias=spec.has_bias,
                   dtype=dtype, device=device, segments=spec.segments, perm=spec.has_perm)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: Optional[torch.Tensor] = None,
                       dtype: Optional[torch.dtype] = None, device=None) -> "QuantLinear":
        """Pack a :class:`~bivlm_kernels.formats.QuantizedWeight` (codes + codebooks/scales, perm, segments).

        ``dtype`` defaults to the dtype of the first segment's codebook/scales.
        """
        if not isinstance(qw, QuantizedWeight) or not qw.segments:
            raise TypeError("qw must be a QuantizedWeight with at least one segment")
        first = qw.segments[0]
        dtype = dtype or (first.codebook if first.kind == "lut" else first.scales).dtype
        if any(s.table_bits and s.tgrid.dtype != dtype for s in qw.segments):
            raise ValueError(f"compressed tables must be built in the layer's dtype ({dtype}): their expansion is "
                             f"rounded to it, so casting the grid afterwards would change the weights")
        n = first.codes.shape[0]
        for i, s in enumerate(qw.segments):
            if not isinstance(s, QuantizedSegment) or s.codes.dim() != 2 or s.codes.shape[0] != n:
                raise ValueError(f"segments[{i}].codes must be [out_features={n}, width], "
                                 f"got {tuple(s.codes.shape)}")
        spec = qw.layer_spec(has_bias=bias is not None)
        device = device if device is not None else first.codes.device
        layer = cls.from_spec(spec, dtype=dtype, device=device)
        g = spec.group_size
        # Every table (and perm, bias) through the same content check load_state_dict applies.
        given = {"bias": bias} if bias is not None else {}
        if qw.perm is not None:
            given["perm"] = qw.perm
        for i, (seg, s) in enumerate(zip(layer.segments, qw.segments)):
            if s.table_bits:
                given[f"segments.{i}.qtable"] = tables.pack_fields(s.fields, s.table_bits)
                given[f"segments.{i}.tgrid"] = s.tgrid
                continue
            tabs = {"codebook": s.codebook} if s.kind == "lut" else {"scales": s.scales, "zeros": s.zeros}
            for name, t in tabs.items():
                buf = getattr(seg, name)
                if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(buf.shape):
                    raise ValueError(f"segments[{i}].{name} must have shape {list(buf.shape)} "
                                     f"(N, width/group_size={s.codes.shape[1] // g}, ...), "
                                     f"got {tuple(t.shape) if isinstance(t, torch.Tensor) else t!r}")
                given[f"segments.{i}.{name}"] = t
        validation.check_layer_tensors(spec, given, dtype=dtype, label=_argument_label)
        with torch.no_grad():
            for i, (seg, s) in enumerate(zip(layer.segments, qw.segments)):
                seg.qweight.copy_(formats.pack(s.codes, s.bits))
                names = ("qtable", "tgrid") if s.table_bits else ("codebook",) if s.kind == "lut" \
                    else ("scales", "zeros")
                for name in names:
                    getattr(seg, name).copy_(given[f"segments.{i}.{name}"])
            if qw.perm is not None:
                layer.perm.copy_(qw.perm.to(torch.int32))
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group_size: int = 128,
                    dtype: Optional[torch.dtype] = None) -> "QuantLinear":
        """Quantize an ``nn.Linear`` without calibration data.

        1 bit: per group ``mu = mean(w)``, ``alpha = mean|w - mu|``, code 1 where ``w >= mu`` (codebook
        ``(mu - alpha, mu + alpha)``). 2 bits: min-max uniform grid of 4 levels (as a codebook). 4 bits: min-max
        affine (``scale = (max - min) / 15``, ``zero = -min / scale``). For calibrated methods (GPTQ, BiLLM,
        Bi-VLM) use :mod:`bivlm_kernels.quant`.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        kind = formats.check_bits(bits)
        formats.check_group_size(group_size, linear.in_features, bits=bits)
        w = linear.weight.detach()
        if not torch.isfinite(w).all():
            raise ValueError("linear.weight contains NaN or inf; cannot quantize")
        # max - min of a group must itself be finite in fp32 (weights near +-3e38 overflow to inf -> NaN codes)
        wg = w.float().reshape(w.shape[0], -1, group_size)
        if not torch.isfinite(wg.amax(-1) - wg.amin(-1)).all():
            raise ValueError(f"linear.weight holds values up to {float(w.float().abs().max()):.3g}: the range of a "
                             f"group overflows float32, so it cannot be quantized")
        dtype = dtype or (w.dtype if w.dtype in formats.FLOAT_DTYPES else torch.float16)
        qw = rtn_quantize(w, bits, group_size, dtype)
        bias = None if linear.bias is None else linear.bias.detach().to(dtype)
        return cls.from_quantized(qw, bias=bias, dtype=dtype, device=w.device)

    # ------------------------------------------------------------------ use
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() == 0:
            raise ValueError(f"x must be a tensor [..., in_features={self.in_features}] with at least one "
                             f"dimension, got {'a 0-d tensor' if isinstance(x, torch.Tensor) else type(x).__name__}")
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x's last dimension must be in_features={self.in_features}, "
                             f"got shape {tuple(x.shape)}")
        seg0 = self._seg0
        if seg0 is not None and not torch.compiler.is_compiling() and \
                not (x.requires_grad and torch.is_grad_enabled()):
            # eager inference, one segment: straight to the op (tables() expands compressed tables, cached)
            return ops.run(seg0._op_name, x, seg0._buffers["qweight"], *seg0.tables(), seg0.bits, seg0.group_size,
                           self._buffers.get("bias"), None)
        segs = self.segments
        if len(segs) > 1 and all(seg.kind == "lut" for seg in segs):
            # The sub-2-bit layout (perm + 2-bit and 1-bit segments) in one op: perm applied to x once, one
            # fp32 accumulator (a single pass on the CPU kernels; per-segment kernels on other paths).
            args = (x, self.perm, [seg.qweight for seg in segs], [seg.tables()[0] for seg in segs],
                    [seg.bits for seg in segs], self.group_size, self.bias, None)
            if torch.compiler.is_compiling() or (x.requires_grad and torch.is_grad_enabled()):
                return ops.segmented_lut_linear(*args)
            return ops.run("segmented_lut_linear", *args)
        if self.perm is not None:
            x = x.index_select(-1, self.perm)
        if len(segs) == 1:
            return segs[0](x, self.bias)
        y = None
        for seg, (k0, k1) in zip(segs, self._bounds):
            part = seg(x[..., k0:k1], None, torch.float32)
            y = part if y is None else y + part
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype)

    @property
    def dtype(self) -> torch.dtype:
        s = self.segments[0]
        return (s.tgrid if s.table_bits else s.codebook if s.kind == "lut" else s.scales).dtype

    @property
    def weight_bits(self) -> float:
        """Honest bits per weight: every buffer but the bias (codes, codebooks, scales, zeros, perm)."""
        return formats.bits_per_weight(self)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight ``[N, K]``, read-only, for code that reads ``module.weight`` (e.g. to infer
        a dtype or device). COSTLY: it decodes the whole layer on every access and holds a dense copy; the
        forward never uses it. Assigning to it is an error (the layer stores packed codes only)."""
        return self.dequantize()

    @weight.setter
    def weight(self, value):
        raise AttributeError("QuantLinear.weight is read-only (dequantized on access); build a new layer with "
                             "QuantLinear.from_linear / from_quantized, or bivlm_kernels.nn.dequantize_model")

    def dequantize(self) -> torch.Tensor:
        """The weight ``[N, K]`` in original column order, in the layer's dtype."""
        return formats.unpermute(torch.cat([seg.dequantize() for seg in self.segments], dim=1), self.perm)

    def extra_repr(self) -> str:
        bits = "+".join(f"{s.bits}b{s.kind}x{s.width}" for s in self.spec.segments) \
            if len(self.spec.segments) > 1 else f"{self.spec.segments[0].bits}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={bits}, "
                f"group_size={self.group_size}, perm={self.perm is not None}, bias={self.bias is not None}, "
                f"dtype={str(self.dtype).replace('torch.', '')}, "
                f"format={formats.FORMAT_NAME}-v{self.spec.format_version}, "
                f"bits_per_weight={self.weight_bits:.3f}")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # The same shape, dtype and content check as from_quantized (perm a permutation, finite tables ...),
        # naming the checkpoint key: never a generic copy error or a layer that loads and computes garbage.
        given = {name: state_dict[prefix + name] for name, _ in self.named_buffers() if prefix + name in state_dict}
        validation.check_layer_tensors(self.spec, given, dtype=self.dtype,
                                       label=lambda name: f"checkpoint tensor {prefix + name!r}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


def _argument_label(name: str) -> str:
    """Buffer name -> the from_quantized argument it came from (``segments.0.codebook`` -> ``segments[0]...``)."""
    if name.startswith("segments."):
        _, i, rest = name.split(".", 2)
        return f"segments[{i}].{rest}"
    return "qw.perm" if name == "perm" else name


def quantize_linears_(model: nn.Module, bits: int, group_size: int = 128,
                      filter_fn: Optional[Callable[[str, nn.Linear], bool]] = None,
                      dtype: Optional[torch.dtype] = None) -> list:
    """Replace every ``nn.Linear`` of ``model`` (for which ``filter_fn(name, module)`` is true) in place by
    ``QuantLinear.from_linear``. Layers whose ``in_features`` is not a multiple of ``group_size`` are skipped
    with a log line. Returns the names of the replaced layers."""
    formats.check_bits(bits)
    formats.check_group_size(group_size)
    targets = [(name, m) for name, m in model.named_modules()
               if type(m) is nn.Linear and (filter_fn is None or filter_fn(name, m))]
    done = []
    for name, m in targets:
        if m.in_features % group_size:
            log.info("skipping %s: in_features=%d is not a multiple of group_size=%d", name, m.in_features,
                     group_size)
            continue
        replace_module(model, name, QuantLinear.from_linear(m, bits, group_size, dtype=dtype))
        done.append(name)
    return done


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule ``name`` (dotted path) of ``model`` is (the one swap helper)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


# ---------------------------------------------------------------------------------------------------------
# back to dense: for code that needs plain layers again (fine-tuning, export, a tool that reads .weight). The
# result computes what the packed model computed up to the kernel's summation order (the weight is exactly the
# dequantized one), and stores full-precision weights: the memory savings are gone.
# ---------------------------------------------------------------------------------------------------------

@torch.no_grad()
def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace, in place, each ``QuantLinear`` of ``model`` by an ``nn.Linear`` with the dequantized weight
    (in ``dtype``, default the layer's table dtype) and the same bias; returns ``model``. A bare
    ``QuantLinear`` passed as ``model`` is returned converted."""
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype or None, got {dtype!r}")
    if isinstance(model, QuantLinear):
        return _dense(model, dtype)
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, QuantLinear)]
    for name, ql in targets:
        replace_module(model, name, _dense(ql, dtype))
    if hasattr(model, "bivlm_quantization"):
        del model.bivlm_quantization
    return model


def _dense(ql: QuantLinear, dtype) -> nn.Linear:
    w = ql.dequantize()
    dtype = dtype or w.dtype
    lin = nn.Linear(ql.in_features, ql.out_features, bias=ql.bias is not None, device=w.device, dtype=dtype)
    lin.weight.copy_(w.to(dtype))
    if ql.bias is not None:
        lin.bias.copy_(ql.bias.to(dtype))
    lin.train(ql.training)
    return lin
