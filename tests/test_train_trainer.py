"""A model prepared with `lorakit.inject` trains under transformers' `Trainer`, unchanged."""

from __future__ import annotations

import torch

import lorakit as lk

from helpers import tiny_llama


def test_injected_model_trains_under_hf_trainer(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = tiny_llama(seed=0)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    lk.inject(model, lk.LoraConfig(r=8, alpha=16, target_modules="all-linear"))
    g = torch.Generator().manual_seed(0)
    pattern = torch.randint(0, 128, (16,), generator=g)
    rows = [{"input_ids": pattern, "labels": pattern} for _ in range(16)]  # one sequence to memorise

    args = TrainingArguments(output_dir=str(tmp_path / "hf"), max_steps=25, per_device_train_batch_size=4, learning_rate=5e-2,
                             logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True,
                             dataloader_num_workers=0, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=rows)
    trainer.train()
    assert trainer.model is model  # no wrapper was needed
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 25 and sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.1  # same batch each step: a real decrease

    # only LoRA tensors moved; every base weight is bit-identical
    lora_keys = [k for k in model.state_dict() if ".lora_" in k]
    for key, value in model.state_dict().items():
        if ".lora_" in key:
            continue
        original = base.get(key.replace(".base_layer", ""))
        assert original is not None and torch.equal(original, value), key
    assert any(model.state_dict()[k].abs().sum() > 0 for k in lora_keys if "lora_B" in k)

    # the trained adapter saves and reloads to identical logits
    lk.save_adapter(model, tmp_path / "adapter")
    fresh = tiny_llama(seed=0)
    lk.load_adapter(fresh, tmp_path / "adapter")
    x = pattern[None, :10]
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x).logits, fresh(x).logits)
