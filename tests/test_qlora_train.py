"""`lorakit train --quantize nf4`: the recipe field, the flag, and a short real QLoRA run."""

from __future__ import annotations

import pytest
import yaml

from lorakit import cli
from lorakit.train import evaluate_adapter, load_recipe, run_train
from lorakit.train.errors import RecipeError


def test_recipe_quantize_field():
    assert load_recipe().quantize == "none"
    assert load_recipe("sentiment", {"quantize": "nf4"}).quantize == "nf4"
    with pytest.raises(RecipeError, match="'quantize' must be one of none, nf4"):
        load_recipe("sentiment", {"quantize": "int4"})


def test_cli_quantize_flag(capsys):
    assert cli.main(["train", "--quantize", "nf4", "--print-recipe"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["quantize"] == "nf4"
    assert cli.main(["train", "--quantize", "nf3", "--print-recipe"]) == 2
    assert "quantize" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.realmodel
def test_qlora_sentiment_smollm2_short(tmp_path, smollm2_folder):
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "run"
    recipe = load_recipe("sentiment", {"steps": 3, "batch_size": 4, "test_size": 16, "val_size": 8, "eval_every": 0,
                                       "eval_batch_size": 16, "max_length": 64, "quantize": "nf4", "calibration_size": 16,
                                       "out": str(out)})
    report = run_train(recipe, log=lambda m: None)
    q, bw, c = report["quantization"], report["base_weights"], report["checks"]
    assert q["layers"] == 210 and q["double_quant"] and q["bits_per_param"] <= 4.13
    # the frozen rank-8 NF4 correction (qera_rank 8, the default) counts as base weight, in bf16
    assert q["qera"]["layers"] == 210 and q["qera"]["output_error_after"] < 0.1 * q["qera"]["output_error_before"]
    assert bw["correction_bytes"] == 2 * 8 * 30 * (2 * (576 + 576) + 2 * (576 + 192) + 3 * (576 + 1536))
    assert bw["linear_bytes"] == q["bytes"] + bw["correction_bytes"] and bw["linear_bf16_ratio"] >= 3.5
    assert report["lora"]["adapted_modules"] == 60
    # the saved adapter = trained q/v adapter + the correction on all 210 layers: merged everywhere
    assert q["merge"]["layers"] == 210 and q["merge"]["dequantized_layers"] == 0 and q["merge"]["max_abs_error"] == 0.0
    assert report["training"]["last_loss"] < report["training"]["first_loss"] * 1.5
    assert c["reload_identical"] and c["merged_predictions_equal"] and c["merged_vs_unmerged_max_abs_diff"] < 1e-3
    assert "4-bit base (QLoRA)" in (out / "report.md").read_text()
    result = evaluate_adapter(out / "adapter", log=lambda m: None)  # rebuilds the 4-bit base from the recorded recipe
    assert result["matches_recorded"] is True
