"""Interop with Hugging Face PEFT as the oracle for the adapter file format, both directions."""

import json

import pytest
import torch

import lorakit as lk

from helpers import logits, randomize_lora, tiny_gpt2, tiny_llama, tokens

peft = pytest.importorskip("peft")

CASES = [
    ("llama-qv", tiny_llama, dict(target_modules=["q_proj", "v_proj"])),
    ("llama-all-linear", tiny_llama, dict(target_modules="all-linear")),
    ("gpt2-conv1d", tiny_gpt2, dict(target_modules=["c_attn", "c_proj", "c_fc"])),
    ("llama-rslora-pattern", tiny_llama, dict(target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=True,
                                              rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 32})),
]


def _peft_config(kw):
    renames = {"alpha": "lora_alpha"}
    out = {renames.get(k, k): v for k, v in kw.items()}
    return peft.LoraConfig(r=4, lora_alpha=8, **out)


@pytest.mark.parametrize("name,builder,kw", CASES, ids=[c[0] for c in CASES])
def test_lorakit_adapter_loads_in_peft(tmp_path, name, builder, kw):
    model = builder()
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, **kw))
    randomize_lora(model)
    ids = tokens()
    ours = logits(model, ids)
    lk.save_adapter(model, tmp_path / "adapter")

    pm = peft.PeftModel.from_pretrained(builder(), tmp_path / "adapter").eval()
    theirs = logits(pm, ids)
    with pm.disable_adapter():
        assert not torch.allclose(logits(pm, ids), theirs, atol=1e-4)  # PEFT really applied it
    assert torch.allclose(theirs, ours, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,builder,kw", CASES, ids=[c[0] for c in CASES])
def test_peft_adapter_loads_in_lorakit(tmp_path, name, builder, kw):
    pm = peft.get_peft_model(builder(), _peft_config(kw)).eval()
    _randomize_peft(pm)
    ids = tokens()
    theirs = logits(pm, ids)
    pm.save_pretrained(tmp_path / "adapter")

    model = builder()
    lk.load_adapter(model, tmp_path / "adapter")
    ours = logits(model, ids)
    with lk.disabled(model):
        assert not torch.allclose(logits(model, ids), ours, atol=1e-4)
    assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-5)
    trainable, _ = lk.count_parameters(model)
    assert trainable == sum(p.numel() for n, p in pm.named_parameters() if "lora_" in n)


def test_saved_files_are_peft_layout(tmp_path):
    model = tiny_llama()
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, target_modules=["q_proj"]))
    lk.save_adapter(model, tmp_path)
    from safetensors.torch import load_file

    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert sorted(tensors) == sorted(
        f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_{ab}.weight" for i in range(2) for ab in "AB"
    )
    assert tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (4, 32)
    assert tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].shape == (32, 4)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8


def _randomize_peft(pm, std=0.2, seed=2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def test_saving_the_same_adapter_twice_gives_identical_bytes(tmp_path):
    model = tiny_llama()
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    randomize_lora(model)
    files = []
    for i in range(6):
        lk.save_adapter(model, tmp_path / str(i))
        files.append((tmp_path / str(i) / "adapter_model.safetensors").read_bytes())
    assert all(f == files[0] for f in files)
    from safetensors import safe_open

    with safe_open(tmp_path / "0" / "adapter_model.safetensors", "pt") as f:
        assert f.metadata()["format"] == "pt"
