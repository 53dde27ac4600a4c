"""Issue 4: many adapters on one model — activity, disable, delete, combine, mixed batches,
modules_to_save, bias modes, sub-folder saves, tied weights, torch.compile."""

import warnings

import pytest
import torch
from torch import nn

import lorakit as lk
from lorakit.state import lora_layers

from helpers import assert_same_state, logits, randomize_lora, state_snapshot, tiny_llama, tokens

peft = pytest.importorskip("peft")


def _two_adapters(seed=0):
    model = tiny_llama(seed)
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]), adapter="a")
    randomize_lora(model, seed=10)
    lk.inject(model, lk.LoraConfig(r=2, alpha=4, target_modules=["v_proj", "o_proj", "embed_tokens"]), adapter="b")
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            if "b" in layer.lora_A:
                layer.lora_A["b"].copy_(torch.randn(layer.lora_A["b"].shape, generator=g) * 0.2)
                layer.lora_B["b"].copy_(torch.randn(layer.lora_B["b"].shape, generator=g) * 0.2)
    return model


def test_set_active_and_disabled_exact():
    model = _two_adapters()
    ids = tokens()
    with lk.disabled(model):
        base = logits(model, ids)
    lk.set_active(model, "a")
    out_a = logits(model, ids)
    lk.set_active(model, "b")
    out_b = logits(model, ids)
    lk.set_active(model, ["a", "b"])
    both = logits(model, ids)
    assert not torch.allclose(out_a, out_b)
    lk.merge(model)
    assert torch.allclose(logits(model, ids), both, atol=1e-5)
    with lk.disabled(model):  # merged: unmerged exactly inside, merged again after
        assert torch.equal(logits(model, ids), base)
    assert torch.equal(logits(model, ids), logits(model, ids))
    assert all(layer.merged_adapters for _, layer in lora_layers(model))
    assert torch.allclose(logits(model, ids), both, atol=1e-5)
    with pytest.raises(lk.AdapterNotFoundError, match="nope"):
        lk.set_active(model, ["a", "nope"])


def test_switching_away_from_merged_adapter_unmerges_exactly():
    model = _two_adapters()
    snap = {p: layer.weight.detach().clone() for p, layer in lora_layers(model)}
    lk.set_active(model, "a")
    lk.merge(model)
    lk.set_active(model, "b")
    for p, layer in lora_layers(model):
        assert not layer.merged_adapters
        assert torch.equal(layer.weight, snap[p])


def test_delete_adapter_unmerges_first_and_last_is_refused():
    model = _two_adapters()
    snap = state_snapshot(lk.unload(_two_adapters()))
    lk.set_active(model, ["a", "b"])
    lk.merge(model)
    lk.delete_adapter(model, "b")
    assert lk.adapter_names(model) == ("a",)
    assert not any("b" in layer.lora_A for _, layer in lora_layers(model))
    assert isinstance(model.model.embed_tokens, nn.Embedding)  # only "b" adapted it: wrapper removed
    with pytest.raises(lk.LoraError, match="last adapter"):
        lk.delete_adapter(model, "a")
    with pytest.raises(lk.AdapterNotFoundError):
        lk.delete_adapter(model, "zzz")
    assert_same_state(lk.unload(model), snap)


def test_combine_cat_is_exact_linear_and_svd():
    model = _two_adapters()
    ids = tokens()
    with lk.disabled(model):
        base = logits(model, ids).double()
    lk.set_active(model, "a")
    da = logits(model, ids).double() - base
    report = lk.combine(model, {"a": 0.7, "b": -1.3}, method="cat", new_name="ab")
    assert report.ranks["model.layers.0.self_attn.v_proj"] == 6
    # exactness at the level of every layer's update
    for _, layer in lora_layers(model):
        want = sum(w * layer.delta_weight(n, torch.float64) for n, w in (("a", 0.7), ("b", -1.3)) if n in layer.lora_A)
        assert torch.allclose(layer.delta_weight("ab", torch.float64), want, atol=1e-6)
    lk.set_active(model, "ab")
    assert not torch.allclose(logits(model, ids).double() - base, da)

    with pytest.raises(lk.LoraError, match="linear"):
        lk.combine(model, {"a": 1.0, "b": 1.0}, method="linear", new_name="lin")
    report = lk.combine(model, {"a": 1.0, "b": 1.0}, method="svd", new_name="s2", r=2)
    assert 0 < report.max_truncation_error < 1
    report = lk.combine(model, {"a": 1.0, "b": 1.0}, method="svd", new_name="s8", r=8)
    assert report.max_truncation_error < 1e-6
    with pytest.raises(lk.LoraError, match="method"):
        lk.combine(model, {"a": 1.0}, method="ties")
    with pytest.raises(lk.AdapterNotFoundError):
        lk.combine(model, {"nope": 1.0})


def test_combine_linear_same_rank_targets():
    model = tiny_llama()
    for name, seed in (("x", 1), ("y", 2)):
        lk.inject(model, lk.LoraConfig(r=2, alpha=4, target_modules=["q_proj"]), adapter=name)
    randomize_lora(model)
    lk.combine(model, {"x": 0.5, "y": 0.5}, method="linear", new_name="xy")
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.r["xy"] == 2


@pytest.mark.parametrize("length", [9, 1])  # q_proj (2 adapters): 9 tokens gathered, 1 token dense
def test_mixed_batch_equals_per_row_runs(length):
    from lorakit.layers.rows import DENSE_MAX

    model = _two_adapters()
    lk.inject(model, lk.LoraConfig(r=3, alpha=3, target_modules=["k_proj", "up_proj"]), adapter="c")
    lk.inject(model, lk.LoraConfig(r=5, alpha=5, target_modules=["q_proj", "down_proj"]), adapter="d")
    randomize_lora(model, seed=20)
    rows = ["a", "b", None, "c", "d", "a", None, "d"]
    ids = tokens(batch=8, length=length)
    with lk.mixed_batch(model, rows):
        layer = model.model.layers[0].self_attn.q_proj
        assert (layer._mixed.A_cat is not None and (len(layer._mixed.names) - 1) * length <= DENSE_MAX) == (length == 1)
        mixed = logits(model, ids)
    for i, name in enumerate(rows):
        if name is None:
            with lk.disabled(model):
                alone = logits(model, ids[i : i + 1])
        else:
            lk.set_active(model, name)
            alone = logits(model, ids[i : i + 1])
        assert torch.allclose(mixed[i : i + 1], alone, atol=1e-6, rtol=1e-6), (i, name)
    with pytest.raises(lk.AdapterNotFoundError):
        with lk.mixed_batch(model, ["a", "zz"]):
            pass
    with pytest.raises(lk.LoraError, match="adapter names"):
        with lk.mixed_batch(model, ["a", "b"]):
            logits(model, ids)


def test_modules_to_save_and_bias_interop_with_peft(tmp_path):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    def build():
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, num_labels=3, pad_token_id=0, attention_bias=True)
        return LlamaForSequenceClassification(cfg).eval()

    ids = tokens()
    model = build()
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["score"], bias="lora_only"))
    randomize_lora(model)
    with torch.no_grad():
        model.score.modules_to_save["default"].weight.add_(0.5)
        model.model.layers[0].self_attn.q_proj.bias.add_(0.25)
    ours = logits(model, ids)
    lk.save_adapter(model, tmp_path / "ours")
    pm = peft.PeftModel.from_pretrained(build(), tmp_path / "ours")
    assert torch.allclose(logits(pm, ids), ours, atol=1e-5)
    fresh = build()
    snap = state_snapshot(fresh)
    lk.load_adapter(fresh, tmp_path / "ours")
    assert torch.equal(logits(fresh, ids), ours)
    assert_same_state(lk.unload(fresh), snap)  # the trained bias is restored on unload

    pm = peft.get_peft_model(build(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["score"], bias="all"))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    pm.save_pretrained(tmp_path / "theirs")
    ours = build()
    lk.load_adapter(ours, tmp_path / "theirs")
    assert torch.allclose(logits(ours, ids), logits(pm, ids), atol=1e-5)


def test_multiple_adapters_in_subfolders_interop(tmp_path):
    model = _two_adapters()
    ids = tokens()
    lk.save_adapters(model, tmp_path)
    assert (tmp_path / "a" / "adapter_config.json").exists() and (tmp_path / "b" / "adapter_config.json").exists()
    pm = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "a", adapter_name="a")
    pm.load_adapter(tmp_path / "b", adapter_name="b")
    for name in ("a", "b"):
        lk.set_active(model, name)
        pm.set_adapter(name)
        assert torch.allclose(logits(pm, ids), logits(model, ids), atol=1e-5)

    pm.save_pretrained(tmp_path / "peft")  # PEFT: adapters not named "default" go to sub-folders
    fresh = tiny_llama()
    assert lk.load_adapters(fresh, tmp_path / "peft") == ("a", "b")
    assert lk.active_adapters(fresh) == ("a",)
    lk.set_active(fresh, "b")
    lk.set_active(model, "b")
    assert torch.allclose(logits(fresh, ids), logits(model, ids), atol=1e-5)


def test_tied_embedding_and_head_merge_is_not_applied_twice():
    ids = tokens()
    model = tiny_llama(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, target_modules=["lm_head", "embed_tokens"]))
    randomize_lora(model)
    unmerged = logits(model, ids)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lk.merge(model)
    assert any("tied" in str(w.message) for w in caught)
    assert torch.allclose(logits(model, ids), unmerged, atol=1e-5)
    plain = lk.merge_and_unload(model)
    assert torch.allclose(logits(plain, ids), unmerged, atol=1e-5)
    assert plain.config.tie_word_embeddings is False


def test_torch_compile_fullgraph_and_save_without_orig_mod(tmp_path):
    model = tiny_llama()
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    randomize_lora(model)
    x = torch.randn(2, 5, 32)
    layer = model.model.layers[0].self_attn.q_proj
    compiled_layer = torch.compile(layer, fullgraph=True, backend="eager")
    assert torch.allclose(compiled_layer(x), layer(x))
    compiled = torch.compile(model, backend="eager")
    lk.save_adapter(compiled, tmp_path)
    from safetensors.torch import load_file

    assert not any("_orig_mod" in k for k in load_file(tmp_path / "adapter_model.safetensors"))
    fresh = torch.compile(tiny_llama(), backend="eager")
    lk.load_adapter(fresh, tmp_path)
    ids = tokens()
    assert torch.allclose(logits(fresh, ids), logits(model, ids))


def test_modules_to_save_head_with_bias_round_trip(tmp_path):
    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 2))

    model = build()
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["0"], modules_to_save=["2"]))
    with torch.no_grad():
        model[2].modules_to_save["default"].bias.fill_(3.0)
    lk.save_adapter(model, tmp_path)
    fresh = build()
    lk.load_adapter(fresh, tmp_path)
    x = torch.randn(4, 6)
    assert torch.equal(fresh(x), model(x))
    assert torch.all(fresh[2].modules_to_save["default"].bias == 3.0)
