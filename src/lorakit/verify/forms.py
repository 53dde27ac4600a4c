"""The dynamic half of `lorakit.verify`: the same adapter in every form a user ships, compared on
the same tokens by next-token logits.

Forms: `unmerged` (lorakit's adapted model: the reference), `merged` (`lorakit.merge`),
`reloaded` (saved and loaded again by lorakit), `peft` (Hugging Face PEFT loading the folder),
`llama.cpp` (the adapter exported to GGUF, run by llama.cpp on the base model's GGUF file) and
`llama.cpp f32` (the same adapter file on a float32 GGUF of the base model).

Tolerances (max |logit difference| against the reference):
- lorakit and PEFT forms: `rtol * max(1, max |reference logit|)` with `rtol = 1e-4` for a float32
  model (1e-2 for 16-bit): merging rounds each weight once, the other forms compute the same
  products in another order.
- llama.cpp: its quantized kernels (8-bit activations against Q4_1 weights) already move the base
  model's logits (SmolLM2-135M: up to 1.3-1.6 of logits reaching 36); the adapted logits must stay
  within `LLAMA_CPP_SLACK` times that base-vs-base gap (plus `LLAMA_CPP_FLOOR`), and the adapter's
  effect must be reproduced (`judge_llama_cpp`). On the quantized file, an adapter's effect is often
  smaller than that rounding, so the same adapter also runs on a float32 GGUF of the base model
  with a float32 attention cache (`llama.cpp f32`), where llama.cpp agrees with lorakit's float32
  forward to 6e-5 (SmolLM2-135M) and the lorakit tolerance applies. Measurements: docs/export.md.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import LoraError
from ..inject import delete_adapter, disabled, set_active
from ..io import load_adapter, save_adapter
from ..merge import merge, unmerge
from ..export import GGUFExportError, export_gguf_adapter, export_gguf_merged
from .llamacpp import LlamaCpp, available

LLAMA_CPP_SLACK = 2.0
LLAMA_CPP_FLOOR = 0.05
LLAMA_CPP_EFFECT_RTOL = 0.25
PRECISE_MAX_PARAMS = 2_000_000_000  # the float32 GGUF copy of the model: at most 8 GB in a temporary folder


@dataclass
class FormCheck:
    """One form against the reference: `ok` is None when the check was skipped (`note` says why)."""

    form: str
    max_abs_diff: float | None = None
    tolerance: float | None = None
    ok: bool | None = None
    note: str = ""


@torch.no_grad()
def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """`model(ids).logits` in float32 on the CPU, in eval mode (the mode is restored)."""
    was = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        return model(ids.to(device)).logits.float().cpu()
    finally:
        model.train(was)


def rtol_for(model: nn.Module) -> float:
    dtype = next(model.parameters()).dtype
    return 1e-4 if dtype in (torch.float32, torch.float64) else 1e-2


def compare(form: str, got: torch.Tensor, ref: torch.Tensor, rtol: float) -> FormCheck:
    diff = float((got - ref).abs().max())
    tol = rtol * max(1.0, float(ref.abs().max()))
    return FormCheck(form, diff, tol, diff <= tol)


def lorakit_forms(model: nn.Module, name: str, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[FormCheck]]:
    """`(reference logits, base logits, [merged, reloaded])` for adapter `name`, the only active one."""
    rtol = rtol_for(model)
    ref = logits(model, ids)
    with disabled(model):
        base = logits(model, ids)
    merge(model, [name])
    try:
        checks = [compare("merged", logits(model, ids), ref, rtol)]
    finally:
        unmerge(model)
    copy = f"{name}_reloaded"
    with tempfile.TemporaryDirectory(prefix="lorakit-verify-") as tmp:
        save_adapter(model, tmp, name)
        load_adapter(model, tmp, copy, trainable=False, activate=True)
    try:
        set_active(model, [copy])
        checks.append(compare("reloaded", logits(model, ids), ref, rtol))
    finally:
        delete_adapter(model, copy)
        set_active(model, [name])
    return ref, base, checks


def peft_form(model: nn.Module, folder: str | Path, ids: torch.Tensor, ref: torch.Tensor) -> FormCheck:
    """PEFT's `PeftModel.from_pretrained(model, folder)` against `ref`; `model` must carry no lorakit
    adapters. PEFT's layers are removed again afterwards (`unload`)."""
    try:
        from peft import PeftModel
    except ModuleNotFoundError:
        return FormCheck("peft", note="PEFT is not installed")
    try:
        wrapped = PeftModel.from_pretrained(model, str(folder), is_trainable=False)
    except Exception as exc:  # PEFT's own error types vary by version
        return FormCheck("peft", ok=False,
                         note=f"PEFT could not load it: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
    try:
        return compare("peft", logits(wrapped, ids), ref, rtol_for(model))
    finally:
        wrapped.unload()


def llama_cpp_forms(model: nn.Module, folder: str | Path, base_gguf: str | Path, ids: torch.Tensor, ref: torch.Tensor,
                    base: torch.Tensor) -> list[FormCheck]:
    """The adapter exported to GGUF and run by llama.cpp, against `ref` (lorakit's adapted logits) and
    `base` (lorakit's base logits), first row of `ids`: on `base_gguf` (what the user ships;
    `judge_llama_cpp`), and on a float32 GGUF of `model` itself (written with `export_gguf_merged`;
    `model` must carry no adapter then) with a float32 attention cache, where llama.cpp computes
    what PyTorch computes up to float rounding and the lorakit tolerance applies. The second is
    skipped for models over `PRECISE_MAX_PARAMS` parameters."""

    if not available():
        return [FormCheck("llama.cpp", note="llama-cpp-python is not installed")]
    with tempfile.TemporaryDirectory(prefix="lorakit-verify-") as tmp:
        adapter = Path(tmp) / "adapter.gguf"
        try:
            export_gguf_adapter(folder, adapter, base_gguf=base_gguf)
        except GGUFExportError as exc:
            return [FormCheck("llama.cpp", note=f"no GGUF form: {exc}")]
        try:
            checks = [_on_shipped_base(base_gguf, adapter, ids, ref, base)]
        except LoraError as exc:  # llama.cpp refused the files: the form the user ships does not work
            return [FormCheck("llama.cpp", ok=False, note=str(exc))]
        if sum(p.numel() for p in model.parameters()) > PRECISE_MAX_PARAMS:
            return checks + [FormCheck("llama.cpp f32", note="skipped: the model is too large for a float32 copy")]
        f32 = Path(tmp) / "base-f32.gguf"
        export_gguf_merged(model, f32, source_gguf=base_gguf, outtype="f32")
        with LlamaCpp(f32, adapter, kv_f32=True) as adapted:
            cpp = adapted.logits(ids[0].tolist())
        checks.append(compare("llama.cpp f32", torch.from_numpy(cpp), ref[0], rtol_for(model)))
    return checks


def _on_shipped_base(base_file: Path, adapter: Path, ids: torch.Tensor, ref: torch.Tensor,
                     base: torch.Tensor) -> FormCheck:

    row = ids[0].tolist()
    with LlamaCpp(base_file) as plain:
        cpp_base = plain.logits(row)
    with LlamaCpp(base_file, adapter) as adapted:
        cpp = adapted.logits(row)
    return judge_llama_cpp("llama.cpp", cpp, cpp_base, ref[0].numpy(), base[0].numpy())


def judge_llama_cpp(form: str, cpp: np.ndarray, cpp_base: np.ndarray, ref: np.ndarray, base: np.ndarray) -> FormCheck:
    """llama.cpp's adapted logits `cpp` (and its base logits `cpp_base`) against lorakit's adapted
    `ref` and base `base`, all `(tokens, vocab)`.

    llama.cpp's own deviation on this base file, `gap = max |cpp_base - base|`, sets the tolerance:
    `max |cpp - ref| <= LLAMA_CPP_SLACK * gap + LLAMA_CPP_FLOOR`. Then the adapter's effect, in
    Frobenius norms over all logits, with `noise = ||cpp_base - base||` and `effect = ||ref - base||`:
    - `effect >= 3 noise`: `||(cpp - cpp_base) - (ref - base)|| <= LLAMA_CPP_EFFECT_RTOL * effect + 2 noise`;
    - `0.2 noise <= effect < 3 noise`: `cpp` must lie nearer `ref` than `base` (an adapter that got
      lost lies nearer `base`: `||noise - effect|| > ||noise||` on average);
    - a smaller effect cannot be told apart from llama.cpp's rounding on this file (noted).
    """
    norm = np.linalg.norm
    gap = float(np.abs(cpp_base - base).max())
    diff = float(np.abs(cpp - ref).max())
    tol = LLAMA_CPP_SLACK * gap + LLAMA_CPP_FLOOR
    noise, effect = float(norm(cpp_base - base)), float(norm(ref - base))
    ok = diff <= tol
    if effect >= 3 * noise:
        err = float(norm((cpp - cpp_base) - (ref - base)))
        ok = ok and err <= LLAMA_CPP_EFFECT_RTOL * effect + 2 * noise
        note = f"base-vs-base gap {gap:.3g}; adapter effect reproduced to {err / effect:.1%}"
    elif effect >= 0.2 * noise:
        to_ref, to_base = float(norm(cpp - ref)), float(norm(cpp - base))
        ok = ok and to_ref < to_base
        note = f"base-vs-base gap {gap:.3g}; nearer the adapted logits than the base's: {to_ref:.3g} vs {to_base:.3g}"
    else:
        note = f"base-vs-base gap {gap:.3g}; the adapter's effect is within llama.cpp's rounding on this file"
    return FormCheck(form, diff, tol, ok, note)
