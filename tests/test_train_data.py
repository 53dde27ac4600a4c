"""Data: built-in sets, user files, deterministic disjoint splits, and bad input."""

from __future__ import annotations

import json

import pytest

from lorakit.train import data as D
from lorakit.train.errors import DataError
from lorakit.train.recipe import Recipe


def test_rotten_tomatoes_drops_plot_and_duplicates():
    ds = D.rotten_tomatoes()
    assert len(ds.examples) == 12752
    labels = [e["label"] for e in ds.examples]
    assert labels.count("positive") == 7368 and labels.count("negative") == 5384
    assert len({e["text"] for e in ds.examples}) == len(ds.examples)


def test_chatterbot_pairs_are_consecutive_turns():
    ds = D.chatterbot()
    # 2,306 pairs; DATA.md's 2,393 counted the characters of trivia.yml's one malformed string "conversation"
    assert ds.kind == "instruction" and len(ds.examples) == 2306
    assert all(e["prompt"] and e["response"] for e in ds.examples)


def test_split_is_deterministic_disjoint_and_seeded():
    ex = D.rotten_tomatoes().examples
    a = D.split(ex, 500, 64, seed=0)
    b = D.split(list(ex), 500, 64, seed=0)
    assert D.fingerprint(a.test) == D.fingerprint(b.test)
    assert a.sizes() == {"train": 12752 - 564, "val": 64, "test": 500}
    texts = [{e["text"] for e in part} for part in (a.train, a.val, a.test)]
    assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])
    c = D.split(ex, 500, 64, seed=1)
    assert D.fingerprint(c.test) != D.fingerprint(a.test)


def test_split_keeps_same_prompt_in_one_split():
    ex = [{"prompt": f"q{i % 10}", "response": f"a{i}"} for i in range(100)]
    ex += [{"prompt": "big", "response": f"b{i}"} for i in range(40)]  # a group larger than the held-out splits
    s = D.split(ex, 20, 10, seed=0)
    sets = [{e["prompt"] for e in part} for part in (s.train, s.val, s.test)]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    assert s.sizes() == {"train": 110, "val": 10, "test": 20} and "big" in sets[0]


def test_small_files_shrink_the_held_out_splits():
    ex = [{"text": f"t{i}", "label": i % 2} for i in range(20)]
    s = D.split(ex, 500, 64, seed=0)
    assert s.sizes() == {"train": 14, "val": 2, "test": 4}


def test_batches_cycle_with_a_seeded_shuffle():
    ex = list(range(10))
    it = D.batches(ex, 4, seed=3)
    first = [next(it) for _ in range(4)]
    again = D.batches(ex, 4, seed=3)
    assert first == [next(again) for _ in range(4)]
    assert sorted(first[0] + first[1]) == sorted(set(first[0] + first[1]))  # no repeats within an epoch


def _write(path, rows):
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        import pandas as pd

        pd.DataFrame(rows).to_csv(path, index=False)
    return str(path)


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_user_classification_file(tmp_path, suffix):
    rows = [{"review": f"text {i}", "stars": i % 3} for i in range(30)]
    ds = D.load_dataset(Recipe(data=_write(tmp_path / f"d{suffix}", rows), text_field="review", label_field="stars"))
    assert len(ds.examples) == 30 and {e["label"] for e in ds.examples} == {0, 1, 2}
    assert all(type(e["label"]) is int for e in ds.examples)


def test_user_instruction_file(tmp_path):
    rows = [{"q": f"question {i}", "a": f"answer {i}"} for i in range(10)] + [{"q": "no answer", "a": ""}]
    ds = D.load_dataset(Recipe(task="instruct", data=_write(tmp_path / "i.jsonl", rows), prompt_field="q", response_field="a"))
    assert len(ds.examples) == 10 and ds.skipped == 1


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        D.read_records(tmp_path / "nope.jsonl")
    (tmp_path / "e.jsonl").write_text("")
    with pytest.raises(DataError, match="is empty"):
        D.read_records(tmp_path / "e.jsonl")
    (tmp_path / "e.csv").write_text("\n  \n")
    with pytest.raises(DataError, match="is empty"):
        D.read_records(tmp_path / "e.csv")
    (tmp_path / "h.csv").write_text("text,label\n")
    with pytest.raises(DataError, match="no rows"):
        D.read_records(tmp_path / "h.csv")
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(DataError, match="unknown format"):
        D.read_records(tmp_path / "x.txt")
    (tmp_path / "bad.jsonl").write_text('{"a": 1}\n{oops\n')
    with pytest.raises(DataError, match="line 2"):
        D.read_records(tmp_path / "bad.jsonl")


def test_field_not_in_data_names_field_and_lists_columns(tmp_path):
    path = _write(tmp_path / "d.jsonl", [{"text": "a", "label": "x"}] * 5)
    with pytest.raises(DataError, match=r"'sentence'.*text, label|'sentence'.*label, text"):
        D.classification_file(path, "sentence", "label")


@pytest.mark.parametrize("bad,kind", [(0.5, "float"), ([1], "list"), (True, "bool"), ({"a": 1}, "dict")])
def test_labels_must_be_strings_or_ints(tmp_path, bad, kind):
    rows = [{"text": f"t{i}", "label": "pos"} for i in range(5)] + [{"text": "z", "label": bad}]
    path = _write(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError, match=rf"strings or integers; row 6 .*\({kind}\)"):
        D.classification_file(path, "text", "label")


def test_missing_label_and_single_class(tmp_path):
    path = _write(tmp_path / "d.csv", [{"text": "a", "label": 1}, {"text": "b", "label": None}, {"text": "c", "label": 0}])
    with pytest.raises(DataError, match="row 2 has no value"):
        D.classification_file(path, "text", "label")
    path = _write(tmp_path / "one.jsonl", [{"text": f"t{i}", "label": "same"} for i in range(5)])
    with pytest.raises(DataError, match="single value"):
        D.classification_file(path, "text", "label")


def test_wrong_kind_of_data_for_task():
    with pytest.raises(DataError, match="instruction data"):
        D.load_dataset(Recipe(data="chatterbot"))
