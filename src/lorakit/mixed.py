"""Mixed-adapter batches: one forward in which each row of the batch uses its own adapter.

    with lk.mixed_batch(model, ["a", "b", None, "a"]):   # None: the base model for that row
        out = model(ids)                                 # ids: (4, seq)

Per layer, the adapters in use are stacked once on entry (`A: (n + 1, r_max, in)`,
`B: (n + 1, out, r_max)` with scaling folded into B, ranks zero-padded, slot `n`
all zeros for base rows); each forward gathers one slot per row and runs two
batched matrix products, whatever the number of adapters. Inference only:
dropout is not applied, and nothing in the block may change the adapters.

Short inputs with few adapters (decoding: one token per row) take a denser route
instead: `x @ A_cat^T` for all `n` adapters at once, a 0/1 mask keeping each row's own
`r_max` columns, then `@ B_cat^T`: two plain matrix products, no per-row copies of A
and B. Its cost grows with `n * tokens per row`, the gathers' does not, so a linear
layer takes it while that product is at most `DENSE_MAX` (measured on 2 CPU cores,
576 x 576, r=16, 16 rows, one token: 8 adapters 122 us against 272 us gathered; 64
adapters 2.2 ms against 0.8 ms). Both routes add only zeros for the other adapters,
so each row gets the same values (up to float summation order).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import nn

from .errors import AdapterNotFoundError, LoraError, MergeError
from .layers import LoraLayer
from .state import get_state, lora_layers, save_wrappers


@dataclass
class MixedRows:
    """One layer's view of a mixed batch.

    Attributes:
        index: `(batch,)` int64, row -> slot.
        A: `(slots, r_max, in_features)` (embeddings: `(slots, num_embeddings, r_max)`, transposed for lookup).
        B: `(slots, out_features, r_max)`, scaled.
        names: adapter name per slot (the last slot, zeros, is `None`).
    """

    index: torch.Tensor
    A: torch.Tensor | None
    B: torch.Tensor | None
    names: tuple[str | None, ...]
    A_cat: torch.Tensor | None = None  # (n * r_max, in): the n adapters' A, one after the other
    B_cat: torch.Tensor | None = None  # (out, n * r_max): their scaled B side by side
    row_mask: torch.Tensor | None = None  # (batch, 1, n * r_max): 1 on each row's own columns


DENSE_MAX = 16  # the dense route while adapters x tokens per row <= this (see the module docstring)


def build_rows(layer: LoraLayer, rows: Sequence[str | None]) -> MixedRows:
    """Stack `layer`'s adapters used by `rows` (flattened 2-D A/B, for the batched products)."""
    names = tuple(dict.fromkeys(n for n in rows if n is not None and n in layer.lora_A))
    slot = {n: i for i, n in enumerate(names)}
    w = layer.weight
    index = torch.tensor([slot.get(n, len(names)) for n in rows], dtype=torch.long, device=w.device)
    if not names:
        return MixedRows(index, None, None, (None,))
    dtype = layer.lora_A[names[0]].dtype
    r_max = max(layer.r[n] for n in names)
    a_list, b_list = [], []
    for n in names:
        A, B = layer.lora_A[n].detach(), layer.lora_B_dense(n).detach()
        A2, B2 = A.reshape(A.shape[0], -1), B.reshape(B.shape[0], -1) * layer.scaling[n]
        pad = r_max - A2.shape[0]
        a_list.append(torch.nn.functional.pad(A2, (0, 0, 0, pad)))
        b_list.append(torch.nn.functional.pad(B2, (0, pad)))
    dense = {}
    if len(names) <= DENSE_MAX:
        n = len(names)
        row_mask = torch.zeros(len(rows), 1, n, r_max, dtype=dtype, device=w.device)
        row_mask[index < n, 0, index[index < n]] = 1
        dense = dict(A_cat=torch.cat(a_list).to(dtype), B_cat=torch.cat(b_list, dim=1).to(dtype),
                     row_mask=row_mask.reshape(len(rows), 1, n * r_max))
    a_list.append(torch.zeros_like(a_list[0]))
    b_list.append(torch.zeros_like(b_list[0]))
    return MixedRows(index, torch.stack(a_list).to(dtype), torch.stack(b_list).to(dtype), names + (None,), **dense)


@contextlib.contextmanager
def mixed_batch(model: nn.Module, adapters: Sequence[str | None]) -> Iterator[nn.Module]:
    """Within the block, row `i` of every input batch uses adapter `adapters[i]` (None: no adapter).

    Each row's output equals running that row alone with only its adapter active.
    The batch (first) dimension of every adapted layer's input must equal
    `len(adapters)`.

    Raises:
        AdapterNotFoundError: a name the model does not have.
        MergeError: adapters are merged (unmerge first).
        LoraError: empty `adapters`; DoRA adapters or `modules_to_save` copies in the batch.
    """
    rows = list(adapters)
    state = get_state(model)
    if not rows:
        raise LoraError("mixed_batch needs one adapter name (or None) per batch row")
    for n in rows:
        if n is not None and n not in state.configs:
            raise AdapterNotFoundError(f"mixed_batch: no adapter named {n!r}; this model has {sorted(state.configs)}")
    used = {n for n in rows if n is not None}
    if any(state.configs[n].use_dora for n in used):
        raise LoraError("mixed_batch does not support DoRA adapters")
    if any(set(w.adapter_names) & used for _, w in save_wrappers(model)):
        raise LoraError("mixed_batch does not support adapters with modules_to_save copies")
    if state.pinned:
        raise LoraError(f"mixed_batch would leave out the pinned adapter(s) {list(state.pinned)} (a frozen NF4 correction): "
                        "fold them into the adapters first (lorakit.quant.fold_corrections)")
    layers = [layer for _, layer in lora_layers(model)]
    if any(layer.merged_adapters for layer in layers):
        raise MergeError("mixed_batch needs unmerged adapters: call lorakit.unmerge(model) first")
    for layer in layers:
        layer._mixed = build_rows(layer, rows)
    try:
        yield model
    finally:
        for layer in layers:
            layer._mixed = None
