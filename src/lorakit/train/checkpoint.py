"""Checkpoints of a training run: written atomically, found, verified, restored.

Layout (`OUT` is the run's output folder):

    OUT/checkpoints/latest                  the current checkpoint's folder name ("step-000020"); replaced atomically
    OUT/checkpoints/step-000020/
        adapter/adapter_config.json         lorakit.save_adapter: the PEFT layout, loadable on its own
        adapter/adapter_model.safetensors
        optimizer.safetensors               AdamW state tensors, keys "state.<i>.<name>" (i: index of the trainable
                                            tensor, in the order of `trainable` in trainer_state.json)
        rng.safetensors                     torch RNG states: "torch_cpu.rank<r>", "cuda.rank<r>.device<d>"
        trainer_state.json                  step, recipe, data position, optimizer param groups, scheduler state,
                                            Python / numpy RNG states, loss history and evaluations, and the size
                                            and sha256 of every other file (written last)

Nothing is pickled: tensors are safetensors, everything else JSON.

Atomicity: a checkpoint is written into `OUT/checkpoints/.tmp-step-000020-<pid>/` (every file
fsync'ed), the folder is renamed to `step-000020`, then `latest` is replaced
(`lorakit.fileio.atomic_write_text`). A process killed at any moment leaves `latest` naming
a complete checkpoint: the previous one or the new one. The newest two checkpoints of a run
are kept; older ones and stale temporary folders are deleted after `latest` moves.

Reading verifies every file against the sizes and sha256 sums in `trainer_state.json` before
anything is loaded, so a truncated or corrupted checkpoint is an error naming the file, and
the run's model and outputs are left alone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ..fileio import atomic_write_bytes, atomic_write_text, fsync_dir
from .errors import CheckpointError, RecipeError, TrainingDiverged
from .loop import LoopResult, LoopState
from ..errors import LoraError
from ..io import read_adapter
from .recipe import Recipe, apply
from ..io import load_adapter, save_adapter

FORMAT = "lorakit-checkpoint"
VERSION = 1
CHECKPOINTS = "checkpoints"
LATEST = "latest"
STATE = "trainer_state.json"
OPTIMIZER = "optimizer.safetensors"
RNG = "rng.safetensors"
ADAPTER = "adapter"
KEEP = 2
_STEP_RE = re.compile(r"^step-(\d{6,})$")

# Recipe fields a resumed run may change: they do not change the optimisation's numbers
# (`steps` re-stretches the learning-rate schedule; see docs/training.md).
RESUME_MAY_CHANGE = ("name", "out", "steps", "eval_every", "eval_batch_size", "threads", "save_every", "parallel",
                     "gradient_checkpointing")  # checkpointing recomputes the same values: it may change


def step_name(step: int) -> str:
    return f"step-{step:06d}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------- RNG states
def capture_rng() -> dict[str, Any]:
    """This process's RNG states: Python's `random`, numpy's global RNG (if numpy is loaded),
    torch's CPU generator and every CUDA device's generator. Plain values and uint8 tensors."""
    state: dict[str, Any] = {"python": _jsonable(random.getstate()), "torch_cpu": torch.get_rng_state()}
    if "numpy" in sys.modules:
        import numpy as np

        name, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = {"name": name, "keys": [int(k) for k in keys], "pos": int(pos), "has_gauss": int(has_gauss),
                          "cached_gaussian": float(cached)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [t.cpu() for t in torch.cuda.get_rng_state_all()]
    return state


def _jsonable(value):
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value


def _restore_rng(json_part: dict[str, Any], tensors: dict[str, torch.Tensor], rank: int) -> None:
    version, internal, gauss = json_part["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = json_part.get("numpy")
    if np_state is not None:
        import numpy as np

        np.random.set_state((np_state["name"], np.array(np_state["keys"], dtype=np.uint32), np_state["pos"],
                             np_state["has_gauss"], np_state["cached_gaussian"]))
    torch.set_rng_state(tensors[f"torch_cpu.rank{rank}"])
    if torch.cuda.is_available():
        for d in range(torch.cuda.device_count()):
            key = f"cuda.rank{rank}.device{d}"
            if key in tensors:
                torch.cuda.set_rng_state(tensors[key], d)


# ---------------------------------------------------------------------- optimizer state
def optimizer_to_files(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split `optimizer.state_dict()` into safetensors tensors (`state.<i>.<name>`) and JSON."""
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, dict[str, Any]] = {}
    for index, entry in state_dict["state"].items():
        for name, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"state.{index}.{name}"] = value.detach().to("cpu").contiguous()
            else:
                plain.setdefault(str(index), {})[name] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in state_dict["param_groups"]]
    tuples = sorted({k for g in state_dict["param_groups"] for k, v in g.items() if isinstance(v, tuple)})
    return tensors, {"param_groups": groups, "tuple_keys": tuples, "plain_state": plain}


def optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """The inverse of `optimizer_to_files`: an `optimizer.load_state_dict` argument."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    for index, entry in meta.get("plain_state", {}).items():
        state.setdefault(int(index), {}).update(entry)
    tuples = set(meta.get("tuple_keys", []))
    groups = [{k: (tuple(v) if k in tuples else v) for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


# ---------------------------------------------------------------------- finding and reading
def find_checkpoint(path: str | Path) -> tuple[Path, Path]:
    """`(checkpoint folder, run folder)` for `--resume PATH`.

    PATH is a run folder (its `checkpoints/latest` is used) or one checkpoint folder
    (`OUT/checkpoints/step-000020`).

    Raises:
        CheckpointError: no such folder, no checkpoint in it, or `latest` naming a missing folder.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"--resume {path}: no such folder")
    if (path / STATE).is_file() or _STEP_RE.match(path.name):
        if path.parent.name != CHECKPOINTS:
            raise CheckpointError(f"--resume {path}: a checkpoint folder must sit in OUT/{CHECKPOINTS}/")
        return path, path.parent.parent
    root = path / CHECKPOINTS
    latest = root / LATEST
    if not latest.is_file():
        raise CheckpointError(f"--resume {path}: no checkpoint there (no {latest}); checkpoints are written by "
                              "lorakit train "
                              "every save_every steps")
    name = latest.read_text(encoding="utf-8", errors="replace").strip()
    if not _STEP_RE.match(name):
        raise CheckpointError(f"--resume {path}: {latest} is corrupt (it should name a step-NNNNNN folder, it holds "
                              f"{name[:40]!r})")
    if not (root / name).is_dir():
        raise CheckpointError(f"--resume {path}: {latest} names {name}, which does not exist")
    return root / name, path


def read_state(folder: Path) -> dict[str, Any]:
    """The checked `trainer_state.json` of a checkpoint folder. Raises `CheckpointError`."""
    file = folder / STATE
    if not file.is_file():
        raise CheckpointError(f"checkpoint {folder} is incomplete: no {STATE}")
    try:
        state = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"checkpoint {folder} is corrupt: {STATE} is not valid JSON ({exc})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {folder} is corrupt: {STATE} is not a lorakit checkpoint")
    if state.get("version") != VERSION:
        raise CheckpointError(f"checkpoint {folder} has format version {state.get('version')!r}; this lorakit reads "
                              f"version {VERSION}")
    missing = [k for k in ("step", "recipe", "files", "data", "trainable", "optimizer", "scheduler", "rng", "loop",
                           "world_size")
               if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {folder} is corrupt: {STATE} lacks {', '.join(missing)}")
    return state


def _verify_files(folder: Path, state: dict[str, Any]) -> None:
    for rel, meta in state["files"].items():
        file = folder / rel
        if not file.is_file():
            raise CheckpointError(f"checkpoint {folder} is incomplete: {rel} is missing")
        size = file.stat().st_size
        if size != meta["bytes"]:
            raise CheckpointError(f"checkpoint {folder} is corrupt: {rel} has {size} bytes, {meta['bytes']} were "
                                  "written (truncated?)")
        if _sha256(file) != meta["sha256"]:
            raise CheckpointError(f"checkpoint {folder} is corrupt: {rel} does not match its recorded sha256")


def _read_safetensors(folder: Path, name: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        return load((folder / name).read_bytes())
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"checkpoint {folder} is corrupt: {name} is not readable safetensors ({exc})") from None


@dataclass
class Checkpoint:
    """A read and verified checkpoint (see the module docstring)."""

    folder: Path
    run_folder: Path
    state: dict[str, Any]
    optimizer_tensors: dict[str, torch.Tensor]
    rng_tensors: dict[str, torch.Tensor]

    @property
    def step(self) -> int:
        return int(self.state["step"])

    @property
    def recipe(self) -> dict[str, Any]:
        return self.state["recipe"]

    @property
    def shards(self) -> int:
        """Data-parallel shards of each global micro-batch (the world size of the run that started)."""
        return int(self.state["data"]["shards"])

    def loop_state(self) -> LoopState:
        loop = self.state["loop"]
        names = {f.name for f in dataclasses.fields(LoopResult)}
        result = LoopResult(**{k: v for k, v in loop.items() if k in names})
        return LoopState(step=self.step,
                         optimizer=optimizer_from_files(self.optimizer_tensors, self.state["optimizer"]),
                         scheduler=self.state["scheduler"], result=result)

    def restore_rng(self, rank: int, world_size: int) -> None:
        """Set this process's RNG states: its own rank's when the world size is the recorded one,
        else rank 0's (then a run with dropout differs from the uninterrupted one; see docs)."""
        source = rank if world_size == int(self.state["world_size"]) else 0
        _restore_rng(self.state["rng"][source], self.rng_tensors, source)

    def load_adapter(self, model) -> None:
        """Inject and load the checkpoint's adapter (trainable) into a base model without adapters."""

        load_adapter(model, self.folder / ADAPTER)


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Find (`find_checkpoint`), verify and read a checkpoint; the model is not touched.

    Raises:
        CheckpointError: no checkpoint, a missing / truncated / corrupted file (named), or an
            adapter that does not read back.
    """

    folder, run_folder = find_checkpoint(path)
    state = read_state(folder)
    _verify_files(folder, state)
    try:
        read_adapter(folder / ADAPTER)
    except LoraError as exc:
        raise CheckpointError(f"checkpoint {folder}: its adapter does not load: {exc}") from None
    return Checkpoint(folder, run_folder, state, _read_safetensors(folder, OPTIMIZER), _read_safetensors(folder, RNG))


# ---------------------------------------------------------------------- the recipe of a resumed run
def _with_old_defaults(recorded: dict[str, Any]) -> dict[str, Any]:
    """A recipe recorded before a field existed keeps the behaviour it was trained with."""
    return {"qera_rank": 0, **recorded}  # recorded before the NF4 correction existed: plain QLoRA


def check_resume_recipe(recorded: dict[str, Any], recipe, step: int, where: Path) -> list[str]:
    """Check that `recipe` may continue a checkpoint trained with `recorded` to `recipe.steps`.

    Returns the fields that changed (all in `RESUME_MAY_CHANGE`).
    Raises:
        CheckpointError: a field outside `RESUME_MAY_CHANGE` differs (field and both values
            named), or `steps` is below the checkpoint's step.
    """

    try:
        base = apply(Recipe(), _with_old_defaults(recorded))
    except RecipeError as exc:
        raise CheckpointError(f"checkpoint {where} records an invalid recipe: {exc}") from None
    changed = []
    for f in dataclasses.fields(Recipe):
        ours, theirs = getattr(recipe, f.name), getattr(base, f.name)
        if ours == theirs:
            continue
        if f.name not in RESUME_MAY_CHANGE:
            raise CheckpointError(
                f"--resume: recipe field {f.name!r} is {ours!r} here but {theirs!r} in checkpoint {where}; a resumed "
                "run keeps "
                f"its recorded recipe (only {', '.join(RESUME_MAY_CHANGE)} may change)")
        changed.append(f.name)
    if recipe.steps < step:
        raise CheckpointError(f"--resume: steps {recipe.steps} is below the checkpoint's step {step} ({where})")
    return changed


def resume_recipe(path: str | Path, asked=None, overrides: dict[str, Any] | None = None):
    """The recipe for `lorakit train --resume PATH`: the recorded one, with `overrides` applied,
    or `asked` (a recipe the user named again), which must agree with the recorded one.

    Returns `(recipe, checkpoint folder)`; the recipe's `out` is the run folder.
    Raises:
        CheckpointError: see `find_checkpoint`, `read_state`, `check_resume_recipe`; or `--out`
            naming another folder than `--resume`.
    """

    folder, run_folder = find_checkpoint(path)
    state = read_state(folder)
    overrides = dict(overrides or {})
    out = overrides.pop("out", None)
    if out is not None and Path(out).resolve() != run_folder.resolve():
        raise CheckpointError(f"--out {out} and --resume {path} name different folders; a resumed run writes into "
                              "its own folder")
    try:
        base = apply(Recipe(), _with_old_defaults(state["recipe"]))
    except RecipeError as exc:
        raise CheckpointError(f"checkpoint {folder} records an invalid recipe: {exc}") from None
    recipe = apply(asked if asked is not None else base, {**overrides, "out": str(run_folder)})
    check_resume_recipe(state["recipe"], recipe, int(state["step"]), folder)
    return recipe, folder


# ---------------------------------------------------------------------- writing
class CheckpointWriter:
    """Writes the checkpoints of one run into `run_folder/checkpoints` (see the module docstring).

    Args:
        resumed_from: the checkpoint folder a resumed run started from (kept as the previous
            checkpoint until a newer one exists); None for a fresh run, whose first checkpoint
            replaces whatever an earlier run left in the folder.
    """

    def __init__(self, run_folder: Path, resumed_from: Path | None = None, keep: int = KEEP):
        self.root = Path(run_folder) / CHECKPOINTS
        self.keep = keep
        self.saved: list[str] = [resumed_from.name] if resumed_from is not None else []

    @property
    def latest(self) -> Path | None:
        """The newest complete checkpoint of this run, or None."""
        return self.root / self.saved[-1] if self.saved else None

    def save(self, step: int, *, model, optimizer, scheduler, result: LoopResult, trainable: list[str],
             recipe: dict[str, Any],
             data: dict[str, Any], world_size: int, rng: list[dict[str, Any]], job: dict[str, Any],
             fail_at: Callable[[str], None] | None = None) -> Path:
        """Write the checkpoint of `step` and make it the latest; returns its folder.

        Args:
            trainable: names of the trainable tensors, in the optimizer's order.
            rng: `capture_rng()` of every rank, in rank order.
            job: whatever the job needs to finish a resumed run (e.g. the zero-shot metrics).
            fail_at: test hook, called with the name of each stage ("adapter", "optimizer", "rng",
                "state", "rename", "latest") before it runs.
        Raises:
            TrainingDiverged: a trainable tensor is NaN or infinite (nothing is written).
        """
        from safetensors.torch import save as safetensors_save

        stage = fail_at or (lambda name: None)
        params = [p for p in model.parameters() if p.requires_grad]
        for name, p in zip(trainable, params):
            if not torch.isfinite(p.detach()).all():
                raise TrainingDiverged(f"the trainable tensor {name} became non-finite at step {step}")
        name = step_name(step)
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".tmp-{name}-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        stage("adapter")
        save_adapter(model, tmp / ADAPTER)
        stage("optimizer")
        opt_tensors, opt_meta = optimizer_to_files(optimizer.state_dict())
        atomic_write_bytes(tmp / OPTIMIZER, safetensors_save(opt_tensors, metadata={"format": "pt"}))
        stage("rng")
        rng_tensors: dict[str, torch.Tensor] = {}
        rng_json = []
        for r, st in enumerate(rng):
            rng_tensors[f"torch_cpu.rank{r}"] = st["torch_cpu"]
            for d, t in enumerate(st.get("cuda", [])):
                rng_tensors[f"cuda.rank{r}.device{d}"] = t
            rng_json.append({k: v for k, v in st.items() if k not in ("torch_cpu", "cuda")})
        atomic_write_bytes(tmp / RNG, safetensors_save(rng_tensors, metadata={"format": "pt"}))
        files = {}
        for file in sorted(p for p in tmp.rglob("*") if p.is_file()):
            rel = file.relative_to(tmp).as_posix()
            files[rel] = {"bytes": file.stat().st_size, "sha256": _sha256(file)}
        loop = {f.name: getattr(result, f.name) for f in dataclasses.fields(LoopResult)}
        state = {"format": FORMAT, "version": VERSION, "step": step, "recipe": recipe, "world_size": world_size,
                 "data": data, "trainable": trainable, "optimizer": opt_meta, "scheduler": scheduler.state_dict(),
                 "rng": rng_json, "loop": loop, "job": job, "files": files}
        stage("state")
        atomic_write_text(tmp / STATE, json.dumps(state, indent=1))
        fsync_dir(tmp)
        stage("rename")
        final = self.root / name
        old = None
        if final.exists():  # a leftover of a stopped run, or of an earlier run in this folder
            old = self.root / f".old-{name}-{os.getpid()}"
            os.replace(final, old)
        os.replace(tmp, final)
        fsync_dir(self.root)
        stage("latest")
        atomic_write_text(self.root / LATEST, name + "\n")
        if name in self.saved:
            self.saved.remove(name)
        self.saved.append(name)
        self._prune()
        return final

    def note(self, step: int) -> None:
        """Record that rank 0 wrote the checkpoint of `step` (on the other ranks, which write nothing)."""
        earlier = [n for n in self.saved if n != step_name(step)]
        self.saved = (earlier[-(self.keep - 1):] if self.keep > 1 else []) + [step_name(step)]

    def _prune(self) -> None:
        keep = set(self.saved[-self.keep:])
        for entry in self.root.iterdir():
            ours = _STEP_RE.match(entry.name) or entry.name.startswith((".tmp-", ".old-"))
            if entry.is_dir() and entry.name not in keep and ours:
                shutil.rmtree(entry, ignore_errors=True)
        self.saved = self.saved[-self.keep :]


def earlier_checkpoint(run_folder: Path) -> int | None:
    """The step of the checkpoint `run_folder/checkpoints/latest` names, if there is a readable one."""
    try:
        folder, _ = find_checkpoint(run_folder)
        return int(read_state(folder)["step"])
    except CheckpointError:
        return None
