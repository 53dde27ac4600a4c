"""Bad input to the core API: each case raises its specific error and leaves the model unchanged."""

import json

import pytest
import torch
from torch import nn

import lorakit as lk

from helpers import assert_same_state, randomize_lora, state_snapshot, tiny_gpt2, tiny_llama


@pytest.mark.parametrize(
    "field,kwargs",
    [
        ("r", dict(r=0)),
        ("r", dict(r=-2)),
        ("r", dict(r=2.5)),
        ("r", dict(r=True)),
        ("alpha", dict(alpha=0)),
        ("alpha", dict(alpha=-1.0)),
        ("alpha", dict(alpha=float("nan"))),
        ("dropout", dict(dropout=1.0)),
        ("dropout", dict(dropout=-0.1)),
        ("bias", dict(bias="some")),
        ("target_modules", dict(target_modules=[])),
        ("target_modules", dict(target_modules=None)),
        ("target_modules", dict(target_modules="(unclosed")),
        ("target_modules", dict(target_modules=["q_proj", 3])),
        ("init", dict(init="xavier")),
        ("rank_pattern", dict(rank_pattern={"q_proj": 0})),
        ("alpha_pattern", dict(alpha_pattern={"[": 4})),
        ("layers_to_transform", dict(layers_to_transform=[-1])),
        ("layers_pattern", dict(layers_pattern="layers")),
        ("use_rslora", dict(use_rslora="yes")),
        ("modules_to_save", dict(modules_to_save="score")),
    ],
)
def test_invalid_config_field_names_field(field, kwargs):
    args = dict(target_modules=["q_proj"])
    args.update(kwargs)
    with pytest.raises(lk.ConfigError) as info:
        lk.LoraConfig(**args)
    assert info.value.field.startswith(field)
    assert field in str(info.value)


def test_config_json_round_trip():
    cfg = lk.LoraConfig(r=4, alpha=12, dropout=0.1, target_modules=["q_proj", "v_proj"], use_rslora=True,
                        rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 3}, modules_to_save=["lm_head"],
                        init="gaussian", layers_to_transform=[1], layers_pattern="layers")
    data = json.loads(cfg.to_json())
    assert data["lora_alpha"] == 12 and data["lora_dropout"] == 0.1 and data["init_lora_weights"] == "gaussian"
    assert lk.LoraConfig.from_json(cfg.to_json()) == cfg


def test_unknown_and_unsupported_config_keys():
    good = lk.LoraConfig(target_modules=["q_proj"]).to_peft_dict()
    with pytest.raises(lk.ConfigError, match="lora_alpah"):
        lk.LoraConfig.from_peft_dict({**good, "lora_alpah": 3})
    with pytest.raises(lk.ConfigError, match="use_qalora.*not supported"):
        lk.LoraConfig.from_peft_dict({**good, "use_qalora": True})
    with pytest.raises(lk.ConfigError, match="peft_type"):
        lk.LoraConfig.from_peft_dict({**good, "peft_type": "IA3"})


def test_target_matching_nothing_lists_candidates():
    model = tiny_llama()
    snap = state_snapshot(model)
    with pytest.raises(lk.TargetNotFoundError, match="q_proj"):
        lk.inject(model, lk.LoraConfig(target_modules=["q_prj"]))
    with pytest.raises(lk.TargetNotFoundError):
        lk.inject(model, lk.LoraConfig(target_modules=r"nothing\.here"))
    assert_same_state(model, snap)
    assert not any(isinstance(m, lk.LoraLayer) for m in model.modules())


def test_unsupported_module_type_is_named():
    model = tiny_llama()
    snap = state_snapshot(model)
    with pytest.raises(lk.UnsupportedModuleError, match="LlamaMLP"):
        lk.inject(model, lk.LoraConfig(target_modules=["mlp"]))
    mha = nn.Sequential(nn.MultiheadAttention(8, 2))
    with pytest.raises(lk.UnsupportedModuleError, match="out_proj"):
        lk.inject(mha, lk.LoraConfig(target_modules=["out_proj"]))
    assert_same_state(model, snap)


def test_pattern_key_matching_no_target_is_an_error():
    model = tiny_llama()
    with pytest.raises(lk.TargetNotFoundError, match="rank_pattern"):
        lk.inject(model, lk.LoraConfig(target_modules=["q_proj"], rank_pattern={"v_proj": 2}))


def test_duplicate_adapter_name():
    model = tiny_llama()
    lk.inject(model, lk.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(lk.AdapterExistsError):
        lk.inject(model, lk.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(lk.LoraError):
        lk.inject(model, lk.LoraConfig(target_modules=["q_proj"]), adapter="has.dot")


@pytest.fixture
def saved(tmp_path):
    model = tiny_llama()
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    randomize_lora(model)
    lk.save_adapter(model, tmp_path / "ok")
    return tmp_path / "ok"


def _rewrite(folder, mutate_tensors=None, mutate_config=None):
    from safetensors.torch import load_file, save_file

    path = folder / "adapter_model.safetensors"
    if mutate_tensors:
        tensors = load_file(path)
        mutate_tensors(tensors)
        save_file(tensors, path)  # no embedded config: the json file is the authority
    if mutate_config:
        cfg = json.loads((folder / "adapter_config.json").read_text())
        mutate_config(cfg)
        (folder / "adapter_config.json").write_text(json.dumps(cfg))
        if not mutate_tensors:
            save_file(load_file(path), path)


KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


@pytest.mark.parametrize(
    "error,match,tensors,config",
    [
        (lk.AdapterLoadError, "shape", lambda t: t.__setitem__(KEY, torch.zeros(4, 31)), None),
        (lk.AdapterLoadError, "missing key", lambda t: t.pop(KEY), None),
        (lk.AdapterLoadError, "unexpected key", lambda t: t.__setitem__(KEY.replace("q_proj", "k_proj"), torch.zeros(4, 32)), None),
        (lk.AdapterLoadError, "NaN", lambda t: t[KEY].__setitem__((0, 0), float("nan")), None),
        (lk.AdapterLoadError, "dtype", lambda t: t.__setitem__(KEY, torch.zeros(4, 32, dtype=torch.int32)), None),
        (lk.AdapterLoadError, "shape", None, lambda c: c.__setitem__("r", 8)),
        (lk.AdapterLoadError, "adapter does not fit", None, lambda c: c.__setitem__("target_modules", ["qq_proj"])),
        (lk.ConfigError, "lora_alpha", None, lambda c: c.__setitem__("lora_alpha", -1)),
        (lk.ConfigError, "unknown field", None, lambda c: c.__setitem__("banana", 1)),
    ],
    ids=["shape", "missing", "unexpected", "nan", "int-dtype", "config-r", "config-targets", "bad-alpha", "unknown-field"],
)
def test_bad_adapter_files_leave_model_unchanged(saved, error, match, tensors, config):
    _rewrite(saved, tensors, config)
    model = tiny_llama()
    snap = state_snapshot(model)
    with pytest.raises(error, match=match):
        lk.load_adapter(model, saved)
    assert_same_state(model, snap)
    assert not any(isinstance(m, lk.LoraLayer) for m in model.modules())


def test_truncated_safetensors(saved):
    path = saved / "adapter_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    model = tiny_llama()
    snap = state_snapshot(model)
    with pytest.raises(lk.AdapterLoadError, match="truncated or corrupted"):
        lk.load_adapter(model, saved)
    assert_same_state(model, snap)


def test_missing_path_and_pickle_refused(tmp_path):
    model = tiny_llama()
    with pytest.raises(lk.AdapterLoadError, match="does not exist"):
        lk.load_adapter(model, tmp_path / "nope")
    (tmp_path / "pk").mkdir()
    torch.save({"x": torch.zeros(1)}, tmp_path / "pk" / "adapter_model.bin")
    with pytest.raises(lk.AdapterLoadError, match="pickle"):
        lk.load_adapter(model, tmp_path / "pk")


def test_failed_load_into_model_with_adapters_keeps_them(saved):
    model = tiny_llama()
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["k_proj"]), adapter="mine")
    randomize_lora(model)
    snap = state_snapshot(model)
    _rewrite(saved, lambda t: t.pop(KEY))
    with pytest.raises(lk.AdapterLoadError):
        lk.load_adapter(model, saved, adapter="other")
    assert_same_state(model, snap)
    assert lk.adapter_names(model) == ("mine",)


def test_load_into_wrong_architecture(saved):
    model = tiny_gpt2()
    snap = state_snapshot(model)
    with pytest.raises(lk.AdapterLoadError):
        lk.load_adapter(model, saved)
    assert_same_state(model, snap)


def test_base_weights_in_adapter_file_must_match_the_model(tmp_path):
    peft = pytest.importorskip("peft")
    from safetensors.torch import load_file, save_file

    pm = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=["embed_tokens"]))
    pm.save_pretrained(tmp_path)  # PEFT adds the whole base embedding table
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    key = "base_model.model.model.embed_tokens.base_layer.weight"
    assert key in tensors
    lk.load_adapter(tiny_llama(), tmp_path)  # equal to the model's table: accepted, not applied
    tensors[key] = tensors[key] + 1.0
    save_file(tensors, path)
    model = tiny_llama()
    snap = state_snapshot(model)
    with pytest.raises(lk.AdapterLoadError, match="does not overwrite base weights"):
        lk.load_adapter(model, tmp_path)
    assert_same_state(model, snap)


def test_edited_json_of_a_lorakit_adapter_is_validated_and_a_difference_reported(saved):
    """The json is what PEFT, vLLM and transformers read, so lorakit loads what it says. An invalid
    json is an error; one that contradicts the tensors is refused naming the field (issue 14, fault 5);
    a valid, consistent edit loads as the json says, with a warning naming what differs from the save."""
    cfg = json.loads((saved / "adapter_config.json").read_text())
    (saved / "adapter_config.json").write_text(json.dumps({**cfg, "lora_alpah": 3}))
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(lk.ConfigError, match="lora_alpah.*adapter_config.json"):
        lk.load_adapter(model, saved)
    (saved / "adapter_config.json").write_text(json.dumps({**cfg, "lora_alpha": -1}))
    with pytest.raises(lk.ConfigError, match="lora_alpha"):
        lk.load_adapter(model, saved)
    (saved / "adapter_config.json").write_text(json.dumps({**cfg, "r": 2, "lora_alpha": 3}))
    with pytest.raises(lk.AdapterLoadError, match=r"contradicts the tensors \(r=2 in adapter_config.json, 4 saved with the tensors"):
        lk.load_adapter(model, saved)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not lk.adapter_names(model)
    (saved / "adapter_config.json").write_text(json.dumps({**cfg, "lora_alpha": 3}))
    with pytest.warns(UserWarning, match=r"alpha=3 in adapter_config.json, 8(\.0)? saved with the tensors"):
        lk.load_adapter(model, saved)
    from lorakit.state import get_state

    config = get_state(model).configs["default"]
    assert (config.r, config.alpha) == (4, 3)
