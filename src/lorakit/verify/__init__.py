"""`lorakit.verify(model, adapter)`: does this adapter do what the user thinks, in every form they ship?

    report = lk.verify(model, "runs/demo/adapter", base_gguf="SmolLM2-135M-Instruct.Q4_1.gguf")
    print(report.to_text())        # one screen
    assert report.ok               # False on a no-op, keys that match nothing, or a mismatch

Static checks: coverage by kind (attention, MLP, experts, head, embeddings), keys matching no
module, modules whose B is all zero or whose update is negligible, the update's size relative to
each weight. Dynamic checks: next-token logits of the unmerged adapter against the merged one, the
one reloaded from disk, PEFT's (when installed) and llama.cpp's (when llama-cpp-python is installed
and the base model's GGUF file is given: on that file, and on a float32 GGUF of the model);
tolerances in `lorakit.verify.forms`.

The model is left as it was: the adapter is loaded under a temporary name and removed again
(with one exception: merging an adapter on an output head tied to the embedding unties them,
as `lorakit.merge` does, with its warning).
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import AdapterLoadError
from ..inject import active_adapters, delete_adapter, set_active, unload
from ..io import load_adapter, read_adapter
from ..state import get_state, has_adapters, unwrap
from .coverage import KINDS, KindCoverage, ModuleDelta, coverage, module_deltas, unmatched_keys
from .forms import FormCheck, llama_cpp_forms, lorakit_forms, peft_form
from .report import to_text

NEAR_ZERO = 1e-6  # an update below this share of its weight (Frobenius norms) does nothing measurable in float32


@dataclass
class VerifyReport:
    """What `verify` found. `ok` is False when `problems` is not empty."""

    adapter: str
    coverage: dict[str, KindCoverage] = field(default_factory=dict)
    unmatched: list[str] = field(default_factory=list)
    deltas: list[ModuleDelta] = field(default_factory=list)
    effect: float | None = None  # max |adapted - base logit| on the probe tokens
    forms: list[FormCheck] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def zero_b(self) -> list[str]:
        return [d.path for d in self.deltas if d.zero_b]

    def to_dict(self) -> dict:
        out = asdict(self)
        out["ok"] = self.ok
        out["coverage"] = {k: {**asdict(c), "share": c.share} for k, c in self.coverage.items()}
        return out

    def to_text(self) -> str:

        return to_text(self)


def verify(model: nn.Module, adapter: str | Path, *, input_ids: torch.Tensor | None = None,
           base_gguf: str | Path | None = None, peft: bool = True, llama_cpp: bool = True) -> VerifyReport:
    """Check a saved adapter against `model` (its base model) and across its shipped forms.

    Args:
        model: the base model (transformers causal LM or any module with `.logits` outputs);
            left as it was.
        adapter: the adapter folder (PEFT layout).
        input_ids: `(batch, tokens)` int64 probe tokens (default: 32 fixed pseudo-random tokens).
        base_gguf: the base model's GGUF file, for the llama.cpp check.
        peft, llama_cpp: run those checks when their packages are installed.
    Returns:
        A `VerifyReport`; `report.ok` is False on keys matching nothing, an adapter that does not
        load, a no-op (every B zero or every update below `NEAR_ZERO`), or a form whose logits
        differ beyond its tolerance.
    Raises:
        AdapterLoadError, ConfigError: the folder is missing or unreadable.
    """
    files = read_adapter(adapter)
    inner = unwrap(model)
    report = VerifyReport(str(adapter), unmatched=unmatched_keys(inner, files.tensors))
    ids = input_ids if input_ids is not None else probe_ids(inner)
    ref = base = None
    with _loaded(inner, adapter) as (name, error):
        if error is not None:
            report.problems += _problems(report, files.config.modules_to_save) + [error]
            return report
        report.coverage = coverage(inner, name)
        report.deltas = module_deltas(inner, name)
        ref, base, checks = lorakit_forms(inner, name, ids)
        report.effect = float((ref - base).abs().max())
        report.forms += checks
    if peft:
        report.forms.append(peft_form(inner, adapter, ids, ref) if not has_adapters(inner)
                            else FormCheck("peft", note="skipped: the model carries other lorakit adapters"))
    if llama_cpp and base_gguf is not None and not has_adapters(inner):
        report.forms += llama_cpp_forms(inner, adapter, base_gguf, ids, ref, base)
    elif llama_cpp:
        why = "no base GGUF file given" if base_gguf is None else "the model carries other lorakit adapters"
        report.forms.append(FormCheck("llama.cpp", note="skipped: " + why))
    report.problems += _problems(report, files.config.modules_to_save)
    return report


def static_checks(model: nn.Module, adapter: str = "default") -> dict:
    """The cheap half of `verify` for a model that carries adapter `adapter` (no files, no forward
    pass; for a training report): JSON-ready `{"coverage": {kind: {modules, covered_modules, params,
    covered_params, share}}, "modules": n, "zero_b": [paths], "rel_norm": {"min", "median", "max"},
    "no_op": bool}` (`rel_norm` = `||W - W0||_F / ||W0||_F` per adapted module; `no_op`: every B zero
    or every update below `NEAR_ZERO`)."""
    import statistics

    inner = unwrap(model)
    deltas = module_deltas(inner, adapter)
    norms = [d.rel_norm for d in deltas]
    return {
        "coverage": {k: {**asdict(c), "share": c.share} for k, c in coverage(inner, adapter).items() if c.modules},
        "modules": len(deltas),
        "zero_b": [d.path for d in deltas if d.zero_b],
        "rel_norm": {"min": min(norms), "median": statistics.median(norms), "max": max(norms)} if norms else {},
        "no_op": bool(deltas) and all(d.zero_b or d.rel_norm < NEAR_ZERO for d in deltas),
    }


def probe_ids(model: nn.Module, n: int = 32) -> torch.Tensor:
    """`(1, n)` fixed pseudo-random token ids below the model's vocabulary size (seeded, reproducible)."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None) or 100
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(0))


@contextlib.contextmanager
def _loaded(model: nn.Module, folder):
    """Load `folder` as the only active adapter under a fresh name; yields `(name, None)`, or
    `(None, message)` when it does not load. Removes it (and restores the active set) afterwards."""
    had = has_adapters(model)
    previous = active_adapters(model) if had else ()
    taken = set(get_state(model).configs) if had else set()
    name = next(f"verify{i}" for i in range(len(taken) + 1) if f"verify{i}" not in taken)
    try:
        load_adapter(model, folder, name, trainable=False, activate=True)
    except AdapterLoadError as exc:
        yield None, f"does not load into {type(model).__name__}: {exc}"
        return
    try:
        set_active(model, [name])
        yield name, None
    finally:
        if had:
            delete_adapter(model, name)
            set_active(model, previous)
        else:
            unload(model)


def _problems(report: VerifyReport, modules_to_save) -> list[str]:
    out = []
    if report.unmatched:
        out.append(f"{len(report.unmatched)} keys match no module of the model, the first: {report.unmatched[0]!r}")
    if report.deltas and not modules_to_save and all(d.zero_b or d.rel_norm < NEAR_ZERO for d in report.deltas):
        zero = report.zero_b
        what = f"every B is zero ({len(zero)} modules, e.g. {zero[0]})" if len(zero) == len(report.deltas) else \
            f"every update is below {NEAR_ZERO:g} of its weight"
        out.append(f"no-op adapter: {what}")
    for check in report.forms:
        if check.ok is False:
            detail = (f"max |diff| {check.max_abs_diff:.3g} > tolerance {check.tolerance:.3g}"
                      if check.max_abs_diff is not None else check.note)
            out.append(f"{check.form} differs from the unmerged adapter: {detail}")
    return out


__all__ = ["verify", "static_checks", "VerifyReport", "KindCoverage", "ModuleDelta", "FormCheck", "KINDS", "NEAR_ZERO"]
