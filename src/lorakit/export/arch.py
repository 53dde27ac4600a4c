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
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import LoraError

# transformers `model_type` -> llama.cpp architecture name (the two tested against llama.cpp here)
ARCHITECTURES = {"llama": "llama", "gpt2": "gpt2"}

# llama.cpp tensors (without `.weight`) whose matrix product goes through `build_lora_mm`, i.e.
# that a LoRA adapter file may target, per architecture; `token_embd` goes through
# `build_inp_embd` (its own LoRA layout).
ADAPTABLE = {
    "llama": {"attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down", "output", "token_embd"},
    "gpt2": {"attn_qkv", "attn_output", "ffn_up", "ffn_down", "output", "token_embd"},
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
    """

    arch: str
    n_layer: int
    n_head: int
    n_head_kv: int
    tied_head: bool

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
        return cls(ARCHITECTURES[model_type], int(n_layer), int(n_head), int(n_head_kv), tied)

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
                   "output.weight" not in names)

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
