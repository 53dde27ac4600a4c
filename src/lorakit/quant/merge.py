"""Merging LoRA adapters into a 4-bit base: dequantize, add `delta_weight` in float32, write once.

`lorakit.merge_and_unload` gives the same model as `merge_quantized` with its defaults;
call this for the options (`dtype`, `requantize`) and the rounding report.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..layers import LoraLinear4bit
from ..layers.linear4bit import dense_linear
from ..merge import drop_quantization_config, merge_and_unload
from ..ops.nf4 import quantized_layers
from ..state import get_state, lora_layers, replace_module, unwrap


@dataclass
class MergeReport:
    """Rounding error of a QLoRA merge, over every merged 4-bit layer.

    For each layer `exact = dequant(W0) + sum(delta_weight)` (float32) and `written`
    is the weight the merged model holds (rounded once into `dtype`, or re-quantized to
    NF4 and dequantized again). Errors are in weight units.

    Attributes:
        layers: merged LoRA layers; `dequantized`: 4-bit layers without an adapter made dense.
        numel: weights in the merged layers.
        max_abs_error: `max |written - exact|`.
        rms_error: `sqrt(mean((written - exact)^2))`.
        delta_rms: `sqrt(mean(delta^2))`, the size of the adapters' update. With
            `requantize=True`, `rms_error` comparable to `delta_rms` means the update is
            largely lost to NF4 rounding.
        weight_rms: `sqrt(mean(exact^2))`.
        requantized: whether the merged weights were re-quantized to NF4.
        dtype: dtype written (`"nf4"` when re-quantized).
        per_layer: path -> `{"max_abs_error", "rms_error", "delta_rms"}`.
    """

    layers: int = 0
    dequantized: int = 0
    numel: int = 0
    max_abs_error: float = 0.0
    sq_error: float = 0.0
    sq_delta: float = 0.0
    sq_weight: float = 0.0
    requantized: bool = False
    dtype: str | None = None
    per_layer: dict[str, dict[str, float]] = field(default_factory=dict)

    def add(self, path: str, stats) -> None:
        self.layers += 1
        self.numel += stats.numel
        self.max_abs_error = max(self.max_abs_error, stats.max_abs_error)
        self.sq_error += stats.sq_error
        self.sq_delta += stats.sq_delta
        self.sq_weight += stats.sq_weight
        self.dtype = stats.dtype
        n = max(stats.numel, 1)
        self.per_layer[path] = {"max_abs_error": stats.max_abs_error, "rms_error": math.sqrt(stats.sq_error / n),
                                "delta_rms": math.sqrt(stats.sq_delta / n)}

    @property
    def rms_error(self) -> float:
        return math.sqrt(self.sq_error / self.numel) if self.numel else 0.0

    @property
    def delta_rms(self) -> float:
        return math.sqrt(self.sq_delta / self.numel) if self.numel else 0.0

    @property
    def weight_rms(self) -> float:
        return math.sqrt(self.sq_weight / self.numel) if self.numel else 0.0

    def as_dict(self) -> dict:
        return {"layers": self.layers, "dequantized_layers": self.dequantized, "numel": self.numel,
                "max_abs_error": self.max_abs_error, "rms_error": self.rms_error, "delta_rms": self.delta_rms,
                "weight_rms": self.weight_rms, "requantized": self.requantized, "dtype": self.dtype}


def merge_quantized(model: nn.Module, *, dtype: torch.dtype | None = None,
                    requantize: bool = False) -> tuple[nn.Module, MergeReport]:
    """`merge_and_unload` for a model with 4-bit LoRA layers, with the rounding report.

    Every 4-bit LoRA layer with an active adapter becomes, from its packed original:
    `requantize=False` (default): an `nn.Linear` with `dequant(W0) + sum(delta_weight)`
    computed in float32 and rounded once into `dtype` (default: the dtype the layer was
    quantized from, float32 or bf16); every other 4-bit layer is dequantized into an
    `nn.Linear` too, so the result is a plain dense model of the base architecture (a
    transformers model's `quantization_config` is dropped). `requantize=True`: the
    merged weights are re-quantized to NF4 (`Linear4bit`, same format) and the other
    4-bit layers stay as they are. Other adapted layers and `modules_to_save` are
    handled as by `lorakit.merge_and_unload`.

    Returns:
        `(model, report)`: the model (same object, adapters removed) and a `MergeReport`.
    """
    inner = unwrap(model)
    names = get_state(inner).active
    report = MergeReport(requantized=requantize)
    for path, layer in list(lora_layers(inner)):
        if not isinstance(layer, LoraLinear4bit):
            continue
        use = [n for n in names if n in layer.lora_A]
        if use:
            module, stats = layer.to_merged_module(use, dtype=dtype, requantize=requantize)
            report.add(path, stats)
        else:
            layer.unmerge()
            module = layer.base_layer
        replace_module(inner, path, module)
    if not requantize:
        for path, module in quantized_layers(inner):
            replace_module(inner, path, dense_linear(module, dtype))
            report.dequantized += 1
        if report.dtype is None:
            report.dtype = str(dtype).replace("torch.", "") if dtype is not None else None
        drop_quantization_config(inner)
    else:
        report.dtype = "nf4"
    return merge_and_unload(inner), report
