"""DoRA: weight-decomposed low-rank adaptation (Liu et al. 2024, arXiv:2402.09353).

The adapted weight is split into a magnitude and a direction (paper eq. 2 and 5):

    W' = m * (W0 + scaling * B A) / ||W0 + scaling * B A||_c

`||.||_c` is the paper's column-wise norm: one 2-norm per output feature, taken
over the input features. In PyTorch's `(out_features, in_features)` layout that is
the norm of each *row*; lorakit works on that layout through the layer primitive
`to_oi` (GPT-2 `Conv1D` weights are stored transposed, embedding tables are
`(num_embeddings, embedding_dim)` and normalise over the vocabulary, as PEFT does).
`m: (out_features,)` is the trainable magnitude vector, initialised to `||W0||_c`
(paper §4.1), so the model is unchanged at step 0.

Following §4.3, the norm is treated as a constant in backward ("detached from the
gradient graph"): gradients reach `m`, `A` and `B` only through the numerator.

Forward, unmerged (the paper's reference code and PEFT, incl. LoRA dropout):

    h = W0 x + b + (m / n - 1) * (W0 x_d) + (m / n) * scaling * B A x_d,   n = ||W0 + scaling B A||_c

with `x_d = dropout(x)`; without dropout this is exactly `W' x + b`. Merged, the
base weight becomes `W'` (the bias is untouched).

Norm cache. `n` costs a full `(out, in)` product per call, so unmerged inference
reuses it: under `torch.no_grad()` / `torch.inference_mode()` the norm is cached
per layer and adapter (in the layer's `variant_cache`), keyed by the `_version` counters and storage pointers of
`W0`, `A` and `B`, their dtypes and device, and `scaling`. Any in-place update
through the parameter itself (an optimiser step, `copy_`, `load_state_dict`,
`merge`/`unmerge`) bumps a version and so misses the cache. The cache is also
dropped by `module.train()` / `module.eval()`, by moving or casting the module, and
by every forward that records gradients (a training step may follow it). Writes
that bypass version counters (`p.data.copy_(...)`, fused optimisers such as
`AdamW(fused=True)` stepping without a preceding forward) are not seen while the
model stays in no-grad use; call `model.eval()` (or `clear_cache`) after such
writes. Under `torch.compile` the cache is not used.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import UnsupportedModuleError
from ..ops.lora import compute_dtype
from .base import AdaptedLayer, Variant

MAGNITUDE = "lora_magnitude_vector"  # the layer table (and PEFT file key) of the magnitude vectors


def weight_norm(layer: AdaptedLayer, adapter: str) -> torch.Tensor:
    """`||W0 + scaling * B A||_c`, shape `(out_features,)`, float32 (float64 for a float64 base), no grad.

    `W0` is the unmerged base weight (other adapters merged into the layer do not count,
    as in PEFT), so the forward does not depend on which other adapters are merged.
    """
    with torch.no_grad():
        w0 = layer.unmerged_weight()
        dtype = compute_dtype(w0.dtype)
        full = w0.to(dtype) + layer.delta_weight(adapter, dtype)
        return torch.linalg.vector_norm(layer.to_oi(full), dim=1)


def _cache_key(layer: AdaptedLayer, adapter: str) -> tuple:
    w0, A, B = layer.unmerged_weight(), layer.lora_A[adapter], layer.lora_B[adapter]
    return (
        w0._version, w0.data_ptr(), w0.dtype, w0.device,
        A._version, A.data_ptr(), A.dtype, B._version, B.data_ptr(), B.dtype,
        layer.scaling[adapter], torch.is_inference_mode_enabled(),
    )


def clear_cache(model: nn.Module) -> None:
    """Drop every cached DoRA weight norm in `model` (needed only after writes that bypass version counters)."""
    for module in model.modules():
        cache = getattr(module, "variant_cache", None)
        if isinstance(cache, dict):
            cache.clear()


class DoraVariant(Variant):
    """The DoRA strategy (Liu et al. 2024, arXiv:2402.09353, eq. 5, §4.3); see the module docstring.

    Per adapter it adds `layer.lora_magnitude_vector[adapter]: (out_features,)`
    (PEFT file key `<path>.lora_magnitude_vector`), in the adapter's dtype.
    Layer kinds declare support with `"dora"` in their `supported_variants` (Linear, GPT-2 Conv1D, Embedding).
    """

    name = "dora"

    def init(self, layer: AdaptedLayer, adapter: str) -> None:
        if self.name not in getattr(type(layer), "supported_variants", ()):
            raise UnsupportedModuleError(f"DoRA (use_dora) is not supported on {type(layer).__name__}")
        A = layer.lora_A[adapter]
        if A.device.type == "meta":
            m = torch.empty(layer.out_features, dtype=A.dtype, device="meta")
        else:
            # ||W0 + scaling B A||_c: ||W0||_c for a zero-initialised update (paper §4.1);
            # with PiSSA/OLoRA the base is the residual and this is again ||W0_original||_c.
            m = weight_norm(layer, adapter).to(A.dtype)
        layer.adapter_table(MAGNITUDE)[adapter] = nn.Parameter(m)

    def parameters(self, layer: AdaptedLayer, adapter: str) -> dict[str, nn.Parameter]:
        return {MAGNITUDE: layer.adapter_table(MAGNITUDE)[adapter]}

    def delete(self, layer: AdaptedLayer, adapter: str) -> None:
        del layer.adapter_table(MAGNITUDE)[adapter]
        layer.variant_cache.pop((self.name, adapter), None)

    def column_norm(self, layer: AdaptedLayer, adapter: str) -> torch.Tensor:
        """`||W0 + scaling B A||_c` (detached), cached for no-grad inference as described in the module docstring."""
        if torch.compiler.is_compiling():
            return weight_norm(layer, adapter)
        if torch.is_grad_enabled():
            layer.variant_cache.clear()  # parameters may change after a gradient-recording forward
            return weight_norm(layer, adapter)
        key = _cache_key(layer, adapter)
        hit = layer.variant_cache.get((self.name, adapter))
        if hit is not None and hit[0] == key:
            return hit[1]
        norm = weight_norm(layer, adapter)
        layer.variant_cache[(self.name, adapter)] = (key, norm)
        return norm

    def forward(self, layer: AdaptedLayer, adapter: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """`result + (m/n - 1) * W0 x_d + (m/n) * scaling * B A x_d` (see module docstring).

        `x: (..., in_features)` (token ids for embeddings), `result: (..., out_features)`
        is the base output (bias included, plus any adapter applied before this one).
        """
        h = layer.lora_input(adapter, x)
        lora = layer.lora_output(adapter, h)  # scaling * B A x_d, adapter dtype
        m = layer.adapter_table(MAGNITUDE)[adapter]
        scale = m / self.column_norm(layer, adapter).to(m.dtype)  # (out,), grad to m only (§4.3)
        if h is x:
            bias = layer.bias
            base = result if bias is None else result - bias
        else:  # dropout: the base term of the update sees the same dropped-out input
            base = layer.base_output(h)
        return result + ((scale - 1) * base + scale * lora).to(result.dtype)

    def merged_weight(self, layer: AdaptedLayer, adapter: str, weight: torch.Tensor) -> torch.Tensor:
        """`(m / ||W0 + dW||_c) * (weight + dW)` in the accumulation dtype, base layout.

        `weight` is `W0` plus any adapter merged before this one; the norm uses the
        unmerged `W0`, exactly as the unmerged forward does.
        """
        delta = layer.delta_weight(adapter, weight.dtype)
        w0 = layer.unmerged_weight().to(weight.dtype)
        norm = torch.linalg.vector_norm(layer.to_oi(w0 + delta), dim=1)
        scale = layer.adapter_table(MAGNITUDE)[adapter].detach().to(weight.dtype) / norm
        return layer.from_oi(layer.to_oi(weight + delta) * scale[:, None])
