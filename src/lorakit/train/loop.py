"""The training loop: AdamW, warmup + cosine/linear decay, accumulation, clipping, periodic eval.

Progress goes to a tqdm bar when stderr is a terminal (`disable=None`), else to
plain log lines every `log_every` steps. Measures tokens/s (input tokens,
padding excluded, over training time without evaluations), AdamW state bytes
and peak memory (CUDA allocator peak on a GPU, the process's peak RSS on the CPU).

The loop can start from a checkpoint (`LoopState`: step, optimizer and scheduler state,
history), hands its state to a `checkpoint` callback every `save_every` steps and after
the last one, and stops with `TrainingDiverged` when the loss or the gradient norm is NaN
or infinite (before the optimizer step, so no bad state is ever checkpointed). With several
processes a `sync` object (`lorakit.train.distributed.Distributed`) skips gradient
synchronisation on all but the last micro-batch, reduces the gradients where the wrapper
does not, and sums the per-step statistics; without one the loop is the single-process
loop, with the same numbers.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import resource
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from ..errors import UsageError
from .errors import TrainingDiverged
from .progress import eta_text
from .stats import wilson
from .tasks import autocast
from ..loraplus import loraplus_param_groups


@dataclass
class LoopConfig:
    """Optimisation settings; see `Recipe` for meanings and units."""

    steps: int
    lr: float
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "cosine"
    grad_clip: float = 1.0
    grad_accum: int = 1
    eval_every: int = 0
    log_every: int = 5
    loraplus_ratio: float = 0.0  # LoRA+: B's learning rate = ratio x lr (0: one group at lr)
    save_every: int = 0  # call `checkpoint` every N steps and after the last step (0: never)
    stop_after: int | None = None  # stop after this step (with a checkpoint when `checkpoint` is given)
    on_step: Callable[[dict[str, float]], None] | None = None  # called with each step's history record


@dataclass
class LoopResult:
    """What happened: per-step records, evaluations, throughput and memory."""

    history: list[dict[str, float]] = field(default_factory=list)  # step, loss, lr, grad_norm, tokens
    evals: list[dict[str, Any]] = field(default_factory=list)  # step + the task's metrics
    train_seconds: float = 0.0  # optimisation only, evaluations excluded
    eval_seconds: float = 0.0
    tokens: int = 0
    optimizer_state_bytes: int = 0
    peak_memory_bytes: int = 0
    step_seconds: list[float] = field(default_factory=list)  # wall time of each step this process ran
    step_cpu_seconds: list[float] = field(default_factory=list)  # CPU time of this process (all threads) in each
    start_step: int = 0  # the step this process started from (0, or a checkpoint's step)
    last_step: int = 0  # the last step done (config.steps, or stop_after)
    interrupted: bool = False  # stopped early at a signal (`train`'s `interrupt`), with a checkpoint

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.train_seconds if self.train_seconds > 0 else 0.0


def lr_lambda(schedule: str, warmup: int, total: int) -> Callable[[int], float]:
    """Multiplier of the base learning rate at step `s` (0-based): linear warmup over `warmup`
    steps, then cosine or linear decay to 0 at `total`, or constant."""

    def f(s: int) -> float:
        if warmup and s < warmup:
            return (s + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = (s - warmup) / max(1, total - warmup)
        progress = min(max(progress, 0.0), 1.0)
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - progress

    return f


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by the optimizer's per-parameter state tensors (AdamW: two fp32 moments)."""
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if torch.is_tensor(value) and value.dim() > 0:
                total += value.numel() * value.element_size()
    return total


@dataclass
class LoopState:
    """Where a resumed loop starts: the checkpoint's step, `optimizer.state_dict()` and
    `scheduler.state_dict()` as saved, and the result so far (history, evaluations, counters)."""

    step: int
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    result: LoopResult


class _Local:
    """The single-process `sync`: nothing to synchronise."""

    world_size = 1
    rank = 0
    is_main = True

    def no_sync(self, model):
        return contextlib.nullcontext()

    def reduce_gradients(self, params) -> None:
        pass

    def sum(self, values: list[float]) -> list[float]:
        return values


def _start(model, params: list, config: LoopConfig, resume: LoopState | None):
    """`(optimizer, scheduler, result)` for a fresh run, or restored from `resume`."""
    if not params:
        raise UsageError("the model has no trainable parameters")
    optimizer, scheduler = make_optimizer(model, params, config)
    result = LoopResult()
    if resume is not None:
        optimizer.load_state_dict(resume.optimizer)
        scheduler.load_state_dict(resume.scheduler)
        result = copy.deepcopy(resume.result)
        result.start_step = resume.step
    return optimizer, scheduler, result


def _evaluate(evaluate, step: int, result: LoopResult, log: Callable[[str], None]) -> None:
    """Run `evaluate` (if any), record its metrics at `step` and log them above the progress bar."""
    if evaluate is None:
        return
    from tqdm.auto import tqdm  # an optional dependency of the job

    t = time.perf_counter()
    metrics = evaluate()
    result.eval_seconds += time.perf_counter() - t
    result.evals.append({"step": step, "train_seconds": result.train_seconds, **metrics})  # time to reach a loss
    shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
    if isinstance(metrics.get("accuracy"), float) and metrics.get("n"):  # a small validation split is uncertain
        n = int(metrics["n"])
        low, high = wilson(round(metrics["accuracy"] * n), n)
        shown += f" (accuracy 95% CI {low:.3f}-{high:.3f}, n={n})"
    with tqdm.external_write_mode(file=sys.stderr):  # keeps a live progress bar intact
        log(f"eval @ step {step}: {shown}")


def _record_step(result: LoopResult, step: int, seconds: float, cpu_seconds: float, loss: float, lr: float,
                 grad_norm: torch.Tensor, tokens: int) -> None:
    result.step_seconds.append(seconds)
    result.step_cpu_seconds.append(cpu_seconds)
    result.train_seconds += seconds
    result.tokens += tokens
    result.last_step = step
    result.history.append({"step": step, "loss": loss, "lr": lr, "grad_norm": float(grad_norm), "tokens": tokens})


def _show_step(bar, log: Callable[[str], None], is_main: bool, config: LoopConfig, result: LoopResult) -> None:
    """Advance the progress bar; without one (not a terminal), log every `log_every` steps."""
    h = result.history[-1]
    if config.on_step is not None:
        config.on_step(h)
    bar.update(1)
    bar.set_postfix(loss=f"{h['loss']:.4f}", lr=f"{h['lr']:.2e}")
    step = h["step"]
    if bar.disable and is_main and (step % config.log_every == 0 or step == 1 or step == config.steps):
        done = len(result.step_seconds)  # steps this process ran (a resumed run's pace is its own)
        eta = eta_text(done, done + config.steps - step, sum(result.step_seconds))
        log(f"step {step}/{config.steps}  loss {h['loss']:.4f}  lr {h['lr']:.2e}  grad_norm {h['grad_norm']:.3f}  "
            f"{result.tokens_per_second:.0f} tok/s" + (f"  {eta}" if eta else ""))


def _accumulate(model, loss_fn, batches, config: LoopConfig, device, dtype, sync, step: int) -> tuple[float, int]:
    """Forward and backward over `grad_accum` micro-batches: `(mean loss over processes, tokens of all)`.

    Raises `TrainingDiverged` if any process saw a non-finite loss (no optimizer step is taken)."""
    total_loss, tokens, bad_loss = 0.0, 0, None
    for i in range(config.grad_accum):
        batch = next(batches)
        # gradients are synchronised across processes on the last micro-batch only
        with sync.no_sync(model) if i < config.grad_accum - 1 else contextlib.nullcontext():
            with autocast(device, dtype):
                loss, n = loss_fn(model, batch)
            (loss / config.grad_accum).backward()
        value = loss.item()
        if bad_loss is None and not math.isfinite(value):
            bad_loss = value
        total_loss += value / config.grad_accum
        tokens += n
    where = ""
    if sync.world_size > 1:  # the mean loss over processes, the tokens of all, any non-finite loss
        loss_sum, tokens_sum, bad = sync.sum([total_loss, float(tokens), float(bad_loss is not None)])
        total_loss, tokens = loss_sum / sync.world_size, int(tokens_sum)
        where = f" (on rank {sync.rank} of {sync.world_size})"
        if bad and bad_loss is None:
            bad_loss, where = float("nan"), " (on another rank)"
    if bad_loss is not None:
        raise TrainingDiverged(f"the loss became {bad_loss}{where} at step {step}; lower the learning rate "
                               f"(lr={config.lr})")
    return total_loss, tokens


def _optimizer_step(params, optimizer, scheduler, config: LoopConfig, step: int) -> tuple[torch.Tensor, float]:
    """Clip, step, advance the schedule: `(global gradient norm before clipping, the lr used)`.

    Raises `TrainingDiverged` (before stepping) if the gradient norm is not finite."""
    grad_norm = torch.nn.utils.clip_grad_norm_(params, config.grad_clip if config.grad_clip > 0 else float("inf"))
    if not torch.isfinite(grad_norm):
        raise TrainingDiverged(f"the gradients became non-finite at step {step} (global norm {float(grad_norm)}); "
                               f"lower the learning rate (lr={config.lr})")
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, lr


def make_optimizer(model: torch.nn.Module, params: list[torch.nn.Parameter], config: LoopConfig):
    """`(AdamW, LambdaLR)` for the trainable `params` of `model` as the loop builds them: one
    group at `config.lr`, or LoRA+'s groups (`lorakit.loraplus_param_groups`)."""
    if config.loraplus_ratio:

        groups = loraplus_param_groups(model, lr=config.lr, ratio=config.loraplus_ratio,
                                       weight_decay=config.weight_decay)
    else:
        groups = [{"params": params}]
    optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer,
                                                  lr_lambda(config.schedule, config.warmup_steps, config.steps))
    return optimizer, scheduler


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory in bytes: the CUDA allocator's peak on a GPU; on the CPU the process's peak
    resident set. On Linux that is `VmHWM` of this process's address space: `ru_maxrss` survives
    `exec`, so a process started by a larger one would report its parent's peak."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def _checkpoint_or_stop(step: int, last: int, config: LoopConfig, checkpoint, interrupt, state) -> bool:
    """Checkpoint every `save_every` steps and at the last; True (after a checkpoint) when `interrupt`
    asks to stop before the last step."""
    saved = checkpoint is not None and (step == last or bool(config.save_every and step % config.save_every == 0))
    if saved:
        checkpoint(step, *state)
    if step < last and interrupt is not None and interrupt.requested():
        if not saved and interrupt.checkpoint is not None:
            interrupt.checkpoint(step, *state)
        state[2].interrupted = True
        return True
    return False


def train(
    model: torch.nn.Module,
    loss_fn: Callable[[torch.nn.Module, dict], tuple[torch.Tensor, int]],
    batches: Iterator[dict],
    config: LoopConfig,
    *,
    device: torch.device,
    dtype: torch.dtype | None = None,
    evaluate: Callable[[], dict[str, Any]] | None = None,
    log: Callable[[str], None] = print,
    resume: LoopState | None = None,
    checkpoint: Callable[[int, torch.optim.Optimizer, Any, LoopResult], None] | None = None,
    sync: Any = None,
    interrupt: Any = None,
) -> LoopResult:
    """Optimise the trainable parameters of `model` for `config.steps` steps.

    Args:
        loss_fn: `(model, batch) -> (scalar loss, input tokens in the batch)`.
        batches: yields batches already on `device`; `grad_accum` are used per step (with a
            resumed run, the stream must start after the batches the checkpoint consumed).
        evaluate: called before the first step, every `eval_every` steps and after the
            last; its metrics are recorded in `LoopResult.evals` (with `step`). A resumed
            run does not repeat the evaluations its checkpoint recorded.
        resume: start after `resume.step` with its optimizer, scheduler and history.
        checkpoint: `(step, optimizer, scheduler, result)`, called every `save_every` steps,
            after the last step and at `stop_after` (after that step's evaluation).
        sync: the distributed helper (see the module docstring); None for one process.
        interrupt: an object with `requested() -> bool` and `checkpoint` (a `checkpoint`-like
            callable or None): once requested, the loop stops after the current step, writes a
            checkpoint and returns with `result.interrupted` (no final evaluation).
    Returns:
        The `LoopResult`; `last_step` is `config.steps`, or `stop_after` when it stopped early
        (then the final evaluation is skipped and the model stays in training mode).
    Raises:
        UsageError: the model has no trainable parameter.
        TrainingDiverged: the loss or the gradient norm became NaN or infinite (step named;
            the optimizer step is not taken).
    """
    from tqdm.auto import tqdm  # an optional dependency of the job

    sync = sync or _Local()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler, result = _start(model, params, config, resume)
    first = result.start_step + 1
    last = config.steps if config.stop_after is None else min(config.steps, config.stop_after)
    run_eval = functools.partial(_evaluate, evaluate, result=result, log=log)  # run_eval(step)
    if first == 1:
        run_eval(0)
    model.train()
    bar = tqdm(total=config.steps, initial=first - 1, desc="train", unit="step", disable=None if sync.is_main else True,
               file=sys.stderr, dynamic_ncols=True)
    try:
        for step in range(first, last + 1):
            t, cpu = time.perf_counter(), time.process_time()
            total_loss, tokens = _accumulate(model, loss_fn, batches, config, device, dtype, sync, step)
            sync.reduce_gradients(params)
            grad_norm, lr = _optimizer_step(params, optimizer, scheduler, config, step)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            _record_step(result, step, time.perf_counter() - t, time.process_time() - cpu, total_loss, lr, grad_norm,
                         tokens)
            if step == 1 or not result.optimizer_state_bytes:
                result.optimizer_state_bytes = optimizer_state_bytes(optimizer)
            _show_step(bar, log, sync.is_main, config, result)
            if config.eval_every and step % config.eval_every == 0 and step != config.steps:
                run_eval(step)
                model.train()
            if _checkpoint_or_stop(step, last, config, checkpoint, interrupt, (optimizer, scheduler, result)):
                break
    finally:
        bar.close()
    result.last_step = max(result.last_step, first - 1)
    if last < config.steps or result.interrupted:
        return result
    run_eval(config.steps)
    model.eval()
    result.peak_memory_bytes = peak_memory_bytes(device)
    return result
