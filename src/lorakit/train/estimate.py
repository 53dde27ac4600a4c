"""The peak memory of a training step, estimated before any work, against what the machine has.

`step_estimate(model, plan, recipe, checkpointing)` adds, in bytes:

- `process`: what the process holds now (resident set on the CPU; allocated on a GPU): the
  base model and everything loaded so far;
- `lora` (4 bytes a trainable value: `r x (in + out)` per target and per expert, whole `modules_to_save`), its
  gradients (4) and AdamW's two moments (8);
- `activations`: what backward keeps, per token of a micro-batch (`batch_size x max_length`) and
  layer: `4 x (10 x hidden + 3 x intermediate)` bytes (the inputs of the attention and MLP
  projections, norms and residuals; fitted to SmolLM2's measured 168 MB per layer at 2 x 2,048
  tokens, docs/long-context.md); with activation checkpointing, each layer's input
  (`4 x hidden`) plus one layer's full set;
- `logits`: the chunked loss's chunk (`lorakit.ops.loss.CHUNK_BYTES`) three times (logits,
  float32 copy, gradient), or a classification head's logits.

`available_bytes(device)` is what the machine can still give: `MemAvailable` (and the cgroup
limit) on the CPU, `torch.cuda.mem_get_info` on a GPU. A run whose estimate exceeds it is warned
about; one at more than twice it is refused before anything else runs, naming the flags that
shrink each term (`--no-memory-check` runs it anyway).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..layers.experts import weight_features
from ..ops.loss import CHUNK_BYTES

REFUSE_RATIO = 2.0


def _lora_values(plan, r: int) -> int:
    total = 0
    for path, module in plan.targets:
        if path in plan.parameters:  # mixture-of-experts expert weights: one (r, in) + (out, r) pair per expert
            base = getattr(module, "base_layer", module)
            for name in plan.parameters[path]:
                experts, in_f, out_f = weight_features(base, name)
                total += r * experts * (in_f + out_f)
            continue
        weight = getattr(module, "weight", None)
        if weight is not None and weight.dim() >= 2:
            total += r * (int(weight.shape[0]) + int(weight.shape[1]))
    for _, module in plan.saves:
        total += sum(p.numel() for p in module.parameters())
    return total


def _process_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    try:
        fields = Path("/proc/self/status").read_text().split("VmRSS:")[1].split()
        return int(fields[0]) * 1024
    except (OSError, IndexError, ValueError):
        return 0


def available_bytes(device: torch.device) -> int | None:
    """Memory the machine can still give this process (None where unknown)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    found = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError):
        pass
    try:  # a container's limit (cgroup v2)
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
            found.append(max(0, int(limit) - used))
    except (OSError, ValueError):
        pass
    return min(found) if found else None


def step_estimate(model, plan, recipe, checkpointing: bool, device: torch.device) -> dict[str, Any]:
    """The terms above and their `total`, in bytes."""
    cfg = model.config
    hidden = getattr(cfg, "hidden_size", 0) or 0
    inter = getattr(cfg, "intermediate_size", 0) or 4 * hidden
    layers = getattr(cfg, "num_hidden_layers", 0) or 0
    tokens = recipe.batch_size * recipe.max_length
    per_layer = 4 * tokens * (10 * hidden + 3 * inter)
    activations = layers * 4 * tokens * hidden + per_layer if checkpointing else layers * per_layer
    if recipe.task == "classify-head":
        logits = 4 * recipe.batch_size * max(1, getattr(cfg, "num_labels", 2)) * 3
    else:
        logits = 3 * min(CHUNK_BYTES, 4 * tokens * (getattr(cfg, "vocab_size", 0) or 0))
    lora = _lora_values(plan, int(recipe.lora.get("r", 8)))
    terms = {"process": _process_bytes(device), "lora": 4 * lora, "gradients": 4 * lora, "adamw": 8 * lora,
             "activations": activations, "logits": logits}
    return {**terms, "total": sum(terms.values()), "tokens_per_micro_batch": tokens, "checkpointing": checkpointing}


def check_message(estimate: dict[str, Any], available: int | None, recipe) -> tuple[str, bool] | None:
    """`(message, refuse)` when the estimate exceeds `available`; None when it fits or is unknown."""
    if not available or estimate["total"] <= available:
        return None
    gib = 2 ** 30
    advice = ["--batch-size (with --grad-accum to keep the batch)", "--max-length"]
    if not estimate["checkpointing"] and recipe.task != "classify-head":
        advice.append("--gradient-checkpointing on")
    if recipe.quantize == "none":
        advice.append("--quantize nf4")
    refuse = estimate["total"] > REFUSE_RATIO * available
    message = (f"a training step needs about {estimate['total'] / gib:.1f} GiB (activations "
               f"{estimate['activations'] / gib:.1f} GiB for {estimate['tokens_per_micro_batch']:,} tokens per "
               f"micro-batch, the loaded model and data {estimate['process'] / gib:.1f} GiB), but "
               f"{available / gib:.1f} GiB are available; lower it with {', '.join(advice)}"
               + ("" if not refuse else "; --no-memory-check runs it anyway"))
    return message, refuse

