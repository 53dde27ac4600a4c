"""The static half of `lorakit.verify`: what an adapter covers, which of its keys match nothing,
and how large each module's update is.

Kinds of linear parameters (weights of `nn.Linear`, GPT-2 `Conv1D`, `nn.Embedding`, and 3-D
mixture-of-experts parameters): `attention`, `mlp`, `experts`, `head` (the module
`get_output_embeddings()` returns, or a classifier/score head), `embeddings`, and `other`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from ..io import PREFIX
from ..layers import LoraLayer, ModulesToSave
from ..layers.linear import is_conv1d
from ..state import lora_layers, walk

KINDS = ("attention", "mlp", "experts", "head", "embeddings", "other")
_EXPERTS = re.compile(r"(^|\.)experts?(\.|$)")
_ATTENTION = re.compile(r"attn|attention|(^|\.)(q|k|v|o|qkv|query|key|value)(_proj)?$")
_MLP = re.compile(r"mlp|ffn|feed_forward|intermediate|\.output\.dense$"
                  r"|(^|\.)(fc\d|w\d|gate_proj|up_proj|down_proj|dense_h_to_4h|dense_4h_to_h)$")
_HEAD = re.compile(r"(^|\.)(lm_head|classifier|score|qa_outputs|cls)(\.|$)")
_FILE_SUFFIXES = ("lora_A.weight", "lora_B.weight", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")


@dataclass
class KindCoverage:
    """Linear parameters of one kind: how many there are and how many the adapter adapts (elements)."""

    kind: str
    modules: int = 0
    covered_modules: int = 0
    params: int = 0
    covered_params: int = 0

    @property
    def share(self) -> float:
        """Covered share of this kind's parameters, in [0, 1] (0 when the model has none)."""
        return self.covered_params / self.params if self.params else 0.0


@dataclass
class ModuleDelta:
    """One adapted module: `rel_norm = ||delta_weight||_F / ||W0||_F` and whether its B is all zeros."""

    path: str
    rel_norm: float
    zero_b: bool


def kind_of(path: str, module: nn.Module | None, head_paths: set[str]) -> str:
    """The kind (see the module docstring) of the parameters at module `path`."""
    if path in head_paths or _HEAD.search(path):
        return "head"
    if _EXPERTS.search(path):
        return "experts"
    if isinstance(module, nn.Embedding):
        return "embeddings"
    if _ATTENTION.search(path):
        return "attention"
    if _MLP.search(path):
        return "mlp"
    return "other"


def linear_weights(model: nn.Module) -> Iterator[tuple[str, str, torch.Tensor, nn.Module]]:
    """`(path, kind, tensor, module)` for every linear parameter of `model`: weights of Linear,
    Conv1D and Embedding modules (an adapted layer counts its base layer), and the matrices and 3-D
    expert tensors of other modules (a MoE router, `experts.gate_up_proj`)."""
    head = getattr(model, "get_output_embeddings", lambda: None)()
    head_paths = {p for p, m in walk(model) if m is head or (isinstance(m, LoraLayer) and m.base_layer is head)}
    for path, module in walk(model):
        base = module.base_layer if isinstance(module, LoraLayer) else module
        if isinstance(module, ModulesToSave):
            base = module.original_module
        if isinstance(base, (nn.Linear, nn.Embedding)) or is_conv1d(base):
            yield path, kind_of(path, base, head_paths), base.weight, module
        elif isinstance(module, LoraLayer) and module.per_expert:  # an adapted experts module: each 3-D weight
            for name, p in base.named_parameters(recurse=False):
                if p.dim() == 3:
                    yield f"{path}.{name}", "experts", p, module
        elif not isinstance(module, (LoraLayer, ModulesToSave)):
            for name, p in module.named_parameters(recurse=False):
                if p.dim() == 3:  # mixture-of-experts weights kept as (experts, out, in) parameters
                    yield f"{path}.{name}", "experts", p, module
                elif p.dim() == 2:  # a matrix in a custom module (a MoE router, ...)
                    yield f"{path}.{name}", kind_of(path, module, head_paths), p, module


def coverage(model: nn.Module, adapter: str) -> dict[str, KindCoverage]:
    """Per kind (and `"all"`): linear parameters of `model` and those adapter `adapter` adapts (or
    replaces by a `modules_to_save` copy). A weight tied to another module (a head sharing the token
    embedding) counts in each module's kind, and once in `"all"`."""
    out = {k: KindCoverage(k) for k in (*KINDS, "all")}
    distinct: dict[int, list] = {}  # tensor id -> [elements, adapted through any of its modules]
    for path, kind, weight, module in linear_weights(model):
        adapted = _adapts(module, adapter, path)
        _count(out[kind], weight.numel(), adapted)
        entry = distinct.setdefault(id(weight), [weight.numel(), False])
        entry[1] = entry[1] or adapted
    for n, adapted in distinct.values():
        _count(out["all"], n, adapted)
    return out


def _adapts(module: nn.Module, adapter: str, path: str) -> bool:
    """Whether adapter `adapter` adapts (or trains in full) the linear parameter at `path` of `module`."""
    if isinstance(module, ModulesToSave):
        return adapter in module.modules_to_save
    if not isinstance(module, LoraLayer) or adapter not in module.lora_A:
        return False
    return not module.per_expert or path.rsplit(".", 1)[-1] in module.targets[adapter]


def _count(c: KindCoverage, n: int, adapted: bool) -> None:
    c.modules += 1
    c.params += n
    if adapted:
        c.covered_modules += 1
        c.covered_params += n


def unmatched_keys(model: nn.Module, keys) -> list[str]:
    """Adapter file keys whose module path is not a module of `model` (in file order)."""
    paths = {p for p, _ in model.named_modules()}
    bad = []
    for key in keys:
        rest = key[len(PREFIX):] if key.startswith(PREFIX) else key
        suffix = next((s for s in _FILE_SUFFIXES if rest.endswith("." + s)), None)
        path = rest[: -len(suffix) - 1] if suffix else rest.rpartition(".")[0]
        while path.endswith(".base_layer"):  # PEFT's nested wrappers of expert weights (target_parameters)
            path = path[: -len(".base_layer")]
        if path not in paths:
            bad.append(key)
    return bad


@torch.no_grad()
def module_deltas(model: nn.Module, adapter: str) -> list[ModuleDelta]:
    """`||W - W0||_F / ||W0||_F` of every module adapter `adapter` adapts, with W the merged weight
    (computed in float32 from the saved original: DoRA's magnitude included), and whether B is zero."""
    out = []
    for path, layer in lora_layers(model):
        if adapter not in layer.lora_A:
            continue
        if layer.per_expert:  # one entry per adapted 3-D expert weight
            for name in layer.targets[adapter]:
                w0 = layer.unmerged_weight(name).float()
                delta = layer.merged_weight([adapter], name).float() - w0
                out.append(_delta(f"{path}.{name}", w0, delta, layer.lora_B[adapter][name]))
            continue
        w0 = (layer._weight_backup if layer._weight_backup is not None else layer.weight).float()
        delta = layer.merged_weight([adapter]).float() - w0
        out.append(_delta(path, w0, delta, layer.lora_B[adapter]))
    return out


def _delta(path: str, w0: torch.Tensor, delta: torch.Tensor, B: torch.Tensor) -> ModuleDelta:
    norm0 = float(w0.norm())
    return ModuleDelta(path, float(delta.norm()) / norm0 if norm0 else float("inf"), not bool(B.count_nonzero()))
