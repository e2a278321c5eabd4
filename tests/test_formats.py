"""The packed format: bit-exact pack/unpack, the documented bit layout, shapes and honest bit counts."""
import pytest
import torch

from bivlm_kernels import formats
from bivlm_kernels.formats import LayerSpec, QuantizedSegment, QuantizedWeight, SegmentSpec


@pytest.mark.parametrize("bits", [1, 2, 4])
@pytest.mark.parametrize("n,k", [(1, 1), (3, 31), (7, 33), (70, 100), (33, 257), (5, 4096)])
def test_pack_unpack_round_trip_bit_exact(bits, n, k):
    codes = torch.randint(0, 1 << bits, (n, k))
    packed = formats.pack(codes, bits)
    assert packed.dtype == torch.int32
    assert packed.shape == (n, formats.packed_width(k, bits)) == (n, -(-k * bits // 32))
    assert torch.equal(formats.unpack(packed, bits, k), codes)


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_tail_bits_are_zero(bits):
    k = 32 // bits + 1                  # one code spills into a second word
    packed = formats.pack(torch.full((2, k), (1 << bits) - 1), bits)
    assert int(packed[0, 1]) == (1 << bits) - 1   # only the first code of the second word is set


def test_bit_layout_matches_spec():
    # Column k sits at bit (k % (32 // b)) * b of word k // (32 // b), LSB first.
    codes = torch.tensor([[1, 2, 3, 0] + [0] * 12 + [3]])          # 17 two-bit codes -> 2 words
    packed = formats.pack(codes, 2)
    assert int(packed[0, 0]) == (1 << 0) | (2 << 2) | (3 << 4)
    assert int(packed[0, 1]) == 3
    one = formats.pack(torch.tensor([[0] * 31 + [1]]), 1)          # bit 31 set: negative int32
    assert int(one[0, 0]) == -(2 ** 31)
    four = formats.pack(torch.tensor([[0xA, 0x5, 0, 0, 0, 0, 0, 0xF]]), 4)
    assert int(four[0, 0]) == 0xF000005A - 2 ** 32


def test_dequantize_matches_elementwise_definition():
    n, g, k = 5, 32, 96
    codes = torch.randint(0, 4, (n, k))
    cb = torch.randn(n, k // g, 4)
    w = formats.dequantize_lut(formats.pack(codes, 2), cb, 2, g)
    for i in range(n):
        for j in range(k):
            assert w[i, j] == cb[i, j // g, codes[i, j]]
    codes4 = torch.randint(0, 16, (n, k))
    s, z = torch.rand(n, k // g) + 0.1, torch.rand(n, k // g) * 15
    w4 = formats.dequantize_affine(formats.pack(codes4, 4), s, z, 4, g)
    for i in range(n):
        for j in range(0, k, 7):
            assert torch.isclose(w4[i, j], (codes4[i, j] - z[i, j // g]) * s[i, j // g])


@pytest.mark.parametrize("bad", [-1, 4])
def test_pack_rejects_codes_out_of_range(bad):
    codes = torch.zeros(2, 8, dtype=torch.int64)
    codes[1, 3] = bad
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 3\]"):
        formats.pack(codes, 2)


def test_pack_rejects_bad_arguments():
    with pytest.raises(ValueError, match="bits must be one of"):
        formats.pack(torch.zeros(2, 8, dtype=torch.int64), 3)
    with pytest.raises(TypeError, match="integer tensor"):
        formats.pack(torch.zeros(2, 8), 1)
    with pytest.raises(ValueError, match="2-D"):
        formats.pack(torch.zeros(8, dtype=torch.int64), 1)
    with pytest.raises(TypeError, match="int32"):
        formats.unpack(torch.zeros(2, 1, dtype=torch.int64), 1, 32)
    with pytest.raises(ValueError, match="shape"):
        formats.unpack(torch.zeros(2, 2, dtype=torch.int32), 1, 32)


def test_bits_per_weight_hand_count():
    # 1-bit lut, N=70, K=256, g=64, fp16: qweight 70*8 words*4 B + codebook 70*4 groups*2 entries*2 B.
    spec = LayerSpec(256, 70, 64, (SegmentSpec(1, 256, "lut"),))
    assert spec.bits_per_weight(torch.float16) == (70 * 8 * 4 + 70 * 4 * 2 * 2) * 8 / (70 * 256) == 1.5
    # The design's reference numbers at g = 128, fp16 (large K so that rounding does not matter).
    for bits, kind, expect in [(1, "lut", 1.25), (2, "lut", 2.5), (4, "affine", 4.25)]:
        s = LayerSpec(4096, 4096, 128, (SegmentSpec(bits, 4096, kind),))
        assert s.bits_per_weight(torch.float16) == pytest.approx(expect)
    # Mixed 2/1-bit with perm: codes + codebooks of both segments + 4 bytes per column of perm.
    mixed = LayerSpec(1024, 512, 128, (SegmentSpec(2, 128), SegmentSpec(1, 896)), has_perm=True)
    hand = (512 * 8 * 4 + 512 * 1 * 4 * 2) + (512 * 28 * 4 + 512 * 7 * 2 * 2) + 1024 * 4
    assert mixed.bits_per_weight(torch.float16) == pytest.approx(hand * 8 / (512 * 1024))
    assert mixed.nominal_bits == pytest.approx((2 * 128 + 896) / 1024)


def test_layer_spec_validation():
    with pytest.raises(ValueError, match="group_size must be one of"):
        LayerSpec(256, 8, 48, (SegmentSpec(1, 256),))
    with pytest.raises(ValueError, match="multiple of group_size"):
        LayerSpec(200, 8, 64, (SegmentSpec(1, 200),))
    with pytest.raises(ValueError, match="bits must be one of"):
        LayerSpec(256, 8, 64, (SegmentSpec(3, 256),))
    with pytest.raises(ValueError, match="bits must be one of"):
        LayerSpec(256, 8, 64, (SegmentSpec(4, 256, "lut"),))     # 4-bit is affine only
    with pytest.raises(ValueError, match="sum to 192"):
        LayerSpec(256, 8, 64, (SegmentSpec(1, 128), SegmentSpec(2, 64)))
    spec = LayerSpec(256, 8, 64, (SegmentSpec(2, 64), SegmentSpec(1, 192)), has_perm=True, has_bias=True)
    assert LayerSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match="corrupt layer spec"):
        LayerSpec.from_dict({"in_features": 256})


def test_quantized_weight_dequantize_with_perm():
    n, k, g = 6, 128, 32
    perm = torch.randperm(k)
    segs = [QuantizedSegment(2, torch.randint(0, 4, (n, 32)), codebook=torch.randn(n, 1, 4)),
            QuantizedSegment(4, torch.randint(0, 16, (n, 96)), scales=torch.rand(n, 3), zeros=torch.rand(n, 3))]
    qw = QuantizedWeight(segs, g, perm=perm)
    w = qw.dequantize()
    w_perm = torch.cat([formats.dequantize_lut(formats.pack(segs[0].codes, 2), segs[0].codebook, 2, g),
                        formats.dequantize_affine(formats.pack(segs[1].codes, 4), segs[1].scales,
                                                  segs[1].zeros, 4, g)], 1)
    assert torch.equal(w[:, perm], w_perm)          # column perm[j] of W is column j of the permuted weight
    x = torch.randn(3, k)
    torch.testing.assert_close(x[:, perm] @ w_perm.T, x @ w.T)
    with pytest.raises(ValueError, match="exactly once"):
        formats.check_perm(torch.zeros(k, dtype=torch.int64), k)
