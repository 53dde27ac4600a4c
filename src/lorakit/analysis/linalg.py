"""Float64 helpers shared by the analyses."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .errors import AnalysisError

EPS64 = float(np.finfo(np.float64).eps)


def as_float64(x: Any, name: str = "matrix", ndim: int | None = 2) -> torch.Tensor:
    """`x` (a torch tensor, numpy array or nested list) as a float64 CPU tensor.

    Raises:
        AnalysisError: not convertible, wrong number of dimensions, empty, or not finite.
    """
    try:
        t = x.detach() if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
        t = t.to(device="cpu", dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise AnalysisError(f"{name}: cannot be read as a float matrix ({exc})") from None
    if ndim is not None and t.ndim != ndim:
        raise AnalysisError(f"{name}: expected a {ndim}-D array, got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise AnalysisError(f"{name}: is empty (shape {tuple(t.shape)})")
    if not torch.isfinite(t).all():
        raise AnalysisError(f"{name}: contains NaN or Inf")
    return t


def numerical_rank_tol(s: torch.Tensor, shape: tuple[int, ...]) -> float:
    """numpy's `matrix_rank` default tolerance: `sigma_max * max(shape) * eps(float64)`."""
    if s.numel() == 0:
        return 0.0
    return float(s.max()) * max(shape) * EPS64


def lowrank_svd(B: Any, A: Any, scaling: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of `delta = scaling * B @ A` without forming the `(out, in)` matrix.

    Args:
        B: `(out, r)`; A: `(r, in)`; any float dtype, computed in float64.
        scaling: the LoRA scale (`alpha / r`, paper §4.1).

    Returns:
        `U: (out, k)`, `S: (k,)` (descending, >= 0), `Vh: (k, in)`, float64, with
        `k = min(r, out, in)` and `delta == U @ diag(S) @ Vh`. Every other singular value
        of `delta` is exactly zero (its rank is at most r).

    Method: `B = Q_B R_B`, `A^T = Q_A R_A` (reduced QR), `delta = Q_B (scaling R_B R_A^T) Q_A^T`,
    and the SVD of the small core `M = scaling R_B R_A^T` gives `U = Q_B U_M`, `Vh = Vh_M Q_A^T`.
    Cost O((out + in) r^2) instead of O(out * in * min(out, in)).

    Raises:
        AnalysisError: non-matrix input or `A.shape[0] != B.shape[1]`.
    """
    B64 = as_float64(B, "lora_B")
    A64 = as_float64(A, "lora_A")
    if B64.shape[1] != A64.shape[0]:
        raise AnalysisError(f"lora_B {tuple(B64.shape)} and lora_A {tuple(A64.shape)} do not multiply (rank mismatch)")
    QB, RB = torch.linalg.qr(B64, mode="reduced")
    QA, RA = torch.linalg.qr(A64.T, mode="reduced")
    core = float(scaling) * (RB @ RA.T)
    Uc, S, Vhc = torch.linalg.svd(core, full_matrices=False)
    return QB @ Uc, S, Vhc @ QA.T
