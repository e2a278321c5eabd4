"""The CUDA backend's routing of 1-bit lut_linear to the tensor-core kernel, on the CPU: which calls go there, the
load-time repack (round trip, cache, invalidation) and the result of the whole path with the reference in place of
the kernel. The kernel itself runs in the host build (tests/test_cuda_host.py) and on a GPU (tests/test_cuda.py)."""
import pytest
import torch

from bivlm_kernels import formats, ops
from bivlm_kernels.backends import reference as ref_ops
from bivlm_kernels.backends import repack_cache
from bivlm_kernels.backends.cuda import routing as tc_dispatch, tc_repack as repack


def _weight(n, k, g, dtype, bits=1, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = formats.pack(torch.randint(0, 1 << bits, (n, k), generator=gen), bits)
    cb = torch.randn(n, k // g, 1 << bits, generator=gen).to(dtype)
    return q, cb


@pytest.mark.parametrize("n,k,g", [(1, 64, 64), (67, 576, 64), (16, 256, 128), (130, 1152, 128), (300, 4096, 64)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_repack_round_trip(n, k, g, dtype):
    q, cb = _weight(n, k, g, dtype)
    qtc, table = repack.repack_tc1(q, cb, k, g)
    assert qtc.shape == (repack.tc_tiles(n), repack.tc_chunks(k), 32, 4) and qtc.dtype == torch.int32
    assert table.shape == (repack.tc_tiles(n) + 1, repack.tc_table_groups(k, g), 8, 2, 4)   # D fp32 + (c0, c1)
    assert table.dtype == dtype
    assert not table[-1].any()                                   # the zero tile the kernel reads for idle slots
    q2, cb2 = repack.unrepack_tc1(qtc, table, n, k, g)
    assert torch.equal(q2, q) and torch.equal(cb2, cb)
    # the D region: D[row, group] = c1 - c0 in fp32 at [tile // 4][group // 2][tile % 4][gid][group % 2][row // 8]
    d = table.reshape(-1).view(torch.float32)
    tg = table.shape[1]
    row, grp = n - 1, k // g - 1
    tile, r16 = divmod(row, 16)
    idx = ((((tile // 4) * (tg // 2) + grp // 2) * 4 + tile % 4) * 8 + r16 % 8) * 4 + (grp % 2) * 2 + r16 // 8
    assert float(d[idx]) == float(cb[row, grp, 1].float() - cb[row, grp, 0].float())


@pytest.mark.parametrize("n,k,g", [(1, 64, 64), (67, 576, 64), (16, 128, 128), (130, 1152, 128)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_repack_tc2_round_trip(n, k, g, dtype):
    q, cb = _weight(n, k, g, dtype, bits=2)
    qtc, table = repack.repack_tc2(q, cb, k, g)
    assert qtc.shape == (repack.tc_tiles(n), repack.tc2_chunks(k), 32, 4)
    assert table.shape == (repack.tc_tiles(n) + 1, repack.tc2_table_groups(k, g), 8, 2, 4)
    assert not table[-1].any()
    q2, cb2 = repack.unrepack_tc2(qtc, table, n, k, g)
    assert torch.equal(q2, q) and torch.equal(cb2, cb)


def test_tc2_bit_map_documented_positions():
    row, col, cbit = repack._bit_map2()
    assert len(set(zip(row.flatten().tolist(), col.flatten().tolist(), cbit.flatten().tolist()))) == 16 * 128 * 2
    # lane 6 = (gid 1, t 2), word 3, j = 0 (step 6, row gid): code of column 32*3 + 8*2 + 0 + b at bits 8b+1, 8b+2
    assert [(int(row[6, 3, 8 * b + 1 + e]), int(col[6, 3, 8 * b + 1 + e]), int(cbit[6, 3, 8 * b + 1 + e]))
            for b in range(4) for e in range(2)] == [(1, 112 + b, e) for b in range(4) for e in range(2)]
    assert (int(row[6, 3, 0]), int(col[6, 3, 0]), int(cbit[6, 3, 0])) == (9, 116 + 3, 1)   # j = 3, b = 3: wraps


@pytest.mark.parametrize("bf16", [False, True])
def test_bit_map_is_a_bijection_with_the_documented_positions(bf16):
    row, col = repack._bit_map(bf16)
    pairs = set(zip(row.flatten().tolist(), col.flatten().tolist()))
    assert len(pairs) == 16 * 256                                # every (row, column) of a tile x chunk once
    # lane 5 = (gid 1, t 1), word 1, step i = 0 (step 4: pair 2, half 0, kbase = 32*2 + 8 + 0 = 72)
    if bf16:   # A register a0 (row gid, columns 72, 73): version q, bits 14 / 30; a1 (row gid + 8): q << 2
        assert [(int(row[5, 1, b]), int(col[5, 1, b])) for b in (14, 30, 12, 28)] == [(1, 72), (1, 73), (9, 72),
                                                                                     (9, 73)]
    else:      # a0: version q << 3, bits 14 / 30 of it = stored bits 11 / 27; a1: rotl(q, 11): bits 3 / 19
        assert [(int(row[5, 1, b]), int(col[5, 1, b])) for b in (11, 27, 3, 19)] == [(1, 72), (1, 73), (9, 72),
                                                                                    (9, 73)]


def _spy():
    calls = []

    def tc(x, qtc, table, n, k, bits, g, bias, od):
        calls.append("tc")
        return tc_dispatch.reference_tc_linear(x, qtc, table, n, k, bits, g, bias, od)

    def lut(*args):
        calls.append("lut")
        return ref_ops.lut_linear(*args)
    return calls, tc_dispatch.routed_lut_linear(tc, lut)


@pytest.mark.parametrize("m", [1, 2, 3, 8, 16, 17])
@pytest.mark.parametrize("g,dtype,bits", [(64, torch.float16, 1), (128, torch.bfloat16, 1), (32, torch.float16, 1),
                                          (128, torch.float32, 1), (128, torch.float16, 2), (64, torch.bfloat16, 2),
                                          (256, torch.float16, 2)])
def test_routing_and_result(m, g, dtype, bits):
    repack_cache.clear()
    n, k = 37, 4 * g
    q, cb = _weight(n, k, g, dtype, bits, seed=m)
    x = torch.randn(m, k).to(dtype)
    bias = torch.randn(n).to(dtype)
    calls, fn = _spy()
    got = fn(x, q, cb, bits, g, bias, None)
    want = ref_ops.lut_linear(x, q, cb, bits, g, bias, None)
    goes_tc = g in (64, 128) and dtype != torch.float32 and m <= 16
    assert calls == ["tc" if goes_tc else "lut"]
    assert torch.equal(got, want)                                # same math on the round-tripped weight


def test_repack_is_cached_and_rebuilt_after_an_in_place_write():
    repack_cache.clear()
    q, cb = _weight(40, 256, 128, torch.float16)
    x = torch.randn(1, 256).half()
    calls, fn = _spy()
    y0 = fn(x, q, cb, 1, 128, None, None)
    assert repack_cache.size() == 1
    fn(x, q, cb, 1, 128, None, None)
    assert repack_cache.size() == 1
    cb.mul_(2)                                                   # e.g. load_state_dict into the same buffers
    y1 = fn(x, q, cb, 1, 128, None, None)
    assert torch.equal(y1, ref_ops.lut_linear(x, q, cb, 1, 128, None, None))
    assert not torch.equal(y0, y1)


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setattr(tc_dispatch, "enabled", False)
    q, cb = _weight(8, 128, 64, torch.float16)
    calls, fn = _spy()
    fn(torch.randn(1, 128).half(), q, cb, 1, 64, None, None)
    assert calls == ["lut"]


@pytest.mark.parametrize("n,k,g", [(1, 64, 64), (67, 576, 64), (16, 128, 128), (130, 1152, 128)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_repack_tc4_round_trip(n, k, g, dtype):
    gen = torch.Generator().manual_seed(n)
    q = formats.pack(torch.randint(0, 16, (n, k), generator=gen), 4)
    sc = torch.rand(n, k // g, generator=gen).to(dtype)
    z = (torch.rand(n, k // g, generator=gen) * 15).to(dtype)
    qtc, table = repack.repack_tc4(q, sc, z, k, g)
    assert qtc.shape == (repack.tc_tiles(n), repack.tc4_chunks(k), 32, 4)
    assert table.shape == (repack.tc_tiles(n) + 1, repack.tc4_table_groups(k, g), 8, 2, 2)
    assert not table[-1].any()
    q2, s2, z2 = repack.unrepack_tc4(qtc, table, n, k, g)
    assert torch.equal(q2, q) and torch.equal(s2, sc) and torch.equal(z2, z)
    row, col = repack._nibble_map4()
    assert len(set(zip(row.flatten().tolist(), col.flatten().tolist()))) == 16 * 64
    # lane 5 = (gid 1, t 1), word 3 (step 3: pair 1, half 1): nibble 6 = register 2, high half -> column 32+8+4+3
    assert (int(row[5, 3, 6]), int(col[5, 3, 6])) == (1, 47)


@pytest.mark.parametrize("m", [1, 5, 16, 17])
@pytest.mark.parametrize("g,dtype", [(64, torch.float16), (128, torch.bfloat16), (32, torch.float16),
                                     (128, torch.float32)])
def test_affine_routing_and_result(m, g, dtype):
    repack_cache.clear()
    n, k = 29, 4 * g
    gen = torch.Generator().manual_seed(m)
    q = formats.pack(torch.randint(0, 16, (n, k), generator=gen), 4)
    sc = (torch.rand(n, k // g, generator=gen) * 0.02 + 0.005).to(dtype)
    z = (torch.rand(n, k // g, generator=gen) * 15).to(dtype)
    x = torch.randn(m, k, generator=gen).to(dtype)
    calls = []

    def tc(*args):
        calls.append("tc")
        return tc_dispatch.reference_tc_linear(*args)

    def aff(*args):
        calls.append("affine")
        return ref_ops.affine_linear(*args)
    got = tc_dispatch.routed_affine_linear(tc, aff)(x, q, sc, z, 4, g, None, None)
    goes_tc = g in (64, 128) and dtype != torch.float32 and m <= 16
    assert calls == ["tc" if goes_tc else "affine"]
    assert torch.equal(got, ref_ops.affine_linear(x, q, sc, z, 4, g, None, None))


def _seg_spy():
    calls = []

    def seg(*args):
        perm = args[1]   # what the kernel requires of it (torch_ops.cpp refuses anything else)
        assert perm is None or (perm.dtype == torch.int32 and perm.is_contiguous() and perm.data_ptr() % 16 == 0)
        calls.append("seg")
        return tc_dispatch.reference_seg_tc_linear(*args)

    def parts(*args):
        calls.append("parts")
        return ref_ops.segmented_lut_linear(*args)
    return calls, tc_dispatch.routed_segmented_lut_linear(seg, parts)


@pytest.mark.parametrize("m", [1, 7, 16, 17])
@pytest.mark.parametrize("layout,g,dtype,perm_dtype", [
    ((2, 1), 128, torch.float16, torch.int32), ((2, 1), 64, torch.bfloat16, torch.int64), ((1,), 64, torch.float16,
                                                                                              torch.int32),
    ((2,), 128, torch.bfloat16, None), ((1, 2), 128, torch.float16, torch.int32),       # 1-bit first: not covered
    ((2, 1), 32, torch.float16, torch.int32), ((2, 1), 128, torch.float32, torch.int32)])
def test_segmented_routing_and_result(m, layout, g, dtype, perm_dtype):
    """The sub-2-bit layout goes to seg_tc_linear where it applies (segments [2, 1], [2] or [1], g 64 / 128, fp16 /
    bf16, M <= 16); its operands (the cached repacks, an int32 perm) give the reference's result exactly."""
    repack_cache.clear()
    n, widths = 41, {2: 2 * g, 1: 5 * g}
    qws, cbs = [], []
    for i, b in enumerate(layout):
        q, cb = _weight(n, widths[b], g, dtype, b, seed=10 * m + i)
        qws.append(q), cbs.append(cb)
    k = sum(widths[b] for b in layout)
    perm = None if perm_dtype is None else torch.randperm(k, generator=torch.Generator().manual_seed(m)).to(perm_dtype)
    x = torch.randn(m, k).to(dtype)
    bias = torch.randn(n).to(dtype)
    calls, fn = _seg_spy()
    got = fn(x, perm, qws, cbs, list(layout), g, bias, None)
    want = ref_ops.segmented_lut_linear(x, perm, qws, cbs, list(layout), g, bias, None)
    goes = list(layout) in ([2, 1], [2], [1]) and g in (64, 128) and dtype != torch.float32 and m <= 16
    assert calls == ["seg" if goes else "parts"]
    assert torch.equal(got, want)
    if goes:   # the repacks are the ones lut_linear's route caches; the perm is checked and copied once
        assert repack_cache.size() == len(layout) + (perm_dtype is not None)
        fn(x, perm, qws, cbs, list(layout), g, bias, None)
        assert repack_cache.size() == len(layout) + (perm_dtype is not None)


def test_segmented_perm_views_and_bad_perms():
    """A perm the kernel cannot read as given (a strided or offset int32 view) is copied, so the call works; a
    perm that is not a permutation is refused with a clear error before any kernel runs."""
    repack_cache.clear()
    n, g = 19, 64
    (q2, cb2), (q1, cb1) = _weight(n, g, g, torch.float16, 2, seed=1), _weight(n, 3 * g, g, torch.float16, 1, seed=2)
    k = 4 * g
    x = torch.randn(2, k).half()
    calls, fn = _seg_spy()
    big = torch.randperm(2 * k + 1, generator=torch.Generator().manual_seed(3)).to(torch.int32)
    view = torch.argsort(big[1:2 * k + 1:2]).to(torch.int32)[:]          # a permutation
    for perm in (torch.stack([view, view], 1)[:, 0], torch.cat([view[:1], view])[1:]):   # strided, offset by 4 bytes
        assert not perm.is_contiguous() or perm.storage_offset() != 0
        got = fn(x, perm, [q2, q1], [cb2, cb1], [2, 1], g, None, None)
        assert torch.equal(got, ref_ops.segmented_lut_linear(x, perm, [q2, q1], [cb2, cb1], [2, 1], g))
    bad = view.clone()
    bad[0] = bad[1]                                                       # a duplicate
    with pytest.raises(ValueError, match="exactly once"):
        fn(x, bad, [q2, q1], [cb2, cb1], [2, 1], g, None, None)
    assert calls == ["seg", "seg"]
