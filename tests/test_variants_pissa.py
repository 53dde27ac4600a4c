"""PiSSA (arXiv:2404.02948) and OLoRA (arXiv:2406.01775): float64 references, step-0 identity, unload, conversion."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lorakit as lk

from helpers import assert_same_state, logits, state_snapshot, tiny_gpt2, tiny_llama, tokens

OUT, IN, R, ALPHA = 16, 24, 4, 6.0
INITS = ["pissa", "pissa_niter_6", "olora"]


def _conv1d(nf, nx):
    from transformers.pytorch_utils import Conv1D

    return Conv1D(nf, nx)


def spectrum_weight(out_f, in_f, seed=0, dtype=torch.float64):
    """A random (out, in) matrix with a clear spectral gap, so randomised SVD converges to the top-r part."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(out_f, out_f, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(in_f, in_f, generator=g, dtype=torch.float64))
    k = min(out_f, in_f)
    S = 2.0 * 0.8 ** torch.arange(k, dtype=torch.float64)
    S[R:] *= 0.02  # gap after the top R
    return (U[:, :k] * S) @ V[:, :k].T


def weight_layer(kind, init, dtype=torch.float32, seed=0, **cfg):
    """(model, layer, W0 (out, in) float64 before injection) for a layer kind with a gapped spectrum."""
    base = {"linear": lambda: nn.Linear(IN, OUT), "conv1d": lambda: _conv1d(OUT, IN),
            "embedding": lambda: nn.Embedding(IN, OUT), "conv2d": lambda: nn.Conv2d(6, OUT, 2)}[kind]().to(dtype)
    w0 = spectrum_weight(OUT, IN, seed).to(dtype)  # conv2d: in = 6 * 2 * 2 = 24
    with torch.no_grad():
        if kind == "linear":
            base.weight.copy_(w0)
        elif kind == "conv2d":
            base.weight.copy_(w0.reshape(base.weight.shape))
        else:  # Conv1D weight (in, out); embedding table (in=vocab, out=dim)
            base.weight.copy_(w0.T)
    model = nn.Sequential(base).eval()
    w0 = w0.double()
    lk.inject(model, lk.LoraConfig(r=R, alpha=ALPHA, target_modules=["0"], init=init, **cfg))
    return model, model[0], w0


def layer_oi(kind, t):
    return {"linear": t, "conv2d": t.reshape(t.shape[0], -1)}.get(kind, t.T if t.dim() == 2 else t)


def factors(layer):
    A, B = layer.lora_A["default"].detach().double(), layer.lora_B["default"].detach().double()
    return A.reshape(A.shape[0], -1), B.reshape(B.shape[0], -1)


def make_input(kind, dtype, seed=5):
    g = torch.Generator().manual_seed(seed)
    if kind == "embedding":
        return torch.randint(0, IN, (3, 7), generator=g)
    if kind == "conv2d":
        return torch.randn(2, 6, 5, 5, generator=g, dtype=torch.float64).to(dtype)
    return torch.randn(3, 7, IN, generator=g, dtype=torch.float64).to(dtype)


def reference_forward(kind, w, bias, x):
    """`x -> W x + b` for W given as (out, in) float64."""
    if kind == "embedding":
        return F.embedding(x, w.T)
    if kind == "conv2d":
        return F.conv2d(x.double(), w.reshape(OUT, 6, 2, 2), bias)
    out = x.double() @ w.T
    return out + bias if bias is not None else out


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def _bias(layer):
    b = getattr(layer.base_layer, "bias", None)
    return None if b is None else b.detach().double()


@pytest.mark.parametrize("kind", ["linear", "conv1d", "embedding", "conv2d"])
@pytest.mark.parametrize("init", INITS)
def test_factors_and_residual_match_float64_reference(kind, init):
    for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-10)):
        model, layer, w0 = weight_layer(kind, init, dtype)
        s = ALPHA / R
        A, B = factors(layer)
        if init == "olora":
            Q, Rq = torch.linalg.qr(w0)
            principal = Q[:, :R] @ Rq[:R]  # scaling * B A = scaling * Q_r R_r
            assert torch.allclose(B.T @ B, torch.eye(R, dtype=torch.float64), atol=10 * tol)  # orthonormal columns
            assert torch.allclose(torch.tril(A[:, :R], -1), torch.zeros(R, R, dtype=torch.float64), atol=10 * tol)
            assert rel_err(B @ A, principal) < tol
            expected = s * principal
        else:
            U, S, Vh = torch.linalg.svd(w0, full_matrices=False)
            expected = (U[:, :R] * S[:R]) @ Vh[:R]  # scaling * B A = U_r S_r V_r^T
            # A = sqrt(S_r / s) V_r^T and B = U_r sqrt(S_r / s), up to the sign of each singular pair
            sign = torch.sign((A * Vh[:R]).sum(1))
            assert rel_err(A * sign[:, None], torch.sqrt(S[:R] / s)[:, None] * Vh[:R]) < 10 * tol
            assert rel_err(B * sign[None, :], U[:, :R] * torch.sqrt(S[:R] / s)) < 10 * tol
        assert rel_err(s * B @ A, expected) < tol, (dtype, rel_err(s * B @ A, expected))
        residual = layer_oi(kind, layer.base_layer.weight.detach().double())
        err = (residual - (w0 - s * B @ A)).abs().max() / w0.abs().max()  # relative to W0: the subtraction cancels
        assert err < (1e-6 if dtype == torch.float32 else 1e-12)


@pytest.mark.parametrize("kind", ["linear", "conv1d", "embedding", "conv2d"])
@pytest.mark.parametrize("init", INITS)
def test_forward_step0_training_and_merge(kind, init):
    model, layer, w0 = weight_layer(kind, init)
    x = make_input(kind, torch.float32)
    with torch.no_grad():
        step0 = model(x)
    assert rel_err(step0, reference_forward(kind, w0, _bias(layer), x)) < 1e-6  # the model is unchanged at step 0

    g = torch.Generator().manual_seed(7)
    with torch.no_grad():  # "train": move A and B
        for t in (layer.lora_A["default"], layer.lora_B["default"]):
            t.add_(torch.randn(t.shape, generator=g) * 0.1)
        ours = model(x)
    A, B = factors(layer)
    residual = layer_oi(kind, layer.base_layer.weight.detach().double())
    ref = reference_forward(kind, residual + ALPHA / R * B @ A, _bias(layer), x)
    assert rel_err(ours, ref) < 1e-6

    residual_bits = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        lk.merge(model)
        merged = model(x)
        lk.unmerge(model)  # restores the residual saved at merge time
    assert rel_err(merged, ours) < 1e-5
    assert torch.equal(layer.base_layer.weight, residual_bits)


@pytest.mark.parametrize("builder,targets", [
    (tiny_llama, "all-linear"),
    (tiny_llama, ["embed_tokens", "q_proj"]),
    (tiny_gpt2, ["c_attn", "c_proj", "c_fc"]),
], ids=["llama-all-linear", "llama-embed", "gpt2-conv1d"])
@pytest.mark.parametrize("init", INITS)
def test_step0_equals_base_and_unload_restores_original(builder, targets, init):
    model = builder()
    ids = tokens()
    before = logits(model, ids)
    snap = state_snapshot(model)
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, target_modules=targets, init=init))
    assert torch.allclose(logits(model, ids), before, rtol=0, atol=1e-5)
    now = model.state_dict()
    residuals = [k for k in now if k.endswith(".base_layer.weight")]
    assert residuals and all(not torch.equal(now[k], snap[k.replace(".base_layer", "")]) for k in residuals)
    base = lk.unload(model)
    assert_same_state(base, snap)  # the ORIGINAL weights, bit for bit, not the residual


def test_pissa_with_dora_keeps_step0_and_norm_of_original():
    model = tiny_llama()
    ids = tokens()
    before = logits(model, ids)
    w0 = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], init="pissa", use_dora=True))
    m = model.model.layers[0].self_attn.q_proj.lora_magnitude_vector["default"]
    assert torch.allclose(m, w0.norm(dim=1), rtol=1e-5)
    assert torch.allclose(logits(model, ids), before, rtol=0, atol=1e-5)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_residual_matches_peft(init):
    peft = pytest.importorskip("peft")
    targets = ["q_proj", "v_proj", "down_proj"]
    pm = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=init))
    model = tiny_llama()
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, target_modules=targets, init=init))
    theirs = {k.replace("base_model.model.", "", 1): v for k, v in pm.state_dict().items() if k.endswith("base_layer.weight")}
    ours = {k: v for k, v in model.state_dict().items() if k.endswith("base_layer.weight")}
    assert sorted(theirs) == sorted(ours) and len(ours) == 6
    for k in ours:
        assert torch.allclose(ours[k], theirs[k], rtol=0, atol=1e-6), k


def test_delete_last_pissa_adapter_of_a_layer_restores_it():
    model = tiny_llama()
    q = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    lk.inject(model, lk.LoraConfig(r=4, target_modules=["q_proj"], init="olora"), adapter="o")
    lk.inject(model, lk.LoraConfig(r=4, target_modules=["v_proj"]), adapter="plain")
    lk.set_active(model, ["o"])
    lk.merge(model)
    lk.delete_adapter(model, "o")
    assert isinstance(model.model.layers[0].self_attn.q_proj, nn.Linear)
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, q)


def test_merge_and_unload_keeps_the_trained_model():
    model = tiny_llama()
    ids = tokens()
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "o_proj"], init="pissa"))
    _train(model, ids)
    trained = logits(model, ids)
    plain = lk.merge_and_unload(model)
    assert torch.allclose(logits(plain, ids), trained, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------- conversion to plain LoRA
def _train(model, ids, steps=3, lr=5.0):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr)
    target = torch.randn(ids.shape + (model.config.vocab_size,), generator=torch.Generator().manual_seed(11))
    for _ in range(steps):
        loss = ((model(ids).logits - target) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


CONVERT_CASES = [
    ("pissa", tiny_llama, dict(target_modules=["q_proj", "v_proj", "embed_tokens"], init="pissa")),
    ("olora-rslora-patterns", tiny_llama, dict(target_modules=["q_proj", "v_proj", "up_proj"], init="olora", use_rslora=True,
                                               rank_pattern={"up_proj": 2}, alpha_pattern={"v_proj": 12})),
    ("pissa-niter-dora", tiny_llama, dict(target_modules=["q_proj", "down_proj"], init="pissa_niter_2", use_dora=True)),
    ("pissa-gpt2", tiny_gpt2, dict(target_modules=["c_attn", "c_fc"], init="pissa")),
]


@pytest.mark.parametrize("name,builder,kw", CONVERT_CASES, ids=[c[0] for c in CONVERT_CASES])
def test_converted_adapter_reproduces_trained_model_on_original_base(tmp_path, name, builder, kw):
    model = builder()
    ids = tokens()
    base_logits = logits(model, ids)
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, **kw))
    _train(model, ids)
    trained = logits(model, ids)
    assert not torch.allclose(trained, base_logits, atol=1e-3)

    folder = lk.convert_pissa_to_lora(model, tmp_path / "lora")
    converted = lk.read_config(folder)
    assert converted.init == "kaiming" and converted.r == 8
    fresh = builder()  # the unmodified original base
    lk.load_adapter(fresh, folder)
    assert torch.allclose(logits(fresh, ids), trained, rtol=1e-4, atol=1e-4)
    with lk.disabled(fresh):
        assert torch.equal(logits(fresh, ids), base_logits)

    peft = pytest.importorskip("peft")
    pm = peft.PeftModel.from_pretrained(builder(), folder).eval()
    assert torch.allclose(logits(pm, ids), trained, rtol=1e-4, atol=1e-4)


def test_conversion_refuses_plain_lora():
    model = tiny_llama()
    lk.inject(model, lk.LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(lk.LoraError, match="only PiSSA/OLoRA"):
        lk.pissa_to_lora(model)


def test_peft_trained_pissa_adapter_loads_on_original_base(tmp_path):
    peft = pytest.importorskip("peft")
    targets = ["q_proj", "v_proj"]
    pm = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights="pissa"))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    ids = tokens()
    theirs = logits(pm.eval(), ids)
    pm.save_pretrained(tmp_path / "a")
    model = tiny_llama()
    lk.load_adapter(model, tmp_path / "a")  # re-derives the same residual from the original base, as PEFT does
    assert torch.allclose(logits(model, ids), theirs, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------- refusals (before anything changes)
@pytest.mark.parametrize("case", ["existing-adapter", "rank", "tied", "slices", "grouped"])
def test_weight_init_refusals_leave_model_unchanged(case):
    if case == "existing-adapter":
        model = tiny_llama()
        lk.inject(model, lk.LoraConfig(r=4, target_modules=["q_proj"]))
        cfg, kw, match = lk.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init="pissa"), dict(adapter="p"), "already carries"
    elif case == "rank":
        model = tiny_llama()
        cfg, kw, match = lk.LoraConfig(r=4, target_modules=["q_proj", "k_proj"], init="pissa", rank_pattern={"k_proj": 17}), {}, "exceeds"
    elif case == "tied":
        model = tiny_gpt2()
        cfg, kw, match = lk.LoraConfig(r=4, target_modules=["c_attn", "lm_head"], init="olora"), {}, "tied"
    elif case == "slices":
        model = tiny_gpt2()
        cfg, kw, match = lk.LoraConfig(r=4, target_modules=["c_attn"], init="pissa", fused_slices={"c_attn": [True, False, True]}), {}, "fused_slices"
    else:
        model = nn.Sequential(nn.Conv2d(4, 8, 3, groups=2))
        cfg, kw, match = lk.LoraConfig(r=4, target_modules=["0"], init="pissa"), {}, "grouped"
    snap = state_snapshot(model)
    with pytest.raises(lk.UnsupportedModuleError, match=match):
        lk.inject(model, cfg, **kw)
    assert_same_state(model, snap)
