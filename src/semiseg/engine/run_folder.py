"""A run folder's bookkeeping: one trainer at a time, an honest ``state.json``, no leftovers,
and a checkpoint on SIGINT / SIGTERM.

* ``.train.lock``: an OS file lock (``flock``) held for as long as a trainer works in the
  folder; a second trainer is refused with the holder's process id. The operating system
  releases it when the holder dies, even by ``kill -9``, so it never has to be removed.
* ``state.json``: ``status`` (running, finished, stopped, interrupted, failed), the iterations
  done and the iteration of ``checkpoints/last.pt`` (where a resume starts), the best
  validation score, the writer's process id and the time of writing; updated at every log
  row and checkpoint, always valid JSON (``null`` for an undefined score). After a
  ``kill -9`` it still says "running": the ``updated`` time and the free lock tell.
* Temporaries of atomic writes interrupted by a kill are removed when a trainer starts.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import FrameType
from typing import Any

from semiseg.errors import CheckpointError, SemisegError
from semiseg.utils.io import atomic_write_json, exclusive_lock, lock_holder, remove_temporaries

LOCK_NAME = ".train.lock"
STATE_NAME = "state.json"


@contextlib.contextmanager
def training_lock(run_dir: Path) -> Iterator[None]:
    """Hold ``run_dir/.train.lock``; :class:`SemisegError` when another process holds it.
    Stray temporaries are removed once the lock is ours (no writer can be using them)."""
    lock = Path(run_dir) / LOCK_NAME
    with exclusive_lock(lock, blocking=False) as mine:
        if not mine:
            pid = lock_holder(lock)
            who = f"process {pid}" if pid else "another process"
            raise SemisegError(f"{run_dir}: already being trained by {who}; wait for it to end "
                               "or train into another --out folder")
        remove_temporaries(run_dir)
        yield


def _json_number(value: float | None) -> float | None:
    # JSON has no -Infinity or NaN; null stands for "no score".
    return None if value is None or not math.isfinite(value) else float(value)


def write_state(run_dir: Path, status: str, *, iteration: int, max_iterations: int,
                checkpoint_iteration: int | None, best_score: float | None,
                best_iteration: int, error: str | None = None) -> None:
    """Write ``state.json`` atomically (see the module docstring for its keys)."""
    state: dict[str, Any] = {
        "status": status,
        "iteration": int(iteration),
        "max_iterations": int(max_iterations),
        "checkpoint_iteration": checkpoint_iteration,
        "best_score": _json_number(best_score) if best_iteration >= 0 else None,
        "best_iteration": int(best_iteration) if best_iteration >= 0 else None,
        "pid": os.getpid(),
        "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if error:
        state["error"] = error
    atomic_write_json(Path(run_dir) / STATE_NAME, state)


# ------------------------------------------------------------------------------ resume


# What a resumed run may not change: the networks' shapes and the data they were fitted to.
FIXED_ON_RESUME = ("model.name", "model.options", "method.name", "method.options",
                   "data.dataset", "data.patch_size", "data.phantom.class_set")


def _lookup(config: Mapping[str, Any], dotted: str) -> Any:
    value: Any = config
    for key in dotted.split("."):
        value = value.get(key) if isinstance(value, Mapping) else None
    return value


def check_resumable(saved: Mapping[str, Any], config: Mapping[str, Any], checkpoint: Path
                    ) -> None:
    """Refuse to resume ``checkpoint`` (whose config is ``saved``) with a ``config`` that
    changes one of :data:`FIXED_ON_RESUME`, naming every difference."""
    changed = []
    for key in FIXED_ON_RESUME:
        before, after = _lookup(saved, key), _lookup(config, key)
        if isinstance(before, (list, tuple)) and isinstance(after, (list, tuple)):
            before, after = list(before), list(after)
        if before != after:
            changed.append(f"{key} {before!r} -> {after!r}")
    if changed:
        raise CheckpointError(
            f"{checkpoint}: cannot resume with a changed network, method or data "
            f"({'; '.join(changed)}); resume without --config (the run's own config.yaml is "
            "used) or train a new run into another --out folder")


# ------------------------------------------------------------------------------ signals


# The signal a ``--jobs`` grid process asks the kernel for when its parent dies
# (``PR_SET_PDEATHSIG``, see :mod:`semiseg.engine.grid_jobs`). Not SIGTERM: the kernel sends it
# once per thread of the dying parent that the child is handed on to (measured: twice for a
# parent with a few threads), and a repeated SIGTERM means "stop at once", which would tear the
# checkpoint and state it is meant to save.
PARENT_DIED = signal.SIGUSR1


class StopSignals:
    """SIGINT / SIGTERM while training: the first one asks the loop to stop after the current
    iteration (it then saves a checkpoint); a second one raises :class:`KeyboardInterrupt`
    at once. :data:`PARENT_DIED` asks for the same orderly stop however often it comes. Only
    the main thread of a process can install handlers; elsewhere, and when ``enabled`` is off
    (several processes, which must stop together), nothing changes."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, PARENT_DIED)

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.received: int | None = None
        self._previous: dict[int, Any] = {}
        self._holding = False
        self._pending = False
        # Set when "stop at once" was raised: C++ code that calls back into Python (torch.save's
        # writer) turns that KeyboardInterrupt into a RuntimeError of its own, measured.
        self.stopped_at_once = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == PARENT_DIED:
            self.received = self.received or signum
        elif self.received is None or self.received == PARENT_DIED:
            self.received = signum
        elif self._holding:
            self._pending = True
        else:
            self.stopped_at_once = True
            raise KeyboardInterrupt

    def install(self) -> StopSignals:
        """Take over the signals (until :meth:`restore`)."""
        if self.enabled:
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def restore(self) -> None:
        """Give the signals back their previous handlers. After the parent's death, its later
        copies are ignored: their default action would kill a process that has saved its work
        and is ending with its own status."""
        for sig, handler in self._previous.items():
            late_copy = sig == PARENT_DIED and self.received == PARENT_DIED
            signal.signal(sig, signal.SIG_IGN if late_copy else handler)
        self._previous = {}

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Hold "stop at once" back during a short write that must not be torn (the final
        ``state.json``); a second signal that came meanwhile raises as the block ends.

        A flag, not the signal mask: Python runs its handlers in the main thread whichever
        thread the kernel delivers to, and a blocked main thread leaves the others to take it.
        """
        self._holding = True
        try:
            yield
        finally:
            self._holding = False
        if self._pending:
            self._pending = False
            self.stopped_at_once = True
            raise KeyboardInterrupt

    @property
    def name(self) -> str:
        if self.received == PARENT_DIED:
            return "the death of its grid parent"
        return signal.Signals(self.received).name if self.received else "KeyboardInterrupt"

    @property
    def exit_code(self) -> int:
        """The shell's status for death by the signal: 128 + its number (130, 143; 138 for
        :data:`PARENT_DIED`)."""
        return 128 + (self.received or signal.SIGINT)
