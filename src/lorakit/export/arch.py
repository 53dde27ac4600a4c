"""What the GGUF exporters need to know about a base model, and llama.cpp's tensor names.

llama.cpp names a model's tensors `token_embd.weight`, `blk.N.attn_q.weight`, `output.weight`
... (the `gguf` package's `TensorNameMap` holds the mapping from Hugging Face parameter names;
it is the table llama.cpp's own `convert_hf_to_gguf.py` uses). Two layout differences matter
for LoRA tensors and merged weights:

- Llama: llama.cpp rotates query/key pairs in a different order from transformers, so
  `convert_hf_to_gguf.py` permutes the rows of `q_proj` (per attention head) and `k_proj`
  (per key/value head); a LoRA `B` `(out, r)` must get the same row permutation (its rows are
  the weight's rows). `A` is untouched.
- GPT-2: transformers' `Conv1D` stores its weight `(in, out)`; GGUF stores `(out, in)`. A LoRA
  `A` `(r, in)` and `B` `(out, r)` are already in the common orientation and stay as they are.
- Mixture-of-experts (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE): transformers 5 keeps each layer's experts
  as 3-D parameters, `mlp.experts.gate_up_proj: (experts, 2 * ff, hidden)` (gate rows first, then up)
  and `mlp.experts.down_proj: (experts, hidden, ff)`; llama.cpp keeps three stacks, `ffn_gate_exps`,
  `ffn_up_exps` `(experts, ff, hidden)` and `ffn_down_exps`, and multiplies them per routed expert
  (`ggml_mul_mat_id`), LoRA included: an expert LoRA is `lora_a: (experts, r, in)`, `lora_b:
  (experts, out, r)` (lorakit's own layout). `gate_up_proj` is split row-wise into its gate and up
  halves; a LoRA on it gives both halves the same `A` and each its half of `B`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import LoraError
from ..layers.experts import EXPERT_WEIGHTS

# transformers `model_type` -> llama.cpp architecture name (each tested against llama.cpp here)
ARCHITECTURES = {"llama": "llama", "gpt2": "gpt2", "mixtral": "llama", "qwen3_moe": "qwen3moe", "qwen2_moe": "qwen2moe",
                 "olmoe": "olmoe"}
_ATTENTION = {"attn_q", "attn_k", "attn_v", "attn_output"}
_EXPERTS = {"ffn_gate_inp", "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"}
_HEAD = {"output", "token_embd"}

# llama.cpp tensors (without `.weight`) whose matrix product goes through `build_lora_mm`, i.e.
# that a LoRA adapter file may target, per architecture; `token_embd` goes through
# `build_inp_embd` (its own LoRA layout).
ADAPTABLE = {
    "llama": _ATTENTION | {"ffn_gate", "ffn_up", "ffn_down"} | _EXPERTS | _HEAD,  # Mixtral: the experts
    "gpt2": {"attn_qkv", "attn_output", "ffn_up", "ffn_down", "output", "token_embd"},
    "qwen3moe": _ATTENTION | _EXPERTS | _HEAD,
    "qwen2moe": _ATTENTION | _EXPERTS | _HEAD | {"ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp",
                                                 "ffn_gate_inp_shexp"},
    "olmoe": _ATTENTION | _EXPERTS | _HEAD,
}

# llama.cpp tensors whose rows convert_hf_to_gguf.py permutes, and the head count it uses
PERMUTED = {"llama": {"attn_q": "n_head", "attn_k": "n_head_kv"}}


class GGUFExportError(LoraError, ValueError):
    """A model or adapter that a GGUF file for llama.cpp cannot represent; the message names the module."""


@dataclass(frozen=True)
class GGUFArch:
    """The facts about a base model that decide tensor names and layouts in a GGUF file.

    Attributes:
        arch: llama.cpp's architecture name (`"llama"`, `"gpt2"`).
        n_layer: number of transformer blocks.
        n_head, n_head_kv: attention heads and key/value heads (for the Llama q/k row permutation).
        tied_head: the output head shares the token embedding (the GGUF has no `output.weight`).
        n_expert: experts per mixture-of-experts layer (0: a dense model).
    """

    arch: str
    n_layer: int
    n_head: int
    n_head_kv: int
    tied_head: bool
    n_expert: int = 0

    @classmethod
    def from_config(cls, config) -> "GGUFArch":
        """From a transformers `PretrainedConfig`. Raises `GGUFExportError` for an architecture not supported."""
        model_type = getattr(config, "model_type", None)
        if model_type not in ARCHITECTURES:
            raise GGUFExportError(
                f"model type {model_type!r} is not supported for GGUF export (supported: {', '.join(ARCHITECTURES)})"
            )
        if model_type == "gpt2":
            n_layer, n_head = config.n_layer, config.n_head
            n_head_kv = n_head
        else:
            n_layer, n_head = config.num_hidden_layers, config.num_attention_heads
            n_head_kv = getattr(config, "num_key_value_heads", None) or n_head
        tied = bool(getattr(config, "tie_word_embeddings", False))
        experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None) or 0
        return cls(ARCHITECTURES[model_type], int(n_layer), int(n_head), int(n_head_kv), tied, int(experts))

    @classmethod
    def from_gguf(cls, reader) -> "GGUFArch":
        """From a `gguf.GGUFReader` of a model file. Raises `GGUFExportError` for an unsupported architecture."""
        arch = field_value(reader, "general.architecture")
        if arch not in ADAPTABLE:
            raise GGUFExportError(f"GGUF architecture {arch!r} is not supported (supported: {', '.join(ADAPTABLE)})")
        n_head = int(field_value(reader, f"{arch}.attention.head_count"))
        n_head_kv = field_value(reader, f"{arch}.attention.head_count_kv", n_head)
        names = {t.name for t in reader.tensors}
        return cls(arch, int(field_value(reader, f"{arch}.block_count")), n_head, int(n_head_kv),
                   "output.weight" not in names, int(field_value(reader, f"{arch}.expert_count", 0)))

    def tensor_name(self, hf_path: str) -> str | None:
        """llama.cpp's name (`blk.3.attn_q.weight`) of the Hugging Face parameter `hf_path`
        (`model.layers.3.self_attn.q_proj.weight`), or None if llama.cpp has no such tensor."""
        return name_map(self.arch, self.n_layer).get_name(hf_path, try_suffixes=(".weight", ".bias"))

    def permute_rows(self, gguf_name: str, rows: np.ndarray) -> np.ndarray:
        """`rows: (out, ...)` of tensor `gguf_name` in llama.cpp's row order (Llama q/k; others unchanged)."""
        kind = gguf_name.split(".")[-2] if gguf_name.startswith("blk.") else gguf_name.split(".")[0]
        heads = PERMUTED.get(self.arch, {}).get(kind)
        if heads is None:
            return rows
        n = getattr(self, heads)
        out = rows.shape[0]
        if out % (2 * n):
            raise GGUFExportError(f"{gguf_name}: {out} rows do not split into {n} heads of rotary pairs")
        return np.ascontiguousarray(rows.reshape(n, 2, out // n // 2,
                                                 *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape))


# architectures whose llama.cpp model falls back to `token_embd` when the file has no `output.weight`
OPTIONAL_OUTPUT = {"llama", "gpt2", "qwen3moe"}
# llama.cpp's routing per architecture: whether the top-k routing weights are renormalised to sum to 1
# (`build_moe_ffn`'s `norm_w`); transformers' `norm_topk_prob` must agree (Mixtral always renormalises)
NORMALISED_TOP_K = {"llama": True, "qwen3moe": True, "qwen2moe": False, "olmoe": False}


def check_routing(arch: GGUFArch, config) -> None:
    """Refuse a mixture-of-experts config that llama.cpp's graph for `arch` would compute differently."""
    if not arch.n_expert:
        return
    if arch.arch == "olmoe" and arch.n_head_kv != arch.n_head:  # its q/k norms span all heads: no GQA there
        raise GGUFExportError(f"num_key_value_heads={arch.n_head_kv} < num_attention_heads={arch.n_head}: llama.cpp's "
                              "olmoe model has no grouped-query attention")
    normalised = bool(getattr(config, "norm_topk_prob", config.model_type == "mixtral"))
    if normalised != NORMALISED_TOP_K[arch.arch]:
        raise GGUFExportError(f"norm_topk_prob={normalised}: llama.cpp's {arch.arch} model "
                              f"{'always' if NORMALISED_TOP_K[arch.arch] else 'never'} renormalises the top-k routing "
                              "weights, so it would compute another model")
    step, only = getattr(config, "decoder_sparse_step", 1) or 1, set(getattr(config, "mlp_only_layers", None) or [])
    dense = [i for i in range(arch.n_layer) if i in only or (i + 1) % step]  # transformers' rule for Qwen-MoE
    if dense:
        raise GGUFExportError(f"layers {dense} are dense (mlp_only_layers {sorted(only)}, decoder_sparse_step {step}): "
                              f"llama.cpp's {arch.arch} model has experts in every layer")
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        raise GGUFExportError(f"sliding_window={config.sliding_window}: llama.cpp's {arch.arch} model attends to the "
                              "whole context")


def expert_parts(hf_name: str, array: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """A parameter as llama.cpp stores it, `[(name to look up, array)]`: a 3-D expert weight
    `<experts>.down_proj` becomes `<experts>.down_proj.weight`, and `<experts>.gate_up_proj`
    `(experts, 2 * ff, ...)` its halves along axis 1 (views, not copies), `gate_proj` then `up_proj` (a
    LoRA `B` `(experts, 2 * ff, r)` splits the same way); any other parameter is returned as it is."""
    experts, _, param = hf_name.rpartition(".")
    if array.ndim != 3 or param not in EXPERT_WEIGHTS:
        return [(hf_name, array)]
    if param != "gate_up_proj":
        return [(f"{hf_name}.weight", array)]
    if array.shape[1] % 2:
        raise GGUFExportError(f"{hf_name}: {array.shape[1]} rows do not split into gate and up halves")
    gate, up = np.split(array, 2, axis=1)  # `encode` makes what it writes contiguous
    return [(f"{experts}.gate_proj.weight", gate), (f"{experts}.up_proj.weight", up)]


def name_map(arch: str, n_layer: int):
    import gguf

    by_name = {name: key for key, name in gguf.MODEL_ARCH_NAMES.items()}
    return gguf.get_tensor_name_map(by_name[arch], n_layer)


def open_reader(path: str | Path):
    """A `gguf.GGUFReader` of `path` (memory-mapped; the last few are kept, keyed by path, size and
    modification time: parsing a tokenizer's 49k-entry arrays takes seconds).

    Raises:
        GGUFExportError: the file is missing or not a GGUF file.
    """
    path = Path(path).resolve()
    if not path.is_file():
        raise GGUFExportError(f"GGUF file {path} does not exist")
    stat = path.stat()
    return _reader(path, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _reader(path: Path, size: int, mtime_ns: int):
    from gguf import GGUFReader

    try:
        return GGUFReader(path)
    except (ValueError, OSError) as exc:
        raise GGUFExportError(f"{path} is not a readable GGUF file ({exc})") from None


def field_value(reader, key: str, default=None):
    """The value of metadata field `key` of a `GGUFReader` (a str, number, or list), else `default`."""
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()
