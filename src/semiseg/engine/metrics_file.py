"""``metrics.json``: a run's evaluation on disk (schema ``semiseg.metrics/1``).

The file's layout is the dataclasses below; the writer fills them and :func:`to_plain` turns
them into JSON, the reader checks a file against them with the one typed-file validator
(:mod:`semiseg.utils.typed`), so every error names the file and the key
(``runs/a/metrics.json: key 'cases[1].classes[0].in_pred' must be true or false, got 1``).
JSON has no nan: ``null`` stands for an undefined value. Keys the layout does not know are
ignored; a file without ``cases`` (numbers copied from a paper) keeps its stored summary, and
with cases the summary is recomputed and must agree with the stored one.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from semiseg.data.classes import get_class_set
from semiseg.engine.results import (
    CaseResult,
    ClassMetrics,
    EvaluationResult,
    RunInfo,
    Summary,
    summarise,
)
from semiseg.errors import ConfigError, DataError
from semiseg.utils.io import atomic_write_json
from semiseg.utils.typed import Messages, build_dataclass, to_plain

METRICS_SCHEMA = "semiseg.metrics/1"
METRICS_FILENAME = "metrics.json"

# ------------------------------------------------------------------------------ the layout
# Field order is the key order of the file; kw_only lets an optional key stand before a
# required one. A number is ``float | None`` (null = undefined).


@dataclass
class RunRecord:
    method: str
    dataset: str
    labeled_ratio: float | None
    seed: int | None = None
    config: str | None = None
    checkpoint: str | None = None
    experiment: str | None = None
    split: str | None = None
    switches: dict[str, bool] | None = None


@dataclass
class EvaluationRecord:
    class_set: str
    rule: str
    dice_unit: str = field(default="percent", kw_only=True)
    asd_unit: str
    resize_to: list[int] | None = None


@dataclass
class ClassRecord:
    label: int | None = field(default=None, kw_only=True)
    name: str | None = field(default=None, kw_only=True)
    abbreviation: str
    group: str | None = None


@dataclass
class MeansRecord:
    mean: float | None
    large: float | None
    small: float | None


@dataclass
class MeanRecord:
    mean: float | None


@dataclass
class PerClassRecord:
    label: int | None = field(default=None, kw_only=True)
    abbreviation: str | None = field(default=None, kw_only=True)
    dice: float | None
    dice_std: float | None
    asd: float | None
    asd_std: float | None
    hd95: float | None = None


@dataclass
class SummaryRecord:
    num_cases: int
    dice: MeansRecord
    asd: MeansRecord
    hd95: MeanRecord | None = field(default=None, kw_only=True)
    per_class: list[PerClassRecord]


@dataclass
class ClassResultRecord:
    label: int
    dice: float | None
    asd: float | None
    hd95: float | None = field(default=None, kw_only=True)
    in_pred: bool
    in_ref: bool


@dataclass
class CaseRecord:
    case: str
    mean_dice: float | None = field(default=None, kw_only=True)
    mean_asd: float | None = field(default=None, kw_only=True)
    shape: list[int]
    spacing: list[float] | None = field(default=None, kw_only=True)
    empty_prediction: bool | None = field(default=None, kw_only=True)
    classes: list[ClassResultRecord]


@dataclass
class MetricsFile:
    schema: str
    run: RunRecord | None = field(default=None, kw_only=True)
    evaluation: EvaluationRecord
    classes: list[ClassRecord]
    summary: SummaryRecord
    cases: list[CaseRecord] | None = None


# ------------------------------------------------------------------------------ writing


def _num(value: float | None) -> float | None:
    # JSON has no nan; null stands for "undefined".
    return None if value is None or not math.isfinite(value) else float(value)


def _nan(value: float | None) -> float:
    return math.nan if value is None else value


def _run_record(run: RunInfo) -> RunRecord:
    return RunRecord(method=run.method, dataset=run.dataset, labeled_ratio=run.labeled_ratio,
                     seed=run.seed, config=run.config, checkpoint=run.checkpoint,
                     experiment=run.experiment, split=run.split, switches=dict(run.switches))


def _summary_record(result: EvaluationResult) -> SummaryRecord:
    s = result.summary
    return SummaryRecord(
        num_cases=s.num_cases,
        dice=MeansRecord(_num(s.mean_dice), _num(s.large_dice), _num(s.small_dice)),
        asd=MeansRecord(_num(s.mean_asd), _num(s.large_asd), _num(s.small_asd)),
        hd95=None if s.mean_hd95 is None else MeanRecord(_num(s.mean_hd95)),
        per_class=[
            PerClassRecord(label=o.label, abbreviation=o.abbreviation,
                           dice=_num(s.class_dice[i]), dice_std=_num(s.class_dice_std[i]),
                           asd=_num(s.class_asd[i]), asd_std=_num(s.class_asd_std[i]),
                           hd95=None if s.class_hd95 is None else _num(s.class_hd95[i]))
            for i, o in enumerate(result.class_set.organs)
        ],
    )


def _case_record(case: CaseResult) -> CaseRecord:
    return CaseRecord(
        case=case.case_id, mean_dice=_num(case.mean_dice), mean_asd=_num(case.mean_asd),
        shape=list(case.shape), spacing=None if case.spacing is None else list(case.spacing),
        empty_prediction=case.empty_prediction,
        classes=[ClassResultRecord(label=m.label, dice=_num(m.dice), asd=_num(m.asd),
                                   hd95=None if m.hd95 is None else _num(m.hd95),
                                   in_pred=m.in_pred, in_ref=m.in_ref)
                 for m in case.classes],
    )


def result_to_dict(result: EvaluationResult) -> dict[str, Any]:
    """The ``metrics.json`` payload of ``result`` (schema ``semiseg.metrics/1``)."""
    return to_plain(MetricsFile(
        schema=METRICS_SCHEMA,
        run=None if result.run is None else _run_record(result.run),
        evaluation=EvaluationRecord(
            class_set=result.class_set.name, rule=result.rule, asd_unit=result.asd_unit,
            resize_to=None if result.resize_to is None else list(result.resize_to)),
        classes=[ClassRecord(label=o.label, name=o.name, abbreviation=o.abbreviation,
                             group=o.group) for o in result.class_set.organs],
        summary=_summary_record(result),
        cases=[_case_record(case) for case in result.cases],
    ))


def metrics_path(path: str | Path) -> Path:
    """``path`` itself if it names a ``.json`` file, else ``path / metrics.json``."""
    path = Path(path)
    return path if path.suffix == ".json" else path / METRICS_FILENAME


def write_metrics(result: EvaluationResult, target: str | Path) -> Path:
    """Write ``result`` atomically to ``target`` (a run folder or a ``.json`` path)."""
    path = metrics_path(target)
    atomic_write_json(path, result_to_dict(result))
    return path


# ------------------------------------------------------------------------------ reading


def _run_info(record: RunRecord | None, messages: Messages) -> RunInfo | None:
    if record is None:
        return None
    ratio = _nan(record.labeled_ratio)
    if not 0 < ratio <= 1:
        raise messages.fail("run.labeled_ratio", f"must be a fraction in (0, 1], got {ratio}")
    return RunInfo(method=record.method, dataset=record.dataset, labeled_ratio=ratio,
                   seed=record.seed, config=record.config, checkpoint=record.checkpoint,
                   experiment=record.experiment, split=record.split,
                   switches=dict(record.switches or {}))


def _summary(record: SummaryRecord, count: int, messages: Messages) -> Summary:
    rows = record.per_class
    if len(rows) != count:
        raise messages.fail("summary.per_class", f"must list {count} classes, got {len(rows)}")
    has_hd = record.hd95 is not None
    return Summary(
        num_cases=record.num_cases,
        class_dice=tuple(_nan(r.dice) for r in rows), class_asd=tuple(_nan(r.asd) for r in rows),
        class_dice_std=tuple(_nan(r.dice_std) for r in rows),
        class_asd_std=tuple(_nan(r.asd_std) for r in rows),
        mean_dice=_nan(record.dice.mean), mean_asd=_nan(record.asd.mean),
        large_dice=_nan(record.dice.large), small_dice=_nan(record.dice.small),
        large_asd=_nan(record.asd.large), small_asd=_nan(record.asd.small),
        class_hd95=tuple(_nan(r.hd95) for r in rows) if has_hd else None,
        mean_hd95=_nan(record.hd95.mean) if record.hd95 is not None else None,
    )


def _case(record: CaseRecord, index: int, count: int, messages: Messages) -> CaseResult:
    where = f"cases[{index}].classes"
    if len(record.classes) != count:
        raise messages.fail(where, f"must list {count} classes, got {len(record.classes)}")
    classes = []
    for label, row in enumerate(record.classes, start=1):
        if row.label != label:
            raise messages.fail(f"{where}[{label - 1}].label", f"must be {label}")
        classes.append(ClassMetrics(label=label, dice=_nan(row.dice), asd=_nan(row.asd),
                                    in_pred=row.in_pred, in_ref=row.in_ref,
                                    hd95=None if row.hd95 is None else row.hd95))
    return CaseResult(
        case_id=record.case, classes=tuple(classes), shape=tuple(record.shape),
        spacing=None if record.spacing is None else tuple(record.spacing),
        empty_prediction=bool(record.empty_prediction),
    )


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or abs(a - b) <= 1e-6 * max(1.0, abs(a))


def result_from_dict(payload: Any, source: str = "metrics.json") -> EvaluationResult:
    """Parse and validate a ``metrics.json`` payload; errors name ``source`` and the key.

    When cases are present the summary is recomputed from them and must agree with the stored
    one (a hand-edited summary is refused); a file without cases (e.g. numbers copied from a
    paper) uses its stored summary.
    """
    messages = Messages(DataError, source=source, ignore_unknown=True)
    if not isinstance(payload, dict):
        raise messages.mismatch("", "a mapping", payload)
    record: MetricsFile = build_dataclass(MetricsFile, payload, "", messages)
    if record.schema != METRICS_SCHEMA:
        raise messages.fail("schema", f"is {record.schema!r}; expected {METRICS_SCHEMA!r}")
    try:
        class_set = get_class_set(record.evaluation.class_set)
    except ConfigError as error:
        raise messages.fail("evaluation.class_set", str(error)) from None
    if [c.abbreviation for c in record.classes] != class_set.abbreviations:
        raise messages.fail("classes", f"must be the classes of {class_set.name} "
                                       f"({', '.join(class_set.abbreviations)})")
    count = len(class_set.organs)
    summary = _summary(record.summary, count, messages)
    cases = tuple(_case(c, i, count, messages) for i, c in enumerate(record.cases or ()))
    if cases:
        fresh = summarise(cases, class_set)
        pairs = zip((summary.mean_dice, summary.mean_asd, *summary.class_dice, *summary.class_asd),
                    (fresh.mean_dice, fresh.mean_asd, *fresh.class_dice, *fresh.class_asd))
        if fresh.num_cases != summary.num_cases or not all(_same(a, b) for a, b in pairs):
            raise messages.fail("summary", "disagrees with the values recomputed from 'cases'")
        summary = fresh
    evaluation = record.evaluation
    return EvaluationResult(
        class_set=class_set, cases=cases, summary=summary, rule=evaluation.rule,
        asd_unit=evaluation.asd_unit,
        resize_to=None if evaluation.resize_to is None else tuple(evaluation.resize_to),
        run=_run_info(record.run, messages), source=source,
    )


def read_metrics(path: str | Path) -> EvaluationResult:
    """Read a run folder's ``metrics.json`` (or a ``.json`` file); DataError names what is wrong."""
    file = metrics_path(path)
    if not file.is_file():
        if file == Path(path):
            raise DataError(f"metrics file {file} does not exist")
        raise DataError(f"run folder {path} has no {METRICS_FILENAME}")
    try:
        payload = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"{file}: not readable JSON ({error})") from None
    return result_from_dict(payload, source=str(file))
