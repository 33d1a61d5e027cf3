"""``semiseg demo``: semiseg in miniature, in one folder.

The packaged demo config (``configs/demo.yaml``) names a shared run config and its rows: the
labelled-only lower bound and SCDL on GA-CPS. They are written as a two-row experiment grid
(:mod:`semiseg.engine.experiment`) and trained side by side by two single-threaded processes
(one of them this one), each cell evaluated on the test cases (NIfTI predictions, overlays);
then one report folder gets the per-class tables, the paired comparison against the lower
bound, the overlays and the validation curves.

Re-running the demo continues interrupted runs and skips finished ones, so ``make demo`` is
cheap the second time.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import yaml

from semiseg.config import load_config_dict, merge, parse_override
from semiseg.engine.experiment import grid_cells, load_grid, run_grid
from semiseg.engine.grid_jobs import child_command
from semiseg.errors import ConfigError
from semiseg.utils.io import atomic_write_text

BASELINE = "vnet_lower"


def demo_grid(out: Path, config_path: Path | None = None,
              overrides: list[str] | None = None) -> Path:
    """Write the demo's grid (and its row configs) into ``out``; returns the grid file.

    ``config_path`` replaces the packaged demo config; ``overrides`` (``key=value``) apply to
    every row.
    """
    if config_path is None:
        config_path = Path(str(resources.files("semiseg") / "configs" / "demo.yaml"))
    data = load_config_dict(config_path)
    rows = data.pop("rows", None)
    if not isinstance(rows, dict) or not rows:
        raise ConfigError(f"{config_path}: a demo config needs rows: (a name -> config part "
                          "per row)")
    data = merge(data, {"data": {"root": str(out / "data")}})
    for override in overrides or []:
        data = merge(data, parse_override(override))
    folder = out / "configs"
    entries: list[dict[str, Any]] = []
    for name, part in rows.items():
        row_file = folder / f"{name}.yaml"
        atomic_write_text(row_file, yaml.safe_dump(merge(data, part or {}), sort_keys=False))
        entries.append({"name": str(name), "config": str(row_file)})
    grid = {"name": "demo", "output_dir": str(out / "runs"), "seeds": [0], "rows": entries}
    grid_file = out / "grid.yaml"
    atomic_write_text(grid_file, yaml.safe_dump(grid, sort_keys=False))
    return grid_file


def run_demo(out: Path, config_path: Path | None = None, overrides: list[str] | None = None,
             show_progress: bool = True, device: str | None = None) -> Path:
    """Run the whole demo in ``out``, print the table; returns the report folder."""
    from semiseg.engine.report import write_report

    out = Path(out)
    started = time.perf_counter()
    grid_file = demo_grid(out, config_path, overrides)
    grid = load_grid(grid_file)
    cells = grid_cells(grid)
    first = cells[0].config
    print(f"[demo] phantom data in {first.data.root}; training {', '.join(c.row for c in cells)}"
          f" side by side ({first.train.max_iterations} iterations, "
          f"{first.data.labeled_ratio:.0%} labelled) in {grid.output_dir}")
    # A second single-threaded process takes the cells this one does not (they claim cells
    # with file locks), so the two rows train at once on a 2-core machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    helper = _second_process(grid_file, device)
    try:
        run_grid(grid, show_progress=False, device=device)
    finally:
        if helper.wait() != 0:
            print(f"[demo] the second process ended with status {helper.returncode}; "
                  f"its cells are in {grid.output_dir}", file=sys.stderr)
        torch.set_num_threads(threads)
    run_grid(grid, show_progress=False, device=device)  # anything it left unfinished
    report = out / "report"
    write_report([c.run_dir for c in cells], report, paired=BASELINE)
    print()
    print((report / f"per_class_dice_{_slug(first)}.md").read_text(encoding="utf-8"))
    minutes = (time.perf_counter() - started) / 60
    print(f"[demo] done in {minutes:.1f} min. A taste, not a comparison: one seed, 500 "
          "iterations, nothing converged; the protocol of configs/compare/ compares methods "
          "(docs/results.md).")
    print(f"  report        {report / 'report.md'} (tables, paired differences, overlays, "
          "curves)")
    for cell in cells:
        print(f"  {cell.row:<13} {cell.run_dir} (checkpoints, predictions/*.nii.gz, "
              "overlays/*.png, log.csv)")
    print(f"  tensorboard   tensorboard --logdir {grid.output_dir}")
    return report


def _slug(config: Any) -> str:
    from semiseg.engine.tables import setting_slug

    return setting_slug(config.data.dataset, config.data.labeled_ratio)


def _second_process(grid_file: Path, device: str | None) -> subprocess.Popen[bytes]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen(child_command(grid_file, None, device), env=env,
                            stdout=subprocess.DEVNULL)
