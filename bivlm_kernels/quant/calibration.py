"""Calibration batches from (image, text) pairs, built with the model's own processor.

LUQ calibrates on image+text samples mixed with ratio alpha; its exact definition is not published. Ours
(documented default, ``mix=0.5``): alpha is the share of samples given as image + text, the rest text only (the
same texts, without their image). Each sample is one batch of one sequence, so no padding enters a Hessian.
Three rules apply it: :func:`build_calibration_data` (from (image, text) pairs), :func:`mix_text_and_images`
(interleave ready-made multimodal and text-only batches) and :func:`mix_calibration` (the largest subset of
ready-made batches with that share, as LUQ's assembly uses it).
"""
from __future__ import annotations

import logging
import math
import random
from typing import Iterable, List, Optional, Sequence, Tuple

log = logging.getLogger(__name__)


def _prompt(processor, text: str, with_image: bool) -> str:
    """The text with the model's image placeholder, via the processor's chat template when it has one."""
    if with_image and getattr(processor, "chat_template", None):
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        return processor.apply_chat_template(msgs, add_generation_prompt=False, tokenize=False)
    if with_image:
        token = getattr(processor, "image_token", None)
        if token is None:
            raise ValueError(f"{type(processor).__name__} has neither a chat template nor an `image_token`; "
                             f"cannot place the image in the prompt")
        return f"{token}\n{text}"
    return text


def build_calibration_data(processor, samples: Sequence[Tuple[object, str]], n_samples: Optional[int] = None,
                           mix: float = 0.5, seq_len: int = 512, seed: int = 0) -> List[dict]:
    """Model input dicts for :func:`~bivlm_kernels.quant.quantize_model`.

    ``processor``: the model's processor (``AutoProcessor``; or a tokenizer for a text-only model, then every
    sample is text only). ``samples``: ``(image, text)`` pairs (image a PIL image / array, or None). ``mix``: share
    of samples that keep their image (LUQ's alpha; 1.0 = all multimodal, 0.0 = all text). Text-only samples are
    truncated to ``seq_len`` tokens; multimodal ones are not (that would cut image tokens).
    """
    if not 0.0 <= float(mix) <= 1.0:
        raise ValueError(f"mix (image/text ratio alpha) must lie in [0, 1], got {mix!r}")
    if not isinstance(seq_len, int) or seq_len <= 0:
        raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
    samples = list(samples)
    if not samples:
        raise ValueError("samples is empty: give at least one (image, text) pair")
    n = len(samples) if n_samples is None else int(n_samples)
    if n <= 0:
        raise ValueError(f"n_samples must be positive, got {n_samples!r}")
    rng = random.Random(seed)
    chosen = [samples[i % len(samples)] for i in range(n)]
    with_image = [img is not None for img, _ in chosen]
    n_mm = sum(with_image)
    want = round(mix * n)
    # Keep the image on exactly `want` samples (as far as samples have images), chosen at random.
    idx = [i for i, w in enumerate(with_image) if w]
    rng.shuffle(idx)
    keep = set(idx[:min(want, n_mm)])
    # The testbed's own processor (bivlm_kernels.models.testbed.TestbedProcessor) formats prompts itself.
    testbed_like = hasattr(processor, "prompt") and hasattr(processor, "pixel_values")
    multimodal = testbed_like or hasattr(processor, "image_processor")
    out = []
    for i, (img, text) in enumerate(chosen):
        if not isinstance(text, str):
            raise TypeError(f"samples[{i % len(samples)}] text must be a str, got {type(text).__name__}")
        if testbed_like:
            with_img = i in keep
            batch = processor([processor.prompt(text, image=with_img)], [img] if with_img else None)
        elif i in keep and multimodal:
            batch = processor(images=[img], text=[_prompt(processor, text, True)], return_tensors="pt")
        else:
            batch = processor(text=[_prompt(processor, text, False)], return_tensors="pt", truncation=True,
                              max_length=seq_len)
        out.append(dict(batch))
    return out


def mix_text_and_images(image_batches: Iterable[dict], text_batches: Iterable[dict], mix: float = 0.5,
                        n_samples: Optional[int] = None, seed: int = 0) -> List[dict]:
    """Interleave ready-made multimodal and text-only input dicts in the ratio ``mix`` : ``1 - mix``."""
    if not 0.0 <= float(mix) <= 1.0:
        raise ValueError(f"mix (image/text ratio alpha) must lie in [0, 1], got {mix!r}")
    mm, tx = list(image_batches), list(text_batches)
    n = n_samples if n_samples is not None else len(mm) + len(tx)
    n_mm = min(round(mix * n), len(mm))
    n_tx = min(n - n_mm, len(tx))
    out = mm[:n_mm] + tx[:n_tx]
    if not out:
        raise ValueError("no calibration batches: both inputs are empty (or n_samples is 0)")
    random.Random(seed).shuffle(out)
    return out


def mix_calibration(samples: Sequence[dict], mix: Optional[float], seed: int = 0) -> List[dict]:
    """The largest subset of ``samples`` whose share of multimodal samples (with ``pixel_values``) is ``mix``.

    LUQ's alpha on ready-made model input dicts (what :func:`~bivlm_kernels.quant.luq.luq_quantize` applies to
    its calibration data): unlike :func:`mix_text_and_images` nothing is shuffled or repeated, samples are only
    dropped. ``mix=None`` keeps the data as given; if the data has only one kind of sample and ``mix`` asks for
    both, the data is kept with a warning. Seeded, order-preserving.
    """
    samples = list(samples)
    if mix is None:
        return samples
    if not 0.0 <= float(mix) <= 1.0:
        raise ValueError(f"mix (share of image+text samples) must lie in [0, 1] or be None, got {mix!r}")
    img = [i for i, s in enumerate(samples) if s.get("pixel_values") is not None]
    txt = [i for i, s in enumerate(samples) if s.get("pixel_values") is None]
    if (mix > 0 and not img) or (mix < 1 and not txt):
        if 0 < mix < 1:
            log.warning("mix=%s asks for image and text samples, but the calibration data has %d image and %d "
                        "text-only samples; using it as given", mix, len(img), len(txt))
            return samples
        raise ValueError(f"mix={mix} needs {'image' if mix == 1 else 'text-only'} samples; the calibration data "
                         f"has {len(img)} image and {len(txt)} text-only samples")
    n = min(len(img) / mix if mix > 0 else math.inf, len(txt) / (1 - mix) if mix < 1 else math.inf)
    n_img = min(len(img), int(round(n * mix)))
    n_txt = min(len(txt), int(math.floor(n + 1e-9)) - n_img)
    rng = random.Random(seed)
    keep = set(rng.sample(img, n_img)) | set(rng.sample(txt, n_txt))
    return [s for i, s in enumerate(samples) if i in keep]
