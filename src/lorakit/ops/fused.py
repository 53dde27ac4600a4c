"""The fast path for one plain LoRA adapter on a linear layer: base + LoRA in one autograd node.

    out = x W^T + b + scaling * (dropout(x) A^T) B^T          x: (N, in), W: (out, in)

What autograd would do with the composed ops, and what this does instead:

- The dropped copy of `x` (4 bytes per element, per layer) is not kept for
  backward; a boolean mask (1 byte per element) is, and `dropout(x)` is
  recomputed from `x` (which the caller keeps alive anyway) in backward.
- The mask takes four 16-bit uniforms from each 64-bit random word
  (`dropout_keep_mask`): drawing one random number per element was most of
  the cost of dropout on the CPU.
- The LoRA output is accumulated into the base output in place (`addmm_`), and
  in backward the LoRA part of the input gradient is accumulated into the base
  part in place, so no extra `(N, out)` / `(N, in)` sums are materialised.
- The frozen base weight gets no gradient and `x` is saved only when `A` needs one.

Without autograd (inference) the same three GEMMs run without the autograd node.
"""

from __future__ import annotations

import math

import torch


_LEVELS = 1 << 16  # the drop probability's resolution: multiples of 2^-16


def dropout_keep_mask(shape: torch.Size, p: float, device: torch.device) -> tuple[torch.Tensor, float]:
    """A boolean keep-mask for dropout with probability `p`, and the scale of the kept values.

    Each element is dropped with probability `k / 2^16`, `k = round(p * 2^16)` (within 7.7e-6
    of `p`; capped at `2^16 - 1`), independently; the scale is `2^16 / (2^16 - k)`, the inverse
    of the keep probability actually used, so `mask * scale` has expectation exactly 1. The
    uniforms are the four 16-bit lanes of random 64-bit words: a quarter of the random draws
    of `bernoulli_`, which on the CPU made mask generation dominate a dropout training step
    (benchmarks/README.md). Uses the default generator of `device`.

    Returns:
        `(mask, scale)`: `mask` a `torch.bool` tensor of `shape` (True = kept), `scale` a float.
    """
    k = min(round(p * _LEVELS), _LEVELS - 1)
    n = math.prod(shape)
    words = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=device)
    lanes = words.view(torch.int16)[:n].view(shape)  # uniform on [-2^15, 2^15)
    return lanes >= k - _LEVELS // 2, _LEVELS / (_LEVELS - k)


def _dropped(x: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """`(where(mask, x, 0), mask, keep_scale)` for dropout `p` (`(x, None, 1.0)` when p = 0); the
    scale is left to the caller, who folds it into `scaling`."""
    if p <= 0:
        return x, None, 1.0
    mask, keep_scale = dropout_keep_mask(x.shape, p, x.device)
    return torch.where(mask, x, 0.0), mask, keep_scale


class LoraLinearFunction(torch.autograd.Function):
    """`autograd.Function` for `x W^T + b + scaling * (dropout(x) A^T) B^T` on 2-D `x: (N, in)`."""

    # With dropout the mask's scale is folded into `scaling` (s' = scaling * keep_scale) and only
    # `where(mask, x, 0)` is formed: one pass over `x` instead of two, the same values.
    @staticmethod
    def forward(ctx, x, weight, bias, A, B, scaling: float, p: float):
        h, mask, keep_scale = _dropped(x, p)
        out = torch.addmm(bias, x, weight.T) if bias is not None else x @ weight.T
        xa = h @ A.T  # (N, r)
        s = scaling * keep_scale
        out.addmm_(xa, B.T, alpha=s)
        ctx.scaling = s
        ctx.save_for_backward(x if (A.requires_grad or weight.requires_grad) else None, mask, weight, A, B, xa)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, mask, weight, A, B, xa = ctx.saved_tensors
        s = ctx.scaling
        need_x, need_w, need_b, need_a, need_bb = ctx.needs_input_grad[:5]
        g_b = grad_out @ B  # (N, r)
        grad_x = grad_w = grad_bias = grad_a = grad_bb = None
        if need_x:
            grad_x = grad_out @ weight
            if mask is None:
                grad_x.addmm_(g_b, A, alpha=s)
            else:
                grad_x.addcmul_(g_b @ A, mask, value=s)
        if need_a:
            h = torch.where(mask, x, 0.0) if mask is not None else x
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
        h, _, keep_scale = _dropped(x2, p)
        out = torch.addmm(bias, x2, weight.T) if bias is not None else x2 @ weight.T
        out.addmm_(h @ A.T, B.T, alpha=scaling * keep_scale)
    return out.view(x.shape[:-1] + out.shape[-1:])
