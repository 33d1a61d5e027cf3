"""GenericSSL's DiffVNet (A&D, Wang & Li NeurIPS 2023; official ``code/DiffVNet/diff_vnet.py``).

One VNet-style encoder shared by every path, three decoders and two input embeddings:

* ``image_embedding`` (official ``embedding``): 3x3x3 conv of the image to ``n_filters``
  channels; the image paths' replacement for VNet's ``block_one``;
* ``denoiser`` (official ``denoise_model``): ``embedding`` of ``cat(image, x_t)`` with the
  timestep embedding (sinusoidal 128 -> Linear 512 -> swish -> Linear 512), the shared
  ``encoder`` and the time-conditioned diffusion decoder ``decoder`` = D_ξ;
* ``decoder_theta`` = D_θ (aggregated; trained on pseudo labels; used for validation and
  inference) and ``decoder_psi`` = D_ψ (difficulty-weighted, labeled crops), without time.

Time conditioning adds ``Linear(512 -> channels)(swish(temb))`` as a per-channel bias after
every down / up convolution and after every conv stage of a block except its last. The image
paths pass no timestep, so the shared encoder runs unconditioned for them.

Layer order differs from semiseg's :class:`~semiseg.models.vnet.VNet` (and DHC's): each conv
stage is conv -> ReLU -> norm -> Dropout3d(0.1), down / up blocks conv -> ReLU -> norm, and
Dropout3d(0.5) follows the bottleneck and the last decoder block with ``has_dropout``. So the
blocks are this module's own rather than VNet's.

The official network carries parameters no path uses: the image embedding's time MLP and the
time projection of the last stage of every block. They are kept, so that the parameter count
equals the official one: 57,903,466 at 32 filters, 1 channel, 14 classes (15,701,962 at 16)
and each official tensor has a counterpart here.

Seam (same contract as :class:`~semiseg.models.vnet.VNet`): :meth:`DiffVNet.encode` returns
the image path's ``[x1, .., x5]``; :meth:`DiffVNet.attach_injector` registers a module called
as ``injector(stage, x)`` on the feature entering every decoder stage (0 = bottleneck, 1..4
after each up-sampling + skip) of every decoding by D_θ, D_ψ and (``inject_denoiser``) D_ξ,
so SCDL attaches to the one shared encoder with one set of proxies.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from semiseg.models.registry import register_model

Inject = Callable[[int, Tensor], Tensor]
HEAD_STAGE = 5  # as semiseg.models.vnet: the last decoder feature, before the head
TIME_DIM = 128  # sinusoidal timestep embedding width (official embed_dim_in)
TEMB_DIM = 4 * TIME_DIM  # width of the time MLP's output (official embed_dim_out)


def timestep_embedding(t: Tensor, dim: int = TIME_DIM) -> Tensor:
    """DDPM's sinusoidal embedding ``[sin(t f_k), cos(t f_k)]``,
    ``f_k = exp(-k ln(10000) / (dim/2 - 1))``, ``[B] -> [B, dim]`` (zero-padded if odd)."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=t.device)
                      * -(math.log(10000.0) / (half - 1)))
    angles = t.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batchnorm":
        return nn.BatchNorm3d(channels)
    if kind == "groupnorm":
        return nn.GroupNorm(num_groups=16, num_channels=channels)
    if kind == "instancenorm":
        return nn.InstanceNorm3d(channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown normalization {kind!r} (batchnorm|groupnorm|instancenorm|none)")


class TimeBias(nn.Module):
    """``x + Linear(512 -> C)(swish(temb))`` per channel; identity when ``temb`` is None."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.proj = nn.Linear(TEMB_DIM, channels)

    def forward(self, x: Tensor, temb: Tensor | None) -> Tensor:
        if temb is None:
            return x
        return x + self.proj(F.silu(temb)).to(x.dtype)[:, :, None, None, None]


class ConvStage(nn.Module):
    """3x3x3 conv -> ReLU -> norm -> Dropout3d(0.1) [-> time bias]."""

    def __init__(self, in_ch: int, out_ch: int, normalization: str, timed: bool,
                 use_time: bool) -> None:
        super().__init__()
        self.conv = nn.Conv3d(in_ch, out_ch, 3, padding=1)
        self.norm = _norm(normalization, out_ch)
        self.dropout = nn.Dropout3d(p=0.1)
        # ``timed``: the block belongs to the time-conditioned path and owns a projection;
        # ``use_time``: it is applied (the official last stage of a block owns one unused).
        self.time = TimeBias(out_ch) if timed else None
        self.use_time = use_time

    def forward(self, x: Tensor, temb: Tensor | None = None) -> Tensor:
        x = self.dropout(self.norm(F.relu(self.conv(x))))
        if self.time is not None and self.use_time:
            x = self.time(x, temb)
        return x


class ConvBlock(nn.Module):
    """``n_stages`` conv stages; with time, every stage but the last adds the time bias."""

    def __init__(self, n_stages: int, in_ch: int, out_ch: int, normalization: str,
                 timed: bool) -> None:
        super().__init__()
        self.stages = nn.ModuleList(
            ConvStage(in_ch if i == 0 else out_ch, out_ch, normalization, timed,
                      use_time=timed and i < n_stages - 1)
            for i in range(n_stages))

    def forward(self, x: Tensor, temb: Tensor | None = None) -> Tensor:
        for stage in self.stages:
            x = stage(x, temb)
        return x


class Resample(nn.Module):
    """Strided 2x2x2 conv (down) or transposed conv (up) -> ReLU -> norm [-> time bias]."""

    def __init__(self, in_ch: int, out_ch: int, normalization: str, up: bool,
                 timed: bool) -> None:
        super().__init__()
        kind = nn.ConvTranspose3d if up else nn.Conv3d
        self.conv = kind(in_ch, out_ch, 2, stride=2, padding=0)
        self.norm = _norm(normalization, out_ch)
        self.time = TimeBias(out_ch) if timed else None

    def forward(self, x: Tensor, temb: Tensor | None = None) -> Tensor:
        x = self.norm(F.relu(self.conv(x)))
        if self.time is not None:
            x = self.time(x, temb)
        return x


class InputEmbedding(nn.Module):
    """One conv stage of the input to ``n_filters`` channels plus the timestep MLP.

    ``forward(x, t)`` returns ``(features, temb)``; ``temb`` is None when ``t`` is None.
    """

    def __init__(self, in_ch: int, out_ch: int, normalization: str) -> None:
        super().__init__()
        self.time_mlp = nn.ModuleList([nn.Linear(TIME_DIM, TEMB_DIM),
                                       nn.Linear(TEMB_DIM, TEMB_DIM)])
        # A one-stage block: its only stage is the last, so its time projection is unused.
        self.block = ConvBlock(1, in_ch, out_ch, normalization, timed=True)

    def forward(self, x: Tensor, t: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        temb = None
        if t is not None:
            temb = self.time_mlp[1](F.silu(self.time_mlp[0](timestep_embedding(t))))
        return self.block(x, temb), temb


class Encoder(nn.Module):
    """The shared encoder; ``x1`` is the embedding itself (no ``block_one``)."""

    def __init__(self, n_filters: int, normalization: str, has_dropout: bool) -> None:
        super().__init__()
        f, n = n_filters, normalization
        # Layer table with the official module names; the decoder's mirrors it, which a
        # duplicate finder pairs.
        self.block_one_dw = Resample(f, 2 * f, n, up=False, timed=True)
        self.block_two = ConvBlock(2, 2 * f, 2 * f, n, timed=True)
        self.block_two_dw = Resample(2 * f, 4 * f, n, up=False, timed=True)
        self.block_three = ConvBlock(3, 4 * f, 4 * f, n, timed=True)
        self.block_three_dw = Resample(4 * f, 8 * f, n, up=False, timed=True)
        self.block_four = ConvBlock(3, 8 * f, 8 * f, n, timed=True)
        self.block_four_dw = Resample(8 * f, 16 * f, n, up=False, timed=True)
        self.block_five = ConvBlock(3, 16 * f, 16 * f, n, timed=True)
        self.dropout = nn.Dropout3d(p=0.5)
        self.has_dropout = has_dropout

    def forward(self, x1: Tensor, temb: Tensor | None = None) -> list[Tensor]:
        x2 = self.block_two(self.block_one_dw(x1, temb), temb)
        x3 = self.block_three(self.block_two_dw(x2, temb), temb)
        x4 = self.block_four(self.block_three_dw(x3, temb), temb)
        x5 = self.block_five(self.block_four_dw(x4, temb), temb)
        # Its Dropout3d (has_dropout) is applied by the decoders, after the injection seam
        # (semiseg.models.vnet's docstring).
        return [x1, x2, x3, x4, x5]


class Decoder(nn.Module):
    """Four up-sampling stages with additive skips and the 1x1x1 head.

    ``timed=True`` is D_ξ (time biases); ``False`` D_θ / D_ψ. Their convolution and norm
    parameters have the same names and shapes, which the aggregation pairs.
    """

    def __init__(self, num_classes: int, n_filters: int, normalization: str, has_dropout: bool,
                 timed: bool) -> None:
        super().__init__()
        f, n = n_filters, normalization
        # Layer table mirroring the encoder's (official module names).
        self.block_five_up = Resample(16 * f, 8 * f, n, up=True, timed=timed)
        self.block_six = ConvBlock(3, 8 * f, 8 * f, n, timed=timed)
        self.block_six_up = Resample(8 * f, 4 * f, n, up=True, timed=timed)
        self.block_seven = ConvBlock(3, 4 * f, 4 * f, n, timed=timed)
        self.block_seven_up = Resample(4 * f, 2 * f, n, up=True, timed=timed)
        self.block_eight = ConvBlock(2, 2 * f, 2 * f, n, timed=timed)
        self.block_eight_up = Resample(2 * f, f, n, up=True, timed=timed)
        self.block_nine = ConvBlock(1, f, f, n, timed=timed)
        self.out_conv = nn.Conv3d(f, num_classes, 1, padding=0)
        self.dropout = nn.Dropout3d(p=0.5)
        self.has_dropout = has_dropout

    def forward(self, features: Sequence[Tensor], temb: Tensor | None = None,
                inject: Inject | None = None) -> Tensor:
        x1, x2, x3, x4, x5 = features
        stages = ((self.block_five_up, self.block_six, x4),
                  (self.block_six_up, self.block_seven, x3),
                  (self.block_seven_up, self.block_eight, x2),
                  (self.block_eight_up, self.block_nine, x1))
        x = inject(0, x5) if inject is not None else x5
        if self.has_dropout:  # the encoder's bottleneck dropout (official place: x5)
            x = self.dropout(x)
        for index, (up, block, skip) in enumerate(stages, start=1):
            x = up(x, temb) + skip
            if inject is not None:
                x = inject(index, x)
            x = block(x, temb)
        if inject is not None:
            x = inject(HEAD_STAGE, x)
        if self.has_dropout:
            x = self.dropout(x)
        return self.out_conv(x)


class Denoiser(nn.Module):
    """Official ``DenoiseModel``: time-conditioned embedding of ``cat(image, x_t)``, the shared
    encoder and D_ξ. The encoder lives here (as officially); the image paths borrow it."""

    def __init__(self, num_classes: int, in_channels: int, n_filters: int, normalization: str,
                 has_dropout: bool) -> None:
        super().__init__()
        self.embedding = InputEmbedding(num_classes + in_channels, n_filters, normalization)
        self.encoder = Encoder(n_filters, normalization, has_dropout)
        self.decoder = Decoder(num_classes, n_filters, normalization, has_dropout, timed=True)


class DiffVNet(nn.Module):
    """Shared encoder, D_ξ (diffusion), D_θ (aggregated) and D_ψ (difficulty-aware).

    ``forward(image)`` is the official ``pred_type="D_theta_u"`` (validation and test).
    """

    def __init__(self, num_classes: int, in_channels: int = 1, n_filters: int = 16,
                 normalization: str = "batchnorm", has_dropout: bool = False,
                 inject_denoiser: bool = True) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.image_embedding = InputEmbedding(in_channels, n_filters, normalization)
        self.denoiser = Denoiser(num_classes, in_channels, n_filters, normalization, has_dropout)
        self.decoder_theta = Decoder(num_classes, n_filters, normalization, has_dropout,
                                     timed=False)
        self.decoder_psi = Decoder(num_classes, n_filters, normalization, has_dropout,
                                   timed=False)
        f = n_filters
        self.stage_channels: tuple[int, ...] = (16 * f, 8 * f, 4 * f, 2 * f, f)
        self.inject_denoiser = inject_denoiser
        self.injector: nn.Module | None = None

    # -- the seam (VNet's contract) ----------------------------------------------------------
    @property
    def bottleneck_channels(self) -> int:
        return self.stage_channels[0]

    @property
    def decoder_stage_channels(self) -> tuple[int, ...]:
        return self.stage_channels

    def attach_injector(self, injector: nn.Module | None) -> None:
        """Let ``injector(stage, x)`` modify the feature entering every decoder stage of every
        decoding (D_θ, D_ψ, and D_ξ with ``inject_denoiser``). ``None`` detaches it."""
        self.injector = injector

    def encode(self, image: Tensor) -> list[Tensor]:
        """Image path features ``[x1, .., x5]`` (image embedding + shared encoder, no time)."""
        x, _ = self.image_embedding(image)
        return self.denoiser.encoder(x)

    # -- the three decoders ------------------------------------------------------------------
    def decode_theta(self, features: Sequence[Tensor]) -> Tensor:
        return self.decoder_theta(features, None, self.injector)

    def decode_psi(self, features: Sequence[Tensor]) -> Tensor:
        return self.decoder_psi(features, None, self.injector)

    def theta(self, image: Tensor) -> Tensor:
        """D_θ logits of an image batch (official ``D_theta_u``)."""
        return self.decode_theta(self.encode(image))

    def psi(self, image: Tensor) -> Tensor:
        """D_ψ logits of an image batch (official ``D_psi_l``)."""
        return self.decode_psi(self.encode(image))

    def denoise(self, x_t: Tensor, t: Tensor, image: Tensor) -> Tensor:
        """D_ξ's ``x_0`` prediction (read as logits) of noisy one-hot labels ``x_t`` at
        timesteps ``t`` given ``image`` (official ``D_xi_l``; channels: image first)."""
        x, temb = self.denoiser.embedding(torch.cat([image, x_t.to(image.dtype)], dim=1), t)
        features = self.denoiser.encoder(x, temb)
        inject = self.injector if self.inject_denoiser else None
        return self.denoiser.decoder(features, temb, inject)

    def forward(self, image: Tensor) -> Tensor:
        return self.theta(image)


@register_model("diff_vnet")
def diff_vnet(num_classes: int, in_channels: int = 1, n_filters: int = 16,
              normalization: str = "batchnorm", has_dropout: bool = False,
              inject_denoiser: bool = True) -> DiffVNet:
    """GenericSSL's DiffVNet (57,903,466 parameters at 32 filters, 14 classes; official
    training uses 32 filters, batch norm and dropout)."""
    return DiffVNet(num_classes, in_channels, n_filters, normalization, has_dropout,
                    inject_denoiser)
