"""`lorakit experiment`: re-measure the LoRA paper's claims on the built-in model and data.

    lorakit experiment rank-sweep   [--out DIR] [--ranks 1,2,4,8,64] [--compare 8,64]
    lorakit experiment which-weights [--out DIR] [--budget N]
    lorakit experiment full-vs-lora [--out DIR] [--full-lrs 2e-5,5e-5,1e-4]
    lorakit experiment variants     [--out DIR] [--loraplus-ratio 16]
    lorakit experiment qlora-parity [--out DIR] [--seeds 0,1,2,3,4] [--qera-rank 8]
    lorakit experiment lr-sweep     [--out DIR] [--full-grid ...] [--lora-grid ...] [--sweep-ranks 1,4,16,64]
    lorakit experiment forgetting   [--out DIR] [--forget-ranks 4,64] [--forget-lora-grid ...]
    lorakit experiment all          [--out DIR]            # every one, into DIR/<name>/

Common options: `--quick` (2 steps, 32 test examples: a smoke test, not a measurement),
`--steps N`, `--test-size N`, `--batch-size N`, `--set FIELD=VALUE` (any recipe field,
`lora.<arg>` for LoRA arguments), `--work DIR` (adapters and full analysis outputs, default
`runs/experiments/work`). Each experiment writes `report.md`, `results.json` and PNG figures
into `--out` (default `runs/experiments/<name>`).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from ..errors import UsageError
from ..train.flags import recipe_overrides
from . import forgetting, full_vs_lora, lr_sweep, qlora_parity, rank_sweep, variants, which_weights
from .runner import Session

HELP = ("re-measure the LoRA paper's claims (rank sweep, which weights, full vs LoRA, variants), QLoRA's "
        "(qlora-parity), LoRA Without Regret's (lr-sweep) and LoRA Learns Less and Forgets Less' (forgetting) "
        "on real runs")
EXPERIMENTS = {m.NAME: m for m in (rank_sweep, which_weights, full_vs_lora, variants, qlora_parity, lr_sweep,
                                   forgetting)}
QUICK = {"steps": 2, "test_size": 32, "val_size": 8, "batch_size": 4, "warmup_steps": 0, "eval_batch_size": 16}
DEFAULT_WORK = "runs/experiments/work"


def _common(p: argparse.ArgumentParser, name: str) -> None:
    default_out = "runs/experiments" if name == "all" else f"runs/experiments/{name}"
    p.add_argument("--out", default=None,
                   help=f"folder for report.md, results.json and the figures (default {default_out})")
    p.add_argument("--work", default=DEFAULT_WORK,
                   help="folder for the adapters and full analysis outputs (default %(default)s)")
    p.add_argument("--quick", action="store_true",
                   help="2 steps x batch 4, 32 test examples: a smoke test, not a measurement")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps of every run (default: the recipe's)")
    p.add_argument("--test-size", type=int, default=None, help="held-out test examples (default: the recipe's, 500)")
    p.add_argument("--batch-size", type=int, default=None, help="examples per step (default: the recipe's)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="set any recipe field (VALUE read as YAML), e.g. --set seed=1 or --set lora.dropout=0.1; "
                        "repeatable")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="experiment", metavar="EXPERIMENT")
    for name, module in EXPERIMENTS.items():
        p = sub.add_parser(name, help=module.HELP, description=module.__doc__.split("\n\n")[0])
        _common(p, name)
        module.add_arguments(p)
    p = sub.add_parser("all", help="every experiment, one after the other, into OUT/<name>/",
                       conflict_handler="resolve",
                       description="Run " + ", ".join(EXPERIMENTS) + " one after the other, into OUT/<name>/.")
    _common(p, "all")
    for module in EXPERIMENTS.values():
        module.add_arguments(p)


def overrides(args: argparse.Namespace) -> dict:
    """The recipe changes asked for: `--quick` first, then `--steps` etc., then `--set`."""

    out = dict(QUICK) if args.quick else {}
    for flag in ("steps", "test_size", "batch_size"):
        if getattr(args, flag) is not None:
            out[flag] = getattr(args, flag)
    extra = recipe_overrides(argparse.Namespace(set=args.set))
    lora = extra.pop("lora", None)
    out.update(extra)
    if lora:
        out["lora"] = lora
    return out


def command_line(args: argparse.Namespace, out: Path) -> str:
    """The command that regenerates the report: this process's own arguments when run from the shell."""
    env = ""
    if os.environ.get("OMP_WAIT_POLICY") and not os.environ.get("LORAKIT_BUSY_CPU"):
        env = f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']} "
    if sys.argv[1:2] == ["experiment"]:
        return env + "lorakit " + shlex.join(sys.argv[1:])
    return (
        env + f"lorakit experiment {args.experiment} --out {shlex.quote(str(out))}" + (" --quick" if args.quick else "")
    )


def run(args: argparse.Namespace) -> int:
    if not getattr(args, "experiment", None):
        raise UsageError("name an experiment: " + ", ".join([*EXPERIMENTS, "all"]) + " (lorakit experiment --help)")
    names = list(EXPERIMENTS) if args.experiment == "all" else [args.experiment]
    changes = overrides(args)
    for name in names:
        if args.experiment == "all":
            out = Path(args.out or "runs/experiments") / name
        else:
            out = Path(args.out or f"runs/experiments/{name}")
        out.mkdir(parents=True, exist_ok=True)
        session = Session(changes, args.work)
        results = EXPERIMENTS[name].run(session, args, out, command_line(args, out))
        print(f"{name}: {len(results['runs'])} runs in {results['wall_seconds']:.0f} s; report: {out / 'report.md'}")
    return 0
