"""LUQ: entropy-guided layerwise ultra-low-bit quantization (Bhatnagar et al., TMLR 2026; PAPERS.md §2).

Three steps, each usable on its own::

    ent = layer_entropies(model, calib)            # one entropy per LLM decoder layer + ascending order
    k = select_layers(ent.order, len(ent), bits_low=1.08, bits_high=4, target_avg_bits=2.54)
    model, report = luq_quantize(model, calib, target_avg_bits=2.54)   # entropy + selection + assembly

**Entropy** (:func:`layer_entropies`). Forward hooks on every decoder layer of the language model capture the
token vectors at the *output of* ``input_layernorm`` (the normalised input of the block, as the authors' script
does; ``hook="block_output"`` takes the block's output, as the paper's text says). All tokens of all
calibration samples are pooled per layer (image, system and question tokens alike), padding dropped through the
attention mask. Estimators:

* ``"kmeans"`` (the paper's): scikit-learn ``KMeans(K=100, random_state=42, n_init=10)`` on the fp32 token
  vectors; ``p_k`` = cluster occupancy, ``H = -sum p log2(p + 1e-10)`` (max ``log2 K`` = 6.64 for K = 100).
* ``"histogram"`` (ours, cheap, no scikit-learn): centre the tokens, project them on ``n_proj`` = 16 seeded
  random unit directions, histogram each projection into ``n_bins`` = 100 equal-width bins between its 1 % and
  99 % quantiles (tokens beyond go to the edge bins, so a few outlier tokens - e.g. BOS with massive activations
  - do not squeeze everyone else into one bin), ``H`` = the mean over projections of the same
  ``-sum p log2(p + 1e-10)``. Same scale as K-means (max ``log2 n_bins``), one matmul and a ``bincount`` per
  layer instead of 10 K-means runs. Its ranking is an approximation of the K-means one, not the paper's.

Low entropy = the layer's token representations are concentrated = robust to ultra-low bits; the order is
ascending entropy (ties broken by layer index).

**Selection** (:func:`select_layers`). Candidates are prefixes of the order: the ``k`` lowest-entropy layers at
ultra-low bits, the rest at 4 bits (``L + 1`` candidates). A memory budget (average bits per LLM decoder
Linear weight, weighted by parameter count, or total bytes) picks the *smallest* ``k`` that fits - every larger
``k`` fits too and only costs quality, so "grow the low-bit set until the budget holds" stops there. A quality
check (``quality_fn(k) <= threshold``, assumed monotone in ``k``) picks the largest ``k`` that still passes, by
binary search (``ceil(log2(L + 1))`` evaluations). With both, the quality search runs over ``[0, k_budget]``:
the result is the first of the two stopping rules the paper's loop would hit.

**Assembly** (:func:`luq_quantize`). ``"swap"`` (faithful to the authors' scripts): quantize the whole LLM twice,
all at ``high_method``/``high_bits`` and all at ``low_method``/``low_bits``, and move the first ``k`` layers of
the order from the low model into the high one - each moved layer was calibrated on low-bit predecessors, not on
the mixed model. Both runs are known before selection, so an honest budget is met *exactly* with the measured
bytes of every layer, and quality checks cost no re-quantization. ``"sequential"`` (ours): one layer-sequential
run of the driver with per-layer overrides, each layer calibrated inside the mixed model; the honest bits of the
low layers are then estimated before quantizing (from a calibration-free probe of one decoder layer), and the
report says what was reached.

**Calibration mix** (``mix``): LUQ calibrates the PTQ methods on image+text samples mixed with ratio alpha; we
define alpha as the share of multimodal samples (those with ``pixel_values``), the rest text-only, default 0.5
(what LUQ's LLaVA table implies; the paper's exact definition is unknown). The entropy pass uses the multimodal
samples (all samples for a text-only model), as the paper does.
"""
from __future__ import annotations

import copy
import logging
import math
import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, List, Optional, Sequence, Union

import torch
from torch import nn

from ..models import decoder_layers
from .calibration import mix_calibration
from .driver import quantize_model
from .methods._common import check_choice
from .report import module_bytes

log = logging.getLogger(__name__)

HOOKS = ("input_layernorm", "block_output")
ESTIMATORS = ("kmeans", "histogram")
ASSEMBLIES = ("swap", "sequential")
BUDGET_BITS = ("honest", "nominal")
_EPS = 1e-10          # inside the log, as the authors' script
_TOL = 1e-9           # relative slack when comparing a budget with a sum of floats


# ---------------------------------------------------------------------------------------------------------
# decoder layers
# ---------------------------------------------------------------------------------------------------------

def _block_list(model: nn.Module, names: Sequence[str]) -> nn.ModuleList:
    """The ``nn.ModuleList`` that holds the decoder layers (the parent of ``names``)."""
    parent = names[0].rpartition(".")[0]
    mods = model.get_submodule(parent)
    if not isinstance(mods, nn.ModuleList):
        raise ValueError(f"decoder layers of {type(model).__name__} are not held in an nn.ModuleList ({parent!r})")
    return mods


# ---------------------------------------------------------------------------------------------------------
# entropy
# ---------------------------------------------------------------------------------------------------------

@dataclass
class LayerEntropies:
    """Per-layer entropies (bits) and the ascending order (lowest entropy = most robust first)."""
    entropies: List[float]
    order: List[int]
    layer_names: List[str]
    n_tokens: int                       # pooled token vectors per layer (after padding removal / max_tokens)
    hook: str
    estimator: str
    params: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.entropies)

    def rank(self) -> List[int]:
        """``rank[i]`` = position of layer ``i`` in the ascending order (0 = lowest entropy)."""
        r = [0] * len(self.order)
        for pos, i in enumerate(self.order):
            r[i] = pos
        return r

    def to_dict(self) -> dict:
        return {"entropies": list(self.entropies), "order": list(self.order), "layer_names": list(self.layer_names),
                "n_tokens": self.n_tokens, "hook": self.hook, "estimator": self.estimator,
                "params": dict(self.params)}

    @classmethod
    def from_dict(cls, d: dict) -> "LayerEntropies":
        return cls(list(d["entropies"]), list(d["order"]), list(d["layer_names"]), int(d["n_tokens"]),
                   d["hook"], d["estimator"], dict(d.get("params", {})))

    def table(self) -> str:
        rank = self.rank()
        lines = [f"{'layer':<6} {'entropy':>8} {'rank':>5}  name", "-" * 48]
        for i, (h, name) in enumerate(zip(self.entropies, self.layer_names)):
            lines.append(f"{i:<6} {h:>8.4f} {rank[i]:>5}  {name}")
        lines.append(f"{self.estimator} entropy at {self.hook}, {self.n_tokens} tokens per layer; ascending order: "
                     f"{self.order}")
        return "\n".join(lines)


def _model_dtype_device(model: nn.Module):
    p = next(iter(model.parameters()), None)
    if p is None:
        b = next(iter(model.buffers()))
        return b.dtype, b.device
    return p.dtype, p.device


def _to_model(batch: dict, dtype, device) -> dict:
    """Move a model-input dict to the model's device; float tensors (pixel values) to its dtype."""
    if not isinstance(batch, dict):
        raise TypeError(f"calibration_data must yield model input dicts, got {type(batch).__name__}")
    out = {}
    for k, v in batch.items():
        if torch.is_tensor(v):
            v = v.to(device=device, dtype=dtype if v.is_floating_point() else None)
        out[k] = v
    return out


@torch.no_grad()
def collect_activations(model: nn.Module, calibration_data: Iterable[dict], layers: Optional[Sequence[int]] = None,
                        hook: str = "input_layernorm", max_tokens: Optional[int] = None, seed: int = 42):
    """Pooled token vectors per decoder layer: ``(names, [X_i [N, d] fp32 on the CPU])``.

    One forward per calibration sample; tokens where ``attention_mask == 0`` are dropped. With ``max_tokens``,
    the same seeded random subset of ``max_tokens`` token positions is kept for every layer.
    """
    check_choice(hook, "hook", HOOKS)
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens <= 0):
        raise ValueError(f"max_tokens must be a positive int or None, got {max_tokens!r}")
    names, blocks = decoder_layers(model)
    idx = list(range(len(blocks))) if layers is None else [int(i) for i in layers]
    bad = [i for i in idx if not 0 <= i < len(blocks)]
    if bad:
        raise ValueError(f"layers {bad} out of range; the model has {len(blocks)} decoder layers "
                         f"(0..{len(blocks) - 1})")
    store = {i: [] for i in idx}
    state = {"mask": None}

    def make_hook(i):
        def fn(module, args, output):
            h = output[0] if isinstance(output, (tuple, list)) else output
            h = h.detach()
            m = state["mask"]
            if h.dim() == 3 and m is not None and tuple(m.shape) == tuple(h.shape[:2]):
                h = h[m]
            else:
                h = h.reshape(-1, h.shape[-1])     # no usable mask: every position counts
            store[i].append(h.float().cpu())
        return fn

    handles = []
    try:
        for i in idx:
            blk = blocks[i]
            if hook == "input_layernorm":
                target = getattr(blk, "input_layernorm", None)
                if not isinstance(target, nn.Module):
                    raise ValueError(f"hook='input_layernorm': decoder layer {names[i]} ({type(blk).__name__}) has "
                                     f"no input_layernorm module; use hook='block_output'")
            else:
                target = blk
            handles.append(target.register_forward_hook(make_hook(i)))
        dtype, device = _model_dtype_device(model)
        was_training = model.training
        model.eval()
        n = 0
        for batch in calibration_data:
            batch = _to_model(batch, dtype, device)
            am = batch.get("attention_mask")
            state["mask"] = am.bool() if torch.is_tensor(am) else None
            kw = {} if "use_cache" in batch else {"use_cache": False}
            model(**batch, **kw)
            n += 1
        model.train(was_training)
    finally:
        for h in handles:
            h.remove()
    if n == 0:
        raise ValueError("calibration_data is empty: need at least one model input dict for the entropy pass")
    acts = [torch.cat(store[i]) for i in idx]
    if max_tokens is not None:
        n_tok = acts[0].shape[0]
        if n_tok > max_tokens:
            g = torch.Generator().manual_seed(seed)
            keep = torch.randperm(n_tok, generator=g)[:max_tokens].sort().values
            acts = [a[keep] for a in acts]
    return [names[i] for i in idx], acts


def _entropy_of_counts(counts: torch.Tensor) -> float:
    p = counts.double() / counts.sum()
    return float(-(p * torch.log2(p + _EPS)).sum())


def kmeans_entropy(x: torch.Tensor, n_clusters: int = 100, seed: int = 42, n_init: int = 10,
                   threads: Optional[int] = 1) -> float:
    """The paper's estimator: entropy (bits) of K-means cluster occupancy of the rows of ``x`` ``[N, d]``.

    ``threads`` (ours, default 1): OpenMP/BLAS threads for scikit-learn, via threadpoolctl. One thread makes
    the result independent of the core count, and on a shared machine it is far faster than OpenMP's
    busy-waiting threads (measured: 3 s vs 67 s for 280 x 576 tokens, K = 100, on 2 loaded cores).
    ``None`` leaves scikit-learn's default.
    """
    try:
        from sklearn.cluster import KMeans
    except ImportError:
        raise ImportError("estimator='kmeans' needs scikit-learn: pip install scikit-learn "
                          "(or use estimator='histogram')") from None
    if not isinstance(n_clusters, int) or n_clusters < 2:
        raise ValueError(f"n_clusters must be an int >= 2, got {n_clusters!r}")
    if x.shape[0] < n_clusters:
        raise ValueError(f"K-means with n_clusters={n_clusters} needs at least that many tokens, got {x.shape[0]}; "
                         f"add calibration data or lower n_clusters")
    km = KMeans(n_clusters=n_clusters, random_state=seed, n_init=n_init)
    if threads is None:
        labels = km.fit_predict(x.float().numpy())
    else:
        from threadpoolctl import threadpool_limits
        with threadpool_limits(limits=int(threads)):
            labels = km.fit_predict(x.float().numpy())
    return _entropy_of_counts(torch.bincount(torch.from_numpy(labels).long(), minlength=n_clusters))


def histogram_entropy(x: torch.Tensor, n_bins: int = 100, n_proj: int = 16, seed: int = 42,
                      clip: float = 0.01) -> float:
    """Cheap estimator (ours, see the module docstring): mean histogram entropy (bits) of ``n_proj`` seeded
    random 1-D projections of the centred rows of ``x``, ``n_bins`` bins between the ``clip`` and ``1 - clip``
    quantiles of each projection."""
    if not isinstance(n_bins, int) or n_bins < 2:
        raise ValueError(f"n_bins must be an int >= 2, got {n_bins!r}")
    if not isinstance(n_proj, int) or n_proj < 1:
        raise ValueError(f"n_proj must be a positive int, got {n_proj!r}")
    if not 0.0 <= clip < 0.5:
        raise ValueError(f"clip (quantile cut on each side) must lie in [0, 0.5), got {clip!r}")
    x = x.float()
    if x.shape[0] < 2:
        raise ValueError(f"histogram entropy needs at least 2 tokens, got {x.shape[0]}")
    g = torch.Generator().manual_seed(seed)
    proj = torch.randn(x.shape[1], n_proj, generator=g)
    proj /= proj.norm(dim=0, keepdim=True)
    z = (x - x.mean(0)) @ proj                                     # [N, n_proj]
    qs = torch.tensor([clip, 1.0 - clip])
    hs = []
    for j in range(n_proj):
        zj = z[:, j]
        lo, hi = torch.quantile(zj, qs).tolist() if zj.numel() <= 16_000_000 else (zj.min().item(), zj.max().item())
        if not hi > lo:
            hs.append(0.0)                                         # all (unclipped) tokens in one point
            continue
        b = ((zj - lo) / (hi - lo) * n_bins).floor().clamp_(0, n_bins - 1).long()
        hs.append(_entropy_of_counts(torch.bincount(b, minlength=n_bins)))
    return float(sum(hs) / len(hs))


def layer_entropies(model: nn.Module, calibration_data: Iterable[dict], layers: Optional[Sequence[int]] = None,
                    hook: str = "input_layernorm", estimator: str = "kmeans", n_clusters: int = 100,
                    seed: int = 42, n_init: int = 10, max_tokens: Optional[int] = None, n_bins: int = 100,
                    n_proj: int = 16, threads: Optional[int] = 1) -> LayerEntropies:
    """Entropy of every decoder layer's pooled token activations, and the ascending order (see the module doc).

    Defaults are the paper's (K = 100, seed 42, n_init 10, ``input_layernorm``) except ``max_tokens`` (None: all
    tokens; a cap is ours, for large calibration sets), ``threads`` (K-means threads, see
    :func:`kmeans_entropy`) and the histogram estimator's ``n_bins``/``n_proj``.
    ``layers`` restricts the pass to some layer indices (the order then ranks those). Deterministic for a fixed
    seed.
    """
    check_choice(hook, "hook", HOOKS)
    check_choice(estimator, "estimator", ESTIMATORS)
    if estimator == "kmeans":
        try:
            import sklearn  # noqa: F401  (fail before the forward pass, not after)
        except ImportError:
            raise ImportError("estimator='kmeans' needs scikit-learn: pip install scikit-learn "
                              "(or use estimator='histogram')") from None
    names, acts = collect_activations(model, calibration_data, layers, hook, max_tokens, seed)
    ents = []
    for x in acts:
        if estimator == "kmeans":
            ents.append(kmeans_entropy(x, n_clusters, seed, n_init, threads))
        else:
            ents.append(histogram_entropy(x, n_bins, n_proj, seed))
    order = sorted(range(len(ents)), key=lambda i: (ents[i], i))
    params = ({"n_clusters": n_clusters, "seed": seed, "n_init": n_init} if estimator == "kmeans"
              else {"n_bins": n_bins, "n_proj": n_proj, "seed": seed})
    params["max_tokens"] = max_tokens
    if layers is not None:
        params["layers"] = [int(i) for i in layers]
    return LayerEntropies(ents, order, names, int(acts[0].shape[0]), hook, estimator, params)


# ---------------------------------------------------------------------------------------------------------
# selection
# ---------------------------------------------------------------------------------------------------------

def _per_layer(v, n: int, name: str) -> List[float]:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return [float(v)] * n
    v = [float(x) for x in v]
    if len(v) != n:
        raise ValueError(f"{name} must be a number or a sequence of n_layers={n} values, got {len(v)}")
    return v


def _check_order(order: Sequence[int], n_layers: int) -> List[int]:
    order = [int(i) for i in order]
    if sorted(order) != list(range(n_layers)):
        raise ValueError(f"order must be a permutation of range(n_layers={n_layers}), got {order}")
    return order


def prefix_bits(order: Sequence[int], k: int, bits_low, bits_high=4, layer_sizes=None) -> tuple:
    """``(average bits per weight, total bytes)`` with the first ``k`` layers of ``order`` at ``bits_low`` and
    the rest at ``bits_high`` (numbers, or per-layer sequences indexed by layer), weighted by ``layer_sizes``
    (weights per layer; default: all equal, i.e. the paper's ``(k b_low + (L - k) b_high) / L``)."""
    n = len(order)
    order = _check_order(order, n)
    lo, hi = _per_layer(bits_low, n, "bits_low"), _per_layer(bits_high, n, "bits_high")
    sizes = _per_layer(1 if layer_sizes is None else layer_sizes, n, "layer_sizes")
    if any(s <= 0 for s in sizes):
        raise ValueError(f"layer_sizes must be positive, got {sizes}")
    low = set(order[:k])
    total = sum(s * (lo[i] if i in low else hi[i]) for i, s in enumerate(sizes))
    return total / sum(sizes), total / 8


def select_layers(order: Sequence[int], n_layers: int, bits_low, bits_high=4,
                  target_avg_bits: Optional[float] = None, target_bytes: Optional[float] = None,
                  quality_fn: Optional[Callable[[int], float]] = None, threshold: Optional[float] = None,
                  layer_sizes=None, higher_is_better: bool = False) -> int:
    """Number ``k`` of lowest-entropy layers (a prefix of ``order``) to put at ultra-low bits.

    * ``bits_low`` / ``bits_high``: bits per weight of a layer at the low / high setting - numbers (nominal
      bits, e.g. 1 and 4, or a method's typical honest bits) or per-layer sequences indexed by layer (the
      honest bits measured on quantized layers); ``layer_sizes``: weights per layer (default all equal).
    * ``target_avg_bits`` / ``target_bytes`` (memory budget): the smallest ``k`` whose average bits /
      total bytes (``sum size * bits / 8``, in the unit of ``layer_sizes``) is within the budget. Raises
      ``ValueError`` if not even ``k = n_layers`` fits.
    * ``quality_fn(k) -> float`` with ``threshold``: the largest ``k`` with ``quality_fn(k) <= threshold``
      (``>=`` with ``higher_is_better``), by binary search assuming the check passes for every ``k`` below the
      boundary and fails above it; each ``k`` is evaluated at most once. If even ``k = 0`` fails, 0 is
      returned with a warning.
    * both: the quality search runs over ``[0, k_budget]`` (stop at whichever rule the growing loop hits first).
    """
    order = _check_order(order, n_layers)
    if target_avg_bits is not None and target_bytes is not None:
        raise ValueError("give target_avg_bits or target_bytes, not both")
    if (quality_fn is None) != (threshold is None):
        raise ValueError("quality_fn and threshold go together: give both or neither")
    budget = target_avg_bits if target_avg_bits is not None else target_bytes
    if budget is None and quality_fn is None:
        raise ValueError("nothing to select on: give target_avg_bits, target_bytes or quality_fn + threshold")
    hi_k = n_layers
    if budget is not None:
        if not (isinstance(budget, (int, float)) and budget > 0):
            raise ValueError(f"the memory budget must be a positive number, got {budget!r}")
        which = 0 if target_avg_bits is not None else 1
        vals = [prefix_bits(order, k, bits_low, bits_high, layer_sizes)[which] for k in range(n_layers + 1)]
        fits = [k for k, v in enumerate(vals) if v <= budget * (1 + _TOL)]
        if not fits:
            unit = "average bits" if which == 0 else "bytes"
            raise ValueError(f"memory budget {budget} {unit} cannot be met: even all {n_layers} layers at "
                             f"bits_low give {min(vals):.6g} {unit}")
        hi_k = min(fits)
        if quality_fn is None:
            return hi_k
    cache = {}

    def ok(k: int) -> bool:
        if k not in cache:
            q = float(quality_fn(k))
            cache[k] = q >= threshold if higher_is_better else q <= threshold
            log.info("LUQ selection: k=%d quality=%.6g -> %s", k, q, "pass" if cache[k] else "fail")
        return cache[k]

    lo, hi = 0, hi_k          # invariant: ok(lo) assumed, every k > hi fails or is out of the budget
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid - 1
    if lo == 0 and not ok(0):
        log.warning("LUQ selection: the quality threshold %s is not met even with no ultra-low-bit layer "
                    "(k=0); selecting k=0", threshold)
    return lo


# ---------------------------------------------------------------------------------------------------------
# per-layer accounting
# ---------------------------------------------------------------------------------------------------------

def _linears(block: nn.Module) -> List[nn.Module]:
    from ..nn import QuantLinear
    return [m for m in block.modules() if isinstance(m, (nn.Linear, QuantLinear))]


def block_bits(block: nn.Module) -> dict:
    """Weights, honest bytes and nominal code bits of one decoder layer's Linear weights (bias excluded).

    A layer left as ``nn.Linear`` counts at its storage dtype (16 or 32 bits) in both columns.
    ``bytes_fp16`` / ``honest_bits_fp16``: the same layout with fp16 codebooks / scales (what the layer takes
    after ``.half()``), for models quantized in fp32.
    """
    from ..nn import QuantLinear
    n_w, nbytes, nbytes16, nominal = 0, 0.0, 0.0, 0.0
    for m in _linears(block):
        w = m.out_features * m.in_features
        n_w += w
        if isinstance(m, QuantLinear):
            nbytes += m.weight_bits * w / 8
            nbytes16 += m.spec.bits_per_weight(torch.float16) * w / 8
            nominal += m.spec.nominal_bits * w
        else:
            eb = m.weight.element_size() * 8
            nbytes += eb * w / 8
            nbytes16 += min(eb, 16) * w / 8
            nominal += eb * w
    n = max(n_w, 1)
    return {"weights": n_w, "bytes": nbytes, "honest_bits": nbytes * 8 / n, "nominal_bits": nominal / n,
            "bytes_fp16": nbytes16, "honest_bits_fp16": nbytes16 * 8 / n}


@dataclass
class LUQLayer:
    index: int
    name: str
    entropy: float
    rank: int                 # position in the ascending-entropy order
    setting: str              # "low" or "high"
    method: str
    honest_bits: float
    nominal_bits: float
    weights: int
    bytes: float
    rel_error: float          # mean relative output error of the layer's Linears (driver report); nan if unknown


@dataclass
class LUQReport:
    layers: List[LUQLayer]
    k: int                    # layers at ultra-low bits
    order: List[int]
    assembly: str
    entropy: dict             # LayerEntropies.to_dict()
    target: dict              # the budget / threshold used
    selection: dict = field(default_factory=dict)   # quality evaluations {k: value}
    quant_reports: dict = field(default_factory=dict)  # {"high": QuantReport, "low": QuantReport} or {"mixed": ...}
    model_bytes: int = 0      # the whole assembled model (parameters + buffers, tied tensors once)

    @property
    def weights(self) -> int:
        return sum(r.weights for r in self.layers)

    @property
    def bytes(self) -> float:
        return sum(r.bytes for r in self.layers)

    @property
    def average_bits(self) -> float:
        """Honest bits per weight over the LLM decoder Linear weights."""
        return self.bytes * 8 / self.weights

    @property
    def average_nominal_bits(self) -> float:
        return sum(r.nominal_bits * r.weights for r in self.layers) / self.weights

    def summary(self) -> dict:
        return {"k": self.k, "n_layers": len(self.layers), "assembly": self.assembly,
                "average_bits": self.average_bits, "average_nominal_bits": self.average_nominal_bits,
                "bytes": self.bytes, "weights": self.weights, "model_bytes": self.model_bytes,
                **{f"target_{k}": v for k, v in self.target.items()}}

    def table(self) -> str:
        head = (f"{'layer':>5} {'entropy':>8} {'rank':>5} {'set':>4} {'method':<8} {'bits':>5} {'bpw':>6} "
                f"{'rel.err':>8}  name")
        lines = [head, "-" * len(head)]
        for r in self.layers:
            lines.append(f"{r.index:>5} {r.entropy:>8.4f} {r.rank:>5} {r.setting:>4} {r.method:<8} "
                         f"{r.nominal_bits:>5.2f} {r.honest_bits:>6.3f} {r.rel_error:>8.4f}  {r.name}")
        lines.append("-" * len(head))
        lines.append(f"LUQ ({self.assembly}): {self.k}/{len(self.layers)} layers ultra-low; LLM decoder Linear "
                     f"weights: {self.average_bits:.3f} bits/weight honest ({self.average_nominal_bits:.3f} nominal), "
                     f"{self.bytes / 2**20:.2f} MiB; whole model {self.model_bytes / 2**20:.2f} MiB")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def to_dict(self) -> dict:
        def clean(v):
            return None if isinstance(v, float) and not math.isfinite(v) else v
        return {"summary": self.summary(), "order": list(self.order), "entropy": self.entropy,
                "target": dict(self.target), "selection": {str(k): v for k, v in self.selection.items()},
                "layers": [{k: clean(v) for k, v in r.__dict__.items()} for r in self.layers]}


def _errors_by_block(report, names: Sequence[str]) -> List[float]:
    """Mean ``rel_error`` of the driver's per-Linear report rows, grouped by decoder layer."""
    errs = [[] for _ in names]
    if report is None:
        return [float("nan")] * len(names)
    prefixes = [n + "." for n in names]
    for r in getattr(report, "layers", []):
        for i, p in enumerate(prefixes):
            if r.name.startswith(p):
                errs[i].append(float(r.rel_error))
                break
    return [sum(e) / len(e) if e else float("nan") for e in errs]


def _merged_report(quant_reports: dict, names: Sequence[str], low_set: set):
    """One driver ``QuantReport`` for the assembled model: low-run rows for the low layers, high-run rows
    for everything else (``mixed`` is already one)."""
    if "mixed" in quant_reports:
        return quant_reports["mixed"]
    high, low = quant_reports.get("high"), quant_reports.get("low")
    if high is None or low is None:
        return None
    from .report import QuantReport
    low_prefixes = tuple(names[i] + "." for i in sorted(low_set))
    rows = [r for r in high.layers if not (low_prefixes and r.name.startswith(low_prefixes))]
    rows += [r for r in low.layers if low_prefixes and r.name.startswith(low_prefixes)]
    pos = {n: i for i, n in enumerate(r.name for r in high.layers)}
    rows.sort(key=lambda r: pos.get(r.name, len(pos)))
    return QuantReport(rows, list(high.skipped), high.model_bytes_before, 0, high.seconds + low.seconds)


# ---------------------------------------------------------------------------------------------------------
# quantization + assembly
# ---------------------------------------------------------------------------------------------------------

def _component(method: str, bits: int, group_size: int, options: Optional[dict]):
    from .config import ComponentConfig
    return ComponentConfig(method=method, bits=bits, group_size=group_size, options=dict(options or {}))


def _config(base_config, language, overrides: Optional[dict] = None):
    """``base_config`` (vision / projector / exclusions / device kept) with the language component replaced."""
    from .config import QuantConfig
    if base_config is None:
        cfg = QuantConfig(language=language, vision=None, projector=None)
    else:
        cfg = copy.deepcopy(QuantConfig.coerce(base_config))
        cfg.language = language
    if overrides:
        cfg.overrides = {**overrides, **cfg.overrides}
    cfg.validate()
    return cfg


def _run_driver(model, config, data, progress: bool = True):
    """``quantize_model`` -> ``(model, report)``."""
    return quantize_model(model, config, data, progress=progress)


def layer_override_pattern(name: str) -> str:
    """Regex matching the Linears inside decoder layer ``name`` exactly (``layers.1.`` but not ``layers.10.``)."""
    return "^" + re.escape(name) + r"\."


def assemble_swap(high_model: nn.Module, low_model: nn.Module, low_layers: Iterable[int]) -> nn.Module:
    """Move decoder layers ``low_layers`` of ``low_model`` into ``high_model`` (in place; returns it).

    Both models must come from the same architecture (two quantizations of one model). The moved blocks are
    shared with ``low_model`` afterwards: do not use ``low_model`` for anything else.
    """
    names_h, blocks_h = decoder_layers(high_model)
    names_l, blocks_l = decoder_layers(low_model)
    if names_h != names_l:
        raise ValueError("high_model and low_model have different decoder layers; swap needs two quantizations "
                         "of the same model")
    mods = _block_list(high_model, names_h)
    for i in low_layers:
        if not 0 <= int(i) < len(mods):
            raise ValueError(f"layer {i} out of range (0..{len(mods) - 1})")
        mods[int(i)] = blocks_l[int(i)]
    return high_model


class SwapPair:
    """The two uniform quantizations behind the ``swap`` assembly, to assemble any set of low layers in place.

    ``SwapPair.quantize(model, data, low, high)`` quantizes a deep copy of ``model`` with ``low`` and ``model``
    itself with ``high`` (``ComponentConfig``s for the language model; ``base_config`` as in
    :func:`luq_quantize`). ``assemble(layers)`` puts the low version of exactly those decoder layers (indices)
    into ``pair.model`` and the high version of all others; it can be called any number of times.
    """

    def __init__(self, model, names, low_blocks, high_blocks, low_report=None, high_report=None):
        self.model, self.names = model, list(names)
        self.low_blocks, self.high_blocks = list(low_blocks), list(high_blocks)
        self.low_report, self.high_report = low_report, high_report
        self._mods = _block_list(model, self.names)
        self.low_layers: List[int] = []

    @classmethod
    def quantize(cls, model, calibration_data, low, high, base_config=None, names=None,
                 progress: bool = True) -> "SwapPair":
        names = names or decoder_layers(model)[0]
        low_model, low_report = _run_driver(copy.deepcopy(model), _config(base_config, low), calibration_data,
                                            progress)
        model, high_report = _run_driver(model, _config(base_config, high), calibration_data, progress)
        return cls(model, names, [low_model.get_submodule(n) for n in names],
                   [model.get_submodule(n) for n in names], low_report, high_report)

    def assemble(self, low_layers: Iterable[int]) -> nn.Module:
        low = {int(i) for i in low_layers}
        bad = sorted(i for i in low if not 0 <= i < len(self.names))
        if bad:
            raise ValueError(f"layers {bad} out of range (0..{len(self.names) - 1})")
        for i in range(len(self.names)):
            self._mods[i] = self.low_blocks[i] if i in low else self.high_blocks[i]
        self.low_layers = sorted(low)
        return self.model

    def layer_bits(self, kind: str = "honest") -> tuple:
        """Per-layer bits/weight ``(low, high)``: ``kind="honest"`` (all buffers) or ``"nominal"`` (codes)."""
        check_choice(kind, "kind", BUDGET_BITS)
        key = "honest_bits" if kind == "honest" else "nominal_bits"
        return [block_bits(b)[key] for b in self.low_blocks], [block_bits(b)[key] for b in self.high_blocks]

    def average_bits(self, kind: str = "honest") -> float:
        """Bits/weight over the decoder Linear weights of the model as currently assembled."""
        check_choice(kind, "kind", BUDGET_BITS)
        rows = [block_bits(self.model.get_submodule(n)) for n in self.names]
        if kind == "honest":
            return sum(r["bytes"] for r in rows) * 8 / sum(r["weights"] for r in rows)
        return sum(r["nominal_bits"] * r["weights"] for r in rows) / sum(r["weights"] for r in rows)


def _probe_honest_bits(block: nn.Module, method: str, bits: int, group_size: int, options: Optional[dict]) -> float:
    """Calibration-free estimate (H = identity) of the honest bits/weight ``method`` gives the Linears of
    ``block``: layouts with data-dependent parts (BiLLM's salient columns) may differ after calibration."""
    from .config import pick_group_size
    n_w, nbits = 0, 0.0
    for name, m in block.named_modules():
        if type(m) is not nn.Linear:
            continue
        g = pick_group_size(group_size, m.in_features, name)
        w = m.out_features * m.in_features
        n_w += w
        if g is None:
            nbits += m.weight.element_size() * 8 * w
            continue
        # tables are stored in the weight's dtype, as the driver does
        dt = m.weight.dtype if m.weight.dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float16
        meth = _component(method, bits, g, options).build_method(dtype=dt)
        H = torch.eye(m.in_features) if meth.needs_hessian else None
        qw = meth.quantize(m.weight.detach().float().cpu(), H)
        nbits += qw.layer_spec().bits_per_weight(dt) * w
    if n_w == 0:
        raise ValueError("decoder layer has no nn.Linear to probe")
    return nbits / n_w


def luq_quantize(model: nn.Module, calibration_data: Sequence[dict], low_method: str = "billm",
                 low_bits: Optional[int] = None,
                 high_method: str = "gptq", high_bits: int = 4, target_avg_bits: Optional[float] = None,
                 target_bytes: Optional[float] = None, budget_bits: str = "honest", n_low: Optional[int] = None,
                 quality_fn: Optional[Callable[[nn.Module], float]] = None, threshold: Optional[float] = None,
                 higher_is_better: bool = False, assembly: str = "swap", mix: Optional[float] = 0.5,
                 entropy: Optional[LayerEntropies] = None, entropy_data: Optional[Sequence[dict]] = None,
                 hook: str = "input_layernorm", estimator: str = "kmeans", n_clusters: int = 100, seed: int = 42,
                 n_init: int = 10, max_tokens: Optional[int] = None, group_size: int = 128,
                 low_options: Optional[dict] = None, high_options: Optional[dict] = None, base_config=None,
                 progress: bool = True):
    """LUQ end to end: entropy order -> selection of ``k`` -> assembly; returns ``(model, LUQReport)``.

    * Methods: ``low_method`` (default ``"billm"``, the paper's; or ``"bivlm"``, ``"rtn"``) at ``low_bits``
      (``None``: the method's own, e.g. BiLLM's packed 2-bit lut, whose *nominal* BiLLM rate is ~1.1 bits) and
      ``high_method`` (default ``"gptq"``) at ``high_bits`` (4), both with ``group_size`` (a layer it does not
      divide gets the largest supported one that does) and ``low_options`` / ``high_options``.

    * How many layers go low: ``n_low`` (fixed ``k``), or a memory budget ``target_avg_bits`` /
      ``target_bytes`` over the LLM decoder Linear weights (``budget_bits="honest"``: measured/estimated bytes of
      every buffer; ``"nominal"``: code bits, the paper's arithmetic), and/or ``quality_fn(model) -> float`` with
      ``threshold`` (lower is better unless ``higher_is_better``), checked on assembled candidates by binary
      search over ``k`` (see :func:`select_layers`). With ``assembly="sequential"`` each quality check is a full
      quantization run.
    * ``entropy``: a precomputed :class:`LayerEntropies` (else computed here on ``entropy_data``, default: the
      multimodal samples of ``calibration_data``, with ``hook``/``estimator``/``n_clusters``/``seed``/...).
    * ``mix``: share of image+text samples in the PTQ calibration set (see :func:`mix_calibration`).
    * ``base_config``: a :class:`~bivlm_kernels.quant.QuantConfig` (or method name) whose vision / projector /
      exclusion / device settings are kept; its language component is replaced by LUQ's two settings.
    * ``progress``: the driver's tqdm bars.

    ``model`` is quantized in place (``swap`` also quantizes a deep copy for the low run).
    """
    check_choice(assembly, "assembly", ASSEMBLIES)
    check_choice(budget_bits, "budget_bits", BUDGET_BITS)
    given = [x for x in (n_low, target_avg_bits, target_bytes) if x is not None]
    if n_low is not None and len(given) > 1:
        raise ValueError("n_low fixes k: do not combine it with target_avg_bits / target_bytes")
    if n_low is not None and quality_fn is not None:
        raise ValueError("n_low fixes k: do not combine it with quality_fn")
    if not given and quality_fn is None:
        raise ValueError("say how many layers go ultra-low: n_low, target_avg_bits, target_bytes or "
                         "quality_fn + threshold")
    if (quality_fn is None) != (threshold is None):
        raise ValueError("quality_fn and threshold go together: give both or neither")
    calibration_data = list(calibration_data)
    if not calibration_data:
        raise ValueError("calibration_data is empty")
    low_cc = _component(low_method, low_bits, group_size, low_options)
    high_cc = _component(high_method, high_bits, group_size, high_options)
    _config(base_config, low_cc)               # validate both settings before any forward pass
    _config(base_config, high_cc)

    names, blocks = decoder_layers(model)
    L = len(blocks)
    if n_low is not None and not (isinstance(n_low, int) and 0 <= n_low <= L):
        raise ValueError(f"n_low must be an int in [0, {L}], got {n_low!r}")

    # 1. entropy order on the multimodal samples (on the unquantized model)
    if entropy is None:
        ent_data = entropy_data
        if ent_data is None:
            mm = [s for s in calibration_data if s.get("pixel_values") is not None]
            ent_data = mm or calibration_data
        entropy = layer_entropies(model, ent_data, hook=hook, estimator=estimator, n_clusters=n_clusters,
                                  seed=seed, n_init=n_init, max_tokens=max_tokens)
    if len(entropy) != L:
        raise ValueError(f"entropy has {len(entropy)} layers, the model has {L} decoder layers")
    order = list(entropy.order)
    calib = mix_calibration(calibration_data, mix, seed=0)
    target = {k: v for k, v in (("avg_bits", target_avg_bits), ("bytes", target_bytes), ("n_low", n_low),
                                 ("threshold", threshold)) if v is not None}
    target["budget_bits"] = budget_bits
    evaluations = {}
    sizes = [block_bits(b)["weights"] for b in blocks]

    if assembly == "swap":
        # 2. both uniform runs; the low one on a deep copy of the *unquantized* model
        pair = SwapPair.quantize(model, calib, low_cc, high_cc, base_config, names, progress)
        model = pair.model
        b_low, b_high = pair.layer_bits(budget_bits)

        def quality_at(k: int) -> float:
            pair.assemble(order[:k])
            q = float(quality_fn(model))
            evaluations[k] = q
            return q

        k = n_low if n_low is not None else select_layers(
            order, L, b_low, b_high, target_avg_bits, target_bytes,
            quality_at if quality_fn else None, threshold, sizes, higher_is_better)
        pair.assemble(order[:k])
        quant_reports = {"high": pair.high_report, "low": pair.low_report}
        errs_low, errs_high = _errors_by_block(pair.low_report, names), _errors_by_block(pair.high_report, names)
        errors = [errs_low[i] if i in set(order[:k]) else errs_high[i] for i in range(L)]
        del pair
    else:
        # 2. estimate per-layer bits, select, then one layer-sequential run with per-layer overrides
        if budget_bits == "honest":
            b_low = _probe_honest_bits(blocks[0], low_method, low_bits, group_size, low_options)
            b_high = _probe_honest_bits(blocks[0], high_method, high_bits, group_size, high_options)
        else:
            b_low, b_high = float(low_bits), float(high_bits)
        pristine = copy.deepcopy(model) if quality_fn is not None else None

        def mixed_config(k: int):
            ov = {layer_override_pattern(names[i]): {"method": low_method, "bits": low_bits,
                                                     "options": dict(low_options or {})} for i in order[:k]}
            return _config(base_config, high_cc, ov)

        def quality_at(k: int) -> float:
            m, _ = _run_driver(copy.deepcopy(pristine), mixed_config(k), calib, progress)
            q = float(quality_fn(m))
            evaluations[k] = q
            return q

        k = n_low if n_low is not None else select_layers(
            order, L, b_low, b_high, target_avg_bits, target_bytes,
            quality_at if quality_fn else None, threshold, sizes, higher_is_better)
        model, mixed_report = _run_driver(model, mixed_config(k), calib, progress)
        quant_reports = {"mixed": mixed_report}
        errors = _errors_by_block(mixed_report, names)

    # 3. report, measured on the assembled model
    final_blocks = [model.get_submodule(n) for n in names]
    rank = entropy.rank()
    low_set = set(order[:k])
    rows = []
    for i, blk in enumerate(final_blocks):
        bb = block_bits(blk)
        rows.append(LUQLayer(i, names[i], float(entropy.entropies[i]), rank[i], "low" if i in low_set else "high",
                             low_method if i in low_set else high_method, bb["honest_bits"], bb["nominal_bits"],
                             bb["weights"], bb["bytes"], errors[i]))
    report = LUQReport(rows, k, order, assembly, entropy.to_dict(), target, evaluations, quant_reports,
                       module_bytes(model))
    # What save_quantized records: the equivalent single config (high + per-layer low overrides), the driver's
    # per-Linear rows of the layers actually in the model, and the LUQ report under the key "luq".
    equivalent = _config(base_config, high_cc, {layer_override_pattern(names[i]): {
        "method": low_method, "bits": low_bits, "options": dict(low_options or {})} for i in order[:k]})
    merged = _merged_report(quant_reports, names, low_set)
    if merged is not None and "mixed" not in quant_reports:
        merged.model_bytes_after = module_bytes(model)
    rec = {"config": equivalent.to_dict(), "report": merged.to_dict() if merged is not None else None}
    if rec["report"] is not None:
        rec["report"]["luq"] = report.to_dict()
    model.bivlm_quantization = rec
    if target_avg_bits is not None:
        reached = report.average_bits if budget_bits == "honest" else report.average_nominal_bits
        if reached > target_avg_bits * (1 + 1e-6):
            log.warning("LUQ: reached %.4f %s bits/weight, above target_avg_bits=%s (the %s assembly estimates "
                        "honest bits before quantizing)", reached, budget_bits, target_avg_bits, assembly)
    return model, report

