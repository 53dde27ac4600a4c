"""Multi-process training (issue 9): `lorakit train --nproc-per-node 2` on the CPU (gloo).

Two processes with `batch_size` b train the same adapter as one process with `batch_size` 2b (to
1e-5), both ranks end identical, and only the trainable tensors are all-reduced (counted by the
DDP comm hook, compared with the adapter file). A 2-process checkpoint resumed in one process
continues to the 2-process result. FSDP2 shards the frozen base and gives the same adapter; with
a bitsandbytes NF4 base it is refused before any process starts.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from tiny_run import adapter_tensors, flags, make_tiny, max_abs_diff, recipe_fields

from lorakit import cli
from lorakit.train import load_recipe, run_train
from lorakit.train.checkpoint import CHECKPOINTS, LATEST, read_checkpoint, resume_recipe, step_name
from lorakit.train.distributed import World, world_from_env
from lorakit.train.errors import CheckpointError

QUIET = lambda message: None  # noqa: E731
STEPS = 6
FIELDS = dict(steps=STEPS, grad_accum=2, eval_every=3, save_every=3)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny"))


def _launch(tiny, out, *extra) -> dict:
    """`python -m lorakit train --nproc-per-node 2` with batch_size 4 per process; returns report.json."""
    argv = [sys.executable, "-m", "lorakit", "train", *flags(recipe_fields(*tiny, **FIELDS, batch_size=4, out=str(out))),
            "--nproc-per-node", "2", *extra]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-12000:]
    assert "[lorakit] rank 0/2: " in proc.stderr and "rank 1/2" not in proc.stderr  # rank 0 speaks, and says so
    return json.loads((out / "report.json").read_text())


@pytest.fixture(scope="module")
def two_processes(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "run"
    return out, _launch(tiny, out)


@pytest.fixture(scope="module")
def one_process(tiny, tmp_path_factory):
    """The same steps in one process on the concatenated batch (batch_size 8)."""
    out = tmp_path_factory.mktemp("single") / "run"
    report = run_train(load_recipe(None, recipe_fields(*tiny, **FIELDS, batch_size=8, out=str(out))), log=QUIET)
    return out, report


def test_two_processes_equal_one_process_on_the_concatenated_batch(two_processes, one_process):
    (out2, rep2), (out1, rep1) = two_processes, one_process
    a2, a1 = adapter_tensors(out2), adapter_tensors(out1)
    assert max_abs_diff(a2, a1) <= 1e-5
    assert max(float(t.abs().max()) for t in a1.values() if t.abs().max() > 0) > 1e-3  # B moved away from 0
    loss2 = [h["loss"] for h in rep2["training"]["history"]]
    loss1 = [h["loss"] for h in rep1["training"]["history"]]
    assert loss2 == pytest.approx(loss1, abs=1e-5)  # the reported loss is the mean over the ranks
    assert [h["tokens"] for h in rep2["training"]["history"]] == [h["tokens"] for h in rep1["training"]["history"]]
    assert rep2["training"]["global_batch"] == rep1["training"]["global_batch"] == 16 and rep2["training"]["processes"] == 2

    d = rep2["distributed"]
    assert d["world_size"] == 2 and d["backend"] == "gloo" and d["parallel"] == "ddp"
    assert d["ranks_identical"] and len(set(d["adapter_sha256_per_rank"])) == 1 and len(d["adapter_sha256_per_rank"]) == 2
    # only the adapter was reduced: per step, exactly the adapter file's tensors and elements,
    # in one bucket (gradient accumulation of 2 micro-batches synchronised once)
    adapter_numel = sum(t.numel() for t in a2.values())
    assert adapter_numel == d["trainable_numel"] == rep2["lora"]["trainable"] == 1792
    assert d["gradient_allreduce"] == {"calls": STEPS, "tensors": STEPS * len(a2), "numel": STEPS * adapter_numel}
    assert d["frozen_bytes_on_rank0"] == 4 * (rep2["lora"]["total"] - rep2["lora"]["trainable"])  # DDP: the whole base


def test_two_process_checkpoint_resumes_in_one_process(two_processes, tmp_path):
    out2, _ = two_processes
    out = tmp_path / "resumed"
    shutil.copytree(out2, out)
    (out / CHECKPOINTS / LATEST).write_text(step_name(3) + "\n")  # as if the 2-process run had stopped after step 3
    for name in ("adapter", "report.json"):
        shutil.rmtree(out / name) if (out / name).is_dir() else (out / name).unlink()
    ckpt = read_checkpoint(out)
    assert (ckpt.step, ckpt.shards, ckpt.state["world_size"]) == (3, 2, 2)
    recipe, _ = resume_recipe(out)
    report = run_train(recipe, log=QUIET, resume=out)
    assert max_abs_diff(adapter_tensors(out), adapter_tensors(out2)) <= 1e-5
    assert report["training"]["processes"] == 1 and report["training"]["global_batch"] == 16
    assert [h["step"] for h in report["training"]["history"]] == list(range(1, STEPS + 1))
    # a 2-shard checkpoint cannot be shared by 3 processes
    from lorakit.train.job import preflight

    with pytest.raises(CheckpointError, match="split into 2 shards .* 3 processes cannot share them evenly"):
        preflight(recipe, resume=out, world_size=3)


@pytest.mark.parametrize("checkpointing", ["off", "on"])
def test_fsdp2_shards_the_frozen_base_and_trains_the_same_adapter(tiny, two_processes, tmp_path, checkpointing):
    """Also with activation checkpointing inside the sharded blocks (issue 16): same adapter."""
    out2, rep2 = two_processes
    rep = _launch(tiny, tmp_path / "fsdp2", "--parallel", "fsdp2", "--gradient-checkpointing", checkpointing)
    assert rep["memory"]["gradient_checkpointing"]["enabled"] == (checkpointing == "on")
    d = rep["distributed"]
    assert d["parallel"] == "fsdp2" and d["ranks_identical"]
    assert max_abs_diff(adapter_tensors(tmp_path / "fsdp2"), adapter_tensors(out2)) <= 1e-5
    assert d["gradient_allreduce"]["numel"] == rep2["distributed"]["gradient_allreduce"]["numel"]
    frozen = rep2["distributed"]["frozen_bytes_on_rank0"]
    assert d["frozen_bytes_on_rank0"] <= frozen / 2 + 4 * 1024  # each rank holds half of every frozen tensor (+ rounding)


def test_ddp_with_activation_checkpointing_trains_the_same_adapter(tiny, two_processes, tmp_path):
    out2, _ = two_processes
    rep = _launch(tiny, tmp_path / "ddp-gc", "--gradient-checkpointing", "on")
    assert rep["memory"]["gradient_checkpointing"]["enabled"] and rep["distributed"]["ranks_identical"]
    assert max_abs_diff(adapter_tensors(tmp_path / "ddp-gc"), adapter_tensors(out2)) <= 1e-5


def test_fsdp2_with_an_nf4_base_is_refused_before_starting(tiny, tmp_path, capsys):
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "run"
    code = cli.main(["train", *flags(recipe_fields(*tiny, out=str(out))), "--quantize", "nf4", "--parallel", "fsdp2",
                     "--nproc-per-node", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("lorakit train: error: parallel 'fsdp2' with quantize 'nf4' is not supported") and "ddp" in err[0]
    assert not out.exists()


def test_world_from_torchrun_environment():
    assert world_from_env({}) is None and world_from_env({"WORLD_SIZE": "1", "RANK": "0"}) is None
    env = {"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    assert world_from_env(env) == World(rank=3, world_size=4, local_rank=1, local_world_size=2)
    assert cli._without_nproc(["train", "--nproc-per-node", "2", "--steps", "3", "--nproc-per-node=4"]) == ["train", "--steps", "3"]



NAN_ON_RANK_1 = """
import os, sys
from lorakit import cli
from lorakit.train import tasks

original = tasks.ClassifyLM.loss
calls = [0]

def loss(self, model, batch):
    value, n = original(self, model, batch)
    calls[0] += 1
    if os.environ["RANK"] == "1" and calls[0] == 5:  # grad_accum 2: step 3's first micro-batch, on rank 1 only
        value = value * float("nan")
    return value, n

tasks.ClassifyLM.loss = loss
sys.exit(cli.main(sys.argv[1:]))
"""


def test_nan_on_one_rank_stops_every_rank_at_that_step(tiny, tmp_path):
    script = tmp_path / "child.py"
    script.write_text(NAN_ON_RANK_1)
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script), "train",
            *flags(recipe_fields(*tiny, **{**FIELDS, "save_every": 1}, batch_size=4, out=str(out)))]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    kept = f"the last good checkpoint is {out / CHECKPOINTS / step_name(2)} (step 2)"
    expected = {
        0: f"lorakit train: error: rank 0/2: training stopped: the loss became nan (on another rank) at step 3; lower the "
           f"learning rate (lr=0.002); {kept}",
        1: f"lorakit train: error: rank 1/2: training stopped: the loss became nan (on rank 1 of 2) at step 3; lower the "
           f"learning rate (lr=0.002); {kept}",
    }
    # the two ranks write their lines concurrently; torchrun may stop rank 0 before it prints its own
    assert expected[1] in proc.stderr, proc.stderr[-12000:]
    assert "rank 0/2: training stopped" not in proc.stderr or expected[0] in proc.stderr
    assert "step 3/6" not in proc.stderr
    assert read_checkpoint(out).step == 2 and not (out / "adapter").exists()


@pytest.mark.slow
def test_qlora_nf4_base_trains_with_ddp(tiny, tmp_path):
    pytest.importorskip("bitsandbytes")
    rep = _launch(tiny, tmp_path / "nf4", "--quantize", "nf4")
    d = rep["distributed"]
    assert d["ranks_identical"] and d["gradient_allreduce"]["numel"] == STEPS * rep["lora"]["trainable"]
    assert rep["quantization"]["layers"] > 0 and rep["checks"]["reload_identical"]
