"""Late drops: which organs fell after a run's best validation, read from hand-made logs."""

from __future__ import annotations

from pathlib import Path

import pytest

from semiseg.engine.late_drop import late_drop, late_drop_table
from semiseg.engine.logging import read_validations

# Three validations: the best at 200 (60.0), a fall to 40.0 at 300. Organ Ga loses little Dice
# but spreads to 30x its volume; LK loses the most Dice and shrinks to 0.05x; Sp holds.
LOG = (
    "iteration,loss/total,val/dice,val/dice/Sp,val/dice/LK,val/dice/Ga,"
    "val/volume/Sp,val/volume/LK,val/volume/Ga\n"
    "100,2.0,50.0,80,40,30,1.0,0.8,0.7\n"
    "150,1.9,,,,,,,\n"
    "200,1.5,60.0,85,60,35,1.0,0.9,0.8\n"
    "300,1.4,40.0,84,10,26,1.05,0.05,30.0\n"
)


def _write_log(folder: Path, text: str = LOG) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "log.csv").write_text(text, encoding="utf-8")
    return folder / "log.csv"


def test_late_drop_names_the_organs_that_fell_and_the_volume_that_moved(tmp_path: Path) -> None:
    validations = read_validations(_write_log(tmp_path))
    assert sorted(validations) == [100, 200, 300]  # the row without validation is skipped
    drop = late_drop(validations, "ga_cps seed 2")
    assert drop is not None
    assert (drop.best_iteration, drop.best_dice, drop.last_iteration, drop.last_dice) == (
        200, 60.0, 300, 40.0)
    assert [organ.organ for organ in drop.organs] == ["LK", "Ga", "Sp"]  # falls 50, 9, 1
    assert drop.organs[0].fall == pytest.approx(50.0)
    # |log 30| - |log 0.8| = 3.178; LK: |log 0.05| - |log 0.9| = 2.890; Sp: 0.0488.
    by_name = {organ.organ: organ for organ in drop.organs}
    assert by_name["Ga"].volume_drift == pytest.approx(3.1781, abs=1e-3)
    assert by_name["LK"].volume_drift == pytest.approx(2.8904, abs=1e-3)
    row = late_drop_table([drop]).rows[0]
    assert row["best"] == "60.00 (200)" and row["last"] == "40.00 (300)"
    assert row["organs"].startswith("LK 60.0 → 10.0 (×0.90 → ×0.05); Ga 35.0 → 26.0")
    assert row["volume"] == "Ga (×0.80 → ×30.00)"


def test_no_drop_below_the_threshold_or_without_validation(tmp_path: Path) -> None:
    # 4.5 points below the best: within what validation noise does on a converged run.
    noisy = "iteration,val/dice\n100,50.0\n200,60.0\n300,55.5\n"
    assert late_drop(read_validations(_write_log(tmp_path / "a", noisy)), "a") is None
    assert late_drop(read_validations(_write_log(tmp_path / "a", noisy)), "a",
                     threshold=4.0) is not None
    assert read_validations(tmp_path / "missing.csv") == {}
    cut = "iteration,val/dice,val/dice/Ga\n100,50.0,30\n200,60.0,3-\n"  # a line cut mid-write
    assert sorted(read_validations(_write_log(tmp_path / "cut", cut))) == [100]
    assert late_drop({}, "none") is None
    # An older log with the mean only still reports the fall, without organs.
    old = "iteration,val/dice\n100,50.0\n200,60.0\n300,30.0\n"
    drop = late_drop(read_validations(_write_log(tmp_path / "b", old)), "old")
    assert drop is not None and drop.organs == ()
    row = late_drop_table([drop]).rows[0]
    assert row["organs"].startswith("—") and row["volume"] == "—"
    # A run resumed by a version that logs organs: none at the best, so none compared.
    resumed = "iteration,val/dice,val/dice/Ga,val/volume/Ga\n100,60.0,,\n200,40.0,20,9.0\n"
    drop = late_drop(read_validations(_write_log(tmp_path / "c", resumed)), "resumed")
    assert drop is not None and drop.organs == ()
    organs = late_drop_table([drop]).rows[0]["organs"]
    assert organs == "— (per-organ validation not logged at both)"

