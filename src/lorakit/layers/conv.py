"""LoRA on `nn.Conv1d` / `nn.Conv2d` / `nn.Conv3d`, grouped convolutions included."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import lora as ops
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

    @classmethod
    def features(cls, base: nn.Module) -> tuple[int, int]:
        return base.in_channels, base.out_channels

    @classmethod
    def shapes(cls, base: nn.Module, r: int, slices=None):
        w = base.weight
        ones = (1,) * (w.dim() - 2)
        return (r, *w.shape[1:]), (base.out_channels, r // base.groups, *ones)

    @staticmethod
    def check_rank(module: nn.Module, r: int) -> str | None:
        if r % module.groups:
            return f"rank {r} is not a multiple of the convolution's groups={module.groups}"
        return None

    def delta_weight(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        A, B = self.lora_A[name], self.lora_B[name]
        delta = ops.delta_weight(A.reshape(A.shape[0], -1), B.reshape(B.shape[0], -1), self.scaling[name],
                                 dtype or torch.float32, groups=self.groups)
        return delta.reshape(self.weight.shape)

    def project_A(self, h: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
        """A shares every geometric setting of the base conv (incl. padding mode)."""
        return self.base_layer._conv_forward(h, A, None)

    def project_B(self, xa: torch.Tensor, B: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """B is a grouped 1x1 convolution (with `lora_bias`, its bias)."""
        return _CONV_FN[B.dim() - 2](xa, B, bias, 1, 0, 1, self.groups)

    def to_oi(self, w: torch.Tensor) -> torch.Tensor:  # (out, in/groups * kernel...)
        return w.reshape(w.shape[0], -1)

    def from_oi(self, w: torch.Tensor) -> torch.Tensor:
        return w.reshape(self.weight.shape)
