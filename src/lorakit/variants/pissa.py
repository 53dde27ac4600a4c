"""Weight-derived initialisations: PiSSA and OLoRA, and conversion of their adapters to plain LoRA.

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
  `convert_pissa_to_lora`.
- A weight-derived init needs a module that carries no adapter yet (it would change
  the base under the other adapters), a weight not tied to another module, no
  `fused_slices`, an ungrouped convolution, and `r <= min(out, in)`; otherwise
  `inject` raises `UnsupportedModuleError` before changing anything.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import LoraError
from ..layers.base import LoraLayer, compute_dtype

RECORD_ATTR = "_weight_init"
_NITER = re.compile(r"pissa_niter_(\d+)")


def is_weight_init(init: str) -> bool:
    """True for inits that derive A and B from the base weight (`pissa`, `pissa_niter_<k>`, `olora`)."""
    return init in ("pissa", "olora") or _NITER.fullmatch(init) is not None


@dataclass
class InitRecord:
    """What a weight-derived init changed on one layer."""

    original: torch.Tensor  # W0 before any residual rewrite, base layout and dtype, CPU
    factors: dict[str, tuple[str, torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # adapter -> (init, A0, B0)


def target_problem(model: nn.Module, config, path: str, module: nn.Module) -> str | None:
    """Why `config.init` cannot initialise the module at `path` from its weight (None if it can)."""
    if not is_weight_init(config.init):
        return None
    from ..layers import LoraConv, LoraEmbedding, LoraLinear, wrapper_for

    existing = module if isinstance(module, LoraLayer) else None
    base = existing.base_layer if existing is not None else module
    what = f"init={config.init!r} replaces the base weight by a residual"
    if existing is not None and existing.adapter_names:
        return f"{what}, but the module already carries adapters {list(existing.adapter_names)}; use it on modules without adapters"
    cls = wrapper_for(base)
    if cls not in (LoraLinear, LoraEmbedding, LoraConv):
        return f"{what}; supported: Linear, GPT-2 Conv1D, Embedding, ungrouped Conv"
    if cls is LoraConv and base.groups != 1:
        return f"{what}; grouped convolutions (groups={base.groups}) are not supported"
    if config.slices_for(path) is not None:
        return f"{what}; not supported together with fused_slices"
    w = base.weight
    if not w.is_floating_point():
        return f"{what}; the weight has dtype {w.dtype}, a floating-point weight is needed"
    out_f = w.shape[0] if cls is LoraConv else cls(base).out_features
    in_f = w.numel() // out_f
    r = config.rank_for(path)
    if r > min(out_f, in_f):
        return f"{what}; rank {r} exceeds min(out, in) = {min(out_f, in_f)} of the weight"
    shared = [n for n, p in model.named_parameters(remove_duplicate=False) if p is w]
    if len(shared) > 1:
        return f"{what}; its weight is tied to {shared} and would change there too (untie it first)"
    return None


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


def init_from_weight(layer: LoraLayer, adapter: str, init: str) -> None:
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
        a, b = A.detach().reshape(r, -1).to(dtype), B.detach().reshape(B.shape[0], -1).to(dtype)
        residual = layer.from_oi(w0 - scaling * (b @ a))
        record = layer.__dict__.get(RECORD_ATTR)
        if record is None:
            record = InitRecord(w.detach().to("cpu", copy=True))
            layer.__dict__[RECORD_ATTR] = record
        record.factors[adapter] = (init, A.detach().to("cpu", copy=True), B.detach().to("cpu", copy=True))
        w.copy_(residual)


def restore_original_weight(layer: LoraLayer) -> None:
    """Write the original weight saved by a weight-derived init back (bit for bit) and forget it."""
    record = layer.__dict__.pop(RECORD_ATTR, None)
    if record is None:
        return
    layer.unmerge()
    w = layer.weight
    with torch.no_grad():
        w.copy_(record.original.to(device=w.device, dtype=w.dtype))


# ---------------------------------------------------------------------- conversion
def pissa_to_lora(model: nn.Module, adapter: str = "default"):
    """The PiSSA/OLoRA adapter `adapter` as an ordinary LoRA adapter for the ORIGINAL base weights.

    After training, the model computes `W_res + s B A = W0 + s (B A - B0 A0)`, so the
    update relative to the original `W0` is a rank-`2r` LoRA with the same scaling
    (PEFT's `path_initial_model_for_weight_conversion`):

        A' = [A; A0]: (2r, in),   B' = [B, -B0]: (out, 2r),   scaling' = scaling

    (`r' = 2r`; `alpha' = 2 alpha`, or `sqrt(2) alpha` with rsLoRA; rank/alpha patterns
    likewise). A DoRA magnitude vector carries over unchanged, since
    `W_res + s B A = W0 + s B' A'` is also the vector it normalises.

    Returns:
        `(config, tensors)`: a `LoraConfig` with `init="kaiming"` and the tensors under
        their PEFT file keys (CPU), as `lorakit.adapter_state_dict` gives them.
    Raises:
        AdapterNotFoundError: no such adapter.
        LoraError: the adapter was not initialised by PiSSA/OLoRA, or a layer lacks its
            initial factors (e.g. the model was deep-copied without them).
    """
    from ..io import PREFIX, adapter_state_dict
    from ..state import lora_layers, require_adapter

    config = require_adapter(model, adapter)
    if not is_weight_init(config.init):
        raise LoraError(f"adapter {adapter!r} has init={config.init!r}; only PiSSA/OLoRA adapters need converting")
    tensors = adapter_state_dict(model, adapter)
    for path, layer in lora_layers(model):
        if adapter not in layer.lora_A:
            continue
        record = layer.__dict__.get(RECORD_ATTR)
        factors = record.factors.get(adapter) if record is not None else None
        if factors is None:
            raise LoraError(f"module {path!r} has no initial {config.init} factors for adapter {adapter!r}; cannot convert")
        _, A0, B0 = factors
        key_a, key_b = (f"{PREFIX}{path}.{k}" for k in layer.file_keys)
        A, B = tensors[key_a], tensors[key_b]
        tensors[key_a] = torch.cat([A, A0.to(A.dtype)], dim=0).contiguous()
        tensors[key_b] = torch.cat([B, -B0.to(B.dtype)], dim=1).contiguous()
    factor = math.sqrt(2.0) if config.use_rslora else 2.0
    converted = config.replace(
        init="kaiming",
        r=2 * config.r,
        alpha=factor * config.alpha,
        rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
        alpha_pattern={k: factor * v for k, v in config.alpha_pattern.items()},
    )
    return converted, tensors


def convert_pissa_to_lora(model: nn.Module, path: str | Path, adapter: str = "default") -> Path:
    """Save the trained PiSSA/OLoRA adapter `adapter` as a plain rank-`2r` LoRA adapter for the original base.

    The folder (PEFT layout, see `lorakit.save_adapter`) loads with `lorakit.load_adapter`
    or PEFT onto the unmodified base model and reproduces the trained model
    (`W0 + scaling * (B A - B0 A0) = W_res + scaling * B A`); see `pissa_to_lora`.

    Returns:
        The folder path.
    Raises:
        LoraError: as `pissa_to_lora`, or `path` exists and is not a folder.
    """
    from ..io import _config_for_file, check_folder, write_adapter_files

    check_folder(path)
    converted, tensors = pissa_to_lora(model, adapter)
    file_config, fan_in_fan_out, _ = _config_for_file(model, adapter)
    converted = converted.replace(
        target_modules=file_config.target_modules, base_model_name_or_path=file_config.base_model_name_or_path
    )
    return write_adapter_files(path, tensors, converted.to_json(fan_in_fan_out))


__all__ = ["is_weight_init", "init_from_weight", "restore_original_weight", "pissa_to_lora", "convert_pissa_to_lora"]
