"""Model adapters: where the vision tower, projector and language-model blocks of a model live.

``models.testbed`` (real small weights, heavy optional dependencies) is deliberately not imported here.
"""
from .adapters import Component, decoder_layers, find_components, generic_components, register_adapter

__all__ = ["Component", "decoder_layers", "find_components", "generic_components", "register_adapter"]
