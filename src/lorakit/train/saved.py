"""`lorakit eval` and `lorakit merge`: a run rebuilt from its saved files (the adapter folder and the
`lorakit_train.json` recorded beside it)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import AdapterLoadError, LoraError
from ..fileio import atomic_output_folder
from ..io import load_adapter, read_adapter
from ..merge import merge_and_unload
from . import data as data_mod
from .errors import DataError, RecipeError
from .models import load_model, quiet_transformers, resolve_device, resolve_model
from .outdir import check_writable
from .prepare import Prepared, lora_config_for, quantize_base, stderr_log
from .recipe import Recipe, apply
from .tasks import autocast

TRAIN_INFO = "lorakit_train.json"
PROBE_EXAMPLES = 8


def read_train_info(adapter: str | Path) -> dict[str, Any] | None:
    """The `lorakit_train.json` of an adapter folder, or None if it has none."""
    path = Path(adapter) / TRAIN_INFO
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise RecipeError(f"{path} is not valid JSON ({exc.msg})") from None


def recipe_for_adapter(adapter: str | Path | None, base: Recipe | None,
                       overrides: dict[str, Any]) -> tuple[Recipe, dict | None]:
    """The recipe recorded with `adapter` (else `base`), with `overrides` applied."""
    if adapter is not None and not Path(adapter).is_dir():
        raise AdapterLoadError(f"adapter folder {adapter} does not exist")
    info = read_train_info(adapter) if adapter is not None else None
    if info is None and adapter is not None:
        read_adapter(adapter)  # no adapter files (or a pickle, a corrupt file): say that first
    if info is not None:
        recipe = apply(Recipe(), info["recipe"])
    elif base is not None:
        recipe = base
    else:
        raise RecipeError(f"{adapter} has no {TRAIN_INFO} (not written by lorakit train); name its recipe with "
                          "--recipe, or its model and data with --model/--data")
    return apply(recipe, overrides), info


def evaluate_adapter(adapter: str | Path | None, *, base: Recipe | None = None, overrides: dict[str, Any] | None = None,
                     split: str = "test", log: Callable[[str], None] = stderr_log) -> dict[str, Any]:
    """Evaluate a saved adapter (or, with `adapter=None`, the base model) on a split of its recipe's data.

    Rebuilds model, data split and scoring from `adapter/lorakit_train.json`; when the split is
    the recorded one (same fingerprint) the result is compared with the recorded test metrics.
    `split="all"`: every example of the recipe's `data` (`lorakit eval --data FILE`).

    Returns:
        `{"metrics", "split", "recorded" (or None), "matches_recorded" (bool or None), "recipe"}`.
    """
    recipe, info = recipe_for_adapter(adapter, base, overrides or {})
    if split not in ("test", "val", "train", "all"):
        raise RecipeError(f"split must be test, val, train or all, got {split!r}")
    recorded_sha = (info or {}).get("data", {}).get("sha256")
    same_data = "data" not in (overrides or {})  # --data FILE: another file, not the training data changed
    current_sha = data_mod.spec_sha256(recipe.data) if same_data and recorded_sha is not None else None
    if current_sha not in (None, recorded_sha):  # the file is hashed once
        log(f"warning: data {recipe.data} changed since the run was trained (sha256 {recorded_sha[:12]}... then, "
            f"{current_sha[:12]}... now)")
    trained = (info or {}).get("task", {}).get("labels")
    prep = Prepared(recipe, log, whole=split == "all", labels=trained)
    _check_labels(trained, prep.task.describe().get("labels"), recipe.data)
    if adapter is not None:
        load_adapter(prep.model, adapter, trainable=False)
    examples = prep.dataset.examples if split == "all" else getattr(prep.splits, split)
    log(f"evaluating {'adapter ' + str(adapter) if adapter else 'the base model'} on "
        f"{f'all {len(examples)}' if split == 'all' else f'{len(examples)} {split}'} examples")
    metrics, _ = prep.evaluate(prep.model, examples)
    recorded, matches = None, None
    if info is not None and split == "test" and adapter is not None:
        recorded = info.get("test_metrics")
        same_split = data_mod.fingerprint(examples) == info.get("data", {}).get("test_fingerprint")
        if recorded is not None and same_split:
            keys = [k for k in ("accuracy",) if k in recorded] or ["loss"]
            matches = all(abs(metrics[k] - recorded[k]) <= (0 if k == "accuracy" else 1e-4 * max(1.0, abs(recorded[k])))
                          for k in keys)
    return {"metrics": metrics, "split": split, "recorded": recorded, "matches_recorded": matches,
            "recipe": recipe.to_dict()}


def _check_labels(trained: list[str] | None, now: list[str] | None, data: str) -> None:
    """The evaluation data's labels against the trained run's: the answers (or head rows) are chosen among the
    trained labels (`Prepared(labels=...)`, whatever subset the data holds), so a label the run never learned
    makes the score meaningless (DataError naming it)."""
    if not trained or not now:
        return
    unknown = sorted(set(now) - set(trained))
    if unknown:
        raise DataError(f"data {data}: label(s) {', '.join(map(repr, unknown))} were not trained; the adapter was "
                        f"trained on {', '.join(map(repr, trained))}. Relabel the file with those values")


PROBE_TEXTS = ("The quick brown fox jumps over the lazy dog.", "Review: a fine film.\nSentiment:")


def probe_logits(model, tokenizer, device, dtype=None) -> torch.Tensor:
    """The model's logits on two fixed texts, float32 on the CPU: a data-free comparison of two forms
    of one model (merged vs unmerged)."""
    model.eval()
    enc = tokenizer(list(PROBE_TEXTS), padding=True, return_tensors="pt").to(device)
    with torch.no_grad(), autocast(device, dtype):
        logits = model(**enc).logits
    return logits.float().cpu()


def _base_without_data(recipe: Recipe, info: dict, log: Callable[[str], None]):
    """`(model, tokenizer, device, dtype)`: a recorded run's base model, loaded as it was trained,
    without reading its data (a classification head gets the recorded labels)."""
    device, dtype = resolve_device(recipe.device, recipe.precision)
    source = resolve_model(recipe.model)
    config = lora_config_for(recipe, source.name)
    labels = info.get("task", {}).get("labels") if recipe.task == "classify-head" else None
    model, tokenizer = load_model(source, "seq-cls" if recipe.task == "classify-head" else "causal-lm",
                                  num_labels=len(labels) if labels else None, labels=labels, seed=recipe.seed,
                                  log=log)
    model.to(device)
    quantize_base(model, recipe, config, dtype)
    return model, tokenizer, device, dtype


def merge_adapter(adapter: str | Path, out: str | Path, *, base: Recipe | None = None,
                  overrides: dict[str, Any] | None = None,
                  log: Callable[[str], None] = stderr_log) -> dict[str, Any]:
    """Fold a saved adapter into its base model and save the plain model (+ tokenizer) to `out`.

    Needs only the adapter and its base model (not the training data): the base is the one
    recorded in `lorakit_train.json` (an adapter without one needs `base` or `overrides`, and
    then its recipe's data for a classification head's labels).

    Returns `{"out", "max_abs_diff"}`: the largest logit difference, merged vs unmerged, on two
    fixed texts.
    Raises:
        LoraError: `out` exists and is not empty, or cannot be created or written.
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LoraError(f"output folder {out} exists and is not empty")
    check_writable(out)  # before the model loads
    recipe, info = recipe_for_adapter(adapter, base, overrides or {})
    needs_data = recipe.task == "classify-head" and not (info or {}).get("task", {}).get("labels")
    if needs_data:
        prep = Prepared(recipe, log)
        model, tokenizer, device, dtype = prep.model, prep.tokenizer, prep.device, prep.dtype
    else:
        model, tokenizer, device, dtype = _base_without_data(recipe, info or {}, log)
    load_adapter(model, adapter, trainable=False)
    before = probe_logits(model, tokenizer, device, dtype)
    merged = merge_and_unload(model)  # a 4-bit base comes back dense, no longer claiming quantization
    after = probe_logits(merged, tokenizer, device, dtype)
    with quiet_transformers(), atomic_output_folder(out) as tmp:  # complete or absent; every file 0666 - umask
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    diff = float((before - after).abs().max()) if before.numel() else 0.0
    log(f"merged model written to {out}; logits max |diff| merged vs unmerged: {diff:.3g}")
    return {"out": str(out), "max_abs_diff": diff}
