"""A LoRA adapter as a llama.cpp adapter file (GGUF), for `llama-cli --lora FILE` and the like.

The file (what llama.cpp's `llama_adapter_lora_init` reads, and its `convert_lora_to_gguf.py`
writes):

- metadata `general.architecture` (the base model's, e.g. `llama`), `general.type = "adapter"`,
  `adapter.type = "lora"`, `adapter.lora.alpha` (float32);
- per adapted weight `W` of llama.cpp name `N` (`blk.3.attn_q.weight`): `N.lora_a` and `N.lora_b`.
  In numpy/torch order `lora_a` is `A: (r, in_features)` and `lora_b` is `B: (out_features, r)`,
  i.e. GGUF shapes `[in, r]` and `[r, out]`; for the token embedding `lora_a` is `A.T: (num_embeddings, r)`
  (llama.cpp gathers its rows by token id); for a stack of expert weights (`blk.3.ffn_up_exps.weight`)
  `A: (experts, r, in)` and `B: (experts, out, r)`, one pair per expert (`lorakit.export.arch`).

llama.cpp computes `W x + s * B (A x)` with `s = adapter.lora.alpha / r` (`r` read from each
`lora_b`'s shape) times the user's `--lora-scaled` factor (1 by default). One alpha serves the
whole file, so lorakit's per-module `scaling` (`alpha / r`, rsLoRA's `alpha / sqrt(r)`,
`rank_pattern`, `alpha_pattern`, per-slice adapters stored with a dense block-diagonal `B`) is
matched exactly: the file's alpha is the most common `scaling * r`, and a module whose
`scaling * r` differs has its `B` multiplied by `scaling * r / alpha` (in float64, rounded once).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..config import matches
from ..io import (PREFIX, adapter_state_dict, config_differences, config_for_file, read_adapter, resolve_adapter,
                  warn_config_differences)
from ..layers.experts import EXPERT_WEIGHTS, LoraExperts
from ..state import has_adapters, unwrap
from .arch import ADAPTABLE, GGUFArch, GGUFExportError, check_routing, expert_parts, field_value, open_reader
from .merged import tensor_shapes
from .writer import Value, check_outtype, encode, write_gguf
from ..variants.pissa import is_weight_init

_LINEAR = ("lora_A.weight", "lora_B.weight")
_EMBEDDING = ("lora_embedding_A", "lora_embedding_B")


@dataclass
class AdapterExport:
    """What `export_gguf_adapter` wrote.

    Attributes:
        path: the GGUF file.
        arch: llama.cpp architecture name.
        alpha: the file's `adapter.lora.alpha`.
        tensors: llama.cpp weight name -> HF module path, for every adapted weight.
        rescaled: HF module paths whose `B` was multiplied to match the file's single alpha.
    """

    path: Path
    arch: str
    alpha: float
    tensors: dict[str, str] = field(default_factory=dict)
    rescaled: list[str] = field(default_factory=list)


@dataclass
class _Pair:
    path: str  # HF module path (expert weights: `<experts path>.<weight>`)
    A: torch.Tensor  # (r, in); expert weights (experts, r, in)
    B: torch.Tensor  # (out, r); expert weights (experts, out, r)
    embedding: bool
    scaling: float
    lookup: str = ""  # the HF parameter name whose llama.cpp tensor this pair adapts (default `<path>.weight`)


def export_gguf_adapter(adapter: str | Path | nn.Module, out_file: str | Path, *, model=None,
                        base_gguf: str | Path | None = None, adapter_name: str | None = None,
                        outtype: str = "f32") -> AdapterExport:
    """Write a LoRA adapter as a llama.cpp LoRA adapter GGUF file (layout in the module docstring).

    Args:
        adapter: a saved adapter folder (PEFT layout), or a model carrying lorakit adapters.
        out_file: the `.gguf` file to write (replaced atomically).
        model: the base model (`nn.Module`) or its transformers config, when `adapter` is a folder:
            it gives the architecture, head counts and whether the head is tied.
        base_gguf: the base model's GGUF file that llama.cpp will load the adapter onto. When given,
            every adapted weight is checked against it (name, shape), as llama.cpp does on load,
            and it stands in for `model`.
        adapter_name: which adapter of a model (default: "default", else its only one).
        outtype: `f32` (default, exact), `f16` or `bf16` for the A and B tensors.
    Returns:
        An `AdapterExport` (file, alpha, tensor names, rescaled modules).
    Raises:
        GGUFExportError: (naming the module) a DoRA magnitude vector, `modules_to_save`, trained
            biases, PiSSA/OLoRA factors (convert them first), a module llama.cpp has no LoRA for
            (or an embedding/head LoRA on a tied embedding), an unsupported architecture, a
            base GGUF that does not fit, or missing base information.
        AdapterLoadError, ConfigError: an unreadable adapter folder.
    """
    check_outtype(outtype, ("f32", "f16", "bf16"))
    config, tensors, owner = _adapter_source(adapter, adapter_name)
    arch, base_shapes = _base_info(model if model is not None else owner, base_gguf)
    _refuse_variants(config, tensors)
    pairs = _split_gate_up(_pairs(config, tensors, arch.n_expert))
    names = {p.path: _gguf_name(arch, p, base_shapes) for p in pairs}
    pairs.sort(key=lambda p: _order(names[p.path]))  # the same file from a folder or from a model
    alpha, factors = _alpha(pairs)
    out = AdapterExport(Path(out_file), arch.arch, alpha)
    written = []
    for p in pairs:
        name = names[p.path]
        a, b = p.A.detach().to(torch.float64).numpy(), p.B.detach().to(torch.float64).numpy()
        if factors[p.path] != 1.0:
            b = b * factors[p.path]
            out.rescaled.append(p.path)
        b = arch.permute_rows(name, b)
        written += [encode(f"{name}.lora_a", a.T if p.embedding else a, outtype), encode(f"{name}.lora_b", b, outtype)]
        out.tensors[name] = p.path
    write_gguf(out.path, arch.arch, _metadata(alpha, config), written)
    return out


def _refuse_variants(config, tensors) -> None:
    """DoRA and PiSSA/OLoRA adapters have no llama.cpp LoRA form."""

    if config.use_dora:
        key = next((k for k in tensors if k.endswith("lora_magnitude_vector")), "")
        raise GGUFExportError(f"{_module_of(key) or 'the adapter'}: DoRA's magnitude vector has no form in a llama.cpp "
                              "LoRA file; export the merged model instead (--merged)")
    if is_weight_init(config.init):
        raise GGUFExportError(f"init={config.init!r}: this adapter belongs to a residual base, not the original model; "
                              "convert it first (lorakit.convert_pissa_to_lora), or export the merged model")


def _metadata(alpha: float, config) -> list[Value]:
    import gguf

    values = [Value("general.type", "adapter", gguf.GGUFValueType.STRING),
              Value("adapter.type", "lora", gguf.GGUFValueType.STRING),
              Value("adapter.lora.alpha", alpha, gguf.GGUFValueType.FLOAT32)]
    if config.base_model_name_or_path:
        values.append(Value("general.name", f"LoRA adapter for {Path(config.base_model_name_or_path).name}",
                            gguf.GGUFValueType.STRING))
    return values


def _adapter_source(adapter, adapter_name):
    """`(config, {file key: tensor}, model or None)` of a folder or of a model's adapter."""
    if isinstance(adapter, nn.Module):
        inner = unwrap(adapter)
        if not has_adapters(inner):
            raise GGUFExportError(f"{type(inner).__name__} has no lorakit adapters to export")
        name = resolve_adapter(inner, adapter_name)
        return config_for_file(inner, name)[0], adapter_state_dict(inner, name), inner  # presets resolved
    if adapter_name is not None:
        raise GGUFExportError("adapter_name applies to a model, not to an adapter folder")
    files = read_adapter(adapter)
    differences = config_differences(files)
    if differences:
        warn_config_differences(files, differences, "exporting", stacklevel=4)  # export_gguf_adapter's caller
    return files.config, files.tensors, None


def _base_info(model, base_gguf) -> tuple[GGUFArch, dict[str, tuple[int, ...]]]:
    """The architecture facts, and the base's tensor shapes (numpy order): the GGUF file's when one is given,
    else those of the model's config (`tensor_shapes`). A model whose routing llama.cpp computes
    differently is refused (`check_routing`): the adapter would not do there what it does here."""
    from_model = None
    if model is not None:
        config = getattr(unwrap(model), "config", None) if isinstance(model, nn.Module) else model
        if config is None:
            raise GGUFExportError(f"{type(model).__name__} has no transformers config; pass base_gguf (the base "
                                  "model's GGUF file)")
        from_model = GGUFArch.from_config(config)
        check_routing(from_model, config)
    if base_gguf is None:
        if from_model is None:
            raise GGUFExportError("the base model is unknown: pass model (the base model or its config) or base_gguf")
        return from_model, tensor_shapes(from_model, config)
    reader = open_reader(base_gguf)
    if field_value(reader, "general.type", "model") != "model":
        raise GGUFExportError(f"{base_gguf} is a GGUF {field_value(reader, 'general.type')!r} file, not a model")
    arch = GGUFArch.from_gguf(reader)
    if from_model is not None and (from_model.arch, from_model.n_layer, from_model.n_head, from_model.n_head_kv) != (
            arch.arch, arch.n_layer, arch.n_head, arch.n_head_kv):
        raise GGUFExportError(f"the model ({from_model.arch}, {from_model.n_layer} layers, {from_model.n_head} "
                              "heads) and "
                              f"{base_gguf} ({arch.arch}, {arch.n_layer} layers, {arch.n_head} heads) are different "
                              "models")
    return arch, {t.name: tuple(int(d) for d in reversed(t.shape)) for t in reader.tensors}


def _module_of(key: str) -> str:
    """The module path of an adapter file key (`base_model.model.<path>.lora_A.weight` -> `<path>`)."""
    key = key[len(PREFIX):] if key.startswith(PREFIX) else key
    for suffix in (*_LINEAR, *_EMBEDDING, "lora_magnitude_vector"):
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1]
    return key.rpartition(".")[0]  # a modules_to_save copy or a bias: `<path>.weight`


def _pairs(config, tensors: dict[str, torch.Tensor], n_expert: int) -> list[_Pair]:
    """The (A, B) pairs by module, in file order; refuses every other tensor, naming it."""
    found: dict[str, dict[str, torch.Tensor]] = {}
    tensors = _expert_tensors(config, tensors, n_expert)
    for key, tensor in tensors.items():
        suffix = next((s for s in (*_LINEAR, *_EMBEDDING) if key.endswith("." + s)), None)
        if suffix is None:
            what = "a trained base bias" if config.bias != "none" and key.endswith(".bias") else \
                "a modules_to_save copy" if config.modules_to_save else "not a LoRA factor"
            raise GGUFExportError(f"{_module_of(key)}: tensor {key!r} is {what}; a llama.cpp LoRA file holds only "
                                  "A/B pairs (export the merged model instead: --merged)")
        found.setdefault(_module_of(key), {})[suffix] = tensor
    pairs = []
    for path, parts in found.items():
        embedding = _EMBEDDING[0] in parts or _EMBEDDING[1] in parts
        a_key, b_key = _EMBEDDING if embedding else _LINEAR
        if a_key not in parts or b_key not in parts:
            raise GGUFExportError(f"{path}: the adapter has only one of {a_key} and {b_key}")
        _check_rank(config, path, parts[a_key], parts[b_key])
        pairs.append(_Pair(path, parts[a_key], parts[b_key], embedding, config.scaling_for(path)))
    if not pairs:
        raise GGUFExportError("the adapter has no LoRA tensors")
    return pairs


def _check_rank(config, path: str, A: torch.Tensor, B: torch.Tensor) -> None:
    """A and B form one pair of the rank the config gives (`r`, `rank_pattern`; per-slice adapters are stored
    dense, rank `r * k`): the scaling written into the file is computed from the config's rank."""
    r = A.shape[-2]
    if B.shape[-1] != r or A.shape[:-2] != B.shape[:-2]:
        raise GGUFExportError(f"{path}: A {tuple(A.shape)} and B {tuple(B.shape)} do not form one low-rank pair")
    slices = config.slices_for(path)
    want = config.rank_for(path) * (sum(slices[1]) if slices else 1)
    if r != want:
        raise GGUFExportError(f"{path}: rank {r} in the tensors, {want} in adapter_config.json (r / rank_pattern)")


def _expert_tensors(config, tensors: dict[str, torch.Tensor], n_expert: int) -> dict[str, torch.Tensor]:
    """`tensors` with PEFT's nested expert keys (`<experts>.[base_layer.]*lora_A.weight`, `(experts * r, in)`)
    rewritten as `<experts>.<weight>.lora_A.weight` `(experts, r, in)` (B: `(experts, out, r)`).

    Which weight a nesting depth holds follows from `target_parameters`: the adapted weights of an
    experts module in registration order (`EXPERT_WEIGHTS`), the last one outermost."""
    if not config.target_parameters:
        return tensors
    out = {}
    for key, tensor in tensors.items():
        module = _module_of(key)
        path, depth = module.split(".base_layer")[0], module.count(".base_layer")
        adapted = [w for w in EXPERT_WEIGHTS if matches(config.target_parameters, f"{path}.{w}")]
        if not adapted or not key.endswith(_LINEAR):
            out[key] = tensor
            continue
        if not n_expert:
            raise GGUFExportError(f"{path}: an expert adapter, but the base model has no experts")
        weight = adapted[len(adapted) - 1 - depth] if depth < len(adapted) else None
        if weight is None:
            raise GGUFExportError(f"{path}: tensor {key!r} nests deeper than the {len(adapted)} adapted expert weights")
        attr = "lora_A" if key.endswith(_LINEAR[0]) else "lora_B"
        _check_stack(path, weight, attr, tensor, n_expert, config.rank_for(f"{path}.{weight}"))
        out[f"{path}.{weight}.{attr}.weight"] = LoraExperts.from_file(attr, tensor, n_expert)
    return out


def _check_stack(path: str, weight: str, attr: str, tensor: torch.Tensor, n_expert: int, r: int) -> None:
    """A file's expert factor holds `n_expert` stacked rank-`r` factors: `(n_expert * r, in)` for A,
    `(out, r * n_expert)` for B. The file alone cannot tell a wrong rank from a wrong expert count (both
    multiply), so a mismatch names each reading that fits."""
    stacked = tensor.shape[0 if attr == "lora_A" else 1] if tensor.dim() == 2 else -1
    if stacked == n_expert * r:
        return
    readings = ([f"made for {stacked // r} experts (the base model has {n_expert})"] if stacked > 0 and not stacked % r
                else []) + ([f"of rank {stacked // n_expert} (adapter_config.json's r / rank_pattern say {r})"]
                            if stacked > 0 and not stacked % n_expert else [])
    raise GGUFExportError(f"{path}.{weight}: {attr} {tuple(tensor.shape)} is not {n_expert} experts x rank {r}"
                          + (f": the adapter was {' or '.join(readings)}" if readings else ""))


def _split_gate_up(pairs: list[_Pair]) -> list[_Pair]:
    """A pair on a fused `gate_up_proj` stack as the two pairs llama.cpp applies: the same A, each half of B."""
    out = []
    for p in pairs:
        parts = expert_parts(p.path, p.B.detach().to(torch.float64).numpy()) if p.A.dim() == 3 else []
        if len(parts) < 2:
            out.append(p)
            continue
        for lookup, b in parts:
            half = lookup.removesuffix(".weight").rpartition(".")[2]
            label = f"{p.path} ({half.removesuffix('_proj')} half)"
            out.append(_Pair(label, p.A, torch.from_numpy(b), False, p.scaling, lookup))
    return out


def _gguf_name(arch: GGUFArch, pair: _Pair, base_shapes) -> str:
    """llama.cpp's weight name for `pair`, after checking llama.cpp can apply a LoRA there."""
    name = arch.tensor_name(pair.lookup or (pair.path + ".weight"))
    kind = None if name is None else (name.split(".")[-2] if name.startswith("blk.") else name.split(".")[0])
    if name is None or not name.endswith(".weight") or kind not in ADAPTABLE[arch.arch]:
        raise GGUFExportError(f"{pair.path}: llama.cpp applies no LoRA to this module in a {arch.arch} model "
                              f"(it can: {', '.join(sorted(ADAPTABLE[arch.arch]))})")
    if kind == "token_embd" and not pair.embedding:
        raise GGUFExportError(f"{pair.path}: a linear LoRA on the token embedding has no llama.cpp form")
    if arch.tied_head and kind in ("token_embd", "output"):
        raise GGUFExportError(f"{pair.path}: the output head shares the token embedding in this model, and llama.cpp "
                              "would apply this LoRA to both; export the merged model instead (--merged)")
    if name not in base_shapes:
        raise GGUFExportError(f"{pair.path}: the base model has no tensor {name!r} (a different base model?)")
    shape = base_shapes[name]  # numpy order: (out, in); the embedding: (num_embeddings, dim); experts (e, out, in)
    want = (pair.A.shape[1], pair.B.shape[0]) if pair.embedding else (*pair.B.shape[:-1], pair.A.shape[-1])
    if tuple(shape) != tuple(want):
        raise GGUFExportError(f"{pair.path}: the adapter fits a weight of shape {want}, but the base model's "
                              f"{name} has shape {tuple(shape)} (a different base model?)")
    return name


def _order(name: str) -> tuple:
    """token_embd, then blocks in numeric order, then the rest (output): llama.cpp's usual tensor order."""
    parts = name.split(".")
    if parts[0] == "blk":
        return (1, int(parts[1]), name)
    return (0 if parts[0] == "token_embd" else 2, 0, name)


def _alpha(pairs: list[_Pair]) -> tuple[float, dict[str, float]]:
    """The file's alpha (the most common `scaling * r`, as float32) and each module's factor on B."""
    wanted = {p.path: p.scaling * p.A.shape[-2] for p in pairs}
    alpha = float(np.float32(Counter(round(v, 9) for v in wanted.values()).most_common(1)[0][0]))
    factors = {}
    for p in pairs:
        applied = float(np.float32(alpha) / np.float32(p.A.shape[-2]))  # what llama.cpp computes
        factor = p.scaling / applied
        factors[p.path] = 1.0 if math.isclose(factor, 1.0, rel_tol=1e-6) else factor
    return alpha, factors


__all__ = ["export_gguf_adapter", "AdapterExport"]
