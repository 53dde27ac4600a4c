"""The NF4 format, one weight at a time (QLoRA, Dettmers et al. 2023, arXiv:2305.14314).

Model-level quantization (which layers, memory accounting) is `lorakit.quant`.

The format (paper §3):

- 4-bit NormalFloat (NF4, §3 "4-bit NormalFloat Quantization"): each block of 64
  consecutive weights (row-major `(out_features, in_features)` order) is divided by
  its absolute maximum `c2` and each value is replaced by the index of the nearest
  of 16 fixed levels (quantiles of N(0, 1) scaled to [-1, 1], with an exact 0).
  Two 4-bit codes are packed per byte.
- Double quantization (§3 "Double Quantization"): the float32 block constants
  `c2` are themselves quantized: their mean is subtracted and they are stored as
  8-bit codes (bitsandbytes' dynamic 8-bit map) in blocks of 256, with one float32
  constant per block. Cost per weight: `4 + 8/64 + 32/(64 * 256) = 4.127` bits,
  against `4 + 32/64 = 4.5` bits without it.
- Dequantization (used by the forward and by merges) is `level[code] * c2`, computed
  in float32 and cast to the compute dtype.

Engine: bitsandbytes (`bitsandbytes.nn.Linear4bit` / `Params4bit`), chosen because
(1) it *is* the paper's reference implementation, so codes, block constants and
dequantized weights equal the reference bit for bit (tested); (2) its module and
state-dict layout (`weight`, `weight.absmax`, `weight.quant_map`,
`weight.nested_absmax`, ...) is what transformers' `BitsAndBytesConfig` models and
PEFT's QLoRA layers use, so lorakit QLoRA adapters go both ways to PEFT on a
bitsandbytes 4-bit model with the same logits (tested); (3) it runs on the CPU.
Known limits, handled or documented here:

- CPU repack (bitsandbytes 0.50.2): a `Linear4bit` in eval mode that sees an input
  without `requires_grad` on a CPU with AVX512-BF16 rewrites its weight in place into
  an inference layout; later forwards use a kernel without autograd, so *training
  forwards silently give no input gradient*, and the double-quantization constants
  come back re-quantized (not bit-exact) if the layout is undone. lorakit turns
  this off on every 4-bit layer it creates or adapts (`guard_cpu_repack`); for a model
  quantized elsewhere (transformers' `BitsAndBytesConfig`), call
  `lorakit.quant.guard_cpu_repack(model)` once.
- FSDP2: bitsandbytes' `Linear4bit` does not compose with FSDP2 (`fully_shard`).
  torchao's `NF4Tensor` (0.18: `torchao.quantization.quantize_.workflows.nf4`; 0.17:
  `torchao.dtypes.nf4tensor`) does, and with `torch.compile`, but it is not an engine
  here. Measured on SmolLM2-135M (torchao 0.18.0 vs bitsandbytes 0.50.2, blocks of 64,
  constants in blocks of 256): its codes differ from the reference in 0.373% of the
  blocks (0.017% of the codes: its NF4 table is rounded to 4 decimals), its
  dequantized weights differ by up to 11.5% of max|W| in those blocks (linear int8
  instead of dynamic 8-bit constants), it cannot quantize q/k/v/o_proj at all (it
  needs a multiple of 256 constants per tensor: 576*576/64 = 5184 is not), and its
  state dict is not what PEFT/transformers read. See docs/qlora.md.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from ..errors import QuantError

ENGINES = ("bitsandbytes",)
QUANT_TYPES = ("nf4",)
PIP_HINT = "pip install 'lorakit[qlora]'  (or: pip install bitsandbytes==0.50.2)"


def bnb():
    """The `bitsandbytes` module; raises `QuantError` with the pip command if it is not installed."""
    try:
        import bitsandbytes
    except ImportError as exc:  # ModuleNotFoundError, or a broken native library
        raise QuantError(f"4-bit quantization (QLoRA) needs bitsandbytes, which cannot be imported ({exc}); "
                         f"{PIP_HINT}") from None
    return bitsandbytes


# ---------------------------------------------------------------------- recognising 4-bit layers
def is_quantized_linear(module: nn.Module) -> bool:
    """True for a bitsandbytes 4-bit linear layer (`Linear4bit`, `LinearNF4`, ...), without importing bitsandbytes."""
    return any(c.__name__ == "Linear4bit" and c.__module__.startswith("bitsandbytes") for c in type(module).__mro__)


def quantized_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """`(path, module)` of every 4-bit linear layer in `model` (inside LoRA wrappers too)."""
    return [(p, m) for p, m in model.named_modules() if is_quantized_linear(m)]


def guard_cpu_repack(model: nn.Module) -> int:
    """Keep every bitsandbytes 4-bit layer of `model` (or `model` itself) in its trainable layout.

    Sets `support_avx512bf16_for_cpu = False` (see the module docstring: bitsandbytes
    0.50.2 otherwise repacks the weight after one eval-mode forward without grad and
    later training forwards give no input gradient). A layer already repacked is
    converted back, with a warning: the codes come back exactly but the
    double-quantization constants are re-quantized by bitsandbytes. Idempotent.

    Returns:
        The number of 4-bit layers seen.
    """
    n = 0
    for _, module in ([("", model)] if is_quantized_linear(model) else quantized_layers(model)):
        n += 1
        module.support_avx512bf16_for_cpu = False
        state = getattr(module.weight, "quant_state", None)
        if state is not None and getattr(state, "packing_format_for_cpu", False):
            # deferred: bitsandbytes is optional, and this is needed only for a layer already repacked
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse as unpack

            warnings.warn(
                "a bitsandbytes 4-bit layer had already been repacked for CPU inference (an eval forward without "
                "grad); "
                "converting it back so that it can train (its double-quantization constants are re-quantized)",
                stacklevel=2,
            )
            module.weight.data, module.weight.quant_state = unpack(module.weight.data, state)
            module.quant_state = module.weight.quant_state
    return n


# ---------------------------------------------------------------------- (de)quantizing one weight
def dequantize_weight(module: nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dequantized weight `level[code] * c2` of a 4-bit layer: `(out_features, in_features)`, `dtype`.

    Computed in float32 (bitsandbytes' own kernel, as its forward does) and cast once
    to `dtype`. The module is not changed.
    """
    F = bnb().functional
    weight = module.weight if is_quantized_linear(module) else module
    state = weight.quant_state
    if state is None:
        raise QuantError(f"{type(module).__name__} has no quantization state (not quantized yet: move it to a device "
                         "first)")
    if getattr(state, "packing_format_for_cpu", False):
        raise QuantError("this 4-bit layer was repacked for CPU inference; call "
                         "lorakit.quant.guard_cpu_repack(model) first")
    state32 = copy.copy(state)
    state32.dtype = torch.float32
    return F.dequantize_4bit(weight.data, state32).reshape(tuple(state.shape)).to(dtype)


def quantize_weight(weight: torch.Tensor, *, double_quant: bool = True, blocksize: int = 64, quant_type: str = "nf4"):
    """A bitsandbytes `Params4bit` holding `weight: (out_features, in_features)` in NF4 (frozen).

    The state remembers `weight.dtype` (bitsandbytes' dequantization dtype).
    """
    b = bnb()
    if weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise QuantError(f"NF4 quantization needs a float32/bfloat16/float16 weight, got {weight.dtype}")
    if weight.device.type == "meta":
        raise QuantError("cannot quantize a weight on the meta device; load the real weights first")
    param = b.nn.Params4bit(weight.detach().contiguous(), requires_grad=False, blocksize=blocksize,
                            compress_statistics=double_quant, quant_type=quant_type, quant_storage=torch.uint8)
    return param.to(weight.device)  # bitsandbytes quantizes on the first move to a device


def make_linear4bit(linear: nn.Module, *, weight: torch.Tensor | None = None, double_quant: bool = True,
                    blocksize: int = 64, compute_dtype: torch.dtype | None = None,
                    quant_type: str = "nf4") -> nn.Module:
    """A guarded `bitsandbytes.nn.Linear4bit` computing like `linear` (its bias object is shared).

    `weight` (default `linear.weight`): `(out_features, in_features)` to quantize.
    `compute_dtype` (default: the weight's dtype): the dtype the input and the
    dequantized weight are cast to for the matmul (paper §3: bf16).
    """
    b = bnb()
    w = linear.weight if weight is None else weight
    compute_dtype = compute_dtype or (w.dtype if w.dtype.is_floating_point else torch.float32)
    out_f, in_f = linear.out_features, linear.in_features
    q = b.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=compute_dtype, compress_statistics=double_quant,
                        quant_type=quant_type, quant_storage=torch.uint8, device="meta")
    param = quantize_weight(w, double_quant=double_quant, blocksize=blocksize, quant_type=quant_type)
    param.module = q
    q.weight = param
    q.quant_state = param.quant_state
    if getattr(linear, "bias", None) is not None:
        q.bias = linear.bias
    q.support_avx512bf16_for_cpu = False
    q.train(linear.training)
    return q


def share_tables(module: nn.Module, tables: dict[str, torch.Tensor]) -> None:
    """Point `module`'s lookup tables (the 16 NF4 levels, the 256-entry 8-bit map) at equal ones in `tables`.

    bitsandbytes gives every layer its own copy of these constants of the format; one
    shared copy saves ~1 KiB per layer (0.02 bits per weight on SmolLM2) and changes
    no value. `tables` (role -> tensor) is filled with the first copies seen.
    """
    state = module.weight.quant_state
    pairs = [("quant_map", state, "code")]
    if state.nested:
        pairs.append(("nested_quant_map", state.state2, "code"))
    for role, owner, attr in pairs:
        t = getattr(owner, attr)
        known = tables.get(role)
        if known is None:
            tables[role] = t
        elif known is not t and known.device == t.device and known.dtype == t.dtype and torch.equal(known, t):
            setattr(owner, attr, known)


def stored_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a 4-bit layer keeps for its weight (bias excluded), by role."""
    w = module.weight
    state = w.quant_state
    out = {"codes": w.data, "absmax": state.absmax, "quant_map": state.code}
    if state.nested:
        out.update({"nested_absmax": state.state2.absmax, "nested_quant_map": state.state2.code,
                    "offset": state.offset})
    return out


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()
