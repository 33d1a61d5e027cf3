"""CDBA (SCDL paper 2.1): the learnable class proxies, the prior computed from them, and the
decoder hook that reads the tokens of every decoding of a network and adds the prior to it.
The equations are in :mod:`semiseg.losses.scdl`.

Stages of the decoder seam (:mod:`semiseg.models.vnet`): 0 = the bottleneck, 1..4 = after each
up-sampling, :data:`HEAD_STAGE` = the last decoder feature (the head's input). Tokens come from
stage 0 (``tokens: bottleneck``) or from the head stage average-pooled by ``token_stride``
(``tokens: decoder``); the prior goes to the stages ``injection`` names, at or after the token
stage.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from semiseg.losses.scdl import (
    center_prior,
    distribution_prior,
    official_prior_token,
    sample_proxies,
    token_sampling_prior,
)
from semiseg.models.vnet import HEAD_STAGE
from semiseg.plugins.scdl.options import SCDLOptions

INJECTION_STAGES: dict[str, tuple[int, ...]] = {
    "none": (), "head": (HEAD_STAGE,), "bottleneck": (0,), "all": (0, 1, 2, 3, 4)}


def _inverse_softplus(value: float) -> float:
    return value + math.log(-math.expm1(-value))  # log(exp(v) - 1), stable for small v


@dataclass
class TokenRecord:
    """Tokens of one decoding: ``z`` ``[B, L, D]`` (float32, in the graph) on ``grid``."""

    z: Tensor
    grid: tuple[int, ...]

    @property
    def batch(self) -> int:
        return int(self.z.size(0))


class CDBA(nn.Module):
    """Class Distribution Bidirectional Alignment: proxies, projector, prior and projections.

    * ``proxy_mean`` ``mu`` and ``proxy_rho`` (``sigma = softplus(rho)``), ``[C, D]``, drawn
      uniformly in ``±sqrt(6 / (C + 2 D))`` (a Xavier-uniform ``[C, 2D]`` table, as the official
      module initialises its joint mean/sigma table; paper: "randomly initialized");
    * ``noise_scale`` ``[D]`` of the token sampling prior;
    * ``projector``: bottleneck channels -> D (identity by default);
    * ``projections``: one 1x1x1 convolution per injected decoder stage, prior -> that stage's
      channels (the head stage has the last decoder stage's channels).

    Pure computation; the per-network state (prior cache, token records) is in
    :class:`CDBAInjector`, so that one CDBA can serve several networks.
    """

    def __init__(self, in_channels: int, stage_channels: Iterable[int], num_classes: int,
                 options: SCDLOptions) -> None:
        super().__init__()
        self.options = options
        self.num_classes = num_classes
        self.stage_channels = tuple(int(c) for c in stage_channels)
        # Decoder tokens have the channels of the head's input (the last decoder stage's).
        self.token_stage = 0 if options.tokens == "bottleneck" else HEAD_STAGE
        if options.tokens == "decoder":
            in_channels = self.stage_channels[-1]
        self.in_channels = in_channels
        if options.projector == "none":
            self.projector: nn.Module = nn.Identity()
            dim = in_channels
        elif options.projector == "linear":
            self.projector = nn.Linear(in_channels, options.embedding_dim)
            dim = options.embedding_dim
        else:
            hidden = 2 * options.embedding_dim
            self.projector = nn.Sequential(
                nn.Linear(in_channels, hidden), nn.ReLU(inplace=True),
                nn.Dropout(options.mlp_dropout),
                nn.Linear(hidden, hidden), nn.ReLU(inplace=True), nn.Dropout(options.mlp_dropout),
                nn.Linear(hidden, options.embedding_dim),
            )
            dim = options.embedding_dim
        self.embedding_dim = dim
        if options.center_tokens:
            # Running mean of the projected training tokens (options.center_tokens).
            self.register_buffer("token_mean", torch.zeros(dim))
        bound = math.sqrt(6.0 / (num_classes + 2 * dim))
        self.proxy_mean = nn.Parameter(torch.empty(num_classes, dim).uniform_(-bound, bound))
        rho = torch.empty(num_classes, dim).uniform_(-bound, bound)
        if options.proxy_init_sigma is not None:
            rho.fill_(_inverse_softplus(options.proxy_init_sigma))
        self.proxy_rho = nn.Parameter(rho)
        init = (_inverse_softplus(options.init_noise_scale) if options.noise_scale == "softplus"
                else options.init_noise_scale)
        self.noise_scale = nn.Parameter(torch.full((dim,), float(init)))
        self.prior_dim = {"paper": 3, "official": 2, "official_token": 1}[options.prior] * dim
        self.injection_stages = INJECTION_STAGES[options.injection]
        self.projections = nn.ModuleDict({
            str(s): nn.Conv3d(self.prior_dim, self.channels_of(s), 1, bias=options.prior_bias)
            for s in self.injection_stages
        })
        if options.zero_init_projection:
            for conv in self.projections.values():
                nn.init.zeros_(conv.weight)
                if conv.bias is not None:
                    nn.init.zeros_(conv.bias)

    def channels_of(self, stage: int) -> int:
        """Channels of the feature at decoder ``stage`` (the head stage: the last stage's)."""
        return self.stage_channels[min(stage, len(self.stage_channels) - 1)]

    def token_grid(self, spatial: Iterable[int]) -> tuple[int, ...]:
        """The token grid of a feature of ``spatial`` size at the token stage."""
        if self.options.tokens == "bottleneck":
            return tuple(int(s) for s in spatial)
        return tuple(max(1, int(s) // self.options.token_stride) for s in spatial)

    @property
    def proxy_sigma(self) -> Tensor:
        """``sigma_c = softplus(rho_c)``: per-dimension standard deviations, always positive."""
        return F.softplus(self.proxy_rho)

    def embed(self, feature: Tensor, update_mean: bool = False) -> Tensor:
        """Tokens of the token-stage feature ``[B, Cx, X, Y, Z]`` -> ``[B, L, D]`` (float32):
        the bottleneck's voxels, or the decoder feature average-pooled onto the token grid,
        through the projector; with ``center_tokens`` minus the running token mean, which
        ``update_mean`` (training decodings) moves towards this batch's mean afterwards."""
        feature = feature.float()
        grid = self.token_grid(feature.shape[2:])
        if grid != tuple(feature.shape[2:]):
            feature = F.adaptive_avg_pool3d(feature, grid)
        tokens = self.projector(feature.flatten(2).transpose(1, 2))
        if not self.options.center_tokens:
            return tokens
        centered = tokens - self.token_mean
        if update_mean:
            with torch.no_grad():
                self.token_mean.lerp_(tokens.detach().mean((0, 1)),
                                      self.options.token_mean_momentum)
        return centered

    def _load_from_state_dict(self, state_dict: Any, prefix: str, local_metadata: dict,
                              strict: bool, missing_keys: list[str],
                              unexpected_keys: list[str], error_msgs: list[str]) -> None:
        # Checkpoints from before center_tokens existed hold no running mean: start at zero.
        key = prefix + "token_mean"
        if self.options.center_tokens and key not in state_dict and isinstance(state_dict, dict):
            state_dict[key] = torch.zeros_like(self.token_mean)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def prior(self, z: Tensor) -> Tensor:
        """The prior of every token, ``[B, L, D] -> [B, L, prior_dim]``.

        ``prior: paper``: Eq. 7 ``concat(r_dist (Eq. 5), r_center (Eq. 6), z_sam)``;
        ``official``: ``concat(official prior token, z_sam)`` (the official AMOS host's
        concatenation). Random in training; the means in eval (see the module docstring).
        """
        opts = self.options
        mu = self.proxy_mean.detach() if opts.detach_prior_mean else self.proxy_mean
        stochastic = self.training or opts.stochastic_eval
        if stochastic:
            z_sam = token_sampling_prior(z, self.noise_scale, opts.token_samples,
                                         positive=opts.noise_scale == "softplus")
        else:
            z_sam = F.normalize(z, dim=-1, eps=1e-8)  # noise-free samples, all equal
        if opts.prior == "official_token":
            return official_prior_token(z, mu, opts.p2e_temperature or opts.temperature)
        if opts.prior == "official":
            token = official_prior_token(z, mu, opts.p2e_temperature or opts.temperature)
            return torch.cat([token, z_sam], dim=-1)
        samples = (sample_proxies(mu, self.proxy_sigma, opts.proxy_samples) if stochastic
                   else mu[:, None, :])
        return torch.cat([distribution_prior(z, mu, samples), center_prior(z, mu), z_sam], -1)

    def project(self, stage: int, prior_map: Tensor, size: torch.Size) -> Tensor | None:
        """The prior's contribution to decoder stage ``stage`` at spatial ``size`` (or None).

        The 1x1x1 projection runs on the coarse token grid and the result is resized: a 1x1x1
        convolution and trilinear interpolation are both linear and the interpolation weights
        sum to one, so they commute (bias included) and the cheap order gives the same numbers.
        """
        key = str(stage)
        if key not in self.projections:  # ModuleDict has no .get()
            return None
        out = self.projections[key](prior_map)
        if tuple(out.shape[2:]) != tuple(size):
            out = F.interpolate(out, size=tuple(size), mode="trilinear", align_corners=False)
        return out


class CDBAInjector(nn.Module):
    """The decoder hook of one network (:meth:`semiseg.models.vnet.VNet.attach_injector`).

    At the token stage it embeds the feature, computes the prior (cached for the later stages
    of the same decoding) and, while recording and gradients are on, records the tokens for
    the losses. Every injection stage adds the projected, resized prior. While ``measuring``
    it keeps what the diagnostics read: the prior's norm relative to the feature it is added
    to, and the prior itself.
    """

    def __init__(self, cdba: CDBA) -> None:
        super().__init__()
        self.cdba = cdba
        self._last_stage = max((*cdba.injection_stages, cdba.token_stage))
        self._prior_map: Tensor | None = None
        self._recording = False
        self._records: list[TokenRecord] = []
        self.measuring = False
        self.measured: dict[str, Tensor] = {}

    def start_recording(self) -> None:
        self._records = []
        self._recording = True

    def stop_recording(self) -> list[TokenRecord]:
        """Stop recording; return (and forget) the tokens recorded since the start."""
        records, self._records, self._recording = self._records, [], False
        return records

    def forward(self, stage: int, x: Tensor) -> Tensor:
        cdba = self.cdba
        if stage < cdba.token_stage or (stage > cdba.token_stage
                                        and stage not in cdba.injection_stages):
            return x
        with torch.autocast(x.device.type, enabled=False):
            if stage == cdba.token_stage:
                recording = self._recording and torch.is_grad_enabled()
                z = cdba.embed(x, update_mean=recording and cdba.training)
                grid = cdba.token_grid(x.shape[2:])
                if recording:
                    self._records.append(TokenRecord(z, grid))
                prior = cdba.prior(z)
                self._prior_map = prior.transpose(1, 2).reshape(x.size(0), prior.size(-1), *grid)
                if self.measuring and "prior" not in self.measured:
                    self.measured["prior"] = prior.detach()
            prior_map = self._prior_map
            if prior_map is None:
                raise RuntimeError(f"SCDL injector: decoder stage {stage} before the token stage")
            if prior_map.size(0) != x.size(0):
                raise RuntimeError(f"SCDL injector: stage {stage} has {x.size(0)} samples, the "
                                   f"token stage had {prior_map.size(0)}")
            if stage >= self._last_stage:
                self._prior_map = None  # the decoding is over; free the graph it holds
            addition = cdba.project(stage, prior_map, x.shape[2:])
            if addition is not None and self.measuring and "prior_share" not in self.measured:
                self.measured["prior_share"] = (addition.detach().norm()
                                                / x.detach().float().norm().clamp_min(1e-12))
        if addition is None:
            return x
        return x + addition.to(x.dtype)


class FeatureCapture(nn.Module):
    """A stand-in injector that keeps the feature of one stage and changes nothing (SAC's
    masked passes read decoder tokens through it)."""

    def __init__(self, stage: int) -> None:
        super().__init__()
        self.stage = stage
        self.feature: Tensor | None = None

    def forward(self, stage: int, x: Tensor) -> Tensor:
        if stage == self.stage:
            self.feature = x
        return x
