"""QLoRA interop with PEFT on a bitsandbytes 4-bit model (transformers' BitsAndBytesConfig), both directions."""

from __future__ import annotations

import pytest
import torch

import lorakit as lk
from lorakit.layers import LoraLinear4bit

from helpers import logits, tiny_llama, tokens

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(hidden_size=64, intermediate_size=128).save_pretrained(path)
    return path


def bnb_model(folder):
    """The reference: transformers quantizes at load time (NF4, double quantization, fp32 compute)."""
    cfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                          bnb_4bit_compute_dtype=torch.float32)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, quantization_config=cfg, device_map="cpu", dtype=torch.float32)
    lk.quant.guard_cpu_repack(model)
    return model.eval()


def lorakit_model(folder):
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return lk.quantize(model).eval()


def _randomize(model, std=0.1, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def test_lorakit_quantize_equals_transformers_bitsandbytes_loading(folder):
    ours, theirs = dict(lk.quant.quantized_layers(lorakit_model(folder))), dict(lk.quant.quantized_layers(bnb_model(folder)))
    assert sorted(ours) == sorted(theirs) and len(ours) == 14 and "lm_head" not in ours
    for path, q in ours.items():
        t = theirs[path]
        assert torch.equal(q.weight.data, t.weight.data), path
        a, b = q.weight.quant_state, t.weight.quant_state
        assert torch.equal(a.absmax, b.absmax) and torch.equal(a.state2.absmax, b.state2.absmax) and torch.equal(a.offset, b.offset)
        assert torch.equal(lk.quant.dequantize_weight(q), lk.quant.dequantize_weight(t))


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], "all-linear"], ids=["qv", "all-linear"])
def test_qlora_adapter_from_lorakit_loads_in_peft_on_a_bnb_model(tmp_path, folder, targets):
    model = lorakit_model(folder)
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, target_modules=targets))
    _randomize(model)
    ids = tokens()
    ours = logits(model, ids)
    lk.save_adapter(model, tmp_path / "adapter")

    pm = peft.PeftModel.from_pretrained(bnb_model(folder), tmp_path / "adapter").eval()
    q_proj = pm.base_model.model.model.layers[0].self_attn.q_proj
    assert "bnb" in type(q_proj).__module__  # PEFT's own 4-bit LoRA layer
    theirs = logits(pm, ids)
    with pm.disable_adapter():
        assert not torch.allclose(logits(pm, ids), theirs, atol=1e-3)
    assert torch.allclose(theirs, ours, rtol=1e-5, atol=1e-5), (theirs - ours).abs().max()


def test_qlora_adapter_from_peft_on_a_bnb_model_loads_in_lorakit(tmp_path, folder):
    pm = peft.get_peft_model(bnb_model(folder), peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")).eval()
    _randomize(pm)
    ids = tokens()
    theirs = logits(pm, ids)
    pm.save_pretrained(tmp_path / "adapter")

    model = lorakit_model(folder)
    lk.load_adapter(model, tmp_path / "adapter")
    assert sum(isinstance(m, LoraLinear4bit) for m in model.modules()) == 14
    ours = logits(model, ids)
    with lk.disabled(model):
        assert not torch.allclose(logits(model, ids), ours, atol=1e-3)
    assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-5), (theirs - ours).abs().max()
    trainable, _ = lk.count_parameters(model)
    assert trainable == sum(p.numel() for n, p in pm.named_parameters() if "lora_" in n)


def test_lorakit_adapts_a_transformers_bnb_model_directly(tmp_path, folder):
    """inject / merge_and_unload on a model that transformers quantized: a dense model that saves cleanly."""
    model = bnb_model(folder)
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    _randomize(model)
    ids = tokens()
    unmerged = logits(model, ids)
    merged, report = lk.quant.merge_quantized(model)
    assert report.layers == 4 and report.dequantized == 10 and report.max_abs_error == 0.0
    assert not lk.quant.quantized_layers(merged)
    assert torch.allclose(logits(merged, ids), unmerged, atol=1e-5)
    merged.save_pretrained(tmp_path / "merged")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert torch.allclose(logits(again, ids), unmerged, atol=1e-5)


def test_folded_qera_adapter_loads_in_peft_on_a_plain_bnb_model(tmp_path, folder):
    """Trained adapter + frozen NF4 correction, folded into one adapter (mixed ranks): PEFT gives the same logits."""
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    calib = [{"input_ids": tokens(batch=4, length=12, seed=10 + i)} for i in range(3)]
    lk.quant.qera_quantize(model, calib, rank=4)
    lk.inject(model, lk.LoraConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"]))
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    ids = tokens()
    ours = logits(model, ids)
    lk.quant.fold_corrections(model)
    lk.save_adapter(model, tmp_path / "adapter")
    pm = peft.PeftModel.from_pretrained(bnb_model(folder), tmp_path / "adapter").eval()
    assert pm.base_model.model.model.layers[0].self_attn.q_proj.r["default"] == 6  # 2 trained + 4 correction
    assert pm.base_model.model.model.layers[0].mlp.down_proj.r["default"] == 4
    theirs = logits(pm, ids)
    assert torch.allclose(theirs, ours, rtol=1e-5, atol=1e-5), (theirs - ours).abs().max()
