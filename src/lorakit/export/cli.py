"""`lorakit export ADAPTER --format gguf --out FILE.gguf [--model M] [--merged [--source-gguf F]] [--outtype T]`.

Without `--merged`: the adapter as a llama.cpp LoRA adapter file, to load on top of the base
model's GGUF (`llama-cli -m BASE.gguf --lora FILE.gguf`). With `--merged`: the base model with
the adapter folded in, as a complete GGUF model file (tokenizer and chat template carried over
from the base model's GGUF file).

The main `lorakit` CLI registers `add_arguments` / `run` as its `export` subcommand. This is
command-line code: it finds the base model with `lorakit.train.models` (built-in names, HF
folders, GGUF files), which the library functions in `lorakit.export` do not depend on.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from .arch import GGUFExportError
from ..io import load_adapter, read_config
from ..train.errors import ModelLoadError
from ..train.models import model_folder, quiet_transformers, resolve_model
from .adapter import export_gguf_adapter
from .merged import export_gguf_merged

HELP = "write an adapter (or the merged model) as a GGUF file for llama.cpp / ollama / LM Studio"
TRAIN_INFO = "lorakit_train.json"  # written next to the adapter by `lorakit train`
SOURCE_NOTE = "lorakit_source.txt"  # written into a folder converted from a GGUF file (first line: the file)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("adapter", metavar="ADAPTER",
                        help="adapter folder (adapter_config.json + adapter_model.safetensors)")
    parser.add_argument("--format", default="gguf", choices=("gguf",), help="output format (default gguf: llama.cpp)")
    parser.add_argument("--out", dest="export_out", required=True, metavar="FILE.gguf", help="the file to write")
    parser.add_argument("--model", default=None, metavar="M",
                        help="base model: built-in name (smollm2), HF model folder, or .gguf file "
                             "(default: the model the adapter was trained on)")
    parser.add_argument("--merged", action="store_true", help="write the merged model (a complete GGUF model file)")
    parser.add_argument("--source-gguf", default=None, metavar="FILE.gguf",
                        help="with --merged and an HF folder as --model: the GGUF file whose tokenizer and chat "
                             "template the merged file carries (default: --model's own GGUF file)")
    parser.add_argument("--outtype", default=None, choices=("f32", "f16", "bf16", "q8_0"),
                        help="tensor type: adapter f32 (default), f16, bf16; merged f16 (default), bf16, q8_0, f32")


@dataclass(frozen=True)
class Base:
    """The base model of an adapter, as the command line found it."""

    spec: str  # what names it (a built-in name or a path)
    gguf: Path | None  # its GGUF file, when it has one (the file llama.cpp loads)
    folder: Path | None  # its HF folder, when one exists already (a GGUF is converted on demand)


def find_base(adapter: str | Path, spec: str | None) -> Base:
    """The base model of `adapter`: `spec`, else the model recorded by `lorakit train`, else the
    adapter config's `base_model_name_or_path` when that folder exists here.

    Raises:
        LoraError: no model given and none recorded, or a model that cannot be found.
    """

    spec = spec or _recorded_model(Path(adapter))
    source = resolve_model(spec)
    if source.gguf:
        return Base(spec, source.path, None)
    note = source.path / SOURCE_NOTE
    gguf = Path(note.read_text(encoding="utf-8").splitlines()[0]) if note.is_file() else None
    return Base(spec, gguf if gguf is not None and gguf.is_file() else None, source.path)


def _recorded_model(adapter: Path) -> str:
    info = adapter / TRAIN_INFO
    if info.is_file():
        try:
            return str(json.loads(info.read_text(encoding="utf-8"))["recipe"]["model"])
        except (json.JSONDecodeError, KeyError, TypeError):
            pass

    name = read_config(adapter).base_model_name_or_path
    if name and Path(name).expanduser().exists():
        return name
    raise GGUFExportError(f"{adapter}: which base model? pass --model (a built-in name, an HF model folder or a "
                          ".gguf file)")


def load_base_model(base: Base):
    """`(model, tokenizer or None)` of `base`: float32, CPU, eval mode (a GGUF file is converted once
    and cached by `lorakit.train.models`)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer


    folder = model_folder(resolve_model(base.spec))
    with quiet_transformers():
        try:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        except (OSError, ValueError, KeyError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelLoadError(f"cannot load {base.spec!r} as a causal LM: {first}") from None
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder)
        except (OSError, ValueError, TypeError):
            tokenizer = None
    return model, tokenizer


def run(args: argparse.Namespace) -> int:
    out = Path(args.export_out)
    if out.suffix != ".gguf":
        raise GGUFExportError(f"--out {out}: the file name must end in .gguf")
    base = find_base(args.adapter, args.model)
    if args.merged:
        return _merged(args, base, out)

    if args.source_gguf:
        raise GGUFExportError("--source-gguf is for --merged (an adapter file carries no tokenizer)")
    if args.outtype == "q8_0":
        raise GGUFExportError("--outtype q8_0 is for --merged; an adapter is written as f32, f16 or bf16")
    model = None if base.gguf is not None else _config(base)
    result = export_gguf_adapter(args.adapter, out, model=model, base_gguf=base.gguf, outtype=args.outtype or "f32")
    rescaled = f"; B rescaled in {len(result.rescaled)} modules to share one alpha" if result.rescaled else ""
    print(f"wrote {out}: {len(result.tensors)} LoRA weight pairs for {result.arch}, "
          f"adapter.lora.alpha={result.alpha:g}{rescaled}")
    if base.gguf is not None:
        print(f"run it: llama-cli -m {base.gguf} --lora {out}")
    return 0


def _config(base: Base):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(base.folder)


def _merged(args: argparse.Namespace, base: Base, out: Path) -> int:
    source = Path(args.source_gguf) if args.source_gguf else base.gguf
    if source is None:
        raise GGUFExportError("--merged needs a GGUF file for the tokenizer and chat template; "
                              f"{base.spec} has none (pass --source-gguf FILE.gguf, or --model FILE.gguf)")
    if not source.is_file():
        raise GGUFExportError(f"--source-gguf {source} does not exist")
    model, _ = load_base_model(base)
    load_adapter(model, args.adapter, trainable=False)
    result = export_gguf_merged(model, out, source_gguf=source, outtype=args.outtype or "f16")
    print(f"wrote {out}: {result.n_tensors} tensors ({result.outtype}), {len(result.merged)} with the adapter merged "
          "in")
    print(f"run it: llama-cli -m {out}")
    return 0

