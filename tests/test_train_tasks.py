"""Tasks: the answer-only loss equals transformers' own loss; both scoring paths agree;
instruction tuning supervises response tokens only."""

from __future__ import annotations

import pytest
import torch

import lorakit.train.tasks as T
from lorakit.train.prepare import make_task
from lorakit.train.recipe import Recipe

from helpers import tiny_llama


def _batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 128, (3, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, 5:] = 0
    labels = torch.full_like(ids, T.IGNORE)
    labels[0, 6:] = ids[0, 6:]
    labels[1, 4:7] = ids[1, 4:7]
    labels[2, 3:5] = ids[2, 3:5]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_label_logits_loss_equals_transformers_loss(monkeypatch):
    model = tiny_llama()
    batch = _batch()
    with torch.no_grad():
        reference = model(**batch).loss  # HF shifts the labels itself
        logits, targets, rows = T.label_logits(model, batch)
        ours = torch.nn.functional.cross_entropy(logits, targets)
        monkeypatch.setattr(T, "_supports_logits_to_keep", lambda m: False)  # the full-logits fallback
        full, _, _ = T.label_logits(model, batch)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(full, logits, rtol=1e-5, atol=1e-5)
    assert rows.tolist() == [0] * 4 + [1] * 3 + [2] * 2  # the batch row of each supervised token


@pytest.fixture(scope="module")
def tiny_with_real_tokenizer(smollm2_tokenizer):
    model = tiny_llama(vocab_size=len(smollm2_tokenizer), hidden_size=16, intermediate_size=32)
    return model, smollm2_tokenizer


def _examples(n=12):
    texts = ["a fine film", "dull and long", "wonderful acting", "a mess", "great fun", "boring", "I loved it",
             "awful script", "charming", "tedious", "brilliant", "weak"]
    return [{"text": texts[i % len(texts)] + f" {i}", "label": "positive" if i % 2 == 0 else "negative"} for i in range(n)]


def test_classify_lm_single_token_and_general_scoring_agree(tiny_with_real_tokenizer):
    model, tok = tiny_with_real_tokenizer
    ex = _examples()
    task = make_task(Recipe(), tok, ex)
    assert task.single_token and task.words == ["negative", "positive"]
    fast, fast_pred = task.evaluate(model, ex, 5, torch.device("cpu"))
    task.single_token = False  # force the per-answer log-likelihood path
    slow, slow_pred = task.evaluate(model, ex, 5, torch.device("cpu"))
    assert fast_pred == slow_pred
    assert fast["accuracy"] == slow["accuracy"]
    assert fast["loss"] == pytest.approx(slow["loss"], rel=1e-5)


def test_classify_lm_prompt_ends_with_sentiment_and_trains_on_the_answer_only(tiny_with_real_tokenizer):
    _, tok = tiny_with_real_tokenizer
    task = make_task(Recipe(), tok, _examples())
    assert task.prompt("great").endswith("Sentiment:")
    batch = task.batch(_examples(2), torch.device("cpu"))
    supervised = batch["labels"][batch["labels"] != T.IGNORE].tolist()
    assert supervised == [task.answer_ids[1][0], task.answer_ids[0][0]]  # " positive", " negative"


def test_classify_lm_truncates_the_prompt_start_and_keeps_the_answer(tiny_with_real_tokenizer):
    _, tok = tiny_with_real_tokenizer
    task = make_task(Recipe(max_length=12), tok, _examples())
    batch = task.batch([{"text": "word " * 50, "label": "positive"}], torch.device("cpu"))
    assert batch["input_ids"].shape[1] == 12
    assert tok.decode(batch["input_ids"][0, -4:-1]).endswith("Sentiment:")
    assert batch["labels"][0, -1] == task.answer_ids[1][0]


def test_label_words_map_integer_labels(tiny_with_real_tokenizer):
    _, tok = tiny_with_real_tokenizer
    ex = [{"text": f"t{i}", "label": i % 2} for i in range(6)]
    task = make_task(Recipe(data="x.csv", label_words={"0": "bad", "1": "good"}), tok, ex)
    assert task.words == ["bad", "good"] and "Answer with one of: bad, good." in task.prompt("t")


def test_instruct_supervises_the_response_only(tiny_with_real_tokenizer):
    _, tok = tiny_with_real_tokenizer
    task = make_task(Recipe(task="instruct", data="chatterbot", max_length=128), tok, [])
    ex = {"prompt": "What is AI?", "response": "The study of thinking machines."}
    ids, labels = task.encode(ex)
    answer = tok.decode([t for t in labels if t != T.IGNORE])
    prompt = tok.decode([t for t, l in zip(ids, labels) if l == T.IGNORE])
    assert answer.startswith("The study of thinking machines.") and "<|im_end|>" in answer
    assert "What is AI?" in prompt and "thinking" not in prompt
    short_ids, short_labels = make_task(Recipe(task="instruct", data="chatterbot", max_length=20), tok, []).encode(ex)
    assert len(short_ids) == 20 and short_labels[-1] != T.IGNORE
