"""The run's report: `report.json` (everything), `report.md` (for people), `loss.png` (curves)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..fileio import atomic_write_text
from .recipe import PRESETS
from .truncation import truncation_message

PRESET_NAMES = tuple(PRESETS)


def write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def plot_loss(path: Path, history: list[dict], evals: list[dict], title: str) -> None:
    """Training loss per step (and its running mean) plus validation loss at each evaluation."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    steps = [h["step"] for h in history]
    losses = [h["loss"] for h in history]
    ax.plot(steps, losses, color="#9bb7d4", lw=1, label="train loss (per step)")
    if len(losses) >= 5:
        k = max(2, len(losses) // 10)
        windows = [losses[max(0, i - k + 1): i + 1] for i in range(len(losses))]
        smooth = [sum(w) / len(w) for w in windows]
        ax.plot(steps, smooth, color="#1f5a96", lw=2, label=f"train loss (mean of {k})")
    ev = [(e["step"], e["loss"]) for e in evals if "loss" in e]
    if ev:
        ax.plot([s for s, _ in ev], [v for _, v in ev], "o-", color="#d9480f", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _memory_text(m: dict | None) -> str:
    """How the step's memory was kept down (`lorakit.train.memory`, `lorakit.ops.loss`, packing)."""
    if not m:
        return ""
    gc = m["gradient_checkpointing"]
    text = f" (activation checkpointing {'on' if gc['enabled'] else 'off'}: {gc['mode']}; {m['loss']}"
    text += f"; {m['attention']} attention" if m.get("attention") else ""
    pad = m.get("padding")
    if pad:
        text += (f"; padding {100 * pad['padding']:.1f}% of the batches' tokens"
                 + (f", {100 * pad['padding_before']:.1f}% without packing" if pad["packing"] else ""))
    return text + ")"


def _coverage_lines(v: dict | None) -> list[str]:
    """The adapter's coverage and size of update (`lorakit.verify.static_checks`), as report lines."""
    if not v:
        return []
    shares = ", ".join(f"{k} {100 * c['share']:.0f}%" for k, c in v["coverage"].items() if k != "all")
    lines = [f"- coverage of the linear parameters by kind: {shares} (`lorakit verify` for the full check)"]
    if v.get("rel_norm"):
        n = v["rel_norm"]
        lines.append(f"- update size ||W - W0|| / ||W0|| per module: median {n['median']:.3g} "
                     f"(min {n['min']:.3g}, max {n['max']:.3g})")
    if v["no_op"] or v["zero_b"]:
        lines.append(f"- **warning**: {'a no-op adapter' if v['no_op'] else str(len(v['zero_b'])) + ' modules'} "
                     "with B still zero")
    return lines


def run_title(report: dict[str, Any]) -> str:
    """What the run was, named after its task and data (not the preset it started from)."""
    rec, data = report["recipe"], Path(str(report["data"]["name"])).name
    title = f"{rec['task']} on {data}"
    return title if rec["name"] in PRESET_NAMES else f"{title} ({rec['name']})"  # a name the user chose


def _pct(a: dict[str, Any]) -> str:
    return f"{100 * a['accuracy']:.1f}% (95% CI {100 * a['ci95'][0]:.1f}-{100 * a['ci95'][1]:.1f}%, n={a['n']})"


def _stats_lines(st: dict[str, Any] | None) -> list[str]:
    """Baseline, intervals, predicted counts, confusion matrix and warnings of a classification run."""
    if not st:
        return []
    base = st["majority_baseline"]
    lines = ["### What the accuracy means", "",
             f"- always answering the majority class `{base['label']}`: {_pct(base)}"]
    lines += [f"- {form}: {_pct(a)}" for form, a in st["accuracy"].items()]
    if "gain" in st:
        g = st["gain"]
        lines.append(f"- gain {100 * g['gain']:+.1f} points, 95% CI {100 * g['ci95'][0]:+.1f} to "
                     f"{100 * g['ci95'][1]:+.1f} (paired, Newcombe): {g['gained']} examples wrong -> right, "
                     f"{g['lost']} right -> wrong")
    forms = list(st["predicted_counts"])
    lines += ["", "| label | in the test split | " + " | ".join(f"predicted {f}" for f in forms) + " |",
              "|---|---|" + "---|" * len(forms)]
    lines += [f"| `{label}` | {st['gold_counts'][label]} | "
              + " | ".join(str(st["predicted_counts"][f][label]) for f in forms) + " |" for label in st["labels"]]
    if "after" in st["confusion"]:
        lines += ["", "Confusion matrix after training (rows: true label, columns: predicted):", "",
                  "| | " + " | ".join(f"`{label}`" for label in st["labels"]) + " |",
                  "|---|" + "---|" * len(st["labels"])]
        lines += [f"| `{label}` | " + " | ".join(map(str, row)) + " |"
                  for label, row in zip(st["labels"], st["confusion"]["after"])]
    lines.append("")
    lines += [f"> **Warning:** {w}" for w in st["warnings"]] + ([""] if st["warnings"] else [])
    return lines


def markdown(report: dict[str, Any]) -> str:
    """A short human-readable summary of `report`."""
    r = report
    rec = r["recipe"]
    lines = [f"# lorakit train: {run_title(r)}", ""]
    lines += [f"Model `{r['model']['name']}` ({r['model']['parameters']:,} parameters), task `{rec['task']}`, "
              f"data `{r['data']['name']}` (train {r['data']['sizes']['train']}, validation "
              f"{r['data']['sizes']['val']}, "
              f"held-out test {r['data']['sizes']['test']}; split seed {rec['split_seed']}).", ""]
    cut = truncation_message(r["truncation"]) if r.get("truncation") else None
    lines += [f"**Truncated:** {cut.removeprefix('truncation: ')}.", ""] if cut else []
    lines += ["## Held-out test split", "", "| model | " + " | ".join(r["metric_names"]) + " |",
              "|---|" + "---|" * len(r["metric_names"])]
    k, n = r["checks"].get("merged_examples"), r["data"]["sizes"]["test"]
    merged_label = "after, merged (merge_and_unload)" + (f", first {k} of {n} examples" if k and k < n else "")
    for label, key in (("before training (base model)", "before"), ("after LoRA training", "after"),
                       (merged_label, "merged")):
        if key in r["test"]:
            lines.append(f"| {label} | " + " | ".join(_fmt(r["test"][key].get(m)) for m in r["metric_names"]) + " |")
    lines.append("")
    if "gain_points" in r:
        gain = r["test"].get("stats", {}).get("gain")
        ci = f" (95% CI {100 * gain['ci95'][0]:+.1f} to {100 * gain['ci95'][1]:+.1f}, paired)" if gain else ""
        lines += [f"Accuracy gain: **{r['gain_points']:+.1f} points**{ci}.", ""]
    lines += _stats_lines(r["test"].get("stats"))
    lora = r["lora"]
    lines += ["## LoRA", "",
              f"- r={lora['config']['r']}, alpha={lora['config']['lora_alpha']}, target modules: `{lora['targets']}` "
              f"({lora['adapted_modules']} modules)" + (f", modules_to_save: `{lora['config']['modules_to_save']}`"
                                                          if lora['config'].get('modules_to_save') else ""),
              f"- trainable parameters: {lora['trainable']:,} of {lora['total']:,} ({lora['trainable_percent']:.3f}%)",
              f"- adapter: `{r['adapter']['path']}` ({r['adapter']['bytes']:,} bytes, PEFT layout)", ""]
    q, bw = r.get("quantization"), r.get("base_weights")
    if q and bw:  # QLoRA run (recipe quantize: nf4)
        lines += ["## 4-bit base (QLoRA)", "",
                  f"- {q['layers']} linear layers in NF4{' with double quantization' if q['double_quant'] else ''}: "
                  f"{q['bits_per_param']:.4f} bits/param, {_mib(bw['linear_bytes'])} resident "
                  f"(bf16: {_mib(bw['linear_bf16_bytes'])}, {bw['linear_bf16_ratio']:.2f}x smaller); "
                  f"all base weights {_mib(bw['total_bytes'])}"]
        if q.get("merge"):
            lines.append(f"- merge (dequantize + delta in float32 -> {q['merge']['dtype']}): max |rounding error| "
                         f"{q['merge']['max_abs_error']:.3g}, RMS {q['merge']['rms_error']:.3g} (update RMS "
                         f"{q['merge']['delta_rms']:.3g})")
        lines.append("")
    c = r["checks"]
    merged = (f"- merged vs unmerged logits: max |diff| = {c['merged_vs_unmerged_max_abs_diff']:.3g}; "
              f"{c.get('merged_compared', 'test predictions')} identical: {c['merged_predictions_equal']} "
              f"({c['merged_prediction_differences']} differ)") if c.get("merged_predictions_equal") is not None \
        else "- merged model: not checked (--no-merge-check)"
    lines += ["## Checks", "", merged,
              f"- saved adapter reloaded into a fresh base model: max |logit diff| = "
              f"{c['reload_max_abs_diff']:.3g}"]
    lines += _coverage_lines(r.get("verify")) + [""]
    t = r["training"]
    lines += ["## Training", "",
              f"- {t['steps']} steps x {rec['batch_size']} examples x {rec['grad_accum']} accumulation, max "
              f"{rec['max_length']} tokens, "
              f"AdamW lr {rec['lr']:g} ({rec['schedule']}, warmup {rec['warmup_steps']}), grad clip "
              f"{rec['grad_clip']:g}, seed {rec['seed']}",
              f"- loss: first step {t['first_loss']:.4f}, last step {t['last_loss']:.4f}; validation loss "
              f"{t['val_loss_before']:.4f} -> {t['val_loss_after']:.4f}",
              f"- {t['tokens']:,} tokens in {t['train_seconds']:.1f} s = {t['tokens_per_second']:.0f} tokens/s "
              f"on {r['environment']['device']} ({r['environment']['precision']}, {r['environment']['threads']} "
              "threads)",
              f"- optimizer state: {_mib(t['optimizer_state_bytes'])}; peak memory: {_mib(t['peak_memory_bytes'])}"
              + _memory_text(r.get("memory")),
              f"- wall time: {r['timings']['total_seconds']:.0f} s " +
              "(" + ", ".join(f"{k.replace('_seconds', '')} {v:.0f} s" for k, v in r["timings"].items()
                              if k != "total_seconds") + ")", "",
              "![loss](loss.png)", ""]
    if r.get("samples"):
        lines += ["## Sample answers (held-out prompts, greedy, at most 32 new tokens)", ""]
        for s in r["samples"]:
            lines += [f"**Q:** {' '.join(s['prompt'].split())}", ""]
            for key in ("before", "after", "reference"):
                lines += [f"{key}:", "", "~~~text", s[key].replace("~~~", "~ ~ ~"), "~~~", ""]
    lines += ["Reproduce the test numbers from the saved files alone:", "",
              f"    lorakit eval --adapter {r['adapter']['path']}", ""]
    return "\n".join(lines)


def write_report(out: Path, report: dict[str, Any], history: list[dict], evals: list[dict]) -> None:
    """Write `report.json`, `report.md` and `loss.png` into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    plot_loss(out / "loss.png", history, evals,
              f"{run_title(report)}: {Path(report['model']['name']).name}, LoRA r={report['lora']['config']['r']}")
    write_json(out / "report.json", report)
    atomic_write_text(out / "report.md", markdown(report))
