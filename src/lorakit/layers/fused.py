"""The fast path for one plain LoRA adapter on a linear layer: base + LoRA in one autograd node.

    out = x W^T + b + scaling * (dropout(x) A^T) B^T          x: (N, in), W: (out, in)

What autograd would do with the composed ops, and what this does instead:

- The dropped copy of `x` (4 bytes per element, per layer) is not kept for
  backward; a boolean mask (1 byte per element) is, and `dropout(x)` is
  recomputed from `x` (which the caller keeps alive anyway) in backward.
- The LoRA output is accumulated into the base output in place (`addmm_`), and
  in backward the LoRA part of the input gradient is accumulated into the base
  part in place, so no extra `(N, out)` / `(N, in)` sums are materialised.
- The frozen base weight gets no gradient and `x` is saved only when `A` needs one.

Without autograd (inference) the same three GEMMs run without the autograd node.
"""

from __future__ import annotations

import torch


def _dropout_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    return torch.empty(x.shape, dtype=torch.bool, device=x.device).bernoulli_(1.0 - p)


class LoraLinearFunction(torch.autograd.Function):
    """`autograd.Function` for `x W^T + b + scaling * (dropout(x) A^T) B^T` on 2-D `x: (N, in)`."""

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, scaling: float, p: float):
        mask = _dropout_mask(x, p) if p > 0 else None
        h = x * mask * (1.0 / (1.0 - p)) if mask is not None else x
        out = torch.addmm(bias, x, weight.T) if bias is not None else x @ weight.T
        xa = h @ A.T  # (N, r)
        out.addmm_(xa, B.T, alpha=scaling)
        ctx.scaling, ctx.p = scaling, p
        ctx.save_for_backward(x if (A.requires_grad or weight.requires_grad) else None, mask, weight, A, B, xa)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, mask, weight, A, B, xa = ctx.saved_tensors
        s, p = ctx.scaling, ctx.p
        need_x, need_w, need_b, need_a, need_bb = ctx.needs_input_grad[:5]
        g_b = grad_out @ B  # (N, r)
        grad_x = grad_w = grad_bias = grad_a = grad_bb = None
        if need_x:
            grad_x = grad_out @ weight
            if mask is None:
                grad_x.addmm_(g_b, A, alpha=s)
            else:
                grad_x.add_((g_b @ A) * mask, alpha=s / (1.0 - p))
        if need_a:
            h = x * mask * (1.0 / (1.0 - p)) if mask is not None else x
            grad_a = (g_b.T @ h).mul_(s)
        if need_bb:
            grad_bb = (grad_out.T @ xa).mul_(s)
        if need_w:
            grad_w = grad_out.T @ x
        if need_b:
            grad_bias = grad_out.sum(0)
        return grad_x, grad_w, grad_bias, grad_a, grad_bb, None, None


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    A: torch.Tensor,
    B: torch.Tensor,
    scaling: float,
    p: float = 0.0,
) -> torch.Tensor:
    """`x W^T + b + scaling * (dropout_p(x) A^T) B^T` for `x: (..., in)`, `W: (out, in)`,
    `A: (r, in)`, `B: (out, r)`; all one dtype. Returns `(..., out)`. `p` is the dropout
    probability to apply (pass 0 in eval mode)."""
    x2 = x.reshape(-1, x.shape[-1])
    if torch.is_grad_enabled() and (x.requires_grad or A.requires_grad or B.requires_grad or weight.requires_grad):
        out = LoraLinearFunction.apply(x2, weight, bias, A, B, scaling, p)
    else:
        h = torch.nn.functional.dropout(x2, p, True) if p > 0 else x2
        out = torch.addmm(bias, x2, weight.T) if bias is not None else x2 @ weight.T
        out.addmm_(h @ A.T, B.T, alpha=scaling)
    return out.view(x.shape[:-1] + out.shape[-1:])
