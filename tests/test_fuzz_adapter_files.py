"""Issue 14: thousands of adapter folders made by mutating a valid one. Each either loads to exactly
the adapter its files describe, or is refused with a `LoraError` naming the culprit, leaving the
model bitwise unchanged. PEFT is the oracle for what a valid json means."""

from __future__ import annotations

import json
import random
import re
import shutil
import struct
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save as st_save

import lorakit as lk

from helpers import assert_same_state, logits, randomize_lora, state_snapshot, tiny_llama, tokens

peft = pytest.importorskip("peft")

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
CASES = 3000


@dataclass
class Case:
    kind: str
    culprit: str  # a string the error must contain
    expect: str  # "refuse", "exact" (loads the tensors the file holds), "either", or "peft" (json: PEFT decides)


def _original(folder: Path) -> None:
    model = tiny_llama()
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"],
                                   modules_to_save=["lm_head"]))
    randomize_lora(model)
    lk.save_adapter(model, folder)


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(folder / WEIGHTS), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _write_tensors(folder: Path, tensors: dict[str, torch.Tensor], keep_metadata=True) -> None:
    with safe_open(str(folder / WEIGHTS), framework="pt") as f:
        meta = f.metadata() if keep_metadata else {"format": "pt"}
    (folder / WEIGHTS).write_bytes(st_save(tensors, metadata=meta))


# ---------------------------------------------------------------- mutations
def _m_truncate(folder, rng):
    data = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(data[: rng.randrange(0, len(data))])
    return Case("truncated safetensors", WEIGHTS, "refuse")


def _m_header_flip(folder, rng):
    data = bytearray((folder / WEIGHTS).read_bytes())
    size = struct.unpack("<Q", data[:8])[0]
    for _ in range(rng.randint(1, 3)):
        data[rng.randrange(0, 8 + size)] = rng.randrange(256)
    (folder / WEIGHTS).write_bytes(bytes(data))
    return Case("corrupted safetensors header", WEIGHTS, "either")


def _m_data_flip(folder, rng):
    data = bytearray((folder / WEIGHTS).read_bytes())
    size = struct.unpack("<Q", data[:8])[0]
    for _ in range(rng.randint(1, 8)):
        data[rng.randrange(8 + size, len(data))] = rng.randrange(256)
    (folder / WEIGHTS).write_bytes(bytes(data))
    return Case("corrupted tensor data", "", "exact")  # NaN/Inf among the new values: refused (checked below)


def _m_dtype(folder, rng):
    t = _tensors(folder)
    key = rng.choice(sorted(t))
    dtype = rng.choice([torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.int8, torch.bool])
    t[key] = t[key].to(dtype)
    _write_tensors(folder, t)
    return Case(f"dtype {dtype}", key, "exact" if dtype.is_floating_point else "refuse")


def _m_nonfinite(folder, rng):
    t = _tensors(folder)
    key = rng.choice(sorted(t))
    t[key].view(-1)[rng.randrange(t[key].numel())] = rng.choice([float("nan"), float("inf"), float("-inf")])
    _write_tensors(folder, t)
    return Case("NaN/Inf", key, "refuse")


def _m_shape(folder, rng):
    t = _tensors(folder)
    key = rng.choice(sorted(t))
    x, dim = t[key], rng.randrange(t[key].dim())
    if rng.random() < 0.5 and x.shape[dim] > 1:
        x = x.narrow(dim, 0, x.shape[dim] - 1)
    else:
        x = torch.cat([x, x.narrow(dim, 0, 1)], dim)
    t[key] = x.contiguous()
    _write_tensors(folder, t)
    return Case("shape off by one", key, "refuse")


def _m_key(folder, rng):
    t = _tensors(folder)
    key = rng.choice(sorted(t))
    how = rng.choice(["rename", "drop", "prefix", "extra"])
    if how == "rename":
        i = rng.randrange(len(key))
        new = key[:i] + rng.choice("xyz_.0") + key[i + 1:]
        if new == key:
            return Case("key unchanged", "", "exact")
        culprit = key if new in t else new  # a collision leaves `key` missing; otherwise `new` is unexpected
        t[new] = t.pop(key)
    elif how == "drop":
        del t[key]
        culprit = key
    elif how == "prefix":
        new = key.removeprefix("base_model.model.")
        t[new] = t.pop(key)
        culprit = new
    else:
        new = key.replace("lora_A", "lora_C") if "lora_A" in key else key + ".extra"
        t[new] = t[key].clone()
        culprit = new
    _write_tensors(folder, t)
    return Case(f"key {how}", culprit, "refuse")


_FIELDS = ["r", "lora_alpha", "lora_dropout", "target_modules", "modules_to_save", "bias", "use_rslora",
           "use_dora", "init_lora_weights", "rank_pattern", "alpha_pattern", "layers_to_transform", "peft_type",
           "fan_in_fan_out", "exclude_modules", "task_type", "lora_bias"]
_RETYPES = [None, "8", 8, 8.0, -1, 0, 1e9, True, [], {}, ["q_proj"], "all-linear", float("nan"), 1.5, "none"]


def _m_json_field(folder, rng):
    data = json.loads((folder / CONFIG).read_text())
    field = rng.choice(_FIELDS)
    how = rng.choice(["delete", "retype", "retype"])
    if how == "delete":
        data.pop(field, None)
    else:
        data[field] = rng.choice(_RETYPES)
    (folder / CONFIG).write_text(json.dumps(data))
    return Case(f"json {field} {how}", field, "peft")


def _m_json_contradicts(folder, rng):
    data = json.loads((folder / CONFIG).read_text())
    change = rng.choice([("r", 8), ("r", 2), ("use_dora", True), ("target_modules", ["q_proj"]),
                         ("modules_to_save", None), ("rank_pattern", {"v_proj": 2}), ("layers_to_transform", [0])])
    data[change[0]] = change[1]
    (folder / CONFIG).write_text(json.dumps(data))
    return Case(f"json contradicts tensors: {change[0]}", change[0], "refuse")


def _m_json_broken(folder, rng):
    text = (folder / CONFIG).read_text()
    how = rng.choice(["truncate", "not an object", "empty", "missing"])
    if how == "missing":
        (folder / CONFIG).unlink()
    else:
        (folder / CONFIG).write_text({"truncate": text[: rng.randrange(len(text))], "not an object": "[1, 2]",
                                      "empty": ""}[how])
    return Case(f"json {how}", CONFIG, "refuse")


def _m_weights_missing(folder, rng):
    (folder / WEIGHTS).unlink()
    return Case("weights missing", WEIGHTS, "refuse")


MUTATIONS = [(_m_truncate, 2), (_m_header_flip, 3), (_m_data_flip, 3), (_m_dtype, 2), (_m_nonfinite, 2),
             (_m_shape, 2), (_m_key, 3), (_m_json_field, 4), (_m_json_contradicts, 2), (_m_json_broken, 1),
             (_m_weights_missing, 1)]


def _template(msg: str) -> str:
    """The message with paths, quoted names, numbers and shapes taken out: its wording alone."""
    msg = re.sub(r"\S*/case\d\S*", "PATH", msg).split(", got ")[0]
    msg = re.sub(r"'[^']*'|\"[^\"]*\"|\([^()]*\)|\[[^\[\]]*\]|\{[^{}]*\}", "X", msg)
    return re.sub(r"-?\d+(\.\d+)?(e-?\d+)?", "N", msg)[:120]


# ---------------------------------------------------------------- the oracle
def _peft_logits(folder, ids):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            model = peft.PeftModel.from_pretrained(tiny_llama(), folder)
        except Exception:  # noqa: BLE001 - PEFT refusing is an answer
            return None
    return logits(model, ids)


def _check_loaded(model, folder, case, ids):
    if case.expect == "refuse":
        raise AssertionError(f"{case.kind}: loaded, but must be refused")
    if case.expect == "peft":
        expected = _peft_logits(folder, ids)
        if expected is not None:
            assert torch.allclose(logits(model, ids), expected, atol=1e-5), f"{case.kind}: differs from PEFT"
        return
    held = _tensors(folder)  # "exact"/"either": the adapter is what the file holds
    loaded = lk.adapter_state_dict(model)
    assert sorted(loaded) == sorted(held), case.kind
    for key, t in held.items():
        assert torch.isfinite(t.float()).all(), f"{case.kind}: non-finite {key} was loaded"
        assert torch.equal(loaded[key], t.to(loaded[key].dtype)), f"{case.kind}: {key} differs from the file"


@pytest.mark.slow
def test_mutated_adapter_folders_load_exactly_or_are_refused_naming_the_culprit(tmp_path):
    original = tmp_path / "original"
    _original(original)
    rng = random.Random(20261207)
    model, ids = tiny_llama(), tokens()
    clean = state_snapshot(model)
    kinds, messages, outcomes = Counter(), Counter(), Counter()
    funcs, weights = zip(*MUTATIONS)
    for i in range(CASES):
        folder = tmp_path / f"case{i % 4}"
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(original, folder)
        case = rng.choices(funcs, weights)[0](folder, rng)
        kinds[case.kind.split(":")[0]] += 1
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                lk.load_adapter(model, folder)
            except lk.LoraError as exc:
                msg = str(exc)
                assert case.expect != "exact" or "NaN or Inf" in msg, f"case {i} {case.kind}: refused: {msg}"
                assert case.culprit in msg, f"case {i} {case.kind}: {case.culprit!r} not named in: {msg}"
                assert_same_state(model, clean)
                assert not lk.adapter_names(model)
                messages[_template(msg)] += 1
                outcomes["refused"] += 1
                continue
        _check_loaded(model, folder, case, ids)
        outcomes["loaded"] += 1
        lk.unload(model)
        assert_same_state(model, clean)
    print(f"\n{CASES} cases: {dict(outcomes)}; {len(messages)} distinct error messages; kinds {dict(kinds)}")
    assert outcomes["refused"] > CASES // 3 and outcomes["loaded"] > CASES // 10
    assert len(messages) >= 15
    for m, n in messages.most_common():
        print(f"{n:5d}  {m}")
