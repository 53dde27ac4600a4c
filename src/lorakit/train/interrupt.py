"""Ctrl-C (SIGINT) and SIGTERM during training: finish the current step, write a checkpoint, stop.

`GracefulStop` is what `loop.train` takes as `interrupt`: while it is installed (a `with` block,
main thread, one process), the first SIGINT or SIGTERM only sets a flag that the loop reads after
each step; a second SIGINT stops at once (KeyboardInterrupt), as Ctrl-C usually does.
"""

from __future__ import annotations

import signal
import threading
from typing import Any, Callable

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class GracefulStop:
    def __init__(self, log: Callable[[str], None], checkpoint: Callable[..., Any] | None = None):
        self.log = log
        self.checkpoint = checkpoint
        self.signal: int | None = None  # the first signal received
        self._previous: dict[int, Any] = {}

    def requested(self) -> bool:
        return self.signal is not None

    @property
    def exit_code(self) -> int:
        """The shell's code for a process ended by that signal (130 for SIGINT, 143 for SIGTERM)."""
        return 128 + int(self.signal or signal.SIGINT)

    def _handle(self, signum, frame) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum
        self.log(f"{signal.Signals(signum).name}: finishing the current step, then writing a checkpoint and stopping "
                 "(Ctrl-C again stops at once, losing the steps since the last checkpoint)")

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
