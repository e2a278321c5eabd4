"""The packed weight format ``bivlm-packed`` (versions 1 and 2): spec, pack/unpack, dequantize, honest bit count.

Version 2 adds two things and changes nothing of version 1 (a version-1 file loads unchanged, and a layout that
uses neither is still written as version 1): group size 16 for 2- and 4-bit segments, and **compressed tables**
(a segment's codebooks or scales stored as 4-, 6- or 8-bit integers on a per-row float grid, specified and drawn in
:mod:`bivlm_kernels.formats.tables`). Kernels read the float tables below; a compressed segment is expanded to them.

Pure PyTorch, no GPU needed. Every kernel (CUDA, Triton) and the reference op read exactly this layout; kernels
may repack at load time, checkpoints never do.

Spec
====

A linear layer ``y = x @ W.T + b`` with ``N = out_features`` and ``K = in_features`` is stored as

* an optional column permutation ``perm`` (int32 ``[K]``): the layer computes on ``x[..., perm]``;
* one or more **segments** that split the (permuted) K axis into consecutive column ranges, each with its own
  bit width. A single-segment layer covers all of K. Mixed segments are how salient columns get 2 bits while
  the rest get 1 bit: ``y = sum_s x[..., perm][..., k0_s:k1_s] @ W_s.T`` (accumulated in fp32);
* an optional ``bias`` ``[N]`` (not counted as weight bits: an fp16 ``nn.Linear`` has it too).

Each segment of width ``Ks`` (a multiple of ``group_size``), ``b`` bits, holds::

    qweight   int32  [N, ceil(Ks * b / 32)]   codes packed along K, least significant bits first
    kind "lut"    (b in {1, 2}):  codebook  float [N, Ks / g, 2**b]      w[n, k] = codebook[n, k // g, code]
    kind "affine" (b = 4):        scales    float [N, Ks / g]
                                  zeros     float [N, Ks / g]            w[n, k] = (code - zeros[n, k // g])
                                                                                    * scales[n, k // g]

"float" is the layer's dtype (fp16, bf16 or fp32), the same for every floating buffer of a layer.

Bit layout of one int32 word (bit 31 on the left). Column ``k`` of a row sits in word ``k // (32 // b)`` at bit
``(k % (32 // b)) * b``; unused high bits of the last word of a row (when ``Ks * b`` is not a multiple of 32)
are zero::

    b = 1:  | c31 | c30 | ... | c2 | c1 | c0 |          32 codes, 1 bit each
    b = 2:  | c15 | c14 | ... |  c1  |  c0  |           16 codes, 2 bits each (c0 = bits 1..0)
    b = 4:  |  c7  |  c6  | ... |  c1  |  c0  |         8 codes, 4 bits each  (c0 = bits 3..0)

Value mapping of codes:

* ``lut``, b = 1: code 0 -> ``codebook[..., 0]``, code 1 -> ``codebook[..., 1]``. Binarizers of this package
  write ``(mu - alpha, mu + alpha)``, so code 1 is the larger value (``w >= mu``).
* ``lut``, b = 2: code c -> ``codebook[..., c]``; any 4 values (residual binarization ``mu +- a1 +- a2``,
  Bi-VLM's bands ``mu +- a_in, mu +- a_out``, a uniform grid ...).
* ``affine``, b = 4: code c in 0..15 -> ``(c - zero) * scale``; ``zero`` is a float, not rounded.

Honest size: :func:`bits_per_weight` = (bytes of every buffer except bias) * 8 / (N * K), so it includes codes,
codebooks, scales, zeros (or compressed tables and their grids) and the permutation. For g = 128 and fp16:
1-bit lut 1.25, 2-bit lut 2.5, 4-bit affine 4.25 bits per weight; a perm adds 32 / N. Compressed (version 2),
2-bit g = 16 with a 4-bit (scale, min) grid per group: 2.5 + 32 / Ks.
"""
from __future__ import annotations

from __future__ import annotations

from . import tables
from .spec import (AFFINE_BITS, DTYPES_BY_NAME, FLOAT_DTYPES, FORMAT_NAME, FORMAT_VERSION, GROUP_SIZES, INT_BUFFERS,
                   KINDS, LUT_BITS, READ_VERSIONS, LayerSpec, SegmentSpec, check_bits, check_float_dtype,
                   check_group_size, check_int, check_version, layout_version, packed_width)
from .packing import (affine_values, dequantize_affine, dequantize_lut, lut_values, pack, unpack, unpermute)
from .weight import QuantizedSegment, QuantizedWeight, bits_per_weight, check_perm, segment_bounds

__all__ = ["tables", "AFFINE_BITS", "DTYPES_BY_NAME", "FLOAT_DTYPES", "FORMAT_NAME", "FORMAT_VERSION", "GROUP_SIZES",
           "INT_BUFFERS", "KINDS", "LUT_BITS", "READ_VERSIONS", "LayerSpec", "SegmentSpec", "check_bits",
           "check_float_dtype", "check_group_size", "check_int", "check_version", "layout_version", "packed_width",
           "affine_values", "dequantize_affine", "dequantize_lut", "lut_values", "pack", "unpack", "unpermute",
           "QuantizedSegment", "QuantizedWeight", "bits_per_weight", "check_perm", "segment_bounds"]
