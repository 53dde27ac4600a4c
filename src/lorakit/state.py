"""Where a model keeps its adapters' bookkeeping, and how to walk its adapted modules."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

from torch import nn

from .config import LoraConfig
from .errors import AdapterNotFoundError, LoraError
from .layers import LoraLayer, ModulesToSave

_ATTR = "_lorakit"


@dataclass
class AdapterState:
    """Per-model record: adapter name -> its config, and the active names (in order)."""

    configs: dict[str, LoraConfig] = field(default_factory=dict)
    active: tuple[str, ...] = ()
    # adapters that stay active whatever set_active asks (a frozen correction of the base: lorakit.quant.qera)
    pinned: tuple[str, ...] = ()
    # adapters whose tensors stay frozen even while active (loaded with trainable=False; pinned ones)
    frozen: set[str] = field(default_factory=set)
    # (module, original bias) for biases a `bias="all"/"lora_only"` adapter trains
    bias_backup: list = field(default_factory=list)


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside a `torch.compile` wrapper (or the model itself)."""
    while hasattr(model, "_orig_mod") and type(model).__name__ == "OptimizedModule":
        model = model._orig_mod
    if not isinstance(model, nn.Module):
        raise LoraError(f"expected a torch.nn.Module, got {type(model).__name__}")
    return model


def get_state(model: nn.Module, create: bool = False) -> AdapterState:
    """The model's `AdapterState`; raises `LoraError` if it has no adapters (unless `create`)."""
    model = unwrap(model)
    state = model.__dict__.get(_ATTR)
    if state is None:
        if not create:
            raise LoraError(f"{type(model).__name__} has no lorakit adapters: call lorakit.inject or "
                            "lorakit.load_adapter first")
        state = AdapterState()
        model.__dict__[_ATTR] = state
    return state


def has_adapters(model: nn.Module) -> bool:
    return _ATTR in unwrap(model).__dict__


def drop_state(model: nn.Module) -> None:
    unwrap(model).__dict__.pop(_ATTR, None)


def require_adapter(model: nn.Module, name: str) -> LoraConfig:
    state = get_state(model)
    if name not in state.configs:
        raise AdapterNotFoundError(f"no adapter named {name!r}; this model has {sorted(state.configs)}")
    return state.configs[name]


def walk(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """`named_modules()` that yields adapter wrappers but not their insides."""
    for name, child in module._modules.items():
        if child is None:
            continue
        path = f"{prefix}.{name}" if prefix else name
        yield path, child
        if not isinstance(child, (LoraLayer, ModulesToSave)):
            yield from walk(child, path)


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    for path, module in walk(unwrap(model)):
        if isinstance(module, LoraLayer):
            yield path, module


def save_wrappers(model: nn.Module) -> Iterator[tuple[str, ModulesToSave]]:
    for path, module in walk(unwrap(model)):
        if isinstance(module, ModulesToSave):
            yield path, module


def replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, new)


def tied_names(model: nn.Module, tensor) -> list[str]:
    """Every name under which `tensor` is a parameter of `model` (more than one: tied weights)."""
    return [n for n, p in unwrap(model).named_parameters(remove_duplicate=False) if p is tensor]
