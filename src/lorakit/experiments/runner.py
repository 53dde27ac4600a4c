"""Running the arms of an experiment: one recipe plus one change each, on a shared model load,
data split and zero-shot score.

An `Arm` is a recipe change (`{"lora": {"r": 4}}`, `{"lr": 5e-5}`, ...) plus, optionally, full
fine-tuning instead of LoRA or LoRA+ parameter groups. `Session.run(base, arm, folder)` trains
it exactly as `lorakit train` would (same seeds, same batches, same `lorakit.train.loop.train`,
same scoring), evaluates it on the recipe's held-out test split and returns a `RunResult`. What
`lorakit train` does besides (validation during training, the merge and reload checks, its
report) is left out to save time; for plain LoRA the trained weights and test numbers are the
ones `lorakit train` gives for the same recipe.

Prepared models (`lorakit.train.prepare.Prepared`) and the zero-shot score are shared by every arm
with the same model, data, split and scoring fields.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from ..inject import inject
from ..io import save_adapter
from ..merge import count_parameters
from ..quant.qera import CORRECTION_ADAPTER, fold_corrections
from ..state import get_state
from ..train import data as data_mod
from ..train.loop import LoopConfig, train
from ..train.prepare import Prepared, lora_config_for
from ..train.recipe import apply, load_recipe

# Fields that decide the model load, the data split and the scoring: arms that agree on them
# share one `Prepared` (and one zero-shot evaluation).
PREPARED_FIELDS = ("model", "task", "data", "text_field", "label_field", "prompt_field", "response_field",
                   "label_words",
                   "prompt_template", "test_size", "val_size", "split_seed", "max_length", "eval_batch_size", "seed",
                   "device", "precision", "threads", "quantize", "qera_rank", "calibration_size")


def _stderr(msg: str) -> None:
    print(f"[lorakit experiment] {msg}", file=sys.stderr, flush=True)


def load_average() -> list[float] | None:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


@dataclass
class Arm:
    """One configuration of an experiment.

    Attributes:
        label: the row name in the tables (also the run's folder name, slugged).
        changes: recipe changes applied on top of the experiment's base recipe and the
            user's overrides (`lora` entries are merged key by key).
        full_finetune: train every parameter of the model instead of injecting LoRA.
        loraplus_ratio: LoRA+ (`lorakit.loraplus_param_groups`): B's learning rate is
            `ratio` times the recipe's `lr` (A's).
        keep_model: keep the trained model on the result (`RunResult.model`).
    """

    label: str
    changes: dict[str, Any] = field(default_factory=dict)
    full_finetune: bool = False
    loraplus_ratio: float | None = None
    keep_model: bool = False


@dataclass
class RunResult:
    """What one arm gave. Times in seconds, memory in bytes, accuracy as a fraction."""

    label: str
    method: str  # "lora", "lora+", "full"
    recipe: dict[str, Any]
    metrics: dict[str, Any] | None = None  # the task's test metrics (accuracy, loss, n, ...)
    correct: list[bool] | None = None  # per test example, in split order
    trainable: int = 0
    total: int = 0
    steps: int = 0
    train_seconds: float = 0.0  # the optimisation loop only (wall time)
    train_cpu_seconds: float = 0.0  # CPU time of this process (all its threads) in the loop
    inject_seconds: float = 0.0  # inject (PiSSA: the SVDs) or making every parameter trainable
    eval_seconds: float = 0.0
    wall_seconds: float = 0.0
    tokens_per_second: float = 0.0
    optimizer_state_bytes: int = 0
    peak_memory_bytes: int = 0
    losses: list[float] = field(default_factory=list)
    load_average: dict[str, Any] = field(default_factory=dict)
    adapter_dir: str | None = None
    quantization: dict[str, Any] | None = None  # QLoRA arms: bits per parameter, the QERA correction's report
    error: str | None = None
    model: Any = None  # the trained model when the arm asked to keep it (not serialised)
    predictions: list | None = None  # per test example: the predicted label, or a loss-scored task's mean loss

    @property
    def accuracy(self) -> float | None:
        return None if self.metrics is None else self.metrics.get("accuracy")

    @property
    def step_seconds(self) -> float | None:
        return self.train_seconds / self.steps if self.steps and not self.error else None

    def to_dict(self, with_correct: bool = True) -> dict[str, Any]:
        lora = self.recipe.get("lora", {})
        out = {
            "label": self.label, "method": self.method, "error": self.error,
            "lora": None if self.method == "full" else lora, "lr": self.recipe.get("lr"), "steps": self.steps,
            "batch_size": self.recipe.get("batch_size"), "seed": self.recipe.get("seed"),
            "test": self.metrics, "trainable": self.trainable, "total": self.total,
            "trainable_percent": 100 * self.trainable / self.total if self.total else None,
            "train_seconds": self.train_seconds, "train_cpu_seconds": self.train_cpu_seconds,
            "step_seconds": self.step_seconds, "inject_seconds": self.inject_seconds,
            "eval_seconds": self.eval_seconds, "wall_seconds": self.wall_seconds,
            "tokens_per_second": self.tokens_per_second, "optimizer_state_bytes": self.optimizer_state_bytes,
            "peak_memory_bytes": self.peak_memory_bytes, "load_average": self.load_average,
            "first_loss": self.losses[0] if self.losses else None,
            "last_loss": self.losses[-1] if self.losses else None,
            "losses": self.losses, "adapter_dir": self.adapter_dir, "quantization": self.quantization,
        }
        if with_correct and self.correct is not None:
            out["correct"] = "".join("1" if c else "0" for c in self.correct)
        return out


class Session:
    """Prepared models, zero-shot scores and trained arms for one experiment run.

    Args:
        overrides: recipe changes from the command line (applied to every base recipe, before
            each arm's own changes).
        work: folder for the arms' adapters and the full analysis outputs.
    """

    def __init__(self, overrides: dict[str, Any] | None = None, work: str | Path = "runs/experiments",
                 log: Callable[[str], None] = _stderr):
        self.overrides = dict(overrides or {})
        self.work = Path(work)
        self.log = log
        self._prepared: dict[str, Any] = {}
        self._zero_shot: dict[str, tuple[dict, list[bool] | None, float]] = {}
        self.zero_shot_predictions: dict[str, list] = {}  # by `key(recipe)`: the base model's test predictions

    # ------------------------------------------------------------------ recipes
    def recipe(self, base: str, changes: dict[str, Any] | None = None):
        """`base` (a preset or recipe file) < the session's overrides < `changes`."""

        return apply(load_recipe(base, self.overrides), changes or {})

    def key(self, recipe) -> str:
        d = recipe.to_dict()
        return json.dumps({k: d[k] for k in PREPARED_FIELDS}, sort_keys=True, default=str)

    def prepared(self, recipe):
        """The `Prepared` model, tokenizer, task and split for `recipe` (shared by equal keys)."""

        key = self.key(recipe)
        if key not in self._prepared:
            self._prepared[key] = Prepared(recipe, self.log)
        return self._prepared[key]

    def zero_shot(self, recipe) -> tuple[dict[str, Any], list[bool] | None, float]:
        """`(test metrics, per-example correctness (None for a task without labels), seconds)` of the untouched
        base model; its predictions are kept in `zero_shot_predictions[key(recipe)]`."""
        key = self.key(recipe)
        if key not in self._zero_shot:
            prep = self.prepared(recipe)
            test = prep.splits.test
            self.log(f"zero-shot: evaluating the base model on {len(test)} held-out test examples")
            t = time.perf_counter()
            metrics, preds = prep.evaluate(prep.model, test)
            seconds = time.perf_counter() - t
            self._zero_shot[key] = (metrics, _correct(preds, test), seconds)
            self.zero_shot_predictions[key] = preds
            self.log(f"zero-shot: {_summary(metrics)} ({seconds:.0f} s)")
        return self._zero_shot[key]

    def release(self) -> None:
        """Forget the prepared models (their memory); zero-shot scores are kept. A later arm loads again."""
        self._prepared.clear()

    # ------------------------------------------------------------------ one arm
    def run(self, base: str, arm: Arm, folder: str | Path) -> RunResult:
        """Train and evaluate `arm` on top of recipe `base`; adapters are saved to `folder/<label>/adapter`.

        A run that fails in training (a NaN loss, say) is recorded with `error` set rather than
        stopping the experiment; bad input (an unknown target module, ...) raises.
        """


        recipe = self.recipe(base, arm.changes)
        prep = self.prepared(recipe)
        method = "full" if arm.full_finetune else ("lora+" if arm.loraplus_ratio else "lora")
        res = RunResult(arm.label, method, recipe.to_dict(), steps=recipe.steps)
        res.load_average["start"] = load_average()
        t_wall = time.perf_counter()
        self.log(f"--- {arm.label}: {method}, {recipe.steps} steps x {recipe.batch_size}, lr {recipe.lr:g}"
                 + ("" if arm.full_finetune else f", LoRA {_lora_text(recipe.lora)}"))

        t = time.perf_counter()
        model = prep.fresh_model(quantize=False)
        # QLoRA (recipe quantize: nf4): NF4 + double quantization, and the frozen QERA correction if qera_rank > 0
        res.quantization = prep.quantize(model, correct=True, log=self.log)
        if res.quantization is not None:
            res.quantization["seconds"] = time.perf_counter() - t
        t = time.perf_counter()
        if arm.full_finetune:
            for p in model.parameters():
                p.requires_grad_(True)
        else:
            config = lora_config_for(recipe, prep.source.name)  # arms sharing a Prepared differ in LoRA
            torch.manual_seed(recipe.seed)  # as lorakit train: the LoRA init depends on it
            inject(model, config)
        res.inject_seconds = time.perf_counter() - t
        res.trainable, res.total = count_parameters(model)
        self.log(f"{res.trainable:,} trainable of {res.total:,} parameters ({100 * res.trainable / res.total:.3f}%)")

        batch_iter = (prep.task.batch(ex, prep.device)
                      for ex in data_mod.batches(prep.splits.train, recipe.batch_size, recipe.seed))
        loop_cfg = LoopConfig(steps=recipe.steps, lr=recipe.lr, weight_decay=recipe.weight_decay,
                              warmup_steps=recipe.warmup_steps, schedule=recipe.schedule, grad_clip=recipe.grad_clip,
                              grad_accum=recipe.grad_accum, eval_every=0, log_every=max(1, min(10, recipe.steps // 4)),
                              loraplus_ratio=arm.loraplus_ratio or 0.0)
        torch.manual_seed(recipe.seed)
        cpu0 = time.process_time()
        try:
            result = train(model, prep.task.loss, batch_iter, loop_cfg, device=prep.device, dtype=prep.dtype,
                           evaluate=None, log=self.log)
        except ValueError as exc:  # the loop's NaN/inf guard
            res.error = str(exc)
            res.wall_seconds = time.perf_counter() - t_wall
            res.load_average["end"] = load_average()
            self.log(f"{arm.label}: training failed: {exc}")
            return res
        res.train_cpu_seconds = time.process_time() - cpu0
        res.train_seconds = result.train_seconds
        res.tokens_per_second = result.tokens_per_second
        res.optimizer_state_bytes = result.optimizer_state_bytes
        res.peak_memory_bytes = result.peak_memory_bytes
        res.losses = [h["loss"] for h in result.history]

        t = time.perf_counter()
        test = prep.splits.test
        res.metrics, res.predictions = prep.evaluate(model, test)
        res.correct = _correct(res.predictions, test)
        res.eval_seconds = time.perf_counter() - t
        if not arm.full_finetune:
            adapter_dir = Path(folder) / _slug(arm.label) / "adapter"
            if CORRECTION_ADAPTER in get_state(model).configs:  # as lorakit train: trained + correction, one adapter
                fold_corrections(model)
            save_adapter(model, adapter_dir)
            res.adapter_dir = str(adapter_dir)
        if arm.keep_model:
            res.model = model
        res.wall_seconds = time.perf_counter() - t_wall
        res.load_average["end"] = load_average()
        self.log(f"{arm.label}: {_summary(res.metrics)}; train {res.train_seconds:.0f} s "
                 f"({res.step_seconds:.2f} s/step), run {res.wall_seconds:.0f} s")
        return res


    # ------------------------------------------------------------------ step times
    def interleaved_step_times(self, base: str, arms: list[Arm], rounds: int = 3, steps: int = 3) -> dict[str, Any]:
        """Time optimizer steps of several arms in turn, `rounds` times, so that a change of the
        machine's load over time hits every arm alike.

        Each round builds every arm afresh (fresh base model, inject, optimizer), runs one untimed
        warm-up step and `steps` timed steps on the recipe's first batches, arm after arm. Returns
        `{"rounds", "steps", "arms": {label: {"step_seconds": median over rounds of the mean step
        time, "relative": median over rounds of (arm / first arm), "per_round": [...], and the same
        for the process's CPU time: "cpu_step_seconds", "cpu_relative", "cpu_per_round"}}}`. CPU time
        (all threads of this process) is what the step costs; wall time also counts waiting for other
        processes on a shared machine.
        """


        per_round: dict[str, list[float]] = {a.label: [] for a in arms}
        cpu_round: dict[str, list[float]] = {a.label: [] for a in arms}
        for rnd in range(rounds):
            for arm in arms:
                recipe = self.recipe(base, arm.changes)
                prep = self.prepared(recipe)
                model = prep.fresh_model()
                if arm.full_finetune:
                    for p in model.parameters():
                        p.requires_grad_(True)
                else:
                    torch.manual_seed(recipe.seed)
                    inject(model, recipe.lora_config())
                batch_iter = (prep.task.batch(ex, prep.device)
                              for ex in data_mod.batches(prep.splits.train, recipe.batch_size, recipe.seed))
                cfg = LoopConfig(steps=steps + 1, lr=recipe.lr, weight_decay=recipe.weight_decay,
                                 warmup_steps=recipe.warmup_steps,
                                 schedule=recipe.schedule, grad_clip=recipe.grad_clip, grad_accum=recipe.grad_accum,
                                 log_every=10**9, loraplus_ratio=arm.loraplus_ratio or 0.0)
                torch.manual_seed(recipe.seed)
                result = train(model, prep.task.loss, batch_iter, cfg, device=prep.device, dtype=prep.dtype,
                               log=lambda m: None)
                per_round[arm.label].append(sum(result.step_seconds[1:]) / steps)
                cpu_round[arm.label].append(sum(result.step_cpu_seconds[1:]) / steps)
                del model, result
            self.log(f"timing round {rnd + 1}/{rounds}: " + ", ".join(
                f"{k} {v[-1]:.2f} s/step ({cpu_round[k][-1]:.2f} s CPU)" for k, v in per_round.items()))
        first = arms[0].label
        out = {}
        for label, times in per_round.items():
            ratios = [t / f for t, f in zip(times, per_round[first])]
            cpu = cpu_round[label]
            cpu_ratios = [t / f for t, f in zip(cpu, cpu_round[first])]
            out[label] = {"step_seconds": statistics.median(times), "relative": statistics.median(ratios),
                          "per_round": times,
                          "cpu_step_seconds": statistics.median(cpu), "cpu_relative": statistics.median(cpu_ratios),
                          "cpu_per_round": cpu}
        return {"rounds": rounds, "steps": steps, "arms": out}


# ---------------------------------------------------------------------- statistics
def standard_error(p: float, n: int) -> float:
    """Binomial standard error of an accuracy `p` measured on `n` examples: `sqrt(p (1 - p) / n)`."""
    return math.sqrt(max(p * (1 - p), 0.0) / n) if n else float("nan")


def paired(reference: list[bool], other: list[bool]) -> dict[str, Any]:
    """Paired comparison of two classifiers on the same test examples (exact McNemar test).

    Returns `{"only_reference": b, "only_other": c, "delta_points": 100 (c - b) / n,
    "p_value": two-sided exact binomial p of b vs c}`: b examples only the reference gets
    right, c only the other.
    """
    if len(reference) != len(other):
        raise ValueError("paired comparison needs the same test examples")
    b = sum(r and not o for r, o in zip(reference, other))
    c = sum(o and not r for r, o in zip(reference, other))
    n = b + c
    if n == 0:
        p = 1.0
    else:
        k = min(b, c)
        p = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)
    return {"only_reference": b, "only_other": c, "delta_points": 100 * (c - b) / len(reference) if reference else 0.0,
            "p_value": p}


def t_two_sided_p(t: float, df: int) -> float:
    """Two-sided p-value `P(|T| >= |t|)` of Student's t distribution with `df` (integer >= 1) degrees of freedom.

    Closed form for integer `df` (Abramowitz & Stegun 26.7.3-26.7.4): with `theta = atan(|t| / sqrt(df))`,
    `P(|T| < |t|)` is `(2 / pi) (theta + sin(theta) cos(theta) sum_j c_j cos^(2j)(theta))` for odd `df` and
    `sin(theta) sum_j c_j cos^(2j)(theta)` for even `df`. Raises `ValueError` for `df < 1` or a NaN `t`.
    """
    if isinstance(df, bool) or not isinstance(df, int) or df < 1:
        raise ValueError(f"degrees of freedom must be an integer >= 1, got {df!r}")
    if t != t:
        raise ValueError("t is NaN")
    if math.isinf(t):
        return 0.0
    theta = math.atan(abs(t) / math.sqrt(df))
    c2, s = math.cos(theta) ** 2, math.sin(theta)
    if df % 2:
        term, total = 1.0, 1.0 if df > 1 else 0.0
        for j in range(1, (df - 1) // 2):  # 1 + (2/3) c2 + (2*4)/(3*5) c2^2 + ...
            term *= c2 * (2 * j) / (2 * j + 1)
            total += term
        inside = 2 / math.pi * (theta + s * math.cos(theta) * total)
    else:
        term, total = 1.0, 1.0
        for j in range(1, df // 2):  # 1 + (1/2) c2 + (1*3)/(2*4) c2^2 + ...
            term *= c2 * (2 * j - 1) / (2 * j)
            total += term
        inside = s * total
    return min(1.0, max(0.0, 1.0 - inside))


def t_quantile(p: float, df: int) -> float:
    """The `t > 0` with two-sided `t_two_sided_p(t, df) == 1 - p` (e.g. `p=0.95`: the 95% interval's half-width
    in standard errors), by bisection to 1e-12. Raises `ValueError` unless `0 < p < 1`."""
    if not 0 < p < 1:
        raise ValueError(f"p must be in (0, 1), got {p!r}")
    lo, hi = 0.0, 1.0
    while t_two_sided_p(hi, df) > 1 - p:
        hi *= 2
    while hi - lo > 1e-12 * max(1.0, hi):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_two_sided_p(mid, df) > 1 - p else (lo, mid)
    return (lo + hi) / 2


def paired_t(differences: list[float], confidence: float = 0.95) -> dict[str, Any]:
    """Paired t-test of per-seed differences (arm minus reference, same seed), H0: mean difference 0.

    Returns `{"n", "mean", "sd" (sample, n - 1), "se", "t", "df", "p_value" (two-sided), "ci": [lo, hi]
    (the `confidence` interval of the mean), "sign_flip_p"}`; `sign_flip_p` is the exact two-sided
    sign-flip permutation p (all `2^n` sign patterns; no normality assumed; None above 20 differences).
    With fewer than 2 differences, or all differences equal, the t fields are None (a zero spread gives no t).
    Raises `ValueError` for an empty list.
    """
    n = len(differences)
    if n == 0:
        raise ValueError("paired_t needs at least one difference")
    mean_d = statistics.fmean(differences)
    out: dict[str, Any] = {"n": n, "mean": mean_d, "sd": None, "se": None, "t": None, "df": n - 1, "p_value": None,
                           "ci": None, "sign_flip_p": _sign_flip_p(differences)}
    if n < 2:
        return out
    sd = statistics.stdev(differences)
    if sd == 0:
        out["sd"] = out["se"] = 0.0
        return out
    se = sd / math.sqrt(n)
    t = mean_d / se
    half = t_quantile(confidence, n - 1) * se
    out.update(sd=sd, se=se, t=t, p_value=t_two_sided_p(t, n - 1), ci=[mean_d - half, mean_d + half])
    return out


def _sign_flip_p(differences: list[float]) -> float | None:
    if len(differences) > 20:  # 2^n sign patterns
        return None
    observed = abs(sum(differences))
    n = len(differences)
    hits = sum(abs(sum(d if (mask >> i) & 1 else -d for i, d in enumerate(differences))) >= observed - 1e-12
               for mask in range(2 ** n))
    return hits / 2 ** n


# ---------------------------------------------------------------------- helpers
def _correct(preds: list, examples: list[dict]) -> list[bool] | None:
    """Per example, whether the prediction is its label; None for a task without labels (instruct, text)."""
    if not examples or "label" not in examples[0]:
        return None
    return [p == e["label"] for p, e in zip(preds, examples)]


def _summary(metrics: dict[str, Any]) -> str:
    keys = [k for k in ("accuracy", "loss") if k in metrics]
    return ", ".join(f"{k} {metrics[k]:.4f}" for k in keys) + f" (n={metrics['n']})"


def _lora_text(lora: dict[str, Any]) -> str:
    parts = [f"r={lora.get('r')}", f"alpha={lora.get('alpha')}", f"targets={lora.get('target_modules')}"]
    for key in ("rank_pattern", "use_rslora", "use_dora", "init"):
        if lora.get(key):
            parts.append(f"{key}={lora[key]}")
    return " ".join(parts)


def _slug(name: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9_.=+-]+", "_", name).strip("_") or "run"
