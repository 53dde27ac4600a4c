"""A recipe made concrete: model, tokenizer, task, data split and the run's `LoraConfig`.

`Prepared` is what `lorakit train`, `eval`, `merge` and `experiment` share: the slow model
load, the deterministic split, QLoRA quantization (with the NF4 correction), evaluation.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from typing import Any, Callable

import torch

from ..config import LoraConfig
from ..quant import base_weight_memory, bits_per_param, quantize
from ..quant.qera import qera_quantize
from ..version import __version__
from . import data as data_mod
from .models import count_all, load_model, model_folder, resolve_device, resolve_model, set_threads, sha256_file
from .packing import pack, padding_report
from .progress import forward_progress
from .errors import RecipeError
from .recipe import Recipe
from .tasks import TASK_CLASSES, Task
from .truncation import truncation_report
from .text import TextTask, block_dataset, document_dataset

TASKS = {**TASK_CLASSES, TextTask.name: TextTask}


def stderr_log(msg: str) -> None:
    """The job's default log: one line on stderr."""
    print(f"[lorakit] {msg}", file=sys.stderr, flush=True)


def load_data(recipe: Recipe, whole: bool = False) -> data_mod.Dataset:
    """The data `recipe` names, checked (for the text task: its documents, before they become blocks;
    `whole`: to be scored as it is, see `data.load_dataset`)."""
    if recipe.task == "text":
        return document_dataset(recipe.data, recipe.text_field)
    return data_mod.load_dataset(recipe, whole)


def load_held_out(recipe: Recipe) -> dict[str, data_mod.Dataset]:
    """The files `recipe.test_data` / `recipe.val_data` name (same task and fields as `data`), checked."""
    files = {"test": recipe.test_data, "val": recipe.val_data}
    return {split: data_mod.load_dataset(recipe.replace(data=path)) for split, path in files.items() if path}


def _typed_labels(recorded: list[str], examples: list[dict[str, Any]]) -> list[Any]:
    """Recorded labels (strings) as the data writes its labels: integers for integer-labelled data."""
    ints = any(isinstance(e.get("label"), int) for e in examples)
    return [int(x) if ints and x.lstrip("-").isdigit() else x for x in recorded]


def make_task(recipe: Recipe, tokenizer, examples) -> Task:
    """The task object of `recipe.task`, set up from the tokenizer and all examples (for the label set)."""
    return TASKS[recipe.task](recipe, tokenizer, examples)


def lora_config_for(recipe: Recipe, model_name: str) -> LoraConfig:
    """The recipe's `LoraConfig` for the model `model_name` (its name and task type recorded in the file)."""
    return recipe.lora_config().replace(
        base_model_name_or_path=model_name,
        task_type="SEQ_CLS" if recipe.task == "classify-head" else "CAUSAL_LM",
    )


def quantize_base(model, recipe: Recipe, config: LoraConfig, dtype: torch.dtype | None) -> dict[str, Any] | None:
    """The frozen base as `recipe.quantize` wants it (no QERA correction: a saved adapter holds it);
    the `bits_per_param` figures, or None for `quantize: none`."""
    if recipe.quantize == "none":
        return None
    quantize(model, recipe.quantize, double_quant=True, compute_dtype=dtype or torch.float32,
             exclude_modules=config.modules_to_save or None)
    return bits_per_param(model).as_dict()


class Prepared:
    """A recipe's model, tokenizer, task and data split, ready to evaluate or train."""

    def __init__(self, recipe: Recipe, log: Callable[[str], None] = stderr_log, *, threads: int | None = None,
                 device: tuple[torch.device, torch.dtype | None] | None = None, correct: bool = False,
                 whole: bool = False, labels: list[str] | None = None):
        """`correct`: with `quantize: nf4` and `qera_rank > 0`, pin the frozen QERA correction (training
        needs it; a saved adapter already holds it). `whole`: the caller scores every example of the data
        (`lorakit eval --data FILE`): no train/val/test split, and one example is enough. `labels`: the
        label set a saved run was trained with (`lorakit_train.json`), so that answers and head rows are
        chosen among those, whatever labels the data at hand holds."""
        self.recipe = recipe
        self.threads = set_threads(threads if threads is not None else recipe.threads)
        self.device, self.dtype = device if device is not None else resolve_device(recipe.device, recipe.precision)
        self.source = resolve_model(recipe.model)  # bad input fails here, before the slow model load
        self.config = lora_config_for(recipe, self.source.name)  # the run's one LoraConfig
        data = load_data(recipe, whole)  # bad data fails here too (the text task's blocks need the tokenizer)
        self.held_out = load_held_out(recipe)  # --test-data / --val-data: used whole
        if data.skipped:
            log(f"skipped {data.skipped} rows with an empty text/prompt/response")
        if os.environ.get("LORAKIT_BUSY_CPU"):
            log(f"the CPU was busy at start (load average {os.environ['LORAKIT_BUSY_CPU']}): running with "
                "OMP_WAIT_POLICY=PASSIVE")
        t = time.perf_counter()
        self.model, self.tokenizer = self._load_model(data, log)
        self.load_seconds = time.perf_counter() - t
        # the adapter names a folder PEFT and transformers open offline (a GGUF's cached conversion), not "smollm2"
        self.base_path = model_folder(self.source).resolve()
        self.config = self.config.replace(base_model_name_or_path=str(self.base_path))
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if limit is not None and recipe.max_length > limit:
            raise RecipeError(f"recipe field 'max_length' is {recipe.max_length}, beyond the model's {limit} positions")
        self.model.to(self.device)
        self.dataset = block_dataset(data, self.tokenizer, recipe.max_length) if recipe.task == "text" else data
        self.splits = data_mod.Splits(self.dataset.examples, [], []) if whole else self._split(log)
        every = self.dataset.examples + [e for ds in self.held_out.values() for e in ds.examples]
        every += [{"label": label} for label in _typed_labels(labels or [], every)]  # the trained label set
        self.task = make_task(recipe, self.tokenizer, every)  # the label set of every file
        # what the training stream draws batches from: examples, or packed rows of examples
        self.train_items = self._packed_rows() if recipe.packing else self.splits.train
        self.qera = None
        self.quantization = self.quantize(self.model, correct=correct, log=log)
        if self.quantization is not None:
            q = self.quantization
            log(f"quantized {q['layers']} linear layers to {recipe.quantize.upper()} (QLoRA): "
                f"{q['bits_per_param']:.4f} bits/param, "
                f"{q['bytes'] / 2**20:.1f} MiB (bf16: {2 * q['params'] / 2**20:.1f} MiB)")
        self.base_weights = base_weight_memory(self.model)

    def _load_model(self, data, log):
        recipe = self.recipe
        labels = sorted({e["label"] for e in data.examples}, key=str) if data.kind == "classification" else None
        kind = "seq-cls" if recipe.task == "classify-head" else "causal-lm"
        return load_model(self.source, kind, num_labels=len(labels) if labels else None,
                          labels=[str(l) for l in labels] if labels else None, seed=recipe.seed, log=log)

    def _split(self, log) -> data_mod.Splits:
        recipe, examples = self.recipe, self.dataset.examples
        held = self.held_out
        given = {data_mod.example_key(e) for ds in held.values() for e in ds.examples}
        pool = [e for e in examples if data_mod.example_key(e) not in given]  # never train on a held-out file
        if len(pool) < len(examples):
            log(f"dropped {len(examples) - len(pool)} examples of {self.dataset.name} whose text is also in "
                f"{' / '.join(ds.name for ds in held.values())} (held out: never trained on)")
        splits = data_mod.split(pool, 0 if "test" in held else recipe.test_size,
                                0 if "val" in held else recipe.val_size, recipe.split_seed)
        for name, ds in held.items():
            setattr(splits, name, list(ds.examples))
        s = splits.sizes()
        unit = "blocks" if recipe.task == "text" else "examples"
        log(f"task {recipe.task} on {self.dataset.name}, model {recipe.model} (recipe {recipe.name!r} and the flags): "
            f"{len(examples)} {unit} -> train {s['train']}, val {s['val']}, test {s['test']}")
        if ("test" not in held and s["test"] < recipe.test_size) or ("val" not in held and s["val"] < recipe.val_size):
            log(f"note: the held-out splits are smaller than asked (test_size {recipe.test_size}, val_size "
                f"{recipe.val_size}): they take at most 20% and 10% of the {len(examples)} {unit}")
        return splits

    def _packed_rows(self) -> list[list[dict[str, Any]]]:
        """The training examples packed into rows of `max_length` tokens (best-fit decreasing, deterministic)."""
        train = self.splits.train
        return [[train[i] for i in row] for row in pack(self.task.lengths(train), self.recipe.max_length)]

    def padding(self) -> dict[str, Any] | None:
        """Padding in the training stream's batches before and after packing (`packing.padding_report`),
        which one this run uses, and the share of examples the task truncated to `max_length`."""
        lengths = self.task.lengths(self.splits.train)
        if not lengths:
            return None
        report = padding_report(lengths, self.recipe.max_length, self.recipe.batch_size, self.recipe.seed)
        return {**report, "packing": self.recipe.packing,
                "padding": report["padding_after" if self.recipe.packing else "padding_before"]}

    def truncation(self) -> dict[str, Any]:
        """How much `max_length` cuts of each split (`truncation.truncation_report`)."""
        positions = getattr(self.model.config, "max_position_embeddings", None) if self.model is not None else None
        splits = {"train": self.splits.train, "test": self.splits.test}
        return truncation_report(self.task, splits, self.recipe.max_length, positions)

    def quantize(self, model, *, correct: bool = False,
                 log: Callable[[str], None] = stderr_log) -> dict[str, Any] | None:
        """QLoRA (recipe `quantize: nf4`): every linear layer but the head and `modules_to_save` -> 4-bit NF4,
        before LoRA.

        With `correct` and `qera_rank > 0`, the frozen QERA correction is computed from the
        first `calibration_size` training examples first and pinned beside the 4-bit layers
        (`lorakit.quant.qera`; `self.qera` gets its report). A model for a saved adapter does not
        need it: the saved adapter holds the correction. Returns the `bits_per_param`
        figures, or None for `quantize: none`.
        """
        if self.recipe.quantize == "none":
            return None
        compute_dtype = self.dtype or torch.float32
        exclude = self.config.modules_to_save or None  # trained in full: not quantized
        if not (correct and self.recipe.qera_rank):
            return quantize_base(model, self.recipe, self.config, self.dtype)
        t = time.perf_counter()
        examples = self.splits.train[:self.recipe.calibration_size]
        b = self.recipe.eval_batch_size
        batches = [self.task.batch(examples[i:i + b], self.device) for i in range(0, len(examples), b)]
        report = qera_quantize(model, batches, rank=self.recipe.qera_rank, compute_dtype=compute_dtype,
                               exclude_modules=exclude)
        self.qera = {**report.as_dict(), "rank": self.recipe.qera_rank, "calibration_examples": len(examples),
                     "seconds": time.perf_counter() - t}
        log(f"qera: frozen rank-{self.recipe.qera_rank} corrections of the NF4 error of {len(report.layers)} layers, "
            f"calibrated on {report.tokens:,} tokens of {len(examples)} training examples; they remove "
            f"{100 * (1 - report.remaining):.1f}% of the layers' output error there (mean over layers); "
            f"{self.qera['seconds']:.0f} s")
        return {**bits_per_param(model).as_dict(), "qera": self.qera}

    def fresh_model(self, quantize: bool = True):
        """Another copy of the base model, loaded the same way (same seed for a new head); quantized as the
        recipe says (without the QERA correction) unless `quantize` is false (then call `self.quantize`)."""
        kind = self.task.model_kind
        labels = getattr(self.task, "labels", None)
        model, _ = load_model(self.source, kind, num_labels=len(labels) if labels else None,
                              labels=[str(l) for l in labels] if labels else None, seed=self.recipe.seed)
        model = model.to(self.device)
        if quantize:
            self.quantize(model)
        return model

    def evaluate(self, model, examples, desc: str | None = None, log: Callable[[str], None] | None = None):
        """The task's metrics and predictions on `examples`; with `desc`, progress and an ETA on stderr."""
        if desc is None or not examples:
            return self.task.evaluate(model, examples, self.recipe.eval_batch_size, self.device, self.dtype)
        batches = -(-len(examples) // self.recipe.eval_batch_size)
        answers = getattr(self.task, "answer_ids", [])
        passes = 1 if getattr(self.task, "single_token", True) else 1 + len(answers)
        with forward_progress(model, batches * passes, desc, log or stderr_log):
            return self.task.evaluate(model, examples, self.recipe.eval_batch_size, self.device, self.dtype)

    def split_info(self) -> dict[str, Any]:
        return {"name": self.dataset.name, "sizes": self.splits.sizes(), "split_seed": self.recipe.split_seed,
                "test_fingerprint": data_mod.fingerprint(self.splits.test), "total": len(self.dataset.examples),
                "path": data_mod.absolute_spec(self.recipe.data), "sha256": data_mod.spec_sha256(self.recipe.data),
                **{f"{split}_file": {"path": data_mod.absolute_spec(ds.name), "sha256": data_mod.spec_sha256(ds.name)}
                   for split, ds in self.held_out.items()}}

    def saved_recipe(self, recipe: Recipe | None = None) -> dict[str, Any]:
        """The recipe (default: this one; a job passes its own when `epochs` decided the steps) as saved
        with the run: data and model paths absolute, so `lorakit eval` and `lorakit merge` work from
        any folder."""
        recipe = recipe or self.recipe
        builtin = self.source.name != str(self.source.path)  # a built-in name stays a name
        model = recipe.model if builtin else str(self.source.path.resolve())
        paths = {k: data_mod.absolute_spec(getattr(recipe, k)) for k in ("data", "test_data", "val_data")
                 if getattr(recipe, k)}
        return {**recipe.to_dict(), **paths, "model": model}

    def model_info(self) -> dict[str, Any]:
        info = {"name": self.source.name, "spec": self.source.spec, "path": str(self.source.path.resolve()),
                "class": type(self.model).__name__, "parameters": count_all(self.model)}
        if self.source.gguf:
            info["gguf_sha256"] = sha256_file(self.source.path)
        return info

    def environment(self) -> dict[str, Any]:
        import transformers  # the job's optional dependency, imported where it is used

        return {"lorakit": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
                "python": platform.python_version(), "device": str(self.device),
                "precision": "bf16 autocast" if self.dtype is not None else "fp32", "threads": self.threads,
                "cpus": os.cpu_count(), "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
                "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}
