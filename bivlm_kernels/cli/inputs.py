"""What ``bivlm quantize`` reads besides its options: a --model directory, a --calib-file, the testbed.

Split from :mod:`bivlm_kernels.cli` (the command flow); every failure is a one-line
:class:`~bivlm_kernels.cli.checks.UsageError` naming the option.
"""
from __future__ import annotations

import json
import os
from typing import Optional

from . import checks
from .checks import usage


def model_class(path: str):
    """The transformers class of a --model directory, read from its config (no weights touched)."""
    import transformers
    from transformers import AutoConfig
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as e:                  # unknown model_type, malformed fields ...
        raise usage("quantize", f"--model {path!r}: config.json cannot be read by transformers "
                     f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    archs = getattr(config, "architectures", None) or []
    cls = next((getattr(transformers, a) for a in archs if isinstance(getattr(transformers, a, None), type)), None)
    if cls is None or not issubclass(cls, transformers.PreTrainedModel):
        raise usage("quantize", f"--model {path!r}: config.json names architectures {archs}, none of which this "
                     f"transformers ({transformers.__version__}) provides")
    return cls


def load_model(path: str, cls, dtype: Optional[str], safetensors: bool, progress: bool = True):
    """A local HF model directory -> (model, processor or tokenizer). Only safetensors are read when the
    directory has them (a pickle file is then never opened); missing weights are refused (our one-line
    message replaces transformers' load-report table)."""
    import torch
    import transformers
    from transformers.utils import logging as hf_logging
    kw = {"local_files_only": True, "use_safetensors": safetensors, "output_loading_info": True}
    if dtype:
        kw["dtype"] = getattr(torch, dtype)
    verbosity, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        model, info = cls.from_pretrained(path, **kw)
    except Exception as e:
        raise usage("quantize", f"--model {path!r} cannot be loaded ({type(e).__name__}: "
                     f"{str(e).splitlines()[0] if str(e) else ''})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()
    checks.check_load_report("--model", path, info)
    model.eval()
    processor = None
    for auto in ("AutoProcessor", "AutoTokenizer"):
        try:
            processor = getattr(transformers, auto).from_pretrained(path, local_files_only=True)
            break
        except Exception:          # no processor files of that kind: try the next
            continue
    return model, processor


def calib_from_file(path: str) -> list:
    pairs = []
    try:
        with open(path) as f:
            lines = f.readlines()
    except (OSError, UnicodeDecodeError) as e:
        raise usage("quantize", f"--calib-file {path!r} cannot be read as text ({e})") from None
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            text = rec["text"]
            if not isinstance(text, str):
                raise TypeError
        except (json.JSONDecodeError, KeyError, TypeError):
            raise usage("quantize", f"--calib-file {path}:{i + 1} must be a JSON object with a 'text' string") from None
        img = rec.get("image")
        if img is not None:
            from PIL import Image
            img_path = os.path.join(os.path.dirname(path), str(img))
            try:
                img = Image.open(img_path).convert("RGB")
            except (OSError, ValueError) as e:
                raise usage("quantize", f"--calib-file {path}:{i + 1}: image {img_path!r} cannot be opened ({e})") from None
        pairs.append((img, text))
    if not pairs:
        raise usage("quantize", f"--calib-file {path} holds no calibration samples")
    return pairs


def testbed():
    try:
        from ..models import testbed
        from ..models.testbed import calibration_data, load_testbed
    except ImportError as e:
        raise usage("quantize", f"no --model given and the testbed is unavailable ({e}); pass --model PATH (a local Hugging "
                     f"Face model directory), or install the testbed extras (pip install 'bivlm_kernels[testbed]')"
                     ) from None
    missing = testbed.missing_packages()
    if missing:
        raise usage("quantize", f"no --model given and the testbed needs {missing}; pass --model PATH or install them "
                     f"({testbed.PIP_DEPS})")
    return load_testbed, calibration_data


def testbed_text(n: int) -> list:
    """Text-only calibration samples for a --model without --calib-file: the testbed's shipped text."""
    try:
        from ..models.testbed import read_text
        text = read_text("calib")
    except (ImportError, FileNotFoundError) as e:
        raise usage("quantize", f"--model without --calib-file uses the testbed's calibration text, which is unavailable "
                     f"({e}); pass --calib-file JSONL") from None
    chunks = [c.strip() for c in text.split("\n\n") if len(c.strip()) > 200]
    if not chunks:
        raise usage("quantize", "the testbed calibration text is empty; pass --calib-file JSONL")
    return [(None, chunks[i % len(chunks)]) for i in range(n)]
