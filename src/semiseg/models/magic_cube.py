"""Magic-cube operations of MagicNet (Chen et al., "MagicNet: Semi-Supervised Multi-Organ
Segmentation via Magic-Cube Partition and Recovery", CVPR 2023).

A crop ``[B, C, X, Y, Z]`` is treated as a magic cube: a grid of ``nx x ny x nz`` small cubes of
``s^3`` voxels (``s`` = cube size; 3 x 3 x 3 cubes of 32^3 in a 96^3 crop in the paper).

Conventions used by every function here:

* **Cube order.** :func:`partition_cubes` returns cubes in C order over the grid index
  ``(a, b, c)`` (X index outer, Z index inner): cube ``(a, b, c)`` is entry
  ``p = (a * ny + b) * nz + c``. This is the order in which the official code enumerates cubes.
* **Location labels.** Cube ``(a, b, c)`` has location class ``a + nx * b + nx * ny * c``, the
  official labelling (so the location head of a converted official checkpoint keeps its
  meaning); see :func:`cube_location_labels`.
* **Cross-image mixing.** For every cube position independently, a random permutation of the
  batch decides which image's cube lands in each output image; cubes never move spatially.
  :func:`mix_volume` and :func:`unmix_volume` are exact inverses.
* **Recovery.** :func:`recover_cubes` is the exact inverse of :func:`partition_cubes`. The
  official within-image recovery (``unmix_tensor``) returns the cube grid transposed along X and
  Z; it is available as ``official_transposed_recovery=True`` (see :func:`recover_cubes`).

All functions are pure tensor code: no loops over cubes, no state. Random draws take an optional
``torch.Generator`` and are made on the CPU, so the same seed gives the same partitions on CPU
and GPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from semiseg.errors import ConfigError

Grid = tuple[int, int, int]

# Four stride-2 down-samplings in the VNet encoder: a cube must be a multiple of 16 voxels.
ENCODER_STRIDE = 16


def _triple(value: int | Sequence[int], name: str) -> Grid:
    if isinstance(value, int):
        return (value, value, value)
    values = tuple(int(v) for v in value)
    if len(values) != 3:
        raise ConfigError(f"{name}: expected one integer or three, got {value!r}")
    return values  # type: ignore[return-value]


def cube_grid(patch_size: int | Sequence[int], cube_size: int) -> Grid:
    """Number of cubes along X, Y, Z for a crop of ``patch_size`` split into ``cube_size``^3.

    Raises :class:`ConfigError` unless every side is a positive multiple of ``cube_size``.
    """
    sides = _triple(patch_size, "patch_size")
    if cube_size <= 0:
        raise ConfigError(f"cube_size: must be positive, got {cube_size}")
    if any(side <= 0 or side % cube_size for side in sides):
        raise ConfigError(
            f"cube_size: patch size {sides} is not a multiple of cube_size {cube_size} on every "
            "axis (the magic cube needs whole cubes)"
        )
    return (sides[0] // cube_size, sides[1] // cube_size, sides[2] // cube_size)


def _grid_of(volume: Tensor, cube_size: int) -> Grid:
    if volume.dim() != 5:
        raise ValueError(f"expected a [B, C, X, Y, Z] tensor, got shape {tuple(volume.shape)}")
    return cube_grid(tuple(volume.shape[2:]), cube_size)


def partition_cubes(volume: Tensor, cube_size: int) -> Tensor:
    """Split ``[B, C, X, Y, Z]`` into ``[B, N, C, s, s, s]`` cubes (N = nx ny nz, module order)."""
    nx, ny, nz = _grid_of(volume, cube_size)
    b, c = volume.shape[:2]
    s = cube_size
    grid = volume.reshape(b, c, nx, s, ny, s, nz, s).permute(0, 2, 4, 6, 1, 3, 5, 7)
    return grid.reshape(b, nx * ny * nz, c, s, s, s)


def recover_cubes(cubes: Tensor, grid: Grid, official_transposed_recovery: bool = False) -> Tensor:
    """Reassemble ``[B, N, C, s, s, s]`` cubes (module order) into ``[B, C, nx s, ny s, nz s]``.

    ``official_transposed_recovery=False`` (default) is the exact inverse of
    :func:`partition_cubes`, the recovery the MagicNet paper describes ("recover the cubes to
    their original positions").

    ``official_transposed_recovery=True`` reproduces the official ``unmix_tensor`` of MagicNet,
    inherited by GALoss and TAK: it writes the cube whose *location label* is
    ``a + nx b + nx ny c`` to grid position ``(a, b, c)`` while the cubes arrive enumerated
    X-outer, so output position ``(a, b, c)`` receives the cube from ``(c, b, a)``: the cube grid
    is transposed between X and Z (cube contents are untouched; the 9 cubes with ``a == c`` of
    a 3^3 grid stay in place, 18 move). Parity matters because every within-image term of the
    official code goes through it: the labeled within-image Dice is computed on the transposed
    assembly, and the within-image pseudo logits blended into the teacher's are misplaced. Use
    it only to reproduce official numbers. Needs ``nx == nz``.
    """
    if cubes.dim() != 6:
        raise ValueError(f"expected [B, N, C, s, s, s] cubes, got shape {tuple(cubes.shape)}")
    nx, ny, nz = grid
    b, n, c, sx, sy, sz = cubes.shape
    if n != nx * ny * nz:
        raise ValueError(f"{n} cubes do not fill a {nx}x{ny}x{nz} grid")
    blocks = cubes.reshape(b, nx, ny, nz, c, sx, sy, sz)
    if official_transposed_recovery:
        if nx != nz:
            raise ConfigError(
                "official_transposed_recovery needs as many cubes along X as along Z "
                f"(grid {grid})"
            )
        blocks = blocks.transpose(1, 3)
    return blocks.permute(0, 4, 1, 5, 2, 6, 3, 7).reshape(b, c, nx * sx, ny * sy, nz * sz)


def cube_location_labels(grid: Grid, device: torch.device | str | None = None) -> Tensor:
    """Location class of every cube in module order: ``a + nx b + nx ny c`` for cube (a, b, c).

    For the paper's 3^3 grid this is ``[0, 9, 18, 3, 12, 21, 6, 15, 24, 1, ...]``: the official
    labelling, kept so that a converted official location head predicts the same classes.
    """
    nx, ny, nz = grid
    a, b, c = torch.meshgrid(torch.arange(nx), torch.arange(ny), torch.arange(nz), indexing="ij")
    return (a + nx * b + nx * ny * c).reshape(-1).to(device)


def random_batch_permutation(batch_size: int, grid: Grid,
                             generator: torch.Generator | None = None) -> Tensor:
    """``[B, nx, ny, nz]`` int64: for every cube position an independent permutation of 0..B-1.

    Drawn as the argsort of uniform noise over the batch axis (on the CPU), as the official
    cross-image partition does.
    """
    noise = torch.rand((batch_size, *grid), generator=generator)
    return torch.argsort(noise, dim=0)


def invert_batch_permutation(permutation: Tensor) -> Tensor:
    """The inverse of a per-position batch permutation (argsort over the batch axis)."""
    return torch.argsort(permutation, dim=0)


def _gather_across_batch(volume: Tensor, source: Tensor, cube_size: int) -> Tensor:
    """``out[b]`` at cube position q = ``volume[source[b, q]]`` at q (one gather, no copies of the
    index: it is broadcast over channels and voxels)."""
    nx, ny, nz = _grid_of(volume, cube_size)
    b, c = volume.shape[:2]
    if tuple(source.shape) != (b, nx, ny, nz):
        raise ValueError(
            f"permutation of shape {tuple(source.shape)} does not match a batch of {b} on a "
            f"{nx}x{ny}x{nz} cube grid"
        )
    s = cube_size
    blocks = volume.reshape(b, c, nx, s, ny, s, nz, s)
    index = source.to(volume.device).reshape(b, 1, nx, 1, ny, 1, nz, 1).expand(blocks.shape)
    return torch.gather(blocks, 0, index).reshape(volume.shape)


def mix_volume(volume: Tensor, permutation: Tensor, cube_size: int) -> Tensor:
    """Cross-image partition: ``out[b]`` holds, at cube position q, image ``permutation[b, q]``'s
    cube q. Every source cube is used exactly once (a permutation per position)."""
    return _gather_across_batch(volume, permutation, cube_size)


def unmix_volume(volume: Tensor, permutation: Tensor, cube_size: int) -> Tensor:
    """Cross-image recovery: the exact inverse of :func:`mix_volume` with the same permutation.

    Works for any channel count (the official code recovers the 16-channel decoder feature).
    """
    return _gather_across_batch(volume, invert_batch_permutation(permutation), cube_size)


def random_cube_order(num_cubes: int, generator: torch.Generator | None = None) -> Tensor:
    """A random order of the ``num_cubes`` cubes of an image (the within-image shuffle)."""
    return torch.randperm(num_cubes, generator=generator)


def shuffle_cubes(cubes: Tensor, order: Tensor) -> Tensor:
    """Within-image shuffle: ``out[:, i] = cubes[:, order[i]]`` for ``[B, N, ...]`` cubes.

    ``order`` is ``[N]`` (one order for every image, as the official code draws it) or
    ``[B, N]`` (one per image). The location label of ``out[:, i]`` is ``labels[order[i]]``.
    """
    order = order.to(cubes.device)
    if order.dim() == 1:
        return cubes[:, order]
    rows = torch.arange(cubes.size(0), device=cubes.device).unsqueeze(1)
    return cubes[rows, order]
