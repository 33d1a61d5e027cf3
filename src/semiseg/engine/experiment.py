"""Experiment grids: a whole paper table from one YAML file.

A grid names rows (a method configuration each: a config file plus overrides), and the seeds
(and optionally labeled ratios) to run each row with::

    name: phantom_hosts
    output_dir: runs/phantom_hosts
    seeds: [0, 1, 2]
    set: [train.max_iterations=300]          # applied to every row (optional)
    rows:
      - name: vnet_lower
        config: configs/phantom/vnet_lower.yaml
      - name: ga_cps
        config: configs/phantom/ga_cps.yaml
        set: [method.options.consistency=0.1]
    ratios: [0.2]                              # optional: one cell per ratio as well

``semiseg experiment run GRID`` runs every cell in turn: a cell whose run folder holds a
finished, evaluated run is skipped; an interrupted one resumes from its last checkpoint; a new
one starts. Each cell is trained, then evaluated on the test split. ``manifest.json`` in the
output folder records every cell: its exact config, status, run folder, times, and the code
version, and ``semiseg report GRID`` builds the tables from it.

Several ``semiseg experiment run GRID`` processes may work on one grid at once (one per GPU,
``CUDA_VISIBLE_DEVICES=i``, or one per group of CPU cores): a process claims a cell with an
exclusive lock on ``<run folder>/.cell.lock`` for as long as it trains it, and the others skip
the claimed cell. The lock is an OS file lock, so a killed process releases it at once and a
later run resumes the cell. Manifest updates are read-modify-write under a lock of their own.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from semiseg import __version__
from semiseg.config import Config, load_config_dict, merge, parse_override
from semiseg.errors import ConfigError, RunInterruptedError, SemisegError
from semiseg.utils.io import atomic_write_json, exclusive_lock
from semiseg.utils.typed import build_dataclass

MANIFEST = "manifest.json"


@dataclass
class GridRow:
    name: str
    config: str | None = None
    set: list[str] = field(default_factory=list)


@dataclass
class Grid:
    name: str
    output_dir: str
    rows: list[GridRow]
    seeds: list[int] = field(default_factory=lambda: [0])
    ratios: list[float] = field(default_factory=list)
    set: list[str] = field(default_factory=list)
    path: Path | None = None


@dataclass
class Cell:
    row: str
    seed: int
    ratio: float | None
    config: Config
    run_dir: Path

    @property
    def key(self) -> str:
        ratio = "" if self.ratio is None else f"/ratio{self.ratio:g}"
        return f"{self.row}{ratio}/seed{self.seed}"


def load_grid(path: str | Path) -> Grid:
    """Read and validate a grid YAML (unknown keys are errors naming the file)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read grid ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a grid must be a mapping")
    try:
        rows = [build_dataclass(GridRow, row, f"{path}: rows[{i}]")
                for i, row in enumerate(data.pop("rows", []))]
        grid = build_dataclass(Grid, {**data, "rows": []}, str(path))
    except TypeError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    if not rows:
        raise ConfigError(f"{path}: the grid has no rows")
    names = [row.name for row in rows]
    if len(set(names)) != len(names):
        raise ConfigError(f"{path}: row names must be unique, got {names}")
    if not grid.seeds:
        raise ConfigError(f"{path}: seeds must not be empty")
    grid.rows = rows
    grid.path = path
    return grid


def grid_cells(grid: Grid) -> list[Cell]:
    """Every (row, ratio, seed) cell with its validated config and run folder."""
    base_dir = grid.path.parent if grid.path is not None else Path(".")
    out = Path(grid.output_dir)
    cells = []
    for row in grid.rows:
        config_path = None
        if row.config is not None:
            config_path = Path(row.config)
            if not config_path.is_absolute() and not config_path.exists():
                config_path = base_dir / config_path
        for ratio in grid.ratios or [None]:
            for seed in grid.seeds:
                data = load_config_dict(config_path)
                for override in [*grid.set, *row.set]:
                    data = merge(data, parse_override(override))
                data = merge(data, {"experiment": {"name": f"{grid.name}_{row.name}",
                                                   "label": row.name, "seed": int(seed)}})
                if ratio is not None:
                    data = merge(data, {"data": {"labeled_ratio": float(ratio)}})
                config = build_dataclass(Config, data)
                run_dir = out / row.name
                if ratio is not None:
                    run_dir = run_dir / f"ratio{ratio:g}"
                cells.append(Cell(row.name, int(seed), ratio, config, run_dir / f"seed{seed}"))
    return cells


def code_version() -> str:
    """semiseg's version plus the git commit of the checkout, when there is one."""
    try:
        commit = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True,
                                text=True, cwd=Path(__file__).parent, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{__version__}+{commit}" if commit else __version__


def cell_status(cell: Cell) -> str:
    """``done`` (trained and evaluated), ``trained``, ``partial``, or ``pending``."""
    state_path = cell.run_dir / "state.json"
    has_checkpoint = (cell.run_dir / "checkpoints" / "last.pt").exists()
    if state_path.exists():
        state = json.loads(state_path.read_text(encoding="utf-8")).get("status")
        if state == "finished":
            return "done" if (cell.run_dir / "metrics.json").exists() else "trained"
    # Killed before its first checkpoint: nothing to resume, the cell starts over.
    return "partial" if has_checkpoint else "pending"


def _manifest_path(grid: Grid) -> Path:
    return Path(grid.output_dir) / MANIFEST


def read_manifest(grid: Grid) -> dict[str, Any]:
    path = _manifest_path(grid)
    if path.exists():
        return json.loads(path.read_text(encoding="utf-8"))
    return {"grid": grid.name, "cells": {}}


def _record(grid: Grid, cell: Cell, **fields: Any) -> None:
    """Update the cell's manifest entry (read-modify-write under the manifest lock, so that
    parallel grid processes do not lose each other's entries)."""
    path = _manifest_path(grid)
    with exclusive_lock(path.with_name(MANIFEST + ".lock")):
        manifest = read_manifest(grid)
        entry = manifest["cells"].setdefault(cell.key, {})
        entry.update({"row": cell.row, "seed": cell.seed, "ratio": cell.ratio,
                      "run_dir": str(cell.run_dir), "config": cell.config.to_dict(), **fields})
        manifest["grid"] = grid.name
        manifest["grid_file"] = str(grid.path) if grid.path else None
        atomic_write_json(path, manifest)


def select_rows(grid: Grid, rows: Sequence[str] | None) -> Grid:
    """The grid restricted to the named rows (unknown names are an error listing the rows)."""
    if not rows:
        return grid
    known = [row.name for row in grid.rows]
    unknown = [name for name in rows if name not in known]
    if unknown:
        raise ConfigError(f"{grid.path or grid.name}: no row named {unknown}; rows are {known}")
    grid.rows = [row for row in grid.rows if row.name in rows]
    return grid


def select_seeds(grid: Grid, seeds: Sequence[int] | None) -> Grid:
    """The grid restricted to the given seeds, in the grid's order (a seed the grid does not
    list is an error listing its seeds: a typo must not start a run nobody pairs with)."""
    if not seeds:
        return grid
    unknown = [seed for seed in seeds if seed not in grid.seeds]
    if unknown:
        raise ConfigError(f"{grid.path or grid.name}: no seed {unknown}; seeds are {grid.seeds}")
    grid.seeds = [seed for seed in grid.seeds if seed in seeds]
    return grid


def load_selected_grid(path: str | Path, rows: Sequence[str] | None = None,
                       seeds: Sequence[int] | None = None) -> Grid:
    """The grid at ``path`` restricted to ``rows`` and ``seeds`` (``--rows`` / ``--seeds``)."""
    return select_seeds(select_rows(load_grid(path), rows), seeds)


def run_arguments(grid_path: str | Path, rows: Sequence[str] | None = None,
                  seeds: Sequence[int] | None = None, device: str | None = None) -> list[str]:
    """``semiseg``'s arguments that run this selection of the grid (the command a grid process
    runs, and the one a stopped grid says to continue with)."""
    arguments = ["experiment", "run", str(grid_path)]
    if rows:
        arguments += ["--rows", *rows]
    if seeds:
        arguments += ["--seeds", *(str(seed) for seed in seeds)]
    if device:
        arguments += ["--device", device]
    return arguments


def run_command_line(grid_path: str | Path, rows: Sequence[str] | None = None,
                     seeds: Sequence[int] | None = None, device: str | None = None,
                     jobs: str | int | None = None) -> str:
    """The shell line that continues this selection of the grid (a stopped grid prints it)."""
    extra = ["--jobs", str(jobs)] if jobs is not None else []
    return shlex.join(["semiseg", *run_arguments(grid_path, rows, seeds, device), *extra])


def run_grid(grid: Grid, show_progress: bool = True, device: str | None = None,
             resume_command: str | None = None) -> list[Cell]:
    """Run (or resume) every cell of ``grid`` that no other process is running; returns the
    cells. A cell that fails is recorded as ``failed`` (with its error) in the manifest and
    the grid goes on; a :class:`SemisegError` listing the failed cells ends the call. A stop
    signal (the trainer saves its cell's checkpoint) ends the whole grid, naming
    ``resume_command`` (default: the whole grid's) as the way to continue. ``device``
    overrides every cell's ``experiment.device``."""
    import torch

    from semiseg.engine.runs import evaluate_run
    from semiseg.engine.trainer import Trainer

    cells = grid_cells(grid)
    for cell in cells if device else []:
        cell.config.experiment.device = str(device)
    version = code_version()
    failed: list[str] = []
    for index, cell in enumerate(cells, start=1):
        prefix = f"[{index}/{len(cells)}] {cell.key}"
        if cell_status(cell) == "done":
            print(f"{prefix}: done, skipped")
            _record(grid, cell, status="done")
            continue
        claim = cell.run_dir.parent / f".{cell.run_dir.name}.lock"
        with exclusive_lock(claim, blocking=False) as mine:
            if not mine:
                print(f"{prefix}: running in another process, skipped")
                continue
            status = cell_status(cell)  # the other process may have finished it meanwhile
            if status == "done":
                print(f"{prefix}: done, skipped")
                continue
            started = time.time()
            try:
                if status in ("pending", "partial"):
                    print(f"{prefix}: {'resuming' if status == 'partial' else 'training'}")
                    # Which process, with how many threads (several may share the grid).
                    _record(grid, cell, status="running", code_version=version,
                            started=started, pid=os.getpid(), threads=torch.get_num_threads())
                    Trainer(cell.config, cell.run_dir, resume=status == "partial",
                            show_progress=show_progress).fit()
                print(f"{prefix}: evaluating")
                evaluate_run(cell.run_dir, show_progress=show_progress)
            except RunInterruptedError as exc:
                _record(grid, cell, status="interrupted", code_version=version)
                raise RunInterruptedError(
                    f"{cell.key}: {exc.what}", exc.exit_code,
                    resume_command or f"semiseg experiment run {grid.path or 'GRID'}") from None
            except Exception as exc:  # one broken cell must not stop a night of other cells
                message = f"{type(exc).__name__}: {exc}"
                print(f"{prefix}: FAILED ({message}); continuing with the next cell")
                _record(grid, cell, status="failed", error=message,
                        traceback=traceback.format_exc(), code_version=version)
                failed.append(f"{cell.key}: {message}")
                continue
            _record(grid, cell, status="done", code_version=version, finished=time.time(),
                    seconds=time.time() - started)
    if failed:
        raise SemisegError(f"{len(failed)} cell(s) failed (details in "
                           f"{_manifest_path(grid)}):\n  " + "\n  ".join(failed))
    return cells


def grid_status(grid: Grid) -> list[tuple[str, str, str]]:
    """(cell, status, run folder) for every cell."""
    return [(cell.key, cell_status(cell), str(cell.run_dir)) for cell in grid_cells(grid)]


def grid_run_dirs(grid: Grid) -> list[Path]:
    """The run folders of the grid's evaluated cells (what ``semiseg report GRID`` reads)."""
    return [cell.run_dir for cell in grid_cells(grid) if cell_status(cell) == "done"]
