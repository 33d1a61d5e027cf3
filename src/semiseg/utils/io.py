"""Atomic file writes: a crash or kill never leaves a half-written output behind.

Every writer goes to a temporary file in the destination folder, flushes it to disk, then
``os.replace``-s it over the target (atomic on POSIX and Windows within one file system).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any


@contextlib.contextmanager
def atomic_path(target: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to ``target``; move it over ``target`` on success.

    ``suffix`` keeps writers that infer the format from the extension (nibabel) happy.
    On any exception the temporary file is removed and ``target`` is left untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix + ".tmp",
                                    dir=target.parent)
    os.close(fd)
    # mkstemp creates 0600 files; outputs are meant to be shared like any other file.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_name, 0o666 & ~umask)
    tmp = Path(tmp_name)
    if suffix:
        # Some writers refuse a name ending in .tmp; give them the real extension.
        real_tmp = tmp.with_name(tmp.name[: -len(".tmp")])
        tmp.rename(real_tmp)
        tmp = real_tmp
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write(target: str | Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write bytes through ``write(handle)`` atomically."""
    with atomic_path(target) as tmp, open(tmp, "wb") as handle:
        write(handle)


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
