"""LoRA on `nn.Linear` and on transformers' GPT-2 `Conv1D` (weight stored `(in, out)`)."""

from __future__ import annotations

import sys

import torch
from torch import nn

from ..ops import lora as ops
from ..ops.fused import lora_linear
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
    One active plain adapter on a plain linear base runs as one autograd node
    (`lorakit.ops.fused`).
    """

    supported_variants = ("lora", "dora")

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.fan_in_fan_out = is_conv1d(base_layer)
        self.slices: dict[str, SliceSpec] = {}
        # The one adapter the fused fast path computes, chosen when the active set changes,
        # so that forward does no per-call selection.
        self._fused: str | None = None
        self._plain_base = type(base_layer) is nn.Linear or self.fan_in_fan_out

    @classmethod
    def features(cls, base: nn.Module) -> tuple[int, int]:
        w = base.weight
        return (w.shape[0], w.shape[1]) if is_conv1d(base) else (w.shape[1], w.shape[0])

    @classmethod
    def shapes(cls, base: nn.Module, r: int, slices: "SliceSpec | None" = None):
        in_f, out_f = cls.features(base)
        if slices is None:
            return (r, in_f), (out_f, r)
        return (r * slices.k, in_f), (slices.rows.numel(), r)

    def _refresh(self) -> None:
        super()._refresh()
        names = self._forward_adapters
        self._fused = names[0] if (
            len(names) == 1 and self._plain_base and self.variants[names[0]].fuses and names[0] not in self.slices
            and names[0] not in self.lora_B_bias
        ) else None

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        name = self._fused
        if name is None or self._mixed is not None or args or kwargs or torch.is_autocast_enabled(x.device.type):
            # autocast: the fused node's in-place accumulation would mix the autocast and adapter dtypes
            return super().forward(x, *args, **kwargs)
        table_a, table_b, base = self._tables
        A, w = table_a[name], base["weight"]
        if x.dtype != A.dtype or w.dtype != A.dtype:
            return super().forward(x)
        return lora_linear(
            x, w.T if self.fan_in_fan_out else w, base.get("bias"), A, table_b[name], self.scaling[name],
            self.lora_dropout[name] if self.training else 0.0,
        )

    # ---- per-slice adapters on fused projections (loralib's MergedLinear)
    def set_slices(self, name: str, slices) -> None:
        self.slices[name] = SliceSpec.resolve(slices, self.out_features, self.weight.device)

    def slice_spec(self, name: str) -> "SliceSpec | None":
        return self.slices.get(name)

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        self.slices.pop(name, None)

    def lora_B_dense(self, name: str) -> torch.Tensor:
        """B as a `(out_features, r * k)` block-diagonal matrix (just B when not sliced); differentiable."""
        spec = self.slices.get(name)
        return self.lora_B[name] if spec is None else spec.dense(self.lora_B[name], self.out_features)

    def lora_factors(self, name: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        A, B = self.lora_A[name], self.lora_B_dense(name)
        if A.dtype.itemsize < x.dtype.itemsize and x.dtype.is_floating_point:
            # a narrower adapter (a frozen bf16 correction, lorakit.quant.qera) on a wider input: compute in the
            # input's dtype, as the same tensors would once folded into a float32 adapter
            A, B = A.to(x.dtype), B.to(x.dtype)
        return A, B

    def delta_weight(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        delta = ops.delta_weight(self.lora_A[name], self.lora_B_dense(name), self.scaling[name], dtype or torch.float32)
        return delta.T if self.fan_in_fan_out else delta

    def to_oi(self, w: torch.Tensor) -> torch.Tensor:
        return w.T if self.fan_in_fan_out else w

    def from_oi(self, w: torch.Tensor) -> torch.Tensor:
        return w.T if self.fan_in_fan_out else w

    def add_lora_mixed(self, result: torch.Tensor, x: torch.Tensor, rows) -> torch.Tensor:
        """Each row `b` adds `B[slot_b] A[slot_b] x_b`: two gathered batched products, or for
        short inputs and few adapters two masked dense products (see `lorakit.layers.rows`)."""
        batch = rows.check(x)
        h = x.reshape(batch, -1, x.shape[-1]).to(rows.A.dtype)
        if rows.dense(h.shape[1]):
            delta = ops.masked_low_rank(h, rows.A_cat, rows.B_cat, rows.row_mask)
        else:
            delta = ops.rowwise_low_rank(h, rows.A, rows.B, rows.index)
        return result + delta.reshape(result.shape).to(result.dtype)


class SliceSpec:
    """Where each row of a compact per-slice B goes.

    For `k` enabled slices of rank `r`, A is `(r * k, in)` (slice `j` owns rows
    `j*r:(j+1)*r`) and the compact B is `(sum of enabled slice sizes, r)`; compact
    row `i` lands in output row `rows[i]` and rank block `block[i]` of the dense
    `(out, k, r)` B, which is zero elsewhere.
    """

    def __init__(self, sizes: list[int], enable: list[bool], device):
        self.sizes, self.enable = list(sizes), list(enable)
        self.k = sum(enable)
        rows, block, start, j = [], [], 0, 0
        for size, on in zip(sizes, enable):
            if on:
                rows.extend(range(start, start + size))
                block.extend([j] * size)
                j += 1
            start += size
        self.rows = torch.tensor(rows, dtype=torch.long, device=device)
        self.block = torch.tensor(block, dtype=torch.long, device=device)

    @classmethod
    def resolve(cls, slices, out_features: int, device) -> "SliceSpec":
        sizes, enable = slices
        if sizes is None:
            if out_features % len(enable):
                raise ValueError(f"{out_features} output features do not split into {len(enable)} equal slices")
            sizes = [out_features // len(enable)] * len(enable)
        if sum(sizes) != out_features:
            raise ValueError(f"slice sizes {sizes} sum to {sum(sizes)}, not the layer's {out_features} output features")
        return cls(sizes, enable, device)

    def as_dict(self) -> dict:
        return {"sizes": self.sizes, "enable": self.enable}

    def dense(self, compact: torch.Tensor, out_features: int) -> torch.Tensor:
        """`(out_features, k * r)` block-diagonal B from the compact `(rows, r)` one."""
        r = compact.shape[1]
        dense = compact.new_zeros(out_features, self.k, r).index_put((self.rows, self.block), compact)
        return dense.reshape(out_features, self.k * r)

    def compact(self, dense: torch.Tensor) -> torch.Tensor:
        """Inverse of `dense`; raises ValueError if `dense` is non-zero outside the slice blocks."""
        out_features, r = dense.shape[0], dense.shape[1] // self.k
        compact = dense.reshape(out_features, self.k, r)[self.rows, self.block]
        if not torch.equal(self.dense(compact, out_features), dense):
            raise ValueError("B is non-zero outside the enabled slices' blocks")
        return compact
