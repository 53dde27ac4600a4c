"""Writing GGUF files with the `gguf` package's `GGUFWriter`, atomically, and encoding tensors.

Encodings (`outtype`): `f32`, `f16`, `bf16` (the `gguf` package's own rounding,
`gguf.quants`), and `q8_0` (blocks of 32 values, one float16 scale each; llama.cpp's
`quantize_row_q8_0` rule as the `gguf` package implements it). One-dimensional tensors
(norms, biases) always stay float32, as llama.cpp's converter writes them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from ..fileio import atomic_output
from .arch import GGUFExportError

OUTTYPES = ("f32", "f16", "bf16", "q8_0")


@dataclass
class Tensor:
    """One tensor for a GGUF file: `data` as stored (float array, or uint8 blocks with `qtype`)."""

    name: str
    data: np.ndarray
    qtype: Any = None  # a gguf.GGMLQuantizationType for block-encoded data, else None


def check_outtype(outtype: str, allowed: tuple[str, ...] = OUTTYPES) -> str:
    if outtype not in allowed:
        raise GGUFExportError(f"outtype {outtype!r} is not one of {', '.join(allowed)}")
    return outtype


def encode(name: str, array: np.ndarray, outtype: str) -> Tensor:
    """`array` (float32/float64, numpy order `(rows, row_length)`) as tensor `name` in `outtype`.

    1-D arrays stay float32. `q8_0` needs rows whose length is a multiple of 32; other rows are
    written as float16 (as llama.cpp's converter does).
    """
    import gguf

    array = np.ascontiguousarray(array, dtype=np.float32)
    if array.ndim <= 1 or outtype == "f32":
        return Tensor(name, array)
    if outtype == "q8_0" and array.shape[-1] % 32 == 0:
        return Tensor(name, gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0)
    if outtype == "bf16":
        return Tensor(name, gguf.quants.quantize(array, gguf.GGMLQuantizationType.BF16), gguf.GGMLQuantizationType.BF16)
    return Tensor(name, array.astype(np.float16))


def file_type(outtype: str) -> int:
    """The `general.file_type` value (llama.cpp's `LlamaFileType`) of a file written in `outtype`."""
    import gguf

    return int({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype])


@dataclass
class Value:
    """One metadata key-value pair: `vtype` (and `sub_type` for arrays) are `gguf.GGUFValueType`s."""

    key: str
    value: Any
    vtype: Any
    sub_type: Any = None


def write_gguf(path: str | Path, arch: str, values: Iterable[Value], tensors: Iterable[Tensor]) -> Path:
    """Write a GGUF file at `path` atomically (the old file or the new one, never a torn one).

    `general.architecture` comes from `arch`; `values` in order; then `tensors` in order.
    Raises:
        GGUFExportError: the folder of `path` does not exist.
    """
    from gguf import GGUFWriter

    path = Path(path)
    if not path.parent.is_dir():
        raise GGUFExportError(f"cannot write {path}: folder {path.parent} does not exist")
    with atomic_output(path) as tmp:
        writer = GGUFWriter(tmp, arch)
        try:
            for v in values:
                writer.add_key_value(v.key, v.value, v.vtype, v.sub_type)
            for t in tensors:
                if t.qtype is None:
                    writer.add_tensor(t.name, t.data)
                else:
                    writer.add_tensor(t.name, t.data, raw_shape=t.data.shape, raw_dtype=t.qtype)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
    return path
