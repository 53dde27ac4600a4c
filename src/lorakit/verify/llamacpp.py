"""Running a GGUF model (with an optional LoRA adapter file) in llama.cpp itself, through
`llama-cpp-python` (an optional dependency: `pip install llama-cpp-python`; it compiles llama.cpp).

llama.cpp computes in its own kernels: a Q4_1 matrix is multiplied with activations quantized to
8 bits per block of 32 (`Q8_1`), so its logits differ from a float32 evaluation of the same
dequantized weights by more than float rounding (measured on SmolLM2-135M: docs/export.md).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import os
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import LoraError


def available() -> bool:
    """True when `llama_cpp` (llama-cpp-python) is installed."""
    return importlib.util.find_spec("llama_cpp") is not None


class LlamaCpp:
    """A llama.cpp model loaded from `model` (a GGUF file), with `lora` (an adapter GGUF) applied
    at scale `lora_scale` when given. CPU only, `threads` threads: one by default, which is plenty
    for the few dozen tokens a check evaluates and immune to the stalls of llama.cpp's spinning
    thread barriers on a busy CPU (measured here, SmolLM2-135M, 16 tokens, load 7 on 2 cores: 0.22 s
    with one thread, 9 s with two).

    Raises:
        LoraError: llama-cpp-python is not installed, or llama.cpp refuses the files (its own
            message is printed on stderr by llama.cpp).
    """

    def __init__(self, model: str | Path, lora: str | Path | None = None, *, lora_scale: float = 1.0,
                 n_ctx: int = 512, threads: int = 1, kv_f32: bool = False):
        if not available():
            raise LoraError("llama-cpp-python is not installed: pip install llama-cpp-python")
        from llama_cpp import Llama

        with _captured_stderr() as log:
            try:
                self.llm = Llama(model_path=str(model), lora_path=str(lora) if lora else None, lora_scale=lora_scale,
                                 n_ctx=n_ctx, n_batch=n_ctx, n_threads=threads, n_threads_batch=threads,
                                 logits_all=True, verbose=False, seed=0, **({"type_k": 0,
                                                                             "type_v": 0} if kv_f32 else {}))
                error = None
            except (ValueError, RuntimeError) as exc:
                error = str(exc)
            # llama-cpp-python 0.3.36 misses a failed adapter load (a NULL pointer is not None): check it here
            if error is None and lora and not bool(getattr(self.llm, "_lora_adapter", True)):
                error = "llama.cpp refused the adapter file"
                _retry_for_the_reason(self.llm, lora)
            said = [line.strip() for line in log.text().splitlines()
                    if "error" in line.lower() or "failed" in line.lower()]
        if error is not None:
            raise LoraError(f"llama.cpp could not load {model}" + (f" with {lora}" if lora else "")
                            + f": {error}" + (f" ({said[-1]})" if said else ""))

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """Next-token logits at every position of `ids`: `(len(ids), vocab)` float32, from a fresh context."""
        self.llm.reset()
        self.llm.eval(list(int(i) for i in ids))
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32)

    def greedy(self, ids: Sequence[int], n: int) -> list[int]:
        """`n` tokens generated greedily (argmax of the logits) after the prompt `ids`."""
        out = []
        scores = self.logits(ids)[-1]
        for _ in range(n):
            token = int(np.argmax(scores))
            out.append(token)
            self.llm.eval([token])
            scores = self.llm.scores[self.llm.n_tokens - 1]
        return out

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            llm.close()

    def __enter__(self) -> "LlamaCpp":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _retry_for_the_reason(llm, lora) -> None:
    """Load the adapter file once more, outside llama-cpp-python's silencing of the model load, so
    that llama.cpp's own error line reaches the log being captured."""
    import llama_cpp
    from llama_cpp import _logger

    # llama-cpp-python 0.3.36 maps ggml's ERROR level (4) to DEBUG, so show every level meanwhile
    level = _logger.logger.level
    _logger.logger.setLevel(logging.DEBUG)
    try:
        adapter = llama_cpp.llama_adapter_lora_init(llm._model.model, str(lora).encode("utf-8"))
        if adapter:
            llama_cpp.llama_adapter_lora_free(adapter)
    finally:
        _logger.logger.setLevel(level)


class _Log:
    def __init__(self, file, text: io.StringIO):
        self.file, self.python = file, text

    def text(self) -> str:
        self.file.seek(0)
        return self.file.read().decode("utf-8", errors="replace") + self.python.getvalue()


@contextlib.contextmanager
def _captured_stderr():
    """Collect llama.cpp's log lines while loading: the C-level stderr goes to a temporary file and
    Python's `sys.stderr` (where llama-cpp-python prints llama.cpp's errors) to a buffer; their text
    stays readable for an error message. `LORAKIT_DEBUG=1` leaves both alone."""
    buffer = io.StringIO()
    with tempfile.TemporaryFile() as file:
        if os.environ.get("LORAKIT_DEBUG"):
            yield _Log(file, buffer)
            return
        saved = os.dup(2)
        try:
            os.dup2(file.fileno(), 2)
            with contextlib.redirect_stderr(buffer):
                yield _Log(file, buffer)
        finally:
            os.dup2(saved, 2)
            os.close(saved)
