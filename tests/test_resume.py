"""Checkpoints and `lorakit train --resume` (issue 5): a run stopped after N steps and resumed for N
more ends bitwise equal to an uninterrupted run of 2N steps; checkpoints are atomic, pickle-free
and verified on read; bad `--resume` inputs are one-line errors (exit code 2) that leave the run
folder untouched; NaN/Inf losses or gradients stop training and keep the last good checkpoint."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tiny_run import adapter_tensors, flags, make_tiny, recipe_fields

import lorakit as lk
from lorakit import cli
from lorakit.train import load_recipe, run_train
from lorakit.train.checkpoint import (CHECKPOINTS, LATEST, CheckpointWriter, capture_rng, read_checkpoint, resume_recipe,
                                      step_name)
from lorakit.train.errors import CheckpointError, TrainingDiverged

QUIET = lambda message: None  # noqa: E731
# dropout > 0 and grad_accum 2: the resumed run must restore the RNG and the data position exactly
FIELDS = dict(steps=8, eval_every=3, save_every=2, grad_accum=2, lora={"target_modules": ["q_proj", "v_proj"], "dropout": 0.1})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def uninterrupted(tiny, tmp_path_factory):
    """An uninterrupted 8-step run (checkpoints every 2 steps)."""
    out = tmp_path_factory.mktemp("runs") / "full"
    report = run_train(load_recipe(None, recipe_fields(*tiny, **FIELDS, out=str(out))), log=QUIET)
    return out, report


def _recipe(tiny, out, **changes):
    return load_recipe(None, recipe_fields(*tiny, **{**FIELDS, **changes}, out=str(out)))


def _tree_hashes(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _assert_same_safetensors_file(a: Path, b: Path) -> None:
    """Identical files (lorakit writes the safetensors header with sorted keys)."""
    assert a.read_bytes() == b.read_bytes()


def test_stop_and_resume_is_bitwise_equal_to_an_uninterrupted_run(tiny, uninterrupted, tmp_path):
    full, full_report = uninterrupted
    out = tmp_path / "split"
    stopped = run_train(_recipe(tiny, out), log=QUIET, stop_after=4)
    assert stopped["stopped_at"] == 4 and stopped["checkpoint"].endswith(step_name(4))
    assert not (out / "adapter").exists() and (out / CHECKPOINTS / LATEST).read_text().strip() == step_name(4)
    recipe, folder = resume_recipe(out)
    assert folder == out / CHECKPOINTS / step_name(4)
    report = run_train(recipe, log=QUIET, resume=out)

    a, b = adapter_tensors(full), adapter_tensors(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bitwise
    assert (full / "adapter" / "adapter_config.json").read_bytes() == (out / "adapter" / "adapter_config.json").read_bytes()
    _assert_same_safetensors_file(full / "adapter" / "adapter_model.safetensors", out / "adapter" / "adapter_model.safetensors")
    assert report["training"]["history"] == full_report["training"]["history"]  # every step's loss, lr, grad norm
    timeless = lambda evals: [{k: v for k, v in e.items() if k != "train_seconds"} for e in evals]  # noqa: E731
    assert timeless(report["training"]["evals"]) == timeless(full_report["training"]["evals"])
    assert report["test"] == full_report["test"]
    assert report["checkpoints"]["resumed_at_step"] == 4 and full_report["checkpoints"]["resumed_at_step"] is None


def test_resume_after_sigkill_mid_training_is_bitwise_equal(tiny, uninterrupted, tmp_path):
    """A real interruption: the process is killed once its first checkpoint exists."""
    full, _ = uninterrupted
    out = tmp_path / "killed"
    argv = [sys.executable, "-m", "lorakit", "train", *flags(recipe_fields(*tiny, **FIELDS, out=str(out)))]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (out / CHECKPOINTS / LATEST).exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert (out / CHECKPOINTS / LATEST).exists()
    killed_at = read_checkpoint(out).step
    assert not (out / "report.json").exists(), "the run finished before it was killed"
    code = cli.main(["train", "--resume", str(out)])
    assert code == 0
    a, b = adapter_tensors(full), adapter_tensors(out)
    assert all(torch.equal(a[k], b[k]) for k in a), f"killed after step {killed_at}"


def test_checkpoint_files_are_safetensors_and_json(uninterrupted):
    full, report = uninterrupted
    root = full / CHECKPOINTS
    assert sorted(p.name for p in root.iterdir()) == [LATEST, step_name(6), step_name(8)]  # the newest two are kept
    folder = root / step_name(8)
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert files == ["adapter/adapter_config.json", "adapter/adapter_model.safetensors", "optimizer.safetensors",
                     "rng.safetensors", "trainer_state.json"]
    ckpt = read_checkpoint(folder)
    n_trainable = len(ckpt.state["trainable"])
    assert n_trainable == 8  # q_proj, v_proj x 2 layers x (A, B)
    # AdamW: exp_avg, exp_avg_sq and step for each trainable tensor; 8 bytes per trainable element in the moments
    assert len(ckpt.optimizer_tensors) == 3 * n_trainable
    moments = sum(t.numel() * t.element_size() for k, t in ckpt.optimizer_tensors.items() if not k.endswith(".step"))
    assert moments == 8 * report["lora"]["trainable"]
    assert ckpt.state["data"] == {**ckpt.state["data"], "global_micro_batch": 4, "shards": 1, "micro_batches_consumed": 16}
    assert torch.equal(ckpt.rng_tensors["torch_cpu.rank0"], ckpt.rng_tensors["torch_cpu.rank0"].to(torch.uint8))
    # the checkpoint's adapter is a plain PEFT adapter: the final adapter equals the step-8 one
    a, b = adapter_tensors(full), adapter_tensors(folder)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_default_checkpoint_interval_is_a_tenth_of_the_steps():
    assert load_recipe(None, {"steps": 40}).checkpoint_every == 4
    assert load_recipe(None, {"steps": 7}).checkpoint_every == 1
    assert load_recipe(None, {"steps": 40, "save_every": 0}).checkpoint_every == 0
    with pytest.raises(ValueError, match="save_every"):
        load_recipe(None, {"save_every": -1})
    with pytest.raises(ValueError, match="parallel"):
        load_recipe(None, {"parallel": "zero3"})


def _tiny_training_state(step: int):
    from helpers import tiny_llama

    import lorakit as lk
    from lorakit.train.loop import LoopConfig, LoopResult, make_optimizer

    model = tiny_llama()
    lk.inject(model, lk.LoraConfig(r=2, alpha=4, target_modules=["q_proj"]))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = make_optimizer(model, params, LoopConfig(steps=10, lr=0.1))
    for _ in range(step):
        model(torch.arange(8)[None]).logits.square().mean().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    return dict(model=model, optimizer=optimizer, scheduler=scheduler, result=LoopResult(), trainable=names, recipe={},
                data={"shards": 1}, world_size=1, rng=[capture_rng()], job={})


@pytest.mark.parametrize("stage", ["adapter", "optimizer", "rng", "state", "rename", "latest"])
def test_a_save_killed_at_any_stage_leaves_the_previous_checkpoint(tmp_path, stage):
    writer = CheckpointWriter(tmp_path)
    writer.save(1, **_tiny_training_state(1))
    before = _tree_hashes(tmp_path / CHECKPOINTS / step_name(1))

    def crash(at):
        if at == stage:
            raise KeyboardInterrupt("killed")  # nothing below runs, as with SIGKILL

    with pytest.raises(KeyboardInterrupt):
        writer.save(2, **_tiny_training_state(2), fail_at=crash)
    ckpt = read_checkpoint(tmp_path)
    assert ckpt.step == 1 and _tree_hashes(ckpt.folder) == before
    writer.save(3, **_tiny_training_state(3))  # the next save cleans up what the crash left
    assert sorted(p.name for p in (tmp_path / CHECKPOINTS).iterdir()) == [LATEST, step_name(1), step_name(3)]
    assert read_checkpoint(tmp_path).step == 3


# ---------------------------------------------------------------------- bad --resume inputs
def _corrupt(out: Path, case: str) -> None:
    folder = out / CHECKPOINTS / step_name(8)
    if case == "truncated optimizer":
        data = (folder / "optimizer.safetensors").read_bytes()
        (folder / "optimizer.safetensors").write_bytes(data[: len(data) // 2])
    elif case == "flipped byte":
        data = bytearray((folder / "adapter" / "adapter_model.safetensors").read_bytes())
        data[-5] ^= 0xFF
        (folder / "adapter" / "adapter_model.safetensors").write_bytes(bytes(data))
    elif case == "state not json":
        (folder / "trainer_state.json").write_text("{\"format\": \"lorakit-checkpoint\", ")
    elif case == "missing file":
        (folder / "rng.safetensors").unlink()
    elif case == "latest names a missing folder":
        (out / CHECKPOINTS / LATEST).write_text(step_name(99) + "\n")


RESUME_CASES = {
    "no checkpoint": ([], "no checkpoint there"),
    "truncated optimizer": ([], "optimizer.safetensors has"),
    "flipped byte": ([], "adapter/adapter_model.safetensors does not match its recorded sha256"),
    "state not json": ([], "trainer_state.json is not valid JSON"),
    "missing file": ([], "rng.safetensors is missing"),
    "latest names a missing folder": ([], "names step-000099, which does not exist"),
    "recipe mismatch": (["--lr", "0.01"], "recipe field 'lr' is 0.01 here but 0.002 in checkpoint"),
    "named recipe mismatch": (["chat"], "recipe field 'model' is 'smollm2' here but"),
    "steps below checkpoint": (["--steps", "5"], "steps 5 is below the checkpoint's step 8"),
    "other out": (["--out", "elsewhere"], "name different folders"),
}


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_bad_resume_exits_2_with_one_line_and_touches_nothing(uninterrupted, tmp_path, capsys, case):
    full, _ = uninterrupted
    out = tmp_path / "run"
    if case == "no checkpoint":
        out.mkdir()
        (out / "report.json").write_text("{}")
    else:
        shutil.copytree(full, out)
        _corrupt(out, case)
    before = _tree_hashes(out)
    argv, needle = RESUME_CASES[case]
    code = cli.main(["train", *argv, "--resume", str(out)])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("lorakit train: error: ") and needle in lines[0], lines[0]
    assert _tree_hashes(out) == before


def test_resume_with_changed_training_data_is_refused(tiny, uninterrupted, tmp_path, capsys):
    """The recorded recipe names the data file; a resumed run that reads a changed file must notice."""
    full, _ = uninterrupted
    out = tmp_path / "run"
    shutil.copytree(full, out)
    before = _tree_hashes(out)
    original = tiny[1].read_text()
    tiny[1].write_text("".join(line for i, line in enumerate(original.splitlines(keepends=True)) if i != 150))
    try:
        code = cli.main(["train", "--resume", str(out)])
    finally:
        tiny[1].write_text(original)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("lorakit train: error: --resume: the training split differs"), err
    assert _tree_hashes(out) == before


def test_resume_may_extend_steps_and_change_evaluation(uninterrupted, tmp_path):
    full, _ = uninterrupted
    out = tmp_path / "run"
    shutil.copytree(full, out)
    recipe, _ = resume_recipe(out, overrides={"steps": 10, "eval_every": 0, "threads": 2})
    assert (recipe.steps, recipe.eval_every, recipe.threads, recipe.lr) == (10, 0, 2, 0.002)
    with pytest.raises(CheckpointError, match="recipe field 'batch_size'"):
        resume_recipe(out, overrides={"batch_size": 8})
    # naming the same recipe again is fine: flags + recorded recipe agree
    asked = load_recipe(None, {**json.loads((out / "adapter" / "lorakit_train.json").read_text())["recipe"], "out": None})
    assert resume_recipe(out, asked)[0].lr == asked.lr


# ---------------------------------------------------------------------- NaN / Inf
def _poisoned_loss(monkeypatch, at_call: int, kind: str):
    from lorakit.train import tasks

    original = tasks.ClassifyLM.loss
    calls = {"n": 0}

    def loss(self, model, batch):
        value, n = original(self, model, batch)
        calls["n"] += 1
        if calls["n"] == at_call:
            if kind == "loss":
                value = value * float("nan")
            else:  # finite loss, NaN gradient: d sqrt(x)/dx at 0 is inf, times 0
                p = next(q for q in model.parameters() if q.requires_grad)
                value = value + torch.sqrt(0.0 * p.sum())
        return value, n

    monkeypatch.setattr(tasks.ClassifyLM, "loss", loss)


@pytest.mark.parametrize("kind,needle", [("loss", "the loss became nan at step 3"),
                                         ("grad", "the gradients became non-finite at step 3 (global norm nan)")],
                         ids=["loss", "gradients"])
def test_nan_stops_training_and_keeps_the_last_good_checkpoint(tiny, monkeypatch, tmp_path, kind, needle):
    out = tmp_path / "run"
    _poisoned_loss(monkeypatch, at_call=5, kind=kind)  # grad_accum 2: call 5 is step 3's first micro-batch
    with pytest.raises(TrainingDiverged) as info:
        run_train(_recipe(tiny, out, save_every=1), log=QUIET)
    message = str(info.value)
    assert needle in message and f"the last good checkpoint is {out / CHECKPOINTS / step_name(2)} (step 2)" in message
    assert "\n" not in message
    ckpt = read_checkpoint(out)
    assert ckpt.step == 2 and all(torch.isfinite(t).all() for t in ckpt.optimizer_tensors.values())
    assert not (out / "adapter").exists()


def test_nan_before_any_checkpoint_says_so(tiny, monkeypatch, tmp_path, capsys):
    out = tmp_path / "run"
    _poisoned_loss(monkeypatch, at_call=1, kind="loss")
    code = cli.main(["train", *flags(recipe_fields(*tiny, **FIELDS, out=str(out)))])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1] == ("lorakit train: error: training stopped: the loss became nan at step 1; lower the learning rate "
                       "(lr=0.002); no checkpoint was written")


@pytest.mark.parametrize("changes", [
    {"lora": {"target_modules": ["q_proj", "v_proj"], "use_dora": True}},
    {"task": "classify-head", "lora": {"target_modules": ["q_proj", "v_proj"], "modules_to_save": ["score"]}},
    {"lora": {"target_modules": "all-linear", "use_rslora": True, "bias": "lora_only"}, "weight_decay": 0.1, "schedule": "linear"},
    {"quantize": "nf4", "calibration_size": 16, "lora": {"target_modules": ["q_proj", "v_proj"]}},  # + frozen qera correction
    {"quantize": "nf4", "calibration_size": 16, "task": "classify-head",  # the head stays unquantized, trained in full
     "lora": {"target_modules": ["q_proj", "v_proj"], "modules_to_save": ["score"]}},
], ids=["dora", "head-modules-to-save", "all-linear-rslora-bias", "nf4-qera", "nf4-qera-head"])
def test_resume_is_bitwise_for_variants(tiny, tmp_path, changes):
    fields = dict(steps=4, save_every=0, grad_accum=2, **changes)
    full, split = tmp_path / "full", tmp_path / "split"
    run_train(load_recipe(None, recipe_fields(*tiny, **fields, out=str(full))), log=QUIET)
    run_train(load_recipe(None, recipe_fields(*tiny, **fields, out=str(split))), log=QUIET, stop_after=2)
    run_train(resume_recipe(split)[0], log=QUIET, resume=split)
    a, b = adapter_tensors(full), adapter_tensors(split)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    report = json.loads((full / "report.json").read_text())
    assert report["checks"]["reload_identical"] and report["checks"]["merged_predictions_equal"]
    if "modules_to_save" in changes["lora"]:
        assert any("score" in k for k in a)  # the trained head is in the saved adapter (also after the NF4 fold)


def test_a_folder_holding_a_previous_run_is_refused_without_overwrite(tiny, uninterrupted, tmp_path, capsys):
    full, _ = uninterrupted
    out = tmp_path / "run"
    shutil.copytree(full, out)
    before = _tree_hashes(out)
    code = cli.main(["train", *flags(recipe_fields(*tiny, steps=2, out=str(out)))])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1, lines
    assert f"output folder {out} holds a previous run (report.json, checkpoints, adapter); pass --overwrite" in lines[0]
    assert _tree_hashes(out) == before
    report = run_train(_recipe(tiny, out, steps=2, save_every=0), log=QUIET, overwrite=True)
    assert report["training"]["history"][-1]["step"] == 2
    assert _tree_hashes(out)["adapter/adapter_model.safetensors"] != before["adapter/adapter_model.safetensors"]


def test_a_target_that_matches_nothing_fails_before_the_base_evaluation(tiny, tmp_path):
    logged = []
    with pytest.raises(lk.TargetNotFoundError, match="q_prj"):
        run_train(_recipe(tiny, tmp_path / "run", lora={"target_modules": ["q_prj"]}), log=logged.append)
    assert not any("evaluating the base model" in m for m in logged), logged
    assert not (tmp_path / "run" / "report.json").exists()


def test_held_out_splits_smaller_than_asked_are_noted(tiny, tmp_path):
    logged = []
    with pytest.raises(lk.TargetNotFoundError):  # stops right after the data and model load
        run_train(_recipe(tiny, tmp_path / "run", test_size=10**6, lora={"target_modules": ["q_prj"]}), log=logged.append)
    assert any(m.startswith("note: the held-out splits are smaller than asked (test_size 1000000") for m in logged), logged
    logged.clear()
    with pytest.raises(lk.TargetNotFoundError):
        run_train(_recipe(tiny, tmp_path / "run", lora={"target_modules": ["q_prj"]}), log=logged.append)
    assert not any(m.startswith("note: the held-out splits") for m in logged), logged
