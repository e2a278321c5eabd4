"""GTQ (GPTQ with fitted, compressed tables): exact levels, table-aware fitting, weighting, bits, option checks."""
import pytest
import torch

from bivlm_kernels import QuantLinear, formats
from bivlm_kernels.formats import tables
from bivlm_kernels.quant import get_method
from bivlm_kernels.quant.methods import _tablefit as tf

CONFIGS = [dict(bits=2, group_size=16, form="grid", table_bits=4),
           dict(bits=2, group_size=32, form="entries", table_bits=4),
           dict(bits=1, group_size=32, form="entries", table_bits=8),
           dict(bits=4, group_size=16, form="grid", table_bits=4),
           dict(bits=4, group_size=32, form="grid", table_bits=8),
           dict(bits=4, group_size=32, form="grid", table_bits=6),
           dict(bits=4, group_size=32, form="grid", table_bits=6, refit=True),
           dict(bits=2, group_size=16, form="grid", table_bits=4, refit=True),
           dict(bits=1, group_size=32, form="entries", table_bits=8, refit=True),
           dict(bits=2, group_size=16, form="grid", table_bits=0),
           dict(bits=4, group_size=32, form="grid", table_bits=0),
           dict(bits=2, group_size=16, form="grid", table_bits=4, act_order=True)]


def _problem(n=40, k=96, seed=0):
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(n, k, generator=gen) * (1 + torch.rand(n, 1, generator=gen))
    X = torch.randn(256, k, generator=gen) * (0.2 + 3 * torch.rand(k, generator=gen))
    return W, X.T @ X / 256


def _rel(W, What, H):
    D = What - W
    return float(torch.trace(D @ H @ D.T) / torch.trace(W @ H @ W.T))


def _id(o):
    return ("b{bits}g{group_size}{form}t{table_bits}".format(**o) + ("ao" if o.get("act_order") else "")
            + ("rf" if o.get("refit") else ""))


@pytest.mark.parametrize("opts", CONFIGS, ids=_id)
def test_packed_layer_reproduces_the_fitted_levels(opts):
    W, H = _problem()
    qw = get_method("gtq", dtype=torch.float32, **opts).quantize(W, H)
    layer = QuantLinear.from_quantized(qw, dtype=torch.float32)
    assert torch.equal(layer.dequantize(), qw.dequantize())           # what GPTQ compensated is what runs
    assert layer.weight_bits == pytest.approx(qw.info["honest_bits"])
    g, tb, bits = opts["group_size"], opts["table_bits"], opts["bits"]
    if tb:
        e = tables.fields_per_group(opts["form"], bits)
        perm = 32 / 40 if opts.get("act_order") else 0                  # int32 [K] over N = 40 rows
        expect = bits + (-(-(96 // g) * e // (32 // tb))) * 32 / 96 + 2 * 32 / 96 + perm   # 32 // t per word
        assert qw.info["honest_bits"] == pytest.approx(expect)
        assert layer.spec.format_version == 2
    err = _rel(W, qw.dequantize(), H)
    assert err < {1: 0.5, 2: 0.15, 4: 0.02}[bits], err


def test_without_compensation_every_code_is_the_nearest_level():
    W, H = _problem(seed=1)
    qw = get_method("gtq", bits=2, group_size=16, table_bits=4, compensate=False, dtype=torch.float32).quantize(W, H)
    seg = qw.segments[0]
    cb = seg.codebook                                                    # [N, G, 4]
    dist = (W.view(40, -1, 16, 1) - cb[:, :, None, :]).abs()             # [N, G, g, 4]
    chosen = dist.gather(-1, seg.codes.view(40, -1, 16, 1))
    assert torch.all(chosen <= dist.amin(-1, keepdim=True) + 1e-6)


@pytest.mark.parametrize("form", ["grid", "entries"])
def test_field_search_beats_plain_rounding(form):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(300, 16, generator=gen)
    w = torch.rand(300, 16, generator=gen) + 0.1
    fit = torch.stack(tf.fit_grid(x, w, 2), 1) if form == "grid" else tf.fit_entries(x, w, 4)
    grid = tf.plan_grids(fit.view(30, 10, -1), form, 4, torch.float32).repeat_interleave(10, 0)
    best = tf.best_fields(x, w, "lut", form, 2, 4, grid, fit)
    if form == "grid":
        plain = torch.stack([torch.round(fit[:, 0] / grid[:, 0]).clamp(1, 15),
                             torch.round(fit[:, 1] / grid[:, 1]).clamp(0, 15)], 1)
    else:
        plain = torch.round((fit - grid[:, :1]) / grid[:, 1:]).clamp(0, 15)
    e_best = tf.weighted_error(x, w, tf.levels("lut", form, 2, best, grid))
    e_plain = tf.weighted_error(x, w, tf.levels("lut", form, 2, plain, grid))
    assert torch.all(e_best <= e_plain + 1e-6) and e_best.sum() < e_plain.sum()


def test_weighted_fit_lowers_the_output_error():
    W, H = _problem(seed=3)
    errs = {wt: _rel(W, get_method("gtq", bits=2, group_size=32, table_bits=4, weighted=wt, compensate=False,
                                   dtype=torch.float32).quantize(W, H).dequantize(), H) for wt in (True, False)}
    assert errs[True] < 0.95 * errs[False], errs


def test_compensation_lowers_the_output_error():
    W, H = _problem(seed=4)
    errs = {c: _rel(W, get_method("gtq", bits=2, group_size=16, table_bits=4, compensate=c,
                                  dtype=torch.float32).quantize(W, H).dequantize(), H) for c in (True, False)}
    assert errs[True] < 0.9 * errs[False], errs


def test_grid_fit_is_at_least_min_max():
    gen = torch.Generator().manual_seed(5)
    x, w = torch.randn(500, 32, generator=gen), torch.rand(500, 32, generator=gen)
    s, m = tf.fit_grid(x, w, 2)
    lo = x.amin(-1).clamp(max=0)
    s0, m0 = (x.amax(-1) - lo) / 3, -lo
    c = torch.arange(4.0)
    e_fit = tf.weighted_error(x, w, c * s[:, None] - m[:, None])
    e_mm = tf.weighted_error(x, w, c * s0[:, None] - m0[:, None])
    assert torch.all(e_fit <= e_mm + 1e-6) and e_fit.sum() < 0.9 * e_mm.sum()


@pytest.mark.parametrize("opts,match", [
    (dict(bits=4, form="entries"), r"form='entries' is not supported; allowed: \['grid'\]"),
    (dict(table_bits=3), r"table_bits must be one of \(0, 4, 6, 8\)"),
    (dict(table_bits=0, refit=True), r"refit needs compressed tables \(table_bits one of \(4, 6, 8\)\)"),
    (dict(refit=1), "refit must be True or False"),
    (dict(bits=1, group_size=16), "group_size 16 is too small for bits=1"),
    (dict(weighted="yes"), "weighted must be True or False"),
    (dict(bits=3), r"bits=3 is not supported by method 'gtq'; allowed: \[1, 2, 4\]"),
])
def test_bad_options_are_named(opts, match):
    with pytest.raises(ValueError, match=match):
        get_method("gtq", **opts)


def test_group_sizes_include_16():
    assert 16 in formats.GROUP_SIZES


def test_fp16_tables_in_an_fp32_layer_are_exact():
    W, H = _problem(seed=6)
    for tb in (0, 4):
        qw = get_method("gtq", bits=2, group_size=16, table_bits=tb, table_dtype="float16",
                        dtype=torch.float32).quantize(W, H)
        layer = QuantLinear.from_quantized(qw, dtype=torch.float32)
        assert torch.equal(layer.dequantize(), qw.dequantize())
        held = layer.segments[0].tgrid if tb else layer.segments[0].codebook
        assert torch.equal(held.half().float(), held)                     # fp16 values, stored exactly
        assert layer.spec.bits_per_weight(torch.float16) < layer.weight_bits
    with pytest.raises(ValueError, match="table_dtype='float16' needs an fp32 layer"):
        get_method("gtq", table_dtype="float16", dtype=torch.bfloat16).quantize(W, H)


@pytest.mark.parametrize("method", ["gptq", "gtq", "billm", "bivlm"])
def test_percdamp_is_checked_by_every_compensating_method(method):
    for bad in (1.5, -0.1, "0.01"):
        with pytest.raises(ValueError, match=r"percdamp must be in \[0, 1\)"):
            get_method(method, percdamp=bad)
