"""LoRA vs full fine-tuning on the encoder recipe (LoRA paper §4.2, §5, §7).

`sentiment-minilm` (all-MiniLM-L6-v2 + a fresh classification head, Rotten Tomatoes) is trained
once with its LoRA (r=8 on query + value, the head through `modules_to_save`) and once per
learning rate with every parameter trainable (full fine-tuning; BERT-style learning rates, since
the LoRA rate 1e-3 is far too large for a full fine-tune). Same steps, batches, seed and head
initialisation. Reported: test accuracy, trainable parameters, AdamW state bytes (measured from
the optimiser), time per step, and, with `lorakit.analysis`, the spectrum of each full
fine-tune's update `W_ft - W0` of the attention matrices: how low-rank is the update that full
fine-tuning finds, and how much of it would a rank-r adapter hold?
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

import torch

from ..errors import UsageError
from .common import Clock, base_results, by_type, cumulative_energy, mean, work_folder
from .report import (PAIRED_NOTE, accuracy_cell, colors, figure, header, md_table, mib, num, paired_cell, pct,
                     plot_accuracy, plot_losses, save, setup_text, write)
from .runner import Arm, RunResult, Session
from ..analysis import analyze_adapter, grassmann_similarity, load_factors, lowrank_svd, spectrum, write_report

NAME = "full-vs-lora"
BASE = "sentiment-minilm"
HELP = ("LoRA vs full fine-tuning on the MiniLM encoder recipe: accuracy, parameters, optimizer state, step time, "
        "spectrum of W_ft - W0")
TITLE = "LoRA vs full fine-tuning (encoder recipe)"
DEFAULT_FULL_LRS = "2e-5,5e-5,1e-4"
TIMED_STEPS = 5
# attention projections: BERT (query, key, value, attention.output.dense) and Llama (q/k/v/o_proj)
ATTENTION = re.compile(r"(attention\.self\.(query|key|value)|attention\.output\.dense|self_attn\.[qkvo]_proj)$")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--full-lrs", default=DEFAULT_FULL_LRS, metavar="LR,...",
                   help="learning rates of the full fine-tunes (default %(default)s)")
    p.add_argument("--timing-rounds", type=int, default=3, metavar="N",
                   help="rounds of interleaved step timing, LoRA vs full (default %(default)s; 0: none)")


def _floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"--full-lrs must be comma-separated numbers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise UsageError(f"--full-lrs must be numbers > 0, got {text!r}")
    return values


def run(session: Session, args: argparse.Namespace, out: Path, command: str) -> dict[str, Any]:

    lrs = _floats(getattr(args, "full_lrs", DEFAULT_FULL_LRS))
    clock = Clock()
    recipe = session.recipe(BASE)
    prep = session.prepared(recipe)
    zero = session.zero_shot(recipe)
    work = work_folder(session, NAME)
    lora_run = session.run(BASE, Arm("LoRA"), work)
    full_runs = [session.run(BASE, Arm(f"full, lr {lr:g}", {"lr": lr}, full_finetune=True, keep_model=True),
                             work) for lr in lrs]
    runs = [lora_run, *full_runs]
    rounds = getattr(args, "timing_rounds", 3)
    timing = None
    if rounds > 0:
        session.log("interleaved step timing, LoRA vs full fine-tuning")
        arms = [Arm("LoRA"), Arm(full_runs[0].label, {"lr": lrs[0]}, full_finetune=True)]
        timing = session.interleaved_step_times(BASE, arms, rounds=1 if args.quick else rounds,
                                                steps=1 if args.quick else TIMED_STEPS)

    base_state = {k: v.detach() for k, v in prep.model.state_dict().items()}
    attention = [p for p, m in prep.model.named_modules() if isinstance(m, torch.nn.Linear) and ATTENTION.search(p)]
    updates: dict[str, Any] = {}
    lora_analysis = None
    for run_ in full_runs:
        if run_.error:
            continue
        session.log(f"analysing W_ft - W0 of {run_.label} ({len(attention)} attention matrices)")
        ft_state = {k: v.detach() for k, v in run_.model.state_dict().items()}
        entry = {"modules": _full_update_spectra(attention, base_state, ft_state), "analysis": None}
        if lora_run.adapter_dir and not lora_run.error:
            # lorakit.analysis full-finetune support: the LoRA-adapted modules, W_ft - W0 next to the adapter
            analysis = analyze_adapter(lora_run.adapter_dir, base=base_state, full_finetune=ft_state, intruders=True)
            write_report(analysis, work / f"analysis_{_slug(run_.label)}", max_heatmaps=0)
            entry["analysis"] = {p: {"energy_at_adapter_rank": m["energy_at_adapter_rank"], "adapter_r": m["adapter_r"]}
                                 for p, m in analysis["full_finetune"]["modules"].items()}
            entry["overlap"] = _overlap(lora_run.adapter_dir, base_state, ft_state)
            entry["intruders"] = {"lora": next(iter(analysis["intruders"]["adapters"].values())),
                                  "full": analysis["intruders"]["full_finetune"]}
            lora_analysis = analysis
        updates[run_.label] = entry
        run_.model = None  # free it
    lora_spectra = None
    if lora_analysis is not None:
        lora_spectra = {p: m["spectrum"] for p, m in lora_analysis["adapters"][0]["modules"].items()}
    random = _random_spectrum(prep.model, attention)

    results = base_results(NAME, command, clock, session, recipe, zero, runs)
    results["full_lrs"] = lrs
    results["timing"] = timing
    results["updates"] = {label: {"per_type": _per_type(e["modules"], base_state),
                                  "energy_at_adapter_rank": e["analysis"],
                                  "overlap": e.get("overlap"), "intruders": e.get("intruders")}
                          for label, e in updates.items()}
    results["lora_update"] = None if lora_spectra is None else _per_type(lora_spectra, base_state)
    results["random_gaussian"] = random
    images = {
        "accuracy": plot_accuracy(runs, zero[0].get("accuracy"), out / "accuracy.png",
                                  f"test accuracy after {recipe.steps} steps", ""),
        "loss": plot_losses(runs, out / "loss.png", "training loss"),
    }
    if updates:
        images["spectrum"] = _plot_spectra(results, out / "full_ft_spectrum.png", recipe.lora["r"])
    results["images"] = images
    write(out, results, _markdown(results, runs, lora_run, recipe, images, work))
    return results


# ---------------------------------------------------------------------- analysis
def _full_update_spectra(paths: list[str], base: dict, ft: dict) -> dict[str, dict]:
    """`lorakit.analysis.spectrum(W_ft - W0)` of each attention matrix (every singular value kept)."""

    return {p: spectrum(ft[p + ".weight"] - base[p + ".weight"]) for p in paths}


def _per_type(spectra: dict[str, dict], base: dict) -> dict[str, dict]:
    out = {}
    for kind, mods in by_type(spectra).items():
        specs = list(mods.values())
        w0 = [float(base[p + ".weight"].double().norm()) for p in mods]
        ks = sorted({k for s in specs for k in s["energy_top_k"]}, key=int)
        out[kind] = {
            "layers": len(specs), "shape": list(base[next(iter(mods)) + ".weight"].shape),
            "delta_fro_mean": mean([s["frobenius_norm"] for s in specs]), "w0_fro_mean": mean(w0),
            "relative_change_mean": mean([s["frobenius_norm"] / w for s, w in zip(specs, w0)]),
            "energy_top_k_mean": {k: mean([s["energy_top_k"].get(k) for s in specs]) for k in ks},
            "rank_90_mean": mean([s["rank_90"] for s in specs]), "rank_99_mean": mean([s["rank_99"] for s in specs]),
            "effective_rank_mean": mean([s["effective_rank"] for s in specs]),
            "stable_rank_mean": mean([s["stable_rank"] for s in specs]),
            "cumulative_energy_mean": _mean_curve([cumulative_energy(s["singular_values"], s["frobenius_norm"] ** 2)
                                                   for s in specs]),
            "sigma_ratio_mean": _mean_curve([[v / s["singular_values"][0] for v in s["singular_values"]]
                                             for s in specs]),
        }
    return out


def _mean_curve(curves: list[list[float]]) -> list[float]:
    n = min(len(c) for c in curves)
    return [mean([c[i] for c in curves]) for i in range(n)]


def _overlap(adapter_dir: str, base: dict, ft: dict) -> dict[str, Any]:
    """phi between the LoRA update's r directions and the full fine-tune update's top-r directions.

    Output side: left-singular vectors (`(out, r)`), input side: right-singular vectors; phi(r, r)
    is the mean squared cosine of the principal angles between the two r-dim subspaces (chance r / d).
    """

    factors = load_factors(adapter_dir)
    out: dict[str, Any] = {}
    for path, mod in factors.modules.items():
        U, S, Vh = lowrank_svd(mod.B, mod.A, mod.scaling)
        k = int((S > 0).sum())
        Uf, _, Vhf = torch.linalg.svd((ft[path + ".weight"] - base[path + ".weight"]).double(), full_matrices=False)
        phi_out = grassmann_similarity(U[:, :k], Uf[:, :k])
        phi_in = grassmann_similarity(Vh[:k].T, Vhf[:k].T)
        out[path] = {"r": k, "phi_out": float(phi_out[-1, -1]), "phi_in": float(phi_in[-1, -1]),
                     "phi_out_1_1": float(phi_out[0, 0]), "phi_in_1_1": float(phi_in[0, 0]),
                     "chance_out": k / U.shape[0], "chance_in": k / Vh.shape[1]}
    summary = {}
    for kind, mods in by_type(out).items():
        vals = list(mods.values())
        summary[kind] = {key: mean([v[key] for v in vals]) for key in vals[0]}
    return {"per_module": out, "per_type": summary}


def _random_spectrum(model, paths: list[str]) -> dict[str, Any]:
    """Spectrum of a Gaussian random matrix of the first attention matrix's shape (seed 0): the full-rank reference."""

    shape = tuple(dict(model.named_modules())[paths[0]].weight.shape) if paths else (384, 384)
    gen = torch.Generator().manual_seed(0)
    s = spectrum(torch.randn(shape, generator=gen, dtype=torch.float64))
    return {"shape": list(shape), "energy_top_k": s["energy_top_k"], "rank_90": s["rank_90"], "rank_99": s["rank_99"],
            "effective_rank": s["effective_rank"], "stable_rank": s["stable_rank"],
            "cumulative_energy": cumulative_energy(s["singular_values"])}


# ---------------------------------------------------------------------- figure
def _plot_spectra(results: dict, path: Path, r: int) -> str:
    updates = results["updates"]
    kinds = sorted({k for u in updates.values() for k in u["per_type"]})
    ncols = 2 if len(kinds) == 4 else len(kinds)
    nrows = (len(kinds) + ncols - 1) // ncols
    fig = figure(5.0 * ncols, 3.6 * nrows + 0.4)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    cols = colors(len(updates) + 1)
    for ax, kind in zip(axes, kinds):
        for (label, u), c in zip(updates.items(), cols):
            curve = u["per_type"].get(kind, {}).get("cumulative_energy_mean")
            if curve:
                ax.plot(range(1, len(curve) + 1), curve, color=c, lw=1.5, label=f"W_ft - W0, {label}")
        lora = (results.get("lora_update") or {}).get(kind)
        if lora:
            curve = lora["cumulative_energy_mean"]
            ax.plot(range(1, len(curve) + 1), curve, "o-", ms=3, color=cols[-1], label="LoRA delta_weight")
        rnd = results["random_gaussian"]["cumulative_energy"]
        ax.plot(range(1, len(rnd) + 1), rnd, color="gray", ls="--", lw=1, label="Gaussian random matrix")
        ax.axvline(r, color="black", ls=":", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set(xlabel="k (top singular values)", ylabel="energy share E(k), mean over layers", ylim=(0, 1.02),
               title=kind)
        ax.legend(fontsize=6, loc="lower right")
    fig.suptitle(f"spectrum of the update per attention matrix (dotted line: LoRA rank r={r})")
    return save(fig, path)


# ---------------------------------------------------------------------- report
def _markdown(results: dict, runs: list[RunResult], lora_run: RunResult, recipe, images: dict, work: Path) -> str:
    r = recipe.lora["r"]
    lines = [header(TITLE, __doc__.split("\n\n", 1)[1].strip().replace("\n", " "), results)]
    lines.append(setup_text(results["recipe"], results["zero_shot"], results["data"]["sizes"]))
    lines += ["The zero-shot row is the base encoder with a freshly initialised (untrained) head.", "",
              "## LoRA vs full fine-tuning", ""]
    rows = []
    for run in runs:
        rows.append([run.label, f"{run.recipe['lr']:g}",
                     f"{run.trainable:,} ({pct(run.trainable / run.total, 2) if run.total else 'n/a'})",
                     f"{run.optimizer_state_bytes:,} ({mib(run.optimizer_state_bytes)})" if not run.error else "n/a",
                     num(run.step_seconds) if run.step_seconds else "n/a",
                     num(run.train_cpu_seconds / run.steps) if run.step_seconds else "n/a",
                     f"{run.tokens_per_second:,.0f}" if not run.error else "n/a", accuracy_cell(run),
                     paired_cell(lora_run, run)])
    lines.append(md_table(["method", "lr", "trainable parameters", "AdamW state bytes", "s / step", "CPU s / step",
                           "tokens / s",
                           "test accuracy", "vs LoRA (paired)"], rows))
    full = [x for x in runs if x.method == "full" and not x.error]
    if full and not lora_run.error and lora_run.optimizer_state_bytes:
        f = full[0]
        lines += ["", f"Full fine-tuning trains {f.trainable / lora_run.trainable:.0f}x the parameters and keeps "
                  f"{f.optimizer_state_bytes / lora_run.optimizer_state_bytes:.0f}x the optimizer state of LoRA "
                  f"(8 bytes per trainable parameter: AdamW's two float32 moments). Step times over the whole runs: "
                  + ", ".join(f"{x.label} {x.step_seconds / lora_run.step_seconds:.2f}x LoRA in wall time, "
                              f"{x.train_cpu_seconds / lora_run.train_cpu_seconds:.2f}x in CPU time"
                              for x in full) + "."]
        t = results.get("timing")
        if t:
            a = t["arms"]
            lines += ["",
                      f"Interleaved timing ({t['rounds']} rounds; each round builds LoRA and the full fine-tune afresh "
                      f"and times {t['steps']} steps of each after one warm-up step, so that a change of the "
                      "machine's load "
                      f"hits both alike): LoRA {a['LoRA']['step_seconds']:.3f} s/step "
                      f"({a['LoRA']['cpu_step_seconds']:.3f} s "
                      f"CPU time), full fine-tuning {a[f.label]['step_seconds']:.3f} s/step "
                      f"({a[f.label]['cpu_step_seconds']:.3f} s "
                      f"CPU time); ratio {a[f.label]['relative']:.2f}x in wall time, "
                      f"{a[f.label]['cpu_relative']:.2f}x in CPU "
                      "time (medians over rounds)."]
    lines += ["", PAIRED_NOTE, "", f"![accuracy]({images['accuracy']})", "", f"![loss]({images['loss']})", ""]

    if results["updates"]:
        lines += _spectrum_section(results, r, images)
        lines += _intruders_section(results)
    lines += ["## Files", "", "`results.json` holds every number above, the loss curves and per-example correctness; "
              f"the LoRA adapter and the full `lorakit.analysis` reports are in `{work}` (not committed).", ""]
    return "\n".join(lines)


def _spectrum_section(results: dict, r: int, images: dict) -> list[str]:
    """The report's section on the spectrum of the full fine-tune's update (and LoRA's overlap with it)."""
    lines: list[str] = []
    rnd = results["random_gaussian"]
    lines += ["## Spectrum of the full fine-tune's update W_ft - W0 (attention matrices)", "",
              f"Means over the {next(iter(next(iter(results['updates'].values()))['per_type'].values()))['layers']} "
              "layers, from `lorakit.analysis.spectrum` (all singular values). top-k: share of `||W_ft - W0||_F^2` in "
              "the k largest singular values, i.e. what the best rank-k matrix could hold; rank 90% / 99%: singular "
              "values "
              "needed for that share; effective rank (Roy & Vetterli). Last rows: LoRA's own update (rank "
              f"{r}) and a Gaussian random {rnd['shape'][0]}x{rnd['shape'][1]} matrix (a full-rank reference).", ""]
    ks = [k for k in ("1", "8", "32", "128") if k in rnd["energy_top_k"]]
    if str(r) not in ks and str(r) in rnd["energy_top_k"]:
        ks.insert(1, str(r))
    rows = []
    for label, u in results["updates"].items():
        for kind, s in u["per_type"].items():
            rows.append([label, kind, f"{s['shape'][0]}x{s['shape'][1]}", num(s["delta_fro_mean"]),
                         pct(s["relative_change_mean"], 2)]
                        + [pct(s["energy_top_k_mean"].get(k)) for k in ks]
                        + [num(s["rank_90_mean"], 3), num(s["rank_99_mean"], 3), num(s["effective_rank_mean"], 3),
                           num(s["stable_rank_mean"], 3)])
    for kind, s in (results.get("lora_update") or {}).items():
        rows.append([f"LoRA (r={r})", kind, f"{s['shape'][0]}x{s['shape'][1]}", num(s["delta_fro_mean"]),
                     pct(s["relative_change_mean"], 2)]
                    + [pct(s["energy_top_k_mean"].get(k, 1.0 if int(k) >= r else None)) for k in ks]
                    + [num(s["rank_90_mean"], 3), num(s["rank_99_mean"], 3), num(s["effective_rank_mean"], 3),
                       num(s["stable_rank_mean"], 3)])
    rows.append(["Gaussian random", "-", f"{rnd['shape'][0]}x{rnd['shape'][1]}", "-", "-"]
                + [pct(rnd["energy_top_k"].get(k)) for k in ks]
                + [str(rnd["rank_90"]), str(rnd["rank_99"]), num(rnd["effective_rank"], 3), num(rnd["stable_rank"], 3)])
    lines.append(md_table(["update", "matrix", "shape", "‖ΔW‖_F", "‖ΔW‖_F / ‖W0‖_F"] + [f"top-{k}" for k in ks]
                          + ["rank 90%", "rank 99%", "effective rank", "stable rank"], rows))
    lines += ["", f"![spectrum]({images['spectrum']})", ""]
    overlaps = {label: u["overlap"] for label, u in results["updates"].items() if u.get("overlap")}
    if overlaps:
        lines += ["### Does LoRA find the full fine-tune's directions? (extension, not in the paper)", "",
                  f"φ({r}, {r}) between the {r} directions of the LoRA update and the top-{r} singular directions of "
                  f"W_ft - W0 (`lorakit.analysis.grassmann_similarity`; 1 = the same subspace, chance {r}/d), on the "
                  "output side (left-singular vectors) and the input side (right-singular vectors), mean over layers; "
                  "φ(1, 1) compares the two top directions.", ""]
        rows = []
        for label, o in overlaps.items():
            for kind, s in o["per_type"].items():
                rows.append([label, kind, f"{s['phi_out']:.3f}", f"{s['phi_in']:.3f}", f"{s['phi_out_1_1']:.3f}",
                             f"{s['phi_in_1_1']:.3f}", f"{s['chance_out']:.3f}"])
        lines.append(md_table(["full fine-tune", "matrix", f"φ({r},{r}) output side", f"φ({r},{r}) input side",
                               "φ(1,1) output", "φ(1,1) input", "chance φ(r,r)"], rows))
        lines.append("")
    return lines


def _intruders_section(results: dict) -> list[str]:
    """Intruder dimensions (Shuttleworth et al. 2024) of W0 + LoRA's update and of each full fine-tune."""
    found = {label: u["intruders"] for label, u in results["updates"].items() if u.get("intruders")}
    if not found:
        return []
    lines = ["## Intruder dimensions: LoRA vs full fine-tuning (Shuttleworth et al. 2024, arXiv:2410.21228)", "",
             "Among the top 10 left-singular vectors of the fine-tuned weight of each LoRA-adapted module, those whose "
             "max |cos| with every singular vector of W0 is below 0.5 (`lorakit analyze --intruders`, PEFT's defaults; "
             "docs/analysis.md).", ""]
    rows = [["LoRA", *_intruder_cells(next(iter(found.values()))["lora"])]]
    rows += [[f"{label} (full fine-tune)", *_intruder_cells(i["full"])] for label, i in found.items()]
    lines += [md_table(["weights", "modules", "with intruders", "intruders in all", "per module"], rows), ""]
    return lines


def _intruder_cells(s: dict) -> list[str]:
    per = ", ".join(str(c) for c in s["per_module"].values())
    return [str(s["modules"]), str(s["with_intruders"]), str(s["total"]), per]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")
