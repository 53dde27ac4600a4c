"""The output folder of a job: checked writable before any work, and locked for the run's lifetime.

`check_writable(folder)` finds out, before the model loads, whether `folder` can be created (or,
existing, written): it creates and removes a probe in the nearest existing folder, so nothing is
left behind. `OutputLock` holds `OUT/.lorakit.lock` (an `fcntl.flock` plus the holder's pid and host)
while `lorakit train` writes into `OUT`: a second run into the same folder is refused, naming the
holder; a lock file left by a process that died is stale (no process holds the flock) and is
taken over, and the log says so.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Callable

from .errors import RecipeError

LOCK_NAME = ".lorakit.lock"


def _nearest_existing(folder: Path) -> Path:
    here = folder.absolute()
    while not here.exists() and here != here.parent:
        here = here.parent
    return here


def check_writable(folder: str | Path, what: str = "output folder") -> None:
    """Raise `RecipeError` (one line naming `folder` and the reason) unless `folder` can be created and
    written. Leaves nothing behind."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise RecipeError(f"{what} {folder} exists and is not a folder")
    base = _nearest_existing(folder)
    if not base.is_dir():
        raise RecipeError(f"{what} {folder} cannot be created: {base} is a file, not a folder")
    try:
        probe = tempfile.mkdtemp(prefix=".lorakit-write-check.", dir=base)
        os.rmdir(probe)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        verb = "written" if base == folder.absolute() else f"created (in {base})"
        raise RecipeError(f"{what} {folder} cannot be {verb}: {reason}; choose another --out") from None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class OutputLock:
    """`with OutputLock(folder, log): ...`: exclusive use of an output folder by one run.

    Creates `folder` if needed (and removes it again on release if it is still empty, so a run that
    stops on bad input leaves nothing). Raises `RecipeError` if another live process holds it.
    """

    def __init__(self, folder: str | Path, log: Callable[[str], None] | None = None):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.log = log
        self._fd: int | None = None
        self._created = False

    def __enter__(self) -> "OutputLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        self._created = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        for _ in range(10):  # retried only when the file was replaced between open and flock
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                self._refuse()
            if self._same_file(fd):
                break
            os.close(fd)
        else:
            raise RecipeError(f"could not lock output folder {self.folder} (its lock file keeps changing)")
        self._fd = fd
        self._note_stale(fd)
        record = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)

    def _same_file(self, fd: int) -> bool:
        try:
            return os.stat(self.path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False

    def _holder(self, fd: int | None = None) -> dict:
        try:
            raw = os.pread(fd, 4096, 0) if fd is not None else self.path.read_bytes()
            holder = json.loads(raw.decode() or "{}")
            return holder if isinstance(holder, dict) else {}
        except (OSError, ValueError):
            return {}

    def _refuse(self) -> None:
        h = self._holder()
        who = f"process {h.get('pid', '?')} on {h.get('host', '?')}" if h else "another process"
        since = f" since {time.strftime('%H:%M:%S', time.localtime(h['since']))}" if "since" in h else ""
        raise RecipeError(f"output folder {self.folder} is in use by another lorakit run ({who}{since}); wait for it "
                          f"to finish or choose another --out")

    def _note_stale(self, fd: int) -> None:
        h = self._holder(fd)
        if h.get("pid") and self.log is not None:
            alive = h.get("host") == socket.gethostname() and _pid_alive(int(h["pid"]))
            state = "no longer holds it" if alive else "is gone"
            self.log(f"cleared a stale lock on {self.folder} left by process {h['pid']} (it {state})")

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None
        if self._created:
            try:
                self.folder.rmdir()  # only if empty: a run that wrote nothing leaves nothing
            except OSError:
                pass
