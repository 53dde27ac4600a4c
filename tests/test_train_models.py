"""Model resolution, the GGUF conversion cache, and device selection."""

from __future__ import annotations

import pytest
import torch

from lorakit.train.errors import ModelLoadError
from lorakit.train.models import cache_root, resolve_device, resolve_model, set_threads


def test_builtin_names_and_aliases():
    smol = resolve_model("SmolLM2-135M-Instruct")
    assert smol.name == "smollm2" and smol.gguf and smol.path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    mini = resolve_model("minilm")
    assert not mini.gguf and (mini.path / "config.json").is_file()


def test_bad_model_paths(tmp_path):
    with pytest.raises(ModelLoadError, match="is not a built-in model"):
        resolve_model(str(tmp_path / "nope"))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="not a .gguf file"):
        resolve_model(str(tmp_path / "weights.bin"))
    with pytest.raises(ModelLoadError, match="no config.json"):
        resolve_model(str(tmp_path))


def test_converted_model_is_cached_by_sha256(smollm2_folder):
    assert smollm2_folder.parent == cache_root()
    assert (smollm2_folder / "config.json").is_file() and (smollm2_folder / "model.safetensors").is_file()
    from lorakit.train.models import converted_gguf, sha256_file

    source = resolve_model("smollm2")
    assert sha256_file(source.path)[:16] in smollm2_folder.name
    assert converted_gguf(source.path) == smollm2_folder  # a second call reuses the cache


def test_cache_root_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path))
    assert cache_root() == tmp_path


def test_device_auto_is_the_cpu_in_fp32_without_a_gpu():
    device, dtype = resolve_device("auto", "auto")
    if torch.cuda.is_available():
        assert device.type == "cuda" and dtype in (torch.bfloat16, None)
    else:
        assert device.type == "cpu" and dtype is None
        with pytest.raises(ModelLoadError, match="no GPU"):
            resolve_device("cuda", "auto")
    assert resolve_device("cpu", "bf16") == (torch.device("cpu"), torch.bfloat16)


def test_threads_default_to_every_usable_cpu():
    before = torch.get_num_threads()
    try:
        assert set_threads(1) == 1 and torch.get_num_threads() == 1
        assert set_threads(None) >= 1
    finally:
        torch.set_num_threads(before)
