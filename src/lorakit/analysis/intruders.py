"""Intruder dimensions (Shuttleworth et al. 2024, "LoRA vs Full Fine-tuning: An Illusion of Equivalence",
arXiv:2410.21228, §4 and §6) and their mitigation, in float64.

A singular vector `y_j` of the fine-tuned weight `W` (one of its `top_k` largest) is an *intruder
dimension* when its best absolute cosine similarity with every singular vector `x_i` of the pre-trained
weight `W0` is below `eps`:

    max_i |cos(y_j, x_i)| < eps          (paper §4, definition 1)

Left-singular vectors (the output side, columns of `U` in `W = U diag(S) Vh`) by default, as PEFT 0.21's
`peft.tuners.lora.intruders.reduce_intruder_dimension` does; `side="right"` compares the rows of `Vh`.
Defaults `top_k = 10`, `eps = 0.5` are PEFT's.

Mitigation (paper §6, PEFT's `mitigation_lambda`): scale each intruder direction of `W` by `lam`,

    W' = W + (lam - 1) * sum_{j intruder} s_j y_j z_j^T        (z_j the matching right-singular vector)

so `lam = 1` leaves `W` unchanged and `lam = 0` removes the intruder components exactly; every other
singular pair of `W` is kept. For a LoRA layer, `W = W0 + delta_weight`, and the new update
`W' - W0` is written exactly as an adapter of rank `r + (number of intruders)`
(`mitigate_factors`, `mitigate_adapter`); PEFT instead truncates it back to rank r, which drops the part
of the intruder components outside the adapter's own span.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from ..io import CONFIG_NAME, PREFIX, read_adapter, write_adapter_files
from .errors import AnalysisError
from .linalg import as_float64
from .weights import WeightSource, load_factors

TOP_K = 10  # PEFT's default
EPS = 0.5  # PEFT's default
SIDES = ("left", "right")


def _check(top_k: int, eps: float, side: str, lam: float | None = None) -> None:
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise AnalysisError(f"intruder top_k must be an integer >= 1, got {top_k!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps <= 1:
        raise AnalysisError(f"intruder eps must be a number in (0, 1], got {eps!r}")
    if side not in SIDES:
        raise AnalysisError(f"intruder side must be one of {SIDES}, got {side!r}")
    if lam is not None and (isinstance(lam, bool) or not isinstance(lam, (int, float)) or lam != lam):
        raise AnalysisError(f"mitigation lambda must be a number, got {lam!r}")


def _pair(W0: Any, W: Any) -> tuple[torch.Tensor, torch.Tensor]:
    W0_64, W64 = as_float64(W0, "W0 (pre-trained weight)"), as_float64(W, "W (fine-tuned weight)")
    if W0_64.shape != W64.shape:
        raise AnalysisError(f"W0 {tuple(W0_64.shape)} and W {tuple(W64.shape)} differ in shape: they must be the "
                            "same (out, in) matrix before and after fine-tuning")
    return W0_64, W64


def pretrained_basis(W0: Any, side: str = "left") -> torch.Tensor:
    """W0's singular vectors on `side` as orthonormal columns, float64: `U0` `(out, min(out, in))` for
    `"left"`, `Vh0.T` `(in, min(out, in))` for `"right"`. Pass it as `basis=` to `intruder_correction` to
    reuse one SVD of the pre-trained weight across several fine-tuned weights. Raises AnalysisError as
    `intruder_dimensions`."""
    _check(TOP_K, EPS, side)
    U0, _, Vh0 = torch.linalg.svd(as_float64(W0, "W0 (pre-trained weight)"), full_matrices=False)
    return U0 if side == "left" else Vh0.T


def _find(W0: torch.Tensor, W: torch.Tensor, top_k: int, eps: float, side: str, basis: torch.Tensor | None = None):
    """`(intruder indices, best |cos| of the top-k, U, S, Vh of W)`, all float64."""
    theirs = pretrained_basis(W0, side) if basis is None else basis
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    k = min(top_k, S.shape[0])
    mine = U[:, :k] if side == "left" else Vh[:k].T
    if theirs.shape[0] != mine.shape[0]:
        raise AnalysisError(f"basis has {theirs.shape[0]} rows, W's {side} singular vectors {mine.shape[0]}: "
                            "it is not W0's (pretrained_basis(W0, side))")
    best = (mine.T @ theirs).abs().max(dim=1).values  # (k,): unit vectors, so the product is the cosine
    return [int(i) for i in torch.nonzero(best < eps).flatten()], best, U, S, Vh


def intruder_dimensions(W0: Any, W: Any, top_k: int = TOP_K, eps: float = EPS, side: str = "left",
                        basis: torch.Tensor | None = None) -> dict[str, Any]:
    """The intruder dimensions of `W` against `W0` (paper §4; module docstring).

    Args:
        W0: the pre-trained weight, `(out, in)`; W: the fine-tuned weight, same shape (for a LoRA
            layer `W0 + delta_weight`). Torch tensors or numpy arrays of any float dtype; float64 inside.
        top_k: how many of W's largest singular vectors are examined (clipped to `min(out, in)`).
        eps: the cosine threshold. side: `"left"` (output side, PEFT's choice) or `"right"`.
        basis: `pretrained_basis(W0, side)`, to compute W0's SVD once for several fine-tuned weights.

    Returns:
        `{"count", "indices"` (0-based ranks among W's singular values, ascending), `"max_cosine"`
        (the top-k's best |cos| with W0's singular vectors, k floats), `"singular_values"` (W's top k),
        `"intruder_singular_values"`, `"top_k"` (the k used), `"eps"`, `"side"`, `"shape"}`.

    Raises:
        AnalysisError: shapes differ, a non-matrix or non-finite input, bad `top_k` / `eps` / `side`.
    """
    _check(top_k, eps, side)
    W0_64, W64 = _pair(W0, W)
    idx, best, _, S, _ = _find(W0_64, W64, top_k, eps, side, basis)
    k = best.shape[0]
    return {"count": len(idx), "indices": idx, "max_cosine": best.tolist(), "singular_values": S[:k].tolist(),
            "intruder_singular_values": [float(S[i]) for i in idx], "top_k": k, "eps": float(eps), "side": side,
            "shape": list(W64.shape)}


def intruder_correction(W0: Any, W: Any, lam: float = 0.75, top_k: int = TOP_K, eps: float = EPS,
                        side: str = "left", basis: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """The mitigation as a low-rank term: `(C_B (out, m), C_A (m, in), indices)` in float64 with
    `W' = W + C_B @ C_A`, `C_B = (lam - 1) U_I diag(S_I)`, `C_A = Vh_I` (paper §6; m = number of intruders,
    `I` their indices, so `len(indices)` is the intruder count). Arguments and errors as
    `intruder_dimensions`; `lam` any real number; `basis`: `pretrained_basis(W0, side)`, computed once
    when one W0 is compared with several W."""
    _check(top_k, eps, side, lam)
    W0_64, W64 = _pair(W0, W)
    idx, _, U, S, Vh = _find(W0_64, W64, top_k, eps, side, basis)
    return (lam - 1.0) * U[:, idx] * S[idx], Vh[idx].clone(), idx


def mitigate_intruders(W0: Any, W: Any, lam: float = 0.75, top_k: int = TOP_K, eps: float = EPS,
                       side: str = "left") -> torch.Tensor:
    """`W' = W + (lam - 1) sum_{j intruder} s_j u_j v_j^T`, `(out, in)` float64 (paper §6).

    `lam = 1`: `W` itself; `lam = 0`: the intruder components removed. Intruders are found on `W`
    as in `intruder_dimensions` (same arguments and errors)."""
    C_B, C_A, _ = intruder_correction(W0, W, lam, top_k, eps, side)
    return as_float64(W, "W (fine-tuned weight)") + C_B @ C_A


def mitigate_factors(W0: Any, B: Any, A: Any, scaling: float, lam: float = 0.75, top_k: int = TOP_K,
                     eps: float = EPS, side: str = "left") -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """A LoRA layer's mitigated update as new factors, exactly.

    With `W = W0 + scaling * B @ A` (`B: (out, r)`, `A: (r, in)`, paper notation `delta_weight`), returns
    `(B' (out, r + m), A' (r + m, in), indices)` float64 with `scaling * B' @ A' == mitigate_intruders(W0, W) - W0`:
    `A' = [A; Vh_I]`, `B' = [B, C_B / scaling]`. With no intruder, `B' = B`, `A' = A`.

    Raises:
        AnalysisError: as `intruder_dimensions`; `B @ A` not `(out, in)` of `W0`; `scaling == 0`.
    """
    B64, A64 = as_float64(B, "lora_B"), as_float64(A, "lora_A")
    W0_64 = as_float64(W0, "W0 (pre-trained weight)")
    if B64.shape[1] != A64.shape[0] or (B64.shape[0], A64.shape[1]) != tuple(W0_64.shape):
        raise AnalysisError(f"lora_B {tuple(B64.shape)} @ lora_A {tuple(A64.shape)} is not the shape of W0 "
                            f"{tuple(W0_64.shape)}")
    if not scaling:
        raise AnalysisError("scaling must be non-zero")
    C_B, C_A, idx = intruder_correction(W0_64, W0_64 + scaling * (B64 @ A64), lam, top_k, eps, side)
    return torch.cat([B64, C_B / scaling], dim=1), torch.cat([A64, C_A], dim=0), idx


def mitigate_adapter(adapter: str | Path, base: Any, out: str | Path, lam: float = 0.75, top_k: int = TOP_K,
                     eps: float = EPS, side: str = "left", modules: str | None = None) -> dict[str, Any]:
    """Write a copy of a PEFT-layout adapter whose every (linear, GPT-2 Conv1D, embedding) module has its
    intruder directions scaled by `lam` (paper §6), exactly (`mitigate_factors`).

    A module with m intruders gets rank `r + m` (`rank_pattern`, and `alpha_pattern` keeping its scaling);
    other tensors (`modules_to_save`, biases) are copied. Tensors keep the adapter's dtype.

    Args:
        adapter: the adapter folder. base: W0 (as `analyze_adapter`'s `base`). out: the new folder.
        modules: regex restricting the mitigated modules (the others are copied unchanged).

    Returns:
        `{"out", "lambda", "top_k", "eps", "side", "modules": {path: {"r", "new_r", "indices"}}, "total"}`.

    Raises:
        AnalysisError: a convolution or DoRA adapter (not supported), bad arguments, `out` == `adapter`;
        BaseModelError: W0 missing or of the wrong shape; AdapterLoadError: an unreadable adapter.
    """
    _check(top_k, eps, side, lam)
    factors = load_factors(adapter)
    chosen = set(load_factors(adapter, modules).modules) if modules is not None else set(factors.modules)
    cfg = factors.config
    if cfg.use_dora:
        raise AnalysisError(f"{adapter}: DoRA adapter; intruder mitigation is defined here for plain LoRA only")
    if Path(out).resolve() == factors.path.resolve():
        raise AnalysisError(f"mitigate_adapter: the output folder {out} is the adapter itself; choose another")
    files = read_adapter(adapter)
    config = json.loads((files.folder / CONFIG_NAME).read_text(encoding="utf-8"))
    # every module gets an exact pattern entry (the first matching key wins, so broader old keys are dropped)
    ranks = {p: m.r for p, m in factors.modules.items()}
    alphas = {p: cfg.alpha_for(p) for p in factors.modules}
    tensors = dict(files.tensors)
    src = WeightSource(base, "--base")
    report: dict[str, Any] = {}
    for path in sorted(chosen, key=list(factors.modules).index):
        mod = factors.modules[path]
        if mod.kind == "conv":
            raise AnalysisError(f"module {path!r} is a convolution: intruder mitigation is not supported there")
        B2, A2, idx = mitigate_factors(src.weight_for(mod), mod.B, mod.A, mod.scaling, lam, top_k, eps, side)
        report[path] = {"r": mod.r, "new_r": int(A2.shape[0]), "indices": idx}
        if not idx:
            continue
        emb = mod.kind == "embedding"
        for suffix, t in (("lora_embedding_A" if emb else "lora_A.weight", A2),
                          ("lora_embedding_B" if emb else "lora_B.weight", B2)):
            key = _file_key(files.tensors, path, suffix)
            tensors[key] = t.to(files.tensors[key].dtype).contiguous()
        ranks[path] = int(A2.shape[0])
        alphas[path] = mod.scaling * (ranks[path] ** 0.5 if cfg.use_rslora else ranks[path])
    config.update(rank_pattern={re.escape(p): r for p, r in ranks.items()},
                  alpha_pattern={re.escape(p): a for p, a in alphas.items()})
    write_adapter_files(out, tensors, json.dumps(config, indent=2, sort_keys=True) + "\n")
    return {"out": str(out), "lambda": float(lam), "top_k": top_k, "eps": float(eps), "side": side,
            "modules": report, "total": sum(len(m["indices"]) for m in report.values())}


def _file_key(tensors: dict, path: str, suffix: str) -> str:
    key = f"{PREFIX}{path}.{suffix}"
    return key if key in tensors else f"{path}.{suffix}"
