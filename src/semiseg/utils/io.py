"""Atomic file writes, output checks and file locks.

Every writer goes to a temporary file in the destination folder, flushes it to disk, then
``os.replace``-s it over the target (atomic on POSIX and Windows within one file system), so a
crash or kill never leaves a half-written output behind; at worst a temporary file, named by
:data:`TEMPORARY` (``.<target name>.<8 random characters>.tmp[<suffix>]``), which
:func:`remove_temporaries` clears. A write that the operating system refuses (full disk,
read-only folder) raises :class:`~semiseg.errors.OutputError` naming the target.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from semiseg.errors import OutputError

# The temporary files of atomic_path: mkstemp's 8 random characters, then ".tmp" and the
# target's own suffix (nibabel and matplotlib pick the format from the name's ending).
TEMPORARY = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp(\.[A-Za-z0-9]+)*$")


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__


@contextlib.contextmanager
def atomic_path(target: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to ``target``; move it over ``target`` on success.

    ``suffix`` keeps writers that infer the format from the extension (nibabel) happy.
    On any exception the temporary file is removed and ``target`` is left untouched; an
    :class:`OSError` (full disk, read-only folder) becomes an :class:`OutputError` naming
    ``target``.
    """
    target = Path(target)
    tmp: Path | None = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp" + suffix,
                                        dir=target.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        # mkstemp creates 0600 files; outputs are meant to be shared like any other file.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except OutputError:
        raise
    except OSError as exc:
        raise OutputError(f"{target}: cannot write ({_reason(exc)})") from None
    finally:
        if tmp is not None and tmp.exists():
            tmp.unlink()


class _RecordingWriter:
    """A binary handle that remembers the first OS error of a write: torch's zip writer
    swallows it and reports only "unexpected pos N vs M"."""

    def __init__(self, handle: IO[bytes]) -> None:
        self.handle = handle
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self.handle.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise

    def flush(self) -> None:
        self.handle.flush()


def atomic_write(target: str | Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write bytes through ``write(handle)`` atomically."""
    with atomic_path(target) as tmp, open(tmp, "wb") as handle:
        recorder = _RecordingWriter(handle)
        try:
            write(recorder)  # type: ignore[arg-type]
        except Exception:
            if recorder.error is not None:
                raise recorder.error from None
            raise


def atomic_write_text(target: str | Path, text: str) -> None:
    atomic_write(target, lambda handle: handle.write(text.encode("utf-8")))


def atomic_write_json(target: str | Path, payload: Any) -> None:
    atomic_write_text(target, json.dumps(payload, indent=2, sort_keys=False) + "\n")


def atomic_torch_save(obj: Any, target: str | Path) -> None:
    import torch

    atomic_write(target, lambda handle: torch.save(obj, handle))


def atomic_numpy_save(target: str | Path, array: Any) -> None:
    import numpy as np

    atomic_write(target, lambda handle: np.save(handle, array))


def remove_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporary files that writes killed midway left under ``folder`` (only
    names of :data:`TEMPORARY`); returns them. Call it only while no writer runs there."""
    removed = []
    for path in sorted(Path(folder).rglob(".*")):
        if path.is_file() and TEMPORARY.match(path.name):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


# ------------------------------------------------------------------------------ checks


def writable_folder(path: str | Path, option: str = "--out") -> Path:
    """Create ``path`` if needed and make sure a file can be written in it, before any work
    whose results would go there; :class:`OutputError` names ``path`` and ``option``."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{path}: {option} must be a folder, but a file of that name exists")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-check.", suffix=".tmp", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(f"{path}: cannot write to {option} ({_reason(exc)})") from None
    return path


def writable_file(path: str | Path, option: str = "--out") -> Path:
    """Check that ``path`` can be (re)written as a file: not a folder, its folder writable."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{path}: {option} must be a file, but it is a folder")
    writable_folder(path.parent, f"the folder of {option}")
    return path


# ------------------------------------------------------------------------------ locks


@contextlib.contextmanager
def exclusive_lock(path: str | Path, blocking: bool = True) -> Iterator[bool]:
    """Hold an exclusive OS lock (``flock``) on ``path`` (created if needed), writing this
    process's id into it; yields False when ``blocking`` is off and another process holds it.
    The operating system releases the lock when its holder dies, even by ``kill -9``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")  # noqa: SIM115  (held open for the lock's lifetime)
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield True
    finally:
        handle.close()  # closing releases the lock


def lock_holder(path: str | Path) -> int | None:
    """The process id recorded in a lock file by :func:`exclusive_lock`, if readable."""
    try:
        text = Path(path).read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
