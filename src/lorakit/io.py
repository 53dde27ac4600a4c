"""Adapter files in the Hugging Face PEFT layout.

A saved adapter is a folder with

- `adapter_config.json`: the `LoraConfig` in PEFT's vocabulary;
- `adapter_model.safetensors`: tensors keyed `base_model.model.<module path>.lora_A.weight`
  `(r, in)` and `.lora_B.weight` `(out, r)` (embeddings: `.lora_embedding_A` `(r, num)`,
  `.lora_embedding_B` `(dim, r)`; DoRA: `.lora_magnitude_vector`; expert weights selected by
  `target_parameters`: PEFT's nested `<experts path>.[base_layer.]*lora_A.weight` `(experts * r, in)`,
  see `lorakit.layers.LoraExperts`), plus the tensors of `modules_to_save` copies under the module's
  own parameter names.

This is what PEFT's `PeftModel.from_pretrained`, transformers' `load_adapter` and vLLM
read. Loading validates everything (keys, shapes, dtypes, finiteness, agreement with
the config) before the model is touched; pickle files are never opened.
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_save
from torch import nn

from .config import PRESETS, LoraConfig
from .errors import AdapterLoadError, ConfigError, LoraError
from .fileio import atomic_write_files, remove_stale_versions
from .inject import check_adapter_name, delete_adapter, inject, plan, set_active, trainable_biases, unload
from .layers import LoraLayer, LoraLinear, ModulesToSave, SliceSpec, wrapper_for
from .variants.dora import MAGNITUDE
from .variants.pissa import init_record, is_weight_init
from .state import get_state, has_adapters, lora_layers, require_adapter, save_wrappers, unwrap

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth", "pytorch_model.bin")
# The config is also stored in the weights file's metadata, so that a json edited (or written by
# another tool) to contradict the tensors is refused naming the field that changed.
META_CONFIG = "lorakit_adapter_config"
BASE_BIAS = "<trained base bias>"  # tag of bias tensors trained by `bias="all"/"lora_only"`


def adapter_state_dict(model: nn.Module, adapter: str | None = None) -> dict[str, torch.Tensor]:
    """The adapter's tensors under their PEFT file keys (`base_model.model.<path>...`), detached, on CPU.

    `adapter=None` means the model's only adapter (or the one named "default")."""
    adapter = resolve_adapter(model, adapter)
    out: dict[str, torch.Tensor] = {}
    for path, layer in lora_layers(model):
        if adapter not in layer.lora_A:
            continue
        for suffix, tensor in layer.file_tensors(adapter).items():  # each kind's file layout (PEFT's)
            out[f"{PREFIX}{path}.{suffix}"] = tensor
    for path, wrapper in save_wrappers(model):
        if adapter in wrapper.modules_to_save:
            for name, tensor in wrapper.modules_to_save[adapter].state_dict().items():
                out[f"{PREFIX}{path}.{name}"] = tensor
    adapted = {path for path, layer in lora_layers(model) if adapter in layer.lora_A}
    for owner, key in trainable_biases(model, require_adapter(model, adapter).bias, adapted):
        out[f"{PREFIX}{key}"] = owner.bias
    return {k: v.detach().to("cpu").contiguous() for k, v in out.items()}


def resolve_adapter(model: nn.Module, adapter: str | None) -> str:
    """`adapter`, or for None: "default" if the model has it, else its only adapter."""
    names = list(get_state(model).configs)
    if adapter is None:
        if "default" in names or len(names) != 1:
            adapter = "default"
        else:
            adapter = names[0]
    require_adapter(model, adapter)
    return adapter


def config_for_file(model: nn.Module, adapter: str) -> tuple[LoraConfig, bool, dict]:
    """`(config as written to adapter_config.json, fan_in_fan_out, fused slices by module path)` of a model's
    adapter: the `all-linear` / `all` presets resolved to the module and expert-weight lists, as PEFT writes them."""
    config = require_adapter(model, adapter)
    layers = [(p, layer) for p, layer in lora_layers(model) if adapter in layer.lora_A]
    if config.target_modules in PRESETS:  # as PEFT does for all-linear: write the resolved module list
        modules = sorted(p for p, layer in layers if not layer.per_expert)
        params = sorted(f"{p}.{n}" for p, layer in layers if layer.per_expert for n in layer.targets[adapter])
        config = config.replace(target_modules=modules or None, target_parameters=params or config.target_parameters)
    if config.base_model_name_or_path is None:
        name = getattr(getattr(unwrap(model), "config", None), "_name_or_path", None)
        if name:
            config = config.replace(base_model_name_or_path=str(name))
    fan_in_fan_out = any(isinstance(layer, LoraLinear) and layer.fan_in_fan_out for _, layer in layers)
    fused = {p: layer.slice_spec(adapter).as_dict() for p, layer in layers if layer.slice_spec(adapter) is not None}
    return config, fan_in_fan_out, fused


def save_adapter(model: nn.Module, path: str | Path, adapter: str | None = None) -> Path:
    """Write adapter `adapter` to folder `path` in the PEFT layout (created if missing).

    `adapter=None` means the adapter named "default", else the model's only adapter.

    Only the adapter's tensors are written (never base weights), in their training
    dtype. The two files are replaced together (`lorakit.fileio.atomic_write_files`):
    after a crash at any point every reader (lorakit, PEFT, vLLM) finds the old pair or
    the new one, never a mix.

    Returns:
        The folder path.
    Raises:
        AdapterNotFoundError: the model has no adapter `adapter`.
        LoraError: `path` exists and is not a folder.
    """
    check_folder(path)
    adapter = resolve_adapter(model, adapter)
    scaled = [p for p, layer in lora_layers(model) if layer.scale_factor.get(adapter, 1.0) != 1.0]
    if scaled:
        warnings.warn(f"adapter {adapter!r} runs at a strength set by set_scale on {len(scaled)} modules (e.g. "
                      f"{scaled[0]!r}); the file holds the adapter as configured (scale 1), as PEFT's files do",
                      stacklevel=2)
    config, fan_in_fan_out, fused = config_for_file(model, adapter)
    return write_adapter_files(path, adapter_state_dict(model, adapter), config.to_json(fan_in_fan_out, fused))


def check_folder(path: str | Path) -> None:
    """Raise `LoraError` if `path` exists and is not a folder (an adapter cannot be saved there)."""
    if Path(path).exists() and not Path(path).is_dir():
        raise LoraError(f"cannot save adapter to {path}: it exists and is not a folder")


def write_adapter_files(path: str | Path, tensors: dict[str, torch.Tensor], config_json: str) -> Path:
    """Write the pair (weights, config) into folder `path`, replacing both together (see `save_adapter`)."""
    folder = Path(path)
    check_folder(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_versions(folder)
    data = safetensors_save(tensors, metadata={"format": "pt", META_CONFIG: config_json})
    atomic_write_files(folder, {WEIGHTS_NAME: canonical_safetensors(data), CONFIG_NAME: config_json.encode("utf-8")})
    return folder


def canonical_safetensors(data: bytes) -> bytes:
    """The same safetensors file with its JSON header's keys sorted.

    safetensors writes `__metadata__` in hash-map order, so saving the same adapter
    twice could give different bytes; sorting makes equal adapters equal files. The
    compact JSON has the same length whatever the key order, so the data offsets
    do not move.
    """
    size = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + size])
    canonical = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    canonical = canonical.ljust(size, b" ")  # the format allows trailing spaces in the header
    if len(canonical) != size:
        return data
    return data[:8] + canonical + data[8 + size :]


# ---------------------------------------------------------------------- loading
@dataclass
class AdapterFiles:
    """A read and checked adapter folder."""

    folder: Path
    config: LoraConfig  # from adapter_config.json
    tensors: dict[str, torch.Tensor]
    saved_config: LoraConfig | None = None  # the config lorakit saved inside the weights file, when it differs


def read_adapter(path: str | Path) -> AdapterFiles:
    """Read `adapter_config.json` and `adapter_model.safetensors` from `path` without touching any model.

    Raises:
        AdapterLoadError: missing folder/files, a pickle-only adapter, a corrupt or
            truncated safetensors file, non-float or non-finite tensors (naming file and key).
        ConfigError: an invalid or unknown config field (naming the file and field).
    """
    folder = Path(path)
    if not folder.exists():
        raise AdapterLoadError(f"adapter path {folder} does not exist")
    if folder.is_file():
        if folder.name == CONFIG_NAME or folder.suffix == ".safetensors":
            folder = folder.parent
        else:
            raise AdapterLoadError(f"adapter path {folder} is a file; pass the adapter folder (holding {CONFIG_NAME} "
                                   f"and {WEIGHTS_NAME})")
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        pickles = [p for p in PICKLE_NAMES if (folder / p).exists()]
        if pickles:
            raise AdapterLoadError(
                f"{folder / pickles[0]} is a pickle file, which can run arbitrary code when loaded; lorakit loads only "
                "safetensors. If you trust its source, convert it once: "
                "`python -c \"import torch, safetensors.torch as s; "
                f"s.save_file(torch.load('{folder / pickles[0]}', weights_only=True), '{weights}')\"`"
            )
        raise AdapterLoadError(f"no {WEIGHTS_NAME} in {folder}")
    try:
        with safe_open(str(weights), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise AdapterLoadError(f"{weights} is not a readable safetensors file ({exc}); it may be truncated or "
                               "corrupted") from None
    config_file = folder / CONFIG_NAME
    if not config_file.is_file():
        raise AdapterLoadError(f"no {CONFIG_NAME} in {folder}")
    # the json is what PEFT, vLLM and transformers read, so it is what lorakit loads too
    config = _parse_config(config_file.read_text(encoding="utf-8", errors="replace"), config_file)
    saved = _saved_config(metadata.get(META_CONFIG))
    for key, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise AdapterLoadError(f"{weights}: tensor {key!r} has dtype {tensor.dtype}; adapter tensors must be "
                                   "floating point")
        if not torch.isfinite(tensor).all():
            raise AdapterLoadError(f"{weights}: tensor {key!r} contains NaN or Inf values")
    return AdapterFiles(folder, config, tensors, saved if saved != config else None)


def _saved_config(text: str | None) -> LoraConfig | None:
    """The config lorakit stored inside the weights file (None if absent or unreadable)."""
    if text is None:
        return None
    try:
        return LoraConfig.from_json(text)
    except (ConfigError, TypeError):
        return None


def _parse_config(text: str, source: Path) -> LoraConfig:
    try:
        return LoraConfig.from_json(text)
    except ConfigError as exc:
        raise ConfigError(exc.field, f"{exc.detail} (in {source})") from None
    except TypeError as exc:
        raise ConfigError("adapter_config", f"{exc} (in {source})") from None


def config_differences(files: AdapterFiles) -> str:
    """How the json differs from the config lorakit saved with the tensors ("" when it does not)."""
    if files.saved_config is None:
        return ""
    ours, saved = files.config, files.saved_config
    fields = [f.name for f in dataclasses.fields(LoraConfig) if getattr(ours, f.name) != getattr(saved, f.name)]
    return "; ".join(f"{n}={getattr(ours, n)!r} in {CONFIG_NAME}, {getattr(saved, n)!r} saved with the tensors"
                     for n in fields)


def warn_config_differences(files: AdapterFiles, differences: str, doing: str, stacklevel: int = 3) -> None:
    """Warn that the json was edited against the tensors (`config_differences`) and that it is what counts;
    `stacklevel` as `warnings.warn`'s, counted from here (3: the caller of the function calling this one)."""
    warnings.warn(f"{files.folder / CONFIG_NAME} differs from the config lorakit saved with the tensors "
                  f"({differences}); {doing} what the json says, as PEFT and vLLM do", stacklevel=stacklevel)


def _expected_tensors(model: nn.Module, files: AdapterFiles, adapter: str):
    """Map every file key to the (module path, attribute) it loads into, checking shapes against the model.

    Returns the inject plan and `{file key: (path, attr, expected shape)}`.
    """
    config = files.config
    weights = files.folder / WEIGHTS_NAME
    try:
        p = plan(model, config)
    except LoraError as exc:
        raise AdapterLoadError(f"{files.folder}: adapter does not fit this model: {exc}") from None
    expected: dict[str, tuple[str, str, tuple[int, ...]]] = {}
    slice_specs: dict[str, SliceSpec] = {}
    for path, module in p.targets:
        base = module.base_layer if isinstance(module, LoraLayer) else module
        cls = wrapper_for(base)  # shapes come from the kind and the base; no layer is built here
        out_features = cls.features(base)[1]
        rank, slices = config.rank_for(p.config_key(path)), config.slices_for(path)
        if slices is not None:  # stored dense (rank r * k) in the file
            slice_specs[path] = SliceSpec.resolve(slices, out_features, "cpu")
            rank *= slice_specs[path].k
        for suffix, (attr, shape) in cls.file_layout(base, rank, p.parameters.get(path)).items():
            expected[f"{PREFIX}{path}.{suffix}"] = (path, attr, shape)
        if config.use_dora:
            expected[f"{PREFIX}{path}.{MAGNITUDE}"] = (path, MAGNITUDE, (out_features,))
        if config.lora_bias:
            expected[f"{PREFIX}{path}.lora_B.bias"] = (path, "lora_B.bias", (out_features,))
    for path, module in p.saves:
        original = module.original_module if isinstance(module, ModulesToSave) else module
        for name, tensor in original.state_dict().items():
            expected[f"{PREFIX}{path}.{name}"] = (path, name, tuple(tensor.shape))
    for owner, key in trainable_biases(model, config.bias, {path for path, _ in p.targets}):
        expected[f"{PREFIX}{key}"] = (key, BASE_BIAS, tuple(owner.bias.shape))
    target_modules = dict(p.targets)
    for key in [k for k in files.tensors if k not in expected and k.endswith(".base_layer.weight")]:
        # PEFT saves whole base embedding tables next to embedding adapters
        # (save_embedding_layers). They carry nothing new when they equal this
        # model's weights; lorakit never overwrites base weights from an adapter file.
        path = key[len(PREFIX): -len(".base_layer.weight")]
        module = target_modules.get(path)
        base = module.base_layer if isinstance(module, LoraLayer) else module
        if base is not None and base.weight.shape == files.tensors[key].shape and torch.equal(
            base.weight.detach().cpu(), files.tensors[key].to(base.weight.dtype)
        ):
            del files.tensors[key]
        elif base is not None:
            raise AdapterLoadError(
                f"{weights}: {key!r} holds base weights that differ from this model's (a resized vocabulary?); "
                "lorakit does not overwrite base weights from adapter files"
            )
    for key, tensor in files.tensors.items():
        if key not in expected:
            hint = "" if key.startswith(PREFIX) else f" (PEFT keys start with {PREFIX!r})"
            raise AdapterLoadError(
                f"{weights}: unexpected key {key!r}{hint}: no module of {type(model).__name__} selected by the "
                "adapter's config "
                "(target_modules / modules_to_save) has it"
            )
        shape = expected[key][2]
        if tuple(tensor.shape) != shape:
            raise AdapterLoadError(
                f"{weights}: tensor {key!r} has shape {tuple(tensor.shape)}, but this model needs {shape} "
                f"(config r={config.rank_for(p.config_key(expected[key][0]))})"
            )
    for path, spec in slice_specs.items():
        key = f"{PREFIX}{path}.lora_B.weight"
        if key not in files.tensors:
            continue  # reported as missing below
        try:
            files.tensors[key] = spec.compact(files.tensors[key])
        except ValueError as exc:
            raise AdapterLoadError(f"{weights}: tensor {key!r}: {exc} (config fused_slices {spec.as_dict()})") from None
    missing = [k for k in expected if k not in files.tensors]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise AdapterLoadError(f"{weights}: missing key {missing[0]!r}{more}")
    return p, expected


def load_adapter(
    model: nn.Module,
    path: str | Path,
    adapter: str = "default",
    *,
    trainable: bool = True,
    activate: bool | None = None,
) -> nn.Module:
    """Load a PEFT-layout adapter folder into `model` as adapter `adapter`.

    Injects the adapter's layers if needed, checks every key, shape, dtype and value
    against the model and the config *before* changing anything, then copies the
    tensors in. The loaded adapter is trainable while active unless `trainable=False`
    (see `lorakit.set_active` for the rule). It becomes active if it is the model's first
    adapter (pinned ones, `lorakit.quant.qera`, aside), or if `activate=True`.

    Returns:
        `model`.
    Raises:
        AdapterLoadError: naming the file and the first bad key (missing, unexpected,
            wrong shape, non-finite), or a folder that is missing, pickle-only or corrupt.
        ConfigError: an invalid `adapter_config.json` field.
        AdapterExistsError: the model already has an adapter of that name.
    """
    check_adapter_name(model, adapter)
    files = read_adapter(path)
    inner = unwrap(model)
    differences = config_differences(files)
    try:
        p, expected = _expected_tensors(inner, files, adapter)
    except AdapterLoadError as exc:
        if differences:  # the json was edited (or written by another tool) against the tensors
            raise AdapterLoadError(f"{files.folder / CONFIG_NAME} contradicts the tensors ({differences}): "
                                   f"{exc}") from None
        raise
    if differences:
        warn_config_differences(files, differences, "loading")

    first = not has_adapters(inner)
    previous_active = () if first else get_state(inner).active
    # a model holding only pinned adapters (a frozen NF4 correction) gets its first real adapter: activate it
    only_pinned = not first and set(get_state(inner).configs) <= set(get_state(inner).pinned)
    try:
        inject(inner, files.config, adapter, plan_=p)
        for key, tensor in files.tensors.items():
            path_, attr, _ = expected[key]
            module = inner.get_submodule(path_) if attr != BASE_BIAS else None
            if isinstance(module, LoraLayer):
                module.load_file_tensor(adapter, attr, tensor)  # each kind's file layout (PEFT's)
                continue
            target = _target_tensor(inner, path_, attr, adapter)
            with torch.no_grad():
                target.copy_(tensor.to(dtype=target.dtype, device=target.device))
    except BaseException:
        if first:
            unload(inner)
        elif adapter in get_state(inner).configs:
            delete_adapter(inner, adapter)
            set_active(inner, previous_active)
        raise
    if not trainable:
        get_state(inner).frozen.add(adapter)
    set_active(inner, [adapter] if (first or only_pinned or activate) else previous_active)
    return model


def _target_tensor(model: nn.Module, path: str, attr: str, adapter: str) -> torch.Tensor:
    """The tensor a file key loads into: a trained base bias (`path` is its full key) or a `modules_to_save` copy's."""
    if attr == BASE_BIAS:  # `path` is the bias's full key in the adapted model
        return model.get_parameter(path)
    copy = model.get_submodule(path).modules_to_save[adapter]
    return copy.get_parameter(attr) if attr in dict(copy.named_parameters()) else copy.get_buffer(attr)


def save_adapters(model: nn.Module, path: str | Path) -> Path:
    """Save every adapter as PEFT's `save_pretrained` does: `default` in `path`, others in `path/<name>/`.

    A pinned adapter (the frozen NF4 correction of `lorakit.quant.qera`) is part of the base and
    is not saved; `lorakit.quant.fold_corrections` puts it into an adapter that is.
    """
    state = get_state(model)
    for name in state.configs:
        if name in state.pinned:
            continue
        save_adapter(model, Path(path) if name == "default" else Path(path) / name, name)
    return Path(path)


def load_adapters(model: nn.Module, path: str | Path, *, trainable: bool = True) -> tuple[str, ...]:
    """Load a folder written by `save_adapters` or PEFT's `save_pretrained` with several adapters.

    `path` itself (if it holds an adapter) loads as `default`; each sub-folder holding
    an adapter loads under the sub-folder's name. Returns the names loaded, in order.
    Each adapter is validated before it is loaded (see `load_adapter`).
    """
    root = Path(path)
    if not root.is_dir():
        raise AdapterLoadError(f"adapter path {root} is not a folder")
    found = [("default", root)] if (root / CONFIG_NAME).exists() else []
    found += [(sub.name, sub) for sub in sorted(root.iterdir()) if sub.is_dir() and (sub / CONFIG_NAME).exists()]
    if not found:
        raise AdapterLoadError(f"no adapter folders in {root}")
    for name, folder in found:
        load_adapter(model, folder, name, trainable=trainable)
    return tuple(name for name, _ in found)


# ---------------------------------------------------------------------- PiSSA / OLoRA -> plain LoRA
def pissa_to_lora(model: nn.Module, adapter: str = "default") -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """The PiSSA/OLoRA adapter `adapter` as an ordinary LoRA adapter for the ORIGINAL base weights.

    After training, the model computes `W_res + s B A = W0 + s (B A - B0 A0)`, so the
    update relative to the original `W0` is a rank-`2r` LoRA with the same scaling
    (PEFT's `path_initial_model_for_weight_conversion`):

        A' = [A; A0]: (2r, in),   B' = [B, -B0]: (out, 2r),   scaling' = scaling

    (`r' = 2r`; `alpha' = 2 alpha`, or `sqrt(2) alpha` with rsLoRA; rank/alpha patterns
    likewise). A DoRA magnitude vector carries over unchanged, since
    `W_res + s B A = W0 + s B' A'` is also the vector it normalises.

    Returns:
        `(config, tensors)`: a `LoraConfig` with `init="kaiming"` and the tensors under
        their PEFT file keys (CPU), as `adapter_state_dict` gives them.
    Raises:
        AdapterNotFoundError: no such adapter.
        LoraError: the adapter was not initialised by PiSSA/OLoRA, or a layer lacks its
            initial factors (e.g. the model was deep-copied without them).
    """
    config = require_adapter(model, adapter)
    if not is_weight_init(config.init):
        raise LoraError(f"adapter {adapter!r} has init={config.init!r}; only PiSSA/OLoRA adapters need converting")
    tensors = adapter_state_dict(model, adapter)
    for path, layer in lora_layers(model):
        if adapter not in layer.lora_A:
            continue
        record = init_record(layer)
        factors = record.factors.get(adapter) if record is not None else None
        if factors is None:
            raise LoraError(f"module {path!r} has no initial {config.init} factors for adapter {adapter!r}; cannot "
                            "convert")
        _, A0, B0 = factors
        key_a, key_b = (f"{PREFIX}{path}.{k}" for k in layer.file_keys)
        A, B = tensors[key_a], tensors[key_b]
        tensors[key_a] = torch.cat([A, A0.to(A.dtype)], dim=0).contiguous()
        tensors[key_b] = torch.cat([B, -B0.to(B.dtype)], dim=1).contiguous()
    factor = math.sqrt(2.0) if config.use_rslora else 2.0
    converted = config.replace(
        init="kaiming", r=2 * config.r, alpha=factor * config.alpha,
        rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
        alpha_pattern={k: factor * v for k, v in config.alpha_pattern.items()},
    )
    return converted, tensors


def convert_pissa_to_lora(model: nn.Module, path: str | Path, adapter: str = "default") -> Path:
    """Save the trained PiSSA/OLoRA adapter `adapter` as a plain rank-`2r` LoRA adapter for the original base.

    The folder (PEFT layout, written as `save_adapter` writes) loads with `load_adapter`
    or PEFT onto the unmodified base model and reproduces the trained model
    (`W0 + scaling * (B A - B0 A0) = W_res + scaling * B A`); see `pissa_to_lora`.

    Returns:
        The folder path.
    Raises:
        LoraError: as `pissa_to_lora`, or `path` exists and is not a folder.
    """
    check_folder(path)
    converted, tensors = pissa_to_lora(model, adapter)
    file_config, fan_in_fan_out, _ = config_for_file(model, adapter)
    converted = converted.replace(
        target_modules=file_config.target_modules, base_model_name_or_path=file_config.base_model_name_or_path
    )
    return write_adapter_files(path, tensors, converted.to_json(fan_in_fan_out))


def read_config(path: str | Path) -> LoraConfig:
    """The `LoraConfig` of a saved adapter folder."""
    return read_adapter(path).config


__all__ = ["save_adapter", "save_adapters", "load_adapter", "load_adapters", "read_adapter", "read_config",
           "adapter_state_dict",
           "pissa_to_lora", "convert_pissa_to_lora"]
