"""Activation checkpointing for LoRA training: keep each decoder layer's input, recompute the rest.

Without it, backward needs what every layer's forward produced (SmolLM2-135M in float32:
about 50 KB per token per layer, 1.5 MB per token over 30 layers); with it, only each layer's
input is kept (576 x 4 B = 2.3 KB per token per layer) and one layer's activations at a time
are rebuilt in backward, at the price of a second forward pass (Chen et al. 2016,
arXiv:1604.06174). Non-reentrant `torch.utils.checkpoint` only: unlike the reentrant form it
needs no input that requires grad (a frozen embedding is fine), supports keyword arguments,
and keeps gradients of LoRA parameters inside the block exact.

- transformers models: their own per-layer checkpointing (`activation_checkpointing_enable`,
  or `gradient_checkpointing_enable` before transformers 5), non-reentrant, without the
  input-embedding hook transformers adds for the reentrant form (it only costs an extra
  gradient through the first layer here).
- any other model: the longest `nn.ModuleList` of blocks of one class (or the `layers` given)
  gets a per-instance `forward` that checkpoints the class's `forward` in training mode; state
  dict keys and module paths do not change, and `disable_checkpointing` removes it.

`keep_attention=True` is selective checkpointing: the attention kernel's outputs are saved
too (`(B, T, hidden)` plus a `(B, heads, T)` log-sum-exp per layer) so backward does not
recompute attention, which is the quadratic part of a long sequence's forward.

Dropout inside a checkpointed block draws the same mask in the recomputation:
`torch.utils.checkpoint` restores the CPU (and the inputs' CUDA devices') RNG state first.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from ..errors import LoraError

MODES = ("auto", "on", "off")
# `auto` turns checkpointing on from this many tokens per micro-batch (batch x length); measured
# on SmolLM2-135M (benchmarks/longctx.py --sweep, docs/long-context.md)
AUTO_MIN_TOKENS = 2048
_ATTENTION_OPS = tuple(
    getattr(torch.ops.aten, name).default
    for name in ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
                 "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention")
    if hasattr(torch.ops.aten, name)
)
_MARK = "_lorakit_checkpointed"
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


class CheckpointingError(LoraError, ValueError):
    """A checkpointing mode that does not exist, or a model without repeated blocks to checkpoint."""


def want_checkpointing(mode: str, tokens_per_micro_batch: int, min_tokens: int = AUTO_MIN_TOKENS) -> bool:
    """What `--gradient-checkpointing {auto,on,off}` means: `auto` is on from `min_tokens` tokens
    per micro-batch (`batch_size x max_length`). Raises CheckpointingError for another mode."""
    if mode not in MODES:
        raise CheckpointingError(f"gradient checkpointing must be one of {MODES}, got {mode!r}")
    return mode == "on" or (mode == "auto" and tokens_per_micro_batch >= min_tokens)


def _keep_attention_policy(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op in _ATTENTION_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def checkpoint_kwargs(keep_attention: bool = False) -> dict:
    """Keyword arguments for `torch.utils.checkpoint.checkpoint`: non-reentrant, and with
    `keep_attention` a selective policy that saves the attention kernels' outputs."""
    kwargs: dict = {"use_reentrant": False}
    if keep_attention:
        kwargs["context_fn"] = functools.partial(create_selective_checkpoint_contexts, _keep_attention_policy)
    return kwargs


def enable_checkpointing(model: nn.Module, *, keep_attention: bool = False, layers=None) -> str:
    """Checkpoint each block of `model` in training (see the module docstring); in place.

    Args:
        model: a transformers `PreTrainedModel` that supports gradient checkpointing, or any module
            (unwrapped: not inside DDP/FSDP, which should wrap it afterwards).
        keep_attention: also save the attention kernels' outputs (selective checkpointing).
        layers: the blocks to checkpoint, for a model that is not a transformers one; default the
            longest `nn.ModuleList` whose children share one class.
    Returns:
        `"transformers"` or `"generic"`: which mechanism was used.
    Raises:
        CheckpointingError: no blocks to checkpoint.
    """
    kwargs = checkpoint_kwargs(keep_attention)
    if layers is None and getattr(model, "supports_gradient_checkpointing", False):
        had_hooks = bool(getattr(model, "_require_grads_hooks", None))
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:  # transformers 4
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        if not had_hooks and hasattr(model, "disable_input_require_grads"):
            model.disable_input_require_grads()  # needed by the reentrant form only
        return "transformers"
    blocks = list(layers) if layers is not None else repeated_blocks(model)
    if not blocks:
        raise CheckpointingError(f"{type(model).__name__} has no nn.ModuleList of repeated blocks to checkpoint; "
                                 "pass layers=")
    for block in blocks:
        _wrap_forward(block, kwargs)
    return "generic"


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The children of the longest `nn.ModuleList` in `model` whose children all share one class."""
    best: list[nn.Module] = []
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > len(best) and len({type(m) for m in module}) == 1:
            best = list(module)
    return best


def _wrap_forward(block: nn.Module, kwargs: dict) -> None:
    inner = type(block).forward.__get__(block)

    def forward(*args, **kw):
        if block.training and torch.is_grad_enabled():
            return checkpoint(inner, *args, **kwargs, **kw)
        return inner(*args, **kw)

    block.forward = forward  # an instance attribute: hooks stay outside, `del` restores the class's
    setattr(block, _MARK, True)


def disable_checkpointing(model: nn.Module) -> None:
    """Undo `enable_checkpointing` (both mechanisms)."""
    for module in model.modules():
        if module.__dict__.pop(_MARK, False):
            del module.forward
    if not getattr(model, "supports_gradient_checkpointing", False):
        return
    if hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    else:  # transformers 4
        model.gradient_checkpointing_disable()


def checkpointing_enabled(model: nn.Module) -> bool:
    """Whether any block of `model` is checkpointed (by either mechanism)."""
    return any(getattr(m, "gradient_checkpointing",
                       False) is True or m.__dict__.get(_MARK, False) for m in model.modules())


def release_large_frees(threshold: int = 1 << 20) -> bool:
    """Serve CPU allocations of at least `threshold` bytes with mmap, so a freed tensor goes back
    to the OS at once (glibc `mallopt(M_MMAP_THRESHOLD)`); process-wide, for a training process.

    glibc's default threshold starts at 128 KiB but rises to the size of each mmapped block
    freed, up to 32 MiB: after the first few frees, activation-sized tensors (1-32 MB at
    thousands of tokens) come from the heap and their freed space stays resident. A checkpointed
    step, which frees and reallocates every layer's activations in backward, then peaks far
    above what it holds: SmolLM2-135M, 1 x 1024 tokens, checkpointing + chunked loss: 770 MB
    above the start with the default, 296 MB with a fixed 1 MiB threshold (docs/long-context.md).
    Setting a threshold also fixes it (glibc stops adjusting it).

    Returns:
        True if set; False where the C library is not glibc (nothing changes).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, int(threshold)))
    except (OSError, AttributeError):
        return False
