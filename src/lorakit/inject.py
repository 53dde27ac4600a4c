"""Target selection, module replacement and freezing: `inject`, `unload`, `set_active`, `disabled`."""

from __future__ import annotations

import contextlib
import difflib
import functools
import re
import warnings
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import torch
from torch import nn

from .config import LoraConfig, matches
from .errors import AdapterExistsError, LoraError, TargetNotFoundError, UnsupportedModuleError
from .layers import (
    LoraConv, LoraEmbedding, LoraExperts, LoraLayer, LoraLinear, ModulesToSave, SliceSpec, is_linear_like, wrapper_for,
)
from .layers.experts import EXPERT_WEIGHTS, expert_weights, is_experts
from .state import (
    AdapterState, drop_state, get_state, has_adapters, lora_layers, replace_module, require_adapter, save_wrappers,
    tied_names, unwrap, walk,
)
from .variants import get_variant
from .variants.pissa import init_from_weight, is_weight_init, restore_original_weight

_ADAPTER_NAME = re.compile(r"[A-Za-z0-9_\-]+")


@dataclass
class Plan:
    """What `inject` will do, computed (and validated) before anything changes."""

    targets: list[tuple[str, nn.Module]]  # (path, module or existing LoraLayer)
    saves: list[tuple[str, nn.Module]]  # (path, module or existing ModulesToSave)
    # experts modules selected by target_parameters (or the "all" preset): path -> the expert weights adapted
    parameters: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def config_key(self, path: str) -> str:
        """The name `rank_pattern` / `alpha_pattern` are matched against for the target at `path`: the path,
        or for expert weights the path of the first one (PEFT matches parameter names there)."""
        params = self.parameters.get(path)
        return f"{path}.{params[0]}" if params else path


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
    if targets is None:
        return TargetNotFoundError(f"target_parameters {config.target_parameters!r} matched no parameter of "
                                   f"{type(model).__name__} (names match whole dotted suffixes of parameter paths "
                                   "such as 'mlp.experts.gate_up_proj'); 3-D expert weights here: "
                                   f"{_expert_weight_names(model)[:8] or 'none'}")
    leaves = sorted({p.rsplit(".", 1)[-1] for p in paths})
    if isinstance(targets, str):
        hint = f"regex {targets!r} is matched against full paths such as {paths[:3]}"
        wanted = [targets]
    else:
        hint = "names match whole dotted suffixes of module paths"
        wanted = targets
    close = sorted({c for t in wanted for c in difflib.get_close_matches(t.rsplit(".", 1)[-1], leaves, n=4,
                                                                         cutoff=0.5)})
    msg = f"target_modules {targets!r} matched no module of {type(model).__name__} ({hint})"
    if close:
        msg += f"; close candidates: {close}"
    else:
        msg += f"; module names here include: {leaves[:20]}"
    return TargetNotFoundError(msg)


def _expert_weight_names(model: nn.Module) -> list[str]:
    """Distinct `<module name>.<weight>` suffixes of the model's 3-D expert weights (for messages)."""
    found = {}
    for path, module in walk(model):
        base = module.base_layer if isinstance(module, LoraExperts) else module
        if is_experts(base):
            for name in expert_weights(base):
                found[f"{path.rsplit('.', 1)[-1]}.{name}"] = None
    return list(found)


def plan(model: nn.Module, config: LoraConfig) -> Plan:
    """Select the modules `config` adapts, and the `modules_to_save`, without changing the model.

    `target_modules` selects modules; `target_parameters` (PEFT's option) selects 3-D expert weights of
    mixture-of-experts modules by parameter path (`"mlp.experts.gate_up_proj"` matches
    `model.layers.0.mlp.experts.gate_up_proj`), as PEFT does: on its own, without `layers_to_transform`
    or `exclude_modules`. `target_modules="all"` selects what `"all-linear"` does plus every expert
    weight (those two obey `exclude_modules` and `layers_to_transform`).

    Raises:
        TargetNotFoundError: nothing matched, or a `rank_pattern`/`alpha_pattern` key
            matches no targeted module, or a `modules_to_save` name matches nothing.
        UnsupportedModuleError: a matched module's type cannot be adapted (named), or a
            `target_parameters` entry selects a parameter that is not an expert weight.
    """
    model = unwrap(model)
    modules = list(walk(model))
    targets = _select_targets(model, config, modules)
    parameters = _select_parameters(model, config, modules, {p for p, _ in targets})
    targets += [(path, module) for path, module, _ in parameters]
    p = Plan(targets, [], {path: names for path, _, names in parameters})
    if not targets:
        raise _target_error(model, config, [path for path, _ in modules])
    for path, module in targets:
        problem = _target_problem(model, config, path, module, p)
        if problem:
            raise UnsupportedModuleError(f"module {path!r}: {problem}")
    _check_selectors(model, config, p)
    if config.lora_bias:
        bases = [(path, m.base_layer if isinstance(m, LoraLayer) else m) for path, m in targets]
        unbiased = [path for path, base in bases if getattr(base, "bias", None) is None]
        if unbiased:
            warnings.warn(f"lora_bias on {len(unbiased)} modules without a bias (e.g. {unbiased[0]!r}): the adapter "
                          "works, but cannot be merged there (no bias to merge it into)", stacklevel=3)
    if config.target_modules == "all-linear":
        _warn_experts_left_out(model, modules, targets)
    p.saves = _select_saves(model, config, modules)
    return p


def _check_selectors(model: nn.Module, config: LoraConfig, p: Plan) -> None:
    """Warn about `target_modules` / `target_parameters` names that matched nothing; raise for a pattern key
    that matches no target."""
    module_paths = [path for path, _ in p.targets if path not in p.parameters]
    if isinstance(config.target_modules, list):
        unused = [t for t in config.target_modules if not any(matches([t], path) for path in module_paths)]
        if unused:
            warnings.warn(f"target_modules {unused} matched no module of {type(model).__name__}", stacklevel=4)
    param_paths = [f"{path}.{n}" for path, names in p.parameters.items() for n in names]
    unused = [t for t in config.target_parameters or [] if not any(matches([t], q) for q in param_paths)]
    if unused:
        warnings.warn(f"target_parameters {unused} matched no parameter of {type(model).__name__}", stacklevel=4)
    target_paths = module_paths + param_paths
    for field_ in ("rank_pattern", "alpha_pattern"):
        for key in getattr(config, field_):
            if not any(re.match(rf"(.*\.)?({key})$", path) for path in target_paths):
                raise TargetNotFoundError(f"{field_} key {key!r} matches no targeted module (targets include "
                                          f"{target_paths[:3]})")


def _warn_experts_left_out(model: nn.Module, modules: list[tuple[str, nn.Module]],
                           targets: list[tuple[str, nn.Module]]) -> None:
    """`all-linear` on a mixture-of-experts model: say which share of the weights it reached and what it left out."""
    experts = [(path, m) for path, m in modules if is_experts(m.base_layer if isinstance(m, LoraExperts) else m)]
    if not experts:
        return
    base = [m.base_layer if isinstance(m, LoraExperts) else m for _, m in experts]
    left = sum(getattr(m, n).numel() for m in base for n in expert_weights(m))
    reached = sum((m.base_layer if isinstance(m, LoraLayer) else m).weight.numel() for _, m in targets)
    linear = sum((m.base_layer if isinstance(m, LoraLayer) else m).weight.numel() for _, m in modules
                 if is_linear_like(m))
    total = linear + left
    warnings.warn(
        f"target_modules='all-linear' adapts {len(targets)} linear layers holding {100 * reached / total:.1f}% of the "
        f"model's linear and expert weights; the {len(experts)} mixture-of-experts modules' 3-D expert weights "
        f"({100 * left / total:.1f}%, e.g. {experts[0][0]!r}: {list(expert_weights(base[0]))}) are not linear layers "
        "and are left out, as in PEFT. target_modules='all' adds them (or list them in target_parameters)",
        stacklevel=3)


def _select_targets(model: nn.Module, config: LoraConfig,
                    modules: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    """The `(path, module)` pairs `config.target_modules` selects, after the exclusions."""
    if config.target_modules is None:
        return []
    preset = config.target_modules in ("all-linear", "all")
    head = output_head_path(model) if preset else None
    targets: list[tuple[str, nn.Module]] = []
    for path, module in modules:
        if preset:
            hit = is_linear_like(module) and path != head
        else:
            hit = matches(config.target_modules, path)
        if not hit or not _selectable(config, path, targets):
            continue
        targets.append((path, module))
    return targets


def _selectable(config: LoraConfig, path: str, targets: list[tuple[str, nn.Module]]) -> bool:
    """Whether a module matched at `path` survives `exclude_modules`, `modules_to_save`, an enclosing target and
    `layers_to_transform`."""
    if config.exclude_modules and matches(config.exclude_modules, path):
        return False
    if (config.modules_to_save and matches(config.modules_to_save, path)) or any(
            path.startswith(p + ".") for p, _ in targets):
        return False  # a module trained in full, or inside a module already targeted
    wanted = config.layers_to_transform
    wanted = [wanted] if isinstance(wanted, int) else wanted
    return wanted is None or _layer_index(path, config.layers_pattern) in wanted


def _select_parameters(model: nn.Module, config: LoraConfig, modules: list[tuple[str, nn.Module]],
                       taken: set[str]) -> list[tuple[str, nn.Module, tuple[str, ...]]]:
    """`(module path, module, parameter names)` for the parameters `target_parameters` (or the `"all"` preset)
    selects, grouped by the module that holds them."""
    names = config.target_parameters or []
    preset = config.target_modules == "all"
    out: list[tuple[str, nn.Module, tuple[str, ...]]] = []
    for path, module in modules:
        if isinstance(module, ModulesToSave) or (config.modules_to_save and matches(config.modules_to_save, path)):
            continue
        base = module.base_layer if isinstance(module, LoraLayer) else module
        hits = [n for n, _ in base.named_parameters(recurse=False) if names and matches(names, f"{path}.{n}")]
        if preset and path not in taken and is_experts(base) and _selectable(config, path, []):
            hits += [n for n in expert_weights(base) if n not in hits]
        if hits:
            out.append((path, module, tuple(hits)))
    return out


def _target_problem(model: nn.Module, config: LoraConfig, path: str, module: nn.Module, p: Plan) -> str | None:
    """Why the selected module at `path` cannot carry this adapter (None if it can)."""
    base = module.base_layer if isinstance(module, LoraLayer) else module
    cls = wrapper_for(base)
    if path in p.parameters:
        return _parameter_problem(config, path, base, cls, p.parameters[path])
    if cls is LoraExperts:
        return (f"{type(base).__name__} holds 3-D expert weights {list(expert_weights(base))}: select them with "
                "target_parameters (PEFT's option, e.g. ['mlp.experts.gate_up_proj', 'mlp.experts.down_proj']) or "
                "target_modules='all', not target_modules")
    if isinstance(module, ModulesToSave) or cls is None:
        return (f"type {type(base).__module__}.{type(base).__name__} matched target_modules "
                f"{config.target_modules!r} but "
                "cannot be adapted (supported: Linear, GPT-2 Conv1D, Embedding, Conv1d/2d/3d); narrow target_modules "
                "or add "
                "it to exclude_modules")
    problem = cls.check_rank(base, config.rank_for(path))
    slices = config.slices_for(path)
    if problem is None and slices is not None:
        if cls is not LoraLinear:
            return f"fused_slices needs a Linear or Conv1D layer, not {type(base).__name__}"
        try:
            SliceSpec.resolve(slices, cls.features(base)[1], "cpu")
        except ValueError as exc:
            return f"fused_slices: {exc}"
    if problem is None and config.lora_bias and cls is LoraEmbedding:
        return "lora_bias is not supported on embedding layers (as in PEFT: there is no bias to merge it into)"
    if problem is None and config.use_dora and "dora" not in cls.supported_variants:
        return f"DoRA (use_dora) supports Linear, GPT-2 Conv1D and Embedding layers, not {cls.__name__}"
    return problem or _weight_init_problem(model, config, path, module)


def _parameter_problem(config: LoraConfig, path: str, base: nn.Module, cls, names: tuple[str, ...]) -> str | None:
    """Why the parameters `names` of the module at `path` (selected by `target_parameters`) cannot be adapted."""
    adaptable = expert_weights(base) if cls is LoraExperts else ()
    bad = [n for n in names if n not in adaptable]
    if bad:
        shape = tuple(getattr(base, bad[0]).shape)
        return (f"target_parameters selects {path}.{bad[0]} (shape {shape}) of a {type(base).__name__}; lorakit adapts "
                f"the 3-D expert weights ({', '.join(EXPERT_WEIGHTS)}) of transformers mixture-of-experts modules; "
                "train a router or another module in full with modules_to_save")
    ranks = {(config.rank_for(f"{path}.{n}"), config.alpha_for(f"{path}.{n}")) for n in names}
    if len(ranks) > 1:
        return f"rank_pattern / alpha_pattern give its expert weights {list(names)} different ranks or alphas {ranks}"
    what = ("DoRA (use_dora)" if config.use_dora else "lora_bias" if config.lora_bias
            else "fused_slices" if config.slices_for(path) is not None
            else f"init={config.init!r}" if is_weight_init(config.init) else None)
    if what:
        return f"{what} is not supported on expert weights (plain LoRA only, as PEFT's target_parameters)"
    return None


def _weight_init_problem(model: nn.Module, config: LoraConfig, path: str, module: nn.Module) -> str | None:
    """Why a PiSSA/OLoRA `config.init` cannot start from the weight of the module at `path` (None if it can)."""
    if not is_weight_init(config.init):
        return None
    existing = module if isinstance(module, LoraLayer) else None
    base = existing.base_layer if existing is not None else module
    what = f"init={config.init!r} replaces the base weight by a residual"
    if existing is not None and existing.adapter_names:
        return (f"{what}, but the module already carries adapters {list(existing.adapter_names)}; use it on modules "
                "without adapters")
    cls = wrapper_for(base)
    if cls not in (LoraLinear, LoraEmbedding, LoraConv):
        return f"{what}; supported: Linear, GPT-2 Conv1D, Embedding, ungrouped Conv"
    if cls is LoraConv and base.groups != 1:
        return f"{what}; grouped convolutions (groups={base.groups}) are not supported"
    if config.slices_for(path) is not None:
        return f"{what}; not supported together with fused_slices"
    w = base.weight
    if not w.is_floating_point():
        return f"{what}; the weight has dtype {w.dtype}, a floating-point weight is needed"
    out_f = w.shape[0] if cls is LoraConv else cls.features(base)[1]
    r = config.rank_for(path)
    if r > min(out_f, w.numel() // out_f):
        return f"{what}; rank {r} exceeds min(out, in) = {min(out_f, w.numel() // out_f)} of the weight"
    shared = tied_names(model, w)
    if len(shared) > 1:
        return f"{what}; its weight is tied to {shared} and would change there too (untie it first)"
    return None


def _select_saves(model: nn.Module, config: LoraConfig,
                  modules: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    """The `modules_to_save` `(path, module)` pairs; raises if an entry matches nothing or an adapted layer."""
    saves: list[tuple[str, nn.Module]] = []
    for name in config.modules_to_save or []:
        found = [(p, m) for p, m in modules if matches([name], p)]
        if not found:
            raise TargetNotFoundError(f"modules_to_save entry {name!r} matched no module of {type(model).__name__}")
        for p, m in found:
            if isinstance(m, LoraLayer):
                raise UnsupportedModuleError(f"modules_to_save entry {name!r} names {p!r}, which already carries a "
                                             "LoRA adapter")
            if not any(p == q for q, _ in saves):
                saves.append((p, m))
    return saves


def check_adapter_name(model: nn.Module, adapter: str) -> None:
    if not isinstance(adapter, str) or not _ADAPTER_NAME.fullmatch(adapter):
        raise LoraError(f"adapter name must be letters, digits, '_' or '-', got {adapter!r}")
    if has_adapters(model) and adapter in get_state(model).configs:
        raise AdapterExistsError(f"this model already has an adapter named {adapter!r}; pick another name or "
                                 "delete_adapter it first")


def inject(model: nn.Module, config: LoraConfig, adapter: str = "default", *, plan_: Plan | None = None,
           variant: str | None = None) -> nn.Module:
    """Add LoRA adapter `adapter` to `model` in place and make it the active adapter.

    Replaces every module selected by `config` with its `LoraLayer` wrapper (or adds
    the adapter to an existing wrapper), creates A `(r, in)` and B `(out, r)` per
    module (B = 0, so outputs are unchanged: paper §4.1; an experts module selected by
    `target_parameters` gets `LoraExperts`, one pair per expert and per expert weight), freezes every base
    parameter (the router of a mixture-of-experts layer included) and leaves the new adapter's
    tensors (and `modules_to_save` copies, and biases per `config.bias`) trainable; the other
    adapters, now inactive, are frozen (see `set_active`). `variant`: the name of a registered variant
    (`lorakit.variants.register_variant`); default `"dora"` with `config.use_dora`, else `"lora"`.

    Returns:
        `model` (the same object), for chaining.

    Raises:
        ConfigError, TargetNotFoundError, UnsupportedModuleError, AdapterExistsError, LoraError
        (an unknown variant): all before the model is changed.
    """
    config.validate()
    check_adapter_name(model, adapter)
    strategy = get_variant(variant or ("dora" if config.use_dora else "lora"))
    inner = unwrap(model)
    p = plan_ if plan_ is not None else plan(inner, config)
    # PiSSA / OLoRA: A, B from W0 and the base rewritten to the residual, before the variant's own init
    weight_init = functools.partial(init_from_weight, init=config.init) if is_weight_init(config.init) else None

    lora_params = {id(t) for _, layer in lora_layers(inner) for a in layer.adapter_names
                   for t in layer.adapter_parameters(a).values()}
    lora_params |= {id(t) for _, w in save_wrappers(inner) for t in w.modules_to_save.parameters()}
    for param in inner.parameters():
        if id(param) not in lora_params:
            param.requires_grad_(False)

    for path, module in p.targets:
        layer = module if isinstance(module, LoraLayer) else wrapper_for(module)(module)
        if layer is not module:
            layer.train(module.training)  # a new module starts in training mode: take the replaced module's
            replace_module(inner, path, layer)
        key = p.config_key(path)
        extra = {"parameters": p.parameters[path]} if path in p.parameters else {}
        layer.add_adapter(
            adapter,
            r=config.rank_for(key),
            alpha=config.alpha_for(key),
            scaling=config.scaling_for(key),
            dropout=config.dropout,
            init="kaiming" if weight_init else config.init,
            variant=strategy,
            slices=config.slices_for(path),
            weight_init=weight_init,
            lora_bias=config.lora_bias,
            **extra,
        )
    for path, module in p.saves:
        wrapper = module if isinstance(module, ModulesToSave) else ModulesToSave(module)
        if wrapper is not module:
            wrapper.train(module.training)
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
    require_adapter(model, adapter)
    state = get_state(model)
    if len(state.configs) == 1:
        raise LoraError(
            f"{adapter!r} is the model's last adapter; use lorakit.unload(model) to return to the base model"
        )
    inner = unwrap(model)
    for path, layer in list(lora_layers(inner)):
        if adapter in layer.lora_A:
            layer.delete_adapter(adapter)
            if not layer.adapter_names:
                restore_original_weight(layer)  # a PiSSA/OLoRA residual goes back to the original weight
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
        restore_original_weight(layer)  # PiSSA/OLoRA: the original weight, not the residual
        replace_module(inner, path, layer.base_layer)
    for path, wrapper in list(save_wrappers(inner)):
        replace_module(inner, path, wrapper.original_module)
    with torch.no_grad():
        for owner, original in get_state(inner).bias_backup:
            owner.bias.copy_(original)
            owner.bias.requires_grad_(False)
    drop_state(inner)
    return inner
