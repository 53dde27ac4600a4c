"""LoRA on `nn.Conv1d` / `nn.Conv2d` / `nn.Conv3d`, grouped convolutions included."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import LoraLayer

_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class LoraConv(LoraLayer):
    """`h = conv(x; W0) + scaling * conv1x1(conv(dropout(x); A); B)`.

    A is a convolution with the base layer's kernel, stride, padding, dilation,
    padding mode and groups, from `in_channels` to `r` channels; B is a 1x1
    convolution from `r` to `out_channels` with the same groups. Shapes (2-D):
    `A: (r, in_channels / groups, kh, kw)`, `B: (out_channels, r / groups, 1, 1)`;
    the update of group `j` is `B_j @ A_j`, exactly the shape of the base weight's
    group block, so grouped convolutions merge exactly (PEFT uses a dense A there
    and cannot merge). For `groups == 1` the tensors are PEFT's `lora_A.weight` /
    `lora_B.weight`. `r` must be a multiple of `groups`.
    """

    @property
    def groups(self) -> int:
        return self.base_layer.groups

    @property
    def in_features(self) -> int:
        return self.base_layer.in_channels

    @property
    def out_features(self) -> int:
        return self.base_layer.out_channels

    @staticmethod
    def check_rank(module: nn.Module, r: int) -> str | None:
        if r % module.groups:
            return f"rank {r} is not a multiple of the convolution's groups={module.groups}"
        return None

    def lora_shapes(self, r: int, slices=None):
        w = self.weight
        ones = (1,) * (w.dim() - 2)
        return (r, *w.shape[1:]), (self.out_features, r // self.groups, *ones)

    def delta_weight(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        dtype = dtype or torch.float32
        A, B, g = self.lora_A[name].to(dtype), self.lora_B[name].to(dtype), self.groups
        r = A.shape[0]
        a = A.reshape(g, r // g, -1)  # (g, r/g, in/g * k...)
        b = B.reshape(g, self.out_features // g, r // g)  # (g, out/g, r/g)
        delta = torch.bmm(b, a).reshape(self.weight.shape)
        return delta.mul_(self.scaling[name])

    def to_oi(self, w: torch.Tensor) -> torch.Tensor:  # (out, in/groups * kernel...)
        return w.reshape(w.shape[0], -1)

    def from_oi(self, w: torch.Tensor) -> torch.Tensor:
        return w.reshape(self.weight.shape)

    def add_lora(self, result: torch.Tensor, name: str, x: torch.Tensor) -> torch.Tensor:
        A, B = self.lora_A[name], self.lora_B[name]
        h = x.to(A.dtype)
        p = self.lora_dropout[name]
        if p and self.training:
            h = F.dropout(h, p, True)
        # A shares every geometric setting of the base conv (incl. padding mode);
        # B is a grouped 1x1 conv.
        h = self.base_layer._conv_forward(h, A, None)
        h = _CONV_FN[A.dim() - 2](h, B, None, 1, 0, 1, self.groups)
        return result + (h * self.scaling[name]).to(result.dtype)
