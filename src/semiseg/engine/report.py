"""A report folder from evaluated runs: tables, per-class bar charts and optional overlays.

``write_report`` reads every run's ``metrics.json`` (schema in
:mod:`semiseg.engine.metrics_file`), groups runs by (dataset, labeled ratio, method), summarises
over seeds (:mod:`semiseg.engine.tables`) and writes, into ``out_dir``::

    report.md                         every table, figure and run, linked
    <table>.md/.csv/.json/.tex        one set per table (table1, per_class_dice_<setting>, ...)
    dice_per_class_<setting>.png      per-class Dice bars (methods side by side, std error bars)
    overlays/<method>_<setting>_seed<seed>_<case>.png   drawn when OverlayOptions are given,
                                      else copied from the runs' overlays/ (semiseg evaluate)

Everything is read and validated before the first file is written, and each file is written
atomically, so a bad input leaves ``out_dir`` as it was.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from semiseg.engine.convergence import convergence_table, row_convergence
from semiseg.engine.late_drop import late_drop, late_drop_table
from semiseg.engine.logging import read_validations
from semiseg.engine.metrics_file import METRICS_FILENAME, read_metrics
from semiseg.engine.paired import (
    comparisons_to_json,
    paired_comparisons,
    paired_table,
    plot_paired,
)
from semiseg.engine.results import EvaluationResult
from semiseg.engine.rules import MISSING_RULES
from semiseg.engine.tables import (
    LAYOUTS,
    MethodAggregate,
    Table,
    aggregate_runs,
    build_tables,
    render_table,
    setting_slug,
    setting_title,
    to_markdown,
)
from semiseg.errors import ConfigError, DataError

CaseLoader = Callable[[str, str], tuple[np.ndarray, np.ndarray]]
RunSource = str | Path | EvaluationResult


@dataclass(frozen=True)
class OverlayOptions:
    """How to draw slice overlays: ``load_case(dataset, case_id) -> (image, label)``.

    Predictions are read from ``predictions/<case>.npy`` or ``.nii.gz`` beside each run's
    ``metrics.json``. One run per (method, dataset, ratio) is drawn (the first seed listed),
    ``max_cases`` cases each (the first of ``cases`` if given, else of the run's cases).
    """

    load_case: CaseLoader
    max_cases: int = 1
    cases: Sequence[str] | None = None
    slice_index: int | None = None


@dataclass(frozen=True)
class _Run:
    result: EvaluationResult
    folder: Path | None  # None for an in-memory result


def find_runs(sources: RunSource | Sequence[RunSource]) -> list[EvaluationResult]:
    """Read the runs named by ``sources`` (see :func:`write_report`), in the order given."""
    return [run.result for run in _collect(sources)]


def _collect(sources: RunSource | Sequence[RunSource]) -> list[_Run]:
    if isinstance(sources, (str, Path, EvaluationResult)):
        sources = [sources]
    runs: list[_Run] = []
    seen: set[Path] = set()
    for source in sources:
        if isinstance(source, EvaluationResult):
            runs.append(_Run(source, None))
            continue
        for file in _metrics_files(Path(source)):
            if file.resolve() not in seen:
                seen.add(file.resolve())
                runs.append(_Run(read_metrics(file), file.parent))
    if not runs:
        raise DataError("no runs to report")
    return runs


def _metrics_files(path: Path) -> list[Path]:
    if path.suffix == ".json":
        if not path.is_file():
            raise DataError(f"metrics file {path} does not exist")
        return [path]
    if not path.is_dir():
        raise DataError(f"run folder {path} does not exist")
    if (path / METRICS_FILENAME).is_file():
        return [path / METRICS_FILENAME]
    # A folder of run folders (e.g. runs/<experiment>/seed<k>/metrics.json).
    found = sorted(path.rglob(METRICS_FILENAME))
    if not found:
        raise DataError(f"run folder {path} has no {METRICS_FILENAME} (nor any below it); "
                        "evaluate it first (semiseg evaluate)")
    return found


def _check_comparable(runs: list[_Run]) -> None:
    first = runs[0].result
    for run in runs[1:]:
        r = run.result
        if (r.rule, r.asd_unit) != (first.rule, first.asd_unit):
            raise DataError(
                f"{r.source or 'a result'} was evaluated with rule {r.rule!r} / ASD in "
                f"{r.asd_unit}, but {first.source or 'another'} with {first.rule!r} / "
                f"{first.asd_unit}; a report compares runs evaluated the same way")


def _layouts(layout: str | Sequence[str] | None, aggregates: Sequence[MethodAggregate]
             ) -> list[str]:
    if layout is None:
        auto = ["table1", "per_class"]
        return auto + (["ablation"] if any(a.switches for a in aggregates) else [])
    names = [layout] if isinstance(layout, str) else list(layout)
    for name in names:
        if name not in LAYOUTS:
            raise ConfigError(f"unknown table layout {name!r}; known: {', '.join(LAYOUTS)}")
    return names


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", text).strip("-") or "run"


def _load_prediction(folder: Path, case_id: str) -> np.ndarray | None:
    base = folder / "predictions"
    if (base / f"{case_id}.npy").is_file():
        return np.load(base / f"{case_id}.npy", allow_pickle=False)
    if (base / f"{case_id}.nii.gz").is_file():
        import nibabel as nib

        return np.asarray(nib.load(str(base / f"{case_id}.nii.gz")).dataobj)
    return None


# Overlay PNGs of `semiseg evaluate` copied into a report, per method and setting.
COPIED_OVERLAYS = 2


def _evaluated_overlays(runs: list[_Run]) -> list[tuple[Path, str, str]]:
    """(PNG written by ``semiseg evaluate``, report name, caption): the first run with
    overlays of each (dataset, ratio, method), :data:`COPIED_OVERLAYS` cases each."""
    chosen, drawn = [], set()
    for run in runs:
        info = run.result.run
        if info is None or run.folder is None or (info.dataset, info.labeled_ratio,
                                                  info.method) in drawn:
            continue
        pngs = [run.folder / "overlays" / f"{case.case_id}.png" for case in run.result.cases]
        pngs = [png for png in pngs if png.is_file()][:COPIED_OVERLAYS]
        if pngs:
            drawn.add((info.dataset, info.labeled_ratio, info.method))
        setting = setting_slug(info.dataset, info.labeled_ratio)
        for png in pngs:
            chosen.append((png, f"{_slug(info.method)}_{setting}_seed{info.seed}_"
                                f"{_slug(png.stem)}.png",
                           f"{info.method}, {setting_title(info.dataset, info.labeled_ratio)}, "
                           f"seed {info.seed}, case {png.stem}"))
    return chosen


@dataclass(frozen=True)
class _Overlay:
    name: str
    caption: str
    volumes: tuple[np.ndarray, np.ndarray, np.ndarray]
    run: EvaluationResult


def _overlays(runs: list[_Run], options: OverlayOptions) -> tuple[list[_Overlay], list[str]]:
    """Overlays to draw, and notes about runs that have none."""
    drawn: set[tuple[str, float, str]] = set()
    overlays, notes = [], []
    for run in runs:
        info = run.result.run
        if info is None or (info.dataset, info.labeled_ratio, info.method) in drawn:
            continue
        if run.folder is None or not (run.folder / "predictions").is_dir():
            notes.append(f"{info.method} ({setting_title(info.dataset, info.labeled_ratio)}): "
                         "no predictions/ beside metrics.json, no overlay")
            continue
        drawn.add((info.dataset, info.labeled_ratio, info.method))
        wanted = list(options.cases) if options.cases else [c.case_id for c in run.result.cases]
        count = 0
        for case_id in wanted:
            if count >= options.max_cases:
                break
            pred = _load_prediction(run.folder, case_id)
            if pred is None:
                continue
            image, label = (np.asarray(v) for v in options.load_case(info.dataset, case_id))
            if not image.shape == label.shape == pred.shape or image.ndim != 3:
                raise DataError(
                    f"{run.folder / 'predictions'}: case {case_id} prediction {pred.shape}, "
                    f"image {image.shape} and label {label.shape} must be 3-D and equal")
            setting = setting_slug(info.dataset, info.labeled_ratio)
            overlays.append(_Overlay(
                name=f"{_slug(info.method)}_{setting}_seed{info.seed}_{_slug(case_id)}.png",
                caption=f"{info.method}, {setting_title(info.dataset, info.labeled_ratio)}, "
                        f"seed {info.seed}, case {case_id}",
                volumes=(image, label, pred), run=run.result))
            count += 1
        if count == 0:
            notes.append(f"{info.method}: none of the cases {wanted[:5]} has a prediction file")
    return overlays, notes


def _heading(table_name: str) -> str:
    if table_name == "table1":
        return "Mean Dice and ASD (SCDL Table 1 layout)"
    if table_name.startswith("per_class"):
        return "Per-class results (TAK Tables 1-4 layout)"
    return "Ablation (SCDL Table 4 layout)"


def _runs_table(runs: list[_Run]) -> list[str]:
    lines = ["| Method | Setting | Seed | Cases | Config | metrics.json |",
             "|---|---|---:|---:|---|---|"]
    for run in runs:
        r, info = run.result, run.result.run
        assert info is not None
        lines.append(f"| {info.method} | {setting_title(info.dataset, info.labeled_ratio)} | "
                     f"{info.seed if info.seed is not None else '—'} | {r.summary.num_cases} | "
                     f"{info.config or '—'} | {r.source or '(in memory)'} |")
    return lines


def empty_prediction_warning(results: Sequence[EvaluationResult]) -> list[str]:
    """Markdown lines warning about runs that predicted no foreground on some cases (none when
    every prediction has foreground). Under the GALoss rule such a case records ASD 0 for every
    class (the official code's special case), so a run that predicts nothing would otherwise
    look best on ASD."""
    hits = [(r, sum(c.empty_prediction for c in r.cases), len(r.cases)) for r in results]
    hits = [h for h in hits if h[1]]
    if not hits:
        return []
    rule = MISSING_RULES.get(hits[0][0].rule)
    outcome = rule.empty_prediction if rule else None
    if outcome is not None and rule is not None and outcome.asd < rule.missed.asd:
        effect = (f"records Dice {outcome.dice:g} and ASD {outcome.asd:g} for every class, so "
                  "the ASD of these runs (and its bold) reads better than it is")
    else:
        effect = "scores every class as missed, so these runs' numbers reflect predicting nothing"
    lines = ["## Warning: empty predictions", "",
             f"Some runs predicted no foreground at all on some test cases. Under the "
             f"missing-class rule `{hits[0][0].rule}` such a case {effect}:", ""]
    for result, empty, total in hits:
        info = result.run
        name = f"{info.method} seed {info.seed}" if info else (result.source or "run")
        lines.append(f"- {name}: {empty} of {total} cases")
    return [*lines, ""]


def write_report(
    sources: RunSource | Sequence[RunSource],
    out_dir: str | Path,
    layout: str | Sequence[str] | None = None,
    *,
    ddof: int = 0,
    show_std: bool | None = None,
    plots: bool = True,
    overlays: OverlayOptions | None = None,
    title: str = "semiseg report",
    paired: str | None = None,
) -> list[Path]:
    """Write the report of ``sources`` into ``out_dir``; return the files written.

    ``sources``: run folders (holding ``metrics.json``, or run folders below them), paths of
    ``metrics.json`` files, or :class:`EvaluationResult` objects. ``layout``: ``table1``,
    ``per_class``, ``ablation`` or a list; default table1 + per_class (+ ablation when runs
    record switches). ``ddof``: std over seeds (0 population, 1 sample). ``paired``: a
    baseline method; adds the per-seed differences of every other method against it with 95 %
    t-intervals (:mod:`semiseg.engine.paired`: table, JSON and a plot per setting). Raises
    :class:`DataError` (a SemisegError) naming a run folder without ``metrics.json``.
    """
    from semiseg.engine.plots import (
        plot_overlay,
        plot_per_class_dice,
        plot_validation_curves,
        validation_curve,
    )
    from semiseg.utils.io import atomic_write, atomic_write_text

    out_dir = Path(out_dir)
    runs = _collect(sources)
    _check_comparable(runs)
    aggregates = aggregate_runs([run.result for run in runs], ddof=ddof)
    tables: list[Table] = []
    for name in _layouts(layout, aggregates):
        tables += build_tables(aggregates, name, show_std)
    drawings, notes = _overlays(runs, overlays) if overlays else ([], [])
    comparisons = paired_comparisons([run.result for run in runs], paired) if paired else []
    paired_tables = [paired_table(comparisons, *setting) for setting in dict.fromkeys(
        (c.dataset, c.labeled_ratio) for c in comparisons)]

    written: list[Path] = []
    for table in tables:
        for ext, text in render_table(table).items():
            atomic_write_text(out_dir / f"{table.name}.{ext}", text)
            written.append(out_dir / f"{table.name}.{ext}")
    for table in paired_tables:
        for ext, text in render_table(table).items():
            if ext != "json":  # the numbers go to the JSON below, not the formatted cells
                atomic_write_text(out_dir / f"{table.name}.{ext}", text)
                written.append(out_dir / f"{table.name}.{ext}")
        setting = table.name.removeprefix("paired_")
        chosen = [c for c in comparisons if setting_slug(c.dataset, c.labeled_ratio) == setting]
        atomic_write_text(out_dir / f"{table.name}.json", comparisons_to_json(chosen))
        written.append(out_dir / f"{table.name}.json")
        if plots:
            written.append(plot_paired(chosen, out_dir / f"{table.name}.png"))
    settings = list(dict.fromkeys(a.setting for a in aggregates))
    charts: dict[tuple[str, float], str] = {}
    if plots:
        for setting in settings:
            name = f"dice_per_class_{setting_slug(*setting)}.png"
            written.append(plot_per_class_dice(
                [a for a in aggregates if a.setting == setting], out_dir / name))
            charts[setting] = name
    curves_name = None
    curves: dict[str, list] = {}
    drops = []
    for run in runs:
        if not run.folder or run.result.run is None:
            continue
        validations = read_validations(run.folder / "log.csv")  # each log read once
        curve = validation_curve(validations)
        if curve is not None:
            curves.setdefault(run.result.run.method, []).append(curve)
        drop = late_drop(validations, f"{run.result.run.method} seed {run.result.run.seed}")
        if drop is not None:
            drops.append(drop)
    convergence = convergence_table(row_convergence(curves)) if curves else None
    drop_table = late_drop_table(drops) if drops else None
    for table in (convergence, drop_table):
        if table is not None:
            for ext, text in render_table(table).items():
                atomic_write_text(out_dir / f"{table.name}.{ext}", text)
                written.append(out_dir / f"{table.name}.{ext}")
    if plots and curves:
        curves_name = "validation_dice.png"
        written.append(plot_validation_curves(curves, out_dir / curves_name))
    for overlay in drawings:
        image, label, pred = overlay.volumes
        written.append(plot_overlay(image, label, pred, overlay.run.class_set,
                                    out_dir / "overlays" / overlay.name,
                                    slice_index=overlays.slice_index if overlays else None,
                                    title=overlay.caption))

    copied = [] if overlays else _evaluated_overlays(runs)
    for source, name, _ in copied:
        data = source.read_bytes()
        atomic_write(out_dir / "overlays" / name, lambda handle, data=data: handle.write(data))
        written.append(out_dir / "overlays" / name)

    first = runs[0].result
    std = "population (ddof=0)" if ddof == 0 else f"ddof={ddof}"
    lines = [f"# {title}", "",
             f"{len(runs)} runs, {len(aggregates)} method/setting groups. Dice in %, ASD in "
             f"{first.asd_unit}s; missing-class rule `{first.rule}`; mean±std over seeds, "
             f"std {std}; bold = best in its column.", ""]
    lines += empty_prediction_warning([run.result for run in runs])
    for table in tables:
        links = " · ".join(f"[{ext}]({table.name}.{ext})" for ext in ("csv", "json", "tex"))
        lines += [f"## {_heading(table.name)}", "", to_markdown(table), links, ""]
    for table in paired_tables:
        links = " · ".join(f"[{ext}]({table.name}.{ext})" for ext in ("csv", "json", "tex"))
        lines += [f"## Paired against {paired}", "", to_markdown(table), links, ""]
        if plots:
            lines += [f"![{table.name}]({table.name}.png)", ""]
    for setting, name in charts.items():
        lines += [f"## Per-class Dice, {setting_title(*setting)}", "", f"![{name}]({name})", ""]
    if curves_name:
        lines += ["## Validation Dice during training (mean ± std over seeds; thin: each seed)",
                  "", f"![{curves_name}]({curves_name})", ""]
    if convergence is not None:
        lines += ["## Convergence", "", to_markdown(convergence), ""]
    if drop_table is not None:
        lines += ["## Late drops", "", "The tables above score each run's best checkpoint, "
                  "so they do not show a fall after it. Volumes are predicted / true voxels "
                  "over the validation cases (×1 = the true volume).", "",
                  to_markdown(drop_table), ""]
    if drawings or notes or copied:
        lines += ["## Overlays (left: ground truth, right: prediction)", ""]
        for o in drawings:
            lines += [f"![{o.caption}](overlays/{o.name})", ""]
        for _, name, caption in copied:
            lines += [f"![{caption}](overlays/{name})", ""]
        lines += [f"- {note}" for note in notes] + [""]
    lines += ["## Runs", "", *_runs_table(runs), ""]
    atomic_write_text(out_dir / "report.md", "\n".join(lines))
    written.append(out_dir / "report.md")
    return written
