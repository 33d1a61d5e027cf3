"""The MagicNet VNet (``VNet_Magic`` of Chen et al., CVPR 2023; also GA-MagicNet's backbone).

The segmentation network is our :class:`~semiseg.models.vnet.VNet` with InstanceNorm3d
(``affine=False``, no running statistics: no normalisation parameters or buffers at all), plus
the cube-location head that classifies a cube's bottleneck feature into one of the
``(patch / cube)^3`` grid positions:

``Linear(16 F (cube / 16)^3 -> 4096) -> BatchNorm1d(4096) -> LeakyReLU(0.2) -> Linear(4096 -> n^3)``

With 16 filters, 32^3 cubes in 96^3 crops (2048 -> 4096 -> 27) and 14 classes it has exactly
17,954,985 parameters, as the official network (9,443,470 for the segmentation network,
8,511,515 for the head). The official head always sizes its input for 16 filters; here it
follows ``n_filters`` (identical at 16, and the only size that works otherwise).

Besides the VNet seam (``encode``, ``decode_features``, ``head``, ``decode``, ``forward`` ->
logits), it offers :meth:`MagicNet.forward_with_embedding` (logits and the last decoder feature,
which the cross-image recovery operates on) and :meth:`MagicNet.locate`.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from semiseg.errors import ConfigError
from semiseg.models.magic_cube import ENCODER_STRIDE, cube_grid
from semiseg.models.registry import register_model
from semiseg.models.vnet import VNet


class MagicNet(VNet):
    """VNet (instance norm) with a cube-location head."""

    def __init__(self, num_classes: int, in_channels: int = 1, n_filters: int = 16,
                 cube_size: int = 32, patch_size: int | Sequence[int] = 96,
                 normalization: str = "instancenorm", has_dropout: bool = False,
                 location_hidden: int = 4096) -> None:
        super().__init__(num_classes, in_channels, n_filters, normalization, has_dropout)
        self.grid = cube_grid(patch_size, cube_size)
        if cube_size % ENCODER_STRIDE:
            raise ConfigError(
                f"cube_size: {cube_size} is not a multiple of {ENCODER_STRIDE} (the encoder "
                "halves a cube four times)"
            )
        if normalization == "instancenorm" and cube_size < 2 * ENCODER_STRIDE:
            raise ConfigError(
                f"cube_size: {cube_size} leaves a 1-voxel bottleneck per cube, which instance "
                f"norm cannot normalise; use a multiple of {ENCODER_STRIDE} of at least "
                f"{2 * ENCODER_STRIDE}"
            )
        self.cube_size = cube_size
        self.num_locations = self.grid[0] * self.grid[1] * self.grid[2]
        in_features = self.bottleneck_channels * (cube_size // ENCODER_STRIDE) ** 3
        self.location_head = nn.Sequential(
            nn.Linear(in_features, location_hidden),
            nn.BatchNorm1d(location_hidden),
            nn.LeakyReLU(negative_slope=0.2, inplace=True),
            nn.Linear(location_hidden, self.num_locations),
        )

    def forward_with_embedding(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Logits and the last decoder feature (``n_filters`` channels, full resolution)."""
        embedding = self.decode_features(self.encode(x))
        return self.head(embedding), embedding

    def locate(self, bottleneck: Tensor) -> Tensor:
        """Location logits ``[M, n^3]`` of ``M`` cubes from their bottleneck features.

        ``bottleneck`` is ``[M, 16 F, s/16, s/16, s/16]`` (or already flattened ``[M, D]``). The
        head's BatchNorm1d normalises over the M cubes given in one call; MagicNet calls it
        with the cubes of one image.
        """
        return self.location_head(bottleneck.flatten(1))


@register_model("magicnet")
def magicnet(num_classes: int, in_channels: int = 1, n_filters: int = 16, cube_size: int = 32,
             patch_size: int | Sequence[int] = 96, normalization: str = "instancenorm",
             has_dropout: bool = False, location_hidden: int = 4096) -> MagicNet:
    """MagicNet's VNet_Magic (17,954,985 parameters for 14 classes, 16 filters, 32^3 cubes in
    96^3 crops). ``normalization`` other than instance norm is for experiments only."""
    return MagicNet(num_classes, in_channels, n_filters, cube_size, patch_size, normalization,
                    has_dropout, location_hidden)
