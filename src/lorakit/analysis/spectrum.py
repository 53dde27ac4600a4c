"""Singular-value spectra of weight updates (paper §4.2 and §7: "the update has a low intrinsic rank").

Definitions (all computed in float64), for singular values `s_1 >= s_2 >= ... >= s_n >= 0`
of an update `delta: (out, in)`, `n = min(out, in)`:

- energy share of the top k: `E(k) = sum_{i<=k} s_i^2 / sum_i s_i^2 = ||delta_k||_F^2 / ||delta||_F^2`,
  where `delta_k` is the best rank-k approximation (Eckart-Young);
- `rank_90`, `rank_99`: the smallest k with `E(k) >= 0.90` (resp. 0.99);
- entropy effective rank (Roy & Vetterli 2007, "The effective rank: a measure of effective
  dimensionality", EUSIPCO): `erank = exp(-sum_i p_i log p_i)` with `p_i = s_i / sum_j s_j`
  (the L1-normalised singular values, not their squares; `0 log 0 = 0`). It is 1 for a rank-1
  matrix and k for k equal non-zero singular values; 0 for the zero matrix by convention;
- stable rank: `||delta||_F^2 / ||delta||_2^2 = sum s_i^2 / s_1^2`;
- numerical rank: the number of `s_i > s_1 * max(out, in) * eps(float64)` (numpy's `matrix_rank` rule).
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import torch

from .errors import AnalysisError
from .linalg import as_float64, numerical_rank_tol

DEFAULT_THRESHOLDS = (0.9, 0.99)
_SLACK = 1e-12  # E(k) >= t - _SLACK counts as reaching t (cumulative sums round)


def default_ks(n: int) -> list[int]:
    """`1, 2, 4, 8, ...` below `n`, then `n` itself."""
    ks, k = [], 1
    while k < n:
        ks.append(k)
        k *= 2
    if n >= 1:
        ks.append(n)
    return ks


def effective_rank(singular_values: Any) -> float:
    """Entropy effective rank of Roy & Vetterli (2007): `exp(H(p))`, `p_i = s_i / sum_j s_j`.

    Args:
        singular_values: `(n,)`, non-negative, any float dtype (computed in float64).
    Returns:
        A float in `[1, n]` (0.0 when all singular values are zero).
    Raises:
        AnalysisError: not 1-D, negative or non-finite values.
    """
    s = _check_singular_values(singular_values)
    total = float(s.sum())
    if total == 0.0:
        return 0.0
    p = s[s > 0] / total
    return float(torch.exp(-(p * torch.log(p)).sum()))


def energy_rank(singular_values: Any, threshold: float) -> int:
    """Smallest k with `sum_{i<=k} s_i^2 / sum_i s_i^2 >= threshold` (0 for the zero matrix).

    Args:
        singular_values: `(n,)` non-negative; sorted here, descending.
        threshold: in (0, 1].
    Raises:
        AnalysisError: threshold outside (0, 1] or bad singular values.
    """
    if not 0.0 < threshold <= 1.0:
        raise AnalysisError(f"energy threshold must be in (0, 1], got {threshold!r}")
    s = _check_singular_values(singular_values)
    cum = _cumulative_energy(s)
    if cum is None:
        return 0
    return int(torch.searchsorted(cum, torch.tensor([threshold - _SLACK], dtype=cum.dtype)).item()) + 1


def spectrum(delta: Any, *, ks: Iterable[int] | None = None, thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
             keep: int | None = None) -> dict:
    """Spectrum of a weight update `delta: (out, in)` (paper §7.1-7.2: is the update low rank?).

    Computed with `torch.linalg.svdvals` in float64 (any input float dtype). For a LoRA
    adapter prefer `spectrum_from_singular_values(lowrank_svd(B, A, scaling)[1], shape)`,
    which never forms the full matrix.

    Args:
        delta: `(out, in)` tensor / array, e.g. `scaling * B @ A` or `W_ft - W0`.
        ks: the k of the top-k energy shares; default `1, 2, 4, ... < n` and `n`.
        thresholds: energy levels of the `rank_<pct>` entries (default 0.9 and 0.99).
        keep: store only the top `keep` singular values (all statistics still use all).

    Returns:
        see `spectrum_from_singular_values`.
    Raises:
        AnalysisError: not a finite 2-D matrix.
    """
    d = as_float64(delta, "delta")
    s = torch.linalg.svdvals(d)
    return spectrum_from_singular_values(s, tuple(d.shape), ks=ks, thresholds=thresholds, keep=keep)


def spectrum_from_singular_values(singular_values: Any, shape: tuple[int, int] | None = None, *,
                                  ks: Iterable[int] | None = None,
                                  thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
                                  keep: int | None = None) -> dict:
    """The statistics of module docstring, from the singular values of a matrix of `shape`.

    Args:
        singular_values: `(m,)`, non-negative. May omit trailing values known to be zero
            (e.g. the `min(r, out, in)` values of a rank-r LoRA update).
        shape: `(out, in)` of the matrix; sets the numerical-rank tolerance (default `(m, m)`).

    Returns:
        A JSON-ready dict: `singular_values` (descending, first `keep`), `num_singular_values`
        (m), `frobenius_norm`, `spectral_norm`, `energy_top_k` (`{str(k): E(k)}`),
        `rank_90`/`rank_99` (one per threshold, named by percent), `effective_rank`
        (Roy & Vetterli), `stable_rank`, `numerical_rank`. Energies and ratios are None
        for the zero matrix.
    """
    s = torch.sort(_check_singular_values(singular_values), descending=True).values
    n = int(s.numel())
    shape = tuple(shape) if shape is not None else (n, n)
    total = float((s * s).sum())
    cum = _cumulative_energy(s)
    ks = default_ks(n) if ks is None else sorted({int(k) for k in ks})
    if any(k < 1 for k in ks):
        raise AnalysisError(f"ks must be >= 1, got {ks}")
    out: dict[str, Any] = {
        "singular_values": [float(v) for v in (s if keep is None else s[:keep])],
        "num_singular_values": n,
        "frobenius_norm": math.sqrt(total),
        "spectral_norm": float(s[0]) if n else 0.0,
        "energy_top_k": {str(k): (None if cum is None else float(cum[min(k, n) - 1])) for k in ks},
    }
    for t in thresholds:
        out[f"rank_{_pct(t)}"] = energy_rank(s, t)
    out["effective_rank"] = effective_rank(s)
    out["stable_rank"] = None if total == 0.0 else total / float(s[0]) ** 2
    tol = numerical_rank_tol(s, shape)
    out["numerical_rank"] = int((s > tol).sum()) if total > 0 else 0
    return out


def _pct(t: float) -> str:
    p = 100.0 * t
    return str(int(round(p))) if abs(p - round(p)) < 1e-9 else f"{p:g}".replace(".", "_")


def _cumulative_energy(s: torch.Tensor) -> torch.Tensor | None:
    s = torch.sort(s, descending=True).values
    sq = s * s
    total = sq.sum()
    if float(total) == 0.0:
        return None
    return torch.cumsum(sq, 0) / total


def _check_singular_values(values: Any) -> torch.Tensor:
    s = as_float64(values, "singular_values", ndim=1)
    if float(s.min()) < 0:
        raise AnalysisError("singular_values: must be >= 0")
    return s
