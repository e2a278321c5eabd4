"""``from_pretrained`` of bivlm checkpoints: a transformers quantization config and ``HfQuantizer`` for
``quant_method = "bivlm"``.

``save_quantized`` writes ``config.json`` with ``architectures`` and a ``quantization_config``::

    {"quant_method": "bivlm", "format": "bivlm-packed", "format_version": 1, "dtype": "float32",
     "layers": {"model.language_model.layers.0.self_attn.q_proj": {<LayerSpec dict>}, ...}}

With ``bivlm_kernels`` imported, ``AutoModel*.from_pretrained(dir)`` (or the model class's) then finds the
quantizer below: before the weights load, it swaps the recorded ``nn.Linear`` modules of the (meta-device)
skeleton for empty ``QuantLinear`` layers of the recorded layouts (``checkpoint.swap_in_empty_layers``, the
same code path ``load_quantized`` uses), so that the packed tensors land in them.

Registration is lazy: ``import bivlm_kernels`` does not import transformers. :func:`install` registers at once
when transformers is already imported, and otherwise arranges (an import hook) for it to happen right after
transformers is first imported. Without ``bivlm_kernels`` imported, transformers does not know ``bivlm``: it
logs "Unknown quantization type, got bivlm ... we will skip the quantization" and builds a model with random
linear weights — import ``bivlm_kernels`` first (or use ``load_quantized``).
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys

from ..checkpoint.hf_config import QUANT_METHOD, check_quantization_config
_registered = False


def register() -> None:
    """Register the ``bivlm`` config and quantizer with transformers (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
    from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING
    from transformers.utils.quantization_config import QuantizationConfigMixin

    if QUANT_METHOD in AUTO_QUANTIZER_MAPPING:      # e.g. a module reload
        _registered = True
        return

    @register_quantization_config(QUANT_METHOD)
    class BivlmConfig(QuantizationConfigMixin):
        """The ``quantization_config`` of a bivlm checkpoint: format, table dtype and per-layer layouts."""

        def __init__(self, format: str = "bivlm-packed", format_version: int = 1, dtype: str = "float16",
                     layers: dict | None = None, **kwargs):
            self.quant_method = QUANT_METHOD
            self.format, self.format_version, self.dtype = format, format_version, dtype
            self.layers = {} if layers is None else layers
            for k, v in kwargs.items():            # forward-compatible: keep what a newer writer added
                setattr(self, k, v)
            self.post_init()

        def post_init(self):
            check_quantization_config(vars(self))

    @register_quantizer(QUANT_METHOD)
    class BivlmHfQuantizer(HfQuantizer):
        """Loads pre-quantized bivlm checkpoints (quantizing happens offline, with ``bivlm quantize``)."""

        requires_calibration = True

        def __init__(self, quantization_config, **kwargs):
            super().__init__(quantization_config, **kwargs)
            if not self.pre_quantized:
                raise ValueError("bivlm models are quantized offline (bivlm quantize / quantize_model); "
                                 "from_pretrained loads existing bivlm checkpoints only")

        def validate_environment(self, *args, **kwargs):
            return None

        def _process_model_before_weight_loading(self, model, **kwargs):
            from .. import checkpoint, formats
            cfg = self.quantization_config
            checkpoint.swap_in_empty_layers(model, cfg.layers, formats.DTYPES_BY_NAME[cfg.dtype])
            return model

        def _process_model_after_weight_loading(self, model, **kwargs):
            model.eval()
            return model

        def _dequantize(self, model, dtype=None):
            from ..nn import dequantize_model
            return dequantize_model(model, dtype)

        def is_serializable(self, **kwargs):
            return True

        @property
        def is_trainable(self):
            return False

        @property
        def is_compileable(self):
            return True

    _registered = True


class _AfterImport(importlib.abc.MetaPathFinder):
    """Import hook: lets ``transformers`` import normally, then registers the quantizer. It stays on
    ``sys.meta_path`` until transformers is really executed: a bare ``importlib.util.find_spec("transformers")``
    (e.g. an availability check) must not use it up."""

    def __init__(self):
        self._busy = False

    def find_spec(self, name, path=None, target=None):
        if name != "transformers" or self._busy:
            return None
        self._busy = True                           # find the real spec without recursing into ourselves
        try:
            spec = importlib.util.find_spec(name)
        finally:
            self._busy = False
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _RegisteringLoader(spec.loader, self)
        return spec


class _RegisteringLoader(importlib.abc.Loader):
    def __init__(self, loader, finder):
        self._loader, self._finder = loader, finder

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        if self._finder in sys.meta_path:
            sys.meta_path.remove(self._finder)
        self._loader.exec_module(module)
        try:
            register()
        except Exception as e:                      # never break the user's import of transformers
            import logging
            logging.getLogger(__name__).warning("bivlm_kernels: could not register the transformers "
                                                "quantizer (%s: %s)", type(e).__name__, e)

    def __getattr__(self, name):                    # e.g. get_resource_reader, is_package of the real loader
        return getattr(self._loader, name)


def install() -> None:
    """Register now if transformers is imported, else right after it is (called by ``import bivlm_kernels``)."""
    if "transformers" in sys.modules:
        try:
            register()
        except ImportError:
            pass
        return
    if not any(isinstance(f, _AfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport())
