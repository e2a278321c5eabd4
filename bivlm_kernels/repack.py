"""Load-time repack of 1-bit lut weights for the tensor-core GEMV (``csrc/gemv_tc.cuh``): layout "tc1".

Checkpoints keep the neutral ``bivlm-packed`` v1 layout (:mod:`bivlm_kernels.formats`); the CUDA backend builds
this repack on the first call (cached by :mod:`bivlm_kernels.repack_cache`). Pure PyTorch, any device.

Codes
=====

The weight is cut into m16 tiles (16 output rows; rows padded to a multiple of 64 with code 0) and 256-k chunks
(k padded with code 0). Each (tile, chunk) is 512 bytes: 16 bytes per lane of a warp, lane = 4 gid + t::

    qtc  int32 [tiles, chunks, 32 lanes, 4 words]

Word w of a lane holds the codes of k16 steps s = 4w + i (i = 0..3) of rows gid (r = 0) and gid + 8 (r = 1). With
j = 2i + r, the kernel shifts the word left by 2j and reads bits 14, 30 (the P register) and 15, 31 (the Q
register); so, before the shift, those are bits 14 - 2j, 30 - 2j, 15 - 2j, 31 - 2j. Step s covers the 32-k pair
p = s // 2 half hs = s % 2, and its four codes of this lane are the real columns ::

    kbase = 256 chunk + 32 p + 8 t + 4 hs
    bit 14 - 2j : column kbase + 0        bit 30 - 2j : kbase + 1        (P: mma columns 2t, 2t + 1)
    bit 15 - 2j : column kbase + 2        bit 31 - 2j : kbase + 3        (Q: mma columns 2t + 8, 2t + 9)

    word w:  bit 31 30 29 28 ...  17 16 | 15 14 13 12 ...  1  0
             j:  0  0  1  1  ...   7  7 |  0  0  1  1  ...  7  7      (j = 2i + r: step 4w + i, row gid + 8r)
             +   3  1  3  1  ...   3  1 |  2  0  2  0  ...  2  0      (column offset from kbase)

so that lane t of the mma's B operand reads the 8 consecutive activations 32 p + 8 t .. + 7 of a row of x with
one 16-byte load for two steps, and every row's "Q" columns are the same (k % 4 in {2, 3}).

Tables
======

    table  [tiles + 1, tgroups, 8, 2, 2]  (dtype of the codebook)
           [tile, group, gid, r, e] = codebook[16 tile + gid + 8 r, group, e];  tile `tiles` is all zeros: lanes
           whose group slot is not the current step's read their B operand (x) from there

tgroups = groups of the padded k, rounded up to a multiple of 8 (the kernel's group slots); padding is 0. A lane
reads the (c0, c1) of its two rows gid, gid + 8 with one 8-byte load.
"""
from __future__ import annotations

import functools
from typing import Tuple

import torch

from . import formats

TC_GROUP_SIZES = (64, 128)
TC_DTYPES = (torch.float16, torch.bfloat16)


def tc_tiles(n: int) -> int:
    return (-(-n // 16) + 3) // 4 * 4


def tc_chunks(k: int) -> int:
    return -(-k // 256)


def tc_table_groups(k: int, g: int) -> int:
    return (tc_chunks(k) * 256 // g + 7) // 8 * 8


def tc_supported(bits: int, group_size: int, dtype: torch.dtype) -> bool:
    """The formats the tensor-core kernel covers (the C ABI's gemv_tc_supported)."""
    return bits == 1 and group_size in TC_GROUP_SIZES and dtype in TC_DTYPES


@functools.lru_cache(maxsize=None)
def _bit_map() -> Tuple[torch.Tensor, torch.Tensor]:
    """(row in tile, column in chunk) of every (lane, word, bit) of a (tile, chunk): two int64 [32, 4, 32]."""
    row = torch.empty(32, 4, 32, dtype=torch.int64)
    col = torch.empty(32, 4, 32, dtype=torch.int64)
    for lane in range(32):
        gid, t = lane >> 2, lane & 3
        for w in range(4):
            for i in range(4):
                s = 4 * w + i
                kbase = 32 * (s // 2) + 8 * t + 4 * (s % 2)
                for r in range(2):
                    j = 2 * i + r
                    for bit, off in ((14 - 2 * j, 0), (30 - 2 * j, 1), (15 - 2 * j, 2), (31 - 2 * j, 3)):
                        row[lane, w, bit] = gid + 8 * r
                        col[lane, w, bit] = kbase + off
    return row, col


def _codes_tiled(codes: torch.Tensor, tiles: int, chunks: int) -> torch.Tensor:
    n, k = codes.shape
    padded = torch.zeros(tiles * 16, chunks * 256, dtype=torch.uint8, device=codes.device)
    padded[:n, :k] = codes
    return padded.view(tiles, 16, chunks, 256)


_ROWS_PER_PASS = 4096   # bounds the temporaries of a repack (a few bytes per weight of one pass)


def repack_tc1(qweight: torch.Tensor, codebook: torch.Tensor, k: int, group_size: int):
    """(qtc int32 [tiles, chunks, 32, 4], table [tiles, tgroups, 8, 2, 2]) of a 1-bit lut weight."""
    n = qweight.shape[0]
    if codebook.dim() != 3 or codebook.shape[0] != n or codebook.shape[2] != 2 or k % group_size:
        raise ValueError(f"repack_tc1 needs a 1-bit codebook [N, K/g, 2] with K % g == 0; got codebook "
                         f"{tuple(codebook.shape)}, N={n}, K={k}, g={group_size}")
    tiles, chunks, tg = tc_tiles(n), tc_chunks(k), tc_table_groups(k, group_size)
    row, col = (t.to(qweight.device) for t in _bit_map())
    qtc = torch.empty(tiles, chunks, 32, 4, dtype=torch.int32, device=qweight.device)
    for r0 in range(0, tiles * 16, _ROWS_PER_PASS):       # a multiple of 64 rows: whole tiles per pass
        r1 = min(r0 + _ROWS_PER_PASS, tiles * 16)
        rows = formats.unpack(qweight[r0:min(r1, n)], 1, k) if r0 < n else qweight.new_zeros(0, k)
        codes = _codes_tiled(rows, (r1 - r0) // 16, chunks).permute(0, 2, 1, 3)   # [T, C, 16, 256]
        words = torch.zeros(codes.shape[0], chunks, 32, 4, dtype=torch.int64, device=qweight.device)
        for b in range(32):                                   # words |= code << b, one bit position at a time
            words |= codes[:, :, row[..., b], col[..., b]].to(torch.int64) << b
        qtc[r0 // 16:r1 // 16] = torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)
    table = torch.zeros((tiles + 1) * 16, tg, 2, dtype=codebook.dtype, device=codebook.device)
    table[:n, : codebook.shape[1]] = codebook                # tile `tiles`: zeros, the kernel's zero source
    table = table.view(tiles + 1, 2, 8, tg, 2).permute(0, 3, 2, 1, 4).contiguous()        # [T, G, gid, r, e]
    return qtc, table


def unrepack_tc1(qtc: torch.Tensor, table: torch.Tensor, n: int, k: int, group_size: int):
    """The v1 (qweight, codebook) of a tc1 repack: the inverse of :func:`repack_tc1` (tests, the reference)."""
    tiles, chunks = qtc.shape[0], qtc.shape[1]
    table = table[:tiles]
    row, col = _bit_map()
    words = qtc.to(torch.int64) & 0xFFFFFFFF
    bits = (words.unsqueeze(-1) >> torch.arange(32, device=qtc.device)) & 1                # [T, C, 32, 4, 32]
    codes = torch.zeros(tiles, chunks, 16, 256, dtype=torch.int64, device=qtc.device)
    codes[:, :, row.to(qtc.device), col.to(qtc.device)] = bits
    codes = codes.permute(0, 2, 1, 3).reshape(tiles * 16, chunks * 256)[:n, :k]
    codebook = table.permute(0, 3, 2, 1, 4).reshape(tiles * 16, table.shape[1], 2)[:n, : k // group_size]
    return formats.pack(codes, 1), codebook.contiguous()
