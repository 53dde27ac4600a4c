"""LoRA on `nn.Embedding` (PEFT keys `lora_embedding_A` / `lora_embedding_B`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import LoraLayer, check_rows


class LoraEmbedding(LoraLayer):
    """`h = E[x] + scaling * (A^T[x]) B^T` for token ids `x: (...)` (int64).

    Shapes follow PEFT: `A: (r, num_embeddings)`, `B: (embedding_dim, r)`; the
    update of the `(num_embeddings, embedding_dim)` table is `(scaling * B @ A)^T`.
    As in PEFT, A starts at zero and B is Gaussian (the lookup makes A's rows
    sparse-updated, so it is the zero side); dropout does not apply to ids.
    """

    file_keys = ("lora_embedding_A", "lora_embedding_B")

    @property
    def in_features(self) -> int:
        return self.weight.shape[0]

    @property
    def out_features(self) -> int:
        return self.weight.shape[1]

    def init_lora(self, name: str, init: str) -> None:
        A, B = self.lora_A[name], self.lora_B[name]
        if A.device.type == "meta":
            return
        with torch.no_grad():
            if init == "random":
                nn.init.normal_(A)
            else:
                nn.init.zeros_(A)
            nn.init.normal_(B)

    def delta_weight(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        dtype = dtype or torch.float32
        return (self.lora_B[name].to(dtype) @ self.lora_A[name].to(dtype)).mul_(self.scaling[name]).T

    def _lookup(self, x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        return F.embedding(x, table, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq, base.sparse)

    def to_oi(self, w: torch.Tensor) -> torch.Tensor:  # the table is (in, out) = (num_embeddings, embedding_dim)
        return w.T

    def from_oi(self, w: torch.Tensor) -> torch.Tensor:
        return w.T

    def lora_input(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return x  # no dropout on token ids

    def lora_output(self, name: str, h: torch.Tensor) -> torch.Tensor:
        return self._lookup(h, self.lora_A[name].T) @ self.lora_B[name].T * self.scaling[name]

    def add_lora(self, result: torch.Tensor, name: str, x: torch.Tensor) -> torch.Tensor:
        A, B = self.lora_A[name], self.lora_B[name]
        xa = self._lookup(x, A.T)  # (..., r)
        return result + (xa @ B.T * self.scaling[name]).to(result.dtype)

    def add_lora_mixed(self, result: torch.Tensor, x: torch.Tensor, rows) -> torch.Tensor:
        """Each row looks up its own adapter's A columns, then one batched product with B."""
        batch = check_rows(rows, x)
        table = rows.A.transpose(1, 2)  # (slots, num_embeddings, r)
        ids = x.reshape(batch, -1)
        xa = table[rows.index[:, None], ids]  # (batch, L, r)
        delta = torch.bmm(xa, rows.B[rows.index].transpose(1, 2))
        return result + delta.reshape(result.shape).to(result.dtype)
