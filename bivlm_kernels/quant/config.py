"""Configuration of a whole-model quantization run: what to quantize, with which method, and how to calibrate.

A VLM has three components that Bi-VLM and LUQ treat differently (the vision encoder is the most sensitive,
the projector the least): each gets its own :class:`ComponentConfig`, or ``None`` to stay in full precision::

    QuantConfig(language=ComponentConfig("gptq", bits=4),
                vision=None,                                  # keep the vision tower in full precision
                projector=ComponentConfig("rtn", bits=4),
                exclude=[r"\\.mlp\\.down_proj$"],              # these layers stay nn.Linear
                overrides={r"layers\\.0\\.": {"bits": 4}})      # per-layer changes, matched by regex

``QuantConfig.from_method("bivlm")`` is the quick path (language model only, the method's own defaults). All
validation happens when the config is built or when :meth:`QuantConfig.validate` runs, before any weight is
touched: an unknown method, option, component, bit width or group size is a ``ValueError`` naming it and the
allowed values.
"""
from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass, field
from typing import Optional

from .. import formats

log = logging.getLogger(__name__)

COMPONENTS = ("vision", "projector", "language")   # forward order: the order they are quantized in

# Per-method, per-component option defaults of from_method (ours, from PAPERS.md): Bi-VLM's salient share is
# the reported outlier share, about 5 % of vision-tower weights vs 1 % (the method's default) in the LM.
_COMPONENT_DEFAULTS = {"bivlm": {"vision": {"p_sal": 0.05}}}

# Fields of ComponentConfig that a per-layer override may change.
_OVERRIDE_KEYS = ("method", "bits", "group_size", "options")


@dataclass
class ComponentConfig:
    """Method and settings for one component (or one overridden layer).

    ``bits=None`` means the method's own default. ``options`` are passed to the method's config
    (e.g. ``{"damp": 0.01}``); an option the method does not know is a ``ValueError``.
    """
    method: str = "rtn"
    bits: Optional[int] = None
    group_size: int = 128
    options: dict = field(default_factory=dict)

    def method_kwargs(self, group_size: Optional[int] = None, dtype=None) -> dict:
        kw = dict(self.options)
        if self.bits is not None:
            kw["bits"] = self.bits
        kw["group_size"] = self.group_size if group_size is None else group_size
        if dtype is not None:
            kw["dtype"] = dtype
        return kw

    def build_method(self, group_size: Optional[int] = None, dtype=None):
        """The method object for these settings; raises ValueError for an unknown method/option."""
        from .base import get_method
        return get_method(self.method, **self.method_kwargs(group_size, dtype))

    def validate(self, where: str = "component") -> None:
        from .base import METHODS
        if not isinstance(self.method, str) or self.method not in METHODS:
            raise ValueError(f"{where}: unknown method {self.method!r}; available: {sorted(METHODS)}")
        if self.bits is not None:
            formats.check_bits(self.bits, name=f"{where}.bits")
        formats.check_group_size(self.group_size)
        if not isinstance(self.options, dict):
            raise ValueError(f"{where}.options must be a dict, got {type(self.options).__name__}")
        self.build_method()            # the method checks its own options (and bits it cannot emit)

    def to_dict(self) -> dict:
        return {"method": self.method, "bits": self.bits, "group_size": self.group_size,
                "options": _jsonable(self.options)}

    @classmethod
    def from_dict(cls, d) -> Optional["ComponentConfig"]:
        if d is None or isinstance(d, ComponentConfig):
            return d
        if not isinstance(d, dict):
            raise ValueError(f"a component config must be a dict or None, got {type(d).__name__}")
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown component option(s) {unknown}; allowed: {list(_OVERRIDE_KEYS)}")
        return cls(**d)


@dataclass
class CalibrationConfig:
    """How calibration batches are built (see :func:`bivlm_kernels.quant.calibration.build_calibration_data`).

    ``mix`` is LUQ's image/text ratio alpha: the share of multimodal (image + text) samples, the rest text
    only. 0.5 is our default (LUQ's LLaVA table implies it); the paper does not define alpha exactly.
    """
    n_samples: int = 128
    seq_len: int = 512
    mix: float = 0.5
    seed: int = 0

    def validate(self) -> None:
        for name in ("n_samples", "seq_len"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:      # True is an int: refused too
                raise ValueError(f"calibration.{name} must be a positive int, got {v!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"calibration.seed must be an int, got {self.seed!r}")
        if not isinstance(self.mix, (int, float)) or isinstance(self.mix, bool) or not 0.0 <= self.mix <= 1.0:
            raise ValueError(f"calibration.mix (image/text ratio alpha) must lie in [0, 1], got {self.mix!r}")


@dataclass
class QuantConfig:
    """Everything :func:`~bivlm_kernels.quant.quantize_model` needs besides the model and the data.

    * ``vision`` / ``projector`` / ``language``: a :class:`ComponentConfig` (or a dict of its fields), or
      ``None`` to keep that component in full precision.
    * ``include``: regexes; if given, only layers whose full name matches one of them are quantized.
    * ``exclude``: regexes; matching layers stay ``nn.Linear``.
    * ``overrides``: ``{regex: {field: value}}`` with fields of ComponentConfig; the first matching pattern
      changes that layer's settings (``None`` instead of a dict keeps the layer in full precision).
    * ``device``: where each block and its activations go while being quantized (``None``: where the block
      already is). The rest of the model and the stored activations stay where they are / on the CPU.
    * ``true_sequential`` (GPTQ's option of that name): within a block, quantize the linears stage by stage in
      forward order (linears reading the same input, e.g. q/k/v, form one stage), each stage's Hessians taken
      with the earlier stages already quantized; False: every Hessian from the full-precision block (one pass).
    """
    language: Optional[ComponentConfig] = field(default_factory=ComponentConfig)
    vision: Optional[ComponentConfig] = None
    projector: Optional[ComponentConfig] = None
    include: Optional[list] = None
    exclude: list = field(default_factory=list)
    overrides: dict = field(default_factory=dict)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    device: Optional[str] = None
    true_sequential: bool = False

    def __post_init__(self):
        for c in COMPONENTS:
            setattr(self, c, ComponentConfig.from_dict(getattr(self, c)))
        if isinstance(self.calibration, dict):
            unknown = sorted(set(self.calibration) - {f.name for f in dataclasses.fields(CalibrationConfig)})
            if unknown:
                raise ValueError(f"unknown calibration option(s) {unknown}; allowed: "
                                 f"{[f.name for f in dataclasses.fields(CalibrationConfig)]}")
            self.calibration = CalibrationConfig(**self.calibration)
        for name in ("include", "exclude"):
            pats = getattr(self, name)
            if pats is not None and (isinstance(pats, str) or not all(isinstance(p, str) for p in pats)):
                raise ValueError(f"{name} must be a list of regex strings, got {pats!r}")
        if not isinstance(self.overrides, dict):
            raise ValueError(f"overrides must be a dict {{regex: dict or None}}, got {self.overrides!r}")
        for pat, ov in self.overrides.items():
            if ov is not None and (not isinstance(ov, dict) or set(ov) - set(_OVERRIDE_KEYS)):
                raise ValueError(f"overrides[{pat!r}] must be None or a dict with keys from "
                                 f"{list(_OVERRIDE_KEYS)}, got {ov!r}")
        for pat in list(self.include or []) + list(self.exclude) + list(self.overrides):
            try:
                re.compile(pat)
            except re.error as e:
                raise ValueError(f"invalid layer-name regex {pat!r}: {e}") from None

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_method(cls, method: str, bits: Optional[int] = None, group_size: int = 128,
                    components=("language",), **options) -> "QuantConfig":
        """One method for the listed components (default: the language model only, as Bi-VLM's and LUQ's
        main setting); the other components stay in full precision. ``bits=None``: the method's default."""
        if isinstance(components, str):
            components = [c.strip() for c in components.split(",") if c.strip()]
        bad = sorted(set(components) - set(COMPONENTS))
        if bad or not components:
            raise ValueError(f"unknown component(s) {bad or components!r}; allowed: {list(COMPONENTS)}")
        comps = {}
        for c in COMPONENTS:
            if c in components:
                opts = dict(options)
                for k, v in _COMPONENT_DEFAULTS.get(method, {}).get(c, {}).items():
                    opts.setdefault(k, v)
                comps[c] = ComponentConfig(method=method, bits=bits, group_size=group_size, options=opts)
            else:
                comps[c] = None
        cfg = cls(**comps)
        cfg.validate()
        return cfg

    @classmethod
    def coerce(cls, config) -> "QuantConfig":
        """A QuantConfig from a QuantConfig, a method name (``"rtn"``, ``"gptq"``, ...) or a dict."""
        if isinstance(config, QuantConfig):
            return config
        if isinstance(config, str):
            return cls.from_method(config)
        if isinstance(config, dict):
            return cls.from_dict(config)
        raise TypeError(f"config must be a QuantConfig, a method name or a dict, got {type(config).__name__}")

    # ------------------------------------------------------------------ checks and lookup
    def validate(self) -> None:
        """Check every method name and option now (not halfway through a model)."""
        active = [c for c in COMPONENTS if getattr(self, c) is not None]
        if not active:
            raise ValueError(f"nothing to quantize: every component ({list(COMPONENTS)}) is None")
        for c in active:
            getattr(self, c).validate(where=c)
        self.calibration.validate()
        if not isinstance(self.true_sequential, bool):
            raise ValueError(f"true_sequential must be True or False, got {self.true_sequential!r}")
        for pat, ov in self.overrides.items():
            if ov is not None:
                base = self.language or getattr(self, active[0])
                merged = dataclasses.replace(base, **ov)
                merged.validate(where=f"overrides[{pat!r}]")

    def layer_config(self, component: str, name: str) -> Optional[ComponentConfig]:
        """Settings for the layer ``name`` of ``component``, or None when it stays in full precision."""
        base = getattr(self, component)
        if base is None:
            return None
        if self.include is not None and not any(re.search(p, name) for p in self.include):
            return None
        if any(re.search(p, name) for p in self.exclude):
            return None
        for pat, ov in self.overrides.items():
            if re.search(pat, name):
                return None if ov is None else dataclasses.replace(base, **ov)
        return base

    # ------------------------------------------------------------------ (de)serialization
    def to_dict(self) -> dict:
        return {**{c: (None if getattr(self, c) is None else getattr(self, c).to_dict()) for c in COMPONENTS},
                "include": self.include, "exclude": list(self.exclude),
                "overrides": {k: _jsonable(v) for k, v in self.overrides.items()},
                "calibration": dataclasses.asdict(self.calibration), "device": None,
                "true_sequential": self.true_sequential}

    @classmethod
    def from_dict(cls, d: dict) -> "QuantConfig":
        allowed = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - allowed)
        if unknown:
            raise ValueError(f"unknown QuantConfig field(s) {unknown}; allowed: {sorted(allowed)}")
        return cls(**d)


def pick_group_size(group_size: int, in_features: int, name: str = "layer") -> Optional[int]:
    """``group_size`` if it divides ``in_features``; otherwise the largest supported group size that does
    (logged), or None if none does (the layer then stays in full precision).

    SmolLM2's 576 = 4.5 x 128 inputs get 64.
    """
    if in_features % group_size == 0:
        return group_size
    for g in sorted(formats.GROUP_SIZES, reverse=True):
        if in_features % g == 0:
            log.info("%s: in_features=%d is not a multiple of group_size=%d; using group_size=%d",
                     name, in_features, group_size, g)
            return g
    log.warning("%s: in_features=%d is not a multiple of any supported group size %s; kept in full "
                "precision", name, in_features, formats.GROUP_SIZES)
    return None


def _jsonable(v):
    """Options may hold torch dtypes and tuples; make them JSON-friendly for the checkpoint's record."""
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    return str(v)
