"""Shared fixtures: the real models from the registry packages, a tiny BERT and Llama, torch's thread count."""

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


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A 2-layer random BERT (hidden 32) with all-MiniLM-L6-v2's tokenizer, as a HF folder."""
    from helpers import tiny_bert_folder

    return tiny_bert_folder(tmp_path_factory.mktemp("tiny") / "bert")


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, smollm2_tokenizer):
    """A 2-layer random Llama (GQA: 4 heads, 2 KV heads, tied head) with SmolLM2's tokenizer, as a HF folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(smollm2_tokenizer), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         tie_word_embeddings=True))
    folder = tmp_path_factory.mktemp("tiny") / "llama"
    model.save_pretrained(folder)
    smollm2_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def restore_threads():
    """The experiments set torch's thread count (recipe `threads`); leave it as it was for other tests."""
    import torch

    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)
