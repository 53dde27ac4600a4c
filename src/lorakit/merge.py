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
from .layers import LoraLayer, wrapper_for
from .state import drop_state, get_state, lora_layers, replace_module, save_wrappers, unwrap, walk


def _untie_if_shared(model: nn.Module, layers: list[tuple[str, LoraLayer]], warn: bool = True) -> None:
    """Give a layer about to be merged its own copy of a weight it shares with another module.

    Writing a merged weight into a tied tensor would also change the other module
    (e.g. the input embedding tied to the LM head), so the layer merges into a copy;
    the shared tensor is kept on the layer and `unmerge` ties it back (see `LoraLayer.unmerge`).
    """
    counts = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    for path, layer in layers:
        if layer.per_expert:
            continue  # 3-D expert weights are not tied to other modules
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


def _check_bias_merges(layers: list[tuple[str, LoraLayer]], names) -> None:
    """Before anything merges: every adapter with `lora_bias` has a base bias to merge into (`MergeError` naming it)."""
    for path, layer in layers:
        try:
            layer.check_bias_merge([n for n in names if n in layer.lora_A])
        except MergeError as exc:
            raise MergeError(f"{path}: {exc}") from None


def _active_subset(model: nn.Module, adapters: Iterable[str] | None) -> tuple[str, ...]:
    state = get_state(model)
    if adapters is None:
        return state.active
    names = (adapters,) if isinstance(adapters, str) else tuple(adapters)
    for n in names:
        if n not in state.active:
            raise MergeError(f"adapter {n!r} is not active (active: {list(state.active)}); only active adapters can "
                             "be merged")
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
    _check_bias_merges(layers, names)
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
    rounded once from float32. Each layer kind makes its own plain module
    (`LoraLayer.merged_module`): 4-bit (QLoRA) layers are dequantized and merged into
    dense `nn.Linear` layers, and so that the model is plain, its other 4-bit layers are
    dequantized too (`lorakit.quant.merge_quantized` has the options and the rounding report).
    """
    inner = unwrap(model)
    names = get_state(inner).active
    layers = list(lora_layers(inner))
    _check_bias_merges(layers, names)
    _untie_if_shared(inner, [(p, layer) for p, layer in layers if any(n in layer.lora_A for n in names)], warn=False)
    _untie_config(inner, [p for p, layer in layers if layer.tied_weight is not None])
    densify = any(type(layer).plain_base is not LoraLayer.plain_base for _, layer in layers)
    for path, layer in layers:
        replace_module(inner, path, layer.merged_module([n for n in names if n in layer.lora_A]))
    for path, wrapper in list(save_wrappers(inner)):
        replace_module(inner, path, wrapper.current() if not wrapper.disabled else wrapper.original_module)
    drop_state(inner)
    if densify:
        make_plain(inner)
    return inner


def make_plain(model: nn.Module) -> int:
    """Replace every base module that has a plain equivalent (a 4-bit layer: a dense `nn.Linear`) by it.

    A transformers model then no longer claims to be quantized (`quantization_config` dropped).
    Returns the number of modules replaced.
    """
    n = 0
    for path, module in list(walk(model)):
        cls = wrapper_for(module)
        plain = cls.plain_base(module) if cls is not None and not isinstance(module, LoraLayer) else None
        if plain is not None:
            replace_module(model, path, plain)
            n += 1
    drop_quantization_config(model)
    return n


def drop_quantization_config(model: nn.Module) -> None:
    """A transformers model that no longer has 4-bit layers should not claim to be quantized."""
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "quantization_config", None) is not None:
        try:
            del config.quantization_config
        except AttributeError:
            config.quantization_config = None
    for attr, value in (("hf_quantizer", None), ("is_loaded_in_4bit", False), ("is_quantized", False)):
        if attr in model.__dict__:
            setattr(model, attr, value)


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
