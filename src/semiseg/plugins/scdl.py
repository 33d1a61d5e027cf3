"""SCDL as a plug-in: ``scdl_<host>`` for every registered host method.

SCDL (Su et al., "Semantic Class Distribution Learning for Debiasing Semi-Supervised Medical
Image Segmentation") adds to a host segmentation method

* **CDBA** (paper 2.1): learnable class proxy distributions ``N(mu_c, diag(sigma_c^2))``, an
  embedding-to-proxy (Eq. 3) and a proxy-to-embedding (Eq. 4) alignment loss on the
  bottleneck tokens, and a prior (Eq. 5-7) computed from the tokens and the proxies, projected
  and added to the decoder features;
* **SAC** (paper 2.2): each class present in a labeled crop is cut out (every other voxel set
  to the background value), passed through the same encoder, and the mean embedding of the
  class's tokens (Eq. 8, detached) pulls the class proxy mean towards it (Eq. 9).

Equations live in :mod:`semiseg.losses.scdl`; this module holds the learnable parts
(:class:`CDBA`), the per-network decoder hook (:class:`CDBAInjector`), SAC, the wrapper
method (:class:`SCDLMethod`) and its builder (registered as plug-in ``scdl``).

Options layout (``method.options``)::

    method:
      name: scdl_ga_cps
      options:
        host: {consistency: 0.1}     # the host's own options, validated by the host
        scdl: {temperature: 1.0}     # SCDLOptions below, validated here

No other top-level key is accepted, so a host option can never be mistaken for an SCDL one.

How it attaches. Every host network with the VNet seam (any submodule with
``attach_injector``: CPS's two networks, the mean-teacher / MagicNet student and EMA teacher)
gets a :class:`CDBAInjector`, called on the feature entering every decoder stage of *every*
decoding of that network, whoever runs it (the host's forward, MagicNet's mixed batch and cube
branches, validation, inference). Stage 0 (the bottleneck ``x5``) flattens the ``x5`` grid into
tokens (``L = (X/16)(Y/16)(Z/16)``, 216 for a 96^3 crop), computes the prior and caches it for
stages 1..4 of the same decoding. Because the injector is a submodule of the network it is in
the network's state dict and checkpoints, and inference runs with the prior.

Design decisions (paper silent; see ``docs/methods/scdl.md``):

* **Token sources.** While the host computes its step, each injector records the tokens of the
  decodings that carry gradients (``token_source``): ``first`` (default) takes the first such
  decoding of each network per step, which for every current host is its plain forward on the
  whole batch (CPS: each network's batch pass; mean teacher: the student's; MagicNet: the
  student's full-batch pass, not the cross-image mixed batch nor the cube-by-cube decodings);
  ``full_patch`` takes every decoding of whole crops, i.e. on the crop's token grid, whatever
  its batch size (MagicNet: also the mixed batch; a host that decodes its labeled and
  unlabeled crops separately: both); ``all`` takes every decoding with gradients (also
  MagicNet's cubes).
  No-gradient decodings (EMA teachers, MagicNet's pseudo-label cubes) never contribute.
* **Several networks** (CPS): one CDBA module per network by default (``share_proxies: false``);
  the SCDL terms are sums over networks, each network's tokens against its own proxies (with
  ``share_proxies: true`` both networks use one module, still one loss per network).
* **EMA teachers** (mean teacher, MagicNet): the teacher network gets its own injector, a copy
  of the student's, frozen (``requires_grad = False``). The injector is part of the network, so
  the host's own EMA update (which pairs the teacher's and the student's named parameters)
  averages the proxies, the projector and the prior projections with the rest: the teacher is
  always the EMA of the whole student, SCDL included.
* **SAC region rule.** A token belongs to class c when the fraction of its 16^3 cell labelled c
  is above ``sac_min_fraction`` (0 = any voxel, the default, so that adrenal glands smaller
  than a cell still get an anchor; 0.5 = majority). The masked passes run without gradients
  (the anchors are detached anyway, Eq. 8) in the network's current mode; batch-norm running
  statistics are restored afterwards so that the mostly-empty masked crops never enter them.
* **Determinism.** In eval mode the prior uses the proxy means (no proxy sampling, Eq. 5 then
  equals Eq. 6) and no token noise, so sliding-window inference is deterministic
  (``stochastic_eval: true`` keeps sampling).
* **Ablations** (SCDL Table 4): row 1 is the plain host (its own config); row 2
  ``sac: false`` (no SAC term, no masked passes); row 3 the default. ``cdba: false`` attaches
  nothing and returns exactly the host's terms.

Paper defaults vs the official code (``Zyh55555/SCDL``), every one an option: temperature 1
(official 0.2); no projector (official ``mlp``: 2z -> 2z -> z = 256 with dropout 0.2); the
Eq. 3/4 losses (official ``loss: official``: exp(pos - neg) over 50 proxy samples plus 0.1 x the
distribution loss, and a symmetric KL between E2P and P2E assignments); the Eq. 7 prior
concat(r_dist, r_center, z_sam) (official ``prior: official``: the temperature-sharpened mixture
of normalised proxy means concatenated with the token samples); softplus-positive token noise
scale (official raw); injection at every decoder stage (official AMOS host: ``injection:
bottleneck``). The official Synapse host adds its prior at the prediction head, which the
decoder seam does not reach (not offered).
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from semiseg.config import validate_options
from semiseg.errors import ConfigError
from semiseg.losses.scdl import (
    center_prior,
    distribution_prior,
    e2p_loss,
    official_alignment_loss,
    official_assignments,
    official_prior_token,
    p2e_loss,
    sac_loss,
    sample_proxies,
    semantic_anchors,
    symmetric_kl,
    token_class_proportions,
    token_fractions,
    token_sampling_prior,
)
from semiseg.methods.base import (
    Batch,
    Method,
    MethodClass,
    MethodContext,
    StepInfo,
    register_plugin,
)
from semiseg.methods.ema import EMATeacher
from semiseg.models.magic_cube import ENCODER_STRIDE

TERM_PREFIX = "scdl_"


@dataclass
class SCDLOptions:
    """``method.options.scdl``. Paper defaults; the official code's values in comments."""

    # -- components (SCDL Table 4) -------------------------------------------------------
    cdba: bool = True  # proxies, alignment losses and prior injection
    sac: bool = True  # semantic anchor constraint (needs cdba)
    # -- embedding space -----------------------------------------------------------------
    # Token projector before the proxy space: "none" (paper: the bottleneck features are the
    # embeddings, D = 16 n_filters), "linear" (one 1x1 linear map to embedding_dim), "mlp"
    # (official: Linear(x, 2z) ReLU Dropout Linear(2z, 2z) ReLU Dropout Linear(2z, z)).
    projector: Literal["none", "linear", "mlp"] = "none"
    embedding_dim: int = 256  # z of the linear / mlp projector (official 256)
    mlp_dropout: float = 0.2
    # -- proxies and priors --------------------------------------------------------------
    proxy_samples: int = 50  # S of Eq. 5 (official 50; the paper gives no number)
    # Initial proxy standard deviation; None = random like the means (the official
    # xavier-uniform table, softplus(~0) = 0.69).
    proxy_init_sigma: float | None = None
    token_samples: int = 2  # token perturbations per token (official 2)
    init_noise_scale: float = 0.05  # initial token noise scale (official 0.05)
    noise_scale: Literal["softplus", "raw"] = "softplus"  # official "raw" (may turn negative)
    temperature: float = 1.0  # Eq. 2 (paper 1; official 0.2)
    p2e_temperature: float | None = None  # official variant's tau_p2e; None = temperature
    prior: Literal["paper", "official"] = "paper"  # Eq. 7 / official prior token + samples
    injection: Literal["all", "bottleneck"] = "all"  # paper: every decoder stage
    prior_bias: bool = False  # bias of the 1x1x1 prior projections (official: none)
    zero_init_projection: bool = False  # start as the exact host (prior projections = 0)
    stochastic_eval: bool = False  # sample proxies and token noise in eval mode too
    # -- losses --------------------------------------------------------------------------
    loss: Literal["paper", "official"] = "paper"  # Eq. 3 + Eq. 4 / official proxy loss + KL
    token_source: Literal["first", "full_patch", "all"] = "first"
    e2p_weight: float = 0.1
    p2e_weight: float = 0.1
    sac_weight: float = 0.1
    proxy_weight: float = 0.1  # official proxy loss ("scdl_proxy")
    kl_weight: float = 0.1  # official symmetric KL ("scdl_kl")
    official_dist_weight: float = 0.1  # the 0.1 x distribution loss inside the proxy loss
    # Official variant: ground-truth class proportions as the token weights of the labeled
    # crops in the first full-batch decoding (the official module's y_dist_flat path);
    # False = detached bidirectional assignment for every token.
    official_label_weights: bool = False
    # -- SAC -----------------------------------------------------------------------------
    sac_min_fraction: float = 0.0  # token in class c if its cell's c-fraction is above this
    sac_fill_value: float = 0.0  # background value of masked crops (0 after intensity)
    sac_include_background: bool = True  # anchor the background proxy too
    sac_max_classes: int = 0  # at most this many classes per step, rarest first; 0 = all
    sac_max_batch: int = 4  # masked crops per encoder call
    sac_normalize_tokens: bool = False  # official: average L2-normalised embeddings
    # -- networks and optimiser ----------------------------------------------------------
    share_proxies: bool = False  # one CDBA module for all student networks (CPS)
    weight_decay: float = 1e-4  # of the SCDL parameters (paper 3.1)


def check_options(options: SCDLOptions, where: str = "method.options.scdl") -> None:
    """Reject values the equations cannot use, naming the key."""
    positive_int = {"embedding_dim": options.embedding_dim, "proxy_samples": options.proxy_samples,
                    "token_samples": options.token_samples,
                    "sac_max_batch": options.sac_max_batch}
    for key, value in positive_int.items():
        if value < 1:
            raise ConfigError(f"{where}.{key}: must be at least 1, got {value}")
    temperatures = {"temperature": options.temperature, "p2e_temperature": options.p2e_temperature}
    for key, value in temperatures.items():
        if value is not None and not value > 0:
            raise ConfigError(f"{where}.{key}: must be positive, got {value}")
    weights = ("e2p_weight", "p2e_weight", "sac_weight", "proxy_weight", "kl_weight",
               "official_dist_weight", "weight_decay")
    for key in weights:
        value = getattr(options, key)
        if not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"{where}.{key}: must be a finite number >= 0, got {value}")
    if not 0.0 <= options.mlp_dropout < 1.0:
        raise ConfigError(f"{where}.mlp_dropout: must be in [0, 1), got {options.mlp_dropout}")
    if not 0.0 <= options.sac_min_fraction < 1.0:
        raise ConfigError(f"{where}.sac_min_fraction: must be in [0, 1) (0 = any voxel, "
                          f"0.5 = majority), got {options.sac_min_fraction}")
    if options.sac_max_classes < 0:
        raise ConfigError(f"{where}.sac_max_classes: must be >= 0 (0 = all), got "
                          f"{options.sac_max_classes}")
    if options.proxy_init_sigma is not None and not options.proxy_init_sigma > 0:
        raise ConfigError(f"{where}.proxy_init_sigma: must be positive, got "
                          f"{options.proxy_init_sigma}")
    if options.noise_scale == "softplus" and not options.init_noise_scale > 0:
        raise ConfigError(f"{where}.init_noise_scale: must be positive with a softplus noise "
                          f"scale, got {options.init_noise_scale}")
    if options.sac and not options.cdba:
        raise ConfigError(f"{where}: sac needs cdba (SAC anchors the CDBA proxies); set "
                          "sac: false as well, or use the plain host method")


def _inverse_softplus(value: float) -> float:
    return value + math.log(-math.expm1(-value))  # log(exp(v) - 1), stable for small v


# ----------------------------------------------------------------------------- CDBA


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
      channels.

    Pure computation; the per-network state (prior cache, token records) is in
    :class:`CDBAInjector`, so that one CDBA can serve several networks.
    """

    def __init__(self, in_channels: int, stage_channels: Iterable[int], num_classes: int,
                 options: SCDLOptions) -> None:
        super().__init__()
        self.options = options
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.stage_channels = tuple(int(c) for c in stage_channels)
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
        bound = math.sqrt(6.0 / (num_classes + 2 * dim))
        self.proxy_mean = nn.Parameter(torch.empty(num_classes, dim).uniform_(-bound, bound))
        rho = torch.empty(num_classes, dim).uniform_(-bound, bound)
        if options.proxy_init_sigma is not None:
            rho.fill_(_inverse_softplus(options.proxy_init_sigma))
        self.proxy_rho = nn.Parameter(rho)
        init = (_inverse_softplus(options.init_noise_scale) if options.noise_scale == "softplus"
                else options.init_noise_scale)
        self.noise_scale = nn.Parameter(torch.full((dim,), float(init)))
        self.prior_dim = (3 if options.prior == "paper" else 2) * dim
        stages = range(len(self.stage_channels)) if options.injection == "all" else (0,)
        self.projections = nn.ModuleDict({
            str(s): nn.Conv3d(self.prior_dim, self.stage_channels[s], 1, bias=options.prior_bias)
            for s in stages
        })
        if options.zero_init_projection:
            for conv in self.projections.values():
                nn.init.zeros_(conv.weight)
                if conv.bias is not None:
                    nn.init.zeros_(conv.bias)

    @property
    def proxy_sigma(self) -> Tensor:
        """``sigma_c = softplus(rho_c)``: per-dimension standard deviations, always positive."""
        return F.softplus(self.proxy_rho)

    def embed(self, bottleneck: Tensor) -> Tensor:
        """Tokens of a bottleneck ``[B, Cx, gx, gy, gz]`` -> ``[B, L, D]`` (float32)."""
        tokens = bottleneck.float().flatten(2).transpose(1, 2)
        return self.projector(tokens)

    def prior(self, z: Tensor) -> Tensor:
        """The prior of every token, ``[B, L, D] -> [B, L, prior_dim]``.

        ``prior: paper``: Eq. 7 ``concat(r_dist (Eq. 5), r_center (Eq. 6), z_sam)``;
        ``official``: ``concat(official prior token, z_sam)`` (the official AMOS host's
        concatenation). Random in training; the means in eval (see the module docstring).
        """
        opts = self.options
        mu = self.proxy_mean
        stochastic = self.training or opts.stochastic_eval
        if stochastic:
            z_sam = token_sampling_prior(z, self.noise_scale, opts.token_samples,
                                         positive=opts.noise_scale == "softplus")
        else:
            z_sam = F.normalize(z, dim=-1, eps=1e-8)  # noise-free samples, all equal
        if opts.prior == "official":
            return torch.cat([official_prior_token(z, mu, opts.temperature), z_sam], dim=-1)
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
    """The decoder hook of one network (:meth:`VNet.attach_injector`).

    Stage 0 embeds the bottleneck, computes the prior (cached for stages 1.. of the same
    decoding) and, while recording and gradients are on, records the tokens for the losses.
    Every stage adds the projected, resized prior (``injection: all``) or only stage 0 does
    (``bottleneck``).
    """

    def __init__(self, cdba: CDBA) -> None:
        super().__init__()
        self.cdba = cdba
        self.num_stages = len(cdba.stage_channels)
        self._prior_map: Tensor | None = None
        self._recording = False
        self._records: list[TokenRecord] = []

    def start_recording(self) -> None:
        self._records = []
        self._recording = True

    def stop_recording(self) -> list[TokenRecord]:
        """Stop recording; return (and forget) the tokens recorded since the start."""
        records, self._records, self._recording = self._records, [], False
        return records

    def forward(self, stage: int, x: Tensor) -> Tensor:
        with torch.autocast(x.device.type, enabled=False):
            if stage == 0:
                z = self.cdba.embed(x)
                if self._recording and torch.is_grad_enabled():
                    self._records.append(TokenRecord(z, tuple(x.shape[2:])))
                prior = self.cdba.prior(z)
                self._prior_map = prior.transpose(1, 2).reshape(
                    x.size(0), prior.size(-1), *x.shape[2:])
            prior_map = self._prior_map
            if prior_map is None:
                raise RuntimeError(f"SCDL injector: decoder stage {stage} before stage 0")
            if prior_map.size(0) != x.size(0):
                raise RuntimeError(f"SCDL injector: stage {stage} has {x.size(0)} samples, the "
                                   f"bottleneck had {prior_map.size(0)}")
            if stage >= self.num_stages - 1:
                self._prior_map = None  # the decoding is over; free the graph it holds
            addition = self.cdba.project(stage, prior_map, x.shape[2:])
        if addition is None:
            return x
        return x + addition.to(x.dtype)


# ----------------------------------------------------------------------------- the method


@contextlib.contextmanager
def _buffers_restored(module: nn.Module) -> Iterator[None]:
    """Run a pass whose buffer updates (batch-norm running statistics) must not stick.

    The values are written back through ``.data``: the host's forward passes of this step saved
    the running statistics for their backward, and batch norm's own in-place update does not
    bump their autograd version, so a tracked ``copy_`` would make that backward fail.
    """
    saved = [(b, b.detach().clone()) for b in module.buffers()]
    try:
        yield
    finally:
        for buffer, value in saved:
            buffer.data.copy_(value)


def _zero(reference: Tensor) -> Tensor:
    return reference.sum() * 0.0  # a zero in the graph, so the term keeps a gradient path


class SCDLMethod(Method):
    """A host method with SCDL attached (built by the ``scdl`` plug-in; one subclass per host).

    ``training_step`` = the host's terms + ``scdl_e2p``, ``scdl_p2e`` (``loss: paper``) or
    ``scdl_proxy``, ``scdl_kl`` (``loss: official``) + ``scdl_sac``; ``loss_weights`` = the
    host's + the SCDL weights; ``after_step``, ``inference_network`` and ``frozen_modules`` are
    the host's; :meth:`parameter_groups` gives the SCDL parameters their own weight decay.
    """

    Options = SCDLOptions

    def __init__(self, context: MethodContext, host: Method, options: SCDLOptions) -> None:
        super().__init__(context, options)
        self.host = host
        # Plain lists: the networks and injectors are already registered under ``host``;
        # registering them again would duplicate them in the state dict.
        self._students: list[tuple[nn.Module, CDBAInjector]] = []
        self._teachers: list[tuple[nn.Module, CDBAInjector]] = []
        if options.cdba:
            self._attach()

    # -- construction ------------------------------------------------------------------------
    def _attach(self) -> None:
        students, teachers = _find_networks(self.host)
        if not students:
            raise ConfigError(
                f"method {self.name!r}: host {self.host.name!r} has no trainable network with "
                "the decoder seam (attach_injector); SCDL cannot attach to it")
        opts = self.options
        shared: CDBA | None = None
        for network in students:
            in_channels, stages = _seam_channels(network, self.name)
            if opts.share_proxies and shared is not None:
                if (shared.in_channels, shared.stage_channels) != (in_channels, stages):
                    raise ConfigError(f"method.options.scdl.share_proxies: the networks of "
                                      f"{self.host.name!r} differ in channels; cannot share")
                cdba = shared
            else:
                cdba = CDBA(in_channels, stages, self.context.num_classes, opts)
                shared = cdba
            injector = CDBAInjector(cdba)
            network.attach_injector(injector)
            self._students.append((network, injector))
        for network in teachers:
            in_channels, stages = _seam_channels(network, self.name)
            if len(self._students) == 1:  # the teacher starts as a copy of the student's
                cdba = copy.deepcopy(self._students[0][1].cdba)
            else:  # several students: an own module, synced by the host's EMA
                cdba = CDBA(in_channels, stages, self.context.num_classes, opts)
            cdba.requires_grad_(False)
            injector = CDBAInjector(cdba)
            network.attach_injector(injector)
            self._teachers.append((network, injector))

    def proxy_networks(self) -> list[tuple[nn.Module, CDBA]]:
        """The trained (student) networks and their CDBA modules, in the host's order."""
        return [(network, injector.cdba) for network, injector in self._students]

    def teacher_networks(self) -> list[tuple[nn.Module, CDBA]]:
        """EMA teacher networks and their (frozen, EMA-updated) CDBA modules."""
        return [(network, injector.cdba) for network, injector in self._teachers]

    def scdl_parameters(self) -> list[nn.Parameter]:
        """Trainable SCDL parameters (each once, also when shared between networks)."""
        seen: set[int] = set()
        params = []
        for _, injector in self._students:
            for p in injector.cdba.parameters():
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
        return params

    # -- training ----------------------------------------------------------------------------
    def training_step(self, batch: Batch, step: StepInfo) -> dict[str, Tensor]:
        """The host's terms plus the SCDL terms of the same step."""
        if not self._students:
            return self.host.training_step(batch, step)
        for _, injector in self._students:
            injector.start_recording()
        try:
            terms = dict(self.host.training_step(batch, step))
        finally:
            records = [injector.stop_recording() for _, injector in self._students]
        clash = sorted(k for k in terms if k.startswith(TERM_PREFIX))
        if clash:
            raise ConfigError(f"method {self.name!r}: host terms {clash} collide with SCDL's")
        # The alignment losses in float32 (softmax / exp of cosines); the masked SAC passes
        # keep the ambient autocast for the encoder and embed in float32 themselves.
        with torch.autocast(batch.image.device.type, enabled=False):
            terms.update(self._alignment_terms(records, batch))
        if self.options.sac and self.options.sac_weight > 0:
            terms[TERM_PREFIX + "sac"] = self._sac_term(batch)
        return terms

    def _selected(self, records: list[TokenRecord], batch: Batch) -> list[TokenRecord]:
        rule = self.options.token_source
        if rule == "first":
            return records[:1]
        if rule == "full_patch":
            grid = _token_grid(batch.image.shape[2:])
            return [r for r in records if r.grid == grid]
        return records

    def _alignment_terms(self, records: list[list[TokenRecord]],
                         batch: Batch) -> dict[str, Tensor]:
        opts = self.options
        names = ("e2p", "p2e") if opts.loss == "paper" else ("proxy", "kl")
        totals: dict[str, Tensor] = {}
        for (_, injector), network_records in zip(self._students, records):
            mu = injector.cdba.proxy_mean
            chosen = self._selected(network_records, batch)
            if not chosen:
                values = {name: _zero(mu) for name in names}
            elif opts.loss == "paper":
                z = torch.cat([r.z.reshape(1, -1, r.z.size(-1)) for r in chosen], dim=1)
                values = {"e2p": e2p_loss(z, mu, opts.temperature),
                          "p2e": p2e_loss(z, mu, opts.temperature)}
            else:
                values = self._official_terms(injector.cdba, chosen,
                                              chosen[0] is network_records[0], batch)
            for name, value in values.items():
                key = TERM_PREFIX + name
                totals[key] = totals[key] + value if key in totals else value
        return totals

    def _official_terms(self, cdba: CDBA, chosen: list[TokenRecord], starts_with_first: bool,
                        batch: Batch) -> dict[str, Tensor]:
        """Official code variant: proxy loss over all chosen tokens, KL summed per decoding."""
        opts = self.options
        mu = cdba.proxy_mean
        tau_p2e = opts.p2e_temperature or opts.temperature
        tokens, weights = [], []
        kl = _zero(mu)
        full_grid = _token_grid(batch.image.shape[2:])
        for index, record in enumerate(chosen):
            p_e2p, p_p2e, both = official_assignments(record.z, mu, opts.temperature, tau_p2e)
            kl = kl + symmetric_kl(p_e2p, p_p2e)
            weight = both.detach()
            n_lab = batch.num_labeled
            if (opts.official_label_weights and index == 0 and starts_with_first and n_lab
                    and record.batch == batch.image.size(0) and record.grid == full_grid):
                truth = token_class_proportions(batch.label, record.grid, cdba.num_classes)
                weight = torch.cat([truth.to(weight.dtype), weight[n_lab:]], dim=0)
            tokens.append(record.z.reshape(1, -1, record.z.size(-1)))
            weights.append(weight.reshape(1, -1, weight.size(-1)))
        samples = sample_proxies(mu, cdba.proxy_sigma, opts.proxy_samples)
        proxy = official_alignment_loss(torch.cat(tokens, 1), samples, torch.cat(weights, 1),
                                        opts.official_dist_weight)
        return {"proxy": proxy, "kl": kl}

    # -- SAC ---------------------------------------------------------------------------------
    def sac_pairs(self, label: Tensor) -> list[tuple[int, int]]:
        """(labeled crop, class) pairs of one step's masked passes.

        Classes present in the labeled crops (background only with
        ``sac_include_background``), rarest first by voxel count in the batch (ties: lower
        id), capped at ``sac_max_classes``; each class paired with every crop holding it.
        """
        num_classes = self.context.num_classes
        flat = label.reshape(label.size(0), -1).long()
        per_crop = torch.stack([torch.bincount(row, minlength=num_classes) for row in flat])
        counts = per_crop.sum(0).tolist()
        first = 0 if self.options.sac_include_background else 1
        classes = sorted((c for c in range(first, num_classes) if counts[c] > 0),
                         key=lambda c: (counts[c], c))
        if self.options.sac_max_classes:
            classes = classes[: self.options.sac_max_classes]
        return [(i, c) for c in classes for i in range(label.size(0)) if per_crop[i, c] > 0]

    @torch.no_grad()
    def class_anchors(self, network: nn.Module, cdba: CDBA, image: Tensor, label: Tensor,
                      pairs: list[tuple[int, int]]) -> tuple[Tensor, Tensor]:
        """Eq. 8 anchors from masked crops through ``network``'s encoder (no gradients).

        Each pair ``(i, c)``: crop ``i`` with every voxel not labelled ``c`` set to
        ``sac_fill_value``; its bottleneck tokens whose cell's c-fraction exceeds
        ``sac_min_fraction`` are class-c embeddings. Returns ``(anchors [C, D], present [C])``.
        """
        opts = self.options
        embeddings, classes = [], []
        with _buffers_restored(network):
            for start in range(0, len(pairs), opts.sac_max_batch):
                chunk = pairs[start: start + opts.sac_max_batch]
                rows = torch.tensor([i for i, _ in chunk], device=label.device)
                cls = torch.tensor([c for _, c in chunk], device=label.device)
                masks = label[rows] == cls.view(-1, 1, 1, 1)
                fill = torch.full((), opts.sac_fill_value, dtype=image.dtype, device=image.device)
                masked = torch.where(masks[:, None], image[rows], fill)
                bottleneck = network.encode(masked)[-1]
                with torch.autocast(image.device.type, enabled=False):
                    z = cdba.embed(bottleneck)  # [P, L, D]
                fraction = token_fractions(masks, bottleneck.shape[2:])  # [P, L]
                keep = fraction > opts.sac_min_fraction
                embeddings.append(z[keep])
                classes.append(cls[:, None].expand_as(keep)[keep])
        return semantic_anchors(torch.cat(embeddings), torch.cat(classes), cdba.num_classes,
                                normalize=opts.sac_normalize_tokens)

    def _sac_term(self, batch: Batch) -> Tensor:
        total = _zero(self._students[0][1].cdba.proxy_mean)
        if batch.num_labeled == 0:
            return total
        image, label = batch.labeled_image, batch.label
        pairs = self.sac_pairs(label)
        if not pairs:
            return total
        for network, injector in self._students:
            anchors, present = self.class_anchors(network, injector.cdba, image, label, pairs)
            total = total + sac_loss(injector.cdba.proxy_mean, anchors, present)
        return total

    # -- the rest of the Method interface ------------------------------------------------------
    def loss_weights(self, step: StepInfo) -> dict[str, float]:
        """The host's weights plus the SCDL weights of the terms this configuration returns."""
        weights = dict(self.host.loss_weights(step))
        if not self._students:
            return weights
        opts = self.options
        if opts.loss == "paper":
            weights.update({"scdl_e2p": opts.e2p_weight, "scdl_p2e": opts.p2e_weight})
        else:
            weights.update({"scdl_proxy": opts.proxy_weight, "scdl_kl": opts.kl_weight})
        if opts.sac and opts.sac_weight > 0:
            weights["scdl_sac"] = opts.sac_weight
        return weights

    def after_step(self, step: StepInfo) -> None:
        """The host's (EMA teachers average the SCDL modules with the rest of the network)."""
        self.host.after_step(step)

    def observe_labeled_labels(self, labels: Iterable[np.ndarray]) -> None:
        """The host's (e.g. DHC's initial DistDW histogram)."""
        self.host.observe_labeled_labels(labels)

    def parameter_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """The host's groups without SCDL parameters, plus one SCDL group with
        ``scdl.weight_decay`` (paper 3.1: 1e-4)."""
        scdl = self.scdl_parameters()
        ids = {id(p) for p in scdl}
        groups = []
        for group in self.host.parameter_groups(weight_decay):
            params = [p for p in group["params"] if id(p) not in ids]
            if params:
                groups.append({**group, "params": params})
        if scdl:
            groups.append({"params": scdl, "weight_decay": self.options.weight_decay})
        return groups

    def inference_network(self) -> nn.Module:
        return self.host.inference_network()

    def frozen_modules(self) -> Iterable[nn.Module]:
        return self.host.frozen_modules()


def _token_grid(spatial: Iterable[int]) -> tuple[int, ...]:
    return tuple(int(s) // ENCODER_STRIDE for s in spatial)


def _seam_channels(network: nn.Module, method: str) -> tuple[int, tuple[int, ...]]:
    try:
        stages = tuple(int(c) for c in network.decoder_stage_channels)  # type: ignore[attr-defined]
        bottleneck = int(network.bottleneck_channels)  # type: ignore[attr-defined]
    except AttributeError:
        raise ConfigError(f"method {method!r}: network {type(network).__name__} has "
                          "attach_injector but no bottleneck_channels / "
                          "decoder_stage_channels") from None
    return bottleneck, stages


def _find_networks(host: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    """(student, teacher) networks with the decoder seam, in registration order.

    A network inside an :class:`EMATeacher`, or one whose parameters are all frozen, is a
    teacher. Networks nested inside another found network are not counted twice.
    """
    teacher_ids = {id(m.network) for m in host.modules() if isinstance(m, EMATeacher)}
    students: list[nn.Module] = []
    teachers: list[nn.Module] = []
    found: list[nn.Module] = []
    for module in host.modules():
        if not callable(getattr(module, "attach_injector", None)):
            continue
        if any(module is not f and any(module is m for m in f.modules()) for f in found):
            continue
        found.append(module)
        params = list(module.parameters())
        frozen = bool(params) and not any(p.requires_grad for p in params)
        (teachers if id(module) in teacher_ids or frozen else students).append(module)
    return students, teachers


_WRAPPERS: dict[MethodClass, type[SCDLMethod]] = {}


def wrapper_class(host_cls: MethodClass) -> type[SCDLMethod]:
    """The :class:`SCDLMethod` subclass of ``host_cls`` (named ``scdl_<host>``)."""
    if host_cls not in _WRAPPERS:
        _WRAPPERS[host_cls] = type(
            f"SCDL{host_cls.__name__}", (SCDLMethod,),
            {"name": f"scdl_{host_cls.name}", "semi_supervised": host_cls.semi_supervised,
             "__module__": __name__,
             "__doc__": f"SCDL attached to {host_cls.name!r} (see SCDLMethod)."},
        )
    return _WRAPPERS[host_cls]


def split_options(options: Mapping[str, Any], method: str) -> tuple[dict, dict]:
    """``method.options`` -> (host options, SCDL options); only ``host`` and ``scdl`` keys."""
    unknown = sorted(str(k) for k in options if k not in ("host", "scdl"))
    if unknown:
        raise ConfigError(
            f"method.options: unknown key(s) {unknown} for {method!r}; an SCDL method takes "
            "its host's options under method.options.host and SCDL's under method.options.scdl")
    parts = []
    for key in ("host", "scdl"):
        value = options.get(key)
        if value is None:
            value = {}
        if not isinstance(value, Mapping):
            raise ConfigError(f"method.options.{key}: expected a mapping, got {value!r}")
        parts.append(dict(value))
    return parts[0], parts[1]


@register_plugin("scdl")
def build_scdl(host_cls: MethodClass, context: MethodContext,
               options: dict[str, Any]) -> SCDLMethod:
    """Build ``scdl_<host>``: the host with its own options, then SCDL attached to it."""
    cls = wrapper_class(host_cls)
    host_options, scdl_options = split_options(options, cls.name)
    parsed = validate_options(SCDLOptions, scdl_options, "method.options.scdl")
    check_options(parsed)
    host = host_cls(context, validate_options(host_cls.Options, host_options,
                                              "method.options.host"))
    return cls(context, host, parsed)
