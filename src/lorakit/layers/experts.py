"""LoRA on the 3-D expert weights of a transformers mixture-of-experts layer (`LoraExperts`).

transformers 5 keeps a mixture-of-experts layer's experts in one module with 3-D parameters:
Mixtral's `MixtralExperts` has `gate_up_proj: (experts, 2 * intermediate, hidden)` and
`down_proj: (experts, hidden, intermediate)`; gpt-oss stores them transposed (`(experts, in, out)`,
with biases). Every such class is declared to transformers with `use_experts_implementation`, which
records its layout (`has_gate`, `is_transposed`, `has_bias`, `has_post_expert_norm`); those attributes
are what this kind reads. One `LoraExperts` wraps the whole experts module; an adapter adapts any of
its expert weights (`parameters`), each with one low-rank pair per expert. The forward groups the
routed `(token, expert)` rows by expert and computes every LoRA term on each expert's rows only
(`lorakit.ops.experts`); with no adapter to compute (disabled, merged, none active) the experts
module runs its own forward, untouched.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

from ..errors import LoraError, UnsupportedModuleError
from ..ops import experts as moe
from ..ops import lora as ops
from ..variants import Variant, get_variant
from .base import LoraLayer

# the 3-D expert weights the routed forward knows how to apply, in the order they run
EXPERT_WEIGHTS = ("gate_up_proj", "up_proj", "down_proj")


def is_experts(module: nn.Module) -> bool:
    """True for a transformers experts module declared with `use_experts_implementation` (3-D expert weights)."""
    down = module._parameters.get("down_proj")
    return (isinstance(getattr(module, "has_gate", None), bool) and isinstance(getattr(module, "is_transposed", None),
                                                                                bool)
            and isinstance(getattr(module, "num_experts", None), int) and down is not None and down.dim() == 3)


def expert_weights(module: nn.Module) -> tuple[str, ...]:
    """The names of `module`'s adaptable 3-D expert weights, in registration order (PEFT's nesting order)."""
    return tuple(n for n, p in module._parameters.items() if n in EXPERT_WEIGHTS and p is not None and p.dim() == 3)


def weight_features(module: nn.Module, name: str) -> tuple[int, int, int]:
    """`(experts, in_features, out_features)` of expert weight `name` (stored `(experts, out, in)`, or
    `(experts, in, out)` when the module is transposed)."""
    e, d1, d2 = getattr(module, name).shape
    return (e, d1, d2) if module.is_transposed else (e, d2, d1)


class LoraExperts(LoraLayer):
    """LoRA on the expert weights of one mixture-of-experts layer; each adapted weight gets one pair per expert.

    For adapter `name` and adapted weight `p` (`targets[name]`, e.g. `("gate_up_proj", "down_proj")`):
    `lora_A[name][p]: (experts, r, in)`, `lora_B[name][p]: (experts, out, r)`, and the update of expert
    `e` is `delta_weight_e = scaling * B_e @ A_e: (out, in)` (stored in the base weight's layout by
    `delta_weight`). Forward (`hidden_states: (tokens, hidden)`, `top_k_index: (tokens, k)` int,
    `top_k_weights: (tokens, k)`, as transformers' experts modules are called): each routed row
    `(token, expert e)` gets `W_e x + scaling * B_e A_e dropout(x)` in every adapted projection, and the
    rows are combined with the routing weights; the router is the model's and stays frozen. Merging
    folds every expert's update into its slice of the weight, one expert at a time, rounding once.

    In adapter files (PEFT's `lora.ParamWrapper` layout) weight `p` is `<path>.[base_layer.]*lora_A.weight`
    `(experts * r, in)` (row `e * r + i` is `A_e[i]`) and `.lora_B.weight` `(out, r * experts)` (column
    `i * experts + e` is `B_e[:, i]`), with one `base_layer.` per adapted weight registered after `p`.
    Plain LoRA only (no DoRA, `lora_bias`, `fused_slices` or PiSSA/OLoRA init, as in PEFT).
    """

    per_expert = True

    def __init__(self, base_layer: nn.Module):
        if getattr(base_layer, "_is_expert_parallel", False):
            raise UnsupportedModuleError(f"{type(base_layer).__name__} is sharded by expert parallelism; LoRA on its "
                                         "experts needs the whole expert stack")
        super().__init__(base_layer)
        self.lora_A = nn.ModuleDict()  # adapter -> ParameterDict: weight name -> A (experts, r, in)
        self.lora_B = nn.ModuleDict()  # adapter -> ParameterDict: weight name -> B (experts, out, r)
        self.targets: dict[str, tuple[str, ...]] = {}  # adapter -> the expert weights it adapts
        self._backups: dict[str, torch.Tensor] = {}  # expert weight -> W0, while merged

    # ------------------------------------------------------------------ layout
    @classmethod
    def features(cls, base: nn.Module) -> tuple[int, int]:
        """`(hidden, hidden)`: the experts module maps hidden states to hidden states."""
        hidden = weight_features(base, "down_proj")[2]
        return hidden, hidden

    @classmethod
    def weight_shapes(cls, base: nn.Module, name: str, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Shapes of (A, B) of rank `r` on expert weight `name`: `(experts, r, in)`, `(experts, out, r)`."""
        e, in_f, out_f = weight_features(base, name)
        return (e, r, in_f), (e, out_f, r)

    @classmethod
    def file_layout(cls, base: nn.Module, r: int, parameters: Iterable[str] | None = None
                    ) -> dict[str, tuple[str, tuple[int, ...]]]:
        """`{file key suffix: (attribute, shape in the file)}` of an adapter of rank `r` on `parameters` (PEFT's
        nesting: the last adapted weight is outermost)."""
        names = [n for n in expert_weights(base) if parameters is None or n in parameters]
        out = {}
        for depth, name in zip(range(len(names) - 1, -1, -1), names):
            e, in_f, out_f = weight_features(base, name)
            nest = "base_layer." * depth
            out[f"{nest}lora_A.weight"] = (f"lora_A.{name}", (e * r, in_f))
            out[f"{nest}lora_B.weight"] = (f"lora_B.{name}", (out_f, r * e))
        return out

    @staticmethod
    def to_file(attr: str, tensor: torch.Tensor) -> torch.Tensor:
        """A stored A `(experts, r, in)` or B `(experts, out, r)` in PEFT's file layout (see the class docstring)."""
        e = tensor.shape[0]
        if attr.startswith("lora_A"):
            return tensor.reshape(e * tensor.shape[1], tensor.shape[2])
        return tensor.permute(1, 2, 0).reshape(tensor.shape[1], -1)

    @staticmethod
    def from_file(attr: str, tensor: torch.Tensor, experts: int) -> torch.Tensor:
        """Inverse of `to_file`, for a base with `experts` experts."""
        if attr.startswith("lora_A"):
            return tensor.reshape(experts, -1, tensor.shape[1])
        return tensor.reshape(tensor.shape[0], -1, experts).permute(2, 0, 1)

    def file_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """Adapter `name`'s tensors in PEFT's file layout, by key suffix after the module path."""
        layout = self.file_layout(self.base_layer, self.r[name], self.targets[name])
        params = self.adapter_parameters(name)
        return {suffix: self.to_file(attr, params[attr]) for suffix, (attr, _) in layout.items()}

    def load_file_tensor(self, name: str, attr: str, tensor: torch.Tensor) -> None:
        """Copy a file tensor (`file_layout`'s shape) into adapter `name`'s `attr`."""
        target = self.adapter_parameters(name)[attr]
        with torch.no_grad():
            target.copy_(self.from_file(attr, tensor, target.shape[0]).to(dtype=target.dtype, device=target.device))

    def expert_weight(self, name: str) -> nn.Parameter:
        """The base module's expert weight `name` as it stands (merged adapters included while merged)."""
        return getattr(self.base_layer, name)

    @property
    def weight(self) -> torch.Tensor:
        raise LoraError("an experts layer holds several expert weights: use expert_weight(name), e.g. "
                        f"{expert_weights(self.base_layer)}")

    @property
    def bias(self) -> None:
        return None  # expert biases (gpt-oss) are not adapted; nothing is merged into them

    # ------------------------------------------------------------------ adapters
    def add_adapter(self, name: str, r: int, alpha: float, scaling: float, dropout: float, init: str = "kaiming",
                    variant: Variant | None = None, dtype: torch.dtype | None = None, slices=None, weight_init=None,
                    lora_bias: bool = False, parameters: Iterable[str] | None = None) -> None:
        """Create adapter `name` of rank `r` on expert weights `parameters` (default: all of them).

        A and B live on the weights' device, in float32 for a half-precision base (else its dtype).
        `init`: `kaiming` (A as PEFT's `nn.Linear(in, r * experts)`: uniform with bound `1/sqrt(in)`),
        `gaussian` (A ~ N(0, 1/r^2)), `random` (B too: bound `1/sqrt(r * experts)`); B = 0 otherwise.

        Raises:
            LoraError: a `variant` other than plain LoRA, `slices`, `weight_init`, `lora_bias`, or an
                unknown or repeated weight name.
        """
        names = expert_weights(self.base_layer)
        wanted = names if parameters is None else tuple(n for n in names if n in set(parameters))
        unknown = sorted(set(parameters or ()) - set(names))
        if unknown or not wanted:
            raise LoraError(f"{type(self.base_layer).__name__} has no adaptable expert weight {unknown or parameters} "
                            f"(has {list(names)})")
        if (variant is not None and variant.name != "lora") or slices is not None or weight_init is not None \
                or lora_bias:
            raise LoraError("expert weights take plain LoRA only (no DoRA, fused_slices, PiSSA/OLoRA or lora_bias)")
        w = self.expert_weight(wanted[0])
        if dtype is None:
            dtype = torch.float32 if w.dtype in (torch.float16, torch.bfloat16) or not w.is_floating_point() \
                else w.dtype
        tables = [nn.ParameterDict(), nn.ParameterDict()]
        for p in wanted:
            for table, shape in zip(tables, self.weight_shapes(self.base_layer, p, r)):
                table[p] = nn.Parameter(torch.empty(shape, dtype=dtype, device=w.device))
        self.lora_A[name], self.lora_B[name] = tables
        self.targets[name] = wanted
        self.r[name], self.lora_alpha[name] = r, alpha
        self.scaling[name] = self.configured_scaling[name] = scaling
        self.scale_factor[name] = 1.0
        self.lora_dropout[name] = dropout
        self.variants[name] = get_variant("lora")
        self.init_lora(name, init)

    def init_lora(self, name: str, init: str) -> None:
        """Initialise every expert's pair so that the update is zero (paper §4.1), as PEFT does for a 3-D weight."""
        with torch.no_grad():
            for p in self.targets[name]:
                A, B = self.lora_A[name][p], self.lora_B[name][p]
                if A.device.type == "meta":
                    continue
                if init == "gaussian":
                    nn.init.normal_(A, std=1.0 / self.r[name])
                else:  # kaiming_uniform(a=sqrt(5)) of an (experts * r, in) matrix: bound 1 / sqrt(in)
                    bound = 1.0 / math.sqrt(A.shape[-1])
                    A.uniform_(-bound, bound)
                if init == "random":  # PEFT's init_lora_weights=False: nn.Linear(r * experts, out)'s default
                    bound = 1.0 / math.sqrt(B.shape[-1] * B.shape[0])
                    B.uniform_(-bound, bound)
                else:
                    B.zero_()

    def adapter_parameters(self, name: str) -> dict[str, nn.Parameter]:
        """`{"lora_A.<weight>": A, "lora_B.<weight>": B}` for every expert weight adapter `name` adapts."""
        out = {}
        for p in self.targets[name]:
            out[f"lora_A.{p}"] = self.lora_A[name][p]
            out[f"lora_B.{p}"] = self.lora_B[name][p]
        return out

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        del self.targets[name]

    def lora_B_dense(self, name: str) -> torch.Tensor:
        raise LoraError("an experts layer has one B per expert weight: use lora_B[name][weight]")

    def set_slices(self, name: str, slices) -> None:
        raise LoraError("fused_slices need a Linear/Conv1D layer, not an experts module")

    def add_lora_mixed(self, result: torch.Tensor, x: torch.Tensor, rows) -> torch.Tensor:
        raise LoraError("mixed_batch does not support adapters on expert weights")

    def delta_weight(self, name: str, dtype: torch.dtype | None = None, param: str | None = None,
                     expert: int | None = None) -> torch.Tensor:
        """`scaling * B_e @ A_e` of adapter `name` on expert weight `param` (default: its only one), in the base
        weight's layout: `(experts, out, in)` (transposed modules: `(experts, in, out)`), or expert `expert`'s
        matrix alone; computed in `dtype` (default float32)."""
        param = self._one_target(name, param)
        delta = moe.expert_delta_weight(self.lora_A[name][param], self.lora_B[name][param], self.scaling[name],
                                        dtype or torch.float32, expert)
        return delta.transpose(-2, -1) if self.base_layer.is_transposed else delta

    def _one_target(self, name: str, param: str | None) -> str:
        targets = self.targets[name]
        if param is None:
            if len(targets) != 1:
                raise LoraError(f"adapter {name!r} adapts {list(targets)} here: pass param=")
            return targets[0]
        if param not in targets:
            raise LoraError(f"adapter {name!r} does not adapt {param!r} here (adapts {list(targets)})")
        return param

    # ------------------------------------------------------------------ merge (one expert at a time, rounded once)
    def _adapted(self, names: Iterable[str]) -> list[str]:
        names = list(names)
        return [p for p in expert_weights(self.base_layer) if any(p in self.targets[n] for n in names)]

    def unmerged_weight(self, param: str = "down_proj") -> torch.Tensor:
        """`W0` of expert weight `param`: without merged adapters, in the base layout (no grad)."""
        return self._backups[param] if param in self._backups else self.expert_weight(param).detach()

    def merged_weight(self, names: Iterable[str], param: str = "down_proj") -> torch.Tensor:
        """Expert weight `param` with adapters `names` folded in, from `W0`, in the base dtype."""
        w0 = self.unmerged_weight(param)
        out = torch.empty_like(w0)
        for e in range(w0.shape[0]):
            out[e] = self._merged_expert(list(names), param, e, w0[e])
        return out

    def _merged_expert(self, names: list[str], param: str, expert: int, w0: torch.Tensor) -> torch.Tensor:
        acc = w0.to(ops.compute_dtype(w0.dtype), copy=True)  # never in place on W0 (the backup)
        for n in names:
            if param in self.targets[n]:
                acc += self.delta_weight(n, acc.dtype, param, expert)
        return acc.to(w0.dtype)

    def _write_merged(self, names: list[str]) -> None:
        with torch.no_grad():
            for p in self._adapted(names):
                w, w0 = self.expert_weight(p), self.unmerged_weight(p)
                for e in range(w.shape[0]):
                    w[e].copy_(self._merged_expert(names, p, e, w0[e]))

    def merge(self, names: Iterable[str] | None = None) -> None:
        """Fold adapters (default: the active ones) into the expert weights, each expert from its original
        slice, rounded once. A no-op for merged adapters; `AdapterNotFoundError` for a name not here."""
        new = self.to_merge(names)
        if not new:
            return
        merged = self.merged_adapters + new
        for p in self._adapted(merged):
            if p not in self._backups:
                self._backups[p] = self.expert_weight(p).detach().clone()
        self._write_merged(list(merged))
        self.merged_adapters = merged
        self._refresh()

    def unmerge(self) -> None:
        """Write every saved original expert weight back, bit for bit."""
        if not self.merged_adapters:
            return
        with torch.no_grad():
            for p, w0 in self._backups.items():
                self.expert_weight(p).copy_(w0)
        self._backups = {}
        self.merged_adapters = ()
        self._refresh()

    def merged_module(self, names: Iterable[str]) -> nn.Module:
        """The experts module with `names` folded in (for `merge_and_unload`); the layer is spent after."""
        names = list(names)
        if names:
            self._write_merged(names)
        elif self.merged_adapters:
            self.unmerge()
        return self.base_layer

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        self._backups = {p: fn(w) for p, w in self._backups.items()}
        return out

    # ------------------------------------------------------------------ forward
    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self._mixed is not None:
            raise LoraError("mixed_batch does not support adapters on expert weights")
        if not self._forward_adapters:
            return self.base_layer(hidden_states, *args, **kwargs)
        top_k_index, top_k_weights = _routing_arguments(args, kwargs)
        m = self.base_layer
        routing = moe.route(top_k_index, m.num_experts)
        x = hidden_states[routing.tokens]  # (tokens * k, hidden), grouped by expert
        h = self._project("gate_up_proj" if m.has_gate else "up_proj", x, routing)
        h = m._apply_gate(h) if m.has_gate else m.act_fn(h)
        y = self._project("down_proj", h, routing)
        if getattr(m, "has_post_expert_norm", False):
            y = m.post_expert_norm(y)
        eager = _implementation(m) == "eager"
        return moe.combine_rows(y, top_k_weights, routing, hidden_states.dtype, per_expert=eager)

    def _project(self, param: str, x: torch.Tensor, routing: moe.Routing) -> torch.Tensor:
        """Expert weight `param` applied to the grouped rows `x`, its bias, and every adapter's term on it."""
        m = self.base_layer
        bias = getattr(m, f"{param}_bias", None) if getattr(m, "has_bias", False) else None
        weight = getattr(m, param)
        names = [n for n in self._forward_adapters if param in self.targets[n]]
        per_row = _implementation(m) == "batched_mm"  # its base products, bit for bit
        if len(names) == 1 and not per_row and self._fusable(names[0], param, x, weight, bias):  # training fast path
            A, B = self.lora_A[names[0]][param], self.lora_B[names[0]][param]
            p = self.lora_dropout[names[0]] if self.training else 0.0
            return moe.expert_projection(x, weight, bias, A, B, routing, m.is_transposed, self.scaling[names[0]], p)
        out = moe.expert_linear(x, weight, routing, m.is_transposed, bias, per_row)
        for name in self._forward_adapters:
            if param in self.targets[name]:
                A, B = self.lora_A[name][param], self.lora_B[name][param]
                p = self.lora_dropout[name] if self.training else 0.0
                term = moe.expert_low_rank(x.to(A.dtype), A, B, routing, self.scaling[name], p)
                out = out.add_(term) if term.dtype == out.dtype else out + term.to(out.dtype)  # no 2nd (S, out)
        return out


    def _fusable(self, name: str, param: str, x: torch.Tensor, weight: torch.Tensor, bias) -> bool:
        """Whether `expert_projection` computes this projection: in training (grad enabled; in inference the
        composed ops measured faster), with the base weight and bias frozen and one dtype for rows,
        weight and adapter."""
        A = self.lora_A[name][param]
        frozen = not weight.requires_grad and (bias is None or not bias.requires_grad)
        return torch.is_grad_enabled() and frozen and x.dtype == weight.dtype == A.dtype


def _implementation(experts: nn.Module) -> str | None:
    """transformers' experts implementation for this module (`config._experts_implementation`: `grouped_mm`,
    `batched_mm`, `eager`), whose base computation the forward mirrors."""
    return getattr(getattr(experts, "config", None), "_experts_implementation", None)


def _routing_arguments(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """`(top_k_index, top_k_weights)` from an experts module's call (transformers passes them positionally;
    gpt-oss names them `router_indices`, `routing_weights`)."""
    values = list(args) + [kwargs.get(k) for k in ("top_k_index", "router_indices") if k in kwargs] \
        + [kwargs.get(k) for k in ("top_k_weights", "routing_weights") if k in kwargs]
    if len(values) != 2:
        raise LoraError("an experts module is called as experts(hidden_states, top_k_index, top_k_weights)")
    return values[0], values[1]
