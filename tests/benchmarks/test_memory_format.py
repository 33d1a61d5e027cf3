"""benchmarks/memory_format.py: both layouts step the same method from the same weights."""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("memory_format",
                                               REPO / "benchmarks" / "memory_format.py")
memory_format = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(memory_format)


def test_side_by_side_step_times_both_layouts_on_the_same_losses() -> None:
    row = memory_format._measure("ga_cps", patch=32, n_filters=4, threads=1, repeats=1)
    assert row["method"] == "ga_cps"
    assert row["plain_s"] > 0 and row["channels_last_s"] > 0
    assert row["ratio"] == row["plain_s"] / row["channels_last_s"]
    # The same weights and batch: the first step's losses differ by float rounding only.
    assert row["first_step_loss_difference"] < 1e-4
