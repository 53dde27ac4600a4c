"""LoRA on mixture-of-experts expert weights (issue 17): tiny transformers MoE models built from configs.

Families: Mixtral (`(experts, out, in)` weights), Qwen2-MoE (a shared expert beside the routed ones),
OLMoE, and gpt-oss (transposed `(experts, in, out)` weights with biases, an interleaved gate). References:
a plain fp64 per-(token, expert) computation, and PEFT 0.21's `target_parameters` as the oracle for files.
"""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch

import lorakit as lk
from lorakit.errors import LoraError, TargetNotFoundError, UnsupportedModuleError
from lorakit.layers import LoraExperts
from lorakit.state import lora_layers

from helpers import logits, tokens

transformers = pytest.importorskip("transformers")

EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
COMMON = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def _mixtral():
    return transformers.MixtralForCausalLM(transformers.MixtralConfig(
        **COMMON, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2))


def _qwen2_moe():
    return transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(
        **COMMON, intermediate_size=40, moe_intermediate_size=16, shared_expert_intermediate_size=24, num_experts=4,
        num_experts_per_tok=2))


def _olmoe():
    return transformers.OlmoeForCausalLM(transformers.OlmoeConfig(
        **COMMON, intermediate_size=16, num_experts=4, num_experts_per_tok=2, eos_token_id=1, pad_token_id=0))


def _gpt_oss():
    return transformers.GptOssForCausalLM(transformers.GptOssConfig(
        **COMMON, intermediate_size=16, num_local_experts=4, num_experts_per_tok=2, head_dim=8,
        layer_types=["full_attention"] * 2))


FAMILIES = {"mixtral": _mixtral, "qwen2_moe": _qwen2_moe, "olmoe": _olmoe, "gpt_oss": _gpt_oss}


def build(family: str = "mixtral", seed: int = 0, dtype: torch.dtype = torch.float32):
    """A tiny random model of `family`, with expert weights and biases big enough for the adapters to show."""
    torch.manual_seed(seed)
    model = FAMILIES[family]()
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".experts." in name:  # transformers initialises them at std 0.02 (biases at 0)
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.to(dtype).eval()


def randomize(model, std: float = 0.2, seed: int = 2) -> None:
    """Give every adapter (expert pairs included) non-zero A and B."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for name in layer.adapter_names:
                for t in layer.adapter_parameters(name).values():
                    t.copy_(torch.randn(t.shape, generator=g).to(t.dtype) * std)


def experts_layers(model) -> list[tuple[str, LoraExperts]]:
    return [(p, m) for p, m in lora_layers(model) if isinstance(m, LoraExperts)]


def ids(seed: int = 1):
    return tokens(batch=2, length=9, vocab=64, seed=seed)


# ---------------------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("family", FAMILIES)
def test_step0_identity_is_bitwise(family):
    model = build(family)
    x = ids()
    base = logits(model, x)
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, target_modules=["q_proj"], target_parameters=EXPERTS))
    assert len(experts_layers(model)) == 2
    assert torch.equal(logits(model, x), base)
    model.train()  # the training-mode forward too (B = 0)
    with torch.no_grad():
        assert torch.equal(model(x).logits, base)


@pytest.mark.parametrize("implementation", ["grouped_mm", "batched_mm", "eager"])
def test_step0_identity_under_each_experts_implementation_with_top3(implementation):
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(transformers.MixtralConfig(
        **COMMON, intermediate_size=24, num_local_experts=6, num_experts_per_tok=3)).eval()
    model.config._experts_implementation = implementation  # three rows per token: the sum's order matters
    x = tokens(batch=4, length=30, vocab=64)
    base = logits(model, x)
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, target_parameters=EXPERTS))
    assert torch.equal(logits(model, x), base)


@pytest.mark.parametrize("family", FAMILIES)
def test_merged_matches_unmerged_and_unmerge_is_bitwise(family):
    model = build(family)
    x = ids()
    base = logits(model, x)
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, target_modules=["q_proj"], target_parameters=EXPERTS))
    randomize(model)
    originals = {n: p.detach().clone() for n, p in model.named_parameters() if ".experts." in n}
    unmerged = logits(model, x)
    assert (unmerged - base).abs().max() > 1e-2  # the expert adapters really act
    lk.merge(model)
    merged = logits(model, x)
    assert (merged - unmerged).abs().max() / unmerged.abs().max() < 1e-5
    assert any(not torch.equal(p, originals[n]) for n, p in model.named_parameters() if n in originals)
    lk.unmerge(model)
    for n, p in model.named_parameters():
        if n in originals:
            assert torch.equal(p, originals[n]), n
    assert torch.equal(logits(model, x), unmerged)


def test_bf16_merge_rounds_once_and_100_cycles_are_bitwise():
    model = build("mixtral", dtype=torch.bfloat16)
    lk.inject(model, lk.LoraConfig(r=4, alpha=16, target_parameters=EXPERTS))
    randomize(model)
    layers = experts_layers(model)
    originals = {(p, w): layer.expert_weight(w).detach().clone()
                 for p, layer in layers for w in layer.targets["default"]}
    assert layers[0][1].lora_A["default"]["gate_up_proj"].dtype == torch.float32  # adapters in fp32 on a bf16 base
    lk.merge(model)
    for (path, w), w0 in originals.items():
        layer = dict(layers)[path]
        delta = layer.delta_weight("default", param=w)
        assert delta.dtype == torch.float32 and delta.shape == w0.shape
        assert torch.equal(layer.expert_weight(w), (w0.float() + delta).to(torch.bfloat16)), (path, w)
        assert not torch.equal(layer.expert_weight(w), w0)
    lk.unmerge(model)
    for _ in range(100):
        lk.merge(model)
        lk.unmerge(model)
    for (path, w), w0 in originals.items():
        assert torch.equal(dict(layers)[path].expert_weight(w), w0), (path, w)


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_delta_weight_per_expert_matches_fp64(family):
    model = build(family)
    lk.inject(model, lk.LoraConfig(r=3, alpha=7, target_parameters=EXPERTS))
    randomize(model)
    _, layer = experts_layers(model)[0]
    transposed = layer.base_layer.is_transposed
    for w in ("gate_up_proj", "down_proj"):
        A = layer.lora_A["default"][w].double()  # (experts, r, in)
        B = layer.lora_B["default"][w].double()  # (experts, out, r)
        full = layer.delta_weight("default", torch.float64, param=w)
        assert full.shape == layer.expert_weight(w).shape
        for e in range(A.shape[0]):
            ref = 7 / 3 * B[e] @ A[e]  # (out, in)
            ref = ref.T if transposed else ref
            assert torch.allclose(full[e], ref, rtol=1e-12, atol=1e-14)
            assert torch.allclose(layer.delta_weight("default", torch.float64, param=w, expert=e), ref,
                                  rtol=1e-12, atol=1e-14)
    with pytest.raises(LoraError, match="param="):
        layer.delta_weight("default")  # two expert weights: say which


# ---------------------------------------------------------------------------------------------- gradients
def _dense_reference(m, x, top_k_index, top_k_weights, pairs, scaling):
    """fp64, one (token, expert) at a time: `sum_k w_k * down_e(gate(up_e(x)))` with each projection
    `W_e x + b_e + scaling * B_e A_e x`. `pairs`: weight name -> (A (experts, r, in), B (experts, out, r))."""
    def proj(name, e, h):
        w = getattr(m, name)[e].double()
        w = w if m.is_transposed else w.T  # (in, out)
        out = h @ w
        if m.has_bias:
            out = out + getattr(m, f"{name}_bias")[e].double()
        A, B = pairs[name]
        return out + scaling * (h @ A[e].T) @ B[e].T

    rows = []
    for t in range(x.shape[0]):
        acc = torch.zeros(x.shape[1], dtype=torch.float64)
        for j in range(top_k_index.shape[1]):
            e = int(top_k_index[t, j])
            h = m._apply_gate(proj("gate_up_proj", e, x[t:t + 1]))
            acc = acc + top_k_weights[t, j].double() * proj("down_proj", e, h)[0]
        rows.append(acc)
    return torch.stack(rows)


@pytest.mark.parametrize("family,r", [("mixtral", 4), ("gpt_oss", 4), ("mixtral", 3)],
                         ids=["mixtral-grouped_mm", "gpt_oss-grouped_mm", "mixtral-r3-per-expert-loop"])
def test_gradients_of_routed_rows_equal_a_dense_fp64_reference(family, r):
    # r=3: A and B's strides are not 16-byte multiples, so grouped_mm is not used (one mm per hit expert)
    model = build(family)
    lk.inject(model, lk.LoraConfig(r=r, alpha=8, target_parameters=EXPERTS))
    randomize(model)
    _, layer = experts_layers(model)[0]
    m = layer.base_layer
    g = torch.Generator().manual_seed(5)
    tokens_, k = 10, 2
    x = torch.randn(tokens_, 32, generator=g, requires_grad=True)
    # expert 3 is never chosen: its pairs must get exactly zero gradient
    top_k_index = torch.stack([torch.randperm(3, generator=g)[:k] for _ in range(tokens_)])
    top_k_weights = torch.softmax(torch.randn(tokens_, k, generator=g), -1)
    upstream = torch.randn(tokens_, 32, generator=g)

    out = layer(x, top_k_index, top_k_weights)
    (out * upstream).sum().backward()

    pairs = {w: (layer.lora_A["default"][w].detach().double().requires_grad_(),
                 layer.lora_B["default"][w].detach().double().requires_grad_()) for w in layer.targets["default"]}
    x64 = x.detach().double().requires_grad_()
    ref = _dense_reference(m, x64, top_k_index, top_k_weights, pairs, layer.scaling["default"])
    (ref * upstream.double()).sum().backward()

    assert torch.allclose(out.double(), ref, rtol=1e-5, atol=1e-5)
    assert torch.allclose(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-5)
    for w, (A, B) in pairs.items():
        gA, gB = layer.lora_A["default"][w].grad, layer.lora_B["default"][w].grad
        assert torch.allclose(gA.double(), A.grad, rtol=1e-4, atol=1e-5), w
        assert torch.allclose(gB.double(), B.grad, rtol=1e-4, atol=1e-5), w
        assert torch.count_nonzero(gA[3]) == 0 and torch.count_nonzero(gB[3]) == 0, w  # only routed tokens
        assert torch.count_nonzero(gA[:3]) > 0 and torch.count_nonzero(gB[:3]) > 0, w
    assert m.gate_up_proj.grad is None and m.down_proj.grad is None  # the base stays frozen


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_fused_training_node_equals_the_composed_ops(monkeypatch, dropout):
    """One adapter on frozen expert weights trains through `expert_projection` (base + LoRA in one node);
    the composed ops (`expert_linear` + `expert_low_rank`) give the same values and gradients."""
    results = []
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(LoraExperts, "_fusable", lambda *a: False)
        model = build("gpt_oss")
        lk.inject(model, lk.LoraConfig(r=4, alpha=8, dropout=dropout, target_parameters=EXPERTS))
        randomize(model)
        model.train()
        torch.manual_seed(3)  # the same dropout masks, drawn in the same order
        loss = model(ids(), labels=ids()).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (loss_f, grads_f), (loss_c, grads_c) = results
    assert torch.allclose(loss_f, loss_c, rtol=1e-6)
    assert grads_f.keys() == grads_c.keys()
    for n in grads_f:
        assert torch.allclose(grads_f[n], grads_c[n], rtol=1e-4, atol=1e-6), n


def test_float64_layer_matches_the_reference_to_rounding():
    model = build("mixtral", dtype=torch.float64)
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, target_parameters=EXPERTS))
    randomize(model)
    _, layer = experts_layers(model)[0]
    g = torch.Generator().manual_seed(6)
    x = torch.randn(7, 32, generator=g, dtype=torch.float64)
    top_k_index = torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(7)])
    top_k_weights = torch.softmax(torch.randn(7, 2, generator=g, dtype=torch.float64), -1)
    pairs = {w: (layer.lora_A["default"][w].detach(), layer.lora_B["default"][w].detach())
             for w in layer.targets["default"]}
    with torch.no_grad():
        out = layer(x, top_k_index, top_k_weights)
    ref = _dense_reference(layer.base_layer, x, top_k_index, top_k_weights, pairs, layer.scaling["default"])
    assert torch.allclose(out, ref, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------- training rules
def test_router_stays_frozen_unless_named_in_modules_to_save():
    model = build("mixtral")
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, target_modules=["q_proj"], target_parameters=EXPERTS))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any("experts.lora_A.default.gate_up_proj" in n for n in trainable)
    model.train()
    model(ids(), labels=ids()).loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if ".mlp.gate." in n)

    model = build("mixtral")
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, target_parameters=EXPERTS, modules_to_save=["gate"]))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("mlp.gate.modules_to_save.default.weight" in n for n in trainable)


def test_dropout_on_expert_adapters():
    model = build("mixtral")
    x = ids()
    base = logits(model, x)
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, dropout=0.5, target_parameters=EXPERTS))
    model.train()
    with torch.no_grad():
        assert torch.equal(model(x).logits, base)  # B = 0: dropout on the branch changes nothing
    randomize(model)
    ref = copy.deepcopy(model)
    for _, layer in lora_layers(ref):
        layer.lora_dropout["default"] = 0.0
    ref.eval()
    model.eval()
    assert torch.equal(logits(model, x), logits(ref, x))  # eval: no dropout
    model.train()
    torch.manual_seed(0)
    a = model(x, labels=x)
    with torch.no_grad():
        b = model(x).logits
    assert not torch.equal(a.logits, b)  # two training forwards draw two masks
    assert not torch.allclose(a.logits, logits(ref, x), atol=1e-4)
    a.loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "experts.lora_" in n]
    assert grads and all(gr is not None and torch.isfinite(gr).all() and gr.abs().sum() > 0 for gr in grads)


def test_several_adapters_disabled_and_merge_and_unload():
    model = build("qwen2_moe")
    x = ids()
    base = logits(model, x)
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, target_parameters=EXPERTS), adapter="a")
    lk.inject(model, lk.LoraConfig(r=2, alpha=4, target_modules=["q_proj"],
                                   target_parameters=["mlp.experts.down_proj"]), adapter="b")
    randomize(model)
    lk.set_active(model, "a")
    only_a = logits(model, x)
    lk.set_active(model, "b")
    only_b = logits(model, x)
    lk.set_active(model, ["a", "b"])
    both = logits(model, x)
    assert not torch.allclose(only_a, only_b, atol=1e-3) and not torch.allclose(both, only_a, atol=1e-3)
    with lk.disabled(model):
        assert torch.equal(logits(model, x), base)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(".lora_A.a." in n for n in trainable) and any(".lora_A.b." in n for n in trainable)
    lk.merge(model)
    assert (logits(model, x) - both).abs().max() / both.abs().max() < 1e-5
    lk.unmerge(model)
    assert torch.equal(logits(model, x), both)
    plain = lk.merge_and_unload(model)
    assert not list(lora_layers(plain))
    assert type(plain.model.layers[0].mlp.experts).__name__ == "Qwen2MoeExperts"
    assert (logits(plain, x) - both).abs().max() / both.abs().max() < 1e-5


# ---------------------------------------------------------------------------------------------- files
@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_save_load_round_trip_with_modules_to_save(tmp_path, family):
    model = build(family)
    router = "router" if family == "gpt_oss" else "gate"
    cfg = lk.LoraConfig(r=4, alpha=8, target_modules=["q_proj"], target_parameters=EXPERTS, modules_to_save=[router])
    lk.inject(model, cfg)
    randomize(model)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if f"mlp.{router}.modules_to_save" in n:
                p.add_(0.3)
    x = ids()
    ours = logits(model, x)
    lk.save_adapter(model, tmp_path / "a")
    fresh = build(family)
    lk.load_adapter(fresh, tmp_path / "a")
    assert torch.equal(logits(fresh, x), ours)
    saved = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert saved["target_parameters"] == EXPERTS and saved["modules_to_save"] == [router]


def test_file_layout_is_peft_param_wrapper(tmp_path):
    from safetensors.torch import load_file

    model = build("mixtral")
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, target_parameters=EXPERTS))
    randomize(model)
    lk.save_adapter(model, tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    p = "base_model.model.model.layers.0.mlp.experts."
    # PEFT nests one ParamWrapper per parameter, the first registered innermost;
    # A: (experts * r, in), B: (out, r * experts)
    assert tensors[p + "base_layer.lora_A.weight"].shape == (4 * 4, 32)  # gate_up_proj
    assert tensors[p + "base_layer.lora_B.weight"].shape == (48, 4 * 4)
    assert tensors[p + "lora_A.weight"].shape == (4 * 4, 24)  # down_proj
    assert tensors[p + "lora_B.weight"].shape == (32, 4 * 4)
    _, layer = experts_layers(model)[0]
    A, B = layer.lora_A["default"]["gate_up_proj"], layer.lora_B["default"]["gate_up_proj"]
    assert torch.equal(tensors[p + "base_layer.lora_A.weight"][2 * 4 + 1], A[2, 1])  # row e * r + i is A_e[i]
    assert torch.equal(tensors[p + "base_layer.lora_B.weight"][:, 1 * 4 + 2], B[2, :, 1])  # column i * E + e


def test_load_refuses_a_file_for_other_expert_shapes(tmp_path):
    model = build("mixtral")
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, target_parameters=EXPERTS))
    lk.save_adapter(model, tmp_path)
    other = transformers.MixtralForCausalLM(transformers.MixtralConfig(
        **COMMON, intermediate_size=24, num_local_experts=8, num_experts_per_tok=2))
    with pytest.raises(lk.AdapterLoadError, match="experts"):
        lk.load_adapter(other, tmp_path)


# ---------------------------------------------------------------------------------------------- PEFT as oracle
peft = pytest.importorskip("peft")


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "gpt_oss"])
def test_lorakit_file_loads_in_peft_with_equal_logits(tmp_path, family):
    model = build(family)
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, target_modules=["q_proj"], target_parameters=EXPERTS))
    randomize(model)
    x = ids()
    ours = logits(model, x)
    lk.save_adapter(model, tmp_path)
    pm = peft.PeftModel.from_pretrained(build(family), tmp_path).eval()
    theirs = logits(pm, x)
    with pm.disable_adapter():
        assert not torch.allclose(logits(pm, x), theirs, atol=1e-3)  # PEFT really applied it
    assert torch.allclose(theirs, ours, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["mixtral", "olmoe", "gpt_oss"])
@pytest.mark.parametrize("order", [EXPERTS, EXPERTS[::-1]], ids=["gate_up-first", "down-first"])
def test_peft_file_loads_in_lorakit_with_equal_logits(tmp_path, family, order):
    pm = peft.get_peft_model(build(family), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj"], target_parameters=order, init_lora_weights=False)).eval()
    x = ids()
    theirs = logits(pm, x)
    pm.save_pretrained(tmp_path)
    model = build(family)
    lk.load_adapter(model, tmp_path)
    ours = logits(model, x)
    assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-5)
    with lk.disabled(model):
        assert not torch.allclose(logits(model, x), ours, atol=1e-3)
    trainable, _ = lk.count_parameters(model)
    assert trainable == sum(p.numel() for n, p in pm.named_parameters() if "lora_" in n)


# ---------------------------------------------------------------------------------------------- selection
def test_bad_target_parameters_name_the_culprit():
    with pytest.raises(TargetNotFoundError, match="mlp.experts.nope"):
        lk.inject(build("mixtral"), lk.LoraConfig(r=4, target_parameters=["mlp.experts.nope"]))
    with pytest.raises(UnsupportedModuleError, match=r"q_proj\.weight"):
        lk.inject(build("mixtral"), lk.LoraConfig(r=4, target_parameters=["self_attn.q_proj.weight"]))
    with pytest.raises(UnsupportedModuleError, match="target_parameters"):
        lk.inject(build("mixtral"), lk.LoraConfig(r=4, target_modules=["experts"]))
    with pytest.raises(TargetNotFoundError, match=r"experts\.gate_up_proj"):  # lists what the model has
        lk.inject(build("mixtral"), lk.LoraConfig(r=4, target_parameters=["mlp.experts.nope"]))
    for option, kw in (("DoRA", dict(use_dora=True)), ("lora_bias", dict(lora_bias=True)),
                       ("init='pissa'", dict(init="pissa"))):
        with pytest.raises(UnsupportedModuleError, match=rf"{re.escape(option)}.*expert weights"):
            lk.inject(build("mixtral"), lk.LoraConfig(r=4, target_parameters=EXPERTS, **kw))
    with pytest.raises(lk.ConfigError, match="target_parameters"):
        lk.LoraConfig(r=4, target_parameters="mlp.experts.down_proj")


def test_all_linear_warns_about_the_experts_and_all_adds_them(tmp_path):
    model = build("mixtral")
    with pytest.warns(UserWarning, match=r"gate_up_proj.*target_modules='all'"):
        lk.inject(model, lk.LoraConfig(r=4, target_modules="all-linear"))
    assert not experts_layers(model)  # PEFT's meaning kept

    model = build("qwen2_moe")
    lk.inject(model, lk.LoraConfig(r=4, target_modules="all"))
    layers = experts_layers(model)
    assert len(layers) == 2 and all(layer.targets["default"] == ("gate_up_proj", "down_proj") for _, layer in layers)
    assert any(p.endswith("shared_expert.down_proj") for p, _ in lora_layers(model))
    lk.save_adapter(model, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["target_parameters"] == [f"model.layers.{i}.mlp.experts.{w}" for i in range(2)
                                          for w in ("down_proj", "gate_up_proj")]
    assert "model.layers.0.self_attn.q_proj" in saved["target_modules"]
    randomize(model)
    lk.save_adapter(model, tmp_path)
    pm = peft.PeftModel.from_pretrained(build("qwen2_moe"), tmp_path).eval()  # PEFT reads the resolved lists
    assert torch.allclose(logits(pm, ids()), logits(model, ids()), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- verify
def test_verify_reports_expert_coverage_and_update_sizes(tmp_path):
    from lorakit.verify import static_checks

    model = build("mixtral")
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, target_modules=["q_proj"],
                                   target_parameters=["mlp.experts.down_proj"]))
    randomize(model)
    checks = static_checks(model)
    experts = checks["coverage"]["experts"]
    sizes = {w: p.numel() for n, p in model.named_parameters() if ".experts." in n
             for w in ("gate_up_proj", "down_proj") if n.endswith(w) and "lora_" not in n}
    assert experts["modules"] == 4 and experts["covered_modules"] == 2
    assert experts["covered_params"] == 2 * sizes["down_proj"]
    assert experts["params"] == 2 * (sizes["down_proj"] + sizes["gate_up_proj"])
    assert checks["modules"] == 2 + 2 and not checks["zero_b"] and not checks["no_op"]
    _, layer = experts_layers(model)[0]
    w0 = layer.expert_weight("down_proj").detach().double()
    rel = float(layer.delta_weight("default", torch.float64, param="down_proj").detach().norm() / w0.norm())

    lk.save_adapter(model, tmp_path)
    report = lk.verify(build("mixtral"), tmp_path, llama_cpp=False)
    assert report.ok and not report.unmatched, report.to_text()
    assert report.coverage["experts"].covered_params == 2 * sizes["down_proj"]
    deltas = {d.path: d.rel_norm for d in report.deltas}
    assert abs(deltas["model.layers.0.mlp.experts.down_proj"] - rel) < 1e-5 * rel
    assert [f.form for f in report.forms if f.ok] == ["merged", "reloaded", "peft"]
    assert "experts" in report.to_text()


def test_nested_file_keys_match_the_experts_module(tmp_path):
    from lorakit.verify.coverage import unmatched_keys

    model = build("mixtral")
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, target_parameters=EXPERTS))
    keys = list(lk.adapter_state_dict(model))
    assert any(".experts.base_layer.lora_A" in k for k in keys)
    assert unmatched_keys(build("mixtral"), keys) == []
    assert unmatched_keys(build("mixtral"), [keys[0].replace("experts", "expertz")]) != []


# ---------------------------------------------------------------------------------------------- DDP
DDP_SCRIPT = r'''
import datetime, faulthandler, os, sys
import torch
torch.set_num_threads(1)  # two ranks on a shared 2-core machine
faulthandler.dump_traceback_later(240, exit=True)  # a hang shows where it is (stderr) before the test's limit
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, {tests!r})
import lorakit as lk
from test_moe import EXPERTS, build, ids, randomize


def adapted():
    model = build("mixtral")
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, target_modules=["q_proj"], target_parameters=EXPERTS))
    randomize(model)
    model.train()
    return model


def train(model, batches, forward):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for x in batches:
        forward(x).loss.backward()
        opt.step()
        opt.zero_grad()


def worker(rank, out):
    faulthandler.dump_traceback_later(240, exit=True)
    # a file rendezvous: no TCP port another test of the suite could take between picking and binding it
    dist.init_process_group("gloo", init_method="file://" + out + "/rendezvous", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=120))
    model = adapted()
    ddp = DistributedDataParallel(model)  # no find_unused_parameters: every expert's pair gets a gradient
    batches = [ids(seed)[rank:rank + 1] for seed in (1, 2, 3)]
    train(model, batches, lambda x: ddp(x, labels=x))
    if rank == 0:
        torch.save(lk.adapter_state_dict(model), out + "/ddp.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    out = sys.argv[1]
    mp.spawn(worker, args=(out,), nprocs=2)
    model = adapted()
    train(model, [ids(seed) for seed in (1, 2, 3)], lambda x: model(x, labels=x))
    torch.save(lk.adapter_state_dict(model), out + "/single.pt")
'''


def test_ddp_with_expert_adapters_trains_the_same_adapter_as_one_process(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "ddp_moe.py"
    script.write_text(DDP_SCRIPT.format(tests=str(Path(__file__).parent)))
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-6000:]
    ddp, single = torch.load(tmp_path / "ddp.pt"), torch.load(tmp_path / "single.pt")
    start = build("mixtral")
    lk.inject(start, lk.LoraConfig(r=4, alpha=8, target_modules=["q_proj"], target_parameters=EXPERTS))
    randomize(start)
    before = lk.adapter_state_dict(start)
    assert sorted(ddp) == sorted(single) and any(".experts.base_layer.lora_A" in k for k in ddp)
    for k in single:
        assert not torch.equal(single[k], before[k]), k  # three steps moved every tensor
        assert torch.allclose(ddp[k], single[k], rtol=1e-5, atol=1e-6), (k, (ddp[k] - single[k]).abs().max())


def test_train_flags_take_the_all_preset_and_target_parameters():
    import argparse

    from lorakit.train.flags import add_recipe_arguments, recipe_overrides

    parser = argparse.ArgumentParser()
    add_recipe_arguments(parser)
    args = parser.parse_args(["--target-modules", "all", "--target-parameters", ",".join(EXPERTS)])
    assert recipe_overrides(args)["lora"] == {"target_modules": "all", "target_parameters": EXPERTS}


def test_scale_delete_and_unload():
    model = build("olmoe")
    x = ids()
    base = logits(model, x)
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, target_parameters=EXPERTS))
    randomize(model)
    adapted = logits(model, x)
    lk.set_scale(model, "default", 0.0)
    assert torch.equal(logits(model, x), base)
    lk.set_scale(model, "default", 1.0)
    assert torch.equal(logits(model, x), adapted)
    lk.inject(model, lk.LoraConfig(r=2, alpha=4, target_parameters=["mlp.experts.down_proj"]), adapter="other")
    lk.set_active(model, "default")
    lk.merge(model)
    lk.unmerge(model)
    lk.delete_adapter(model, "other")
    assert all(layer.adapter_names == ("default",) for _, layer in experts_layers(model))
    assert torch.equal(logits(model, x), adapted)
    plain = lk.unload(model)
    assert not list(lora_layers(plain)) and torch.equal(logits(plain, x), base)


def test_combine_and_mixed_batch_refuse_expert_adapters_by_name():
    model = build("mixtral")
    lk.inject(model, lk.LoraConfig(r=4, target_parameters=EXPERTS), adapter="a")
    lk.inject(model, lk.LoraConfig(r=4, target_parameters=EXPERTS), adapter="b")
    with pytest.raises(LoraError, match=r"expert weights.*model\.layers\.0\.mlp\.experts"):
        lk.combine(model, {"a": 1.0, "b": 1.0})
    with pytest.raises(LoraError, match=r"expert weights.*model\.layers\.0\.mlp\.experts"):
        with lk.mixed_batch(model, ["a", "b"]):
            pass


def test_training_memory_estimate_counts_every_expert_pair():
    from lorakit.inject import plan
    from lorakit.train.estimate import _lora_values

    model = build("gpt_oss")  # transposed storage: (experts, in, out)
    cfg = lk.LoraConfig(r=4, alpha=8, target_modules=["q_proj"], target_parameters=EXPERTS)
    estimated = _lora_values(plan(model, cfg), 4)
    lk.inject(model, cfg)
    assert estimated == lk.count_parameters(model)[0]
