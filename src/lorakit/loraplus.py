"""LoRA+ (Hayou, Ghosh and Yu 2024, arXiv:2402.12354): a larger learning rate for B than for A.

The paper's width-scaling analysis (§3) shows that with one learning rate for both
factors LoRA does not learn features efficiently at large width; the fix is
`eta_B = ratio * eta_A` with `ratio >> 1` (the paper's default is 2^4 = 16). LoRA+
changes only the optimiser, so it is a function returning parameter groups for any
`torch.optim` optimiser:

    groups = lorakit.loraplus_param_groups(model, lr=2e-4, ratio=16, weight_decay=0.01)
    opt = torch.optim.AdamW(groups)

The grouping is PEFT's `create_loraplus_optimizer` (which follows the authors' code):

- `lora_A`: every trainable matrix that is not B (A factors, `modules_to_save`
  weights), at `lr`, with `weight_decay`;
- `lora_B`: B factors and every other trainable vector (DoRA magnitudes, trainable
  LayerNorm weights) at `lr * ratio`, with `weight_decay`;
- `lora_B_no_decay`: biases and LayerNorm parameters among those, at `lr * ratio`,
  without weight decay;
- `embedding`: A and B of adapted embedding layers, at `embedding_lr` (default
  1e-6, as PEFT and the authors' code), with `weight_decay`.
"""

from __future__ import annotations

import math

from torch import nn

from .errors import LoraError
from .layers import LoraEmbedding
from .state import lora_layers, unwrap


def loraplus_param_groups(
    model: nn.Module,
    lr: float,
    ratio: float = 16.0,
    weight_decay: float = 0.0,
    embedding_lr: float = 1e-6,
) -> list[dict]:
    """Optimiser parameter groups for LoRA+: B's learning rate is `ratio` times A's.

    Args:
        model: a model with lorakit adapters (or any model: every trainable tensor is grouped).
        lr: learning rate of the A factors (`eta_A`), > 0.
        ratio: `eta_B / eta_A` (paper's lambda), >= 1 in the paper; > 0 accepted.
        weight_decay: decay of every group except `lora_B_no_decay`.
        embedding_lr: learning rate of adapted embedding layers' A and B.

    Returns:
        A list of dicts `{"name", "params", "lr", "weight_decay"}` (empty groups left out),
        each trainable parameter in exactly one group, in `model.parameters()` order.
    Raises:
        LoraError: a non-positive or non-finite `lr`, `ratio` or `embedding_lr`, a
            negative `weight_decay`, or a model with no trainable parameters.
    """
    for name, value in (("lr", lr), ("ratio", ratio), ("embedding_lr", embedding_lr)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise LoraError(f"loraplus_param_groups: {name} must be a finite number > 0, got {value!r}")
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or not weight_decay >= 0:
        raise LoraError(f"loraplus_param_groups: weight_decay must be a number >= 0, got {weight_decay!r}")

    inner = unwrap(model)
    role: dict[int, str] = {}
    try:
        layers = list(lora_layers(inner))
    except LoraError:
        layers = []
    for _, layer in layers:
        embedding = isinstance(layer, LoraEmbedding)
        for adapter in layer.adapter_names:
            for attr, tensor in layer.adapter_parameters(adapter).items():
                if embedding and attr in ("lora_A", "lora_B"):
                    role[id(tensor)] = "embedding"
                elif attr == "lora_B" or tensor.dim() == 1:
                    role[id(tensor)] = "lora_B"
                else:
                    role[id(tensor)] = "lora_A"
    no_decay: set[int] = set()
    for module in inner.modules():
        for pname, p in module.named_parameters(recurse=False):
            if isinstance(module, nn.LayerNorm) or pname == "bias":
                no_decay.add(id(p))

    groups = {key: [] for key in ("lora_A", "embedding", "lora_B", "lora_B_no_decay")}
    for p in inner.parameters():
        if not p.requires_grad:
            continue
        key = role.get(id(p))
        if key is None:
            key = "lora_B" if p.dim() == 1 else "lora_A"
        if key == "lora_B" and id(p) in no_decay:
            key = "lora_B_no_decay"
        groups[key].append(p)
    if not any(groups.values()):
        raise LoraError(f"loraplus_param_groups: {type(inner).__name__} has no trainable parameters")
    settings = {
        "lora_A": (lr, weight_decay),
        "embedding": (embedding_lr, weight_decay),
        "lora_B": (lr * ratio, weight_decay),
        "lora_B_no_decay": (lr * ratio, 0.0),
    }
    return [
        {"name": key, "params": params, "lr": settings[key][0], "weight_decay": settings[key][1]}
        for key, params in groups.items()
        if params
    ]


__all__ = ["loraplus_param_groups"]
