"""The ``scdl`` plug-in: :class:`SCDLMethod` wraps a host method, attaches a
:class:`~semiseg.plugins.scdl.cdba.CDBAInjector` to each network the host names
(:meth:`~semiseg.methods.base.Method.networks`), adds the alignment and SAC terms (SAC, paper
2.2: masked crops through the same encoder anchor the proxy means) and registers as
``scdl_<host>`` for every host."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterable, Iterator
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
    semantic_anchors,
    symmetric_kl,
    token_class_proportions,
    token_fractions,
)
from semiseg.methods.base import Batch, Method, MethodContext, MethodNetworks, StepInfo
from semiseg.methods.registry import MethodClass, register_plugin
from semiseg.models.magic_cube import ENCODER_STRIDE
from semiseg.plugins.scdl.cdba import CDBA, CDBAInjector, TokenRecord
from semiseg.plugins.scdl.options import SCDLOptions, parse_options

TERM_PREFIX = "scdl_"


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

    def networks(self) -> MethodNetworks:
        return self.host.networks()

    def inference_network(self) -> nn.Module:
        return self.host.inference_network()

    def frozen_modules(self) -> Iterable[nn.Module]:
        return self.host.frozen_modules()


def _token_grid(spatial: Iterable[int]) -> tuple[int, ...]:
    return tuple(int(s) // ENCODER_STRIDE for s in spatial)


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
