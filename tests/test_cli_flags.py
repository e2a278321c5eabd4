"""Issue 18, "the CLI behaves like the tools people know": --version, --seed/--threads reproduce exactly,
progress bars on the long steps, -v/-q after the subcommand, method options in --help, the group size
changes said once, no deprecation warnings from our calls into transformers."""
import dataclasses
import json
import logging
import re
import types
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from bivlm_kernels import cli, evaluation  # noqa: E402
from bivlm_kernels.cli import eval as cli_eval  # noqa: E402
from bivlm_kernels.quant import base as quant_base  # noqa: E402
from test_cli import _model_dir, expect_usage_error  # noqa: E402


@pytest.fixture(autouse=True)
def _restore_globals():
    """--threads and -v/-q change process-wide state: put it back."""
    threads, level = torch.get_num_threads(), logging.getLogger("bivlm_kernels").level
    yield
    torch.set_num_threads(threads)
    logging.getLogger("bivlm_kernels").setLevel(level)


def _args_of(monkeypatch, command):
    seen = []
    monkeypatch.setattr(cli, f"_{command}", lambda args: seen.append(args) or 0)
    return seen


def test_version(capsys):
    import bivlm_kernels
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"bivlm {bivlm_kernels.__version__} (torch {torch.__version__.split('+')[0]}")
    assert f"transformers {transformers.__version__}" in out


@pytest.mark.parametrize("argv, verbose, quiet, debug", [
    (["-v", "quantize"], 1, False, False), (["quantize", "-v"], 1, False, False),
    (["quantize", "-vv"], 2, False, False), (["-q", "quantize"], 0, True, False),
    (["quantize", "--quiet"], 0, True, False), (["quantize", "--debug", "-q"], 0, True, True),
    (["--debug", "quantize"], 0, False, True),
])
def test_shared_flags_before_or_after_the_subcommand(tmp_path, monkeypatch, argv, verbose, quiet, debug):
    seen = _args_of(monkeypatch, "quantize")
    assert cli.main(argv + ["--out", str(tmp_path / "o")]) == 0
    a = seen[0]
    assert (a.verbose, a.quiet, a.debug) == (verbose, quiet, debug)
    assert a.no_progress is quiet                        # -q: no progress bars either


def test_eval_takes_the_shared_flags(monkeypatch):
    seen = _args_of(monkeypatch, "eval")
    assert cli.main(["eval", "-q", "--seed", "3", "--threads", "1"]) == 0
    assert seen[0].quiet and seen[0].no_progress and seen[0].seed == 3 and torch.get_num_threads() == 1


@pytest.mark.parametrize("extra, needle", [(["-v", "-q"], "--quiet"), (["--threads", "0"], "--threads"),
                                           (["--seed", "-1"], "--seed"), (["--seed", "x"], "--seed")])
def test_bad_shared_flags(tmp_path, capsys, monkeypatch, extra, needle):
    _args_of(monkeypatch, "quantize")
    expect_usage_error(capsys, ["quantize", "--out", str(tmp_path / "o")] + extra, needle)


def test_method_options_listed_from_the_config_dataclasses(capsys, monkeypatch):
    @dataclasses.dataclass
    class _ProbeConfig(quant_base.MethodConfig):
        probe_knob: float = 0.25

    class _Probe(quant_base.Method):
        name, config_cls = "probe", _ProbeConfig
    monkeypatch.setitem(quant_base.METHODS, "probe", _Probe)
    assert cli.main(["methods"]) == 0
    listing = capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        cli.main(["quantize", "--help"])
    assert e.value.code == 0
    help_text = capsys.readouterr().out
    for name, cls in quant_base.METHODS.items():
        for f in dataclasses.fields(cls.config_cls):
            if f.name not in ("bits", "group_size", "dtype", "layer_name"):
                assert f"{f.name}=" in listing and f"{f.name}=" in help_text, (name, f.name)
    assert "probe_knob=0.25" in help_text and "_ProbeConfig" not in help_text


def _numbers(stdout):
    """The printed results without the timings (the table's last column, the run's total seconds)."""
    rows = []
    for line in stdout.splitlines():
        if line.startswith("model."):
            line = line.rsplit(None, 1)[0]
        rows.append(re.sub(r"; [\d.]+ s$", "", line))
    return [r for r in rows if not r.startswith("saved to")]


def test_seed_and_threads_reproduce_exactly(tmp_path, capsys):
    from safetensors.torch import load_file
    src, calib = _model_dir(tmp_path, n_calib=12)

    def run(seed, out):
        argv = ["quantize", "--model", str(src), "--method", "gptq", "--bits", "2", "--group-size", "64",
                "--calib-file", str(calib), "--n-calib", "4", "--out", str(tmp_path / out), "--no-progress",
                "--seed", str(seed), "--threads", "1"]
        assert cli.main(argv) == 0
        assert torch.get_num_threads() == 1
        return load_file(tmp_path / out / "model.safetensors"), _numbers(capsys.readouterr().out)
    a, out_a = run(5, "a")
    b, out_b = run(5, "b")
    c, _ = run(6, "c")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert out_a == out_b and any("gptq" in line for line in out_a)
    # text-only samples are taken in file order (the seed picks which samples keep their image): same tensors
    assert all(torch.equal(a[k], c[k]) for k in a)
    recorded = json.loads((tmp_path / "c" / "quantization.json").read_text())
    assert '"seed": 6' in json.dumps(recorded)                # the seed is recorded with the config


LUQ = ["--method", "luq", "--n-low", "1", "--low-method", "rtn", "--high-method", "rtn", "--high-bits", "2",
       "--entropy-estimator", "histogram"]


@pytest.mark.parametrize("method", [["--method", "rtn", "--bits", "2"], LUQ], ids=["rtn", "luq"])
def test_group_size_change_said_once(tmp_path, capsys, method):
    src, calib = _model_dir(tmp_path, hidden=96)              # in_features 96 (6 linears) and 128 (down_proj)
    argv = ["quantize", "--model", str(src), *method, "--group-size", "128",
            "--calib-file", str(calib), "--n-calib", "4", "--out", str(tmp_path / "o"), "--no-progress"]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    said = [line for line in (captured.out + captured.err).splitlines() if "group" in line and "128" in line]
    assert said == ["group size 128 asked, 32 used for 6 layers (in_features 96: not a multiple of 128)"]


def test_group_size_asked_survives_the_report_round_trip():
    from bivlm_kernels.quant.report import LayerReport, QuantReport
    r = QuantReport([LayerReport("a", "language", "rtn", 8, 576, 64, 2, 3.0, 0.1, 0.0, 0, 0,
                                 group_size_asked=128),
                     LayerReport("b", "language", "rtn", 8, 512, 128, 2, 3.0, 0.1, 0.0, 0, 0)])
    again = QuantReport.from_dict(r.to_dict())
    assert again.group_size_notes() == ["group size 128 asked, 64 used for 1 layer (in_features 576: not a "
                                        "multiple of 128)"]
    old = r.to_dict()
    for row in old["layers"]:
        del row["group_size_asked"]                           # a report saved before the field existed
    assert QuantReport.from_dict(old).group_size_notes() == []


# ------------------------------------------------------------------ progress bars on the long steps

def _fake_testbed(tmp_path, monkeypatch):
    """The testbed replaced by the tiny Llama (ready calibration dicts); vqa_accuracy records its progress."""
    src, _ = _model_dir(tmp_path)
    model = transformers.LlamaForCausalLM.from_pretrained(src).eval()
    tok = transformers.AutoTokenizer.from_pretrained(src)
    batches = [dict(tok("w1 w2 w3 w4", return_tensors="pt")) for _ in range(2)]
    calls = []
    monkeypatch.setattr(cli.quantize, "_testbed", lambda: (lambda: (model, tok),
                                                  lambda proc, n, mix, seed: calls.append(seed) or batches))
    monkeypatch.setattr(evaluation, "vqa_accuracy", lambda m, p, limit, progress: calls.append(progress) or
                        {"accuracy": 0.5})
    return calls


@pytest.mark.parametrize("extra, progress", [([], True), (["--no-progress"], False), (["-q"], False)])
def test_quantize_evaluations_show_progress(tmp_path, monkeypatch, capsys, extra, progress):
    calls = _fake_testbed(tmp_path, monkeypatch)
    argv = ["quantize", "--method", "rtn", "--bits", "2", "--group-size", "64", "--n-calib", "2",
            "--eval-limit", "8", "--seed", "7", "--out", str(tmp_path / "o")] + extra
    assert cli.main(argv) == 0
    assert calls == [7, progress, progress]           # the testbed's sample draw, easy-VQA before and after
    assert "50.0% before -> 50.0% after" in capsys.readouterr().out


def test_perplexity_bar_keeps_the_number(tmp_path, capsys):
    src, _ = _model_dir(tmp_path)
    model = transformers.LlamaForCausalLM.from_pretrained(src).eval()
    tok = transformers.AutoTokenizer.from_pretrained(src)
    text = " ".join(f"w{i % 200}" for i in range(200))
    quiet = evaluation.perplexity(model, tok, text=text, window=32, batch_size=2)
    capsys.readouterr()
    shown = evaluation.perplexity(model, tok, text=text, window=32, batch_size=2, progress=True)
    assert "perplexity" in capsys.readouterr().err
    assert shown["perplexity"] == quiet["perplexity"]


@pytest.mark.parametrize("no_progress", [False, True])
def test_eval_rows_pass_the_progress_switch(monkeypatch, no_progress):
    calls = []
    monkeypatch.setattr(evaluation, "vqa_accuracy", lambda *a, progress, **k: calls.append(("vqa", progress))
                        or {"accuracy": 1.0, "open_accuracy": 1.0, "n": 1})
    monkeypatch.setattr(evaluation, "perplexity", lambda *a, progress, **k: calls.append(("ppl", progress))
                        or {"perplexity": 2.0})
    args = types.SimpleNamespace(prune_keep=None, limit=1, batch_size=1, no_ppl=False, ppl_tokens=None,
                                 no_progress=no_progress)
    import io
    cli_eval._evaluate_row("x", torch.nn.Linear(2, 2), types.SimpleNamespace(tokenizer=None), args, io.StringIO())
    assert calls == [("vqa", not no_progress), ("ppl", not no_progress)]


# ------------------------------------------------------------------ no deprecation warnings of ours

def test_no_deprecation_warnings_from_our_calls(tmp_path, capsys):
    src, calib = _model_dir(tmp_path)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        for method in ("rtn", "gptq"):
            assert cli.main(["quantize", "--model", str(src), "--method", method, "--bits", "2", "--group-size",
                             "64", "--calib-file", str(calib), "--n-calib", "4", "--out",
                             str(tmp_path / method), "--no-progress"]) == 0
        from bivlm_kernels import load_quantized
        load_quantized(str(tmp_path / "gptq"))
    bad = [f"{w.category.__name__} {w.filename}:{w.lineno}: {w.message}" for w in rec
           if issubclass(w.category, (DeprecationWarning, FutureWarning))
           and re.search(r"bivlm_kernels|transformers", w.filename)]
    assert not bad, bad
