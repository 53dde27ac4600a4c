"""Issue 2 acceptance: step-0 identity, exact merges, unload, merge_and_unload, counts."""

import pytest
import torch
from torch import nn

import lorakit as lk
from lorakit.state import lora_layers

from helpers import assert_same_state, logits, randomize_lora, state_snapshot, tiny_gpt2, tiny_llama, tokens


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], "all-linear", r".*\.mlp\.(gate|up)_proj"])
def test_step0_identity_llama(targets):
    model = tiny_llama()
    ids = tokens()
    before = logits(model, ids)
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, target_modules=targets))
    assert torch.equal(logits(model, ids), before)


def test_step0_identity_gpt2_conv1d():
    model = tiny_gpt2()
    ids = tokens()
    before = logits(model, ids)
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, target_modules=["c_attn", "c_proj", "c_fc"]))
    layers = dict(lora_layers(model))
    assert layers["transformer.h.0.attn.c_attn"].fan_in_fan_out
    assert torch.equal(logits(model, ids), before)


def test_only_lora_trainable_and_base_frozen():
    model = tiny_llama()
    lk.inject(model, lk.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)


def test_linear_forward_matches_float64_formula():
    torch.manual_seed(0)
    base = nn.Linear(16, 12)
    model = nn.Sequential(base)
    lk.inject(model, lk.LoraConfig(r=3, alpha=6, target_modules=["0"]))
    layer = model[0]
    randomize_lora(model)
    x = torch.randn(5, 16)
    A, B = layer.lora_A["default"].double(), layer.lora_B["default"].double()
    ref = x.double() @ base.weight.double().T + base.bias.double() + 2.0 * (x.double() @ A.T) @ B.T
    out = model(x).double()
    assert torch.allclose(out, ref, rtol=1e-6, atol=1e-6)


def test_rslora_scaling():
    model = nn.Sequential(nn.Linear(8, 8))
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, use_rslora=True, target_modules=["0"]))
    assert model[0].scaling["default"] == pytest.approx(8 / 2)


@pytest.mark.parametrize("builder,targets", [(tiny_llama, ["q_proj", "v_proj"]), (tiny_llama, "all-linear"), (tiny_gpt2, ["c_attn", "c_fc"])])
def test_merged_equals_unmerged_float32(builder, targets):
    model = builder()
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, target_modules=targets))
    randomize_lora(model)
    ids = tokens()
    unmerged = logits(model, ids)
    with lk.disabled(model):
        base = logits(model, ids)
    assert (unmerged - base).abs().max() > 1e-3  # the adapter does something
    lk.merge(model)
    merged = logits(model, ids)
    rel = (merged - unmerged).abs().max() / unmerged.abs().max()
    assert rel < 1e-5


def test_bf16_merge_rounds_once_and_cycles_are_exact():
    model = tiny_llama(dtype=torch.bfloat16)
    lk.inject(model, lk.LoraConfig(r=4, alpha=16, target_modules=["q_proj", "v_proj"]))
    randomize_lora(model)
    layers = dict(lora_layers(model))
    originals = {p: layer.weight.detach().clone() for p, layer in layers.items()}
    lk.merge(model)
    for path, layer in layers.items():
        delta = layer.delta_weight("default")
        assert delta.dtype == torch.float32
        expected = (originals[path].float() + delta.float()).to(torch.bfloat16)
        assert torch.equal(layer.weight, expected), path
        assert not torch.equal(layer.weight, originals[path])
    lk.unmerge(model)
    for _ in range(100):
        lk.merge(model)
        lk.unmerge(model)
    for path, layer in layers.items():
        assert torch.equal(layer.weight, originals[path]), path


def test_merge_twice_is_noop_and_unmerge_restores():
    model = tiny_llama()
    lk.inject(model, lk.LoraConfig(r=4, target_modules=["q_proj"]))
    randomize_lora(model)
    layer = dict(lora_layers(model))["model.layers.0.self_attn.q_proj"]
    w0 = layer.weight.detach().clone()
    lk.merge(model)
    once = layer.weight.detach().clone()
    lk.merge(model)
    assert torch.equal(layer.weight, once)
    assert layer.merged_adapters == ("default",)
    lk.unmerge(model)
    assert torch.equal(layer.weight, w0)
    lk.unmerge(model)  # no-op
    assert torch.equal(layer.weight, w0)


@pytest.mark.parametrize("builder,targets", [(tiny_llama, "all-linear"), (tiny_gpt2, ["c_attn", "c_proj"])])
def test_merge_and_unload_is_base_architecture(builder, targets):
    reference = builder()
    base_keys = list(reference.state_dict())
    base_types = [type(m) for m in reference.modules()]
    model = builder()
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, target_modules=targets))
    randomize_lora(model)
    ids = tokens()
    adapted = logits(model, ids)
    plain = lk.merge_and_unload(model)
    assert list(plain.state_dict()) == base_keys
    assert [type(m) for m in plain.modules()] == base_types
    assert not any(isinstance(m, lk.LoraLayer) for m in plain.modules())
    assert torch.allclose(logits(plain, ids), adapted, rtol=1e-5, atol=1e-5)


def test_unload_restores_base_bitwise_even_when_merged():
    model = tiny_llama()
    snap = state_snapshot(model)
    lk.inject(model, lk.LoraConfig(r=4, target_modules="all-linear"))
    randomize_lora(model)
    lk.merge(model)
    base = lk.unload(model)
    assert base is model
    assert_same_state(base, snap)


def test_all_linear_skips_lm_head():
    model = tiny_llama()
    lk.inject(model, lk.LoraConfig(r=2, target_modules="all-linear"))
    paths = [p for p, _ in lora_layers(model)]
    assert "lm_head" not in paths
    assert len(paths) == 2 * 7


def _meta_roberta(size: str):
    from transformers import RobertaConfig, RobertaModel

    dims = {"base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
            "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)}[size]
    with torch.device("meta"):
        return RobertaModel(RobertaConfig(**dims))


@pytest.mark.parametrize("size,expected", [("base", 294_912), ("large", 786_432)])
def test_roberta_trainable_counts(size, expected):
    model = _meta_roberta(size)
    _, total_before = lk.count_parameters(model)
    lk.inject(model, lk.LoraConfig(r=8, alpha=16, target_modules=["query", "value"]))
    trainable, total = lk.count_parameters(model)
    assert trainable == expected
    assert total == total_before + expected


def test_dropout_applies_only_in_training():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32))
    lk.inject(model, lk.LoraConfig(r=4, dropout=0.5, target_modules=["0"]))
    randomize_lora(model)
    x = torch.randn(4, 32)
    model.eval()
    a, b = model(x), model(x)
    assert torch.equal(a, b)
    model.train()
    torch.manual_seed(1)
    c = model(x)
    assert not torch.allclose(c, a)
    c.sum().backward()
    assert model[0].lora_A["default"].grad is not None


def test_training_step_changes_only_adapters():
    model = tiny_llama()
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    snap = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = tokens()
    model.train()
    for _ in range(3):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    after = model.state_dict()
    for k, v in snap.items():
        assert torch.equal(after[k], v), k
    assert any(not torch.equal(layer.lora_B["default"], torch.zeros_like(layer.lora_B["default"])) for _, layer in lora_layers(model))
