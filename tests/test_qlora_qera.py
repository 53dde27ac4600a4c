"""lorakit.quant.qera: a frozen rank-k correction of the NF4 error that minimises the layers' output
error (QERA, arXiv:2410.06040, Theorem 1), pinned beside the 4-bit base, and folded into the trained adapter."""

from __future__ import annotations

import pytest
import torch

import lorakit as lk
from lorakit.quant.qera import add_corrections, error_correction, error_corrections, fold_corrections, input_covariances, qera_quantize
from lorakit.train import load_recipe
from lorakit.train.errors import RecipeError

from helpers import assert_same_state, logits, randomize_lora, state_snapshot, tiny_llama, tokens

pytest.importorskip("bitsandbytes")


def problem(out=24, inp=20, n=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    E = torch.randn(out, inp, generator=g, dtype=torch.float64)
    X = torch.randn(n, inp, generator=g, dtype=torch.float64) @ torch.randn(inp, inp, generator=g, dtype=torch.float64)
    return E, X.T @ X / n


def output_error(E, C, H):
    R = E - C
    return float(torch.trace(R @ H @ R.T))


@pytest.mark.parametrize("r", [1, 3, 8])
def test_correction_reaches_the_optimum(r):
    """The output error left equals the optimum: the tail of the squared singular values of E H^(1/2)."""
    E, H = problem()
    B0, A0, after = error_correction(E, H, r, damping=1e-12)
    evals, V = torch.linalg.eigh(H)
    S = torch.linalg.svdvals(E @ (V * evals.sqrt()) @ V.T)
    assert B0.shape == (24, r) and A0.shape == (r, 20)
    assert torch.linalg.matrix_rank(B0 @ A0) == r
    assert after == pytest.approx(float((S[r:] ** 2).sum()), rel=1e-9)
    assert after == pytest.approx(output_error(E, B0 @ A0, H), rel=1e-9)
    # any other rank-r matrix nearby does worse
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        Bp = B0 + 1e-3 * torch.randn(B0.shape, generator=g, dtype=torch.float64)
        Ap = A0 + 1e-3 * torch.randn(A0.shape, generator=g, dtype=torch.float64)
        assert output_error(E, Bp @ Ap, H) > after


def test_identity_covariance_gives_the_truncated_svd_of_the_error():
    """With H = I the output error is the weight error: C is the rank-r SVD of E (LoftQ's one-step correction)."""
    E, _ = problem()
    B0, A0, after = error_correction(E, torch.eye(20, dtype=torch.float64), 4, damping=1e-12)
    U, S, Vh = torch.linalg.svd(E, full_matrices=False)
    torch.testing.assert_close(B0 @ A0, (U[:, :4] * S[:4]) @ Vh[:4], rtol=0, atol=1e-9)
    assert after == pytest.approx(float((S[4:] ** 2).sum()), rel=1e-9)


def test_correction_bad_input():
    E, H = problem()
    with pytest.raises(lk.quant.QuantError, match="rank"):
        error_correction(E, H, 21)
    with pytest.raises(lk.quant.QuantError, match="damping"):
        error_correction(E, H, 2, damping=0)
    with pytest.raises(lk.quant.QuantError, match="never reached"):
        error_correction(E, torch.zeros(20, 20, dtype=torch.float64), 2)


def test_input_covariances_leave_out_padding_and_match_a_direct_sum():
    model = tiny_llama()
    ids = tokens(batch=3, length=7)
    mask = torch.ones_like(ids)
    mask[0, 4:] = 0
    mask[2, 6:] = 0
    got = []
    h = model.model.layers[1].mlp.down_proj.register_forward_hook(lambda m, i, o: got.append(i[0][mask.bool()].double()))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    h.remove()
    x = got[0]
    H, n = input_covariances(model, [{"input_ids": ids, "attention_mask": mask, "labels": ids}],
                             ["model.layers.1.mlp.down_proj", "model.layers.0.self_attn.q_proj"], max_bytes=1)  # one pass per layer
    assert n == int(mask.sum()) == x.shape[0]
    torch.testing.assert_close(H["model.layers.1.mlp.down_proj"], x.T @ x / n, rtol=1e-5, atol=1e-7)  # float32 products
    assert H["model.layers.0.self_attn.q_proj"].shape == (32, 32)
    # q/k/v see one tensor: one product, the same matrix
    shared, _ = input_covariances(model, [{"input_ids": ids, "attention_mask": mask}],
                                  [f"model.layers.0.self_attn.{n}_proj" for n in "qkvo"])
    assert torch.equal(shared["model.layers.0.self_attn.q_proj"], H["model.layers.0.self_attn.q_proj"])
    assert torch.equal(shared["model.layers.0.self_attn.q_proj"], shared["model.layers.0.self_attn.v_proj"])
    assert not torch.equal(shared["model.layers.0.self_attn.q_proj"], shared["model.layers.0.self_attn.o_proj"])
    with pytest.raises(lk.quant.QuantError, match="nn.Linear"):
        input_covariances(model, [{"input_ids": ids}], ["model.norm"])


def calibration(n=4, seed=3):
    return [{"input_ids": tokens(batch=4, length=12, seed=seed + i)} for i in range(n)]


def corrected(rank=4, **kw):
    model = tiny_llama(intermediate_size=128)
    report = qera_quantize(model, calibration(), rank=rank, **kw)
    return model, report


def test_qera_quantize_pins_a_frozen_correction_that_brings_the_model_closer_to_the_original():
    original = tiny_llama(intermediate_size=128)
    ids = tokens(batch=4, length=12, seed=99)  # held out: not calibration data
    want = logits(original, ids)
    plain = tiny_llama(intermediate_size=128)
    lk.quantize(plain, "nf4")
    corrections, _ = error_corrections(tiny_llama(intermediate_size=128), calibration(), rank=4)

    model, report = corrected()
    assert len(report.layers) == 14 and report.tokens == 4 * 4 * 12
    assert 0 < report.error_after < report.error_before
    for path, layer in lk.state.lora_layers(model):
        c = corrections[path]
        assert not layer.lora_A["qera"].requires_grad and layer.lora_A["qera"].dtype == torch.bfloat16
        torch.testing.assert_close(layer.delta_weight("qera").double(), c.B0 @ c.A0, rtol=0.02, atol=1e-4)  # bf16 factors
        assert report.layers[path] == (c.error_before, c.error_after)
    err_plain = (logits(plain, ids) - want).pow(2).mean()
    err_qera = (logits(model, ids) - want).pow(2).mean()
    assert err_qera < 0.75 * err_plain  # measured 0.5 here (rank 4 of 32)
    with lk.disabled(model):  # the base under every adapter is the plain NF4 model
        torch.testing.assert_close(logits(model, ids), logits(plain, ids), rtol=0, atol=0)
    # the correction stays active whatever the trainable adapter does, and is not trained
    lk.inject(model, lk.LoraConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"]))
    assert lk.active_adapters(model) == ("default", "qera")
    torch.testing.assert_close(logits(model, ids), logits(corrected()[0], ids), rtol=0, atol=0)  # B = 0
    lk.set_active(model, "default")
    assert lk.active_adapters(model) == ("default", "qera")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".default" in n for n in trainable) and len(trainable) == 8
    mem = lk.quant.base_weight_memory(model)
    assert mem["correction_bytes"] == 2 * sum(c.rank * sum(c.B0.shape[0:1] + c.A0.shape[1:]) for c in corrections.values())


def test_fold_corrections_gives_one_exact_adapter_for_a_plain_nf4_base(tmp_path):
    model, _ = corrected()
    lk.inject(model, lk.LoraConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"]))
    randomize_lora(model, std=0.1)  # the trained adapter (qera's tensors are frozen, randomize touches all: restore)
    model2, _ = corrected()
    with torch.no_grad():
        for (_, l1), (_, l2) in zip(lk.state.lora_layers(model), lk.state.lora_layers(model2)):
            l1.lora_A["qera"].copy_(l2.lora_A["qera"])
            l1.lora_B["qera"].copy_(l2.lora_B["qera"])
    ids = tokens(seed=5)
    before = logits(model, ids)
    assert fold_corrections(model) == "default"
    assert lk.adapter_names(model) == ("default",) and lk.active_adapters(model) == ("default",)
    torch.testing.assert_close(logits(model, ids), before, rtol=0, atol=1e-5)
    ranks = {p: layer.r["default"] for p, layer in lk.state.lora_layers(model)}
    assert len(ranks) == 14 and sorted(set(ranks.values())) == [4, 6]  # q/v: 2 + 4, the rest: 4
    lk.save_adapter(model, tmp_path / "a")
    fresh = tiny_llama(intermediate_size=128)
    lk.quantize(fresh, "nf4")
    lk.load_adapter(fresh, tmp_path / "a")
    torch.testing.assert_close(logits(fresh, ids), before, rtol=0, atol=1e-5)
    merged, rounding = lk.quant.merge_quantized(fresh)
    torch.testing.assert_close(logits(merged, ids), before, rtol=0, atol=1e-4)
    with pytest.raises(lk.LoraError, match="fold_corrections needs"):
        fold_corrections(model)  # folded already


def test_delete_the_correction_unpins_it():
    model, _ = corrected()
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["q_proj"]))
    lk.delete_adapter(model, "qera")
    assert lk.active_adapters(model) == ("default",) and lk.state.get_state(model).pinned == ()


def test_add_corrections_refuses_what_does_not_fit_and_changes_nothing():
    corrections, _ = error_corrections(tiny_llama(), calibration(), rank=4)
    other_blocks = tiny_llama()
    lk.quantize(other_blocks, "nf4", blocksize=128)
    snap = state_snapshot(other_blocks)
    with pytest.raises(lk.quant.QuantError, match="not the one the correction was computed for"):
        add_corrections(other_blocks, corrections)
    assert_same_state(other_blocks, snap)
    assert not lk.state.has_adapters(other_blocks)
    dense = tiny_llama()
    with pytest.raises(lk.quant.QuantError, match="not a 4-bit layer"):
        add_corrections(dense, corrections)
    assert not lk.state.has_adapters(dense)


def test_error_corrections_leave_the_model_unchanged_and_select_like_quantize():
    model = tiny_llama()
    snap = state_snapshot(model)
    corrections, _ = error_corrections(model, calibration(), rank=3, modules=["q_proj", "down_proj"])
    assert_same_state(model, snap)
    assert sorted(corrections) == sorted(f"model.layers.{i}.{m}" for i in range(2) for m in ("self_attn.q_proj", "mlp.down_proj"))
    assert all(c.rank == 3 for c in corrections.values())
    with pytest.raises(lk.quant.QuantError, match="no tokens"):
        error_corrections(model, [{"input_ids": ids, "attention_mask": torch.zeros_like(ids)} for ids in [tokens()]])


def test_recipe_qera_fields():
    r = load_recipe()
    assert (r.qera_rank, r.calibration_size) == (8, 128)
    assert load_recipe("sentiment", {"quantize": "nf4", "qera_rank": 0}).qera_rank == 0
    with pytest.raises(RecipeError, match="qera_rank"):
        load_recipe("sentiment", {"qera_rank": -1})
    with pytest.raises(RecipeError, match="lora.use_dora"):
        load_recipe("sentiment", {"quantize": "nf4", "lora": {"use_dora": True}})
    assert load_recipe("sentiment", {"quantize": "nf4", "qera_rank": 0, "lora": {"use_dora": True}}).lora["use_dora"]
    with pytest.raises(RecipeError, match="calibration_size"):
        load_recipe("sentiment", {"calibration_size": 0})


def test_corrections_added_after_an_adapter_keep_it_active_and_mixed_batches_are_refused():
    corrections, _ = error_corrections(tiny_llama(), calibration(), rank=4)
    model = tiny_llama()
    lk.quantize(model, "nf4")
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["q_proj"]))
    add_corrections(model, corrections)
    assert lk.active_adapters(model) == ("default", "qera")
    with pytest.raises(lk.LoraError, match="pinned"):
        with lk.mixed_batch(model, ["default", None]):
            pass


def test_fold_keeps_trained_modules_to_save(tmp_path):
    model, _ = corrected()
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    with torch.no_grad():
        model.lm_head.modules_to_save["default"].weight.mul_(1.5)  # stands in for training
    ids = tokens()
    before = logits(model, ids)
    fold_corrections(model)
    assert lk.state.get_state(model).configs["default"].modules_to_save == ["lm_head"]
    torch.testing.assert_close(logits(model, ids), before, rtol=0, atol=1e-5)
    lk.save_adapter(model, tmp_path / "a")
    fresh = tiny_llama(intermediate_size=128)
    lk.quantize(fresh, "nf4")
    lk.load_adapter(fresh, tmp_path / "a")
    torch.testing.assert_close(logits(fresh, ids), before, rtol=0, atol=1e-5)


def test_error_corrections_refuse_quantized_or_adapted_models_bad_ranks_and_batches():
    quantized = tiny_llama()
    lk.quantize(quantized, "nf4")
    with pytest.raises(lk.quant.QuantError, match="already has 4-bit layers"):
        qera_quantize(quantized, calibration())
    adapted = tiny_llama()
    lk.inject(adapted, lk.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(lk.quant.QuantError, match="already has lorakit adapters"):
        qera_quantize(adapted, calibration())
    model = tiny_llama()
    snap = state_snapshot(model)
    for rank, needle in ((2.5, "integer"), (True, "integer"), (0, "integer"), (17, "above the smallest dimension")):
        with pytest.raises(lk.quant.QuantError, match=needle):
            qera_quantize(model, calibration(), rank=rank)
    with pytest.raises(lk.quant.QuantError, match="list of dicts"):
        qera_quantize(model, [tokens()])
    with pytest.raises(lk.quant.QuantError, match="damping"):
        qera_quantize(model, calibration(), damping=float("nan"))
    assert_same_state(model, snap)
    assert not lk.state.has_adapters(model)


def test_save_adapters_leaves_the_pinned_correction_out(tmp_path):
    model, _ = corrected()
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["q_proj"]))
    lk.save_adapters(model, tmp_path / "all")
    assert (tmp_path / "all" / "adapter_config.json").exists() and not (tmp_path / "all" / "qera").exists()


def test_corrections_computed_group_by_group_are_the_same():
    model = tiny_llama()
    whole, r1 = error_corrections(model, calibration(), rank=3)
    grouped, r2 = error_corrections(model, calibration(), rank=3, max_bytes=1)  # one layer per calibration pass
    assert list(whole) == list(grouped) and r1.layers == r2.layers and r1.tokens == r2.tokens
    for p in whole:
        assert torch.equal(whole[p].A0, grouped[p].A0) and torch.equal(whole[p].B0, grouped[p].B0)
