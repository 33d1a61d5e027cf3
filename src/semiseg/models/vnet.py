"""VNet as used by the papers' baselines (UA-MT / DHC / GALoss lineage).

Architecturally identical to the official network: four down-sampling stages with 1-2-3-3-3
3x3x3 convolutions (+ norm + ReLU) per stage, strided 2x2x2 convolutions to go down,
transposed 2x2x2 convolutions to go up, additive skip connections, a 1x1x1 output
convolution, and Dropout3d(0.5) on the bottleneck and on the last decoder feature when
``has_dropout`` is set. With 16 filters, one input channel and 14 classes it has exactly
9,449,070 parameters (batch norm).

Block names follow the official state dict (``block_one.conv.0.weight`` ...) under
``encoder.`` / ``decoder.`` prefixes; :func:`semiseg.models.convert.convert_official_state_dict`
maps official checkpoints onto it.

Seam for plug-ins (``docs/architecture.md``):

* :meth:`VNet.encode` returns the encoder features ``[x1, x2, x3, x4, x5]`` (fine to coarse;
  ``x5`` is the bottleneck whose voxels are SCDL's tokens).
* :meth:`VNet.decode_features` runs the decoder; an optional ``inject(stage, x)`` callback
  may modify the feature entering each decoder stage (stage 0 = the bottleneck, 1..4 after
  each up-sampling) and the last decoder feature before the head (stage :data:`HEAD_STAGE`
  = 5). Both dropout layers of ``has_dropout`` act *after* the callback (the bottleneck's at
  the start of the decoder, not at the end of the encoder), so a plug-in reads features before
  dropout; without a callback the computation is the official one. A plug-in that must act
  on *every* decoding of a network, whoever calls it (the host's forward, MagicNet's cube
  branches), attaches an injector module once with :meth:`VNet.attach_injector`; it becomes
  part of the network's state dict (SCDL does this).
* :meth:`VNet.head` maps the last decoder feature to logits (TAK replaces it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor, nn

from semiseg.models.registry import register_model

Inject = Callable[[int, Tensor], Tensor]
# The injection stage of the last decoder feature (the head's input), after stages 0..4.
HEAD_STAGE = 5


def norm_layers(kind: str, channels: int) -> list[nn.Module]:
    """The normalisation layer of ``kind`` for ``channels`` channels (none: no layer)."""
    if kind == "batchnorm":
        return [nn.BatchNorm3d(channels)]
    if kind == "groupnorm":
        return [nn.GroupNorm(num_groups=16, num_channels=channels)]
    if kind == "instancenorm":
        return [nn.InstanceNorm3d(channels)]
    if kind == "none":
        return []
    raise ValueError(f"unknown normalization {kind!r} (batchnorm|groupnorm|instancenorm|none)")


def _conv_norm_relu(conv: nn.Module, channels: int, normalization: str) -> list[nn.Module]:
    return [conv, *norm_layers(normalization, channels), nn.ReLU(inplace=True)]


class _Stage(nn.Module):
    """Layers applied in order, kept under the official module name ``conv`` (so state-dict
    keys match the official checkpoints: ``<block>.conv.<i>.weight``)."""

    def __init__(self, layers: list[nn.Module]) -> None:
        super().__init__()
        self.conv = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class ConvBlock(_Stage):
    """``n_stages`` x (3x3x3 conv, norm, ReLU); the first conv maps ``in_ch`` -> ``out_ch``."""

    def __init__(self, n_stages: int, in_ch: int, out_ch: int, normalization: str) -> None:
        layers: list[nn.Module] = []
        for i in range(n_stages):
            conv = nn.Conv3d(in_ch if i == 0 else out_ch, out_ch, 3, padding=1)
            layers += _conv_norm_relu(conv, out_ch, normalization)
        super().__init__(layers)


class DownsamplingConvBlock(_Stage):
    """Strided 2x2x2 convolution, norm, ReLU (halves every spatial size)."""

    def __init__(self, in_ch: int, out_ch: int, normalization: str, stride: int = 2) -> None:
        conv = nn.Conv3d(in_ch, out_ch, stride, padding=0, stride=stride)
        super().__init__(_conv_norm_relu(conv, out_ch, normalization))


class UpsamplingDeconvBlock(_Stage):
    """Transposed 2x2x2 convolution, norm, ReLU (doubles every spatial size)."""

    def __init__(self, in_ch: int, out_ch: int, normalization: str, stride: int = 2) -> None:
        conv = nn.ConvTranspose3d(in_ch, out_ch, stride, padding=0, stride=stride)
        super().__init__(_conv_norm_relu(conv, out_ch, normalization))


class VNetEncoder(nn.Module):
    """The five encoder stages; returns ``[x1, x2, x3, x4, x5]``."""

    def __init__(self, in_channels: int, n_filters: int, normalization: str,
                 has_dropout: bool) -> None:
        super().__init__()
        f = n_filters
        # Layer table with the official module names (checkpoints convert by name); the
        # decoder's mirrors it, which a duplicate finder pairs.
        self.block_one = ConvBlock(1, in_channels, f, normalization)
        self.block_one_dw = DownsamplingConvBlock(f, 2 * f, normalization)
        self.block_two = ConvBlock(2, 2 * f, 2 * f, normalization)
        self.block_two_dw = DownsamplingConvBlock(2 * f, 4 * f, normalization)
        self.block_three = ConvBlock(3, 4 * f, 4 * f, normalization)
        self.block_three_dw = DownsamplingConvBlock(4 * f, 8 * f, normalization)
        self.block_four = ConvBlock(3, 8 * f, 8 * f, normalization)
        self.block_four_dw = DownsamplingConvBlock(8 * f, 16 * f, normalization)
        self.block_five = ConvBlock(3, 16 * f, 16 * f, normalization)
        self.dropout = nn.Dropout3d(p=0.5, inplace=False)
        self.has_dropout = has_dropout

    def forward(self, x: Tensor) -> list[Tensor]:
        x1 = self.block_one(x)
        x2 = self.block_two(self.block_one_dw(x1))
        x3 = self.block_three(self.block_two_dw(x2))
        x4 = self.block_four(self.block_three_dw(x3))
        x5 = self.block_five(self.block_four_dw(x4))
        # The bottleneck's Dropout3d (has_dropout) is applied by the decoder, after the
        # injection seam (see the module docstring); the module stays here for the state dict
        # layout of the official encoder (it has no parameters).
        return [x1, x2, x3, x4, x5]


class VNetDecoder(nn.Module):
    """Four up-sampling stages with additive skips; returns the last feature (``n_filters``)."""

    def __init__(self, n_filters: int, normalization: str, has_dropout: bool) -> None:
        super().__init__()
        f = n_filters
        # Layer table mirroring the encoder's (official module names).
        self.block_five_up = UpsamplingDeconvBlock(16 * f, 8 * f, normalization)
        self.block_six = ConvBlock(3, 8 * f, 8 * f, normalization)
        self.block_six_up = UpsamplingDeconvBlock(8 * f, 4 * f, normalization)
        self.block_seven = ConvBlock(3, 4 * f, 4 * f, normalization)
        self.block_seven_up = UpsamplingDeconvBlock(4 * f, 2 * f, normalization)
        self.block_eight = ConvBlock(2, 2 * f, 2 * f, normalization)
        self.block_eight_up = UpsamplingDeconvBlock(2 * f, f, normalization)
        self.block_nine = ConvBlock(1, f, f, normalization)
        self.dropout = nn.Dropout3d(p=0.5, inplace=False)
        self.has_dropout = has_dropout
        # Channels of the feature entering each decoder stage (coarse to fine): where
        # plug-ins may inject (stage 0 is the bottleneck itself).
        self.stage_channels: tuple[int, ...] = (16 * f, 8 * f, 4 * f, 2 * f, f)

    def forward(self, features: Sequence[Tensor], inject: Inject | None = None) -> Tensor:
        x1, x2, x3, x4, x5 = features
        stages = (
            (self.block_five_up, self.block_six, x4),
            (self.block_six_up, self.block_seven, x3),
            (self.block_seven_up, self.block_eight, x2),
            (self.block_eight_up, self.block_nine, x1),
        )
        x = inject(0, x5) if inject is not None else x5
        if self.has_dropout:  # the encoder's bottleneck dropout (official place: x5)
            x = self.dropout(x)
        for index, (up, block, skip) in enumerate(stages, start=1):
            x = up(x) + skip
            if inject is not None:
                x = inject(index, x)
            x = block(x)
        if inject is not None:
            x = inject(HEAD_STAGE, x)
        if self.has_dropout:
            x = self.dropout(x)
        return x


class VNet(nn.Module):
    """The baseline VNet with the encode / decode / head seam."""

    def __init__(self, num_classes: int, in_channels: int = 1, n_filters: int = 16,
                 normalization: str = "batchnorm", has_dropout: bool = False) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.encoder = VNetEncoder(in_channels, n_filters, normalization, has_dropout)
        self.decoder = VNetDecoder(n_filters, normalization, has_dropout)
        self.out_conv = nn.Conv3d(n_filters, num_classes, 1, padding=0)
        self.injector: nn.Module | None = None

    @property
    def bottleneck_channels(self) -> int:
        return self.decoder.stage_channels[0]

    @property
    def decoder_stage_channels(self) -> tuple[int, ...]:
        return self.decoder.stage_channels

    def encode(self, x: Tensor) -> list[Tensor]:
        return self.encoder(x)

    def attach_injector(self, injector: nn.Module | None) -> None:
        """Let ``injector(stage, x)`` modify the feature entering every decoder stage of every
        decoding (unless a call passes its own ``inject``). ``None`` detaches it."""
        self.injector = injector

    def decode_features(self, features: Sequence[Tensor], inject: Inject | None = None) -> Tensor:
        return self.decoder(features, inject if inject is not None else self.injector)

    def head(self, feature: Tensor) -> Tensor:
        return self.out_conv(feature)

    def decode(self, features: Sequence[Tensor], inject: Inject | None = None) -> Tensor:
        return self.head(self.decode_features(features, inject))

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))


@register_model("vnet")
def vnet(num_classes: int, in_channels: int = 1, n_filters: int = 16,
         normalization: str = "batchnorm", has_dropout: bool = False) -> VNet:
    """The papers' VNet (9,449,070 parameters for 14 classes at 16 filters)."""
    return VNet(num_classes, in_channels, n_filters, normalization, has_dropout)
