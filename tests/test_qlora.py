"""QLoRA (issue 6): NF4 base against the bitsandbytes reference, bits per parameter, gradients through
the 4-bit weight across train/eval switches (the bitsandbytes CPU repack case), exact merges."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import lorakit as lk
from lorakit.layers import LoraLinear4bit

from helpers import logits, randomize_lora, tiny_llama, tokens

bnb = pytest.importorskip("bitsandbytes")
BF = bnb.functional

# The 16 NF4 levels of the paper (QLoRA, arXiv:2305.14314, Appendix E).
NF4_LEVELS = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044006, 0.5626170039176941,
    0.7229568362236023, 1.0,
])


def stack(seed: int = 0, dtype=torch.float32) -> nn.Sequential:
    """A small MLP: 128 -> 256 -> 256 -> 64, biases on, in `dtype`."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 64)).to(dtype)


def linears(model):
    return [m for m in model.modules() if type(m) is nn.Linear]


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' packing: two codes per byte, high nibble first."""
    p = packed.reshape(-1)
    return torch.stack([p >> 4, p & 0xF], dim=1).reshape(-1)


# ---------------------------------------------------------------------- codes vs the reference
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("double_quant", [True, False])
def test_codes_and_dequantized_weights_equal_bitsandbytes_reference(dtype, double_quant):
    model = stack(dtype=dtype)
    originals = [m.weight.detach().clone() for m in linears(model)]
    lk.quantize(model, double_quant=double_quant)
    layers = [m for _, m in lk.quant.quantized_layers(model)]
    assert len(layers) == 3 and all(isinstance(m, bnb.nn.Linear4bit) for m in layers)
    for w, layer in zip(originals, layers):
        ref_codes, ref_state = BF.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type="nf4")
        state = layer.weight.quant_state
        assert torch.equal(layer.weight.data, ref_codes)
        assert torch.equal(state.absmax, ref_state.absmax)
        assert state.nested == double_quant
        if double_quant:
            assert state.absmax.dtype == torch.uint8 and state.state2.blocksize == 256
            assert torch.equal(state.state2.absmax, ref_state.state2.absmax)
            assert torch.equal(state.offset, ref_state.offset)
        ours = lk.quant.dequantize_weight(layer, dtype)
        assert ours.shape == w.shape and ours.dtype == dtype
        assert torch.equal(ours, BF.dequantize_4bit(ref_codes, ref_state))


def test_codes_are_the_nearest_nf4_level_of_each_block():
    """The paper's definition, computed independently: code = argmin |w / absmax(block of 64) - level|."""
    model = stack()
    w = linears(model)[1].weight.detach().clone()
    lk.quantize(model, double_quant=False)
    layer = lk.quant.quantized_layers(model)[1][1]
    blocks = w.reshape(-1, 64)
    absmax = blocks.abs().amax(dim=1)
    expected = (blocks / absmax[:, None]).reshape(-1, 1).sub(NF4_LEVELS).abs().argmin(dim=1)
    assert torch.equal(layer.weight.quant_state.absmax, absmax)
    assert torch.equal(unpack(layer.weight.data).long(), expected)
    assert torch.equal(layer.weight.quant_state.code, NF4_LEVELS)
    assert torch.equal(lk.quant.dequantize_weight(layer), (NF4_LEVELS[expected].reshape(-1, 64) * absmax[:, None]).reshape(w.shape))


# ---------------------------------------------------------------------- bits per parameter
def test_bits_per_param_counted_from_the_stored_tensors():
    model = nn.Sequential(*[nn.Linear(256, 256, bias=False) for _ in range(4)])
    lk.quantize(model)  # double quantization by default
    r = lk.quant.bits_per_param(model)
    n = 4 * 256 * 256
    assert r.layers == 4 and r.params == n and r.double_quant is True
    # codes: 4 bits; constants: 8 bits per 64; nested: one float32 per 256 constants; offset: one float32 per layer
    assert r.bytes_by_role["codes"] == n // 2
    assert r.bytes_by_role["absmax"] == n // 64
    assert r.bytes_by_role["nested_absmax"] == 4 * n // (64 * 256)
    assert r.bytes_by_role["offset"] == 4 * 4
    assert r.bytes_by_role["quant_map"] == 16 * 4 and r.bytes_by_role["nested_quant_map"] == 256 * 4  # shared: counted once
    assert r.bits_per_param_format == pytest.approx(4 + 8 / 64 + 32 / (64 * 256) + 32 * 4 / n)
    assert r.bits_per_param <= 4.18  # tables included, on a tiny model

    model = nn.Sequential(*[nn.Linear(256, 256, bias=False) for _ in range(4)])
    lk.quantize(model, double_quant=False)
    r = lk.quant.bits_per_param(model)
    assert r.bytes_by_role["absmax"] == 4 * n // 64 and "nested_absmax" not in r.bytes_by_role
    assert r.bits_per_param_format == pytest.approx(4.5)


@pytest.mark.slow
@pytest.mark.realmodel
def test_bits_per_param_smollm2_linear_layers(smollm2_folder):
    """All 210 linear layers of SmolLM2-135M: <= 4.13 bits with double quantization (paper 4.127), <= 4.51 without."""
    from transformers import AutoModelForCausalLM

    measured = {}
    for dq in (True, False):
        model = AutoModelForCausalLM.from_pretrained(smollm2_folder, dtype=torch.float32)
        lk.quantize(model, double_quant=dq)
        r = lk.quant.bits_per_param(model)
        assert r.layers == 210 and r.params == 106_168_320
        measured[dq] = r.bits_per_param  # every stored tensor, lookup tables included
        mem = lk.quant.base_weight_memory(model)
        assert mem["linear_bytes"] == r.bytes
        assert mem["linear_bf16_ratio"] >= 3.5
        del model
    assert measured[True] <= 4.13 and measured[False] <= 4.51, measured


# ---------------------------------------------------------------------- gradients across train/eval switches
def _grads(model, x, layer_names):
    x = x.clone().requires_grad_(True)
    model.zero_grad(set_to_none=True)
    model(x).square().sum().backward()
    out = {"input": x.grad}
    for name in layer_names:
        layer = model.get_submodule(name)
        out[f"{name}.A"] = layer.lora_A["default"].grad
        out[f"{name}.B"] = layer.lora_B["default"].grad
    return out


def _qlora_stack():
    model = stack()
    dense = copy.deepcopy(model)
    lk.quantize(model)
    for q, d in zip([m for _, m in lk.quant.quantized_layers(model)], linears(dense)):
        with torch.no_grad():
            d.weight.copy_(lk.quant.dequantize_weight(q))
    cfg = lk.LoraConfig(r=4, alpha=8, target_modules=["2"])  # only the middle layer: layer 4 (4-bit, no LoRA) must pass grads
    for m in (model, dense):
        lk.inject(m, cfg)
        randomize_lora(m)
    return model, dense


def test_gradients_reach_lora_and_input_after_train_eval_switches():
    model, dense = _qlora_stack()
    assert isinstance(model[2], LoraLinear4bit)
    x = torch.randn(3, 128)
    model.train()
    first = _grads(model, x, ["2"])
    reference = _grads(dense.train(), x, ["2"])  # same math on the dequantized weights in plain nn.Linear
    for k, g in first.items():
        assert g is not None and g.abs().sum() > 0, k
        assert torch.allclose(g, reference[k], rtol=1e-4, atol=1e-4), k
    for cycle in range(3):
        model.eval()
        with torch.no_grad():  # the case where bitsandbytes 0.50.2 repacks its weight on an AVX512-BF16 CPU
            model(x)
        model(x)  # eval, grad mode on, input without grad: the same trigger
        model.train()
        again = _grads(model, x, ["2"])
        for k, g in first.items():
            assert again[k] is not None and torch.equal(again[k], g), (cycle, k)
    for _, q in lk.quant.quantized_layers(model):
        assert not getattr(q.weight.quant_state, "packing_format_for_cpu", False)


def test_unguarded_bitsandbytes_layer_shows_the_repack_problem():
    """Documents why `guard_cpu_repack` exists: skipped where bitsandbytes does not repack."""
    if not BF.has_avx512bf16():
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes does not repack here")
    model = stack()
    lk.quantize(model)
    layer = model[4]
    layer.support_avx512bf16_for_cpu = True  # undo lorakit's guard on one layer
    layer.bias = None
    layer.eval()
    with torch.no_grad():
        layer(torch.randn(2, 256))
    if not getattr(layer.weight.quant_state, "packing_format_for_cpu", False):
        pytest.skip("this bitsandbytes no longer repacks in eval mode; the guard may be dropped")
    layer.train()
    x = torch.randn(2, 256, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer(x).sum().backward()
    assert x.grad is None  # no gradient through the repacked weight's kernel
    with pytest.warns(UserWarning, match="repacked"):
        lk.quant.guard_cpu_repack(model)  # converts it back
    layer(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_guard_applies_to_layers_lorakit_wraps():
    model = stack()
    lk.quantize(model)
    for _, q in lk.quant.quantized_layers(model):
        q.support_avx512bf16_for_cpu = True  # as transformers' BitsAndBytesConfig leaves them
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, target_modules=["0", "4"]))
    assert model[0].base_layer.support_avx512bf16_for_cpu is False
    assert model[4].base_layer.support_avx512bf16_for_cpu is False
    assert model[2].support_avx512bf16_for_cpu is True  # not adapted: guard_cpu_repack(model) covers it
    assert lk.quant.guard_cpu_repack(model) == 3 and model[2].support_avx512bf16_for_cpu is False


# ---------------------------------------------------------------------- model-level behaviour
def test_quantize_llama_defaults_and_step0_identity():
    model = tiny_llama(hidden_size=64, intermediate_size=128)
    ids = tokens()
    lk.quantize(model)
    q = dict(lk.quant.quantized_layers(model))
    assert len(q) == 14 and "lm_head" not in q  # 7 linear layers per block, LM head kept
    assert all(m.compute_dtype == torch.float32 for m in q.values())
    base = logits(model, ids)
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    assert sum(isinstance(m, LoraLinear4bit) for m in model.modules()) == 14
    assert torch.equal(logits(model, ids), base)  # B = 0: the QLoRA model equals its 4-bit base at step 0
    trainable, total = lk.count_parameters(model)
    assert trainable == sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "lora_" in n)
    assert total == trainable + sum(p.numel() for p in tiny_llama(hidden_size=64, intermediate_size=128).parameters())


def test_quantize_selected_blocks_and_exclusions():
    model = tiny_llama(hidden_size=64, intermediate_size=128)
    lk.quantize(model, modules=["layers.0"], exclude_modules=["down_proj"])
    assert sorted(p.rsplit(".", 1)[-1] for p, _ in lk.quant.quantized_layers(model)) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"])
    assert all(p.startswith("model.layers.0.") for p, _ in lk.quant.quantized_layers(model))
    model = tiny_llama(hidden_size=64, intermediate_size=128)
    lk.quantize(model, modules=r".*\.(q|v)_proj", include_head=True)
    assert len(lk.quant.quantized_layers(model)) == 4
    lk.quantize(model, modules=["lm_head"], include_head=True)
    assert len(lk.quant.quantized_layers(model)) == 5


def test_quantize_bf16_compute_dtype():
    model = stack()
    lk.quantize(model, compute_dtype="bfloat16")
    x = torch.randn(2, 128)
    y = model(x)
    assert y.dtype == torch.float32  # cast back to the input's dtype
    assert model[0].compute_dtype == torch.bfloat16


def test_merge_unmerge_exact_and_merge_and_unload(tmp_path):
    model = tiny_llama(hidden_size=64, intermediate_size=128)
    keys_before = list(model.state_dict())
    ids = tokens()
    lk.quantize(model)
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    randomize_lora(model, std=0.05)
    layer = model.model.layers[0].self_attn.q_proj
    packed = layer.base_layer.weight
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    unmerged = logits(model, ids)

    lk.merge(model)
    merged = logits(model, ids)
    assert torch.allclose(merged, unmerged, atol=1e-5)
    lk.merge(model)  # twice: no-op
    assert torch.equal(logits(model, ids), merged)
    lk.unmerge(model)
    assert layer.base_layer.weight is packed
    assert all(torch.equal(v, snapshot[k]) for k, v in model.state_dict().items())
    assert torch.equal(logits(model, ids), unmerged)

    for layer_ in (m for m in model.modules() if isinstance(m, LoraLinear4bit)):
        layer_.merge_requantize = True
    lk.merge(model)
    assert layer.base_layer.weight is not packed
    assert not torch.equal(layer.base_layer.weight.data, packed.data)
    lk.unmerge(model)  # the packed original comes back: bit for bit, never re-derived
    assert layer.base_layer.weight is packed
    assert all(torch.equal(v, snapshot[k]) for k, v in model.state_dict().items())

    with lk.disabled(model):
        base_only = logits(model, ids)
    plain = lk.merge_and_unload(model)
    assert list(plain.state_dict()) == keys_before  # the base architecture, dense again
    assert not lk.quant.quantized_layers(plain) and all(type(m) is nn.Linear for m in linears(plain)) and linears(plain)
    assert plain.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
    assert torch.allclose(logits(plain, ids), unmerged, atol=1e-5)
    assert not torch.allclose(base_only, unmerged, atol=1e-4)


@pytest.mark.parametrize("dtype,requantize", [(torch.float32, False), (torch.bfloat16, False), (None, True)])
def test_merge_quantized_reports_rounding_error(dtype, requantize):
    model = stack()
    lk.quantize(model)
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    randomize_lora(model, std=0.05)
    exact = {i: model[i].merged_weight(["default"]).detach() for i in (0, 2, 4)}
    x = torch.randn(3, 128)
    with torch.no_grad():
        unmerged = model(x)
    plain, report = lk.quant.merge_quantized(model, dtype=dtype, requantize=requantize)
    assert report.layers == 3 and report.numel == sum(e.numel() for e in exact.values())
    assert report.delta_rms > 0
    if requantize:
        assert len(lk.quant.quantized_layers(plain)) == 3 and report.dtype == "nf4"
        errs = [(lk.quant.dequantize_weight(plain[i]) - exact[i]) for i in (0, 2, 4)]
        assert report.rms_error > 0
    else:
        assert not lk.quant.quantized_layers(plain) and report.dtype == str(dtype).replace("torch.", "")
        errs = [(plain[i].weight.float() - exact[i]) for i in (0, 2, 4)]
        assert plain[0].weight.dtype == dtype
        if dtype == torch.float32:
            assert report.max_abs_error == 0.0
            with torch.no_grad():
                assert torch.allclose(plain(x), unmerged, atol=1e-5)
        else:
            assert 0 < report.max_abs_error <= max(e.abs().max() for e in exact.values()) * 2 ** -8
    assert report.max_abs_error == pytest.approx(max(float(e.abs().max()) for e in errs))
    assert report.rms_error == pytest.approx(float(torch.cat([e.reshape(-1) for e in errs]).square().mean().sqrt()), rel=1e-5)


def test_dora_on_a_4bit_base_matches_dora_on_the_dequantized_weights():
    model, dense = stack(), None
    lk.quantize(model)
    dense = stack()
    for q, d in zip([m for _, m in lk.quant.quantized_layers(model)], linears(dense)):
        with torch.no_grad():
            d.weight.copy_(lk.quant.dequantize_weight(q))
    cfg = lk.LoraConfig(r=4, alpha=8, target_modules="all-linear", use_dora=True)
    for m in (model, dense):
        lk.inject(m, cfg)
        randomize_lora(m, std=0.05)
    x = torch.randn(3, 128)
    with torch.no_grad():
        assert torch.allclose(model(x), dense(x), atol=1e-5)
    lk.merge(model)
    with torch.no_grad():
        assert torch.allclose(model(x), dense(x), atol=1e-5)


# ---------------------------------------------------------------------- errors
def test_quantize_errors():
    model = stack()
    with pytest.raises(lk.TargetNotFoundError, match="matched no nn.Linear"):
        lk.quantize(model, modules=["nope"])
    with pytest.raises(lk.quant.QuantError, match="quant_type"):
        lk.quantize(model, "fp4")
    with pytest.raises(lk.quant.QuantError, match="compute_dtype"):
        lk.quantize(model, compute_dtype="int8")
    with pytest.raises(lk.UnsupportedModuleError, match="only nn.Linear"):
        lk.quantize(model, modules=["1"])  # a ReLU
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["0"]))
    with pytest.raises(lk.quant.QuantError, match="before lorakit.inject"):
        lk.quantize(model)
    assert not lk.quant.quantized_layers(model)
    with pytest.raises(lk.quant.QuantError, match="no 4-bit layers"):
        lk.quant.bits_per_param(model)
    with pytest.raises(lk.UnsupportedModuleError, match="tied"):
        lk.quantize(tiny_llama(tie_word_embeddings=True), modules=["lm_head"])
    with pytest.raises(lk.UnsupportedModuleError, match="cannot be adapted|Linear"):
        lk.inject(lk.quantize(stack()), lk.LoraConfig(r=2, target_modules=["0"], init="pissa"))


def test_missing_bitsandbytes_gives_the_pip_command(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if not installed
    model = stack()
    with pytest.raises(lk.quant.QuantError, match="pip install"):
        lk.quantize(model)
    assert all(type(m) is nn.Linear for m in linears(model))  # unchanged


def test_lorakit_imports_and_works_without_bitsandbytes():
    import subprocess
    import sys

    code = ("import sys; sys.modules['bitsandbytes'] = None\n"
            "import torch, lorakit as lk\n"
            "m = torch.nn.Sequential(torch.nn.Linear(8, 8))\n"
            "lk.inject(m, lk.LoraConfig(r=2, target_modules='all-linear')); lk.merge_and_unload(m)\n"
            "try:\n    lk.quantize(torch.nn.Sequential(torch.nn.Linear(8, 8)))\n"
            "except lk.LoraError as e:\n    print('ERR', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ERR" in out.stdout and "pip install" in out.stdout
