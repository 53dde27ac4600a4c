"""`lorakit.verify` / `lorakit verify` on tiny models: a good adapter passes, a no-op fails naming a
module, an adapter for another model fails naming the first bad key, a Mixtral-style model with
`all-linear` shows its uncovered experts, and the model is left as it was.

The llama.cpp forms on the real model: tests/test_export_llamacpp.py.
"""

from __future__ import annotations

import json

import pytest
import torch

import lorakit as lk
from lorakit import cli
from lorakit.verify import NEAR_ZERO
from lorakit.verify.forms import judge_llama_cpp

from helpers import assert_same_state, randomize_lora, state_snapshot, tiny_gpt2, tiny_llama


def saved(tmp_path, model, config, name="ad", std=0.2):
    lk.inject(model, config)
    if std:
        randomize_lora(model, std=std)
    return lk.save_adapter(model, tmp_path / name)


def test_a_good_adapter_passes_and_the_model_is_left_as_it_was(tmp_path):
    folder = saved(tmp_path, tiny_llama(), lk.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    model = tiny_llama()
    before = state_snapshot(model)
    report = lk.verify(model, folder, llama_cpp=False)
    assert report.ok, report.to_text()
    assert_same_state(model, before)
    assert not lk.state.has_adapters(model) and all(type(m).__name__ != "LoraLinear" for m in model.modules())
    att, mlp = report.coverage["attention"], report.coverage["mlp"]
    # tiny_llama: hidden 32, 4 heads / 2 KV heads (k, v: 16 x 32), MLP 64, 2 layers
    assert (att.covered_modules, att.modules) == (4, 8) and att.params == 2 * (32 * 32 * 2 + 16 * 32 * 2)
    assert att.covered_params == 2 * (32 * 32 + 16 * 32) and mlp.covered_params == 2 * 64 * 32 and mlp.params == 2 * 3 * 64 * 32
    assert report.coverage["head"].covered_params == 0 and report.coverage["experts"].params == 0
    every = report.coverage["all"]
    assert every.params == sum(c.params for k, c in report.coverage.items() if k != "all")  # nothing tied here
    assert every.covered_params == att.covered_params + mlp.covered_params
    forms = {f.form: f for f in report.forms}
    assert forms["merged"].ok and forms["merged"].max_abs_diff < 1e-5 and forms["reloaded"].max_abs_diff == 0.0
    assert forms["peft"].ok and forms["peft"].max_abs_diff < 1e-5
    assert report.effect > 0.1 and len(report.deltas) == 6 and min(d.rel_norm for d in report.deltas) > 0.1
    text = report.to_text()
    assert text.splitlines()[0].endswith(": OK") and "attention" in text and len(text.splitlines()) < 25


def test_an_adapter_whose_b_is_zero_fails_naming_a_module(tmp_path):
    folder = saved(tmp_path, tiny_llama(), lk.LoraConfig(r=4, alpha=8, target_modules=["q_proj"]), std=0)
    report = lk.verify(tiny_llama(), folder, llama_cpp=False)
    assert not report.ok and report.zero_b == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert report.problems == ["no-op adapter: every B is zero (2 modules, e.g. model.layers.0.self_attn.q_proj)"]
    assert report.effect == 0.0


def test_a_negligible_update_is_a_no_op_too(tmp_path):
    folder = saved(tmp_path, tiny_llama(), lk.LoraConfig(r=4, alpha=8, target_modules=["q_proj"]), std=1e-5)
    report = lk.verify(tiny_llama(), folder, llama_cpp=False)
    assert all(0 < d.rel_norm < NEAR_ZERO for d in report.deltas)
    assert not report.ok and "every update is below" in report.problems[0]


def test_an_adapter_for_another_model_fails_naming_the_first_bad_key(tmp_path):
    folder = saved(tmp_path, tiny_gpt2(), lk.LoraConfig(r=4, alpha=8, target_modules=["c_attn"]))
    report = lk.verify(tiny_llama(), folder, llama_cpp=False)
    assert not report.ok and report.unmatched[0] == "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"
    assert "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight" in report.problems[0]
    assert report.forms == []  # nothing to compare: it does not load
    wider = saved(tmp_path, tiny_llama(hidden_size=64), lk.LoraConfig(r=4, alpha=8, target_modules=["q_proj"]), name="wide")
    report = lk.verify(tiny_llama(), wider, llama_cpp=False)
    assert not report.ok and report.unmatched == []
    assert "model.layers.0.self_attn.q_proj.lora_A.weight" in report.problems[0] and "shape" in report.problems[0]


def test_all_linear_on_a_mixtral_style_model_reports_the_uncovered_experts(tmp_path):
    from transformers import MixtralConfig, MixtralForCausalLM

    def mixtral():
        torch.manual_seed(0)
        return MixtralForCausalLM(MixtralConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                                num_experts_per_tok=2)).eval()

    folder = saved(tmp_path, mixtral(), lk.LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    report = lk.verify(mixtral(), folder, llama_cpp=False)
    experts = report.coverage["experts"]
    # per layer: gate_up_proj (4, 128, 32) and down_proj (4, 32, 64), kept as 3-D parameters
    assert experts.params == 2 * (4 * 128 * 32 + 4 * 32 * 64) and experts.covered_params == 0
    assert report.coverage["attention"].share == 1.0
    assert report.ok and "not adapted at all: " in report.to_text() and "experts" in report.to_text().split("not adapted at all: ")[1]


def test_a_tied_head_counts_once_in_all(tmp_path):
    folder = saved(tmp_path, tiny_llama(tie_word_embeddings=True), lk.LoraConfig(r=4, alpha=8, target_modules=["q_proj"]))
    report = lk.verify(tiny_llama(tie_word_embeddings=True), folder, llama_cpp=False, peft=False)
    c = report.coverage
    assert c["head"].params == c["embeddings"].params == 128 * 32
    assert c["all"].params == sum(x.params for k, x in c.items() if k != "all") - 128 * 32
    assert "(tied weights once: 1)" in report.to_text()


def test_static_checks_for_a_training_report():
    from lorakit.verify import static_checks

    model = tiny_llama()
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    fresh = static_checks(model)  # B starts at zero: a no-op until trained
    assert fresh["no_op"] and fresh["modules"] == 4 and len(fresh["zero_b"]) == 4 and fresh["rel_norm"]["max"] == 0.0
    randomize_lora(model)
    trained = static_checks(model)
    assert not trained["no_op"] and trained["zero_b"] == [] and trained["rel_norm"]["min"] > 0
    assert trained["coverage"]["attention"]["covered_modules"] == 4 and json.dumps(trained)


def test_a_model_with_adapters_gets_them_back(tmp_path):
    folder = saved(tmp_path, tiny_llama(), lk.LoraConfig(r=4, alpha=8, target_modules=["q_proj"]))
    model = tiny_llama()
    lk.inject(model, lk.LoraConfig(r=2, alpha=4, target_modules=["v_proj"]), adapter="mine")
    randomize_lora(model)
    before = state_snapshot(model)
    report = lk.verify(model, folder, llama_cpp=False)
    assert report.ok and lk.active_adapters(model) == ("mine",) and lk.adapter_names(model) == ("mine",)
    assert_same_state(model, before)
    assert {f.form: f.note for f in report.forms}["peft"].startswith("skipped")


@pytest.mark.parametrize("noise_std, rule", [(0.01, "reproduced"), (1.0, "nearer the adapted")])
def test_judge_llama_cpp_tells_a_lost_adapter_from_rounding(noise_std, rule):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(8, 50, generator=g).numpy()
    effect = 2.0 * torch.randn(8, 50, generator=g).numpy()
    noise = noise_std * torch.randn(8, 50, generator=g).numpy()
    noise2 = noise_std * torch.randn(8, 50, generator=g).numpy()  # llama.cpp's rounding with the adapter
    good = judge_llama_cpp("x", base + effect + noise2, base + noise, base + effect, base)
    lost = judge_llama_cpp("x", base + noise, base + noise, base + effect, base)
    assert good.ok and rule in good.note and rule in lost.note and not lost.ok
    small = judge_llama_cpp("x", base + noise, base + noise, base + 1e-4 * effect, base)  # below the rounding: undecidable
    assert small.ok and "within llama.cpp's rounding" in small.note


def run(argv, capsys):
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_verify_exit_codes(tmp_path, capsys):
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    good = saved(tmp_path, tiny_llama(), lk.LoraConfig(r=4, alpha=8, target_modules=["q_proj"]), name="good")
    zero = saved(tmp_path, tiny_llama(), lk.LoraConfig(r=4, alpha=8, target_modules=["q_proj"]), name="zero", std=0)
    capsys.readouterr()
    code, out, err = run(["verify", str(good), "--model", str(tmp_path / "base"), "--prompt", "hello"], capsys)
    assert code == 0, out + err
    assert out.splitlines()[0] == f"lorakit verify {good}: OK" and "llama.cpp" in out and "no base GGUF" in out
    code, out, _ = run(["verify", str(zero), "--model", str(tmp_path / "base"), "--json"], capsys)
    data = json.loads(out)
    assert code == 1 and data["ok"] is False and data["problems"][0].startswith("no-op adapter")
    code, out, err = run(["verify", str(tmp_path / "nope"), "--model", str(tmp_path / "base")], capsys)
    assert code == 2 and out == "" and err.startswith("lorakit verify: error: ") and err.count("\n") == 1


def test_cli_verify_a_moe_folder_without_tokenizer_files_uses_the_probe_tokens(tmp_path, capsys):
    import transformers

    def qwen3_moe():
        torch.manual_seed(0)
        return transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
            vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=40, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2))

    qwen3_moe().save_pretrained(tmp_path / "base")  # config and weights only: its tokenizer class loads empty
    good = saved(tmp_path, qwen3_moe(), lk.LoraConfig(r=4, alpha=8, target_modules="all"), name="good")
    capsys.readouterr()
    code, out, err = run(["verify", str(good), "--model", str(tmp_path / "base"), "--no-peft"], capsys)
    assert code == 0, out + err
    assert out.splitlines()[0] == f"lorakit verify {good}: OK"
