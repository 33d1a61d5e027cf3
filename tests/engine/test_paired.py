"""Paired comparison against a baseline (semiseg report --paired) on hand-made per-seed results."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from semiseg.cli import main
from semiseg.data.classes import SYNAPSE
from semiseg.engine.evaluation import EvaluationResult, RunInfo, evaluate_cases
from semiseg.engine.paired import paired_comparisons, t_interval
from semiseg.engine.report import write_report
from semiseg.errors import DataError

sys.path.insert(0, str(Path(__file__).parent))
from test_report import make_run, png_size, toy_volumes

# Student t quantile t_{0.975, df} from a table (df = 1, 2, 3).
T975 = {1: 12.706205, 2: 4.302653, 3: 3.182446}


def _result(method: str, seed: int, mean: float, large: float, small: float,
            asd: float = 1.0) -> EvaluationResult:
    _, label, pred = toy_volumes(0)
    base = evaluate_cases([("0001", pred, label)], SYNAPSE,
                          run=RunInfo(method, "phantom", 0.2, seed=seed), show_progress=False)
    summary = dataclasses.replace(base.summary, mean_dice=mean, large_dice=large,
                                  small_dice=small, mean_asd=asd)
    return dataclasses.replace(base, summary=summary, source=f"{method}/seed{seed}")


def test_t_interval_by_hand() -> None:
    mean, low, high = t_interval([1.0, 2.0, 3.0])  # sd 1, n 3
    half = T975[2] / math.sqrt(3)
    assert (mean, low, high) == pytest.approx((2.0, 2.0 - half, 2.0 + half), abs=1e-6)
    assert t_interval([5.0])[0] == 5.0 and math.isnan(t_interval([5.0])[1])


def test_paired_differences_seed_by_seed() -> None:
    # Baseline and method per seed (mean, large, small); seed 3 only for the method.
    base = {0: (50.0, 70.0, 40.0), 1: (60.0, 75.0, 52.0), 2: (40.0, 65.0, 30.0)}
    method = {0: (51.0, 70.5, 41.0), 1: (62.0, 75.0, 55.0), 2: (43.0, 66.0, 34.0),
              3: (90.0, 90.0, 90.0)}
    results = [_result("base", s, *v) for s, v in base.items()]
    results += [_result("ssl", s, *v, asd=0.5) for s, v in method.items()]
    (comparison,) = paired_comparisons(results, "base")
    assert (comparison.method, comparison.baseline) == ("ssl", "base")
    assert comparison.unpaired_seeds == (3,)
    mean = comparison.differences["mean_dice"]
    assert mean.seeds == (0, 1, 2) and mean.differences == pytest.approx((1.0, 2.0, 3.0))
    half = T975[2] * 1.0 / math.sqrt(3)
    assert (mean.mean, mean.low, mean.high) == pytest.approx((2.0, 2.0 - half, 2.0 + half))
    assert not mean.resolved  # [-0.48, 4.48] contains 0
    small = comparison.differences["small_dice"]  # 1, 3, 4: mean 8/3, sd sqrt(7/3)
    half = T975[2] * math.sqrt(7 / 3) / math.sqrt(3)
    assert (small.mean, small.low) == pytest.approx((8 / 3, 8 / 3 - half))
    asd = comparison.differences["mean_asd"]  # 0.5 - 1 on every seed: zero spread
    assert asd.mean == pytest.approx(-0.5) and asd.resolved
    with pytest.raises(DataError, match=r"--paired vnet: no such method .*methods: base, ssl"):
        paired_comparisons(results, "vnet")


def test_report_writes_the_paired_table_and_plot(tmp_path: Path) -> None:
    base = {0: (50.0, 70.0, 40.0), 1: (60.0, 75.0, 52.0), 2: (40.0, 65.0, 30.0)}
    method = {0: (51.0, 70.5, 41.0), 1: (62.0, 75.0, 55.0), 2: (43.0, 66.0, 34.0)}
    results = [_result("base", s, *v) for s, v in base.items()]
    results += [_result("ssl", s, *v) for s, v in method.items()]
    write_report(results, tmp_path, paired="base")
    table = (tmp_path / "paired_phantom_20pct.md").read_text(encoding="utf-8")
    assert "| ssl | 3 | +2.00 [-0.48, +4.48] |" in table
    assert "0: +1.00, 1: +2.00, 2: +3.00" in table
    values = json.loads((tmp_path / "paired_phantom_20pct.json").read_text(encoding="utf-8"))
    assert values[0]["differences"]["mean_dice"]["per_seed"] == pytest.approx([1, 2, 3])
    assert png_size(tmp_path / "paired_phantom_20pct.png")[0] > 300
    assert "## Paired against base" in (tmp_path / "report.md").read_text(encoding="utf-8")


def test_cli_report_paired(tmp_path: Path, capsys) -> None:
    for seed, (a, b) in enumerate([(0, 1), (0, 2)]):
        make_run(tmp_path / "runs" / "lower" / f"seed{seed}", "lower", seed, shift=a)
        make_run(tmp_path / "runs" / "ssl" / f"seed{seed}", "ssl", seed, shift=b)
    assert main(["report", str(tmp_path / "runs"), "--out", str(tmp_path / "out"),
                 "--paired", "lower"]) == 0
    rows = json.loads((tmp_path / "out" / "paired_synapse_20pct.json").read_text())
    deltas = rows[0]["differences"]["mean_dice"]["per_seed"]
    assert len(deltas) == 2 and all(d < 0 for d in deltas)  # shifted Sp: worse than exact
    assert np.isfinite(rows[0]["differences"]["mean_dice"]["ci95"]).all()
    assert main(["report", str(tmp_path / "runs"), "--out", str(tmp_path / "out2"),
                 "--paired", "upper"]) == 2
    assert "--paired upper: no such method" in capsys.readouterr().err
