"""`LoraLinear4bit`: LoRA on a frozen 4-bit NF4 linear layer (QLoRA, Dettmers et al. 2023, arXiv:2305.14314, §3 eq. 5).

    h = dequant(W0_NF4) x + b + scaling * B (A dropout(x))      x: (..., in_features)

The base layer is a bitsandbytes `Linear4bit` (made by `lorakit.quantize`, or by
transformers' `BitsAndBytesConfig`); it dequantizes `W0` block by block and
multiplies in its `compute_dtype`. `A: (r, in_features)` and `B: (out_features, r)`
are float32 by default (paper: adapters in 16/32-bit), so gradients flow through the
frozen 4-bit weight to the input and to A and B.

Merging (paper §4.2 made exact, lorakit's rule). The 4-bit original is never
changed and never reconstructed by subtraction:

- `merge`: the merged weight `dequant(W0) + sum(delta_weight)` is computed in float32
  from the packed original and rounded once, into a dense weight in `merge_dtype`
  (default: the dtype the layer was quantized from) that the forward then uses; with
  `merge_requantize = True` it is re-quantized to NF4 instead and the layer's packed
  weight is swapped for it.
- `unmerge`: drops the dense weight, or puts the original packed `Params4bit` object
  (codes and constants untouched) back: bit for bit.
- `to_merged_module`: the plain module for `merge_and_unload` (an `nn.Linear` in
  `dtype`, or a re-quantized `Linear4bit`), with the rounding error of what was written;
  `plain_base` makes a 4-bit layer without adapter dense (`merge_and_unload` does, so that
  the merged model is plain; `lorakit.quant.merge_quantized` has the options).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.nf4 import dequantize_weight, guard_cpu_repack, make_linear4bit, quantize_weight
from .linear import LoraLinear


@dataclass
class MergeStats:
    """Rounding error of one merged layer, float32 sums over its `(out, in)` weight.

    `exact = dequant(W0) + sum(delta_weight)` in float32; `written` is what the merged
    module holds (dequantized again when re-quantized).
    """

    numel: int
    sq_error: float  # sum((written - exact)^2)
    max_abs_error: float
    sq_delta: float  # sum(delta^2): how large the adapters' update is
    sq_weight: float  # sum(exact^2)
    requantized: bool
    dtype: str


class LoraLinear4bit(LoraLinear):
    """LoRA on a bitsandbytes 4-bit (NF4) `Linear4bit` base; see the module docstring.

    Attributes (beyond `LoraLinear`'s):
        merge_dtype: dtype of the dense merged weight (None: the dtype the base was
            quantized from, `base_layer.weight.quant_state.dtype`).
        merge_requantize: `merge` re-quantizes the merged weight to NF4 instead of
            holding a dense one (default False).
    The `weight` property is the dequantized original `W0`, `(out_features, in_features)`,
    float32 (what DoRA's norm and weight-derived code read), recomputed on each access.
    """

    supported_variants = ("lora", "dora")

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        guard_cpu_repack(base_layer)
        self._merged_dense: torch.Tensor | None = None
        self._packed_original: nn.Parameter | None = None
        self.merge_dtype: torch.dtype | None = None
        self.merge_requantize = False

    # ------------------------------------------------------------------ shapes and weights
    @classmethod
    def features(cls, base: nn.Module) -> tuple[int, int]:
        return base.in_features, base.out_features

    @property
    def _packed(self) -> nn.Parameter:
        """The original packed weight (also while a re-quantized merge is swapped in)."""
        return self._packed_original if self._packed_original is not None else self.base_layer.weight

    @property
    def weight(self) -> torch.Tensor:
        return dequantize_weight(self._packed, torch.float32)

    @property
    def original_dtype(self) -> torch.dtype:
        """The dtype the base weight was quantized from."""
        return self._packed.quant_state.dtype

    def _set_packed(self, param: nn.Parameter) -> None:
        param.module = self.base_layer
        self.base_layer.weight = param
        self.base_layer.quant_state = param.quant_state

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        dense = self._merged_dense
        if dense is None:
            result = self.base_layer(x, *args, **kwargs)
        else:
            bias = self.base_layer.bias
            result = F.linear(x.to(dense.dtype), dense, None if bias is None else bias.to(dense.dtype)).to(x.dtype)
        if self._mixed is not None:
            return self.add_lora_mixed(result, x, self._mixed) if self._mixed.A is not None else result
        for name in self._forward_adapters:
            result = self.variants[name].forward(self, name, x, result)
        return result

    # ------------------------------------------------------------------ merge
    def merged_weight(self, names) -> torch.Tensor:
        """`dequant(W0) + sum(delta_weight)` for `names`, float32 `(out, in)`, not rounded (from the packed `W0`)."""
        acc = self.weight
        for n in names:
            acc = self.variants[n].merged_weight(self, n, acc)
        return acc

    def merge(self, names=None) -> None:
        """Fold adapters (default: the active ones) into the layer (module docstring). Merging twice is a no-op."""
        new = self.to_merge(names)
        if not new:
            return
        self.check_bias_merge(new)
        merged = self.merged_adapters + new
        with torch.no_grad():
            exact = self.merged_weight(merged)
            if self.merge_requantize:
                state = self._packed.quant_state
                param = quantize_weight(exact, double_quant=bool(state.nested), blocksize=state.blocksize,
                                        quant_type=state.quant_type)
                param.quant_state.dtype = state.dtype
                if self._packed_original is None:
                    self._packed_original = self.base_layer.weight
                self._set_packed(param)
                self._merged_dense = None
            else:
                self._merged_dense = exact.to(self.merge_dtype or self.original_dtype)
        self._merge_bias(merged)  # in place in the base's (float) bias, the original kept
        self.merged_adapters = merged
        self._refresh()

    def unmerge(self) -> None:
        """Back to the original packed weight, bit for bit (the same `Params4bit` object); no-op if none merged."""
        if not self.merged_adapters:
            return
        if self._packed_original is not None:
            self._set_packed(self._packed_original)
            self._packed_original = None
        self._merged_dense = None
        if self._bias_backup is not None:
            with torch.no_grad():
                self.base_layer.bias.copy_(self._bias_backup)
            self._bias_backup = None
        self.merged_adapters = ()
        self._refresh()

    def to_merged_module(self, names, dtype: torch.dtype | None = None,
                         requantize: bool = False) -> tuple[nn.Module, MergeStats]:
        """A plain module computing `dequant(W0) + sum(delta_weight)` for `names`, and its rounding error.

        `requantize=False`: an `nn.Linear` with the merged weight rounded once into
        `dtype` (default: `merge_dtype`, else the dtype the base was quantized from);
        the bias is cast to `dtype`. `requantize=True`: a guarded bitsandbytes
        `Linear4bit` with the merged weight re-quantized to NF4 (same block size,
        double quantization and compute dtype as the base). The layer is not changed.
        """
        base = self.base_layer
        state = self._packed.quant_state
        self.check_bias_merge(names)
        with torch.no_grad():
            w0 = self.weight
            exact = self.merged_weight(names)
            bias = self.merged_bias(names)  # None: the base bias (shared) as it is
            if bias is None and self._bias_backup is not None:
                bias = self._bias_backup.clone()  # this layer is merged now: the module gets the unmerged bias
            if requantize:
                module = make_linear4bit(base, weight=exact, double_quant=bool(state.nested), blocksize=state.blocksize,
                                         compute_dtype=base.compute_dtype, quant_type=state.quant_type)
                module.weight.quant_state.dtype = state.dtype
                if bias is not None:
                    module.bias = nn.Parameter(bias, requires_grad=False)
                written = dequantize_weight(module, torch.float32)
                out_dtype = "nf4"
            else:
                dtype = dtype or self.merge_dtype or self.original_dtype
                module = nn.Linear(self.in_features, self.out_features, bias=base.bias is not None, device="meta")
                module.weight = nn.Parameter(exact.to(dtype), requires_grad=False)
                if base.bias is not None:
                    b = base.bias if bias is None else nn.Parameter(bias, requires_grad=False)
                    if b.dtype != dtype:
                        b = nn.Parameter(b.detach().to(dtype), requires_grad=b.requires_grad)
                    module.bias = b
                module.train(base.training)
                written = module.weight.float()
                out_dtype = str(dtype).replace("torch.", "")
            err = written - exact
            delta = exact - w0
            stats = MergeStats(
                numel=exact.numel(), sq_error=float(err.double().square().sum()), max_abs_error=float(err.abs().max()),
                sq_delta=float(delta.double().square().sum()), sq_weight=float(exact.double().square().sum()),
                requantized=requantize, dtype=out_dtype,
            )
        return module, stats

    def merged_module(self, names) -> nn.Module:
        names = list(names)
        if not names:
            self.unmerge()
            return dense_linear(self.base_layer)
        return self.to_merged_module(names)[0]

    @staticmethod
    def plain_base(module: nn.Module) -> nn.Module:
        return dense_linear(module)

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        if self._merged_dense is not None:
            self._merged_dense = fn(self._merged_dense)
        if self._packed_original is not None:
            self._packed_original = fn(self._packed_original)
        return out


def dense_linear(module: nn.Module, dtype: torch.dtype | None = None) -> nn.Linear:
    """An `nn.Linear` with the dequantized weight of 4-bit `module` in `dtype` (default: the dtype quantized from)."""
    dtype = dtype or module.weight.quant_state.dtype
    lin = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
    lin.weight = nn.Parameter(dequantize_weight(module, dtype), requires_grad=False)
    if module.bias is not None:
        b = module.bias
        lin.bias = b if b.dtype == dtype else nn.Parameter(b.detach().to(dtype), requires_grad=b.requires_grad)
    lin.train(module.training)
    return lin
