"""Recipes: presets, files (YAML/TOML/JSON), flag overrides, and errors that name the field."""

from __future__ import annotations

import json

import pytest

from lorakit.train.errors import RecipeError
from lorakit.train.recipe import PRESETS, Recipe, load_recipe, preset


def test_default_recipe_is_the_demo():
    r = load_recipe()
    assert (r.model, r.task, r.data) == ("smollm2", "classify-lm", "rotten-tomatoes")
    assert r.lora["r"] == 8 and r.lora["alpha"] == 16
    assert r.test_size >= 500
    cfg = r.lora_config()
    assert cfg.r == 8 and cfg.alpha == 16 and cfg.scaling_for("x") == 2.0


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_are_valid(name):
    r = preset(name)
    assert r.name == name
    r.lora_config()


def test_minilm_preset_trains_the_head_via_modules_to_save():
    r = preset("sentiment-minilm")
    assert r.task == "classify-head" and r.lora["modules_to_save"] == ["classifier"]


@pytest.mark.parametrize("suffix,text", [
    (".yaml", "preset: sentiment-minilm\nsteps: 7\nlora:\n  r: 4\n"),
    (".toml", 'preset = "sentiment-minilm"\nsteps = 7\n[lora]\nr = 4\n'),
    (".json", json.dumps({"preset": "sentiment-minilm", "steps": 7, "lora": {"r": 4}})),
])
def test_recipe_files(tmp_path, suffix, text):
    path = tmp_path / f"r{suffix}"
    path.write_text(text)
    r = load_recipe(str(path), {"lr": 0.01})
    assert r.task == "classify-head" and r.steps == 7 and r.lr == 0.01
    assert r.lora["r"] == 4 and r.lora["modules_to_save"] == ["classifier"]  # lora is merged key by key


def test_overrides_take_precedence_and_out_dir():
    r = load_recipe("chat", {"steps": 3, "out": "x/y"})
    assert r.steps == 3 and str(r.out_dir) == "x/y"
    assert str(preset("chat").out_dir) == "runs/chat"


@pytest.mark.parametrize("changes,needle", [
    ({"stepz": 3}, "stepz"),
    ({"steps": 0}, "steps"),
    ({"steps": 2.5}, "steps"),
    ({"lr": -1.0}, "lr"),
    ({"task": "regress"}, "task"),
    ({"device": "tpu"}, "device"),
    ({"lora": {"r": 0}}, "lora.r"),
    ({"lora": {"rank": 4}}, "lora.rank"),
    ({"prompt_template": "no placeholder"}, "prompt_template"),
    ({"prompt_template": "{text} {oops}"}, "prompt_template"),
    ({"label_words": {"a": ""}}, "label_words"),
])
def test_bad_fields_name_the_field(changes, needle):
    with pytest.raises(RecipeError, match=needle.replace(".", r"\.")):
        load_recipe(None, changes)


def test_unknown_field_suggests_close_names():
    with pytest.raises(RecipeError, match="did you mean batch_size"):
        Recipe().replace(batch_sise=4)


def test_unknown_recipe_and_bad_files(tmp_path):
    with pytest.raises(RecipeError, match="unknown recipe"):
        load_recipe("nope")
    with pytest.raises(FileNotFoundError):
        load_recipe(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [1, 2\n")
    with pytest.raises(RecipeError, match="could not be parsed"):
        load_recipe(str(bad))
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(RecipeError, match="mapping"):
        load_recipe(str(listy))


def test_a_run_on_ones_own_data_gets_its_own_default_folder():
    from pathlib import Path

    from lorakit.train.recipe import load_recipe

    assert load_recipe(None, {"data": "my data/reviews.csv"}).out_dir == Path("runs/sentiment-reviews")
    assert load_recipe("chat", {"data": "a.txt,b.txt", "task": "text"}).out_dir == Path("runs/chat-a")
    assert load_recipe(None, {"data": "rotten-tomatoes"}).out_dir == Path("runs/sentiment")  # built-in data
    assert load_recipe("chat", {"data": "faq.jsonl", "out": "x"}).out_dir == Path("x")
    assert load_recipe(None, {"data": "f.csv", "name": "mine"}).out_dir == Path("runs/mine")


def test_the_lr_rule_and_a_presets_lr_rescaled_for_a_changed_lora_shape():
    """issue 20: lr x scaling x r fixed (alpha fixed: rank-independent), x2.5 for attention-only targets."""
    from lorakit.train.recipe import LR_AT_ALPHA_32, attention_only, default_lr, load_recipe

    assert default_lr({"r": 16, "alpha": 32, "target_modules": "all-linear"}) == pytest.approx(LR_AT_ALPHA_32)
    assert default_lr({"r": 1, "alpha": 32}) == default_lr({"r": 64, "alpha": 32}) == pytest.approx(LR_AT_ALPHA_32)
    assert default_lr({"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]}) == pytest.approx(
        2 * 2.5 * LR_AT_ALPHA_32)
    assert default_lr({"r": 16, "alpha": 32, "use_rslora": True}) == pytest.approx(LR_AT_ALPHA_32 / 4)
    assert attention_only(["query", "value"]) and attention_only(["model.layers.0.self_attn.o_proj"])
    assert not attention_only(["q_proj", "down_proj"]) and not attention_only("all-linear")
    assert not attention_only(r".*q_proj") and not attention_only([])

    said = []
    assert load_recipe(None, {}, log=said.append).lr == 2e-3 and not said  # the preset as it is
    assert load_recipe(None, {"lora": {"r": 64}}, log=said.append).lr == 2e-3 and not said  # alpha fixed
    assert load_recipe(None, {"lora": {"alpha": 32}}, log=said.append).lr == pytest.approx(1e-3)
    assert load_recipe(None, {"lora": {"target_modules": "all-linear"}}).lr == pytest.approx(2e-3 / 2.5)
    assert len(said) == 1 and "lr 0.001: the 'sentiment' recipe's 0.002 rescaled" in said[0]
    assert load_recipe(None, {"lora": {"alpha": 32}, "lr": 5e-3}).lr == 5e-3  # a given lr wins
    assert load_recipe("chat", {"lora": {"alpha": 32}}).lr == pytest.approx(5e-4)


def test_a_recipe_files_lr_wins_over_the_rule(tmp_path):
    from lorakit.train.recipe import load_recipe

    f = tmp_path / "r.yaml"
    f.write_text("lora:\n  alpha: 64\nlr: 0.003\n")
    assert load_recipe(f).lr == 0.003
    f.write_text("lora:\n  alpha: 64\n")
    assert load_recipe(f).lr == pytest.approx(5e-4)


def test_a_run_shorter_than_the_presets_warmup_gets_the_presets_share_of_it(tmp_path):
    base = preset("sentiment")  # 4 warmup steps of 40
    said: list[str] = []
    short = load_recipe(None, {"steps": 2}, log=said.append)
    assert short.warmup_steps == round(base.warmup_steps * 2 / base.steps) == 0 and said == []
    assert load_recipe("sentiment-minilm", {"steps": 8}).warmup_steps == 0  # 10 of 250: 0.32 of a step
    said.clear()
    equal = load_recipe(None, {"steps": base.warmup_steps}, log=said.append)  # reaches lr on its last step
    assert equal.warmup_steps == base.warmup_steps and said == []
    file = tmp_path / "r.yaml"  # a warmup the user wrote is kept, with a warning
    file.write_text("steps: 3\nwarmup_steps: 6\n")
    mine = load_recipe(file, {}, log=said.append)
    assert mine.warmup_steps == 6 and said == ["warning: warmup_steps 6 > steps 3: the learning rate peaks at 50% "
                                               f"of lr {mine.lr:g} on the last step"]
