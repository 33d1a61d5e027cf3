"""Epoch bookkeeping of the ``xmed-lab`` scripts (DHC's ``train_dhc.py``, ``train_cld.py``,
``train_simis.py``, ``train_uamt.py`` and GenericSSL's ``train_diffusion.py``), shared by
:mod:`~semiseg.methods.dhc`, :mod:`~semiseg.methods.cld`, :mod:`~semiseg.methods.simis`,
:mod:`~semiseg.methods.uamt` and :mod:`~semiseg.methods.generic_ssl`.

The official loop zips a labeled and an unlabeled loader of batch 2, so one epoch is one pass
over the U unlabeled cases, ``ceil(U / 2)`` iterations (GenericSSL's loader drops the last
incomplete batch: ``floor(U / 2)``, ``round_up=False``), and the loop runs epochs ``0..E``
(``max_epoch`` E, i.e. E + 1 epochs). semiseg's trainer counts an epoch as ``2U / 2 = U``
iterations (:func:`semiseg.engine.setup.iterations_per_epoch`), hence the halving below; a
config can also pin the official count (``epoch_iterations``).

The consistency weight is recomputed *after* each epoch from that epoch's index (``cps_w =
get_current_consistency_weight(epoch_num)`` at the end of the epoch loop, starting from
``get_current_consistency_weight(0)``), so epochs 0 and 1 both use λ(0) and epoch k uses
λ(k - 1): ``rampup_lag``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from semiseg.losses.schedule import sigmoid_rampup
from semiseg.methods.base import StepInfo


def official_epoch_iterations(step: StepInfo, epoch_iterations: int = 0,
                              round_up: bool = True) -> int:
    """Iterations of one official epoch: ``epoch_iterations`` if set, else ``ceil(U / 2)``
    (``floor`` without ``round_up``) derived from the trainer's epoch (U iterations for the
    2 + 2 batch)."""
    if epoch_iterations > 0:
        return epoch_iterations
    half = step.iterations_per_epoch / 2
    return max(1, math.ceil(half) if round_up else math.floor(half))


def official_epoch(step: StepInfo, epoch_iterations: int = 0, round_up: bool = True) -> int:
    """The official ``epoch_num`` of iteration ``step.iteration`` (0-based)."""
    return step.iteration // official_epoch_iterations(step, epoch_iterations, round_up)


def official_max_epoch(step: StepInfo, epoch_iterations: int = 0, round_up: bool = True) -> int:
    """The official ``max_epoch`` E of a run of ``step.max_iterations`` (it holds E + 1
    epochs, so E = max_iterations / epoch_iterations - 1; at least 1)."""
    per_epoch = official_epoch_iterations(step, epoch_iterations, round_up)
    return max(1, round(step.max_iterations / per_epoch) - 1)


def consistency_weight(step: StepInfo, maximum: float, epoch_iterations: int = 0,
                       rampup_epochs: float = 0.0, rampup_lag: bool = True,
                       round_up: bool = True) -> float:
    """``maximum * sigmoid_rampup(e, L)`` with e the official epoch (minus one with
    ``rampup_lag``, floored at 0) and L = ``rampup_epochs`` or, if 0, ``max_epoch`` (the
    official ``-cr None``)."""
    epoch = official_epoch(step, epoch_iterations, round_up)
    if rampup_lag:
        epoch = max(epoch - 1, 0)
    length = rampup_epochs or official_max_epoch(step, epoch_iterations, round_up)
    return maximum * sigmoid_rampup(epoch, length)


def check_class_counts(counts: Sequence[float] | None, key: str) -> None:
    """A hand-given class histogram must be non-negative with a positive entry
    (``ValueError``, reported by the config loader as a ConfigError naming ``key``)."""
    if counts is not None and (any(c < 0 for c in counts) or not any(c > 0 for c in counts)):
        raise ValueError(f"{key} must be non-negative with a positive entry, got {list(counts)}")
