"""`lorakit experiment forgetting` (issue 20, item 2, and item 3's mitigation; Biderman et al. 2024,
arXiv:2405.09673; Shuttleworth et al. 2024, arXiv:2410.21228): the paired statistics and the equal-learning
interpolation on hand-made numbers, the in-place mitigation against `mitigate_intruders`, and a tiny end-to-end
run (random 2-layer Llama, SmolLM2's tokenizer, real chatterbot data and Hamlet) whose report's numbers must be
the runs' own."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from lorakit import cli
from lorakit.analysis import intruder_correction, intruder_dimensions, mitigate_intruders, pretrained_basis
from lorakit.analysis.errors import AnalysisError
from lorakit.experiments.forgetting import (at_equal_learning, evenly_spaced, interpolate, label_counts,
                                            linear_weights, paired_difference)

pytestmark = pytest.mark.usefixtures("restore_threads")


# ---------------------------------------------------------------------- statistics
def test_paired_difference_is_the_change_of_the_pooled_mean():
    before, after, counts = [2.0, 3.0, 1.0], [1.5, 3.5, 0.0], [10, 30, 20]
    d = paired_difference(before, after, counts)
    pooled = lambda xs: sum(c * x for c, x in zip(counts, xs)) / sum(counts)  # noqa: E731
    assert d["delta"] == pytest.approx(pooled(after) - pooled(before), abs=1e-15)
    # by hand: c_i (a_i - b_i) = -5, 15, -20; mean -10/3; sd over n - 1
    items = [-5.0, 15.0, -20.0]
    sd = math.sqrt(sum((x + 10 / 3) ** 2 for x in items) / 2)
    assert d["se"] == pytest.approx(math.sqrt(3) * sd / 60, rel=1e-12) and d["n"] == 3
    one = paired_difference([1.0], [2.0], [4])
    assert one["delta"] == 1.0 and math.isnan(one["se"])
    assert paired_difference(before, before, counts) == {"delta": 0.0, "se": 0.0, "n": 3}
    with pytest.raises(ValueError):
        paired_difference([1.0], [1.0, 2.0], [1, 1])
    with pytest.raises(ValueError):
        paired_difference([1.0], [1.0], [0])


def test_interpolate_and_evenly_spaced():
    pts = [(0.3, "c"), (0.1, "a"), (0.2, "b")]
    assert interpolate(pts, 0.15) == (1, 2, pytest.approx(0.5))
    assert interpolate(pts, 0.3) == (2, 0, pytest.approx(1.0))
    assert interpolate(pts, 0.05) is None and interpolate(pts, 0.31) is None and interpolate(pts[:1], 0.3) is None
    assert evenly_spaced(10, 4) == [0, 3, 6, 9] and evenly_spaced(3, 5) == [0, 1, 2] and evenly_spaced(9, 1) == [4]
    assert label_counts([([1, 2, 3, 4], [-100, -100, 3, 4]), {"labels": [5, 6, -100, 8]}]) == [2, 2]


def test_at_equal_learning_interpolates_block_by_block():
    full = [{"learning": 0.1, "forgetting_items": [0.0, 0.2], "counts": [1, 1]},
            {"learning": 0.3, "forgetting_items": [0.4, 0.6], "counts": [1, 1]}]
    lora = {"learning": 0.25, "forgetting_items": [0.1, 0.1], "counts": [1, 1]}
    e = at_equal_learning(full, lora)
    # w = 0.75: full FT per block 0.3 and 0.5; LoRA - full FT = -0.2 and -0.4
    assert e["between"] == [0, 1] and e["w"] == pytest.approx(0.75)
    assert e["delta"] == pytest.approx(-0.3) and e["se"] == pytest.approx(0.1)
    assert at_equal_learning(full, {**lora, "learning": 0.5}) is None


# ---------------------------------------------------------------------- intruders, reused basis, in-place mitigation
def test_a_reused_basis_gives_the_same_intruders_and_mitigation():
    g = torch.Generator().manual_seed(0)
    W0 = torch.randn(24, 16, generator=g, dtype=torch.float64)
    u, v = torch.randn(24, 1, generator=g, dtype=torch.float64), torch.randn(1, 16, generator=g, dtype=torch.float64)
    W = W0 + 20 * (u / u.norm()) @ (v / v.norm())  # a large new direction: an intruder
    assert intruder_dimensions(W0, W)["count"] >= 1
    a = intruder_correction(W0, W, 0.0)
    b = intruder_correction(W0, W, 0.0, basis=pretrained_basis(W0))
    assert a[2] == b[2] and torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(AnalysisError, match="basis"):
        intruder_correction(W0, W, basis=pretrained_basis(W0.T))


def test_scorer_mitigates_each_weight_as_mitigate_intruders(tmp_path):
    from lorakit.experiments.forgetting import Scorer

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 24), nn.Linear(24, 16))
    tuned = nn.Sequential(nn.Linear(16, 24), nn.Linear(24, 16))
    tuned.load_state_dict(base.state_dict())
    with torch.no_grad():
        tuned[0].weight.add_(5 * torch.outer(torch.randn(24), torch.randn(16)) / 4)
    scorer = Scorer.__new__(Scorer)  # only the intruder part: no session
    scorer.W0, scorer.bases, scorer.lam = linear_weights(base), {}, 0.25
    expected = {n: mitigate_intruders(scorer.W0[n], w, 0.25).float() for n, w in linear_weights(tuned).items()}
    counts = {n: intruder_dimensions(scorer.W0[n], w)["count"] for n, w in linear_weights(tuned).items()}
    found = scorer._intruders(tuned, mitigate=True)
    assert found["by_module"] == counts and found["total"] == sum(counts.values()) >= 1 and found["matrices"] == 2
    for n, w in linear_weights(tuned).items():
        torch.testing.assert_close(w, expected[n], rtol=0, atol=1e-6)


# ---------------------------------------------------------------------- end to end
def test_forgetting_quick(tmp_path, tiny_llama):
    out, work = tmp_path / "out", tmp_path / "work"
    code = cli.main(["experiment", "forgetting", "--quick", "--set", f"model={tiny_llama}", "--set", "threads=1",
                     "--forget-full-grid", "1e-3", "--forget-lora-grid", "1e-3,3e-2", "--forget-ranks", "2",
                     "--general-blocks", "3", "--general-length", "32", "--mitigate-lambda", "0", "--intruders",
                     "--out", str(out), "--work", str(work)])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    report = (out / "report.md").read_text()
    assert (out / "frontier.png").stat().st_size > 0 and results["command"] in report
    assert results["zero_shot"]["correct"] is None  # an instruct task has no labels
    g = results["general"]
    assert g["blocks"] == 3 and g["tokens_per_block"] == 32 and g["scored_tokens"] == 3 * 31
    points = results["analysis"]["points"]
    assert [p["label"] for p in points] == [r["label"] for r in results["runs"]] and len(points) == 3
    for p, r in zip(points, results["runs"]):
        assert p["error"] is None and r["error"] is None
        # the numbers are the runs' own: learning is the drop of the pooled test loss, forgetting the rise of
        # the general-text loss
        assert p["test_loss"] == pytest.approx(r["test"]["loss"], rel=1e-12)
        assert p["learning"] == pytest.approx(results["zero_shot"]["loss"] - r["test"]["loss"], abs=1e-9)
        assert p["forgetting"] == pytest.approx(p["general_loss"] - g["base"]["loss"], abs=1e-9)
        assert f"{p['learning']:+.4f} ± {p['learning_se']:.4f}" in report
        assert f"{p['forgetting']:+.4f} ± {p['forgetting_se']:.4f}" in report
        assert p["intruders"]["matrices"] == 14  # 2 layers x 7 projections, the tied head excluded
        if p["rank"] is None:
            assert "mitigated" not in p
        elif p["intruders"]["total"] == 0:
            assert p["mitigated"]["learning"] == p["learning"]
    eq = results["analysis"]["equal_learning"]
    assert set(eq) == {"LoRA r=2, lr 0.001", "LoRA r=2, lr 0.03"}


def test_forgetting_refuses_bad_options(tmp_path, capsys):
    for extra in (["--forget-ranks", "0"], ["--mitigate-lambda", "-1"], ["--forget-lora-grid", "x"],
                  ["--forget-lora-grid", "inf"], ["--lora-alpha", "0"]):
        code = cli.main(["experiment", "forgetting", "--quick", "--out", str(tmp_path), *extra])
        assert code == 2, extra
        assert extra[0] in capsys.readouterr().err


def test_forgetting_refuses_a_general_text_shorter_than_a_block(tmp_path, tiny_llama, capsys):
    short = tmp_path / "short.txt"
    short.write_text("To be, or not to be.")
    code = cli.main(["experiment", "forgetting", "--quick", "--set", f"model={tiny_llama}", "--set", "threads=1",
                     "--general-text", str(short), "--general-length", "64", "--out", str(tmp_path / "o"),
                     "--work", str(tmp_path / "w")])
    assert code == 2
    assert "fewer than one block of --general-length 64" in capsys.readouterr().err

