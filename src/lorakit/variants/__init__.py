"""Variants: how an adapter runs forward and merges, as small strategies behind `Variant`.

The registry is explicit: plain LoRA (`lora.LoraVariant`) and DoRA (`dora.DoraVariant`).
A variant sees a layer only through the `base.AdaptedLayer` protocol. Weight-derived
initialisations (PiSSA, OLoRA: `pissa`) are functions on a layer that `lorakit.inject`
calls; rsLoRA is the scaling rule `lorakit.config.scaling`; LoRA+ is an optimiser
grouping (`lorakit.loraplus`). See docs/variants.md and docs/architecture.md.
"""

from __future__ import annotations

from ..errors import LoraError
from .base import AdaptedLayer, Variant
from .dora import DoraVariant
from .lora import LoraVariant

VARIANTS: dict[str, Variant] = {"lora": LoraVariant(), "dora": DoraVariant()}


def register_variant(variant: Variant) -> None:
    """Add (or replace) a variant under `variant.name`."""
    VARIANTS[variant.name] = variant


def get_variant(name: str) -> Variant:
    """The shared instance of variant `name` (`"lora"`, `"dora"`, ...); `LoraError` for an unknown name."""
    if name not in VARIANTS:
        raise LoraError(f"no variant named {name!r}; registered: {sorted(VARIANTS)}")
    return VARIANTS[name]


__all__ = ["AdaptedLayer", "Variant", "LoraVariant", "DoraVariant", "VARIANTS", "get_variant", "register_variant"]
