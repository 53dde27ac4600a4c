"""Writing an experiment's outputs: `results.json`, `report.md` and PNG figures (matplotlib, Agg canvas)."""

from __future__ import annotations

import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Any, Iterable

from .runner import RunResult, paired, standard_error
from ..version import __version__

RESULTS_NAME = "results.json"
REPORT_NAME = "report.md"


# ---------------------------------------------------------------------- text
def md_table(header: list[str], rows: Iterable[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join("" if c is None else str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def pct(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.{digits}f}%"


def num(x: float | None, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.{digits}g}" if abs(x) < 1000 else f"{x:,.0f}"


def mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.2f} MiB"


def accuracy_cell(run: RunResult) -> str:
    """`83.6% ± 1.7` (binomial standard error in points), or the failure."""
    if run.error:
        return "failed (" + run.error.split(";")[0] + ")"
    acc, n = run.metrics["accuracy"], run.metrics["n"]
    return f"{100 * acc:.1f}% ± {100 * standard_error(acc, n):.1f}"


def paired_cell(reference: RunResult, run: RunResult) -> str:
    """`+1.2 (b/c, p=0.31)`: difference in points on the same examples and McNemar's exact p."""
    if run is reference:
        return "reference"
    if run.error or reference.error or run.correct is None or reference.correct is None:
        return "n/a"
    d = paired(reference.correct, run.correct)
    return f"{d['delta_points']:+.1f} ({d['only_reference']}/{d['only_other']}, p={d['p_value']:.2g})"


PAIRED_NOTE = ("Accuracy ± its binomial standard error `sqrt(p (1 - p) / n)`. The paired column compares each "
               "row with the reference on the same test examples: the difference in points, then b/c (examples "
               "only the reference / only this row gets right) and the two-sided exact McNemar p-value; p above "
               "0.05 means the two rows are not distinguishable on this test split.")


def environment() -> dict[str, Any]:
    import torch
    import transformers


    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count()
    return {"lorakit": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "machine": platform.machine(), "cpus": cpus,
            "threads": torch.get_num_threads(), "cuda": torch.cuda.is_available(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}


def header(title: str, description: str, results: dict[str, Any]) -> str:
    env = results["environment"]
    wall = results["wall_seconds"]
    la = results.get("load_average", {})
    device = "a CUDA GPU" if env["cuda"] else f"the CPU ({env['cpus']} cores, {env['threads']} torch threads, fp32)"
    lines = [
        f"# {title}", "", description, "",
        "Generated from real runs by this command (numbers, tables and figures below are its output):", "",
        f"    {results['command']}", "",
        f"Run time: {wall:.0f} s ({wall / 60:.1f} min) on {device}, {env['date_utc']} UTC; torch {env['torch']}, "
        f"transformers {env['transformers']}, lorakit {env['lorakit']}; "
        f"OMP_WAIT_POLICY={env['omp_wait_policy'] or 'unset'}; "
        f"1/5/15-min load average {la.get('start')} at the start and {la.get('end')} at the end "
        "(another job shared the CPU when the load is near or above the core count: times are then inflated).",
        "",
    ]
    return "\n".join(lines)


def setup_text(recipe: dict[str, Any], zero_shot: dict[str, Any], sizes: dict[str, int]) -> str:
    return (f"Setup: model `{recipe['model']}`, task `{recipe['task']}`, data `{recipe['data']}` "
            f"(train {sizes['train']:,} / validation {sizes['val']} / test {sizes['test']} examples, split seed "
            f"{recipe['split_seed']}); {recipe['steps']} steps x batch {recipe['batch_size']} "
            f"(x {recipe['grad_accum']} accumulation), at most {recipe['max_length']} tokens; AdamW lr "
            f"{recipe['lr']:g}, "
            f"{recipe['warmup_steps']} warmup steps then {recipe['schedule']} decay, weight decay "
            f"{recipe['weight_decay']:g}, "
            f"gradient clipping {recipe['grad_clip']:g}; seed {recipe['seed']} for every run (same LoRA init where "
            "shapes "
            f"agree, same batches). Zero-shot (base model) test accuracy: {pct(zero_shot.get('accuracy'))} "
            f"(loss {num(zero_shot.get('loss'))}).")


def write(out: str | Path, results: dict[str, Any], markdown: str) -> dict[str, Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / RESULTS_NAME).write_text(json.dumps(results, indent=1, default=_default) + "\n", encoding="utf-8")
    (out / REPORT_NAME).write_text(markdown.rstrip() + "\n", encoding="utf-8")
    return {RESULTS_NAME: out / RESULTS_NAME, REPORT_NAME: out / REPORT_NAME}


def _default(x: Any) -> Any:
    if isinstance(x, Path):
        return str(x)
    if hasattr(x, "tolist"):
        return x.tolist()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


# ---------------------------------------------------------------------- figures
def figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save(fig, path: Path) -> str:
    fig.savefig(path, dpi=100)
    return path.name


def colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["viridis" if n > 10 else "tab10"]
    return [cmap(i / max(1, n - 1)) if n > 10 else cmap(i) for i in range(n)]


def plot_losses(runs: list[RunResult], path: Path, title: str) -> str:
    """Training loss per step of every run (raw, thin) and its 5-step moving average (thick)."""
    fig = figure(7.5, 4.2)
    ax = fig.subplots()
    for run, color in zip(runs, colors(len(runs))):
        if not run.losses:
            continue
        steps = list(range(1, len(run.losses) + 1))
        ax.plot(steps, run.losses, color=color, lw=0.6, alpha=0.35)
        w = min(5, len(run.losses))
        windows = [run.losses[max(0, i - w + 1):i + 1] for i in range(len(run.losses))]
        avg = [sum(x) / len(x) for x in windows]
        ax.plot(steps, avg, color=color, lw=1.8, label=run.label)
    ax.set(xlabel="step", ylabel="training loss (nats)", title=title)
    ax.legend(fontsize=7)
    return save(fig, path)


def plot_accuracy(runs: list[RunResult], zero_shot: float | None, path: Path, title: str, xlabel: str = "") -> str:
    """Test accuracy per run with ± 1 standard error bars; the zero-shot accuracy as a line."""
    fig = figure(max(5.5, 0.9 * len(runs) + 2), 4.0)
    ax = fig.subplots()
    ok = [r for r in runs if not r.error]
    x = list(range(len(ok)))
    acc = [100 * r.accuracy for r in ok]
    err = [100 * standard_error(r.accuracy, r.metrics["n"]) for r in ok]
    ax.bar(x, acc, yerr=err, capsize=3, color=colors(len(ok)))
    for xi, a in zip(x, acc):
        ax.text(xi, a + 0.5, f"{a:.1f}", ha="center", va="bottom", fontsize=7)
    if zero_shot is not None:
        ax.axhline(100 * zero_shot, color="gray", ls="--", lw=1, label=f"zero-shot {100 * zero_shot:.1f}%")
        ax.legend(fontsize=7, loc="lower right")
    lo = min(acc + ([100 * zero_shot] if zero_shot is not None else [])) if acc else 0
    ax.set_ylim(max(0, lo - 10), min(100, max(acc, default=100) + 6))
    ax.set_xticks(x, [r.label for r in ok], rotation=20 if len(ok) > 5 else 0, fontsize=8)
    ax.set(ylabel="test accuracy (%)", xlabel=xlabel, title=title)
    return save(fig, path)
