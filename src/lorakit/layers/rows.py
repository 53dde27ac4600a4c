"""One layer's view of a mixed-adapter batch (`lorakit.mixed_batch`): its adapters stacked per slot.

Per layer, the adapters in use are stacked once on entry (`A: (n + 1, r_max, in)`,
`B: (n + 1, out, r_max)` with scaling folded into B, ranks zero-padded, slot `n`
all zeros for base rows); each forward gathers one slot per row and runs two
batched matrix products (`lorakit.ops.lora.rowwise_low_rank`), whatever the number
of adapters. Short inputs with few adapters (decoding: one token per row) take a
denser route instead (`masked_low_rank`): `x @ A_cat^T` for all `n` adapters at once,
a 0/1 mask keeping each row's own `r_max` columns, then `@ B_cat^T`. Its cost grows
with `n * tokens per row`, the gathers' does not, so a linear layer takes it while
that product is at most `DENSE_MAX` (measured: benchmarks/README.md). Both routes add
only zeros for the other adapters, so each row gets the same values (up to float
summation order).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..errors import LoraError

DENSE_MAX = 16  # the dense route while adapters x tokens per row <= this (see the module docstring)


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

    def check(self, x: torch.Tensor) -> int:
        """The batch size, after checking it matches the number of adapter names."""
        if x.dim() == 0 or x.shape[0] != self.index.shape[0]:
            raise LoraError(f"mixed_batch was given {self.index.shape[0]} adapter names but a layer saw an input of "
                            f"shape {tuple(x.shape)}")
        return x.shape[0]

    def dense(self, tokens_per_row: int) -> bool:
        """Whether the masked dense route is the cheaper one for this input."""
        return self.A_cat is not None and (len(self.names) - 1) * tokens_per_row <= DENSE_MAX


def build_rows(layer, rows: Sequence[str | None]) -> MixedRows:
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
