"""Short versions of the three recipes on the real models and data (few steps, small splits).

Each asserts that the loss went down, that merged and unmerged models give the same test
predictions, that the saved adapter reloads to identical logits, and that `evaluate_adapter`
reproduces the recorded test metrics from the saved files alone.
"""

from __future__ import annotations

import json

import pytest

from lorakit.train import evaluate_adapter, load_recipe, run_train

pytestmark = [pytest.mark.slow, pytest.mark.realmodel]


def _check(report, out, trainable_below=1.0):
    t, c = report["training"], report["checks"]
    assert t["val_loss_after"] < t["val_loss_before"], (t["val_loss_before"], t["val_loss_after"])
    assert c["reload_identical"] and c["reload_max_abs_diff"] == 0.0
    assert c["merged_vs_unmerged_max_abs_diff"] < 1e-3
    assert report["lora"]["trainable_percent"] < trainable_below
    for name in ("report.json", "report.md", "loss.png", "adapter/adapter_config.json",
                 "adapter/adapter_model.safetensors", "adapter/lorakit_train.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "report.json").read_text())["test"] == json.loads(json.dumps(report["test"]))
    assert t["optimizer_state_bytes"] == 8 * report["lora"]["trainable"]  # AdamW: two fp32 moments
    assert t["tokens_per_second"] > 0 and t["peak_memory_bytes"] > 0


def _reproduced(out, metric):
    result = evaluate_adapter(out / "adapter", log=lambda m: None)
    assert result["matches_recorded"] is True
    assert result["metrics"][metric] == pytest.approx(result["recorded"][metric], abs=1e-4)


def test_sentiment_smollm2_short(tmp_path, smollm2_folder):
    out = tmp_path / "run"
    recipe = load_recipe("sentiment", {"steps": 4, "batch_size": 4, "test_size": 24, "val_size": 8, "eval_every": 0,
                                       "eval_batch_size": 12, "max_length": 64, "out": str(out)})
    report = run_train(recipe, log=lambda m: None)
    _check(report, out)
    assert report["checks"]["merged_predictions_equal"]
    assert report["test"]["merged"]["accuracy"] == report["test"]["after"]["accuracy"]
    _reproduced(out, "accuracy")


def test_sentiment_minilm_head_short(tmp_path):
    out = tmp_path / "run"
    recipe = load_recipe("sentiment-minilm", {"steps": 12, "batch_size": 16, "test_size": 48, "val_size": 32,
                                              "eval_every": 0, "lr": 3e-3, "out": str(out)})
    report = run_train(recipe, log=lambda m: None)
    _check(report, out)
    assert report["lora"]["config"]["modules_to_save"] == ["classifier"]
    assert report["checks"]["merged_predictions_equal"]
    _reproduced(out, "accuracy")


def test_chat_instruct_smollm2_short(tmp_path, smollm2_folder):
    out = tmp_path / "run"
    recipe = load_recipe("chat", {"steps": 4, "batch_size": 4, "test_size": 12, "val_size": 8, "eval_every": 0,
                                  "eval_batch_size": 12, "max_length": 64, "out": str(out)})
    report = run_train(recipe, log=lambda m: None)
    _check(report, out, trainable_below=2.0)
    assert report["test"]["after"]["loss"] < report["test"]["before"]["loss"]
    assert report["test"]["merged"]["loss"] == pytest.approx(report["test"]["after"]["loss"], abs=1e-4)
    assert report["checks"]["merged_predictions_equal"]  # every per-example loss within 1e-4
    assert len(report["samples"]) == 3 and all(s["after"] for s in report["samples"])
    _reproduced(out, "loss")
