"""Session-wide fixtures for tests that use the real models from the registry packages."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def smollm2_folder():
    """The SmolLM2-135M-Instruct GGUF converted once to a plain HF folder (cached under ~/.cache/lorakit)."""
    from lorakit.train.errors import ModelLoadError
    from lorakit.train.models import converted_gguf, resolve_model

    try:
        source = resolve_model("smollm2")
    except ModelLoadError as exc:
        pytest.skip(str(exc))
    return converted_gguf(source.path)


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_folder)
