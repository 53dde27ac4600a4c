"""Combining several adapters into a new one: `combine(model, {name: weight}, method=...)`.

- `"cat"` (exact): per module, A_new = [A_1; A_2; ...] and B_new = [w_1 s_1 B_1, w_2 s_2 B_2, ...]
  with scaling 1, so `delta_new = sum_i w_i * delta_i` and the combined output equals
  the weighted sum of the separate adapters' updates exactly. Rank = sum of ranks.
- `"linear"`: A_new = sum_i sqrt(w_i s_i) A_i, B_new = sum_i sqrt(w_i s_i) B_i (PEFT's
  "linear"). Keeps the rank, but is *not* the weighted sum of updates (cross terms
  B_i A_j appear); defined only for adapters with equal ranks on the same modules.
- `"svd"`: per module, the best rank-`r` approximation (Eckart–Young) of
  `sum_i w_i delta_i`; the relative Frobenius truncation error is reported.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from .config import LoraConfig
from .errors import LoraError
from .inject import check_adapter_name, inject, plan, set_active
from .layers import LoraConv, LoraLayer
from .state import get_state, lora_layers, require_adapter, unwrap

METHODS = ("cat", "linear", "svd")


@dataclass
class CombineReport:
    """What `combine` did: per-module rank and, for `"svd"`, the relative truncation error
    `||sum w_i delta_i - delta_new||_F / ||sum w_i delta_i||_F`."""

    method: str
    ranks: dict[str, int] = field(default_factory=dict)
    truncation_error: dict[str, float] = field(default_factory=dict)

    @property
    def max_truncation_error(self) -> float:
        return max(self.truncation_error.values(), default=0.0)


def combine(
    model: nn.Module,
    weights: dict[str, float],
    method: str = "cat",
    new_name: str = "combined",
    r: int | None = None,
) -> CombineReport:
    """Create adapter `new_name` from a weighted combination of existing adapters.

    Args:
        weights: adapter name -> weight `w_i` (any real number).
        method: `"cat"`, `"linear"` or `"svd"` (see module docstring).
        r: target rank for `"svd"` (default: the largest input rank).

    The new adapter is added (inactive) with the union of the inputs' target modules;
    it is not trainable-initialised: its tensors hold the combination.

    Returns:
        A `CombineReport`.
    Raises:
        LoraError: unknown method, empty weights, an unknown adapter, an existing
            `new_name`, DoRA adapters, adapters on expert weights, or `"linear"` over adapters of different
            ranks / target modules (undefined there).
    """
    if method not in METHODS:
        raise LoraError(f"combine method must be one of {METHODS}, got {method!r}")
    if not weights:
        raise LoraError("combine needs at least one adapter in `weights`")
    configs = {name: require_adapter(model, name) for name in weights}
    check_adapter_name(model, new_name)
    if any(c.use_dora for c in configs.values()):
        raise LoraError("combine is defined for plain LoRA adapters; DoRA's magnitude vector does not combine linearly")
    inner = unwrap(model)
    layers = [(p, layer) for p, layer in lora_layers(inner) if any(n in layer.lora_A for n in weights)]
    experts = [p for p, layer in layers if layer.per_expert]
    if experts:
        raise LoraError(f"combine is not defined for adapters on mixture-of-experts expert weights ({experts[0]!r}, "
                        "one pair per expert)")
    if method == "linear":
        _check_linear(layers, weights)
    report = CombineReport(method)
    tensors, bias_of = _combined_tensors(layers, weights, method, r, report)
    new_config = _combined_config(tensors, bias_of, configs[next(iter(weights))])
    previous_active = get_state(inner).active
    inject(inner, new_config, new_name, plan_=plan(inner, new_config))
    with torch.no_grad():
        for p, layer in lora_layers(inner):
            if p in tensors:
                A, B = tensors[p]
                layer.lora_A[new_name].copy_(A)
                layer.lora_B[new_name].copy_(B)
                if p in bias_of:
                    layer.lora_B_bias[new_name].copy_(bias_of[p])
    set_active(inner, previous_active)
    return report


def _combined_tensors(layers, weights: dict[str, float], method: str, r: int | None, report: CombineReport):
    """Per module path: the combined `(A, B)` at scaling 1, and the combined bias of B where an input has one."""
    tensors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    bias_of: dict[str, torch.Tensor] = {}
    for p, layer in layers:
        present = [n for n in weights if n in layer.lora_A]
        if method == "cat":
            A, B = _cat(layer, present, weights)
        elif method == "linear":
            A, B = _linear(layer, present, weights)
        else:
            A, B, err = _svd(layer, present, weights, r)
            report.truncation_error[p] = err
        tensors[p] = (A, B)
        report.ranks[p] = A.shape[0]
        biases = [layer.lora_B_bias[n].detach().float() * (weights[n] * layer.scaling[n])
                  for n in present if n in layer.lora_B_bias]
        if biases:  # the new adapter's scaling is 1: its bias is the weighted, scaled sum
            bias_of[p] = torch.stack(biases).sum(0)
    return tensors, bias_of


def _combined_config(tensors: dict, bias_of: dict, first: LoraConfig) -> LoraConfig:
    """The new adapter's config: each module at its combined rank, scaling 1 (the weights live in B)."""
    rank_of = {p: t[0].shape[0] for p, t in tensors.items()}
    base_r = max(rank_of.values())
    return LoraConfig(
        r=base_r,
        alpha=float(base_r),
        dropout=first.dropout,
        target_modules=sorted(tensors),
        rank_pattern={_exact(p): k for p, k in rank_of.items() if k != base_r},
        alpha_pattern={_exact(p): float(k) for p, k in rank_of.items() if k != base_r},
        base_model_name_or_path=first.base_model_name_or_path,
        task_type=first.task_type,
        lora_bias=bool(bias_of),
    )


def _check_linear(layers, weights) -> None:
    """`linear` is defined only for adapters on the same modules with one rank."""
    for p, layer in layers:
        ranks = {n: layer.r.get(n) for n in weights}
        if None in ranks.values() or len(set(ranks.values())) != 1:
            raise LoraError(f"combine(method='linear') needs every adapter on every module with one rank; at {p!r} "
                            f"ranks are {ranks}. Use method='cat' (exact) or 'svd'")


def _exact(path: str) -> str:
    """A pattern key for `path` (PEFT matches keys against dotted path suffixes)."""
    return re.escape(path)


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1)


def _cat(layer: LoraLayer, names, weights):
    if isinstance(layer, LoraConv) and layer.groups > 1:
        raise LoraError("combine(method='cat') on grouped convolutions is not supported; use 'svd'")
    A = torch.cat([layer.lora_A[n].float() for n in names], dim=0)
    B = torch.cat([layer.lora_B_dense(n).float() * (weights[n] * layer.scaling[n]) for n in names], dim=1)
    return A, B


def _linear(layer: LoraLayer, names, weights):
    A = sum(layer.lora_A[n].float() * math.sqrt(abs(weights[n] * layer.scaling[n])) for n in names)
    B = sum(layer.lora_B_dense(n).float() * math.copysign(math.sqrt(abs(weights[n] * layer.scaling[n])),
                                                          weights[n]) for n in names)
    return A, B


def _svd(layer: LoraLayer, names, weights, r):
    """Truncated SVD of the weighted sum of updates, in (out, in*k) layout for every kind."""
    if isinstance(layer, LoraConv) and layer.groups > 1:
        raise LoraError("combine(method='svd') on grouped convolutions is not supported")
    delta = None
    for n in names:
        A, B = _flat(layer.lora_A[n].detach().double()), _flat(layer.lora_B_dense(n).detach().double())
        d = (B @ A) * (weights[n] * layer.scaling[n])
        delta = d if delta is None else delta + d
    rank = r or max(layer.r[n] for n in names)
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    rank = min(rank, S.shape[0])
    B = U[:, :rank] * S[:rank]
    A = Vh[:rank]
    total = torch.linalg.vector_norm(S)
    err = float(torch.linalg.vector_norm(S[rank:]) / total) if total > 0 else 0.0
    shape_a, shape_b = layer.lora_shapes(rank)
    return A.reshape(shape_a).float(), B.reshape(shape_b).float(), err
