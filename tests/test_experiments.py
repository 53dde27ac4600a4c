"""`lorakit experiment`: the runner, the statistics, the budget solver, and each experiment end to end
on tiny random models (real tokenizers, real Rotten Tomatoes data, `--quick`); one real-model smoke test."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lorakit import cli
from lorakit.experiments import Arm, Session, paired, standard_error


# ---------------------------------------------------------------------- fixtures
pytestmark = pytest.mark.usefixtures("restore_threads")  # the experiments set torch's thread count


def run_experiment(tmp_path, name, model, *extra):
    out, work = tmp_path / "out", tmp_path / "work"
    code = cli.main(["experiment", name, "--quick", "--set", f"model={model}", "--set", "threads=1", "--out", str(out), "--work", str(work), *extra])
    assert code == 0
    for f in ("report.md", "results.json", "accuracy.png", "loss.png"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    results = json.loads((out / "results.json").read_text())
    report = (out / "report.md").read_text()
    assert results["experiment"] == name and results["wall_seconds"] > 0
    assert "lorakit experiment " + name in results["command"] and results["command"] in report
    assert results["zero_shot"]["n"] == 32 and 0 <= results["zero_shot"]["accuracy"] <= 1
    for run in results["runs"]:
        assert run["error"] is None
        assert run["test"]["n"] == 32 and 0 <= run["test"]["accuracy"] <= 1 and math.isfinite(run["test"]["loss"])
        assert len(run["losses"]) == 2 and all(math.isfinite(x) for x in run["losses"])
        assert run["train_seconds"] > 0 and run["train_cpu_seconds"] > 0
        assert run["optimizer_state_bytes"] == 8 * run["trainable"]
        assert len(run["correct"]) == 32
        acc = run["test"]["accuracy"]
        assert f"{100 * acc:.1f}% ± {100 * standard_error(acc, 32):.1f}" in report
    return results, report, out, work


# ---------------------------------------------------------------------- statistics
def test_standard_error_and_exact_mcnemar():
    assert standard_error(0.8, 100) == pytest.approx(0.04)
    ref = [True] * 10 + [False] * 10
    other = [True] * 10 + [True] * 5 + [False] * 5  # 5 examples only `other` gets right, none the other way
    d = paired(ref, other)
    assert (d["only_reference"], d["only_other"]) == (0, 5)
    assert d["delta_points"] == pytest.approx(25.0)
    assert d["p_value"] == pytest.approx(2 / 32)  # two-sided exact binomial, 5 of 5
    assert paired(ref, ref)["p_value"] == 1.0
    d = paired([True, False, True, False], [False, True, True, False])  # one each way
    assert (d["only_reference"], d["only_other"], d["p_value"]) == (1, 1, 1.0)


# ---------------------------------------------------------------------- the LoRA+ loop
def _tiny_lora_model(seed=0):
    import lorakit as lk
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    return model


def _batches(seed=0):
    g = torch.Generator().manual_seed(seed)
    while True:
        ids = torch.randint(0, 64, (4, 12), generator=g)
        yield {"input_ids": ids, "labels": ids}


def _loss(model, batch):
    return model(**batch).loss, int(batch["input_ids"].numel())


# ---------------------------------------------------------------------- the parameter budget
def test_ranks_for_budget_matches_the_budget():
    from transformers import LlamaConfig, LlamaForCausalLM

    from lorakit.experiments.which_weights import lora_parameters, ranks_for_budget

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                         num_attention_heads=4, num_key_value_heads=2))
    lora = {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
    budget = lora_parameters(model, lora)
    assert budget == 8 * 4 * ((64 + 64) + (64 + 32))  # q: 64x64, v: 32x64 per layer
    q = ranks_for_budget(model, lora, ["q_proj"], budget)
    assert q["lora"]["r"] == 14 and q["parameters"] == 14 * 4 * 128  # 7168 = budget exactly
    qkvo = ranks_for_budget(model, lora, ["q_proj", "k_proj", "v_proj", "o_proj"], budget)
    assert qkvo["lora"]["r"] == 4 and qkvo["parameters"] == budget
    # all-linear: 4 * 1024 per unit of rank; budget / cost = 1.75 -> r=1 plus r=2 in 3 of 4 layers
    al = ranks_for_budget(model, lora, "all-linear", budget)
    assert al["lora"]["r"] == 1 and al["parameters"] == 7168
    assert lora_parameters(model, {**lora, **al["lora"]}) == al["parameters"]
    assert al["rank_text"] == "1 (2 in 3 of 4 layers)"


# ---------------------------------------------------------------------- Session = lorakit train
def test_session_trains_exactly_as_lorakit_train(tmp_path, tiny_llama):
    from lorakit.train import load_recipe, run_train

    changes = {"model": str(tiny_llama), "threads": 1, "steps": 3, "batch_size": 4, "test_size": 32, "val_size": 8, "eval_every": 0}
    report = run_train(load_recipe("sentiment", {**changes, "out": str(tmp_path / "train")}), log=lambda m: None)
    session = Session(changes, tmp_path / "work", log=lambda m: None)
    res = session.run("sentiment", Arm("lora"), tmp_path / "work")
    assert res.metrics["accuracy"] == report["test"]["after"]["accuracy"]
    assert res.metrics["loss"] == pytest.approx(report["test"]["after"]["loss"], rel=1e-6)
    assert res.losses == pytest.approx([h["loss"] for h in report["training"]["history"]], rel=1e-6)
    assert res.trainable == report["lora"]["trainable"]
    zero, correct, _ = session.zero_shot(session.recipe("sentiment"))
    assert zero["accuracy"] == report["test"]["before"]["accuracy"] and len(correct) == 32


# ---------------------------------------------------------------------- experiments end to end (tiny models)
def test_rank_sweep_quick(tmp_path, tiny_llama):
    results, report, out, work = run_experiment(tmp_path, "rank-sweep", tiny_llama, "--ranks", "1,2,4", "--compare", "2,4")
    assert [r["lora"]["r"] for r in results["runs"]] == [1, 2, 4]
    # q_proj 64x64 and v_proj 32x64 in 2 layers: r * (128 + 96) * 2 LoRA parameters
    assert [r["trainable"] for r in results["runs"]] == [r * 448 for r in (1, 2, 4)]
    for r, kinds in results["spectra"].items():
        for s in kinds.values():
            assert 0 < s["energy_top1_mean"] <= 1 + 1e-9 and 1 <= s["effective_rank_mean"] <= int(r) + 1e-9
            assert s["amplification_median"] > 0
    assert results["spectra"]["1"]["self_attn.q_proj"]["energy_top1_mean"] == pytest.approx(1.0)
    sim = results["similarity"]
    assert sim["ranks"] == [2, 4]
    for kind in ("self_attn.q_proj", "self_attn.v_proj"):
        a = sim["per_type"][kind]["A"]
        assert 0 <= a["phi_1_1_mean"] <= 1 and len(a["phi_mean_matrix"]) == 2 and len(a["phi_mean_matrix"][0]) == 4
    assert (out / "spectra.png").is_file() and (out / "phi_r2_r4.png").is_file()
    assert (work / "rank-sweep" / "r=4" / "adapter" / "adapter_model.safetensors").is_file()
    assert "## Subspace similarity of the r=2 and r=4 adapters" in report


def test_which_weights_quick(tmp_path, tiny_llama):
    results, report, _, _ = run_experiment(tmp_path, "which-weights", tiny_llama)
    budget = results["budget"]
    assert budget == 8 * 2 * ((64 + 64) + (64 + 32))
    labels = [r["label"] for r in results["runs"]]
    assert labels == ["q", "k", "v", "o", "q+v", "q+k+v+o", "all-linear"]
    for plan, run in zip(results["plans"], results["runs"]):
        assert run["trainable"] == plan["parameters"]  # the count the solver promised is what was trained
        assert abs(plan["parameters"] - budget) <= 0.15 * budget
    assert f"budget of {budget:,} LoRA parameters" in report


def test_variants_quick(tmp_path, tiny_llama):
    results, report, _, _ = run_experiment(tmp_path, "variants", tiny_llama)
    runs = {r["label"]: r for r in results["runs"]}
    assert list(runs) == ["LoRA", "rsLoRA", "DoRA", "LoRA+", "PiSSA"]
    assert runs["LoRA"]["trainable"] == runs["LoRA+"]["trainable"] == runs["PiSSA"]["trainable"]
    assert runs["DoRA"]["trainable"] == runs["LoRA"]["trainable"] + 2 * (64 + 32)  # + magnitude vectors of q, v
    assert runs["DoRA"]["lora"]["use_dora"] and runs["rsLoRA"]["lora"]["use_rslora"] and runs["PiSSA"]["lora"]["init"] == "pissa"
    assert runs["LoRA+"]["method"] == "lora+" and runs["LoRA+"]["losses"] != runs["LoRA"]["losses"]
    assert results["relative_train_time"]["LoRA"] == 1.0
    timing = results["timing"]["arms"]
    assert list(timing) == list(runs) and timing["LoRA"]["relative"] == 1.0
    assert all(t["step_seconds"] > 0 and t["cpu_step_seconds"] > 0 for t in timing.values())
    assert timing["LoRA"]["cpu_relative"] == 1.0 and results["relative_train_cpu_time"]["LoRA"] == 1.0
    assert all(v > 0 for v in results["relative_train_time"].values())
    assert "| LoRA+ |" in results["table"] and results["table"] in report


def test_full_vs_lora_quick(tmp_path, tiny_bert):
    results, report, out, _ = run_experiment(tmp_path, "full-vs-lora", tiny_bert, "--full-lrs", "5e-5")
    lora, full = results["runs"]
    assert lora["method"] == "lora" and full["method"] == "full" and full["lr"] == 5e-5
    assert full["trainable"] == full["total"] > 100 * lora["trainable"]
    assert full["optimizer_state_bytes"] == 8 * full["trainable"]
    per_type = results["updates"]["full, lr 5e-05"]["per_type"]
    assert set(per_type) == {"attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"}
    for s in per_type.values():
        assert s["shape"] == [32, 32] and s["delta_fro_mean"] > 0
        assert 0 < s["energy_top_k_mean"]["1"] <= s["energy_top_k_mean"]["8"] <= s["energy_top_k_mean"]["32"] == pytest.approx(1.0)
    energy = results["updates"]["full, lr 5e-05"]["energy_at_adapter_rank"]
    assert len(energy) == 4 and all(0 < v["energy_at_adapter_rank"] <= 1 for v in energy.values())  # query, value x 2 layers
    assert (out / "full_ft_spectrum.png").is_file()
    assert "## Spectrum of the full fine-tune's update" in report
    intruders = results["updates"]["full, lr 5e-05"]["intruders"]
    for side in ("lora", "full"):  # query, value x 2 layers, counted among min(32, 32, 10) = 10 directions
        assert intruders[side]["modules"] == 4 and intruders[side]["total"] == sum(intruders[side]["per_module"].values())
    assert "## Intruder dimensions: LoRA vs full fine-tuning" in report


def test_experiment_is_registered_and_refuses_bad_options(tmp_path, capsys):
    cli.build_parser()
    assert "experiment" in cli.COMMANDS
    assert cli.main(["experiment", "rank-sweep", "--ranks", "0,8", "--out", str(tmp_path)]) == 2
    assert "--ranks must be integers >= 1" in capsys.readouterr().err
    assert cli.main(["experiment"]) == 2
    assert "name an experiment" in capsys.readouterr().err


# ---------------------------------------------------------------------- the real model
@pytest.mark.slow
@pytest.mark.realmodel
def test_rank_sweep_quick_on_smollm2(tmp_path, smollm2_folder):
    results, report, out, _ = run_experiment(tmp_path, "rank-sweep", "smollm2", "--ranks", "1,8", "--compare", "1,8")
    # SmolLM2-135M: q_proj 576x576, v_proj 192x576, 30 layers
    assert [r["trainable"] for r in results["runs"]] == [r * 30 * (1152 + 768) for r in (1, 8)]
    assert results["model"]["parameters"] == 134_515_008
    assert results["zero_shot"]["accuracy"] > 0.4
    assert results["similarity"]["per_type"]["self_attn.q_proj"]["layers"] == 30
