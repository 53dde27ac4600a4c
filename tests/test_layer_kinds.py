"""Issue 4: Embedding, Conv (incl. groups), fused per-slice adapters — exact merge, save/load, PEFT."""

import pytest
import torch
from torch import nn

import lorakit as lk
from lorakit.state import lora_layers

from helpers import randomize_lora, tiny_gpt2, tiny_llama, tokens

peft = pytest.importorskip("peft")


class ConvNet(nn.Module):
    def __init__(self, groups=1, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.c1 = nn.Conv1d(4, 8, 3, padding=1)
        self.c2 = nn.Conv2d(4, 8, 3, stride=2, padding=1, dilation=1)
        self.g2 = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=groups, padding_mode="reflect" if groups > 1 else "zeros")
        self.pw = nn.Conv2d(8, 6, 1)

    def forward(self, x1, x2):
        h = self.pw(torch.relu(self.g2(torch.relu(self.c2(x2)))))
        return torch.cat([self.c1(x1).flatten(1), h.flatten(1)], dim=1)


def _conv_inputs():
    g = torch.Generator().manual_seed(5)
    return torch.randn(2, 4, 10, generator=g), torch.randn(2, 4, 12, 12, generator=g)


def _check_exact_merge(model, run):
    base = run()
    w0 = {p: layer.weight.detach().clone() for p, layer in lora_layers(model)}
    randomize_lora(model)
    unmerged = run()
    assert (unmerged - base).abs().max() > 1e-3
    lk.merge(model)
    merged = run()
    assert ((merged - unmerged).abs().max() / unmerged.abs().max()) < 1e-5
    lk.unmerge(model)
    for p, layer in lora_layers(model):
        assert torch.equal(layer.weight, w0[p]), p
    return unmerged


@pytest.mark.parametrize("groups", [1, 4])
def test_conv_merge_exact_and_roundtrip(tmp_path, groups):
    model = ConvNet(groups)
    x1, x2 = _conv_inputs()
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, target_modules=["c1", "c2", "g2", "pw"]))
    out = _check_exact_merge(model, lambda: model(x1, x2).detach())
    lk.save_adapter(model, tmp_path)
    fresh = ConvNet(groups)
    lk.load_adapter(fresh, tmp_path)
    assert torch.equal(fresh(x1, x2), out)


def test_conv_rank_must_divide_groups():
    with pytest.raises(lk.UnsupportedModuleError, match="groups"):
        lk.inject(ConvNet(4), lk.LoraConfig(r=6, target_modules=["g2"]))


def test_conv2d_and_embedding_interop_with_peft(tmp_path):
    x1, x2 = _conv_inputs()
    model = ConvNet()
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, target_modules=["c1", "c2", "pw"]))
    randomize_lora(model)
    lk.save_adapter(model, tmp_path / "ours")
    pm = peft.PeftModel.from_pretrained(ConvNet(), tmp_path / "ours")
    assert torch.allclose(pm(x1, x2), model(x1, x2), atol=1e-5, rtol=1e-5)

    pm = peft.get_peft_model(ConvNet(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c2", "pw"]))
    _randomize_peft(pm)
    pm.save_pretrained(tmp_path / "theirs")
    ours = ConvNet()
    lk.load_adapter(ours, tmp_path / "theirs")
    assert torch.allclose(ours(x1, x2), pm(x1, x2), atol=1e-5, rtol=1e-5)


def _randomize_peft(pm, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def test_embedding_exact_merge_and_peft_both_ways(tmp_path):
    ids = tokens()
    model = tiny_llama()
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, target_modules=["embed_tokens", "q_proj"]))
    assert isinstance(model.model.embed_tokens, lk.LoraEmbedding)
    out = _check_exact_merge(model, lambda: model(ids).logits.detach())
    lk.save_adapter(model, tmp_path / "ours")
    pm = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours")
    assert torch.allclose(pm(ids).logits, out, atol=1e-5, rtol=1e-5)

    pm = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens"]))
    _randomize_peft(pm)
    pm.save_pretrained(tmp_path / "theirs")
    ours = tiny_llama()
    lk.load_adapter(ours, tmp_path / "theirs")
    assert torch.allclose(ours(ids).logits, pm(ids).logits, atol=1e-5, rtol=1e-5)


def test_fused_slices_gpt2_c_attn_q_and_v(tmp_path):
    ids = tokens()
    model = tiny_gpt2()
    cfg = lk.LoraConfig(r=4, alpha=8, target_modules=["c_attn"], fused_slices={"c_attn": [True, False, True]})
    lk.inject(model, cfg)
    layer = model.transformer.h[0].attn.c_attn
    assert layer.lora_A["default"].shape == (8, 32) and layer.lora_B["default"].shape == (64, 4)
    trainable, _ = lk.count_parameters(model)
    assert trainable == 2 * (8 * 32 + 64 * 4)
    out = _check_exact_merge(model, lambda: model(ids).logits.detach())
    # the k slice (columns 32:64 of the (in, out) Conv1D weight) is untouched by the update
    delta = layer.delta_weight("default")
    assert torch.count_nonzero(delta[:, 32:64]) == 0 and torch.count_nonzero(delta[:, :32]) > 0
    lk.save_adapter(model, tmp_path)
    pm = peft.PeftModel.from_pretrained(tiny_gpt2(), tmp_path)  # a plain rank-8 LoRA for PEFT
    assert torch.allclose(pm(ids).logits, out, atol=1e-5, rtol=1e-5)
    fresh = tiny_gpt2()
    lk.load_adapter(fresh, tmp_path)
    assert fresh.transformer.h[0].attn.c_attn.lora_B["default"].shape == (64, 4)
    assert torch.equal(fresh(ids).logits, out)


def test_fused_slices_unequal_sizes_and_errors():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16 + 8 + 8))  # a GQA-style qkv: q 16, k 8, v 8
    cfg = lk.LoraConfig(r=2, target_modules=["0"], fused_slices={"0": {"sizes": [16, 8, 8], "enable": [True, False, True]}})
    lk.inject(model, cfg)
    randomize_lora(model)
    x = torch.randn(3, 16)
    layer = model[0]
    A, B = layer.lora_A["default"].double(), layer.lora_B["default"].double()
    ref = torch.zeros(3, 32, dtype=torch.float64)
    ref[:, :16] = (x.double() @ A[:2].T) @ B[:16].T
    ref[:, 24:] = (x.double() @ A[2:].T) @ B[16:].T
    with lk.disabled(model):
        base = model(x).double()
    assert torch.allclose(model(x).double() - base, ref * layer.scaling["default"], atol=1e-6)
    bad = nn.Sequential(nn.Linear(16, 30))
    with pytest.raises(lk.UnsupportedModuleError, match="equal slices"):
        lk.inject(bad, lk.LoraConfig(r=2, target_modules=["0"], fused_slices={"0": [True, False, True, False]}))
    with pytest.raises(lk.ConfigError, match="fused_slices"):
        lk.LoraConfig(r=2, target_modules=["0"], fused_slices={"0": [False, False]})
