"""Adapted layer kinds, one class per base kind, and the registry choosing one for a module.

| base module | layer kind |
|---|---|
| bitsandbytes 4-bit `Linear4bit` (QLoRA) | `LoraLinear4bit` |
| `nn.Linear` (plain forward), transformers' GPT-2 `Conv1D` | `LoraLinear` |
| `nn.Embedding` | `LoraEmbedding` |
| `nn.Conv1d/2d/3d` | `LoraConv` |
| transformers mixture-of-experts experts module (3-D expert weights) | `LoraExperts` |

`KINDS` is checked in order; `register_kind` adds a kind in front (docs/architecture.md).
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from ..ops.nf4 import is_quantized_linear
from .base import LoraLayer
from .conv import LoraConv
from .embedding import LoraEmbedding
from .experts import LoraExperts, is_experts
from .linear import LoraLinear, SliceSpec, is_conv1d
from .linear4bit import LoraLinear4bit
from .save import ModulesToSave


def _plain_linear(module: nn.Module) -> bool:
    if isinstance(module, nn.modules.linear.NonDynamicallyQuantizableLinear):
        return False  # nn.MultiheadAttention reads out_proj.weight directly: a wrapper would be bypassed
    return type(module) is nn.Linear or is_conv1d(module) or (
        isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward)


# (matches a base module, the LoraLayer class that adapts it); the first match wins
KINDS: list[tuple[Callable[[nn.Module], bool], type[LoraLayer] | None]] = [
    (is_quantized_linear, LoraLinear4bit),  # before nn.Linear: bitsandbytes' Linear4bit subclasses it
    (lambda m: type(m).__module__.startswith("bitsandbytes"), None),  # other bitsandbytes layers: unsupported
    (_plain_linear, LoraLinear),
    (lambda m: isinstance(m, nn.Embedding), LoraEmbedding),
    (lambda m: isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)), LoraConv),
    (is_experts, LoraExperts),  # selected through target_parameters (lorakit.inject.plan)
]


def register_kind(matches: Callable[[nn.Module], bool], cls: type[LoraLayer]) -> None:
    """Adapt base modules for which `matches(module)` is true with `cls` (checked before the built-in kinds)."""
    KINDS.insert(0, (matches, cls))


def wrapper_for(module: nn.Module) -> type[LoraLayer] | None:
    """The `LoraLayer` subclass that adapts `module`, or None if its type is unsupported."""
    for matches, cls in KINDS:
        if matches(module):
            return cls
    return None


def is_linear_like(module: nn.Module) -> bool:
    """Linear, GPT-2 Conv1D or 4-bit Linear (what `"all-linear"` selects), adapted or not."""
    if isinstance(module, LoraLayer):
        module = module.base_layer
    cls = wrapper_for(module)
    return cls is not None and issubclass(cls, LoraLinear)  # LoraLinear4bit too


__all__ = ["LoraLayer", "LoraLinear", "LoraLinear4bit", "LoraEmbedding", "LoraConv", "LoraExperts", "ModulesToSave",
           "SliceSpec",
           "KINDS", "register_kind", "wrapper_for", "is_conv1d", "is_linear_like"]
