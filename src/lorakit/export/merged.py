"""The merged model (adapters folded in) as a complete GGUF model file that llama.cpp runs alone.

The weights: every parameter of the model with its active adapters folded in
(`W0 + delta_weight`, from the saved original, in float32: `LoraLayer.merged_weight`, the same
rule as `lorakit.merge`), active `modules_to_save` copies in place of their originals. The model
itself is not changed. Names and layouts as llama.cpp's `convert_hf_to_gguf.py` writes them
(see `lorakit.export.arch`).

The metadata: a GGUF model file carries its tokenizer and chat template. They are taken from
`source_gguf` (for a model converted from a GGUF file: that file). When the source is a model of
the same architecture and size, all its metadata is carried over as it is (only `general.file_type`
changes); otherwise the hyper-parameters are written from the model's transformers config and
only the source's `tokenizer.*` keys are carried over.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import nn

from ..layers import LoraLayer, ModulesToSave
from ..layers.experts import LoraExperts
from ..layers.linear import is_conv1d
from ..state import unwrap
from .arch import OPTIONAL_OUTPUT, GGUFArch, GGUFExportError, check_routing, expert_parts, field_value, open_reader
from .writer import Tensor, Value, check_outtype, encode, file_type, write_gguf

# metadata the writer sets itself, never copied from the source
_OWN_KEYS = ("general.architecture", "general.file_type", "general.type", "general.quantization_version")


@dataclass
class MergedExport:
    """What `export_gguf_merged` wrote: the file, its `outtype`, tensor count, and the adapted
    weights (llama.cpp name -> names of the adapters folded into it)."""

    path: Path
    outtype: str
    n_tensors: int
    merged: dict[str, list[str]] = field(default_factory=dict)
    metadata_from: str = ""  # "source" (all keys carried over) or "config" (+ the source's tokenizer)


def export_gguf_merged(model: nn.Module, out_file: str | Path, *, source_gguf: str | Path,
                       outtype: str = "f16") -> MergedExport:
    """Write `model` with its active adapters merged as a GGUF model file for llama.cpp.

    Args:
        model: a transformers causal LM (Llama, GPT-2, or the mixture-of-experts Mixtral, Qwen2-MoE,
            Qwen3-MoE, OLMoE), with or without lorakit adapters (expert adapters included); it is not
            modified.
        out_file: the `.gguf` file to write (replaced atomically).
        source_gguf: a GGUF model file whose tokenizer and chat template the new file carries
            (for a model converted from a GGUF file: that file).
        outtype: `f16` (default), `bf16`, `q8_0` or `f32` for the matrices; norms and other
            1-D tensors stay float32.
    Returns:
        A `MergedExport`.
    Raises:
        GGUFExportError: an unsupported architecture, a parameter llama.cpp has no tensor for
            (naming it), a 4-bit (QLoRA) base layer (call `lorakit.merge_and_unload` first), a
            source file whose vocabulary does not fit the model, a mixture-of-experts routing
            llama.cpp computes differently (`lorakit.export.arch.check_routing`).
    """
    check_outtype(outtype)
    inner = unwrap(model)
    config = getattr(inner, "config", None)
    if config is None:
        raise GGUFExportError(f"{type(inner).__name__} has no transformers config; a GGUF model file needs one")
    arch = GGUFArch.from_config(config)
    check_routing(arch, config)
    hparams = _hparams(arch, config)  # refuses what llama.cpp cannot run before the slow part
    reader = open_reader(source_gguf)
    tensors, merged, seen = [], {}, {}
    for hf_name, value, conv1d, adapters in plain_parameters(inner):
        array = value.detach().to(torch.float32).cpu().numpy()
        if conv1d and array.ndim == 2:
            array = array.T
        for part, rows in expert_parts(hf_name, array):
            name = arch.tensor_name(part)
            if name is None:
                raise GGUFExportError(f"{hf_name}: llama.cpp's {arch.arch} model has no tensor for this parameter")
            if name in seen:
                raise GGUFExportError(f"{hf_name} and {seen[name]} both map to llama.cpp's {name}")
            seen[name] = hf_name
            tensors.append(encode(name, arch.permute_rows(name, rows), outtype))
            if adapters:
                merged[name] = adapters
    if arch.arch in OPTIONAL_OUTPUT:
        _drop_tied_output(tensors, inner)
    values, source = _metadata(reader, arch, hparams, config, outtype)
    write_gguf(out_file, arch.arch, values, tensors)
    return MergedExport(Path(out_file), outtype, len(tensors), merged, source)


def tensor_shapes(arch: GGUFArch, config) -> dict[str, tuple[int, ...]]:
    """llama.cpp tensor name -> shape (numpy order) of the model `config` describes, as `export_gguf_merged`
    would write it: what an adapter is checked against when no GGUF file of the base is given. The model is
    built on the meta device (no memory, no values)."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError, TypeError) as exc:
        raise GGUFExportError(f"cannot build a {config.model_type} model from its config: {exc}") from None
    shapes = {}
    for hf_name, p, conv1d, _ in plain_parameters(model):
        shape = tuple(reversed(p.shape)) if conv1d and p.dim() == 2 else tuple(p.shape)
        for part, rows in expert_parts(hf_name, np.broadcast_to(np.float32(0), shape)):  # views: no memory
            name = arch.tensor_name(part)
            if name is not None:
                shapes[name] = rows.shape
    return shapes


def plain_parameters(model: nn.Module, prefix: str = "") -> Iterator[tuple[str, torch.Tensor, bool, list[str]]]:
    """`(name, tensor, from a Conv1D, adapters folded in)` for every parameter of `model` as the plain
    base architecture would name it, active adapters merged (computed, not written into the model).

    Tied parameters are yielded under each name (the caller decides). Raises `GGUFExportError`
    for a 4-bit base layer.
    """
    for name, p in model.named_parameters(recurse=False):
        yield f"{prefix}{name}", p, is_conv1d(model), []
    for child_name, child in model.named_children():
        path = f"{prefix}{child_name}"
        if isinstance(child, ModulesToSave):
            yield from plain_parameters(child.original_module if child.disabled else child.current(), path + ".")
        elif isinstance(child, LoraLayer):
            yield from _layer_parameters(child, path)
        else:
            yield from plain_parameters(child, path + ".")


def _layer_parameters(layer: LoraLayer, path: str):
    if getattr(layer, "quantized_base", False):
        raise GGUFExportError(f"{path}: a 4-bit (QLoRA) base layer; call lorakit.merge_and_unload(model) first, "
                              "then export the plain model")
    active = [] if layer.disabled else [n for n in layer.active_adapters if n in layer.lora_A]
    if isinstance(layer, LoraExperts):  # several weights, each with the adapters that adapt it
        for name, p in layer.base_layer.named_parameters(recurse=False):
            adapted = [n for n in active if name in layer.targets[n]]
            yield f"{path}.{name}", layer.merged_weight(adapted, name) if p.dim() == 3 else p, False, adapted
        return
    conv1d = is_conv1d(layer.base_layer)
    for name, p in layer.base_layer.named_parameters(recurse=False):
        if name == "weight":
            yield f"{path}.weight", layer.merged_weight(active), conv1d, active  # W0 itself when none is active
        else:
            yield f"{path}.{name}", p, conv1d, []


def _drop_tied_output(tensors: list[Tensor], model: nn.Module) -> None:
    """Drop `output.weight` when the head is the token embedding itself and neither carries an active
    adapter (llama.cpp then reuses `token_embd`). Once either is merged the two differ, as after
    `lorakit.merge`, which unties them."""
    head, embed = getattr(model, "get_output_embeddings",
                          lambda: None)(), getattr(model, "get_input_embeddings", lambda: None)()

    def plain(module):
        adapted = isinstance(module, LoraLayer) and not module.disabled and any(
            n in module.lora_A for n in module.active_adapters)
        return (module.base_layer if isinstance(module, LoraLayer) else module), adapted

    (head, head_adapted), (embed, embed_adapted) = plain(head), plain(embed)
    tied = head is not None and embed is not None and getattr(head, "weight", None) is getattr(embed, "weight", 0)
    if tied and not head_adapted and not embed_adapted:
        tensors[:] = [t for t in tensors if t.name != "output.weight"]


def _metadata(reader, arch: GGUFArch, hparams: list[Value], config, outtype: str) -> tuple[list[Value], str]:
    """The file's metadata: the source's (same model) or generated hparams + the source's tokenizer."""
    import gguf

    same = field_value(reader, "general.architecture") == arch.arch and all(
        field_value(reader, v.key) is not None and np.isclose(float(field_value(reader, v.key)), float(v.value),
                                                              rtol=1e-6)
        for v in hparams)
    keys = [k for k in reader.fields if not k.startswith("GGUF.") and k not in _OWN_KEYS]
    if not same:
        keys = [k for k in keys if k.startswith("tokenizer.")]
        tokens = field_value(reader, "tokenizer.ggml.tokens")
        vocab = getattr(config, "vocab_size", None)
        if tokens is None or len(tokens) != vocab:
            raise GGUFExportError(f"the source GGUF's tokenizer has {len(tokens or [])} tokens, the model's vocabulary "
                                  f"{vocab}: it is not this model's tokenizer")
    values = [Value("general.type", "model", gguf.GGUFValueType.STRING)]
    values += [] if same else hparams
    values += [_copy(reader.fields[k]) for k in keys]
    values += [Value("general.file_type", file_type(outtype), gguf.GGUFValueType.UINT32),
               Value("general.quantization_version", gguf.GGML_QUANT_VERSION, gguf.GGUFValueType.UINT32)]
    return values, "source" if same else "config"


def _copy(f) -> Value:
    """A reader field as a writer value, strings kept as their raw bytes."""
    import gguf

    main = f.types[0]
    if main == gguf.GGUFValueType.ARRAY:
        sub = f.types[-1]
        items = [bytes(f.parts[i]) for i in f.data] if sub == gguf.GGUFValueType.STRING else f.contents()
        return Value(f.name, items, main, sub)
    return Value(f.name, bytes(f.parts[f.data[0]]) if main == gguf.GGUFValueType.STRING else f.contents(), main)


def _hparams(arch: GGUFArch, config) -> list[Value]:
    """llama.cpp's hyper-parameter keys for `config`, as its `convert_hf_to_gguf.py` writes them."""
    from gguf import GGUFValueType as T

    a = arch.arch
    if a == "gpt2":
        pairs = [("context_length", config.n_positions, T.UINT32), ("embedding_length", config.n_embd, T.UINT32),
                 ("feed_forward_length", config.n_inner or 4 * config.n_embd, T.UINT32),
                 ("block_count", config.n_layer, T.UINT32), ("attention.head_count", config.n_head, T.UINT32),
                 ("attention.layer_norm_epsilon", config.layer_norm_epsilon, T.FLOAT32)]
        return [Value(f"{a}.{k}", v, t) for k, v, t in pairs]
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    if rope.get("rope_type", "default") not in ("default", None):
        raise GGUFExportError(f"rope scaling {rope.get('rope_type')!r} is not supported by the GGUF export")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    pairs = [("block_count", config.num_hidden_layers, T.UINT32),
             ("context_length", config.max_position_embeddings, T.UINT32),
             ("embedding_length", config.hidden_size, T.UINT32), ("feed_forward_length", config.intermediate_size,
                                                                  T.UINT32),
             ("attention.head_count", config.num_attention_heads, T.UINT32),
             ("attention.head_count_kv", arch.n_head_kv, T.UINT32), ("rope.freq_base", theta, T.FLOAT32),
             ("attention.layer_norm_rms_epsilon", config.rms_norm_eps, T.FLOAT32),
             ("rope.dimension_count", head_dim, T.UINT32), ("vocab_size", config.vocab_size, T.UINT32)]
    if head_dim * config.num_attention_heads != config.hidden_size:
        pairs += [("attention.key_length", head_dim, T.UINT32), ("attention.value_length", head_dim, T.UINT32)]
    if arch.n_expert:
        pairs += [("expert_count", arch.n_expert, T.UINT32),
                  ("expert_used_count", config.num_experts_per_tok, T.UINT32)]
        for key, attr in (("expert_feed_forward_length", "moe_intermediate_size"),
                          ("expert_shared_feed_forward_length", "shared_expert_intermediate_size")):
            if getattr(config, attr, None):
                pairs.append((key, getattr(config, attr), T.UINT32))
    return [Value(f"{a}.{k}", v, t) for k, v, t in pairs]


__all__ = ["export_gguf_merged", "MergedExport", "plain_parameters", "tensor_shapes"]
