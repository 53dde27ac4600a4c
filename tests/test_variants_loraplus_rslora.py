"""LoRA+ (arXiv:2402.12354) parameter groups, with PEFT's create_loraplus_optimizer as oracle; rsLoRA (arXiv:2312.03732) scaling."""

import math
from collections import Counter

import pytest
import torch
from torch import nn

import lorakit as lk

from helpers import randomize_lora, tiny_llama, tokens


def _summary(groups):
    """Multiset of (lr, weight_decay, shape) over all parameters of the groups."""
    return Counter((g["lr"], g["weight_decay"], tuple(p.shape)) for g in groups for p in g["params"])


def test_groups_match_peft_create_loraplus_optimizer():
    peft = pytest.importorskip("peft")
    from peft.optimizers import create_loraplus_optimizer

    kw = dict(target_modules=["q_proj", "v_proj", "embed_tokens"], bias="lora_only")
    model = tiny_llama(attention_bias=True)
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, use_dora=True, modules_to_save=["lm_head"], **kw))
    ours = lk.loraplus_param_groups(model, lr=1e-3, ratio=16, weight_decay=0.1, embedding_lr=1e-5)

    pm = peft.get_peft_model(tiny_llama(attention_bias=True), peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, modules_to_save=["lm_head"], **kw))
    opt = create_loraplus_optimizer(pm, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16,
                                    loraplus_weight_decay=0.1, loraplus_lr_embedding=1e-5)
    theirs = [g for g in opt.param_groups if g["params"]]
    assert _summary(ours) == _summary(theirs)
    # every trainable parameter exactly once
    trainable = [p for p in model.parameters() if p.requires_grad]
    grouped = [p for g in ours for p in g["params"]]
    assert len(grouped) == len(trainable) and {id(p) for p in grouped} == {id(p) for p in trainable}
    by_name = {g["name"]: g for g in ours}
    assert by_name["lora_B"]["lr"] == 16 * by_name["lora_A"]["lr"] == 16e-3
    assert by_name["lora_B_no_decay"]["weight_decay"] == 0.0 and by_name["embedding"]["lr"] == 1e-5


def test_sgd_step_moves_B_ratio_times_faster():
    model = tiny_llama(dtype=torch.float64)
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    randomize_lora(model)
    layer = model.model.layers[0].self_attn.q_proj
    A0, B0 = layer.lora_A["default"].detach().clone(), layer.lora_B["default"].detach().clone()
    opt = torch.optim.SGD(lk.loraplus_param_groups(model, lr=0.01, ratio=4))
    model(tokens()).logits.square().mean().backward()
    gA, gB = layer.lora_A["default"].grad.clone(), layer.lora_B["default"].grad.clone()
    opt.step()
    assert torch.allclose(layer.lora_A["default"] - A0, -0.01 * gA, rtol=1e-9, atol=1e-15)
    assert torch.allclose(layer.lora_B["default"] - B0, -0.04 * gB, rtol=1e-9, atol=1e-15)


def test_works_with_adam_and_rejects_bad_values():
    model = tiny_llama()
    lk.inject(model, lk.LoraConfig(r=4, target_modules=["q_proj"]))
    opt = torch.optim.Adam(lk.loraplus_param_groups(model, lr=1e-3))
    assert [g["name"] for g in opt.param_groups] == ["lora_A", "lora_B"]
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 16e-3]
    for bad in (dict(lr=0), dict(lr=1e-3, ratio=-1), dict(lr=1e-3, weight_decay=-0.1), dict(lr=float("nan"))):
        with pytest.raises(lk.LoraError):
            lk.loraplus_param_groups(model, **bad)
    with pytest.raises(lk.LoraError, match="no trainable"):
        lk.loraplus_param_groups(nn.Linear(2, 2).requires_grad_(False), lr=1e-3)


# ---------------------------------------------------------------------- rsLoRA
@pytest.mark.parametrize("r,alpha", [(1, 1.0), (4, 8.0), (16, 8.0), (64, 16.0)])
def test_rslora_scaling_matches_float64_formula(r, alpha):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(96, 80))
    lk.inject(model, lk.LoraConfig(r=r, alpha=alpha, use_rslora=True, target_modules=["0"]))
    layer = model[0]
    assert layer.scaling["default"] == alpha / math.sqrt(r)
    randomize_lora(model)
    x = torch.randn(5, 96)
    with torch.no_grad():
        ours = model(x)
    W0, b = layer.base_layer.weight.double(), layer.base_layer.bias.double()
    A, B = layer.lora_A["default"].double(), layer.lora_B["default"].double()
    ref = x.double() @ (W0 + alpha / math.sqrt(r) * B @ A).T + b  # h = W0 x + (alpha / sqrt(r)) B A x
    assert ((ours.double() - ref).abs().max() / ref.abs().max()).item() < 1e-6


def test_rslora_with_rank_and_alpha_patterns():
    model = tiny_llama()
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj"],
                                   rank_pattern={"v_proj": 9}, alpha_pattern={"v_proj": 3}))
    attn = model.model.layers[1].self_attn
    assert attn.q_proj.scaling["default"] == 8 / 2 and attn.v_proj.scaling["default"] == 3 / 3
