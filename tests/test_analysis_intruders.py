"""Intruder dimensions (Shuttleworth et al. 2024, arXiv:2410.21228) and their mitigation (issue 20, item 3):
a planted intruder is found, W = W0 gives none, lambda = 1 / 0 are the identity / an exact removal, the
adapter-level results match a float64 numpy SVD reference on a real (tiny) model's adapter, and the
mitigated adapter file loads and computes the mitigated weight."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import lorakit as lk
from lorakit import cli
from lorakit.analysis import (AnalysisError, analyze_adapter, intruder_dimensions, mitigate_adapter, mitigate_factors,
                              mitigate_intruders)


def _orthonormal(rows: int, cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(rows, cols, generator=g, dtype=torch.float64))
    return q


@pytest.fixture
def planted():
    """W0 = U0 diag(s0) V^T (40 x 8); W replaces W0's top left-singular vector u_0 by y orthogonal to all of
    U0's columns, with a larger singular value: W's SVD is exactly (y, U0[:, 1:]), (9, s0[1:]), V."""
    basis = _orthonormal(40, 9, 0)
    U0, y = basis[:, :8], basis[:, 8]
    V = _orthonormal(8, 8, 1)
    s0 = torch.tensor([4.0, 3.0, 2.5, 2.0, 1.5, 1.0, 0.5, 0.25], dtype=torch.float64)
    W0 = U0 @ torch.diag(s0) @ V.T
    U1 = torch.cat([y[:, None], U0[:, 1:]], dim=1)
    s1 = torch.cat([torch.tensor([9.0], dtype=torch.float64), s0[1:]])
    W = U1 @ torch.diag(s1) @ V.T
    return W0, W, y, V, s1


def test_planted_intruder_is_found(planted):
    W0, W, y, V, s1 = planted
    out = intruder_dimensions(W0, W)  # PEFT's defaults: top_k=10 (clipped to 8), eps=0.5
    assert out["count"] == 1 and out["indices"] == [0] and out["top_k"] == 8 and out["eps"] == 0.5
    assert out["max_cosine"][0] < 1e-12  # y is orthogonal to every left-singular vector of W0
    assert out["max_cosine"][1:] == pytest.approx([1.0] * 7, abs=1e-12)
    assert out["intruder_singular_values"] == pytest.approx([9.0])
    assert out["singular_values"] == pytest.approx(s1.tolist())
    # the right-singular vectors did not change: no intruder on that side
    assert intruder_dimensions(W0, W, side="right")["count"] == 0
    # the other seven (|cos| = 1 up to rounding) stay ordinary at a high threshold; top_k=1 still sees it
    assert intruder_dimensions(W0, W, eps=0.999)["count"] == 1
    assert intruder_dimensions(W0, W, top_k=1)["indices"] == [0]
    # float32 input gives the same answer (computed in float64)
    assert intruder_dimensions(W0.float(), W.float())["indices"] == [0]


def test_no_intruders_without_fine_tuning(planted):
    W0 = planted[0]
    out = intruder_dimensions(W0, W0)
    assert out["count"] == 0 and out["max_cosine"] == pytest.approx([1.0] * 8, abs=1e-12)
    g = torch.Generator().manual_seed(3)
    square = torch.randn(24, 24, generator=g, dtype=torch.float64)
    assert intruder_dimensions(square, square.clone())["count"] == 0


def test_mitigation_identity_removal_and_scaling(planted):
    W0, W, y, V, s1 = planted
    assert torch.equal(mitigate_intruders(W0, W, lam=1.0), W)  # (lam - 1) = 0: bit for bit
    removed = mitigate_intruders(W0, W, lam=0.0)
    reference = W - 9.0 * torch.outer(y, V[:, 0])  # the planted component, from the construction
    assert torch.allclose(removed, reference, atol=1e-12, rtol=0)
    assert abs(float(y @ removed @ V[:, 0])) < 1e-12  # nothing left along (y, v_0)
    half = mitigate_intruders(W0, W, lam=0.5)
    s = torch.linalg.svdvals(half)
    assert sorted(s.tolist()) == pytest.approx(sorted([4.5] + s1[1:].tolist()), abs=1e-12)
    assert torch.equal(mitigate_intruders(W0, W0, lam=0.0), W0)  # no intruders: nothing changes


def test_mitigate_factors_is_exact_in_float64(planted):
    W0, W, _, _, _ = planted
    B = (W - W0) @ _orthonormal(8, 8, 5)[:, :8]  # any split of the update: scaling * B @ A == W - W0
    A = _orthonormal(8, 8, 5).T
    scaling = 2.0
    B = B / scaling
    for lam in (0.0, 0.75, 1.0, -0.5):
        B2, A2, idx = mitigate_factors(W0, B, A, scaling, lam=lam)
        assert idx == [0] and B2.shape == (40, 9) and A2.shape == (9, 8)
        assert torch.allclose(W0 + scaling * B2 @ A2, mitigate_intruders(W0, W, lam=lam), atol=1e-12, rtol=0)
        assert torch.equal(B2[:, :8], B) and torch.equal(A2[:8], A)  # the trained factors are kept as they are


def test_bad_input_names_the_culprit(planted):
    W0, W = planted[0], planted[1]
    with pytest.raises(AnalysisError, match="differ in shape"):
        intruder_dimensions(W0, W[:, :4])
    with pytest.raises(AnalysisError, match="top_k"):
        intruder_dimensions(W0, W, top_k=0)
    with pytest.raises(AnalysisError, match="eps"):
        intruder_dimensions(W0, W, eps=1.5)
    with pytest.raises(AnalysisError, match="side"):
        intruder_dimensions(W0, W, side="both")
    with pytest.raises(AnalysisError, match="NaN"):
        intruder_dimensions(W0, W * float("nan"))
    with pytest.raises(AnalysisError, match="lambda"):
        mitigate_intruders(W0, W, lam=float("nan"))
    with pytest.raises(AnalysisError, match="not the shape of W0"):
        mitigate_factors(W0, torch.zeros(40, 2), torch.zeros(2, 7), 1.0)


# ---------------------------------------------------------------------- a real adapter on a tiny model
@pytest.fixture(scope="module")
def tiny_adapter(tmp_path_factory):
    """A 2-layer Llama (hidden 32) saved as the base, and a rank-4 q/v adapter with large random B."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("intruders")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    model.save_pretrained(root / "base")
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 1.0)
    lk.save_adapter(model, root / "adapter")
    return root


def _numpy_reference(W0: np.ndarray, W: np.ndarray, top_k: int = 10, eps: float = 0.5):
    U0 = np.linalg.svd(W0, full_matrices=False)[0]
    U, S, Vt = np.linalg.svd(W, full_matrices=False)
    k = min(top_k, len(S))
    best = np.abs(U[:, :k].T @ U0).max(axis=1)
    idx = [i for i in range(k) if best[i] < eps]
    return idx, best, U, S, Vt


def _weights(root):
    from safetensors.torch import load_file

    base = load_file(root / "base" / "model.safetensors")
    ad = load_file(root / "adapter" / "adapter_model.safetensors")
    out = {}
    for key, A in ad.items():
        if ".lora_A." in key:
            path = key[len("base_model.model."):-len(".lora_A.weight")]
            B = ad[key.replace("lora_A", "lora_B")]
            W0 = base[path + ".weight"].double().numpy()
            out[path] = (W0, B.double().numpy(), A.double().numpy())
    return out


def test_adapter_intruders_match_a_numpy_reference(tiny_adapter):
    result = analyze_adapter(tiny_adapter / "adapter", base=tiny_adapter / "base", intruders=True)
    modules = result["adapters"][0]["modules"]
    weights = _weights(tiny_adapter)
    assert set(modules) == set(weights) and len(weights) == 4
    found = 0
    for path, (W0, B, A) in weights.items():
        idx, best, *_ = _numpy_reference(W0, W0 + 2.0 * B @ A)  # scaling = alpha / r = 2
        got = modules[path]["intruders"]
        assert got["indices"] == idx
        assert got["max_cosine"] == pytest.approx(best.tolist(), abs=1e-9)
        found += len(idx)
    assert found > 0  # the large random update does plant intruders
    summary = result["intruders"]["adapters"]["adapter"]
    assert summary["total"] == found and summary["modules"] == 4
    assert summary["per_module"] == {p: m["intruders"]["count"] for p, m in modules.items()}


def test_mitigated_adapter_file_loads_and_computes_the_mitigated_weight(tiny_adapter, tmp_path):
    from transformers import LlamaForCausalLM

    report = mitigate_adapter(tiny_adapter / "adapter", tiny_adapter / "base", tmp_path / "mitigated", lam=0.25)
    weights = _weights(tiny_adapter)
    model = LlamaForCausalLM.from_pretrained(tiny_adapter / "base")
    lk.load_adapter(model, tmp_path / "mitigated")
    merged = lk.merge_and_unload(model)
    state = merged.state_dict()
    for path, (W0, B, A) in weights.items():
        W = W0 + 2.0 * B @ A
        idx, _, U, S, Vt = _numpy_reference(W0, W)
        expected = W + (0.25 - 1) * (U[:, idx] * S[idx]) @ Vt[idx]
        assert report["modules"][path]["indices"] == idx and report["modules"][path]["new_r"] == 4 + len(idx)
        np.testing.assert_allclose(state[path + ".weight"].double().numpy(), expected, atol=2e-5, rtol=0)
    config = json.loads((tmp_path / "mitigated" / "adapter_config.json").read_text())
    assert config["r"] == 4 and all(v >= 4 for v in config["rank_pattern"].values())


def test_cli_analyze_intruders_and_mitigate(tiny_adapter, tmp_path, capsys):
    code = cli.main(["analyze", str(tiny_adapter / "adapter"), "--base", str(tiny_adapter / "base"), "--intruders",
                     "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    expected = analyze_adapter(tiny_adapter / "adapter", base=tiny_adapter / "base", intruders=True)
    assert result["intruders"]["adapters"] == expected["intruders"]["adapters"]
    code = cli.main(["analyze", str(tiny_adapter / "adapter"), "--base", str(tiny_adapter / "base"),
                     "--mitigate", "0", "--mitigated-out", str(tmp_path / "m")])
    assert code == 0
    out = capsys.readouterr()
    assert "## Intruder dimensions" in out.out and "Mitigation (paper §6)" in out.out
    assert (tmp_path / "m" / "adapter_model.safetensors").is_file()
    # after removing them (lambda = 0), the mitigated adapter has no intruder left among the top 10
    after = analyze_adapter(tmp_path / "m", base=tiny_adapter / "base", intruders=True)
    before_total = expected["intruders"]["adapters"]["adapter"]["total"]
    assert after["intruders"]["adapters"]["m"]["total"] < before_total
    assert cli.main(["analyze", str(tiny_adapter / "adapter"), "--intruders"]) == 2
    assert "--intruders needs --base" in capsys.readouterr().err
    assert cli.main(["analyze", str(tiny_adapter / "adapter"), "--base", str(tiny_adapter / "base"),
                     "--mitigate", "0.5"]) == 2
    assert "go together" in capsys.readouterr().err


def test_full_finetune_intruders_match_a_numpy_reference(tiny_adapter):
    from safetensors.torch import load_file

    base = load_file(tiny_adapter / "base" / "model.safetensors")
    g = torch.Generator().manual_seed(7)
    tuned = dict(base)
    for key in [k for k in base if k.endswith("q_proj.weight")]:  # a large rank-1 change: one planted direction
        u, v = torch.randn(base[key].shape[0], 1, generator=g), torch.randn(1, base[key].shape[1], generator=g)
        tuned[key] = base[key] + 3.0 * u @ v
    result = analyze_adapter(tiny_adapter / "adapter", base=base, full_finetune=tuned, intruders=True)
    ft = result["full_finetune"]["modules"]
    for path, m in ft.items():
        W0 = base[path + ".weight"].double().numpy()
        idx, best, *_ = _numpy_reference(W0, tuned[path + ".weight"].double().numpy())
        assert m["intruders"]["indices"] == idx
        assert m["intruders"]["max_cosine"] == pytest.approx(best.tolist(), abs=1e-9)
        if path.endswith("v_proj"):
            assert idx == []  # unchanged weights: W_ft = W0
    total = result["intruders"]["full_finetune"]["total"]
    assert total == sum(m["intruders"]["count"] for m in ft.values()) and total >= 2  # one per q_proj at least
    alone = analyze_adapter(tiny_adapter / "adapter", base=base, intruders=True)  # W0's SVD not shared
    assert result["intruders"]["adapters"] == alone["intruders"]["adapters"]


def test_peft_as_oracle(tiny_adapter):
    """PEFT 0.21's `reduce_intruder_dimension` finds the same intruders per layer, and its mitigated update is the
    best rank-r approximation of ours (PEFT truncates the exact rank r + m update back to rank r)."""
    peft = pytest.importorskip("peft")
    from peft.tuners.lora.intruders import reduce_intruder_dimension
    from transformers import LlamaForCausalLM

    model = peft.PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tiny_adapter / "base"),
                                           str(tiny_adapter / "adapter"))
    lines: list[str] = []
    reduce_intruder_dimension(model, mitigation_lambda=0.25, logging_sink=lambda *a: lines.append(" ".join(a)))
    weights = _weights(tiny_adapter)
    layers = {n[len("base_model.model."):]: m for n, m in model.named_modules() if hasattr(m, "get_delta_weight")
              and n.endswith(("q_proj", "v_proj"))}
    lost = 0.0
    for path, (W0, B, A) in weights.items():
        ours = intruder_dimensions(W0, W0 + 2.0 * B @ A)
        line = next(x for x in lines if x.startswith(f"base_model.model.{path}:"))
        assert line.endswith(f"Intruders: {ours['count']}" if ours["count"] else "No intruders")
        B2, A2, _ = mitigate_factors(W0, B, A, 2.0, lam=0.25)
        exact = 2.0 * (B2 @ A2).numpy()
        U, S, Vt = np.linalg.svd(exact, full_matrices=False)
        rank4 = (U[:, :4] * S[:4]) @ Vt[:4]
        peft_delta = layers[path].get_delta_weight("intruder_reduced").double().detach().numpy()
        np.testing.assert_allclose(peft_delta, rank4, atol=1e-4, rtol=0)
        lost = max(lost, float(np.linalg.norm(exact - rank4)))
    assert lost > 1e-2  # what PEFT's truncation drops of the mitigated update, and lorakit keeps
