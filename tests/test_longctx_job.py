"""Issue 16 in the training job: `--task text`, activation checkpointing (`--gradient-checkpointing`),
the chunked loss, packing for instruction data, and the memory report; on a tiny model."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from safetensors.torch import load_file

import lorakit as lk
from lorakit import cli
from lorakit.train import load_recipe, run_train
from lorakit.train.errors import RecipeError
from lorakit.train.prepare import make_task
from transformers import AutoModelForCausalLM, AutoTokenizer

from tiny_run import NEGATIVE, NOUNS, POSITIVE, make_tiny

QUIET = lambda message: None  # noqa: E731


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    model_dir, _ = make_tiny(folder)
    rng = random.Random(0)
    words = POSITIVE + NEGATIVE + NOUNS
    docs = folder / "docs"
    docs.mkdir()
    for d in range(6):  # a folder of .txt documents: a repetitive language the model can learn
        text = " ".join(words[(i * 7 + d) % len(words)] if rng.random() < 0.9 else str(i % 50) for i in range(150))
        (docs / f"doc{d}.txt").write_text(text)
    chat = folder / "chat.jsonl"
    with open(chat, "w") as f:
        for i in range(120):
            prompt = " ".join(rng.choice(NOUNS) for _ in range(rng.randint(1, 12)))
            f.write(json.dumps({"prompt": prompt, "response": rng.choice(POSITIVE) + f" {i % 40}"}) + "\n")
    return model_dir, docs, chat


def _text_recipe(tiny, out, **changes):
    model_dir, docs, _ = tiny
    fields = dict(model=str(model_dir), task="text", data=str(docs), max_length=32, batch_size=2, steps=4, lr=1e-2,
                  test_size=4, val_size=2, eval_every=0, eval_batch_size=4, threads=1, save_every=0,
                  lora={"target_modules": "all-linear", "r": 4, "alpha": 8}, out=str(out))
    fields.update(changes)
    return load_recipe(None, fields)


def test_text_task_trains_on_blocks_and_reports_perplexity_and_memory(tiny, tmp_path):
    report = run_train(_text_recipe(tiny, tmp_path / "run", gradient_checkpointing="on"), log=QUIET)
    test = report["test"]
    assert report["metric_names"] == ["loss", "perplexity"]
    assert test["after"]["loss"] < test["before"]["loss"]  # it learns the documents' language
    assert abs(test["after"]["perplexity"] - math.exp(test["after"]["loss"])) < 1e-9
    memory = report["memory"]
    assert memory["gradient_checkpointing"] == {"mode": "on", "enabled": True, "how": "transformers",
                                                "tokens_per_micro_batch": 64}
    assert memory["loss"].startswith("chunked")
    assert report["checks"]["merged_predictions_equal"] and report["checks"]["reload_identical"]
    assert "activation checkpointing on" in (tmp_path / "run" / "report.md").read_text()


def test_checkpointing_on_and_off_train_bitwise_equal_adapters(tiny, tmp_path):
    """Recomputing each layer replays the same kernels on the same inputs (dropout masks included):
    the adapters after training are the same bytes."""
    tensors = []
    for mode in ("on", "off"):
        out = tmp_path / mode
        run_train(_text_recipe(tiny, out, gradient_checkpointing=mode,
                               lora={"target_modules": "all-linear", "r": 4, "alpha": 8, "dropout": 0.1}), log=QUIET)
        tensors.append(load_file(out / "adapter" / "adapter_model.safetensors"))
    assert tensors[0].keys() == tensors[1].keys()
    assert all(torch.equal(tensors[0][k], tensors[1][k]) for k in tensors[0])


def test_auto_checkpointing_follows_the_tokens_per_micro_batch(tiny, tmp_path):
    small = run_train(_text_recipe(tiny, tmp_path / "small", steps=1), log=QUIET)
    assert small["memory"]["gradient_checkpointing"]["enabled"] is False  # 2 x 32 tokens: below the threshold


def test_packing_instruct_rows_report_less_padding(tiny, tmp_path):
    model_dir, _, chat = tiny
    fields = dict(model=str(model_dir), task="instruct", data=str(chat), max_length=64, batch_size=4, steps=3,
                  test_size=10, val_size=5, eval_every=0, threads=1, save_every=0, lr=5e-3,
                  lora={"target_modules": ["q_proj", "v_proj"]})
    padded = run_train(load_recipe(None, {**fields, "out": str(tmp_path / "padded")}), log=QUIET)
    packed = run_train(load_recipe(None, {**fields, "packing": True, "out": str(tmp_path / "packed")}), log=QUIET)
    pad = packed["memory"]["padding"]
    assert pad["packing"] and pad["padding"] == pad["padding_after"] < pad["padding_before"]
    assert padded["memory"]["padding"]["padding"] == pad["padding_before"]
    assert pad["rows"] < pad["examples"]
    # a packed step sees more examples: the same 3 steps cover more of the data
    assert packed["training"]["tokens"] > padded["training"]["tokens"]
    t = packed["training"]
    assert t["rows_seen"] == 3 * 4 < t["examples_seen"] <= 3 * 4 * pad["examples"] // pad["rows"] + 3 * 4
    assert padded["training"]["examples_seen"] == 12 and padded["training"]["rows_seen"] is None
    assert [e["step"] for e in t["evals"]] == [0, 3] and t["evals"][-1]["train_seconds"] == t["train_seconds"]
    assert packed["checks"]["merged_predictions_equal"]


def test_a_packed_batch_has_the_loss_and_gradients_of_the_padded_batch_of_the_same_examples(tiny):
    """--packing changes the speed, not the objective: the job's packed rows (each example attending
    only to itself, positions restarting) give the padded batch's token-mean loss and gradients."""
    model_dir, _, chat = tiny
    recipe = load_recipe(None, dict(model=str(model_dir), task="instruct", data=str(chat), max_length=64,
                                    lora={"target_modules": ["q_proj", "v_proj"], "r": 4}))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    examples = [json.loads(line) for line in open(chat)][:7]
    for i, e in enumerate(examples):  # answers of different lengths: a token mean differs from an example mean
        e["response"] = " ".join(["good"] * (1 + 3 * i))
    task = make_task(recipe, tokenizer, examples)
    model = lk.inject(AutoModelForCausalLM.from_pretrained(model_dir), lk.LoraConfig(r=4, target_modules=["q_proj"]))
    for p in model.parameters():  # a non-zero B, so that the adapter's gradients are not all zero
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.1)
    results = []
    for batch in (task.batch(examples, "cpu"), task.batch([examples[:3], examples[3:]], "cpu")):
        model.zero_grad()
        loss, tokens = task.loss(model, batch)
        loss.backward()
        results.append((loss.detach(), tokens, [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    (padded, n_padded, g_padded), (packed, n_packed, g_packed) = results
    assert n_padded == n_packed and "attention_mask" in task.batch([examples[:3]], "cpu")
    assert abs(padded.item() - packed.item()) <= 1e-5
    assert max((a - b).abs().max().item() for a, b in zip(g_padded, g_packed)) <= 1e-5


def test_bad_long_context_input_is_one_line(tiny, tmp_path, capsys):
    model_dir, docs, _ = tiny
    base = ["train", "--model", str(model_dir), "--task", "text", "--data", str(docs), "--threads", "1",
            "--out", str(tmp_path / "r")]
    assert cli.main([*base, "--max-length", "4096"]) == 2  # the tiny model has 128 positions
    assert "'max_length' is 4096, beyond the model's 128 positions" in capsys.readouterr().err
    assert cli.main([*base, "--gradient-checkpointing", "sometimes"]) == 2
    assert "gradient_checkpointing" in capsys.readouterr().err
    assert cli.main([*base[:-2], "--data", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "r2")]) == 2
    assert "nope.txt does not exist" in capsys.readouterr().err
    with pytest.raises(RecipeError, match="packing.*instruct"):
        load_recipe(None, {"task": "text", "packing": True})
