"""The LoRA equation, written once (Hu et al. 2021, arXiv:2106.09685, eq. 3, §4.1-4.2):

    h = W0 x + b + scaling * (B A dropout(x) + b_B)          delta_weight = scaling * B @ A

(`b_B`, PEFT's `lora_bias`, is zero-length unless asked for: a trainable bias on B, scaled with
the rest of the update, merged as `b + scaling * b_B`.)

`A: (r, in_features)`, `B: (out_features, r)`, `scaling = alpha / r` (rsLoRA:
`alpha / sqrt(r)`, `lorakit.config.scaling`). Every layer kind computes its low-rank
term with `add_low_rank` / `low_rank`, passing how *its* A and B act on an input
(`project_A`, `project_B`: matrix products for linear layers, which are the defaults;
a table lookup for embeddings; a convolution and a grouped 1x1 convolution for
convolutions), and its `delta_weight` with `delta_weight`. The fused autograd node
of the fast path (one plain adapter on a linear layer) is `lorakit.ops.fused`; the
per-row terms of a mixed-adapter batch are `rowwise_low_rank`.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

Project = Callable[..., torch.Tensor]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype for merges and weight-derived math: float64 for a float64 base, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """LoRA's dropout on the branch input: `F.dropout(x, p)` while training with `p > 0`, else `x` itself."""
    return F.dropout(x, p, True) if p and training else x


def matmul_A(h: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """`h @ A.T`: `(..., in) -> (..., r)`."""
    return h @ A.T


def matmul_B(xa: torch.Tensor, B: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`xa @ B.T (+ bias)`: `(..., r) -> (..., out)`."""
    out = xa @ B.T
    return out if bias is None else out + bias


def low_rank(h: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float, bias: torch.Tensor | None = None, *,
             project_A: Project = matmul_A, project_B: Project = matmul_B) -> torch.Tensor:
    """`scaling * (B (A h) + bias)` for an input `h` already dropped out (eq. 3's update term), in A's dtype.

    `project_B(xa, B, bias)` applies B and adds `bias: (out,)` along the output features."""
    return project_B(project_A(h, A), B, bias) * scaling


def add_low_rank(result: torch.Tensor, h: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float,
                 bias: torch.Tensor | None = None, *, project_A: Project = matmul_A,
                 project_B: Project = matmul_B) -> torch.Tensor:
    """`result + scaling * (B (A h) + bias)`: the base output plus one adapter's term, `result`'s dtype.

    With the default (linear) projections and `result` in B's dtype the term is
    accumulated by one fused GEMM + add (`addmm`), without a separate `(..., out)` buffer.
    `A h` is computed once: the only `O(in * r)` work.
    """
    xa = project_A(h, A)
    if project_B is matmul_B and result.dtype == B.dtype:
        out = torch.addmm(result.reshape(-1, result.shape[-1]), xa.reshape(-1, xa.shape[-1]), B.T, alpha=scaling)
        if bias is not None:
            out.add_(bias, alpha=scaling)
        return out.view(result.shape)
    return result + (project_B(xa, B, bias) * scaling).to(result.dtype)


def delta_weight(A: torch.Tensor, B: torch.Tensor, scaling: float, dtype: torch.dtype = torch.float32,
                 groups: int = 1) -> torch.Tensor:
    """`scaling * B @ A` computed in `dtype`: `A: (r, K)`, `B: (out, r / groups)` -> `(out, K)`; with
    `groups == 1`, leading batch dimensions are products of their own (experts: `(E, r, K)`, `(E, out, r)`).

    With `groups > 1` (grouped convolutions) the update is block diagonal: group `j`
    is `B_j @ A_j` with `A_j` the `j`-th `r / groups` rows of A and `B_j` the `j`-th
    `out / groups` rows of B, which is exactly the layout of a grouped weight.
    """
    A, B = A.to(dtype), B.to(dtype)
    if groups == 1:
        return (B @ A).mul_(scaling)
    r, out = A.shape[0], B.shape[0]
    a = A.reshape(groups, r // groups, -1)
    b = B.reshape(groups, out // groups, r // groups)
    return torch.bmm(b, a).reshape(out, -1).mul_(scaling)


def merged_bias(bias: torch.Tensor, terms: list[tuple[torch.Tensor, float]], dtype: torch.dtype) -> torch.Tensor:
    """`bias + sum(scaling * b_B)` over `terms = [(b_B, scaling), ...]`, computed in `dtype`, in `bias`'s dtype."""
    acc = bias.to(dtype)
    for b, scaling in terms:
        acc = acc + b.to(dtype) * scaling
    return acc.to(bias.dtype)


def rowwise_low_rank(h: torch.Tensor, A: torch.Tensor, B: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Per-row adapters: row `b` of `h: (batch, L, in)` gets `B[index[b]] A[index[b]] h_b`.

    `A: (slots, r, in)`, `B: (slots, out, r)` with each slot's scaling already folded
    into B; two gathered batched products. Returns `(batch, L, out)`.
    """
    return torch.bmm(torch.bmm(h, A[index].transpose(1, 2)), B[index].transpose(1, 2))


def masked_low_rank(h: torch.Tensor, A_cat: torch.Tensor, B_cat: torch.Tensor, row_mask: torch.Tensor) -> torch.Tensor:
    """The same as `rowwise_low_rank` by two dense products over all adapters at once.

    `A_cat: (n * r, in)` (the adapters' A one after the other), `B_cat: (out, n * r)`
    (their scaled B side by side), `row_mask: (batch, 1, n * r)` keeping each row's own
    columns. Cheaper for short inputs and few adapters (see `lorakit.layers.rows`).
    """
    return (h @ A_cat.T).mul_(row_mask) @ B_cat.T
