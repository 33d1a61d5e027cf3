"""Seed aggregation and the three table layouts, on hand-made results with known means/stds."""

from __future__ import annotations

import csv
import io
import json
import math

import pytest

from semiseg.data.classes import SYNAPSE
from semiseg.engine.results import CaseResult, ClassMetrics, EvaluationResult, RunInfo
from semiseg.engine.tables import (
    Stat,
    aggregate_runs,
    build_tables,
    latex_escape,
    per_class_table,
    table1,
    to_csv,
    to_json,
    to_latex,
    to_markdown,
    write_table,
)
from semiseg.errors import ConfigError, DataError

LARGE = set(SYNAPSE.large_labels)  # Sp RK LK Li St = 1 2 3 6 7


def make_result(method: str, seed: int, large: float, small: float, asd: float,
                dataset: str = "synapse", ratio: float = 0.2, asd_unit: str = "voxel",
                switches: dict[str, bool] | None = None) -> EvaluationResult:
    """One case whose large classes score ``large``, small ones ``small``, every ASD ``asd``.

    Synapse has 5 large and 8 small classes: mean Dice = (5 * large + 8 * small) / 13.
    """
    classes = tuple(
        ClassMetrics(o.label, large if o.label in LARGE else small, asd, True, True)
        for o in SYNAPSE.organs
    )
    run = RunInfo(method, dataset, ratio, seed=seed, switches=switches or {})
    return EvaluationResult.from_cases(
        [CaseResult("c1", classes, (4, 4, 4))], SYNAPSE, run=run, asd_unit=asd_unit,
        source=f"runs/{method}/seed{seed}/metrics.json",
    )


def three_seed_runs() -> list[EvaluationResult]:
    # Method A: mean Dice 60, 62, 64 (every class equal); ASD 3, 4, 5. Method B: one seed.
    runs = [make_result("A", s, d, d, a) for s, d, a in ((0, 60, 3), (1, 62, 4), (2, 64, 5))]
    runs.append(make_result("B", 0, 91.0, 52.0, 2.0))
    return runs


def test_stat_population_std_by_default_sample_std_as_option() -> None:
    assert Stat.of([60, 62, 64]).std == pytest.approx(math.sqrt(8 / 3))  # ddof=0 (DHC, lead)
    assert Stat.of([60, 62, 64], ddof=1) == Stat(62.0, 2.0, 3)
    for ddof in (0, 1):
        single = Stat.of([70.0], ddof=ddof)
        assert single.mean == 70.0 and math.isnan(single.std) and single.n == 1


def test_aggregate_runs_means_and_stds() -> None:
    a, b = aggregate_runs(three_seed_runs(), ddof=1)
    assert (a.method, a.seeds, a.dataset, a.labeled_ratio) == ("A", (0, 1, 2), "synapse", 0.2)
    assert a.mean_dice == Stat(62.0, 2.0, 3)
    assert a.mean_asd == Stat(4.0, 1.0, 3)
    assert a.class_dice[3] == Stat(62.0, 2.0, 3)
    assert b.large_dice.mean == 91.0 and b.small_dice.mean == 52.0
    assert b.mean_dice.mean == pytest.approx((5 * 91 + 8 * 52) / 13)  # 67.0
    assert a.sources[1] == "runs/A/seed1/metrics.json"


def test_table1_markdown_cells_and_bold() -> None:
    md = to_markdown(table1(aggregate_runs(three_seed_runs(), ddof=1)))
    lines = md.splitlines()
    assert lines[2] == ("| Methods | Synapse (20% labeled) DSC↑ | Synapse (20% labeled) ASD↓ |")
    assert lines[4] == "| A | 62.00±2.00 | 4.00±1.00 |"
    # B wins both columns (67.00 > 62.00, 2.00 < 4.00); one seed -> no ±.
    assert lines[5] == "| B | **67.00** | **2.00** |"
    # Default population std: sqrt(8/3) = 1.63 and sqrt(2/3) = 0.82.
    default = to_markdown(table1(aggregate_runs(three_seed_runs()))).splitlines()
    assert default[4] == "| A | 62.00±1.63 | 4.00±0.82 |"


def test_table1_spans_datasets_and_marks_missing() -> None:
    runs = [*three_seed_runs(), make_result("A", 0, 50, 50, 9, dataset="amos", ratio=0.05)]
    table = table1(aggregate_runs(runs, ddof=1))
    md = to_markdown(table).splitlines()
    assert md[2].endswith("| AMOS (5% labeled) DSC↑ | AMOS (5% labeled) ASD↓ |")
    assert md[5] == "| B | **67.00** | **2.00** | — | — |"
    tex = to_latex(table)
    assert r"\multicolumn{2}{c}{Synapse (20\% labeled)}" in tex
    assert r"\cmidrule(lr){2-3}\cmidrule(lr){4-5}" in tex
    assert r"A & 62.00$\pm$2.00 & 4.00$\pm$1.00 & 50.00 & 9.00 \\" in tex
    assert r"B & \textbf{67.00} & \textbf{2.00} & -- & -- \\" in tex
    assert tex.count(r"\toprule") == 1 and r"\bottomrule" in tex


def test_per_class_layout() -> None:
    table = per_class_table(aggregate_runs(three_seed_runs()), "synapse", 0.2)
    md = to_markdown(table).splitlines()
    assert md[2] == ("| Methods | All | L. | S. | Sp | RK | LK | Ga | Es | Li | St | Ao | IVC | "
                     "PSV | PA | RAG | LAG |")
    # A: every class 62.0 (mean of 60/62/64); B: large 91.0, small 52.0; std hidden here.
    assert md[4] == "| A | 62.00 | 62.00 | **62.00** | " + " | ".join(
        ["62.0"] * 3 + ["**62.0**"] * 2 + ["62.0"] * 2 + ["**62.0**"] * 6) + " |"
    b_classes = ["**91.0**" if o.large else "52.0" for o in SYNAPSE.organs]
    assert md[5] == "| B | **67.00** | **91.00** | 52.00 | " + " | ".join(b_classes) + " |"
    asd = to_markdown(per_class_table(aggregate_runs(three_seed_runs()), "synapse", 0.2,
                                      metric="asd")).splitlines()
    assert asd[0] == "**Per-class ASD (voxel) on Synapse (20% labeled); L./S.: large/small organs**"
    assert asd[5].startswith("| B | **2.00** | **2.00** | **2.00** | **2.0** |")


def test_ablation_layout() -> None:
    runs = [make_result("baseline", 0, 66, 66, 5.44, switches={"CDBA": False, "SAC": False}),
            make_result("+CDBA", 0, 67, 67, 6.24, switches={"CDBA": True, "SAC": False}),
            make_result("+CDBA+SAC", 0, 68, 68, 3.32, switches={"CDBA": True, "SAC": True})]
    (table,) = build_tables(aggregate_runs(runs), "ablation")
    md = to_markdown(table).splitlines()
    assert md[2] == "| # | Methods | CDBA | SAC | DSC↑ | ASD↓ |"
    assert md[3] == "|---|---|:---:|:---:|---:|---:|"
    assert md[4] == "| 1 | baseline |  |  | 66.00 | 5.44 |"
    assert md[6] == "| 3 | +CDBA+SAC | ✓ | ✓ | **68.00** | **3.32** |"
    assert r"2 & +CDBA & \checkmark &  & 67.00 & 6.24 \\" in to_latex(table)
    assert to_csv(table).splitlines()[2] == "2,+CDBA,1,0,67,,1,6.24,,1"
    with pytest.raises(ConfigError, match="switches"):
        build_tables(aggregate_runs(three_seed_runs()), "ablation")


def test_csv_and_json_keep_mean_std_n() -> None:
    table = table1(aggregate_runs(three_seed_runs(), ddof=1))
    rows = list(csv.DictReader(io.StringIO(to_csv(table))))
    assert rows[0]["method"] == "A"
    assert float(rows[0]["synapse_20pct_dsc_mean"]) == 62.0
    assert float(rows[0]["synapse_20pct_dsc_std"]) == 2.0
    assert rows[0]["synapse_20pct_dsc_n"] == "3"
    assert rows[1]["synapse_20pct_asd_std"] == ""  # one seed: undefined
    data = json.loads(json.dumps(to_json(table)))
    assert data["rows"][0]["synapse_20pct_dsc"] == {"mean": 62.0, "std": 2.0, "n": 3}
    assert data["rows"][1]["synapse_20pct_dsc"]["std"] is None
    assert data["columns"][1] == {"key": "synapse_20pct_dsc", "header": "DSC↑",
                                  "group": "Synapse (20% labeled)", "kind": "stat",
                                  "best": "max"}


def test_write_table_files(tmp_path) -> None:
    paths = write_table(table1(aggregate_runs(three_seed_runs(), ddof=1)), tmp_path)
    assert [p.name for p in paths] == ["table1.md", "table1.csv", "table1.json", "table1.tex"]
    assert "62.00±2.00" in (tmp_path / "table1.md").read_text(encoding="utf-8")
    assert json.loads((tmp_path / "table1.json").read_text(encoding="utf-8"))["name"] == "table1"


def test_ties_are_all_bold_and_escaping() -> None:
    runs = [make_result("X_1", 0, 60, 60, 1.0), make_result("Y&Z", 0, 60, 60, 1.004)]
    md = to_markdown(table1(aggregate_runs(runs))).splitlines()
    assert md[4:] == ["| X_1 | **60.00** | **1.00** |", "| Y&Z | **60.00** | **1.00** |"]
    assert latex_escape("P/U 5% a_b & #1 ±") == r"P/U 5\% a\_b \& \#1 $\pm$"


def test_aggregation_errors_name_the_runs() -> None:
    runs = [*three_seed_runs(), make_result("A", 1, 70, 70, 1)]
    with pytest.raises(DataError, match=r"runs/A/seed1/metrics.json and runs/A/seed1/metrics"
                                        r".json are both seed 1 of method 'A'"):
        aggregate_runs(runs)
    mixed = [make_result("A", 0, 60, 60, 3), make_result("A", 1, 60, 60, 3, asd_unit="mm")]
    with pytest.raises(DataError, match="asd_unit 'mm' differs"):
        aggregate_runs(mixed)
    bare = EvaluationResult.from_cases(three_seed_runs()[0].cases, SYNAPSE, source="x.json")
    with pytest.raises(DataError, match=r"x\.json: no 'run' section"):
        aggregate_runs([bare])
    with pytest.raises(ConfigError, match="unknown table layout"):
        build_tables(aggregate_runs(three_seed_runs()), "wide")
