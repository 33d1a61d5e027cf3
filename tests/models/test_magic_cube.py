"""Magic-cube partition / recovery, location labels and cross-image mixing on known volumes."""

import pytest
import torch

from semiseg.errors import ConfigError
from semiseg.models.magic_cube import (
    cube_grid,
    cube_location_labels,
    invert_batch_permutation,
    mix_volume,
    partition_cubes,
    random_batch_permutation,
    recover_cubes,
    shuffle_cubes,
    unmix_volume,
)


def _cube_index_volume(grid: tuple[int, int, int], s: int) -> torch.Tensor:
    """[1, 1, ...] volume; each voxel holds its cube's module-order index (a ny + b) nz + c."""
    nx, ny, nz = grid
    a = torch.arange(nx * s).div(s, rounding_mode="floor").view(-1, 1, 1)
    b = torch.arange(ny * s).div(s, rounding_mode="floor").view(1, -1, 1)
    c = torch.arange(nz * s).div(s, rounding_mode="floor").view(1, 1, -1)
    return ((a * ny + b) * nz + c).float()[None, None]


def test_cube_grid_and_its_errors() -> None:
    assert cube_grid(96, 32) == (3, 3, 3)
    assert cube_grid((64, 96, 32), 32) == (2, 3, 1)
    with pytest.raises(ConfigError, match="not a multiple of cube_size 40"):
        cube_grid(96, 40)
    with pytest.raises(ConfigError, match="cube_size: must be positive"):
        cube_grid(96, 0)


def test_partition_enumerates_cubes_x_outer_z_inner() -> None:
    volume = _cube_index_volume((2, 3, 4), 2)
    cubes = partition_cubes(volume, 2)
    assert cubes.shape == (1, 24, 1, 2, 2, 2)
    # Entry p is the cube whose voxels all hold p.
    assert torch.equal(cubes[0, :, 0].amin((1, 2, 3)), torch.arange(24.0))
    assert torch.equal(cubes[0, :, 0].amax((1, 2, 3)), torch.arange(24.0))
    # Entry 1 is cube (0, 0, 1): voxels [0:2, 0:2, 2:4], contents in place.
    ramp = torch.arange(4 * 6 * 8.0).view(1, 1, 4, 6, 8)
    assert torch.equal(partition_cubes(ramp, 2)[0, 1, 0], ramp[0, 0, 0:2, 0:2, 2:4])


def test_partition_then_recover_is_the_identity() -> None:
    volume = torch.randn(2, 3, 8, 12, 16)
    cubes = partition_cubes(volume, 4)
    assert cubes.shape == (2, 2 * 3 * 4, 3, 4, 4, 4)
    assert torch.equal(recover_cubes(cubes, (2, 3, 4)), volume)


def test_location_labels_are_the_official_ones() -> None:
    # Verified by running the official get_loc_mask
    # (DeepMed-Lab-ECNU/MagicNet code/utils/cube_utils.py).
    official = [0, 9, 18, 3, 12, 21, 6, 15, 24, 1, 10, 19, 4, 13, 22, 7, 16, 25, 2, 11, 20,
                5, 14, 23, 8, 17, 26]
    assert cube_location_labels((3, 3, 3)).tolist() == official
    # Non-cubic grid: label a + nx b + nx ny c for cube (a, b, c) in module order.
    assert cube_location_labels((2, 3, 1)).tolist() == [0, 2, 4, 1, 3, 5]


def test_official_transposed_recovery_swaps_the_x_and_z_cube_index() -> None:
    s = 2
    volume = _cube_index_volume((3, 3, 3), s)
    cubes = partition_cubes(volume, s)
    paper = recover_cubes(cubes, (3, 3, 3))
    official = recover_cubes(cubes, (3, 3, 3), official_transposed_recovery=True)
    assert torch.equal(paper, volume)
    # Output cube (a, b, c) holds input cube (c, b, a): value 9c + 3b + a.
    got = official[0, 0, ::s, ::s, ::s]
    a, b, c = torch.meshgrid(torch.arange(3), torch.arange(3), torch.arange(3), indexing="ij")
    assert torch.equal(got, (9 * c + 3 * b + a).float())
    assert got[0, 0, 1] == 9.0  # output cube (0,0,1) holds input cube (1,0,0), as the notes say
    assert int((got != volume[0, 0, ::s, ::s, ::s]).sum()) == 18  # 9 cubes with a == c stay
    # Contents inside each cube are not transposed.
    ramp = torch.arange(6 * 6 * 6.0).view(1, 1, 6, 6, 6)
    moved = recover_cubes(partition_cubes(ramp, s), (3, 3, 3), official_transposed_recovery=True)
    assert torch.equal(moved[0, 0, 0:2, 0:2, 2:4], ramp[0, 0, 2:4, 0:2, 0:2])
    with pytest.raises(ConfigError, match="as many cubes along X as along Z"):
        recover_cubes(partition_cubes(torch.zeros(1, 1, 4, 2, 2), 2), (2, 1, 1), True)


def test_cross_image_mix_moves_cubes_across_the_batch_only() -> None:
    s, grid = 2, (2, 1, 2)
    positions = _cube_index_volume(grid, s)  # cube position q = 2a + c
    volume = torch.cat([positions + 100 * i for i in range(3)])  # image i -> 100 i + q
    perm = torch.tensor([[0, 2, 1, 1], [1, 0, 2, 0], [2, 1, 0, 2]]).view(3, 2, 1, 2)
    mixed = mix_volume(volume, perm, s)
    got = mixed[:, 0, ::s, ::s, ::s].reshape(3, 4)
    expected = 100 * perm.reshape(3, 4) + torch.arange(4)
    assert torch.equal(got, expected.float())
    assert torch.equal(unmix_volume(mixed, perm, s), volume)
    # The recovery also works on a feature map with more channels (the 16-channel embedding).
    features = torch.randn(3, 16, 4, 2, 4)
    assert torch.equal(unmix_volume(mix_volume(features, perm, s), perm, s), features)


def test_random_batch_permutation_is_a_permutation_per_position_and_inverts() -> None:
    gen = torch.Generator().manual_seed(0)
    perm = random_batch_permutation(4, (3, 3, 3), generator=gen)
    assert perm.shape == (4, 3, 3, 3)
    assert torch.equal(perm.sort(0).values, torch.arange(4).view(4, 1, 1, 1).expand(4, 3, 3, 3))
    inverse = invert_batch_permutation(perm)
    assert torch.equal(torch.gather(perm, 0, inverse), torch.arange(4).view(4, 1, 1, 1)
                       .expand(4, 3, 3, 3))
    volume = torch.randn(4, 1, 12, 12, 12)
    assert torch.equal(unmix_volume(mix_volume(volume, perm, 4), perm, 4), volume)
    # Independent positions: not every position uses the same permutation.
    assert len({tuple(perm[:, a, b, c].tolist()) for a in range(3) for b in range(3)
                for c in range(3)}) > 1


def test_shuffle_cubes_reorders_within_each_image() -> None:
    cubes = torch.arange(2 * 4.0).view(2, 4, 1, 1, 1, 1)
    order = torch.tensor([2, 0, 3, 1])
    assert shuffle_cubes(cubes, order)[:, :, 0, 0, 0, 0].tolist() == [[2, 0, 3, 1], [6, 4, 7, 5]]
    per_image = torch.tensor([[3, 2, 1, 0], [0, 1, 2, 3]])
    assert shuffle_cubes(cubes, per_image)[:, :, 0, 0, 0, 0].tolist() == [[3, 2, 1, 0],
                                                                          [4, 5, 6, 7]]
    labels = cube_location_labels((1, 2, 2))  # [0, 2, 1, 3]
    assert labels[order].tolist() == [1, 0, 3, 2]


def test_shuffled_cubes_keep_their_location_labels() -> None:
    grid, s = (3, 3, 3), 2
    cubes = partition_cubes(_cube_index_volume(grid, s), s)  # cube content = module index p
    order = torch.randperm(27, generator=torch.Generator().manual_seed(4))
    shuffled = shuffle_cubes(cubes, order)
    labels = cube_location_labels(grid)[order]
    p = shuffled[0, :, 0, 0, 0, 0].long()  # which cube each shuffled entry holds
    a, b, c = p // 9, (p // 3) % 3, p % 3
    assert torch.equal(labels, a + 3 * b + 9 * c)
