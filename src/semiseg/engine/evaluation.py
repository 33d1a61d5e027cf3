"""Case- and run-level evaluation: per-class Dice (%) and ASD, as the official test scripts do.

Default rule (``rule="galoss"``) follows the GALoss test code (``cicailalala/GALoss``
``utils/test_util.py`` ``validation_all_case`` / ``cal_metric``; facts in
commit dff0493), which TAK's AMOS test (``Lunn88/TAK-Semi``) also uses and on
which SCDL's strongest hosts (GA-CPS, GA-MagicNet) are evaluated:

* per foreground class 1..N: if both prediction and label hold the class, Dice = medpy ``dc``
  (reported here x100) and ASD = medpy ``asd(prediction, label)`` **without voxel spacing, i.e.
  in voxels** of the evaluated grid;
* class in only one of them: Dice 0, ASD 128 (HD95 128);
* class in neither: Dice 100 % (the code records ``dc = 1``), ASD 0;
* prediction with no foreground at all: every class of the case gets Dice 0 and ASD 0;
* per-class value = plain mean over cases (no nan skipping: the rule never produces nan), then
  mean over classes; the per-class spread over cases is the population std.

``rule="dhc"`` follows DHC ``code/evaluate_Ntimes.py`` and GenericSSL ``code/evaluate.py``
(xmed-lab/DHC, xmed-lab/GenericSSL): identical, except that a class absent from both
records Dice **1** on the 0-100 scale (sic, 1 %, not 100 %) and there is no special case for an
all-empty prediction. ``rule="nanskip"`` is not official: undefined values become ``nan`` and
are skipped in the means (a missed or spurious class still scores Dice 0).

Both official scripts measure on a fixed grid (GALoss nearest-resizes prediction and label to
160x160x80; DHC's paper-era data is stored at that size). semiseg prepares data on that grid
already (docs/data.md), so ``resize_to`` defaults to None; it
reproduces the GALoss resize when needed (PyTorch ``F.interpolate(mode="nearest")``, the call
the official code uses). HD95 is optional and not part of either official table (GALoss
records 0 there); a missing class gets 128 / 0 like the ASD.

The mean over classes, and the large/small means (TAK §4.3 grouping in
:mod:`semiseg.data.classes`), are means of the per-class means.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from scipy import ndimage

from semiseg.data.classes import ClassSet
from semiseg.engine import metrics
from semiseg.errors import ConfigError, DataError

AsdUnit = Literal["voxel", "mm"]


@dataclass(frozen=True)
class Outcome:
    """Values recorded for a class that cannot be measured (Dice in %)."""

    dice: float
    asd: float
    hd95: float


@dataclass(frozen=True)
class MissingClassRule:
    """What a case records when a class is missing from the prediction, the label or both."""

    name: str
    source: str
    missed: Outcome  # class in the label only
    spurious: Outcome  # class in the prediction only
    absent: Outcome  # class in neither
    empty_prediction: Outcome | None  # every class, when the prediction has no foreground


_PENALTY = Outcome(dice=0.0, asd=128.0, hd95=128.0)
GALOSS_RULE = MissingClassRule(
    name="galoss",
    source="GALoss utils/test_util.py validation_all_case + cal_metric",
    missed=_PENALTY,
    spurious=_PENALTY,
    absent=Outcome(dice=100.0, asd=0.0, hd95=0.0),
    empty_prediction=Outcome(dice=0.0, asd=0.0, hd95=0.0),
)
DHC_RULE = MissingClassRule(
    name="dhc",
    source="DHC code/evaluate_Ntimes.py, GenericSSL code/evaluate.py",
    missed=_PENALTY,
    spurious=_PENALTY,
    absent=Outcome(dice=1.0, asd=0.0, hd95=0.0),  # sic: 1 on the 0-100 scale
    empty_prediction=None,
)
NANSKIP_RULE = MissingClassRule(
    name="nanskip",
    source="semiseg (not official): undefined values are nan and skipped in means",
    missed=Outcome(dice=0.0, asd=math.nan, hd95=math.nan),
    spurious=Outcome(dice=0.0, asd=math.nan, hd95=math.nan),
    absent=Outcome(dice=math.nan, asd=math.nan, hd95=math.nan),
    empty_prediction=None,
)
MISSING_RULES: dict[str, MissingClassRule] = {
    rule.name: rule for rule in (GALOSS_RULE, DHC_RULE, NANSKIP_RULE)
}


def get_missing_rule(rule: str | MissingClassRule) -> MissingClassRule:
    """Return the rule called ``rule`` (``galoss``, ``dhc``, ``nanskip``) or ``rule`` itself."""
    if isinstance(rule, MissingClassRule):
        return rule
    try:
        return MISSING_RULES[rule]
    except KeyError:
        raise ConfigError(
            f"unknown missing-class rule {rule!r}; known: {', '.join(MISSING_RULES)}"
        ) from None


@dataclass(frozen=True)
class ClassMetrics:
    """One class of one case. ``dice`` in %, ``asd``/``hd95`` in voxels or mm."""

    label: int
    dice: float
    asd: float
    in_pred: bool
    in_ref: bool
    hd95: float | None = None

    @property
    def status(self) -> str:
        """``measured`` (in both), ``missed`` (label only), ``spurious`` (prediction only)
        or ``absent`` (neither)."""
        if self.in_pred and self.in_ref:
            return "measured"
        if self.in_ref:
            return "missed"
        return "spurious" if self.in_pred else "absent"


@dataclass(frozen=True)
class CaseResult:
    """All classes of one case, in label order 1..N."""

    case_id: str
    classes: tuple[ClassMetrics, ...]
    shape: tuple[int, ...]
    spacing: tuple[float, ...] | None = None
    empty_prediction: bool = False

    @property
    def dice(self) -> np.ndarray:
        return np.array([c.dice for c in self.classes], dtype=np.float64)

    @property
    def asd(self) -> np.ndarray:
        return np.array([c.asd for c in self.classes], dtype=np.float64)

    @property
    def mean_dice(self) -> float:
        """Mean Dice (%) over the classes of this case (nan values skipped)."""
        return _nanmean(self.dice)

    @property
    def mean_asd(self) -> float:
        return _nanmean(self.asd)

    @property
    def missing_labels(self) -> list[int]:
        """Classes in the label that the prediction misses."""
        return [c.label for c in self.classes if c.status == "missed"]


@dataclass(frozen=True)
class CaseInput:
    """One case to evaluate; ``spacing`` in array axis order (needed for ``asd_unit="mm"``)."""

    case_id: str
    pred: np.ndarray
    ref: np.ndarray
    spacing: Sequence[float] | None = None


@dataclass(frozen=True)
class RunInfo:
    """Who produced the predictions; written to ``metrics.json`` and used to group runs."""

    method: str
    dataset: str
    labeled_ratio: float
    seed: int | None = None
    config: str | None = None  # path of the run's config file
    checkpoint: str | None = None
    experiment: str | None = None
    split: str | None = None  # which split was evaluated (eval / test)
    switches: dict[str, bool] = field(default_factory=dict)  # for ablation tables


@dataclass(frozen=True)
class Summary:
    """Per-class means over cases and the means over classes (Dice in %)."""

    num_cases: int
    class_dice: tuple[float, ...]
    class_asd: tuple[float, ...]
    class_dice_std: tuple[float, ...]  # population std over cases (as GALoss prints)
    class_asd_std: tuple[float, ...]
    mean_dice: float
    mean_asd: float
    large_dice: float
    small_dice: float
    large_asd: float
    small_asd: float
    class_hd95: tuple[float, ...] | None = None
    mean_hd95: float | None = None


def _nanmean(values: np.ndarray | Sequence[float], axis: int | None = None) -> float | np.ndarray:
    # A class that is nan in every case (possible only with the non-official "nanskip" rule)
    # stays nan instead of warning.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        result = np.nanmean(np.asarray(values, dtype=np.float64), axis=axis)
    return float(result) if np.ndim(result) == 0 else result


def _nanstd(values: np.ndarray, axis: int) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanstd(values, axis=axis, ddof=0)


def summarise(cases: Sequence[CaseResult], class_set: ClassSet) -> Summary:
    """Mean over cases per class, then over classes / large / small classes."""
    if not cases:
        raise DataError("no cases to summarise")
    dice = np.stack([case.dice for case in cases])  # (cases, classes)
    asd = np.stack([case.asd for case in cases])
    class_dice = _nanmean(dice, axis=0)
    class_asd = _nanmean(asd, axis=0)
    large = np.array(class_set.large_labels) - 1
    small = np.array(class_set.small_labels) - 1
    hd = [[c.hd95 for c in case.classes] for case in cases]
    class_hd95 = None
    if all(v is not None for row in hd for v in row):
        class_hd95 = tuple(float(v) for v in _nanmean(np.array(hd, dtype=np.float64), axis=0))
    return Summary(
        num_cases=len(cases),
        class_dice=tuple(float(v) for v in class_dice),
        class_asd=tuple(float(v) for v in class_asd),
        class_dice_std=tuple(float(v) for v in _nanstd(dice, axis=0)),
        class_asd_std=tuple(float(v) for v in _nanstd(asd, axis=0)),
        mean_dice=_nanmean(class_dice),
        mean_asd=_nanmean(class_asd),
        large_dice=_nanmean(class_dice[large]),
        small_dice=_nanmean(class_dice[small]),
        large_asd=_nanmean(class_asd[large]),
        small_asd=_nanmean(class_asd[small]),
        class_hd95=class_hd95,
        mean_hd95=None if class_hd95 is None else _nanmean(class_hd95),
    )


@dataclass(frozen=True)
class EvaluationResult:
    """A run's evaluation: its cases (may be empty when only a summary is known) and summary."""

    class_set: ClassSet
    cases: tuple[CaseResult, ...]
    summary: Summary
    rule: str = GALOSS_RULE.name
    asd_unit: str = "voxel"
    resize_to: tuple[int, ...] | None = None
    run: RunInfo | None = None
    source: str | None = None  # file it was read from, for error messages

    @classmethod
    def from_cases(cls, cases: Sequence[CaseResult], class_set: ClassSet, **kwargs: object
                   ) -> EvaluationResult:
        """Build a result whose summary is computed from ``cases``."""
        return cls(class_set=class_set, cases=tuple(cases), summary=summarise(cases, class_set),
                   **kwargs)  # type: ignore[arg-type]

    def with_run(self, run: RunInfo) -> EvaluationResult:
        """A copy that records who produced the predictions."""
        return dataclasses.replace(self, run=run)

    def save(self, target: str | Path) -> Path:
        """Write ``metrics.json`` (see :func:`write_metrics`)."""
        return write_metrics(self, target)

    def to_markdown(self) -> str:
        """Per-class Dice (%) and ASD of this run as a Markdown table, means last."""
        s = self.summary
        lines = [f"| Class | Dice (%) | ASD ({self.asd_unit}) |", "|---|---:|---:|"]
        for organ, dice, asd in zip(self.class_set.organs, s.class_dice, s.class_asd):
            mark = "" if organ.large else " (S)"
            lines.append(f"| {organ.abbreviation}{mark} | {dice:.2f} | {asd:.2f} |")
        lines += [f"| **Mean** | **{s.mean_dice:.2f}** | **{s.mean_asd:.2f}** |",
                  f"| Large | {s.large_dice:.2f} | {s.large_asd:.2f} |",
                  f"| Small | {s.small_dice:.2f} | {s.small_asd:.2f} |"]
        return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# Case evaluation


def _as_labels(array: np.ndarray, what: str, case_id: str) -> np.ndarray:
    array = np.asarray(array)
    if array.dtype == bool:
        return array.view(np.uint8)
    if np.issubdtype(array.dtype, np.integer):
        return array
    if np.issubdtype(array.dtype, np.floating) and np.array_equal(array, np.round(array)):
        # Saved predictions are sometimes float (DHC writes float32 NIfTI); whole numbers are fine.
        return array.astype(np.int32)
    raise DataError(f"case {case_id}: {what} must hold integer label ids, got dtype {array.dtype}")


def _check_range(array: np.ndarray, what: str, case_id: str, class_set: ClassSet) -> None:
    top = len(class_set.organs)
    if array.size and (array.min() < 0 or array.max() > top):
        bad = np.unique(array[(array < 0) | (array > top)])[:10].tolist()
        raise DataError(
            f"case {case_id}: {what} contains label ids {bad} outside the class set "
            f"{class_set.name} (0..{top})"
        )


def _resize_nearest(array: np.ndarray, size: Sequence[int]) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    # Same call as the official scripts, so the resized grid matches theirs voxel for voxel;
    # float32 holds label ids exactly.
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None]
    resized = F.interpolate(tensor, size=tuple(int(s) for s in size), mode="nearest")
    return resized[0, 0].numpy().astype(array.dtype)


def _merge(a: tuple[slice, ...], b: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[slice, ...]:
    # Union box plus a 1-voxel margin: see semiseg.engine.metrics for why the values are exact.
    return tuple(
        slice(max(min(x.start, y.start) - 1, 0), min(max(x.stop, y.stop) + 1, n))
        for x, y, n in zip(a, b, shape)
    )


def _sampling(spacing: Sequence[float] | None, asd_unit: str, ndim: int, case_id: str
              ) -> tuple[float, ...] | None:
    if asd_unit not in ("voxel", "mm"):
        raise ConfigError(f"asd_unit must be 'voxel' or 'mm', got {asd_unit!r}")
    if spacing is None:
        if asd_unit == "mm":
            raise DataError(f"case {case_id}: asd_unit='mm' needs the voxel spacing")
        return None
    values = tuple(float(s) for s in spacing)
    if len(values) != ndim or not all(math.isfinite(s) and s > 0 for s in values):
        raise DataError(f"case {case_id}: spacing {values} must be {ndim} positive numbers")
    return values


def evaluate_case(
    pred_labels: np.ndarray,
    ref_labels: np.ndarray,
    class_set: ClassSet,
    spacing: Sequence[float] | None = None,
    asd_unit: AsdUnit = "voxel",
    *,
    case_id: str = "case",
    rule: str | MissingClassRule = GALOSS_RULE.name,
    label_range: bool = True,
    resize_to: Sequence[int] | None = None,
    compute_hd95: bool = False,
) -> CaseResult:
    """Per-class Dice (%) and ASD of one case, with the missing-class ``rule`` (default GALoss).

    ``asd_unit="voxel"`` (official) ignores ``spacing`` for the distances; ``"mm"`` uses it
    (then it is required). ``label_range`` raises :class:`DataError` when either volume holds
    ids outside 0..N; without it such ids are ignored. ``resize_to`` nearest-resizes both
    volumes first (official: (160, 160, 80)); mm spacing is scaled to the new grid.
    """
    missing = get_missing_rule(rule)
    pred = _as_labels(pred_labels, "prediction", case_id)
    ref = _as_labels(ref_labels, "label", case_id)
    if pred.shape != ref.shape:
        raise DataError(f"case {case_id}: prediction shape {pred.shape} != label shape {ref.shape}")
    sampling = _sampling(spacing, asd_unit, pred.ndim, case_id)
    if label_range:
        _check_range(pred, "prediction", case_id, class_set)
        _check_range(ref, "label", case_id, class_set)
    if resize_to is not None:
        if len(resize_to) != pred.ndim:
            raise ConfigError(f"resize_to {tuple(resize_to)} must have {pred.ndim} sizes")
        if sampling is not None:
            sampling = tuple(s * n / m for s, n, m in zip(sampling, pred.shape, resize_to))
        pred, ref = _resize_nearest(pred, resize_to), _resize_nearest(ref, resize_to)
    distance_spacing = sampling if asd_unit == "mm" else None
    count = len(class_set.organs)
    # One C pass per volume finds every class's box (ids > count or < 1 are ignored).
    pred_boxes = ndimage.find_objects(pred, max_label=count)
    ref_boxes = ndimage.find_objects(ref, max_label=count)
    pred_boxes += [None] * (count - len(pred_boxes))
    ref_boxes += [None] * (count - len(ref_boxes))
    empty_prediction = all(box is None for box in pred_boxes)

    results = []
    for label, pred_box, ref_box in zip(range(1, count + 1), pred_boxes, ref_boxes):
        in_pred, in_ref = pred_box is not None, ref_box is not None
        if empty_prediction and missing.empty_prediction is not None:
            outcome: Outcome | None = missing.empty_prediction
        elif in_pred and in_ref:
            outcome = None
        else:
            outcome = missing.missed if in_ref else missing.spurious if in_pred else missing.absent
        if outcome is not None:
            results.append(ClassMetrics(label, outcome.dice, outcome.asd, in_pred, in_ref,
                                        outcome.hd95 if compute_hd95 else None))
            continue
        box = _merge(pred_box, ref_box, pred.shape)
        p, r = pred[box] == label, ref[box] == label
        results.append(ClassMetrics(
            label=label,
            dice=100.0 * metrics.dice_coefficient(p, r),
            asd=metrics.average_surface_distance(p, r, distance_spacing),
            in_pred=True,
            in_ref=True,
            hd95=metrics.hd95(p, r, distance_spacing) if compute_hd95 else None,
        ))
    return CaseResult(case_id=str(case_id), classes=tuple(results), shape=tuple(pred.shape),
                      spacing=sampling, empty_prediction=empty_prediction)


def cases_from_mappings(
    predictions: Mapping[str, np.ndarray],
    references: Mapping[str, np.ndarray],
    spacings: Mapping[str, Sequence[float]] | None = None,
) -> list[CaseInput]:
    """Pair predictions and references by case id (both must name the same cases)."""
    if set(predictions) != set(references):
        odd = sorted(set(predictions) ^ set(references))
        raise DataError(f"predictions and references differ in cases: {odd[:10]}")
    spacings = spacings or {}
    return [CaseInput(k, predictions[k], references[k], spacings.get(k)) for k in predictions]


def evaluate_cases(
    cases: Iterable[CaseInput | tuple],
    class_set: ClassSet,
    asd_unit: AsdUnit = "voxel",
    *,
    rule: str | MissingClassRule = GALOSS_RULE.name,
    label_range: bool = True,
    resize_to: Sequence[int] | None = None,
    compute_hd95: bool = False,
    run: RunInfo | None = None,
    show_progress: bool = True,
) -> EvaluationResult:
    """Evaluate many cases (an iterable, so volumes can be loaded lazily) with a progress bar.

    Each item is a :class:`CaseInput` or a tuple ``(case_id, pred, ref[, spacing])``.
    """
    from tqdm import tqdm

    missing = get_missing_rule(rule)
    total = len(cases) if isinstance(cases, Sequence) else None
    results: list[CaseResult] = []
    seen: set[str] = set()
    for item in tqdm(cases, total=total, desc="evaluate", unit="case", disable=not show_progress):
        case = item if isinstance(item, CaseInput) else CaseInput(*item)
        if case.case_id in seen:
            raise DataError(f"case {case.case_id} is evaluated twice")
        seen.add(case.case_id)
        results.append(evaluate_case(
            case.pred, case.ref, class_set, case.spacing, asd_unit, case_id=case.case_id,
            rule=missing, label_range=label_range, resize_to=resize_to,
            compute_hd95=compute_hd95,
        ))
    if not results:
        raise DataError("evaluate_cases got no cases")
    return EvaluationResult.from_cases(
        results, class_set, rule=missing.name, asd_unit=asd_unit,
        resize_to=None if resize_to is None else tuple(int(s) for s in resize_to), run=run,
    )


# ----------------------------------------------------------------------------------------------
# metrics.json

METRICS_SCHEMA = "semiseg.metrics/1"
METRICS_FILENAME = "metrics.json"


def _num(value: float | None) -> float | None:
    # JSON has no nan; null stands for "undefined".
    return None if value is None or not math.isfinite(value) else float(value)


def result_to_dict(result: EvaluationResult) -> dict[str, Any]:
    """The ``metrics.json`` payload of ``result`` (schema ``semiseg.metrics/1``)."""
    s, organs, run = result.summary, result.class_set.organs, result.run
    return {
        "schema": METRICS_SCHEMA,
        "run": None if run is None else {
            "method": run.method, "dataset": run.dataset, "labeled_ratio": run.labeled_ratio,
            "seed": run.seed, "config": run.config, "checkpoint": run.checkpoint,
            "experiment": run.experiment, "split": run.split, "switches": dict(run.switches),
        },
        "evaluation": {
            "class_set": result.class_set.name, "rule": result.rule, "dice_unit": "percent",
            "asd_unit": result.asd_unit,
            "resize_to": None if result.resize_to is None else list(result.resize_to),
        },
        "classes": [
            {"label": o.label, "name": o.name, "abbreviation": o.abbreviation, "group": o.group}
            for o in organs
        ],
        "summary": {
            "num_cases": s.num_cases,
            "dice": {"mean": _num(s.mean_dice), "large": _num(s.large_dice),
                     "small": _num(s.small_dice)},
            "asd": {"mean": _num(s.mean_asd), "large": _num(s.large_asd),
                    "small": _num(s.small_asd)},
            "hd95": None if s.mean_hd95 is None else {"mean": _num(s.mean_hd95)},
            "per_class": [
                {"label": o.label, "abbreviation": o.abbreviation,
                 "dice": _num(s.class_dice[i]), "dice_std": _num(s.class_dice_std[i]),
                 "asd": _num(s.class_asd[i]), "asd_std": _num(s.class_asd_std[i]),
                 "hd95": None if s.class_hd95 is None else _num(s.class_hd95[i])}
                for i, o in enumerate(organs)
            ],
        },
        "cases": [
            {"case": c.case_id, "mean_dice": _num(c.mean_dice), "mean_asd": _num(c.mean_asd),
             "shape": list(c.shape),
             "spacing": None if c.spacing is None else list(c.spacing),
             "empty_prediction": c.empty_prediction,
             "classes": [
                 {"label": m.label, "dice": _num(m.dice), "asd": _num(m.asd),
                  "hd95": None if m.hd95 is None else _num(m.hd95),
                  "in_pred": m.in_pred, "in_ref": m.in_ref}
                 for m in c.classes
             ]}
            for c in result.cases
        ],
    }


_MISSING = object()


class _Node:
    """A decoded JSON value with its dotted key, so every error names the file and the key."""

    def __init__(self, value: Any, key: str, source: str) -> None:
        self.value, self.key, self.source = value, key, source

    def fail(self, problem: str) -> DataError:
        return DataError(f"{self.source}: key '{self.key or '<root>'}' {problem}")

    def __getitem__(self, name: str | int) -> _Node:
        key = f"{self.key}[{name}]" if isinstance(name, int) else f"{self.key}.{name}".lstrip(".")
        if isinstance(name, int):
            return _Node(self.as_list()[name], key, self.source)
        return _Node(self.as_dict().get(name, _MISSING), key, self.source)

    @property
    def absent(self) -> bool:
        return self.value is _MISSING or self.value is None

    def _typed(self, kinds: tuple[type, ...], what: str) -> Any:
        if self.value is _MISSING:
            raise self.fail("is missing")
        # bool is an int in Python; JSON true must not pass for a number.
        if isinstance(self.value, bool) != (bool in kinds) or not isinstance(self.value, kinds):
            raise self.fail(f"must be {what}, got {self.value!r}")
        return self.value

    def as_dict(self) -> dict[str, Any]:
        return self._typed((dict,), "an object")

    def as_list(self) -> list[Any]:
        return self._typed((list,), "a list")

    def items(self) -> list[_Node]:
        return [self[i] for i in range(len(self.as_list()))]

    def as_str(self) -> str:
        return self._typed((str,), "a string")

    def as_int(self) -> int:
        return self._typed((int,), "an integer")

    def as_bool(self) -> bool:
        return self._typed((bool,), "true or false")

    def number(self) -> float:
        """A float; null means nan (undefined), see :func:`_num`."""
        return math.nan if self.value is None else float(self._typed((int, float), "a number"))

    def optional(self) -> _Node | None:
        return None if self.absent else self


def _read_run(node: _Node) -> RunInfo | None:
    run = node.optional()
    if run is None:
        return None
    ratio = run["labeled_ratio"].number()
    if not 0 < ratio <= 1:
        raise run["labeled_ratio"].fail(f"must be a fraction in (0, 1], got {ratio}")
    switches = run["switches"].optional()
    seed = run["seed"].optional()
    text = {k: None if run[k].absent else run[k].as_str()
            for k in ("config", "checkpoint", "experiment", "split")}
    return RunInfo(
        method=run["method"].as_str(), dataset=run["dataset"].as_str(), labeled_ratio=ratio,
        seed=None if seed is None else seed.as_int(), **text,
        switches={} if switches is None else {k: switches[k].as_bool() for k in switches.as_dict()},
    )


def _read_case(node: _Node, count: int) -> CaseResult:
    rows = node["classes"].items()
    if len(rows) != count:
        raise node["classes"].fail(f"must list {count} classes, got {len(rows)}")
    classes = []
    for label, row in enumerate(rows, start=1):
        if row["label"].as_int() != label:
            raise row["label"].fail(f"must be {label}")
        hd = row["hd95"].optional()
        classes.append(ClassMetrics(
            label=label, dice=row["dice"].number(), asd=row["asd"].number(),
            in_pred=row["in_pred"].as_bool(), in_ref=row["in_ref"].as_bool(),
            hd95=None if hd is None else hd.number(),
        ))
    spacing = node["spacing"].optional()
    empty = node["empty_prediction"].optional()
    return CaseResult(
        case_id=node["case"].as_str(), classes=tuple(classes),
        shape=tuple(n.as_int() for n in node["shape"].items()),
        spacing=None if spacing is None else tuple(n.number() for n in spacing.items()),
        empty_prediction=False if empty is None else empty.as_bool(),
    )


def _read_summary(node: _Node, count: int) -> Summary:
    rows = node["per_class"].items()
    if len(rows) != count:
        raise node["per_class"].fail(f"must list {count} classes, got {len(rows)}")
    hd = node["hd95"].optional()

    def column(key: str) -> tuple[float, ...]:
        return tuple(row[key].number() for row in rows)

    return Summary(
        num_cases=node["num_cases"].as_int(),
        class_dice=column("dice"), class_asd=column("asd"),
        class_dice_std=column("dice_std"), class_asd_std=column("asd_std"),
        mean_dice=node["dice"]["mean"].number(), mean_asd=node["asd"]["mean"].number(),
        large_dice=node["dice"]["large"].number(), small_dice=node["dice"]["small"].number(),
        large_asd=node["asd"]["large"].number(), small_asd=node["asd"]["small"].number(),
        class_hd95=None if hd is None else column("hd95"),
        mean_hd95=None if hd is None else hd["mean"].number(),
    )


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or abs(a - b) <= 1e-6 * max(1.0, abs(a))


def result_from_dict(payload: Any, source: str = "metrics.json") -> EvaluationResult:
    """Parse and validate a ``metrics.json`` payload; errors name ``source`` and the key.

    When cases are present the summary is recomputed from them and must agree with the stored
    one (a hand-edited summary is refused); a file without cases (e.g. numbers copied from a
    paper) uses its stored summary.
    """
    from semiseg.data.classes import get_class_set

    root = _Node(payload, "", source)
    root.as_dict()
    if root["schema"].as_str() != METRICS_SCHEMA:
        raise root["schema"].fail(f"is {root['schema'].value!r}; expected {METRICS_SCHEMA!r}")
    evaluation = root["evaluation"]
    try:
        class_set = get_class_set(evaluation["class_set"].as_str())
    except ConfigError as error:
        raise evaluation["class_set"].fail(str(error)) from None
    listed = [c["abbreviation"].as_str() for c in root["classes"].items()]
    if listed != class_set.abbreviations:
        raise root["classes"].fail(
            f"must be the classes of {class_set.name} ({', '.join(class_set.abbreviations)})")
    count = len(class_set.organs)
    summary = _read_summary(root["summary"], count)
    cases_node = root["cases"].optional()
    cases = tuple(_read_case(c, count) for c in cases_node.items()) if cases_node else ()
    if cases:
        fresh = summarise(cases, class_set)
        pairs = zip((summary.mean_dice, summary.mean_asd, *summary.class_dice, *summary.class_asd),
                    (fresh.mean_dice, fresh.mean_asd, *fresh.class_dice, *fresh.class_asd))
        if fresh.num_cases != summary.num_cases or not all(_same(a, b) for a, b in pairs):
            raise root["summary"].fail("disagrees with the values recomputed from 'cases'")
        summary = fresh
    resize = evaluation["resize_to"].optional()
    return EvaluationResult(
        class_set=class_set, cases=cases, summary=summary,
        rule=evaluation["rule"].as_str(), asd_unit=evaluation["asd_unit"].as_str(),
        resize_to=None if resize is None else tuple(n.as_int() for n in resize.items()),
        run=_read_run(root["run"]), source=source,
    )


def metrics_path(path: str | Path) -> Path:
    """``path`` itself if it names a ``.json`` file, else ``path / metrics.json``."""
    path = Path(path)
    return path if path.suffix == ".json" else path / METRICS_FILENAME


def write_metrics(result: EvaluationResult, target: str | Path) -> Path:
    """Write ``result`` atomically to ``target`` (a run folder or a ``.json`` path)."""
    from semiseg.utils.io import atomic_write_json

    path = metrics_path(target)
    atomic_write_json(path, result_to_dict(result))
    return path


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
