"""Issue 16, items 1, 4 and 9 (CLI side): every option is checked before a model is loaded; a bad one is one
line on stderr naming it, exit status 2, no traceback; nothing at --out is destroyed."""
import json
import os
import subprocess
import sys
import tempfile

import pytest
import torch

transformers = pytest.importorskip("transformers")

from bivlm_kernels import cli, formats  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(args, cwd):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "bivlm_kernels.cli", *args], cwd=cwd, capture_output=True,
                          text=True, env=env, timeout=300)


@pytest.mark.parametrize("out", ["", "."])
def test_out_empty_or_current_dir_deletes_nothing(tmp_path, out):
    (tmp_path / "precious.txt").write_text("mine")
    (tmp_path / "sub").mkdir()
    r = run_cli(["quantize", "--out", out, "--overwrite"], cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "--out" in lines[0] and "Traceback" not in r.stderr, r.stderr
    assert (tmp_path / "precious.txt").read_text() == "mine"
    assert sorted(os.listdir(tmp_path)) == ["precious.txt", "sub"]


@pytest.fixture
def no_model_load(monkeypatch):
    """Loading a model (or building the testbed) fails the test: the checks must come first."""
    def boom(*a, **k):
        raise AssertionError("a model was loaded before the options were checked")
    monkeypatch.setattr(cli.quantize, "_load_model", boom)
    monkeypatch.setattr(cli.quantize, "_testbed", boom)
    import bivlm_kernels.models.testbed as tb
    monkeypatch.setattr(tb, "load_testbed", boom)


def expect_usage_error(capsys, argv, *needles):
    """Exit status 2 and exactly one line on stderr, holding every needle."""
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert "Traceback" not in err and len(lines) == 1, err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def _bad_dirs(tmp_path):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "nocfg").mkdir()
    (tmp_path / "badcfg").mkdir()
    (tmp_path / "badcfg" / "config.json").write_text("{not json")
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (ckpt / "quantization.json").write_text(json.dumps({"format": formats.FORMAT_NAME, "format_version": 1}))
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\nnot json\n')
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("mine")


BAD_QUANTIZE = [
    (["--mix", "2"], "--mix"), (["--mix", "nan"], "--mix"), (["--seq-len", "0"], "--seq-len"),
    (["--n-calib", "0"], "--n-calib"), (["--exclude", "("], "--exclude"), (["--device", "foo"], "--device"),
    (["--calib-file", "{t}/missing.jsonl"], "--calib-file"), (["--calib-file", "{t}"], "--calib-file"),
    (["--calib-file", "{t}/bad.jsonl"], "--calib-file"),
    (["--model", "{t}/missing"], "--model"), (["--model", "{t}/afile"], "--model"),
    (["--model", "{t}/nocfg"], "--model"), (["--model", "{t}/badcfg"], "--model"),
    (["--model", "{t}/noweights"], "--model"), (["--model", "{t}/ckpt"], "already a bivlm checkpoint"),
    (["--bits", "3"], "--bits"), (["--group-size", "100"], "--group-size"), (["--components", "foo"], "--components"),
    (["--dtype", "float16"], "--dtype"), (["--n-low", "3"], "--n-low"), (["--method", "luq"], "--target-avg-bits"),
    (["--option", "nokey"], "--option"), (["--target-avg-bits", "-1", "--method", "luq"], "--target-avg-bits"),
]


@pytest.mark.parametrize("extra, needle", BAD_QUANTIZE, ids=[" ".join(a) for a, _ in BAD_QUANTIZE])
def test_quantize_options_are_checked_before_loading(tmp_path, capsys, no_model_load, extra, needle):
    _bad_dirs(tmp_path)
    argv = ["quantize", "--out", str(tmp_path / "out")] + [a.format(t=tmp_path) for a in extra]
    expect_usage_error(capsys, argv, needle)
    assert not (tmp_path / "out").exists()


def test_out_checks(tmp_path, capsys, no_model_load):
    _bad_dirs(tmp_path)
    line = expect_usage_error(capsys, ["quantize", "--out", str(tmp_path / "other"), "--overwrite"], "--out")
    assert "not a checkpoint directory of bivlm_kernels" in line
    assert (tmp_path / "other" / "keep.txt").read_text() == "mine"
    expect_usage_error(capsys, ["quantize", "--out", str(tmp_path / "other")], "--out", "already exists")
    expect_usage_error(capsys, ["quantize", "--out", str(tmp_path / "afile" / "sub")], "--out", "is a file")
    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        expect_usage_error(capsys, ["quantize", "--out", str(ro / "out")], "--out", "not writable")
        ro.chmod(0o700)
    elif os.path.isdir("/sys"):                 # root ignores mode bits; /sys refuses new directories
        try:
            os.rmdir(tempfile.mkdtemp(dir="/sys"))
        except OSError:
            expect_usage_error(capsys, ["quantize", "--out", "/sys/bivlm-out"], "--out", "not writable")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_device_cuda_without_gpu(tmp_path, capsys, no_model_load):
    expect_usage_error(capsys, ["quantize", "--out", str(tmp_path / "o"), "--device", "cuda"], "--device",
                       "no CUDA device")


def test_eval_refuses_a_plain_model_dir_before_building_the_testbed(tmp_path, capsys, no_model_load):
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "config.json").write_text("{}")
    expect_usage_error(capsys, ["eval", "--model", str(tmp_path / "plain")], "--model", "not a bivlm checkpoint")
    expect_usage_error(capsys, ["eval", "--model", str(tmp_path / "nowhere")], "--model")
    expect_usage_error(capsys, ["eval", "--limit", "0"], "--limit")
    expect_usage_error(capsys, ["eval", "--rtn-bits", "2", "--group-size", "100"], "--group-size")


def test_unexpected_errors_are_one_line_unless_debug(tmp_path, capsys, monkeypatch):
    def boom(args):
        raise RuntimeError("something broke\nsecond line")
    monkeypatch.setattr(cli, "_quantize", boom)
    assert cli.main(["quantize", "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "RuntimeError: something broke" in err[0] and "--debug" in err[0]
    with pytest.raises(RuntimeError):
        cli.main(["--debug", "quantize", "--out", str(tmp_path / "o")])
    with pytest.raises(RuntimeError):
        cli.main(["quantize", "--debug", "--out", str(tmp_path / "o")])


# ------------------------------------------------------------------ a real (tiny) model directory

def _model_dir(tmp_path, hidden=64, n_calib=4):
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {w: i for i, w in enumerate(["[UNK]", "[PAD]"] + [f"w{i}" for i in range(200)])}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")
    src = tmp_path / "src"
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=128, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=202,
                                   max_position_embeddings=64)
    transformers.LlamaForCausalLM(cfg).save_pretrained(src)
    fast.save_pretrained(src)
    calib = tmp_path / "calib.jsonl"
    calib.write_text("\n".join(json.dumps({"text": " ".join(f"w{(i * 7 + j) % 200}" for j in range(12))})
                               for i in range(n_calib)))
    return src, calib


def _args(src, calib, out):
    return ["quantize", "--model", str(src), "--method", "rtn", "--bits", "2", "--group-size", "64",
            "--calib-file", str(calib), "--n-calib", "4", "--out", str(out), "--no-progress"]


def test_quantize_refuses_its_own_checkpoint_and_missing_weights(tmp_path, capsys, monkeypatch):
    from safetensors.torch import load_file, save_file
    src, calib = _model_dir(tmp_path)
    seen = {}
    orig = transformers.LlamaForCausalLM.from_pretrained.__func__

    def spy(cls, path, **kw):
        seen.update(kw)
        return orig(cls, path, **kw)
    monkeypatch.setattr(transformers.LlamaForCausalLM, "from_pretrained", classmethod(spy))
    out = tmp_path / "out"
    assert cli.main(_args(src, calib, out)) == 0
    assert seen.get("use_safetensors") is True           # a pickle file is never opened
    capsys.readouterr()
    # item 4: the checkpoint just written is not a model to quantize again
    expect_usage_error(capsys, _args(out, calib, tmp_path / "again"), "--model", "already a bivlm checkpoint")
    # weights missing from the directory would be randomly initialised: refused
    wfile = src / "model.safetensors"
    tensors = load_file(wfile)
    dropped = next(k for k in tensors if "mlp.up_proj" in k)
    save_file({k: v for k, v in tensors.items() if k != dropped}, wfile, metadata={"format": "pt"})
    expect_usage_error(capsys, _args(src, calib, tmp_path / "noisy"), "--model", "missing", "up_proj")
    assert not (tmp_path / "noisy").exists()
