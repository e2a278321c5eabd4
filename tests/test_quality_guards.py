"""Quality regression guards (issue 29): every method's error on real layers and two end-to-end checks on the
testbed, pinned to ``tests/data/quality_guards.json`` (harness and rationale in ``tests/quality_guards.py``),
and the planted regressions they must catch.

Cost on one core: one testbed build (~30 s), the layer guards (~100 s), the end-to-end checks (~50 s) and the
planted runs (~60 s).
"""
import json

import pytest
import torch

import quality_guards as qg
from bivlm_kernels.models import testbed

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(bool(testbed.missing_packages()),
                                 reason=f"testbed packages missing: {testbed.missing_packages()}; install with "
                                        f"`{testbed.PIP_DEPS}` and `{testbed.PIP_WHEELS}`")]

CASES = {cid: (method, options) for cid, method, options in qg.CASES}


@pytest.fixture(scope="module")
def bed():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)           # the records were taken on one thread (sums in one order)
    model, proc = testbed.load_testbed()
    model.eval()
    yield model, proc
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def layers(bed):
    return qg.load_layers(*bed)


@pytest.fixture(scope="module")
def record():
    return json.loads(qg.RECORD.read_text())


def measure(layers, *cids):
    return qg.measure(layers, [(cid, *CASES[cid]) for cid in cids])


@pytest.mark.parametrize("cid", list(CASES))
def test_layer_guard(layers, record, cid):
    measured = measure(layers, cid)
    assert measured, f"{cid} applies to no guard layer"
    assert not qg.failures(measured, record["errors"])


def test_end_to_end_guard(bed, record):
    got, ref = qg.end_to_end(*bed), record["end_to_end"]
    assert not qg.e2e_failures(got, ref)


# --- the harness itself -------------------------------------------------------------------------------------

def test_failures_flags_level_staleness_and_instability():
    rec = {"a|x": {"error": 0.10}}
    assert not qg.failures({"a|x": {"error": 0.105, "perturbed": [0.104, 0.106]}}, rec)
    assert "+15.0 %" in qg.failures({"a|x": {"error": 0.115}}, rec)[0]           # worse
    assert "-15.0 %" in qg.failures({"a|x": {"error": 0.085}}, rec)[0]           # better: a stale record
    assert "unstable" in qg.failures({"a|x": {"error": 0.10, "perturbed": [0.10, 0.30]}}, rec)[0]
    assert "no recorded value" in qg.failures({"b|x": {"error": 0.1}}, rec)[0]
    assert qg.failures({"a|x": {"error": float("nan")}}, rec)
    e2e = {"bivlm-2-g64": {"perplexity": 30.0, "mean_error": 0.14}, "luq": {"perplexity": 27.0, "low_layers": [0, 1]}}
    assert not qg.e2e_failures(e2e, e2e)
    assert qg.e2e_failures({**e2e, "luq": {"perplexity": 27.0, "low_layers": [0, 2]}}, e2e)
    assert qg.e2e_failures({**e2e, "bivlm-2-g64": {"perplexity": 34.0, "mean_error": 0.14}}, e2e)


# --- planted regressions: each must fail the guards ---------------------------------------------------------

def _old_salient_rule(monkeypatch):
    """Issue 29's bug: salient weights coded by their residual level's cluster (sign flips)."""
    from bivlm_kernels.quant.methods import bivlm
    monkeypatch.setattr(bivlm, "_code", lambda w, salient, level, codebook, cmap: cmap.gather(1, level))


def _one_sided_band_quantiles(monkeypatch):
    """A wrong band boundary: z_k = Phi^-1(k p_uns) read one-sided (Phi^-1((1 + k p_uns) / 2) is right)."""
    from bivlm_kernels.quant.methods import bivlm
    right = bivlm.band_thresholds

    def wrong(p_sal, n_inlier):
        z = right(p_sal, n_inlier)
        p_uns = (1.0 - p_sal) / n_inlier
        k = torch.arange(1, n_inlier + 1, dtype=torch.float64)
        z[1:] = torch.special.ndtri((k * p_uns).clamp(max=1 - 1e-6)).clamp_min(1e-3).float()
        return z
    monkeypatch.setattr(bivlm, "band_thresholds", wrong)


def _dropped_compensation(monkeypatch):
    """Hessian compensation dropped: the Cholesky factor of H^-1 keeps only its diagonal."""
    from bivlm_kernels.quant import hessian
    right = hessian.inverse_cholesky_upper
    monkeypatch.setattr(hessian, "inverse_cholesky_upper",
                        lambda *a, **k: (lambda U, pd: (torch.diag(torch.diag(U)), pd))(*right(*a, **k)))


@pytest.mark.parametrize("plant,cids", [
    (_old_salient_rule, ["bivlm-2-g64", "bivlm-2-g128"]),
    (_one_sided_band_quantiles, ["bivlm-2-g64"]),
    (_dropped_compensation, ["gptq-2", "billm-2", "bivlm-2-g64", "gtq-2-g16-v2"]),
])
def test_planted_layer_regression_is_caught(layers, record, monkeypatch, plant, cids):
    plant(monkeypatch)
    for cid in cids:
        assert qg.failures(measure(layers, cid), record["errors"]), f"{plant.__name__} not caught by {cid}"


def test_planted_stale_block_inputs_are_caught(bed, record, monkeypatch):
    """The driver's recorded block inputs left stale: every block calibrates on block 0's inputs."""
    from bivlm_kernels.quant import driver
    right = driver._process_block
    monkeypatch.setattr(driver, "_process_block",
                        lambda block, bname, i, propagate, *a, **k: right(block, bname, i, False, *a, **k))
    assert qg.e2e_failures(qg.end_to_end(*bed), record["end_to_end"])
