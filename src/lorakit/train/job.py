"""The main job, start to end: recipe -> model + data -> zero-shot -> LoRA training -> eval ->
save -> merge check -> reload check -> report. Plus `evaluate_adapter` (`lorakit eval`) and
`merge_adapter` (`lorakit merge`), which rebuild everything from the saved files alone.

Output folder layout (`recipe.out_dir`):

    adapter/adapter_config.json, adapter/adapter_model.safetensors   PEFT layout (lorakit.save_adapter)
    adapter/lorakit_train.json   resolved recipe, model, split fingerprint, recorded test metrics
    report.json, report.md, loss.png
    checkpoints/latest, checkpoints/step-NNNNNN/   resumable state (see `checkpoint`)

`run_train(recipe, resume=OUT)` continues a run from its latest checkpoint; under torchrun
with several processes it trains data-parallel (see `distributed`), rank 0 writing everything.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from .. import __version__
from ..errors import LoraError
from ..config import LoraConfig
from ..inject import plan
from . import data as data_mod
from .errors import RecipeError
from .loop import LoopConfig, train
from .models import count_all, load_model, quiet_transformers, resolve_device, resolve_model, set_threads, sha256_file
from .recipe import Recipe, apply
from .report import write_json, write_report
from .tasks import make_task

TRAIN_INFO = "lorakit_train.json"
PROBE_EXAMPLES = 8
RUN_FILES = ("report.json", "checkpoints", "adapter")  # what marks a folder as holding a previous run
SAMPLE_PROMPTS = 3


def _stderr(msg: str) -> None:
    print(f"[lorakit] {msg}", file=sys.stderr, flush=True)


class Prepared:
    """A recipe's model, tokenizer, task and data split, ready to evaluate or train."""

    def __init__(self, recipe: Recipe, log: Callable[[str], None] = _stderr, *, threads: int | None = None,
                 device: tuple[torch.device, torch.dtype | None] | None = None, correct: bool = False):
        """`correct`: with `quantize: nf4` and `qera_rank > 0`, pin the frozen QERA correction (training
        needs it; a saved adapter already holds it)."""
        self.recipe = recipe
        self.threads = set_threads(threads if threads is not None else recipe.threads)
        self.device, self.dtype = device if device is not None else resolve_device(recipe.device, recipe.precision)
        self.source = resolve_model(recipe.model)  # bad input fails here, before the slow model load
        self.dataset = data_mod.load_dataset(recipe)
        if self.dataset.skipped:
            log(f"skipped {self.dataset.skipped} rows with an empty text/prompt/response")
        self.splits = data_mod.split(self.dataset.examples, recipe.test_size, recipe.val_size, recipe.split_seed)
        s = self.splits.sizes()
        log(f"recipe {recipe.name!r}: model {recipe.model}, task {recipe.task}; data {self.dataset.name}: "
            f"{len(self.dataset.examples)} examples -> train {s['train']}, val {s['val']}, test {s['test']}")
        if s["test"] < recipe.test_size or s["val"] < recipe.val_size:
            log(f"note: the held-out splits are smaller than asked (test_size {recipe.test_size}, val_size {recipe.val_size}): "
                f"they take at most 20% and 10% of the {len(self.dataset.examples)} examples")
        if os.environ.get("LORAKIT_BUSY_CPU"):
            log(f"the CPU was busy at start (load average {os.environ['LORAKIT_BUSY_CPU']}): running with OMP_WAIT_POLICY=PASSIVE")
        labels = sorted({e["label"] for e in self.dataset.examples}, key=str) if recipe.task != "instruct" else None
        kind = "seq-cls" if recipe.task == "classify-head" else "causal-lm"
        t = time.perf_counter()
        self.model, self.tokenizer = load_model(self.source, kind, num_labels=len(labels) if labels else None,
                                                labels=[str(l) for l in labels] if labels else None, seed=recipe.seed, log=log)
        self.load_seconds = time.perf_counter() - t
        self.model.to(self.device)
        self.task = make_task(recipe, self.tokenizer, self.dataset.examples)
        self.qera = None
        self.quantization = self.quantize(self.model, correct=correct, log=log)
        if self.quantization is not None:
            q = self.quantization
            log(f"quantized {q['layers']} linear layers to {recipe.quantize.upper()} (QLoRA): {q['bits_per_param']:.4f} bits/param, "
                f"{q['bytes'] / 2**20:.1f} MiB (bf16: {2 * q['params'] / 2**20:.1f} MiB)")
        from ..quant import base_weight_memory

        self.base_weights = base_weight_memory(self.model)

    def quantize(self, model, *, correct: bool = False, log: Callable[[str], None] = _stderr) -> dict[str, Any] | None:
        """QLoRA (recipe `quantize: nf4`): every linear layer but the head and `modules_to_save` -> 4-bit NF4, before LoRA.

        With `correct` and `qera_rank > 0`, the frozen QERA correction is computed from the
        first `calibration_size` training examples first and pinned beside the 4-bit layers
        (`lorakit.quant.qera`; `self.qera` gets its report). A model for a saved adapter does not
        need it: the saved adapter holds the correction. Returns the `bits_per_param`
        figures, or None for `quantize: none`.
        """
        if self.recipe.quantize == "none":
            return None
        from ..quant import bits_per_param, quantize

        compute_dtype = self.dtype or torch.float32
        exclude = self.recipe.lora_config().modules_to_save or None  # trained in full: not quantized
        if not (correct and self.recipe.qera_rank):
            quantize(model, self.recipe.quantize, double_quant=True, compute_dtype=compute_dtype, exclude_modules=exclude)
            return bits_per_param(model).as_dict()
        from ..quant.qera import qera_quantize

        t = time.perf_counter()
        examples = self.splits.train[:self.recipe.calibration_size]
        b = self.recipe.eval_batch_size
        batches = [self.task.batch(examples[i:i + b], self.device) for i in range(0, len(examples), b)]
        report = qera_quantize(model, batches, rank=self.recipe.qera_rank, compute_dtype=compute_dtype, exclude_modules=exclude)
        self.qera = {**report.as_dict(), "rank": self.recipe.qera_rank, "calibration_examples": len(examples),
                     "seconds": time.perf_counter() - t}
        log(f"qera: frozen rank-{self.recipe.qera_rank} corrections of the NF4 error of {len(report.layers)} layers, "
            f"calibrated on {report.tokens:,} tokens of {len(examples)} training examples; they remove "
            f"{100 * (1 - report.remaining):.1f}% of the layers' output error there (mean over layers); "
            f"{self.qera['seconds']:.0f} s")
        return {**bits_per_param(model).as_dict(), "qera": self.qera}

    def fresh_model(self):
        """Another copy of the base model, loaded the same way (same seed for a new head)."""
        kind = self.task.model_kind
        labels = getattr(self.task, "labels", None)
        model, _ = load_model(self.source, kind, num_labels=len(labels) if labels else None,
                              labels=[str(l) for l in labels] if labels else None, seed=self.recipe.seed)
        model = model.to(self.device)
        self.quantize(model)
        return model

    def evaluate(self, model, examples):
        return self.task.evaluate(model, examples, self.recipe.eval_batch_size, self.device, self.dtype)

    def split_info(self) -> dict[str, Any]:
        return {"name": self.dataset.name, "sizes": self.splits.sizes(), "split_seed": self.recipe.split_seed,
                "test_fingerprint": data_mod.fingerprint(self.splits.test), "total": len(self.dataset.examples)}

    def model_info(self) -> dict[str, Any]:
        info = {"name": self.source.name, "spec": self.source.spec, "path": str(self.source.path),
                "class": type(self.model).__name__, "parameters": count_all(self.model)}
        if self.source.gguf:
            info["gguf_sha256"] = sha256_file(self.source.path)
        return info

    def environment(self) -> dict[str, Any]:
        import transformers

        return {"lorakit": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
                "python": platform.python_version(), "device": str(self.device),
                "precision": "bf16 autocast" if self.dtype is not None else "fp32", "threads": self.threads,
                "cpus": os.cpu_count(), "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
                "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}


def _metric_names(task: str) -> list[str]:
    return ["loss", "perplexity"] if task == "instruct" else ["accuracy", "loss"]


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max()) if a.numel() else 0.0


def run_train(recipe: Recipe, log: Callable[[str], None] = _stderr, *, resume: str | Path | None = None,
              stop_after: int | None = None, overwrite: bool = False) -> dict[str, Any] | None:
    """Run the whole job for `recipe` and write its outputs into `recipe.out_dir`.

    Args:
        resume: a run folder (or one of its checkpoint folders) to continue from: the adapter,
            AdamW and scheduler state, RNG states, data position, history and zero-shot metrics
            come from the checkpoint; `recipe` must agree with the recorded one except for
            `checkpoint.RESUME_MAY_CHANGE` (use `checkpoint.resume_recipe` to build it).
        stop_after: stop after this step, with a checkpoint (continue with `resume`).
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
    from . import distributed as dist_mod

    t_start = time.perf_counter()
    if stop_after is not None and (isinstance(stop_after, bool) or not isinstance(stop_after, int) or stop_after < 1):
        raise RecipeError(f"stop_after must be a step >= 1, got {stop_after!r}")
    world = dist_mod.world_from_env()
    ckpt, changed, shards = _checks(recipe, resume, world.world_size if world else 1, overwrite)
    device = resolve_device(recipe.device, recipe.precision)
    dist = None
    if world is not None:
        dist = dist_mod.Distributed(world, recipe.parallel, device[0])
        device = (dist.device, device[1])
        log = _rank_log(log, dist)
    try:
        return _run_train(recipe, log, t_start, ckpt, changed, stop_after, dist, device, shards,
                          dist_mod.threads_per_process(recipe.threads, world.local_world_size) if world else None)
    finally:
        if dist is not None:
            dist.close()


def _checks(recipe: Recipe, resume, world_size: int, overwrite: bool = False):
    """The checks before anything loads: `(checkpoint or None, fields changed on resume, data shards)`."""
    from . import distributed as dist_mod
    from .checkpoint import check_resume_recipe, read_checkpoint
    from .errors import CheckpointError

    out = recipe.out_dir
    if out.exists() and not out.is_dir():
        raise RecipeError(f"output path {out} exists and is not a folder")
    previous = [n for n in RUN_FILES if (out / n).exists()] if resume is None and not overwrite else []
    if previous:
        raise RecipeError(f"output folder {out} holds a previous run ({', '.join(previous)}); pass --overwrite to replace it, "
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
        raise CheckpointError(f"--resume: the checkpoint's global batch is split into {shards} shards (it was trained by {shards} "
                              f"processes); {world_size} processes cannot share them evenly (use a number that divides {shards})")
    dist_mod.check_supported(recipe, world_size)
    return ckpt, changed, shards


def preflight(recipe: Recipe, *, resume: str | Path | None = None, world_size: int = 1, overwrite: bool = False) -> None:
    """What `run_train` checks before the model loads, for a launcher to run before it starts
    processes: output folder, checkpoint and recipe agreement, supported combination, device,
    model name or path, data file and fields. Raises the same errors as `run_train`."""
    _checks(recipe, resume, world_size, overwrite)
    resolve_device(recipe.device, recipe.precision)
    resolve_model(recipe.model)
    data_mod.load_dataset(recipe)


def lora_config_for(recipe: Recipe, prep) -> LoraConfig:
    """The recipe's `LoraConfig` for the prepared model (its name and task type recorded)."""
    return recipe.lora_config().replace(
        base_model_name_or_path=prep.source.name,
        task_type="SEQ_CLS" if recipe.task == "classify-head" else "CAUSAL_LM",
    )


def _rank_log(log: Callable[[str], None], dist) -> Callable[[str], None]:
    """Rank 0 speaks, naming itself; the other ranks stay quiet (their errors name their rank)."""
    def ranked(message: str) -> None:
        if dist.is_main:
            log(dist.tag(message))
    return ranked


def _run_train(recipe, log, t_start, ckpt, changed, stop_after, dist, device, shards, threads):
    """`run_train` after the checks: `ckpt` a read `Checkpoint` or None, `dist` a `Distributed` or None."""
    import lorakit as lk

    from . import distributed as dist_mod
    from .checkpoint import CheckpointWriter, capture_rng, earlier_checkpoint
    from .errors import CheckpointError, TrainingDiverged

    out = recipe.out_dir
    is_main = dist is None or dist.is_main
    rank, world_size = (dist.rank, dist.world_size) if dist else (0, 1)
    timings: dict[str, float] = {}
    prep = Prepared(recipe, log, threads=threads, device=device, correct=True)
    timings["load_seconds"] = time.perf_counter() - t_start
    task, model, test = prep.task, prep.model, prep.splits.test
    train_fingerprint = data_mod.fingerprint(prep.splits.train)
    global_micro = recipe.batch_size * shards  # examples per micro-batch over all processes
    if shards > 1 and len(prep.splits.train) < global_micro:
        raise RecipeError(f"the training split has {len(prep.splits.train)} examples, fewer than one global micro-batch "
                          f"(batch_size {recipe.batch_size} x {shards} processes)")
    config = lora_config_for(recipe, prep)
    if ckpt is not None:
        if ckpt.state["data"].get("train_fingerprint") != train_fingerprint:
            raise CheckpointError(f"--resume: the training split differs from the one checkpoint {ckpt.folder} was trained on "
                                  "(the data file or the split fields changed)")
        job_state = ckpt.state.get("job", {})
        before, samples = job_state.get("before"), job_state.get("samples", [])
        log(f"resuming from {ckpt.folder} (step {ckpt.step} of {recipe.steps})"
            + (f"; changed: {', '.join(f'{k}' for k in changed)}" if changed else ""))
        if shards != world_size:
            log(f"the checkpoint was trained by {shards} processes: each process here takes {shards // world_size} of the "
                f"{shards} slices of every global micro-batch, one after the other (same global batch)")
    else:
        if is_main:
            earlier = earlier_checkpoint(out)
            if earlier is not None:
                log(f"{out / 'checkpoints'} holds a checkpoint of an earlier run (step {earlier}); this run replaces it "
                    f"(lorakit train --resume {out} would have continued it)")
        before, samples = None, []
        plan(model, config)  # a target that matches nothing fails now, not after the evaluation
        t = time.perf_counter()
        if is_main:
            log(f"evaluating the base model on {len(test)} held-out test examples")
            before, _ = prep.evaluate(model, test)
            samples = _samples(prep, model, "before") if recipe.task == "instruct" else []
            log("before: " + _summary(before))
        timings["eval_before_seconds"] = time.perf_counter() - t

    torch.manual_seed(recipe.seed)
    if ckpt is not None:
        ckpt.load_adapter(model)  # injects the recorded adapter and loads its tensors (trainable)
    else:
        lk.inject(model, config)
    trainable_names = [n for n, p in model.named_parameters() if p.requires_grad]
    if ckpt is not None and trainable_names != ckpt.state["trainable"]:
        mismatch = next((a, b) for a, b in zip(trainable_names + [None], ckpt.state["trainable"] + [None]) if a != b)
        raise CheckpointError(f"checkpoint {ckpt.folder} does not fit this model: trainable tensor {mismatch[0]!r} here, "
                              f"{mismatch[1]!r} in the checkpoint")
    trainable, total = lk.count_parameters(model)
    adapted = sum("default" in layer.lora_A for _, layer in lk.state.lora_layers(model))
    log(f"LoRA r={config.r} alpha={config.alpha} on {adapted} modules: {trainable:,} trainable of {total:,} "
        f"parameters ({100 * trainable / total:.3f}%)")
    if dist is not None:
        log(f"{world_size} processes ({dist.backend}, {recipe.parallel}); global batch {global_micro * recipe.grad_accum} "
            f"examples per step ({recipe.batch_size} per process x {recipe.grad_accum} micro-batches x {world_size})")
    forward_model = dist.wrap(model) if dist is not None else model

    # the data: global micro-batches of batch_size x shards; this process takes its shards of each
    per_rank = shards // world_size
    consumed = ckpt.step * recipe.grad_accum if ckpt is not None else 0
    b = recipe.batch_size

    def local_batches():
        for micro in data_mod.batches(prep.splits.train, global_micro, recipe.seed, start=consumed):
            for j in range(rank * per_rank, (rank + 1) * per_rank):
                yield task.batch(micro[j * b:(j + 1) * b], prep.device)

    loop_cfg = LoopConfig(steps=recipe.steps, lr=recipe.lr, weight_decay=recipe.weight_decay, warmup_steps=recipe.warmup_steps,
                          schedule=recipe.schedule, grad_clip=recipe.grad_clip, grad_accum=recipe.grad_accum * per_rank,
                          eval_every=recipe.eval_every, log_every=max(1, min(10, recipe.steps // 8)),
                          loraplus_ratio=recipe.loraplus_ratio, save_every=recipe.checkpoint_every, stop_after=stop_after)
    writer = CheckpointWriter(out, resumed_from=ckpt.folder if ckpt is not None else None)

    def save_checkpoint(step, optimizer, scheduler, result):
        rng = dist.gather(capture_rng()) if dist is not None else [capture_rng()]
        if not is_main:  # rank 0 writes it; the others remember its name for their messages
            writer.note(step)
            return
        writer.save(step, model=model, optimizer=optimizer, scheduler=scheduler, result=result, trainable=trainable_names,
                    recipe=recipe.to_dict(), world_size=world_size, rng=rng,
                    data={"global_micro_batch": global_micro, "shards": shards, "micro_batches_consumed": step * recipe.grad_accum,
                          "seed": recipe.seed, "train_fingerprint": train_fingerprint},
                    job={"before": before, "samples": samples})

    wants_checkpoints = recipe.checkpoint_every > 0 or stop_after is not None
    if ckpt is not None:
        ckpt.restore_rng(rank, world_size)
    else:
        torch.manual_seed(recipe.seed)
    t = time.perf_counter()
    try:
        result = train(forward_model, task.loss, local_batches(), loop_cfg, device=prep.device, dtype=prep.dtype,
                       evaluate=lambda: prep.evaluate(model, prep.splits.val)[0], log=log,
                       resume=ckpt.loop_state() if ckpt is not None else None,
                       checkpoint=save_checkpoint if wants_checkpoints else None, sync=dist)
    except TrainingDiverged as exc:
        kept = writer.latest
        where = (f"the last good checkpoint is {kept} (step {int(kept.name.split('-')[1])})" if kept is not None
                 else "no checkpoint was written")
        raise TrainingDiverged(f"training stopped: {exc}; {where}") from None
    timings["train_seconds"] = time.perf_counter() - t

    distributed = None
    if dist is not None:
        hashes = dist.gather(dist_mod.trainable_sha256(model))
        distributed = {**dist.stats(), "steps_this_run": result.last_step - result.start_step,
                       "ranks_identical": len(set(hashes)) == 1, "adapter_sha256_per_rank": hashes}
        if is_main:
            r = distributed["gradient_allreduce"]
            log(f"gradient all-reduce: {r['calls']} calls, {r['tensors']} tensors, {r['numel']:,} elements over "
                f"{distributed['steps_this_run']} steps ({distributed['trainable_numel']:,} trainable elements); "
                f"ranks identical: {distributed['ranks_identical']}")
        if not distributed["ranks_identical"]:
            raise RuntimeError(f"the ranks' adapters differ after training (sha256 {', '.join(h[:12] for h in hashes)})")
        if not is_main:  # done: leave together with rank 0 (a rank that exits alone can abort the other)
            del forward_model
            dist.finish()
            return None
    stopped = result.last_step < recipe.steps
    adapter_dir = out / "adapter"
    if dist is not None:
        sharded = recipe.parallel == "fsdp2" and not stopped
        if sharded:  # the sharded model needs every rank: save, then go on with a whole one
            lk.save_adapter(model, adapter_dir)
            model = prep.model = None  # free the shards before leaving the group
        del forward_model
        dist.finish()
        if sharded:
            model = prep.model = prep.fresh_model()
            lk.load_adapter(model, adapter_dir)
            model.eval()
    if stopped:
        log(f"stopped after step {result.last_step} of {recipe.steps}; checkpoint {writer.latest}; continue with: "
            f"lorakit train --resume {out}")
        return {"stopped_at": result.last_step, "checkpoint": str(writer.latest), "out": str(out)}

    t = time.perf_counter()
    after, preds = prep.evaluate(model, test)
    if recipe.task == "instruct":
        samples = [{**s, "after": a} for s, a in zip(samples, _samples(prep, model, "after"))]
    timings["eval_after_seconds"] = time.perf_counter() - t
    log("after: " + _summary(after))

    if prep.qera is not None:  # one adapter = trained + correction, exact: it loads on a plain NF4 base
        from ..quant.qera import fold_corrections

        fold_corrections(model)
    lk.save_adapter(model, adapter_dir)
    info = {"lorakit_version": __version__, "recipe": recipe.to_dict(), "model": prep.model_info(),
            "data": prep.split_info(), "task": task.describe(), "test_metrics": after,
            "environment": {"device": str(prep.device), "precision": "bf16" if prep.dtype is not None else "fp32"}}
    write_json(adapter_dir / TRAIN_INFO, info)
    adapter_bytes = sum(f.stat().st_size for f in adapter_dir.iterdir() if f.is_file())

    # merged vs unmerged: same logits (to float rounding) and the same test predictions
    t = time.perf_counter()
    probe_ex = test[:PROBE_EXAMPLES]
    unmerged_logits = task.probe(model, probe_ex, prep.device, prep.dtype)
    if prep.quantization is not None:  # dequantize + delta in float32 -> a dense model; rounding error reported
        merged_model, merge_rounding = lk.quant.merge_quantized(model)
        prep.quantization["merge"] = merge_rounding.as_dict()
    else:
        merged_model = lk.merge_and_unload(model)
    merged_logits = task.probe(merged_model, probe_ex, prep.device, prep.dtype)
    merged, merged_preds = prep.evaluate(merged_model, test)
    if recipe.task == "instruct":  # "predictions" are per-example losses: equal to float rounding
        compared = "per-example test losses (|diff| <= 1e-4)"
        diffs = sum(abs(a - b) > 1e-4 * max(1.0, abs(a)) for a, b in zip(preds, merged_preds))
    else:
        compared = "test predictions"
        diffs = sum(a != b for a, b in zip(preds, merged_preds))
    timings["merge_check_seconds"] = time.perf_counter() - t
    log(f"merged: {_summary(merged)}; logits max |diff| vs unmerged {_max_diff(merged_logits, unmerged_logits):.3g}; "
        f"{diffs} of {len(test)} {compared} differ")
    merged_model = model = prep.model = None  # free them before the reload check

    # the saved files alone reproduce the trained model
    t = time.perf_counter()
    fresh = prep.fresh_model()
    lk.load_adapter(fresh, adapter_dir)
    reload_logits = task.probe(fresh, probe_ex, prep.device, prep.dtype)
    del fresh
    timings["reload_check_seconds"] = time.perf_counter() - t

    timings["total_seconds"] = time.perf_counter() - t_start
    evals = result.evals
    report: dict[str, Any] = {
        "recipe": recipe.to_dict(),
        "model": info["model"],
        "data": info["data"],
        "task": task.describe(),
        "metric_names": _metric_names(recipe.task),
        "test": {"before": before, "after": after, "merged": merged},
        "lora": {"config": config.to_peft_dict(), "targets": config.target_modules, "adapted_modules": adapted,
                 "trainable": trainable, "total": total, "trainable_percent": 100 * trainable / total},
        "training": {
            "steps": recipe.steps, "examples_seen": recipe.steps * global_micro * recipe.grad_accum,
            "global_batch": global_micro * recipe.grad_accum, "processes": world_size,
            "first_loss": result.history[0]["loss"], "last_loss": result.history[-1]["loss"],
            "val_loss_before": evals[0].get("loss"), "val_loss_after": evals[-1].get("loss"),
            "tokens": result.tokens, "train_seconds": result.train_seconds, "eval_seconds_during_training": result.eval_seconds,
            "tokens_per_second": result.tokens_per_second,
            "optimizer_state_bytes": result.optimizer_state_bytes, "peak_memory_bytes": result.peak_memory_bytes,
            "history": result.history, "evals": evals,
        },
        "checkpoints": {"every": recipe.checkpoint_every, "latest": str(writer.latest) if writer.latest else None,
                        "resumed_from": str(ckpt.folder) if ckpt is not None else None,
                        "resumed_at_step": ckpt.step if ckpt is not None else None, "changed_on_resume": changed},
        "checks": {
            "merged_vs_unmerged_max_abs_diff": _max_diff(merged_logits, unmerged_logits),
            "merged_predictions_equal": diffs == 0, "merged_prediction_differences": diffs, "merged_compared": compared,
            "reload_max_abs_diff": _max_diff(reload_logits, unmerged_logits),
            "reload_identical": bool(torch.equal(reload_logits, unmerged_logits)),
        },
        "adapter": {"path": str(adapter_dir), "bytes": adapter_bytes},
        "base_weights": prep.base_weights,
        "quantization": prep.quantization,
        "timings": timings,
        "environment": prep.environment(),
    }
    if distributed is not None:
        report["distributed"] = distributed
    if "accuracy" in before:
        report["gain_points"] = 100 * (after["accuracy"] - before["accuracy"])
    if samples:
        report["samples"] = samples
    write_report(out, report, result.history, evals)
    log(f"wrote {out / 'report.json'}, {out / 'report.md'}, {out / 'loss.png'} and {adapter_dir} "
        f"in {timings['total_seconds']:.0f} s")
    return report


def _summary(metrics: dict[str, Any]) -> str:
    keys = [k for k in ("accuracy", "loss", "perplexity") if k in metrics]
    return ", ".join(f"{k} {metrics[k]:.4f}" for k in keys) + f" (n={metrics['n']})"


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
        out.append({"prompt": ex["prompt"], "reference": ex["response"], "before": answer} if key == "before" else answer)
    return out


# ---------------------------------------------------------------------- eval / merge from saved files
def read_train_info(adapter: str | Path) -> dict[str, Any] | None:
    """The `lorakit_train.json` of an adapter folder, or None if it has none."""
    import json

    path = Path(adapter) / TRAIN_INFO
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise RecipeError(f"{path} is not valid JSON ({exc.msg})") from None


def recipe_for_adapter(adapter: str | Path | None, base: Recipe | None, overrides: dict[str, Any]) -> tuple[Recipe, dict | None]:
    """The recipe recorded with `adapter` (else `base`), with `overrides` applied."""
    if adapter is not None and not Path(adapter).is_dir():
        raise FileNotFoundError(f"adapter folder {adapter} does not exist")
    info = read_train_info(adapter) if adapter is not None else None
    if info is None and adapter is not None:
        from ..io import read_adapter

        read_adapter(adapter)  # no adapter files (or a pickle, a corrupt file): say that first
    if info is not None:
        recipe = apply(Recipe(), info["recipe"])
    elif base is not None:
        recipe = base
    else:
        raise RecipeError(f"{adapter} has no {TRAIN_INFO} (not written by lorakit train); name its recipe with --recipe, or its model and data with --model/--data")
    return apply(recipe, overrides), info


def evaluate_adapter(adapter: str | Path | None, *, base: Recipe | None = None, overrides: dict[str, Any] | None = None,
                     split: str = "test", log: Callable[[str], None] = _stderr) -> dict[str, Any]:
    """Evaluate a saved adapter (or, with `adapter=None`, the base model) on a split of its recipe's data.

    Rebuilds model, data split and scoring from `adapter/lorakit_train.json`; when the split is
    the recorded one (same fingerprint) the result is compared with the recorded test metrics.

    Returns:
        `{"metrics", "split", "recorded" (or None), "matches_recorded" (bool or None), "recipe"}`.
    """
    import lorakit as lk

    recipe, info = recipe_for_adapter(adapter, base, overrides or {})
    if split not in ("test", "val", "train"):
        raise RecipeError(f"split must be test, val or train, got {split!r}")
    prep = Prepared(recipe, log)
    if adapter is not None:
        lk.load_adapter(prep.model, adapter, trainable=False)
    examples = getattr(prep.splits, split)
    log(f"evaluating {'adapter ' + str(adapter) if adapter else 'the base model'} on {len(examples)} {split} examples")
    metrics, _ = prep.evaluate(prep.model, examples)
    recorded, matches = None, None
    if info is not None and split == "test" and adapter is not None:
        recorded = info.get("test_metrics")
        same_split = data_mod.fingerprint(examples) == info.get("data", {}).get("test_fingerprint")
        if recorded is not None and same_split:
            keys = [k for k in ("accuracy",) if k in recorded] or ["loss"]
            matches = all(abs(metrics[k] - recorded[k]) <= (0 if k == "accuracy" else 1e-4 * max(1.0, abs(recorded[k]))) for k in keys)
    return {"metrics": metrics, "split": split, "recorded": recorded, "matches_recorded": matches, "recipe": recipe.to_dict()}


def merge_adapter(adapter: str | Path, out: str | Path, *, base: Recipe | None = None, overrides: dict[str, Any] | None = None,
                  log: Callable[[str], None] = _stderr) -> dict[str, Any]:
    """Fold a saved adapter into its base model and save the plain model (+ tokenizer) to `out`.

    Returns `{"out", "max_abs_diff"}`: the largest logit difference, merged vs unmerged, on a few
    examples of the recipe's data.
    Raises:
        LoraError: `out` exists and is not empty.
    """
    import lorakit as lk

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LoraError(f"output folder {out} exists and is not empty")
    recipe, _ = recipe_for_adapter(adapter, base, overrides or {})
    prep = Prepared(recipe, log)
    lk.load_adapter(prep.model, adapter, trainable=False)
    probe_ex = prep.splits.test[:PROBE_EXAMPLES]
    before = prep.task.probe(prep.model, probe_ex, prep.device, prep.dtype)
    merged = lk.merge_and_unload(prep.model)
    after = prep.task.probe(merged, probe_ex, prep.device, prep.dtype)
    if getattr(merged.config, "quantization_config", None) is not None:
        del merged.config.quantization_config
    merged.hf_quantizer = None
    with quiet_transformers():
        merged.save_pretrained(out)
        prep.tokenizer.save_pretrained(out)
    diff = _max_diff(before, after)
    log(f"merged model written to {out}; logits max |diff| merged vs unmerged: {diff:.3g}")
    return {"out": str(out), "max_abs_diff": diff}

