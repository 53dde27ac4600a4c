"""Issue 14: nested `disabled`, trainability of inactive adapters, tied weights through merge,
PEFT's whole config vocabulary, and the json/tensors pair of an adapter folder."""

import dataclasses
import json

import pytest
import torch
from torch import nn

import lorakit as lk
from lorakit.config import PEFT_HONOURED, PEFT_IGNORED, PEFT_REFUSED_UNLESS_OFF

from helpers import assert_same_state, logits, randomize_lora, state_snapshot, tiny_llama, tokens

peft = pytest.importorskip("peft")


# ---------------------------------------------------------------- fault 1: nested disabled
def _one_layer():
    m = lk.inject(nn.Sequential(nn.Linear(4, 4)), lk.LoraConfig(r=2, alpha=4, target_modules=["0"]))
    nn.init.ones_(m[0].lora_B["default"])
    return m


def test_nested_disabled_keeps_the_outer_block_disabled():
    m, x = _one_layer(), torch.ones(1, 4)
    with torch.no_grad():
        adapted = m(x)
        with lk.disabled(m):
            yb = m(x)
            with lk.disabled(m):
                assert torch.equal(m(x), yb)
            assert torch.equal(m(x), yb) and m[0].disabled
        assert torch.equal(m(x), adapted) and not m[0].disabled
    assert not torch.equal(adapted, yb)


def test_nested_disabled_on_a_merged_model_with_a_trained_head():
    model = tiny_llama()
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    randomize_lora(model)
    with torch.no_grad():
        model.lm_head.modules_to_save["default"].weight.mul_(1.5)
    ids = tokens()
    with lk.disabled(model):
        base = logits(model, ids)
    lk.merge(model)
    merged = logits(model, ids)
    merged_weights = state_snapshot(model)
    with lk.disabled(model):
        with lk.disabled(model):
            assert torch.equal(logits(model, ids), base)
        assert torch.equal(logits(model, ids), base)  # the inner exit re-merged nothing, re-enabled no head
        assert not model.model.layers[0].self_attn.q_proj.merged_adapters
    assert torch.equal(logits(model, ids), merged)
    assert_same_state(model, merged_weights)


# ---------------------------------------------------------------- fault 2: inactive adapters are frozen
def _trainable(model):
    return sorted(n for n, p in model.named_parameters() if p.requires_grad)


def test_only_active_adapters_are_trainable():
    m = lk.inject(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)),
                  lk.LoraConfig(r=2, target_modules=["0"], modules_to_save=["1"]))
    lk.inject(m, lk.LoraConfig(r=2, target_modules=["0"], modules_to_save=["1"]), adapter="other")
    assert _trainable(m) == ["0.lora_A.other", "0.lora_B.other", "1.modules_to_save.other.bias",
                             "1.modules_to_save.other.weight"]
    lk.set_active(m, "default")
    assert _trainable(m) == ["0.lora_A.default", "0.lora_B.default", "1.modules_to_save.default.bias",
                             "1.modules_to_save.default.weight"]
    lk.set_active(m, ["default", "other"])
    assert len(_trainable(m)) == 8
    lk.set_trainable(m, "other", False)
    assert all(".default" in n for n in _trainable(m)) and len(_trainable(m)) == 4
    lk.delete_adapter(m, "other")
    lk.set_active(m, "default")
    assert len(_trainable(m)) == 4


def test_every_trainable_tensor_gets_a_gradient_with_two_adapters():
    """What DDP's find_unused_parameters=False requires: no trainable tensor is left out of backward."""
    model = tiny_llama()
    lk.inject(model, lk.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], bias="all"), adapter="a")
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["o_proj"], modules_to_save=["lm_head"]), adapter="b")
    randomize_lora(model)
    for active in ("a", "b", ["a", "b"]):
        lk.set_active(model, active)
        model.zero_grad(set_to_none=True)
        model(tokens(), labels=tokens()).loss.backward()
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        assert trainable and all(p.grad is not None for _, p in trainable), active
        assert all(p.grad is None for _, p in model.named_parameters() if not p.requires_grad)


def test_loaded_frozen_adapter_stays_frozen_when_activated(tmp_path):
    model = tiny_llama()
    lk.inject(model, lk.LoraConfig(r=4, target_modules=["q_proj"]))
    lk.save_adapter(model, tmp_path)
    fresh = tiny_llama()
    lk.load_adapter(fresh, tmp_path, trainable=False)
    assert _trainable(fresh) == []
    lk.inject(fresh, lk.LoraConfig(r=2, target_modules=["v_proj"]), adapter="new")
    lk.set_active(fresh, ["default", "new"])
    assert all(".new" in n for n in _trainable(fresh)) and _trainable(fresh)


# ---------------------------------------------------------------- fault 3: tied weights
def test_merge_unmerge_gives_back_the_tied_model_and_leaves_the_config_alone():
    model = tiny_llama(tie_word_embeddings=True)
    config = model.config
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, target_modules=["lm_head", "q_proj"]))
    randomize_lora(model)
    ids = tokens()
    unmerged = logits(model, ids)
    before = state_snapshot(model)
    with pytest.warns(UserWarning, match="tied"):
        lk.merge(model)
    assert torch.allclose(logits(model, ids), unmerged, atol=1e-5)
    assert model.lm_head.base_layer.weight is not model.model.embed_tokens.weight
    lk.unmerge(model)
    assert model.lm_head.base_layer.weight is model.model.embed_tokens.weight
    assert model.config is config and config.tie_word_embeddings is True
    assert_same_state(model, before)
    with lk.disabled(model):  # an exit that merges again goes through the copy too
        pass
    lk.merge(model)
    with lk.disabled(model):
        assert model.lm_head.base_layer.weight is model.model.embed_tokens.weight
    assert model.lm_head.base_layer.weight is not model.model.embed_tokens.weight
    assert torch.allclose(logits(model, ids), unmerged, atol=1e-5)
    lk.unmerge(model)
    assert_same_state(model, before)


def test_merge_and_unload_of_a_tied_head_copies_the_config():
    model = tiny_llama(tie_word_embeddings=True)
    config = model.config
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, target_modules=["lm_head"]))
    randomize_lora(model)
    ids = tokens()
    unmerged = logits(model, ids)
    with pytest.warns(UserWarning, match="own copy of its config"):
        plain = lk.merge_and_unload(model)
    assert torch.allclose(logits(plain, ids), unmerged, atol=1e-5)
    assert plain.config is not config and plain.config.tie_word_embeddings is False
    assert config.tie_word_embeddings is True  # the caller's object is untouched
    with torch.no_grad():
        assert not torch.equal(plain.lm_head.weight, plain.model.embed_tokens.weight)


# ---------------------------------------------------------------- fault 4: PEFT's config vocabulary
def test_every_peft_lora_config_field_is_classified():
    peft_fields = {f.name for f in dataclasses.fields(peft.LoraConfig)}
    ours = set(PEFT_HONOURED) | set(PEFT_IGNORED) | set(PEFT_REFUSED_UNLESS_OFF)
    assert peft_fields - ours == set(), "PEFT added fields: classify them in lorakit.config"
    assert not set(PEFT_HONOURED) & set(PEFT_IGNORED) and not set(PEFT_IGNORED) & set(PEFT_REFUSED_UNLESS_OFF)
    assert set(PEFT_HONOURED) & set(PEFT_REFUSED_UNLESS_OFF) == set()


def _peft_file(**changes):
    data = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]).to_dict()
    data = json.loads(json.dumps(data, default=lambda v: sorted(v) if isinstance(v, set) else str(v)))
    data.update(changes)
    return data


@pytest.mark.parametrize("field", sorted(PEFT_REFUSED_UNLESS_OFF))
def test_refused_peft_features_name_the_field(field):
    lk.LoraConfig.from_peft_dict(_peft_file())  # the defaults PEFT writes are accepted
    on = {"use_qalora": True, "lora_bias": True, "use_bdlora": True, "ensure_weight_tying": True,
          "target_parameters": ["mlp.experts.down_proj"], "layer_replication": [[0, 1]],
          "alora_invocation_tokens": [1, 2], "trainable_token_indices": [1]}.get(field, {"x": 1})
    with pytest.raises(lk.ConfigError, match=field):
        lk.LoraConfig.from_peft_dict(_peft_file(**{field: on}))


@pytest.mark.parametrize("value", [None, False, {}, [], ""])
def test_a_newer_peft_field_left_unset_loads(value):
    # PEFT writes every field it has; a release after this lorakit adds fields that are off when unused
    cfg = lk.LoraConfig.from_peft_dict(_peft_file(future_feature_config=value))
    assert (cfg.r, cfg.alpha, cfg.target_modules) == (4, 8, ["q_proj"])


@pytest.mark.parametrize("value", [True, 0.5, "on", {"k": 1}, [0]])
def test_a_newer_peft_field_in_use_is_refused_naming_it(value):
    with pytest.raises(lk.ConfigError, match=r"future_feature_config: unknown field .*does not know"):
        lk.LoraConfig.from_peft_dict(_peft_file(future_feature_config=value))


@pytest.mark.parametrize("field", sorted(PEFT_IGNORED))
def test_ignored_peft_fields_load_whatever_their_value(field):
    value = {"peft_type": "LORA", "inference_mode": False, "fan_in_fan_out": True}.get(field, {"anything": 1})
    cfg = lk.LoraConfig.from_peft_dict(_peft_file(**{field: value}))
    assert (cfg.r, cfg.alpha, cfg.target_modules) == (4, 8, ["q_proj"])


@pytest.mark.parametrize("init", [True, False, "gaussian", "eva", "olora", "pissa", "pissa_niter_4", "corda",
                                  "loftq", "astra", "orthogonal", "mica", "nora"])
def test_every_init_value_peft_writes_loads_with_peft_equal_logits(tmp_path, init):
    torch.manual_seed(0)
    model = tiny_llama()
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=True)
    pm = peft.get_peft_model(model, cfg)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    pm.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    data["init_lora_weights"] = init
    (tmp_path / "adapter_config.json").write_text(json.dumps(data))
    ids = tokens()
    # the oracle: PEFT's model with these tensors on the base; for PiSSA/OLoRA PEFT and lorakit both
    # rebuild the residual base at load time, so compare against PEFT loading the same file
    oracle_model = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path) if init in ("olora", "pissa") else pm
    expected = logits(oracle_model, ids)
    fresh = tiny_llama()
    if init in ("corda", "loftq", "astra"):
        with pytest.warns(UserWarning, match="rewrote the base weights"):
            lk.load_adapter(fresh, tmp_path)
    else:
        lk.load_adapter(fresh, tmp_path)
    if init != "pissa_niter_4":  # a randomised SVD: the residual base differs from run to run, in PEFT too
        assert torch.allclose(logits(fresh, ids), expected, atol=1e-5)


def test_init_random_makes_a_fresh_adapter_visible_and_round_trips_as_false(tmp_path):
    model = tiny_llama()
    ids = tokens()
    base = logits(model, ids)
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "embed_tokens"], init="random"))
    assert not torch.allclose(logits(model, ids), base)
    lk.save_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["init_lora_weights"] is False
    assert lk.read_config(tmp_path).init == "random"


# ---------------------------------------------------------------- fault 5: the json is the truth
def test_json_contradicting_the_tensors_is_refused_naming_the_field(tmp_path):
    model = tiny_llama()
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, target_modules=["q_proj"]))
    lk.save_adapter(model, tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**data, "r": 8}))
    fresh = tiny_llama()
    before = state_snapshot(fresh)
    with pytest.raises(lk.AdapterLoadError, match=r"r=8 in adapter_config.json, 4 saved with the tensors"):
        lk.load_adapter(fresh, tmp_path)
    assert_same_state(fresh, before)
    with pytest.raises(Exception):  # PEFT reads the json too, and fails: the folder is broken for everyone
        peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)


def test_saving_a_new_config_over_an_old_folder_keeps_other_files(tmp_path):
    model = tiny_llama()
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, target_modules=["q_proj"]), adapter="a")
    lk.inject(model, lk.LoraConfig(r=2, alpha=2, target_modules=["v_proj"]), adapter="b")
    folder = tmp_path / "ad"
    lk.save_adapter(model, folder, adapter="a")
    (folder / "README.md").write_text("notes")
    (folder / "sub").mkdir()
    (folder / "sub" / "x.txt").write_text("x")
    lk.save_adapter(model, folder, adapter="b")  # both files change: the folder is swapped as a whole
    assert (folder / "README.md").read_text() == "notes" and (folder / "sub" / "x.txt").read_text() == "x"
    assert lk.read_config(folder).r == 2
    assert [p.name for p in tmp_path.iterdir()] == ["ad"]  # no temporary version left behind


def test_inject_into_an_eval_model_keeps_it_in_eval_mode():
    """New wrappers take the mode of the module they replace: no dropout on an eval model's adapters."""
    model = tiny_llama()  # in eval mode
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, target_modules="all-linear", dropout=0.3, modules_to_save=["lm_head"]))
    randomize_lora(model)
    assert not any(m.training for m in model.modules())
    ids = tokens()
    assert torch.equal(logits(model, ids), logits(model, ids))
    model.train()
    assert all(m.training for m in model.modules())
