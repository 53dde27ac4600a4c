"""Subspace similarity between adapters (paper §7.2, figures 3 and 4; appendix G).

For two adaptation matrices `A1: (r1, d)` and `A2: (r2, d)` (e.g. ranks 8 and 64, or two
seeds of rank 64), take their right-singular vectors `U_A1: (d, k1)`, `U_A2: (d, k2)`
(columns ordered by descending singular value, `k = min(r, d)`). The normalised subspace
similarity based on the Grassmann distance is

    phi(A1, A2, i, j) = ||U_A1^i^T U_A2^j||_F^2 / min(i, j)        in [0, 1]

where `U^i` is the first i columns. It is the mean squared cosine of the `min(i, j)`
principal angles between the two subspaces: 1 when one contains the other, 0 when they are
orthogonal. The same is done for `B: (d_out, r)` with its left-singular vectors (§7.2 footnote).

For a fixed i-dimensional subspace and a uniformly random j-dimensional subspace of R^d,
`E ||U^i^T U^j||_F^2 = i j / d`, so the chance level is `E phi = max(i, j) / d`
(`random_baseline`), the "random Gaussian" reference of figure 4.
"""

from __future__ import annotations

from typing import Any

import torch

from .errors import AnalysisError
from .linalg import as_float64

SIDES = ("right", "left")


def singular_basis(M: Any, side: str = "right") -> torch.Tensor:
    """Orthonormal singular vectors of `M: (m, n)` as columns, by descending singular value.

    Args:
        side: `"right"` -> `(n, min(m, n))` (use for lora_A `(r, in)`);
            `"left"` -> `(m, min(m, n))` (use for lora_B `(out, r)`).
    Returns:
        float64 tensor with orthonormal columns. Singular vectors of zero (or tied)
        singular values are not unique; their order/choice is LAPACK's.
    """
    if side not in SIDES:
        raise AnalysisError(f"side must be 'right' or 'left', got {side!r}")
    M64 = as_float64(M, "matrix")
    U, _, Vh = torch.linalg.svd(M64, full_matrices=False)
    return Vh.T if side == "right" else U


def grassmann_similarity(U1: Any, U2: Any) -> torch.Tensor:
    """`phi[i-1, j-1] = ||U1[:, :i]^T U2[:, :j]||_F^2 / min(i, j)` for all i <= k1, j <= k2.

    Args:
        U1: `(d, k1)`, U2: `(d, k2)`, orthonormal columns (not checked beyond shape), float64.
    Returns:
        `(k1, k2)` float64 tensor with values in [0, 1] (paper §7.2 / appendix G).
    Raises:
        AnalysisError: the two bases live in spaces of different dimension d.
    """
    U1 = as_float64(U1, "U1")
    U2 = as_float64(U2, "U2")
    if U1.shape[0] != U2.shape[0]:
        raise AnalysisError(f"subspaces live in different dimensions: {U1.shape[0]} vs {U2.shape[0]}")
    C2 = (U1.T @ U2) ** 2  # (k1, k2): squared cosines between basis vectors
    S = torch.cumsum(torch.cumsum(C2, 0), 1)  # S[i-1, j-1] = ||U1^i^T U2^j||_F^2
    i = torch.arange(1, C2.shape[0] + 1, dtype=torch.float64)[:, None]
    j = torch.arange(1, C2.shape[1] + 1, dtype=torch.float64)[None, :]
    return (S / torch.minimum(i, j)).clamp_(0.0, 1.0)


def subspace_similarity(M1: Any, M2: Any, side: str = "right") -> torch.Tensor:
    """Normalised subspace similarity `phi(M1, M2, i, j)` of paper §7.2, for all i, j.

    Args:
        M1: `(r1, d)`, M2: `(r2, d)` lora_A matrices with `side="right"` (the paper's
            choice: right-singular vectors, in the layer's input space), or `(d, r1)`,
            `(d, r2)` lora_B matrices with `side="left"`. Any float dtype; float64 math.
    Returns:
        `phi: (k1, k2)` float64, `phi[i-1, j-1] = ||U1^i^T U2^j||_F^2 / min(i, j)`,
        `k = min(r, d)`; values in [0, 1].
    Raises:
        AnalysisError: the matrices' shared dimension d differs, or bad `side`.
    """
    if side not in SIDES:
        raise AnalysisError(f"side must be 'right' or 'left', got {side!r}")
    M1 = as_float64(M1, "M1")
    M2 = as_float64(M2, "M2")
    axis = 1 if side == "right" else 0
    if M1.shape[axis] != M2.shape[axis]:
        raise AnalysisError(
            f"cannot compare subspaces: shapes {tuple(M1.shape)} and {tuple(M2.shape)} differ in the "
            f"{'input (columns)' if side == 'right' else 'output (rows)'} dimension"
        )
    return grassmann_similarity(singular_basis(M1, side), singular_basis(M2, side))


def random_baseline(i: int, j: int, d: int) -> float:
    """`E phi` for an i-dim subspace against a uniformly random j-dim subspace of R^d: `max(i, j) / d`."""
    return max(i, j) / d


def similarity_summary(phi: torch.Tensor, d: int) -> dict:
    """Headline numbers of a `phi: (k1, k2)` matrix over R^d.

    Returns: `phi_1_1` (top directions), `phi_full` (`phi(k1, k2)`: whole subspaces),
    `mean_diagonal` (mean of `phi(i, i)`, i <= min(k1, k2)), and the chance levels
    `random_1_1 = 1/d`, `random_full = max(k1, k2)/d`.
    """
    k1, k2 = phi.shape
    m = min(k1, k2)
    return {
        "phi_1_1": float(phi[0, 0]),
        "phi_full": float(phi[k1 - 1, k2 - 1]),
        "mean_diagonal": float(torch.diagonal(phi)[:m].mean()),
        "random_1_1": random_baseline(1, 1, d),
        "random_full": random_baseline(k1, k2, d),
    }
