"""Variants: how an adapter initialises, runs forward and merges.

A variant is a small strategy object shared by all layers that use it. Plain LoRA
is `LoraVariant`; DoRA and friends subclass it. Layers supply the kind-specific
primitives (`delta_weight`, `add_lora`); variants combine them.
"""

from __future__ import annotations

from .lora import LoraVariant

_REGISTRY: dict[str, LoraVariant] = {"lora": LoraVariant()}


def register_variant(variant: LoraVariant) -> None:
    _REGISTRY[variant.name] = variant


def get_variant(name: str) -> LoraVariant:
    """The shared instance of variant `name` (`"lora"`, `"dora"`, ...)."""
    if name == "dora" and "dora" not in _REGISTRY:
        from . import dora  # noqa: F401  (registers itself)
    return _REGISTRY[name]


__all__ = ["LoraVariant", "get_variant", "register_variant"]
