"""Variants: how an adapter initialises, runs forward and merges.

A variant is a small strategy object shared by all layers that use it. Plain LoRA
is `LoraVariant`; DoRA (`variants/dora.py`) subclasses it. Layers supply the
kind-specific primitives (`delta_weight`, `add_lora`, `lora_input`, `lora_output`,
`to_oi`/`from_oi`); variants combine them.

Initialisations derived from the base weight (PiSSA, OLoRA: `variants/pissa.py`)
and LoRA+ optimiser groups (`variants/loraplus.py`) live here too; rsLoRA is the
scaling rule `lorakit.config.scaling`. See docs/variants.md.
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


def target_problem(model, config, path: str, module) -> str | None:
    """Why `config`'s variant or init cannot adapt the module at `path` (None if it can).

    Called by `lorakit.inject.plan` for every target, before the model is changed.
    `module` is the base module or an existing `LoraLayer`.
    """
    from ..layers import LoraLayer, wrapper_for

    if config.use_dora:
        base = module.base_layer if isinstance(module, LoraLayer) else module
        cls = wrapper_for(base)
        problem = get_variant("dora").check_layer(cls) if cls is not None else None
        if problem:
            return problem
    from .pissa import target_problem as weight_init_problem

    return weight_init_problem(model, config, path, module)


def restore_base_weight(layer) -> None:
    """Undo a PiSSA/OLoRA residual rewrite of `layer`'s base weight (bit for bit); no-op otherwise."""
    from .pissa import RECORD_ATTR, restore_original_weight

    if RECORD_ATTR in layer.__dict__:
        restore_original_weight(layer)


__all__ = ["LoraVariant", "get_variant", "register_variant", "target_problem", "restore_base_weight"]
