"""A process killed (SIGKILL) in the middle of saving leaves an adapter that loads and equals
either the previous version or the new one, never a mix."""

import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from torch import nn

import lorakit as lk

CHILD = textwrap.dedent(
    """
    import sys, torch
    from torch import nn
    import lorakit as lk

    def version(r, value):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
        lk.inject(model, lk.LoraConfig(r=r, alpha=r, target_modules=["0", "1"]))
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.fill_(value)
        return model

    models = [version(2, 1.0), version(4, 2.0)]
    folder = sys.argv[1]
    lk.save_adapter(models[0], folder)
    print("ready", flush=True)
    i = 1
    while True:
        lk.save_adapter(models[i % 2], folder)
        i += 1
    """
)


def _fresh():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))


def _versions_seen_by_peft(folder):
    """The single value every LoRA tensor has when PEFT loads `folder` (PEFT reads the json first)."""
    peft = pytest.importorskip("peft")
    model = peft.PeftModel.from_pretrained(_fresh(), folder)
    values = {float(v) for n, p in model.named_parameters() if "lora_" in n for v in p.detach().unique()}
    ranks = {p.shape[0] for n, p in model.named_parameters() if "lora_A" in n}
    assert len(values) == 1 and len(ranks) == 1, f"PEFT loaded a mix: values {values}, ranks {ranks}"
    return ranks.pop(), values.pop()


@pytest.mark.slow
def test_sigkill_during_save_leaves_old_or_new_version(tmp_path):
    """Kills land anywhere in a save that replaces both files (the rank and values alternate); lorakit
    and PEFT (which reads adapter_config.json, then the weights) must both find one whole version."""
    rng = random.Random(1234)
    folder = tmp_path / "adapter"
    seen = set()
    for trial in range(24):
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(folder)], stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, 0.05))
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        model = _fresh()
        lk.load_adapter(model, folder)
        layer = model[0]
        r = layer.r["default"]
        value = {2: 1.0, 4: 2.0}[r]  # the rank says which version; every tensor must agree
        for _, t in lk.adapter_state_dict(model).items():
            assert torch.all(t == value), f"trial {trial}: mixed versions"
        assert _versions_seen_by_peft(folder) == (r, value), f"trial {trial}: PEFT saw another version"
        seen.add(r)
        leftovers = [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]
        assert leftovers == [], leftovers  # the pair is written in a sibling folder, not inside this one
        assert len([p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]) <= 1  # the interrupted version
    assert seen == {2, 4}, "the kills never landed on one of the versions; the test is not exercising saves"


def test_atomic_writes_get_the_mode_a_plain_write_would(tmp_path):
    import os
    import stat

    from lorakit.fileio import atomic_write_text

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "new.json", "{}")
        assert stat.S_IMODE((tmp_path / "new.json").stat().st_mode) == 0o644  # not mkstemp's 0600
        (tmp_path / "kept.json").write_text("old")
        os.chmod(tmp_path / "kept.json", 0o640)
        atomic_write_text(tmp_path / "kept.json", "new")
        assert stat.S_IMODE((tmp_path / "kept.json").stat().st_mode) == 0o640
        assert (tmp_path / "kept.json").read_text() == "new"
    finally:
        os.umask(old)
