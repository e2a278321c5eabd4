"""Capture for the layer-sequential driver: record every block's inputs on the calibration batches (the first
block's hidden states; every block's other args and kwargs, KV caches stripped) without running the blocks, and
the helpers that move those nested inputs between devices and call a block on them (step 1 of
:mod:`bivlm_kernels.quant.driver`)."""
from __future__ import annotations

import inspect
import logging

import torch
from torch import nn

from ..models.hf_compat import is_cache

log = logging.getLogger(__name__)

_HINT = " (do the batches contain pixel_values?)"


class _StopForward(Exception):
    """Raised by the last block's recorder: the rest of the forward is not needed."""


# ---------------------------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------------------------

def _to(obj, device, memo: dict):
    """Move every tensor inside ``obj`` (nested tuples/lists/dicts) to ``device``; a tensor shared by several
    blocks (position embeddings, masks) is moved once (``memo`` keyed by id, holding the original alive)."""
    if isinstance(obj, torch.Tensor):
        hit = memo.get(id(obj))
        if hit is None:
            hit = memo[id(obj)] = (obj, obj.to(device))
        return hit[1]
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):              # namedtuple
        return type(obj)(*(_to(x, device, memo) for x in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(x, device, memo) for x in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device, memo) for k, v in obj.items()}
    return obj


def _module_device(m: nn.Module) -> torch.device:
    for t in list(m.parameters()) + list(m.buffers()):
        return t.device
    return torch.device("cpu")


def _hidden_from_output(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    raise TypeError(f"cannot find the hidden states in a block output of type {type(out).__name__}")


def _split_hidden(args, kwargs):
    """(where, hidden, other args, other kwargs): the hidden states are the first positional argument or the
    ``hidden_states`` keyword."""
    if args and isinstance(args[0], torch.Tensor):
        return None, args[0], tuple(args[1:]), dict(kwargs)
    for key in ("hidden_states", "hidden_state", "x", "input"):
        if isinstance(kwargs.get(key), torch.Tensor):
            rest = dict(kwargs)
            h = rest.pop(key)
            return key, h, tuple(args), rest
    raise TypeError("cannot find the hidden states among a block's inputs (expected a tensor as the first "
                    "positional argument or as the `hidden_states` keyword)")


def _call_block(block, key, h, args, kwargs):
    if key is None:
        return block(h, *args, **kwargs)
    return block(*args, **{key: h}, **kwargs)


def _forward_kwargs(model: nn.Module) -> dict:
    """``use_cache=False`` when the model takes it (explicitly, or through ``**kwargs`` of a transformers
    model whose config, or text config, has ``use_cache``): a calibration forward must not build a KV cache.
    transformers 5.2x dropped ``use_cache`` from the multimodal signatures and moved it to ``text_config``, so
    the signature alone is no longer a reliable sign; :func:`_stateless` removes any cache that is built anyway.
    """
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    var_kw = any(p.kind is p.VAR_KEYWORD for p in params.values())
    cfg = getattr(model, "config", None)
    has_flag = any(hasattr(c, "use_cache") for c in (cfg, getattr(cfg, "text_config", None)) if c is not None)
    if "use_cache" in params or (var_kw and has_flag):
        return {"use_cache": False}
    return {}


# Block kwargs that carry state between calls: a recorded KV cache would be appended to on every re-run of the
# block. Caches are recognised by type (any ``transformers`` ``Cache``, whatever the keyword is called: it was
# ``past_key_value``, then ``past_key_values``, now ``cache``), the flags by name.
_STATEFUL_KWARGS = {"past_key_values": None, "past_key_value": None, "layer_past": None, "cache": None,
                    "use_cache": False}


def _stateless(kwargs: dict) -> dict:
    return {k: (_STATEFUL_KWARGS[k] if k in _STATEFUL_KWARGS else None if is_cache(v) else v)
            for k, v in kwargs.items()}


def _input_device(model: nn.Module) -> torch.device:
    try:
        emb = model.get_input_embeddings()
        if emb is not None:
            return emb.weight.device
    except (AttributeError, NotImplementedError):
        pass
    return _module_device(model)


def _check_batches(calibration_data) -> list:
    if calibration_data is None:
        raise ValueError("calibration_data is None; pass an iterable of model input dicts "
                         "(e.g. from bivlm_kernels.quant.build_calibration_data)")
    if isinstance(calibration_data, dict):
        calibration_data = [calibration_data]        # one batch given bare
    try:
        batches = list(calibration_data)
    except TypeError:
        raise TypeError(f"calibration_data must be an iterable of dicts of model inputs, got "
                        f"{type(calibration_data).__name__}") from None
    if not batches:
        raise ValueError("calibration_data is empty: at least one batch (a dict of model inputs) is needed")
    for i, b in enumerate(batches):
        if not isinstance(b, dict) or not b:
            raise TypeError(f"calibration_data[{i}] must be a non-empty dict of model inputs "
                            f"(input_ids, pixel_values, ...), got {type(b).__name__}")
    return batches


# ---------------------------------------------------------------------------------------------------------
# capture
# ---------------------------------------------------------------------------------------------------------

def _capture(model, comp, batches, fwd_kwargs, in_device):
    """Inputs of every block of ``comp`` for each batch that reaches it.

    Returns ``(hidden, records)``: ``hidden[j]`` the first block's hidden states for batch j (CPU), and
    ``records[j][i] = (key, args, kwargs)`` block i's other inputs (CPU).
    """
    blocks = comp.blocks
    n = len(blocks)
    cpu = torch.device("cpu")
    state = {"cur": None, "hidden": None, "structure": None, "memo": None}

    def make_recorder(i, block, own_forward):
        original = own_forward or type(block).forward.__get__(block)

        def recorder(*args, **kwargs):
            key, h, rest_a, rest_k = _split_hidden(args, kwargs)
            rest_k = _stateless(rest_k)
            kwargs = {**kwargs, **{k: v for k, v in rest_k.items() if k in kwargs}}
            memo = state["memo"]
            state["cur"][i] = (key, _to(rest_a, cpu, memo), _to(rest_k, cpu, memo))
            if i == 0:
                state["hidden"] = h.detach().to(cpu)
            if i == n - 1:
                raise _StopForward
            if state["structure"] is None:
                # Learn once what a block returns (a tensor or a tuple), to pass h through in that shape.
                out = original(*args, **kwargs)
                state["structure"] = ("tuple", tuple(out[1:])) if isinstance(out, tuple) else ("tensor", None)
            kind, tail = state["structure"]
            return (h,) + tail if kind == "tuple" else h
        return recorder

    saved = []
    for i, b in enumerate(blocks):
        saved.append(b.__dict__.get("forward"))          # an instance-level forward (e.g. a wrapper hook)
        b.forward = make_recorder(i, b, saved[-1])
    hidden, records = [], []
    try:
        for j, batch in enumerate(batches):
            state["cur"], state["hidden"], state["memo"] = [None] * n, None, {}
            inputs = _to(batch, in_device, {})
            try:
                model(**inputs, **fwd_kwargs)
            except _StopForward:
                pass
            except Exception as e:              # the batch does not fit the model
                raise ValueError(f"calibration batch {j} (keys {sorted(batch)}) does not fit "
                                 f"{type(model).__name__}: {type(e).__name__}: {e}") from e
            if state["cur"][0] is None:
                continue                        # e.g. a text-only batch never reaches the vision tower
            missing = [i for i, r in enumerate(state["cur"]) if r is None]
            if missing:
                raise RuntimeError(f"{comp.name}: batch {j} reached block {comp.block_names[0]} but not "
                                   f"block(s) {[comp.block_names[i] for i in missing][:4]}; the blocks are "
                                   f"not run in sequence, which this driver needs")
            hidden.append(state["hidden"])
            records.append(state["cur"])
    finally:
        for b, f in zip(blocks, saved):
            if f is None:
                del b.forward
            else:
                b.forward = f
    return hidden, records
