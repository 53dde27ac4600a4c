"""Adapted layer kinds and the rule choosing one for a module."""

from __future__ import annotations

from torch import nn

from .base import LoraLayer
from .conv import LoraConv
from .embedding import LoraEmbedding
from .linear import LoraLinear, is_conv1d
from .save import ModulesToSave


def wrapper_for(module: nn.Module) -> type[LoraLayer] | None:
    """The `LoraLayer` subclass that adapts `module`, or None if its type is unsupported."""
    if isinstance(module, nn.modules.linear.NonDynamicallyQuantizableLinear):
        return None  # nn.MultiheadAttention reads out_proj.weight directly: a wrapper would be bypassed
    if type(module).__module__.startswith("bitsandbytes"):
        from ..quant.nf4 import is_quantized_linear  # bitsandbytes itself is not imported here

        if is_quantized_linear(module):  # 4-bit NF4 base (QLoRA): lorakit.quant.layer
            from ..quant.layer import LoraLinear4bit

            return LoraLinear4bit
        return None
    if type(module) is nn.Linear or is_conv1d(module) or (isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward):
        return LoraLinear
    if isinstance(module, nn.Embedding):
        return LoraEmbedding
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return LoraConv
    return None


def is_linear_like(module: nn.Module) -> bool:
    """Linear, GPT-2 Conv1D or 4-bit Linear (what `"all-linear"` selects), adapted or not."""
    if isinstance(module, LoraLayer):
        module = module.base_layer
    cls = wrapper_for(module)
    return cls is not None and issubclass(cls, LoraLinear)  # LoraLinear4bit too


__all__ = ["LoraLayer", "LoraLinear", "LoraEmbedding", "LoraConv", "ModulesToSave", "wrapper_for", "is_conv1d", "is_linear_like"]
