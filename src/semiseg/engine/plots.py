"""Figures for reports: per-class Dice bars over methods, and slice overlays of a case
(one slice, or a few axial and coronal slices per case as ``semiseg evaluate`` writes them).

Everything draws on a :class:`matplotlib.figure.Figure` with the Agg canvas directly instead of
``pyplot``: no GUI backend is ever chosen and no global state is changed, so the functions are
safe in servers, tests and notebooks alike. Figures are written atomically as PNG with a fixed
pixel size (figure inches x dpi; no ``bbox_inches="tight"``).

Colours are fixed per class set (:func:`class_colors`), so the same organ has the same colour in
every figure of a report.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from scipy import ndimage

from semiseg.data.classes import ClassSet
from semiseg.engine.logging import read_validations
from semiseg.engine.tables import MethodAggregate, setting_title
from semiseg.errors import DataError
from semiseg.utils.io import atomic_path

RGB = tuple[float, float, float]


# Kelly's (1965) colours of maximum contrast, without white and black: 20 hues that stay
# distinguishable side by side, unlike tab20 whose light shades repeat its dark ones.
_KELLY = ("#F3C300", "#875692", "#F38400", "#A1CAF1", "#BE0032", "#C2B280", "#848482",
          "#008856", "#E68FAC", "#0067A5", "#F99379", "#604E97", "#F6A600", "#B3446C",
          "#DCD300", "#882D17", "#8DB600", "#654522", "#E25822", "#2B3D26")


def class_colors(class_set: ClassSet) -> dict[int, RGB]:
    """Label id -> RGB, defined once per class set (Kelly's palette in label order)."""
    return dict(_class_colors(class_set))


@functools.cache
def _class_colors(class_set: ClassSet) -> tuple[tuple[int, RGB], ...]:
    from matplotlib import colormaps

    count = len(class_set.organs)
    colors = (list(_KELLY[:count]) if count <= len(_KELLY)
              else [colormaps["hsv"](i / count) for i in range(count)])
    return tuple((organ.label, to_rgb(color)) for organ, color in zip(class_set.organs, colors))


def save_figure(figure: Figure, out_path: str | Path, dpi: int) -> Path:
    """Render ``figure`` with Agg and write it atomically as PNG."""
    out_path = Path(out_path)
    FigureCanvasAgg(figure)
    with atomic_path(out_path, suffix=".png") as tmp:
        figure.savefig(tmp, format="png", dpi=dpi)
    return out_path


# ------------------------------------------------------------------------------ bar chart

def plot_per_class_dice(
    aggregates: Sequence[MethodAggregate],
    out_path: str | Path,
    title: str | None = None,
    size: tuple[float, float] | None = None,
    dpi: int = 100,
) -> Path:
    """Per-class Dice bars, methods side by side, error bars = std over seeds.

    Small organs are marked by a grey band behind their bars and a ``*`` after their name.
    All ``aggregates`` must be on one (dataset, labeled ratio).
    """
    if not aggregates:
        raise DataError("no methods to plot")
    settings = {a.setting for a in aggregates}
    if len(settings) != 1:
        raise DataError(f"a bar chart shows one dataset and ratio, got {sorted(settings)}")
    class_set = aggregates[0].class_set
    organs = class_set.organs
    count, methods = len(organs), len(aggregates)
    size = size or (max(6.0, 0.55 * count * max(1, methods) ** 0.5 + 2.0), 4.0)
    figure = Figure(figsize=size)
    ax = figure.add_subplot()
    x = np.arange(count, dtype=np.float64)
    width = 0.8 / methods
    for organ in organs:
        if not organ.large:
            ax.axvspan(organ.label - 1.5, organ.label - 0.5, color="0.92", zorder=0)
    from matplotlib import colormaps

    palette = colormaps["tab10"].colors
    for i, agg in enumerate(aggregates):
        means = np.array([s.mean for s in agg.class_dice])
        stds = np.array([0.0 if not math.isfinite(s.std) else s.std for s in agg.class_dice])
        ax.bar(x - 0.4 + width * (i + 0.5), np.nan_to_num(means), width, yerr=stds,
               capsize=2, color=palette[i % len(palette)], label=agg.method, zorder=2,
               error_kw={"elinewidth": 0.8})
    ax.set_xticks(x, [o.abbreviation + ("" if o.large else "*") for o in organs])
    ax.set_xlim(-0.6, count - 0.4)
    ax.set_ylim(0, 100)
    ax.set_ylabel("Dice (%)")
    ax.set_title(title or f"Per-class Dice, {setting_title(*aggregates[0].setting)} "
                 "(* small organ, error bar = std over seeds)", fontsize=9)
    ax.legend(fontsize=8, ncols=min(methods, 4), loc="upper right")
    ax.grid(axis="y", linewidth=0.4, zorder=1)
    figure.tight_layout()  # layout inside the fixed canvas; the pixel size does not change
    return save_figure(figure, out_path, dpi)


# ------------------------------------------------------------------------------ curves

ValidationCurve = tuple[np.ndarray, np.ndarray]  # (iterations, validation Dice in %)


def validation_curve(validations: dict[int, dict[str, float]]) -> ValidationCurve | None:
    """``(iterations, val/dice)`` in iteration order from
    :func:`semiseg.engine.logging.read_validations`; None when the run never validated."""
    if not validations:
        return None
    iterations = sorted(validations)
    return np.asarray(iterations), np.asarray([validations[it]["val/dice"] for it in iterations])


def read_validation_curve(log_csv: str | Path) -> ValidationCurve | None:
    """``(iterations, val/dice)`` of a run's ``log.csv``; None when it never validated."""
    return validation_curve(read_validations(log_csv))


def plot_validation_curves(curves: dict[str, list[ValidationCurve]], out_path: str | Path,
                           title: str = "Validation Dice during training", dpi: int = 100
                           ) -> Path:
    """One line per method: the mean over its seeds of the validation Dice at each validated
    iteration (only iterations every seed reached), with a band of ±1 std; each seed as a
    thin line, so that a slow or collapsed seed is visible."""
    if not curves:
        raise DataError("no validation curves to plot")
    from matplotlib import colormaps

    palette = colormaps["tab10"].colors
    figure = Figure(figsize=(6.5, 4.0))
    ax = figure.add_subplot()
    for i, (method, runs) in enumerate(curves.items()):
        color = palette[i % len(palette)]
        for iterations, dice in runs:
            ax.plot(iterations, dice, color=color, linewidth=0.6, alpha=0.35)
        common = sorted(set.intersection(*(set(it.tolist()) for it, _ in runs)))
        if not common:
            continue
        stacked = np.stack([[dict(zip(it.tolist(), d.tolist(), strict=True))[k] for k in common]
                            for it, d in runs])
        mean, std = stacked.mean(axis=0), stacked.std(axis=0)
        ax.plot(common, mean, color=color, linewidth=1.8, label=f"{method} (n={len(runs)})")
        ax.fill_between(common, mean - std, mean + std, color=color, alpha=0.15, linewidth=0)
    ax.set_xlabel("iteration")
    ax.set_ylabel("validation Dice (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title, fontsize=9)
    ax.grid(linewidth=0.4)
    ax.legend(fontsize=8)
    figure.tight_layout()
    return save_figure(figure, out_path, dpi)


# ------------------------------------------------------------------------------ overlays

def choose_slice(labels: np.ndarray, axis: int = 2) -> int:
    """Index of the slice along ``axis`` holding the most distinct foreground classes.

    Ties go to the slice with more foreground voxels, then to the lowest index.
    """
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise DataError(f"label volume must be 3-D, got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        labels = labels.astype(np.int64)
    moved = np.moveaxis(labels, axis, -1)
    classes = np.zeros(moved.shape[-1], dtype=np.int64)
    # One pass finds each class's box; the per-class test then runs inside that box only.
    for label, box in enumerate(ndimage.find_objects(np.clip(moved, 0, None)), start=1):
        if box is not None:
            classes[box[-1]] += np.any(moved[box] == label, axis=(0, 1))
    foreground = np.count_nonzero(moved, axis=(0, 1))
    # lexsort: last key is primary; negate to get "most" first, index breaks remaining ties.
    order = np.lexsort((np.arange(classes.size), -foreground, -classes))
    return int(order[0])


def _slice(volume: np.ndarray, index: int, axis: int) -> np.ndarray:
    # Transposed so that the first array axis (X) runs along the columns and the second (Y)
    # down the rows: with origin="upper" an axial slice of an LPS-ordered array (the phantom,
    # DICOM) is shown radiologically, anterior at the top, the patient's right on the left.
    return np.take(volume, index, axis=axis).T


def _label_rgba(labels2d: np.ndarray, class_set: ClassSet, alpha: float) -> np.ndarray:
    lut = np.zeros((len(class_set.organs) + 2, 4))
    for label, rgb in class_colors(class_set).items():
        lut[label] = (*rgb, alpha)
    # Ids outside the class set map to the last, transparent, entry.
    index = np.where((labels2d >= 0) & (labels2d <= len(class_set.organs)), labels2d, -1)
    return lut[index]


def _window(plane: np.ndarray) -> tuple[float, float]:
    """Grey levels of a slice: its 0.5th..99.5th percentiles."""
    low, high = np.percentile(plane, [0.5, 99.5]) if plane.size else (0.0, 1.0)
    return float(low), float(high if high > low else low + 1)


def _draw_panel(ax: Any, plane: np.ndarray, labels2d: np.ndarray, class_set: ClassSet,
                alpha: float, present: set[int], aspect: float = 1.0) -> None:
    """One slice in grey with the classes of ``labels2d`` filled and outlined; adds the
    classes drawn to ``present`` (for the legend)."""
    colors = class_colors(class_set)
    low, high = _window(plane)
    ax.imshow(plane, cmap="gray", vmin=low, vmax=high, origin="upper",
              interpolation="nearest", aspect=aspect)
    ax.imshow(_label_rgba(labels2d, class_set, alpha), origin="upper", interpolation="nearest",
              aspect=aspect)
    for label in np.unique(labels2d):
        if label in colors:
            present.add(int(label))
            ax.contour(labels2d == label, levels=[0.5], colors=[colors[label]], linewidths=0.8)
    ax.set_axis_off()


def _legend(figure: Figure, class_set: ClassSet, present: set[int]) -> None:
    colors = class_colors(class_set)
    handles = [Patch(color=colors[o.label], label=o.abbreviation)
               for o in class_set.organs if o.label in present]
    if handles:
        figure.legend(handles=handles, loc="lower center", ncols=min(len(handles), 8),
                      fontsize=7, frameon=False)


def _check_volumes(image: np.ndarray, ref: np.ndarray, pred: np.ndarray) -> None:
    if not image.shape == ref.shape == pred.shape or image.ndim != 3:
        raise DataError(f"overlay needs three 3-D volumes of one shape, got image {image.shape}, "
                        f"label {ref.shape}, prediction {pred.shape}")


def plot_overlay(
    image: np.ndarray,
    ref: np.ndarray,
    pred: np.ndarray,
    class_set: ClassSet,
    out_path: str | Path,
    slice_index: int | None = None,
    axis: int = 2,
    title: str | None = None,
    panel_size: float = 4.0,
    dpi: int = 100,
    alpha: float = 0.4,
) -> Path:
    """Ground truth (left) and prediction (right) over one axial slice of ``image``.

    The slice is ``slice_index``, or :func:`choose_slice` of the ground truth. Each class is
    filled with its :func:`class_colors` colour and outlined; the legend lists the classes
    present in either panel by abbreviation. Image is ``2*panel_size x panel_size`` inches.
    """
    image, ref, pred = np.asarray(image), np.asarray(ref), np.asarray(pred)
    _check_volumes(image, ref, pred)
    index = choose_slice(ref, axis) if slice_index is None else int(slice_index)
    if not 0 <= index < image.shape[axis]:
        raise DataError(f"slice {index} outside 0..{image.shape[axis] - 1} along axis {axis}")
    plane = _slice(image, index, axis).astype(np.float64)
    figure = Figure(figsize=(2 * panel_size, panel_size))
    figure.subplots_adjust(left=0.01, right=0.99, top=0.86, bottom=0.12, wspace=0.02)
    present: set[int] = set()
    for column, (name, labels) in enumerate((("Ground truth", ref), ("Prediction", pred))):
        ax = figure.add_subplot(1, 2, column + 1)
        _draw_panel(ax, plane, _slice(labels, index, axis).astype(np.int64), class_set, alpha,
                    present)
        ax.set_title(name, fontsize=9)
    _legend(figure, class_set, present)
    figure.suptitle(title or f"slice {index} (axis {axis})", fontsize=9)
    return save_figure(figure, out_path, dpi)


def overlay_slices(labels: np.ndarray, axis: int, count: int) -> list[int]:
    """``count`` slice indices along ``axis``, evenly inside the labelled extent (the whole
    volume when nothing is labelled), e.g. at 1/4, 1/2 and 3/4 of it for three."""
    labels = np.asarray(labels)
    moved = np.moveaxis(labels != 0, axis, -1)
    hits = np.flatnonzero(moved.any(axis=(0, 1)))
    low, high = (int(hits[0]), int(hits[-1])) if hits.size else (0, labels.shape[axis] - 1)
    spots = [round(low + (high - low) * (k + 1) / (count + 1)) for k in range(count)]
    return list(dict.fromkeys(spots))


# Views of a case overlay: (name, array axis cut, slices); coronal cuts the second axis (Y).
CASE_VIEWS = (("axial", 2, 3), ("coronal", 1, 2))


def plot_case_overlay(
    image: np.ndarray,
    ref: np.ndarray,
    pred: np.ndarray,
    class_set: ClassSet,
    out_path: str | Path,
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
    title: str | None = None,
    panel_size: float = 3.0,
    dpi: int = 80,
    alpha: float = 0.4,
) -> Path:
    """A few axial and coronal slices of one case (:data:`CASE_VIEWS`, placed by
    :func:`overlay_slices` in the ground truth), ground truth left and prediction right on
    each row; voxels are drawn to scale with ``spacing`` (X, Y, Z in mm)."""
    image, ref, pred = np.asarray(image), np.asarray(ref), np.asarray(pred)
    _check_volumes(image, ref, pred)
    rows = [(name, axis, index) for name, axis, count in CASE_VIEWS
            for index in overlay_slices(ref, axis, count)]
    height = panel_size * len(rows) + 1.1
    figure = Figure(figsize=(2 * panel_size, height))
    # Inches kept free: 0.6 on top for the title, 0.5 at the bottom for the legend.
    figure.subplots_adjust(left=0.01, right=0.99, top=1 - 0.6 / height, bottom=0.5 / height,
                           wspace=0.02, hspace=0.15)
    present: set[int] = set()
    for row, (name, axis, index) in enumerate(rows):
        plane = _slice(image, index, axis).astype(np.float64)
        # Rows of a slice run along its second remaining axis: Y for axial, Z for coronal.
        rows_axis = 1 if axis == 2 else 2
        aspect = spacing[rows_axis] / spacing[0]
        flip = axis != 2  # coronal: the head end (high Z) at the top
        for column, labels in enumerate((ref, pred)):
            labels2d = _slice(labels, index, axis).astype(np.int64)
            ax = figure.add_subplot(len(rows), 2, 2 * row + column + 1)
            _draw_panel(ax, plane[::-1] if flip else plane,
                        labels2d[::-1] if flip else labels2d, class_set, alpha, present, aspect)
            ax.set_title(f"{'Ground truth' if column == 0 else 'Prediction'}, {name} "
                         f"{'zyx'[2 - axis]}={index}", fontsize=8)
    _legend(figure, class_set, present)
    figure.suptitle(title or "ground truth | prediction", fontsize=9, y=1 - 0.15 / height)
    return save_figure(figure, out_path, dpi)
