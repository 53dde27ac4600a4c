"""How much of the data `max_length` cuts: counted per split, logged, reported, with a suggestion.

Each task truncates by its own documented rule (`Task.truncation_rule`): classification keeps the
start of a document (the template's question and answer cue stay), instruction data keeps the end
of a long prompt. `truncation_report` counts the examples longer than `max_length`, the tokens kept
of their total, and suggests the `--max-length` that would fit 95% (and all) of the examples.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

FIT_SHARE = 0.95


def _round_up(n: int, multiple: int = 8) -> int:
    return multiple * math.ceil(n / multiple)


def split_truncation(full: Sequence[int], max_length: int) -> dict[str, Any]:
    """`{"n", "truncated", "tokens_total", "tokens_kept", "longest", "fit_95"}` for one split."""
    kept = [min(n, max_length) for n in full]
    ordered = sorted(full)
    fit = ordered[min(len(ordered) - 1, math.ceil(FIT_SHARE * len(ordered)) - 1)] if ordered else 0
    return {"n": len(full), "truncated": sum(n > max_length for n in full), "tokens_total": sum(full),
            "tokens_kept": sum(kept), "longest": max(full, default=0), "fit_95": _round_up(fit)}


def truncation_report(task, splits: dict[str, list], max_length: int, positions: int | None) -> dict[str, Any]:
    """The truncation of each split (`split_truncation`), the task's rule, and the suggested
    `--max-length` (the 95th percentile of the training lengths, rounded up to 8, capped at the
    model's positions) when any training or test example is cut."""
    per = {name: split_truncation(task.full_lengths(examples), max_length) for name, examples in splits.items()}
    report: dict[str, Any] = {"max_length": max_length, "rule": task.truncation_rule, "splits": per}
    if any(s["truncated"] for s in per.values()):
        wanted = max(s["fit_95"] for s in per.values())
        report["suggested_max_length"] = min(wanted, positions) if positions else wanted
    return report


def truncation_message(report: dict[str, Any]) -> str | None:
    """One log line, or None when nothing was cut."""
    cut = {name: s for name, s in report["splits"].items() if s["truncated"]}
    if not cut:
        return None
    parts = [f"{s['truncated']} of {s['n']} {name} examples" for name, s in cut.items()]
    total = sum(s["tokens_total"] for s in cut.values())
    kept = sum(s["tokens_kept"] for s in cut.values())
    return (f"truncation: {', '.join(parts)} are longer than max_length {report['max_length']} (longest "
            f"{max(s['longest'] for s in cut.values())} tokens; {kept:,} of {total:,} tokens of these splits kept); "
            f"{report['rule']}; --max-length {report['suggested_max_length']} would fit 95% of the examples")
