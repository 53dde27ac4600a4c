"""What a classification test result means: confidence intervals, the majority-class baseline, the
predicted counts and the confusion matrix, and warnings when the test set cannot tell the claim.

- `wilson(k, n)`: the 95% Wilson score interval of an accuracy k/n (Wilson 1927): unlike the
  normal approximation it stays inside [0, 1] and is sensible for n = 5 or k = n.
- `paired_gain(before, after)`: the gain in accuracy of the same test examples scored twice, with
  Newcombe's (1998, method 10) hybrid score interval for a difference of paired proportions: the two
  Wilson intervals combined with the correlation of the paired outcomes (phi).
- `classification_summary(...)`: all of it for a run, as recorded in `report.json` under
  `test.stats`.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any, Sequence

Z95 = 1.959963984540054  # the 97.5% quantile of the standard normal


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of the proportion k / n ((0, 1) for n = 0)."""
    if n <= 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def paired_gain(before: Sequence[bool], after: Sequence[bool], z: float = Z95) -> dict[str, Any]:
    """`after` minus `before` accuracy on the same examples, with Newcombe's paired 95% interval.

    Returns `{"gain", "ci95": [low, high], "n", "gained" (wrong -> right), "lost" (right -> wrong)}`.
    """
    if len(before) != len(after):
        raise ValueError(f"paired outcomes of different lengths: {len(before)} and {len(after)}")
    n = len(before)
    both = sum(1 for b, a in zip(before, after) if a and b)
    gained = sum(1 for b, a in zip(before, after) if a and not b)
    lost = sum(1 for b, a in zip(before, after) if b and not a)
    neither = n - both - gained - lost
    if n == 0:
        return {"gain": 0.0, "ci95": [-1.0, 1.0], "n": 0, "gained": 0, "lost": 0}
    p1, p2 = (both + gained) / n, (both + lost) / n  # after, before
    l1, u1 = wilson(both + gained, n, z)
    l2, u2 = wilson(both + lost, n, z)
    margins = (both + gained) * (lost + neither) * (both + lost) * (gained + neither)
    phi = (both * neither - gained * lost) / math.sqrt(margins) if margins else 0.0
    d = p1 - p2
    lower = math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    upper = math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    return {"gain": d, "ci95": [max(-1.0, d - lower), min(1.0, d + upper)], "n": n, "gained": gained, "lost": lost}


def accuracy_with_ci(correct: Sequence[bool]) -> dict[str, Any]:
    k, n = sum(bool(c) for c in correct), len(correct)
    lo, hi = wilson(k, n)
    return {"accuracy": k / n if n else 0.0, "correct": k, "n": n, "ci95": [lo, hi]}


def confusion(gold: Sequence, predicted: Sequence, labels: Sequence) -> list[list[int]]:
    """`matrix[i][j]`: examples of gold label `labels[i]` predicted as `labels[j]`."""
    index = {label: i for i, label in enumerate(labels)}
    matrix = [[0] * len(labels) for _ in labels]
    for g, p in zip(gold, predicted):
        matrix[index[g]][index[p]] += 1
    return matrix


def classification_summary(gold: Sequence, labels: Sequence, predictions: dict[str, Sequence | None]) -> dict[str, Any]:
    """The test result in context. `predictions`: label predictions per model form ("before",
    "after", "merged"; None where unknown, e.g. a run resumed from an old checkpoint)."""
    n = len(gold)
    counts = Counter(gold)
    majority, majority_n = max(counts.items(), key=lambda kv: (kv[1], str(kv[0]))) if counts else (None, 0)
    summary: dict[str, Any] = {
        "n": n, "labels": [str(label) for label in labels],
        "gold_counts": {str(label): counts.get(label, 0) for label in labels},
        "majority_baseline": {"label": str(majority), **accuracy_with_ci([g == majority for g in gold])},
        "accuracy": {}, "predicted_counts": {}, "confusion": {},
    }
    for form, preds in predictions.items():
        if preds is None:
            continue
        summary["accuracy"][form] = accuracy_with_ci([p == g for p, g in zip(preds, gold)])
        got = Counter(preds)
        summary["predicted_counts"][form] = {str(label): got.get(label, 0) for label in labels}
        summary["confusion"][form] = confusion(gold, preds, labels)
    before, after = predictions.get("before"), predictions.get("after")
    if before is not None and after is not None:
        summary["gain"] = paired_gain([p == g for p, g in zip(before, gold)], [p == g for p, g in zip(after, gold)])
    summary["warnings"] = _warnings(summary, majority_n)
    return summary


def _warnings(summary: dict[str, Any], majority_n: int) -> list[str]:
    n, out = summary["n"], []
    base = summary["majority_baseline"]
    after = summary["accuracy"].get("after")
    if n < 30:
        out.append(f"only {n} test examples: every accuracy here is uncertain by tens of points (see the 95% "
                   "intervals); use a larger --test-size or --test-data")
    if after is not None and after["ci95"][0] <= base["accuracy"]:
        out.append(f"the accuracy after training ({100 * after['accuracy']:.1f}%, 95% CI "
                   f"{100 * after['ci95'][0]:.1f}-{100 * after['ci95'][1]:.1f}%) is not clearly above always "
                   f"answering the majority class {base['label']!r} ({100 * base['accuracy']:.1f}%)")
    gain = summary.get("gain")
    if gain is not None and gain["ci95"][0] <= 0 <= gain["ci95"][1]:
        out.append(f"the test set (n={n}) is too small to tell the gain of {100 * gain['gain']:+.1f} points from "
                   f"zero (95% CI {100 * gain['ci95'][0]:+.1f} to {100 * gain['ci95'][1]:+.1f} points)")
    if majority_n == n and n:
        out.append("the test split holds a single label: accuracy there says nothing about telling the labels apart")
    return out
