"""Crash-safe file writes: a reader sees the old file or the new one, never a torn one."""

from __future__ import annotations

import ctypes
import functools
import glob
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` atomically: temp file in the same folder, fsync, rename, fsync folder."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, _new_file_mode(path))  # mkstemp makes 0600; give what open() would have
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _new_file_mode(path: Path) -> int:
    """The mode a plain `open(path, "w")` would leave: the old file's, else 0o666 minus the umask."""
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (best effort: some file systems cannot sync a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_files(folder: str | Path, files: dict[str, bytes]) -> None:
    """Replace several files of `folder` together: any reader, after a crash at any point, sees
    either all the old files or all the new ones.

    - A new folder is written under a temporary name and renamed into place.
    - Files whose content does not change are left alone; if at most one file changes, its
      atomic replacement suffices.
    - Otherwise a complete new version of the folder (the other entries carried over as hard
      links) is swapped with the old one in one `renameat2(RENAME_EXCHANGE)` (Linux >= 3.15).
      Where that is impossible (another OS, a file system without it, a folder holding the
      working directory), the files are replaced one by one, in the order given.
    """
    folder = Path(folder)
    if not folder.exists():
        tmp = _new_version(folder, files, carry=None)
        try:
            os.rename(tmp, folder)  # fails if someone created the folder meanwhile: fall through
            fsync_dir(folder.parent)
            return
        except OSError:
            _remove_tree(tmp)
    changed = {name: data for name, data in files.items() if _read(folder / name) != data}
    if len(changed) > 1 and _exchange_allowed(folder):
        tmp = _new_version(folder, files, carry=folder)
        if _exchange(tmp, folder):
            fsync_dir(folder.parent)
            _remove_tree(tmp)
            return
        _remove_tree(tmp)
    for name, data in changed.items():
        atomic_write_bytes(folder / name, data)


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def _new_version(folder: Path, files: dict[str, bytes], carry: Path | None) -> Path:
    """A temporary sibling of `folder` holding `files`, plus hard links to `carry`'s other entries."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        os.chmod(tmp, _new_file_mode(folder) | 0o111 if carry is None else folder.stat().st_mode & 0o7777)
        if carry is not None:
            _link_tree(carry, tmp, skip=set(files))
        for name, data in files.items():
            atomic_write_bytes(tmp / name, data)
    except BaseException:
        _remove_tree(tmp)
        raise
    return tmp


def _link_tree(src: Path, dst: Path, skip: set[str]) -> None:
    for entry in os.scandir(src):
        if entry.name in skip:
            continue
        target = dst / entry.name
        if entry.is_symlink():
            os.symlink(os.readlink(entry.path), target)
        elif entry.is_dir():
            os.mkdir(target, entry.stat().st_mode & 0o7777)
            _link_tree(Path(entry.path), target, skip=set())
        else:
            os.link(entry.path, target)


def _exchange_allowed(folder: Path) -> bool:
    """Not for a folder that holds the working directory (it would move away under the process)."""
    try:
        cwd, real = Path.cwd().resolve(), folder.resolve()
    except OSError:
        return False
    return sys.platform.startswith("linux") and real != cwd and real not in cwd.parents and not folder.is_symlink()


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (`renameat2` with `RENAME_EXCHANGE`); False where unsupported."""
    renameat2 = getattr(_libc(), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


@functools.cache
def _libc():
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def remove_stale_versions(folder: str | Path) -> None:
    """Remove temporary versions of `folder` left by an interrupted `atomic_write_files`."""
    folder = Path(folder)
    for entry in folder.parent.glob(f".{glob.escape(folder.name)}.*.tmp"):
        if entry.is_dir():
            _remove_tree(entry)


@contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path in `path`'s folder; on a clean exit, fsync it and rename it to `path`.

    For writers that need a file name rather than bytes (a GGUF file of hundreds of MB): a reader
    sees the old file or the complete new one, never a torn one. On an exception the temporary
    file is removed and `path` is left as it was.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, _new_file_mode(path))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def set_plain_modes(folder: str | Path) -> None:
    """Give every file under `folder` the mode a plain `open(path, "w")` gives (0o666 minus the umask)
    and every folder 0o777 minus the umask: writers that go through `tempfile` (transformers'
    `save_pretrained` of the weights) otherwise leave 0600 beside 0644 files."""
    umask = _umask()
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~umask)
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~umask)
    os.chmod(folder, 0o777 & ~umask)


@contextmanager
def atomic_output_folder(folder: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of `folder` to fill; on a clean exit give its contents plain modes
    (`set_plain_modes`), fsync it and rename it to `folder` (which must be absent or an empty folder).
    A crash leaves no half-written `folder`; an exception removes the temporary one."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        yield tmp
        set_plain_modes(tmp)
        for entry in tmp.iterdir():
            if entry.is_file():
                with open(entry, "rb") as f:
                    os.fsync(f.fileno())
        fsync_dir(tmp)
        if folder.is_dir():
            folder.rmdir()  # empty (checked by the caller): replaced by the complete one
        os.rename(tmp, folder)
    except BaseException:
        _remove_tree(tmp)
        raise
    fsync_dir(folder.parent)
