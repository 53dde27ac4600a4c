"""Benchmark: packing vs padding on the `chat` recipe's real data (issue 16's packing target: the same held-out
loss in at least 1.5x fewer seconds).

Per seed, two `lorakit train chat` runs at once, one torch thread each, so that both see the same machine: the
padded path (batches of 8 examples, each padded to the longest in its batch) and `--packing` with batches of 4
rows (the recipe's examples average 53 tokens, so a 128-token row holds about 2: the same examples per step and
the same training tokens per run). Validation (the recipe's 64 examples) every 10 steps records the training
seconds spent so far (evaluations excluded). Reported per seed: each run's training seconds and final validation
and test loss, and the packed run's training seconds when its validation curve (linear between evaluations)
first reaches the padded run's final validation loss, as a ratio to the padded run's seconds.

    python -m benchmarks.packing                  # seeds 0 and 1 (about 15 minutes on 2 cores)
    python -m benchmarks.packing --seeds 0 --out /tmp/packing
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ARMS = {"padded": [], "packed": ["--packing", "--batch-size", "4"]}
COMMON = ["--no-eval-before", "--no-merge-check", "--eval-every", "10", "--threads", "1", "--overwrite"]


def seconds_to_reach(evals: list[dict], target: float) -> float | None:
    """Training seconds at which the validation loss first reaches `target`, linear between evaluations;
    None if it never does."""
    prev = None
    for e in evals:
        if e["loss"] <= target:
            if prev is None or prev["loss"] == e["loss"]:
                return e["train_seconds"]
            w = (prev["loss"] - target) / (prev["loss"] - e["loss"])
            return prev["train_seconds"] + w * (e["train_seconds"] - prev["train_seconds"])
        prev = e
    return None


def run_seed(seed: int, folder: Path) -> dict:
    procs = {}
    for name, extra in ARMS.items():
        argv = [sys.executable, "-m", "lorakit", "train", "chat", "--seed", str(seed), "--out", str(folder / name),
                *COMMON, *extra]
        log = open(folder / f"{name}.log", "w")
        procs[name] = (subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT), log)
    for name, (proc, log) in procs.items():
        if proc.wait() != 0:
            raise SystemExit(f"{name} (seed {seed}) failed; see {folder / (name + '.log')}")
        log.close()
    out = {}
    for name in ARMS:
        r = json.loads((folder / name / "report.json").read_text())
        t = r["training"]
        out[name] = {"train_seconds": t["train_seconds"], "examples_seen": t["examples_seen"], "tokens": t["tokens"],
                     "val_loss": t["evals"][-1]["loss"], "test_loss": r["test"]["after"]["loss"],
                     "padding": r["memory"]["padding"]["padding"], "evals": t["evals"]}
    target = out["padded"]["val_loss"]
    reach = seconds_to_reach(out["packed"]["evals"], target)
    out["packed_seconds_to_padded_val_loss"] = reach
    out["speedup_to_same_val_loss"] = out["padded"]["train_seconds"] / reach if reach else None
    out["speedup_same_examples"] = out["padded"]["train_seconds"] / out["packed"]["train_seconds"]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--out", default=None, help="folder for the runs (default: a temporary folder)")
    args = p.parse_args(argv)
    root = Path(args.out or tempfile.mkdtemp(prefix="lorakit-packing-"))
    results = {"load_average_start": os.getloadavg()}
    for seed in (int(s) for s in args.seeds.split(",")):
        folder = root / f"seed{seed}"
        folder.mkdir(parents=True, exist_ok=True)
        results[f"seed {seed}"] = run_seed(seed, folder)
    results["load_average_end"] = os.getloadavg()
    print(json.dumps(results, indent=1))
    for key, r in results.items():
        if key.startswith("seed"):
            pa, pk = r["padded"], r["packed"]
            print(f"{key}: padded {pa['train_seconds']:.0f} s (padding {100 * pa['padding']:.1f}%, val "
                  f"{pa['val_loss']:.4f}, test {pa['test_loss']:.4f}); packed {pk['train_seconds']:.0f} s (padding "
                  f"{100 * pk['padding']:.1f}%, val {pk['val_loss']:.4f}, test {pk['test_loss']:.4f}); packed reaches "
                  f"the padded final val loss after {r['packed_seconds_to_padded_val_loss'] or float('nan'):.0f} s: "
                  f"{r['speedup_to_same_val_loss'] or float('nan'):.2f}x; same examples: "
                  f"{r['speedup_same_examples']:.2f}x", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
