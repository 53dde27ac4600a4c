"""Progress with an ETA for the job's long loops (evaluations, training) on stderr.

On a terminal a `tqdm` bar (its own ETA); otherwise (a log file, CI) a log line at most every
`LORAKIT_PROGRESS_SECONDS` seconds (default 10): `evaluating test: 12/40 batches, 18 s, eta 42 s`.
`forward_progress(model, total, ...)` counts a model's forward passes (a hook on its input embeddings), so an
evaluation loop needs no change to report its progress.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import Callable, Iterator


def eta_text(done: int, total: int, elapsed: float) -> str:
    """`eta 42 s` / `eta 3 min` from the mean pace so far ('' before the first item)."""
    if done <= 0 or total <= done:
        return ""
    left = elapsed / done * (total - done)
    return f"eta {left:.0f} s" if left < 120 else f"eta {left / 60:.0f} min"


class Progress:
    """`update()` per item: a tqdm bar on a terminal, else a throttled log line."""

    def __init__(self, total: int, desc: str, log: Callable[[str], None], unit: str = "batches"):
        self.total, self.desc, self.log, self.unit = total, desc, log, unit
        self.done, self.t0 = 0, time.perf_counter()
        self.every = float(os.environ.get("LORAKIT_PROGRESS_SECONDS", "10"))
        self.last = self.t0
        self.bar = None
        if sys.stderr.isatty():
            from tqdm.auto import tqdm  # an optional dependency of the job, imported where it is used

            self.bar = tqdm(total=total, desc=desc, unit=unit.rstrip("es") or unit, file=sys.stderr, leave=False,
                            dynamic_ncols=True)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.perf_counter()
        if now - self.last >= self.every and self.done < self.total:
            self.last = now
            eta = eta_text(self.done, self.total, now - self.t0)
            self.log(f"{self.desc}: {self.done}/{self.total} {self.unit}, {now - self.t0:.0f} s"
                     + (f", {eta}" if eta else ""))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@contextlib.contextmanager
def forward_progress(model, total: int, desc: str, log: Callable[[str], None]) -> Iterator[Progress]:
    """Report progress per forward call of `model` (expected `total` calls) while the block runs."""
    progress = Progress(total, desc, log)
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    hooked = embeddings if embeddings is not None else model  # every forward path goes through the embeddings
    handle = hooked.register_forward_hook(lambda module, args, output: progress.update())
    try:
        yield progress
    finally:
        handle.remove()
        progress.close()
