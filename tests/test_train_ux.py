"""`lorakit train` as users live it (issue 19): an unwritable --out fails before the work, one run per
output folder, the same file modes everywhere, runs that travel (absolute data paths, merge without
data, PEFT finds the base offline), CSV files as people write them, Ctrl-C keeps the steps, honest
reports. On the tiny model of `tiny_run` (a run takes seconds)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tiny_run import adapter_tensors, flags, make_tiny, recipe_fields

from lorakit import cli
from lorakit.train import load_recipe, run_train
from lorakit.train.checkpoint import read_checkpoint
from lorakit.train.outdir import LOCK_NAME, OutputLock

QUIET = lambda message: None  # noqa: E731
ROOT = os.geteuid() == 0 if hasattr(os, "geteuid") else False


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def finished(tiny, tmp_path_factory):
    """A finished 4-step run, its output folder and its report."""
    out = tmp_path_factory.mktemp("runs") / "done"
    report = run_train(load_recipe(None, recipe_fields(*tiny, steps=4, out=str(out))), log=QUIET)
    return out, report


def _train_argv(tiny, out, data=None, **changes) -> list[str]:
    return ["train", *flags(recipe_fields(tiny[0], data or tiny[1], **{"steps": 2, **changes}, out=str(out)))]


def _one_error_line(capsys, command="train") -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if not line.startswith("[lorakit]")]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"lorakit {command}: error: "), lines[0]
    return lines[0]


# ---------------------------------------------------------------------- item 1: --out checked first
def _read_only_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "readonly"
    folder.mkdir()
    folder.chmod(0o555)
    return folder


def test_train_into_a_file_path_fails_before_the_model_loads(tiny, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code = cli.main(_train_argv(tiny, blocker / "run"))
    err = capsys.readouterr().err
    assert code == 2 and "evaluating the base model" not in err and "loaded" not in err, err
    line = [x for x in err.splitlines() if x.startswith("lorakit train: error:")]
    assert line == [f"lorakit train: error: output folder {blocker / 'run'} cannot be created: {blocker} is a file, "
                    "not a folder"], err


def test_train_into_a_read_only_folder_is_one_line_and_exit_2_before_any_work(tiny, tmp_path, capsys, monkeypatch):
    ro = _read_only_folder(tmp_path)
    if ROOT:  # root ignores the mode: the kernel's answer to anyone else, for folders under `ro`
        real = tempfile.mkdtemp

        def mkdtemp(*args, dir=None, **kwargs):
            if dir is not None and Path(dir).absolute() == ro:
                raise PermissionError(13, "Permission denied", str(dir))
            return real(*args, dir=dir, **kwargs)
        monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)
    code = cli.main(_train_argv(tiny, ro / "run"))
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.strip().splitlines() == [f"lorakit train: error: output folder {ro / 'run'} cannot be created (in {ro}): "
                                        "Permission denied; choose another --out"], err
    assert list(ro.iterdir()) == []


def test_merge_into_an_unwritable_out_fails_before_loading(finished, tmp_path, capsys):
    out, _ = finished
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    code = cli.main(["merge", "--adapter", str(out / "adapter"), "--out", str(blocker / "merged")])
    assert code == 2
    line = _one_error_line(capsys, "merge")
    assert line == f"lorakit merge: error: output folder {blocker / 'merged'} cannot be created: {blocker} is a file, " \
                   "not a folder"


# ---------------------------------------------------------------------- item 7: one run per output folder
def test_a_second_run_into_a_locked_folder_is_refused(tiny, tmp_path, capsys):
    out = tmp_path / "busy"
    with OutputLock(out):
        code = cli.main(_train_argv(tiny, out))
        line = _one_error_line(capsys)
        assert code == 2
        assert line.startswith(f"lorakit train: error: output folder {out} is in use by another lorakit run (process "
                               f"{os.getpid()} on "), line
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # the refused run wrote nothing
    assert not out.exists()  # the lock's folder, created for it and still empty, is gone


def test_a_stale_lock_of_a_dead_process_is_cleared(tiny, tmp_path):
    out = tmp_path / "stale"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / LOCK_NAME).write_text(json.dumps({"pid": dead.pid, "host": os.uname().nodename, "since": 0}))
    logged = []
    report = run_train(load_recipe(None, recipe_fields(*tiny, steps=2, save_every=0, out=str(out))), log=logged.append)
    assert report["training"]["history"][-1]["step"] == 2
    assert f"cleared a stale lock on {out} left by process {dead.pid} (it is gone)" in logged
    assert not (out / LOCK_NAME).exists()  # released at the end


def test_the_lock_is_held_while_the_run_writes(tiny, tmp_path):
    out = tmp_path / "held"
    seen = []

    def log(message):
        if message.startswith("after:"):  # mid-run: a second lock must be refused
            try:
                OutputLock(out).acquire()
                seen.append("acquired")
            except Exception as exc:  # noqa: BLE001
                seen.append(str(exc))
    run_train(load_recipe(None, recipe_fields(*tiny, steps=2, save_every=0, out=str(out))), log=log)
    assert len(seen) == 1 and "is in use by another lorakit run" in seen[0], seen


# ---------------------------------------------------------------------- item 9: one file mode rule
def _modes(folder: Path) -> dict[str, int]:
    return {p.relative_to(folder).as_posix(): p.stat().st_mode & 0o777 for p in folder.rglob("*")}


def test_every_file_of_train_and_merge_gets_the_same_mode(finished, tmp_path):
    out, _ = finished
    merged = tmp_path / "merged"
    assert cli.main(["merge", "--adapter", str(out / "adapter"), "--out", str(merged)]) == 0
    umask = os.umask(0)
    os.umask(umask)
    files = {**_modes(out), **{"merged/" + k: v for k, v in _modes(merged).items()}}
    assert "merged/model.safetensors" in files and "adapter/adapter_model.safetensors" in files
    wrong = {k: oct(v) for k, v in files.items()
             if v != (0o777 & ~umask if (out / k).is_dir() or (tmp_path / k).is_dir() else 0o666 & ~umask)}
    assert wrong == {}
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]  # no temporary folder left beside it


def test_a_merge_that_fails_while_saving_leaves_no_half_folder(finished, tmp_path, monkeypatch):
    from transformers import PreTrainedTokenizerFast

    out, _ = finished

    def broken(self, *args, **kwargs):
        raise OSError(28, "No space left on device", "tokenizer.json")
    monkeypatch.setattr(PreTrainedTokenizerFast, "save_pretrained", broken)
    assert cli.main(["merge", "--adapter", str(out / "adapter"), "--out", str(tmp_path / "merged")]) == 2
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------- item 2: a run that travels
def test_merge_and_eval_work_from_another_folder_and_merge_needs_no_data(tiny, tmp_path, monkeypatch, capsys):
    model_dir, data = tiny
    home, elsewhere = tmp_path / "home", tmp_path / "elsewhere"
    home.mkdir()
    elsewhere.mkdir()
    (home / "reviews.jsonl").write_bytes(data.read_bytes())
    monkeypatch.chdir(home)  # relative paths, as a user types them
    fields = recipe_fields(model_dir, Path("reviews.jsonl"), steps=3, save_every=0, out="run")
    assert cli.main(["train", *flags(fields)]) == 0
    info = json.loads((home / "run" / "adapter" / "lorakit_train.json").read_text())
    assert info["recipe"]["data"] == str(home / "reviews.jsonl")
    assert info["data"]["sha256"] == hashlib.sha256(
        f"reviews.jsonl\0{hashlib.sha256(data.read_bytes()).hexdigest()}\n".encode()).hexdigest()
    report = json.loads((home / "run" / "report.json").read_text())
    assert report["adapter"]["path"] == str(home / "run" / "adapter")
    assert f"lorakit eval --adapter {home / 'run' / 'adapter'}" in (home / "run" / "report.md").read_text()

    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    assert cli.main(["eval", "--adapter", str(home / "run" / "adapter")]) == 0
    assert f"reproduced the recorded accuracy {report['test']['after']['accuracy']:.4f}" in capsys.readouterr().out
    (home / "reviews.jsonl").rename(home / "moved.jsonl")  # merging needs only the adapter and the base
    assert cli.main(["merge", "--adapter", str(home / "run" / "adapter"), "--out", "merged"]) == 0
    assert (elsewhere / "merged" / "model.safetensors").is_file()
    err = capsys.readouterr().err
    assert "merged model written to merged; logits max |diff| merged vs unmerged: " in err


def test_eval_warns_when_the_data_changed_since_training(finished, tiny, capsys, tmp_path):
    out, _ = finished
    original = tiny[1].read_text()
    tiny[1].write_text(original.replace("great", "grand", 1))
    try:
        cli.main(["eval", "--adapter", str(out / "adapter")])
    finally:
        tiny[1].write_text(original)
    assert f"warning: data {tiny[1]} changed since the run was trained (sha256 " in capsys.readouterr().err
    other = tmp_path / "other.jsonl"  # another file given with --data is not "the data changed"
    other.write_text("".join(original.splitlines(True)[:20]))
    assert cli.main(["eval", "--adapter", str(out / "adapter"), "--data", str(other)]) == 0
    err = capsys.readouterr().err
    assert "changed since the run was trained" not in err and "on all 20 examples" in err
    assert "-> train" not in err and "held-out splits are smaller" not in err  # the whole file, no split


def test_eval_on_another_file_refuses_labels_the_run_never_learned(finished, tiny, tmp_path, capsys):
    out, _ = finished
    rows = [json.loads(line) for line in tiny[1].read_text().splitlines()[:20]]
    renamed = tmp_path / "renamed.jsonl"  # good/bad instead of positive/negative: the answers would be other words
    word = {"positive": "good", "negative": "bad"}
    renamed.write_text("".join(json.dumps({**r, "label": word[r["label"]]}) + "\n" for r in rows))
    assert cli.main(["eval", "--adapter", str(out / "adapter"), "--data", str(renamed)]) == 2
    line = _one_error_line(capsys, "eval")
    assert "'bad', 'good' were not trained" in line and "'negative', 'positive'" in line
    # two rows of one label: scored as they are, the answer chosen among both trained labels
    few = tmp_path / "few.jsonl"
    few.write_text("".join(json.dumps(r) + "\n" for r in [r for r in rows if r["label"] == "positive"][:2]))
    assert cli.main(["eval", "--adapter", str(out / "adapter"), "--data", str(few), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["split"] == "all" and result["metrics"]["n"] == 2


def test_a_classification_head_run_merges_without_its_data(tiny, tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification

    data = tmp_path / "reviews.jsonl"
    data.write_bytes(tiny[1].read_bytes())
    out = tmp_path / "head"
    run_train(load_recipe(None, recipe_fields(tiny[0], data, task="classify-head", steps=3, save_every=0, out=str(out),
                                              lora={"target_modules": ["q_proj", "v_proj"],
                                                    "modules_to_save": ["score"]})), log=QUIET)
    data.unlink()
    assert cli.main(["merge", "--adapter", str(out / "adapter"), "--out", str(tmp_path / "merged")]) == 0
    diff = float(capsys.readouterr().err.rsplit("merged vs unmerged: ", 1)[1].split()[0])
    assert diff < 1e-5
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    assert merged.config.id2label == {0: "negative", 1: "positive"}
    assert not any("lora" in k for k in merged.state_dict())


# ---------------------------------------------------------------------- item 8: PEFT finds the base offline
_PEFT_OFFLINE = """
import json, sys, torch
from peft import AutoPeftModelForCausalLM
model = AutoPeftModelForCausalLM.from_pretrained(sys.argv[1]).eval()
with torch.no_grad():
    print(json.dumps(model(input_ids=torch.tensor([[5, 6, 7, 8, 9]])).logits.flatten().tolist()))
"""


def test_peft_auto_model_loads_the_adapter_offline_with_the_same_logits(tiny, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    import lorakit as lk

    monkeypatch.chdir(tiny[0].parent)  # the model named by a relative path, as users type it
    out = tmp_path / "run"
    report = run_train(load_recipe(None, recipe_fields(Path("model"), tiny[1], steps=2, save_every=0, out=str(out))),
                       log=QUIET)
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert Path(config["base_model_name_or_path"]).is_absolute()
    assert config["base_model_name_or_path"] == report["model"]["path"] == str(tiny[0].resolve())
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run([sys.executable, "-c", _PEFT_OFFLINE, str(out / "adapter")], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    peft_logits = torch.tensor(json.loads(proc.stdout.strip().splitlines()[-1]))
    ours = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"]).eval()
    lk.load_adapter(ours, out / "adapter")
    with torch.no_grad():
        mine = ours(input_ids=torch.tensor([[5, 6, 7, 8, 9]])).logits.flatten()
    assert float((peft_logits - mine).abs().max()) < 1e-5


# ---------------------------------------------------------------------- item 11: CSV files as people write them
def _csv_of(tiny_data: Path, path: Path, sep: str, encoding: str) -> None:
    rows = [json.loads(line) for line in tiny_data.read_text().splitlines()]
    lines = [f"review{sep}stars"] + [f"{r['text']} café{sep}{r['label']}" for r in rows]
    path.write_bytes(("\n".join(lines) + "\n").encode(encoding))


def test_a_latin1_csv_names_the_line_and_the_encoding_option(tiny, tmp_path, capsys):
    data = tmp_path / "reviews.csv"
    _csv_of(tiny[1], data, ",", "latin-1")
    code = cli.main(_train_argv(tiny, tmp_path / "run", data=str(data), text_field="review", label_field="stars"))
    assert code == 2
    assert _one_error_line(capsys) == (f"lorakit train: error: data file {data}, line 2: byte 0xe9 is not utf-8 text; "
                                       "pass the file's encoding with --encoding (e.g. --encoding latin-1 or cp1252)")
    assert not (tmp_path / "run").exists()


def test_a_semicolon_latin1_csv_trains_with_encoding(tiny, tmp_path, capsys):
    data = tmp_path / "reviews.csv"
    _csv_of(tiny[1], data, ";", "latin-1")
    out = tmp_path / "run"
    code = cli.main(_train_argv(tiny, out, data=str(data), text_field="review", label_field="stars", encoding="latin-1",
                                save_every=0))
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["data"]["total"] == 200 and report["task"]["labels"] == ["negative", "positive"]
    assert report["recipe"]["encoding"] == "latin-1"


def test_a_csv_line_with_too_many_fields_is_named(tiny, tmp_path, capsys):
    data = tmp_path / "reviews.csv"
    data.write_text("text,label\ngood movie,positive\ngood, fun movie,positive\nbad film,negative\n")
    code = cli.main(_train_argv(tiny, tmp_path / "run", data=str(data)))
    assert code == 2
    assert _one_error_line(capsys) == (f"lorakit train: error: data file {data}, line 3: 3 fields where the header has "
                                       "2 (delimiter ','); quote values that contain it")


def test_an_unknown_encoding_is_refused(tiny, tmp_path, capsys):
    assert cli.main(_train_argv(tiny, tmp_path / "run", encoding="klingon")) == 2
    assert "recipe field 'encoding' is 'klingon', not a text encoding Python knows" in _one_error_line(capsys)


# ---------------------------------------------------------------------- item 10: Ctrl-C keeps the steps
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_finishes_the_step_checkpoints_and_prints_the_resume_command(tiny, tmp_path, sig):
    fields = dict(steps=150, save_every=0, eval_every=0, lora={"target_modules": ["q_proj", "v_proj"], "dropout": 0.1})
    full = tmp_path / "full"
    run_train(load_recipe(None, recipe_fields(*tiny, **fields, out=str(full))), log=QUIET)

    out = tmp_path / "interrupted"
    argv = [sys.executable, "-m", "lorakit", "train", *flags(recipe_fields(*tiny, **fields, out=str(out)))]
    proc = subprocess.Popen(argv, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    err = []
    for line in proc.stderr:  # without a terminal the loop logs step 1, then every 10 steps; 149 more steps leave time to signal
        err.append(line)
        if line.startswith("[lorakit] step 1/150"):
            proc.send_signal(sig)
            break
    rest, tail = proc.communicate(timeout=300)
    err = "".join(err) + tail
    assert proc.returncode == 128 + sig, err
    state = read_checkpoint(out)
    assert 1 <= state.step < 150 and not (out / "report.json").exists()
    command = f"lorakit train --resume {out}"
    assert rest.strip().splitlines()[-1] == (f"interrupted after step {state.step}; checkpoint {state.folder}; "
                                             f"continue with: {command}")
    assert f"{signal.Signals(sig).name}: finishing the current step" in err
    assert "continue with" not in err  # said once, on stdout

    assert cli.main(command.split()[1:]) == 0
    a, b = adapter_tensors(full), adapter_tensors(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # no step lost or repeated


# ---------------------------------------------------------------------- item 4: reports with context
def test_wilson_bounds_are_where_the_score_test_is_at_z():
    from lorakit.train.stats import Z95, wilson

    for k, n in [(0, 5), (1, 1), (5, 5), (343, 500), (7, 100)]:
        lo, hi = wilson(k, n)
        p = k / n
        for bound in (lo, hi):
            if 0 < bound < 1:
                assert abs(abs(p - bound) / math.sqrt(bound * (1 - bound) / n) - Z95) < 1e-9
        assert lo <= p <= hi
    assert wilson(1, 1)[0] > 0.2 and wilson(1, 1)[1] == 1.0  # "accuracy 1.0 (n=1)" means little


def test_wilson_and_newcombe_intervals_cover_95_percent():
    """Coverage by simulation (seeded): paired outcomes with a known true gain."""
    from lorakit.train.stats import paired_gain, wilson

    rng = random.Random(0)
    n, trials, p_before, p_after = 150, 2000, 0.6, 0.7
    cover_w = cover_g = 0
    for _ in range(trials):
        before, after = [], []
        for _ in range(n):
            u = rng.random()  # correlated outcomes: the same example is easy or hard for both
            before.append(u < p_before)
            after.append(u < p_after if rng.random() < 0.8 else rng.random() < p_after)
        lo, hi = wilson(sum(after), n)
        cover_w += lo <= p_after <= hi
        g = paired_gain(before, after)
        true_gain = p_after - p_before  # E[after] - E[before]
        cover_g += g["ci95"][0] <= true_gain <= g["ci95"][1]
    assert 0.93 <= cover_w / trials <= 0.975
    assert 0.93 <= cover_g / trials <= 0.98


def test_paired_gain_counts_and_a_zero_gain():
    from lorakit.train.stats import paired_gain

    g = paired_gain([True, True, False, False], [True, False, True, False])
    assert g["gain"] == 0.0 and g["gained"] == 1 and g["lost"] == 1 and g["ci95"][0] < 0 < g["ci95"][1]


def _skewed(tiny_data: Path, path: Path, keep_negative: int) -> Path:
    rows = [json.loads(line) for line in tiny_data.read_text().splitlines()]
    negatives = [r for r in rows if r["label"] == "negative"][:keep_negative]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows if r["label"] == "positive" or r in negatives))
    return path


def test_a_skewed_run_reports_the_majority_baseline_intervals_and_confusion(tiny, tmp_path, capsys):
    data = _skewed(tiny[1], tmp_path / "skewed.jsonl", keep_negative=25)
    out = tmp_path / "run"
    assert cli.main(_train_argv(tiny, out, data=data, steps=3, test_size=40, save_every=0)) == 0
    stdout = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    st = report["test"]["stats"]
    n = report["data"]["sizes"]["test"]
    assert st["n"] == n == sum(st["gold_counts"].values())
    assert st["majority_baseline"]["label"] == "positive"
    assert st["majority_baseline"]["accuracy"] == st["gold_counts"]["positive"] / n
    for form in ("before", "after", "merged"):
        acc = st["accuracy"][form]
        assert acc["accuracy"] == report["test"][form]["accuracy"]
        assert acc["ci95"][0] < acc["accuracy"] < acc["ci95"][1] or acc["accuracy"] in (0.0, 1.0)
        assert sum(st["predicted_counts"][form].values()) == n
        matrix = st["confusion"][form]
        assert sum(map(sum, matrix)) == n and sum(matrix[i][i] for i in range(2)) == acc["correct"]
    gain = st["gain"]
    assert abs(100 * gain["gain"] - report["gain_points"]) < 1e-9 and gain["ci95"][0] <= gain["gain"] <= gain["ci95"][1]
    md = (out / "report.md").read_text()
    assert md.startswith("# lorakit train: classify-lm on skewed.jsonl\n")
    assert "sentiment" not in md.splitlines()[0]
    assert f"always answering the majority class `positive`: {100 * st['majority_baseline']['accuracy']:.1f}%" in md
    assert "Confusion matrix after training" in md and "(paired, Newcombe)" in md
    assert f"majority class 'positive': {st['majority_baseline']['accuracy']:.4f}" in stdout
    assert f"95% CI {100 * gain['ci95'][0]:+.1f} to {100 * gain['ci95'][1]:+.1f}, paired" in stdout


def test_a_tiny_test_set_is_warned_about(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(_train_argv(tiny, out, test_size=5, save_every=0)) == 0
    stdout = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["test"]["stats"]["warnings"][0].startswith("only 5 test examples")
    assert "warning: only 5 test examples" in stdout
    assert "> **Warning:** only 5 test examples" in (out / "report.md").read_text()


# ---------------------------------------------------------------------- item 5: truncation counted and reported
def test_truncation_is_counted_logged_reported_and_keeps_the_document_start(tiny, tmp_path, capsys):
    from transformers import AutoTokenizer

    from lorakit.train.recipe import GENERIC_TEMPLATE

    rows = [json.loads(line) for line in tiny[1].read_text().splitlines()]
    for i, r in enumerate(rows):
        if i % 3 == 0:  # a third of the documents are long: a headline first, then filler
            r["text"] = f"great {i} " + " ".join(["movie", "film", "plot"] * 12)
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    assert cli.main(_train_argv(tiny, out, data=data, max_length=32, save_every=0)) == 0
    err = capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    tr = report["truncation"]

    tok = AutoTokenizer.from_pretrained(tiny[0])
    prompt = lambda text: GENERIC_TEMPLATE.format(text=text, choices="negative, positive")  # noqa: E731
    full = {r["text"]: len(tok(prompt(r["text"]))["input_ids"]) + 1 for r in rows}  # + the one-token answer
    test_texts = [t for t in full if t.startswith("great") and t.split()[1].isdigit() and int(t.split()[1]) % 3 == 0]
    assert test_texts
    n_long = sum(n > 32 for n in full.values())
    assert n_long == len(test_texts)
    assert tr["splits"]["train"]["truncated"] + tr["splits"]["test"]["truncated"] <= n_long
    assert tr["splits"]["train"]["truncated"] > 0
    assert tr["splits"]["train"]["longest"] == max(full.values())
    assert tr["suggested_max_length"] >= max(full.values()) - 8 and tr["suggested_max_length"] % 8 == 0
    assert tr["rule"].startswith("the document keeps its start")
    assert "truncation: " in err and f"--max-length {tr['suggested_max_length']} would fit 95%" in err
    assert "**Truncated:**" in (out / "report.md").read_text()

    from lorakit.train.prepare import make_task

    task = make_task(load_recipe(None, recipe_fields(*tiny, max_length=32)), tok, rows)
    long_example = next(r for r in rows if r["text"] in test_texts)
    ids, labels = task.encode(long_example)
    full_ids = tok(prompt(long_example["text"]))["input_ids"]
    answer = tok(" " + long_example["label"], add_special_tokens=False)["input_ids"]
    tail = tok("\nAnswer with one of: negative, positive.\nAnswer:", add_special_tokens=False)["input_ids"]
    assert len(ids) == 32 and len(full_ids) + 1 > 32
    assert ids[:3] == full_ids[:3]  # "Text: great <i>": the document's start is kept
    assert ids[-len(tail) - 1:] == tail + answer and labels[-1] == answer[0]  # the question and the answer cue too


# ---------------------------------------------------------------------- item 3: your own test and validation files
def test_own_test_and_validation_files_are_used_whole_and_never_trained_on(tiny, tmp_path, capsys):
    rows = [json.loads(line) for line in tiny[1].read_text().splitlines()]
    test_rows = rows[:30] + [{"text": f"great fun film extra{i}", "label": "positive"} for i in range(60)]
    val_rows = rows[30:40]
    for name, part in (("test", test_rows), ("val", val_rows)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    out = tmp_path / "run"
    argv = _train_argv(tiny, out, save_every=0, test_data=str(tmp_path / "test.jsonl"))
    assert cli.main(argv + ["--eval-data", str(tmp_path / "val.jsonl")]) == 0
    err = capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["data"]["sizes"] == {"train": 200 - 40, "val": 10, "test": 90}  # whole files, beyond the 20% cap
    assert report["test"]["after"]["n"] == 90
    assert report["data"]["test_file"]["path"] == str(tmp_path / "test.jsonl")
    assert report["recipe"]["val_data"] == str(tmp_path / "val.jsonl")
    assert f"dropped 40 examples of {tiny[1]} whose text is also in" in err
    from lorakit.train.data import fingerprint

    assert report["data"]["test_fingerprint"] == fingerprint(test_rows)  # as given, in file order

    capsys.readouterr()
    assert cli.main(["eval", "--adapter", str(out / "adapter")]) == 0
    stdout = capsys.readouterr().out
    assert stdout.startswith("test (90 examples)") and "reproduced the recorded accuracy" in stdout


def test_eval_with_data_scores_the_whole_file(finished, tiny, tmp_path, capsys):
    out, _ = finished
    capsys.readouterr()
    assert cli.main(["eval", "--adapter", str(out / "adapter"), "--data", str(tiny[1]), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["split"] == "all" and result["metrics"]["n"] == 200  # not the 40 of a 20% test split
    assert cli.main(["eval", "--adapter", str(out / "adapter"), "--data", str(tiny[1]), "--split", "test",
                     "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["metrics"]["n"] == 20


def test_a_missing_test_file_fails_before_the_model_loads(tiny, tmp_path, capsys):
    assert cli.main(_train_argv(tiny, tmp_path / "run", test_data=str(tmp_path / "nope.jsonl"))) == 2
    assert _one_error_line(capsys) == f"lorakit train: error: data file {tmp_path / 'nope.jsonl'} does not exist"
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------- item 12: progress, skippable fixed costs
def test_progress_with_eta_for_training_and_evaluations(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_PROGRESS_SECONDS", "0")  # without a terminal: a log line per forward pass
    logged = []
    run_train(load_recipe(None, recipe_fields(*tiny, steps=8, test_size=40, eval_batch_size=8, save_every=0,
                                              out=str(tmp_path / "run"))), log=logged.append)
    steps = [m for m in logged if m.startswith("step ")]
    assert steps and all(" eta " in m for m in steps if not m.startswith("step 8/8")), steps
    for desc, batches in (("evaluating the base model", 5), ("evaluating the trained model", 5),
                          ("checking the merged model", 2)):  # 40 test examples in batches of 8; the quick check: 2
        lines = [m for m in logged if m.startswith(desc + ": ")]
        assert [m.split(": ")[1].split(",")[0] for m in lines] == [f"{i}/{batches} batches" for i in range(1, batches)]
        assert all(", eta " in m for m in lines)
    assert "the first 16 of 40 test examples" in next(m for m in logged if m.startswith("merged: "))


def test_no_eval_before_and_no_merge_check(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(_train_argv(tiny, out, save_every=0) + ["--no-eval-before", "--no-merge-check"]) == 0
    captured = capsys.readouterr()
    assert "[lorakit] evaluating the base model on" not in captured.err
    assert "not checking the merged model" in captured.err
    report = json.loads((out / "report.json").read_text())
    assert set(report["test"]) == {"after", "stats"} and "gain_points" not in report
    assert report["checks"]["merge_check"] == "off" and report["checks"]["merged_predictions_equal"] is None
    assert report["checks"]["reload_identical"]
    assert "merged model: not checked" in (out / "report.md").read_text()
    assert "no base evaluation" in captured.out


def test_full_merge_check_compares_every_test_prediction(tiny, tmp_path):
    from lorakit.train.errors import RecipeError

    report = run_train(load_recipe(None, recipe_fields(*tiny, test_size=40, eval_batch_size=8, save_every=0,
                                                       out=str(tmp_path / "run"))), log=QUIET, merge_check="full")
    assert report["checks"]["merged_examples"] == 40 and report["test"]["merged"]["n"] == 40
    assert report["checks"]["merged_predictions_equal"]
    with pytest.raises(RecipeError, match="merge_check must be one of quick, full, off"):
        run_train(load_recipe(None, recipe_fields(*tiny, out=str(tmp_path / "x"))), merge_check="fast")


# ---------------------------------------------------------------------- item 13: --epochs, TensorBoard
def test_epochs_decide_the_steps(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(_train_argv(tiny, out, save_every=0, grad_accum=2) + ["--epochs", "1.5"]) == 0
    report = json.loads((out / "report.json").read_text())
    train_n = report["data"]["sizes"]["train"]
    per_epoch = (train_n // 4) / 2  # whole batches of 4, two a step
    assert report["training"]["steps"] == math.ceil(1.5 * per_epoch) == len(report["training"]["history"])
    assert report["recipe"]["epochs"] == 1.5 and report["recipe"]["steps"] == report["training"]["steps"]
    assert f"epochs 1.5: {report['training']['steps']} steps" in capsys.readouterr().err


def test_tensorboard_event_files_hold_the_run(tiny, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert cli.main(_train_argv(tiny, out, steps=4, eval_every=2, save_every=0) + ["--tensorboard"]) == 0
    report = json.loads((out / "report.json").read_text())
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    loss = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert loss == [(h["step"], pytest.approx(h["loss"])) for h in report["training"]["history"]]
    assert [e.step for e in events.Scalars("val/loss")] == [e["step"] for e in report["training"]["evals"]]
    test = {e.step: e.value for e in events.Scalars("test/accuracy")}
    assert test == {0: pytest.approx(report["test"]["before"]["accuracy"]), 4: pytest.approx(report["test"]["after"]["accuracy"])}


# ---------------------------------------------------------------------- item 6: memory estimated before the work
def test_a_step_that_cannot_fit_is_refused_before_any_work(tiny, tmp_path, capsys, monkeypatch):
    import lorakit.train.job as job

    monkeypatch.setattr(job, "available_bytes", lambda device: 2**20)  # a machine with 1 MiB free
    out = tmp_path / "run"
    assert cli.main(_train_argv(tiny, out)) == 2
    err = capsys.readouterr().err
    assert "[lorakit] evaluating the base model on" not in err
    line = [x for x in err.splitlines() if x.startswith("lorakit train: error:")]
    assert len(line) == 1 and "a training step needs about" in line[0] and "but 0.0 GiB are available" in line[0]
    assert "lower it with --batch-size (with --grad-accum to keep the batch), --max-length, --gradient-checkpointing " \
           "on, --quantize nf4; --no-memory-check runs it anyway" in line[0]
    assert not out.exists()
    assert cli.main(_train_argv(tiny, out, save_every=0) + ["--no-memory-check"]) == 0
    assert "[lorakit] warning: a training step needs about" in capsys.readouterr().err


def test_the_estimate_counts_lora_optimizer_and_activations(tiny, tmp_path):
    from transformers import AutoConfig

    report = run_train(load_recipe(None, recipe_fields(*tiny, steps=1, save_every=0, out=str(tmp_path / "run"))),
                       log=QUIET)
    est = report["memory"]["estimate"]
    cfg = AutoConfig.from_pretrained(tiny[0])
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    q = 8 * (cfg.hidden_size + cfg.hidden_size)  # r x (in + out)
    v = 8 * (cfg.hidden_size + cfg.num_key_value_heads * head_dim)
    lora = cfg.num_hidden_layers * (q + v)
    assert lora == report["lora"]["trainable"]
    assert (est["lora"], est["gradients"], est["adamw"]) == (4 * lora, 4 * lora, 8 * lora)
    tokens = 4 * 96
    assert est["activations"] == cfg.num_hidden_layers * 4 * tokens * (10 * cfg.hidden_size + 3 * cfg.intermediate_size)
    assert est["total"] == sum(est[k] for k in ("process", "lora", "gradients", "adamw", "activations", "logits"))
    assert est["available"] > 0


# ---------------------------------------------------------------------- item 14: analyze and a shared seed
def test_analyze_says_when_a_similarity_reflects_a_shared_init(tiny, finished, tmp_path, capsys):
    out1, _ = finished  # seed 0
    same = tmp_path / "same-seed"
    other = tmp_path / "other-seed"
    run_train(load_recipe(None, recipe_fields(*tiny, steps=4, lr=1e-3, save_every=0, out=str(same))), log=QUIET)
    run_train(load_recipe(None, recipe_fields(*tiny, steps=4, seed=1, save_every=0, out=str(other))), log=QUIET)
    capsys.readouterr()
    assert cli.main(["analyze", str(out1 / "adapter"), str(same / "adapter")]) == 0
    md = capsys.readouterr().out
    assert "they share their initialisation (both recorded seed 0 in lorakit_train.json)" in md
    assert "**shared: A's similarity mostly reflects the common random init**" in md
    assert cli.main(["analyze", str(out1 / "adapter"), str(other / "adapter"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    shared = result["similarity"]["shared_init"]
    assert not shared["likely"] and shared["recorded_seeds"] == [0, 1]
    assert 1.2 < shared["median_A_relative_difference"] < 1.6  # two independent Kaiming-uniform draws: ~sqrt(2)
    assert not any("share their initialisation" in w for w in result["warnings"])


def test_validation_accuracy_is_logged_with_its_interval(tiny, tmp_path):
    from lorakit.train.stats import wilson

    logged = []
    report = run_train(load_recipe(None, recipe_fields(*tiny, steps=2, save_every=0, out=str(tmp_path / "run"))),
                       log=logged.append)
    first = report["training"]["evals"][0]
    low, high = wilson(round(first["accuracy"] * first["n"]), first["n"])
    assert any(m.startswith("eval @ step 0:") and m.endswith(f"(accuracy 95% CI {low:.3f}-{high:.3f}, n=8)")
               for m in logged), logged


def test_the_summary_line_says_which_examples_the_merged_accuracy_covers(finished, capsys):
    out, report = finished
    k, n = report["checks"]["merged_examples"], report["test"]["after"]["n"]
    cli._print_train_summary(report, SimpleNamespace(out_dir=out))
    line = capsys.readouterr().out.splitlines()[0]
    assert line.startswith("test accuracy: ") and f", n={n};" in line
    assert (f"(merged, first {k} examples)" in line) == (k < n) and ("(merged)" in line) == (k == n)
    full = {**report, "checks": {**report["checks"], "merged_examples": n}}
    cli._print_train_summary(full, SimpleNamespace(out_dir=out))
    assert "(merged)," in capsys.readouterr().out
