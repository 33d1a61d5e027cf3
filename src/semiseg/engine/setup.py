"""Turn a :class:`~semiseg.config.Config` into the pieces a run needs.

Kept apart from the trainer so that ``evaluate``, ``predict`` and the experiment runner build
data and methods exactly the way training does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from semiseg.catalog import build_method, is_semi_supervised
from semiseg.config import Config
from semiseg.data import layouts
from semiseg.data.arrays import load_array
from semiseg.data.classes import ClassSet, get_class_set
from semiseg.data.intensity_check import intensity_profile
from semiseg.data.phantom import generate_dataset, phantom_split
from semiseg.data.sampling import TrainingBatches
from semiseg.data.splits import Split, load_split, validate_split
from semiseg.data.store import CaseStore
from semiseg.errors import ConfigError
from semiseg.methods.base import Method, MethodContext


@dataclass
class RunData:
    """The opened dataset, its split, and the training batches of one run."""

    class_set: ClassSet
    store: CaseStore
    split: Split
    labeled_ids: list[str]
    unlabeled_ids: list[str]
    batches: TrainingBatches
    iterations_per_epoch: int


def batch_loader(batches: TrainingBatches, start: int, stop: int, num_workers: int = 0,
                 pin_memory: bool = False) -> DataLoader:
    """The DataLoader of the training loop: batches ``start .. stop-1`` in order (a resumed
    run starts where it stopped), loaded by ``num_workers`` processes."""
    return DataLoader(
        batches,
        sampler=range(int(start), int(stop)),
        batch_size=None,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=False,
        prefetch_factor=2 if num_workers > 0 else None,
        # Batches draw from (seed, iteration) only; a private generator keeps the DataLoader
        # from consuming the global RNG, which resume restores exactly.
        generator=torch.Generator(),
    )


def ensure_phantom(config: Config, show_progress: bool = True) -> Path:
    """Generate the built-in phantom under ``data.root``; cases already there are kept
    (generation is resumable and refuses a folder made with other phantom parameters)."""
    root = Path(config.data.root)
    phantom = config.data.phantom
    generate_dataset(root, num_cases=phantom.num_cases, shape=phantom.shape,
                     class_set=get_class_set(phantom.class_set), seed=phantom.seed,
                     noise_hu=phantom.noise_hu, variability=phantom.variability,
                     progress=show_progress)
    return root


def open_store(config: Config, show_progress: bool = True) -> tuple[ClassSet, CaseStore]:
    """Open (and for the phantom, first generate) the prepared data of ``config``.

    ``data.dataset`` is ``phantom``, ``synapse``, ``amos`` (the class set is the dataset's),
    or the name a prepared folder records (``semiseg prepare generic --name``), whose class
    set is the recorded one."""
    data = config.data
    named = data.dataset in ("synapse", "amos")
    if data.dataset == "phantom":
        ensure_phantom(config, show_progress)
        class_set: ClassSet | None = get_class_set(data.phantom.class_set)
    else:
        class_set = get_class_set(data.dataset) if named else None
    store = layouts.open_store(Path(data.root), layout=data.layout, class_set=class_set,
                               in_memory=data.in_memory,
                               intensity=None if data.intensity == "auto" else data.intensity)
    if not named and store.dataset != data.dataset:
        raise ConfigError(f"data.dataset: {data.dataset!r} is neither phantom, synapse nor "
                          f"amos, nor the dataset {store.dataset!r} that {data.root} holds")
    return store.class_set, store


def open_split(config: Config, store: CaseStore) -> Split:
    """The run's split, checked against ``store``; ``phantom`` is built for the store's size."""
    if config.data.split == "phantom":
        split = phantom_split(len(store), store.class_set.name)
    else:
        split = load_split(config.data.split)
    validate_split(split, store, config.data.labeled_ratio)
    return split


def prepare_run_data(config: Config, semi_supervised: bool | None = None,
                     show_progress: bool = True) -> RunData:
    """Open data and split, and build the iteration-indexed training batches."""
    class_set, store = open_store(config, show_progress)
    split = open_split(config, store)
    labeled = split.labeled_ids(config.data.labeled_ratio)
    unlabeled = split.unlabeled_ids(config.data.labeled_ratio)
    if semi_supervised is None:
        semi_supervised = is_semi_supervised(config.method.name)
    train = config.train
    if not semi_supervised:
        unlabeled = []
    labeled_bs = train.labeled_batch_size if unlabeled else train.batch_size
    batches = TrainingBatches(store, labeled, unlabeled, config.data.patch_size,
                              train.batch_size, labeled_bs, config.experiment.seed)
    return RunData(class_set, store, split, labeled, unlabeled, batches,
                   iterations_per_epoch(len(labeled), len(unlabeled), train.batch_size,
                                        labeled_bs))


def iterations_per_epoch(num_labeled: int, num_unlabeled: int, batch_size: int,
                         labeled_batch_size: int) -> int:
    """Iterations in one "epoch", as the official two-stream loader counts them.

    The official loaders index ``2U`` labeled and ``2U`` unlabeled slots (U unlabeled cases)
    and draw ``labeled_batch_size`` labeled slots per batch, so an epoch is
    ``2U / labeled_batch_size`` iterations (U for the usual 2 + 2 batch); epoch-based
    schedules (ramp-ups, TAK's contrastive start) count in these units. A supervised run
    counts one pass over its labeled cases.
    """
    if num_unlabeled > 0:
        return max(1, (2 * num_unlabeled) // max(1, labeled_batch_size))
    return max(1, num_labeled // max(1, batch_size))


def method_context(config: Config, class_set: ClassSet) -> MethodContext:
    return MethodContext(
        num_classes=class_set.num_classes,
        model_name=config.model.name,
        model_options=dict(config.model.options),
        patch_size=tuple(config.data.patch_size),
        class_names=tuple(["background", *class_set.names]),
    )


def build_method_for(config: Config, data: RunData | None = None,
                     class_set: ClassSet | None = None) -> Method:
    """Build the configured method for the run's class set."""
    class_set = class_set or (data.class_set if data is not None else None)
    if class_set is None:
        raise ValueError("build_method_for needs run data or a class set")
    method = build_method(config.method.name, method_context(config, class_set),
                          dict(config.method.options))
    if data is not None:
        method.observe_labeled_labels(data.store.label(case) for case in data.labeled_ids)
    return method


def training_data_record(data: RunData) -> dict[str, Any]:
    """What a checkpoint records about its training data, for ``semiseg predict``'s checks:
    the dataset (``phantom`` for the synthetic one), and the intensity profile of the training
    cases in HU (:mod:`semiseg.data.intensity_check`; only the semiseg layout stores HU)."""
    store = data.store
    profile = None
    if store.layout == "semiseg":
        profile = intensity_profile(load_array(store.entry(case).image, mmap=True)
                                    for case in data.split.train)
    return {"dataset": store.dataset, "layout": store.layout, "root": str(store.root),
            "intensity_profile": None if profile is None else profile.to_dict()}
