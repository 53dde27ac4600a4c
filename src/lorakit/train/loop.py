"""The training loop: AdamW, warmup + cosine/linear decay, accumulation, clipping, periodic eval.

Progress goes to a tqdm bar when stderr is a terminal (`disable=None`), else to
plain log lines every `log_every` steps. Measures tokens/s (input tokens,
padding excluded, over training time without evaluations), AdamW state bytes
and peak memory (CUDA allocator peak on a GPU, the process's peak RSS on the CPU).
"""

from __future__ import annotations

import math
import resource
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from .tasks import autocast


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


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


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
) -> LoopResult:
    """Optimise the trainable parameters of `model` for `config.steps` steps.

    Args:
        loss_fn: `(model, batch) -> (scalar loss, input tokens in the batch)`.
        batches: yields batches already on `device`; `grad_accum` are used per step.
        evaluate: called before the first step, every `eval_every` steps and after the
            last; its metrics are recorded in `LoopResult.evals` (with `step`).
    Raises:
        ValueError: the model has no trainable parameter, or the loss became NaN/inf.
    """
    from tqdm.auto import tqdm

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config.schedule, config.warmup_steps, config.steps))
    result = LoopResult()

    def run_eval(step: int) -> None:
        if evaluate is None:
            return
        t = time.perf_counter()
        metrics = evaluate()
        result.eval_seconds += time.perf_counter() - t
        result.evals.append({"step": step, **metrics})
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
        with tqdm.external_write_mode(file=sys.stderr):  # keeps a live progress bar intact
            log(f"eval @ step {step}: {shown}")

    run_eval(0)
    model.train()
    bar = tqdm(total=config.steps, desc="train", unit="step", disable=None, file=sys.stderr, dynamic_ncols=True)
    plain = bar.disable
    try:
        for step in range(1, config.steps + 1):
            t = time.perf_counter()
            total_loss, tokens = 0.0, 0
            for _ in range(config.grad_accum):
                batch = next(batches)
                with autocast(device, dtype):
                    loss, n = loss_fn(model, batch)
                if not torch.isfinite(loss):
                    raise ValueError(f"the loss became {loss.item()} at step {step}; lower the learning rate (lr={config.lr})")
                (loss / config.grad_accum).backward()
                total_loss += loss.item() / config.grad_accum
                tokens += n
            grad_norm = torch.nn.utils.clip_grad_norm_(params, config.grad_clip if config.grad_clip > 0 else float("inf"))
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            result.train_seconds += time.perf_counter() - t
            result.tokens += tokens
            result.history.append({"step": step, "loss": total_loss, "lr": lr, "grad_norm": float(grad_norm), "tokens": tokens})
            if step == 1:
                result.optimizer_state_bytes = optimizer_state_bytes(optimizer)
            bar.update(1)
            bar.set_postfix(loss=f"{total_loss:.4f}", lr=f"{lr:.2e}")
            if plain and (step % config.log_every == 0 or step == 1 or step == config.steps):
                log(f"step {step}/{config.steps}  loss {total_loss:.4f}  lr {lr:.2e}  grad_norm {float(grad_norm):.3f}  "
                    f"{result.tokens_per_second:.0f} tok/s")
            if config.eval_every and step % config.eval_every == 0 and step != config.steps:
                run_eval(step)
                model.train()
    finally:
        bar.close()
    run_eval(config.steps)
    model.eval()
    result.peak_memory_bytes = peak_memory_bytes(device)
    return result
