"""Run logs: one CSV row per logged iteration plus TensorBoard scalars.

The CSV is the plain record (readable without TensorBoard). Rows are keyed by the number of
iterations completed; on resume from a checkpoint taken after ``k`` iterations, rows after
``k`` (written before the crash but lost with it) are dropped, so no iteration appears twice.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any


class RunLogger:
    """Writes ``log.csv`` (and TensorBoard events under ``tensorboard/``) in a run folder."""

    def __init__(self, run_dir: Path, start_iteration: int = 0, tensorboard: bool = True) -> None:
        self.csv_path = run_dir / "log.csv"
        self._fields: list[str] | None = None
        self._rows: list[dict[str, Any]] = self._read_previous(start_iteration)
        if self._rows:
            self._fields = list(self._rows[0].keys())
        self._rewrite()
        self._writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"),
                                         purge_step=start_iteration + 1 if start_iteration
                                         else None)

    def _read_previous(self, start_iteration: int) -> list[dict[str, Any]]:
        if not self.csv_path.exists() or start_iteration == 0:
            return []
        with open(self.csv_path, newline="", encoding="utf-8") as handle:
            rows = csv.DictReader(handle)
            return [row for row in rows if int(row["iteration"]) <= start_iteration]

    def _rewrite(self) -> None:
        from semiseg.utils.io import atomic_path

        with atomic_path(self.csv_path) as tmp, open(
            tmp, "w", newline="", encoding="utf-8"
        ) as handle:
            if self._fields:
                writer = csv.DictWriter(handle, fieldnames=self._fields, extrasaction="ignore")
                writer.writeheader()
                writer.writerows(self._rows)

    def log(self, iteration: int, values: dict[str, float]) -> None:
        row = {"iteration": iteration, **{k: f"{v:.6g}" for k, v in values.items()}}
        if self._fields is None or any(key not in self._fields for key in row):
            # A new column appeared (validation metrics): rewrite the file with the wider header.
            self._fields = list(dict.fromkeys([*(self._fields or []), *row.keys()]))
            self._rows.append(row)
            self._rewrite()
        else:
            self._rows.append(row)
            with open(self.csv_path, "a", newline="", encoding="utf-8") as handle:
                csv.DictWriter(handle, fieldnames=self._fields, extrasaction="ignore").writerow(row)
        if self._writer is not None:
            for key, value in values.items():
                self._writer.add_scalar(key, value, iteration)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()


def read_validations(log_csv: str | Path) -> dict[int, dict[str, float]]:
    """Iteration -> the ``val/...`` values logged there, from a run's ``log.csv`` ({} when the
    file is missing or the run never validated); a repeated iteration keeps its last row."""
    path = Path(log_csv)
    if not path.is_file():
        return {}
    validations: dict[int, dict[str, float]] = {}
    with open(path, newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            if row.get("val/dice") in (None, ""):
                continue
            try:
                validations[int(row["iteration"])] = {
                    key: float(value) for key, value in row.items()
                    if key.startswith("val/") and value not in (None, "")}
            except ValueError:
                # A line cut short by a kill mid-append (the trainer drops it on resume).
                continue
    return validations

