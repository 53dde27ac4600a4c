"""Amplification analysis of LoRA paper section 7.3 (lorakit.analysis.amplification)."""

import math

import numpy as np
import pytest
import torch

import lorakit
from lorakit.analysis import amplification, amplification_from_svd, lowrank_svd


def constructed():
    W0 = torch.diag(torch.tensor([10.0, 5.0, 3.0, 2.0, 1.0, 0.5], dtype=torch.float64))
    W0[4, 5] = 0.25
    delta = torch.zeros(6, 6, dtype=torch.float64)
    delta[4, 5] = 3.0  # top direction: u = e5, v = e6
    delta[2, 0] = 2.0  # second: u = e3, v = e1
    return delta, W0


def test_exact_constructed_case():
    delta, W0 = constructed()
    a = amplification(delta, W0, r=2, random_trials=0)
    # U^T W0 V^T = [[W0[4,5], W0[4,0]], [W0[2,5], W0[2,0]]] = [[0.25, 0], [0, 0]]
    assert a["r"] == 2 and a["r_requested"] == 2
    assert a["delta_fro"] == pytest.approx(math.sqrt(13.0), rel=1e-15)
    assert a["proj_delta"] == pytest.approx(0.25, rel=1e-14)
    assert a["amplification"] == pytest.approx(math.sqrt(13.0) / 0.25, rel=1e-14)
    assert a["proj_w0"] == pytest.approx(math.sqrt(10.0**2 + 5.0**2), rel=1e-14)  # W0's top-2 singular values
    assert a["w0_fro"] == pytest.approx(math.sqrt(100 + 25 + 9 + 4 + 1 + 0.25 + 0.0625), rel=1e-15)
    assert a["proj_random"] is None
    a1 = amplification(delta, W0, r=1, random_trials=0)
    assert a1["proj_delta"] == pytest.approx(0.25, rel=1e-14)
    assert a1["amplification"] == pytest.approx(math.sqrt(13.0) / 0.25, rel=1e-14)  # ||delta||_F is the whole update
    assert a1["proj_w0"] == pytest.approx(10.0, rel=1e-14)


def test_matches_float64_reference_on_rectangular_matrices():
    g = np.random.default_rng(7)
    out_f, in_f, r = 24, 15, 3
    B, A = g.standard_normal((out_f, r)), g.standard_normal((r, in_f))
    W0 = g.standard_normal((out_f, in_f))
    delta = 0.5 * B @ A
    a = amplification(torch.from_numpy(delta), torch.from_numpy(W0), r=r, random_trials=0)
    U, s, Vh = np.linalg.svd(delta)
    proj = np.linalg.norm(U[:, :r].T @ W0 @ Vh[:r].T)
    Uw, sw, Vhw = np.linalg.svd(W0)
    assert a["proj_delta"] == pytest.approx(proj, rel=1e-12)
    assert a["proj_w0"] == pytest.approx(np.linalg.norm(Uw[:, :r].T @ W0 @ Vhw[:r].T), rel=1e-12)
    assert a["delta_fro"] == pytest.approx(np.linalg.norm(delta), rel=1e-12)
    assert a["amplification"] == pytest.approx(np.linalg.norm(delta) / proj, rel=1e-12)
    # the factored SVD of the LoRA factors gives the same answer without forming delta
    Uf, Sf, Vhf = lowrank_svd(torch.from_numpy(B), torch.from_numpy(A), 0.5)
    b = amplification_from_svd(Uf, Sf, Vhf, torch.from_numpy(W0), r, random_trials=0)
    for key in ("proj_delta", "proj_w0", "delta_fro", "amplification"):
        assert b[key] == pytest.approx(a[key], rel=1e-11)


def test_random_subspace_baseline_matches_its_expectation():
    # E ||U^T W0 V||_F^2 = r^2 ||W0||_F^2 / (out * in) for uniformly random r-dim subspaces
    g = torch.Generator().manual_seed(0)
    W0 = torch.randn(12, 9, generator=g, dtype=torch.float64)
    delta = torch.randn(12, 2, generator=g, dtype=torch.float64) @ torch.randn(2, 9, generator=g, dtype=torch.float64)
    n = 3000
    a = amplification(delta, W0, r=2, random_trials=n, seed=1)
    mean_sq = a["proj_random"] ** 2 + a["proj_random_std"] ** 2 * (n - 1) / n
    expected = (2**2) * float(W0.square().sum()) / (12 * 9)
    assert a["random_expected_rms"] == pytest.approx(math.sqrt(expected), rel=1e-14)
    assert mean_sq == pytest.approx(expected, rel=0.05)
    # deterministic for a seed, different for another
    assert amplification(delta, W0, r=2, random_trials=5, seed=3)["proj_random"] == amplification(delta, W0, r=2, random_trials=5, seed=3)["proj_random"]
    assert amplification(delta, W0, r=2, random_trials=5, seed=3)["proj_random"] != amplification(delta, W0, r=2, random_trials=5, seed=4)["proj_random"]


def test_r_is_clipped_to_the_numerical_rank_and_zero_update_is_undefined():
    delta, W0 = constructed()
    a = amplification(delta, W0, r=5, random_trials=0)
    assert a["r"] == 2 and a["r_requested"] == 5
    assert a["proj_delta"] == pytest.approx(0.25, rel=1e-14)
    z = amplification(torch.zeros(6, 6), W0, r=2)
    assert z["r"] == 0 and z["amplification"] is None and z["delta_fro"] == 0.0
    d = amplification(delta, W0)  # default r = numerical rank
    assert d["r"] == 2 and d["r_requested"] is None


def test_float32_input_is_analysed_in_float64():
    delta, W0 = constructed()
    a = amplification(delta.float(), W0.float(), r=2, random_trials=0)
    assert a["amplification"] == pytest.approx(math.sqrt(13.0) / 0.25, rel=1e-14)


def test_bad_input_raises():
    delta, W0 = constructed()
    with pytest.raises(lorakit.LoraError, match="different shapes"):
        amplification(delta, W0[:5])
    with pytest.raises(lorakit.LoraError, match="r must be"):
        amplification(delta, W0, r=0)
