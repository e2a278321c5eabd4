"""Load-time repacks of lut / affine weights for the tensor-core GEMVs: "tc1" (1 bit, ``csrc/cuda/gemv_tc1.cuh``),
"tc2" (2 bits, ``csrc/cuda/gemv_tc2.cuh``) and "tc4" (4-bit affine, ``csrc/cuda/gemv_tc4.cuh``), the last two at the
end of this file.

Checkpoints keep the neutral ``bivlm-packed`` v1 layout (:mod:`bivlm_kernels.formats`); the CUDA backend builds
this repack on the first call (cached by :mod:`bivlm_kernels.backends.repack_cache`). Pure PyTorch, any device.

tc1 codes
=========

The weight is cut into m16 tiles (16 output rows; rows padded to a multiple of 64 with code 0) and 256-k chunks
(k padded with code 0). Each (tile, chunk) is 512 bytes: 16 bytes per lane of a warp, lane = 4 gid + t. A warp's
4 tiles lie side by side per chunk (one pointer walks all four)::

    qtc  int32 [tiles, chunks, 32 lanes, 4 words], memory order [tiles / 4][chunks][4 tiles][32 lanes][4 words]

Word w of a lane feeds k16 steps s = 4w + i (i = 0..3), rows gid (r = 0) and gid + 8 (r = 1): A registers
reg = 2 j + r (j = 0: mma columns 2t, 2t + 1 = real columns kbase + 0, + 1; j = 1: 2t + 8, 2t + 9 = kbase + 2, + 3;
low half the even column), kbase = 256 chunk + 32 (s // 2) + 8 t + 4 (s % 2). The kernel reads the word through
four versions (fp16: q, q << 3, q << 8, rotl(q, 11); bf16: q << 2u) and takes register reg of step i from
version ver(i, reg) at bit position p(i, j) of both halves (p, p + 16), where a code bit gives v0 + 2 b:

    fp16  p = 15 (v0 = -1), 14 (0), 10 (2), 9 (4), 8 (8)        bf16  p = 15 (-1), 14 (0), 7 (2), 6 (4)

So the stored word is (i: step in the word, r: row gid + 8 r, +: column offset from kbase)::

    fp16  bit  31 30 29 28 27 26 25 24 23 22 21 20 19 18 17 16 | 15 14 13 12 11 10  9  8  7  6  5  4  3  2  1  0
          i     3  3  2  0  0  2  1  1  2  1  1  0  0  3  3  2 |  3  3  2  0  0  2  1  1  2  1  1  0  0  3  3  2
          r     1  1  1  0  0  0  0  0  1  1  1  1  1  0  0  0 |  1  1  1  0  0  0  0  0  1  1  1  1  1  0  0  0
          +     2  0  2  3  1  1  3  1  1  3  1  3  1  3  1  3 |  3  1  3  2  0  0  2  0  0  2  0  2  0  2  0  2

    bf16  bit  31 30 29 28 27 26 25 24 23 22 21 20 19 18 17 16 | 15 14 13 12 11 10  9  8  7  6  5  4  3  2  1  0
          i     0  0  0  0  1  1  1  1  2  2  2  2  3  3  3  3 |  0  0  0  0  1  1  1  1  2  2  2  2  3  3  3  3
          r     0  0  1  1  0  0  1  1  0  0  1  1  0  0  1  1 |  0  0  1  1  0  0  1  1  0  0  1  1  0  0  1  1
          +     3  1  3  1  3  1  3  1  1  3  1  3  1  3  1  3 |  2  0  2  0  2  0  2  0  0  2  0  2  0  2  0  2

so that lane t of the mma's B operand reads the 8 consecutive activations 32 p + 8 t .. + 7 of a row of x with
one 16-byte load for two steps, and v0 of a column depends on (k % 64) only (the kernel's prologue sums V = sum v0 x).

tc1 table
=========

``table`` has the codebook's dtype and shape [tiles + 1, tgroups, 8, 2, 4] (8 bytes per (row, group)); its bytes
are three regions::

    D    fp32    [tiles / 4][tgroups / 2][4 tiles][8 gid][2: group % 2][2: row gid, gid + 8]     D = c1 - c0
    A    dtype   [tiles][tgroups / 8][32 lanes][4 registers][2 halves]   (c0, c1), the A operand of the table
                 product: register 2 jj + r of lane 4 gid + t = (c0, c1) of row gid + 8 r, group 8 step + t + 4 jj
    0    one tile's worth of zeros: lanes whose group slot is not the current step's read their x from there

tgroups = groups of the padded k, rounded up to a multiple of 8; padding is 0. A lane reads D of its two rows for
two groups with one 16-byte load. The kernel streams both D and A: 64 bits per (row, group), 0.5 bit per weight
at g = 128 on top of the codes (the v1 format's table is 32 bits per (row, group)).
"""
from __future__ import annotations

import functools
from typing import Tuple

import torch

from ... import formats

TC_GROUP_SIZES = (64, 128)
TC_DTYPES = (torch.float16, torch.bfloat16)


def tc_tiles(n: int) -> int:
    return (-(-n // 16) + 3) // 4 * 4


def tc_chunks(k: int) -> int:
    return -(-k // 256)


def tc_table_groups(k: int, g: int) -> int:
    return (tc_chunks(k) * 256 // g + 7) // 8 * 8


def tc_supported(bits: int, group_size: int, dtype: torch.dtype) -> bool:
    """The formats the tensor-core kernels cover (the C ABI's gemv_tc_supported): lut 1, 2 and affine 4 bits."""
    return bits in (1, 2, 4) and group_size in TC_GROUP_SIZES and dtype in TC_DTYPES


def repack_tc(qweight, codebook, k: int, group_size: int):
    """The tensor-core repack of a 1- or 2-bit lut weight (by the codebook's entries)."""
    return (repack_tc1 if codebook.shape[-1] == 2 else repack_tc2)(qweight, codebook, k, group_size)


def unrepack_tc(qtc, table, n: int, k: int, group_size: int, bits: int):
    return (unrepack_tc1 if bits == 1 else unrepack_tc2)(qtc, table, n, k, group_size)


def repack_tables(bits: int, qweight, tables, k: int, group_size: int):
    """The tensor-core repack of a segment by bit width: tables = (codebook,) for lut, (scales, zeros) for affine."""
    if bits == 4:
        return repack_tc4(qweight, tables[0], tables[1], k, group_size)
    return repack_tc(qweight, tables[0], k, group_size)


# The decode plan of csrc/cuda/gemv_tc1.cuh (Tc1Plan): version u of a word and bit position p (lo half p, hi half
# p + 16) of A register reg = 2 j + r of step i (i = 0..3 of the word). Versions: fp16 q, q << 3, q << 8,
# rotl(q, 11); bf16 q << 2u.
def _tc1_ver(bf16: bool, i: int, reg: int) -> int:
    if bf16:
        return 2 * (i & 1) + (reg & 1)
    return ((3 if reg & 1 else 1), reg & 1, reg, 2 + (reg & 1))[i]


def _tc1_pos(bf16: bool, i: int, j: int) -> int:
    if bf16:
        return 14 + j if i < 2 else 7 - j
    return (14 + j, 8 + j, 8 if j else 10, 9 + j)[i]


def _tc1_source_bit(bf16: bool, u: int, b: int) -> int:
    """The bit of the stored word that lands at bit b of version u."""
    if bf16:
        return b - 2 * u
    return (b, b - 3, b - 8, (b - 11) % 32)[u]


@functools.lru_cache(maxsize=None)
def _bit_map(bf16: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """(row in tile, column in chunk) of every (lane, word, bit) of a tc1 (tile, chunk): two int64 [32, 4, 32]."""
    row = torch.full((32, 4, 32), -1, dtype=torch.int64)
    col = torch.full((32, 4, 32), -1, dtype=torch.int64)
    for lane in range(32):
        gid, t = lane >> 2, lane & 3
        for w in range(4):
            for i in range(4):
                s = 4 * w + i
                kbase = 32 * (s // 2) + 8 * t + 4 * (s % 2)
                for reg in range(4):
                    j, r = reg >> 1, reg & 1
                    u, p = _tc1_ver(bf16, i, reg), _tc1_pos(bf16, i, j)
                    for half in range(2):
                        bit = _tc1_source_bit(bf16, u, p + 16 * half)
                        assert 0 <= bit < 32 and row[lane, w, bit] < 0, "the tc1 plan must cover each bit once"
                        row[lane, w, bit] = gid + 8 * r
                        col[lane, w, bit] = kbase + 2 * j + half
    assert (row >= 0).all()
    return row, col


def _pack_codes(qweight: torch.Tensor, bits: int, k: int, chunk_k: int, row, col, cbit, width: int):
    """int32 [tiles, chunks, 32, 4] of a tile layout given by maps [32, 4, P] (lane, word, field): field p of a word
    is bits p * width .. + width - 1 and holds (code of (row, col) in the (tile, chunk)) >> cbit (cbit None: 0)."""
    n, dev = qweight.shape[0], qweight.device
    tiles, chunks = tc_tiles(n), -(-k // chunk_k)
    row, col = row.to(dev), col.to(dev)
    cbit = None if cbit is None else cbit.to(dev)
    mask = (1 << width) - 1
    qtc = torch.empty(tiles, chunks, 32, 4, dtype=torch.int32, device=dev)
    for r0 in range(0, tiles * 16, _ROWS_PER_PASS):        # a multiple of 64 rows: whole tiles per pass
        r1 = min(r0 + _ROWS_PER_PASS, tiles * 16)
        rows = formats.unpack(qweight[r0:min(r1, n)], bits, k) if r0 < n else qweight.new_zeros(0, k)
        codes = torch.zeros(r1 - r0, chunks * chunk_k, dtype=torch.uint8, device=dev)
        codes[: rows.shape[0], :k] = rows                   # padded rows and columns: code 0
        codes = codes.view((r1 - r0) // 16, 16, chunks, chunk_k).permute(0, 2, 1, 3)   # [T, C, 16, chunk_k]
        words = torch.zeros(codes.shape[0], chunks, 32, 4, dtype=torch.int64, device=dev)
        for f in range(row.shape[-1]):                      # one field position at a time
            c = codes[:, :, row[..., f], col[..., f]].to(torch.int64)
            if cbit is not None:
                c = c >> cbit[..., f]
            words |= (c & mask) << (f * width)
        qtc[r0 // 16:r1 // 16] = torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)
    return qtc


def _unpack_codes(qtc: torch.Tensor, bits: int, n: int, k: int, chunk_k: int, row, col, cbit, width: int):
    """The v1 qweight of :func:`_pack_codes`'s output (the fields are disjoint code bits: their sum is the code)."""
    tiles, chunks, dev = qtc.shape[0], qtc.shape[1], qtc.device
    fields = row.shape[-1]
    words = qtc.to(torch.int64) & 0xFFFFFFFF
    vals = (words.unsqueeze(-1) >> (width * torch.arange(fields, device=dev))) & ((1 << width) - 1)
    if cbit is not None:
        vals = vals << cbit.to(dev)
    codes = torch.zeros(16, chunk_k, tiles, chunks, dtype=torch.int64, device=dev)
    codes.index_put_((row.to(dev), col.to(dev)), vals.permute(2, 3, 4, 0, 1), accumulate=True)
    codes = codes.permute(2, 0, 3, 1).reshape(tiles * 16, chunks * chunk_k)[:n, :k]
    return formats.pack(codes, bits)


def _tile_table(entries: torch.Tensor, tiles: int, tg: int) -> torch.Tensor:
    """[N, G, E] per-(row, group) entries -> [tiles + 1, tg, 8, 2, E]: [tile, group, gid, r] = row 16 tile + gid +
    8 r; padding, and the whole last tile (the kernels' zero source), are zeros."""
    n, g, e = entries.shape
    table = torch.zeros((tiles + 1) * 16, tg, e, dtype=entries.dtype, device=entries.device)
    table[:n, :g] = entries
    return table.view(tiles + 1, 2, 8, tg, e).permute(0, 3, 2, 1, 4).contiguous()


def _untile_table(table: torch.Tensor, n: int, groups: int) -> torch.Tensor:
    """The [N, groups, E] entries of :func:`_tile_table`'s output."""
    tiles = table.shape[0] - 1
    e = table.shape[-1]
    return table[:tiles].permute(0, 3, 2, 1, 4).reshape(tiles * 16, table.shape[1], e)[:n, :groups].contiguous()


_ROWS_PER_PASS = 4096   # bounds the temporaries of a repack (a few bytes per weight of one pass)


TC1_GT = 8   # groups per k16 step of the table product (csrc/cuda/gemv_tc1.cuh Tc1Plan::kGt)


@functools.lru_cache(maxsize=None)
def _table_map() -> Tuple[torch.Tensor, ...]:
    """For the A operand of the table product, [32 lanes, 4 regs, 2 halves]: row in tile, group in step, entry
    (virtual k 2t + half (+ 8 for registers 2, 3) = group t (+ 4), entry = half: 0 c0, 1 c1)."""
    shape = (32, 4, 2)
    row, grp, ent = (torch.empty(shape, dtype=torch.int64) for _ in range(3))
    for lane in range(32):
        gid, t = lane >> 2, lane & 3
        for reg in range(4):
            jj, r = reg >> 1, reg & 1
            for half in range(2):
                row[lane, reg, half], grp[lane, reg, half], ent[lane, reg, half] = gid + 8 * r, t + 4 * jj, half
    return row, grp, ent


def repack_tc1(qweight: torch.Tensor, codebook: torch.Tensor, k: int, group_size: int):
    """(qtc int32 [tiles, chunks, 32, 4], table [tiles + 1, tgroups, 8, 2, 4]) of a 1-bit lut weight (the table's
    bytes are the layout of the module docstring)."""
    n = qweight.shape[0]
    if codebook.dim() != 3 or codebook.shape[0] != n or codebook.shape[2] != 2 or k % group_size:
        raise ValueError(f"repack_tc1 needs a 1-bit codebook [N, K/g, 2] with K % g == 0; got codebook "
                         f"{tuple(codebook.shape)}, N={n}, K={k}, g={group_size}")
    if codebook.dtype not in TC_DTYPES:
        raise ValueError(f"repack_tc1 needs a float16 or bfloat16 codebook, got {codebook.dtype}")
    bf16 = codebook.dtype == torch.bfloat16
    qtc = _pack_codes(qweight, 1, k, 256, *_bit_map(bf16), None, 1)
    t4, chunks = qtc.shape[0] // 4, qtc.shape[1]      # memory order [tiles / 4][chunks][4 tiles][32][4]
    qtc = qtc.view(t4, 4, chunks, 32, 4).transpose(1, 2).contiguous().view(t4 * 4, chunks, 32, 4)
    tiles, tg, dev = tc_tiles(n), tc_table_groups(k, group_size), codebook.device
    cb = torch.zeros(tiles * 16, tg, 2, dtype=codebook.dtype, device=dev)
    cb[:n, : codebook.shape[1]] = codebook
    # D = c1 - c0 in fp32: [tile // 4][group pair][tile % 4][gid][group % 2][row half]
    d = cb[..., 1].float() - cb[..., 0].float()
    d = d.view(tiles // 4, 4, 2, 8, tg // 2, 2).permute(0, 4, 1, 3, 5, 2).reshape(-1).view(torch.int32)
    # (c0, c1) in the A fragment order of the table product: [tile][step][lane][reg] words of two entries
    steps = cb.view(tiles, 16, tg // TC1_GT, TC1_GT, 2)                # [T, row, ts, j, e]
    row, grp, ent = (m.to(dev) for m in _table_map())
    a = steps[:, row, :, grp, ent]                                # [32, 4, 2, T, ts]
    a = a.permute(3, 4, 0, 1, 2).contiguous().view(torch.int32)   # [T, ts, 32, 4] words
    zero = torch.zeros(tg * 32, dtype=torch.int32, device=dev)    # one tile: the kernel's zero source
    table = torch.cat((d, a.reshape(-1), zero))
    return qtc, table.view(codebook.dtype).view(tiles + 1, tg, 8, 2, 4)


def unrepack_tc1(qtc: torch.Tensor, table: torch.Tensor, n: int, k: int, group_size: int):
    """The v1 (qweight, codebook) of a tc1 repack: the inverse of :func:`repack_tc1` (tests, the reference). The
    codebook is read back from the table product's A operand."""
    bf16 = table.dtype == torch.bfloat16
    tiles, tg = table.shape[0] - 1, table.shape[1]
    words = table.reshape(-1).view(torch.int32)[tiles * tg * 16: tiles * tg * 32]
    a = words.contiguous().view(table.dtype).view(tiles, tg // TC1_GT, 32, 4, 2)   # [T, ts, lane, reg, half]
    row, grp, ent = (m.to(table.device) for m in _table_map())
    steps = torch.zeros(tiles, 16, tg // TC1_GT, TC1_GT, 2, dtype=table.dtype, device=table.device)
    steps[:, row, :, grp, ent] = a.permute(2, 3, 4, 0, 1)
    cb = steps.reshape(tiles * 16, tg, 2)[:n, : k // group_size].contiguous()
    t4, chunks = qtc.shape[0] // 4, qtc.shape[1]
    qtc = qtc.reshape(t4, chunks, 4, 32, 4).transpose(1, 2).reshape(t4 * 4, chunks, 32, 4)
    return _unpack_codes(qtc, 1, n, k, 256, *_bit_map(bf16), None, 1), cb


# ---------------------------------------------------------------------------------------------------------
# "tc2": 2-bit lut, any 4-entry codebook (csrc/cuda/gemv_tc2.cuh)
# ---------------------------------------------------------------------------------------------------------
#
# Codes: 16 rows x 128 k per (tile, chunk), 16 bytes per lane:  qtc2 int32 [tiles, chunks2 = ceil(K / 128), 32, 4].
# Word w of a lane feeds k16 steps 2w, 2w + 1 (the 32-k pair p = w: columns 128 chunk + 32 w + 8 t + 0..7 of x).
# The kernel rotates the word right by 2j (j = 0..3: step 2w + (j >> 1), row gid + 8 (j & 1)) and masks
# 0x06060606, so before the rotation the 2-bit code of column kbase + b (b = 0..3, kbase = 128 chunk + 32 w + 8 t +
# 4 (j >> 1)) sits at bits 8b + 2j + 1 .. 8b + 2j + 2 (mod 32), low bit first:
#
#   word:  byte 3           byte 2           byte 1           byte 0
#          |0 3 3 2 2 1 1 0|0 3 3 2 2 1 1 0|0 3 3 2 2 1 1 0|0 3 3 2 2 1 1 0|   j of each bit pair (bit 0 of the
#                                                                               word is the high bit of j = 3, b = 3)
# Then t * 0x11 + 0x1010 (and the same of the high half) is the PRMT selector of two fp16 / bf16 codebook entries:
# nibbles 2c, 2c + 1 pick entry c's two bytes out of the row's 8-byte codebook.
#
# Tables: [tiles + 1, tgroups2, 8, 2, 4] (the codebook dtype): [tile, group, gid, r, e] = codebook[16 tile + gid +
# 8 r, group, e]; one 16-byte load gives a lane its rows gid, gid + 8. tgroups2 = ceil(K / 128) * 128 / g rounded
# up to 8; tile `tiles` is zeros (the zero source of x past K).


def tc2_chunks(k: int) -> int:
    return -(-k // 128)


def tc2_table_groups(k: int, g: int) -> int:
    return (tc2_chunks(k) * 128 // g + 7) // 8 * 8


@functools.lru_cache(maxsize=None)
def _bit_map2() -> Tuple[torch.Tensor, torch.Tensor]:
    """(row in tile, column in chunk) of every (lane, word, bit) of a tc2 (tile, chunk), and the code bit it holds:
    three int64 [32, 4, 32]."""
    row = torch.empty(32, 4, 32, dtype=torch.int64)
    col = torch.empty(32, 4, 32, dtype=torch.int64)
    cbit = torch.empty(32, 4, 32, dtype=torch.int64)
    for lane in range(32):
        gid, t = lane >> 2, lane & 3
        for w in range(4):
            for j in range(4):
                kbase = 32 * w + 8 * t + 4 * (j >> 1)
                for b in range(4):
                    for e in range(2):
                        bit = (8 * b + 2 * j + 1 + e) % 32
                        row[lane, w, bit] = gid + 8 * (j & 1)
                        col[lane, w, bit] = kbase + b
                        cbit[lane, w, bit] = e
    return row, col, cbit


def repack_tc2(qweight: torch.Tensor, codebook: torch.Tensor, k: int, group_size: int):
    """(qtc2 int32 [tiles, chunks2, 32, 4], table [tiles + 1, tgroups2, 8, 2, 4]) of a 2-bit lut weight."""
    n = qweight.shape[0]
    if codebook.dim() != 3 or codebook.shape[0] != n or codebook.shape[2] != 4 or k % group_size:
        raise ValueError(f"repack_tc2 needs a 2-bit codebook [N, K/g, 4] with K % g == 0; got codebook "
                         f"{tuple(codebook.shape)}, N={n}, K={k}, g={group_size}")
    qtc = _pack_codes(qweight, 2, k, 128, *_bit_map2(), 1)
    return qtc, _tile_table(codebook, tc_tiles(n), tc2_table_groups(k, group_size))


def unrepack_tc2(qtc: torch.Tensor, table: torch.Tensor, n: int, k: int, group_size: int):
    """The v1 (qweight, codebook) of a tc2 repack (the inverse of :func:`repack_tc2`)."""
    return _unpack_codes(qtc, 2, n, k, 128, *_bit_map2(), 1), _untile_table(table, n, k // group_size)


# ---------------------------------------------------------------------------------------------------------
# "tc4": 4-bit affine (csrc/cuda/gemv_tc4.cuh, BITS = 4)
# ---------------------------------------------------------------------------------------------------------
#
# Codes: 16 rows x 64 k per (tile, chunk), 16 bytes per lane: qtc4 int32 [tiles, chunks4 = ceil(K / 64), 32, 4].
# Word s of a lane is k16 step s (pair s // 2, half s % 2: columns kbase = 64 chunk + 32 (s // 2) + 8 t + 4 (s % 2)
# .. + 3). Nibble n (bits 4n .. 4n + 3) feeds A register j = n % 4, half n // 4 (the magic-constant decode):
#
#   word:  | n7 | n6 | n5 | n4 | n3 | n2 | n1 | n0 |       n = 4 half + j
#   j = 0: row gid,     columns kbase + 0 (lo), + 1 (hi)     j = 1: row gid + 8, the same columns
#   j = 2: row gid,     columns kbase + 2, + 3               j = 3: row gid + 8
#
# Tables: (scale, zero) pairs in the tc1 table layout, [tiles + 1, tgroups4, 8, 2, 2], tgroups4 = ceil(K / g)
# rounded up to 8; tile `tiles` is zeros.


def tc4_chunks(k: int) -> int:
    return -(-k // 64)


def tc4_table_groups(k: int, g: int) -> int:
    return (-(-tc4_chunks(k) * 64 // g) + 7) // 8 * 8


@functools.lru_cache(maxsize=None)
def _nibble_map4() -> Tuple[torch.Tensor, torch.Tensor]:
    """(row in tile, column in chunk) of every (lane, word, nibble) of a tc4 (tile, chunk): two int64 [32, 4, 8]."""
    row = torch.empty(32, 4, 8, dtype=torch.int64)
    col = torch.empty(32, 4, 8, dtype=torch.int64)
    for lane in range(32):
        gid, t = lane >> 2, lane & 3
        for s in range(4):
            kbase = 32 * (s // 2) + 8 * t + 4 * (s % 2)
            for n in range(8):
                j, half = n % 4, n // 4
                row[lane, s, n] = gid + 8 * (j & 1)
                col[lane, s, n] = kbase + 2 * (j >> 1) + half
    return row, col


def repack_tc4(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, k: int, group_size: int):
    """(qtc4 int32 [tiles, chunks4, 32, 4], table [tiles + 1, tgroups4, 8, 2, 2] of (scale, zero))."""
    n = qweight.shape[0]
    if scales.shape != zeros.shape or scales.dim() != 2 or scales.shape[0] != n or k % group_size:
        raise ValueError(f"repack_tc4 needs scales and zeros [N, K/g] with K % g == 0; got {tuple(scales.shape)}, "
                         f"{tuple(zeros.shape)}, N={n}, K={k}, g={group_size}")
    qtc = _pack_codes(qweight, 4, k, 64, *_nibble_map4(), None, 4)
    return qtc, _tile_table(torch.stack((scales, zeros), dim=-1), tc_tiles(n), tc4_table_groups(k, group_size))


def unrepack_tc4(qtc: torch.Tensor, table: torch.Tensor, n: int, k: int, group_size: int):
    """The v1 (qweight, scales, zeros) of a tc4 repack (the inverse of :func:`repack_tc4`)."""
    pairs = _untile_table(table, n, k // group_size)
    return (_unpack_codes(qtc, 4, n, k, 64, *_nibble_map4(), None, 4), pairs[..., 0].contiguous(),
            pairs[..., 1].contiguous())
