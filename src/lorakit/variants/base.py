"""What a variant is, and the part of a layer it may use.

A variant (plain LoRA, DoRA, ...) is a stateless strategy shared by every layer that
uses it: how an adapter's extra tensors are created, how it runs forward and how it
merges. It works through `AdaptedLayer`, the protocol every `lorakit.layers.LoraLayer`
implements, and touches nothing else of the layer. Per-adapter tensors a variant adds
live in a layer table (`layer.adapter_table(name)`), inference caches in
`layer.variant_cache` (dropped on `train()`/`eval()` and when the layer moves or is cast).
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn


class AdaptedLayer(Protocol):
    """What a variant may read from and do to a layer (implemented by `lorakit.layers.LoraLayer`)."""

    base_layer: nn.Module
    lora_A: nn.ParameterDict  # adapter -> A: (r, in_features) (conv: the kernel dims too)
    lora_B: nn.ParameterDict  # adapter -> B: (out_features, r)
    r: dict[str, int]
    scaling: dict[str, float]
    variant_cache: dict

    @property
    def weight(self) -> torch.Tensor:
        """The base weight as it stands (merged adapters included while merged)."""

    @property
    def out_features(self) -> int: ...

    @property
    def bias(self) -> torch.Tensor | None: ...

    def unmerged_weight(self) -> torch.Tensor:
        """`W0`, the base weight without merged adapters, in the base layout (no grad)."""

    def delta_weight(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor: ...

    def to_oi(self, w: torch.Tensor) -> torch.Tensor:
        """A tensor in the base weight's layout as the `(out_features, in_features)` matrix."""

    def from_oi(self, w: torch.Tensor) -> torch.Tensor: ...

    def lora_input(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """`dropout(x)` while training with dropout, else `x` itself (the same object)."""

    def lora_output(self, name: str, h: torch.Tensor) -> torch.Tensor:
        """`scaling * B (A h)` for an already dropped-out input `h`."""

    def add_lora(self, result: torch.Tensor, name: str, x: torch.Tensor) -> torch.Tensor:
        """`result + scaling * B (A dropout(x))`."""

    def base_output(self, h: torch.Tensor) -> torch.Tensor:
        """The base layer's output for `h` without its bias."""

    def adapter_table(self, table: str) -> nn.ParameterDict:
        """The layer's per-adapter tensor table `table` (created empty on first use)."""

    def unmerge(self) -> None: ...


class Variant:
    """Base class of variants. Subclasses set `name` and override what differs from plain LoRA.

    `fuses`: the layer may run this variant's forward as the fused fast path
    (`lorakit.ops.fused`), which computes plain LoRA only.
    """

    name = ""
    fuses = False

    def init(self, layer: AdaptedLayer, adapter: str) -> None:
        """Create the variant's extra per-adapter tensors (none by default)."""

    def parameters(self, layer: AdaptedLayer, adapter: str) -> dict[str, nn.Parameter]:
        """Extra trainable tensors beyond A and B, by PEFT attribute name."""
        return {}

    def delete(self, layer: AdaptedLayer, adapter: str) -> None:
        """Drop what `init` created."""

    def forward(self, layer: AdaptedLayer, adapter: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """`result` (the base output, plus adapters applied before) with this adapter applied."""
        raise NotImplementedError

    def merged_weight(self, layer: AdaptedLayer, adapter: str, weight: torch.Tensor) -> torch.Tensor:
        """`weight` (base layout, accumulation dtype) with this adapter folded in (paper §4.2)."""
        raise NotImplementedError
