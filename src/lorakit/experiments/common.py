"""Pieces shared by the experiment modules: module-path helpers, per-type summaries, run tables."""

from __future__ import annotations

import argparse
import math
import re
import statistics
import time
from pathlib import Path
from typing import Any

from ..errors import UsageError
from .report import environment
from .runner import RunResult, Session, load_average

_LAYER = re.compile(r"\.(\d+)\.")


def module_type(path: str) -> str:
    """The module's kind within its layer: the path after the layer index (`self_attn.q_proj`), else its last name."""
    m = list(_LAYER.finditer(path))
    return path[m[-1].end():] if m else path.rsplit(".", 1)[-1]


def layer_index(path: str) -> int | None:
    m = list(_LAYER.finditer(path))
    return int(m[-1].group(1)) if m else None


def mean(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.fmean(xs) if xs else None


def median(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def by_type(modules: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Group `{path: value}` by `module_type`, each group in layer order."""
    out: dict[str, dict[str, Any]] = {}
    for path in sorted(modules, key=lambda p: (module_type(p), layer_index(p) or 0)):
        out.setdefault(module_type(path), {})[path] = modules[path]
    return out


def cumulative_energy(singular_values: list[float], total: float | None = None) -> list[float]:
    """`E(k)` for k = 1..len(s); `total` is the squared Frobenius norm (default: from `s`)."""
    total = sum(v * v for v in singular_values) if total is None else total
    acc, out = 0.0, []
    for v in singular_values:
        acc += v * v
        out.append(acc / total if total else float("nan"))
    return out


class Clock:
    """Wall time and load average of a whole experiment."""

    def __init__(self):
        self.start = time.perf_counter()
        self.load = {"start": load_average()}

    def finish(self) -> tuple[float, dict]:
        self.load["end"] = load_average()
        return time.perf_counter() - self.start, self.load


def base_results(name: str, command: str, clock: Clock, session: Session, recipe, zero_shot: tuple,
                 runs: list[RunResult]) -> dict:
    """The fields every `results.json` has."""
    wall, load = clock.finish()
    prep = session.prepared(recipe)
    metrics, correct, seconds = zero_shot
    return {
        "experiment": name, "command": command, "wall_seconds": wall, "load_average": load,
        "environment": environment(), "recipe": recipe.to_dict(), "data": prep.split_info(), "model": prep.model_info(),
        "zero_shot": {**metrics, "seconds": seconds,
                      "correct": None if correct is None else "".join("1" if c else "0" for c in correct)},
        "runs": [r.to_dict() for r in runs],
    }


def work_folder(session: Session, name: str) -> Path:
    return session.work / name


# ---------------------------------------------------------------------- options shared by experiments
def number_list(text: str, flag: str, kind=float) -> list:
    """A comma-separated option (`--lora-grid 1e-4,3e-4`) as sorted distinct finite numbers > 0 of `kind`;
    UsageError naming `flag` otherwise."""
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{flag} must be comma-separated numbers, got {text!r}") from None
    if not values or any(not 0 < v < math.inf for v in values) or len(set(values)) != len(values):
        raise UsageError(f"{flag} must be distinct finite numbers > 0, got {text!r}")
    return sorted(values)


def lora_alpha(args: argparse.Namespace) -> float:
    """`--lora-alpha`, checked before any run: a finite number > 0 (UsageError otherwise)."""
    alpha = getattr(args, "lora_alpha", 32.0)
    if not 0 < alpha < math.inf:
        raise UsageError(f"--lora-alpha must be a finite number > 0, got {alpha}")
    return alpha
