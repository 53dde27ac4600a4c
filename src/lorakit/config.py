"""`LoraConfig`: the validated description of one adapter, and its JSON form.

The JSON form is Hugging Face PEFT's `adapter_config.json` vocabulary
(`lora_alpha`, `lora_dropout`, `init_lora_weights`, `peft_type: "LORA"`, ...),
so files written here load in PEFT and PEFT's files load here.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

BIAS_MODES = ("none", "all", "lora_only")
# `target_modules` presets: every linear layer but the head (PEFT's), and that plus every 3-D expert weight
PRESETS = ("all-linear", "all")
# `init` values; "pissa_niter_<k>" (randomised SVD with k subspace iterations) is accepted as well.
# "random" (PEFT's `init_lora_weights=False`) makes B non-zero: a fresh adapter changes the outputs (tests only).
INIT_METHODS = ("kaiming", "gaussian", "random", "pissa", "olora")

# Every field of PEFT's LoraConfig (0.22), classified; tests/test_exactness_debts.py introspects PEFT's
# dataclass so that a field added to PEFT fails the test until it is placed here. A file written by a newer
# PEFT carries fields lorakit has not classified yet: they load when off (see `_unknown_is_off`).
#   honoured: read into a LoraConfig field (renamed where lorakit's name differs)
PEFT_HONOURED = {
    "r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "target_modules": "target_modules",
    "exclude_modules": "exclude_modules", "bias": "bias", "use_rslora": "use_rslora",
    "modules_to_save": "modules_to_save", "init_lora_weights": "init", "layers_to_transform": "layers_to_transform",
    "layers_pattern": "layers_pattern", "rank_pattern": "rank_pattern", "alpha_pattern": "alpha_pattern",
    "use_dora": "use_dora", "lora_bias": "lora_bias", "base_model_name_or_path": "base_model_name_or_path",
    "task_type": "task_type", "target_parameters": "target_parameters",
}
#   ignored: cannot change the outputs of a loaded adapter, whatever its value
PEFT_IGNORED = {
    "peft_type": "checked to be LORA", "auto_mapping": "PEFT's model-class hint", "peft_version": "metadata",
    "revision": "of the base model on the Hub", "inference_mode": "trainability is set by load_adapter(trainable=...)",
    "fan_in_fan_out": "derived from the layer (GPT-2 Conv1D stores its weight (in, out)); PEFT corrects it alike",
    "megatron_core": "a module name, used only with megatron_config",
    "qalora_group_size": "used only with use_qalora", "runtime_config": "runtime only; PEFT drops it from files",
    "loftq_config": "initialisation only", "eva_config": "initialisation only", "corda_config": "initialisation only",
    "lora_ga_config": "initialisation only", "astra_config": "initialisation only",
}
#   refused unless off: a feature lorakit does not implement; its "off" values are accepted
PEFT_REFUSED_UNLESS_OFF = {
    "megatron_config": (None,), "trainable_token_indices": (None,), "velora_config": (None,),
    "alora_invocation_tokens": (None,), "use_qalora": (False, None), "monteclora_config": (None,),
    "layer_replication": (None,),
    "use_bdlora": (None, False), "arrow_config": (None,), "kasa_config": (None,), "ensure_weight_tying": (False, None),
}
# PEFT `init_lora_weights` values lorakit does not run itself. How an adapter was initialised does
# not matter once its tensors are loaded, so a file with one of these loads as `init="kaiming"`.
PEFT_INITS_AS_SAVED = ("eva", "orthogonal", "lora_ga", "mica", "nora")
# ... except that these rewrote the base weight with data lorakit cannot recompute (calibration
# activations, a quantizer): the adapter fits only that rewritten base, which PEFT saves beside it.
PEFT_INITS_REWRITING_BASE = ("corda", "loftq", "astra")


@dataclass
class LoraConfig:
    """Hyper-parameters of one LoRA adapter (Hu et al. 2021, arXiv:2106.09685, §4.1).

    Args:
        r: rank of the update; `A: (r, in_features)`, `B: (out_features, r)`. Integer > 0.
        alpha: scale numerator; the update is multiplied by `scaling = alpha / r`
            (or `alpha / sqrt(r)` with `use_rslora`). Number > 0.
        dropout: dropout probability on the LoRA branch's input, in [0, 1). The fast path (one
            plain adapter on a Linear) draws its mask at a resolution of 2^-16 (the probability
            applied is within 7.7e-6 of `dropout`; see `lorakit.ops.fused.dropout_keep_mask`).
        target_modules: which modules to adapt. A list of names, each matched as a
            whole dotted suffix of the module path (`"q_proj"` matches
            `model.layers.0.self_attn.q_proj`); a regex string matched against the
            full path (`re.fullmatch`); `"all-linear"`: every `nn.Linear` and GPT-2
            `Conv1D` except the output head (PEFT's meaning: on a mixture-of-experts model the expert
            weights are left out, with a warning); or `"all"`: the same plus every 3-D expert weight
            of the model's mixture-of-experts modules (`target_parameters` resolved for you).
        target_parameters: PEFT's option for weights that are parameters, not modules: the 3-D
            expert weights of transformers mixture-of-experts modules, one low-rank pair per
            expert (docs/moe.md). A list of parameter names, each matched as a whole dotted suffix
            of the parameter path (`"mlp.experts.gate_up_proj"`); as in PEFT, matched on its own
            (`exclude_modules` and `layers_to_transform` do not apply to it). With it,
            `target_modules` may be None.
        exclude_modules: modules never adapted; same matching rules as `target_modules`.
        use_rslora: rank-stabilised scaling `alpha / sqrt(r)` (Kalajdzievski 2023,
            arXiv:2312.03732).
        init: `"kaiming"` (A Kaiming-uniform with a=sqrt(5), as `nn.Linear`; B zero,
            paper §4.1), `"gaussian"` (A ~ N(0, 1/r); B zero), `"random"` (B random too, so a
            fresh adapter is not a no-op: for tests and debugging only; PEFT's
            `init_lora_weights=False`); or, replacing the
            base weight by a residual, `"pissa"` / `"pissa_niter_<k>"` (top-r singular
            vectors, arXiv:2404.02948) or `"olora"` (QR, arXiv:2406.01775); see
            `lorakit.variants.pissa`.
        bias: `"none"` (all biases frozen), `"all"` (every bias trainable) or
            `"lora_only"` (biases of adapted modules trainable).
        modules_to_save: modules (same suffix matching) of which a trainable copy is
            kept and saved with the adapter, e.g. a classification head.
        rank_pattern / alpha_pattern: per-module overrides of `r` / `alpha`; keys are
            regexes matched against the end of the module path.
        layers_to_transform: only adapt modules in these layer indices.
        layers_pattern: the name of the layer list (`"layers"`, `"h"`) used to find
            the layer index; any numbered segment when unset.
        use_dora: weight-decomposed LoRA (Liu et al. 2024, arXiv:2402.09353).
        lora_bias: a trainable bias on B (PEFT's `lora_bias`): the update becomes
            `scaling * (B A x + b)`, `b: (out_features,)` starting at zero; merged into the base
            layer's bias (which must exist to merge). Linear, GPT-2 Conv1D, Conv and 4-bit layers.
        fused_slices: per-slice adapters on fused projections (the paper's reference
            code, loralib's `MergedLinear`): regex key (as `rank_pattern`) -> a list of
            booleans splitting the output features into equal slices (`[True, False,
            True]`: q and v of a fused qkv), or `{"sizes": [...], "enable": [...]}` for
            unequal slices. Each enabled slice gets its own rank-`r` update; the rest
            of the output is left alone. Linear / Conv1D only.
        base_model_name_or_path, task_type: metadata written into the adapter file.

    Raises:
        ConfigError: naming the first invalid field.
    """

    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    use_rslora: bool = False
    init: str = "kaiming"
    bias: str = "none"
    modules_to_save: list[str] | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    use_dora: bool = False
    lora_bias: bool = False
    fused_slices: dict[str, Any] = field(default_factory=dict)
    base_model_name_or_path: str | None = None
    task_type: str | None = None
    target_parameters: list[str] | None = None

    def __post_init__(self) -> None:
        for name in ("target_modules", "exclude_modules", "target_parameters"):  # sets: sorted lists, tuples: lists
            value = getattr(self, name)
            if isinstance(value, (set, frozenset)):
                setattr(self, name, sorted(value))
            elif isinstance(value, tuple):
                setattr(self, name, list(value))
        if self.target_parameters == []:
            self.target_parameters = None
        if isinstance(self.modules_to_save, (tuple, set, frozenset)):
            self.modules_to_save = list(self.modules_to_save)
        if isinstance(self.layers_to_transform, (tuple, range)):
            self.layers_to_transform = list(self.layers_to_transform)
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Check every field; raise `ConfigError` naming the first bad one."""
        _positive_int("r", self.r)
        _positive_number("alpha", self.alpha)
        p = self.dropout
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
            raise ConfigError("dropout", f"must be a number in [0, 1), got {self.dropout!r}")
        _parameter_selector(self.target_parameters)
        _module_selector("target_modules", self.target_modules, required=not self.target_parameters)
        _module_selector("exclude_modules", self.exclude_modules, required=False)
        for name in ("use_rslora", "use_dora", "lora_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(name, f"must be true or false, got {getattr(self, name)!r}")
        if not isinstance(self.init, str) or not (
            self.init in INIT_METHODS or re.fullmatch(r"pissa_niter_\d+", self.init)
        ):
            raise ConfigError("init",
                              f"must be one of {', '.join(INIT_METHODS)} or 'pissa_niter_<k>', got {self.init!r}")
        if self.lora_bias and (self.use_dora or self.init not in ("kaiming", "gaussian", "random")):
            what = "use_dora" if self.use_dora else f"init={self.init!r}"
            raise ConfigError("lora_bias", f"cannot be combined with {what} (as in PEFT: the bias of B is defined for "
                                           "plain LoRA with a zero or random init)")
        if self.bias not in BIAS_MODES:
            raise ConfigError("bias", f"must be one of {', '.join(BIAS_MODES)}, got {self.bias!r}")
        if self.modules_to_save is not None:
            names = self.modules_to_save
            if not isinstance(names, list) or not all(isinstance(m, str) and m for m in names):
                raise ConfigError("modules_to_save", f"must be a list of module names, got {self.modules_to_save!r}")
        for name, check in (("rank_pattern", _positive_int), ("alpha_pattern", _positive_number)):
            pattern = getattr(self, name)
            if not isinstance(pattern, dict):
                raise ConfigError(name, f"must be a mapping of regex -> value, got {pattern!r}")
            for key, value in pattern.items():
                _regex(name, key)
                check(f"{name}[{key!r}]", value)
        if not isinstance(self.fused_slices, dict):
            raise ConfigError("fused_slices", f"must be a mapping of regex -> slices, got {self.fused_slices!r}")
        for key, value in self.fused_slices.items():
            _regex("fused_slices", key)
            _slices(f"fused_slices[{key!r}]", value)
        layers = self.layers_to_transform
        if layers is not None:
            items = [layers] if isinstance(layers, int) and not isinstance(layers, bool) else layers
            if not isinstance(items, list) or not items or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in items
            ):
                raise ConfigError("layers_to_transform",
                                  f"must be a layer index or a non-empty list of indices >= 0, got {layers!r}")
        if self.layers_pattern is not None:
            if self.layers_to_transform is None:
                raise ConfigError("layers_pattern", "only has a meaning together with layers_to_transform")
            pats = [self.layers_pattern] if isinstance(self.layers_pattern, str) else self.layers_pattern
            if not isinstance(pats, list) or not pats or not all(isinstance(p, str) and p for p in pats):
                raise ConfigError("layers_pattern", f"must be a name or list of names, got {self.layers_pattern!r}")

    # ------------------------------------------------------------------ per-module values
    def rank_for(self, path: str) -> int:
        """The rank of the module at `path`: `rank_pattern`'s first matching key, else `r`."""
        key = pattern_key(self.rank_pattern, path)
        return self.rank_pattern[key] if key is not None else self.r

    def alpha_for(self, path: str) -> float:
        """The alpha of the module at `path`: `alpha_pattern`'s first matching key, else `alpha`."""
        key = pattern_key(self.alpha_pattern, path)
        return self.alpha_pattern[key] if key is not None else self.alpha

    def slices_for(self, path: str) -> tuple[list[int] | None, list[bool]] | None:
        """`(sizes or None for equal split, enable)` of the module at `path`, or None if not sliced."""
        key = pattern_key(self.fused_slices, path)
        if key is None:
            return None
        value = self.fused_slices[key]
        if isinstance(value, dict):
            return list(value["sizes"]), list(value["enable"])
        return None, list(value)

    def scaling_for(self, path: str) -> float:
        """`alpha / r`, or `alpha / sqrt(r)` with rsLoRA, for the module at `path`."""
        return scaling(self.alpha_for(path), self.rank_for(path), self.use_rslora)

    # ------------------------------------------------------------------ JSON (PEFT vocabulary)
    def to_peft_dict(self, fan_in_fan_out: bool = False, fused: dict[str, dict] | None = None) -> dict[str, Any]:
        """The `adapter_config.json` content, in PEFT's key names.

        `fused` maps each module path with per-slice adapters to its resolved slices
        (`sizes`, `enable`). In the file such a module is a plain LoRA of rank
        `r * k` (k enabled slices, block-diagonal B), so PEFT and vLLM read it exactly;
        `lorakit_fused_slices` records the slices so that lorakit reads it back compact.
        """
        init = {"kaiming": True, "random": False}.get(self.init, self.init)
        rank_pattern, alpha_pattern, records = dict(self.rank_pattern), dict(self.alpha_pattern), {}
        for path, spec in (fused or {}).items():
            key, k = re.escape(path), sum(spec["enable"])
            r, alpha = self.rank_for(path), self.alpha_for(path)
            dense_r = r * k
            rank_pattern[key] = dense_r
            dense_scale = math.sqrt(dense_r) if self.use_rslora else dense_r
            alpha_pattern[key] = scaling(alpha, r, self.use_rslora) * dense_scale
            records[path] = {"sizes": list(spec["sizes"]), "enable": list(spec["enable"]), "r": r, "alpha": alpha}
        out = {
            "peft_type": "LORA",
            "task_type": self.task_type,
            "base_model_name_or_path": self.base_model_name_or_path,
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": self.target_modules,
            "target_parameters": self.target_parameters,
            "exclude_modules": self.exclude_modules,
            "fan_in_fan_out": fan_in_fan_out,
            "bias": self.bias,
            "use_rslora": self.use_rslora,
            "modules_to_save": self.modules_to_save,
            "init_lora_weights": init,
            "layers_to_transform": self.layers_to_transform,
            "layers_pattern": self.layers_pattern,
            "rank_pattern": rank_pattern,
            "alpha_pattern": alpha_pattern,
            "use_dora": self.use_dora,
            "lora_bias": self.lora_bias,
            "inference_mode": True,
            "revision": None,
        }
        if records:
            out["lorakit_fused_slices"] = records
        elif self.fused_slices:
            out["lorakit_fused_slices"] = dict(self.fused_slices)
        return out

    @classmethod
    def from_peft_dict(cls, data: dict[str, Any]) -> "LoraConfig":
        """Read a PEFT-style `adapter_config.json` mapping.

        Raises:
            ConfigError: an unknown key, a PEFT feature lorakit does not implement
                (named), a `peft_type` other than LORA, or an invalid value.
        """
        if not isinstance(data, dict):
            raise ConfigError("adapter_config", f"must be a JSON object, got {type(data).__name__}")
        peft_type = data.get("peft_type", "LORA")
        if peft_type != "LORA":
            raise ConfigError("peft_type", f"lorakit reads LoRA adapters only, got {peft_type!r}")
        data = _unfuse(data)
        own = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key in PEFT_HONOURED or key in own:
                kwargs[PEFT_HONOURED.get(key, key)] = value
            elif key in PEFT_IGNORED:
                continue
            elif key in PEFT_REFUSED_UNLESS_OFF:
                if not any(value == off and type(value) is type(off) for off in PEFT_REFUSED_UNLESS_OFF[key]):
                    raise ConfigError(key, f"this PEFT feature is not supported by lorakit (value {value!r})")
            elif not _unknown_is_off(value):
                raise ConfigError(key, f"unknown field in adapter config (value {value!r}): a PEFT feature this "
                                       "lorakit does not know; it loads only when unset (null, false or empty)")
        if "init" in kwargs:
            kwargs["init"] = _init_from_file(kwargs["init"])
        for key in ("rank_pattern", "alpha_pattern"):
            if kwargs.get(key) is None:
                kwargs.pop(key, None)
        try:
            return cls(**kwargs)
        except ConfigError as exc:  # name the field as the file spells it
            file_names = {v: k for k, v in PEFT_HONOURED.items()}
            own_name = exc.field.split("[", 1)[0]
            if own_name in file_names:
                raise ConfigError(file_names[own_name] + exc.field[len(own_name):], exc.detail) from None
            raise

    def to_json(self, fan_in_fan_out: bool = False, fused: dict[str, dict] | None = None) -> str:
        return json.dumps(self.to_peft_dict(fan_in_fan_out, fused), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "LoraConfig":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError("adapter_config", f"not valid JSON ({exc})") from None
        return cls.from_peft_dict(data)

    @classmethod
    def from_file(cls, path: str | Path) -> "LoraConfig":
        return cls.from_json(Path(path).read_text(encoding="utf-8"))

    def replace(self, **changes: Any) -> "LoraConfig":
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)


def scaling(alpha: float, r: int, use_rslora: bool = False) -> float:
    """LoRA's output scale: `alpha / r` (Hu et al. 2021, §4.1) or, with `use_rslora`, `alpha / sqrt(r)`.

    rsLoRA (Kalajdzievski 2023, "A Rank Stabilization Scaling Factor for Fine-Tuning
    with LoRA", arXiv:2312.03732, §3): a scaling factor `gamma_r` keeps the adapter's
    outputs and its learning stable across ranks only if `gamma_r` is Theta(1/sqrt(r));
    `alpha / r` shrinks the update as `r` grows, so large ranks learn no better.
    """
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def matches(selector: list[str] | str, path: str) -> bool:
    """The module-matching rule of `target_modules`, `exclude_modules`, `modules_to_save` (PEFT's):
    a string is a regex matched against the whole dotted path (`re.fullmatch`); a list matches a
    path equal to one of its names or ending in `"." + name`."""
    if isinstance(selector, str):
        return re.fullmatch(selector, path) is not None
    return any(path == t or path.endswith("." + t) for t in selector)


def pattern_key(patterns: dict[str, Any], path: str) -> str | None:
    """First key of `patterns` whose regex matches the end of `path` at a dot boundary (PEFT's rule)."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", path):
            return key
    return None


def _unknown_is_off(value: Any) -> bool:
    """Whether a field lorakit does not know can be dropped: PEFT writes every field of its LoraConfig, and a
    feature not in use is null, false or empty there; any other value could change the adapter's outputs."""
    return value is None or value is False or (isinstance(value, (dict, list, str)) and not value)


def _init_from_file(init: Any) -> str:
    """`init_lora_weights` as written by PEFT -> lorakit's `init` (see `PEFT_INITS_AS_SAVED`)."""
    if init is True:
        return "kaiming"
    if init is False:
        return "random"
    if isinstance(init, str) and init.lower() in PEFT_INITS_AS_SAVED + PEFT_INITS_REWRITING_BASE:
        if init.lower() in PEFT_INITS_REWRITING_BASE:
            warnings.warn(f"init_lora_weights={init!r}: PEFT's {init} init rewrote the base weights; this adapter "
                          "fits only that rewritten base model (which PEFT saves separately), not the original one",
                          stacklevel=4)
        return "kaiming"
    if not isinstance(init, str):
        raise ConfigError("init_lora_weights", f"must be true, false or an init name, got {init!r}")
    return init


def _unfuse(data: dict[str, Any]) -> dict[str, Any]:
    """Undo `to_peft_dict`'s dense encoding of per-slice adapters (key `lorakit_fused_slices`)."""
    records = data.get("lorakit_fused_slices")
    if records is None:
        return data
    if not isinstance(records, dict):
        raise ConfigError("lorakit_fused_slices", f"must be a mapping, got {records!r}")
    data = dict(data)
    del data["lorakit_fused_slices"]
    rank_pattern = dict(data.get("rank_pattern") or {})
    alpha_pattern = dict(data.get("alpha_pattern") or {})
    fused = {}
    for path, rec in records.items():
        if isinstance(rec, dict) and "r" in rec:  # resolved per-path record written by lorakit
            key = re.escape(path)
            rank_pattern.pop(key, None)
            alpha_pattern.pop(key, None)
            if rec["r"] != data.get("r"):
                rank_pattern[key] = rec["r"]
            if rec["alpha"] != data.get("lora_alpha"):
                alpha_pattern[key] = rec["alpha"]
            fused[key] = {"sizes": rec.get("sizes"), "enable": rec.get("enable")}
        else:
            fused[path] = rec
    data.update(rank_pattern=rank_pattern, alpha_pattern=alpha_pattern, fused_slices=fused)
    return data


def _slices(name: str, value: Any) -> None:
    if isinstance(value, dict):
        sizes, enable = value.get("sizes"), value.get("enable")
        if (set(value) != {"sizes", "enable"} or not isinstance(sizes, list) or not isinstance(enable, list)
                or len(sizes) != len(enable)):
            raise ConfigError(name, f"must be {{'sizes': [...], 'enable': [...]}} of equal lengths, got {value!r}")
        if not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sizes):
            raise ConfigError(name, f"sizes must be integers > 0, got {sizes!r}")
    else:
        enable = value
    if (
        not isinstance(enable, list)
        or len(enable) < 2
        or not all(isinstance(e, bool) for e in enable)
        or not any(enable)
    ):
        raise ConfigError(name, f"needs a list of at least two booleans with at least one true, got {enable!r}")


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(name, f"must be an integer > 0, got {value!r}")


def _positive_number(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(name, f"must be a finite number > 0, got {value!r}")


def _regex(name: str, pattern: str) -> None:
    if not isinstance(pattern, str) or not pattern:
        raise ConfigError(name, f"patterns must be non-empty strings, got {pattern!r}")
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ConfigError(name, f"invalid regex {pattern!r} ({exc})") from None


def _module_selector(name: str, value: Any, required: bool) -> None:
    if value is None or value == [] or value == "":
        if required:
            raise ConfigError(name, "is empty: name the modules to adapt (a list of names, a regex, 'all-linear' or "
                                    "'all'), or expert weights in target_parameters")
        return
    if isinstance(value, str):
        if value not in PRESETS or name != "target_modules":
            _regex(name, value)
        return
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(name, f"must be a list of module names, a regex string, 'all-linear' or 'all', got {value!r}")


def _parameter_selector(value: Any) -> None:
    if value is None or value == []:
        return
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError("target_parameters", f"must be a list of parameter names such as "
                                               f"'mlp.experts.gate_up_proj' (no regex, as in PEFT), got {value!r}")
