"""Checks of every ``bivlm`` option that can be made before a model is loaded (seconds, not minutes in).

Each failure is a :class:`UsageError`: one line naming the option, the value and what is allowed, exit code 2,
no traceback (``bivlm --debug ...`` shows tracebacks of unexpected errors).
"""
from __future__ import annotations

import json
import math
import os
import re
import tempfile
from typing import Optional


class UsageError(SystemExit):
    """A bad command line. ``str(e)`` is the one-line message; the exit status is 2 (as argparse's)."""

    def __init__(self, message: str):
        super().__init__(message)
        self.code = 2


def usage(command: str, message: str) -> UsageError:
    """``UsageError("bivlm COMMAND: message")``."""
    return UsageError(f"bivlm {command}: {message}")


def check_at_least(option: str, value, minimum: float) -> None:
    """A finite number >= ``minimum`` (None: the option was not given)."""
    if value is not None and (not math.isfinite(value) or value < minimum):
        raise UsageError(f"{option} must be a number >= {minimum}, got {value!r}")


def check_fraction(option: str, value) -> None:
    if value is None or not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise UsageError(f"{option} must be a number in [0, 1], got {value!r}")


def check_regexes(option: str, patterns) -> None:
    for pat in patterns:
        try:
            re.compile(pat)
        except re.error as e:
            raise UsageError(f"{option} {pat!r} is not a valid regular expression: {e}") from None


def check_device(option: str, device: Optional[str]) -> None:
    """A device string torch understands, and, for cuda/mps, one that exists here."""
    if device is None:
        return
    import torch
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise UsageError(f"{option} {device!r} is not a device (e.g. cpu, cuda, cuda:1): {e}") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise UsageError(f"{option} {device!r}: no CUDA device is available here; use --device cpu or leave "
                             f"it out")
        if dev.index is not None and dev.index >= n:
            raise UsageError(f"{option} {device!r}: there are only {n} CUDA device(s) (cuda:0 .. cuda:{n - 1})")
    elif dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise UsageError(f"{option} {device!r}: MPS is not available here")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"{option} {device!r}: device type {dev.type!r} is not supported; allowed: cpu, cuda, mps")


def check_out_dir(option: str, out: str, overwrite: bool) -> str:
    """``--out``: a path of its own, free or (with --overwrite) a bivlm checkpoint or empty directory, in a
    place we can write to. Returns the absolute path."""
    from ..checkpoint import safe_write
    from ..checkpoint.directory import is_checkpoint_dir
    try:
        full = safe_write.check_output_path(out, option)
        safe_write.check_replaceable(full, overwrite, is_checkpoint_dir, what="checkpoint directory",
                                     option=option)
    except (ValueError, TypeError, FileExistsError) as e:
        raise UsageError(str(e).replace("overwrite=True (CLI: --overwrite)", "--overwrite")) from None
    anc = os.path.dirname(full)
    while not os.path.exists(anc):
        anc = os.path.dirname(anc)
    if not os.path.isdir(anc):
        raise UsageError(f"{option} {out!r}: {anc!r} is a file, not a directory")
    try:                                         # a real probe: os.access says yes to root on read-only mounts
        os.rmdir(tempfile.mkdtemp(prefix=".bivlm-write-probe-", dir=anc))
    except OSError as e:
        raise UsageError(f"{option} {out!r} is not writable: cannot create a directory in {anc!r} "
                         f"({e.strerror})") from None
    return full


def check_input_file(option: str, path: Optional[str]) -> None:
    if path is None:
        return
    if not os.path.isfile(path):
        raise UsageError(f"{option} {path!r} is not a file"
                         f"{' (it is a directory)' if os.path.isdir(path) else ' (it does not exist)'}")
    if not os.access(path, os.R_OK):
        raise UsageError(f"{option} {path!r} is not readable")


def inspect_model_dir(option: str, path: str) -> dict:
    """``--model`` of ``bivlm quantize``: a plain Hugging Face model directory (not a bivlm checkpoint) with a
    readable config.json and weight files. Returns ``{"safetensors": bool}``."""
    from ..checkpoint.directory import QUANT_FILE, is_checkpoint_dir
    if not os.path.isdir(path):
        raise UsageError(f"{option} {path!r} is not a directory (a local Hugging Face model directory is "
                         f"expected; nothing is downloaded)")
    if is_checkpoint_dir(path) or os.path.isfile(os.path.join(path, QUANT_FILE)):
        raise UsageError(f"{option} {path!r} is already a bivlm checkpoint (it has {QUANT_FILE}); re-quantizing "
                         f"a quantized model is not supported: pass the original full-precision model directory "
                         f"(bivlm eval --model evaluates a checkpoint)")
    cfg = os.path.join(path, "config.json")
    try:
        with open(cfg) as f:
            config = json.load(f)
    except FileNotFoundError:
        raise UsageError(f"{option} {path!r} has no config.json; a Hugging Face model directory is expected") \
            from None
    except (OSError, ValueError) as e:
        raise UsageError(f"{option} {path!r}: config.json is not readable JSON ({e})") from None
    if not isinstance(config, dict):
        raise UsageError(f"{option} {path!r}: config.json must hold a JSON object")
    files = os.listdir(path)
    st = [f for f in files if f.endswith(".safetensors")]
    pt = [f for f in files if f.endswith(".bin") and f.startswith("pytorch_model")]
    if not st and not pt:
        raise UsageError(f"{option} {path!r} holds no weights (*.safetensors or pytorch_model*.bin)")
    return {"safetensors": bool(st)}


def check_load_report(option: str, path: str, info: dict) -> None:
    """Refuse a model whose weights were not all in the directory (transformers initialises those at random:
    quantizing that noise would give a checkpoint of garbage)."""
    missing = sorted(info.get("missing_keys") or [])
    mismatched = sorted(str(m[0]) if isinstance(m, (tuple, list)) else str(m)
                        for m in (info.get("mismatched_keys") or []))
    if missing or mismatched:
        bad = missing + mismatched
        raise UsageError(f"{option} {path!r}: {len(bad)} weight(s) are missing from the directory or have the "
                         f"wrong shape and would be randomly initialised (e.g. {bad[:3]}); refusing to quantize")


def check_eval_model(option: str, path: Optional[str]) -> None:
    """``bivlm eval --model``: a bivlm checkpoint directory or a bivlm .safetensors file."""
    if path is None:
        return
    from .. import checkpoint
    from ..checkpoint.directory import read_quant_info
    try:
        if os.path.isdir(path):
            read_quant_info(path)
        elif os.path.isfile(path):
            checkpoint.read_metadata(path)
        else:
            raise UsageError(f"{option} {path!r} does not exist")
    except ValueError as e:
        raise UsageError(f"{option} {path!r} is not a bivlm checkpoint (a directory from bivlm quantize / "
                         f"save_quantized, or a .safetensors file from checkpoint.save): {e}") from None
