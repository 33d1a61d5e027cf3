"""One command, several grid processes: ``semiseg experiment run GRID --jobs N``.

The grid runner (:mod:`semiseg.engine.experiment`) already lets several processes share a grid,
each claiming the next free cell; this module starts them, splits the CPU cores between them,
watches them and passes a stop signal on, so that nobody has to background processes by hand.

How many processes pay was measured (docs/performance.md, "The comparison grid on one GPU"): on
the 2-core CPU machine two single-threaded processes; on a 16-core H100 machine 7 processes stepped
as fast each as one alone, while 15 stepped 3x slower each (the small networks' steps are bound
by the CPU thread that launches their kernels). Hence ``auto``: one process per core on the CPU,
one per two cores with a GPU.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType

from tqdm import tqdm

from semiseg.engine.run_folder import PARENT_DIED
from semiseg.errors import ConfigError

POLL_SECONDS = 2.0


def available_cpus() -> int:
    """The cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def plan_jobs(requested: str | int, device_type: str, cpus: int, open_cells: int) -> int:
    """How many grid processes to start: ``requested`` when it is a number, ``auto`` = one per
    CPU core on the CPU and one per two cores on a GPU; never more than the cells left to run,
    never fewer than one."""
    if isinstance(requested, str) and requested != "auto":
        try:
            requested = int(requested)
        except ValueError:
            raise ConfigError(f"--jobs: expected a positive number or 'auto', got {requested!r}"
                              ) from None
    if requested == "auto":
        wanted = cpus if device_type == "cpu" else max(1, cpus // 2)
    elif int(requested) < 1:
        raise ConfigError(f"--jobs: expected a positive number or 'auto', got {requested}")
    else:
        wanted = int(requested)
    return max(1, min(wanted, open_cells))


def threads_per_job(cpus: int, jobs: int) -> int:
    """Each process's share of the cores (its ``OMP_NUM_THREADS``), at least one."""
    return max(1, cpus // max(1, jobs))


def child_command(grid_path: Path, rows: Sequence[str] | None, device: str | None,
                  seeds: Sequence[int] | None = None) -> list[str]:
    """The command one grid process runs (a plain ``semiseg experiment run``)."""
    from semiseg.engine.experiment import run_arguments

    return [sys.executable, "-m", "semiseg", *run_arguments(grid_path, rows, seeds, device),
            "--no-progress", "--jobs", "1"]


def _stop_with_parent_hook() -> Callable[[], None] | None:
    """What a child runs before its program (Linux): ask the kernel to send it
    :data:`PARENT_DIED` when the process that started it dies, even by ``kill -9``, so that no
    grid process trains on unwatched; the trainer then saves its cell and stops, as on a first
    SIGTERM. ``None`` where there is no ``prctl``: the child then outlives a killed parent, as
    it would without ``--jobs``."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        # Looked up here, in the parent: between fork and exec the child should only call.
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def stop_with_parent() -> None:
        prctl(1, int(PARENT_DIED))  # 1 = PR_SET_PDEATHSIG

    return stop_with_parent


class _Forward:
    """Pass SIGINT / SIGTERM on to the grid processes (each then saves its cell and stops;
    a second signal makes them stop at once, as it does a single process)."""

    def __init__(self, procs: list[subprocess.Popen]) -> None:
        self.procs = procs
        self.received: int | None = None
        self._previous = {sig: signal.signal(sig, self._handle)
                          for sig in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def run_grid_in_processes(grid_path: Path, jobs: str | int = "auto",
                          rows: Sequence[str] | None = None, device: str | None = None,
                          show_progress: bool = True, cpus: int | None = None,
                          seeds: Sequence[int] | None = None) -> int:
    """Run the grid at ``grid_path`` in several ``semiseg experiment run`` processes at once;
    returns the exit status (0 when every process finished its cells).

    The phantom data of every cell is made first, here, so that the processes do not race to
    make it. Unless ``OMP_NUM_THREADS`` is set already, each process gets its share of the
    cores. Their output (a line per cell: training, resuming, evaluating, skipped) goes to this
    terminal; a bar counts the finished cells."""
    from semiseg.engine.experiment import (
        cell_status,
        grid_cells,
        load_selected_grid,
        run_command_line,
    )
    from semiseg.engine.setup import ensure_phantom
    from semiseg.utils.seed import resolve_device

    grid = load_selected_grid(grid_path, rows, seeds)
    cells = grid_cells(grid)
    open_cells = [cell for cell in cells if cell_status(cell) != "done"]
    if not open_cells:
        print(f"{grid_path}: all {len(cells)} cells are done")
        return 0
    device_name = device or open_cells[0].config.experiment.device
    cpus = cpus or available_cpus()
    count = plan_jobs(jobs, resolve_device(device_name).type, cpus, len(open_cells))
    made: set[str] = set()
    for cell in open_cells:
        if cell.config.data.dataset == "phantom" and cell.config.data.root not in made:
            ensure_phantom(cell.config, show_progress)
            made.add(cell.config.data.root)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(threads_per_job(cpus, count)))
    env.setdefault("PYTHONUNBUFFERED", "1")
    print(f"{grid_path}: {len(open_cells)} of {len(cells)} cells to run, {count} processes "
          f"with {env['OMP_NUM_THREADS']} thread(s) each")
    procs: list[subprocess.Popen] = []
    stop_with_parent = _stop_with_parent_hook()
    forward = _Forward(procs)
    try:
        for _ in range(count):
            # Own sessions: a Ctrl-C in the terminal reaches them once, through _Forward.
            procs.append(subprocess.Popen(child_command(grid_path, rows, device, seeds), env=env,
                                          start_new_session=True,
                                          preexec_fn=stop_with_parent))
        with tqdm(total=len(cells), disable=not show_progress, desc="cells done",
                  dynamic_ncols=True) as bar:
            while any(proc.poll() is None for proc in procs):
                time.sleep(POLL_SECONDS)
                done = sum(cell_status(cell) == "done" for cell in cells)
                bar.update(done - bar.n)
    finally:
        forward.restore()
    codes = [proc.wait() for proc in procs]
    if forward.received is not None:
        resume = run_command_line(grid_path, rows, seeds, device, jobs)
        print(f"semiseg experiment: stopped by {signal.Signals(forward.received).name}, each "
              f"cell saved; continue with: {resume}", file=sys.stderr)
        return 128 + forward.received
    failed = [code for code in codes if code != 0]
    return failed[0] if failed else 0
