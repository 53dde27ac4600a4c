"""`Recipe`: everything one training run needs, from a preset, a YAML/TOML/JSON file and flags.

A recipe is a flat set of fields plus one `lora` mapping (the `LoraConfig`
arguments, PEFT names). Precedence: preset < file < flags. The resolved recipe
is written next to the adapter (`lorakit_train.json`), so `lorakit eval` can
rebuild the same model, data split and scoring from the saved files alone.
"""

from __future__ import annotations

import codecs
import dataclasses
import difflib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .errors import RecipeError, RecipeFileNotFound
from ..variants.pissa import is_weight_init
from ..config import LoraConfig
from ..errors import ConfigError

TASKS = ("classify-lm", "classify-head", "instruct", "text")
CHECKPOINTING = ("auto", "on", "off")
SCHEDULES = ("cosine", "linear", "constant")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16")
QUANTIZE = ("none", "nf4")
PARALLEL = ("ddp", "fsdp2")

# The default sentiment prompt: an instruction, the review, and "Sentiment:"; the answer is one word.
SENTIMENT_TEMPLATE = "Review: {text}\nIs this movie review positive or negative?\nSentiment:"
# For classification data the user brings: the choices are the label words.
GENERIC_TEMPLATE = "Text: {text}\nAnswer with one of: {choices}.\nAnswer:"


@dataclass
class Recipe:
    """One training run. Units: `lr` per step; `max_length` in tokens; sizes in examples.

    Fields:
        name: recipe name (used for the default output folder `runs/<name>`).
        model: a built-in model (`smollm2`, `minilm`), a Hugging Face model folder, or a `.gguf` file.
        task: `classify-lm` (causal LM answers one word; scored by comparing the answers'
            log-likelihoods), `classify-head` (encoder + sequence-classification head, trained
            through `modules_to_save`), `instruct` (prompt -> response, loss on response tokens),
            or `text` (plain text, continued pretraining: documents cut into `max_length`-token
            blocks, loss on every token, held-out perplexity; `lorakit.train.text`).
        data: a built-in data set (`rotten-tomatoes`, `chatterbot`; for `text`: `hamlet`), a
            `.jsonl` / `.csv` file, or for `text` one or more `.txt` / `.jsonl` files (comma-separated,
            or a folder of `.txt` files; a `.jsonl` file's `text_field` holds the documents).
        text_field, label_field: columns of a classification file.
        encoding: the text encoding of a .csv/.jsonl data file (default utf-8; e.g. latin-1, cp1252).
        prompt_field, response_field: columns of an instruction file.
        label_words: label value (as a string) -> answer word for `classify-lm`; default: the label itself.
        prompt_template: `classify-lm` prompt with `{text}` (and optionally `{choices}`); default
            depends on the data.
        test_data, val_data: a file (same format and fields as `data`) used whole as the test /
            validation split, never trained on (training examples sharing a text with it are
            dropped); `test_size` / `val_size` are then not taken from `data`.
        test_size, val_size: held-out examples (deterministic split by `split_seed`; the test
            split is never trained on). Shrunk for small files (at most 20% / 10% of the data).
        lora: `LoraConfig` arguments (`r`, `alpha`, `dropout`, `target_modules`, `modules_to_save`, ...).
        lr, weight_decay, warmup_steps, schedule, grad_clip: AdamW with warmup then
            cosine / linear decay to 0 (or constant); gradient clipping by global norm (0: off).
        loraplus_ratio: LoRA+ (Hayou et al. 2024, arXiv:2402.12354): B's learning rate is this
            many times `lr` (the paper uses 16; `lorakit.loraplus_param_groups`); 0: off.
        steps: optimizer steps (`epochs`, when set, decides them: passes over the training split,
            `ceil(epochs x batches per epoch / grad_accum)`); batch_size: examples per micro-batch
            (per process: with N processes a step sees `batch_size * grad_accum * N` examples);
            grad_accum: micro-batches per step.
        max_length: tokens per example (cut by the task's rule: a document keeps its start, an
            instruction prompt its end; `lorakit.train.truncation`).
        eval_every: validation every N steps (0: only at the start and the end).
        eval_batch_size: examples per evaluation batch (recorded: results depend on batching only in
            the last float bits, and `lorakit eval` repeats it exactly).
        seed: LoRA init, head init, data order. device: `auto` (GPU if present), `cpu`, `cuda`.
        precision: `auto` (bf16 autocast on a GPU, fp32 on the CPU), `fp32`, `bf16`.
        threads: torch CPU threads; default: all CPUs this process may use.
        quantize: `none`, or `nf4`: QLoRA (arXiv:2305.14314) - every linear layer but the LM head is
            quantized to 4-bit NormalFloat with double quantization after loading and before LoRA is
            injected (`lorakit.quantize`; compute dtype: fp32, or bf16 with `precision: bf16`); the
            report records the base weights' resident bytes and bits per parameter.
        qera_rank: with `quantize: nf4`, the rank of a frozen correction of the NF4 error kept
            beside every quantized layer (QERA, arXiv:2410.06040; `lorakit.quant.qera`): the best
            rank-k correction of each layer's *output* error on `calibration_size` training
            examples. LoRA trains on top of `NF4 + correction`; the saved adapter holds both
            (it loads on a plain NF4 base). 0: the paper's plain QLoRA. Default 8.
        calibration_size: training examples whose tokens calibrate the correction.
        save_every: write a checkpoint (adapter, optimizer, scheduler, RNG and data position,
            in `out/checkpoints/`) every N steps and after the last step; `None` (default): every
            `ceil(steps / 10)` steps; 0: no checkpoints. `lorakit train --resume OUT` continues
            from the latest one (see docs/training.md).
        parallel: with several processes (`--nproc-per-node`, `torchrun`): `ddp` (every process
            holds the whole base model; only the trainable tensors' gradients are all-reduced) or
            `fsdp2` (`torch.distributed.fsdp.fully_shard`: the frozen base is sharded across the
            processes; the adapters stay whole on each and their gradients are all-reduced).
            Ignored by a single process. See docs/distributed.md.
        gradient_checkpointing: `auto` (on from 2,048 tokens per micro-batch, `batch_size x max_length`),
            `on` or `off`: keep only each decoder layer's input for backward and recompute the layer
            (non-reentrant, `lorakit.train.memory`); the values and gradients are the same.
        packing: `instruct` only: pack several examples into each row of `max_length` tokens, each
            attending only to itself (`lorakit.train.packing`); `batch_size` then counts rows, and the
            loss is the mean over the supervised tokens, as in the padded path (the same objective).
        out: output folder; default `runs/<name>` (`load_recipe` names a run whose overrides give a data
            file but no `name` or `out` `<recipe>-<file stem>`).
    """

    name: str = "sentiment"
    model: str = "smollm2"
    task: str = "classify-lm"
    data: str = "rotten-tomatoes"
    text_field: str = "text"
    label_field: str = "label"
    encoding: str = "utf-8"
    prompt_field: str = "prompt"
    response_field: str = "response"
    label_words: dict[str, str] | None = None
    prompt_template: str | None = None
    test_data: str | None = None
    val_data: str | None = None
    test_size: int = 500
    val_size: int = 64
    split_seed: int = 0
    lora: dict[str, Any] = field(
        default_factory=lambda: {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]})
    lr: float = 2e-3
    weight_decay: float = 0.0
    warmup_steps: int = 4
    schedule: str = "cosine"
    grad_clip: float = 1.0
    loraplus_ratio: float = 0.0
    steps: int = 40
    epochs: float | None = None
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 96
    eval_every: int = 20
    eval_batch_size: int = 32
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    threads: int | None = None
    quantize: str = "none"
    qera_rank: int = 8
    calibration_size: int = 128
    save_every: int | None = None
    parallel: str = "ddp"
    gradient_checkpointing: str = "auto"
    packing: bool = False
    out: str | None = None

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Check every field. Raises `RecipeError` naming the first bad one."""
        for name in ("name", "model", "data", "text_field", "label_field", "prompt_field", "response_field"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise RecipeError(f"recipe field {name!r} must be a non-empty string, got {value!r}")
        _choice("task", self.task, TASKS)
        for name in ("test_data", "val_data"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise RecipeError(f"recipe field {name!r} must be a data file or null, got {value!r}")
            if value is not None and self.task == "text":
                raise RecipeError(f"recipe field {name!r} is not supported with task 'text' (its held-out blocks "
                                  "come from the --data documents)")
        try:
            codecs.lookup(self.encoding)
        except (LookupError, TypeError):
            raise RecipeError(f"recipe field 'encoding' is {self.encoding!r}, not a text encoding Python knows "
                              "(e.g. utf-8, latin-1, cp1252)") from None
        _choice("schedule", self.schedule, SCHEDULES)
        _choice("device", self.device, DEVICES)
        _choice("precision", self.precision, PRECISIONS)
        _choice("quantize", self.quantize, QUANTIZE)
        _choice("parallel", self.parallel, PARALLEL)
        _choice("gradient_checkpointing", self.gradient_checkpointing, CHECKPOINTING)
        if not isinstance(self.packing, bool):
            raise RecipeError(f"recipe field 'packing' must be true or false, got {self.packing!r}")
        if self.packing and self.task != "instruct":
            raise RecipeError(f"recipe field 'packing' is for task 'instruct' (task {self.task!r}: the 'text' task "
                              "packs its blocks itself)")
        for name in ("steps", "batch_size", "grad_accum", "max_length", "eval_batch_size", "test_size", "val_size",
                     "calibration_size"):
            _int(name, getattr(self, name), minimum=1)
        if self.epochs is not None and (isinstance(self.epochs, bool) or not isinstance(self.epochs, (int, float))
                                        or not 0 < self.epochs < 1e6):
            raise RecipeError(f"recipe field 'epochs' must be a number > 0 (or null: use steps), got {self.epochs!r}")
        for name in ("warmup_steps", "eval_every", "seed", "split_seed", "qera_rank"):
            _int(name, getattr(self, name), minimum=0)
        if self.threads is not None:
            _int("threads", self.threads, minimum=1)
        if self.save_every is not None:
            _int("save_every", self.save_every, minimum=0)
        for name in ("lr", "weight_decay", "grad_clip", "loraplus_ratio"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or value != value:
                raise RecipeError(f"recipe field {name!r} must be a number >= 0, got {value!r}")
        if self.lr <= 0:
            raise RecipeError(f"recipe field 'lr' must be > 0, got {self.lr!r}")
        if self.label_words is not None:
            if not isinstance(self.label_words, dict) or not all(
                isinstance(k, (str, int)) and isinstance(v, str) and v.strip() for k, v in self.label_words.items()
            ):
                raise RecipeError("recipe field 'label_words' must map labels to non-empty words, got "
                                  f"{self.label_words!r}")
            self.label_words = {str(k): v for k, v in self.label_words.items()}
        if self.prompt_template is not None:
            if not isinstance(self.prompt_template, str) or "{text}" not in self.prompt_template:
                raise RecipeError(f"recipe field 'prompt_template' must be a string containing '{{text}}', got "
                                  f"{self.prompt_template!r}")
            try:
                self.prompt_template.format(text="x", choices="a, b")
            except (KeyError, IndexError, ValueError) as exc:
                raise RecipeError(f"recipe field 'prompt_template': only {{text}} and {{choices}} may be used "
                                  f"({exc!r})") from None
        if self.out is not None and (not isinstance(self.out, str) or not self.out):
            raise RecipeError(f"recipe field 'out' must be a folder path, got {self.out!r}")

        config = self.lora_config()  # validates the lora mapping
        if self.quantize != "none" and self.qera_rank and (is_weight_init(config.init) or config.use_dora):
            which = "lora.use_dora" if config.use_dora else f"lora.init_lora_weights={config.init!r}"
            raise RecipeError(f"recipe field 'qera_rank': the frozen NF4 correction cannot be combined with {which} "
                              "(they read the base weight without it); set qera_rank: 0")

    def lora_config(self):
        """The `lorakit.LoraConfig` of this recipe. Raises `RecipeError` for a bad `lora` mapping."""

        if not isinstance(self.lora, dict):
            raise RecipeError(f"recipe field 'lora' must be a mapping of LoraConfig arguments, got {self.lora!r}")
        names = {f.name for f in dataclasses.fields(LoraConfig)}
        renames = {"lora_alpha": "alpha", "lora_dropout": "dropout"}
        kwargs = {}
        for key, value in self.lora.items():
            key = renames.get(key, key)
            if key not in names:
                raise RecipeError(f"recipe field 'lora.{key}' is not a LoraConfig argument{_close(key, names)}")
            kwargs[key] = value
        try:
            return LoraConfig(**kwargs)
        except ConfigError as exc:
            message = str(exc)[len(exc.field) + 2:]
            raise RecipeError(f"recipe field 'lora.{exc.field}': {message}") from None

    @property
    def checkpoint_every(self) -> int:
        """Steps between checkpoints: `save_every`, or `ceil(steps / 10)` when unset; 0: none."""
        return self.save_every if self.save_every is not None else max(1, math.ceil(self.steps / 10))

    @property
    def out_dir(self) -> Path:
        """The output folder: `out`, or `runs/<name>`."""
        return Path(self.out) if self.out else Path("runs") / self.name

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "Recipe":
        """A validated copy with some fields changed (`lora` entries are merged, not replaced)."""
        return apply(self, changes)


# ---------------------------------------------------------------------- the default learning rate
# LoRA's best AdamW learning rate at alpha = 32, measured by `lorakit experiment lr-sweep` on all-MiniLM-L6-v2
# (docs/experiments/lr-sweep/report.md, 100 steps): all-linear, 7.3e-4 to 9.0e-4 for every rank from 1 to 64
# (6x full fine-tuning's 1.3e-4); attention projections only, at the same parameter count, 2.0e-3.
LR_AT_ALPHA_32 = 8e-4
ATTENTION_ONLY_FACTOR = 2.5
_ATTENTION = re.compile(r"(^|\.)(q_proj|k_proj|v_proj|o_proj|query|key|value|c_attn|qkv_proj|out_proj|Wqkv|"
                        r"attention\.output\.dense)$")


def attention_only(target_modules: Any) -> bool:
    """Whether a `target_modules` list names attention projections only (q/k/v/o and their BERT, GPT-2 and
    fused names); a regex, `all-linear` or `all` counts as not."""
    return (isinstance(target_modules, (list, tuple)) and bool(target_modules)
            and all(isinstance(t, str) and _ATTENTION.search(t) for t in target_modules))


def default_lr(lora: dict[str, Any]) -> float:
    """The best learning rate the lr-sweep predicts for a LoRA shape: `LR_AT_ALPHA_32 * 32 / (r * scaling)`,
    times `ATTENTION_ONLY_FACTOR` when only attention projections are adapted. `load_recipe` uses the ratio
    between two shapes to rescale a preset's tuned `lr` when the user changes the shape but not `lr`.

    With Adam and `lora_B` starting at zero, the first steps change `scaling * B @ A` in proportion to
    `lr * scaling`, and at alpha = 32 (scaling 32 / r) the sweep's optimum hardly depends on the rank (spread
    1.24x over r = 1..64; LoRA Without Regret, Schulman et al. 2025, "Optimal learning rate"), so `lr * scaling *
    r` is what to hold fixed: plain LoRA `lr = 0.0256 / alpha` whatever `r`, rsLoRA (`alpha / sqrt(r)`)
    `0.0256 / (alpha * sqrt(r))`. Attention-only LoRA's optimum was 2.5x all-linear's (the SmolLM2 presets,
    tuned by hand, agree: q_proj + v_proj at 2e-3, all-linear at 1e-3, both alpha 16).
    Args: `lora`, LoraConfig arguments (`r`, `alpha`, `use_rslora`, `target_modules`; LoraConfig's defaults
    r = alpha = 8 where absent). Returns the rate per step (> 0). Measured on one encoder and task, 100 steps.
    """
    r = float(lora.get("r", 8))
    alpha = float(lora.get("alpha", 8))
    scaling = alpha / (math.sqrt(r) if lora.get("use_rslora") else r)
    factor = ATTENTION_ONLY_FACTOR if attention_only(lora.get("target_modules")) else 1.0
    return LR_AT_ALPHA_32 * 32 / (r * scaling) * factor


# ---------------------------------------------------------------------- presets
PRESETS: dict[str, dict[str, Any]] = {
    # The demo: SmolLM2-135M-Instruct answers "positive"/"negative" after "Sentiment:".
    "sentiment": {},
    # all-MiniLM-L6-v2 with a sequence-classification head, trained through modules_to_save.
    "sentiment-minilm": {
        "name": "sentiment-minilm", "model": "minilm", "task": "classify-head",
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["query", "value"],
                 "modules_to_save": ["classifier"]},
        "lr": 1e-3, "steps": 250, "batch_size": 16, "max_length": 64, "eval_every": 50, "warmup_steps": 10,
        "eval_batch_size": 64,
    },
    # Instruction tuning of SmolLM2 on chatterbot question -> answer pairs, loss on answers only.
    "chat": {
        "name": "chat", "task": "instruct", "data": "chatterbot", "test_size": 200, "val_size": 64,
        "lr": 1e-3, "steps": 60, "batch_size": 8, "max_length": 128, "eval_every": 20, "eval_batch_size": 16,
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"},
    },
}


def preset(name: str) -> Recipe:
    """The built-in recipe `name` (see `PRESETS`). Raises `RecipeError` for an unknown name."""
    if name not in PRESETS:
        raise RecipeError(f"unknown recipe {name!r}; built-in recipes: {', '.join(PRESETS)} (or pass a "
                          ".yaml/.toml/.json file)")
    return apply(Recipe(), PRESETS[name])


def apply(base: Recipe, changes: dict[str, Any]) -> Recipe:
    """`base` with `changes` applied and validated. `lora` is merged key by key.

    Raises:
        RecipeError: an unknown field (with close matches) or an invalid value.
    """
    names = {f.name for f in dataclasses.fields(Recipe)}
    data = base.to_dict()
    for key, value in changes.items():
        key = key.replace("-", "_")
        if key not in names:
            raise RecipeError(f"unknown recipe field {key!r}{_close(key, names)}")
        if key == "lora":
            if not isinstance(value, dict):
                raise RecipeError(f"recipe field 'lora' must be a mapping of LoraConfig arguments, got {value!r}")
            data["lora"] = {**data["lora"], **value}
        else:
            data[key] = value
    return Recipe(**data)


def read_recipe_file(path: str | Path) -> dict[str, Any]:
    """The mapping in a `.yaml`/`.yml`, `.toml` or `.json` recipe file.

    Raises:
        FileNotFoundError: no such file.
        RecipeError: unreadable or not a mapping.
    """
    path = Path(path)
    if not path.is_file():
        raise RecipeFileNotFound(f"recipe file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    suffix = path.suffix.lower()
    try:
        if suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        elif suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib  # type: ignore[no-redef]
            data = tomllib.loads(text)
        elif suffix == ".json":
            data = json.loads(text)
        else:
            raise RecipeError(f"recipe file {path}: unknown format {suffix!r} (use .yaml, .toml or .json)")
    except RecipeError:
        raise
    except Exception as exc:  # the parsers' own error types differ
        raise RecipeError(f"recipe file {path} could not be parsed: {str(exc).splitlines()[0]}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"recipe file {path} must hold a mapping of fields, got {type(data).__name__}")
    return data


def load_recipe(source: str | Path | None = None, overrides: dict[str, Any] | None = None,
                log: Callable[[str], None] | None = None) -> Recipe:
    """Resolve a recipe: a preset name or a file (default: the `sentiment` preset), then `overrides`.

    A file may name the preset it starts from with `preset: NAME` (default `sentiment`). When the file
    and the overrides change the LoRA shape (`r`, `alpha`, `use_rslora`, `target_modules`) but give no
    `lr`, the preset's `lr` is rescaled by `default_lr` (new shape / preset's shape), and `log` (if any)
    says so.
    """
    data: dict[str, Any] = {}
    if source is None:
        base = preset("sentiment")
    elif str(source) in PRESETS:
        base = preset(str(source))
    else:
        path = Path(source)
        if path.suffix.lower() not in (".yaml", ".yml", ".toml", ".json") and not path.exists():
            raise RecipeError(f"unknown recipe {str(source)!r}; built-in recipes: {', '.join(PRESETS)} (or pass a "
                              ".yaml/.toml/.json file)")
        data = read_recipe_file(path)
        base = preset(str(data.pop("preset", "sentiment")))
    overrides = overrides or {}
    recipe = apply(base, data)
    recipe = apply(recipe, {**_named_after_data(recipe, overrides), **overrides})
    given = set(data) | set(overrides)
    log = log if log is not None else (lambda _message: None)
    recipe = _fit_warmup(recipe, base, "warmup_steps" in given, log)
    if "lr" in given:
        return recipe
    lr = base.lr * default_lr(recipe.lora) / default_lr(base.lora)
    if not math.isclose(lr, base.lr, rel_tol=1e-9):
        log(f"lr {lr:.3g}: the {base.name!r} recipe's {base.lr:g} rescaled for this LoRA shape by the measured "
            "rule (lr x scaling x r fixed; x2.5 for attention-only targets; docs/training.md); --lr sets it")
        recipe = apply(recipe, {"lr": lr})
    return recipe


def _fit_warmup(recipe: Recipe, base: Recipe, given: bool, log: Callable[[str], None]) -> Recipe:
    """A run shorter than its warmup never reaches its learning rate: the preset's warmup is cut to the
    preset's share of the new `steps` (quietly: a default adapting to the run, shown in the report); a warmup
    the user gave is kept, with a warning."""
    if recipe.warmup_steps <= recipe.steps:  # (s + 1) / warmup reaches 1 on step s = warmup - 1
        return recipe
    peak = recipe.steps / recipe.warmup_steps
    if given:
        log(f"warning: warmup_steps {recipe.warmup_steps} > steps {recipe.steps}: the learning rate peaks at "
            f"{peak:.0%} of lr {recipe.lr:g} on the last step")
        return recipe
    return apply(recipe, {"warmup_steps": round(base.warmup_steps * recipe.steps / base.steps)})  # the report shows it


BUILTIN_DATA = ("rotten-tomatoes", "chatterbot", "hamlet")


def _named_after_data(recipe: Recipe, overrides: dict[str, Any]) -> dict[str, Any]:
    """`{"name": "<recipe>-<file stem>"}` when the overrides name a data file but neither `name` nor `out`: a run on
    one's own data gets its own default folder (`runs/sentiment-reviews`), not the preset's."""
    data = overrides.get("data")
    if not isinstance(data, str) or data in BUILTIN_DATA or {"name", "out"} & set(overrides):
        return {}
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(data.split(",")[0].strip().rstrip("/")).stem).strip("-.")
    return {"name": f"{recipe.name}-{stem}"} if stem else {}


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise RecipeError(f"recipe field {name!r} must be one of {', '.join(choices)}, got {value!r}")


def _int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise RecipeError(f"recipe field {name!r} must be an integer >= {minimum}, got {value!r}")


def _close(key: str, names) -> str:
    close = difflib.get_close_matches(key, sorted(names), n=3)
    return f" (did you mean {', '.join(close)}?)" if close else ""
