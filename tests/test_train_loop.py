"""The training loop: schedules, accumulation, AdamW state size, evaluation cadence, bad loss."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from lorakit.train.loop import LoopConfig, lr_lambda, train


def test_warmup_then_cosine_and_linear():
    f = lr_lambda("cosine", warmup=4, total=20)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == 1.0
    assert f(12) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(20) == pytest.approx(0.0, abs=1e-12)
    g = lr_lambda("linear", warmup=0, total=10)
    assert [g(s) for s in (0, 5, 10)] == [1.0, 0.5, 0.0]
    assert lr_lambda("constant", warmup=2, total=10)(7) == 1.0


def _regression(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0]) + 0.1
    return x, y


def _mse(model, batch):
    x, y = batch
    return torch.nn.functional.mse_loss(model(x).squeeze(-1), y), x.shape[0]


def _stream(x, y, size):
    while True:
        for i in range(0, len(x), size):
            yield x[i:i + size], y[i:i + size]


def test_loss_decreases_and_adamw_state_is_8_bytes_per_trainable_parameter():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    model[0].weight.requires_grad_(False)  # a frozen part holds no optimizer state
    x, y = _regression()
    evals = iter(range(100))
    res = train(model, _mse, _stream(x, y, 8), LoopConfig(steps=30, lr=0.05, warmup_steps=3, eval_every=10),
                device=torch.device("cpu"), evaluate=lambda: {"loss": float(next(evals))}, log=lambda m: None)
    assert res.history[-1]["loss"] < 0.5 * res.history[0]["loss"]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert res.optimizer_state_bytes == 8 * trainable
    assert [e["step"] for e in res.evals] == [0, 10, 20, 30]
    assert res.tokens == 30 * 8 and res.tokens_per_second > 0 and res.peak_memory_bytes > 0
    assert [h["lr"] for h in res.history[:3]] == pytest.approx([0.05 / 3, 0.1 / 3, 0.05])


def test_gradient_accumulation_matches_one_big_batch():
    torch.manual_seed(0)
    a = torch.nn.Linear(5, 1)
    b = copy.deepcopy(a)
    x, y = _regression(8)
    cfg = dict(steps=1, lr=0.1, schedule="constant", grad_clip=0.0)
    train(a, _mse, _stream(x, y, 8), LoopConfig(grad_accum=1, **cfg), device=torch.device("cpu"), log=lambda m: None)
    train(b, _mse, _stream(x, y, 4), LoopConfig(grad_accum=2, **cfg), device=torch.device("cpu"), log=lambda m: None)
    torch.testing.assert_close(a.weight, b.weight, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(a.bias, b.bias, rtol=1e-6, atol=1e-7)


def test_gradient_clipping_bounds_the_first_update():
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 1)
    x, y = _regression(8)
    res = train(model, lambda m, b: (_mse(m, b)[0] * 1e4, 8), _stream(x, y, 8),
                LoopConfig(steps=1, lr=1e-3, grad_clip=1.0), device=torch.device("cpu"), log=lambda m: None)
    assert res.history[0]["grad_norm"] > 1.0  # recorded before clipping


def test_bf16_autocast_path_runs_on_cpu():
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 1)
    x, y = _regression(16)
    before = _mse(model, (x, y))[0].item()
    train(model, _mse, _stream(x, y, 8), LoopConfig(steps=40, lr=0.1), device=torch.device("cpu"),
          dtype=torch.bfloat16, log=lambda m: None)
    assert model.weight.dtype == torch.float32  # weights stay fp32; only the compute is bf16
    assert _mse(model, (x, y))[0].item() < 0.5 * before


def test_non_finite_loss_stops_with_a_clear_error():
    model = torch.nn.Linear(2, 1)
    with pytest.raises(ValueError, match="loss became nan at step 1"):
        train(model, lambda m, b: (m(b).sum() * float("nan"), 1), iter([torch.ones(1, 2)] * 3), LoopConfig(steps=2, lr=0.1),
              device=torch.device("cpu"), log=lambda m: None)


def test_no_trainable_parameters_is_an_error():
    model = torch.nn.Linear(2, 1).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        train(model, _mse, iter([]), LoopConfig(steps=1, lr=0.1), device=torch.device("cpu"), log=lambda m: None)


def test_plain_log_lines_outside_a_terminal():
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 1)
    x, y = _regression(16)
    lines = []
    train(model, _mse, _stream(x, y, 8), LoopConfig(steps=10, lr=0.01, log_every=5, eval_every=5), device=torch.device("cpu"),
          evaluate=lambda: {"loss": 1.0}, log=lines.append)  # pytest's stderr is not a terminal: tqdm stays off
    steps = [l.split()[1] for l in lines if l.startswith("step ")]
    assert steps == ["1/10", "5/10", "10/10"]
    assert [l.split(":")[0] for l in lines if l.startswith("eval")] == ["eval @ step 0", "eval @ step 5", "eval @ step 10"]
    assert all("tok/s" in l and "lr" in l for l in lines if l.startswith("step "))


def test_loraplus_ratio_gives_b_ratio_times_the_learning_rate():
    """AdamW's first step moves every parameter with a non-zero gradient by exactly its learning
    rate (m / sqrt(v) = sign(g) after bias correction; eps is negligible), and B starts at zero:
    so after one step |B| is B's learning rate."""
    import lorakit as lk

    x, y = _regression()
    for ratio, b_lr in ((0.0, 0.01), (16.0, 0.16)):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        lk.inject(model, lk.LoraConfig(r=2, target_modules=["0"]))
        train(model, _mse, _stream(x, y, 8), LoopConfig(steps=1, lr=0.01, schedule="constant", grad_clip=0.0, loraplus_ratio=ratio),
              device=torch.device("cpu"), evaluate=None, log=lambda m: None)
        B = model[0].lora_B["default"].detach()
        assert torch.allclose(B.abs(), torch.full_like(B, b_lr), rtol=1e-3), (ratio, B)
