"""Plain LoRA (Hu et al. 2021, arXiv:2106.09685, eq. 3): `h = W0 x + scaling * B A x`."""

from __future__ import annotations

import torch

from .base import AdaptedLayer, Variant


class LoraVariant(Variant):
    """The plain LoRA strategy: the layer's own low-rank term and `delta_weight`."""

    name = "lora"
    fuses = True

    def forward(self, layer: AdaptedLayer, adapter: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        return layer.add_lora(result, adapter, x)

    def merged_weight(self, layer: AdaptedLayer, adapter: str, weight: torch.Tensor) -> torch.Tensor:
        # in place: one (out, in) buffer; a + b == b + a exactly
        return layer.delta_weight(adapter, weight.dtype).add_(weight)
