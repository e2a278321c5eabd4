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
import logging
import time
from typing import Iterable

import torch
from torch import nn

from .. import formats
from ..nn import QuantLinear, replace_module
from .capture import (_HINT, _call_block, _capture, _check_batches, _forward_kwargs, _hidden_from_output,
                      _input_device, _module_device, _to)
from .config import COMPONENTS, QuantConfig, pick_group_size
from .hessian import HessianAccumulator
from .report import LayerReport, QuantReport, module_bytes

log = logging.getLogger(__name__)


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
        accs = {n: HessianAccumulator(mine[n][0].in_features, device=dev) for n in stage}
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
