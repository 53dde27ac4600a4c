"""Spectrum of delta_weight (lorakit.analysis.spectrum): constructed matrices with known answers."""

import math

import numpy as np
import pytest
import torch

import lorakit
from lorakit.analysis import AnalysisError, effective_rank, energy_rank, lowrank_svd, spectrum, spectrum_from_singular_values


def rank_k(out_f, in_f, k, seed):
    g = np.random.default_rng(seed)
    return g.standard_normal((out_f, k)) @ g.standard_normal((k, in_f))


@pytest.mark.parametrize("shape,k", [((40, 30), 1), ((40, 30), 3), ((17, 64), 5), ((64, 64), 8)])
def test_exact_rank_k_has_k_nonzero_singular_values_and_full_energy_at_k(shape, k):
    delta = rank_k(*shape, k, seed=k)
    s = spectrum(delta, ks=[1, k, min(shape)])
    sv = np.array(s["singular_values"])
    assert s["num_singular_values"] == min(shape)
    assert s["numerical_rank"] == k
    tol = sv[0] * max(shape) * np.finfo(np.float64).eps
    assert np.all(sv[:k] > 1e3 * tol) and np.all(sv[k:] <= tol)
    assert s["energy_top_k"][str(k)] == pytest.approx(1.0, abs=1e-12)
    assert s["energy_top_k"][str(min(shape))] == pytest.approx(1.0, abs=1e-12)
    assert s["rank_99"] <= k and s["rank_90"] <= k
    assert 1.0 <= s["effective_rank"] <= k + 1e-9
    # values against a float64 numpy reference
    ref = np.linalg.svd(delta, compute_uv=False)
    np.testing.assert_allclose(sv, ref, rtol=1e-12, atol=1e-12 * ref[0])
    assert s["frobenius_norm"] == pytest.approx(np.linalg.norm(delta), rel=1e-12)
    assert s["spectral_norm"] == pytest.approx(ref[0], rel=1e-12)
    assert s["stable_rank"] == pytest.approx(np.linalg.norm(delta) ** 2 / ref[0] ** 2, rel=1e-12)


def test_energy_shares_match_reference_on_random_matrix():
    g = np.random.default_rng(1)
    delta = g.standard_normal((33, 20))
    s = spectrum(delta)
    ref = np.linalg.svd(delta, compute_uv=False)
    cum = np.cumsum(ref**2) / np.sum(ref**2)
    assert list(s["energy_top_k"]) == ["1", "2", "4", "8", "16", "20"]
    for k, v in s["energy_top_k"].items():
        assert v == pytest.approx(cum[int(k) - 1], rel=1e-12)
    assert s["rank_90"] == int(np.argmax(cum >= 0.9)) + 1
    assert s["rank_99"] == int(np.argmax(cum >= 0.99)) + 1
    p = ref / ref.sum()
    assert s["effective_rank"] == pytest.approx(math.exp(-np.sum(p * np.log(p))), rel=1e-12)


def test_constructed_singular_values_give_known_statistics():
    # delta = diag(4, 2, 1, 1, 0) embedded in a 5 x 7 matrix, rotated by random orthogonal matrices
    g = np.random.default_rng(3)
    Q1, _ = np.linalg.qr(g.standard_normal((5, 5)))
    Q2, _ = np.linalg.qr(g.standard_normal((7, 7)))
    S = np.zeros((5, 7))
    S[np.arange(4), np.arange(4)] = [4.0, 2.0, 1.0, 1.0]
    s = spectrum(Q1 @ S @ Q2.T)
    total = 16 + 4 + 1 + 1
    assert s["energy_top_k"]["1"] == pytest.approx(16 / total, abs=1e-13)
    assert s["energy_top_k"]["2"] == pytest.approx(20 / total, abs=1e-13)
    assert s["energy_top_k"]["4"] == pytest.approx(1.0, abs=1e-13)
    assert s["rank_90"] == 2 and s["rank_99"] == 4  # 20/22 = 0.909 >= 0.9; 21/22 = 0.955 < 0.99
    assert s["numerical_rank"] == 4
    p = np.array([4, 2, 1, 1]) / 8
    assert s["effective_rank"] == pytest.approx(math.exp(-np.sum(p * np.log(p))), rel=1e-12)
    assert s["stable_rank"] == pytest.approx(total / 16, rel=1e-12)


def test_effective_rank_known_values():
    assert effective_rank([5.0]) == pytest.approx(1.0)
    assert effective_rank([2.0, 2.0, 2.0, 0.0, 0.0]) == pytest.approx(3.0, rel=1e-14)
    assert effective_rank([3.0, 1.0]) == pytest.approx(math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25))), rel=1e-14)
    assert effective_rank([0.0, 0.0]) == 0.0
    assert energy_rank([3.0, 1.0], 0.9) == 1  # 9/10 reaches 0.9 exactly
    assert energy_rank([3.0, 1.0], 0.91) == 2
    with pytest.raises(AnalysisError):
        energy_rank([1.0], 1.5)
    with pytest.raises(AnalysisError):
        effective_rank([1.0, -1.0])


def test_zero_update_has_rank_zero_and_undefined_shares():
    s = spectrum(torch.zeros(6, 4))
    assert s["numerical_rank"] == 0 and s["effective_rank"] == 0.0 and s["rank_90"] == 0
    assert s["frobenius_norm"] == 0.0 and s["stable_rank"] is None
    assert all(v is None for v in s["energy_top_k"].values())


def test_low_precision_input_is_analysed_in_float64():
    g = torch.Generator().manual_seed(0)
    d32 = torch.randn(12, 9, generator=g, dtype=torch.float32)
    d16 = d32.to(torch.bfloat16)
    ref = np.linalg.svd(d16.double().numpy(), compute_uv=False)
    np.testing.assert_allclose(spectrum(d16)["singular_values"], ref, rtol=1e-12)


def test_lowrank_svd_is_exact_svd_of_scaled_product():
    g = torch.Generator().manual_seed(5)
    for out_f, in_f, r in [(48, 32, 8), (16, 64, 4), (6, 5, 8)]:
        B = torch.randn(out_f, r, generator=g, dtype=torch.float32)
        A = torch.randn(r, in_f, generator=g, dtype=torch.float32)
        U, S, Vh = lowrank_svd(B, A, 0.5)
        assert U.dtype == S.dtype == Vh.dtype == torch.float64
        delta = 0.5 * (B.double() @ A.double())
        k = min(r, out_f, in_f)
        assert U.shape == (out_f, k) and S.shape == (k,) and Vh.shape == (k, in_f)
        torch.testing.assert_close(U @ torch.diag(S) @ Vh, delta, rtol=0, atol=1e-12 * float(S[0]))
        torch.testing.assert_close(U.T @ U, torch.eye(k, dtype=torch.float64), rtol=0, atol=1e-12)
        torch.testing.assert_close(Vh @ Vh.T, torch.eye(k, dtype=torch.float64), rtol=0, atol=1e-12)
        ref = np.linalg.svd(delta.numpy(), compute_uv=False)[:k]
        np.testing.assert_allclose(S.numpy(), ref, rtol=1e-11, atol=1e-12 * ref[0])
        # the statistics from the factored SVD equal those of the full matrix
        full, fact = spectrum(delta), spectrum_from_singular_values(S, (out_f, in_f))
        for key in ("energy_top_k", "rank_90", "rank_99", "numerical_rank"):
            if key == "energy_top_k":
                for kk, v in fact[key].items():
                    assert v == pytest.approx(full[key][kk], rel=1e-12)
            else:
                assert fact[key] == full[key]
        assert fact["effective_rank"] == pytest.approx(full["effective_rank"], rel=1e-9)


def test_bad_input_raises_lora_error():
    with pytest.raises(lorakit.LoraError):
        spectrum(torch.zeros(3))
    with pytest.raises(lorakit.LoraError):
        spectrum(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(lorakit.LoraError):
        lowrank_svd(torch.zeros(4, 3), torch.zeros(2, 5))
