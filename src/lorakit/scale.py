"""Adapter strength at inference: each adapter's scaling times a factor, exactly reversible.

    lk.set_scale(model, "default", 0.5)     # half strength; 0: the base model; 1: as trained
    with lk.adapter_scale(model, 0.25):      # the active adapters at a quarter of their current strength
        ...

The factor multiplies the configured scaling (`alpha / r`, or `alpha / sqrt(r)` with rsLoRA,
Kalajdzievski 2023, arXiv:2312.03732); it is never recomputed from `alpha / r`. Merged adapters are
merged again from the saved `W0`, so `merge` and `merge_and_unload` honour the factor. Files hold the
adapter as trained (PEFT's `set_scale` is not saved either); `save_adapter` warns when a factor is set.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterable, Iterator

from torch import nn

from .errors import LoraError
from .state import get_state, lora_layers, require_adapter


def _check(scale: float) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise LoraError(f"adapter scale must be a finite number, got {scale!r}")
    return float(scale)


def set_scale(model: nn.Module, adapter: str, scale: float) -> None:
    """Set adapter `adapter`'s strength to `scale` times its configured scaling, on every layer.

    Raises:
        AdapterNotFoundError: unknown adapter.
        LoraError: `scale` is not a finite number.
    """
    require_adapter(model, adapter)
    scale = _check(scale)
    for _, layer in lora_layers(model):
        layer.set_scale(adapter, scale)


@contextlib.contextmanager
def adapter_scale(model: nn.Module, scale: float, adapters: str | Iterable[str] | None = None) -> Iterator[nn.Module]:
    """Inside the block, `adapters` (default: the active ones) run at `scale` times their current strength;
    on exit every layer's scaling is exactly what it was (PEFT's `rescale_adapter_scale`)."""
    scale = _check(scale)
    if adapters is None:
        names = list(get_state(model).active)
    else:
        names = [adapters] if isinstance(adapters, str) else list(adapters)
    for n in names:
        require_adapter(model, n)
    saved = [(layer, n, layer.scale_factor[n]) for _, layer in lora_layers(model) for n in names if n in layer.lora_A]
    try:
        for layer, n, factor in saved:
            layer.set_scale(n, factor * scale)
        yield model
    finally:
        for layer, n, factor in saved:
            layer.set_scale(n, factor)


def scaled_adapters(model: nn.Module, adapter: str) -> list[str]:
    """Paths of the layers where `adapter` runs at a strength other than its configured one."""
    return [p for p, layer in lora_layers(model) if layer.scale_factor.get(adapter, 1.0) != 1.0]


__all__ = ["set_scale", "adapter_scale", "scaled_adapters"]
