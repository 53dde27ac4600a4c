"""`lorakit experiment qlora-parity` (issue 20, item 4): the statistics across seeds against fp64 references,
and a tiny end-to-end run (random 2-layer BERT, real tokenizer and data) whose report's numbers must be
the runs' own."""

from __future__ import annotations

import json
import math
import statistics

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lorakit import cli
from lorakit.experiments import paired
from lorakit.experiments.runner import paired_t, t_quantile, t_two_sided_p


pytestmark = pytest.mark.usefixtures("restore_threads")  # the experiments set torch's thread count


# ---------------------------------------------------------------------- statistics
def _t_tail_reference(t: float, df: int) -> float:
    """Two-sided tail of Student's t by numerical integration of its density in float64 (Simpson, 200k steps)."""
    x = np.linspace(0.0, abs(t), 200_001)
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    f = c * (1 + x * x / df) ** (-(df + 1) / 2)
    h = x[1] - x[0]
    inside = h / 3 * (f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum())
    return 1 - 2 * inside


@pytest.mark.parametrize("df", [1, 2, 3, 4, 5, 8, 9])
@pytest.mark.parametrize("t", [0.0, 0.3, 1.0, 2.5, -4.0])
def test_t_two_sided_p_matches_numerical_integration(t, df):
    assert t_two_sided_p(t, df) == pytest.approx(_t_tail_reference(t, df), abs=1e-10)


def test_t_quantile_inverts_the_tail_and_bad_input_is_refused():
    for df in (1, 4, 9):
        q = t_quantile(0.95, df)
        assert t_two_sided_p(q, df) == pytest.approx(0.05, abs=1e-10)
    assert t_quantile(0.95, 1) == pytest.approx(math.tan(0.95 * math.pi / 2), rel=1e-9)  # Cauchy: exact
    with pytest.raises(ValueError, match="degrees of freedom"):
        t_two_sided_p(1.0, 0)
    with pytest.raises(ValueError, match="p must be in"):
        t_quantile(1.0, 3)


def test_paired_t_and_sign_flip_exact():
    d = [1.0, 2.0, 3.0, -1.0, 0.5]
    out = paired_t(d)
    sd = statistics.stdev(d)
    assert out["mean"] == pytest.approx(1.1) and out["sd"] == pytest.approx(sd)
    assert out["t"] == pytest.approx(1.1 / (sd / math.sqrt(5)))
    assert out["p_value"] == pytest.approx(_t_tail_reference(out["t"], 4), abs=1e-10)
    half = t_quantile(0.95, 4) * sd / math.sqrt(5)
    assert out["ci"] == pytest.approx([1.1 - half, 1.1 + half])
    # sign flips: |sum| >= 5.5 for the 32 patterns; counted by hand from the sums of subsets flipped
    sums = [abs(sum(x if (m >> i) & 1 else -x for i, x in enumerate(d))) for m in range(32)]
    assert out["sign_flip_p"] == sum(s >= 5.5 - 1e-12 for s in sums) / 32
    assert paired_t([1.0, 2.0, 3.0])["sign_flip_p"] == 0.25  # only all-plus and all-minus reach |sum| = 6
    same = paired_t([2.0, 2.0])
    assert same["sd"] == 0.0 and same["t"] is None and same["sign_flip_p"] == 0.5
    assert paired_t([1.0])["t"] is None
    with pytest.raises(ValueError):
        paired_t([])


# ---------------------------------------------------------------------- end to end, tiny
def test_qlora_parity_quick(tmp_path, tiny_bert):
    out, work = tmp_path / "out", tmp_path / "work"
    code = cli.main(["experiment", "qlora-parity", "--quick", "--seeds", "0,1", "--qera-rank", "4",
                     "--set", f"model={tiny_bert}", "--set", "threads=1", "--out", str(out), "--work", str(work)])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    report = (out / "report.md").read_text()
    assert results["command"] in report and "lorakit experiment qlora-parity" in results["command"]
    assert f"Run time: {results['wall_seconds']:.0f} s" in report
    runs = results["runs"]
    assert [r["label"] for r in runs] == [f"{a} s={s}" for s in (0, 1) for a in ("LoRA", "QLoRA", "QLoRA+QERA")]
    assert [r["seed"] for r in runs] == [0, 0, 0, 1, 1, 1]
    for i, r in enumerate(runs):
        assert r["error"] is None and r["test"]["n"] == 32 and len(r["correct"]) == 32 and len(r["losses"]) == 2
        q = r["quantization"]
        if i % 3 == 0:
            assert q is None
        else:  # NF4 codes (4 bits) + double-quantized block scales (+ per-layer tables: large on a tiny model)
            assert q["bits_per_param"] == pytest.approx(8 * q["bytes"] / q["params"]) and q["double_quant"]
            assert q["bytes_by_role"]["codes"] * 2 == q["params"]  # 4 bits per weight
            assert ("qera" in q) == (i % 3 == 2)
    assert len({r["trainable"] for r in runs}) == 1  # the same LoRA (+ head) in every arm
    assert runs[1]["losses"] != runs[0]["losses"]  # the 4-bit base changes the forward pass
    qera = runs[2]["quantization"]["qera"]
    assert qera["rank"] == 4 and 0 <= qera["output_error_remaining_mean"] < 1
    # the QERA arm's saved adapter is the trained one with the correction folded in: rank 8 + 4 on query/value
    folded = load_file(work / "qlora-parity" / "QLoRA+QERA_s=0" / "adapter" / "adapter_model.safetensors")
    query_a = [v for k, v in folded.items() if "attention.self.query.lora_A" in k]
    assert query_a and all(v.shape[0] == 12 for v in query_a)

    comp = results["comparison"]
    lora = runs[0::3]
    for k, name in enumerate(("QLoRA", "QLoRA+QERA")):
        arm = runs[k + 1::3]
        acc = [r["test"]["accuracy"] for r in arm]
        assert comp[name]["accuracy"] == {"0": acc[0], "1": acc[1]}
        assert comp[name]["mean_accuracy"] == pytest.approx(sum(acc) / 2)
        diffs = [100 * (a - ref["test"]["accuracy"]) for a, ref in zip(acc, lora)]
        v = comp[name]["vs_lora"]
        assert v["differences_points"] == pytest.approx(diffs)
        assert v["paired_t"]["mean"] == pytest.approx(sum(diffs) / 2)
        per_seed = [paired([c == "1" for c in ref["correct"]], [c == "1" for c in r["correct"]])
                    for ref, r in zip(lora, arm)]
        assert v["per_seed_mcnemar"] == per_seed
        assert (v["pooled_only_lora"], v["pooled_only_this"]) == (
            sum(p["only_reference"] for p in per_seed), sum(p["only_other"] for p in per_seed))
        row = next(line for line in report.splitlines() if line.startswith(f"| {name} |"))
        assert f"| {100 * comp[name]['mean_accuracy']:.1f}% |" in row
        assert f"| {v['pooled_only_lora']}/{v['pooled_only_this']} |" in row
        assert f"{v['paired_t']['mean']:+.2f}" in row
    assert "LoRA" in comp and "vs_lora" not in comp["LoRA"]
    for r in runs:
        assert f"| {r['label']} | {100 * r['test']['accuracy']:.1f}% ±" in report


def test_qlora_parity_refuses_bad_seeds(tmp_path, capsys):
    for bad in ("a,b", "1,1", "-1"):
        assert cli.main(["experiment", "qlora-parity", "--seeds", bad, "--out", str(tmp_path)]) == 2
        assert "--seeds must be" in capsys.readouterr().err


def test_compare_on_known_runs():
    """`compare` on hand-made runs: accuracies, per-seed gaps, the paired t-test and pooled McNemar counts."""
    from lorakit.experiments.qlora_parity import ARMS, compare
    from lorakit.experiments.runner import RunResult

    n = 10
    correct = {  # seed -> arm -> examples right (of 10)
        0: {"LoRA": 8, "QLoRA": 7, "QLoRA+QERA": 8},
        1: {"LoRA": 6, "QLoRA": 6, "QLoRA+QERA": 7},
        2: {"LoRA": 7, "QLoRA": 5, "QLoRA+QERA": 7},
    }
    runs = []
    for seed, arms in correct.items():
        for name in ARMS:
            k = arms[name]
            r = RunResult(f"{name} s={seed}", "lora", {"seed": seed})
            r.correct = [i < k for i in range(n)]  # nested: the better arm gets a superset right
            r.metrics = {"accuracy": k / n, "n": n}
            r.steps, r.train_seconds = 1, 1.0
            runs.append(r)
    comp = compare(runs, [0, 1, 2])
    q = comp["QLoRA"]
    assert q["accuracy"] == {"0": 0.7, "1": 0.6, "2": 0.5} and q["mean_accuracy"] == pytest.approx(0.6)
    assert q["vs_lora"]["differences_points"] == pytest.approx([-10.0, 0.0, -20.0])
    t = q["vs_lora"]["paired_t"]
    sd = statistics.stdev([-10.0, 0.0, -20.0])
    assert t["mean"] == pytest.approx(-10.0) and t["t"] == pytest.approx(-10.0 / (sd / math.sqrt(3)))
    assert t["p_value"] == pytest.approx(_t_tail_reference(t["t"], 2), abs=1e-10)
    assert (q["vs_lora"]["pooled_only_lora"], q["vs_lora"]["pooled_only_this"]) == (3, 0)
    e = comp["QLoRA+QERA"]["vs_lora"]
    assert e["differences_points"] == pytest.approx([0.0, 10.0, 0.0])
    assert (e["pooled_only_lora"], e["pooled_only_this"]) == (0, 1)
    assert e["per_seed_mcnemar"][1] == {"only_reference": 0, "only_other": 1, "delta_points": 10.0, "p_value": 1.0}
