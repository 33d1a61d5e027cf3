"""Deterministic training batches addressed by iteration number.

``TrainingBatches[i]`` is the batch of training iteration ``i``. It depends only on
(``seed``, ``i``) and the case lists, never on what was drawn before, so a resumed run sees exactly
the batches an uninterrupted run would have seen, and DataLoader workers need no seeding.

Case order (the official ``TwoStreamBatchSampler`` idea, made position-addressable): the labelled
and the unlabelled cases are two independent endless streams. Each stream is a concatenation of
passes; pass ``k`` is a fresh permutation of the stream's cases drawn from
``np.random.default_rng((seed, stream, k))``. Iteration ``i`` takes positions
``i*m .. i*m+m-1`` of the labelled stream (m = labelled rows per batch) and likewise of the
unlabelled stream, so over one pass every labelled case appears exactly once.

Differences from the official samplers, on purpose: GALoss/TAK oversample labelled cases through
an index list of length 2U (U = number of unlabelled cases) reshuffled each epoch, and DHC pairs
two independently shuffled loaders; all three draw each labelled case with frequency 1/L in the
long run, as this does, but their epoch boundaries depend on U. Batch ``i`` here does not.

Cropping follows the official ``RandomCrop`` (GALoss ``dataloaders/dataset.py``, MagicNet, DHC
``transforms.py``; notes: galoss.md 6.1, dhc_genericssl.md 9): if any side of the volume is <=
the patch side, every side is padded on both ends by ``max((patch - size) // 2 + 3, 0)`` voxels
of value 0 (image and label); then each start is drawn uniformly from ``0 .. size - patch - 1``
(NumPy's exclusive upper bound: the last valid offset is never drawn). No foreground bias and no
other augmentation (TAK: "no additional data augmentation beyond random cropping").

Data-parallel training (:meth:`TrainingBatches.shard`): with W processes of ``b`` rows each
(``l`` labelled), the global batch of iteration ``i`` is the batch a single process with
``W*b`` rows (``W*l`` labelled) would draw, and rank ``r`` takes its labelled rows
``r*l .. r*l+l-1`` and unlabelled rows ``r*(b-l) ..`` (stream positions and crop generators
are those of the global rows). Ranks therefore draw different crops, and the union of their
batches is exactly the single-process global batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from semiseg.data.store import CaseStore
from semiseg.errors import ConfigError, DataError

LABELED_STREAM = 0
UNLABELED_STREAM = 1
CROP_STREAM = 2

Triple = tuple[int, int, int]


def crop_padding(shape: Sequence[int], patch: Sequence[int]) -> list[int]:
    """Per-axis padding (each side) of the official crop: none unless some side is <= the
    patch; then ``max((patch - size) // 2 + 3, 0)`` on every axis (floor division)."""
    if all(s > p for s, p in zip(shape, patch)):
        return [0] * len(shape)
    return [max((p - s) // 2 + 3, 0) for s, p in zip(shape, patch)]


def random_crop(
    image: np.ndarray,
    label: np.ndarray | None,
    patch: Sequence[int],
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray | None, tuple[int, ...]]:
    """The official random crop; returns (image patch, label patch or None, start offsets in
    padded coordinates)."""
    pads = crop_padding(image.shape, patch)
    if any(pads):
        widths = [(p, p) for p in pads]
        image = np.pad(image, widths, mode="constant", constant_values=0)
        if label is not None:
            label = np.pad(label, widths, mode="constant", constant_values=0)
    # After the padding rule every side exceeds the patch by >= 1, so the range is never empty.
    starts = tuple(int(rng.integers(0, s - p)) for s, p in zip(image.shape, patch))
    box = tuple(slice(st, st + p) for st, p in zip(starts, patch))
    image_patch = np.ascontiguousarray(image[box], dtype=np.float32)
    label_patch = np.ascontiguousarray(label[box]) if label is not None else None
    return image_patch, label_patch, starts


def stream_case(ids: Sequence[str], seed: int, stream: int, position: int) -> str:
    """Case at ``position`` of an endless stream of per-pass permutations of ``ids``."""
    n = len(ids)
    permutation = np.random.default_rng((seed, stream, position // n)).permutation(n)
    return ids[int(permutation[position % n])]


class TrainingBatches(Dataset):
    """Iteration-indexed training batches (a map-style torch ``Dataset``).

    ``batches[i]`` is ``dict(image=float32 [B, 1, X, Y, Z], label=int64 [L, X, Y, Z],
    num_labeled=L, case_ids=[...], iteration=i)``; the first L rows of ``image`` are the labelled
    cases. L = ``labeled_batch_size``, or ``batch_size`` when ``unlabeled_ids`` is empty
    (supervised training). ``len()`` is ``length`` (default: effectively unbounded).
    """

    def __init__(
        self,
        store: CaseStore,
        labeled_ids: Sequence[str],
        unlabeled_ids: Sequence[str],
        patch_size: Sequence[int],
        batch_size: int,
        labeled_batch_size: int,
        seed: int,
        length: int = 2**31 - 1,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.store = store
        self.labeled_ids = list(labeled_ids)
        self.unlabeled_ids = list(unlabeled_ids)
        self.patch_size: Triple = tuple(int(p) for p in patch_size)  # type: ignore[assignment]
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.length = int(length)
        self.num_labeled = int(labeled_batch_size) if self.unlabeled_ids else self.batch_size
        self.rank = int(rank)
        self.world_size = int(world_size)
        self._check(labeled_batch_size)

    def _check(self, labeled_batch_size: int) -> None:
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ConfigError(f"patch_size must be 3 positive sizes, got {self.patch_size}")
        if not 1 <= labeled_batch_size <= self.batch_size:
            raise ConfigError(
                f"labeled_batch_size must be in 1..batch_size ({self.batch_size}), "
                f"got {labeled_batch_size}"
            )
        if self.seed < 0:
            raise ConfigError(f"seed must be >= 0, got {self.seed}")
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ConfigError(f"rank {self.rank} is not in 0..world_size-1 "
                              f"(world_size {self.world_size})")
        if not self.labeled_ids:
            raise DataError("no labelled training cases")
        for case in [*self.labeled_ids, *self.unlabeled_ids]:
            if case not in self.store:
                raise DataError(f"{self.store.root}: training case {case!r} not in the store")
        overlap = sorted(set(self.labeled_ids) & set(self.unlabeled_ids))
        if overlap:
            raise DataError(f"cases both labelled and unlabelled: {', '.join(overlap)}")
        for case in self.labeled_ids:
            if not self.store.has_label(case):
                raise DataError(f"{self.store.root}: labelled case {case!r} has no label")

    def __len__(self) -> int:
        return self.length

    @property
    def num_unlabeled(self) -> int:
        """Unlabelled rows per batch."""
        return self.batch_size - self.num_labeled if self.unlabeled_ids else 0

    def shard(self, rank: int, world_size: int) -> TrainingBatches:
        """The rows of process ``rank`` of ``world_size`` data-parallel processes, each with
        this object's batch sizes (see the module docstring); ``shard(0, 1)`` is ``self``'s
        batches."""
        return TrainingBatches(self.store, self.labeled_ids, self.unlabeled_ids,
                               self.patch_size, self.batch_size, self.num_labeled, self.seed,
                               self.length, rank=rank, world_size=world_size)

    def case_ids(self, iteration: int) -> tuple[list[str], list[str]]:
        """(labelled ids, unlabelled ids) of batch ``iteration``, without loading anything."""
        # Stream positions of the global batch (W processes x rows), this rank's slice of it.
        global_labeled = self.num_labeled * self.world_size
        global_unlabeled = self.num_unlabeled * self.world_size
        labeled = [
            stream_case(
                self.labeled_ids, self.seed, LABELED_STREAM,
                iteration * global_labeled + self.rank * self.num_labeled + row,
            )
            for row in range(self.num_labeled)
        ]
        unlabeled = [
            stream_case(
                self.unlabeled_ids,
                self.seed,
                UNLABELED_STREAM,
                iteration * global_unlabeled + self.rank * self.num_unlabeled + row,
            )
            for row in range(self.num_unlabeled)
        ]
        return labeled, unlabeled

    def global_row(self, row: int) -> int:
        """Row of the global batch (labelled rows of all ranks first) that local ``row`` is."""
        if row < self.num_labeled:
            return self.rank * self.num_labeled + row
        return (self.world_size * self.num_labeled + self.rank * self.num_unlabeled
                + row - self.num_labeled)

    def crop_rng(self, iteration: int, row: int) -> np.random.Generator:
        """Crop generator of local ``row`` (seeded by its global row, see :meth:`shard`)."""
        return np.random.default_rng((self.seed, CROP_STREAM, iteration, self.global_row(row)))

    def __getitem__(self, iteration: int) -> dict[str, object]:
        iteration = int(iteration)
        if iteration < 0:
            raise IndexError(f"iteration must be >= 0, got {iteration}")
        labeled, unlabeled = self.case_ids(iteration)
        images, labels = [], []
        for row, case in enumerate(labeled + unlabeled):
            is_labeled = row < len(labeled)
            label = self.store.label(case) if is_labeled else None
            image_patch, label_patch, _ = random_crop(
                self.store.image(case), label, self.patch_size, self.crop_rng(iteration, row)
            )
            images.append(image_patch)
            if label_patch is not None:
                labels.append(label_patch)
        return {
            "image": torch.from_numpy(np.stack(images)[:, None]),
            "label": torch.from_numpy(np.stack(labels).astype(np.int64)),
            "num_labeled": len(labeled),
            "case_ids": labeled + unlabeled,
            "iteration": iteration,
        }
