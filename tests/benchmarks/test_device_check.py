"""The GPU session's one call must not fail on a bug of its own: run it at smoke size here."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_device_check_script_runs_every_section(tmp_path: Path) -> None:
    env = dict(os.environ, OUT=str(tmp_path / "out"))
    proc = subprocess.run([str(REPO / "benchmarks" / "device_check.sh"), str(tmp_path / "work"),
                           "--smoke"], env=env, capture_output=True, text=True, timeout=600,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = (tmp_path / "out" / "device_check.md").read_text(encoding="utf-8")
    assert report.startswith("# Device check: ")
    assert "FAILED" not in report, report
    for heading in ("## Numerics self-check", "## Training step", "## Phantom run",
                    "## Sliding-window inference", "## Comparison grid"):
        assert heading in report
    assert "| supervised | bf16 |" in report and "| ga_cps | fp16 |" in report
    assert "| phantom run of section 4 (trained) | 4 |" in report
    # Each window batch size after the first is compared with the first (at smoke size the
    # networks are barely trained, so the verdict itself may differ between CPUs).
    rows = [line for line in report.splitlines() if line.startswith("| VNet 16 filters")
            or line.startswith("| phantom run of section 4")]
    assert [r.split("|")[4].strip() == "reference" for r in rows] == [True, False, True, False]
    assert all(r.split("|")[4].strip() == "identical" or "voxels differ" in r for r in rows[1::2])
    # Section 5: both smoke rows of the converged grid ran at once to the end, and each row's
    # extrapolation is 5 seeds x its full length (3,600 iterations) x its seconds per iteration.
    grid = {r.split("|")[1].strip(): r.split("|")[2:5] for r in report.splitlines()
            if r.startswith("| vnet_lower |") or r.startswith("| ga_cps |")}
    assert set(grid) == {"vnet_lower", "ga_cps"}
    for done, seconds, minutes in grid.values():
        assert int(done) == 4
        assert float(minutes) == pytest.approx(5 * 3600 * float(seconds) / 60, abs=0.06)
    assert "2 processes at once, 4 iterations each" in report
