"""Weight-derived initialisations: PiSSA and OLoRA (called by `lorakit.inject`; their conversion to
plain LoRA for the original base is `lorakit.io.pissa_to_lora`).

Both start the adapter from a rank-`r` part of the base weight `W0: (out, in)` and
replace the base by the residual, so the model is unchanged at step 0:

- PiSSA (Meng et al. 2024, arXiv:2404.02948, §3 eq. 2-4): with the SVD
  `W0 = U S V^T`, `A = sqrt(S_r) V_r^T / sqrt(scaling)`, `B = U_r sqrt(S_r) / sqrt(scaling)`
  (the division, as in PEFT, makes `scaling * B A = U_r S_r V_r^T`, the principal
  part), and `W_res = W0 - scaling * B A`. `init="pissa_niter_<k>"` uses the fast
  randomised SVD of §3 (Halko et al.; `torch.svd_lowrank` with `k` subspace
  iterations) instead of the full SVD.
- OLoRA (Büyükakyüz 2024, arXiv:2406.01775, Algorithm 1): with the reduced QR
  `W0 = Q R`, `B = Q[:, :r]`, `A = R[:r]` and `W_res = W0 - scaling * B A`
  (as PEFT; the paper's scaled variant with `scaling = 1`).

The factorisation and the residual are computed in float32 (float64 for a float64
base) from the values actually stored in A and B, and the residual is rounded once
into the base dtype.

Base-weight bookkeeping (lorakit's choice):

- The first weight-derived init on a layer keeps an exact copy of the original
  `W0` in host (CPU) memory, costing one copy of each adapted weight. `unload`
  (and deleting the layer's last adapter) writes it back bit for bit, so
  `unload` returns the *original* base model, not the residual. Recomputing
  `W0 = W_res + scaling B0 A0` instead would not round-trip exactly in low precision.
- Merge/unmerge work on the residual: `unmerge` restores the weight saved at merge
  time (the residual), `merge_and_unload` returns `W_res + scaling * B A`, the
  fine-tuned model. Inside `lorakit.disabled(...)` the layer computes with the
  residual (as PEFT's `disable_adapter`), not with the original weight.
- The initial factors `A0, B0` are kept (CPU, adapter dtype) for
  `lorakit.convert_pissa_to_lora`.
- A weight-derived init needs a module that carries no adapter yet (it would change
  the base under the other adapters), a weight not tied to another module, no
  `fused_slices`, an ungrouped convolution, and `r <= min(out, in)`; otherwise
  `inject` raises `UnsupportedModuleError` before changing anything.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from ..ops.lora import compute_dtype, delta_weight
from .base import AdaptedLayer

RECORD_ATTR = "_weight_init"
_NITER = re.compile(r"pissa_niter_(\d+)")


def is_weight_init(init: str) -> bool:
    """True for inits that derive A and B from the base weight (`pissa`, `pissa_niter_<k>`, `olora`)."""
    return init in ("pissa", "olora") or _NITER.fullmatch(init) is not None


@dataclass
class InitRecord:
    """What a weight-derived init changed on one layer."""

    original: torch.Tensor  # W0 before any residual rewrite, base layout and dtype, CPU
    factors: dict[str,
                  tuple[str, torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # adapter -> (init, A0, B0)


def init_record(layer: AdaptedLayer) -> InitRecord | None:
    """What weight-derived inits changed on `layer` (None if none ran)."""
    return layer.__dict__.get(RECORD_ATTR)


def _factors(w: torch.Tensor, r: int, scaling: float, init: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`(A: (r, in), B: (out, r))` for `w: (out, in)` in its dtype (see module docstring)."""
    if init == "olora":
        Q, R = torch.linalg.qr(w)  # reduced: Q (out, k), R (k, in)
        return R[:r], Q[:, :r]
    match = _NITER.fullmatch(init)
    if match:
        U, S, V = torch.svd_lowrank(w, q=r, niter=int(match.group(1)))
        Vh = V.T
    else:
        U, S, Vh = torch.linalg.svd(w, full_matrices=False)
        U, S, Vh = U[:, :r], S[:r], Vh[:r]
    root = torch.sqrt(S / scaling)
    return root[:, None] * Vh, U * root[None, :]


def init_from_weight(layer: AdaptedLayer, adapter: str, init: str) -> None:
    """Initialise adapter `adapter` of `layer` by `init` (PiSSA/OLoRA) and rewrite the base weight to the residual.

    Shapes: `W0 = layer.to_oi(weight): (out, in)`; `A` and `B` are written in their
    stored shapes (`A.reshape(r, -1)`, `B.reshape(out, -1)` are the matrices above).
    """
    A, B = layer.lora_A[adapter], layer.lora_B[adapter]
    w = layer.weight
    if A.device.type == "meta" or w.device.type == "meta":
        return
    r, scaling = layer.r[adapter], layer.scaling[adapter]
    dtype = compute_dtype(w.dtype)
    with torch.no_grad():
        w0 = layer.to_oi(w.detach().to(dtype))
        a, b = _factors(w0, r, scaling, init)
        A.copy_(a.reshape(A.shape))
        B.copy_(b.reshape(B.shape))
        residual = layer.from_oi(w0 - delta_weight(A.detach().reshape(r, -1), B.detach().reshape(B.shape[0], -1),
                                                   scaling, dtype))
        record = layer.__dict__.get(RECORD_ATTR)
        if record is None:
            record = InitRecord(w.detach().to("cpu", copy=True))
            layer.__dict__[RECORD_ATTR] = record
        record.factors[adapter] = (init, A.detach().to("cpu", copy=True), B.detach().to("cpu", copy=True))
        w.copy_(residual)


def restore_original_weight(layer: AdaptedLayer) -> None:
    """Write the original weight saved by a weight-derived init back (bit for bit) and forget it."""
    record = layer.__dict__.pop(RECORD_ATTR, None)
    if record is None:
        return
    layer.unmerge()
    w = layer.weight
    with torch.no_grad():
        w.copy_(record.original.to(device=w.device, dtype=w.dtype))


__all__ = ["is_weight_init", "init_from_weight", "init_record", "restore_original_weight", "InitRecord"]
