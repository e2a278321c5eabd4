"""``quantize_model``: layer-sequential (GPTQ-style) quantization of a whole model into ``QuantLinear`` layers.

Per component (vision tower, projector, language model; forward order), block by block:

1. **Capture.** Run the model on every calibration batch with each block's ``forward`` swapped for a recorder:
   it keeps the block's inputs (the hidden states of the first block; the other positional args and kwargs of
   every block: attention masks, position embeddings, ``cu_seqlens``, which may differ per block, e.g. Qwen2.5-VL's
   windowed vs full-attention vision blocks) and passes the hidden states through unchanged, so the capture
   costs no block compute. The last block's recorder raises a private exception that stops the forward.
   Components quantized earlier run for real (quantized), so each component is calibrated on the outputs of
   the already-quantized ones.
2. **Per block**: move the block (only it) to ``config.device``; forward hooks accumulate a Hessian ``X^T X`` per
   ``nn.Linear`` while the full-precision block runs on its inputs; each linear is quantized by its method and
   replaced in place by ``QuantLinear.from_quantized``; the quantized block runs again on the same inputs to
   produce the next block's inputs (so block i+1 is calibrated on what the quantized block i really emits);
   the block goes back where it was. Activations are stored on the CPU between blocks.

The relative output error ``||X W^T - X What^T||_F / ||X W^T||_F`` over all calibration rows is computed exactly
from the Hessian: ``||X D^T||^2 = tr(D X^T X D^T)``, so no activations need to be kept for it.
"""
from __future__ import annotations

import dataclasses
import inspect
import logging
import time
from typing import Iterable

import torch
from torch import nn

from .. import formats
from ..models.hf_compat import is_cache
from ..nn import QuantLinear, replace_module
from .config import COMPONENTS, QuantConfig, pick_group_size
from .report import LayerReport, QuantReport, module_bytes

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


class _Gram:
    """Fallback Hessian accumulator (``H = 2/n X^T X`` over the ``n`` rows seen) used when
    ``bivlm_kernels.quant.hessian`` is not available."""

    def __init__(self, k: int, device=None):
        self.H = torch.zeros(k, k, dtype=torch.float32, device=device)
        self.n = 0

    def add_batch(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        m = x.shape[0]
        if m == 0:
            return
        self.H.mul_(self.n / (self.n + m))
        self.n += m
        x = x * (2.0 / self.n) ** 0.5
        self.H.addmm_(x.T, x)


def _make_accumulator(k: int, device):
    try:
        from .hessian import HessianAccumulator
    except ImportError:
        return _Gram(k, device)
    params = inspect.signature(HessianAccumulator).parameters
    return HessianAccumulator(k, device=device) if "device" in params else HessianAccumulator(k)


def _relative_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    """``||X (W - W_hat)^T|| / ||X W^T||`` from ``H`` proportional to ``X^T X`` (the scale cancels)."""
    W = W.float()
    D = W - W_hat.float().to(W.device)
    H = H.float().to(W.device)
    num = ((D @ H) * D).sum()
    den = ((W @ H) * W).sum()
    if not torch.isfinite(den) or den <= 0:
        return float("nan")
    return float((num.clamp_min(0) / den).sqrt())


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


# ---------------------------------------------------------------------------------------------------------
# the driver
# ---------------------------------------------------------------------------------------------------------

def _method_for(cfg, group_size, dtype, name):
    """The method object for one layer: the layer's dtype for the emitted tables and, when the method's config
    has a ``layer_name`` field (for its warnings), the layer's name."""
    from .base import METHODS, get_method
    fields = {f.name for f in dataclasses.fields(METHODS[cfg.method].config_cls)}
    kw = cfg.method_kwargs(group_size, dtype if "dtype" in fields else None)
    if "layer_name" in fields and "layer_name" not in kw:
        kw["layer_name"] = name
    return get_method(cfg.method, **kw)


@torch.no_grad()
def quantize_model(model: nn.Module, config, calibration_data: Iterable[dict], *, progress: bool = True,
                   device=None):
    """Quantize ``model`` in place, component by component and block by block; return ``(model, report)``.

    ``config``: a :class:`~bivlm_kernels.quant.QuantConfig`, a dict of its fields, or a method name
    (``"rtn"``, ``"gptq"``, ``"billm"``, ``"bivlm"``: that method with its defaults on the language model).
    ``calibration_data``: an iterable of dicts of model inputs (``input_ids``, ``attention_mask``,
    ``pixel_values``, ...), one forward each. ``device`` overrides ``config.device``.

    Every ``nn.Linear`` inside the blocks of the configured components is replaced by a ``QuantLinear``
    (``lm_head`` and layers outside the blocks stay as they are); layers whose ``in_features`` no supported
    group size divides stay in full precision and are listed in ``report.skipped``.
    """
    from ..models import find_components
    cfg = QuantConfig.coerce(config)
    cfg.validate()
    batches = _check_batches(calibration_data)
    comps = find_components(model)
    active = [c for c in COMPONENTS if getattr(cfg, c) is not None]
    missing = [c for c in active if c not in comps]
    if missing:
        raise ValueError(f"config asks to quantize {missing}, but {type(model).__name__} has no such component "
                         f"(found: {list(comps)}); set them to None")
    device = torch.device(device if device is not None else cfg.device) \
        if (device is not None or cfg.device is not None) else None

    t_start = time.perf_counter()
    report = QuantReport(model_bytes_before=module_bytes(model))
    was_training = model.training
    model.eval()
    # Qwen2-VL caches rope deltas on the model during a forward; put them back afterwards.
    rope_state = {m: m.rope_deltas for m in model.modules() if hasattr(m, "rope_deltas")}
    fwd_kwargs = _forward_kwargs(model)
    in_device = _input_device(model)
    try:
        # Pre-flight: every component after the first must be reachable by the data before anything changes
        # (the first one is checked by its own capture, still before any change), so that a mismatch does not
        # leave a half-quantized model behind.
        for cname in active[1:]:
            hidden, _ = _capture(model, comps[cname], batches, fwd_kwargs, in_device)
            if not hidden:
                raise ValueError(f"no calibration batch reached the {cname} component"
                                 f"{_HINT if cname in ('vision', 'projector') else ''}")
            del hidden
        for cname in active:
            _quantize_component(model, cname, comps[cname], cfg, batches, fwd_kwargs, in_device, device,
                                report, progress)
    finally:
        for m, v in rope_state.items():
            m.rope_deltas = v
        model.train(was_training)
    report.model_bytes_after = module_bytes(model)
    report.seconds = time.perf_counter() - t_start
    if not report.layers:
        log.warning("no layer was quantized (check include/exclude/overrides and group sizes)")
    # Recorded for save_quantized: what was done to this model (metadata only, not used by forward).
    model.bivlm_quantization = {"config": cfg.to_dict(), "report": report.to_dict()}
    return model, report


def _quantize_component(model, cname, comp, cfg, batches, fwd_kwargs, in_device, device, report, progress):
    from tqdm.auto import tqdm

    # Which linears get quantized, with which settings (decided up front, so the bar knows its total).
    plan = {}
    for name, lin in comp.linears().items():
        lcfg = cfg.layer_config(cname, name)
        if lcfg is None:
            report.skipped.append(f"{name} (excluded by config)")
            continue
        g = pick_group_size(lcfg.group_size, lin.in_features, name)
        if g is None:
            report.skipped.append(f"{name} (in_features={lin.in_features} fits no group size "
                                  f"{formats.GROUP_SIZES})")
            continue
        plan[name] = (lcfg, g)
    if not plan:
        log.info("%s: nothing to quantize", cname)
        return

    hidden, records = _capture(model, comp, batches, fwd_kwargs, in_device)
    if not hidden:
        hint = _HINT if cname in ("vision", "projector") else ""
        raise ValueError(f"no calibration batch reached the {cname} component{hint}")
    # Blocks after the last one with something to quantize need no inputs: stop propagating there.
    last = max(i for i, b in enumerate(comp.block_names) if any(n == b or n.startswith(b + ".") for n in plan))
    bar = tqdm(total=len(plan), desc=f"quantize {cname}", unit="layer", disable=not progress)
    try:
        for i, (block, bname) in enumerate(zip(comp.blocks[:last + 1], comp.block_names)):
            home = _module_device(block)
            dev = device or home
            block.to(dev)
            try:
                _process_block(block, bname, i, i < last, comp, plan, hidden, records, dev, model, cname,
                               report, bar, cfg.true_sequential)
            finally:
                block.to(home)
    finally:
        bar.close()


def _stages(run, mine) -> list:
    """The block's linears in forward order (first batch), grouped by input: linears called on the same tensor
    (q/k/v; gate/up) form one stage. Linears the batch never reaches come last, as one stage."""
    order, inputs, hooks = [], {}, []
    for n, (lin, _) in mine.items():
        def hook(mod, inp, out, n=n):
            if n not in inputs:
                order.append(n)
                inputs[n] = inp[0]
        hooks.append(lin.register_forward_hook(hook))
    try:
        run(0, {})
    finally:
        for h in hooks:
            h.remove()
    stages = []
    for n in order:
        if stages and inputs[n] is inputs[stages[-1][0]]:
            stages[-1].append(n)
        else:
            stages.append([n])
    rest = [n for n in mine if n not in inputs]
    return stages + ([rest] if rest else [])


def _process_block(block, bname, i, propagate, comp, plan, hidden, records, dev, model, cname, report, bar,
                   true_sequential=False):
    """Hessians (pass 1, per stage if ``true_sequential``), quantize and replace the block's linears, then
    (pass 2) the next block's inputs."""
    cpu = torch.device("cpu")
    mine = {n: (lin, plan[n]) for n, lin in comp.linears().items()
            if (n == bname or n.startswith(bname + ".")) and n in plan}

    def run(j, memo):
        key, args, kwargs = records[j][i]
        return _call_block(block, key, hidden[j].to(dev), _to(args, dev, memo), _to(kwargs, dev, memo))

    stages = [] if not mine else _stages(run, mine) if true_sequential else [list(mine)]
    for stage in stages:
        # Pass 1: the block on its (already quantized-upstream) inputs -> Hessians of this stage's linears (the
        # earlier stages of the block already quantized when true_sequential, else the full-precision block).
        accs = {n: _make_accumulator(mine[n][0].in_features, dev) for n in stage}
        rows = {n: 0 for n in stage}
        hooks = []
        for n in stage:
            def hook(mod, inp, out, n=n):
                x = inp[0].detach()
                rows[n] += x.numel() // x.shape[-1]
                accs[n].add_batch(x)
            hooks.append(mine[n][0].register_forward_hook(hook))
        try:
            for j in range(len(hidden)):
                run(j, {})
        finally:
            for h in hooks:
                h.remove()
        for n in stage:
            lin, (lcfg, g) = mine[n]
            bar.set_postfix_str(n.rsplit(".", 2)[-2] + "." + n.rsplit(".", 1)[-1] if "." in n else n)
            _quantize_linear(model, cname, n, lin, lcfg, g, accs[n], rows[n], report)
            del accs[n]
            bar.update(1)
    if propagate:
        # Pass 2: the quantized block makes the next block's inputs.
        for j in range(len(hidden)):
            out = run(j, {})
            hidden[j] = _hidden_from_output(out).detach().to(cpu)


def _quantize_linear(model, cname, name, lin, lcfg, g, acc, n_rows, report):
    t0 = time.perf_counter()
    W = lin.weight.detach()
    dtype = W.dtype if W.dtype in formats.FLOAT_DTYPES else torch.float16
    method = _method_for(lcfg, g, dtype, name)
    if n_rows == 0:
        if getattr(method, "needs_hessian", False):
            report.skipped.append(f"{name} (saw no calibration input; {lcfg.method} needs a Hessian)")
            log.warning("%s saw no calibration input; kept in full precision", name)
            return
        H = None
    else:
        H = acc.H
    qw = method.quantize(W, None if H is None else H.clone())
    bias = None if lin.bias is None else lin.bias.detach().to(dtype)
    ql = QuantLinear.from_quantized(qw, bias=bias, dtype=dtype, device=W.device)
    if (ql.in_features, ql.out_features) != (lin.in_features, lin.out_features):
        raise ValueError(f"method {lcfg.method!r} returned a {ql.out_features}x{ql.in_features} weight for "
                         f"{name} ({lin.out_features}x{lin.in_features})")
    err = float("nan") if H is None else _relative_error(W, ql.dequantize(), H)
    replace_module(model, name, ql)
    bpw = ql.weight_bits
    report.layers.append(LayerReport(
        name=name, component=cname, method=lcfg.method, out_features=lin.out_features,
        in_features=lin.in_features, group_size=g, nominal_bits=ql.spec.nominal_bits, weight_bits=bpw,
        rel_error=err, seconds=time.perf_counter() - t0, bytes_before=W.numel() * W.element_size(),
        bytes_after=int(round(bpw * lin.out_features * lin.in_features / 8)), n_tokens=n_rows,
        group_size_asked=lcfg.group_size if lcfg.group_size != g else None))
