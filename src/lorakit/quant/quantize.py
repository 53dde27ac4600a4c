"""Model-level NF4 quantization for QLoRA (Dettmers et al. 2023, arXiv:2305.14314, §3): which
linear layers become 4-bit (`quantize`, `select_linear_layers`), and what they store
(`bits_per_param`, `base_weight_memory`). The format itself is `lorakit.ops.nf4`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch import nn

from ..config import matches
from ..errors import QuantError, TargetNotFoundError, UnsupportedModuleError
from ..inject import output_head_path
from ..layers import LoraLayer, ModulesToSave
from ..ops.nf4 import (
    ENGINES, QUANT_TYPES, bnb, is_quantized_linear, make_linear4bit, nbytes, quantized_layers, share_tables,
    stored_tensors,
)
from ..state import get_state, has_adapters, replace_module, tied_names, unwrap


def _is_plain_linear(module: nn.Module) -> bool:
    if isinstance(module, nn.modules.linear.NonDynamicallyQuantizableLinear):
        return False  # nn.MultiheadAttention reads out_proj.weight directly
    return isinstance(module,
                      nn.Linear) and type(module).forward is nn.Linear.forward and not is_quantized_linear(module)


def select_linear_layers(model: nn.Module, modules: Iterable[str] | str = "all-linear",
                         exclude_modules: Iterable[str] | str | None = None,
                         include_head: bool = False) -> list[tuple[str, nn.Module]]:
    """The `(path, nn.Linear)` pairs `quantize` would quantize (same arguments), checked: no tied,
    meta or non-float weight. Raises as `quantize` does; changes nothing."""
    inner = unwrap(model)
    head = None if include_head else output_head_path(inner)
    selector = modules if isinstance(modules, str) else list(modules)
    exclude = exclude_modules if exclude_modules is None or isinstance(exclude_modules, str) else list(exclude_modules)

    chosen: list[tuple[str, nn.Module]] = []
    blocks: list[str] = []
    skipped_conv1d: list[str] = []
    for path, module in inner.named_modules():
        if not path or is_quantized_linear(module):
            continue
        if selector == "all-linear":
            if path == head:
                continue
            if _is_plain_linear(module):
                chosen.append((path, module))
            elif type(module).__name__ == "Conv1D":
                skipped_conv1d.append(path)
            continue
        if not matches(selector, path) or any(path.startswith(p + ".") for p in blocks):
            continue
        if _is_plain_linear(module):
            chosen.append((path, module))
            continue
        inside = [(f"{path}.{p}", m) for p,
                  m in module.named_modules() if p and _is_plain_linear(m) and f"{path}.{p}" != head]
        if not inside:
            raise UnsupportedModuleError(
                f"module {path!r} of type {type(module).__name__} matched modules={selector!r} but is not an "
                "nn.Linear and "
                "holds none; only nn.Linear layers can be quantized to NF4"
            )
        blocks.append(path)  # a block: every nn.Linear inside it
        chosen.extend(inside)
    if exclude is not None:
        chosen = [(p, m) for p, m in chosen if not matches(exclude, p)]
    if not chosen:
        raise TargetNotFoundError(f"quantize: modules={selector!r} matched no nn.Linear layer of "
                                  f"{type(inner).__name__}")
    if skipped_conv1d:
        warnings.warn(f"quantize: {len(skipped_conv1d)} GPT-2 Conv1D layers (e.g. {skipped_conv1d[0]!r}) stay in "
                      "full precision; "
                      "only nn.Linear layers are quantized to NF4", stacklevel=3)
    for path, module in chosen:
        w = module.weight
        if len(tied_names(inner, w)) > 1:
            raise UnsupportedModuleError(f"module {path!r}: its weight is tied to another module; quantizing it "
                                         "would untie it "
                                         "(exclude it, or untie it first)")
        if w.device.type == "meta":
            raise QuantError(f"module {path!r}: its weight is on the meta device; load the real weights before "
                             "quantizing")
        if w.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise QuantError(f"module {path!r}: NF4 needs a float32/bfloat16/float16 weight, got {w.dtype}")
    return chosen


def quantize(
    model: nn.Module,
    quant_type: str = "nf4",
    *,
    double_quant: bool = True,
    compute_dtype: torch.dtype | str | None = None,
    blocksize: int = 64,
    modules: Iterable[str] | str = "all-linear",
    exclude_modules: Iterable[str] | str | None = None,
    include_head: bool = False,
    engine: str = "bitsandbytes",
) -> nn.Module:
    """Replace the frozen linear layers of `model` by 4-bit NF4 layers, in place (QLoRA §3).

    Call it before `lorakit.inject`: LoRA layers then run on top of the 4-bit weights
    (`lorakit.layers.LoraLinear4bit`). Each selected `nn.Linear` (weight
    `(out_features, in_features)`, float32/bf16/fp16) becomes a bitsandbytes
    `Linear4bit` holding NF4 codes (4 bits per weight) and block constants (blocks of
    `blocksize` = 64; with `double_quant`, 8-bit constants in blocks of 256 plus one
    float32 per block: 4.127 bits per weight in total, else 4.5). The bias stays in its dtype.
    The original float weights are released layer by layer (peak: one extra layer).

    Args:
        quant_type: `"nf4"` (the only type; the paper's 4-bit NormalFloat).
        double_quant: quantize the block constants too (paper §3). Default True.
        compute_dtype: dtype of the 4-bit layers' matmuls (input and dequantized
            weight are cast to it; the output is cast back to the input's dtype):
            a `torch.dtype` or `"float32"`/`"bfloat16"`/`"float16"`. Default: each
            weight's own dtype (float32 for a float32 model). The paper uses bf16.
        blocksize: weights per block constant (paper: 64).
        modules: which layers: `"all-linear"` (every `nn.Linear` but the output head,
            not only LoRA targets), a list of names (whole dotted suffixes of module
            paths), or a regex matched against full paths. A matched module that is a
            block (e.g. `"model.layers.0"`) stands for every `nn.Linear` inside it.
        exclude_modules: layers to keep in full precision; same matching rules.
        include_head: also quantize the output head (the LM head; default False, as the paper).
        engine: `"bitsandbytes"`.

    Returns:
        `model`, for chaining. `lorakit.quant.bits_per_param(model)` measures the result.
    Raises:
        QuantError: bitsandbytes missing (with the pip command), a bad option, a weight
            on the meta device or of another dtype, or a model that already has
            lorakit adapters (quantize first, then inject).
        TargetNotFoundError: `modules` matched no linear layer.
        UnsupportedModuleError: `modules` names a layer that is not an `nn.Linear`
            (GPT-2 `Conv1D`, `nn.MultiheadAttention.out_proj`) or whose weight is tied.
    """
    if quant_type not in QUANT_TYPES:
        raise QuantError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    if engine not in ENGINES:
        raise QuantError(f"engine must be one of {ENGINES}, got {engine!r}")
    if isinstance(compute_dtype, str):
        names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                 "float16": torch.float16, "fp16": torch.float16}
        if compute_dtype not in names:
            raise QuantError(f"compute_dtype must be float32, bfloat16 or float16, got {compute_dtype!r}")
        compute_dtype = names[compute_dtype]
    if compute_dtype is not None and compute_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise QuantError(f"compute_dtype must be torch.float32, torch.bfloat16 or torch.float16, got {compute_dtype}")
    if not isinstance(blocksize, int) or blocksize not in (32, 64, 128, 256, 512, 1024, 2048, 4096):
        raise QuantError(f"blocksize must be a power of two from 32 to 4096, got {blocksize!r}")
    inner = unwrap(model)
    if has_adapters(inner):
        raise QuantError("this model already has lorakit adapters: call lorakit.quantize before lorakit.inject / "
                         "load_adapter")
    bnb()  # fail before changing anything
    chosen = select_linear_layers(inner, modules, exclude_modules, include_head)
    tables: dict[str, torch.Tensor] = {}
    for path, module in chosen:
        q = make_linear4bit(module, double_quant=double_quant, blocksize=blocksize, compute_dtype=compute_dtype,
                            quant_type=quant_type)
        share_tables(q, tables)
        replace_module(inner, path, q)  # the float weight is freed here unless the caller holds the old module
    return model


@dataclass
class QuantReport:
    """What the 4-bit layers of a model store, counted from their tensors.

    Attributes:
        layers: number of 4-bit linear layers.
        params: logical weights they hold (`sum(out_features * in_features)`).
        bytes_by_role: bytes per kind of tensor, each distinct tensor counted once:
            `codes` (packed NF4, 2 per byte), `absmax` (block constants: uint8 with double
            quantization, else float32), `nested_absmax` (float32, one per 256 constants),
            `offset` (float32 mean of the constants), `quant_map` / `nested_quant_map`
            (the 16-level NF4 table and the 256-entry 8-bit table).
        double_quant: whether the layers use double quantization (None if mixed).
        bits_per_param: `8 * sum(bytes_by_role) / params`. QLoRA §3: 4.127 with double
            quantization, 4.5 without.
        bits_per_param_format: the same without the two lookup tables, which are
            constants of the format rather than data (the paper's count).
    """

    layers: int
    params: int
    bytes_by_role: dict[str, int] = field(default_factory=dict)
    double_quant: bool | None = None

    @property
    def bytes(self) -> int:
        return sum(self.bytes_by_role.values())

    @property
    def bits_per_param(self) -> float:
        return 8.0 * self.bytes / self.params if self.params else float("nan")

    @property
    def bits_per_param_format(self) -> float:
        data = sum(v for k, v in self.bytes_by_role.items() if not k.endswith("quant_map"))
        return 8.0 * data / self.params if self.params else float("nan")

    def as_dict(self) -> dict:
        return {"layers": self.layers, "params": self.params, "bytes": self.bytes,
                "bytes_by_role": dict(self.bytes_by_role),
                "double_quant": self.double_quant, "bits_per_param": self.bits_per_param,
                "bits_per_param_format": self.bits_per_param_format}


def bits_per_param(model: nn.Module) -> QuantReport:
    """Count the stored tensors of every 4-bit linear layer of `model` (see `QuantReport`).

    Every distinct tensor (by storage) counts once, so lookup tables shared between
    layers count once. Raises `QuantError` if the model has no 4-bit layer.
    """
    layers = quantized_layers(model)
    if not layers:
        raise QuantError(f"{type(model).__name__} has no 4-bit layers (call lorakit.quantize first)")
    seen: set[tuple[int, int]] = set()
    by_role: dict[str, int] = {}
    params = 0
    nested = set()
    for _, module in layers:
        state = module.weight.quant_state
        params += int(torch.Size(state.shape).numel())
        nested.add(bool(state.nested))
        for role, t in stored_tensors(module).items():
            key = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.device.type != "meta" else (id(t), 0)
            if key in seen:
                continue
            seen.add(key)
            by_role[role] = by_role.get(role, 0) + nbytes(t)
    return QuantReport(len(layers), params, by_role, nested.pop() if len(nested) == 1 else None)


def base_weight_memory(model: nn.Module) -> dict:
    """Resident bytes of `model`'s base weights (LoRA and `modules_to_save` copies excluded).

    Counts each distinct storage once: parameters and buffers of the base model, plus the
    quantization state of 4-bit layers. Returns a dict with
    `total_bytes`; `linear_params` / `linear_bytes` (the `nn.Linear` and 4-bit linear
    layers, LM head excluded unless quantized, plus `correction_bytes`: the tensors of a pinned
    frozen correction, `lorakit.quant.qera`, which belong to the base); `linear_bf16_bytes` (`2 * linear_params`,
    what they take in bf16); `linear_bf16_ratio` (`linear_bf16_bytes / linear_bytes`);
    `other_bytes` (embeddings, norms, an unquantized head, ...); `total_bf16_bytes`
    (every base parameter in bf16) and `total_bf16_ratio`.
    """
    inner = unwrap(model)
    head = output_head_path(inner)
    pinned = get_state(inner).pinned if has_adapters(inner) else ()
    seen: set[int] = set()
    adapter_ids = set()
    corrections = []  # a pinned frozen correction (lorakit.quant.qera) is part of the base
    for m in inner.modules():
        if isinstance(m, LoraLayer):
            for table in ("lora_A", "lora_B", "lora_magnitude_vector"):
                if table in m._modules:
                    for name, t in m._modules[table].items():
                        tensors = list(t.parameters()) if isinstance(t, nn.Module) else [t]
                        adapter_ids |= {id(p) for p in tensors}
                        if name in pinned:
                            corrections += tensors
        if isinstance(m, ModulesToSave):
            adapter_ids |= {id(p) for p in m.modules_to_save.parameters()}

    def add(t: torch.Tensor | None, base: bool = False) -> int:
        if t is None or (id(t) in adapter_ids and not base):
            return 0
        key = t.untyped_storage().data_ptr() if t.device.type != "meta" else id(t)
        if key in seen:
            return 0
        seen.add(key)
        return t.untyped_storage().nbytes() if t.device.type != "meta" else nbytes(t)

    linear_bytes = linear_params = other_bytes = logical_params = 0
    for path, module in inner.named_modules():
        path_in_base = path.replace(".base_layer", "")
        if is_quantized_linear(module):
            state = module.weight.quant_state
            n = int(torch.Size(state.shape).numel())
            linear_params += n
            logical_params += n
            linear_bytes += sum(add(t) for t in stored_tensors(module).values())
            if module.bias is not None:
                logical_params += module.bias.numel()
                other_bytes += add(module.bias)
            continue
        own = list(module._parameters.items()) + list(module._buffers.items())
        is_lin = isinstance(module, nn.Linear) and path_in_base != head and not isinstance(module, (LoraLayer,))
        for name, t in own:
            if t is None or id(t) in adapter_ids:
                continue
            b = add(t)
            if name == "weight" and is_lin:
                linear_bytes += b
                linear_params += t.numel() if b else 0
            else:
                other_bytes += b
            if b and isinstance(t, nn.Parameter):
                logical_params += t.numel()
    correction_bytes = sum(add(t, base=True) for t in corrections)
    linear_bytes += correction_bytes
    total = linear_bytes + other_bytes
    return {
        "total_bytes": total,
        "correction_bytes": correction_bytes,
        "linear_params": linear_params,
        "linear_bytes": linear_bytes,
        "linear_bf16_bytes": 2 * linear_params,
        "linear_bf16_ratio": (2 * linear_params / linear_bytes) if linear_bytes else None,
        "other_bytes": other_bytes,
        "params": logical_params,
        "total_bf16_bytes": 2 * logical_params,
        "total_bf16_ratio": (2 * logical_params / total) if total else None,
    }
