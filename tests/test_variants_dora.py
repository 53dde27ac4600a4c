"""DoRA (Liu et al. 2024, arXiv:2402.09353) against a float64 reference of eq. 5 / §4.3, and PEFT as the file oracle."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lorakit as lk
from lorakit.state import get_state, lora_layers
from lorakit.variants import dora

from helpers import logits, randomize_lora, tiny_gpt2, tiny_llama, tokens

KINDS = ["linear", "conv1d", "embedding"]
OUT, IN, VOCAB, R, ALPHA = 16, 24, 40, 4, 6.0


def _conv1d(nf, nx):
    from transformers.pytorch_utils import Conv1D

    return Conv1D(nf, nx)


def dora_layer(kind: str, dtype=torch.float32, dropout: float = 0.0, seed: int = 0):
    """A randomised DoRA layer of `kind` (A, B, m and the bias all non-trivial)."""
    torch.manual_seed(seed)
    base = {"linear": lambda: nn.Linear(IN, OUT), "conv1d": lambda: _conv1d(OUT, IN), "embedding": lambda: nn.Embedding(VOCAB, OUT)}[kind]()
    model = nn.Sequential(base).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    lk.inject(model, lk.LoraConfig(r=R, alpha=ALPHA, dropout=dropout, target_modules=["0"], use_dora=True))
    layer = model[0]
    with torch.no_grad():
        layer.lora_A["default"].copy_(torch.randn_like(layer.lora_A["default"]) * 0.3)
        layer.lora_B["default"].copy_(torch.randn_like(layer.lora_B["default"]) * 0.3)
        m = layer.lora_magnitude_vector["default"]
        m.mul_(1 + 0.3 * torch.randn_like(m))
    return model.eval(), layer


def make_input(kind: str, dtype=torch.float32, seed: int = 5):
    g = torch.Generator().manual_seed(seed)
    if kind == "embedding":
        return torch.randint(0, VOCAB, (3, 7), generator=g)
    return torch.randn(3, 7, IN, generator=g, dtype=torch.float64).to(dtype)


def reference_tensors(kind: str, layer):
    """Independent float64 leaves: W0 as (out, in), bias, A (r, in), B (out, r), m (out,)."""
    w = layer.base_layer.weight.detach().double()
    w0 = w if kind == "linear" else w.T  # Conv1D stores (in, out); embedding table is (in=vocab, out=dim)
    bias = getattr(layer.base_layer, "bias", None)
    leaves = {k: t.detach().double().clone().requires_grad_(True) for k, t in (
        ("A", layer.lora_A["default"]), ("B", layer.lora_B["default"]), ("m", layer.lora_magnitude_vector["default"]))}
    return w0, (bias.detach().double() if bias is not None else None), leaves


def reference_forward(kind, w0, bias, t, x, detach_norm=True, x_drop=None):
    """Paper eq. 5: W' = m * V / ||V||_c with V = W0 + s B A (norm detached, §4.3), applied as the layer does."""
    s = ALPHA / R
    V = w0 + s * t["B"] @ t["A"]
    n = torch.linalg.vector_norm(V, dim=1)
    if detach_norm:
        n = n.detach()
    scale = t["m"] / n
    if kind == "embedding":
        return F.embedding(x, ((scale[:, None] * V).T))
    x = x.double()
    if x_drop is None:
        out = x @ (scale[:, None] * V).T
    else:  # LoRA dropout as in the paper's code: W0 x + (m/n - 1) W0 x_d + (m/n) s B A x_d
        xd = x_drop.double()
        out = x @ w0.T + (scale - 1) * (xd @ w0.T) + scale * (s * (xd @ t["A"].T) @ t["B"].T)
    return out + bias if bias is not None else out


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.mark.parametrize("kind", KINDS)
def test_forward_matches_float64_reference(kind):
    for dtype, tol in ((torch.float32, 1e-6), (torch.float64, 1e-12)):
        model, layer = dora_layer(kind, dtype)
        x = make_input(kind, dtype)
        w0, bias, t = reference_tensors(kind, layer)
        with torch.no_grad():
            ours = model(x)
            ref = reference_forward(kind, w0, bias, t, x)
        assert ours.dtype == dtype
        assert rel_err(ours, ref) < tol, (dtype, rel_err(ours, ref))


@pytest.mark.parametrize("kind", KINDS)
def test_magnitude_starts_at_column_norm_and_step0_is_base(kind):
    torch.manual_seed(0)
    base = {"linear": lambda: nn.Linear(IN, OUT), "conv1d": lambda: _conv1d(OUT, IN), "embedding": lambda: nn.Embedding(VOCAB, OUT)}[kind]()
    model = nn.Sequential(base).eval()
    x = make_input(kind)
    with torch.no_grad():
        before = model(x)
    w = base.weight.detach().double()
    w0 = w if kind == "linear" else w.T
    lk.inject(model, lk.LoraConfig(r=R, alpha=ALPHA, target_modules=["0"], use_dora=True))
    m = model[0].lora_magnitude_vector["default"]
    assert m.shape == (OUT,) and m.requires_grad
    assert torch.allclose(m.double(), torch.linalg.vector_norm(w0, dim=1), rtol=1e-6, atol=0)
    with torch.no_grad():
        assert torch.allclose(model(x), before, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_match_reference_with_detached_norm(kind):
    model, layer = dora_layer(kind, torch.float64)
    x = make_input(kind, torch.float64)
    g = torch.randn(3, 7, OUT, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    (model(x) * g).sum().backward()
    w0, bias, t = reference_tensors(kind, layer)
    (reference_forward(kind, w0, bias, t, x) * g).sum().backward()
    ours = {"A": layer.lora_A["default"].grad, "B": layer.lora_B["default"].grad, "m": layer.lora_magnitude_vector["default"].grad}
    for k in "ABm":
        assert rel_err(ours[k], t[k].grad) < 1e-10, k
    # the test can tell: with the norm in the graph, the gradients of A and B differ
    _, _, t2 = reference_tensors(kind, layer)
    (reference_forward(kind, w0, bias, t2, x, detach_norm=False) * g).sum().backward()
    assert rel_err(ours["A"], t2["A"].grad) > 1e-4 and rel_err(ours["B"], t2["B"].grad) > 1e-4
    assert layer.base_layer.weight.grad is None


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_dropout_shares_the_mask_between_base_and_lora_terms(kind):
    model, layer = dora_layer(kind, torch.float64, dropout=0.4)
    model.train()
    x = make_input(kind, torch.float64)
    torch.manual_seed(123)
    ours = model(x)
    torch.manual_seed(123)
    x_drop = F.dropout(x, 0.4, True)
    w0, bias, t = reference_tensors(kind, layer)
    ref = reference_forward(kind, w0, bias, t, x, x_drop=x_drop)
    assert rel_err(ours, ref) < 1e-12
    model.eval()
    with torch.no_grad():
        assert rel_err(model(x), reference_forward(kind, w0, bias, t, x)) < 1e-12


@pytest.mark.parametrize("kind", KINDS)
def test_merged_equals_unmerged(kind):
    model, layer = dora_layer(kind)
    x = make_input(kind)
    w_before = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        unmerged = model(x)
        lk.merge(model)
        merged = model(x)
        lk.unmerge(model)
        again = model(x)
    assert rel_err(merged, unmerged) < 1e-5
    assert torch.equal(layer.base_layer.weight, w_before)
    assert torch.equal(again, unmerged)
    plain = lk.merge_and_unload(model)
    assert isinstance(plain[0], type(layer.base_layer))
    with torch.no_grad():
        assert rel_err(plain(x), unmerged) < 1e-5


def test_dora_after_a_merged_lora_adapter_is_consistent():
    """The norm uses the unmerged W0 (as PEFT), so merging another adapter does not change the output."""
    model, layer = dora_layer("linear", torch.float64)
    lk.inject(model, lk.LoraConfig(r=2, alpha=2, target_modules=["0"]), adapter="plain")
    randomize_lora(model, seed=4)
    with torch.no_grad():
        layer.lora_magnitude_vector["default"].mul_(1.1)
    lk.set_active(model, ["plain", "default"])
    x = make_input("linear", torch.float64)
    with torch.no_grad():
        ref = model(x)
        lk.merge(model, ["plain"])
        partly = model(x)
        lk.merge(model)
        full = model(x)
    assert rel_err(partly, ref) < 1e-12 and rel_err(full, ref) < 1e-12


# ---------------------------------------------------------------------- norm cache
def _count_norms(monkeypatch):
    calls = []
    real = dora.weight_norm

    def counting(layer, adapter):
        calls.append(adapter)
        return real(layer, adapter)

    monkeypatch.setattr(dora, "weight_norm", counting)
    return calls


def _check(model, layer, kind, x):
    w0, bias, t = reference_tensors(kind, layer)
    with torch.no_grad():
        assert rel_err(model(x), reference_forward(kind, w0, bias, t, x)) < 1e-6


def test_norm_is_cached_for_no_grad_inference_and_invalidated(monkeypatch):
    model, layer = dora_layer("linear")
    x = make_input("linear")
    calls = _count_norms(monkeypatch)
    with torch.no_grad():
        first = model(x)
        for _ in range(3):
            assert torch.equal(model(x), first)
    assert len(calls) == 1

    with torch.no_grad():  # an in-place update of B bumps its version: recomputed
        layer.lora_B["default"].add_(0.1)
    _check(model, layer, "linear", x)
    assert len(calls) == 2
    with torch.no_grad():  # m is not part of the norm: no recompute, new value used
        layer.lora_magnitude_vector["default"].mul_(0.9)
    _check(model, layer, "linear", x)
    assert len(calls) == 2

    with torch.no_grad():  # a write that bypasses version counters is seen after train()/eval()
        layer.lora_A["default"].data.mul_(2.0)
    model.train()
    model.eval()
    _check(model, layer, "linear", x)
    assert len(calls) == 3

    lk.merge(model)
    lk.unmerge(model)  # the base weight was written: recomputed
    _check(model, layer, "linear", x)
    assert len(calls) == 4

    model.double()  # moving/casting drops the cache
    _check(model, layer, "linear", x.double())
    assert len(calls) == 5

    y = model(x.double())  # gradient-recording forwards always compute (and drop the cache)
    y.sum().backward()
    model(x.double())
    assert len(calls) == 7
    _check(model, layer, "linear", x.double())
    assert len(calls) == 8


def test_cache_stays_correct_during_training_with_fused_optimizer(monkeypatch):
    """`AdamW(fused=True)` does not bump version counters; the grad-recording forward before it drops the cache."""
    model, layer = dora_layer("linear")
    x = make_input("linear")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=0.05, fused=True)
    versions = [p._version for p in params]
    for _ in range(3):
        _check(model, layer, "linear", x)  # no-grad evaluation between steps
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    assert [p._version for p in params] == versions  # really no version bump
    _check(model, layer, "linear", x)


def test_cached_norm_from_inference_mode_is_not_reused_outside_it():
    model, layer = dora_layer("linear")
    x = make_input("linear")
    with torch.inference_mode():
        inf = model(x)
    with torch.no_grad():
        assert torch.equal(model(x), inf)
    model(x).sum().backward()  # no "inference tensor saved for backward" error
    assert layer.lora_magnitude_vector["default"].grad is not None


# ---------------------------------------------------------------------- files and PEFT
peft = pytest.importorskip("peft")

CASES = [
    ("llama", tiny_llama, ["q_proj", "v_proj", "down_proj", "embed_tokens"]),
    ("gpt2", tiny_gpt2, ["c_attn", "c_proj", "c_fc"]),
]


def _randomize_magnitudes(params, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.mul_(1 + 0.5 * torch.rand(p.shape, generator=g, dtype=p.dtype))


@pytest.mark.parametrize("name,builder,targets", CASES, ids=[c[0] for c in CASES])
def test_dora_adapter_loads_in_peft(tmp_path, name, builder, targets):
    model = builder()
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, target_modules=targets, use_dora=True))
    randomize_lora(model)
    _randomize_magnitudes([p for n, p in model.named_parameters() if "lora_magnitude_vector" in n])
    ids = tokens()
    ours = logits(model, ids)
    lk.save_adapter(model, tmp_path / "a")
    from safetensors.torch import load_file

    keys = load_file(tmp_path / "a" / "adapter_model.safetensors")
    assert sum(k.endswith(".lora_magnitude_vector") for k in keys) == sum(1 for _ in lora_layers(model))

    pm = peft.PeftModel.from_pretrained(builder(), tmp_path / "a").eval()
    assert pm.peft_config["default"].use_dora
    theirs = logits(pm, ids)
    with pm.disable_adapter():
        assert not torch.allclose(logits(pm, ids), theirs, atol=1e-3)
    assert torch.allclose(theirs, ours, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,builder,targets", CASES, ids=[c[0] for c in CASES])
def test_peft_dora_adapter_loads_in_lorakit(tmp_path, name, builder, targets):
    pm = peft.get_peft_model(builder(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=True)).eval()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_magnitude_vector" in n:
                p.mul_(1 + 0.5 * torch.rand(p.shape, generator=g))
            elif "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    ids = tokens()
    theirs = logits(pm, ids)
    pm.save_pretrained(tmp_path / "a")

    model = builder()
    lk.load_adapter(model, tmp_path / "a")
    assert get_state(model).configs["default"].use_dora
    ours = logits(model, ids)
    assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-5)
    trainable, _ = lk.count_parameters(model)
    assert trainable == sum(p.numel() for n, p in pm.named_parameters() if "lora_" in n)
    lk.merge(model)
    assert torch.allclose(logits(model, ids), theirs, rtol=1e-4, atol=1e-5)


def test_dora_refuses_conv_and_mixed_batches():
    conv = nn.Sequential(nn.Conv2d(3, 8, 3))
    with pytest.raises(lk.UnsupportedModuleError, match="DoRA"):
        lk.inject(conv, lk.LoraConfig(r=2, target_modules=["0"], use_dora=True))
    assert isinstance(conv[0], nn.Conv2d)  # nothing changed
    model, _ = dora_layer("linear")
    with pytest.raises(lk.LoraError, match="DoRA"):
        with lk.mixed_batch(model, ["default"]):
            pass


def test_delete_dora_adapter_removes_its_magnitude():
    model, layer = dora_layer("linear")
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["0"], use_dora=True), adapter="second")
    lk.delete_adapter(model, "default")
    assert list(layer.lora_magnitude_vector) == ["second"]
    assert all("default" not in k for k in model.state_dict())
