"""The `lorakit` command line: the subcommand table, recipe flags, and one-line errors on bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from lorakit import cli


def run(argv, capsys):
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_subcommands_are_registered_in_one_table():
    parser = cli.build_parser()
    names = set(cli.COMMANDS)
    assert {"train", "eval", "merge", "info"} <= names
    sub = next(a for a in parser._actions if a.dest == "command")
    assert names == set(sub.choices)


def test_registering_a_subcommand_is_one_call(capsys):
    cli.register("hello", "say hello", lambda p: p.add_argument("--name", default="x"), lambda a: print(f"hi {a.name}") or 0)
    try:
        assert run(["hello", "--name", "lora"], capsys)[:2] == (0, "hi lora\n")
    finally:
        del cli.COMMANDS["hello"]


def test_analyze_is_registered_when_its_module_exists():
    import importlib.util

    cli.build_parser()
    try:
        has = importlib.util.find_spec("lorakit.analysis.cli") is not None
    except ModuleNotFoundError:
        has = False
    assert ("analyze" in cli.COMMANDS) == has


def test_print_recipe_applies_flags(capsys):
    code, out, _ = run(["train", "sentiment-minilm", "--steps", "7", "--r", "4", "--target-modules", "query,key,value",
                        "--set", "lora.use_rslora=true", "--label-words", "a=x,b=y", "--print-recipe"], capsys)
    assert code == 0
    recipe = yaml.safe_load(out)
    assert recipe["steps"] == 7 and recipe["task"] == "classify-head"
    assert recipe["lora"] == {"r": 4, "alpha": 16, "dropout": 0.0, "target_modules": ["query", "key", "value"],
                              "modules_to_save": ["classifier"], "use_rslora": True}
    assert recipe["label_words"] == {"a": "x", "b": "y"}
    code, out, _ = run(["train", "--target-modules", "all-linear", "--print-recipe"], capsys)
    assert yaml.safe_load(out)["lora"]["target_modules"] == "all-linear"


def _bad_inputs(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "good.jsonl").write_text("".join(json.dumps({"review": f"r{i}", "label": i % 2}) + "\n" for i in range(10)))
    (tmp_path / "floats.csv").write_text("text,label\n" + "".join(f"t{i},{i / 3:.2f}\n" for i in range(10)))
    return {
        "missing data file": (["--data", str(tmp_path / "nope.jsonl")], "nope.jsonl does not exist"),
        "empty file": (["--data", str(tmp_path / "empty.jsonl")], "empty.jsonl is empty"),
        "field not in data": (["--data", str(tmp_path / "good.jsonl")], "field 'text' (--text-field) is not in"),
        "labels not str/int": (["--data", str(tmp_path / "floats.csv")], "must hold strings or integers; row 2 has 0.33 (float)"),
        "unknown model path": (["--model", str(tmp_path / "no-such-model")], "is not a built-in model"),
        "not a model folder": (["--model", str(tmp_path)], "has no config.json"),
        "unknown recipe field": (["--set", "stepz=3"], "unknown recipe field 'stepz'"),
        "bad lora value": (["--r", "0"], "lora.r"),
        "unknown recipe": (["no-such-recipe"], "unknown recipe 'no-such-recipe'"),
        "missing recipe file": (["missing.yaml"], "missing.yaml does not exist"),
    }


BAD_CASES = ["missing data file", "empty file", "field not in data", "labels not str/int", "unknown model path",
             "not a model folder", "unknown recipe field", "bad lora value", "unknown recipe", "missing recipe file"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, case):
    argv, needle = _bad_inputs(tmp_path)[case]
    code, out, err = run(["train", *argv, "--out", str(tmp_path / "out")], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert lines[-1].startswith("lorakit train: error: ") and needle in lines[-1], err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()  # failed before anything was written


def test_debug_shows_the_exception(tmp_path):
    from lorakit.train.errors import DataError

    with pytest.raises(DataError):
        cli.main(["train", "--data", str(tmp_path / "nope.jsonl"), "--debug"])


def test_eval_and_merge_bad_adapter(tmp_path, capsys):
    code, _, err = run(["eval", "--adapter", str(tmp_path / "none")], capsys)
    assert code == 2 and "does not exist" in err and "Traceback" not in err
    code, _, err = run(["merge", "--adapter", str(tmp_path / "none"), "--out", str(tmp_path / "m")], capsys)
    assert code == 2 and "does not exist" in err
    code, _, err = run(["info", str(tmp_path / "none")], capsys)
    assert code == 2 and "does not exist" in err
    (tmp_path / "empty").mkdir()
    for extra in ([], ["--model", "smollm2"]):  # the missing files are named first, whatever else is given
        code, _, err = run(["eval", "--adapter", str(tmp_path / "empty"), *extra], capsys)
        assert code == 2 and err.strip() == f"lorakit eval: error: no adapter_model.safetensors in {tmp_path / 'empty'}"


def test_info_lists_recipes_and_models(capsys):
    code, out, _ = run(["info"], capsys)
    assert code == 0 and "recipes: sentiment, sentiment-minilm, chat" in out and "smollm2" in out


def test_python_dash_m_entry_point(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lorakit", "train", "--data", str(tmp_path / "nope.csv")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"lorakit train: error: data file {tmp_path / 'nope.csv'} does not exist"]


@pytest.mark.slow
@pytest.mark.realmodel
def test_bring_your_own_csv_trains_evaluates_and_merges(tmp_path, capsys):
    """A user CSV with integer labels, the MiniLM head recipe, a few steps; then eval, info and merge from the files."""
    import pandas as pd

    from lorakit.train.data import rotten_tomatoes

    ex = rotten_tomatoes().examples[:400]
    pd.DataFrame({"review": [e["text"] for e in ex], "stars": [int(e["label"] == "positive") for e in ex]}).to_csv(
        tmp_path / "mine.csv", index=False)
    out = tmp_path / "run"
    code, stdout, _ = run(["train", "sentiment-minilm", "--data", str(tmp_path / "mine.csv"), "--text-field", "review",
                           "--label-field", "stars", "--steps", "6", "--test-size", "40", "--val-size", "16",
                           "--eval-every", "0", "--out", str(out)], capsys)
    assert code == 0 and "test accuracy:" in stdout
    report = json.loads((out / "report.json").read_text())
    assert report["data"]["sizes"]["test"] == 40 and report["task"]["labels"] == ["0", "1"]
    code, stdout, _ = run(["eval", "--adapter", str(out / "adapter")], capsys)
    assert code == 0 and "reproduced the recorded accuracy" in stdout
    code, stdout, _ = run(["info", str(out / "adapter")], capsys)
    assert code == 0 and "modules_to_save: ['classifier']" in stdout
    code, _, err = run(["merge", "--adapter", str(out / "adapter"), "--out", str(tmp_path / "merged")], capsys)
    assert code == 0 and (tmp_path / "merged" / "config.json").is_file()
    from transformers import AutoModelForSequenceClassification

    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    assert not any("lora" in k for k in merged.state_dict())


def test_info_names_expert_targets_of_an_adapter_without_target_modules(tmp_path, capsys):
    import transformers

    import lorakit as lk

    model = transformers.MixtralForCausalLM(transformers.MixtralConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=24, num_local_experts=4, num_experts_per_tok=2))
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, target_parameters=["mlp.experts.down_proj"]))
    lk.save_adapter(model, tmp_path / "ad")
    code, out, err = run(["info", str(tmp_path / "ad")], capsys)
    assert code == 0, err
    assert "target modules: None;" in out and "target parameters: ['mlp.experts.down_proj']" in out
