"""Mixture-of-experts math: (token, expert) pairs grouped by expert, and LoRA on each expert's rows only.

An expert weight is a 3-D parameter holding one matrix per expert, `W_e: (out, in)` (stored
`(experts, out, in)`, or `(experts, in, out)` in a transposed layout). A token routed to its top-k
experts with routing weights `w` gets `sum_e w_e * f_e(x)`; with LoRA every adapted projection of
`f_e` becomes (Hu et al. 2021, eq. 3, one low-rank pair per expert, as PEFT's `target_parameters`):

    W_e x + scaling * B_e A_e dropout(x)        A: (experts, r, in), B: (experts, out, r)
    delta_weight_e = scaling * B_e @ A_e        (experts, out, in)

`route` sorts the `tokens * k` pairs by expert; `offsets[e]` is where expert e's rows end. Every
product here (`grouped_matmul`) multiplies each expert's rows by that expert's matrix only: the
LoRA term costs `O(tokens * k * r * (in + out))` whatever the number of experts, and no
`(experts, out, in)` delta is formed outside `expert_delta_weight` (merging). The base part follows
transformers' `grouped_mm` experts implementation operation for operation (sorted rows, grouped
products, the bias added in place, the weighted sum over each token's k rows; `expert_linear` also
multiplies row by row as its `batched_mm` does, `combine_rows` sums as its eager loop does), so an
adapter whose B is zero gives the base output bit for bit under each implementation.
The equation's pieces come from `lorakit.ops.lora` (`low_rank` with grouped projections,
`delta_weight` batched over experts); `expert_low_rank` is the adapter's term as one autograd node,
and `expert_projection` a frozen expert weight's product plus one adapter's term as one node (the
training path: the low-rank parts accumulated in place, forward and input gradient).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import lora as ops
from .fused import dropout_keep_mask

_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass
class Routing:
    """The `(token, expert)` pairs of one forward, grouped by expert.

    Attributes:
        order: `(S,)` int64, `S = tokens * k`: position of each grouped row in the flattened
            `(tokens, k)` routing (`torch.sort` of the expert ids).
        tokens: `(S,)` int64: the token of each grouped row (`order // k`).
        inverse: `(S,)` int64: the grouped row of each flattened routing position (`order`'s inverse).
        experts: `(S,)` int64: the expert of each grouped row (ascending).
        offsets: `(experts,)` int32: cumulative row counts (expert e's rows end at `offsets[e]`).
        k: experts per token.
    """

    order: torch.Tensor
    inverse: torch.Tensor
    tokens: torch.Tensor
    experts: torch.Tensor
    offsets: torch.Tensor
    k: int

    @functools.cached_property
    def bounds(self) -> tuple[int, ...]:
        """`offsets` as a tuple of ints (for the per-expert loop; read from the device once)."""
        return tuple(self.offsets.tolist())


def route(top_k_index: torch.Tensor, num_experts: int) -> Routing:
    """Group the routing `top_k_index: (tokens, k)` (int expert ids in `[0, num_experts)`) by expert."""
    k = top_k_index.shape[-1]
    experts, order = torch.sort(top_k_index.reshape(-1))
    counts = torch.bincount(experts, minlength=num_experts)
    offsets = torch.cumsum(counts, 0, dtype=torch.int32)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.shape[0], device=order.device)
    return Routing(order, inverse, order // k, experts, offsets, k)


def _aligned(*tensors: torch.Tensor) -> bool:
    """Whether `torch.nn.functional.grouped_mm` takes these operands (16-byte aligned data and strides)."""
    for t in tensors:
        size = t.element_size()
        if t.data_ptr() % 16 or any(s * size % 16 for s, n in zip(t.stride(), t.shape) if s != 1 and n > 1):
            return False
    return True


def grouped_matmul(x: torch.Tensor, w: torch.Tensor, routing: Routing) -> torch.Tensor:
    """Row `i` of `x: (S, K)` times `w[e]: (K, N)` for its expert `e`: `(S, N)`, `x`'s dtype (= `w`'s).

    `torch.nn.functional.grouped_mm` where it applies (float32/bfloat16/float16, aligned operands),
    else one `mm` per expert that has rows (the same products, the same bits); differentiable.
    """
    if hasattr(F, "grouped_mm") and x.dtype in _GROUPED_MM_DTYPES and x.shape[0] and _aligned(x, w):
        return F.grouped_mm(x, w, offs=routing.offsets)
    if not torch.is_grad_enabled() or not (x.requires_grad or w.requires_grad):
        out, start = x.new_empty(x.shape[0], w.shape[-1]), 0
        for e, end in enumerate(routing.bounds):
            if end > start:
                torch.mm(x[start:end], w[e], out=out[start:end])
            start = end
        return out
    parts, start = [], 0
    for e, end in enumerate(routing.bounds):
        if end > start:
            parts.append(x[start:end] @ w[e])
        start = end
    return torch.cat(parts) if parts else x.new_zeros(0, w.shape[-1])


def grouped_outer(a: torch.Tensor, b: torch.Tensor, routing: Routing, num_experts: int) -> torch.Tensor:
    """`sum over expert e's rows of a_i^T b_i` for every expert: `a: (S, M)`, `b: (S, N)` -> `(experts, M, N)`
    (zero for an expert without rows): the gradient of a per-expert weight."""
    if hasattr(F, "grouped_mm") and a.dtype in _GROUPED_MM_DTYPES and a.shape[0] and _aligned(a.T, b):
        return F.grouped_mm(a.T, b, offs=routing.offsets)
    out = a.new_zeros(num_experts, a.shape[1], b.shape[1])
    start = 0
    for e, end in enumerate(routing.bounds):
        if end > start:
            torch.mm(a[start:end].T, b[start:end], out=out[e])
        start = end
    return out


def expert_linear(x: torch.Tensor, weight: torch.Tensor, routing: Routing, transposed: bool = False,
                  bias: torch.Tensor | None = None, per_row: bool = False) -> torch.Tensor:
    """The base projection of each grouped row by its expert: `x W_e^T (+ b_e)`.

    `x: (S, in)`; `weight: (experts, out, in)`, or `(experts, in, out)` with `transposed`;
    `bias: (experts, out)` or None. Returns `(S, out)` in `weight`'s dtype. `per_row`: one
    matrix-vector product per row against its expert's gathered matrix, as transformers'
    `batched_mm` experts implementation computes it (the same bits; a matrix product rounds
    otherwise), instead of one grouped product per expert.
    """
    if per_row:
        x, w = x.to(weight.dtype), weight[routing.experts]  # (S, out, in): what batched_mm gathers too
        out = torch.bmm(x.unsqueeze(1), w).squeeze(1) if transposed else torch.bmm(w, x.unsqueeze(-1)).squeeze(-1)
    else:
        out = grouped_matmul(x.to(weight.dtype), weight if transposed else weight.transpose(-2, -1), routing)
    if bias is not None:
        out.add_(bias[routing.experts])
    return out


def combine_rows(y: torch.Tensor, weights: torch.Tensor, routing: Routing, dtype: torch.dtype,
                 per_expert: bool = False) -> torch.Tensor:
    """Each token's weighted sum over its k experts: `y: (S, hidden)` grouped rows, `weights: (tokens, k)`
    routing weights -> `(tokens, hidden)` in `dtype`.

    As transformers' `grouped_mm` / `batched_mm` experts do (the k rows summed in `y`'s dtype), or with
    `per_expert` as its eager loop does (`index_add` of each hit expert's rows in `dtype`, experts in
    ascending order; a Python loop over the hit experts only), so that the sums round the same way.
    """
    weighted = y * weights.reshape(-1)[routing.order].unsqueeze(-1)
    if not per_expert:
        return weighted[routing.inverse].view(-1, routing.k, y.shape[-1]).sum(dim=1).to(dtype)
    out, start = y.new_zeros(weights.shape[0], y.shape[-1], dtype=dtype), 0
    for end in routing.bounds:
        if end > start:
            out = out.index_add(0, routing.tokens[start:end], weighted[start:end].to(dtype))
        start = end
    return out


class ExpertLowRankFunction(torch.autograd.Function):
    """`scaling * B_e A_e dropout(x)` per grouped row (see `expert_low_rank`) as one autograd node.

    Kept for backward: `x` (the caller's tensor, not a copy), a 1-byte dropout mask, `xa = s A x`
    `(S, r)` (the scaling applied on the rank-r side, the cheap one), A and B. The dropped-out copy
    of `x` is not kept; backward forms it again.
    """

    @staticmethod
    def forward(ctx, x, A, B, routing: Routing, scaling: float, p: float):
        mask, keep = dropout_keep_mask(x.shape, p, x.device) if p > 0 else (None, 1.0)
        h = x if mask is None else torch.where(mask, x, 0.0)
        s = scaling * keep
        xa = _project_A(h, A, routing).mul_(s)  # (S, r): scaled here, not the (S, out) product
        ctx.routing, ctx.s = routing, s
        ctx.save_for_backward(x if A.requires_grad else None, mask, A, B, xa if B.requires_grad else None)
        return _project_B(xa, B, None, routing)  # (S, out)

    @staticmethod
    def backward(ctx, grad_out):
        x, mask, A, B, xa = ctx.saved_tensors
        routing, s = ctx.routing, ctx.s
        g = grad_out.contiguous()
        gb = grouped_matmul(g, B, routing).mul_(s)  # (S, r): s * B_e^T g
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grouped_matmul(gb, A, routing)
            if mask is not None:
                grad_x.mul_(mask)
        if ctx.needs_input_grad[1]:
            h = x if mask is None else torch.where(mask, x, 0.0)
            grad_a = grouped_outer(gb, h, routing, A.shape[0])
        if ctx.needs_input_grad[2]:
            grad_b = grouped_outer(g, xa, routing, B.shape[0])  # xa carries s
        return grad_x, grad_a, grad_b, None, None, None


def add_grouped(out: torch.Tensor, x: torch.Tensor, w: torch.Tensor, routing: Routing) -> torch.Tensor:
    """`out += grouped_matmul(x, w, routing)` in place (`out: (S, N)`, `x: (S, K)`, `w: (experts, K, N)`).

    On the CPU one `addmm_` per expert that has rows (no `(S, N)` temporary, no second pass over
    `out`); elsewhere one grouped product and one add (a kernel launch per expert would cost more).
    A product that is exactly zero (B = 0) leaves `out` bit for bit.
    """
    if out.device.type != "cpu":
        return out.add_(grouped_matmul(x, w, routing))
    start = 0
    for e, end in enumerate(routing.bounds):
        if end > start:
            out[start:end].addmm_(x[start:end], w[e])
        start = end
    return out


class ExpertProjectionFunction(torch.autograd.Function):
    """A frozen expert weight's projection plus one adapter's term, as one autograd node (the expert
    counterpart of `lorakit.ops.fused`): `x W_e^T (+ b_e) + s B_e A_e dropout(x)` per grouped row.

    The base product is the same grouped product as `expert_linear` (so B = 0 gives its bits); the
    low-rank product is accumulated into it in place, and in backward the low-rank part of the input
    gradient into the base part: no `(S, out)` or `(S, in)` temporary beyond the outputs. Kept for
    backward: W (the parameter itself), `x` (the caller's tensor), a 1-byte dropout mask,
    `xa = s A x` `(S, r)`, A and B.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, routing: Routing, transposed: bool, scaling: float, p: float):
        out = expert_linear(x, weight, routing, transposed, bias)
        mask, keep = dropout_keep_mask(x.shape, p, x.device) if p > 0 else (None, 1.0)
        h = x if mask is None else torch.where(mask, x, 0.0)
        s = scaling * keep
        xa = _project_A(h, A, routing).mul_(s)  # (S, r)
        add_grouped(out, xa, B.transpose(1, 2), routing)
        ctx.routing, ctx.s, ctx.transposed = routing, s, transposed
        ctx.save_for_backward(weight, x if A.requires_grad else None, mask, A, B, xa if B.requires_grad else None)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        weight, x, mask, A, B, xa = ctx.saved_tensors
        routing, s = ctx.routing, ctx.s
        g = grad_out.contiguous()
        gb = grouped_matmul(g, B, routing).mul_(s)  # (S, r): s * B_e^T g
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grouped_matmul(g, weight.transpose(1, 2) if ctx.transposed else weight, routing)
            if mask is None:
                add_grouped(grad_x, gb, A, routing)
            else:
                grad_x.add_(grouped_matmul(gb, A, routing).mul_(mask))
        if ctx.needs_input_grad[3]:
            h = x if mask is None else torch.where(mask, x, 0.0)
            grad_a = grouped_outer(gb, h, routing, A.shape[0])
        if ctx.needs_input_grad[4]:
            grad_b = grouped_outer(g, xa, routing, B.shape[0])  # xa carries s
        return grad_x, None, None, grad_a, grad_b, None, None, None, None


def expert_projection(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, A: torch.Tensor,
                      B: torch.Tensor, routing: Routing, transposed: bool, scaling: float,
                      p: float = 0.0) -> torch.Tensor:
    """`expert_linear(x, weight, ...) + expert_low_rank(x, A, B, ...)` for a frozen `weight` (and `bias`)
    and one adapter, as one autograd node (`ExpertProjectionFunction`); `x`, `weight`, A and B share a
    dtype. Shapes as in `expert_linear` and `expert_low_rank`; returns `(S, out)`.

    Raises:
        ValueError: `weight` or `bias` requires grad (use the two functions, composed).
    """
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        raise ValueError("expert_projection needs a frozen expert weight and bias")
    return ExpertProjectionFunction.apply(x, weight, bias, A, B, routing, transposed, scaling, p)


def expert_low_rank(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, routing: Routing, scaling: float,
                    p: float = 0.0) -> torch.Tensor:
    """The LoRA term of each grouped row with its expert's pair: `scaling * B_e (A_e dropout_p(x))`.

    `x: (S, in)` grouped rows (`route`), in A's dtype; `A: (experts, r, in)`, `B: (experts, out, r)`;
    `p`: the dropout probability to apply (0 in eval mode; the mask has a resolution of 2^-16, see
    `lorakit.ops.fused.dropout_keep_mask`). Returns `(S, out)` in A's dtype. Each expert's pair
    touches only that expert's rows, in forward and in backward (where A's and B's gradients of an
    expert without rows are zero).
    """
    if torch.is_grad_enabled() and (x.requires_grad or A.requires_grad or B.requires_grad):
        return ExpertLowRankFunction.apply(x, A, B, routing, scaling, p)
    mask, keep = dropout_keep_mask(x.shape, p, x.device) if p > 0 else (None, 1.0)
    h = x if mask is None else torch.where(mask, x, 0.0)
    return ops.low_rank(h, A, B, scaling * keep, project_A=functools.partial(_project_A, routing=routing),
                        project_B=functools.partial(_project_B, routing=routing))


def _project_A(h: torch.Tensor, A: torch.Tensor, routing: Routing) -> torch.Tensor:
    """`A_e h` for each grouped row: `(S, in) -> (S, r)`."""
    return grouped_matmul(h, A.transpose(1, 2), routing)


def _project_B(xa: torch.Tensor, B: torch.Tensor, bias: torch.Tensor | None, routing: Routing) -> torch.Tensor:
    """`B_e xa` for each grouped row: `(S, r) -> (S, out)` (expert adapters have no `lora_bias`)."""
    return grouped_matmul(xa, B.transpose(1, 2), routing)


def expert_delta_weight(A: torch.Tensor, B: torch.Tensor, scaling: float, dtype: torch.dtype = torch.float32,
                        expert: int | None = None) -> torch.Tensor:
    """`scaling * B_e @ A_e` in `dtype` (`lorakit.ops.lora.delta_weight`, batched over experts):
    `A: (experts, r, in)`, `B: (experts, out, r)` -> `(experts, out, in)`, or expert `expert`'s `(out, in)` alone."""
    if expert is not None:
        return ops.delta_weight(A[expert], B[expert], scaling, dtype)
    return ops.delta_weight(A, B, scaling, dtype)
