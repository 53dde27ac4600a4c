"""The fused fast path (layers/fused.py) computes the plain formula: values and gradients vs float64."""

import pytest
import torch
from torch import nn

import lorakit as lk
from lorakit.ops.fused import dropout_keep_mask, lora_linear

from helpers import randomize_lora, tiny_gpt2, tiny_llama, tokens


def _reference(x, W, b, A, B, s, mask, keep_scale):
    h = x * mask * keep_scale if mask is not None else x
    return x @ W.T + (b if b is not None else 0) + s * (h @ A.T) @ B.T


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("with_bias", [True, False])
def test_fused_values_and_grads_match_float64(p, with_bias):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 12, generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.randn(10, 12, generator=g, dtype=torch.float64)
    b = torch.randn(10, generator=g, dtype=torch.float64, requires_grad=True) if with_bias else None
    A = torch.randn(4, 12, generator=g, dtype=torch.float64, requires_grad=True)
    B = torch.randn(10, 4, generator=g, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(3, 5, 10, generator=g, dtype=torch.float64)

    torch.manual_seed(7)
    out = lora_linear(x, W, b, A, B, 0.75, p)
    out.backward(grad_out)
    got = [t.grad.clone() for t in (x, A, B) + ((b,) if with_bias else ())]
    for t in (x, A, B) + ((b,) if with_bias else ()):
        t.grad = None

    torch.manual_seed(7)
    mask, keep_scale = dropout_keep_mask(torch.Size([15, 12]), p, x.device) if p > 0 else (None, 1.0)
    ref = _reference(x, W, b, A, B, 0.75, mask.reshape(x.shape) if mask is not None else None, keep_scale)
    ref.backward(grad_out)
    want = [t.grad for t in (x, A, B) + ((b,) if with_bias else ())]
    assert torch.allclose(out, ref, rtol=1e-12, atol=1e-12)
    for a, w in zip(got, want):
        assert torch.allclose(a, w, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("p", [0.05, 0.3, 0.5, 0.9])
def test_dropout_mask_drops_with_probability_p_in_every_lane(p):
    torch.manual_seed(3)
    n = 1 << 22
    mask, keep_scale = dropout_keep_mask(torch.Size([n // 8, 8]), p, torch.device("cpu"))
    k = round(p * 65536)
    assert mask.dtype == torch.bool and mask.shape == (n // 8, 8)
    assert keep_scale == 65536 / (65536 - k) and abs(k / 65536 - p) <= 2**-17
    dropped = (~mask).reshape(-1, 4).double()  # the four 16-bit lanes of each random word
    sigma = (p * (1 - p) / (n // 4)) ** 0.5
    assert ((dropped.mean(0) - k / 65536).abs() < 6 * sigma).all()
    # neighbouring lanes are independent: P(both dropped) = p^2
    both = (dropped[:, 0] * dropped[:, 1]).mean().item()
    assert abs(both - (k / 65536) ** 2) < 6 * (p * p * (1 - p * p) / (n // 4)) ** 0.5


def test_dropout_mask_tiny_p_and_odd_sizes():
    mask, keep_scale = dropout_keep_mask(torch.Size([3, 7]), 1e-7, torch.device("cpu"))
    assert mask.all() and keep_scale == 1.0  # rounds to no drop; nothing rescaled
    mask, keep_scale = dropout_keep_mask(torch.Size([5]), 0.999999, torch.device("cpu"))
    assert mask.shape == (5,) and keep_scale == 65536.0


def test_dropout_keeps_a_bool_mask_not_a_copy_of_x():
    x = torch.randn(64, 32, requires_grad=True)
    W = torch.randn(16, 32)
    A = torch.randn(4, 32, requires_grad=True)
    B = torch.randn(16, 4, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        lora_linear(x, W, None, A, B, 1.0, p=0.1)
    big = [t for t in saved if t.numel() == x.numel()]
    assert sorted(str(t.dtype) for t in big) == ["torch.bool", "torch.float32"]
    assert any(t.data_ptr() == x.data_ptr() for t in big)  # x itself, not a dropped copy


@pytest.mark.parametrize("builder,targets", [(tiny_llama, "all-linear"), (tiny_gpt2, ["c_attn", "c_fc"])])
def test_model_grads_fast_path_equal_generic_path(builder, targets):
    ids = tokens()
    grads = []
    for fast in (True, False):
        model = builder()
        lk.inject(model, lk.LoraConfig(r=4, alpha=8, target_modules=targets))
        randomize_lora(model)
        model = model.double()
        layers = [m for m in model.modules() if isinstance(m, lk.LoraLinear)]
        assert all(m._fused == "default" for m in layers)
        if not fast:
            for m in layers:
                m._fused = None
        model.train()
        model(ids, labels=ids).loss.backward()
        grads.append([p.grad for n, p in model.named_parameters() if p.requires_grad])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_fast_path_not_used_for_two_adapters_or_bf16_mismatch():
    model = nn.Sequential(nn.Linear(8, 8))
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["0"]), adapter="a")
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["0"]), adapter="b")
    lk.set_active(model, ["a", "b"])
    assert model[0]._fused is None
    lk.set_active(model, "b")
    assert model[0]._fused == "b"
    with lk.disabled(model):
        assert model[0]._fused is None


def test_bf16_autocast_trains_and_evaluates_through_the_plain_path():
    """Under autocast the fused node cannot accumulate in place (bf16 output, float32 B): the layer
    takes the composed path, whose result is the float32 one to bf16 rounding."""
    import lorakit as lk
    from helpers import randomize_lora, tiny_llama, tokens

    model = tiny_llama()
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, target_modules="all-linear", dropout=0.1))
    randomize_lora(model, std=0.05)  # an update of a trained adapter's size
    ids = tokens()
    with torch.no_grad():
        reference = model(ids).logits
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(ids).logits
    assert (logits.float() - reference).abs().max() < 0.05 * reference.abs().max()
