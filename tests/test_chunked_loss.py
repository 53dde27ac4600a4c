"""Chunked (fused linear) cross-entropy (issue 16, item 1): `lorakit.ops.loss`.

The chunked loss must be the plain loss: `F.cross_entropy(logits.float(), shifted labels,
ignore_index=-100)` as transformers computes it, in value and in every gradient (hidden states,
LoRA A/B of the layers below, the head weight when it trains, tied or not), with masks, token
weights and under bf16 autocast, and without ever creating a `(tokens, vocab)` tensor.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import randomize_lora, tiny_llama
from torch.utils._python_dispatch import TorchDispatchMode

import lorakit as lk
from lorakit.ops.loss import (
    LossError,
    causal_lm_loss,
    default_chunk_size,
    linear_cross_entropy,
    module_cross_entropy,
    shift_labels,
)

V, H = 96, 24
pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")


def _data(dtype, n=53, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, H, generator=g, dtype=dtype).requires_grad_(True)
    w = (torch.randn(V, H, generator=g, dtype=dtype) / H**0.5).requires_grad_(True)
    b = torch.randn(V, generator=g, dtype=dtype).requires_grad_(True) if bias else None
    t = torch.randint(0, V, (n,), generator=g)
    t[::4] = -100
    return h, w, b, t


def _grads(loss, params):
    return torch.autograd.grad(loss, [p for p in params if p is not None])


def _plain(h, w, b, t, weights=None, reduction="mean"):
    logits = F.linear(h, w, b)
    logits = logits if logits.dtype == torch.float64 else logits.float()
    if weights is None:
        return F.cross_entropy(logits, t, reduction=reduction)
    nll = F.cross_entropy(logits, t, reduction="none") * weights
    return nll.sum() / (t != -100).sum() if reduction == "mean" else nll.sum()


@pytest.mark.parametrize("chunk", [1, 7, 53, 1000])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
def test_value_and_gradients_equal_the_plain_loss(dtype, tol, chunk):
    h, w, b, t = _data(dtype)
    ref = _plain(h, w, b, t)
    out = linear_cross_entropy(h, w, t, b, chunk_size=chunk)
    assert out.dtype == ref.dtype and abs(float(out - ref)) <= tol * abs(float(ref))
    for g_out, g_ref in zip(_grads(out, (h, w, b)), _grads(ref, (h, w, b))):
        assert g_out.dtype == g_ref.dtype
        assert float((g_out - g_ref).abs().max()) <= tol * float(g_ref.abs().max())


def test_incoming_gradient_scales_every_gradient():
    h, w, b, t = _data(torch.float64)
    ref = _grads(_plain(h, w, b, t) * 0.25, (h, w, b))
    out = _grads(linear_cross_entropy(h, w, t, b, chunk_size=8) * 0.25, (h, w, b))
    for a, r in zip(out, ref):
        assert float((a - r).abs().max()) <= 1e-12 * float(r.abs().max())


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_token_weights(reduction):
    h, w, b, t = _data(torch.float64)
    weights = torch.rand(t.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ref = _plain(h, w, b, t, weights, reduction)
    out = linear_cross_entropy(h, w, t, b, token_weights=weights, reduction=reduction, chunk_size=6)
    assert abs(float(out - ref)) <= 1e-12 * abs(float(ref))
    for a, r in zip(_grads(out, (h, w, b)), _grads(ref, (h, w, b))):
        assert float((a - r).abs().max()) <= 1e-12 * float(r.abs().max())


def test_every_target_ignored_gives_nan_and_zero_gradients_like_torch():
    h, w, b, t = _data(torch.float64)
    t[:] = -100
    out = linear_cross_entropy(h, w, t, b)
    assert torch.isnan(out) and torch.isnan(_plain(h, w, b, t))
    assert all(float(g.abs().max()) == 0.0 for g in _grads(out, (h, w, b)))


def test_reduction_none_is_per_token_and_refuses_gradients():
    h, w, b, t = _data(torch.float64)
    with torch.no_grad():
        out = linear_cross_entropy(h, w, t, b, reduction="none", chunk_size=5)
        ref = F.cross_entropy(F.linear(h, w, b), t, reduction="none")
    assert out.dtype == torch.float32 and out.shape == t.shape
    assert float((out.double() - ref).abs().max()) <= 1e-6 and bool((out[t == -100] == 0).all())
    with pytest.raises(LossError, match="evaluation"):
        linear_cross_entropy(h, w, t, b, reduction="none")


def test_bad_arguments_raise_loss_errors():
    h, w, b, t = _data(torch.float32)
    with pytest.raises(LossError, match="disagree"):
        linear_cross_entropy(h, w, t[:-1])
    with pytest.raises(LossError, match="long"):
        linear_cross_entropy(h, w, t.int())
    with pytest.raises(LossError, match="weight must be"):
        linear_cross_entropy(h, w.T, t)
    with pytest.raises(LossError, match="reduction"):
        linear_cross_entropy(h, w, t, reduction="avg")
    assert issubclass(LossError, lk.LoraError)
    assert default_chunk_size(49152) == 682 and default_chunk_size(10) == 4096


class _Largest(TorchDispatchMode):
    """Records the largest tensor any aten op creates."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(o, torch.Tensor):
                self.numel = max(self.numel, o.numel())
        return out


def test_no_tensor_of_tokens_by_vocab_is_ever_created():
    h, w, b, t = _data(torch.float32, n=200)
    t[:] = t.clamp(min=0)  # every token supervised
    with _Largest() as chunked:
        _grads(linear_cross_entropy(h, w, t, b, chunk_size=16), (h, w, b))
    with _Largest() as plain:
        _grads(_plain(h, w, b, t), (h, w, b))
    assert plain.numel == 200 * V
    assert chunked.numel == max(16 * V, 200 * H, V * H) < 200 * V  # one chunk's logits, dh, dW


# ---------------------------------------------------------------------- whole models
def _batch(vocab=128, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (3, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # right padding
    mask[2, 5:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, :4] = -100  # a prompt: loss on the answer only
    return ids, mask, labels


def _lora_model(dtype, seed=0, targets="all-linear", **overrides):
    model = tiny_llama(seed=seed, dtype=dtype, **overrides).train()
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, target_modules=targets))
    randomize_lora(model)
    return model


def _plain_model_loss(model, ids, mask, labels):
    logits = model(input_ids=ids, attention_mask=mask).logits
    logits = logits if logits.dtype == torch.float64 else logits.float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), shift_labels(labels).reshape(-1))


def _trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
def test_causal_lm_loss_equals_the_models_own_loss(dtype, tol):
    model = _lora_model(dtype)
    ids, mask, labels = _batch()
    ref = _plain_model_loss(model, ids, mask, labels)
    if dtype == torch.float32:  # transformers' own loss is the reference we reproduce
        assert float((model(input_ids=ids, attention_mask=mask, labels=labels).loss - ref).abs()) <= 1e-6
    out = causal_lm_loss(model, ids, labels, attention_mask=mask, chunk_size=4)
    assert abs(float(out - ref)) <= tol * abs(float(ref))
    params = _trainable(model)
    assert len(params) == 2 * 7 * 2  # A and B of 7 projections in 2 layers
    for a, r in zip(_grads(out, params), _grads(ref, params)):
        assert float((a - r).abs().max()) <= tol * float(r.abs().max()) and float(r.abs().max()) > 0


@pytest.mark.parametrize("tied", [True, False])
def test_trainable_head_tied_or_not(tied):
    model = _lora_model(torch.float64, tie_word_embeddings=tied, targets=["q_proj", "v_proj"])
    head = model.get_output_embeddings()
    assert (head.weight is model.get_input_embeddings().weight) == tied
    head.weight.requires_grad_(True)
    ids, mask, labels = _batch()
    ref = _plain_model_loss(model, ids, mask, labels)
    out = causal_lm_loss(model, ids, labels, attention_mask=mask, chunk_size=5)
    params = _trainable(model)
    assert any(p is head.weight for p in params)
    for a, r in zip(_grads(out, params), _grads(ref, params)):
        assert float((a - r).abs().max()) <= 1e-12 * float(r.abs().max())


def test_loss_weights_give_the_mean_of_per_example_means():
    model = _lora_model(torch.float64)
    ids, mask, labels = _batch()
    targets = shift_labels(labels)
    counts = (targets != -100).sum(1, keepdim=True).double()
    weights = torch.zeros(labels.shape, dtype=torch.float64)
    weights[:, 1:] = (1.0 / (counts * len(ids))).expand(-1, labels.shape[1] - 1)  # weight sits on labels[b, t]
    out = causal_lm_loss(model, ids, labels, attention_mask=mask, loss_weights=weights, reduction="sum", chunk_size=3)
    per_example = [_plain_model_loss(model, ids[i:i + 1], mask[i:i + 1], labels[i:i + 1]) for i in range(len(ids))]
    ref = torch.stack(per_example).mean()
    assert abs(float(out - ref)) <= 1e-12
    for a, r in zip(_grads(out, _trainable(model)), _grads(ref, _trainable(model))):
        assert float((a - r).abs().max()) <= 1e-12 * float(r.abs().max())


def test_lora_on_the_head_takes_the_checkpointed_path():
    model = _lora_model(torch.float64, targets=["q_proj", "lm_head"])
    head = model.get_output_embeddings()
    assert isinstance(head, lk.LoraLinear)
    ids, mask, labels = _batch()
    ref = _plain_model_loss(model, ids, mask, labels)
    out = causal_lm_loss(model, ids, labels, attention_mask=mask, chunk_size=4)
    assert abs(float(out - ref)) <= 1e-12 * abs(float(ref))
    params = _trainable(model)
    assert any(p is head.lora_A["default"] for p in params)
    for a, r in zip(_grads(out, params), _grads(ref, params)):
        assert float((a - r).abs().max()) <= 1e-12 * float(r.abs().max())
    with torch.no_grad():
        per_token = causal_lm_loss(model, ids, labels, attention_mask=mask, reduction="none")
    assert abs(float(per_token.sum() / (shift_labels(labels) != -100).sum() - ref)) <= 1e-6


def test_bf16_autocast_matches_the_plain_loss_under_the_same_autocast():
    """Both compute the head in bf16 (8-bit mantissa) and the softmax in float32. The chunks run
    the same bf16 GEMM on fewer rows, whose float32 accumulation order may differ, so a logit can
    round to the neighbouring bf16 value (relative 2^-8): values agree to ~1e-3 relative, not
    bitwise; gradients differ by bf16 rounding of dlogits/dh (and the head's weight gradient is
    summed over chunks in float32 rather than rounded once to bf16). Against the float64 loss,
    the chunked one must be as accurate as the plain one."""
    # DoRA: lorakit's fused single-adapter LoRA path fails under autocast (addmm_ of bf16 and float32)
    model = tiny_llama(dtype=torch.float32, vocab_size=512, tie_word_embeddings=False).train()
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, target_modules="all-linear", use_dora=True))
    randomize_lora(model)
    model.get_output_embeddings().weight.requires_grad_(True)
    ids, mask, labels = _batch(vocab=512)
    params = _trainable(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = _plain_model_loss(model, ids, mask, labels)
        out = causal_lm_loss(model, ids, labels, attention_mask=mask, chunk_size=4)
    g_ref, g_out = _grads(ref, params), _grads(out, params)
    exact = _plain_model_loss(model.double(), ids, mask, labels)
    assert ref.dtype == out.dtype == torch.float32
    assert abs(float(out - ref)) <= 2e-3 * abs(float(ref))
    assert abs(float(out) - float(exact)) <= 2 * abs(float(ref) - float(exact)) + 1e-3
    for a, r in zip(g_out, g_ref):
        assert float((a - r).abs().max()) <= 1e-2 * float(r.abs().max())  # measured 4.6e-3 (head weight)


def test_models_the_chunked_loss_cannot_serve_are_refused():
    model = tiny_llama()
    model.config.final_logit_softcapping = 30.0
    ids, _, labels = _batch()
    with pytest.raises(LossError, match="final_logit_softcapping"):
        causal_lm_loss(model, ids, labels)
    with pytest.raises(LossError, match="backbone"):
        causal_lm_loss(torch.nn.Linear(2, 2), ids, labels)


def test_a_head_with_a_hook_goes_through_the_module():
    h, w, b, t = _data(torch.float64)
    head = torch.nn.Linear(H, V).double()
    with torch.no_grad():
        head.weight.copy_(w)
        head.bias.copy_(b)
    head.register_forward_hook(lambda m, i, o: o * 2.0)  # a fused path would silently skip this
    ref = _plain(h, w * 2, b * 2, t)
    out = module_cross_entropy(head, h, t, chunk_size=9)
    assert abs(float(out - ref)) <= 1e-12 * abs(float(ref))
    for a, r in zip(_grads(out, (h,)), _grads(ref, (h,))):
        assert float((a - r).abs().max()) <= 1e-12 * float(r.abs().max())


def test_gpt2_with_its_tied_head():
    from helpers import tiny_gpt2

    model = tiny_gpt2(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0).double().train()
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, target_modules=["c_attn"]))
    randomize_lora(model)
    ids, mask, labels = _batch()
    ref = _plain_model_loss(model, ids, mask, labels)
    out = causal_lm_loss(model, ids, labels, attention_mask=mask, chunk_size=6)
    assert abs(float(out - ref)) <= 1e-12 * abs(float(ref))
    for a, r in zip(_grads(out, _trainable(model)), _grads(ref, _trainable(model))):
        assert float((a - r).abs().max()) <= 1e-12 * float(r.abs().max())
