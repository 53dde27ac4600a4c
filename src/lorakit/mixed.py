"""Mixed-adapter batches: one forward in which each row of the batch uses its own adapter.

    with lk.mixed_batch(model, ["a", "b", None, "a"]):   # None: the base model for that row
        out = model(ids)                                 # ids: (4, seq)

Per layer the adapters in use are stacked once on entry (`lorakit.layers.rows`); each
forward then runs two batched products for all rows, whatever the number of adapters.
Inference only: dropout is not applied, and nothing in the block may change the adapters.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

from torch import nn

from .errors import LoraError, MergeError
from .layers.rows import build_rows
from .state import get_state, lora_layers, require_adapter, save_wrappers


@contextlib.contextmanager
def mixed_batch(model: nn.Module, adapters: Sequence[str | None]) -> Iterator[nn.Module]:
    """Within the block, row `i` of every input batch uses adapter `adapters[i]` (None: no adapter).

    Each row's output equals running that row alone with only its adapter active.
    The batch (first) dimension of every adapted layer's input must equal
    `len(adapters)`.

    Raises:
        AdapterNotFoundError: a name the model does not have.
        MergeError: adapters are merged (unmerge first).
        LoraError: empty `adapters`; DoRA adapters, `modules_to_save` copies or adapters on expert weights
            in the batch.
    """
    rows = list(adapters)
    state = get_state(model)
    if not rows:
        raise LoraError("mixed_batch needs one adapter name (or None) per batch row")
    used = {n for n in rows if n is not None}
    for n in used:
        require_adapter(model, n)
    if any(state.configs[n].use_dora for n in used):
        raise LoraError("mixed_batch does not support DoRA adapters")
    if any(state.configs[n].lora_bias for n in used):
        raise LoraError("mixed_batch does not support adapters with lora_bias")
    if any(set(w.adapter_names) & used for _, w in save_wrappers(model)):
        raise LoraError("mixed_batch does not support adapters with modules_to_save copies")
    if state.pinned:
        raise LoraError(f"mixed_batch would leave out the pinned adapter(s) {list(state.pinned)} (a frozen NF4 "
                        "correction): "
                        "fold them into the adapters first (lorakit.quant.fold_corrections)")
    layers = [layer for _, layer in lora_layers(model)]
    experts = [p for p, layer in lora_layers(model) if layer.per_expert and set(layer.adapter_names) & used]
    if experts:
        raise LoraError(f"mixed_batch does not support adapters on mixture-of-experts expert weights ({experts[0]!r})")
    if any(layer.merged_adapters for layer in layers):
        raise MergeError("mixed_batch needs unmerged adapters: call lorakit.unmerge(model) first")
    for layer in layers:
        layer._mixed = build_rows(layer, rows)
    try:
        yield model
    finally:
        for layer in layers:
            layer._mixed = None
