"""MagicNet (Chen et al., CVPR 2023) and GA-MagicNet (Qi et al., ECCV 2024).

A student VNet_Magic (:mod:`semiseg.models.magicnet`) and an EMA teacher. Per iteration t, on a
batch of ``L`` labeled then ``U`` unlabeled crops (2 + 2 officially, 96^3, 32^3 cubes):

1. ``z = student(x)`` on the whole batch.
2. Cross-image partition and recovery: for each cube position an independent permutation of the
   batch mixes cubes across images; the mixed batch goes through the student, its last decoder
   feature is un-mixed and the 1x1x1 head gives ``z_unmix``.
3. Teacher: ``z_T = teacher(x_u + clamp(0.1 N(0, 1), ±0.2))`` (no gradient), classes ``argmax``.
4. Supervised terms on the labeled crops: ``seg_ce`` = CE(z), ``seg_dice`` = Dice(z),
   ``unmix_dice`` = Dice(z_unmix).
5. Location reasoning: every crop is cut into N cubes, each cube encoded on its own; the location
   head classifies each cube's bottleneck into its grid position (``location``, all B crops,
   cube order shuffled once per iteration).
6. Within-image recovery: the labeled crops' cube features are decoded cube by cube and
   reassembled; ``local_dice`` = Dice of that prediction.
7. Cube-wise pseudo-label blending (t > 100): the unlabeled crops' cube features are decoded
   (student, no gradient) and reassembled into ``z_cube``; per voxel
   ``z_PL = (1 - ω_c) z_T + ω_c z_cube`` with ``ω`` from the class counts of the last ≤ 20
   iterations' pseudo labels (:mod:`semiseg.losses.magic_cube`); pseudo label ``argmax``.
   Before that the teacher's argmax is the pseudo label. The pseudo label's classes are logged;
   every 20 iterations the logged counts become the new distribution.
8. ``consistency`` = Dice(z_unmix of the unlabeled crops, pseudo label).

``L = (seg_ce + seg_dice + unmix_dice + local_dice) / 4 + 0.1 location + λ(t) consistency`` with
``λ(t) = 0.1 sigmoid_rampup(t // 350, 200)``: the 1/4, 0.1 and λ(t) are :meth:`loss_weights`.
GALoss kept these 70k-iteration MagicNet constants for its ~17k-iteration runs, so λ stays below
≈ 0.0058 there. After each step the teacher gets ``α = min(1 - 1/(t+1), 0.99)`` EMA of the
student's parameters (not buffers).

* ``magicnet``: CE (PyTorch mean) and MagicNet's squared Dice (all classes incl. background).
* ``ga_magicnet``: GACE (k = 10, γ = 0.5) and GADice in their place, everywhere (supervised,
  cross-image, within-image and consistency Dice), as GALoss's ``train_*_MagicNet.py``.

Choices where the official code and the paper differ (options):

* ``official_transposed_recovery`` (default False): the official within-image recovery
  transposes the cube grid X <-> Z; the default recovers cubes in place as the paper states.
* ``pseudo_cube_source`` (default "unlabeled", MagicNet): GALoss decodes the *labeled* crops'
  cube features as the within-image pseudo logits of the unlabeled crops (its ``get_mix_pl``
  indexes images 0..U-1); "labeled" reproduces that.
* The teacher stays in train mode like the official ``ema_model.train()``: it is not in
  ``frozen_modules``. With instance norm (no running statistics) and a teacher that never runs
  the location head, train and eval mode give the same teacher outputs.
* ``teacher_init`` "independent" (default, official): the teacher is a second, separately
  initialised network; "copy" starts it as a copy of the student. Since α(0) = 0 the teacher
  equals the student after the first update either way; only iteration 0's teacher differs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from semiseg.errors import ConfigError, DataError
from semiseg.losses.ga import ga_ce_loss, ga_dice_loss
from semiseg.losses.labels import class_argmax
from semiseg.losses.magic_cube import (
    ClassCountLogger,
    blend_pseudo_logits,
    class_distribution_weights,
    cube_location_loss,
    squared_dice_loss,
)
from semiseg.losses.schedule import sigmoid_rampup
from semiseg.losses.supervised import GAOptions
from semiseg.methods.base import Batch, Method, MethodContext, MethodNetworks, StepInfo
from semiseg.methods.ema import EMATeacher, ema_decay_at
from semiseg.methods.registry import register_method
from semiseg.models import create_model
from semiseg.models.magic_cube import (
    cube_location_labels,
    mix_volume,
    partition_cubes,
    random_batch_permutation,
    random_cube_order,
    recover_cubes,
    unmix_volume,
)
from semiseg.models.magicnet import MagicNet


@dataclass
class MagicNetOptions(GAOptions):
    # "magicnet": CE + MagicNet's squared Dice; "ga": GACE + GADice (GA-MagicNet).
    losses: Literal["magicnet", "ga"] = "magicnet"
    cube_size: int = 32  # 27 cubes of 32^3 in the official 96^3 crops
    supervised_weight: float = 0.25  # 1 / count_ss: the four supervised terms are averaged
    location_weight: float = 0.1
    consistency: float = 0.1  # maximum λ
    rampup_length: float = 200.0  # sigmoid ramp length, in units of rampup_interval iterations
    rampup_interval: int = 350  # λ(t) = consistency * sigmoid_rampup(t // 350, 200)
    ema_decay: float = 0.99
    ema_buffers: bool = False  # official: parameters only
    noise_std: float = 0.1  # teacher input noise clamp(std N(0,1), ±clip)
    noise_clip: float = 0.2
    temperature_dist: float = 1.0  # T_dist of the class-distribution weights
    blend_start_iteration: int = 100  # blending when iteration > this (BTCV script)
    logger_refresh_every: int = 20  # class counts refreshed when iteration % 20 == 0
    pseudo_cube_source: Literal["unlabeled", "labeled"] = "unlabeled"  # "labeled" = GALoss
    official_transposed_recovery: bool = False
    teacher_init: Literal["independent", "copy"] = "independent"


@dataclass
class GAMagicNetOptions(MagicNetOptions):
    losses: Literal["magicnet", "ga"] = "ga"


def _as_triple(value: object) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value, value, value)
    return tuple(int(v) for v in value)  # type: ignore[attr-defined]


def _check_options(options: MagicNetOptions) -> None:
    positive = {
        "temperature_dist": options.temperature_dist,
        "logger_refresh_every": options.logger_refresh_every,
        "rampup_interval": options.rampup_interval,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"method.options.{key}: must be positive, got {value}")
    if not 0.0 <= options.ema_decay <= 1.0:
        raise ConfigError(f"method.options.ema_decay: must be in [0, 1], got {options.ema_decay}")
    if options.rampup_length < 0:
        raise ConfigError(f"method.options.rampup_length: must be >= 0, got "
                          f"{options.rampup_length}")


def build_cube_network(context: MethodContext, model_name: str, cube_size: int, family: str,
                       reserved: tuple[str, ...] = (), why: str = "", **fixed: object
                       ) -> MagicNet:
    """The student network of a magic-cube method: ``model.name`` must be ``model_name`` (the
    error says "``family`` ..."); the cube and patch size are the method's ``cube_size`` and
    the run's ``data.patch_size`` (a ``model.options`` value must agree); ``fixed`` are further
    options the method sets, and the ``reserved`` model options are refused (set by the
    method ``why``)."""
    if context.model_name != model_name:
        raise ConfigError(f"model.name: {family}; set model.name: {model_name} "
                          f"(got {context.model_name!r})")
    model_options = dict(context.model_options)
    for key in reserved:
        if key in model_options:
            raise ConfigError(f"model.options.{key}: set by the method {why}; leave it out")
    for key, value in (("cube_size", cube_size), ("patch_size", context.patch_size)):
        if key in model_options and _as_triple(model_options[key]) != _as_triple(value):
            raise ConfigError(
                f"model.options.{key}: {model_options[key]!r} disagrees with the run's {value!r} "
                "(leave it out; the method sets it)"
            )
        model_options[key] = value
    network = create_model(model_name, context.num_classes, **fixed, **model_options)
    assert isinstance(network, MagicNet)
    return network


@dataclass
class CubeStep:
    """What one step of a magic-cube method computed, for a subclass's extra terms."""

    step: StepInfo
    image: Tensor  # labeled then unlabeled crops
    label: Tensor  # int64, labeled crops
    num_labeled: int
    features: list[Tensor]  # encoder features of the plain batch
    mixed_features: list[Tensor]  # ... of the cross-image mixed batch
    permutation: Tensor  # the cube permutation of the mixed batch
    cube_features: list[Tensor]  # ... of every crop's cubes, encoded one by one
    teacher_probs: Tensor  # teacher softmax on the unlabeled crops (no gradient)
    pseudo: Tensor  # pseudo labels of the unlabeled crops
    pseudo_probs: Tensor  # the probabilities they are the argmax of
    condition: Any  # what step_condition returned


@register_method("magicnet")
class MagicNetMethod(Method):
    """MagicNet: magic-cube partition and recovery with a mean teacher.

    Subclasses with another network or head (TAK) override the hooks: :meth:`check_options`,
    :meth:`build_network`, :meth:`step_condition`, :meth:`head`, :meth:`unmixed_scales`,
    :meth:`reassembled_scales`, :meth:`pseudo_cube_logits` and :meth:`extra_terms`.
    """

    Options = MagicNetOptions

    def __init__(self, context: MethodContext, options: MagicNetOptions) -> None:
        super().__init__(context, options)
        self.check_options()
        self.network = self.build_network()
        if options.teacher_init == "independent":  # official: a second, separately drawn net
            self.teacher = EMATeacher(self.build_network())
        else:
            self.teacher = EMATeacher.copy_of(self.network)
        self.class_logger = ClassCountLogger(context.num_classes)
        self.grid = self.network.grid
        self.location_labels: Tensor
        self.register_buffer("location_labels", cube_location_labels(self.grid),
                             persistent=False)

    # -- hooks -------------------------------------------------------------------------------
    def check_options(self) -> None:
        """Reject option values the method cannot use (before anything is built)."""
        _check_options(self.options)

    def build_network(self) -> MagicNet:
        """The student, and (built a second time) the independent teacher."""
        return build_cube_network(self.context, "magicnet", self.options.cube_size,
                                  "MagicNet methods train the MagicNet VNet")

    def step_condition(self, image: Tensor, step: StepInfo) -> Any:
        """Computed once per step before the forwards and handed to every :meth:`head` call
        (TAK: the text condition). MagicNet: nothing."""
        return None

    def head(self, embedding: Tensor, scales: list[Tensor] | None, condition: Any) -> Tensor:
        """Logits of the last decoder feature ``embedding``; ``scales`` are encoder features
        of the same images (for a head that reads them; the 1x1x1 head does not)."""
        return self.network.head(embedding)

    def unmixed_scales(self, mixed_features: list[Tensor], permutation: Tensor
                       ) -> list[Tensor] | None:
        """The encoder features :meth:`head` gets with the un-mixed embedding (none here)."""
        return None

    def reassembled_scales(self, cube_features: list[Tensor], rows: slice, count: int
                           ) -> list[Tensor] | None:
        """The encoder features :meth:`head` gets with reassembled cubes (none here)."""
        return None

    def pseudo_cube_logits(self, cube_features: list[Tensor], local_embedding: Tensor,
                           condition: Any, n_lab: int, n_unl: int, num_cubes: int) -> Tensor:
        """The within-image logits blended into the teacher's (step 7; no gradient)."""
        return self._pseudo_cube_logits(cube_features, local_embedding, n_lab, n_unl, num_cubes)

    def extra_terms(self, state: CubeStep) -> dict[str, Tensor]:
        """Terms a subclass adds after the six of MagicNet (TAK: the contrast)."""
        return {}

    # -- losses ------------------------------------------------------------------------------
    def _ce(self, logits: Tensor, label: Tensor) -> Tensor:
        if self.options.losses == "ga":
            return ga_ce_loss(logits, label, self.options.ga_k, self.options.ga_gamma)
        return F.cross_entropy(logits, label.long())

    def _dice(self, logits: Tensor, label: Tensor) -> Tensor:
        probs = torch.softmax(logits.float(), dim=1)
        if self.options.losses == "ga":
            return ga_dice_loss(probs, label)
        return squared_dice_loss(probs, label)

    def _recover(self, cubes: Tensor, batch: int) -> Tensor:
        """``[batch * N, C, s, s, s]`` cube tensors back to ``[batch, C, X, Y, Z]``."""
        cubes = cubes.reshape(batch, -1, *cubes.shape[1:])
        return recover_cubes(cubes, self.grid, self.options.official_transposed_recovery)

    # -- training ----------------------------------------------------------------------------
    def training_step(self, batch: Batch, step: StepInfo) -> dict[str, Tensor]:
        """The unweighted terms of one iteration (steps 1-8 of the module docstring, then
        :meth:`extra_terms`)."""
        opts = self.options
        net = self.network
        image, label, n_lab, n_unl = split_mixed_batch(self.name, batch)
        size = image.size(0)
        s = opts.cube_size
        num_cubes = self.location_labels.numel()
        condition = self.step_condition(image, step)

        # 1-2. Plain forward and cross-image partition-and-recovery.
        features = net.encode(image)
        logits = self.head(net.decode_features(features), features, condition)
        permutation = random_batch_permutation(size, self.grid)
        mixed_features = net.encode(mix_volume(image, permutation, s))
        mixed_embedding = net.decode_features(mixed_features)
        logits_unmix = self.head(unmix_volume(mixed_embedding, permutation, s),
                                 self.unmixed_scales(mixed_features, permutation), condition)

        # 3. Teacher on noisy unlabeled crops.
        unlabeled = batch.unlabeled_image
        noise = torch.clamp(torch.randn_like(unlabeled) * opts.noise_std,
                            -opts.noise_clip, opts.noise_clip)
        with torch.no_grad():
            teacher_logits = self.teacher(unlabeled + noise).float()
            teacher_probs = torch.softmax(teacher_logits, dim=1)
            teacher_class = class_argmax(teacher_probs)

        # 4. Supervised terms.
        terms = {
            "seg_ce": self._ce(logits[:n_lab].float(), label),
            "seg_dice": self._dice(logits[:n_lab], label),
            "unmix_dice": self._dice(logits_unmix[:n_lab], label),
        }

        # 5. Location reasoning: each cube encoded on its own (one batch of B * N cubes; instance
        # norm is per sample, so this equals the official per-image loop).
        cube_features = net.encode(partition_cubes(image, s).flatten(0, 1))
        bottleneck = cube_features[-1].reshape(size, num_cubes, -1)
        terms["location"] = cube_location_loss(net.locate, bottleneck, self.location_labels,
                                               random_cube_order(num_cubes))

        # 6. Within-image recovery of the labeled crops.
        labeled_rows = slice(0, n_lab * num_cubes)
        local_embedding = net.decode_features([f[labeled_rows] for f in cube_features])
        local_logits = self.head(self._recover(local_embedding, n_lab),
                                 self.reassembled_scales(cube_features, labeled_rows, n_lab),
                                 condition)
        terms["local_dice"] = self._dice(local_logits, label)

        # 7. Cube-wise pseudo-label blending.
        with torch.no_grad():
            if step.iteration > opts.blend_start_iteration:
                weights = class_distribution_weights(self.class_logger.distribution(),
                                                     opts.temperature_dist)
                cube_logits = self.pseudo_cube_logits(cube_features, local_embedding, condition,
                                                      n_lab, n_unl, num_cubes)
                blended = blend_pseudo_logits(teacher_logits, cube_logits, teacher_class,
                                              weights)
                pseudo_probs = torch.softmax(blended, dim=1)
                pseudo = class_argmax(pseudo_probs)
            else:
                pseudo, pseudo_probs = teacher_class, teacher_probs
            self.class_logger.append(pseudo)
            if step.iteration % opts.logger_refresh_every == 0:
                self.class_logger.refresh()

        # 8. Consistency of the cross-image recovered prediction with the pseudo label.
        terms["consistency"] = self._dice(logits_unmix[n_lab:], pseudo)
        terms.update(self.extra_terms(CubeStep(
            step, image, label, n_lab, features, mixed_features, permutation, cube_features,
            teacher_probs, pseudo, pseudo_probs, condition)))
        return terms

    def _pseudo_cube_logits(self, cube_features: list[Tensor], local_embedding: Tensor,
                            n_lab: int, n_unl: int, num_cubes: int) -> Tensor:
        """Within-image recovered logits used as the unlabeled crops' cube-wise pseudo logits."""
        net = self.network
        if self.options.pseudo_cube_source == "labeled":
            # GALoss: images 0 .. U-1 of the batch (labeled when U <= L).
            rows = slice(0, n_unl * num_cubes)
            if n_unl <= n_lab:
                embedding = local_embedding[rows].detach()
            else:
                embedding = net.decode_features([f[rows] for f in cube_features])
        else:
            rows = slice(n_lab * num_cubes, (n_lab + n_unl) * num_cubes)
            embedding = net.decode_features([f[rows].detach() for f in cube_features])
        return net.head(self._recover(embedding, n_unl)).float()

    def loss_weights(self, step: StepInfo) -> dict[str, float]:
        """1/4 for the supervised terms, 0.1 for location, λ(t) for consistency."""
        opts = self.options
        ramp = sigmoid_rampup(step.iteration // opts.rampup_interval, opts.rampup_length)
        sup = opts.supervised_weight
        return {
            "seg_ce": sup,
            "seg_dice": sup,
            "unmix_dice": sup,
            "local_dice": sup,
            "location": opts.location_weight,
            "consistency": opts.consistency * ramp,
        }

    def after_step(self, step: StepInfo) -> None:
        """EMA update of the teacher with ``α = min(1 - 1/(t+1), ema_decay)``."""
        alpha = ema_decay_at(step.iteration, self.options.ema_decay)
        self.teacher.update(self.network, alpha, include_buffers=self.options.ema_buffers)

    def networks(self) -> MethodNetworks:
        return MethodNetworks(trained=(self.network,), teachers=(self.teacher.network,))

    def inference_network(self) -> nn.Module:
        """The student (the official scripts validate and save the student, not the EMA)."""
        return self.network


@register_method("ga_magicnet")
class GAMagicNetMethod(MagicNetMethod):
    """GA-MagicNet: MagicNet with GACE (k = 10, γ = 0.5) and GADice."""

    Options = GAMagicNetOptions


def split_mixed_batch(method: str, batch: Batch) -> tuple[Tensor, Tensor, int, int]:
    """``(image, labels as int64, labeled count, unlabeled count)`` of a batch that must hold
    both labeled and unlabeled crops (MagicNet mixes them)."""
    n_lab = batch.num_labeled
    n_unl = batch.image.size(0) - n_lab
    if n_lab == 0 or n_unl == 0:
        raise DataError(f"{method}: a batch needs labeled and unlabeled crops "
                        f"(got {n_lab} labeled, {n_unl} unlabeled)")
    return batch.image, batch.label.long(), n_lab, n_unl
