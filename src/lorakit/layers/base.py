"""`LoraLayer`: the state every adapted layer shares (adapters, activity, merge).

A `LoraLayer` owns the original module as `base_layer` and, per adapter name,
`lora_A[name]` and `lora_B[name]` parameters. Subclasses (one per layer kind) say how
their A and B act on an input (`project_A`, `project_B`), their shapes and layouts;
the equation itself is `lorakit.ops.lora`. Variants (plain LoRA, DoRA) are strategies
that use the layer through the `lorakit.variants.AdaptedLayer` protocol.

Merge rule (paper §4.2, made exact): the merged weight is always computed from the
saved original `W0` as `round(W0 + sum(delta_weight))`, in float32 (float64 for a
float64 base), rounded once into the base dtype. Unmerge writes the saved `W0` back,
bit for bit; nothing is ever subtracted.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
from torch import nn

from ..errors import AdapterNotFoundError, LoraError, MergeError
from ..ops import lora as ops
from ..variants import Variant, get_variant


class LoraLayer(nn.Module):
    """Base class of adapted layers. Not used directly; see `LoraLinear`, `LoraEmbedding`, `LoraConv`.

    Attributes:
        base_layer: the original module, frozen, weights unchanged unless merged.
        lora_A, lora_B: `nn.ParameterDict` of adapter name -> tensor.
        r, lora_alpha, scaling, lora_dropout: dicts of adapter name -> value.
        active_adapters: names whose update the forward applies (merged or not).
        merged_adapters: names currently folded into `base_layer`'s weight.
        variant_cache: variants' inference caches, dropped on `train()`/`eval()` and moves.
    Class attributes: `file_keys` (PEFT key suffixes of A and B), `supported_variants` (names of the
    variants the kind supports), `per_expert` (True for `LoraExperts`, whose `lora_A[name]` /
    `lora_B[name]` hold one pair per expert and per expert weight: the tools that treat A and B as one
    `(r, in)` / `(out, r)` pair, `combine` and `mixed_batch`, refuse it).
    """

    file_keys: tuple[str, str] = ("lora_A.weight", "lora_B.weight")
    supported_variants: tuple[str, ...] = ("lora",)
    per_expert = False

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_B_bias = nn.ParameterDict()  # PEFT's lora_bias: adapter -> b_B (out_features,), file key lora_B.bias
        # The parameter tables as plain attributes: the fast path then reads them with a
        # dict access instead of two nn.Module.__getattr__ calls per forward.
        self._tables = (self.lora_A._parameters, self.lora_B._parameters, base_layer._parameters)
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}  # what the forward and merges use: configured scaling x scale factor
        self.configured_scaling: dict[str, float] = {}  # alpha / r (alpha / sqrt(r) with rsLoRA), from the config
        self.scale_factor: dict[str, float] = {}  # adapter strength at inference (set_scale), 1 by default
        self.lora_dropout: dict[str, float] = {}
        self.variants: dict[str, Variant] = {}
        self.variant_cache: dict = {}
        self.active_adapters: tuple[str, ...] = ()
        self.merged_adapters: tuple[str, ...] = ()
        self.disabled = False
        # Adapters the forward computes explicitly: active, not merged, not disabled.
        # Kept precomputed so forward has no per-call selection logic.
        self._forward_adapters: tuple[str, ...] = ()
        self._weight_backup: torch.Tensor | None = None
        self._bias_backup: torch.Tensor | None = None
        # the base weight this layer shares with another module (tied embeddings), while it merges into a copy
        self.tied_weight: nn.Parameter | None = None
        self.shares_weight = False  # set once a merge found the weight tied: every later merge unties first
        self._mixed = None  # a `lorakit.layers.rows.MixedRows` inside `mixed_batch`, else None

    # ------------------------------------------------------------------ kind-specific
    @classmethod
    def features(cls, base: nn.Module) -> tuple[int, int]:
        """`(in_features, out_features)` of a base module of this kind (A: `(r, in)`, B: `(out, r)`)."""
        raise NotImplementedError

    @classmethod
    def shapes(cls, base: nn.Module, r: int, slices=None) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Shapes of (A, B) for rank `r` on `base` (`slices`: see `LoraLinear`)."""
        in_f, out_f = cls.features(base)
        return (r, in_f), (out_f, r)

    @staticmethod
    def check_rank(module: nn.Module, r: int) -> str | None:
        """Why rank `r` cannot adapt `module` (None if it can)."""
        return None

    @property
    def in_features(self) -> int:
        return self.features(self.base_layer)[0]

    @property
    def out_features(self) -> int:
        return self.features(self.base_layer)[1]

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight (merged adapters included while merged)."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    def lora_shapes(self, r: int, slices=None) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return self.shapes(self.base_layer, r, slices)

    # ------------------------------------------------------------------ adapter files (PEFT layout; lorakit.io)
    @classmethod
    def file_layout(cls, base: nn.Module, r: int, parameters=None) -> dict[str, tuple[str, tuple[int, ...]]]:
        """`{file key suffix: (attribute, shape)}` of A and B of rank `r` on `base` in an adapter file
        (`parameters`: the weights adapted, for kinds with several)."""
        shape_a, shape_b = cls.shapes(base, r)
        key_a, key_b = cls.file_keys
        return {key_a: ("lora_A", tuple(shape_a)), key_b: ("lora_B", tuple(shape_b))}

    def file_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """Adapter `name`'s tensors as an adapter file holds them, by key suffix after the module path."""
        key_a, key_b = self.file_keys
        out = {key_a: self.lora_A[name], key_b: self.lora_B_dense(name)}  # sliced B: the PEFT-readable dense form
        for attr, tensor in self.adapter_parameters(name).items():
            if attr not in ("lora_A", "lora_B"):  # the bias of B (lora_B.bias), DoRA's magnitude, ...
                out[attr] = tensor
        return out

    def load_file_tensor(self, name: str, attr: str, tensor: torch.Tensor) -> None:
        """Copy a file tensor (already checked against `file_layout`) into adapter `name`'s `attr`."""
        target = getattr(self, attr)[name] if attr in ("lora_A", "lora_B") else self.adapter_parameters(name)[attr]
        with torch.no_grad():
            target.copy_(tensor.to(dtype=target.dtype, device=target.device))

    def delta_weight(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """`scaling * B @ A` in the base weight's layout, computed in `dtype` (default float32)."""
        raise NotImplementedError

    def project_A(self, h: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
        """How A acts on an input: `(..., in) -> (..., r)` (a matrix product unless overridden)."""
        return ops.matmul_A(h, A)

    def project_B(self, xa: torch.Tensor, B: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """How B (and its bias `(out,)`, PEFT's `lora_bias`) acts: `(..., r) -> (..., out)`."""
        return ops.matmul_B(xa, B, bias)

    def to_oi(self, w: torch.Tensor) -> torch.Tensor:
        """A tensor in the base weight's layout as the `(out_features, in_features)` matrix (a view where possible)."""
        raise NotImplementedError

    def from_oi(self, w: torch.Tensor) -> torch.Tensor:
        """Inverse of `to_oi`: an `(out_features, in_features)` matrix in the base weight's layout."""
        raise NotImplementedError

    def as_lora_input(self, x: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
        """The input in A's dtype (token ids stay as they are)."""
        return x.to(A.dtype)

    def lora_factors(self, name: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(A, B)` as the forward uses them for input `x`."""
        return self.lora_A[name], self.lora_B[name]

    def lora_bias(self, name: str) -> torch.Tensor | None:
        """The bias of B of adapter `name` (PEFT's `lora_bias`), or None."""
        return self.lora_B_bias[name] if name in self.lora_B_bias else None

    # ------------------------------------------------------------------ the low-rank term (lorakit.ops.lora)
    def lora_input(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """The LoRA branch's input: `dropout(x)` while training with dropout, else `x` itself (same object)."""
        return ops.dropout(x, self.lora_dropout[name], self.training)

    def lora_output(self, name: str, h: torch.Tensor) -> torch.Tensor:
        """`scaling * B(A(h))` for an already dropped-out input `h`: `(..., out_features)`, adapter dtype."""
        A, B = self.lora_factors(name, h)
        return ops.low_rank(self.as_lora_input(h, A), A, B, self.scaling[name], self.lora_bias(name),
                            project_A=self.project_A, project_B=self.project_B)

    def add_lora(self, result: torch.Tensor, name: str, x: torch.Tensor) -> torch.Tensor:
        """`result + scaling * B(A(dropout(x)))` for one adapter (paper eq. 3)."""
        A, B = self.lora_factors(name, x)
        h = self.lora_input(name, self.as_lora_input(x, A))
        return ops.add_low_rank(result, h, A, B, self.scaling[name], self.lora_bias(name), project_A=self.project_A,
                                project_B=self.project_B)

    def base_output(self, h: torch.Tensor) -> torch.Tensor:
        """The base layer's output for `h` without its bias."""
        out = self.base_layer(h)
        return out if self.bias is None else out - self.bias

    # ------------------------------------------------------------------ adapters
    def init_lora(self, name: str, init: str) -> None:
        """Initialise A and B so that the update is zero (paper §4.1); `init="random"`: B random too."""
        A, B = self.lora_A[name], self.lora_B[name]
        if A.device.type == "meta":
            return
        with torch.no_grad():
            if init == "gaussian":
                nn.init.normal_(A, std=1.0 / self.r[name])
            else:  # "kaiming", as nn.Linear initialises its weight
                nn.init.kaiming_uniform_(A, a=math.sqrt(5))
            if init == "random":  # as PEFT's init_lora_weights=False leaves B: nn.Linear's default
                nn.init.kaiming_uniform_(B, a=math.sqrt(5))
            else:
                nn.init.zeros_(B)

    def add_adapter(self, name: str, r: int, alpha: float, scaling: float, dropout: float, init: str = "kaiming",
                    variant: Variant | None = None, dtype: torch.dtype | None = None, slices=None,
                    weight_init: Callable[[LoraLayer, str], None] | None = None,
                    lora_bias: bool = False) -> None:
        """Create adapter `name` with rank `r`; parameters live on the base weight's device.

        `lora_bias`: also a trainable bias on B, `(out_features,)`, starting at zero (PEFT's `lora_bias`).
        `init` is `kaiming`, `gaussian` or `random`; `weight_init(layer, name)`, if given, runs
        next (a weight-derived init such as PiSSA, passed in by `lorakit.inject`), then the
        variant's own init. `dtype` defaults to float32 for a half-precision base (stable
        training, as PEFT's `autocast_adapter_dtype`), else the base weight's dtype.
        """
        w = self.weight
        if dtype is None:
            dtype = torch.float32 if w.dtype in (torch.float16,
                                                 torch.bfloat16) or not w.dtype.is_floating_point else w.dtype
        if slices is not None:
            self.set_slices(name, slices)
        shape_a, shape_b = self.lora_shapes(r, self.slice_spec(name))
        self.lora_A[name] = nn.Parameter(torch.empty(shape_a, dtype=dtype, device=w.device))
        self.lora_B[name] = nn.Parameter(torch.empty(shape_b, dtype=dtype, device=w.device))
        if lora_bias:
            self.lora_B_bias[name] = nn.Parameter(torch.zeros(self.out_features, dtype=dtype, device=w.device))
        self.r[name] = r
        self.lora_alpha[name] = alpha
        self.scaling[name] = self.configured_scaling[name] = scaling
        self.scale_factor[name] = 1.0
        self.lora_dropout[name] = dropout
        self.variants[name] = variant if variant is not None else get_variant("lora")
        self.init_lora(name, init)
        if weight_init is not None:
            weight_init(self, name)
        self.variants[name].init(self, name)

    def adapter_table(self, table: str) -> nn.ParameterDict:
        """The per-adapter tensor table `table` (e.g. DoRA's `lora_magnitude_vector`), created on first use."""
        found = self._modules.get(table)
        if found is None:
            found = nn.ParameterDict()
            self.add_module(table, found)
        return found

    def set_slices(self, name: str, slices) -> None:
        raise LoraError("per-slice adapters (fused_slices) need a Linear/Conv1D layer, not "
                        f"{type(self.base_layer).__name__}")

    def slice_spec(self, name: str):
        """The resolved per-slice layout of adapter `name`, or None (see `LoraLinear`)."""
        return None

    def lora_B_dense(self, name: str) -> torch.Tensor:
        """B in the plain `(out, r)` form, whatever the storage (see `LoraLinear` slices)."""
        return self.lora_B[name]

    def adapter_parameters(self, name: str) -> dict[str, nn.Parameter]:
        """The trainable tensors of adapter `name`, by attribute name (`lora_A`, `lora_B`, ...)."""
        out = {"lora_A": self.lora_A[name], "lora_B": self.lora_B[name]}
        if name in self.lora_B_bias:
            out["lora_B.bias"] = self.lora_B_bias[name]
        out.update(self.variants[name].parameters(self, name))
        return out

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            self.unmerge()
        self.variants[name].delete(self, name)
        for table in (self.lora_A, self.lora_B):
            del table[name]
        if name in self.lora_B_bias:
            del self.lora_B_bias[name]
        for table in (self.r, self.lora_alpha, self.scaling, self.configured_scaling, self.scale_factor,
                      self.lora_dropout, self.variants):
            del table[name]
        self.active_adapters = tuple(a for a in self.active_adapters if a != name)
        self._refresh()

    @property
    def adapter_names(self) -> tuple[str, ...]:
        return tuple(self.lora_A.keys())

    def set_active(self, names: Iterable[str]) -> None:
        """Make exactly `names` (those this layer has) active; merged adapters leaving the set are unmerged."""
        names = tuple(n for n in names if n in self.lora_A)
        if any(m not in names for m in self.merged_adapters):
            self.unmerge()
        self.active_adapters = names
        self._refresh()

    def set_disabled(self, disabled: bool) -> None:
        if disabled and self.merged_adapters:
            raise MergeError("unmerge before disabling adapters (lorakit.disabled does this for you)")
        self.disabled = disabled
        self._refresh()

    def _refresh(self) -> None:
        self._forward_adapters = () if self.disabled else tuple(
            a for a in self.active_adapters if a not in self.merged_adapters
        )

    # ------------------------------------------------------------------ adapter strength (PEFT's names)
    def set_scale(self, adapter: str, scale: float) -> None:
        """Scale adapter `adapter` to `scale` times its configured scaling (`alpha / r`, or `alpha / sqrt(r)`
        with rsLoRA; never recomputed from `alpha / r`). A merged adapter is merged again from `W0`, so merges
        honour it; `set_scale(adapter, 1.0)` gives back the configured scaling exactly. A layer without the
        adapter ignores it (as PEFT)."""
        if adapter in self.lora_A:
            self._rescale(adapter, scale)

    def scale_layer(self, scale: float) -> None:
        """Multiply the scale of every active adapter of this layer by `scale` (PEFT's `scale_layer`)."""
        for name in self.active_adapters:
            self._rescale(name, self.scale_factor[name] * scale)

    def unscale_layer(self, scale: float | None = None) -> None:
        """Divide the scale of every active adapter by `scale`, or with None reset it to 1 (PEFT's `unscale_layer`)."""
        for name in self.active_adapters:
            self._rescale(name, 1.0 if scale is None else self.scale_factor[name] / scale)

    def _rescale(self, name: str, factor: float) -> None:
        merged = self.merged_adapters
        if name in merged:
            self.unmerge()  # W0 back bit for bit, then merged again at the new scale
        self.scale_factor[name] = factor
        self.scaling[name] = self.configured_scaling[name] * factor
        self.variant_cache.clear()
        if name in merged:
            self.merge(merged)

    # ------------------------------------------------------------------ merge
    def merge(self, names: Iterable[str] | None = None) -> None:
        """Fold adapters (default: the active ones) into the base weight, rounding once.

        Merging an adapter that is already merged is a no-op. Raises
        `AdapterNotFoundError` for a name this layer does not have.
        """
        new = self.to_merge(names)
        if not new:
            return
        if self.shares_weight and self.tied_weight is None and not self.merged_adapters:
            self.untie_weight()
        self.check_bias_merge(new)
        w = self.weight
        if self._weight_backup is None:
            self._weight_backup = w.detach().clone()
        merged = self.merged_adapters + new
        with torch.no_grad():
            w.copy_(self.merged_weight(merged))
        self._merge_bias(merged)
        self.merged_adapters = merged
        self._refresh()

    def to_merge(self, names: Iterable[str] | None) -> tuple[str, ...]:
        """The adapters of `names` (default: the active ones) not merged yet; checks they exist."""
        names = tuple(self.active_adapters if names is None else names)
        for n in names:
            if n not in self.lora_A:
                raise AdapterNotFoundError(f"adapter {n!r} not in this layer (has {list(self.lora_A)})")
        return tuple(n for n in names if n not in self.merged_adapters)

    def check_bias_merge(self, names) -> None:
        """`MergeError` if an adapter of `names` has a bias of B but the base layer has no bias to merge it into."""
        with_bias = [n for n in names if n in self.lora_B_bias]
        if with_bias and self.bias is None:
            raise MergeError(f"adapter(s) {with_bias} have lora_bias, but the base {type(self.base_layer).__name__} "
                             "has no bias to merge it into (the adapter works unmerged)")

    def merged_bias(self, names) -> torch.Tensor | None:
        """The base bias with the biases of B of `names` folded in (`b + sum(scaling * b_B)`), rounded once;
        None when no adapter of `names` has one."""
        terms = [(self.lora_B_bias[n].detach(), self.scaling[n]) for n in names if n in self.lora_B_bias]
        if not terms:
            return None
        b0 = self._bias_backup if self._bias_backup is not None else self.bias.detach()
        return ops.merged_bias(b0, terms, ops.compute_dtype(b0.dtype))

    def _merge_bias(self, merged) -> None:
        bias = self.merged_bias(merged)
        if bias is None:
            return
        if self._bias_backup is None:
            self._bias_backup = self.bias.detach().clone()
        with torch.no_grad():
            self.bias.copy_(bias)

    def unmerged_weight(self) -> torch.Tensor:
        """`W0`: the base weight without merged adapters, in the base layout (no grad)."""
        return self._weight_backup if self._weight_backup is not None else self.weight.detach()

    def merged_weight(self, names: Iterable[str]) -> torch.Tensor:
        """The base weight with `names` folded in, from the original `W0`, in the base dtype."""
        w0 = self.unmerged_weight()
        acc = w0.to(ops.compute_dtype(w0.dtype))
        for n in names:
            acc = self.variants[n].merged_weight(self, n, acc)
        return acc.to(w0.dtype)

    def untie_weight(self) -> None:
        """Merge into a copy of the base weight from now on; `unmerge` gives back the shared tensor itself."""
        w = self.base_layer.weight
        self.tied_weight, self.shares_weight = w, True
        self.base_layer.weight = nn.Parameter(w.detach().clone(), requires_grad=w.requires_grad)

    def unmerge(self) -> None:
        """Write the saved original weight back, bit for bit (and re-tie a tied one). No-op when nothing is merged."""
        if not self.merged_adapters:
            return
        if self.tied_weight is not None:
            self.base_layer.weight, self.tied_weight = self.tied_weight, None
        else:
            with torch.no_grad():
                self.weight.copy_(self._weight_backup)
        if self._bias_backup is not None:
            with torch.no_grad():
                self.bias.copy_(self._bias_backup)
        self._weight_backup = self._bias_backup = None
        self.merged_adapters = ()
        self._refresh()

    def merged_module(self, names: Iterable[str]) -> nn.Module:
        """The plain base module with `names` folded in (for `merge_and_unload`); the layer is spent after."""
        names = list(names)
        if names:
            self.check_bias_merge(names)
            merged, bias = self.merged_weight(names), self.merged_bias(names)
            with torch.no_grad():
                self.weight.copy_(merged)
                if bias is not None:
                    self.bias.copy_(bias)
        elif self.merged_adapters:
            self.unmerge()
        return self.base_layer

    @staticmethod
    def plain_base(module: nn.Module) -> nn.Module | None:
        """A plain (dense) equivalent of a base module of this kind, or None if it is plain already."""
        return None

    # ------------------------------------------------------------------ forward
    def add_lora_mixed(self, result: torch.Tensor, x: torch.Tensor, rows) -> torch.Tensor:
        """Per-row adapters (`lorakit.mixed_batch`); generic version: one pass per adapter in use."""
        rows.check(x)
        out = result
        for slot, name in enumerate(rows.names[:-1]):
            mask = (rows.index == slot).view(-1, *([1] * (result.dim() - 1)))
            out = torch.where(mask, self.add_lora(result, name, x), out)
        return out

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self._mixed is not None:
            return self.add_lora_mixed(result, x, self._mixed) if self._mixed.A is not None else result
        for name in self._forward_adapters:
            result = self.variants[name].forward(self, name, x, result)
        return result

    def extra_repr(self) -> str:
        return "; ".join(f"{n}: r={self.r[n]}, scaling={self.scaling[n]:g}" for n in self.lora_A)

    def train(self, mode: bool = True):
        self.variant_cache.clear()
        return super().train(mode)

    def _apply(self, fn, recurse=True):  # keep the merge backup on the weight's device/dtype
        self.variant_cache.clear()
        out = super()._apply(fn, recurse)
        if self._weight_backup is not None:
            self._weight_backup = fn(self._weight_backup)
        if self._bias_backup is not None:
            self._bias_backup = fn(self._bias_backup)
        return out
