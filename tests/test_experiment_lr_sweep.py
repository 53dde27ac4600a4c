"""`lorakit experiment lr-sweep` (issue 20, item 1; "LoRA Without Regret", Schulman et al. 2025): the optimum
finder and the bootstrap of the optimal-LR ratio on hand-made curves, and a tiny end-to-end run (random 2-layer
BERT, real tokenizer and data) whose report's numbers must be the runs' own."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lorakit import cli
from lorakit.experiments.lr_sweep import bootstrap_optima, matched_rank, optimum, tail_mean
from lorakit.experiments.runner import paired, standard_error


pytestmark = pytest.mark.usefixtures("restore_threads")  # the experiments set torch's thread count


# ---------------------------------------------------------------------- pure functions
GRID = [-5.0, -4.5, -4.0, -3.5, -3.0]  # log10 lr


def _quadratic(x0: float, c: float = 0.3, k: float = 2.0) -> list[float]:
    return [k * (x - x0) ** 2 + c for x in GRID]


def test_tail_mean():
    assert tail_mean([5.0, 4.0, 3.0, 1.0], 2) == 2.0
    assert tail_mean([2.0, 4.0], 10) == 3.0
    assert tail_mean([], 3) == math.inf and tail_mean([1.0, float("nan")], 2) == math.inf


@pytest.mark.parametrize("x0", [-4.3, -4.0, -3.62, -4.74])
def test_optimum_is_exact_on_a_quadratic(x0):
    o = optimum(GRID, _quadratic(x0))
    assert o["where"] == "parabola"
    assert o["log10_lr"] == pytest.approx(x0, abs=1e-12) and o["lr"] == pytest.approx(10 ** x0, rel=1e-11)
    assert GRID[o["grid_index"]] == min(GRID, key=lambda x: abs(x - x0))
    # the grid order does not matter
    assert optimum(GRID[::-1], _quadratic(x0)[::-1])["log10_lr"] == pytest.approx(x0, abs=1e-12)


def test_optimum_edges_divergence_and_asymmetry():
    assert optimum(GRID, _quadratic(-6.0)) == {"log10_lr": -5.0, "lr": 1e-5, "where": "low edge", "grid_index": 0}
    assert optimum(GRID, _quadratic(-2.0))["where"] == "high edge"
    y = _quadratic(-3.6)
    y[-1] = math.inf  # the highest lr diverged: the minimum's neighbour is unusable
    o = optimum(GRID, y)
    assert o["where"] == "grid" and o["log10_lr"] == -3.5
    assert optimum(GRID, [math.inf] * 5)["where"] == "none"
    # three points by hand: (0, 1), (1, 0), (2, 3): y = 2x^2 - 3x + 1, vertex 0.75
    assert optimum([0.0, 1.0, 2.0], [1.0, 0.0, 3.0])["log10_lr"] == pytest.approx(0.75)
    # a flat minimum (a <= 0 cannot happen with a strict middle minimum; ties keep the grid point)
    assert optimum([0.0, 1.0, 2.0], [1.0, 1.0, 1.0]) == {"log10_lr": 0.0, "lr": 1.0, "where": "low edge",
                                                         "grid_index": 0}


def test_bootstrap_without_noise_gives_the_exact_ratio_and_a_zero_width_interval():
    lora_grid = [x + 1 for x in GRID]  # LoRA on its own grid, one decade higher; its vertex at 10^-3.2
    arms = {"full FT": (GRID, [[v] * 6 for v in _quadratic(-4.3)]),
            "LoRA": (lora_grid, [[2.0 * (x + 3.2) ** 2 + 0.3] * 6 for x in lora_grid])}
    out = bootstrap_optima(arms, "full FT", replicates=50)
    e = out["arms"]["LoRA"]
    assert out["tail_steps"] == 6 and e["where"] == "parabola"
    assert e["ratio"] == pytest.approx(10 ** 1.1, rel=1e-10)
    assert e["ratio_ci"] == pytest.approx([e["ratio"], e["ratio"]], rel=1e-10)
    assert out["arms"]["full FT"]["ratio"] == 1.0
    assert out["arms"]["full FT"]["ci_lr"] == pytest.approx([10 ** -4.3, 10 ** -4.3], rel=1e-10)


def test_bootstrap_is_paired_noise_shared_by_every_run_cancels():
    """Adding the same per-step offset to every run of every arm moves each curve up or down as a whole, so
    every replicate finds the same optima: the paired interval has zero width. Independent noise widens it."""
    shared = [0.4, -0.3, 0.1, 0.9, -0.6, 0.2, -0.2, 0.5]
    arms = {"full FT": (GRID, [[v + s for s in shared] for v in _quadratic(-4.3)]),
            "LoRA": (GRID, [[v + s for s in shared] for v in _quadratic(-3.4)])}
    e = bootstrap_optima(arms, "full FT", replicates=200)["arms"]["LoRA"]
    assert e["ratio"] == pytest.approx(10 ** 0.9, rel=1e-10)
    assert e["ratio_ci"] == pytest.approx([10 ** 0.9] * 2, rel=1e-10) and e["se_log10_ratio"] == pytest.approx(0)
    own = [[v + s * (1 + 0.5 * i) for s in shared] for i, v in enumerate(_quadratic(-3.4))]  # not shared alike
    arms["LoRA"] = (GRID, own)
    e = bootstrap_optima(arms, "full FT", replicates=200, seed=1)["arms"]["LoRA"]
    lo, hi = e["ratio_ci"]
    assert lo < hi and e["se_log10_ratio"] > 0
    assert bootstrap_optima(arms, "full FT", replicates=200, seed=1)["arms"]["LoRA"]["ratio_ci"] == [lo, hi]


def test_matched_rank():
    # all-MiniLM-L6-v2 per layer: all-linear 4 x (384 + 384) + (384 + 1536) x 2 = 6912 per unit of rank;
    # attention-only 4 x 768 = 3072: r=16 all-linear = r=36 attention-only
    assert matched_rank(6 * 6912, 6 * 3072, 16) == 36
    assert matched_rank(10, 1000, 1) == 1
    with pytest.raises(ValueError):
        matched_rank(10, 0, 4)


# ---------------------------------------------------------------------- end to end, tiny
def test_lr_sweep_quick(tmp_path, tiny_bert):
    out, work = tmp_path / "out", tmp_path / "work"
    code = cli.main(["experiment", "lr-sweep", "--quick", "--full-grid", "1e-4,1e-3,1e-2", "--lora-grid", "1e-3,1e-2",
                     "--sweep-ranks", "1,4", "--match-rank", "4", "--bootstrap", "100", "--set", f"model={tiny_bert}",
                     "--set", "threads=1", "--out", str(out), "--work", str(work)])
    assert code == 0
    for f in ("report.md", "results.json", "lr_curves.png", "accuracy.png"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    results = json.loads((out / "results.json").read_text())
    report = (out / "report.md").read_text()
    assert results["command"] in report and "lorakit experiment lr-sweep" in results["command"]
    runs = results["runs"]
    m = results["matching"]
    # tiny BERT: all-linear per layer 4 x (32 + 32) + (32 + 64) x 2 = 448 (+ pooler 64), attention 4 x 64 = 256
    assert m["per_rank_all_linear"] == 2 * 448 + 64 and m["per_rank_attention"] == 2 * 256
    assert m["attention_rank"] == round(4 * 960 / 512) == 8
    names = ["full FT", "LoRA r=1", "LoRA r=4", "attention r=8"]
    curves = results["analysis"]["curves"]
    assert list(curves) == names
    assert [r["label"] for r in runs] == ([f"full FT, lr {lr:g}" for lr in (1e-4, 1e-3, 1e-2)]
                                         + [f"{n}, lr {lr:g}" for n in names[1:] for lr in (1e-3, 1e-2)])
    assert [r["method"] for r in runs] == ["full"] * 3 + ["lora"] * 6
    assert runs[3]["lora"]["target_modules"] == "all-linear" and runs[3]["lora"]["alpha"] == 32.0
    assert runs[-1]["lora"]["r"] == 8 and "attention" in runs[-1]["lora"]["target_modules"]
    assert runs[5]["trainable"] - runs[3]["trainable"] == 3 * m["per_rank_all_linear"]  # r=4 vs r=1
    by_label = {r["label"]: r for r in runs}
    boot = results["analysis"]["bootstrap"]
    for name, c in curves.items():
        own = [r for r in runs if r["label"].startswith(name + ",")]
        assert c["lrs"] == [r["lr"] for r in own]
        for r, v in zip(own, c["tail_loss"]):
            assert r["error"] is None and len(r["losses"]) == 2 and r["test"]["n"] == 32
            assert v == pytest.approx(sum(r["losses"]) / 2)  # tail 10 > 2 steps: both
        best = min(range(len(own)), key=lambda i: c["tail_loss"][i])
        assert c["best_index"] == best and c["best_lr"] == own[best]["lr"]
        assert c["best_test"] == own[best]["test"]
        o = optimum([math.log10(x) for x in c["lrs"]], c["tail_loss"])
        assert boot["arms"][name]["lr"] == pytest.approx(o["lr"]) and boot["arms"][name]["where"] == o["where"]
        ratio = o["lr"] / boot["arms"]["full FT"]["lr"]
        assert boot["arms"][name]["ratio"] == pytest.approx(ratio)
        assert f"| {name} | {c['trainable']:,} | {o['lr']:.3g} | {o['where']} |" in report
        if name != "full FT":
            assert f"| {ratio:.3g} |" in report
        r = by_label[own[best]["label"]]
        acc = r["test"]["accuracy"]
        row = next(line for line in report.splitlines() if line.startswith(f"| {name} | {c['best_lr']:g} |"))
        assert f"{100 * acc:.1f}% ± {100 * standard_error(acc, 32):.1f}" in row
        assert f"| {r['test']['loss']:.4g} |" in row
        ref = by_label[curves["full FT"]["best_label"]]
        d = paired([ch == "1" for ch in ref["correct"]], [ch == "1" for ch in r["correct"]])
        assert name == "full FT" or f"({d['only_reference']}/{d['only_other']}, p={d['p_value']:.2g})" in row
    lr_row = next(line for line in report.splitlines() if line.startswith("| 0.01 |"))
    assert f"| {curves['full FT']['tail_loss'][2]:.4g} |" in lr_row


def test_lr_sweep_refuses_bad_grids(tmp_path, capsys):
    for flag, bad in (("--full-grid", "a"), ("--lora-grid", "1e-3,1e-3"), ("--sweep-ranks", "0,4")):
        assert cli.main(["experiment", "lr-sweep", flag, bad, "--out", str(tmp_path)]) == 2
        assert f"{flag} must be" in capsys.readouterr().err


def test_all_keeps_every_experiments_own_defaults():
    """`lorakit experiment all` puts every experiment's flags on one parser: lr-sweep's must not shadow
    full-vs-lora's `--full-lrs` or rank-sweep's `--ranks`."""
    import argparse

    from lorakit.experiments import full_vs_lora, lr_sweep, rank_sweep
    from lorakit.experiments.cli import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["all"])
    assert args.full_lrs == full_vs_lora.DEFAULT_FULL_LRS
    assert args.ranks == ",".join(map(str, rank_sweep.DEFAULT_RANKS))
    assert (args.full_grid, args.lora_grid, args.sweep_ranks) == (
        lr_sweep.DEFAULT_FULL_LRS, lr_sweep.DEFAULT_LORA_LRS, lr_sweep.DEFAULT_RANKS)
    assert args.lora_alpha == 32.0 and args.match_rank == 16
