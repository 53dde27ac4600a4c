"""LoRA on `nn.Linear` and on transformers' GPT-2 `Conv1D` (weight stored `(in, out)`)."""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn

from .base import LoraLayer


def is_conv1d(module: nn.Module) -> bool:
    """True for transformers' `Conv1D` (a linear layer whose weight is `(in_features, out_features)`)."""
    utils = sys.modules.get("transformers.pytorch_utils")
    conv1d = getattr(utils, "Conv1D", None) if utils is not None else None
    return conv1d is not None and isinstance(module, conv1d)


class LoraLinear(LoraLayer):
    """`h = base(x) + scaling * B (A dropout(x))` (paper eq. 3) for a linear base layer.

    Shapes: `x: (..., in_features)`, `A: (r, in_features)`, `B: (out_features, r)`,
    output `(..., out_features)`. For a `Conv1D` base (`fan_in_fan_out`), the base
    weight is `(in_features, out_features)` and `delta_weight` is returned in that layout.
    """

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.fan_in_fan_out = is_conv1d(base_layer)

    @property
    def in_features(self) -> int:
        return self.weight.shape[0 if self.fan_in_fan_out else 1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[1 if self.fan_in_fan_out else 0]

    def delta_weight(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        dtype = dtype or torch.float32
        delta = (self.lora_B[name].to(dtype) @ self.lora_A[name].to(dtype)) * self.scaling[name]
        return delta.T if self.fan_in_fan_out else delta

    def add_lora(self, result: torch.Tensor, name: str, x: torch.Tensor) -> torch.Tensor:
        A, B = self.lora_A[name], self.lora_B[name]
        h = x.to(A.dtype)
        p = self.lora_dropout[name]
        if p and self.training:
            h = F.dropout(h, p, True)
        xa = h @ A.T  # (..., r): computed once, the only O(in * r) work
        if result.dtype == B.dtype:
            # accumulate straight into the base output: one fused GEMM + add
            out = torch.addmm(result.reshape(-1, result.shape[-1]), xa.reshape(-1, xa.shape[-1]), B.T, alpha=self.scaling[name])
            return out.view(result.shape)
        return result + (xa @ B.T * self.scaling[name]).to(result.dtype)
