"""Chunked ("fused linear") cross-entropy: the language-model loss without `(tokens, vocab)` logits.

The plain causal-LM loss (transformers' `ForCausalLMLoss`) builds `logits = h W^T` for every
token, upcasts them to float32, takes `F.cross_entropy(..., ignore_index=-100)` and, in
backward, a gradient of the same size: at 4,096 tokens and SmolLM2's 49,152-word vocabulary
that is 0.8 GB per copy, three to four copies. Here the tokens go through the head in chunks:

    for each chunk c of tokens:   z_c = h_c W^T (+ b)               (C, V), computed, used, freed
                                  nll_c = logsumexp(z_c) - z_c[target]
                                  dz_c = w_c * (softmax(z_c) - onehot(target)) / n
                                  dh_c = dz_c W        dW += dz_c^T h_c   (only if W trains)

so the forward pass already leaves the gradient with respect to the hidden states
(`(tokens, hidden)`, 1/85th of the logits here), which backward only scales by the incoming
gradient: no logits are kept and the head is never recomputed (the approach of Liger
Kernel's fused linear cross-entropy, Hsu et al. 2024, arXiv:2410.10989, and of Apple's "Cut
Your Losses", Wijmans et al. 2024, arXiv:2411.09009, which goes further on a GPU).

A head that is not a plain `nn.Linear` (a LoRA-adapted `lm_head`, `modules_to_save`, hooks)
takes the generic path: each chunk's `head(h_c)` + cross-entropy under non-reentrant
`torch.utils.checkpoint`, i.e. recomputed in backward (one more head forward), never all
logits at once.

Numbers are those of the plain loss: the same per-token values (to float rounding: sums are
taken per chunk), the same mean over non-ignored tokens, and under autocast the head's
matmuls run in the autocast dtype and the softmax in float32, as `F.linear` under autocast
followed by `logits.float()` does.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from ..errors import LoraError

IGNORE_INDEX = -100
CHUNK_BYTES = 128 << 20  # float32 logits of one chunk; 682 tokens at a 49,152-word vocabulary
REDUCTIONS = ("mean", "sum", "none")
# config fields of models whose forward changes the logits after the head: the chunked loss would skip it
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


class LossError(LoraError, ValueError):
    """Bad arguments to the chunked loss (shapes, dtypes, reduction), or a model it cannot serve."""


def default_chunk_size(vocab_size: int) -> int:
    """Tokens per chunk so that one chunk's float32 logits take about `CHUNK_BYTES` (16 to 4,096)."""
    return max(16, min(4096, CHUNK_BYTES // (4 * vocab_size)))


def _upcast(logits: torch.Tensor) -> torch.Tensor:
    """transformers' `logits.float()`, except that float64 stays float64 (the exact reference)."""
    return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype `F.linear` would compute in: the autocast dtype when autocast is on (float64 is never cast)."""
    dev = t.device.type
    if t.dtype != torch.float64 and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return t.dtype


def _softmax_nll(z: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(softmax(z), logsumexp(z) - z[target])` for logits `z: (C, V)`, the softmax written into `z`
    (one `(C, V)` buffer; `torch.logsumexp` would allocate another)."""
    target = z.gather(1, t[:, None])[:, 0]
    m = z.amax(dim=1)
    total = z.sub_(m[:, None]).exp_().sum(dim=1)
    return z.div_(total[:, None]), total.log() + m - target


class _LinearCrossEntropy(torch.autograd.Function):
    """`scale * sum_i w_i * nll_i` over the rows of `hidden: (N, H)`, every target valid.

    Forward leaves the gradients (for a unit incoming gradient) on `ctx`; backward scales them.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, token_weights, scale: float, chunk: int, want_grad: bool):
        need_h, need_w, need_b = (want_grad and n for n in ctx.needs_input_grad[:3])
        cd = _compute_dtype(hidden)
        acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        ctx.grads = [torch.empty_like(hidden) if need_h else None,
                     torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None,
                     torch.zeros(bias.shape, dtype=acc, device=bias.device) if need_b else None]
        total = torch.zeros((), dtype=torch.float64, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):  # autocast's casts, made explicit below
            w, b = weight.to(cd), (bias.to(cd) if bias is not None else None)
            for s in range(0, hidden.shape[0], chunk):
                h, t = hidden[s:s + chunk].to(cd), targets[s:s + chunk]
                wt = token_weights[s:s + chunk] if token_weights is not None else None
                z = torch.addmm(b, h, w.T) if b is not None else h @ w.T
                p, nll = _softmax_nll(_upcast(z), t)
                total += (nll * wt).sum() if wt is not None else nll.sum()
                if need_h or need_w or need_b:
                    _LinearCrossEntropy.chunk_grads(ctx.grads, p, t, wt, scale, h, w, s)
        return (total * scale).to(torch.float64 if hidden.dtype == torch.float64 else torch.float32)

    @staticmethod
    def chunk_grads(grads: list, p: torch.Tensor, t: torch.Tensor, wt, scale: float, h, w, s: int) -> None:
        """Turn one chunk's softmax `p: (C, V)` (overwritten) into `dlogits` and accumulate the
        gradients of its hidden rows, of the weight and of the bias into `grads`."""
        p[torch.arange(p.shape[0], device=p.device), t] -= 1.0
        p.mul_((wt * scale)[:, None] if wt is not None else scale)
        g = p.to(h.dtype)  # autograd casts dlogits back to the logits' dtype before the matmuls
        if grads[0] is not None:
            grads[0][s:s + p.shape[0]] = g @ w
        if grads[1] is not None:
            grads[1] += (g.T @ h).to(grads[1].dtype)
        if grads[2] is not None:
            grads[2] += g.sum(0).to(grads[2].dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        out = [None if g is None else (g * grad_loss.to(g.dtype)).to(d) for g, d in zip(ctx.grads, ctx.dtypes)]
        return (*out, None, None, None, None, None)


def _valid_rows(hidden, targets, token_weights, ignore_index):
    """Flatten to `(N, H)` / `(N,)` and keep only the rows whose target is not `ignore_index`."""
    if hidden.shape[:-1] != targets.shape:
        raise LossError(f"hidden {tuple(hidden.shape)} and targets {tuple(targets.shape)} disagree: "
                        f"expected hidden (..., H) with targets (...)")
    if targets.dtype != torch.long:
        raise LossError(f"targets must be torch.long, got {targets.dtype}")
    if token_weights is not None and token_weights.shape != targets.shape:
        raise LossError(f"token_weights {tuple(token_weights.shape)} must have the targets' shape "
                        f"{tuple(targets.shape)}")
    hidden, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    token_weights = token_weights.reshape(-1) if token_weights is not None else None
    keep = targets != ignore_index
    if bool(keep.all()):
        return hidden, targets, token_weights, keep
    idx = keep.nonzero()[:, 0]
    w = token_weights[idx] if token_weights is not None else None
    return hidden.index_select(0, idx), targets[idx], w, keep


def _reduce_scale(reduction: str, n: int) -> float:
    if reduction not in REDUCTIONS:
        raise LossError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return 1.0 / max(n, 1) if reduction == "mean" else 1.0


def _no_valid_token(hidden: torch.Tensor, *params) -> torch.Tensor:
    """NaN with zero gradients, as `F.cross_entropy` gives when every target is ignored."""
    out = hidden.float().sum() * 0.0
    for p in params:
        if p is not None:
            out = out + p.float().sum() * 0.0
    return out + float("nan")


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    token_weights: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Cross-entropy of `hidden @ weight.T + bias` against `targets`, in chunks of tokens.

    Equals `F.cross_entropy((hidden @ weight.T + bias).float(), targets, ignore_index=...)` (times
    `token_weights`, see below) in value and in the gradients of `hidden`, `weight` and `bias`,
    without ever holding more than one chunk's logits (see the module docstring).

    Args:
        hidden: `(..., H)` floating; rows whose target is `ignore_index` are skipped.
        weight: `(V, H)`, the head (`lm_head.weight`, or the tied input embedding).
        targets: `(...)` long, the token each row predicts (already shifted for a causal LM).
        bias: `(V,)` or None.
        token_weights: `(...)` floating or None: token i's loss is multiplied by `token_weights[i]`
            (packing uses `1 / (examples * supervised tokens of the example)` with `reduction="sum"`,
            which gives the mean of per-example means).
        reduction: `"mean"` (sum over non-ignored tokens / their number; NaN when there is none,
            like torch), `"sum"`, or `"none"` (per-token losses `(...)` float32, 0 where ignored;
            evaluation only: raises LossError when a gradient would be needed).
        chunk_size: tokens per chunk; default `default_chunk_size(V)` (~128 MiB of float32 logits).
    Returns:
        A float32 scalar (float64 for float64 inputs), or `(...)` for `"none"`.
    Raises:
        LossError: shapes that disagree, non-long targets, an unknown reduction, `"none"` with grad.
    """
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise LossError(f"weight must be (V, H={hidden.shape[-1]}), got {tuple(weight.shape)}")
    if reduction == "none":
        return _token_losses(lambda h: F.linear(h, weight, bias), hidden, targets, ignore_index, weight.shape[0],
                             chunk_size)
    h, t, w, _ = _valid_rows(hidden, targets, token_weights, ignore_index)
    scale = _reduce_scale(reduction, h.shape[0])
    if h.shape[0] == 0:
        return _no_valid_token(hidden, weight, bias)
    chunk = chunk_size or default_chunk_size(weight.shape[0])
    return _LinearCrossEntropy.apply(h, weight, bias, t, w, scale, chunk, torch.is_grad_enabled())


def _chunk_loss(head: nn.Module, h: torch.Tensor, t: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    nll = F.cross_entropy(_upcast(head(h)), t, reduction="none")
    return (nll * w).sum() if w is not None else nll.sum()


def module_cross_entropy(
    head: nn.Module,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    *,
    token_weights: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """`linear_cross_entropy` through any head module: `F.cross_entropy(head(hidden).float(), targets)`.

    A plain `nn.Linear` (no hooks, not parametrized, not a DTensor) takes the fused path of
    `linear_cross_entropy`; anything else (a `LoraLinear` on `lm_head`, `ModulesToSave`, ...) is
    called on one chunk at a time under non-reentrant `torch.utils.checkpoint`: its chunk is
    recomputed in backward (one more head forward; dropout masks repeat, the RNG state is
    restored), and the gradients reach the head's own parameters (LoRA A and B) as autograd
    routes them. Args, returns and errors as `linear_cross_entropy`; `head` maps `(n, H)` to `(n, V)`.
    """
    if _is_plain_linear(head):
        return linear_cross_entropy(hidden, head.weight, targets, head.bias, token_weights=token_weights,
                                    ignore_index=ignore_index, reduction=reduction, chunk_size=chunk_size)
    vocab = getattr(head, "out_features", None) or _probe_vocab(head, hidden)
    if reduction == "none":
        return _token_losses(head, hidden, targets, ignore_index, vocab, chunk_size)
    h, t, w, _ = _valid_rows(hidden, targets, token_weights, ignore_index)
    scale = _reduce_scale(reduction, h.shape[0])
    if h.shape[0] == 0:
        return _no_valid_token(hidden, *head.parameters())
    chunk = chunk_size or default_chunk_size(vocab)
    from torch.utils.checkpoint import checkpoint

    total = None
    for s in range(0, h.shape[0], chunk):
        part = checkpoint(_chunk_loss, head, h[s:s + chunk], t[s:s + chunk], w[s:s + chunk] if w is not None else None,
                          use_reentrant=False)
        total = part if total is None else total + part
    return total * scale


def _is_plain_linear(head: nn.Module) -> bool:
    if type(head) is not nn.Linear or head._forward_hooks or head._forward_pre_hooks:
        return False
    if torch.nn.utils.parametrize.is_parametrized(head):
        return False
    return type(head.weight) in (torch.Tensor, nn.Parameter)  # a DTensor (FSDP2) goes through the module


@torch.no_grad()
def _probe_vocab(head: nn.Module, hidden: torch.Tensor) -> int:
    return head(hidden.reshape(-1, hidden.shape[-1])[:1]).shape[-1]


def _token_losses(head, hidden, targets, ignore_index: int, vocab: int, chunk_size: int | None) -> torch.Tensor:
    """Per-token float32 losses `(...)`, 0 at ignored targets, without gradients."""
    if torch.is_grad_enabled() and hidden.requires_grad:
        raise LossError('reduction="none" is for evaluation: call it under torch.no_grad() or on a detached hidden')
    h, t, _, keep = _valid_rows(hidden, targets, None, ignore_index)
    out = torch.zeros(keep.shape, dtype=torch.float32, device=hidden.device)
    chunk = chunk_size or default_chunk_size(vocab)
    with torch.no_grad():
        nll = [F.cross_entropy(_upcast(head(h[s:s + chunk])), t[s:s + chunk], reduction="none")
               for s in range(0, h.shape[0], chunk)]
    if nll:
        out[keep] = torch.cat(nll).to(out.dtype)
    return out.view(targets.shape)


# ---------------------------------------------------------------------- transformers causal LMs
def shift_labels(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """`(B, T)` -> `(B, T)` targets: position t predicts token t + 1; the last position predicts
    nothing (`ignore_index`), as transformers' `ForCausalLMLoss` pads and shifts."""
    return F.pad(labels[..., 1:], (0, 1), value=ignore_index)


def backbone_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """`(decoder returning the last hidden state, output embedding)` of a transformers causal LM.

    Raises:
        LossError: no separate backbone or head, or a model whose logits are transformed after the
            head (Gemma-2's soft-capping, Cohere's `logit_scale`, Granite's `logits_scaling`).
    """
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        raise LossError("pass the module inside DistributedDataParallel: its forward would be bypassed "
                        "(wrap a module whose forward calls causal_lm_loss instead)")
    config = getattr(model, "config", None)
    for name in _LOGIT_TRANSFORMS:
        value = getattr(config, name, None)
        if value not in (None, 1, 1.0):
            raise LossError(f"{type(model).__name__} transforms its logits after the head ({name}={value}); "
                            "the chunked loss does not reproduce that")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    body = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "base_model", None)
    if head is None or body is None or body is model:
        raise LossError(f"{type(model).__name__} has no separate backbone and output embedding "
                        "(get_decoder() / get_output_embeddings())")
    return body, head


def causal_lm_loss(
    model: nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    *,
    loss_weights: torch.Tensor | None = None,
    reduction: str = "mean",
    chunk_size: int | None = None,
    **model_kwargs,
) -> torch.Tensor:
    """`model(input_ids, labels=labels).loss` of a transformers causal LM, without its logits.

    Runs the backbone (`model.get_decoder()`, with `use_cache=False`: a cache would also stop
    transformers from reading packed sequences from `position_ids`) for the last hidden state and
    takes `module_cross_entropy` with `model.get_output_embeddings()` on the shifted labels.

    Args:
        input_ids, labels: `(B, T)` long; `labels` is `-100` where no loss is taken.
        attention_mask: `(B, T)` 1/0 padding mask, a 4-D mask, or None.
        position_ids: `(B, T)` long or None; restarting positions mark packed examples.
        loss_weights: `(B, T)` floating or None: the weight of the loss on `labels[b, t]`.
        reduction, chunk_size: see `linear_cross_entropy`; `"none"` returns `(B, T)` losses where
            entry `t` is the loss of predicting token `t + 1`.
    Returns:
        A float32 scalar (float64 for a float64 model), `(B, T)` for `"none"`.
    Raises:
        LossError: see `backbone_and_head` and `linear_cross_entropy`.
    """
    body, head = backbone_and_head(model)
    out = body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
               **model_kwargs)
    hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
    weights = shift_labels(loss_weights, 0) if loss_weights is not None else None
    return module_cross_entropy(head, hidden, shift_labels(labels), token_weights=weights, reduction=reduction,
                                chunk_size=chunk_size)
