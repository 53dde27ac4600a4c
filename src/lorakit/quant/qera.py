"""A calibrated low-rank correction of the NF4 error, frozen beside the 4-bit base (QERA, Zhang et al.,
ICLR 2025, arXiv:2410.06040, §3 "exact" solution; the same closed form as CLoQ, Deng et al. 2025,
arXiv:2501.18475). QLoRA (arXiv:2305.14314) trains on top of the result.

For each quantized layer, with the quantization error `E = W - dequant(Q)` `(out, in)` and
the autocorrelation of the layer's inputs on calibration data `H = E[x x^T]` `(in, in)`,
the rank-`k` matrix `C` that minimises the expected output error
`E ||(E - C) x||^2 = tr((E - C) H (E - C)^T)` is

    C = [E H^(1/2)]_k H^(-1/2)          ([M]_k: the rank-k truncated SVD of M)

(QERA Theorem 1). `H` is damped, `H + damping * mean(diag H) * I`, so that directions the
calibration data never visit get a finite `H^(-1/2)`.

lorakit keeps `C = B0 A0` as a frozen adapter (default name `"qera"`, bf16, scaling 1) on
*every* quantized layer, whichever layers the trainable adapter targets, and pins it:
`set_active`/`inject` keep it active, so the base the trainable adapter sees is
`dequant(Q) + C`, close to `W` on inputs like the calibration data. `fold_corrections`
combines it with the trained adapter (concatenated ranks: exact) into one adapter that
loads on any plain bitsandbytes NF4 base, in lorakit or PEFT.

Why frozen, measured on the default recipe (SmolLM2-135M, docs/qlora.md,
`python -m benchmarks.nf4_error`): the correction cuts the KL divergence of the 4-bit model
to the original from 0.404 to 0.130 (rank 8 on all 210 linear layers); LoftQ's SVD of `E`
itself (Li et al. 2023, arXiv:2310.08659, one step) leaves it at 0.393. With LoRA on all
linear layers, starting the *trainable* adapter at `C` (as LoftQ/CLoQ do) gave 75.6% after 40
steps, below plain QLoRA's 78.8%; the frozen correction gave 83.6%, the 16/32-bit run's accuracy.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Mapping

import torch
from torch import nn

from ..combine import combine
from ..config import LoraConfig
from ..errors import LoraError, QuantError
from ..inject import delete_adapter, inject, set_active
from ..layers import LoraLayer
from ..ops.nf4 import dequantize_weight, is_quantized_linear, quantize_weight, quantized_layers
from ..state import get_state, has_adapters, lora_layers, save_wrappers
from .quantize import quantize, select_linear_layers

DAMPING = 0.01


@dataclass
class Correction:
    """One layer's rank-r correction `C = B0 @ A0` and what it does on the calibration data.

    `B0: (out, r)`, `A0: (r, in)` float64. `error_before = tr(E H E^T)` and
    `error_after = tr((E - C) H (E - C)^T)`: mean squared output error per token of
    `dequant(Q)` and of `dequant(Q) + C` against the original layer (undamped `H`).
    `base_sum`: float64 sum of `dequant(Q)`, checked against the 4-bit layer the
    correction is applied to.
    """

    B0: torch.Tensor
    A0: torch.Tensor
    error_before: float
    error_after: float
    base_sum: float

    @property
    def rank(self) -> int:
        return self.A0.shape[0]


@dataclass
class QeraReport:
    """Per-layer output errors before/after the correction (see `Correction`), summed over layers."""

    layers: dict[str, tuple[float, float]] = field(default_factory=dict)  # path -> (before, after)
    tokens: int = 0

    @property
    def error_before(self) -> float:
        return sum(b for b, _ in self.layers.values())

    @property
    def error_after(self) -> float:
        return sum(a for _, a in self.layers.values())

    @property
    def remaining(self) -> float:
        """Mean over layers of `error_after / error_before` (1: nothing corrected, 0: exact)."""
        fr = [a / b for b, a in self.layers.values() if b > 0]
        return sum(fr) / len(fr) if fr else 1.0

    def as_dict(self) -> dict:
        return {"method": "qera", "layers": len(self.layers), "calibration_tokens": self.tokens,
                "output_error_before": self.error_before, "output_error_after": self.error_after,
                "output_error_remaining_mean": self.remaining}


def input_covariances(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], paths: Iterable[str], *,
                      max_bytes: int = 2**30) -> tuple[dict[str, torch.Tensor], int]:
    """`H = E[x x^T]` of the inputs of the linear layers at `paths`, float64 `(in, in)` each.

    Each batch's `x^T x` is computed in float32 (float64 for a float64 model), once for
    layers that see the same input tensor (q/k/v, gate/up), and summed in float64.
    Each batch is passed as keyword arguments to `model` (a `labels` entry is dropped);
    positions where the batch's `attention_mask` is 0 (padding) are left out. Layers are
    hooked in groups whose matrices take at most `max_bytes`, one pass over `batches` per
    group (`covariance_groups` gives them group by group). Runs under `torch.no_grad()`.

    Returns:
        `({path: H}, tokens)`, tokens counted per pass.
    Raises:
        QuantError: a path that is not an `nn.Linear`, batches that are not dicts of model
            inputs, or no tokens.
    """
    out: dict[str, torch.Tensor] = {}
    tokens = 0
    for group, group_tokens in covariance_groups(model, batches, paths, max_bytes=max_bytes):
        out.update(group)
        tokens = group_tokens  # every group counts the same calibration tokens
    return out, tokens


def covariance_groups(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], paths: Iterable[str], *,
                      max_bytes: int = 2**30) -> Iterator[tuple[dict[str, torch.Tensor], int]]:
    """`input_covariances` one group at a time: yields `({path: H}, tokens)` for each group of
    layers whose matrices fit in `max_bytes`, so that a caller that is done with a group
    holds at most one group's matrices. Everything is checked before the first pass."""
    modules = dict(model.named_modules())
    paths = list(paths)
    for p in paths:
        if not isinstance(modules.get(p), nn.Linear):
            raise QuantError(f"calibration needs nn.Linear layers; {p!r} is {type(modules.get(p)).__name__}")
    groups, size = [[]], 0
    for p in paths:
        b = modules[p].in_features ** 2 * 8
        if groups[-1] and size + b > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(p)
        size += b
    batches = list(batches)
    if not all(isinstance(b, Mapping) and "input_ids" in b for b in batches):
        raise QuantError("calibration batches must be a list of dicts of model inputs (input_ids, attention_mask, "
                         "...), "
                         "e.g. [{'input_ids': ids, 'attention_mask': mask}, ...]")
    for group in groups:
        yield _covariances(model, modules, batches, group)


def _covariances(model: nn.Module, modules: dict[str, nn.Module], batches: list,
                 group: list[str]) -> tuple[dict[str, torch.Tensor], int]:
    """One calibration pass with the layers of `group` hooked (see `input_covariances`)."""
    mask: dict[str, torch.Tensor | None] = {"m": None}
    sums = {p: torch.zeros(modules[p].in_features, modules[p].in_features, dtype=torch.float64,
                           device=modules[p].weight.device) for p in group}
    last: dict[str, object] = {"x": None, "xtx": None}  # q/k/v (gate/up) see one tensor: one product

    def hook(path):
        def fn(_mod, inputs, _out):
            x = inputs[0]
            if x is not last["x"]:
                m = mask["m"]
                flat = x[m] if m is not None and x.shape[:-1] == m.shape else x.reshape(-1, x.shape[-1])
                flat = flat.float() if flat.dtype != torch.float64 else flat
                last["x"], last["xtx"] = x, flat.T @ flat
            sums[path] += last["xtx"]
        return fn

    handles = [modules[p].register_forward_hook(hook(p)) for p in group]
    tokens = 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                kwargs = {k: v for k, v in batch.items() if k != "labels"}
                am = kwargs.get("attention_mask")
                mask["m"] = am.bool() if am is not None else None
                tokens += int(am.sum()) if am is not None else int(kwargs["input_ids"].numel())
                model(**kwargs)
    finally:
        for h in handles:
            h.remove()
        last.clear()
        model.train(was_training)
    if tokens == 0:
        raise QuantError("calibration batches hold no tokens")
    return {p: s.div_(tokens) for p, s in sums.items()}, tokens


def error_correction(error: torch.Tensor, covariance: torch.Tensor, r: int, *,
                     damping: float = DAMPING) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The rank-`r` minimiser of `tr((E - C) H (E - C)^T)` (QERA Theorem 1), as factors.

    Args:
        error: `E = W - dequant(Q)`, `(out, in)`.
        covariance: `H = E[x x^T]`, `(in, in)`, symmetric positive semi-definite.
        r: rank, `1 <= r <= min(out, in)`.
        damping: `H + damping * mean(diag H) * I` is used for the square roots (> 0).
    Returns:
        `(B0 (out, r), A0 (r, in), error_after)`, float64, `C = B0 @ A0`; `error_after`
        is `tr((E - C) H (E - C)^T)` with the undamped `H`.
    """
    if not 1 <= r <= min(error.shape):
        raise QuantError(f"correction rank must be in [1, {min(error.shape)}], got {r}")
    if not 0 < damping < float("inf"):  # NaN too
        raise QuantError(f"damping must be a finite number > 0, got {damping}")
    E = error.double()
    H = covariance.double()
    scale = float(H.diagonal().mean())
    if not scale > 0:
        raise QuantError("the input covariance is zero: the calibration data never reached this layer")
    evals, V = torch.linalg.eigh(H + damping * scale * torch.eye(H.shape[0], dtype=H.dtype, device=H.device))
    root = evals.clamp_min(damping * scale * 1e-3).sqrt()  # eigh may return tiny negatives
    U, S, Vh = torch.linalg.svd((E @ V) * root @ V.T, full_matrices=False)
    sq = S[:r].sqrt()
    B0 = U[:, :r] * sq
    A0 = (sq[:, None] * Vh[:r]) @ V / root @ V.T
    R = E - B0 @ A0
    return B0, A0, float((R @ H * R).sum())


CORRECTION_ADAPTER = "qera"


def error_corrections(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], *, rank: int = 8,
                      modules: Iterable[str] | str = "all-linear", exclude_modules: Iterable[str] | str | None = None,
                      include_head: bool = False, double_quant: bool = True, blocksize: int = 64,
                      damping: float = DAMPING, max_bytes: int = 2**30) -> tuple[dict[str, Correction], QeraReport]:
    """Rank-`rank` corrections of the layers `quantize(model, modules=..., ...)` would quantize.

    Call it on the full-precision model, before `quantize` with the same layer selection,
    `double_quant` and `blocksize`. Each weight is quantized here as `quantize` will do it
    (the same bitsandbytes call, deterministic), `E = W - dequant(Q)`, `C` from
    `error_correction`. `batches`: see `input_covariances` (a few thousand tokens of
    training data are enough). The model is not changed. Peak extra memory: one group of
    input covariances (`max_bytes`, see `covariance_groups`) and the rank-k factors.

    Raises:
        QuantError: no calibration tokens, a bad rank or damping; as `quantize` for the selection.
    """

    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise QuantError(f"correction rank must be an integer >= 1, got {rank!r}")
    if has_adapters(model):
        raise QuantError("this model already has lorakit adapters: compute the corrections (qera_quantize) before "
                         "lorakit.inject")
    if quantized_layers(model):
        raise QuantError("this model already has 4-bit layers: the corrections need the full-precision weights "
                         "(call qera_quantize instead of lorakit.quantize, on the unquantized model)")
    chosen = select_linear_layers(model, modules, exclude_modules, include_head)
    small = [(p, min(m.weight.shape)) for p, m in chosen if min(m.weight.shape) < rank]
    if small:
        raise QuantError(f"correction rank {rank} is above the smallest dimension of layer {small[0][0]!r} "
                         f"({small[0][1]})")
    modules = dict(chosen)
    corrections: dict[str, Correction] = {}
    report = QeraReport()
    for covariances, report.tokens in covariance_groups(model, batches, list(modules), max_bytes=max_bytes):
        for path, H in covariances.items():  # this group's matrices are freed before the next pass
            W = modules[path].weight.detach()
            dq = dequantize_weight(quantize_weight(W, double_quant=double_quant, blocksize=blocksize))
            E = W.double() - dq.double()
            B0, A0, after = error_correction(E, H, rank, damping=damping)
            before = float((E @ H * E).sum())
            corrections[path] = Correction(B0, A0, before, after, float(dq.double().sum()))
            report.layers[path] = (before, after)
    return corrections, report


def add_corrections(model: nn.Module, corrections: Mapping[str, Correction], *, adapter: str = CORRECTION_ADAPTER,
                    dtype: torch.dtype = torch.bfloat16) -> int:
    """Attach the corrections to a quantized model as the frozen, pinned adapter `adapter`.

    Each corrected layer gets `A = A0`, `B = B0` (rank `k`, alpha `k`: scaling 1) in `dtype`,
    with `requires_grad=False`. The adapter stays active whatever `set_active` or `inject`
    asks for, until `delete_adapter` or `fold_corrections` removes it. Call it before
    injecting the trainable adapter. Returns the number of layers. Everything is checked
    before the model changes.

    Raises:
        QuantError: a path that is not a 4-bit layer, or whose 4-bit weight is not the one
            the correction was computed for (another blocksize / double_quant).
    """

    modules = dict(model.named_modules())
    for path, c in corrections.items():
        m = modules.get(path)
        base = m.base_layer if isinstance(m, LoraLayer) else m
        if m is None or not is_quantized_linear(base):
            raise QuantError(f"{path!r} is not a 4-bit layer (quantize the model, then add the corrections)")
        if float(dequantize_weight(base).double().sum()) != c.base_sum:
            raise QuantError(f"{path!r}: its 4-bit weight is not the one the correction was computed for "
                             "(quantize with the same blocksize and double_quant)")
    if not corrections:
        raise QuantError("no corrections to add")
    previous = get_state(model).active if has_adapters(model) else ()
    k = max(c.rank for c in corrections.values())
    other = {re.escape(p): c.rank for p, c in corrections.items() if c.rank != k}
    config = LoraConfig(r=k, alpha=float(k), target_modules=list(corrections), rank_pattern=other,
                        alpha_pattern={p: float(r) for p, r in other.items()})
    inject(model, config, adapter)
    with torch.no_grad():
        for path, layer in lora_layers(model):
            c = corrections.get(path)
            if c is None:
                continue
            for t, v in ((layer.lora_A[adapter], c.A0), (layer.lora_B[adapter], c.B0)):
                t.data = v.to(dtype=dtype, device=t.device)
                t.requires_grad_(False)
    state = get_state(model)
    state.pinned = tuple(dict.fromkeys(state.pinned + (adapter,)))
    set_active(model, previous)  # whatever was active before, and the pinned ones
    return len(corrections)


def fold_corrections(model: nn.Module, adapter: str | None = None, *, correction: str = CORRECTION_ADAPTER) -> str:
    """Replace the trained adapter and the pinned correction by one adapter holding both, exactly.

    `lorakit.combine(..., method="cat")`: the new adapter's rank on each layer is the sum of
    the two ranks, `B = [B * scaling, B0]`, `A = [A; A0]` in float32, so it computes
    `dequant(Q) + C + delta` on a *plain* NF4 base: save it, and it loads in lorakit or
    PEFT on any bitsandbytes 4-bit model. The two sources are deleted; the new adapter
    (trainable, active) takes `adapter`'s name and keeps its `modules_to_save` copies. `adapter`: default the
    model's other adapter.

    Returns the adapter's name. Raises `LoraError` if the model does not hold exactly the
    correction and one other adapter (or `adapter` is not it).
    """

    state = get_state(model)
    others = [a for a in state.configs if a != correction]
    if correction not in state.configs or len(others) != 1 or (adapter is not None and adapter != others[0]):
        raise LoraError(f"fold_corrections needs the correction {correction!r} and one other adapter; this model has "
                        f"{sorted(state.configs)}")
    name = others[0]
    trained = state.configs[name]
    combine(model, {name: 1.0, correction: 1.0}, "cat", "_folded")
    config = state.configs["_folded"].replace(modules_to_save=trained.modules_to_save)
    saved = {path: {k: v.detach().clone() for k, v in w.modules_to_save[name].state_dict().items()}
             for path, w in save_wrappers(model) if name in w.modules_to_save}  # trained copies (a head, ...)
    state.pinned = tuple(a for a in state.pinned if a != correction)
    for a in (name, correction):
        delete_adapter(model, a)
    inject(model, config, name)  # the same layers, ranks and scalings: take over the folded tensors
    with torch.no_grad():
        for _, layer in lora_layers(model):
            if name in layer.lora_A:
                layer.lora_A[name].copy_(layer.lora_A["_folded"])
                layer.lora_B[name].copy_(layer.lora_B["_folded"])
        for path, w in save_wrappers(model):
            if path in saved:
                w.modules_to_save[name].load_state_dict(saved[path])
    delete_adapter(model, "_folded")
    set_active(model, [name])
    return name


def qera_quantize(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], *, rank: int = 8,
                  dtype: torch.dtype = torch.bfloat16, damping: float = DAMPING, adapter: str = CORRECTION_ADAPTER,
                  double_quant: bool = True, blocksize: int = 64, compute_dtype=None, modules="all-linear",
                  exclude_modules=None, include_head: bool = False) -> QeraReport:
    """`lorakit.quantize` plus the frozen rank-`rank` correction on every quantized layer, in place.

    `error_corrections` on the full-precision model, `quantize` (same arguments), then
    `add_corrections`. Inject the trainable adapter afterwards; `fold_corrections` before
    saving an adapter meant for a plain NF4 base. Returns the `QeraReport`; a failure
    before `quantize` leaves the model unchanged.
    """
    corrections, report = error_corrections(model, batches, rank=rank, modules=modules, exclude_modules=exclude_modules,
                                            include_head=include_head, double_quant=double_quant, blocksize=blocksize,
                                            damping=damping)
    quantize(model, "nf4", double_quant=double_quant, blocksize=blocksize, compute_dtype=compute_dtype, modules=modules,
             exclude_modules=exclude_modules, include_head=include_head)
    add_corrections(model, corrections, adapter=adapter, dtype=dtype)
    return report
