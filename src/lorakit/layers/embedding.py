"""LoRA on `nn.Embedding` (PEFT keys `lora_embedding_A` / `lora_embedding_B`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import lora as ops
from .base import LoraLayer


class LoraEmbedding(LoraLayer):
    """`h = E[x] + scaling * (A^T[x]) B^T` for token ids `x: (...)` (int64).

    Shapes follow PEFT: `A: (r, num_embeddings)`, `B: (embedding_dim, r)`; the
    update of the `(num_embeddings, embedding_dim)` table is `(scaling * B @ A)^T`.
    As in PEFT, A starts at zero and B is Gaussian (the lookup makes A's rows
    sparse-updated, so it is the zero side); dropout does not apply to ids.
    """

    file_keys = ("lora_embedding_A", "lora_embedding_B")
    supported_variants = ("lora", "dora")

    @classmethod
    def features(cls, base: nn.Module) -> tuple[int, int]:
        return base.weight.shape[0], base.weight.shape[1]

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
        return ops.delta_weight(self.lora_A[name], self.lora_B[name], self.scaling[name], dtype or torch.float32).T

    def project_A(self, h: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
        """Token ids `h: (...)` -> the ids' columns of A: `(..., r)` (a lookup in `A^T`)."""
        base = self.base_layer
        return F.embedding(h, A.T, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq,
                           base.sparse)

    def as_lora_input(self, x: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
        return x  # token ids

    def to_oi(self, w: torch.Tensor) -> torch.Tensor:  # the table is (in, out) = (num_embeddings, embedding_dim)
        return w.T

    def from_oi(self, w: torch.Tensor) -> torch.Tensor:
        return w.T

    def lora_input(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return x  # no dropout on token ids

    def add_lora_mixed(self, result: torch.Tensor, x: torch.Tensor, rows) -> torch.Tensor:
        """Each row looks up its own adapter's A columns, then one batched product with B."""
        batch = rows.check(x)
        table = rows.A.transpose(1, 2)  # (slots, num_embeddings, r)
        ids = x.reshape(batch, -1)
        xa = table[rows.index[:, None], ids]  # (batch, L, r)
        delta = torch.bmm(xa, rows.B[rows.index].transpose(1, 2))
        return result + delta.reshape(result.shape).to(result.dtype)
