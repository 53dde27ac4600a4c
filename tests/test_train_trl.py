"""A model prepared with `lorakit.inject` trains under TRL's `SFTTrainer`, unchanged (issue 18, item 6),
and the adapter it trained loads in PEFT with the same logits."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import lorakit as lk

from tiny_run import make_tiny

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
peft = pytest.importorskip("peft")


def test_injected_model_trains_under_trl_sft_trainer_and_loads_in_peft(tmp_path):
    model_dir, _ = make_tiny(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    lk.inject(model, lk.LoraConfig(r=8, alpha=16, target_modules="all-linear"))
    text = "great film positive 7 awful plot negative 9 " * 3  # one text to memorise
    rows = datasets.Dataset.from_list([{"text": text} for _ in range(16)])
    args = trl.SFTConfig(output_dir=str(tmp_path / "sft"), max_steps=20, per_device_train_batch_size=4,
                         learning_rate=5e-2,
                         logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True,
                         dataloader_num_workers=0, seed=0, max_length=64,
                         bf16=False)  # TRL's default bf16 makes accelerate wrap model.forward in autocast for good
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=rows, processing_class=tokenizer)
    trainer.train()
    assert trainer.model is model  # TRL kept lorakit's model: no PEFT wrapper, no copy
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 20 and sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.1

    for key, value in model.state_dict().items():  # only LoRA tensors moved
        if ".lora_" not in key:
            assert torch.equal(base[key.replace(".base_layer", "")], value), key

    lk.save_adapter(model, tmp_path / "adapter")
    peft_model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), tmp_path / "adapter")
    ids = tokenizer(text, return_tensors="pt").input_ids
    model.eval(), peft_model.eval()
    with torch.no_grad():
        ours, theirs = model(ids).logits, peft_model(ids).logits
    assert (ours - theirs).abs().max().item() < 1e-5
    with torch.no_grad(), lk.disabled(model):
        assert (model(ids).logits - ours).abs().max().item() > 1e-3  # the adapter learnt something
