"""LoRA variants on the default recipe: LoRA, rsLoRA, DoRA, LoRA+, PiSSA (docs/variants.md, issue 7).

Every variant trains the default recipe (`sentiment`: SmolLM2-135M, Rotten Tomatoes, r=8,
alpha=16 on q_proj + v_proj, 40 steps x 8, lr 2e-3) with one switch changed, the same seed,
batches and steps. Reported: test accuracy, the paired difference with plain LoRA, and the
training time (the optimisation loop) relative to LoRA.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .common import Clock, base_results, work_folder
from .report import (PAIRED_NOTE, accuracy_cell, header, md_table, num, paired_cell, plot_accuracy, plot_losses,
                     setup_text, write)
from .runner import Arm, RunResult, Session

NAME = "variants"
BASE = "sentiment"
HELP = "LoRA vs rsLoRA, DoRA, LoRA+ and PiSSA on the default recipe: accuracy and training time"
TITLE = "LoRA variants on the default recipe: accuracy and training time"
TIMED_STEPS = 2


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--loraplus-ratio", type=float, default=16.0, metavar="LAMBDA",
                   help="LoRA+ learning-rate ratio eta_B / eta_A (default %(default)s, the paper's 2^4)")
    p.add_argument("--timing-rounds", type=int, default=3, metavar="N",
                   help="rounds of interleaved step timing after the runs (default %(default)s; 0: none)")


def arms(ratio: float = 16.0) -> list[tuple[Arm, str]]:
    """`(arm, what changes)` for each variant."""
    return [
        (Arm("LoRA"), "scaling alpha / r"),
        (Arm("rsLoRA", {"lora": {"use_rslora": True}}), "`use_rslora=True`: scaling alpha / sqrt(r)"),
        (Arm("DoRA", {"lora": {"use_dora": True}}), "`use_dora=True`: magnitude x direction (eq. 5)"),
        (Arm("LoRA+", loraplus_ratio=ratio),
         f"`loraplus_param_groups(ratio={ratio:g})`: lr of B = {ratio:g} x lr of A"),
        (Arm("PiSSA", {"lora": {"init": "pissa"}}), '`init="pissa"`: A, B from the top-r singular vectors of W0'),
    ]


def run(session: Session, args: argparse.Namespace, out: Path, command: str) -> dict[str, Any]:
    clock = Clock()
    recipe = session.recipe(BASE)
    session.prepared(recipe)
    zero = session.zero_shot(recipe)
    work = work_folder(session, NAME)
    plan = arms(getattr(args, "loraplus_ratio", 16.0))
    runs = [session.run(BASE, arm, work) for arm, _ in plan]
    reference = runs[0]
    rounds = getattr(args, "timing_rounds", 3)
    timing = None
    if rounds > 0:
        session.log("interleaved step timing")
        timing = session.interleaved_step_times(BASE, [arm for arm, _ in plan], rounds=1 if args.quick else rounds,
                                                steps=1 if args.quick else TIMED_STEPS)

    results = base_results(NAME, command, clock, session, recipe, zero, runs)
    results["settings"] = {arm.label: what for arm, what in plan}
    results["timing"] = timing
    results["relative_train_time"] = {r.label: (r.train_seconds / reference.train_seconds
                                                if not r.error and reference.train_seconds else None) for r in runs}
    results["relative_train_cpu_time"] = {
        r.label: r.train_cpu_seconds / reference.train_cpu_seconds
        if not r.error and reference.train_cpu_seconds else None for r in runs}
    images = {
        "accuracy": plot_accuracy(runs, zero[0].get("accuracy"), out / "accuracy.png",
                                  f"test accuracy after {recipe.steps} steps", ""),
        "loss": plot_losses(runs, out / "loss.png", "training loss per variant"),
    }
    results["images"] = images
    results["table"] = table(results, runs, plan)
    write(out, results, _markdown(results, runs, recipe, images))
    return results


def table(results: dict, runs: list[RunResult], plan: list[tuple[Arm, str]]) -> str:
    reference = runs[0]
    timing = (results.get("timing") or {}).get("arms", {})
    rows = []
    for (_arm, what), run in zip(plan, runs):
        rel = results["relative_train_time"][run.label]
        rel_cpu = results["relative_train_cpu_time"][run.label]
        t = timing.get(run.label)
        tail = run.losses[-5:]
        rows.append([run.label, what, f"{run.trainable:,}", accuracy_cell(run), paired_cell(reference, run),
                     f"{run.train_seconds:.0f} s" if not run.error else "n/a", f"{rel:.2f}x" if rel else "n/a",
                     f"{rel_cpu:.2f}x" if rel_cpu else "n/a",
                     f"{t['cpu_relative']:.2f}x ({t['cpu_step_seconds']:.2f} s)" if t else "n/a",
                     f"{run.inject_seconds:.1f} s", num(sum(tail) / len(tail)) if tail else "n/a"])
    return md_table(["variant", "change", "trainable", "test accuracy", "vs LoRA (paired)",
                     f"training time ({reference.steps} steps)",
                     "relative to LoRA", "relative, CPU time", "relative, interleaved CPU time per step",
                     "inject time", "train loss, last 5 steps"], rows)


def _markdown(results: dict, runs: list[RunResult], recipe, images: dict) -> str:
    lines = [header(TITLE, __doc__.split("\n\n", 1)[1].strip().replace("\n", " "), results)]
    lines.append(setup_text(results["recipe"], results["zero_shot"], results["data"]["sizes"]))
    lines += ["", "## Accuracy and training time", "", results["table"], "",
              "Training time is the wall time of the run's optimisation loop (forward, backward, optimizer step; "
              "evaluation excluded), and relative to LoRA its ratio; the CPU-time ratio divides the CPU time this "
              "process (all its threads) spent in the loop, which waiting for other processes on a shared machine "
              "does not inflate. Because the runs follow one another, a change of the machine's load between them "
              "still shows up; the interleaved timing repeats a few steps of every variant in turn, "
              + _timing_text(results) + ", and reports the median over rounds of each variant's CPU time per step "
              "divided by LoRA's in the same round. Inject time is `lorakit.inject` (PiSSA: the SVD of each adapted "
              "weight). rsLoRA computes exactly what LoRA computes (only the scalar differs), so its ratios show the "
              "timing noise of the machine. " + PAIRED_NOTE, "",
              f"![accuracy]({images['accuracy']})", "", f"![loss]({images['loss']})", ""]
    return "\n".join(lines)


def _timing_text(results: dict) -> str:
    t = results.get("timing")
    if not t:
        return "(not run)"
    return f"{t['rounds']} round(s) of 1 warm-up step and {t['steps']} timed step(s) per variant, on fresh models"
