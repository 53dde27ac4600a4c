"""Plain LoRA (Hu et al. 2021, arXiv:2106.09685, eq. 3): `h = W0 x + scaling * B A x`."""

from __future__ import annotations

import torch
from torch import nn


class LoraVariant:
    """The plain LoRA strategy; the base class of other variants."""

    name = "lora"

    def init(self, layer, adapter: str) -> None:
        """Create any extra per-adapter state (none for plain LoRA)."""

    def parameters(self, layer, adapter: str) -> dict[str, nn.Parameter]:
        """Extra trainable tensors beyond A and B, by PEFT attribute name."""
        return {}

    def delete(self, layer, adapter: str) -> None:
        """Drop the extra state created by `init`."""

    def forward(self, layer, adapter: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        return layer.add_lora(result, adapter, x)

    def merged_weight(self, layer, adapter: str, weight: torch.Tensor) -> torch.Tensor:
        """`W + delta_weight` with `weight` in the accumulation dtype (paper §4.2)."""
        return layer.delta_weight(adapter, weight.dtype).add_(weight)  # in place: one (out, in) buffer; a + b == b + a exactly
