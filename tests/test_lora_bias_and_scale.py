"""Issue 14, items 6-8: PEFT's `lora_bias` (a trainable bias on B), adapter strength at inference
(PEFT's `set_scale` / `scale_layer` / `unscale_layer`), exact through merges."""

import json
import math

import pytest
import torch
from torch import nn

import lorakit as lk
from lorakit.state import lora_layers

from helpers import assert_same_state, logits, state_snapshot, tiny_llama, tokens

peft = pytest.importorskip("peft")


def _mlp(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 6), nn.Conv1d(6, 4, 3, padding=1)).to(dtype)


def _forward(model, x):
    with torch.no_grad():
        h = model[2](model[1](model[0](x)))
        return model[3](h.T.unsqueeze(0))


def _randomize(model, seed=3, std=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_((torch.randn(p.shape, generator=g) * std).to(p.dtype))


# ---------------------------------------------------------------- lora_bias
def test_lora_bias_forward_is_scaled_like_the_update_and_merges_exactly():
    model = _mlp()
    x = torch.randn(5, 8)
    base = _forward(model, x)
    lk.inject(model, lk.LoraConfig(r=2, alpha=6, target_modules=["0", "2", "3"], lora_bias=True))
    assert torch.equal(_forward(model, x), base)  # B = 0 and its bias = 0 at step 0
    _randomize(model)
    layer = model[0]
    bias = layer.adapter_parameters("default")["lora_B.bias"]
    s = layer.scaling["default"]
    with torch.no_grad():
        expected = model[0].base_layer(x) + s * (x @ layer.lora_A["default"].T @ layer.lora_B["default"].T + bias)
        assert torch.allclose(model[0](x), expected, atol=1e-6)
    unmerged = _forward(model, x)
    before = state_snapshot(model)
    lk.merge(model)
    # b + scaling * b_B in float32 (the accumulation dtype of every merge of a float32 base)
    assert torch.equal(model[0].base_layer.bias, before["0.base_layer.bias"] + bias.detach() * s)
    assert torch.allclose(_forward(model, x), unmerged, atol=1e-5)
    lk.unmerge(model)
    assert_same_state(model, before)  # bias restored bit for bit


def test_lora_bias_bf16_and_100_merge_cycles_are_bitwise():
    model = _mlp(dtype=torch.bfloat16)
    lk.inject(model, lk.LoraConfig(r=2, alpha=4, target_modules=["0", "2"], lora_bias=True))
    _randomize(model)
    before = state_snapshot(model)
    for _ in range(100):
        lk.merge(model)
        lk.unmerge(model)
    assert_same_state(model, before)


def test_lora_bias_refusals_name_the_culprit():
    with pytest.raises(lk.ConfigError, match="lora_bias.*use_dora"):
        lk.LoraConfig(target_modules=["0"], lora_bias=True, use_dora=True)
    with pytest.raises(lk.ConfigError, match="lora_bias.*pissa"):
        lk.LoraConfig(target_modules=["0"], lora_bias=True, init="pissa")
    with pytest.raises(lk.UnsupportedModuleError, match="embed_tokens.*lora_bias"):
        lk.inject(tiny_llama(), lk.LoraConfig(target_modules=["embed_tokens"], lora_bias=True))
    model = tiny_llama()  # Llama's projections have no bias: the adapter works, merging it is refused
    with pytest.warns(UserWarning, match="no bias"):
        lk.inject(model, lk.LoraConfig(r=2, target_modules=["q_proj"], lora_bias=True))
    before = state_snapshot(model)
    with pytest.raises(lk.MergeError, match="q_proj.*no bias"):
        lk.merge(model)
    assert_same_state(model, before)


def test_lora_bias_files_go_both_ways_with_peft(tmp_path):
    torch.manual_seed(0)
    mine = _mlp()
    lk.inject(mine, lk.LoraConfig(r=2, alpha=4, target_modules=["0", "2"], lora_bias=True))
    _randomize(mine)
    lk.save_adapter(mine, tmp_path / "ours")
    data = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert data["lora_bias"] is True
    x = torch.randn(5, 8)
    theirs = peft.PeftModel.from_pretrained(_mlp(), tmp_path / "ours")
    assert torch.allclose(_forward(theirs.base_model.model, x), _forward(mine, x), atol=1e-6)
    theirs.save_pretrained(tmp_path / "peft")
    back = lk.load_adapter(_mlp(), tmp_path / "peft")
    assert torch.allclose(_forward(back, x), _forward(mine, x), atol=1e-6)


def test_lora_bias_on_a_4bit_base_merges_exactly():
    pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    lk.quantize(model, "nf4", modules=["0", "2"])
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, target_modules=["0", "2"], lora_bias=True))
    _randomize(model, std=0.05)
    x = torch.randn(3, 64)
    with torch.no_grad():
        unmerged = model(x)
        lk.merge(model)
        assert torch.allclose(model(x), unmerged, atol=1e-4)
        lk.unmerge(model)
        assert torch.equal(model(x), unmerged)
        plain, report = lk.quant.merge_quantized(model)
        assert torch.allclose(plain(x), unmerged, atol=1e-4)


def test_combine_cat_keeps_lora_bias_exactly():
    model = _mlp()
    lk.inject(model, lk.LoraConfig(r=2, alpha=4, target_modules=["0", "2"], lora_bias=True), adapter="a")
    lk.inject(model, lk.LoraConfig(r=3, alpha=3, target_modules=["0"]), adapter="b")
    _randomize(model)
    x = torch.randn(5, 8)
    lk.set_active(model, ["a", "b"])
    both = _forward(model, x)
    lk.combine(model, {"a": 1.0, "b": 1.0}, method="cat", new_name="ab")
    lk.set_active(model, "ab")
    assert torch.allclose(_forward(model, x), both, atol=1e-5)


# ---------------------------------------------------------------- adapter strength
@pytest.mark.parametrize("rslora", [False, True])
def test_set_scale_multiplies_the_configured_scaling_and_restores_it_exactly(rslora):
    model = tiny_llama()
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], use_rslora=rslora))
    _randomize(model, std=0.2)
    ids = tokens()
    full = logits(model, ids)
    with lk.disabled(model):
        base = logits(model, ids)
    original = {p: dict(layer.scaling) for p, layer in lora_layers(model)}
    configured = 8 / math.sqrt(4) if rslora else 8 / 4
    lk.set_scale(model, "default", 0.0)
    assert torch.allclose(logits(model, ids), base, atol=1e-6)
    lk.set_scale(model, "default", 0.5)
    assert all(layer.scaling["default"] == 0.5 * configured for _, layer in lora_layers(model))
    half = logits(model, ids)
    lk.merge(model)  # merge honours the scale; changing it while merged re-merges from W0
    assert torch.allclose(logits(model, ids), half, atol=1e-5)
    lk.set_scale(model, "default", 1.0)
    assert torch.allclose(logits(model, ids), full, atol=1e-5)
    lk.unmerge(model)
    assert {p: dict(layer.scaling) for p, layer in lora_layers(model)} == original  # exactly
    assert torch.equal(logits(model, ids), full)


def test_peft_layer_names_and_the_context_manager():
    model = tiny_llama()
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, target_modules=["q_proj"]))
    layer = model.model.layers[0].self_attn.q_proj
    layer.scale_layer(3.0)
    assert layer.scaling["default"] == 6.0
    layer.unscale_layer(3.0)
    assert layer.scaling["default"] == 2.0
    layer.scale_layer(0.3)
    layer.unscale_layer()
    assert layer.scaling["default"] == 2.0
    with lk.adapter_scale(model, 0.25):
        assert layer.scaling["default"] == 0.5
    assert layer.scaling["default"] == 2.0
    with pytest.raises(lk.AdapterNotFoundError):
        lk.set_scale(model, "nope", 1.0)
    with pytest.raises(lk.LoraError, match="scale"):
        lk.set_scale(model, "default", float("nan"))


def test_saving_a_scaled_adapter_warns_that_the_file_is_unscaled(tmp_path):
    model = tiny_llama()
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, target_modules=["q_proj"]))
    lk.set_scale(model, "default", 0.5)
    with pytest.warns(UserWarning, match="scale"):
        lk.save_adapter(model, tmp_path)
    assert lk.read_config(tmp_path).alpha == 8
