"""Rank sweep (LoRA paper, Hu et al. 2021, arXiv:2106.09685, §7.2 table 6 and figure 3; §7.3 table 7).

The default recipe (`sentiment`: SmolLM2-135M, Rotten Tomatoes, LoRA on q_proj + v_proj) is
trained once per rank r, everything else equal: same steps, batches, learning rate, seed, and
the same alpha (the paper's convention, §4.1: alpha is fixed at the first r tried and not tuned,
so `scaling = alpha / r` shrinks as r grows). Then, with `lorakit.analysis`:

- test accuracy per r (table 6);
- the spectrum of each adapter's `delta_weight` (how much of its rank it uses);
- the subspace similarity phi between the A (and B) matrices of two ranks, by default r=8 and
  r=64 (figure 3: do the top directions of the small adapter lie in the large one's subspace?);
- the amplification factor `||delta||_F / ||U^T W0 V^T||_F` (table 7).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..errors import UsageError
from .common import Clock, base_results, by_type, cumulative_energy, layer_index, mean, median, work_folder
from .report import (PAIRED_NOTE, RESULTS_NAME, accuracy_cell, colors, figure, header, md_table, num, paired_cell, pct,
                     plot_accuracy, plot_losses, save, setup_text, write)
from .runner import Arm, RunResult, Session
from ..analysis import analyze_adapter, write_report

NAME = "rank-sweep"
BASE = "sentiment"
HELP = "LoRA rank sweep on q/v: accuracy, spectra, subspace similarity phi (paper table 6, figure 3)"
DEFAULT_RANKS = (1, 2, 4, 8, 64)
TITLE = "Rank sweep: which rank does LoRA need? (paper §7.2, table 6 and figure 3)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ranks", default=",".join(map(str, DEFAULT_RANKS)),
                   help="comma-separated ranks (default %(default)s)")
    p.add_argument("--compare", default=None, metavar="R1,R2",
                   help="the two ranks whose A/B subspaces are compared (default 8,64, else the two largest)")


def _ints(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{what} must be comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise UsageError(f"{what} must be integers >= 1, got {text!r}")
    return values


def run(session: Session, args: argparse.Namespace, out: Path, command: str) -> dict[str, Any]:

    ranks = sorted(set(_ints(args.ranks, "--ranks")))
    compare = _ints(args.compare, "--compare") if args.compare else ([8, 64] if {8, 64} <= set(ranks) else ranks[-2:])
    if len(compare) != 2 or not set(compare) <= set(ranks) or compare[0] == compare[1]:
        raise UsageError(f"--compare needs two different ranks of --ranks {ranks}, got {compare}")
    clock = Clock()
    recipe = session.recipe(BASE)
    prep = session.prepared(recipe)
    zero = session.zero_shot(recipe)
    work = work_folder(session, NAME)
    runs = [session.run(BASE, Arm(f"r={r}", {"lora": {"r": r}}), work) for r in ranks]
    by_rank = {r: run for r, run in zip(ranks, runs)}
    base_r = recipe.lora["r"]
    reference = by_rank.get(base_r, runs[-1])

    # spectra and amplification of every adapter (W0 = the untouched base model)
    spectra: dict[int, dict] = {}
    for r, run_ in by_rank.items():
        if run_.error:
            continue
        session.log(f"analysing the r={r} adapter (spectrum, amplification)")
        analysis = analyze_adapter(run_.adapter_dir, base=prep.model)
        (work / f"analysis_r{r}.json").write_text(json.dumps(analysis), encoding="utf-8")
        spectra[r] = analysis["adapters"][0]["modules"]
    # subspace similarity of the two compared ranks (figure 3), full report in the work folder
    similarity = None
    r1, r2 = compare
    if not by_rank[r1].error and not by_rank[r2].error:
        session.log(f"subspace similarity of the r={r1} and r={r2} adapters")
        sim = analyze_adapter(by_rank[r1].adapter_dir, other=by_rank[r2].adapter_dir)
        write_report(sim, work / f"analysis_r{r1}_vs_r{r2}", max_heatmaps=4)
        similarity = sim["similarity"]

    results = base_results(NAME, command, clock, session, recipe, zero, runs)
    results["ranks"] = ranks
    results["alpha"] = recipe.lora["alpha"]
    results["spectra"] = {str(r): _spectrum_summary(m) for r, m in spectra.items()}
    results["similarity"] = None if similarity is None else {"ranks": compare, **_similarity_summary(similarity)}
    images = {
        "accuracy": plot_accuracy(runs, zero[0].get("accuracy"), out / "accuracy.png",
                                  f"test accuracy after {recipe.steps} steps", "LoRA rank (q_proj + v_proj)"),
        "loss": plot_losses(runs, out / "loss.png", "training loss per rank"),
    }
    if spectra:
        images["spectra"] = _plot_spectra(spectra, out / "spectra.png")
    if similarity is not None:
        images["similarity"] = _plot_similarity(results["similarity"], compare, out / f"phi_r{r1}_r{r2}.png")
    results["images"] = images
    write(out, results, _markdown(results, runs, reference, recipe, images, work))
    return results


# ---------------------------------------------------------------------- summaries
def _spectrum_summary(modules: dict[str, dict]) -> dict[str, dict]:
    """Per module type: means over layers of the spectrum statistics and the amplification."""
    out = {}
    for kind, mods in by_type(modules).items():
        specs = [m["spectrum"] for m in mods.values()]
        amps = [m.get("amplification") or {} for m in mods.values()]
        r = next(iter(mods.values()))["r"]
        out[kind] = {
            "layers": len(mods), "r": r,
            "delta_fro_mean": mean([s["frobenius_norm"] for s in specs]),
            "energy_top1_mean": mean([s["energy_top_k"].get("1") for s in specs]),
            "rank_90_mean": mean([s["rank_90"] for s in specs]),
            "rank_99_mean": mean([s["rank_99"] for s in specs]),
            "effective_rank_mean": mean([s["effective_rank"] for s in specs]),
            "stable_rank_mean": mean([s["stable_rank"] for s in specs]),
            "cumulative_energy_mean": _mean_curves([cumulative_energy(s["singular_values"], s["frobenius_norm"] ** 2)
                                                    for s in specs]),
            "amplification_median": median([a.get("amplification") for a in amps]),
            "amplification_mean": mean([a.get("amplification") for a in amps]),
            "proj_delta_mean": mean([a.get("proj_delta") for a in amps]),
            "proj_w0_mean": mean([a.get("proj_w0") for a in amps]),
            "proj_random_mean": mean([a.get("proj_random") for a in amps]),
            "w0_fro_mean": mean([a.get("w0_fro") for a in amps]),
        }
    return out


def _mean_curves(curves: list[list[float]]) -> list[float]:
    n = min(len(c) for c in curves)
    return [mean([c[i] for c in curves]) for i in range(n)]


def _mean_matrix(mats: list[list[list[float]]]) -> list[list[float]]:
    rows, cols = len(mats[0]), len(mats[0][0])
    return [[mean([m[i][j] for m in mats]) for j in range(cols)] for i in range(rows)]


def _similarity_summary(sim: dict) -> dict[str, Any]:
    out: dict[str, Any] = {"per_type": {}, "per_module": {}}
    for kind, mods in by_type(sim["modules"]).items():
        entry: dict[str, Any] = {"layers": len(mods)}
        for side in ("A", "B"):
            phis = [m[f"phi_{side}"] for m in mods.values()]
            p11 = [p[0][0] for p in phis]
            k1 = len(phis[0])
            d = next(iter(mods.values()))["d_in" if side == "A" else "d_out"]
            entry[side] = {
                "phi_1_1_mean": mean(p11), "phi_1_1_min": min(p11), "phi_1_1_max": max(p11),
                "layers_phi_1_1_above_half": sum(v > 0.5 for v in p11),
                "diagonal_mean": [mean([p[i][i] for p in phis]) for i in range(min(k1, len(phis[0][0])))],
                "phi_full_mean": mean([p[-1][-1] for p in phis]),
                "d": d, "random_1_1": 1 / d, "random_full": max(k1, len(phis[0][0])) / d,
                "phi_mean_matrix": _mean_matrix(phis),
            }
        out["per_type"][kind] = entry
    for path, m in sim["modules"].items():
        out["per_module"][path] = {"phi_A_1_1": m["phi_A"][0][0], "phi_B_1_1": m["phi_B"][0][0],
                                   "phi_A_full": m["phi_A"][-1][-1], "phi_B_full": m["phi_B"][-1][-1]}
    out["middle_layer"] = _middle_layer(sim["modules"])
    out["middle_layer_phi_A"] = {kind: next(m["phi_A"] for p,
                                            m in mods.items() if layer_index(p) == out["middle_layer"])
                                 for kind, mods in by_type(sim["modules"]).items()}
    return out


def _middle_layer(modules: dict) -> int:
    layers = sorted({layer_index(p) or 0 for p in modules})
    return layers[len(layers) // 2]


# ---------------------------------------------------------------------- figures
def _plot_spectra(spectra: dict[int, dict], path: Path) -> str:
    summaries = {r: _spectrum_summary(m) for r, m in spectra.items()}
    kinds = sorted({k for s in summaries.values() for k in s})
    fig = figure(5.2 * len(kinds), 4.0)
    axes = fig.subplots(1, len(kinds), squeeze=False)[0]

    cols = colors(len(summaries))
    for ax, kind in zip(axes, kinds):
        for (r, s), c in zip(sorted(summaries.items()), cols):
            curve = s[kind]["cumulative_energy_mean"]
            ax.plot(range(1, len(curve) + 1), curve, "o-" if len(curve) <= 8 else "-", ms=3, color=c, label=f"r={r}")
        ax.set_xscale("log", base=2)
        ax.axhline(0.9, color="gray", ls=":", lw=0.8)
        ax.set(xlabel="k (top singular values)", ylabel="energy share E(k), mean over layers", ylim=(0, 1.02),
               title=f"delta_weight spectra: {kind}")
        ax.legend(fontsize=7)
    return save(fig, path)


def _plot_similarity(sim: dict, compare: list[int], path: Path) -> str:
    """Figure 3 of the paper: phi(A_r1, A_r2, i, j), i down (r1), j across (r2); colour 0..1."""
    from matplotlib.ticker import MaxNLocator

    per_type = sim["per_type"]
    kinds = sorted(per_type)
    fig = figure(11, 2.2 * len(kinds) + 1.2)
    axes = fig.subplots(len(kinds), 2, squeeze=False)
    im = None
    for row, kind in zip(axes, kinds):
        panels = ((sim["middle_layer_phi_A"][kind], f"{kind}, layer {sim['middle_layer']}"),
                  (per_type[kind]["A"]["phi_mean_matrix"], f"{kind}, mean over {per_type[kind]['layers']} layers"))
        for ax, (phi, title) in zip(row, panels):
            k1, k2 = len(phi), len(phi[0])
            im = ax.imshow(phi, vmin=0, vmax=1, cmap="viridis", aspect="auto", interpolation="nearest",
                           extent=(0.5, k2 + 0.5, k1 + 0.5, 0.5))
            ax.set(xlabel=f"j (A of r={compare[1]})", ylabel=f"i (A of r={compare[0]})", title=f"φ(i, j): {title}")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8)
    return save(fig, path)


# ---------------------------------------------------------------------- report
def _markdown(results: dict, runs: list[RunResult], reference: RunResult, recipe, images: dict, work: Path) -> str:
    alpha = results["alpha"]
    targets = recipe.lora["target_modules"]
    lines = [header(TITLE, (
        f"One LoRA run per rank r on {', '.join(targets) if isinstance(targets, list) else targets}, everything else "
        f"equal; alpha = {alpha:g} for every rank (the paper's convention: alpha is not retuned, so the scaling "
        "alpha / r shrinks as r grows). The adapters are then analysed with `lorakit.analysis` (docs/analysis.md)."),
        results)]
    lines.append(setup_text(results["recipe"], results["zero_shot"], results["data"]["sizes"]))
    lines += ["", "## Accuracy per rank (paper table 6)", ""]
    rows = []
    for run in runs:
        r = run.recipe["lora"]["r"]
        tail = run.losses[-5:]
        rows.append([r, f"{alpha / r:g}", f"{run.trainable:,} ({pct(run.trainable / run.total, 3)})",
                     accuracy_cell(run),
                     paired_cell(reference, run), num(sum(tail) / len(tail)) if tail else "n/a",
                     num(run.step_seconds) if run.step_seconds else "n/a"])
    lines.append(md_table(["r", "scaling alpha/r", "trainable (% of model)", "test accuracy",
                           f"vs r={reference.recipe['lora']['r']} (paired)",
                           "train loss, last 5 steps", "s / step"], rows))
    lines += ["", PAIRED_NOTE, "", f"![accuracy]({images['accuracy']})", "", f"![loss]({images['loss']})", ""]

    if results["spectra"]:
        lines += ["## Spectra of delta_weight (how much of its rank does each adapter use?)", "",
                  "Means over layers. top-1: share of `||delta||_F^2` in the largest singular value; rank 90%: "
                  "singular values needed for 90% of it; effective rank (Roy & Vetterli); amplification (paper §7.3, "
                  "table 7): `||delta||_F / ||U^T W0 V^T||_F` with U, V the top-r singular vectors of delta (median "
                  "over layers), next to `||U^T W0 V^T||_F` for delta's directions, W0's own top-r directions and "
                  "random ones.", ""]
        rows = []
        for r, kinds in results["spectra"].items():
            for kind, s in kinds.items():
                rows.append([r, kind, num(s["delta_fro_mean"]), pct(s["energy_top1_mean"]), num(s["rank_90_mean"], 2),
                             num(s["effective_rank_mean"], 3), num(s["stable_rank_mean"], 3), num(s["w0_fro_mean"]),
                             num(s["proj_delta_mean"]), num(s["proj_w0_mean"]), num(s["proj_random_mean"]),
                             num(s["amplification_median"])])
        lines.append(md_table(["r", "module", "‖ΔW‖_F", "top-1 energy", "rank 90%", "effective rank", "stable rank",
                               "‖W0‖_F", "‖UᵀW0Vᵀ‖_F, ΔW dirs", "W0 dirs", "random dirs", "amplification"], rows))
        lines += ["", f"![spectra]({images['spectra']})", ""]

    sim = results["similarity"]
    if sim is not None:
        r1, r2 = sim["ranks"]
        lines += [f"## Subspace similarity of the r={r1} and r={r2} adapters (paper figure 3)", "",
                  f"φ(i, j) = ‖U_{r1}[:, :i]ᵀ U_{r2}[:, :j]‖_F² / min(i, j) with U the right-singular vectors of A "
                  f"(left-singular vectors of B for φ_B): 1 when the top-i directions of the r={r1} adapter lie in the "
                  f"top-j directions of the r={r2} one, chance level max(i, j) / d for a random subspace of R^d.", ""]
        rows = []
        for kind, e in sim["per_type"].items():
            for side in ("A", "B"):
                s = e[side]
                rows.append([kind, side, f"{s['phi_1_1_mean']:.3f} [{s['phi_1_1_min']:.2f}, {s['phi_1_1_max']:.2f}]",
                             f"{s['layers_phi_1_1_above_half']} of {e['layers']}", f"{s['random_1_1']:.4f}",
                             f"{mean(s['diagonal_mean']):.3f}", f"{s['phi_full_mean']:.3f}", f"{s['random_full']:.3f}"])
        lines.append(md_table(["module", "matrix", "φ(1, 1): mean [min, max] over layers", "layers with φ(1, 1) > 0.5",
                               "chance φ(1, 1)", f"mean φ(i, i), i ≤ {r1}", f"φ({r1}, {r2})",
                               f"chance φ({r1}, {r2})"], rows))
        lines += ["", "Mean φ_A(i, i) by i (down the diagonal, mean over layers):", ""]
        rows = [[kind] + [f"{v:.3f}" for v in e["A"]["diagonal_mean"]] for kind, e in sim["per_type"].items()]
        k = len(next(iter(sim["per_type"].values()))["A"]["diagonal_mean"])
        lines.append(md_table(["module"] + [f"i={i}" for i in range(1, k + 1)], rows))
        lines += ["", f"![phi]({images['similarity']})", "",
                  f"Left: layer {sim['middle_layer']} (the middle layer, as the paper's figure 3 shows layer 48 of "
                  "96); "
                  "right: the mean over layers.", ""]
    lines += ["## Files", "",
              f"`{results_name()}` holds every number above, per-run loss curves and per-example correctness. "
              f"The adapters and the full `lorakit.analysis` outputs (per-module spectra, amplification, φ heatmaps) "
              f"are written to `{work}` (not committed).", ""]
    return "\n".join(lines)


def results_name() -> str:

    return RESULTS_NAME
