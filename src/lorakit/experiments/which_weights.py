"""Which weight matrices to adapt at a fixed trainable-parameter budget (LoRA paper, §7.1, table 5).

The paper fixes the number of trainable parameters and spends it on one matrix type at r=8,
two at r=4, or four at r=2 (GPT-3: every attention matrix is d x d, so the ranks divide
evenly). SmolLM2 uses grouped-query attention (q_proj, o_proj: 576 x 576; k_proj, v_proj:
192 x 576), so here the budget is fixed in parameters and each weight set gets the rank that
matches it: r * sum(in + out) over the adapted matrices. The budget is the default recipe's
q_proj + v_proj at r=8 (460,800 LoRA parameters on SmolLM2, 0.34% of the model). Where no single
integer rank comes within 5% of the budget (`all-linear`), the rank alternates between two
neighbouring values across layers (`rank_pattern`), and the table says so.
"""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path
from typing import Any

from .common import Clock, base_results, work_folder
from .report import (PAIRED_NOTE, accuracy_cell, header, md_table, num, paired_cell, pct, plot_accuracy, plot_losses,
                     setup_text, write)
from .runner import Arm, RunResult, Session
from ..config import LoraConfig
from ..inject import plan

NAME = "which-weights"
BASE = "sentiment"
HELP = "which weights to adapt (q, k, v, o, q+v, q+k+v+o, all-linear) at a fixed parameter budget (paper table 5)"
TITLE = "Which weight matrices should LoRA adapt? (paper §7.1, table 5)"
TOLERANCE = 0.05

# (label, target_modules) for Llama-style models; "reference" marks the default recipe's set.
WEIGHT_SETS: list[tuple[str, list[str] | str]] = [
    ("q", ["q_proj"]),
    ("k", ["k_proj"]),
    ("v", ["v_proj"]),
    ("o", ["o_proj"]),
    ("q+v", ["q_proj", "v_proj"]),
    ("q+k+v+o", ["q_proj", "k_proj", "v_proj", "o_proj"]),
    ("all-linear", "all-linear"),
]
REFERENCE = "q+v"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--budget", type=int, default=None, metavar="N",
                   help="LoRA parameters per configuration (default: the recipe's own LoRA, q_proj+v_proj r=8)")


def lora_units(model, lora: dict[str, Any], targets) -> list[tuple[str, int]]:
    """`(module path, in + out)` of every module `targets` selects: LoRA parameters per unit of rank."""

    cfg = LoraConfig(**{k: v for k,
                        v in lora.items() if k not in ("r", "target_modules", "rank_pattern", "modules_to_save")},
                     r=1, target_modules=targets)
    units = []
    for path, module in plan(model, cfg).targets:
        weight = module.weight
        units.append((path, int(weight.shape[0]) + int(weight.shape[1])))  # Linear (out, in) or Conv1D (in, out)
    return units


def lora_parameters(model, lora: dict[str, Any]) -> int:
    """LoRA parameters (A and B) of `lora` on `model`, counted without changing the model."""

    cfg = LoraConfig(**{k: v for k, v in lora.items() if k != "modules_to_save"})
    return sum(cfg.rank_for(path) * c for path, c in lora_units(model, lora, lora["target_modules"]))


def ranks_for_budget(model, lora: dict[str, Any], targets, budget: int, tolerance: float = TOLERANCE) -> dict[str, Any]:
    """The `lora` changes (`r`, `target_modules`, `rank_pattern`) that spend about `budget` parameters on `targets`.

    One rank everywhere when one comes within `tolerance`; else the lower rank everywhere and the
    next rank in evenly spread layers (a `rank_pattern` regex over the layer indices).

    Returns:
        `{"lora": changes, "parameters": count, "rank_text": "13" or "1 (2 in 15 of 30 layers)"}`.
    """
    units = lora_units(model, lora, targets)
    cost = sum(c for _, c in units)
    r = max(1, round(budget / cost))
    uniform = {"lora": {"r": r, "target_modules": targets, "rank_pattern": {}}, "parameters": r * cost,
               "rank_text": str(r)}
    if abs(r * cost - budget) <= tolerance * budget or budget <= cost:
        return uniform
    r_lo = math.floor(budget / cost)
    layers: dict[str, int] = {}  # "prefix.<index>" -> cost of the layer's modules
    for path, c in units:
        m = list(re.finditer(r"\.(\d+)\.", path))
        if not m:
            return uniform
        key = path[:m[-1].end() - 1]
        layers[key] = layers.get(key, 0) + c
    keys = sorted(layers, key=lambda k: int(k.rsplit(".", 1)[-1]))
    per_layer = cost / len(keys)
    n = round((budget - r_lo * cost) / per_layer)
    prefixes = {k.rsplit(".", 1)[0] for k in keys}
    if not 0 < n < len(keys) or len(prefixes) != 1:
        return uniform
    picked = [keys[int((i + 0.5) * len(keys) / n)] for i in range(n)]
    params = r_lo * cost + sum(layers[k] for k in picked)
    if abs(params - budget) >= abs(uniform["parameters"] - budget):
        return uniform
    key = re.escape(prefixes.pop()) + r"\.(" + "|".join(k.rsplit(".", 1)[1] for k in picked) + r")\..*"
    return {"lora": {"r": r_lo, "target_modules": targets, "rank_pattern": {key: r_lo + 1}}, "parameters": params,
            "rank_text": f"{r_lo} ({r_lo + 1} in {n} of {len(keys)} layers)"}


def run(session: Session, args: argparse.Namespace, out: Path, command: str) -> dict[str, Any]:
    clock = Clock()
    recipe = session.recipe(BASE)
    prep = session.prepared(recipe)
    zero = session.zero_shot(recipe)
    budget = getattr(args, "budget", None) or lora_parameters(prep.model, recipe.lora)
    plans = []
    for label, targets in WEIGHT_SETS:
        if label == REFERENCE and getattr(args, "budget", None) is None:
            plans.append((label, {"lora": {"target_modules": targets, "rank_pattern": {}}, "parameters": budget,
                                  "rank_text": str(recipe.lora["r"])}))
        else:
            plans.append((label, ranks_for_budget(prep.model, recipe.lora, targets, budget)))
    work = work_folder(session, NAME)
    runs = [session.run(BASE, Arm(label, {"lora": p["lora"]}), work) for label, p in plans]
    reference = next(r for (label, _), r in zip(plans, runs) if label == REFERENCE)

    results = base_results(NAME, command, clock, session, recipe, zero, runs)
    results["budget"] = budget
    results["plans"] = [{"label": label, **p} for label, p in plans]
    images = {
        "accuracy": plot_accuracy(runs, zero[0].get("accuracy"), out / "accuracy.png",
                                  f"test accuracy after {recipe.steps} steps, about {budget:,} LoRA parameters each",
                                  "adapted weight matrices"),
        "loss": plot_losses(runs, out / "loss.png", "training loss per weight set"),
    }
    results["images"] = images
    write(out, results, _markdown(results, plans, runs, reference, recipe, prep, images))
    return results


def _markdown(results: dict, plans: list, runs: list[RunResult], reference: RunResult, recipe, prep,
              images: dict) -> str:
    budget = results["budget"]
    total = runs[0].total - runs[0].trainable if runs and runs[0].total else None
    shapes = _shapes(prep.model)
    lines = [header(TITLE, (
        f"Each row adapts a different set of weight matrices with about the same number of LoRA parameters: "
        f"**{budget:,}** ({pct(budget / total, 3) if total else 'n/a'} of the model's {total:,} parameters), the "
        f"default recipe's q_proj + v_proj at r={recipe.lora['r']}. The rank of each row is chosen to match it "
        f"(r x sum(in + out) over the adapted matrices; shapes here: {shapes}). alpha = {recipe.lora['alpha']:g} "
        "everywhere, so scaling = alpha / r, as in the paper."), results)]
    lines.append(setup_text(results["recipe"], results["zero_shot"], results["data"]["sizes"]))
    lines += ["", f"## Accuracy at a budget of {budget:,} LoRA parameters (paper table 5)", ""]
    rows = []
    for (label, p), run in zip(plans, runs):
        lora_params = p["parameters"]
        tail = run.losses[-5:]
        rows.append([label, p["rank_text"], f"{lora_params:,} ({100 * (lora_params / budget - 1):+.1f}%)",
                     f"{run.trainable:,}", accuracy_cell(run), paired_cell(reference, run),
                     num(sum(tail) / len(tail)) if tail else "n/a",
                     num(run.step_seconds) if run.step_seconds else "n/a"])
    lines.append(md_table(["weights", "r", "LoRA parameters (vs budget)", "trainable (measured)", "test accuracy",
                           f"vs {REFERENCE} (paired)",
                           "train loss, last 5 steps", "s / step"], rows))
    lines += ["", PAIRED_NOTE, "", f"![accuracy]({images['accuracy']})", "", f"![loss]({images['loss']})", ""]
    return "\n".join(lines)


def _shapes(model) -> str:
    """`q_proj 576x576, k_proj 192x576, ...` (out x in) of the first layer's linear modules."""
    import torch

    seen: dict[str, str] = {}
    for path, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and re.search(r"\.0\.", path):
            name = path.rsplit(".", 1)[-1]
            seen.setdefault(name, f"{name} {module.out_features}x{module.in_features}")
    return ", ".join(seen.values()) or "n/a"
