"""Merging adapters into base weights (paper §4.2) and counting parameters.

Exactness rules: the merged weight is `round(W0 + sum(delta_weight))` computed
from the saved original `W0` in float32 (float64 for a float64 base) and rounded
once; unmerge writes `W0` back bit for bit; merging twice is a no-op.
"""

from __future__ import annotations

import copy
import warnings
from collections import Counter
from typing import Iterable

import torch
from torch import nn

from .errors import MergeError
from .inject import unload
from .layers import LoraLayer
from .state import drop_state, get_state, lora_layers, replace_module, save_wrappers, unwrap


def _untie_if_shared(model: nn.Module, layers: list[tuple[str, LoraLayer]], warn: bool = True) -> None:
    """Give a layer about to be merged its own copy of a weight it shares with another module.

    Writing a merged weight into a tied tensor would also change the other module
    (e.g. the input embedding tied to the LM head), so the layer merges into a copy;
    the shared tensor is kept on the layer and `unmerge` ties it back (see `LoraLayer.unmerge`).
    """
    counts = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    for path, layer in layers:
        w = layer.base_layer.weight
        if counts[id(w)] > 1:
            if warn:
                warnings.warn(f"{path}.weight is tied to another module; while merged it has its own copy "
                              "(the other module keeps the base weight; unmerge ties them again)", stacklevel=3)
            layer.untie_weight()
            counts[id(w)] -= 1


def _untie_config(model: nn.Module, paths: list[str]) -> None:
    """After tied weights were merged for good: a copy of the model's config that no longer ties.

    The config object may be shared with other models built from it, so it is replaced, not edited.
    """
    config = getattr(model, "config", None)
    if not paths or config is None or not getattr(config, "tie_word_embeddings", False):
        return
    model.config = copy.deepcopy(config)
    model.config.tie_word_embeddings = False
    warnings.warn(f"{', '.join(paths)}: merged into a weight tied to another module, which keeps the base weight; "
                  "the model gets its own copy of its config with tie_word_embeddings=False (the original "
                  "config object is unchanged)", stacklevel=3)


def _active_subset(model: nn.Module, adapters: Iterable[str] | None) -> tuple[str, ...]:
    state = get_state(model)
    if adapters is None:
        return state.active
    names = (adapters,) if isinstance(adapters, str) else tuple(adapters)
    for n in names:
        if n not in state.active:
            raise MergeError(f"adapter {n!r} is not active (active: {list(state.active)}); only active adapters can be merged")
    return names


def merge(model: nn.Module, adapters: str | Iterable[str] | None = None) -> None:
    """Fold the active adapters (or the named active ones) into the base weights, in place.

    After merging, the forward costs exactly the base model's FLOPs. Already
    merged adapters are skipped (merging twice is a no-op). The original weights
    are kept so that `unmerge` restores them bit for bit.

    Raises:
        MergeError: a named adapter is not active.
    """
    names = _active_subset(model, adapters)
    inner = unwrap(model)
    layers = [(p, layer) for p, layer in lora_layers(inner) if any(n in layer.lora_A for n in names)]
    _untie_if_shared(inner, [(p, layer) for p, layer in layers if not layer.merged_adapters])
    for _, layer in layers:
        layer.merge([n for n in names if n in layer.lora_A])


def unmerge(model: nn.Module) -> None:
    """Restore every merged layer's original weight, bit for bit."""
    for _, layer in lora_layers(model):
        layer.unmerge()


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold the active adapters into the base weights and remove all adapter modules.

    Returns the model with exactly the base architecture: the same module types
    and state-dict keys as before `inject`, no extra FLOPs. Active
    `modules_to_save` copies replace their originals. Each merged weight is
    rounded once from float32. 4-bit (QLoRA) layers are dequantized and merged into
    dense `nn.Linear` layers (see `lorakit.quant.merge_quantized` for options and the
    rounding report).
    """
    inner = unwrap(model)
    if any(getattr(layer, "quantized_base", False) for _, layer in lora_layers(inner)):
        from .quant.merge import merge_quantized  # 4-bit base: dequantize + delta in float32 -> dense Linear

        return merge_quantized(inner)[0]
    names = get_state(inner).active
    layers = list(lora_layers(inner))
    _untie_if_shared(inner, [(p, layer) for p, layer in layers if any(n in layer.lora_A for n in names)], warn=False)
    _untie_config(inner, [p for p, layer in layers if layer.tied_weight is not None])
    for path, layer in layers:
        use = [n for n in names if n in layer.lora_A]
        if use:
            merged = layer.merged_weight(use)
            with torch.no_grad():
                layer.weight.copy_(merged)
        elif layer.merged_adapters:
            layer.unmerge()
        replace_module(inner, path, layer.base_layer)
    for path, wrapper in list(save_wrappers(inner)):
        replace_module(inner, path, wrapper.current() if not wrapper.disabled else wrapper.original_module)
    drop_state(inner)
    return inner


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """`(trainable, total)` numbers of parameters (elements), each tensor counted once.

    `total` covers every parameter of the model as it stands, adapters and
    `modules_to_save` copies included; tied tensors count once. Packed 4-bit
    tensors count their logical (unpacked) elements.
    """
    trainable = total = 0
    for p in unwrap(model).parameters():  # parameters() already yields tied tensors once
        n = _logical_numel(p)
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


def _logical_numel(p: torch.Tensor) -> int:
    if type(p).__name__ == "Params4bit":  # bitsandbytes packs two 4-bit values per byte
        shape = getattr(getattr(p, "quant_state", None), "shape", None)
        return int(torch.Size(shape).numel()) if shape is not None else p.numel() * 2
    return p.numel()


__all__ = ["merge", "unmerge", "merge_and_unload", "unload", "count_parameters"]
