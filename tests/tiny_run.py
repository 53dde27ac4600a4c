"""A tiny `lorakit train` setup for the resume and distributed tests: a 2-layer Llama folder with a
word-level tokenizer, and a 200-row sentiment JSONL. A run of a few steps takes a few seconds."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

POSITIVE = "good great fine fun loved".split()
NEGATIVE = "bad awful boring dull hated".split()
NOUNS = "movie film plot actors".split()


def make_tiny(folder: Path) -> tuple[Path, Path]:
    """Write `folder/model` (HF Llama + tokenizer) and `folder/data.jsonl`; returns both paths."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    model_dir, data = folder / "model", folder / "data.jsonl"
    vocab = {"<pad>": 0, "<unk>": 1, "<s>": 2, "</s>": 3}
    words = POSITIVE + NEGATIVE + NOUNS + ["positive", "negative", "Review:", "Is", "this", "movie", "review", "positive", "or",
                                           "negative?", "Sentiment:"] + [str(i) for i in range(200)]
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(model_dir)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0,
                                 bos_token_id=2, eos_token_id=3)).save_pretrained(model_dir)
    rng = random.Random(0)
    with open(data, "w", encoding="utf-8") as f:
        for i in range(200):
            positive = rng.random() < 0.5
            ws = [rng.choice(POSITIVE if positive else NEGATIVE) for _ in range(rng.randint(2, 6))]
            ws += [rng.choice(NOUNS) for _ in range(rng.randint(1, 4))]
            rng.shuffle(ws)
            f.write(json.dumps({"text": " ".join(ws) + f" {i}", "label": "positive" if positive else "negative"}) + "\n")
    return model_dir, data


def recipe_fields(model_dir: Path, data: Path, **changes) -> dict:
    """Recipe fields of a tiny classify-lm run (q_proj + v_proj, r=8)."""
    fields = dict(model=str(model_dir), data=str(data), steps=6, batch_size=4, test_size=20, val_size=8, eval_every=0,
                  eval_batch_size=16, threads=1, lora={"target_modules": ["q_proj", "v_proj"]})
    fields.update(changes)
    return fields


def flags(fields: dict) -> list[str]:
    """The same fields as `lorakit train` flags."""
    out = []
    for key, value in fields.items():
        if key == "lora":
            out += ["--target-modules", ",".join(value["target_modules"])]
            for k, v in value.items():
                if k != "target_modules":
                    out += ["--set", f"lora.{k}={v}"]
        else:
            out += ["--" + key.replace("_", "-"), str(value)]
    return out


def adapter_tensors(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)
