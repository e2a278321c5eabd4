"""Visual-token pruning inside the language model of a (quantized) VLM.

Bi-VLM reports that after quantization 90-99 % of the image tokens are redundant, while dropping *text* tokens
hurts far more. :func:`enable_token_pruning` makes that measurable on HF ``LlavaForConditionalGeneration``,
``Qwen2VLForConditionalGeneration`` and ``Qwen2_5_VLForConditionalGeneration`` (and their headless ``*Model``
bases), quantized or not::

    with enable_token_pruning(model, layer=2, keep=0.1, criterion="attention") as pruning:
        out = model.generate(**inputs, max_new_tokens=8)
    pruning.last.kept          # visual tokens kept per batch row in the last prefill

What happens (FastV-style): layers ``0 .. layer-1`` see the whole prompt; just before decoder layer ``layer`` the
candidate tokens (``target="image"``: the ``image_token_id`` / ``video_token_id`` positions of ``input_ids``;
``target="text"``: every other attended token except the last one, the ablation) are ranked by ``criterion`` and
the lowest-ranked are *removed* from the hidden states, so layers ``layer ..`` run on a shorter sequence (that is
the prefill speed-up) and their KV cache holds only the kept tokens.

Consistency after pruning (what the layer hooks rewrite for layers >= ``layer``):

* hidden states, rotary ``position_embeddings`` (cos/sin, which already hold Qwen's 3-D mrope sections),
  ``position_ids`` (1-D, or Qwen's text position ids), ``cache_position`` and the attention mask (4-D masks:
  query and key axes; 2-D padding masks: key axis) are gathered at the kept positions. Kept tokens keep their
  *original* positions: RoPE is relative, so a kept pair of tokens sees the same relative offset as before.
* Decoding: layers ``< layer`` (including layer 0, whose cache length HF reads to number new tokens) hold the full
  prompt, so HF numbers new tokens (1-D positions, and Qwen's ``rope_deltas``) exactly as without pruning. Layers
  ``>= layer`` hold ``kept + generated`` keys; the mask HF builds for the full length is gathered at
  ``kept prompt positions + all generated positions`` on every step.

Limits (each raises a clear error rather than computing garbage): a dynamic (``DynamicCache``) or no cache;
``layer >= 1`` (pruning before layer 0 would shorten the cache HF counts positions from); ``input_ids`` must be
given at prefill (the candidates are found from them); rows of a batch must lose the same number of tokens
(true for equal image counts; otherwise padding positions are dropped to even them out, and it fails if there
are not enough); eager or SDPA attention (flex-attention block masks are not rewritten). A prompt chunk that
arrives while the cache already holds tokens is not pruned. Full-sequence outputs (``logits``, hidden states)
come back *shortened*: ``last.kept_positions`` maps them to the original positions (labels/loss are not
supported while pruning).

Kept count per row with ``n`` candidates: ``keep_count`` -> ``min(keep_count, n)``; ratio ``keep`` ->
``max(1, floor(keep * n + 0.5))`` (round half up, at least one), e.g. 16 image tokens: 50 % -> 8, 25 % -> 4,
10 % -> 2, 5 % -> 1.
"""
from __future__ import annotations

import inspect
import math
import sys
from dataclasses import dataclass, field
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .hf_compat import find_cache

CRITERIA = ("attention", "norm", "similarity", "random")
TARGETS = ("image", "text")

__all__ = ["CRITERIA", "TARGETS", "PruneRecord", "TokenPruning", "enable_token_pruning", "keep_count_for",
           "active_pruning", "map_positions"]


# ------------------------------------------------------------------------------------------------ arguments
def keep_count_for(n: int, keep: Optional[float] = None, keep_count: Optional[int] = None) -> int:
    """Number of the ``n`` candidate tokens that are kept (see the module docstring for the rounding)."""
    if n <= 0:
        return 0
    if keep_count is not None:
        return min(int(keep_count), n)
    return min(n, max(1, math.floor(keep * n + 0.5)))


def _check_args(keep, keep_count, criterion, target, layer, num_layers):
    if keep_count is not None:
        if isinstance(keep_count, bool) or not isinstance(keep_count, int) or keep_count < 1:
            raise ValueError(f"keep_count must be an int >= 1 (number of candidate tokens kept), got {keep_count!r}")
    else:
        if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0.0 < float(keep) <= 1.0:
            raise ValueError(f"keep must be a ratio in (0, 1] (fraction of candidate tokens kept), got {keep!r}; "
                             "use keep_count=N for a count")
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    if isinstance(layer, bool) or not isinstance(layer, int) or not 1 <= layer < num_layers:
        raise ValueError(f"layer must be an int in [1, {num_layers - 1}] (the first decoder layer that sees the "
                         f"pruned sequence; the language model has {num_layers} layers), got {layer!r}")


# ------------------------------------------------------------------------------------------------ model parts
def _find_parts(model: nn.Module):
    """(multimodal base module that receives input_ids, decoder layers, visual token ids)."""
    base = None
    for cand in (model, getattr(model, "model", None)):
        lm = getattr(cand, "language_model", None)
        if isinstance(lm, nn.Module) and isinstance(getattr(lm, "layers", None), nn.ModuleList):
            base = cand
            break
    if base is None:
        raise TypeError(f"enable_token_pruning needs a VLM with a `language_model` holding decoder `layers` "
                        f"(LLaVA, Qwen2-VL, Qwen2.5-VL), got {type(model).__name__}")
    cfg = getattr(model, "config", None) or base.config
    ids = [getattr(cfg, name, None) for name in ("image_token_id", "video_token_id")]
    ids = [int(i) for i in ids if i is not None]
    if not ids:
        raise TypeError(f"{type(model).__name__}.config has no image_token_id: cannot find the image tokens")
    return base, base.language_model.layers, ids


def _rope(attn: nn.Module):
    """The modeling file's own ``apply_rotary_pos_emb`` (Llama and Qwen2-VL share the formula), or a copy."""
    fn = getattr(sys.modules.get(type(attn).__module__), "apply_rotary_pos_emb", None)
    if fn is not None:
        return fn

    def apply(q, k, cos, sin):
        def rot(x):
            x1, x2 = x.chunk(2, dim=-1)
            return torch.cat((-x2, x1), dim=-1)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        return q * cos + rot(q) * sin, k * cos + rot(k) * sin
    return apply


# ------------------------------------------------------------------------------------------------ gathering
def _take(t: torch.Tensor, idx: torch.Tensor, dim: int, bdim: int) -> torch.Tensor:
    """``t`` gathered along ``dim`` at per-row indices ``idx`` [B, n]; ``t``'s batch axis ``bdim`` (size 1 or B,
    before ``dim``) is broadcast to B first (e.g. position ids ``[1, S]`` shared by all rows)."""
    dim %= t.ndim
    bdim %= t.ndim
    b, n = idx.shape
    if t.shape[bdim] not in (1, b):
        raise RuntimeError(f"token pruning: tensor of shape {tuple(t.shape)} has batch {t.shape[bdim]}, expected {b}")
    shape = list(t.shape)
    shape[bdim] = b
    t = t.expand(shape)
    view = [1] * t.ndim
    view[bdim], view[dim] = b, n
    out = list(shape)
    out[dim] = n
    return torch.gather(t, dim, idx.view(view).expand(out))


# ------------------------------------------------------------------------------------------------ state
@dataclass
class PruneRecord:
    """What one prefill did. ``candidates``/``kept``: per batch row, prunable tokens before/after;
    ``seq_len``/``pruned_len``: sequence length before/after (all rows); ``kept_positions`` [B, pruned_len]:
    original position of each position of the shortened sequence (CPU, long); ``scores`` [B, seq_len]: the
    criterion's ranking score of every position (higher = kept; non-candidates are +inf)."""
    candidates: List[int]
    kept: List[int]
    seq_len: int
    pruned_len: int
    kept_positions: torch.Tensor
    scores: Optional[torch.Tensor] = None

    def index_of(self, positions: torch.Tensor) -> torch.Tensor:
        """Index in the shortened sequence of original position ``positions[b]`` of each row (e.g. a right-padded
        prompt's last token, to read its logits); raises if one of them was pruned."""
        positions = torch.as_tensor(positions).view(-1, 1).cpu()
        hit = self.kept_positions == positions
        if not bool(hit.any(-1).all()):
            raise ValueError(f"positions {positions.view(-1).tolist()} were not all kept")
        return hit.int().argmax(-1)


@dataclass
class _Prefill:
    cache: object                         # the Cache object pruned (or None without cache)
    keep_idx: Optional[torch.Tensor]      # [B, S'] kept positions; None when nothing was removed
    full_len: int                         # prompt length before pruning


@dataclass
class _Step:
    """Per-forward scratch: mode of the layers >= L and the tensors already rewritten (by id)."""
    mode: str = "noop"                    # "noop" | "prefill" | "decode"
    keep_idx: Optional[torch.Tensor] = None
    kv_full_len: int = 0
    removed: int = 0
    memo: dict = field(default_factory=dict)


class TokenPruning:
    """Handle returned by :func:`enable_token_pruning`: the settings, ``records`` (one :class:`PruneRecord` per
    prefill), ``last``; ``remove()`` (or leaving the ``with`` block) restores the unpatched model."""

    def __init__(self, model, layer, keep, keep_count, criterion, target, seed, visual_ids, base_forward):
        self.model, self.layer, self.keep, self.keep_count = model, layer, keep, keep_count
        self.criterion, self.target, self.seed = criterion, target, seed
        self._visual_ids = visual_ids         # image (and video) token ids
        self._sig = inspect.signature(base_forward)     # to read input_ids/attention_mask from any call style
        self.records: List[PruneRecord] = []
        self._hooks = []
        self._inputs = (None, None)       # (input_ids, 2-D attention mask) seen by the base model
        self._scores = None               # attention scores from layer L-1 for the current prefill
        self._prefill: Optional[_Prefill] = None
        self._step = _Step()

    # -------------------------------------------------------------------------------------------- public
    @property
    def last(self) -> Optional[PruneRecord]:
        return self.records[-1] if self.records else None

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        if getattr(self.model, "_bivlm_token_pruning", None) is self:
            del self.model._bivlm_token_pruning

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()

    def __repr__(self):
        k = f"keep_count={self.keep_count}" if self.keep_count is not None else f"keep={self.keep}"
        return (f"TokenPruning(layer={self.layer}, {k}, criterion={self.criterion!r}, target={self.target!r}, "
                f"active={bool(self._hooks)}, prefills={len(self.records)})")

    # -------------------------------------------------------------------------------------------- hooks
    def _base_pre_hook(self, module, args, kwargs):
        # Record input_ids and the 2-D padding mask of this forward: the layers only see embeddings.
        try:
            bound = self._sig.bind_partial(*args, **kwargs).arguments
        except TypeError:
            bound = kwargs
        am = bound.get("attention_mask")
        am = am if isinstance(am, torch.Tensor) and am.ndim == 2 else None
        self._inputs = (bound.get("input_ids"), am)
        self._scores = None

    def _base_post_hook(self, module, args, output):
        # forget this forward's inputs: a later direct call of the language model must not reuse them
        self._inputs = (None, None)

    @staticmethod
    def _hidden(args, kwargs):
        return args[0] if args else kwargs["hidden_states"]

    def _is_prefill(self, args, kwargs, layer_idx):
        cache = find_cache(args, kwargs)
        return cache is None or cache.get_seq_length(layer_idx) == 0

    def _candidates(self, h):
        """(candidate mask [B,S], query mask [B,S] for the attention criterion, 2-D padding mask [B,S])."""
        ids, am = self._inputs
        b, s = h.shape[:2]
        if ids is None:
            raise ValueError("token pruning needs input_ids at prefill (the image tokens are found from them); "
                             "inputs_embeds alone is not supported")
        if tuple(ids.shape) != (b, s):
            raise RuntimeError(f"token pruning: input_ids {tuple(ids.shape)} do not match the hidden states {(b, s)}")
        ids = ids.to(h.device)
        real = torch.ones(b, s, dtype=torch.bool, device=h.device) if am is None else am.to(h.device).bool()
        visual = torch.zeros_like(real)
        for t in self._visual_ids:
            visual |= ids == t
        visual &= real
        pos = torch.arange(s, device=h.device)
        last_real = torch.where(real, pos, -1).amax(-1)                      # [B]
        is_last = pos[None, :] == last_real[:, None]
        if self.target == "image":
            cand = visual
            last_vis = torch.where(visual, pos, -1).amax(-1)
            # queries: the text that follows the last image token (the question); else the last token
            queries = real & ~visual & (pos[None, :] > last_vis[:, None])
            queries = torch.where(queries.any(-1, keepdim=True), queries, is_last)
        else:
            cand = real & ~visual & ~is_last      # the last token's logits are what generation reads
            queries = is_last
        return cand, queries, real

    @torch.no_grad()
    def _attention_pre_hook(self, module, args, kwargs):
        # Layer L-1: attention each position receives from the query positions, recomputed from this layer's
        # q/k projections (SDPA never materializes the weights): softmax(q k^T * scale) averaged over heads and
        # queries, causal and padding masked.
        if not self._is_prefill(args, kwargs, self.layer - 1):
            return None
        h = self._hidden(args, kwargs)
        cand, queries, real = self._candidates(h)
        if not cand.any():
            return None
        attn = module.self_attn
        x = module.input_layernorm(h)
        b, s, _ = x.shape
        hd = attn.head_dim
        q = attn.q_proj(x).view(b, s, -1, hd).transpose(1, 2)
        k = attn.k_proj(x).view(b, s, -1, hd).transpose(1, 2)
        cos, sin = kwargs["position_embeddings"]
        q, k = _rope(attn)(q, k, cos, sin)
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)              # GQA
        pos = torch.arange(s, device=h.device)
        scores = torch.zeros(b, s, dtype=torch.float32, device=h.device)
        for i in range(b):
            qi = queries[i].nonzero()[:, 0]
            logits = (q[i][:, qi].float() @ k[i].float().transpose(-1, -2)) * attn.scaling   # [H, nq, S]
            allowed = (pos[None, :] <= qi[:, None]) & real[i][None, :]
            p = logits.masked_fill(~allowed, float("-inf")).softmax(-1)
            scores[i] = p.mean(dim=(0, 1))
        self._scores = scores
        return None

    @torch.no_grad()
    def _scores_for(self, h, cand):
        """Higher score = keep. [B, S] float32."""
        if self.criterion == "attention":
            if self._scores is None or self._scores.shape != cand.shape:
                raise RuntimeError("token pruning: no attention scores from layer L-1 for this prefill")
            return self._scores
        hf = h.float()
        if self.criterion == "norm":
            return hf.norm(dim=-1)                  # keep the tokens with the largest hidden-state norm
        if self.criterion == "similarity":
            # redundancy = cosine similarity to the mean of the row's candidates: keep the most distinctive
            hn = F.normalize(hf, dim=-1)
            c = cand.to(hf.dtype)[..., None]
            mean = F.normalize((hn * c).sum(1) / c.sum(1).clamp_min(1), dim=-1)      # [B, D]
            return -(hn * mean[:, None, :]).sum(-1)
        g = torch.Generator(device="cpu").manual_seed(self.seed)
        return torch.rand(cand.shape, generator=g).to(h.device)

    def _select(self, h, cand, real):
        """Kept positions [B, S'] (ascending), per-row candidate and kept counts."""
        b, s = cand.shape
        score = self._scores_for(h, cand).masked_fill(~cand, float("inf"))   # non-candidates never dropped
        n = cand.sum(-1).tolist()
        k = [keep_count_for(ni, self.keep, self.keep_count) for ni in n]
        drop = [ni - ki for ni, ki in zip(n, k)]
        r = max(drop)
        keep_rows = []
        for i in range(b):
            order = torch.argsort(score[i], stable=True)
            dropped = order[:drop[i]]
            extra = r - drop[i]
            if extra:
                # even the rows out with padding positions (masked anyway), the rightmost first
                pads = (~real[i] & ~cand[i]).nonzero()[:, 0].flip(0)
                if len(pads) < extra:
                    raise ValueError(f"token pruning: batch row {i} has {n[i]} prunable tokens and keeps {k[i]}, "
                                     f"but another row drops {r}; rows must drop the same number of tokens "
                                     f"(same image count) or have enough padding to even out")
                dropped = torch.cat([dropped, pads[:extra]])
            mask = torch.ones(s, dtype=torch.bool, device=h.device)
            mask[dropped] = False
            keep_rows.append(mask.nonzero()[:, 0])
        return torch.stack(keep_rows), n, k, score

    def _prune_layer_pre_hook(self, module, args, kwargs):
        h = self._hidden(args, kwargs)
        step = self._step = _Step()
        cache = find_cache(args, kwargs)
        if self._is_prefill(args, kwargs, self.layer):
            self._check_cache(cache)
            cand, _, real = self._candidates(h)
            s = cand.shape[1]
            keep_idx, n, k, score = self._select(h, cand, real)
            removed = s - keep_idx.shape[1]
            self.records.append(PruneRecord(n, k, s, s - removed, keep_idx.detach().cpu(), score.detach().cpu()))
            self._prefill = _Prefill(cache, keep_idx if removed else None, s)
            if not removed:
                return None
            step.mode, step.keep_idx, step.removed = "prefill", keep_idx, removed
            h = _take(h, keep_idx, 1, 0)
        else:
            p = self._prefill
            if p is None or p.cache is not cache:
                # a cache this handle did not prefill: fine only if nothing in it was pruned
                if cache.get_seq_length(self.layer) != cache.get_seq_length(0):
                    raise RuntimeError("token pruning: this KV cache was pruned by another prefill/handle")
                return None
            if p.keep_idx is None:
                return None
            step.mode, step.keep_idx, step.kv_full_len = "decode", p.keep_idx, p.full_len
            step.removed = p.full_len - p.keep_idx.shape[1]
        args, kwargs = self._rewrite(args, kwargs, h)
        return args, kwargs

    def _later_layer_pre_hook(self, module, args, kwargs):
        if self._step.mode == "noop":
            return None
        return self._rewrite(args, kwargs, None)

    # -------------------------------------------------------------------------------------------- rewriting
    def _check_cache(self, cache):
        if cache is None:
            return
        from transformers.cache_utils import DynamicLayer
        layers = getattr(cache, "layers", None)
        if layers is None or any(type(l) is not DynamicLayer for l in layers[self.layer:]):
            kinds = sorted({type(l).__name__ for l in (layers or [])}) or [type(cache).__name__]
            raise ValueError(f"token pruning supports DynamicCache (full-attention layers) or no cache, got {kinds}")

    def _rewrite(self, args, kwargs, h):
        """Rewrite one decoder layer's inputs for the shortened sequence/cache (see module docstring)."""
        step = self._step
        if h is not None:
            if args:
                args = (h,) + tuple(args[1:])
            else:
                kwargs = dict(kwargs, hidden_states=h)
        kwargs = dict(kwargs)
        for name in ("attention_mask", "position_embeddings", "position_ids", "cache_position"):
            if name in kwargs and kwargs[name] is not None:
                kwargs[name] = self._memo(name, kwargs[name])
        return args, kwargs

    def _memo(self, name, value):
        key = (name, id(value))
        hit = self._step.memo.get(key)
        if hit is None:
            hit = (value, self._convert(name, value))       # keep `value` alive so its id stays unique
            self._step.memo[key] = hit
        return hit[1]

    def _convert(self, name, v):
        step, idx = self._step, self._step.keep_idx
        prefill = step.mode == "prefill"
        if name == "cache_position":
            return torch.arange(idx.shape[1], device=v.device) if prefill else v - step.removed
        if name == "position_embeddings":
            return tuple(_take(t, idx, -2, -3) for t in v) if prefill else v
        if name == "position_ids":
            return _take(v, idx, -1, -2) if prefill else v
        # attention mask
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"token pruning supports eager/SDPA tensor masks, got {type(v).__name__} "
                            "(e.g. a flex-attention BlockMask)")
        if prefill:
            if v.ndim == 4:
                return _take(_take(v, idx, 2, 0), idx, 3, 0)
            return _take(v, idx, -1, 0)
        # decode: keys = kept prompt positions + every generated position
        kv = v.shape[-1]
        b = idx.shape[0]
        if v.shape[0] not in (1, b):
            raise RuntimeError(f"token pruning: the batch changed from {b} rows at the pruned prefill to "
                               f"{v.shape[0]} (e.g. cache.reorder_cache); continuing a pruned cache needs the "
                               "same rows")
        tail = torch.arange(step.kv_full_len, kv, device=idx.device).expand(b, -1)
        kv_idx = torch.cat([idx, tail], dim=1)
        return _take(v, kv_idx, -1, 0)


# ------------------------------------------------------------------------------------------------ entry point
def enable_token_pruning(model: nn.Module, layer: int = 2, keep: Optional[float] = 0.1,
                         criterion: str = "attention", target: str = "image",
                         keep_count: Optional[int] = None, seed: int = 0) -> TokenPruning:
    """Patch ``model`` (reversibly, with hooks) to prune tokens just before decoder layer ``layer``.

    Args:
        model: a LLaVA / Qwen2-VL / Qwen2.5-VL model (``*ForConditionalGeneration`` or ``*Model``).
        layer: first decoder layer that sees the pruned sequence, in ``[1, num_layers - 1]``.
        keep: fraction of the candidate tokens kept per row, in ``(0, 1]`` (see the rounding rule above).
        criterion: ``"attention"`` (FastV: mean attention the token receives in layer ``layer - 1`` from the
            text after the last image token, or from the last token for ``target="text"``), ``"norm"``
            (largest hidden-state L2 norm kept), ``"similarity"`` (the tokens least cosine-similar to the mean
            candidate kept: the most redundant go), ``"random"`` (seeded control).
        target: ``"image"`` (image/video tokens) or ``"text"`` (every other attended token but the last).
        keep_count: keep this many candidates per row instead of a ratio (replaces ``keep``).
        seed: seed of the ``"random"`` criterion (the same seed drops the same positions each prefill).

    Returns a :class:`TokenPruning` handle: ``.records``/``.last`` (kept counts), ``.remove()``, context manager.
    """
    base, layers, visual_ids = _find_parts(model)
    _check_args(keep, keep_count, criterion, target, layer, len(layers))
    if getattr(model, "_bivlm_token_pruning", None) is not None:
        raise RuntimeError("token pruning is already enabled on this model; call .remove() on its handle first")
    if criterion == "attention":
        prev = layers[layer - 1]
        attn = getattr(prev, "self_attn", None)
        if not all(hasattr(attn, a) for a in ("q_proj", "k_proj", "head_dim", "scaling")) or \
                not hasattr(prev, "input_layernorm"):
            raise ValueError(f"criterion='attention' needs decoder layers with self_attn.q_proj/k_proj and "
                             f"input_layernorm; {type(prev).__name__} has not; use 'norm' or 'similarity'")
    handle = TokenPruning(model, layer, float(keep) if keep_count is None else None, keep_count, criterion,
                          target, seed, visual_ids, base.forward)
    hooks = [base.register_forward_pre_hook(handle._base_pre_hook, with_kwargs=True),
             base.register_forward_hook(handle._base_post_hook)]
    if criterion == "attention":
        hooks.append(layers[layer - 1].register_forward_pre_hook(handle._attention_pre_hook, with_kwargs=True))
    hooks.append(layers[layer].register_forward_pre_hook(handle._prune_layer_pre_hook, with_kwargs=True))
    for lyr in layers[layer + 1:]:
        hooks.append(lyr.register_forward_pre_hook(handle._later_layer_pre_hook, with_kwargs=True))
    handle._hooks = hooks
    model._bivlm_token_pruning = handle
    return handle


def active_pruning(model: nn.Module) -> Optional[TokenPruning]:
    """The :class:`TokenPruning` handle enabled on ``model`` (``None`` when pruning is off)."""
    return getattr(model, "_bivlm_token_pruning", None)


def map_positions(model: nn.Module, positions: torch.Tensor) -> torch.Tensor:
    """Original per-row positions -> indices into the outputs of ``model``'s last forward: unchanged without
    pruning, mapped through the last prefill's kept positions with it (e.g. ``attention_mask.sum(1) - 1``, the
    last real token of right-padded prompts, which pruning never drops)."""
    handle = active_pruning(model)
    if handle is None or handle.last is None:
        return positions
    return handle.last.index_of(positions).to(torch.as_tensor(positions).device)
