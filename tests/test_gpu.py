"""CUDA checks (`pytest -m gpu`; `make gpu-check` on a lent GPU machine). Skipped without CUDA, so CI (CPU only)
never depends on them. Each compares the GPU against a CPU float64 reference or against itself in another form:
LoRA's forward and gradients, the chunked loss under bf16 autocast, checkpointing's gradients (dropout included),
merge / unmerge, and NF4 codes against the CPU's."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import randomize_lora, tiny_llama, tokens

import lorakit as lk
from lorakit.ops.loss import causal_lm_loss
from lorakit.train.memory import enable_checkpointing

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (make gpu-check)")]
CUDA = torch.device("cuda")


def _model(dtype=torch.float32, dropout=0.0, device=CUDA):
    model = tiny_llama(num_hidden_layers=3, dtype=dtype).train()
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, dropout=dropout, target_modules="all-linear"))
    randomize_lora(model)
    return model.to(device)


def _grads(model, ids, loss_fn=None, seed=123):
    torch.manual_seed(seed)
    torch.cuda.manual_seed(seed)
    loss = loss_fn(model, ids) if loss_fn else model(input_ids=ids, labels=ids).loss
    params = [p for p in model.parameters() if p.requires_grad]
    return [g.detach().double().cpu() for g in torch.autograd.grad(loss, params)], float(loss)


def test_lora_loss_and_gradients_on_cuda_match_a_cpu_float64_reference():
    ids = tokens(2, 16)
    gpu_grads, gpu_loss = _grads(_model(), ids.to(CUDA))
    ref_grads, ref_loss = _grads(_model(torch.float64, device="cpu"), ids)
    assert gpu_loss == pytest.approx(ref_loss, rel=1e-5)
    for g, r in zip(gpu_grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-3, atol=1e-5)


def test_chunked_loss_under_bf16_autocast_equals_the_plain_loss():
    model, ids = _model(), tokens(2, 16).to(CUDA)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        chunked, chunked_loss = _grads(model, ids, lambda m, x: causal_lm_loss(m, x, x, chunk_size=8))
        plain, plain_loss = _grads(model, ids, lambda m, x: F.cross_entropy(
            m(input_ids=x).logits[:, :-1].float().reshape(-1, m.config.vocab_size), x[:, 1:].reshape(-1)))
    assert chunked_loss == pytest.approx(plain_loss, rel=2e-2)
    for a, b in zip(chunked, plain):
        torch.testing.assert_close(a, b, rtol=5e-2, atol=5e-3)


def test_checkpointing_on_cuda_gives_the_same_gradients_with_dropout():
    model, ids = _model(dropout=0.1), tokens(2, 16).to(CUDA)
    plain, loss = _grads(model, ids)
    enable_checkpointing(model)
    checked, loss_c = _grads(model, ids)
    assert loss_c == loss
    for a, b in zip(checked, plain):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_merge_and_unmerge_on_cuda():
    model, ids = _model().eval(), tokens(2, 16).to(CUDA)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        out = model(input_ids=ids).logits
        lk.merge(model)
        merged = model(input_ids=ids).logits
        lk.unmerge(model)
    torch.testing.assert_close(merged, out, rtol=1e-4, atol=1e-5)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # unmerge restores bit for bit


def test_nf4_codes_on_cuda_equal_the_cpus():
    pytest.importorskip("bitsandbytes")
    from lorakit.quant import dequantize_weight, quantized_layers

    cpu = tiny_llama(num_hidden_layers=2, hidden_size=64, intermediate_size=128)
    gpu = tiny_llama(num_hidden_layers=2, hidden_size=64, intermediate_size=128).to(CUDA)
    lk.quantize(cpu)
    lk.quantize(gpu)
    pairs = list(zip(quantized_layers(cpu), quantized_layers(gpu)))
    assert pairs
    for (name, a), (_, b) in pairs:
        torch.testing.assert_close(dequantize_weight(b).cpu(), dequantize_weight(a), rtol=0, atol=1e-6, msg=name)
