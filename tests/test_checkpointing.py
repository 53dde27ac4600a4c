"""Activation checkpointing with lorakit adapters (issue 16, item 2): `lorakit.train.memory`.

The checkpointed run must give the unchecked run's gradients bit for bit: the recomputation
replays the same kernels on the same inputs with the same thread count, and
`torch.utils.checkpoint` restores the RNG state first, so a LoRA dropout mask drawn in the
recomputation is the one drawn in the first forward (a run with `preserve_rng_state=False`
shows that this is what makes them equal). Checked for the fused LoRA path with dropout,
DoRA, an NF4 base, a plain `nn.Module` stack, the chunked loss, and 2-process DDP.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from helpers import randomize_lora, tiny_llama, tokens
from torch import nn

import lorakit as lk
from lorakit.ops.loss import causal_lm_loss
from lorakit.train.memory import (
    CheckpointingError,
    checkpoint_kwargs,
    checkpointing_enabled,
    disable_checkpointing,
    enable_checkpointing,
    want_checkpointing,
)


def _model(seed=0, dropout=0.1, dtype=torch.float32, **cfg):
    model = tiny_llama(seed=seed, num_hidden_layers=3, dtype=dtype).train()
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, dropout=dropout, target_modules="all-linear", **cfg))
    randomize_lora(model)
    return model


def _grads(model, ids, seed=123, loss_fn=None):
    """Gradients of the trainable tensors after one forward/backward from RNG seed `seed`."""
    torch.manual_seed(seed)
    loss = loss_fn(model, ids) if loss_fn else model(input_ids=ids, labels=ids).loss
    params = [p for p in model.parameters() if p.requires_grad]
    return [g.clone() for g in torch.autograd.grad(loss, params)], float(loss.detach())


def _count_calls(module):
    calls = []
    module.register_forward_hook(lambda *a: calls.append(1))
    return calls


def _assert_bitwise(a, b):
    assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def test_transformers_checkpointing_gives_bitwise_equal_gradients_with_dropout():
    model, ids = _model(), tokens(2, 12)
    q0 = model.model.layers[0].self_attn.q_proj
    calls = _count_calls(q0)
    plain, loss = _grads(model, ids)
    assert len(calls) == 1
    assert enable_checkpointing(model) == "transformers" and checkpointing_enabled(model)
    checked, loss_c = _grads(model, ids)
    assert len(calls) == 3  # forward + the recomputation in backward: the layer was checkpointed
    assert loss_c == loss
    _assert_bitwise(checked, plain)
    other, _ = _grads(model, ids, seed=7)  # the dropout masks matter: another seed, other gradients
    assert not torch.equal(other[0], plain[0])
    assert not hasattr(model, "_require_grads_hook") and not getattr(model, "_require_grads_hooks", None)
    disable_checkpointing(model)
    assert not checkpointing_enabled(model)
    _grads(model, ids)
    assert len(calls) == 1 + 2 + 2 + 1  # one call again


def test_without_rng_preservation_the_recomputed_masks_differ():
    """What makes the equality above: the checkpoint restores the RNG state before recomputing."""
    model, ids = _model(), tokens(2, 12)
    plain, _ = _grads(model, ids)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False, "preserve_rng_state": False})
    unpreserved, _ = _grads(model, ids)
    assert any(not torch.equal(a, b) for a, b in zip(unpreserved, plain))


def test_selective_checkpointing_keeps_attention_and_the_gradients():
    model, ids = _model(), tokens(2, 12)
    plain, _ = _grads(model, ids)
    enable_checkpointing(model, keep_attention=True)
    _assert_bitwise(_grads(model, ids)[0], plain)
    assert "context_fn" in checkpoint_kwargs(True) and checkpoint_kwargs() == {"use_reentrant": False}


def test_with_the_chunked_loss():
    """lorakit's long-context path (checkpointing + chunked loss) against the plain one, in float64."""
    model, ids = _model(dropout=0.05, dtype=torch.float64), tokens(2, 12)
    plain, loss = _grads(model, ids, loss_fn=lambda m, x: F.cross_entropy(m(x).logits[:, :-1].flatten(0, 1), x[:, 1:].flatten()))
    enable_checkpointing(model)
    checked, loss_c = _grads(model, ids, loss_fn=lambda m, x: causal_lm_loss(m, x, x, chunk_size=5))
    assert abs(loss_c - loss) <= 1e-12
    for a, b in zip(checked, plain):
        assert float((a - b).abs().max()) <= 1e-12 * float(b.abs().max())


def test_dora():
    model, ids = _model(use_dora=True), tokens(2, 12)
    plain, _ = _grads(model, ids)
    assert any("magnitude" in n for n, p in model.named_parameters() if p.requires_grad)
    enable_checkpointing(model)
    _assert_bitwise(_grads(model, ids)[0], plain)


def test_nf4_base():
    pytest.importorskip("bitsandbytes")
    model = tiny_llama(num_hidden_layers=3, hidden_size=64, intermediate_size=128).train()
    lk.quantize(model, "nf4")
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, dropout=0.1, target_modules="all-linear"))
    randomize_lora(model)
    ids = tokens(2, 12)
    plain, _ = _grads(model, ids)
    enable_checkpointing(model)
    _assert_bitwise(_grads(model, ids)[0], plain)


class _Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.up, self.down = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x, scale=1.0):
        return x + scale * self.down(torch.relu(self.up(x)))


class _Stack(nn.Module):
    def __init__(self, d=16, n=4):
        super().__init__()
        self.embed, self.blocks, self.out = nn.Linear(d, d), nn.ModuleList(_Block(d) for _ in range(n)), nn.Linear(d, 1)

    def forward(self, x):
        h = self.embed(x)
        for b in self.blocks:
            h = b(h, scale=0.5)
        return self.out(h).sum()


def test_generic_stack():
    torch.manual_seed(0)
    model = _Stack().train()
    lk.inject(model, lk.LoraConfig(r=2, alpha=4, dropout=0.2, target_modules=["up", "down"]))
    randomize_lora(model)
    x = torch.randn(5, 16)
    keys = list(model.state_dict())
    plain, _ = _grads(model, x, loss_fn=lambda m, x: m(x))
    calls = _count_calls(model.blocks[0].up)
    assert enable_checkpointing(model) == "generic" and checkpointing_enabled(model)
    checked, _ = _grads(model, x, loss_fn=lambda m, x: m(x))
    assert len(calls) == 2 and list(model.state_dict()) == keys
    _assert_bitwise(checked, plain)
    disable_checkpointing(model)
    assert not checkpointing_enabled(model) and "forward" not in model.blocks[0].__dict__


def test_modes_and_errors():
    assert want_checkpointing("auto", 4096, min_tokens=2048) and not want_checkpointing("auto", 1024, min_tokens=2048)
    assert want_checkpointing("on", 1) and not want_checkpointing("off", 10**6)
    with pytest.raises(CheckpointingError, match="one of"):
        want_checkpointing("yes", 1)
    with pytest.raises(CheckpointingError, match="repeated blocks"):
        enable_checkpointing(nn.Linear(2, 2))
    assert issubclass(CheckpointingError, lk.LoraError)


def _ddp_worker(rank, world, port, out):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    results = []
    for checkpointed in (False, True):
        model = _model()
        if checkpointed:
            enable_checkpointing(model)
        ddp = DDP(model)
        torch.manual_seed(100 + rank)
        ids = tokens(2, 12, seed=rank)
        ddp(input_ids=ids, labels=ids).loss.backward()
        results.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    torch.save(results, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_two_processes(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    (plain0, checked0), (plain1, checked1) = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    _assert_bitwise(checked0, plain0)
    _assert_bitwise(checked1, plain1)
    _assert_bitwise(plain0, plain1)  # all-reduced: both ranks hold the same averaged gradients


_MMAPPED = """
import ctypes, sys, torch
from lorakit.train.memory import release_large_frees
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                                                "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
x = torch.ones(8_000_000)
del x  # one large free: glibc raises its dynamic mmap threshold to ~32 MB
if sys.argv[1] == "1":
    assert release_large_frees()
before = libc.mallinfo2().hblkhd
y = torch.ones(1_000_000)  # 4 MB, activation-sized
print(libc.mallinfo2().hblkhd - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_release_large_frees_maps_activation_sized_tensors():
    """With the fixed threshold a 4 MB tensor is mmapped (its free returns it to the OS); with
    glibc's default, after one large free, it comes from the heap (bytes in mmapped blocks, mallinfo2)."""
    run = lambda flag: int(subprocess.run([sys.executable, "-c", _MMAPPED, flag], capture_output=True, text=True,
                                          check=True).stdout.split()[-1])  # noqa: E731
    assert run("0") == 0
    assert run("1") >= 4_000_000
