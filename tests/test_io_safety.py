"""Issue 16, items 1, 2, 3, 6 and 8 (checkpoint side): writing never destroys data, a failure at any step of
``save_quantized`` leaves a complete checkpoint at the path, leftovers are cleaned, headers are checked."""
import json
import os
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")

from bivlm_kernels import checkpoint  # noqa: E402
from bivlm_kernels.checkpoint import safe_write  # noqa: E402
from bivlm_kernels.nn import quantize_linears_  # noqa: E402
from bivlm_kernels.checkpoint import directory as qio  # noqa: E402
from bivlm_kernels.quant import load_quantized, save_quantized  # noqa: E402


def tiny_quantized(dtype=torch.float32):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=300,
                                   max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(cfg).eval()
    quantize_linears_(model, 2, 64, filter_fn=lambda name, m: ".layers." in name, dtype=dtype)
    return model


@pytest.fixture(scope="module")
def model():
    return tiny_quantized()


def tag_of(path):
    """The report tag of the complete checkpoint at ``path`` (and it loads)."""
    load_quantized(path)
    return json.load(open(os.path.join(path, "quantization.json")))["report"]["tag"]


# ------------------------------------------------------------------ item 1: paths that are never outputs

def test_empty_and_current_directory_are_refused(model, tmp_path, monkeypatch):
    scratch = tmp_path / "work"
    (scratch / "sub").mkdir(parents=True)
    (scratch / "precious.txt").write_text("mine")
    monkeypatch.chdir(scratch / "sub")
    for bad in ("", " ", ".", "./", os.getcwd(), "..", str(scratch)):
        with pytest.raises(ValueError, match="current directory|empty"):
            save_quantized(model, bad, overwrite=True)
    assert (scratch / "precious.txt").read_text() == "mine" and (scratch / "sub").is_dir()
    assert sorted(os.listdir(scratch)) == ["precious.txt", "sub"]


def test_root_and_home_are_refused(model, tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    (home / "notes").write_text("x")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="home directory"):
        save_quantized(model, str(home), overwrite=True)
    with pytest.raises(ValueError, match="home directory"):
        checkpoint.save(model, os.path.expanduser("~"))
    with pytest.raises(ValueError, match="filesystem root"):
        safe_write.check_output_path("/")           # the rule save_quantized applies first (not run on "/")
    assert os.listdir(home) == ["notes"]


# ------------------------------------------------------------------ item 2: overwrite replaces only ours

def test_overwrite_replaces_only_a_checkpoint_or_an_empty_dir(model, tmp_path):
    other = tmp_path / "photos"
    other.mkdir()
    (other / "a.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(FileExistsError, match="photos.*not a checkpoint directory of bivlm_kernels"):
        save_quantized(model, str(other), overwrite=True)
    assert os.listdir(other) == ["a.jpg"]
    bad_json = tmp_path / "fake"
    bad_json.mkdir()
    (bad_json / "quantization.json").write_text('{"format": "gguf"}')
    with pytest.raises(FileExistsError, match="fake"):
        save_quantized(model, str(bad_json), overwrite=True)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(FileExistsError):
        save_quantized(model, str(a_file), overwrite=True)
    assert a_file.read_text() == "x"
    link = tmp_path / "link"
    link.symlink_to(other)
    with pytest.raises(FileExistsError, match="symbolic link"):
        save_quantized(model, str(link), overwrite=True)
    empty = tmp_path / "empty"
    empty.mkdir()
    save_quantized(model, str(empty), overwrite=True, report={"tag": "a"})
    save_quantized(model, str(empty), overwrite=True, report={"tag": "b"})     # a checkpoint: replaced
    assert tag_of(str(empty)) == "b"
    with pytest.raises(TypeError, match="overwrite"):
        save_quantized(model, str(empty), overwrite="yes")


# ------------------------------------------------------------------ item 3: fault injection

class Injected(OSError):
    pass


def _instrument(monkeypatch, model, fail_at):
    """Wrap every step of a save; the ``fail_at``-th call (0-based, over all of them) raises. Returns the
    counter list (its length is the number of steps seen)."""
    calls = []

    def wrap(fn, name):
        def inner(*a, **k):
            calls.append(name)
            if len(calls) - 1 == fail_at:
                raise Injected(f"injected failure at step {fail_at} ({name})")
            return fn(*a, **k)
        return inner

    for mod, attr in ((os, "replace"), (os, "remove"), (os, "fsync"), (os, "makedirs"),
                      (safe_write, "make_partial_dir"), (safe_write, "fsync_tree"),
                      (safe_write, "check_replaceable"), (safe_write, "install_dir"),
                      (safe_write, "clean_leftovers"), (checkpoint, "save"), (qio.json, "dump")):
        monkeypatch.setattr(mod, attr, wrap(getattr(mod, attr), f"{getattr(mod, '__name__', mod)}.{attr}"))
    for cls in (type(model.config), type(model.generation_config)):      # on the class: not serialized
        monkeypatch.setattr(cls, "save_pretrained", wrap(cls.save_pretrained, cls.__name__))
    return calls


def test_a_failure_at_any_step_keeps_a_complete_checkpoint(model, tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt")
    save_quantized(model, path, report={"tag": "old"})
    with monkeypatch.context() as m:                        # count the steps of one good save
        steps = _instrument(m, model, -1)
        save_quantized(model, path, overwrite=True, report={"tag": "old"})
    assert len(steps) > 20 and "bivlm_kernels.checkpoint.safe_write.install_dir" in steps
    outcomes = []
    for k in range(len(steps)):
        with monkeypatch.context() as m:
            calls = _instrument(m, model, k)
            try:
                save_quantized(model, path, overwrite=True, report={"tag": "new"})
                failed = False                              # a swallowed failure (fsync of a directory)
            except Injected:
                failed = True
        tag = tag_of(path)                                  # a complete checkpoint is at the path ...
        assert tag in ("old", "new"), (k, calls[-1])        # ... the old one or the new one
        assert tag == "new" or failed, (k, calls[-1])
        assert not [e for e in os.listdir(tmp_path) if ".partial-" in e], (k, calls[-1])
        outcomes.append((steps[k], failed, tag))
        if tag == "new":                                    # start each round from the old checkpoint
            save_quantized(model, path, overwrite=True, report={"tag": "old"})
    # both outcomes happen: a failure before the install keeps the old, one after it keeps the new
    assert {(True, "old"), (True, "new")} <= {(f, t) for _, f, t in outcomes}, outcomes
    # whatever a failure left behind (an old checkpoint moved aside ...) is gone after a good save
    save_quantized(model, path, overwrite=True, report={"tag": "final"})
    assert os.listdir(tmp_path) == ["ckpt"] and tag_of(path) == "final"


def test_failed_install_restores_the_old_checkpoint(model, tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt")
    save_quantized(model, path, report={"tag": "old"})
    real = os.replace

    def replace(src, dst):
        if ".partial-" in os.fspath(src) and os.fspath(dst) == path:     # the install of the new one
            raise Injected("rename failed")
        return real(src, dst)
    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(Injected):
        save_quantized(model, path, overwrite=True, report={"tag": "new"})
    monkeypatch.undo()
    assert tag_of(path) == "old" and os.listdir(tmp_path) == ["ckpt"]


def test_double_fault_names_the_moved_aside_checkpoint(model, tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt")
    save_quantized(model, path, report={"tag": "old"})
    real = os.replace

    def replace(src, dst):
        if os.fspath(dst) == path:                  # both the install and the restore fail
            raise Injected("rename failed")
        return real(src, dst)
    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match=r"previous one: it is at .*ckpt\.old-"):
        save_quantized(model, path, overwrite=True, report={"tag": "new"})
    monkeypatch.undo()
    with pytest.raises(FileNotFoundError, match=r"ckpt\.old-.*rename it back"):
        load_quantized(path)
    # a save without overwrite does not remove the only copy of the previous checkpoint ...
    save_quantized(model, path, report={"tag": "new"})
    assert len([e for e in os.listdir(tmp_path) if e.startswith("ckpt.old-")]) == 1
    # ... a save with overwrite does
    save_quantized(model, path, overwrite=True, report={"tag": "newer"})
    assert os.listdir(tmp_path) == ["ckpt"]


def test_leftovers_of_killed_saves_are_cleaned_and_only_ours(model, tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt")
    save_quantized(model, path, report={"tag": "old"})
    # a killed process runs no cleanup: no rmtree of the partial dir, no rmtree of the old one
    monkeypatch.setattr(qio.shutil, "rmtree", lambda *a, **k: None)
    monkeypatch.setattr(qio.checkpoint, "save", lambda *a, **k: (_ for _ in ()).throw(Injected("killed")))
    with pytest.raises(Injected):
        save_quantized(model, path, overwrite=True)
    monkeypatch.undo()
    monkeypatch.setattr(safe_write.shutil, "rmtree", lambda *a, **k: None)
    monkeypatch.setattr(safe_write, "clean_leftovers", lambda *a, **k: [])
    save_quantized(model, path, overwrite=True, report={"tag": "new"})
    monkeypatch.undo()
    left = sorted(os.listdir(tmp_path))
    assert any(".partial-" in e for e in left) and any(".old-" in e for e in left), left
    # look-alikes that are not ours stay
    (tmp_path / "ckpt.partial-mine").mkdir()
    (tmp_path / "ckpt.partial-mine" / "data.txt").write_text("user")
    (tmp_path / "ckpt.old-notes").write_text("user file")
    save_quantized(model, path, overwrite=True, report={"tag": "newest"})
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "ckpt.old-notes", "ckpt.partial-mine"]
    assert tag_of(path) == "newest"


# ------------------------------------------------------------------ item 6 and single files

def test_reserved_header_keys_cannot_be_overwritten(tmp_path):
    m = tiny_quantized(torch.float32)
    p = str(tmp_path / "m.safetensors")
    for key in checkpoint.RESERVED_KEYS:
        with pytest.raises(ValueError, match="reserved header key"):
            checkpoint.save(m, p, extra_metadata={key: "float16"})
    assert not os.path.exists(p)
    checkpoint.save(m, p, extra_metadata={"note": {"a": 1}})
    meta = checkpoint.read_metadata(p)
    assert meta["dtype"] == "float32" and json.loads(meta["note"]) == {"a": 1}


def test_single_file_save_is_atomic_and_refuses_foreign_files(tmp_path, monkeypatch):
    m = tiny_quantized()
    p = str(tmp_path / "m.safetensors")
    checkpoint.save(m, p)
    checkpoint.save(m, p)                                   # our own checkpoint: replaced
    before = open(p, "rb").read()
    foreign = tmp_path / "weights.safetensors"
    foreign.write_bytes(b"not ours")
    with pytest.raises(FileExistsError, match="weights.safetensors"):
        checkpoint.save(m, str(foreign))
    assert foreign.read_bytes() == b"not ours"
    with pytest.raises(IsADirectoryError):
        checkpoint.save(m, str(tmp_path))
    with pytest.raises(ValueError, match="empty"):
        checkpoint.save(m, "")
    # a failure in the final rename leaves the old file intact and no temporary file
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(Injected("rename")))
    with pytest.raises(Injected):
        checkpoint.save(m, p)
    monkeypatch.undo()
    assert open(p, "rb").read() == before
    assert sorted(os.listdir(tmp_path)) == ["m.safetensors", "weights.safetensors"]
    # a temporary file left by a killed save (its header is ours) is removed by the next save
    shutil.copy(p, tmp_path / ".m.safetensors.tmp-dead")
    (tmp_path / ".m.safetensors.tmp-user").write_text("not a checkpoint")
    checkpoint.save(m, p)
    assert sorted(os.listdir(tmp_path)) == [".m.safetensors.tmp-user", "m.safetensors", "weights.safetensors"]


# ------------------------------------------------------------------ item 8: headers of the wrong type

def test_header_fields_of_the_wrong_type(model, tmp_path):
    from safetensors.torch import load_file, save_file
    path = save_quantized(model, str(tmp_path / "ckpt"))
    wfile = os.path.join(path, "model.safetensors")
    tensors, meta = load_file(wfile), checkpoint.read_metadata(wfile)
    for layers in ("[]", '["model.layers.0.mlp.up_proj"]', "{", '{"x": 1}', '{"x": {"in_features": "64"}}'):
        save_file(tensors, wfile, metadata=dict(meta, layers=layers))
        with pytest.raises(ValueError, match="layers|layer spec"):
            load_quantized(path)
    save_file(tensors, wfile, metadata=meta)
    qfile = os.path.join(path, "quantization.json")
    info = json.load(open(qfile))
    for bad, match in (({"model_class": "pipeline"}, "not a transformers model class"),
                       ({"model_class": "AutoConfig"}, "not a transformers model class"),
                       ({"model_class": 3}, "'model_class' must be str"),
                       ({"dtype": ["float32"]}, "'dtype' must be str"),
                       ({"report": "x"}, "'report' must be dict")):
        json.dump(dict(info, **bad), open(qfile, "w"))
        with pytest.raises(ValueError, match=match):
            load_quantized(path)
    json.dump(info, open(qfile, "w"))
    load_quantized(path)


def test_broken_config_json_is_a_value_error(model, tmp_path):
    path = save_quantized(model, str(tmp_path / "ckpt"))
    with open(os.path.join(path, "config.json"), "w") as f:
        f.write("{broken")
    with pytest.raises(ValueError, match="config.json cannot be read"):
        load_quantized(path)
