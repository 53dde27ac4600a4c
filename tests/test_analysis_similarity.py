"""Subspace similarity phi of LoRA paper section 7.2 (lorakit.analysis.similarity)."""

import math

import numpy as np
import pytest
import torch

import lorakit
from lorakit.analysis import grassmann_similarity, random_baseline, similarity_summary, subspace_similarity


def phi_reference(M1, M2, side):
    """Loop over (i, j) with projector traces: ||U1^T U2||_F^2 = trace(P1 P2), P = U U^T (numpy, float64)."""
    M1, M2 = np.asarray(M1, np.float64), np.asarray(M2, np.float64)

    def basis(M):
        U, _, Vh = np.linalg.svd(M, full_matrices=False)
        return Vh.T if side == "right" else U

    U1, U2 = basis(M1), basis(M2)
    out = np.zeros((U1.shape[1], U2.shape[1]))
    for i in range(1, U1.shape[1] + 1):
        P1 = U1[:, :i] @ U1[:, :i].T
        for j in range(1, U2.shape[1] + 1):
            P2 = U2[:, :j] @ U2[:, :j].T
            out[i - 1, j - 1] = np.trace(P1 @ P2) / min(i, j)
    return out


def test_identical_subspaces_give_one():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(8, 40, generator=g)
    phi = subspace_similarity(A, A)
    assert phi.shape == (8, 8) and phi.dtype == torch.float64
    # top-i subspace is nested in the top-j one: phi = min(i,j)/min(i,j) = 1 everywhere
    torch.testing.assert_close(phi, torch.ones(8, 8, dtype=torch.float64), rtol=0, atol=1e-12)
    # same row space, different factorisation (any invertible mixing): whole subspaces coincide
    G = torch.randn(8, 8, generator=g)
    assert float(subspace_similarity(A, G @ A)[-1, -1]) == pytest.approx(1.0, abs=1e-12)
    assert float(subspace_similarity(A, 3.0 * A)[0, 0]) == pytest.approx(1.0, abs=1e-12)


def test_orthogonal_subspaces_give_zero():
    g = torch.Generator().manual_seed(1)
    d = 32
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    A1 = torch.randn(4, 4, generator=g, dtype=torch.float64) @ Q[:, :4].T  # rows in span(q1..q4)
    A2 = torch.randn(6, 6, generator=g, dtype=torch.float64) @ Q[:, 4:10].T  # rows in span(q5..q10)
    phi = subspace_similarity(A1, A2)
    assert phi.shape == (4, 6)
    assert float(phi.abs().max()) < 1e-12
    # B side: columns in orthogonal subspaces of the output space
    phi_b = subspace_similarity(A1.T, A2.T, side="left")
    assert float(phi_b.abs().max()) < 1e-12


def test_constructed_principal_angle():
    # U1 = [e1, e2] (singular values 2, 1); U2 = [cos t e1 + sin t e3, e2] (singular values 2, 1)
    t = 0.3
    e = torch.eye(5, dtype=torch.float64)
    A1 = torch.stack([2 * e[0], e[1]])
    A2 = torch.stack([2 * (math.cos(t) * e[0] + math.sin(t) * e[2]), e[1]])
    phi = subspace_similarity(A1, A2)
    c2 = math.cos(t) ** 2
    expected = torch.tensor([[c2, c2], [c2, (c2 + 1) / 2]], dtype=torch.float64)
    torch.testing.assert_close(phi, expected, rtol=0, atol=1e-14)


@pytest.mark.parametrize("r1,r2,d", [(8, 64, 96), (4, 4, 20), (16, 8, 12)])
def test_matches_float64_reference_on_random_matrices(r1, r2, d):
    g = np.random.default_rng(r1 * 100 + r2)
    A1, A2 = g.standard_normal((r1, d)), g.standard_normal((r2, d))
    phi = subspace_similarity(torch.from_numpy(A1), torch.from_numpy(A2))
    np.testing.assert_allclose(phi.numpy(), phi_reference(A1, A2, "right"), rtol=0, atol=1e-12)
    B1, B2 = g.standard_normal((d, r1)), g.standard_normal((d, r2))
    phi_b = subspace_similarity(torch.from_numpy(B1), torch.from_numpy(B2), side="left")
    np.testing.assert_allclose(phi_b.numpy(), phi_reference(B1, B2, "left"), rtol=0, atol=1e-12)
    assert float(phi.min()) >= 0.0 and float(phi.max()) <= 1.0


def test_low_precision_input_uses_float64_math():
    g = torch.Generator().manual_seed(2)
    A1 = torch.randn(4, 30, generator=g).to(torch.bfloat16)
    A2 = torch.randn(8, 30, generator=g).to(torch.float16)
    ref = phi_reference(A1.double().numpy(), A2.double().numpy(), "right")
    np.testing.assert_allclose(subspace_similarity(A1, A2).numpy(), ref, rtol=0, atol=1e-12)


def test_random_subspaces_sit_near_chance_level():
    # E phi(i, j) = max(i, j) / d for a random j-dim subspace: average over independent draws
    g = torch.Generator().manual_seed(3)
    d, r1, r2, n = 40, 2, 5, 400
    acc = torch.zeros(r1, r2, dtype=torch.float64)
    for _ in range(n):
        acc += subspace_similarity(torch.randn(r1, d, generator=g), torch.randn(r2, d, generator=g))
    mean = acc / n
    for i in range(1, r1 + 1):
        for j in range(1, r2 + 1):
            assert float(mean[i - 1, j - 1]) == pytest.approx(random_baseline(i, j, d), rel=0.15)


def test_grassmann_similarity_and_summary():
    e = torch.eye(6, dtype=torch.float64)
    U1 = e[:, [0, 1]]
    U2 = e[:, [1, 2, 0]]
    phi = grassmann_similarity(U1, U2)
    expected = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.5, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(phi, expected, rtol=0, atol=0)
    s = similarity_summary(phi, 6)
    assert s == {"phi_1_1": 0.0, "phi_full": 1.0, "mean_diagonal": 0.25, "random_1_1": 1 / 6, "random_full": 3 / 6}


def test_mismatched_dimensions_raise():
    with pytest.raises(lorakit.LoraError, match="differ"):
        subspace_similarity(torch.randn(4, 10), torch.randn(4, 11))
    with pytest.raises(lorakit.LoraError, match="side"):
        subspace_similarity(torch.randn(4, 10), torch.randn(4, 10), side="up")
