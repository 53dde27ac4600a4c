"""Reports of `analyze_adapter` results: JSON, a Markdown summary, and PNG plots.

Plots use matplotlib's object-oriented API on the Agg canvas (no pyplot, no global backend
change), so they work headless and do not disturb an interactive session.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from .errors import AnalysisError

JSON_NAME = "analysis.json"
MARKDOWN_NAME = "analysis.md"


# ---------------------------------------------------------------------- JSON
def to_json(result: dict) -> str:
    """`result` as JSON text: indented objects, one line per row of numbers. NaN is never written."""
    return _dump(result, 0) + "\n"


def _dump(x: Any, level: int) -> str:
    pad, inner = "  " * level, "  " * (level + 1)
    if isinstance(x, dict):
        if not x:
            return "{}"
        items = [f"{inner}{json.dumps(str(k))}: {_dump(v, level + 1)}" for k, v in x.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(x, (list, tuple)):
        if all(not isinstance(v, (dict, list, tuple)) for v in x):
            return json.dumps(list(x), allow_nan=False)
        items = [f"{inner}{_dump(v, level + 1)}" for v in x]
        return "[\n" + ",\n".join(items) + "\n" + pad + "]"
    return json.dumps(x, allow_nan=False)


# ---------------------------------------------------------------------- Markdown
def _f(x: Any, digits: int = 4) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        if x == 0 or 1e-3 <= abs(x) < 1e5:
            return f"{x:.{digits}g}"
        return f"{x:.3e}"
    return str(x)


def _pct(x: Any) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def to_markdown(result: dict, images: dict[str, str] | None = None) -> str:
    """A Markdown summary of `result`: one table per analysis, the definitions, and `images`
    (`{title: relative path}`) embedded at the end."""
    lines: list[str] = ["# LoRA adapter analysis (LoRA paper §7)", ""]
    for ad in result["adapters"]:
        lines += _spectrum_section(ad)
    if result.get("similarity"):
        lines += _similarity_section(result["similarity"])
    if result.get("full_finetune"):
        lines += _full_finetune_section(result["full_finetune"])
    if result.get("intruders"):
        lines += _intruders_section(result)
    if result.get("warnings"):
        lines += ["## Warnings", ""] + [f"- {w}" for w in result["warnings"]] + [""]
    lines += ["## Definitions", ""] + [f"- **{k}**: {v}" for k, v in result["definitions"].items()] + [""]
    if images:
        lines += ["## Plots", ""] + [f"![{t}]({p})" for t, p in images.items()] + [""]
    return "\n".join(lines)




def _spectrum_section(ad: dict) -> list[str]:
    """One adapter's spectrum table (and its amplification table, §7.3)."""
    lines: list[str] = []
    lines += [f"## Spectrum of delta_weight: `{ad['label']}`", "",
              f"Adapter `{ad['path']}`: r = {ad['r']}, alpha = {_f(ad['alpha'])}"
              + (", rsLoRA" if ad["use_rslora"] else "") + (", DoRA" if ad["use_dora"] else "")
              + f", {len(ad['modules'])} modules.", ""]
    ks = _common_ks([m["spectrum"] for m in ad["modules"].values()])
    lines.append("| module | shape | r | ‖ΔW‖_F | σ₁ | " + " | ".join(f"top-{k}" for k in ks)
                 + " | eff. rank | rank 90% | rank 99% | num. rank |")
    lines.append("|" + "---|" * (9 + len(ks)))
    for p, m in ad["modules"].items():
        s = m["spectrum"]
        lines.append(f"| `{p}` | {m['shape'][0]}×{m['shape'][1]} | {m['r']} | {_f(s['frobenius_norm'])} | "
                     f"{_f(s['spectral_norm'])} | " + " | ".join(_pct(_energy(s, k)) for k in ks)
                     + f" | {_f(s['effective_rank'], 3)} | {s.get('rank_90', '–')} | {s.get('rank_99', '–')} "
                     + f"| {s['numerical_rank']} |")
    lines.append("")
    amps = {p: m["amplification"] for p, m in ad["modules"].items() if "amplification" in m}
    if amps:
        lines += [f"### Amplification (§7.3, table 7): `{ad['label']}`", "",
                  "| module | r | ‖W0‖_F | ‖ΔW‖_F | ‖UᵀW0Vᵀ‖_F, U,V of ΔW | of W0 | random (mean ± std) | "
                  "amplification |",
                  "|---|---|---|---|---|---|---|---|"]
        for p, a in amps.items():
            rnd = "–" if a["proj_random"] is None else f"{_f(a['proj_random'])} ± {_f(a['proj_random_std'], 2)}"
            lines.append(f"| `{p}` | {a['r']} | {_f(a['w0_fro'])} | {_f(a['delta_fro'])} | {_f(a['proj_delta'])} | "
                         f"{_f(a['proj_w0'])} | {rnd} | {_f(a['amplification'], 3)} |")
        lines.append("")
    return lines


def _similarity_section(sim: dict) -> list[str]:
    """Subspace similarity of two adapters (§7.2), and of their delta_weight (extension)."""
    lines: list[str] = []
    l1, l2 = sim["labels"]
    lines += [f"## Subspace similarity (§7.2): `{l1}` vs `{l2}`", "",
              "φ(i, j) = ‖U1[:, :i]ᵀ U2[:, :j]‖²_F / min(i, j); A: right-singular vectors of lora_A, "
              "B: left-singular vectors of lora_B. Chance level max(i, j)/d in brackets.", "",
              "| module | r1 | r2 | φ_A(1,1) | φ_A(r1,r2) | mean φ_A(i,i) | φ_B(1,1) | φ_B(r1,r2) | mean "
              "φ_B(i,i) |",
              "|---|---|---|---|---|---|---|---|---|"]
    for p, m in sim["modules"].items():
        a, b = m["summary_A"], m["summary_B"]
        lines.append(f"| `{p}` | {m['r1']} | {m['r2']} | {_f(a['phi_1_1'], 3)} [{_f(a['random_1_1'], 2)}] | "
                     f"{_f(a['phi_full'], 3)} [{_f(a['random_full'], 2)}] | {_f(a['mean_diagonal'], 3)} | "
                     f"{_f(b['phi_1_1'], 3)} [{_f(b['random_1_1'], 2)}] | {_f(b['phi_full'], 3)} "
                     f"[{_f(b['random_full'], 2)}] | "
                     f"{_f(b['mean_diagonal'], 3)} |")
    lines += ["", "Extension (not in the paper): the same φ on delta_weight's own singular vectors, "
              "which do not depend on how the update is split into B and A.", "",
              "| module | φ_ΔW,in(1,1) | φ_ΔW,in(full) | mean φ_ΔW,in(i,i) | φ_ΔW,out(1,1) | φ_ΔW,out(full) | "
              "mean φ_ΔW,out(i,i) |",
              "|---|---|---|---|---|---|---|"]
    for p, m in sim["modules"].items():
        cells = []
        for side in ("in", "out"):
            sm = m.get(f"summary_delta_{side}")
            cells += ["–"] * 3 if sm is None else [f"{_f(sm['phi_1_1'], 3)} [{_f(sm['random_1_1'], 2)}]",
                                                  f"{_f(sm['phi_full'], 3)} [{_f(sm['random_full'], 2)}]",
                                                  _f(sm["mean_diagonal"], 3)]
        lines.append(f"| `{p}` | " + " | ".join(cells) + " |")
    si = sim.get("shared_init")
    if si and si.get("median_A_relative_difference") is not None:
        share = 100 * si["median_A_relative_difference"]
        lines += ["", f"Shared initialisation: the A matrices differ by {share:.0f}% "
                  "of their norm (median; independent random inits: ~141%) -> "
                  + ("**shared: A's similarity mostly reflects the common random init** (see Warnings)"
                     if si["likely"] else "independent inits")]
    for key, what in (("only_in_first", l1), ("only_in_second", l2)):
        if sim[key]:
            lines.append(f"\nModules only in `{what}` (not compared): " + ", ".join(f"`{p}`" for p in sim[key]))
    lines.append("")
    return lines


def _full_finetune_section(ft: dict) -> list[str]:
    """The spectrum of a full fine-tune's update W_ft - W0."""
    lines: list[str] = []
    ks = _common_ks([m["spectrum"] for m in ft["modules"].values()])[:8]
    lines += [f"## Full fine-tune update W_ft − W0: `{ft['path']}`", "",
              "| module | shape | ‖ΔW‖_F | " + " | ".join(f"top-{k}" for k in ks)
              + " | top-r (adapter r) | eff. rank | rank 90% | rank 99% |",
              "|" + "---|" * (7 + len(ks))]
    for p, m in ft["modules"].items():
        s = m["spectrum"]
        lines.append(f"| `{p}` | {m['shape'][0]}×{m['shape'][1]} | {_f(s['frobenius_norm'])} | "
                     + " | ".join(_pct(_energy(s, k)) for k in ks)
                     + f" | {_pct(m['energy_at_adapter_rank'])} (r={m['adapter_r']}) "
                     f"| {_f(s['effective_rank'], 3)} | "
                     f"{s.get('rank_90', '–')} | {s.get('rank_99', '–')} |")
    lines.append("")
    return lines


def _intruders_section(result: dict) -> list[str]:
    """Intruder dimensions per module (Shuttleworth et al. 2024) of each adapter and the full fine-tune."""
    info = result["intruders"]
    lines = ["## Intruder dimensions (Shuttleworth et al. 2024, arXiv:2410.21228)", "",
             f"Among the top {info['top_k']} {info['side']}-singular vectors of the fine-tuned weight, those whose "
             f"max |cos| with every singular vector of W0 is below {info['eps']:g}.", "",
             "| weights | modules | with intruders | intruders in all | mean per module |", "|---|---|---|---|---|"]
    groups = [(f"`{label}` (W0 + delta_weight)", s) for label, s in info["adapters"].items()]
    if info.get("full_finetune"):
        groups.append(("full fine-tune W_ft", info["full_finetune"]))
    for name, s in groups:
        mean = s["total"] / s["modules"] if s["modules"] else None
        lines.append(f"| {name} | {s['modules']} | {s['with_intruders']} | {s['total']} | {_f(mean, 3)} |")
    lines += ["", "| weights | module | intruders | their ranks (0 = largest σ) | their σ | min max-cos of the top-k |",
              "|---|---|---|---|---|---|"]
    sources = [(ad["label"], ad["modules"]) for ad in result["adapters"]]
    if result.get("full_finetune"):
        sources.append(("full fine-tune", result["full_finetune"]["modules"]))
    for name, modules in sources:
        for p, m in modules.items():
            it = m.get("intruders")
            if it is None:
                continue
            lines.append(f"| {name} | `{p}` | {it['count']} | {', '.join(map(str, it['indices'])) or '–'} | "
                         f"{', '.join(_f(v, 3) for v in it['intruder_singular_values']) or '–'} | "
                         f"{_f(min(it['max_cosine']), 3)} |")
    lines.append("")
    mit = result.get("mitigation")
    if mit:
        grown = sum(m["new_r"] > m["r"] for m in mit["modules"].values())
        lines += [f"Mitigation (paper §6): `{mit['out']}` holds the adapter with its {mit['total']} intruder "
                  f"directions scaled by λ = {mit['lambda']:g}, exactly: {grown} modules grew from rank r to "
                  "r + (their intruders).", ""]
    return lines


def _energy(spec: dict, k: str) -> Any:
    """`E(k)` from a spectrum dict; for k beyond the matrix's singular-value count, `E(n)`."""
    e = spec["energy_top_k"]
    if k in e:
        return e[k]
    if int(k) >= spec["num_singular_values"] and e:
        return e[max(e, key=int)]
    return None


def _common_ks(spectra: list[dict]) -> list[str]:
    ks: list[str] = []
    for s in spectra:
        for k in s["energy_top_k"]:
            if k not in ks:
                ks.append(k)
    return sorted(ks, key=int)


# ---------------------------------------------------------------------- files
def write_report(result: dict, out_dir: str | Path, *, plots: bool = True, max_heatmaps: int = 16) -> dict[str, Path]:
    """Write `analysis.json`, `analysis.md` and (with `plots`) PNG figures into `out_dir`.

    Figures: `spectrum_<label>.png` (normalised singular values, cumulative energy, effective
    rank per module), `similarity_<module>.png` (φ heatmaps for A and B, like paper figures 3-4;
    the first `max_heatmaps` common modules), `amplification_<label>.png`,
    `full_finetune_spectrum.png`.

    Returns:
        `{name: path}` of every file written.
    Raises:
        AnalysisError: the folder cannot be created/written, or matplotlib is missing
            while `plots` is set.
    """
    if max_heatmaps < 0:
        raise AnalysisError(f"max_heatmaps must be >= 0, got {max_heatmaps}")
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise AnalysisError(f"cannot create output folder {out}: {exc}") from None
    written: dict[str, Path] = {}
    images: dict[str, str] = {}
    if plots:
        for title, path in make_plots(result, out, max_heatmaps=max_heatmaps).items():
            written[path.name] = path
            images[title] = path.name
    try:
        (out / JSON_NAME).write_text(to_json(result), encoding="utf-8")
        (out / MARKDOWN_NAME).write_text(to_markdown(result, images), encoding="utf-8")
    except OSError as exc:
        raise AnalysisError(f"cannot write report into {out}: {exc}") from None
    written[JSON_NAME] = out / JSON_NAME
    written[MARKDOWN_NAME] = out / MARKDOWN_NAME
    return written


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "x"


def _figure(width: float, height: float):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise AnalysisError("plots need matplotlib (pip install 'lorakit[train]' or matplotlib); "
                            "or pass --no-plots / plots=False") from None
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    try:
        fig.savefig(path, dpi=110)
    except OSError as exc:
        raise AnalysisError(f"cannot write {path}: {exc}") from None
    return path


def make_plots(result: dict, out: Path, *, max_heatmaps: int = 16) -> dict[str, Path]:
    """Draw the PNG figures of `write_report` into `out`; returns `{title: path}`."""
    made: dict[str, Path] = {}
    for ad in result["adapters"]:
        title = f"spectrum {ad['label']}"
        made[title] = _save(plot_spectra(ad["modules"], f"delta_weight spectra: {ad['label']}"),
                            out / f"spectrum_{_slug(ad['label'])}.png")
        amps = {p: m["amplification"] for p, m in ad["modules"].items() if m.get("amplification")}
        if amps:
            made[f"amplification {ad['label']}"] = _save(plot_amplification(amps, ad["label"]),
                                                         out / f"amplification_{_slug(ad['label'])}.png")
    sim = result.get("similarity")
    if sim:
        for p in list(sim["modules"])[:max_heatmaps]:
            made[f"similarity {p}"] = _save(plot_similarity(sim["modules"][p], p, sim["labels"]),
                                            out / f"similarity_{_slug(p)}.png")
    ft = result.get("full_finetune")
    if ft:
        made["full fine-tune spectrum"] = _save(plot_spectra(ft["modules"], "W_ft - W0 spectra (full fine-tune)"),
                                                out / "full_finetune_spectrum.png")
    return made


def plot_spectra(modules: dict[str, dict], title: str):
    """Three panels: `s_i / s_1` (log), cumulative energy `E(k)`, effective rank per module."""
    fig = _figure(13, 4)
    ax1, ax2, ax3 = fig.subplots(1, 3)
    names = list(modules)
    n = len(names)
    cmap = _cmap("viridis")
    for idx, p in enumerate(names):
        s = modules[p]["spectrum"]["singular_values"]
        if not s or s[0] == 0:
            continue
        k = list(range(1, len(s) + 1))
        color = cmap(idx / max(1, n - 1))
        ax1.semilogy(k, [v / s[0] if v > 0 else math.nan for v in s], color=color, lw=1, alpha=0.8)
        full_total = modules[p]["spectrum"]["frobenius_norm"] ** 2
        acc, cum = 0.0, []
        for v in s:
            acc += v * v
            cum.append(acc / full_total if full_total else math.nan)
        ax2.plot(k, cum, color=color, lw=1, alpha=0.8, label=p if n <= 8 else None)
    ax1.set(xlabel="i", ylabel="σ_i / σ_1", title="singular values")
    ax2.set(xlabel="k", ylabel="energy share of top k", title="cumulative energy", ylim=(0, 1.02))
    ax2.axhline(0.9, color="gray", ls=":", lw=0.8)
    ax2.axhline(0.99, color="gray", ls="--", lw=0.8)
    if n <= 8:
        ax2.legend(fontsize=6)
    er = [modules[p]["spectrum"]["effective_rank"] for p in names]
    ax3.plot(range(n), er, "o-", ms=3)
    ax3.set(xlabel="module index (see JSON order)", ylabel="effective rank (Roy & Vetterli)", title="effective rank")
    if n <= 12:
        ax3.set_xticks(range(n), [p.split(".", 2)[-1][-28:] for p in names], rotation=60, ha="right", fontsize=6)
    fig.suptitle(title)
    return fig


def plot_similarity(m: dict, module: str, labels: list[str]):
    """φ heatmaps for A (right-singular) and B (left-singular), i down, j across, colour in [0, 1]."""
    fig = _figure(11, 4.2)
    from matplotlib.ticker import MaxNLocator

    axes = fig.subplots(1, 2)
    im = None
    for ax, key, side in ((axes[0], "phi_A", "A (right-singular)"), (axes[1], "phi_B", "B (left-singular)")):
        phi = m[key]
        k1, k2 = len(phi), len(phi[0])
        im = ax.imshow(phi, vmin=0.0, vmax=1.0, cmap=_cmap("viridis"), aspect="auto", interpolation="nearest",
                       extent=(0.5, k2 + 0.5, k1 + 0.5, 0.5))
        ax.set(xlabel=f"j ({labels[1]}, r={m['r2']})", ylabel=f"i ({labels[0]}, r={m['r1']})", title=f"φ {side}")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    fig.colorbar(im, ax=list(axes), shrink=0.9)
    fig.suptitle(f"subspace similarity φ(i, j): {module}")
    return fig


def plot_amplification(amps: dict[str, dict], label: str):
    """Per module, log scale: ‖ΔW‖_F and ‖UᵀW0Vᵀ‖_F for U,V of ΔW / of W0 / random."""
    fig = _figure(max(7, 0.5 * len(amps) + 4), 4.5)
    ax = fig.subplots()
    names = list(amps)
    x = list(range(len(names)))
    series = (("delta_fro", "‖ΔW‖_F"), ("proj_delta", "‖UᵀW0Vᵀ‖, ΔW dirs"), ("proj_w0", "‖UᵀW0Vᵀ‖, W0 dirs"),
              ("proj_random", "‖UᵀW0Vᵀ‖, random"))
    width = 0.8 / len(series)
    for i, (key, name) in enumerate(series):
        vals = [amps[p][key] if amps[p][key] else math.nan for p in names]
        ax.bar([v + (i - 1.5) * width for v in x], vals, width, label=name)
    ax.set_yscale("log")
    ax.set_xticks(x, [p.split(".", 2)[-1][-28:] for p in names], rotation=60, ha="right", fontsize=6)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title(f"amplification (§7.3): {label}")
    return fig


def _cmap(name: str):
    from matplotlib import colormaps
    return colormaps[name]
