"""`analyze_adapter`: every analysis of paper §7 on saved adapter folders, as one JSON-ready dict."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .amplification import amplification_from_svd
from .errors import AnalysisError, NoCommonModulesError
from .intruders import EPS, TOP_K, intruder_dimensions, pretrained_basis
from .linalg import lowrank_svd, numerical_rank_tol
from .similarity import grassmann_similarity, similarity_summary, subspace_similarity
from .spectrum import spectrum_from_singular_values
from .weights import AdapterFactors, WeightSource, load_factors

DEFINITIONS = {
    "delta_weight": "scaling * lora_B @ lora_A, (out, in); scaling = alpha / r (alpha / sqrt(r) with rsLoRA); float64",
    "energy_top_k": "sum_{i<=k} s_i^2 / sum_i s_i^2 (share of squared Frobenius norm in the top-k singular values)",
    "rank_90 / rank_99": "smallest k with energy_top_k >= 0.90 / 0.99",
    "effective_rank": "Roy & Vetterli (2007): exp(-sum p_i log p_i), p_i = s_i / sum_j s_j",
    "stable_rank": "||delta||_F^2 / ||delta||_2^2",
    "numerical_rank": "#{s_i > s_1 * max(out, in) * eps_float64}",
    "phi": "phi(M1, M2, i, j) = ||U1[:, :i]^T U2[:, :j]||_F^2 / min(i, j); U = right-singular vectors of lora_A "
           "(phi_A) or left-singular vectors of lora_B (phi_B); paper section 7.2",
    "phi_delta_in / phi_delta_out": "extension: phi on the right / left singular vectors of delta_weight itself "
                                     "(its numerical rank), independent of the split into B and A",
    "random_baseline": "E phi(i, j) against a uniformly random subspace of R^d = max(i, j) / d",
    "amplification": "||delta||_F / ||U_r^T W0 Vh_r^T||_F with U_r, Vh_r the top-r singular vectors of delta; "
                     "proj_w0 / proj_random use W0's own top-r singular vectors / random orthonormal bases; paper "
                     "section 7.3",
    "full_finetune": "spectrum of W_ft - W0 for the adapted modules; energy_at_adapter_rank = energy_top_k at k = r",
    "intruders": "Shuttleworth et al. 2024 (arXiv:2410.21228) section 4: among the top_k left-singular vectors of "
                 "W = W0 + delta_weight (or W_ft), those whose max |cosine| with every left-singular vector of W0 is "
                 "below eps (PEFT's defaults top_k=10, eps=0.5)",
}


def analyze_adapter(path: str | Path, other: str | Path | None = None, base: Any = None, *,
                    full_finetune: Any = None, modules: str | None = None, amplification_rank: int | None = None,
                    random_trials: int = 10, seed: int = 0, keep_singular_values: int = 64,
                    intruders: bool = False, intruder_top_k: int = TOP_K, intruder_eps: float = EPS) -> dict:
    """Run the paper's §7 analyses on a saved adapter (and optionally a second one, a base model
    and a full fine-tune), per adapted module. All math in float64.

    Args:
        path: PEFT-layout adapter folder (`adapter_config.json` + `adapter_model.safetensors`).
        other: a second adapter folder (another rank or seed) for the subspace similarity (§7.2).
        base: the pre-trained weights W0 for the amplification analysis (§7.3): a Hugging Face
            model folder of safetensors, a `.safetensors` file, a state dict or an `nn.Module`.
        full_finetune: fine-tuned weights W_ft (same kinds as `base`; needs `base`) whose update
            `W_ft - W0` is analysed for the adapted modules (§7: full fine-tune updates are low rank).
        modules: regex (`re.search`) restricting the analysed module paths.
        amplification_rank: r of §7.3; default each module's adapter rank.
        random_trials, seed: random-subspace draws for the §7.3 baseline.
        keep_singular_values: how many singular values of `W_ft - W0` to store (statistics use all).
        intruders: count the intruder dimensions of `W0 + delta_weight` (and of `W_ft`) per module
            (needs `base`; `lorakit.analysis.intruder_dimensions` with `intruder_top_k`, `intruder_eps`).

    Returns:
        A JSON-serialisable dict:
        `adapters`: list (one per adapter) of `{label, path, r, alpha, use_rslora, use_dora,
        fan_in_fan_out, modules: {path: {kind, shape [out, in], r, scaling, spectrum,
        amplification?}}, skipped_keys}`; `similarity` (None without `other`):
        `{labels, modules: {path: {r1, r2, d_in, d_out, phi_A, phi_B (lists of rows),
        summary_A, summary_B, phi_delta_in, phi_delta_out, summary_delta_in, summary_delta_out}},
        only_in_first, only_in_second}`; `full_finetune` (or None):
        `{path, modules: {path: {shape, spectrum, energy_at_adapter_rank}}}`; `base`;
        `definitions`; `warnings`. With `intruders`, each adapter module and full fine-tune module
        gets `intruders` (see `intruder_dimensions`) and the result an `intruders` summary:
        `{top_k, eps, side, adapters: {label: summary}, full_finetune: summary | None}` with
        `summary = {modules, with_intruders, total, per_module: {path: count}}`. Spectra: see
        `spectrum_from_singular_values`; amplification: see `amplification`.

    Raises:
        AdapterLoadError, ConfigError: an unreadable adapter folder.
        NoCommonModulesError: `other` adapts none of `path`'s modules.
        BaseModelError: `base` / `full_finetune` missing, unreadable, lacking a module's
            weight, or with a weight of a shape that does not fit the adapter.
        AnalysisError: other bad input (bad regex, `full_finetune` without `base`, ...).
    """
    _check_arguments(base, full_finetune, amplification_rank, random_trials, keep_singular_values)
    if intruders and base is None:
        raise AnalysisError("--intruders needs --base: intruder dimensions compare W0 + delta_weight with W0")
    adapters = [load_factors(path, modules)]
    if other is not None:
        adapters.append(load_factors(other, modules))
    labels = _labels([a.path for a in adapters])
    base_src = WeightSource(base, "--base") if base is not None else None
    warnings: list[str] = []
    result: dict[str, Any] = {"definitions": DEFINITIONS, "base": None if base is None else _describe(base),
                              "adapters": [], "similarity": None, "full_finetune": None, "warnings": warnings}
    svds: list[dict[str, tuple]] = []
    w0_cache: dict[str, torch.Tensor] = {}
    # W0's singular vectors, kept per module only when more than one weight is compared with them
    bases = {} if intruders and len(adapters) + (full_finetune is not None) > 1 else None
    for label, ad in zip(labels, adapters):
        svds.append({})
        entry = _adapter_entry(label, ad, svds[-1], warnings)
        if base_src is not None:
            _against_base(entry, ad, svds[-1], base_src, w0_cache, amplification_rank, (random_trials, seed),
                          (intruder_top_k, intruder_eps, bases) if intruders else None)
        result["adapters"].append(entry)
    if len(adapters) == 2:
        result["similarity"] = _similarity(adapters, labels, svds)
        note = shared_init_note(result["similarity"], adapters)
        if note:
            warnings.append(note)
    if full_finetune is not None:
        result["full_finetune"] = _full_finetune(full_finetune, adapters, base_src, w0_cache, keep_singular_values,
                                                 warnings, (intruder_top_k, intruder_eps, bases) if intruders else None)
    if intruders:
        result["intruders"] = _intruder_summary(result, intruder_top_k, intruder_eps)
    return result


def _against_base(entry: dict, ad, svds: dict, base_src, w0_cache: dict, amplification_rank: int | None,
                  trials_seed: tuple[int, int], intruders: tuple | None) -> None:
    """The analyses that need W0, per module of one adapter: amplification (§7.3), intruders."""
    for mod_path, mod in ad.modules.items():
        if mod_path not in w0_cache:
            w0_cache[mod_path] = base_src.weight_for(mod)
        r = amplification_rank if amplification_rank is not None else mod.r
        entry["modules"][mod_path]["amplification"] = amplification_from_svd(
            *svds[mod_path], w0_cache[mod_path], r, random_trials=trials_seed[0], seed=trials_seed[1])
        if intruders is not None:
            entry["modules"][mod_path]["intruders"] = _intruders(
                mod_path, w0_cache[mod_path], w0_cache[mod_path] + mod.delta(), *intruders)


def _intruders(path: str, W0: torch.Tensor, W: torch.Tensor, top_k: int, eps: float, bases: dict | None) -> dict:
    """`intruder_dimensions(W0, W)`, with W0's SVD taken from (or put into) `bases` when it is a dict."""
    if bases is not None and path not in bases:
        bases[path] = pretrained_basis(W0)
    return intruder_dimensions(W0, W, top_k, eps, basis=None if bases is None else bases[path])


def _intruder_summary(result: dict, top_k: int, eps: float) -> dict[str, Any]:
    """Per adapter (and the full fine-tune): how many modules have intruders, and how many in all."""
    def summary(modules: dict[str, dict]) -> dict[str, Any]:
        counts = {p: m["intruders"]["count"] for p, m in modules.items() if "intruders" in m}
        return {"modules": len(counts), "with_intruders": sum(c > 0 for c in counts.values()),
                "total": sum(counts.values()), "per_module": counts}

    ft = result.get("full_finetune")
    return {"top_k": top_k, "eps": eps, "side": "left",
            "adapters": {ad["label"]: summary(ad["modules"]) for ad in result["adapters"]},
            "full_finetune": summary(ft["modules"]) if ft else None}


def _check_arguments(base, full_finetune, amplification_rank, random_trials, keep_singular_values) -> None:
    if full_finetune is not None and base is None:
        raise AnalysisError("--full-finetune needs --base: the update analysed is W_ft - W0")
    if random_trials < 0:
        raise AnalysisError(f"random_trials must be >= 0, got {random_trials}")
    if amplification_rank is not None and (isinstance(amplification_rank,
                                                      bool) or not isinstance(amplification_rank, int)
                                           or amplification_rank < 1):
        raise AnalysisError(f"amplification rank must be an integer >= 1, got {amplification_rank!r}")
    if isinstance(keep_singular_values, bool) or not isinstance(keep_singular_values, int) or keep_singular_values < 1:
        raise AnalysisError(f"keep_singular_values must be an integer >= 1, got {keep_singular_values!r}")


def _adapter_entry(label: str, ad, svds: dict[str, tuple], warnings: list[str]) -> dict[str, Any]:
    """One adapter's spectra per module (its SVDs go into `svds`)."""
    if ad.config.use_dora:
        warnings.append(f"{label}: DoRA adapter; the analysis is of the low-rank directional update scaling * B @ A "
                        "(the magnitude vector is ignored)")
    entry: dict[str, Any] = {
        "label": label, "path": str(ad.path), "r": ad.config.r, "alpha": ad.config.alpha,
        "use_rslora": ad.config.use_rslora, "use_dora": ad.config.use_dora,
        "fan_in_fan_out": ad.fan_in_fan_out, "modules": {}, "skipped_keys": ad.skipped,
    }
    for mod_path, mod in ad.modules.items():
        U, S, Vh = lowrank_svd(mod.B, mod.A, mod.scaling)
        svds[mod_path] = (U, S, Vh)
        spec = spectrum_from_singular_values(S, mod.shape)
        if spec["numerical_rank"] == 0:
            warnings.append(f"{label}: {mod_path}: delta_weight is zero (untrained adapter?)")
        entry["modules"][mod_path] = {"kind": mod.kind, "shape": list(mod.shape), "r": mod.r, "scaling": mod.scaling,
                                      "spectrum": spec}
    return entry


def _full_finetune(full_finetune, adapters, base_src, w0_cache, keep_singular_values: int, warnings: list[str],
                   intruders: tuple | None = None) -> dict:
    """Spectra of `W_ft - W0` for the adapted modules (and W_ft's intruder dimensions, `(top_k, eps, bases)`)."""
    ft_src = WeightSource(full_finetune, "--full-finetune")
    mods: dict[str, Any] = {}
    for ad in adapters:
        for p, mod in ad.modules.items():
            mods.setdefault(p, mod)
    ft: dict[str, Any] = {"path": _describe(full_finetune), "modules": {}}
    for p, mod in mods.items():
        W0 = w0_cache[p] if p in w0_cache else base_src.weight_for(mod)
        W_ft = ft_src.weight_for(mod)
        S = torch.linalg.svdvals(W_ft - W0)
        spec = spectrum_from_singular_values(S, mod.shape, keep=keep_singular_values)
        ft["modules"][p] = {"shape": list(mod.shape), "adapter_r": mod.r, "spectrum": spec,
                            "energy_at_adapter_rank": _energy_at(S, mod.r)}
        if intruders is not None:
            ft["modules"][p]["intruders"] = _intruders(p, W0, W_ft, *intruders)
        if spec["numerical_rank"] == 0:
            warnings.append(f"full fine-tune: {p}: W_ft - W0 is zero (same weights as --base?)")
    return ft


def _similarity(adapters: list[AdapterFactors], labels: list[str], svds: list[dict[str, tuple]]) -> dict:
    a1, a2 = adapters
    common = [p for p in a1.modules if p in a2.modules]
    if not common:
        raise NoCommonModulesError(
            f"adapters {a1.path} and {a2.path} have no adapted module in common "
            f"(first: {list(a1.modules)[:3]}; second: {list(a2.modules)[:3]})"
        )
    out: dict[str, Any] = {
        "labels": labels,
        "modules": {},
        "only_in_first": [p for p in a1.modules if p not in a2.modules],
        "only_in_second": [p for p in a2.modules if p not in a1.modules],
    }
    for p in common:
        m1, m2 = a1.modules[p], a2.modules[p]
        if m1.shape != m2.shape:
            raise AnalysisError(f"module {p!r}: delta shapes differ ({m1.shape} in {a1.path}, {m2.shape} in "
                                f"{a2.path}); "
                                "were the adapters trained on the same base model?")
        phi_a = subspace_similarity(m1.A, m2.A, "right")
        a_diff = _relative_difference(m1.A, m2.A)
        phi_b = subspace_similarity(m1.B, m2.B, "left")
        entry = {
            "r1": m1.r, "r2": m2.r, "d_in": m1.shape[1], "d_out": m1.shape[0],
            "phi_A": phi_a.tolist(), "phi_B": phi_b.tolist(),
            "summary_A": similarity_summary(phi_a, m1.shape[1]),
            "summary_B": similarity_summary(phi_b, m1.shape[0]),
            "A_relative_difference": a_diff,
        }
        # Extension beyond the paper: the same phi on delta_weight's own singular vectors (input side:
        # right, output side: left), restricted to its numerical rank. Unlike A's, these do not depend
        # on how the update is split into B and A.
        (U1, S1, Vh1), (U2, S2, Vh2) = svds[0][p], svds[1][p]
        k1, k2 = _rank(S1, m1.shape), _rank(S2, m2.shape)
        for side, X1, X2, d in (("in", Vh1.T, Vh2.T, m1.shape[1]), ("out", U1, U2, m1.shape[0])):
            if k1 and k2:
                phi = grassmann_similarity(X1[:, :k1], X2[:, :k2])
                entry[f"phi_delta_{side}"], entry[f"summary_delta_{side}"] = phi.tolist(), similarity_summary(phi, d)
            else:
                entry[f"phi_delta_{side}"] = entry[f"summary_delta_{side}"] = None
        out["modules"][p] = entry
    return out


SHARED_INIT_BELOW = 0.7  # two independent random A differ by ~sqrt(2) = 1.41 of their norm


def _relative_difference(A1, A2) -> float | None:
    """`||A1 - A2||_F / mean(||A1||_F, ||A2||_F)`: ~1.41 for independent random inits, ~0 for a shared
    one that training moved little (None for different shapes)."""
    if tuple(A1.shape) != tuple(A2.shape):
        return None
    a1, a2 = A1.double(), A2.double()
    scale = (a1.norm() + a2.norm()) / 2
    return float((a1 - a2).norm() / scale) if scale > 0 else None


def _recorded_seed(path: Path) -> int | None:
    try:
        return json.loads((Path(path) / "lorakit_train.json").read_text(encoding="utf-8"))["recipe"]["seed"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def shared_init_note(similarity: dict, adapters: list[AdapterFactors]) -> str | None:
    """Record (under `similarity["shared_init"]`) whether the two adapters' A share their random
    initialisation, and return a warning when they do: A's similarity then mostly reflects it."""
    diffs = sorted(d for m in similarity["modules"].values() if (d := m.get("A_relative_difference")) is not None)
    seeds = [_recorded_seed(a.path) for a in adapters]
    median = diffs[len(diffs) // 2] if diffs else None
    shared = median is not None and median < SHARED_INIT_BELOW
    similarity["shared_init"] = {"median_A_relative_difference": median, "likely": shared,
                                 "recorded_seeds": seeds if None not in seeds else None}
    if not shared:
        return None
    same_seed = f" (both recorded seed {seeds[0]} in lorakit_train.json)" if None not in seeds and \
        seeds[0] == seeds[1] else ""
    return (f"the two adapters' A matrices differ by only {100 * median:.0f}% of their norm (median over modules; "
            f"independent random initialisations differ by about 141%): they share their initialisation{same_seed}, "
            "so the high A similarity mostly reflects that, not what training learned; compare B or delta_weight "
            "(phi_delta_in / phi_delta_out), or adapters trained with different seeds")


def _rank(S: torch.Tensor, shape: tuple[int, int]) -> int:
    return int((S > numerical_rank_tol(S, shape)).sum()) if float(S.max()) > 0 else 0


def _energy_at(S: torch.Tensor, k: int) -> float | None:
    sq = S.double() ** 2
    total = float(sq.sum())
    return None if total == 0 else float(sq[:k].sum()) / total


def _labels(paths: list[Path]) -> list[str]:
    names = [p.name or str(p) for p in paths]
    if len(names) == 2 and names[0] == names[1]:
        names = [f"{p.parent.name}/{p.name}" for p in paths]
        if names[0] == names[1]:
            names = [f"{n} (1)" if i == 0 else f"{n} (2)" for i, n in enumerate(names)]
    return names


def _describe(source: Any) -> str:
    if isinstance(source, (str, Path)):
        return str(source)
    return f"<{type(source).__name__}>"
