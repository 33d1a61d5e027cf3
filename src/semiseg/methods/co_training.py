"""Two co-trained networks: what CPS and the xmed-lab co-training scripts (DHC's
``train_dhc.py``, ``train_cld.py``, ``train_simis.py``) share.

* :class:`CoTrainedPair`: networks ``net_a`` and ``net_b``, both trained; inference averages
  their logits, as the official test scripts do (``test.py --cps AB``).
* :class:`ClassWeightedPair`: a pair built by :func:`co_trained_pair` whose class statistics
  (DHC's DistDW, CLD's class weights, SimiS's weights) start from the voxel histogram of every
  labeled training volume, as the official scripts compute it before training, unless an
  option fixes the counts.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from semiseg.errors import ConfigError, DataError
from semiseg.losses.labels import class_argmax, class_histogram
from semiseg.methods.base import Batch, Method, MethodContext, MethodNetworks
from semiseg.models import create_model
from semiseg.models.ensemble import LogitAverage
from semiseg.models.init import InitScheme, init_weights


def co_trained_pair(context: MethodContext, init_a: InitScheme, init_b: InitScheme
                    ) -> tuple[nn.Module, nn.Module]:
    """The two networks of the xmed-lab co-training scripts (DHC, CLD, SimiS): the run's model
    built and initialised as ``init_a``, then built again and initialised as ``init_b`` (see
    :func:`~semiseg.models.init.init_weights`)."""
    nets = []
    for scheme in (init_a, init_b):
        net = create_model(context.model_name, context.num_classes, **context.model_options)
        init_weights(net, scheme)
        nets.append(net)
    return nets[0], nets[1]


class CoTrainedPair(Method):
    """A method training ``net_a`` and ``net_b`` (set by the subclass) side by side."""

    net_a: nn.Module
    net_b: nn.Module

    def networks(self) -> MethodNetworks:
        return MethodNetworks(trained=(self.net_a, self.net_b))

    def pair_logits(self, image: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Logits of A and of B on ``image`` (A first), and their hard pseudo labels (argmax,
        no gradient, no threshold)."""
        logits_a = self.net_a(image)
        logits_b = self.net_b(image)
        return logits_a, logits_b, class_argmax(logits_a.detach()), class_argmax(logits_b.detach())

    def inference_network(self) -> nn.Module:
        # Built on demand so the two networks are not registered twice in the state dict.
        return LogitAverage([self.net_a, self.net_b])


class ClassWeightedPair(CoTrainedPair):
    """A :func:`co_trained_pair` with class statistics started from a labeled histogram.

    Subclasses name the option that fixes the counts (``counts_option``), implement
    :meth:`initialise_class_counts` and :meth:`class_counts_ready`, and call
    :meth:`initialise_from_options` once their statistics modules exist.
    """

    counts_option: ClassVar[str] = "class_counts"

    def __init__(self, context: MethodContext, options: Any) -> None:
        super().__init__(context, options)
        self.net_a, self.net_b = co_trained_pair(context, options.init_a, options.init_b)

    @abc.abstractmethod
    def initialise_class_counts(self, counts: Tensor) -> None:
        """Start the class statistics from a voxel histogram (float64, one count per class)."""

    @abc.abstractmethod
    def class_counts_ready(self) -> bool:
        """Whether the class statistics have been started."""

    def _fixed_counts(self) -> Sequence[float] | None:
        return getattr(self.options, self.counts_option)

    def initialise_from_options(self) -> None:
        """Start from the counts the options give, if any (checked against the class count)."""
        counts = self._fixed_counts()
        if counts is None:
            return
        if len(counts) != self.context.num_classes:
            raise ConfigError(f"method.options.{self.counts_option} has {len(counts)} entries, "
                              f"expected {self.context.num_classes}")
        self.initialise_class_counts(torch.tensor(counts, dtype=torch.float64))

    def observe_labeled_labels(self, labels: Iterable[np.ndarray]) -> None:
        """The voxel histogram of every labeled training volume (the official scripts' initial
        statistics), unless the options fix the counts."""
        if self._fixed_counts() is not None:
            return
        total = torch.zeros(self.context.num_classes, dtype=torch.float64)
        for label in labels:
            total += class_histogram(torch.from_numpy(np.asarray(label)), self.context.num_classes)
        if bool(total.gt(0).any()):
            self.initialise_class_counts(total)

    def labeled_pair_logits(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """:meth:`pair_logits` of a batch that must hold labeled crops. A method built without
        the run's data (no :meth:`observe_labeled_labels`, which gives the official whole-volume
        histogram) starts its class statistics from the labeled crops of its first batch."""
        if batch.num_labeled == 0:
            raise DataError(f"{self.name}: a batch needs labeled crops (got 0 of "
                            f"{batch.image.size(0)})")
        if not self.class_counts_ready():
            self.initialise_class_counts(class_histogram(batch.label, self.context.num_classes))
        return self.pair_logits(batch.image)
