"""`lorakit verify ADAPTER [--model M] [--base-gguf F] [--prompt TEXT] [--json] [--no-peft] [--no-llama-cpp]`.

Exit codes: 0 every check passed; 1 a check failed (a no-op adapter, keys matching nothing, an
adapter that does not fit the model, a form whose logits differ); 2 bad input (one line on stderr).
The main `lorakit` CLI registers `add_arguments` / `run` as its `verify` subcommand; the base model
is found as `lorakit export` finds it (`lorakit.export.cli.find_base`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..export.cli import find_base, load_base_model
from ..errors import UsageError
from ..io import read_adapter
from . import verify

HELP = "check an adapter: coverage, no-op, keys matching nothing, and unmerged = merged = reloaded = PEFT = llama.cpp"
DEFAULT_PROMPT = ("<|im_start|>user\nIs this review positive or negative? A warm, funny and moving film.<|im_end|>\n"
                  "<|im_start|>assistant\n")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("adapter", metavar="ADAPTER",
                        help="adapter folder (adapter_config.json + adapter_model.safetensors)")
    parser.add_argument("--model", default=None, metavar="M",
                        help="base model: built-in name (smollm2), HF model folder, or .gguf file "
                             "(default: the model the adapter was trained on)")
    parser.add_argument("--base-gguf", default=None, metavar="FILE.gguf",
                        help="the base model's GGUF file for the llama.cpp check, when --model is an HF folder "
                             "(a mixture-of-experts model: a GGUF cannot be --model itself)")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT,
                        help="text whose next-token logits are compared across forms")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--no-peft", action="store_true", help="skip the PEFT comparison")
    parser.add_argument("--no-llama-cpp", action="store_true", help="skip the llama.cpp comparison")


def run(args: argparse.Namespace) -> int:

    read_adapter(args.adapter)  # a missing or unreadable folder is bad input: before loading any model
    base = find_base(args.adapter, args.model)
    base_gguf = Path(args.base_gguf) if args.base_gguf else base.gguf
    if base_gguf is not None and not base_gguf.is_file():  # bad input: before loading any model
        raise UsageError(f"--base-gguf {base_gguf} does not exist")
    model, tokenizer = load_base_model(base)
    ids = tokenizer(args.prompt, return_tensors="pt").input_ids if tokenizer is not None else None
    if ids is not None and ids.numel() == 0:  # a folder without tokenizer files loads an empty vocabulary
        ids = None
    # ids None: verify's fixed probe tokens
    report = verify(model, args.adapter, input_ids=ids, base_gguf=base_gguf,
                    peft=not args.no_peft, llama_cpp=not args.no_llama_cpp)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.to_text())
    return 0 if report.ok else 1
