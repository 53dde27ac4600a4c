"""LoRA's best learning rate vs full fine-tuning's, across ranks and target sets ("LoRA Without Regret",
Schulman et al., Thinking Machines Lab 2025, https://thinkingmachines.ai/blog/lora/, sections "Which layers
to apply LoRA to" and "Optimal learning rate").

Claims re-measured: (1) LoRA's best learning rate is about 10x full fine-tuning's (closer to 15x in short runs)
and roughly the same for every rank (with alpha fixed, the 1/r scaling; the blog uses alpha=32); (2) LoRA on
every linear layer (MLP included) matches full fine-tuning, attention-only LoRA falls short even at the same
number of trainable parameters. The `sentiment-minilm` recipe (all-MiniLM-L6-v2 + a fresh classification head,
Rotten Tomatoes) is trained on a log grid of learning rates with full fine-tuning, with all-linear LoRA at
r = 1, 4, 16, 64, and with attention-only LoRA at the rank whose parameter count matches all-linear r=16.
Each point of the loss-vs-LR curve is the mean training loss over the last steps (the blog plots final
training loss; every run sees the same batches, so the curves share their batch noise). Each arm's optimum is
the vertex of the parabola through its grid minimum and the two neighbours, in log10(lr); its uncertainty is a
paired bootstrap over the tail steps; held-out test accuracy and loss are those of each arm's best grid run.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UsageError
from ..inject import inject
from ..merge import count_parameters
from ..train.prepare import lora_config_for
from .common import Clock, base_results, lora_alpha, number_list, work_folder
from .report import (PAIRED_NOTE, accuracy_cell, colors, figure, header, md_table, num, paired_cell, plot_accuracy,
                     save, setup_text, write)
from .runner import Arm, RunResult, Session

NAME = "lr-sweep"
BASE = "sentiment-minilm"
HELP = ("learning-rate sweep of full fine-tuning and LoRA (r=1..64 all-linear, attention-only at matched "
        "parameters): best-LR ratio with a bootstrap interval, held-out accuracy at each arm's best LR")
TITLE = "Learning-rate sweep: LoRA vs full fine-tuning (LoRA Without Regret)"
DEFAULT_FULL_LRS = "1e-5,3e-5,1e-4,3e-4,1e-3"
DEFAULT_LORA_LRS = "1e-4,3e-4,1e-3,3e-3,1e-2"
DEFAULT_RANKS = "1,4,16,64"
# 30 runs of 100 steps x 16 (the recipe's 250 steps would take over an hour on 2 cores); the test split stays the
# recipe's 500 examples (about 2 s of evaluation per run)
DEFAULT_STEPS = 100
# attention projections: BERT (query, key, value, attention.output.dense) and Llama (q/k/v/o_proj), full path
ATTENTION_TARGETS = r".*(attention\.(self\.(query|key|value)|output\.dense)|self_attn\.[qkvo]_proj)"
FULL = "full FT"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--full-grid", default=DEFAULT_FULL_LRS, metavar="LR,...",
                   help="learning rates of full fine-tuning (default %(default)s)")
    p.add_argument("--lora-grid", default=DEFAULT_LORA_LRS, metavar="LR,...",
                   help="learning rates of every LoRA arm (default %(default)s)")
    p.add_argument("--sweep-ranks", default=DEFAULT_RANKS, metavar="R,...",
                   help="ranks of the all-linear LoRA arms (default %(default)s)")
    p.add_argument("--match-rank", type=int, default=16, metavar="R",
                   help="attention-only LoRA gets the parameter count of all-linear rank R (default %(default)s; "
                        "0: no attention-only arm)")
    p.add_argument("--lora-alpha", type=float, default=32.0,
                   help="LoRA alpha, the same for every rank (scaling alpha / r, as the blog; default %(default)s)")
    p.add_argument("--tail", type=int, default=10, metavar="N",
                   help="curve value: mean training loss of the last N steps (default %(default)s)")
    p.add_argument("--bootstrap", type=int, default=2000, metavar="N",
                   help="bootstrap replicates for the optima's intervals (default %(default)s)")


# ---------------------------------------------------------------------- pure functions
def tail_mean(losses: list[float], tail: int) -> float:
    """Mean of the last `tail` losses (all of them if fewer); `inf` for no losses or a non-finite one."""
    xs = losses[-tail:] if tail > 0 else []
    if not xs or not all(math.isfinite(x) for x in xs):
        return math.inf
    return sum(xs) / len(xs)


def optimum(log_lrs: list[float], values: list[float]) -> dict[str, Any]:
    """The minimum of a loss-vs-log10(lr) curve: the vertex of the parabola through the grid minimum and its two
    neighbours (exact for a quadratic curve), clipped to their span.

    `values` may hold `inf` (diverged runs). Returns `{"log10_lr", "lr", "where", "grid_index"}`: `where` is
    `"parabola"`, `"low edge"` / `"high edge"` (minimum at the end of the grid: the true optimum may lie beyond,
    the value is a bound), `"grid"` (a neighbour diverged, or fewer than 3 points), or `"none"` (every run
    diverged: `log10_lr` and `lr` None).
    """
    pts = sorted(zip(log_lrs, values))
    finite = [i for i, (_, y) in enumerate(pts) if math.isfinite(y)]
    if not finite:
        return {"log10_lr": None, "lr": None, "where": "none", "grid_index": None}
    i = min(finite, key=lambda k: (pts[k][1], k))
    x = pts[i][0]
    if len(pts) < 3:
        where = "grid"
    elif i == 0:
        where = "low edge"
    elif i == len(pts) - 1:
        where = "high edge"
    elif not (math.isfinite(pts[i - 1][1]) and math.isfinite(pts[i + 1][1])):
        where = "grid"
    else:
        where = "parabola"
        (x0, y0), (x1, y1), (x2, y2) = pts[i - 1:i + 2]
        d = (x0 - x1) * (x0 - x2) * (x1 - x2)
        a = (x2 * (y1 - y0) + x1 * (y0 - y2) + x0 * (y2 - y1)) / d
        b = (x2 * x2 * (y0 - y1) + x1 * x1 * (y2 - y0) + x0 * x0 * (y1 - y2)) / d
        if a > 0:
            x = min(max(-b / (2 * a), x0), x2)
    return {"log10_lr": x, "lr": 10 ** x, "where": where, "grid_index": i}


def _tail_matrix(tails: list[list[float]], length: int) -> np.ndarray:
    """Rows of the last `length` losses; a diverged run (short or non-finite) is a row of `inf`."""
    rows = [t[-length:] if len(t) >= length and all(math.isfinite(v) for v in t[-length:]) else [math.inf] * length
            for t in tails]
    return np.array(rows, dtype=np.float64).reshape(len(tails), length)


def bootstrap_optima(arms: dict[str, tuple[list[float], list[list[float]]]], reference: str, replicates: int = 2000,
                     seed: int = 0, confidence: float = 0.95) -> dict[str, Any]:
    """Each arm's optimum (`optimum` of the tail-mean curve) and its ratio to the reference arm's, with percentile
    intervals from a paired bootstrap over the tail steps.

    `arms`: `{name: (log10 lrs, per-lr tail losses)}`. Every run saw the same batches in the same order, so one
    replicate draws `T` tail-step positions with replacement (`T`: the shortest tail of a run that did not
    diverge) and re-averages every run of every arm at those positions: batch noise shared by the runs cancels
    in the ratio, as it does in the measured curves. Seed-to-seed variation is not in this interval.
    Returns `{"replicates", "tail_steps", "confidence", "arms": {name: {**optimum, "ci_lr": [lo, hi],
    "ratio": optimum / reference optimum, "ratio_ci": [lo, hi], "se_log10_ratio"}}}`; None where undefined.
    """
    ok = [len(t) for _, tails in arms.values() for t in tails if t and all(math.isfinite(v) for v in t)]
    length = min(ok) if ok else 0
    out: dict[str, Any] = {"replicates": replicates, "tail_steps": length, "confidence": confidence, "arms": {}}
    mats = {name: _tail_matrix(tails, max(length, 1)) for name, (_, tails) in arms.items()}
    points = {name: optimum(x, [float(v) for v in mats[name].mean(axis=1)]) for name, (x, _) in arms.items()}
    draws: dict[str, list[float | None]] = {name: [] for name in arms}
    if length:
        idx = np.random.default_rng(seed).integers(0, length, size=(replicates, length))
        for name, (x, _) in arms.items():
            means = mats[name][:, idx].mean(axis=2)  # (lrs, replicates)
            draws[name] = [optimum(x, list(means[:, k]))["log10_lr"] for k in range(replicates)]
    q = [100 * (1 - confidence) / 2, 100 * (1 + confidence) / 2]
    ref = points[reference]["log10_lr"]
    for name in arms:
        entry = dict(points[name])
        own = [v for v in draws[name] if v is not None]
        entry["ci_lr"] = [float(10 ** v) for v in np.percentile(own, q)] if own else None
        pairs = [a - b for a, b in zip(draws[name], draws[reference]) if a is not None and b is not None]
        ok_ratio = entry["log10_lr"] is not None and ref is not None
        entry["ratio"] = 10 ** (entry["log10_lr"] - ref) if ok_ratio else None
        entry["ratio_ci"] = [float(10 ** v) for v in np.percentile(pairs, q)] if pairs and ok_ratio else None
        entry["se_log10_ratio"] = float(np.std(pairs, ddof=1)) if len(pairs) > 1 and ok_ratio else None
        out["arms"][name] = entry
    return out


def matched_rank(per_rank_reference: int, per_rank_other: int, rank: int) -> int:
    """The rank at which LoRA on the other target set has the parameters of the reference set at `rank`:
    `round(rank * per_rank_reference / per_rank_other)`, at least 1 (parameters per unit of rank: sum of
    in + out features of the adapted matrices)."""
    if per_rank_other <= 0:
        raise ValueError("the other target set adapts no parameters")
    return max(1, round(rank * per_rank_reference / per_rank_other))


# ---------------------------------------------------------------------- the runs
def _per_rank(session: Session, common: dict[str, Any], lora: dict[str, Any]) -> int:
    """Trainable parameters LoRA adds per unit of rank on `lora`'s targets (rank 2 minus rank 1, head excluded)."""
    counts = []
    for r in (1, 2):
        recipe = session.recipe(BASE, {**common, "lora": {**lora, "r": r}})
        prep = session.prepared(recipe)
        model = prep.fresh_model(quantize=False)
        inject(model, lora_config_for(recipe, prep.source.name))
        counts.append(count_parameters(model)[0])
        del model
    return counts[1] - counts[0]


def plan(session: Session, args: argparse.Namespace) -> tuple[dict[str, list[Arm]], dict[str, Any]]:
    """The arms of every curve (`{curve name: [Arm per lr]}`) and the parameter matching."""
    full_lrs = number_list(getattr(args, "full_grid", DEFAULT_FULL_LRS), "--full-grid")
    lora_lrs = number_list(getattr(args, "lora_grid", DEFAULT_LORA_LRS), "--lora-grid")
    ranks = number_list(getattr(args, "sweep_ranks", DEFAULT_RANKS), "--sweep-ranks", int)
    match = getattr(args, "match_rank", 16)
    if match < 0:
        raise UsageError(f"--match-rank must be >= 0, got {match}")
    common: dict[str, Any] = {}
    if "steps" not in session.overrides:
        common["steps"] = DEFAULT_STEPS
    alpha = lora_alpha(args)
    all_linear = {"target_modules": "all-linear", "alpha": alpha}
    curves = {FULL: [Arm(f"{FULL}, lr {lr:g}", {**common, "lr": lr}, full_finetune=True) for lr in full_lrs]}
    for r in ranks:
        curves[f"LoRA r={r}"] = [Arm(f"LoRA r={r}, lr {lr:g}", {**common, "lr": lr, "lora": {**all_linear, "r": r}})
                                 for lr in lora_lrs]
    matching: dict[str, Any] = {"match_rank": match}
    if match:
        attention = {"target_modules": ATTENTION_TARGETS, "alpha": alpha}
        per_all, per_att = _per_rank(session, common, all_linear), _per_rank(session, common, attention)
        r_att = matched_rank(per_all, per_att, match)
        matching.update(per_rank_all_linear=per_all, per_rank_attention=per_att, attention_rank=r_att,
                        all_linear_params=per_all * match, attention_params=per_att * r_att)
        curves[f"attention r={r_att}"] = [
            Arm(f"attention r={r_att}, lr {lr:g}", {**common, "lr": lr, "lora": {**attention, "r": r_att}})
            for lr in lora_lrs]
    return curves, matching


def run(session: Session, args: argparse.Namespace, out: Path, command: str) -> dict[str, Any]:
    clock = Clock()
    tail = getattr(args, "tail", 10)
    if tail < 1:
        raise UsageError(f"--tail must be >= 1, got {tail}")
    curves, matching = plan(session, args)
    recipe = session.recipe(BASE, next(iter(curves.values()))[0].changes)
    zero = session.zero_shot(recipe)
    work = work_folder(session, NAME)
    by_curve = {name: [session.run(BASE, arm, work) for arm in arms] for name, arms in curves.items()}
    runs = [r for rs in by_curve.values() for r in rs]
    results = base_results(NAME, command, clock, session, recipe, zero, runs)
    results["matching"] = matching
    results["tail"] = tail
    results["analysis"] = summarize(by_curve, tail, getattr(args, "bootstrap", 2000))
    best = [by_curve[name][e["best_index"]] for name, e in results["analysis"]["curves"].items()
            if e["best_index"] is not None]
    images = {"curves": _plot_curves(results, out / "lr_curves.png"),
              "accuracy": plot_accuracy(best, zero[0].get("accuracy"), out / "accuracy.png",
                                        "test accuracy at each arm's best learning rate", "")}
    results["images"] = images
    write(out, results, _markdown(results, by_curve, images))
    return results


def summarize(by_curve: dict[str, list[RunResult]], tail: int, replicates: int) -> dict[str, Any]:
    """Per curve: lrs, tail-mean losses, the best grid run and the held-out numbers there; the optima, their
    bootstrap intervals and their ratio to full fine-tuning's (`bootstrap_optima`)."""
    curves: dict[str, Any] = {}
    boot_in = {}
    for name, runs in by_curve.items():
        lrs = [r.recipe["lr"] for r in runs]
        values = [math.inf if r.error else tail_mean(r.losses, tail) for r in runs]
        finite = [i for i, v in enumerate(values) if math.isfinite(v)]
        best = min(finite, key=lambda i: (values[i], i)) if finite else None
        b = runs[best] if best is not None else None
        curves[name] = {"lrs": lrs, "tail_loss": [v if math.isfinite(v) else None for v in values],
                        "diverged": [r.label for r in runs if r.error or not math.isfinite(values[runs.index(r)])],
                        "trainable": runs[0].trainable, "best_index": best,
                        "best_lr": b.recipe["lr"] if b else None,
                        "best_test": b.metrics if b else None, "best_label": b.label if b else None}
        boot_in[name] = ([math.log10(x) for x in lrs], [[] if r.error else r.losses[-tail:] for r in runs])
    boot = bootstrap_optima(boot_in, FULL, replicates=replicates) if FULL in by_curve else None
    lora = [n for n in curves if n != FULL and n.startswith("LoRA")]
    optima = [boot["arms"][n]["lr"] for n in lora if boot and boot["arms"][n]["lr"]] if boot else []
    return {"curves": curves, "bootstrap": boot,
            "rank_spread": max(optima) / min(optima) if len(optima) > 1 else None}


# ---------------------------------------------------------------------- figure
def _plot_curves(results: dict, path: Path) -> str:
    """Tail-mean training loss vs learning rate (log axis) per arm; each optimum as a star, its interval as a bar."""
    curves = results["analysis"]["curves"]
    boot = (results["analysis"]["bootstrap"] or {}).get("arms", {})
    fig = figure(7.5, 4.6)
    ax = fig.subplots()
    for (name, c), color in zip(curves.items(), colors(len(curves))):
        pts = [(lr, v) for lr, v in zip(c["lrs"], c["tail_loss"]) if v is not None]
        if not pts:
            continue
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=color, lw=1.5, ms=4,
                ls="--" if name == FULL else "-", label=name)
        o = boot.get(name)
        if o and o["lr"] and c["best_index"] is not None:
            y = c["tail_loss"][c["best_index"]]
            ax.plot([o["lr"]], [y], "*", color=color, ms=11)
            if o.get("ci_lr"):
                ax.plot(o["ci_lr"], [y, y], color=color, lw=3, alpha=0.5)
    ax.set_xscale("log")
    ax.set(xlabel="learning rate", ylabel=f"training loss, mean of the last {results['tail']} steps",
           title="loss vs learning rate (star: parabola optimum; bar: 95% bootstrap interval)")
    ax.legend(fontsize=7)
    return save(fig, path)


# ---------------------------------------------------------------------- report
def _markdown(results: dict, by_curve: dict[str, list[RunResult]], images: dict) -> str:
    a = results["analysis"]
    lines = [header(TITLE, __doc__.split("\n\n", 1)[1].strip().replace("\n", " "), results)]
    setup = setup_text(results["recipe"], results["zero_shot"], results["data"]["sizes"])
    lines.append(setup.replace(f"AdamW lr {results['recipe']['lr']:g}", "AdamW lr swept (below)"))
    m = results["matching"]
    if m.get("attention_rank"):
        lines += ["", f"Parameter matching: all-linear LoRA adds {m['per_rank_all_linear']:,} parameters per unit of "
                  f"rank, attention-only {m['per_rank_attention']:,}; attention-only rank {m['attention_rank']} "
                  f"({m['attention_params']:,} LoRA parameters) matches all-linear r={m['match_rank']} "
                  f"({m['all_linear_params']:,}). The classification head is trained in every arm, at the swept lr."]
    tail = min(results["tail"], results["recipe"]["steps"])
    lines += ["", "## Loss vs learning rate", "", f"Training loss, mean of the last {tail} steps "
              "(every run sees the same batches); `diverged`: the loop stopped on a non-finite loss.", ""]
    lrs = sorted({lr for c in a["curves"].values() for lr in c["lrs"]})
    rows = []
    for lr in lrs:
        row = [f"{lr:g}"]
        for c in a["curves"].values():
            v = c["tail_loss"][c["lrs"].index(lr)] if lr in c["lrs"] else "-"
            row.append("diverged" if v is None else (v if v == "-" else num(v, 4)))
        rows.append(row)
    lines.append(md_table(["lr", *a["curves"]], rows))
    lines += ["", f"![loss vs learning rate]({images['curves']})", "", *_optima_section(results),
              *_held_out_section(results, by_curve), "", f"![accuracy]({images['accuracy']})", ""]
    return "\n".join(lines)


def _optima_section(results: dict) -> list[str]:
    a = results["analysis"]
    boot = a["bootstrap"]
    if boot is None:
        return ["", "No full fine-tuning curve: no ratio."]
    conf = f"{100 * boot['confidence']:.0f}%"
    rows = []
    for name, e in boot["arms"].items():
        rows.append([name, f"{a['curves'][name]['trainable']:,}", _lr(e["lr"]), e["where"], _interval(e["ci_lr"]),
                     "reference" if name == FULL else _lr(e["ratio"], 3), "" if name == FULL else _interval(
                         e["ratio_ci"], 3)])
    lines = ["", "## Optimal learning rate", "", md_table(
        ["arm", "trainable", "optimal lr", "found at", f"{conf} interval", "ratio to full FT", f"{conf} interval"],
        rows)]
    lines += ["", "Optimal lr: vertex of the parabola through the grid minimum of the curve above and its two "
              "neighbours, in log10(lr) (`low edge` / `high edge`: the minimum is at the end of the grid, so the value "
              "is only a bound; `grid`: a neighbour diverged). Interval: percentile interval over "
              f"{boot['replicates']} paired bootstrap replicates, each resampling the last {boot['tail_steps']} "
              "step positions with replacement and re-averaging every run at the same positions (the runs share "
              "their batches, so shared batch noise cancels in the ratio). It measures the noise of the loss "
              "estimate only, not seed-to-seed variation: one seed per run keeps the default in 30 minutes."]
    edges = [n for n, e in boot["arms"].items() if e["where"] != "parabola"]
    if edges:
        lines += ["", "Not bracketed by the grid (the optimum, and every ratio involving it, is a grid point or a "
                  "bound, not a fit): " + ", ".join(f"{n} ({boot['arms'][n]['where']})" for n in edges)
                  + ". Widen or refine `--full-grid` / `--lora-grid`."]
    if a["rank_spread"] is not None:
        lines += ["", f"Spread of the all-linear LoRA optima across ranks: largest / smallest = "
                  f"{a['rank_spread']:.2f}x."]
    return lines


def _held_out_section(results: dict, by_curve: dict[str, list[RunResult]]) -> list[str]:
    curves = results["analysis"]["curves"]
    full = curves.get(FULL)
    ref = by_curve[FULL][full["best_index"]] if full and full["best_index"] is not None else None
    rows = []
    for name, c in curves.items():
        if c["best_index"] is None:
            rows.append([name, "-", "all diverged", "-", "-", "-"])
            continue
        r = by_curve[name][c["best_index"]]
        rows.append([name, f"{c['best_lr']:g}", accuracy_cell(r), num(r.metrics.get("loss"), 4),
                     num(c["tail_loss"][c["best_index"]], 4), paired_cell(ref, r) if ref else "n/a"])
    return ["", "## Held-out test at each arm's best learning rate", "",
            md_table(["arm", "best grid lr", "test accuracy", "test loss", "train loss (tail)",
                      "vs full FT (paired)"], rows), "", PAIRED_NOTE]


def _lr(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}g}"


def _interval(ci: list[float] | None, digits: int = 3) -> str:
    return "-" if not ci else f"[{ci[0]:.{digits}g}, {ci[1]:.{digits}g}]"
