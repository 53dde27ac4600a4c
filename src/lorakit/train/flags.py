"""Command-line flags that set recipe fields, shared by `lorakit train | eval | merge | experiment`."""

from __future__ import annotations

import argparse
from typing import Any

from .errors import RecipeError
from .prepare import stderr_log
from .recipe import load_recipe

# flag -> (recipe field, type); None type: a string
_RECIPE_FLAGS: list[tuple[str, str, Any, str]] = [
    ("--model", "model", str, "built-in model (smollm2, minilm), HF model folder, or .gguf file"),
    ("--task", "task", str, "classify-lm | classify-head | instruct | text"),
    ("--data", "data", str, "built-in data (rotten-tomatoes, chatterbot, hamlet) or a .jsonl/.csv file; for --task "
                            "text: .txt/.jsonl files (comma-separated) or a folder of .txt files"),
    ("--text-field", "text_field", str, "classification text column (default: text)"),
    ("--label-field", "label_field", str, "classification label column: strings or integers (default: label)"),
    ("--encoding", "encoding", str, "text encoding of a .csv/.jsonl data file (default utf-8; e.g. latin-1, cp1252)"),
    ("--prompt-field", "prompt_field", str, "instruction prompt column (default: prompt)"),
    ("--response-field", "response_field", str, "instruction response column (default: response)"),
    ("--prompt-template", "prompt_template", str, "classify-lm prompt with {text} (and {choices})"),
    ("--test-data", "test_data", str, "a file used whole as the held-out test split, never trained on (same "
                                      "format and fields as --data)"),
    ("--val-data", "val_data", str, "a file used whole as the validation split, never trained on (alias "
                                    "--eval-data)"),
    ("--test-size", "test_size", int, "held-out test examples (default 500)"),
    ("--val-size", "val_size", int, "validation examples"),
    ("--split-seed", "split_seed", int, "seed of the deterministic data split"),
    ("--lr", "lr", float, "peak learning rate"),
    ("--weight-decay", "weight_decay", float, "AdamW weight decay"),
    ("--warmup-steps", "warmup_steps", int, "linear warmup steps"),
    ("--schedule", "schedule", str, "cosine | linear | constant"),
    ("--grad-clip", "grad_clip", float, "clip the global gradient norm (0: off)"),
    ("--loraplus-ratio", "loraplus_ratio", float, "LoRA+: B's learning rate = ratio x lr (paper: 16; 0: off)"),
    ("--steps", "steps", int, "optimizer steps"),
    ("--epochs", "epochs", float, "passes over the training split instead of --steps (may be fractional: steps = "
                                  "ceil(epochs x batches per epoch / grad_accum))"),
    ("--batch-size", "batch_size", int, "examples per micro-batch"),
    ("--grad-accum", "grad_accum", int, "micro-batches per optimizer step"),
    ("--max-length", "max_length", int, "tokens per example (per block for --task text; up to the model's limit)"),
    ("--gradient-checkpointing", "gradient_checkpointing", str,
     "auto (on from 2048 tokens per micro-batch) | on | off: recompute each layer in backward"),
    ("--eval-every", "eval_every", int, "validate every N steps (0: start and end only)"),
    ("--eval-batch-size", "eval_batch_size", int, "examples per evaluation batch"),
    ("--seed", "seed", int, "seed of LoRA init, head init and data order"),
    ("--device", "device", str, "auto (GPU with bf16 if present, else CPU) | cpu | cuda"),
    ("--precision", "precision", str, "auto | fp32 | bf16"),
    ("--threads", "threads", int, "torch CPU threads (default: all available)"),
    ("--quantize", "quantize", str, "none | nf4: QLoRA, the frozen linear layers in 4-bit NF4 (needs bitsandbytes)"),
    ("--qera-rank", "qera_rank", int, "with --quantize nf4: rank of the frozen calibrated correction of the NF4 error "
                                      "on every quantized layer (QERA; 0: plain QLoRA; default 8)"),
    ("--calibration-size", "calibration_size", int,
     "training examples that calibrate the --qera-rank correction (default 128)"),
    ("--out", "out", str, "output folder (default runs/<recipe>; with --data FILE runs/<recipe>-<file stem>)"),
]
_LORA_FLAGS: list[tuple[str, str, Any, str]] = [
    ("--r", "r", int, "LoRA rank"),
    ("--alpha", "alpha", float, "LoRA alpha (scaling = alpha / r)"),
    ("--lora-dropout", "dropout", float, "dropout on the LoRA branch"),
    ("--target-modules", "target_modules", str,
     "comma-separated names, a regex, all-linear, or all (all-linear plus mixture-of-experts expert weights)"),
    ("--target-parameters", "target_parameters", str,
     "comma-separated 3-D expert weights to adapt, e.g. mlp.experts.gate_up_proj,mlp.experts.down_proj"),
    ("--modules-to-save", "modules_to_save", str, "comma-separated modules trained in full and saved (e.g. a head)"),
]

_FLAG_ALIASES = {"--val-data": ("--eval-data",)}  # HF Trainer's eval_dataset is the validation set


def add_recipe_arguments(p: argparse.ArgumentParser, positional: bool = True, skip: tuple[str, ...] = ()) -> None:
    """The flags that set recipe fields (shared by train, eval and merge); `skip` leaves some flags out."""
    if positional:
        p.add_argument("recipe", nargs="?",
                       help="built-in recipe (sentiment, sentiment-minilm, chat) or a .yaml/.toml/.json file")
    p.add_argument("--recipe", dest="recipe_opt", metavar="RECIPE", help="same as the positional RECIPE")
    g = p.add_argument_group("recipe fields (override the recipe)")
    for prefix, flags in (("field_", _RECIPE_FLAGS), ("lora_", _LORA_FLAGS)):
        for flag, field, typ, help_ in flags:
            if flag in skip:
                continue
            metavar = None if typ is str else field.upper()
            g.add_argument(flag, *_FLAG_ALIASES.get(flag, ()), dest=prefix + field, type=typ, default=None, help=help_,
                           metavar=metavar)
    g.add_argument("--label-words", metavar="L=W,...", help="label -> answer word, e.g. 0=negative,1=positive")
    g.add_argument("--packing", dest="field_packing", action=argparse.BooleanOptionalAction, default=None,
                   help="instruct: pack several examples into each max-length row (each attends only to itself)")
    g.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="set any recipe field (VALUE read as YAML), e.g. --set lora.use_rslora=true; repeatable")


def _split_list(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _target_modules(value: str) -> list[str] | str:
    if value in ("all-linear", "all") or any(c in value for c in "*[]()|^$\\?+"):
        return value
    return _split_list(value)


def recipe_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The recipe changes asked for on the command line."""
    out: dict[str, Any] = {}
    lora: dict[str, Any] = {}
    for key, value in vars(args).items():
        if value is None:
            continue
        if key.startswith("field_"):
            out[key[6:]] = value
        elif key.startswith("lora_"):
            name = key[5:]
            if name == "target_modules":
                value = _target_modules(value)
            elif name in ("modules_to_save", "target_parameters"):
                value = _split_list(value)
            lora[name] = value
    if getattr(args, "label_words", None):
        words = {}
        for item in _split_list(args.label_words):
            label, sep, word = item.partition("=")
            if not sep or not label.strip() or not word.strip():
                raise RecipeError(f"--label-words expects LABEL=WORD pairs separated by commas, got {item!r}")
            words[label.strip()] = word.strip()
        out["label_words"] = words
    for item in getattr(args, "set", []) or []:
        import yaml  # an optional dependency of the job, needed only for --set

        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise RecipeError(f"--set expects FIELD=VALUE, got {item!r}")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        key = key.strip()
        if key.startswith("lora."):
            lora[key[5:]] = value
        else:
            out[key] = value
    if lora:
        out["lora"] = lora
    return out


def recipe_source(args: argparse.Namespace) -> str | None:
    """The recipe named positionally or with `--recipe` (not both, unless equal)."""
    pos, opt = getattr(args, "recipe", None), getattr(args, "recipe_opt", None)
    if pos and opt and pos != opt:
        raise RecipeError(f"two recipes given ({pos!r} and {opt!r}); pass one")
    return pos or opt


def resolve_recipe(args: argparse.Namespace):
    """The recipe the flags describe (a rescaled default learning rate is said on stderr)."""
    return load_recipe(recipe_source(args), recipe_overrides(args), log=stderr_log)
