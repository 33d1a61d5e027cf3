"""The ``scdl`` plug-in: :class:`SCDLMethod` wraps a host method, attaches a
:class:`~semiseg.plugins.scdl.cdba.CDBAInjector` to each network the host names
(:meth:`~semiseg.methods.base.Method.networks`), adds the alignment and SAC terms (SAC, paper
2.2: masked crops through the same encoder anchor the proxy means) and registers as
``scdl_<host>`` for every host."""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from semiseg.errors import ConfigError
from semiseg.losses.scdl import (
    e2p_loss,
    official_alignment_loss,
    official_assignments,
    p2e_loss,
    sac_loss,
    sample_proxies,
    symmetric_kl,
    token_anchors,
    token_class_proportions,
)
from semiseg.methods.base import Batch, Method, MethodContext, MethodNetworks, StepInfo
from semiseg.methods.registry import MethodClass, register_plugin
from semiseg.models.magic_cube import ENCODER_STRIDE
from semiseg.plugins.scdl.cdba import CDBA, CDBAInjector, TokenRecord
from semiseg.plugins.scdl.diagnostics import (
    assignment_stats,
    class_variance_ratio,
    gradient_ratio,
    nearest_agreement,
    relative_change,
)
from semiseg.plugins.scdl.options import SCDLOptions, parse_options
from semiseg.plugins.scdl.sac import class_anchors, sac_pairs

TERM_PREFIX = "scdl_"


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
        self._diagnostics: dict[str, float] = {}
        self._previous_proxies: tuple[Tensor, Tensor] | None = None
        if options.cdba:
            self._attach()

    # -- construction ------------------------------------------------------------------------
    def _attach(self) -> None:
        # The networks the host names (Method.networks) that have the decoder seam.
        networks = self.host.networks()
        students = [n for n in networks.trained if _has_seam(n)]
        teachers = [n for n in networks.teachers if _has_seam(n)]
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
        first_injector = self._students[0][1]
        first_injector.measuring, first_injector.measured = step.log, {}
        for _, injector in self._students:
            injector.start_recording()
        try:
            terms = dict(self.host.training_step(batch, step))
        finally:
            records = [injector.stop_recording() for _, injector in self._students]
            first_injector.measuring = False
        clash = sorted(k for k in terms if k.startswith(TERM_PREFIX))
        if clash:
            raise ConfigError(f"method {self.name!r}: host terms {clash} collide with SCDL's")
        # The alignment losses in float32 (softmax / exp of cosines); the masked SAC passes
        # keep the ambient autocast for the encoder and embed in float32 themselves.
        with torch.autocast(batch.image.device.type, enabled=False):
            terms.update(self._alignment_terms(records, batch))
        if self.options.sac and self.options.sac_weight > 0:
            terms[TERM_PREFIX + "sac"] = self._sac_term(batch, step.iteration, records)
        if step.log:
            self._diagnostics = self._measure(records[0], batch, terms, step)
        return terms

    def _selected(self, records: list[TokenRecord], batch: Batch,
                  cdba: CDBA) -> list[TokenRecord]:
        rule = self.options.token_source
        if rule == "first":
            return records[:1]
        grid = crop_token_grid(cdba, batch.image.shape[2:])
        whole = [r for r in records if r.grid == grid]
        if rule == "full_patch":
            return whole
        if rule == "batch":  # whole-crop decodings until the batch is covered once
            chosen, covered = [], 0
            for record in whole:
                if covered >= batch.image.size(0):
                    break
                chosen.append(record)
                covered += record.batch
            return chosen
        return records

    def _alignment_terms(self, records: list[list[TokenRecord]],
                         batch: Batch) -> dict[str, Tensor]:
        opts = self.options
        names = ("e2p", "p2e") if opts.loss == "paper" else ("proxy", "kl")
        totals: dict[str, Tensor] = {}
        for (_, injector), network_records in zip(self._students, records):
            mu = injector.cdba.proxy_mean
            chosen = self._selected(network_records, batch, injector.cdba)
            if not chosen:
                values = {name: _zero(mu) for name in names}
            elif opts.loss == "paper":
                z = torch.cat([r.z.reshape(1, -1, r.z.size(-1)) for r in chosen], dim=1)
                truth, mask = self._labelled_truth(chosen, batch, injector.cdba, z)
                values = {"e2p": e2p_loss(z, mu, opts.temperature, opts.e2p_reduction,
                                          truth, mask),
                          "p2e": p2e_loss(z, mu, opts.temperature, truth, mask)}
            else:
                values = self._official_terms(injector.cdba, chosen,
                                              chosen[0] is network_records[0], batch)
            for name, value in values.items():
                key = TERM_PREFIX + name
                totals[key] = totals[key] + value if key in totals else value
        return totals

    def _labelled_truth(self, chosen: list[TokenRecord], batch: Batch, cdba: CDBA, z: Tensor
                        ) -> tuple[Tensor | None, Tensor | None]:
        """``labelled_assignment: truth``: the class proportions of the labelled crops' token
        cells and the mask of their tokens in the concatenated ``z`` ``[1, N, D]`` (the first
        chosen decoding holds the labelled crops first)."""
        first = chosen[0]
        n_lab = batch.num_labeled
        grid = crop_token_grid(cdba, batch.image.shape[2:])
        if (self.options.labelled_assignment != "truth" or not n_lab or first.grid != grid
                or first.batch < n_lab):
            return None, None
        proportions = token_class_proportions(batch.label, grid, cdba.num_classes)
        count = proportions.size(0) * proportions.size(1)
        truth = z.new_zeros(1, z.size(1), cdba.num_classes)
        truth[0, :count] = proportions.reshape(count, -1)
        mask = torch.zeros(1, z.size(1), dtype=torch.bool, device=z.device)
        mask[0, :count] = True
        return truth, mask

    def _official_terms(self, cdba: CDBA, chosen: list[TokenRecord], starts_with_first: bool,
                        batch: Batch) -> dict[str, Tensor]:
        """Official code variant: proxy loss over all chosen tokens, KL summed per decoding."""
        opts = self.options
        mu = cdba.proxy_mean
        tau_p2e = opts.p2e_temperature or opts.temperature
        tokens, weights = [], []
        kl = _zero(mu)
        full_grid = crop_token_grid(cdba, batch.image.shape[2:])
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

    def _measure(self, records: list[TokenRecord], batch: Batch, terms: dict[str, Tensor],
                 step: StepInfo) -> dict[str, float]:
        """The diagnostics of this step for the first network (see :meth:`diagnostics`)."""
        network, injector = self._students[0]
        cdba = injector.cdba
        opts = self.options
        out: dict[str, float] = {}
        chosen = self._selected(records, batch, cdba)
        with torch.no_grad():
            mu = cdba.proxy_mean.detach()
            if chosen:
                z = torch.cat([r.z.detach().reshape(1, -1, r.z.size(-1)) for r in chosen], 1)
                out.update(assignment_stats(z, mu, opts.temperature))
            n_lab = batch.num_labeled
            whole = [r for r in chosen if r.batch == batch.image.size(0)]
            if whole and n_lab:
                grid = whole[0].grid
                majority = token_class_proportions(batch.label, grid,
                                                   cdba.num_classes).argmax(-1)  # [n_lab, L]
                out.update(nearest_agreement(whole[0].z.detach()[:n_lab], mu, majority))
                prior = injector.measured.get("prior")
                if prior is not None and prior.size(0) >= n_lab \
                        and prior.size(1) == majority.size(1):
                    out["prior_class_ratio"] = class_variance_ratio(
                        prior[:n_lab].reshape(-1, prior.size(-1)), majority.reshape(-1))
            if "prior_share" in injector.measured:
                out["prior_share"] = float(injector.measured["prior_share"])
            sigma = cdba.proxy_sigma.detach()
            if self._previous_proxies is not None:
                out["mu_change"] = relative_change(mu, self._previous_proxies[0])
                out["sigma_change"] = relative_change(sigma, self._previous_proxies[1])
            self._previous_proxies = (mu.clone(), sigma.clone())
        encoder = getattr(network, "encoder", None)
        if isinstance(encoder, nn.Module) and torch.is_grad_enabled():
            out["encoder_grad_ratio"] = gradient_ratio(terms, self.loss_weights(step),
                                                       TERM_PREFIX, encoder.parameters())
        return {f"scdl/{name}": value for name, value in out.items()}

    # -- SAC ---------------------------------------------------------------------------------
    def sac_pairs(self, label: Tensor, iteration: int = 0) -> list[tuple[int, int]]:
        """:func:`~semiseg.plugins.scdl.sac.sac_pairs` with this method's options."""
        return sac_pairs(label, self.context.num_classes, self.options, iteration)

    def class_anchors(self, network: nn.Module, cdba: CDBA, image: Tensor, label: Tensor,
                      pairs: list[tuple[int, int]]) -> tuple[Tensor, Tensor]:
        """:func:`~semiseg.plugins.scdl.sac.class_anchors` with this method's options."""
        return class_anchors(network, cdba, image, label, pairs, self.options)

    def _sac_term(self, batch: Batch, iteration: int,
                  records: list[list[TokenRecord]]) -> Tensor:
        total = _zero(self._students[0][1].cdba.proxy_mean)
        if batch.num_labeled == 0:
            return total
        image, label = batch.labeled_image, batch.label
        if self.options.sac_source == "labelled_tokens":
            for (_, injector), network_records in zip(self._students, records):
                cdba = injector.cdba
                grid = crop_token_grid(cdba, batch.image.shape[2:])
                labelled = [r for r in self._selected(network_records, batch, cdba)
                            if r.grid == grid and r.batch >= batch.num_labeled]
                if not labelled:
                    continue
                weights = token_class_proportions(label, grid, cdba.num_classes)
                if not self.options.sac_include_background:
                    weights[..., 0] = 0.0
                anchors, present = token_anchors(labelled[0].z[:batch.num_labeled].detach(),
                                                 weights)
                total = total + sac_loss(cdba.proxy_mean, anchors, present)
            return total
        pairs = self.sac_pairs(label, iteration)
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
        """The host's (EMA teachers average the SCDL modules with the rest of the network);
        a teacher's running token mean (a buffer, which the EMA leaves alone) is its
        student's."""
        self.host.after_step(step)
        if self.options.center_tokens and len(self._students) == 1:
            mean = self._students[0][1].cdba.token_mean
            for _, injector in self._teachers:
                injector.cdba.token_mean.copy_(mean)

    def diagnostics(self) -> dict[str, float]:
        """The host's diagnostics and SCDL's, measured at the last logged step (first network):

        * ``scdl/assign_max_mean``, ``scdl/assign_max_max``: mean and largest over the tokens
          of ``max_c P(c|z)`` (Eq. 2; uniform is 1/C);
        * ``scdl/nearest_agreement`` (and ``_fg``, foreground tokens only): how often a
          labelled crop's token's nearest proxy is the class holding most of its cell;
        * ``scdl/prior_share``: norm of the added prior over the norm of the feature it is
          added to (first injection stage of the first decoding);
        * ``scdl/prior_class_ratio``: the prior's variance between the labelled tokens' classes
          over its variance within them (how much class information it carries);
        * ``scdl/mu_change``, ``scdl/sigma_change``: relative change of the proxy means and
          standard deviations since the previous logged step;
        * ``scdl/encoder_grad_ratio``: norm of the SCDL terms' gradient on the encoder over the
          host terms' (method weights, without ``train.loss_weights`` scales).
        """
        return {**self.host.diagnostics(), **self._diagnostics}

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

    def networks(self) -> MethodNetworks:
        return self.host.networks()

    def inference_network(self) -> nn.Module:
        return self.host.inference_network()

    def frozen_modules(self) -> Iterable[nn.Module]:
        return self.host.frozen_modules()


def crop_token_grid(cdba: CDBA, spatial: Iterable[int]) -> tuple[int, ...]:
    """The token grid of a whole crop of ``spatial`` size (bottleneck: 1/16 per axis)."""
    if cdba.options.tokens == "bottleneck":
        return tuple(int(s) // ENCODER_STRIDE for s in spatial)
    return cdba.token_grid(spatial)


def _has_seam(network: nn.Module) -> bool:
    return callable(getattr(network, "attach_injector", None))


def _seam_channels(network: nn.Module, method: str) -> tuple[int, tuple[int, ...]]:
    try:
        stages = tuple(int(c) for c in network.decoder_stage_channels)  # type: ignore[attr-defined]
        bottleneck = int(network.bottleneck_channels)  # type: ignore[attr-defined]
    except AttributeError:
        raise ConfigError(f"method {method!r}: network {type(network).__name__} has "
                          "attach_injector but no bottleneck_channels / "
                          "decoder_stage_channels") from None
    return bottleneck, stages


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


@register_plugin("scdl", parse_options)
def build_scdl(host_cls: MethodClass, context: MethodContext,
               options: tuple[Any, SCDLOptions]) -> SCDLMethod:
    """Build ``scdl_<host>`` from parsed options (:func:`~semiseg.plugins.scdl.options.
    parse_options`): the host with its own options, then SCDL attached to it."""
    host_options, scdl_options = options
    return wrapper_class(host_cls)(context, host_cls(context, host_options), scdl_options)
