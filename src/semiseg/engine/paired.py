"""Paired comparison of methods against a baseline, seed by seed (``semiseg report --paired``).

Seed k of every row of a grid sees the same initialisation of its first network and the same
crops (the batches are a pure function of seed and iteration), so the difference between a
method and the baseline *at the same seed* removes the part of the seed-to-seed spread the two
share. For each method and each of mean / large / small Dice (and mean ASD) this module takes
the per-seed differences ``d_k = method_k - baseline_k`` over the seeds both have, their mean
and a two-sided 95 % Student t-interval over seeds:

    mean(d) ± t_{0.975, n-1} · sd(d) / sqrt(n)      (sd with n - 1 in the denominator)

The interval describes the training randomness of the protocol (seeds), with the test cases
fixed; it is undefined for fewer than two common seeds.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import stats

from semiseg.engine.results import EvaluationResult
from semiseg.engine.tables import Column, Table, setting_slug, setting_title
from semiseg.errors import DataError

METRICS = (("mean_dice", "All"), ("large_dice", "L."), ("small_dice", "S."),
           ("mean_asd", "ASD"))


def t_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high) of the two-sided Student t-interval of the mean of ``values``."""
    data = np.asarray(values, dtype=np.float64)
    if data.size == 0:
        return math.nan, math.nan, math.nan
    mean = float(data.mean())
    if data.size < 2:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf(0.5 + confidence / 2, data.size - 1)
                 * data.std(ddof=1) / math.sqrt(data.size))
    return mean, mean - half, mean + half


@dataclass(frozen=True)
class PairedDifference:
    """Per-seed differences of one metric (method minus baseline) and their t-interval."""

    metric: str
    seeds: tuple[int, ...]
    differences: tuple[float, ...]
    mean: float
    low: float
    high: float

    @property
    def resolved(self) -> bool:
        """Whether the 95 % interval excludes 0."""
        return math.isfinite(self.low) and (self.low > 0 or self.high < 0)


@dataclass(frozen=True)
class PairedComparison:
    dataset: str
    labeled_ratio: float
    method: str
    baseline: str
    unpaired_seeds: tuple[int, ...]  # seeds that only one of the two has (left out)
    differences: dict[str, PairedDifference]


def _by_seed(results: Sequence[EvaluationResult]) -> dict[tuple[str, float, str],
                                                           dict[int, EvaluationResult]]:
    groups: dict[tuple[str, float, str], dict[int, EvaluationResult]] = {}
    for result in results:
        run = result.run
        if run is None or run.seed is None:
            raise DataError(f"{result.source or 'a result'}: a paired comparison needs the "
                            "run's method, setting and seed (run section of metrics.json)")
        group = groups.setdefault((run.dataset, run.labeled_ratio, run.method), {})
        if run.seed in group:
            raise DataError(f"{result.source}: a second run of {run.method} with seed "
                            f"{run.seed} ({group[run.seed].source})")
        group[run.seed] = result
    return groups


def paired_comparisons(results: Sequence[EvaluationResult], baseline: str,
                       confidence: float = 0.95) -> list[PairedComparison]:
    """Every method against ``baseline`` in each (dataset, ratio) where the baseline ran."""
    groups = _by_seed(results)
    methods = list(dict.fromkeys(key[2] for key in groups))
    if baseline not in methods:
        raise DataError(f"--paired {baseline}: no such method among the runs (methods: "
                        f"{', '.join(methods)})")
    out = []
    for (dataset, ratio, method), runs in groups.items():
        base = groups.get((dataset, ratio, baseline))
        if method == baseline or base is None:
            continue
        common = sorted(set(runs) & set(base))
        unpaired = tuple(sorted(set(runs) ^ set(base)))
        differences = {}
        for metric, _ in METRICS:
            values = [getattr(runs[s].summary, metric) - getattr(base[s].summary, metric)
                      for s in common]
            mean, low, high = t_interval(values, confidence)
            differences[metric] = PairedDifference(metric, tuple(common), tuple(values), mean,
                                                   low, high)
        out.append(PairedComparison(dataset, ratio, method, baseline, unpaired, differences))
    return out


def _cell(diff: PairedDifference) -> str:
    if not diff.seeds:
        return "no common seed"
    if not math.isfinite(diff.low):
        return f"{diff.mean:+.2f} (one seed)"
    mark = " *" if diff.resolved else ""
    return f"{diff.mean:+.2f} [{diff.low:+.2f}, {diff.high:+.2f}]{mark}"


def paired_table(comparisons: Sequence[PairedComparison], dataset: str, ratio: float) -> Table:
    """Method | seeds | mean Δ [95 % CI] per metric | per-seed Δ of mean Dice."""
    chosen = [c for c in comparisons if (c.dataset, c.labeled_ratio) == (dataset, ratio)]
    if not chosen:
        raise DataError(f"no paired comparison on {setting_title(dataset, ratio)}")
    columns = [Column("method", "Method", kind="text"), Column("n", "Seeds", kind="text")]
    columns += [Column(metric, f"Δ {label} [95% CI]", kind="text") for metric, label in METRICS]
    columns.append(Column("per_seed", "Δ All per seed", kind="text"))
    rows = []
    for c in chosen:
        mean = c.differences["mean_dice"]
        row = {"method": c.method, "n": str(len(mean.seeds)),
               "per_seed": ", ".join(f"{s}: {d:+.2f}" for s, d in
                                     zip(mean.seeds, mean.differences))}
        row.update({metric: _cell(c.differences[metric]) for metric, _ in METRICS})
        rows.append(row)
    title = (f"Paired differences against {chosen[0].baseline} on {setting_title(dataset, ratio)}"
             ": Dice in points (ASD in its unit), mean over seeds with a 95% t-interval; "
             "* the interval excludes 0")
    return Table(f"paired_{setting_slug(dataset, ratio)}", title, tuple(columns), tuple(rows),
                 show_std=False)


def comparisons_to_json(comparisons: Sequence[PairedComparison]) -> str:
    def number(value: float) -> float | None:
        return value if math.isfinite(value) else None

    payload = [{
        "dataset": c.dataset, "labeled_ratio": c.labeled_ratio, "method": c.method,
        "baseline": c.baseline, "unpaired_seeds": list(c.unpaired_seeds),
        "differences": {m: {"seeds": list(d.seeds), "per_seed": list(d.differences),
                            "mean": number(d.mean), "ci95": [number(d.low), number(d.high)]}
                        for m, d in c.differences.items()},
    } for c in comparisons]
    return json.dumps(payload, indent=2)


def plot_paired(comparisons: Sequence[PairedComparison], out_path: str | Path) -> Path:
    """Per-seed differences (dots) with their mean and 95 % interval (bar), one panel per
    Dice metric, methods down the y axis; the zero line is "no difference"."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from semiseg.engine.plots import save_figure

    metrics = METRICS[:3]
    figure = Figure(figsize=(4 * len(metrics), 0.6 * len(comparisons) + 1.6))
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(metrics), sharey=True, squeeze=False)[0]
    for axis, (metric, label) in zip(axes, metrics):
        for row, c in enumerate(comparisons):
            d = c.differences[metric]
            axis.scatter(d.differences, [row] * len(d.differences), s=14, color="0.55",
                         zorder=2)
            if math.isfinite(d.low):
                axis.plot([d.low, d.high], [row, row], color="C0", lw=2.5, zorder=3)
            axis.scatter([d.mean], [row], marker="D", s=30, color="C3", zorder=4)
        axis.axvline(0.0, color="black", lw=0.8)
        axis.set_title(f"Δ Dice {label} (points)")
        axis.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(comparisons)))
    axes[0].set_yticklabels([f"{c.method} − {c.baseline}" for c in comparisons])
    axes[0].invert_yaxis()
    figure.suptitle("Paired by seed: dots = seeds, bar = 95% t-interval, diamond = mean")
    figure.tight_layout()
    return save_figure(figure, out_path, dpi=110)
