"""The papers' tables from evaluated runs: aggregate seeds, lay out, render.

Runs are grouped by (dataset, labeled ratio, method); within a group each quantity (the run's
mean Dice, mean ASD, per-class Dice and ASD, large/small means) is summarised over seeds as the
mean and standard deviation of the per-seed values. The papers print "68.49±3.5" without saying
which std they use. Default ``ddof=0`` (population std): it is what DHC's
``code/evaluate_Ntimes.py`` computes across its seeds/folds with numpy's default
(DHC ``code/evaluate_Ntimes.py``; see docs/evaluation.md);
``ddof=1`` (sample std, unbiased for a handful of seeds) is the option. With one seed (or
``ddof`` seeds) the std is undefined: shown as nothing, stored as null.

Layouts:

* ``table1`` - rows = methods; for every (dataset, ratio) a DSC and an ASD column, mean±std
  (SCDL Table 1);
* ``per_class`` - one table per (dataset, ratio): All, L., S., then each class abbreviation
  (TAK Tables 1-4, SCDL Tables 2-3), Dice means (``show_std`` adds ±std);
* ``ablation`` - one table per (dataset, ratio): a column per boolean switch recorded in the
  runs' ``switches``, then DSC and ASD (SCDL Table 4, TAK Table 5).

Renderers give Markdown, CSV (mean / std / n in separate columns), JSON and LaTeX (booktabs);
the best value of a column is bold: the largest for Dice, the smallest for ASD (ties all bold,
compared as printed).
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from semiseg.data.classes import ClassSet
from semiseg.engine.results import EvaluationResult
from semiseg.errors import ConfigError, DataError

LAYOUTS = ("table1", "per_class", "ablation")
Layout = Literal["table1", "per_class", "ablation"]


@dataclass(frozen=True)
class Stat:
    """Mean and standard deviation of one quantity over ``n`` seeds (nan when undefined)."""

    mean: float
    std: float
    n: int

    @classmethod
    def of(cls, values: Iterable[float], ddof: int = 0) -> Stat:
        data = np.asarray(list(values), dtype=np.float64)
        if data.size == 0:
            return cls(math.nan, math.nan, 0)
        # One seed has no spread to report, whatever ddof says.
        std = float(np.std(data, ddof=ddof)) if data.size > max(ddof, 1) else math.nan
        return cls(float(np.mean(data)), std, int(data.size))


@dataclass(frozen=True)
class MethodAggregate:
    """One method on one (dataset, labeled ratio), summarised over its seeds."""

    dataset: str
    labeled_ratio: float
    method: str
    class_set: ClassSet
    seeds: tuple[int | None, ...]
    sources: tuple[str, ...]
    mean_dice: Stat
    mean_asd: Stat
    large_dice: Stat
    small_dice: Stat
    large_asd: Stat
    small_asd: Stat
    class_dice: tuple[Stat, ...]
    class_asd: tuple[Stat, ...]
    asd_unit: str
    rule: str
    switches: dict[str, bool] = field(default_factory=dict)

    @property
    def setting(self) -> tuple[str, float]:
        return (self.dataset, self.labeled_ratio)


def dataset_title(dataset: str) -> str:
    """Display name of a dataset (``synapse`` -> ``Synapse``, ``amos`` -> ``AMOS``)."""
    return {"synapse": "Synapse", "amos": "AMOS", "phantom": "Phantom"}.get(dataset, dataset)


def setting_title(dataset: str, ratio: float) -> str:
    """``Synapse (20% labeled)``."""
    return f"{dataset_title(dataset)} ({ratio * 100:g}% labeled)"


def setting_slug(dataset: str, ratio: float) -> str:
    """File-name friendly ``synapse_20pct``."""
    return f"{re.sub(r'[^A-Za-z0-9]+', '-', dataset)}_{ratio * 100:g}pct".replace(".", "p")


def _source(result: EvaluationResult) -> str:
    return result.source or "<in-memory result>"


def aggregate_runs(results: Sequence[EvaluationResult], ddof: int = 0) -> list[MethodAggregate]:
    """Group runs by (dataset, ratio, method) and summarise each group over seeds.

    Order follows the first appearance of each group in ``results``. Runs of one group must
    share class set, missing-class rule, ASD unit and switches, and have distinct seeds.
    """
    groups: dict[tuple[str, float, str], list[EvaluationResult]] = {}
    for result in results:
        if result.run is None:
            raise DataError(f"{_source(result)}: no 'run' section (method, dataset, "
                            "labeled_ratio, seed), so it cannot be placed in a table")
        key = (result.run.dataset, result.run.labeled_ratio, result.run.method)
        groups.setdefault(key, []).append(result)
    return [_aggregate(key, runs, ddof) for key, runs in groups.items()]


def _aggregate(key: tuple[str, float, str], runs: list[EvaluationResult], ddof: int
               ) -> MethodAggregate:
    first = runs[0]
    assert first.run is not None
    seen: dict[int | None, str] = {}
    for run in runs:
        assert run.run is not None
        for attr in ("asd_unit", "rule"):
            if getattr(run, attr) != getattr(first, attr):
                raise DataError(f"{_source(run)}: {attr} {getattr(run, attr)!r} differs from "
                                f"{getattr(first, attr)!r} in {_source(first)} (same method "
                                f"{key[2]!r}); evaluate all seeds the same way")
        if run.class_set != first.class_set or run.run.switches != first.run.switches:
            raise DataError(f"{_source(run)}: class set or switches differ from "
                            f"{_source(first)} for method {key[2]!r}")
        if run.run.seed in seen:
            raise DataError(f"{_source(run)} and {seen[run.run.seed]} are both seed "
                            f"{run.run.seed} of method {key[2]!r} on {setting_title(*key[:2])}")
        seen[run.run.seed] = _source(run)
    summaries = [run.summary for run in runs]

    def stat(attr: str) -> Stat:
        return Stat.of((getattr(s, attr) for s in summaries), ddof)

    count = len(first.class_set.organs)
    return MethodAggregate(
        dataset=key[0], labeled_ratio=key[1], method=key[2], class_set=first.class_set,
        seeds=tuple(seen), sources=tuple(seen.values()),
        mean_dice=stat("mean_dice"), mean_asd=stat("mean_asd"),
        large_dice=stat("large_dice"), small_dice=stat("small_dice"),
        large_asd=stat("large_asd"), small_asd=stat("small_asd"),
        class_dice=tuple(Stat.of((s.class_dice[i] for s in summaries), ddof)
                         for i in range(count)),
        class_asd=tuple(Stat.of((s.class_asd[i] for s in summaries), ddof)
                        for i in range(count)),
        asd_unit=first.asd_unit, rule=first.rule, switches=dict(first.run.switches),
    )


# ---------------------------------------------------------------------------------- layout

@dataclass(frozen=True)
class Column:
    """A table column; ``best`` picks the value printed bold."""

    key: str
    header: str
    kind: Literal["text", "stat", "switch"] = "stat"
    best: Literal["max", "min"] | None = None
    decimals: int = 2
    group: str | None = None  # spanning header (e.g. the dataset of table1)


@dataclass(frozen=True)
class Table:
    """Rows of cells keyed by column key: ``str`` (text), :class:`Stat`, ``bool`` or None."""

    name: str
    title: str
    columns: tuple[Column, ...]
    rows: tuple[dict[str, Any], ...]
    show_std: bool = True


def _settings(aggregates: Sequence[MethodAggregate]) -> list[tuple[str, float]]:
    return list(dict.fromkeys(a.setting for a in aggregates))


def table1(aggregates: Sequence[MethodAggregate], show_std: bool = True) -> Table:
    """Methods x (DSC, ASD) per (dataset, ratio), SCDL Table 1."""
    settings = _settings(aggregates)
    columns = [Column("method", "Methods", kind="text")]
    for dataset, ratio in settings:
        slug, group = setting_slug(dataset, ratio), setting_title(dataset, ratio)
        columns += [Column(f"{slug}_dsc", "DSC↑", best="max", group=group),
                    Column(f"{slug}_asd", "ASD↓", best="min", group=group)]
    rows: dict[str, dict[str, Any]] = {}
    for a in aggregates:
        row = rows.setdefault(a.method, {"method": a.method})
        slug = setting_slug(*a.setting)
        row[f"{slug}_dsc"], row[f"{slug}_asd"] = a.mean_dice, a.mean_asd
    title = "Mean Dice (%) and ASD over seeds (mean±std), " + ", ".join(
        setting_title(*s) for s in settings)
    return Table("table1", title, tuple(columns), tuple(rows.values()), show_std)


def per_class_table(aggregates: Sequence[MethodAggregate], dataset: str, ratio: float,
                    metric: Literal["dice", "asd"] = "dice", show_std: bool = False) -> Table:
    """All / L. / S. then every class, for one (dataset, ratio): TAK Tables 1-4 layout."""
    chosen = [a for a in aggregates if a.setting == (dataset, ratio)]
    if not chosen:
        raise DataError(f"no runs on {setting_title(dataset, ratio)}")
    best: Literal["max", "min"] = "max" if metric == "dice" else "min"
    class_set = chosen[0].class_set
    columns = [Column("method", "Methods", kind="text"),
               Column("all", "All", best=best), Column("large", "L.", best=best),
               Column("small", "S.", best=best)]
    columns += [Column(f"c{o.label}", o.abbreviation, best=best, decimals=1)
                for o in class_set.organs]
    rows = []
    for a in chosen:
        classes = a.class_dice if metric == "dice" else a.class_asd
        row: dict[str, Any] = {"method": a.method}
        if metric == "dice":
            row.update(all=a.mean_dice, large=a.large_dice, small=a.small_dice)
        else:
            row.update(all=a.mean_asd, large=a.large_asd, small=a.small_asd)
        row.update({f"c{i + 1}": s for i, s in enumerate(classes)})
        rows.append(row)
    what = "Dice (%)" if metric == "dice" else f"ASD ({chosen[0].asd_unit})"
    return Table(f"per_class_{metric}_{setting_slug(dataset, ratio)}",
                 f"Per-class {what} on {setting_title(dataset, ratio)}; L./S.: large/small "
                 "organs", tuple(columns), tuple(rows), show_std)


def ablation_table(aggregates: Sequence[MethodAggregate], dataset: str, ratio: float,
                   switches: Sequence[str] | None = None, show_std: bool = True) -> Table:
    """Switch columns (✓ when on) then DSC and ASD, for one (dataset, ratio): SCDL Table 4."""
    chosen = [a for a in aggregates if a.setting == (dataset, ratio)]
    names = list(switches) if switches is not None else list(
        dict.fromkeys(name for a in chosen for name in a.switches))
    if not names:
        raise ConfigError(f"ablation layout on {setting_title(dataset, ratio)}: no run records "
                          "'switches' in its metrics.json (run.switches, e.g. {\"SAC\": true})")
    columns = [Column("index", "#", kind="text"), Column("method", "Methods", kind="text")]
    columns += [Column(f"switch_{n}", n, kind="switch") for n in names]
    columns += [Column("dsc", "DSC↑", best="max"), Column("asd", "ASD↓", best="min")]
    rows = []
    for i, a in enumerate(chosen, start=1):
        row: dict[str, Any] = {"index": str(i), "method": a.method,
                               "dsc": a.mean_dice, "asd": a.mean_asd}
        row.update({f"switch_{n}": a.switches.get(n, False) for n in names})
        rows.append(row)
    return Table(f"ablation_{setting_slug(dataset, ratio)}",
                 f"Ablation on {setting_title(dataset, ratio)}", tuple(columns), tuple(rows),
                 show_std)


def build_tables(aggregates: Sequence[MethodAggregate], layout: str,
                 show_std: bool | None = None) -> list[Table]:
    """The tables of ``layout`` (one, or one per (dataset, ratio))."""
    if layout == "table1":
        return [table1(aggregates, True if show_std is None else show_std)]
    if layout == "per_class":
        return [per_class_table(aggregates, d, r, show_std=bool(show_std))
                for d, r in _settings(aggregates)]
    if layout == "ablation":
        return [ablation_table(aggregates, d, r, show_std=True if show_std is None else show_std)
                for d, r in _settings(aggregates)]
    raise ConfigError(f"unknown table layout {layout!r}; known: {', '.join(LAYOUTS)}")


# --------------------------------------------------------------------------------- rendering

def _fmt(value: float, decimals: int) -> str:
    return f"{value:.{decimals}f}"


def _best(table: Table, column: Column) -> str | None:
    """The printed mean that is best in ``column`` (None if fewer than two values)."""
    if column.kind != "stat" or column.best is None:
        return None
    values = [row.get(column.key) for row in table.rows]
    means = [v.mean for v in values if isinstance(v, Stat) and math.isfinite(v.mean)]
    if len(means) < 2:
        return None
    # Compared as printed, so a tie at the shown precision bolds every tied value.
    pick = max(means) if column.best == "max" else min(means)
    return _fmt(pick, column.decimals)


def _cell_parts(table: Table, column: Column, value: Any) -> tuple[str, bool]:
    """Text of a cell (with ``±`` between mean and std) and whether it is the column's best."""
    if value is None:
        return "—", False
    if column.kind == "switch":
        return ("✓" if value else ""), False
    if column.kind == "text":
        return str(value), False
    assert isinstance(value, Stat)
    if not math.isfinite(value.mean):
        return "—", False
    mean = _fmt(value.mean, column.decimals)
    text = mean
    if table.show_std and math.isfinite(value.std):
        text += "±" + _fmt(value.std, column.decimals)
    return text, mean == _best(table, column)


def _header(column: Column) -> str:
    return f"{column.group} {column.header}" if column.group else column.header


def to_markdown(table: Table) -> str:
    """GitHub Markdown with the title as a bold caption line; best values in bold."""
    align = ["---" if c.kind == "text" else ":---:" if c.kind == "switch" else "---:"
             for c in table.columns]
    lines = [f"**{table.title}**", "", "| " + " | ".join(_header(c) for c in table.columns) + " |",
             "|" + "|".join(align) + "|"]
    for row in table.rows:
        cells = []
        for column in table.columns:
            text, bold = _cell_parts(table, column, row.get(column.key))
            text = text.replace("|", "\\|")
            cells.append(f"**{text}**" if bold else text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def to_csv(table: Table) -> str:
    """One header row; a stat column becomes ``<key>_mean``, ``<key>_std``, ``<key>_n``."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    header: list[str] = []
    for c in table.columns:
        header += [f"{c.key}_mean", f"{c.key}_std", f"{c.key}_n"] if c.kind == "stat" else [c.key]
    writer.writerow(header)
    for row in table.rows:
        cells: list[str] = []
        for c in table.columns:
            value = row.get(c.key)
            if c.kind == "stat":
                cells += ["", "", "0"] if value is None else [
                    _csv_num(value.mean), _csv_num(value.std), str(value.n)]
            elif c.kind == "switch":
                cells.append("1" if value else "0")
            else:
                cells.append("" if value is None else str(value))
        writer.writerow(cells)
    return out.getvalue()


def _csv_num(value: float) -> str:
    # 10 significant digits drop float noise (6.239999999999999) but keep every digit that
    # the evaluation can mean; JSON keeps the full float.
    return format(value, ".10g") if math.isfinite(value) else ""


def _json_num(value: float) -> float | None:
    return value if math.isfinite(value) else None


def to_json(table: Table) -> dict[str, Any]:
    """Plain data: columns and rows; a stat is ``{"mean", "std", "n"}`` (null if undefined)."""
    rows = []
    for row in table.rows:
        out: dict[str, Any] = {}
        for c in table.columns:
            value = row.get(c.key)
            if isinstance(value, Stat):
                value = {"mean": _json_num(value.mean), "std": _json_num(value.std), "n": value.n}
            out[c.key] = value
        rows.append(out)
    return {
        "name": table.name, "title": table.title,
        "columns": [{"key": c.key, "header": c.header, "group": c.group, "kind": c.kind,
                     "best": c.best} for c in table.columns],
        "rows": rows,
    }


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                  "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
                  "^": r"\textasciicircum{}", "↑": r"$\uparrow$", "↓": r"$\downarrow$",
                  "±": r"$\pm$", "✓": r"\checkmark", "—": "--"}


def latex_escape(text: str) -> str:
    """Escape LaTeX specials and map the table symbols (↑ ↓ ± ✓ —) to LaTeX."""
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in text)


def to_latex(table: Table) -> str:
    """A booktabs ``table`` (needs ``\\usepackage{booktabs}``; ✓ needs ``amssymb``)."""
    spec = "".join("l" if c.kind == "text" else "c" for c in table.columns)
    lines = [r"\begin{table}[t]", r"\centering", f"\\caption{{{latex_escape(table.title)}}}",
             f"\\label{{tab:{table.name}}}", f"\\begin{{tabular}}{{{spec}}}", r"\toprule"]
    if any(c.group for c in table.columns):
        spans: list[tuple[str | None, int]] = []
        for c in table.columns:
            if spans and spans[-1][0] == c.group and c.group is not None:
                spans[-1] = (c.group, spans[-1][1] + 1)
            else:
                spans.append((c.group, 1))
        cells, rules, start = [], [], 1
        for group, width in spans:
            if group is None:
                cells += [""] * width
            else:
                cells.append(f"\\multicolumn{{{width}}}{{c}}{{{latex_escape(group)}}}")
                rules.append(f"\\cmidrule(lr){{{start}-{start + width - 1}}}")
            start += width
        lines += [" & ".join(cells) + r" \\", "".join(rules)]
    lines.append(" & ".join(latex_escape(c.header) for c in table.columns) + r" \\")
    lines.append(r"\midrule")
    for row in table.rows:
        cells = []
        for column in table.columns:
            text, bold = _cell_parts(table, column, row.get(column.key))
            cells.append(f"\\textbf{{{latex_escape(text)}}}" if bold else latex_escape(text))
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def render_table(table: Table) -> dict[str, str]:
    """All four renderings keyed by file extension (md, csv, json, tex)."""
    import json

    return {"md": to_markdown(table), "csv": to_csv(table),
            "json": json.dumps(to_json(table), indent=2, ensure_ascii=False) + "\n",
            "tex": to_latex(table)}


def write_table(table: Table, out_dir: str | Path) -> list[Path]:
    """Write ``<name>.md/.csv/.json/.tex`` atomically into ``out_dir``; return their paths."""
    from semiseg.utils.io import atomic_write_text

    paths = []
    for ext, text in render_table(table).items():
        path = Path(out_dir) / f"{table.name}.{ext}"
        atomic_write_text(path, text)
        paths.append(path)
    return paths
