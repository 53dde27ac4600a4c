"""How does the update relate to the pre-trained weight? (paper §7.3, table 7).

For a pre-trained weight `W0: (out, in)` and an update `delta: (out, in)` with thin SVD
`delta = U diag(s) Vh`, take the top-r left singular vectors `U_r: (out, r)` and the top-r
right singular vectors as rows `Vh_r: (r, in)` (the paper writes these `U`, `V`). Then

    proj(U, V)      = ||U_r^T W0 Vh_r^T||_F      (project W0 onto an r-dim row/column subspace pair)
    proj_delta      = proj with U_r, Vh_r from delta          (table 7, column "delta W_q")
    proj_w0         = proj with the top-r singular vectors of W0 itself
                    = sqrt(sigma_1(W0)^2 + ... + sigma_r(W0)^2)  (table 7, column "W_q")
    proj_random     = proj with U_r, Vh_r orthonormal bases of uniformly random subspaces
                      (table 7, column "Random"), averaged over `random_trials` draws
    amplification   = ||delta||_F / proj_delta             (§7.3: 6.91 / 0.32 = 21.5 for r = 4)

A large amplification factor means the update amplifies directions that W0 already has but
does not emphasise. For random subspaces `E ||U^T W0 V||_F^2 = r^2 ||W0||_F^2 / (out * in)`
exactly; its square root is reported as `random_expected_rms`.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .errors import AnalysisError
from .linalg import as_float64, numerical_rank_tol


def amplification(delta: Any, W0: Any, r: int | None = None, *, random_trials: int = 10, seed: int = 0) -> dict:
    """Amplification analysis of paper §7.3 for one module.

    Args:
        delta: `(out, in)` update (`scaling * B @ A`), any float dtype; float64 math.
        W0: `(out, in)` pre-trained weight in the same orientation (transpose GPT-2
            `Conv1D` and embedding weights first).
        r: the number of singular directions; default the numerical rank of `delta`.
            Clipped to that rank: directions of zero singular values are not unique.
        random_trials: random subspace draws averaged for `proj_random` (0 to skip).
        seed: seed of the random draws (deterministic on CPU).

    Returns:
        JSON-ready dict: `r`, `r_requested`, `delta_fro` (`||delta||_F`), `w0_fro`,
        `proj_delta`, `proj_w0`, `proj_random` (mean), `proj_random_std`,
        `random_expected_rms`, `amplification` (`delta_fro / proj_delta`; None when
        undefined). See the module docstring for the definitions.
    Raises:
        AnalysisError: shapes differ, r < 1, or non-finite input.
    """
    d = as_float64(delta, "delta")
    W = as_float64(W0, "W0")
    if d.shape != W.shape:
        raise AnalysisError(f"delta {tuple(d.shape)} and W0 {tuple(W.shape)} have different shapes")
    U, S, Vh = torch.linalg.svd(d, full_matrices=False)
    return amplification_from_svd(U, S, Vh, W, r, random_trials=random_trials, seed=seed)


def amplification_from_svd(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, W0: Any, r: int | None = None, *,
                           random_trials: int = 10, seed: int = 0,
                           w0_singular_values: torch.Tensor | None = None) -> dict:
    """`amplification` from a precomputed thin SVD `delta = U diag(S) Vh` (`U: (out, k)`,
    `S: (k,)` descending, `Vh: (k, in)`), e.g. from `lowrank_svd(B, A, scaling)`.
    `w0_singular_values` may pass `svdvals(W0)` if already known."""
    W = as_float64(W0, "W0")
    U, S, Vh = U.double(), S.double(), Vh.double()
    out_f, in_f = W.shape
    if U.shape[0] != out_f or Vh.shape[1] != in_f:
        raise AnalysisError(f"delta ({U.shape[0]}, {Vh.shape[1]}) and W0 {tuple(W.shape)} have different shapes")
    if r is not None and (isinstance(r, bool) or not isinstance(r, int) or r < 1):
        raise AnalysisError(f"r must be an integer >= 1, got {r!r}")
    rank = int((S > numerical_rank_tol(S, (out_f, in_f))).sum()) if float(S.max()) > 0 else 0
    r_used = rank if r is None else min(r, rank)
    delta_fro = float(torch.linalg.vector_norm(S))
    w0_fro = float(torch.linalg.matrix_norm(W))
    result: dict[str, Any] = {"r": r_used, "r_requested": r, "delta_fro": delta_fro, "w0_fro": w0_fro}
    if r_used == 0:
        result.update(proj_delta=None, proj_w0=None, proj_random=None, proj_random_std=None,
                      random_expected_rms=None, amplification=None)
        return result
    proj_delta = float(torch.linalg.matrix_norm(U[:, :r_used].T @ W @ Vh[:r_used].T))
    sw = torch.linalg.svdvals(W) if w0_singular_values is None else w0_singular_values.double()
    proj_w0 = float(torch.linalg.vector_norm(sw[:r_used]))
    rand_mean = rand_std = None
    if random_trials > 0:
        gen = torch.Generator().manual_seed(seed)
        chunk = max(1, min(random_trials, (1 << 24) // ((out_f + in_f) * r_used)))  # bound memory to ~128 MiB
        vals = []
        for start in range(0, random_trials, chunk):
            n = min(chunk, random_trials - start)
            Qu = torch.linalg.qr(torch.randn(n, out_f, r_used, generator=gen, dtype=torch.float64)).Q
            Qv = torch.linalg.qr(torch.randn(n, in_f, r_used, generator=gen, dtype=torch.float64)).Q
            vals.append(torch.linalg.matrix_norm(Qu.transpose(1, 2) @ W @ Qv))
        v = torch.cat(vals)
        rand_mean = float(v.mean())
        rand_std = float(v.std()) if v.numel() > 1 else 0.0
    result.update(
        proj_delta=proj_delta,
        proj_w0=proj_w0,
        proj_random=rand_mean,
        proj_random_std=rand_std,
        random_expected_rms=w0_fro * r_used / math.sqrt(out_f * in_f),
        amplification=(delta_fro / proj_delta) if proj_delta > 0 else None,
    )
    return result
