"""QLoRA parity on a model that was never 4-bit (Dettmers et al. 2023, arXiv:2305.14314, §4-5; issue 20).

The QLoRA paper's claim: LoRA on a frozen base stored in 4-bit NormalFloat with double quantization
matches 16-bit LoRA (MMLU 53.1 vs 53.0 in its table 4). SmolLM2 here was a Q4_1 GGUF before it was
dequantized, which confounds the comparison; all-MiniLM-L6-v2 (`sentiment-minilm`: a classification
head on the encoder, Rotten Tomatoes, r=8 on query + value) has plain float weights. Each seed trains
three arms with the same LoRA initialisation, head initialisation and batches: LoRA on the fp32 base,
QLoRA (every linear layer but the head in NF4 + double quantization), and QLoRA with the frozen QERA
correction of the NF4 error (Zhang et al. 2025, arXiv:2410.06040; `lorakit.quant.qera`). The gap to
LoRA is tested per seed (exact McNemar on the same test examples) and across seeds (paired t-test
and exact sign-flip test of the per-seed accuracy differences).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..errors import UsageError
from .common import Clock, base_results, mean, work_folder
from .report import (PAIRED_NOTE, accuracy_cell, header, md_table, num, paired_cell, pct, plot_accuracy, plot_losses,
                     setup_text, write)
from .runner import Arm, RunResult, Session, paired, paired_t

NAME = "qlora-parity"
BASE = "sentiment-minilm"
HELP = "LoRA vs QLoRA (NF4 + double quantization) vs QLoRA + QERA on the MiniLM encoder, several seeds, paired tests"
TITLE = "QLoRA parity on a model that was never 4-bit (all-MiniLM-L6-v2)"
DEFAULT_SEEDS = "0,1,2,3,4"
DEFAULT_STEPS = 150  # the recipe's 250 x 16 would take ~50 min for 15 runs on 2 cores; --steps 250 for the full one
ARMS = ("LoRA", "QLoRA", "QLoRA+QERA")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seeds", default=DEFAULT_SEEDS, metavar="S,...",
                   help="seeds (LoRA init, head init, batch order); each trains the three arms (default %(default)s); "
                        f"runs are {DEFAULT_STEPS} steps unless --steps says otherwise (the recipe's full length: 250)")
    p.add_argument("--qera-rank", type=int, default=None, metavar="K",
                   help="rank of the frozen QERA correction of the QLoRA+QERA arm (default: the recipe's, 8)")


def seeds_from(text: str) -> list[int]:
    """`--seeds` as distinct integers >= 0. Raises `UsageError` naming the bad value."""
    try:
        seeds = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"--seeds must be comma-separated integers >= 0, got {text!r}") from None
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise UsageError(f"--seeds must be distinct integers >= 0, got {text!r}")
    return seeds


def arms(seed: int, qera_rank: int) -> list[Arm]:
    """The three arms of one seed (labels `LoRA s=<seed>`, ...)."""
    return [Arm(f"LoRA s={seed}", {"seed": seed}),
            Arm(f"QLoRA s={seed}", {"seed": seed, "quantize": "nf4", "qera_rank": 0}),
            Arm(f"QLoRA+QERA s={seed}", {"seed": seed, "quantize": "nf4", "qera_rank": qera_rank})]


def run(session: Session, args: argparse.Namespace, out: Path, command: str) -> dict[str, Any]:
    seeds = seeds_from(getattr(args, "seeds", DEFAULT_SEEDS))
    if "steps" not in session.overrides:
        session.overrides["steps"] = DEFAULT_STEPS
    clock = Clock()
    recipe = session.recipe(BASE)
    qera_rank = getattr(args, "qera_rank", None)
    qera_rank = recipe.qera_rank if qera_rank is None else qera_rank
    if isinstance(qera_rank, bool) or not isinstance(qera_rank, int) or qera_rank < 1:
        raise UsageError(f"--qera-rank must be an integer >= 1, got {qera_rank!r}")
    zero = session.zero_shot(session.recipe(BASE, {"seed": seeds[0]}))
    work = work_folder(session, NAME)
    runs: list[RunResult] = []
    for seed in seeds:
        runs += [session.run(BASE, arm, work) for arm in arms(seed, qera_rank)]
        session.release()  # this seed's models (three loads) are not needed again
    results = base_results(NAME, command, clock, session, session.recipe(BASE, {"seed": seeds[0]}), zero, runs)
    results["seeds"] = seeds
    results["qera_rank"] = qera_rank
    results["comparison"] = compare(runs, seeds)
    images = {
        "accuracy": plot_accuracy(runs, zero[0].get("accuracy"), out / "accuracy.png",
                                  f"test accuracy after {recipe.steps} steps", ""),
        "loss": plot_losses(runs[:3], out / "loss.png", f"training loss, seed {seeds[0]}"),
    }
    results["images"] = images
    write(out, results, _markdown(results, runs, images))
    return results


def compare(runs: list[RunResult], seeds: list[int]) -> dict[str, Any]:
    """Per arm: accuracies per seed, and against LoRA of the same seed: per-seed McNemar, the paired
    t-test and sign-flip test of the accuracy differences (points), the McNemar counts pooled over seeds.

    `runs` holds the three arms of each seed in `ARMS` order, seeds in `seeds` order.
    """
    table: dict[str, Any] = {}
    by_arm = {name: runs[i::len(ARMS)] for i, name in enumerate(ARMS)}
    lora = by_arm["LoRA"]
    for name, arm_runs in by_arm.items():
        ok = [(ref, r) for ref, r in zip(lora, arm_runs) if not ref.error and not r.error]
        entry: dict[str, Any] = {
            "accuracy": {str(s): (None if r.error else r.accuracy) for s, r in zip(seeds, arm_runs)},
            "mean_accuracy": mean([r.accuracy for r in arm_runs if not r.error]),
            "failed": [r.label for r in arm_runs if r.error],
            "trainable": arm_runs[0].trainable,
            "bits_per_param": (arm_runs[0].quantization or {}).get("bits_per_param"),
            "qera_remaining": mean([r.quantization["qera"]["output_error_remaining_mean"] for r in arm_runs
                                    if (r.quantization or {}).get("qera")]),
            "step_seconds": mean([r.step_seconds for r in arm_runs]),
            "train_cpu_seconds": mean([r.train_cpu_seconds for r in arm_runs if not r.error]),
        }
        if name != "LoRA" and ok:
            diffs = [100 * (r.accuracy - ref.accuracy) for ref, r in ok]
            per_seed = [paired(ref.correct, r.correct) for ref, r in ok]
            b, c = sum(d["only_reference"] for d in per_seed), sum(d["only_other"] for d in per_seed)
            entry["vs_lora"] = {"differences_points": diffs, "per_seed_mcnemar": per_seed,
                                "paired_t": paired_t(diffs), "pooled_only_lora": b, "pooled_only_this": c}
        table[name] = entry
    return table


# ---------------------------------------------------------------------- report
def _markdown(results: dict, runs: list[RunResult], images: dict) -> str:
    seeds, comp = results["seeds"], results["comparison"]
    lines = [header(TITLE, __doc__.split("\n\n", 1)[1].strip().replace("\n", " "), results)]
    setup = setup_text(results["recipe"], results["zero_shot"], results["data"]["sizes"])
    lines.append(setup.replace(f"seed {results['recipe']['seed']} for every run",
                               f"seeds {', '.join(map(str, seeds))}, one per group of three arms"))
    lines += ["The zero-shot row is the fp32 base encoder with a freshly initialised (untrained) head (seed "
              f"{seeds[0]}). QERA rank {results['qera_rank']}, calibrated on the first "
              f"{results['recipe']['calibration_size']} training examples.", "", "## The gap to LoRA across seeds", ""]
    rows = []
    for name in ARMS:
        e = comp[name]
        v = e.get("vs_lora")
        t = v["paired_t"] if v else None
        rows.append([name, f"{e['trainable']:,}", num(e["bits_per_param"], 4) if e["bits_per_param"] else "32 (fp32)",
                     pct(e["mean_accuracy"]), _gap(t), _ci(t), _p(t, "p_value"), _p(t, "sign_flip_p"),
                     f"{v['pooled_only_lora']}/{v['pooled_only_this']}" if v else "reference",
                     pct(1 - e["qera_remaining"]) if e["qera_remaining"] is not None else "-",
                     num(e["step_seconds"]) if e["step_seconds"] else "n/a"])
    lines.append(md_table(["arm", "trainable", "base bits / parameter", f"mean test accuracy ({len(seeds)} seeds)",
                           "gap to LoRA (points, mean)", "95% CI", "paired t p", "sign-flip p",
                           "pooled b/c (only LoRA / only this)", "NF4 output error removed", "s / step"], rows))
    lines += ["", "Gap: mean over seeds of (arm accuracy - LoRA accuracy, same seed) in points; the 95% interval and "
              f"p from a paired t-test over the {len(seeds)} seeds (df = {len(seeds) - 1}), and the exact two-sided "
              "sign-flip permutation p of the same differences (no normality assumed; its smallest possible value is "
              f"{2 / 2 ** len(seeds):.3g} with {len(seeds)} seeds). Pooled b/c: test examples only LoRA / only this "
              "arm got right, summed over seeds. Bits per parameter: the quantized layers' resident bytes "
              "(4-bit codes, double-quantized scales) per weight; the head stays fp32. NF4 output error removed: "
              "the share of the quantized layers' output error on the calibration tokens that the QERA correction "
              "removes (mean over seeds).", "", "## Every run", ""]
    rows = []
    for r in runs:
        ref = runs[runs.index(r) - runs.index(r) % len(ARMS)]
        rows.append([r.label, accuracy_cell(r), paired_cell(ref, r), num(r.losses[-1]) if r.losses else "n/a",
                     f"{r.train_seconds:.0f} s" if not r.error else "n/a"])
    lines.append(md_table(["run", "test accuracy", "vs LoRA, same seed (paired)", "last train loss",
                           "training time"], rows))
    lines += ["", PAIRED_NOTE, "", f"![accuracy]({images['accuracy']})", "", f"![loss]({images['loss']})", ""]
    return "\n".join(lines)


def _gap(t: dict | None) -> str:
    if t is None:
        return "reference"
    return f"{t['mean']:+.2f}" + (f" ± {t['se']:.2f}" if t["se"] else "")


def _ci(t: dict | None) -> str:
    return f"[{t['ci'][0]:+.2f}, {t['ci'][1]:+.2f}]" if t and t["ci"] else "-"


def _p(t: dict | None, key: str) -> str:
    return f"{t[key]:.3g}" if t and t.get(key) is not None else "-"
