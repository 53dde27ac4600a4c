"""Reading the matrices the analyses need: LoRA factors from an adapter folder, W0 from a base
checkpoint (or a fine-tuned checkpoint), all as float64 in the `(out, in)` orientation of
`delta_weight = scaling * B @ A`.

Orientation: `nn.Linear` stores `(out, in)`; GPT-2 `Conv1D` stores `(in, out)` (adapter config
`fan_in_fan_out: true`); `nn.Embedding` stores `(num_embeddings, dim)` while its update
`scaling * lora_embedding_B @ lora_embedding_A` is `(dim, num_embeddings)`; convolutions
`(out, in, *kernel)` are flattened to `(out, in * prod(kernel))` (A `(r, in, *kernel)`, B `(out, r, 1...)`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ..io import CONFIG_NAME, META_CONFIG, PREFIX, WEIGHTS_NAME, read_adapter
from .errors import AnalysisError, BaseModelError

_KEY = re.compile(r"^(?P<path>.+)\.(?P<kind>lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B)$")


@dataclass
class ModuleFactors:
    """One adapted module: `delta = scaling * B @ A`, `(out, in)`.

    Attributes:
        path: module path in the model (`model.layers.0.self_attn.q_proj`).
        kind: `"linear"`, `"conv1d_gpt2"`, `"embedding"` or `"conv"`.
        A: `(r, in)` float64; B: `(out, r)` float64; scaling: `alpha / r` (or rsLoRA).
        base_transposed: whether the base layer stores its weight as `(in, out)`.
    """

    path: str
    kind: str
    A: torch.Tensor
    B: torch.Tensor
    scaling: float
    base_transposed: bool

    @property
    def r(self) -> int:
        return int(self.A.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.B.shape[0]), int(self.A.shape[1])

    def delta(self) -> torch.Tensor:
        """`scaling * B @ A`, `(out, in)`, float64."""
        return self.scaling * (self.B @ self.A)


@dataclass
class AdapterFactors:
    """The LoRA factors of one adapter folder."""

    path: Path
    config: Any  # LoraConfig
    fan_in_fan_out: bool
    modules: dict[str, ModuleFactors]
    skipped: list[str] = field(default_factory=list)  # tensor keys that are not LoRA factors


def load_factors(path: str | Path, modules: str | None = None) -> AdapterFactors:
    """Read a PEFT-layout adapter folder and pair its `lora_A` / `lora_B` tensors per module.

    Args:
        path: the adapter folder (or its `adapter_model.safetensors` / `adapter_config.json`).
        modules: optional regex; only module paths it matches (`re.search`) are kept.
    Raises:
        AdapterLoadError / ConfigError: from `lorakit.read_adapter` (missing folder, bad files).
        AnalysisError: no LoRA tensors, an A without its B, shapes that do not multiply,
            a bad regex, or a regex that keeps no module.
    """
    files = read_adapter(path)
    fan_in_fan_out = _fan_in_fan_out(files.folder)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    skipped: list[str] = []
    for key, tensor in files.tensors.items():
        m = _KEY.match(key)
        if m is None:
            skipped.append(key)
            continue
        mod = m.group("path")
        mod = mod[len(PREFIX):] if mod.startswith(PREFIX) else mod
        pairs.setdefault(mod, {})[m.group("kind")] = tensor
    if not pairs:
        raise AnalysisError(f"{files.folder}: no LoRA tensors (keys ending in .lora_A.weight / .lora_B.weight) found")
    pattern = None
    if modules is not None:
        try:
            pattern = re.compile(modules)
        except re.error as exc:
            raise AnalysisError(f"--modules {modules!r} is not a valid regex ({exc})") from None
    out: dict[str, ModuleFactors] = {}
    for mod in sorted(pairs, key=_natural_key):
        if pattern is not None and not pattern.search(mod):
            continue
        kinds = pairs[mod]
        emb = "lora_embedding_A" in kinds or "lora_embedding_B" in kinds
        ka, kb = ("lora_embedding_A", "lora_embedding_B") if emb else ("lora_A.weight", "lora_B.weight")
        if ka not in kinds or kb not in kinds:
            have, missing = (ka, kb) if ka in kinds else (kb, ka)
            raise AnalysisError(f"{files.folder}: module {mod!r} has {have} but no {missing}")
        A, B = kinds[ka].double(), kinds[kb].double()
        if A.ndim > 2:  # convolution: A (r, in, *k), B (out, r, 1, ...)
            kind, A, B = "conv", A.reshape(A.shape[0], -1), B.reshape(B.shape[0], B.shape[1])
        elif emb:
            kind = "embedding"
        else:
            kind = "conv1d_gpt2" if fan_in_fan_out else "linear"
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
            raise AnalysisError(f"{files.folder}: module {mod!r}: {kb} {tuple(kinds[kb].shape)} and {ka} "
                                f"{tuple(kinds[ka].shape)} do not multiply")
        out[mod] = ModuleFactors(mod, kind, A, B, float(files.config.scaling_for(mod)),
                                 base_transposed=kind in ("embedding", "conv1d_gpt2"))
    if not out:
        raise AnalysisError(f"{files.folder}: --modules {modules!r} matches none of the adapted modules "
                            f"(e.g. {sorted(pairs, key=_natural_key)[:3]})")
    return AdapterFactors(files.folder, files.config, fan_in_fan_out, out, skipped)


def _fan_in_fan_out(folder: Path) -> bool:
    """`fan_in_fan_out` from the raw adapter config (the field `LoraConfig` does not keep)."""
    text = None
    cfg = folder / CONFIG_NAME
    if cfg.is_file():
        text = cfg.read_text(encoding="utf-8", errors="replace")
    else:
        try:
            with safe_open(str(folder / WEIGHTS_NAME), framework="pt") as f:
                text = (f.metadata() or {}).get(META_CONFIG)
        except (SafetensorError, OSError):
            text = None
    try:
        return bool(json.loads(text).get("fan_in_fan_out", False)) if text else False
    except (json.JSONDecodeError, AttributeError):
        return False


def _natural_key(path: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", path)]


class WeightSource:
    """Weights of a full model: a Hugging Face model folder of `*.safetensors` (sharded or
    not), a single `.safetensors` file, a `{name: tensor}` mapping, or an `nn.Module`.

    Tensors are read lazily, one at a time. A module path is matched to a key
    `<path>.weight`, tolerating a differing leading prefix (an adapter made on
    `LlamaForCausalLM` names `model.layers.0...`, a `LlamaModel` checkpoint `layers.0...`;
    GPT-2 checkpoints omit `transformer.`).
    """

    def __init__(self, source: Any, what: str = "--base"):
        self.what = what
        self._files: dict[str, Path] = {}
        self._tensors: Mapping[str, torch.Tensor] | None = None
        if isinstance(source, nn.Module):
            self.name = type(source).__name__
            self._tensors = {k: v for k, v in source.state_dict().items()}
        elif isinstance(source, Mapping):
            self.name = "state dict"
            self._tensors = source
        else:
            p = Path(source)
            self.name = str(p)
            if not p.exists():
                raise BaseModelError(f"{what} {p} does not exist")
            files = [p] if p.is_file() else sorted(p.glob("*.safetensors"))
            files = [f for f in files if f.name != WEIGHTS_NAME or p.is_file()]
            if p.is_file() and p.suffix != ".safetensors":
                raise BaseModelError(f"{what} {p} is not a .safetensors file; pass a model folder or a .safetensors "
                                     "file")
            if not files:
                others = [f.name for pattern in ("*.bin", "*.pt", "*.pth") for f in p.glob(pattern)]
                hint = (f" (it holds {others[0]}: pickle files are not opened; re-save the model with "
                        "`model.save_pretrained(folder, safe_serialization=True)`)") if others else ""
                raise BaseModelError(f"{what} {p}: no *.safetensors weights found{hint}")
            for f in files:
                try:
                    with safe_open(str(f), framework="pt") as h:
                        for k in h.keys():
                            self._files.setdefault(k, f)
                except (SafetensorError, OSError) as exc:
                    raise BaseModelError(f"{what} {f} is not a readable safetensors file ({exc})") from None
        self._keys = list(self._tensors.keys()) if self._tensors is not None else list(self._files)

    def key_for(self, module_path: str) -> str:
        """The checkpoint key holding `module_path`'s weight.

        Raises:
            BaseModelError: no key (or more than one) fits.
        """
        parts = module_path.split(".")
        for i in range(len(parts) - 1):  # never reduce to the bare leaf name
            suffix = ".".join(parts[i:]) + ".weight"
            if suffix in self._tensors_or_files():
                return suffix
            hits = [k for k in self._keys if k.endswith("." + suffix)]
            if len(hits) == 1:
                return hits[0]
            if len(hits) > 1:
                raise BaseModelError(f"{self.what} {self.name}: module {module_path!r} is ambiguous; candidates "
                                     f"{hits[:4]}")
        leaf = parts[-1]
        near = [k for k in self._keys if f".{leaf}." in f".{k}"][:3]
        raise BaseModelError(f"{self.what} {self.name}: no weight for adapted module {module_path!r} "
                             f"(looked for {module_path}.weight{'; keys include ' + str(near) if near else ''})")

    def _tensors_or_files(self):
        return self._tensors if self._tensors is not None else self._files

    def get(self, key: str) -> torch.Tensor:
        if self._tensors is not None:
            return self._tensors[key].detach()
        try:
            with safe_open(str(self._files[key]), framework="pt") as h:
                return h.get_tensor(key)
        except (SafetensorError, OSError) as exc:
            raise BaseModelError(f"{self.what} {self._files[key]}: cannot read {key!r} ({exc})") from None

    def weight_for(self, mod: ModuleFactors) -> torch.Tensor:
        """The module's weight as float64 `(out, in)`, the orientation of `mod.delta()`.

        A GPT-2 `Conv1D` / embedding weight is transposed. A weight whose shape fits only
        the other orientation (never ambiguous unless square) is transposed as needed.

        Raises:
            BaseModelError: missing key, or a shape that fits neither orientation.
        """
        key = self.key_for(mod.path)
        t = self.get(key)
        out_f, in_f = mod.shape
        if mod.kind == "conv" and t.ndim > 2:
            t = t.reshape(t.shape[0], -1)
        stored = (in_f, out_f) if mod.base_transposed else (out_f, in_f)
        if not t.is_floating_point():
            raise BaseModelError(f"{self.what} {self.name}: {key!r} has dtype {t.dtype} (quantised?); a float weight "
                                 "is needed")
        if tuple(t.shape) == stored:
            W = t.T if mod.base_transposed else t
        elif t.ndim == 2 and tuple(t.shape) == stored[::-1] and out_f != in_f:
            W = t if mod.base_transposed else t.T
        else:
            raise BaseModelError(
                f"{self.what} {self.name}: weight {key!r} has shape {tuple(t.shape)}, but adapted module {mod.path!r} "
                f"(lora_B {tuple(mod.B.shape)}, lora_A {tuple(mod.A.shape)}) needs {stored}; is this the adapter's "
                "base model?"
            )
        W = W.to(torch.float64).contiguous()
        if not torch.isfinite(W).all():
            raise BaseModelError(f"{self.what} {self.name}: weight {key!r} contains NaN or Inf")
        return W
