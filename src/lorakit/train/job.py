"""The main job, start to end, as named stages over one `Run`:

    checks -> load -> evaluate before -> adapt -> train -> evaluate after -> save
           -> merge check -> reload check -> report

Output folder layout (`recipe.out_dir`):

    adapter/adapter_config.json, adapter/adapter_model.safetensors   PEFT layout (lorakit.save_adapter)
    adapter/lorakit_train.json   resolved recipe, model, split fingerprint, recorded test metrics
    report.json, report.md, loss.png
    checkpoints/latest, checkpoints/step-NNNNNN/   resumable state (see `checkpoint`)

`run_train(recipe, resume=OUT)` continues a run from its latest checkpoint; under torchrun
with several processes it trains data-parallel (see `distributed`), rank 0 writing everything.
`lorakit eval` / `lorakit merge` rebuild a run from its saved files (`saved`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import shlex
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..inject import Plan, inject, plan
from ..io import load_adapter, save_adapter
from ..merge import count_parameters, merge_and_unload
from ..quant import merge_quantized
from ..quant.qera import fold_corrections
from ..verify import static_checks
from ..version import __version__
from . import data as data_mod
from . import distributed as dist_mod
from .checkpoint import (
    Checkpoint, CheckpointWriter, capture_rng, check_resume_recipe, earlier_checkpoint, read_checkpoint,
)
from .errors import CheckpointError, RecipeError, TrainingDiverged
from .estimate import available_bytes, check_message, step_estimate
from .interrupt import GracefulStop
from .loop import LoopConfig, LoopResult, train
from .models import resolve_device, resolve_model
from .memory import enable_checkpointing, release_large_frees, want_checkpointing
from .outdir import OutputLock, check_writable
from .prepare import Prepared, load_data, load_held_out, stderr_log
from .recipe import Recipe
from .report import write_json, write_report
from .saved import PROBE_EXAMPLES, TRAIN_INFO
from .stats import classification_summary
from .tblog import TensorBoardLog
from .tasks import TaskLoss
from .truncation import truncation_message

RUN_FILES = ("report.json", "checkpoints", "adapter")  # what marks a folder as holding a previous run
SAMPLE_PROMPTS = 3
MERGE_CHECKS = ("quick", "full", "off")
LOSS_TASKS = ("instruct", "text")  # scored by held-out loss / perplexity rather than accuracy


@dataclass
class Run:
    """What the stages of one `run_train` share."""

    recipe: Recipe
    log: Callable[[str], None]
    t_start: float
    ckpt: Checkpoint | None
    changed: list[str]
    shards: int
    stop_after: int | None
    dist: Any = None  # a `distributed.Distributed`, or None for one process
    prep: Prepared | None = None
    model: Any = None
    plan: Plan | None = None
    timings: dict[str, float] = field(default_factory=dict)
    before: dict | None = None
    before_preds: list | None = None  # the base model's test predictions (paired with the trained model's)
    samples: list = field(default_factory=list)
    trainable_names: list[str] = field(default_factory=list)
    writer: CheckpointWriter | None = None
    result: LoopResult | None = None
    distributed: dict | None = None
    checks: dict[str, Any] = field(default_factory=dict)
    stop: GracefulStop | None = None
    eval_before: bool = True  # score the base model on the test split first (--no-eval-before: skip)
    merge_check: str = "quick"  # quick: a few test batches | full: the whole test split | off
    tensorboard: bool = False
    tb: TensorBoardLog | None = None
    memory_check: bool = True  # estimate a step's peak memory before any work; refuse at 2x what is available

    @property
    def out(self) -> Path:
        return self.recipe.out_dir

    @property
    def is_main(self) -> bool:
        return self.dist is None or self.dist.is_main

    @property
    def rank(self) -> int:
        return self.dist.rank if self.dist is not None else 0

    @property
    def world_size(self) -> int:
        return self.dist.world_size if self.dist is not None else 1

    @property
    def global_micro(self) -> int:
        """Examples per micro-batch over all processes."""
        return self.recipe.batch_size * self.shards

    @property
    def adapter_dir(self) -> Path:
        return self.out / "adapter"


def run_train(recipe: Recipe, log: Callable[[str], None] = stderr_log, *, resume: str | Path | None = None,
              stop_after: int | None = None, overwrite: bool = False, eval_before: bool = True,
              merge_check: str = "quick", tensorboard: bool = False,
              memory_check: bool = True) -> dict[str, Any] | None:
    """Run the whole job for `recipe` and write its outputs into `recipe.out_dir`.

    Args:
        resume: a run folder (or one of its checkpoint folders) to continue from: the adapter,
            AdamW and scheduler state, RNG states, data position, history and zero-shot metrics
            come from the checkpoint; `recipe` must agree with the recorded one except for
            `checkpoint.RESUME_MAY_CHANGE` (use `checkpoint.resume_recipe` to build it).
        stop_after: stop after this step, with a checkpoint (continue with `resume`).
        eval_before: score the base model on the test split before training (False: skip it; the
            report then has no gain).
        merge_check: "quick" (merged vs unmerged logits and predictions on the first two evaluation
            batches of the test split), "full" (the whole test split) or "off".
        memory_check: estimate a training step's peak memory after the model loads (`estimate`); warn
            when it exceeds the available memory, raise `RecipeError` at twice it (False: warn only).
        tensorboard: also write TensorBoard event files to `OUT/tensorboard` (`tblog`).
        overwrite: allow an output folder that holds a previous run (`report.json`,
            `checkpoints/` or `adapter/`); its files are replaced as the new run writes them, and
            files the new run does not write (a `merged/` folder, say) stay. Without it such a
            folder raises `RecipeError` (unless resuming it).
    Returns:
        The report (also written as `report.json`); `{"stopped_at", "checkpoint", "out"}` when
        `stop_after` stopped the run; None on ranks other than 0 of a multi-process run.
    Raises:
        RecipeError, DataError, ModelLoadError, CheckpointError, lorakit.LoraError: bad input,
            before training starts (nothing in the output folder is touched).
        TrainingDiverged: the loss, the gradients or the adapter became NaN/inf (step named; the
            last good checkpoint is kept and named).
    """
    t_start = time.perf_counter()
    if stop_after is not None and (isinstance(stop_after, bool) or not isinstance(stop_after, int) or stop_after < 1):
        raise RecipeError(f"stop_after must be a step >= 1, got {stop_after!r}")
    world = dist_mod.world_from_env()
    ckpt, changed, shards = _checks(recipe, resume, world.world_size if world else 1, overwrite)
    device = resolve_device(recipe.device, recipe.precision)
    if merge_check not in MERGE_CHECKS:
        raise RecipeError(f"merge_check must be one of {', '.join(MERGE_CHECKS)}, got {merge_check!r}")
    if tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise RecipeError("--tensorboard needs the tensorboard package: pip install tensorboard")
    run = Run(recipe, log, t_start, ckpt, changed, shards, stop_after, eval_before=eval_before,
              merge_check=merge_check, tensorboard=tensorboard, memory_check=memory_check)
    if world is not None:
        run.dist = dist_mod.Distributed(world, recipe.parallel, device[0])
        device = (run.dist.device, device[1])
        run.log = _rank_log(log, run.dist)
    threads = dist_mod.threads_per_process(recipe.threads, world.local_world_size) if world else None
    lock = OutputLock(run.out, log) if world is None or world.rank == 0 else None
    try:
        if lock is not None:
            lock.acquire()
        return _stages(run, threads, device)
    finally:
        if run.tb is not None:
            run.tb.close()
        if lock is not None:
            lock.release()
        if run.dist is not None:
            run.dist.close()


def resume_command(out: Path) -> str:
    """The exact command that continues the run in `out`, from any folder."""
    return f"lorakit train --resume {shlex.quote(str(Path(out).resolve()))}"


def _stages(run: Run, threads: int | None, device) -> dict[str, Any] | None:
    _load(run, threads, device)
    _evaluate_before(run)
    _adapt(run)
    _train(run)
    if run.dist is not None and not _leave_group(run):
        return None  # ranks other than 0: done
    if run.result.last_step < run.recipe.steps:
        how = f"interrupted ({signal.Signals(run.stop.signal).name})" if run.result.interrupted else "stopped"
        # the returned report carries the checkpoint and the resume command (the CLI prints them once, on stdout)
        run.log(f"{how} after step {run.result.last_step} of {run.recipe.steps}; checkpoint written")
        return {"stopped_at": run.result.last_step, "checkpoint": str(run.writer.latest), "out": str(run.out),
                "resume_command": resume_command(run.out),
                "exit_code": run.stop.exit_code if run.result.interrupted else 0}
    _evaluate_after(run)
    _save(run)
    _merge_check(run)
    _reload_check(run)
    return _report(run)


# ---------------------------------------------------------------------- checks (before anything loads)
def _checks(recipe: Recipe, resume, world_size: int, overwrite: bool = False):
    """The checks before anything loads: `(checkpoint or None, fields changed on resume, data shards)`."""
    out = recipe.out_dir
    if out.exists() and not out.is_dir():
        raise RecipeError(f"output path {out} exists and is not a folder")
    check_writable(out)  # before anything loads: an unwritable --out must not cost a whole run
    previous = [n for n in RUN_FILES if (out / n).exists()] if resume is None and not overwrite else []
    if previous:
        raise RecipeError(f"output folder {out} holds a previous run ({', '.join(previous)}); pass --overwrite to "
                          "replace it, "
                          f"--resume {out} to continue it, or another --out")
    ckpt = None
    changed: list[str] = []
    if resume is not None:
        ckpt = read_checkpoint(resume)
        if ckpt.run_folder.resolve() != out.resolve():
            raise CheckpointError(f"--resume {resume} belongs to {ckpt.run_folder}, but the recipe writes to {out}")
        changed = check_resume_recipe(ckpt.recipe, recipe, ckpt.step, ckpt.folder)
    shards = ckpt.shards if ckpt else world_size
    if shards % world_size:
        raise CheckpointError(f"--resume: the checkpoint's global batch is split into {shards} shards (it was "
                              f"trained by {shards} "
                              f"processes); {world_size} processes cannot share them evenly (use a number that "
                              f"divides {shards})")
    dist_mod.check_supported(recipe, world_size)
    return ckpt, changed, shards


def preflight(recipe: Recipe, *, resume: str | Path | None = None, world_size: int = 1,
              overwrite: bool = False) -> None:
    """What `run_train` checks before the model loads, for a launcher to run before it starts
    processes: output folder, checkpoint and recipe agreement, supported combination, device,
    model name or path, data file and fields. Raises the same errors as `run_train`."""
    _checks(recipe, resume, world_size, overwrite)
    resolve_device(recipe.device, recipe.precision)
    resolve_model(recipe.model)
    load_data(recipe)
    load_held_out(recipe)


def _rank_log(log: Callable[[str], None], dist) -> Callable[[str], None]:
    """Rank 0 speaks, naming itself; the other ranks stay quiet (their errors name their rank)."""
    def ranked(message: str) -> None:
        if dist.is_main:
            log(dist.tag(message))
    return ranked


# ---------------------------------------------------------------------- load
def _load(run: Run, threads: int | None, device) -> None:
    """Model, data split, quantization; on resume, the checks against the checkpoint."""
    recipe, ckpt = run.recipe, run.ckpt
    if device[0].type == "cpu":
        run.checks["allocator"] = release_large_frees()  # freed activations leave the resident set
    run.prep = prep = Prepared(recipe, run.log, threads=threads, device=device, correct=True)
    run.model = prep.model
    run.timings["load_seconds"] = time.perf_counter() - run.t_start
    if run.shards > 1 and len(prep.splits.train) < run.global_micro:
        raise RecipeError(f"the training split has {len(prep.splits.train)} examples, fewer than one global "
                          "micro-batch "
                          f"(batch_size {recipe.batch_size} x {run.shards} processes)")
    run.plan = plan(run.model, prep.config)  # a target that matches nothing fails now, not after the evaluation
    if recipe.epochs is not None:
        _steps_from_epochs(run)
    _check_memory(run)
    run.checks["truncation"] = prep.truncation()
    if (message := truncation_message(run.checks["truncation"])) is not None:
        run.log(message)
    if ckpt is None:
        return
    if ckpt.state["data"].get("train_fingerprint") != data_mod.fingerprint(prep.splits.train):
        raise CheckpointError(f"--resume: the training split differs from the one checkpoint {ckpt.folder} was "
                              "trained on "
                              "(the data file or the split fields changed)")
    job_state = ckpt.state.get("job", {})
    run.before, run.samples = job_state.get("before"), job_state.get("samples", [])
    run.before_preds = job_state.get("before_predictions")  # absent in checkpoints of older versions
    run.log(f"resuming from {ckpt.folder} (step {ckpt.step} of {recipe.steps})"
            + (f"; changed: {', '.join(run.changed)}" if run.changed else ""))
    if run.shards != run.world_size:
        run.log(f"the checkpoint was trained by {run.shards} processes: each process here takes "
                f"{run.shards // run.world_size} "
                f"of the {run.shards} slices of every global micro-batch, one after the other (same global batch)")


def _check_memory(run: Run) -> None:
    """A training step's peak memory, estimated before any work, against what the machine has."""
    recipe, prep = run.recipe, run.prep
    on = want_checkpointing(recipe.gradient_checkpointing, recipe.batch_size * recipe.max_length) \
        and recipe.task != "classify-head"
    estimate = step_estimate(run.model, run.plan, recipe, on, prep.device)
    available = available_bytes(prep.device)
    run.checks["estimate"] = {**estimate, "available": available}
    found = check_message(estimate, available, recipe)
    if found is None:
        return
    message, refuse = found
    if refuse and run.memory_check:
        raise RecipeError(message)
    run.log("warning: " + message)


def _steps_from_epochs(run: Run) -> None:
    """`epochs` -> `steps`: whole global micro-batches per pass over the training split (a short last one
    is dropped), `grad_accum` of them a step."""
    recipe = run.recipe
    per_epoch = data_mod.batches_per_epoch(len(run.prep.train_items), run.global_micro) / recipe.grad_accum
    steps = max(1, math.ceil(recipe.epochs * per_epoch - 1e-9))
    run.recipe = recipe.replace(steps=steps)
    n = len(run.prep.train_items)
    run.log(f"epochs {recipe.epochs:g}: {steps} steps ({per_epoch:g} steps per pass over the {n} training "
            f"{'rows' if recipe.packing else 'examples'})")


def _evaluate_before(run: Run) -> None:
    """The base model on the test split (a resumed run has it from its checkpoint)."""
    if run.ckpt is not None:
        return
    if run.is_main:
        earlier = earlier_checkpoint(run.out)
        if earlier is not None:
            run.log(f"{run.out / 'checkpoints'} holds a checkpoint of an earlier run (step {earlier}); this run "
                    "replaces it "
                    f"(lorakit train --resume {run.out} would have continued it)")
    if not run.eval_before:
        run.log("not evaluating the base model (--no-eval-before): the report has no before / gain")
        return
    t = time.perf_counter()
    if run.is_main:
        test = run.prep.splits.test
        run.log(f"evaluating the base model on {len(test)} held-out test examples")
        run.before, preds = run.prep.evaluate(run.model, test, desc="evaluating the base model", log=run.log)
        run.before_preds = preds if "accuracy" in run.before else None  # labels; a loss task's are per-example losses
        run.samples = _samples(run.prep, run.model, "before") if run.recipe.task == "instruct" else []
        run.log("before: " + _summary(run.before))
    run.timings["eval_before_seconds"] = time.perf_counter() - t


def _adapt(run: Run) -> None:
    """Inject the adapter (or load the checkpoint's), and check the trainable tensors against a checkpoint."""
    recipe, config, model = run.recipe, run.prep.config, run.model
    torch.manual_seed(recipe.seed)
    if run.ckpt is not None:
        run.ckpt.load_adapter(model)  # injects the recorded adapter and loads its tensors (trainable)
    else:
        inject(model, config, plan_=run.plan)
    run.trainable_names = [n for n, p in model.named_parameters() if p.requires_grad]
    if run.ckpt is not None and run.trainable_names != run.ckpt.state["trainable"]:
        mismatch = next((a, b) for a,
                        b in zip(run.trainable_names + [None], run.ckpt.state["trainable"] + [None]) if a != b)
        raise CheckpointError(f"checkpoint {run.ckpt.folder} does not fit this model: trainable tensor "
                              f"{mismatch[0]!r} here, "
                              f"{mismatch[1]!r} in the checkpoint")
    _memory_plan(run)
    trainable, total = run.checks["counts"] = count_parameters(model)
    run.log(f"LoRA r={config.r} alpha={config.alpha} on {len(run.plan.targets)} modules: {trainable:,} trainable of "
            f"{total:,} parameters ({100 * trainable / total:.3f}%)")
    if run.dist is not None:
        run.log(f"{run.world_size} processes ({run.dist.backend}, {recipe.parallel}); global batch "
                f"{run.global_micro * recipe.grad_accum} examples per step ({recipe.batch_size} per process x "
                f"{recipe.grad_accum} micro-batches x {run.world_size})")


def _memory_plan(run: Run) -> None:
    """Activation checkpointing per `gradient_checkpointing` (before any DDP/FSDP2 wrapper), logged and recorded."""
    recipe, model = run.recipe, run.model
    tokens = recipe.batch_size * recipe.max_length
    on = want_checkpointing(recipe.gradient_checkpointing, tokens) and recipe.task != "classify-head"
    how = enable_checkpointing(model) if on else None
    run.checks["memory"] = {
        "estimate": run.checks.get("estimate"),
        "gradient_checkpointing": {"mode": recipe.gradient_checkpointing, "enabled": on, "how": how,
                                   "tokens_per_micro_batch": tokens},
        "loss": "chunked cross-entropy (lorakit.ops.loss)" if recipe.task != "classify-head" else "head logits",
        "attention": getattr(model.config, "_attn_implementation", None),
        "allocator_release_large_frees": run.checks.get("allocator", False),
        "padding": run.prep.padding(),
    }
    pad = run.checks["memory"]["padding"]
    run.log(f"memory: activation checkpointing {'on' if on else 'off'} ({recipe.gradient_checkpointing}, {tokens} "
            f"tokens per micro-batch), chunked loss, {run.checks['memory']['attention']} attention"
            + (f"; padding {100 * pad['padding']:.1f}% of the training tokens" if pad else ""))


# ---------------------------------------------------------------------- train
def _local_batches(run: Run):
    """Global micro-batches of `batch_size x shards` (examples, or packed rows); this process takes its shards."""
    per_rank, b = run.shards // run.world_size, run.recipe.batch_size
    consumed = run.ckpt.step * run.recipe.grad_accum if run.ckpt is not None else 0
    for micro in data_mod.batches(run.prep.train_items, run.global_micro, run.recipe.seed, start=consumed):
        for j in range(run.rank * per_rank, (run.rank + 1) * per_rank):
            yield run.prep.task.batch(micro[j * b:(j + 1) * b], run.prep.device)


def _checkpoint_saver(run: Run):
    """The loop's checkpoint callback: every rank gathers its RNG state, rank 0 writes."""
    recipe = run.recipe
    train_fingerprint = data_mod.fingerprint(run.prep.splits.train)

    def save_checkpoint(step, optimizer, scheduler, result):
        rng = run.dist.gather(capture_rng()) if run.dist is not None else [capture_rng()]
        if not run.is_main:  # rank 0 writes it; the others remember its name for their messages
            run.writer.note(step)
            return
        run.writer.save(step, model=run.model, optimizer=optimizer, scheduler=scheduler, result=result,
                        trainable=run.trainable_names, recipe=recipe.to_dict(), world_size=run.world_size, rng=rng,
                        data={"global_micro_batch": run.global_micro, "shards": run.shards,
                              "micro_batches_consumed": step * recipe.grad_accum, "seed": recipe.seed,
                              "train_fingerprint": train_fingerprint},
                        job={"before": run.before, "samples": run.samples, "before_predictions": run.before_preds})
    return save_checkpoint


def _train(run: Run) -> None:
    recipe, prep = run.recipe, run.prep
    loop_cfg = LoopConfig(steps=recipe.steps, lr=recipe.lr, weight_decay=recipe.weight_decay,
                          warmup_steps=recipe.warmup_steps,
                          schedule=recipe.schedule, grad_clip=recipe.grad_clip,
                          grad_accum=recipe.grad_accum * (run.shards // run.world_size), eval_every=recipe.eval_every,
                          log_every=max(1, min(10, recipe.steps // 8)), loraplus_ratio=recipe.loraplus_ratio,
                          save_every=recipe.checkpoint_every, stop_after=run.stop_after)
    if run.tensorboard and run.is_main:
        run.tb = TensorBoardLog(run.out / "tensorboard")
        loop_cfg.on_step = run.tb.step
        run.log(f"TensorBoard: tensorboard --logdir {run.out / 'tensorboard'}")
    run.writer = CheckpointWriter(run.out, resumed_from=run.ckpt.folder if run.ckpt is not None else None)
    wants_checkpoints = recipe.checkpoint_every > 0 or run.stop_after is not None
    if run.ckpt is not None:
        run.ckpt.restore_rng(run.rank, run.world_size)
    else:
        torch.manual_seed(recipe.seed)
    loss_model = TaskLoss(prep.task, run.model)  # the loss as a forward that DDP / FSDP2 see
    forward_model = run.dist.wrap(loss_model) if run.dist is not None else loss_model
    t = time.perf_counter()
    saver = _checkpoint_saver(run)
    # one process: a signal stops after the current step with a checkpoint (several: torchrun handles it)
    run.stop = GracefulStop(run.log, saver) if run.dist is None else None
    try:
        with run.stop or contextlib.nullcontext():
            run.result = train(forward_model, _call, _local_batches(run), loop_cfg, device=prep.device,
                               dtype=prep.dtype, evaluate=_validation(run, forward_model), log=run.log,
                               resume=run.ckpt.loop_state() if run.ckpt is not None else None,
                               checkpoint=saver if wants_checkpoints else None, sync=run.dist, interrupt=run.stop)
    except TrainingDiverged as exc:
        kept = run.writer.latest
        where = (f"the last good checkpoint is {kept} (step {int(kept.name.split('-')[1])})" if kept is not None
                 else "no checkpoint was written")
        raise TrainingDiverged(f"training stopped: {exc}; {where}") from None
    run.timings["train_seconds"] = time.perf_counter() - t


def _validation(run: Run, forward_model):
    """The validation loss as the loop calls it; under FSDP2 inside the root module's forward, which
    gathers the parameters it holds (the embeddings, the final norm, the head)."""
    def validate(model):
        metrics = run.prep.evaluate(model, run.prep.splits.val)[0]
        if run.tb is not None:
            run.tb.metrics("val", metrics)
        return metrics

    if run.recipe.parallel == "fsdp2" and run.dist is not None:
        return lambda: forward_model(evaluate=validate)
    return lambda: validate(run.model)


def _call(loss_model, batch):
    return loss_model(batch)


def _leave_group(run: Run) -> bool:
    """Several processes: check the ranks agree, leave the group together. False on ranks other than 0."""
    dist, model = run.dist, run.model
    hashes = dist.gather(dist_mod.trainable_sha256(model))
    run.distributed = {**dist.stats(), "steps_this_run": run.result.last_step - run.result.start_step,
                       "ranks_identical": len(set(hashes)) == 1, "adapter_sha256_per_rank": hashes}
    if run.is_main:
        r = run.distributed["gradient_allreduce"]
        run.log(f"gradient all-reduce: {r['calls']} calls, {r['tensors']} tensors, {r['numel']:,} elements over "
                f"{run.distributed['steps_this_run']} steps ({run.distributed['trainable_numel']:,} trainable "
                "elements); "
                f"ranks identical: {run.distributed['ranks_identical']}")
    if not run.distributed["ranks_identical"]:
        raise RuntimeError(f"the ranks' adapters differ after training (sha256 {', '.join(h[:12] for h in hashes)})")
    if not run.is_main:  # done: leave together with rank 0 (a rank that exits alone can abort the other)
        dist.finish()
        return False
    sharded = run.recipe.parallel == "fsdp2" and run.result.last_step == run.recipe.steps
    if sharded:  # the sharded model needs every rank: save, then go on with a whole one
        save_adapter(model, run.adapter_dir)
        run.model = run.prep.model = None  # free the shards before leaving the group
    dist.finish()
    if sharded:
        run.model = run.prep.model = run.prep.fresh_model()
        load_adapter(run.model, run.adapter_dir)
        run.model.eval()
    return True


# ---------------------------------------------------------------------- after training
def _evaluate_after(run: Run) -> None:
    t = time.perf_counter()
    run.checks["after"], run.checks["preds"] = run.prep.evaluate(run.model, run.prep.splits.test,
                                                                 desc="evaluating the trained model", log=run.log)
    if run.recipe.task == "instruct":
        run.samples = [{**s, "after": a} for s, a in zip(run.samples, _samples(run.prep, run.model, "after"))]
    run.timings["eval_after_seconds"] = time.perf_counter() - t
    if run.tb is not None:
        run.tb.metrics("test", run.before, step=0)
        run.tb.metrics("test", run.checks["after"])
    run.log("after: " + _summary(run.checks["after"]))


def _save(run: Run) -> None:
    """The adapter (one adapter: a QLoRA correction is folded in, exactly) and what reproduces the run."""
    prep = run.prep
    run.checks["verify"] = checks = static_checks(run.model, "default")  # before a QLoRA correction is folded in
    if checks["no_op"]:
        run.log("warning: the trained adapter is a no-op (every B is zero or every update negligible); "
                "check the learning rate and the target modules")
    if prep.qera is not None:  # one adapter = trained + correction, exact: it loads on a plain NF4 base
        fold_corrections(run.model)
    save_adapter(run.model, run.adapter_dir)
    info = {"lorakit_version": __version__, "recipe": prep.saved_recipe(run.recipe), "model": prep.model_info(),
            "data": prep.split_info(), "task": prep.task.describe(), "test_metrics": run.checks["after"],
            "environment": {"device": str(prep.device), "precision": "bf16" if prep.dtype is not None else "fp32"}}
    write_json(run.adapter_dir / TRAIN_INFO, info)
    run.checks["info"] = info


def _merge_check(run: Run) -> None:
    """Merged vs unmerged: the same logits (to float rounding) and the same test predictions, on the
    first two evaluation batches of the test split (`merge_check="full"`: all of it; "off": skipped)."""
    prep, test = run.prep, run.prep.splits.test
    t = time.perf_counter()
    probe = test[:PROBE_EXAMPLES]
    run.checks["unmerged_logits"] = prep.task.probe(run.model, probe, prep.device, prep.dtype)
    if run.merge_check == "off":
        run.log("not checking the merged model (--no-merge-check)")
        run.model = run.prep.model = None
        return
    if prep.quantization is not None:  # dequantize + delta in float32 -> a dense model; rounding error reported
        merged_model, merge_rounding = merge_quantized(run.model)
        prep.quantization["merge"] = merge_rounding.as_dict()
    else:
        merged_model = merge_and_unload(run.model)
    run.checks["merged_logits"] = prep.task.probe(merged_model, probe, prep.device, prep.dtype)
    subset = test if run.merge_check == "full" else test[:2 * run.recipe.eval_batch_size]
    run.checks["merged"], merged_preds = prep.evaluate(merged_model, subset, desc="checking the merged model",
                                                       log=run.log)
    run.checks["merged_preds"] = merged_preds if len(subset) == len(test) else None
    preds = run.checks["preds"][:len(subset)]
    if run.recipe.task in LOSS_TASKS:  # "predictions" are per-example losses: equal to float rounding
        run.checks["compared"] = "per-example test losses (|diff| <= 1e-4)"
        diffs = sum(abs(a - b) > 1e-4 * max(1.0, abs(a)) for a, b in zip(preds, merged_preds))
    else:
        run.checks["compared"] = "test predictions"
        diffs = sum(a != b for a, b in zip(preds, merged_preds))
    run.checks["diffs"], run.checks["merged_examples"] = diffs, len(subset)
    run.timings["merge_check_seconds"] = time.perf_counter() - t
    run.log(f"merged: {_summary(run.checks['merged'])}; logits max |diff| vs unmerged "
            f"{_max_diff(run.checks['merged_logits'], run.checks['unmerged_logits']):.3g}; {diffs} of {len(subset)} "
            f"{run.checks['compared']} differ" + (f" (the first {len(subset)} of {len(test)} test examples; "
                                                 "--merge-check full: all)" if len(subset) < len(test) else ""))
    run.model = run.prep.model = None  # free them before the reload check


def _reload_check(run: Run) -> None:
    """The saved files alone reproduce the trained model."""
    prep = run.prep
    t = time.perf_counter()
    fresh = prep.fresh_model()
    load_adapter(fresh, run.adapter_dir)
    run.checks["reload_logits"] = prep.task.probe(fresh, prep.splits.test[:PROBE_EXAMPLES], prep.device, prep.dtype)
    run.timings["reload_check_seconds"] = time.perf_counter() - t


def _report(run: Run) -> dict[str, Any]:
    recipe, prep, result, c = run.recipe, run.prep, run.result, run.checks
    config = prep.config
    run.timings["total_seconds"] = time.perf_counter() - run.t_start
    trainable, total = run.checks["counts"]
    report: dict[str, Any] = {
        "recipe": c["info"]["recipe"], "model": c["info"]["model"], "data": c["info"]["data"],
        "task": prep.task.describe(),
        "metric_names": ["loss", "perplexity"] if recipe.task in LOSS_TASKS else ["accuracy", "loss"],
        "test": {k: v for k, v in (("before", run.before), ("after", c["after"]), ("merged", c.get("merged")))
                 if v is not None},
        "lora": {"config": config.to_peft_dict(), "targets": config.target_modules,
                 "adapted_modules": len(run.plan.targets),
                 "trainable": trainable, "total": total, "trainable_percent": 100 * trainable / total},
        "training": _training_summary(run),
        "checkpoints": {"every": recipe.checkpoint_every,
                        "latest": str(run.writer.latest) if run.writer.latest else None,
                        "resumed_from": str(run.ckpt.folder) if run.ckpt is not None else None,
                        "resumed_at_step": run.ckpt.step if run.ckpt is not None else None,
                        "changed_on_resume": run.changed},
        "checks": {
            "merge_check": run.merge_check, "merged_examples": c.get("merged_examples"),
            "merged_vs_unmerged_max_abs_diff": _max_diff(c["merged_logits"], c["unmerged_logits"])
            if "merged_logits" in c else None,
            "merged_predictions_equal": c["diffs"] == 0 if "diffs" in c else None,
            "merged_prediction_differences": c.get("diffs"), "merged_compared": c.get("compared"),
            "reload_max_abs_diff": _max_diff(c["reload_logits"], c["unmerged_logits"]),
            "reload_identical": bool(torch.equal(c["reload_logits"], c["unmerged_logits"])),
        },
        "adapter": {"path": str(run.adapter_dir.resolve()),
                    "bytes": sum(f.stat().st_size for f in run.adapter_dir.iterdir() if f.is_file())},
        "verify": c["verify"],
        "memory": c["memory"], "truncation": c["truncation"],
        "base_weights": prep.base_weights, "quantization": prep.quantization, "timings": run.timings,
        "environment": prep.environment(),
    }
    if run.distributed is not None:
        report["distributed"] = run.distributed
    if "accuracy" in c["after"]:
        if run.before is not None:
            report["gain_points"] = 100 * (c["after"]["accuracy"] - run.before["accuracy"])
        report["test"]["stats"] = stats = classification_summary(
            [e["label"] for e in prep.splits.test], prep.task.labels,
            {"before": run.before_preds, "after": c["preds"], "merged": c.get("merged_preds")})
        for warning in stats["warnings"]:
            run.log("warning: " + warning)
    if run.samples:
        report["samples"] = run.samples
    write_report(run.out, report, result.history, result.evals)
    run.log(f"wrote {run.out / 'report.json'}, {run.out / 'report.md'}, {run.out / 'loss.png'} and {run.adapter_dir} "
            f"in {run.timings['total_seconds']:.0f} s")
    return report


def _training_summary(run: Run) -> dict[str, Any]:
    recipe, result, evals = run.recipe, run.result, run.result.evals
    seen = rows = recipe.steps * run.global_micro * recipe.grad_accum
    if recipe.packing:  # a batch counts rows; the examples are what those rows hold (the same batches, replayed)
        stream = data_mod.batches(run.prep.train_items, run.global_micro, recipe.seed)
        seen = sum(sum(map(len, micro)) for micro, _ in zip(stream, range(recipe.steps * recipe.grad_accum)))
    return {
        "steps": recipe.steps, "examples_seen": seen, "rows_seen": rows if recipe.packing else None,
        "global_batch": run.global_micro * recipe.grad_accum, "processes": run.world_size,
        "first_loss": result.history[0]["loss"], "last_loss": result.history[-1]["loss"],
        "val_loss_before": evals[0].get("loss"), "val_loss_after": evals[-1].get("loss"),
        "tokens": result.tokens, "train_seconds": result.train_seconds,
        "eval_seconds_during_training": result.eval_seconds,
        "tokens_per_second": result.tokens_per_second,
        "optimizer_state_bytes": result.optimizer_state_bytes, "peak_memory_bytes": result.peak_memory_bytes,
        "history": result.history, "evals": evals,
    }


def _summary(metrics: dict[str, Any]) -> str:
    keys = [k for k in ("accuracy", "loss", "perplexity") if k in metrics]
    return ", ".join(f"{k} {metrics[k]:.4f}" for k in keys) + f" (n={metrics['n']})"


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max()) if a.numel() else 0.0


def _samples(prep: Prepared, model, key: str) -> list:
    """Greedy answers to the first test prompts: records with `key="before"`, plain answers otherwise."""
    out: list = []
    picked, seen = [], set()
    for ex in prep.splits.test:  # the first test examples with distinct prompts
        if ex["prompt"] not in seen and len(picked) < SAMPLE_PROMPTS:
            seen.add(ex["prompt"])
            picked.append(ex)
    for ex in picked:
        answer = prep.task.generate(model, ex["prompt"], prep.device)
        out.append({"prompt": ex["prompt"], "reference": ex["response"],
                    "before": answer} if key == "before" else answer)
    return out
