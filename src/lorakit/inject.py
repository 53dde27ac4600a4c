"""Target selection, module replacement and freezing: `inject`, `unload`, `set_active`, `disabled`."""

from __future__ import annotations

import contextlib
import difflib
import re
import warnings
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
from torch import nn

from .config import LoraConfig
from .errors import AdapterExistsError, AdapterNotFoundError, LoraError, TargetNotFoundError, UnsupportedModuleError
from .layers import LoraLayer, LoraLinear, ModulesToSave, is_linear_like, wrapper_for
from .layers.linear import SliceSpec
from .state import (
    AdapterState, drop_state, get_state, has_adapters, lora_layers, replace_module, require_adapter, save_wrappers, unwrap, walk,
)
from .variants import get_variant, restore_base_weight, target_problem

_ADAPTER_NAME = re.compile(r"[A-Za-z0-9_\-]+")


@dataclass
class Plan:
    """What `inject` will do, computed (and validated) before anything changes."""

    targets: list[tuple[str, nn.Module]]  # (path, module or existing LoraLayer)
    saves: list[tuple[str, nn.Module]]  # (path, module or existing ModulesToSave)


def _matches(selector: list[str] | str, path: str) -> bool:
    if isinstance(selector, str):
        return re.fullmatch(selector, path) is not None
    return any(path == t or path.endswith("." + t) for t in selector)


def _layer_index(path: str, layers_pattern: list[str] | str | None) -> int | None:
    if not layers_pattern:
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", path)
    else:
        pats = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        m = next((m for p in pats if (m := re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", path))), None)
    return int(m.group("idx")) if m else None


def output_head_path(model: nn.Module) -> str | None:
    """The path of the model's output projection (LM head), if it declares one."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        return None
    for path, module in walk(model):
        if module is head or (isinstance(module, LoraLayer) and module.base_layer is head):
            return path
    return None


def _target_error(model: nn.Module, config: LoraConfig, paths: list[str]) -> TargetNotFoundError:
    targets = config.target_modules
    leaves = sorted({p.rsplit(".", 1)[-1] for p in paths})
    if isinstance(targets, str):
        hint = f"regex {targets!r} is matched against full paths such as {paths[:3]}"
        wanted = [targets]
    else:
        hint = "names match whole dotted suffixes of module paths"
        wanted = targets
    close = sorted({c for t in wanted for c in difflib.get_close_matches(t.rsplit(".", 1)[-1], leaves, n=4, cutoff=0.5)})
    msg = f"target_modules {targets!r} matched no module of {type(model).__name__} ({hint})"
    if close:
        msg += f"; close candidates: {close}"
    else:
        msg += f"; module names here include: {leaves[:20]}"
    return TargetNotFoundError(msg)


def plan(model: nn.Module, config: LoraConfig) -> Plan:
    """Select the modules `config` adapts, and the `modules_to_save`, without changing the model.

    Raises:
        TargetNotFoundError: nothing matched, or a `rank_pattern`/`alpha_pattern` key
            matches no targeted module, or a `modules_to_save` name matches nothing.
        UnsupportedModuleError: a matched module's type cannot be adapted (named).
    """
    model = unwrap(model)
    modules = list(walk(model))
    paths = [p for p, _ in modules]
    saves_sel = config.modules_to_save or []
    head = output_head_path(model) if config.target_modules == "all-linear" else None

    targets: list[tuple[str, nn.Module]] = []
    for path, module in modules:
        if config.target_modules == "all-linear":
            hit = is_linear_like(module) and path != head
        else:
            hit = _matches(config.target_modules, path)
        if not hit:
            continue
        if config.exclude_modules and _matches(config.exclude_modules, path):
            continue
        if saves_sel and _matches(saves_sel, path):
            continue
        if any(path.startswith(p + ".") for p, _ in targets):
            continue  # inside a module already targeted
        if config.layers_to_transform is not None:
            idx = _layer_index(path, config.layers_pattern)
            wanted = config.layers_to_transform
            wanted = [wanted] if isinstance(wanted, int) else wanted
            if idx is None or idx not in wanted:
                continue
        targets.append((path, module))

    if not targets:
        raise _target_error(model, config, paths)
    for path, module in targets:
        base = module.base_layer if isinstance(module, LoraLayer) else module
        if isinstance(module, ModulesToSave) or wrapper_for(base) is None:
            raise UnsupportedModuleError(
                f"module {path!r} of type {type(base).__module__}.{type(base).__name__} matched target_modules "
                f"{config.target_modules!r} but cannot be adapted (supported: Linear, GPT-2 Conv1D, Embedding, Conv1d/2d/3d); "
                "narrow target_modules or add it to exclude_modules"
            )
        problem = wrapper_for(base).check_rank(base, config.rank_for(path))
        slices = config.slices_for(path)
        if slices is not None:
            if wrapper_for(base) is not LoraLinear:
                problem = f"fused_slices needs a Linear or Conv1D layer, not {type(base).__name__}"
            else:
                try:
                    SliceSpec.resolve(slices, LoraLinear(base).out_features, "cpu")
                except ValueError as exc:
                    problem = f"fused_slices: {exc}"
        problem = problem or target_problem(model, config, path, module)  # variant / init (DoRA, PiSSA, OLoRA)
        if problem:
            raise UnsupportedModuleError(f"module {path!r}: {problem}")
    if isinstance(config.target_modules, list):
        unused = [t for t in config.target_modules if not any(_matches([t], p) for p, _ in targets)]
        if unused:
            warnings.warn(f"target_modules {unused} matched no module of {type(model).__name__}", stacklevel=3)
    target_paths = [p for p, _ in targets]
    for field in ("rank_pattern", "alpha_pattern"):
        for key in getattr(config, field):
            if not any(re.match(rf"(.*\.)?({key})$", p) for p in target_paths):
                raise TargetNotFoundError(f"{field} key {key!r} matches no targeted module (targets include {target_paths[:3]})")

    saves: list[tuple[str, nn.Module]] = []
    for name in saves_sel:
        found = [(p, m) for p, m in modules if _matches([name], p)]
        if not found:
            raise TargetNotFoundError(f"modules_to_save entry {name!r} matched no module of {type(model).__name__}")
        for p, m in found:
            if isinstance(m, LoraLayer):
                raise UnsupportedModuleError(f"modules_to_save entry {name!r} names {p!r}, which already carries a LoRA adapter")
            if not any(p == q for q, _ in saves):
                saves.append((p, m))
    return Plan(targets, saves)


def check_adapter_name(model: nn.Module, adapter: str) -> None:
    if not isinstance(adapter, str) or not _ADAPTER_NAME.fullmatch(adapter):
        raise LoraError(f"adapter name must be letters, digits, '_' or '-', got {adapter!r}")
    if has_adapters(model) and adapter in get_state(model).configs:
        raise AdapterExistsError(f"this model already has an adapter named {adapter!r}; pick another name or delete_adapter it first")


def inject(model: nn.Module, config: LoraConfig, adapter: str = "default", *, plan_: Plan | None = None) -> nn.Module:
    """Add LoRA adapter `adapter` to `model` in place and make it the active adapter.

    Replaces every module selected by `config` with its `LoraLayer` wrapper (or adds
    the adapter to an existing wrapper), creates A `(r, in)` and B `(out, r)` per
    module (B = 0, so outputs are unchanged: paper §4.1), freezes every base
    parameter and leaves the new adapter's tensors (and `modules_to_save` copies,
    and biases per `config.bias`) trainable; the other adapters, now inactive, are
    frozen (see `set_active`).

    Returns:
        `model` (the same object), for chaining.

    Raises:
        ConfigError, TargetNotFoundError, UnsupportedModuleError, AdapterExistsError:
        all before the model is changed.
    """
    config.validate()
    check_adapter_name(model, adapter)
    inner = unwrap(model)
    p = plan_ if plan_ is not None else plan(inner, config)
    variant = get_variant("dora" if config.use_dora else "lora")

    lora_params = {id(t) for _, layer in lora_layers(inner) for a in layer.adapter_names for t in layer.adapter_parameters(a).values()}
    lora_params |= {id(t) for _, w in save_wrappers(inner) for t in w.modules_to_save.parameters()}
    for param in inner.parameters():
        if id(param) not in lora_params:
            param.requires_grad_(False)

    for path, module in p.targets:
        layer = module if isinstance(module, LoraLayer) else wrapper_for(module)(module)
        if layer is not module:
            replace_module(inner, path, layer)
        layer.add_adapter(
            adapter,
            r=config.rank_for(path),
            alpha=config.alpha_for(path),
            scaling=config.scaling_for(path),
            dropout=config.dropout,
            init=config.init,
            variant=variant,
            slices=config.slices_for(path),
        )
    for path, module in p.saves:
        wrapper = module if isinstance(module, ModulesToSave) else ModulesToSave(module)
        if wrapper is not module:
            replace_module(inner, path, wrapper)
        wrapper.add_adapter(adapter)

    state = get_state(inner, create=True)
    for owner, _ in trainable_biases(inner, config.bias, {path for path, _ in p.targets}):
        # biases are base tensors: keep the originals so that unload() restores them
        if all(o is not owner for o, _ in state.bias_backup):
            state.bias_backup.append((owner, owner.bias.detach().clone()))
    state.configs[adapter] = config
    set_active(inner, [adapter])
    return model


def trainable_biases(model: nn.Module, mode: str, adapted: set[str]) -> list[tuple[nn.Module, str]]:
    """The base modules whose bias `mode` trains, with the bias's key in the adapted model.

    `adapted` holds the paths that carry (or are about to carry) the adapter.
    `"all"`: every bias outside adapter internals; `"lora_only"`: biases of the
    adapted layers. Keys are PEFT's (`<path>.base_layer.bias` for adapted layers).
    """
    if mode == "none":
        return []
    out = []
    for path, module in walk(unwrap(model)):
        if isinstance(module, ModulesToSave):
            continue
        wrapped = isinstance(module, LoraLayer) or path in adapted
        if mode == "lora_only" and path not in adapted:
            continue
        owner = module.base_layer if isinstance(module, LoraLayer) else module
        if isinstance(owner._parameters.get("bias"), nn.Parameter):
            out.append((owner, f"{path}.base_layer.bias" if wrapped else f"{path}.bias"))
    return out


def set_active(model: nn.Module, adapters: str | Iterable[str]) -> None:
    """Make `adapters` (a name or a list of names, applied in order) the active set.

    Merged adapters that leave the active set are unmerged first (exactly).
    Trainability follows the active set: afterwards exactly the tensors of the active
    adapters (A, B, DoRA magnitudes, `modules_to_save` copies, biases their `bias`
    mode trains) have `requires_grad=True`, except adapters marked frozen (loaded with
    `trainable=False`, pinned corrections, or `set_trainable(..., False)`); every other
    adapter's tensors are frozen, so an optimizer over `requires_grad` parameters and
    DDP see only what the forward uses.

    Raises:
        AdapterNotFoundError: a name the model does not have.
    """
    names = [adapters] if isinstance(adapters, str) else list(adapters)
    state = get_state(model)
    names += [p for p in state.pinned if p not in names]
    for n in names:
        require_adapter(model, n)
    for _, layer in lora_layers(model):
        layer.set_active(names)
    for _, wrapper in save_wrappers(model):
        wrapper.set_active(names)
    state.active = tuple(names)
    _apply_trainability(unwrap(model), state)


def set_trainable(model: nn.Module, adapter: str, trainable: bool = True) -> None:
    """Mark adapter `adapter` trainable (the default) or frozen; its tensors need grad only while it is active.

    Raises:
        AdapterNotFoundError: unknown name.
    """
    require_adapter(model, adapter)
    state = get_state(model)
    if trainable:
        state.frozen.discard(adapter)
    else:
        state.frozen.add(adapter)
    _apply_trainability(unwrap(model), state)


def _apply_trainability(model: nn.Module, state: AdapterState) -> None:
    """`requires_grad` = active and not frozen, for every adapter tensor (see `set_active`)."""
    training = {n for n in state.active if n not in state.frozen and n not in state.pinned}
    for _, layer in lora_layers(model):
        for name in layer.adapter_names:
            for t in layer.adapter_parameters(name).values():
                t.requires_grad_(name in training)
    for _, wrapper in save_wrappers(model):
        for name, copy in wrapper.modules_to_save.items():
            for p in copy.parameters():
                p.requires_grad_(name in training)
    biases = set()
    for name in training:
        adapted = {path for path, layer in lora_layers(model) if name in layer.lora_A}
        biases |= {id(owner) for owner, _ in trainable_biases(model, state.configs[name].bias, adapted)}
    for owner, _ in state.bias_backup:
        owner.bias.requires_grad_(id(owner) in biases)


def active_adapters(model: nn.Module) -> tuple[str, ...]:
    return get_state(model).active


def adapter_names(model: nn.Module) -> tuple[str, ...]:
    """Names of all adapters on the model, in the order they were added."""
    return tuple(get_state(model).configs) if has_adapters(model) else ()


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block the model computes exactly its base outputs.

    Merged adapters are unmerged (bit-exact) on entry. On exit every layer and
    `modules_to_save` wrapper gets back exactly the state it had on entry (disabled
    or not, which adapters merged), even if the block raises; so nested blocks
    leave the outer one disabled.
    """
    layers = [(layer, layer.disabled, layer.merged_adapters) for _, layer in lora_layers(model)]
    wrappers = [(w, w.disabled) for _, w in save_wrappers(model)]
    for layer, _, _ in layers:
        layer.unmerge()
        layer.set_disabled(True)
    for w, _ in wrappers:
        w.disabled = True
    try:
        yield model
    finally:
        for layer, was_disabled, merged in layers:
            layer.set_disabled(was_disabled)
            if merged:
                layer.merge(merged)
        for w, was_disabled in wrappers:
            w.disabled = was_disabled


def delete_adapter(model: nn.Module, adapter: str) -> None:
    """Remove adapter `adapter`; if merged it is unmerged first, so the base stays intact.

    Raises:
        AdapterNotFoundError: unknown name.
        LoraError: it is the last adapter (use `unload` to remove all adapters).
    """
    state = get_state(model)
    if adapter not in state.configs:
        raise AdapterNotFoundError(f"no adapter named {adapter!r}; this model has {sorted(state.configs)}")
    if len(state.configs) == 1:
        raise LoraError(f"{adapter!r} is the model's last adapter; use lorakit.unload(model) to return to the base model")
    inner = unwrap(model)
    for path, layer in list(lora_layers(inner)):
        if adapter in layer.lora_A:
            layer.delete_adapter(adapter)
            if not layer.adapter_names:
                restore_base_weight(layer)  # a PiSSA/OLoRA residual goes back to the original weight
                replace_module(inner, path, layer.base_layer)
    for path, wrapper in list(save_wrappers(inner)):
        if adapter in wrapper.modules_to_save:
            wrapper.delete_adapter(adapter)
            if not wrapper.adapter_names:
                replace_module(inner, path, wrapper.original_module)
    del state.configs[adapter]
    state.frozen.discard(adapter)
    state.pinned = tuple(a for a in state.pinned if a != adapter)
    set_active(inner, [a for a in state.active if a != adapter])


def unload(model: nn.Module) -> nn.Module:
    """Remove every adapter and return the base model (adapters dropped, weights as before).

    Merged adapters are unmerged first, so the weights are the original ones bit for bit.
    Module structure and state-dict keys are exactly the base model's.
    """
    inner = unwrap(model)
    for path, layer in list(lora_layers(inner)):
        layer.unmerge()
        restore_base_weight(layer)  # PiSSA/OLoRA: the original weight, not the residual
        replace_module(inner, path, layer.base_layer)
    for path, wrapper in list(save_wrappers(inner)):
        replace_module(inner, path, wrapper.original_module)
    with torch.no_grad():
        for owner, original in get_state(inner).bias_backup:
            owner.bias.copy_(original)
            owner.bias.requires_grad_(False)
    drop_state(inner)
    return inner
