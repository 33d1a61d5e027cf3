"""TAK (Gu et al., "Leveraging Textual Anatomical Knowledge for Class-Imbalanced Semi-Supervised
Multi-Organ Segmentation"): GA-MagicNet with a text-driven segmentation head and a cross-modal
contrastive alignment of visual and text embeddings.

The host is GA-MagicNet (:mod:`semiseg.methods.magicnet`, subclassed: its options, GA losses,
cube-location loss, class logger, EMA teacher and pseudo-label blending are reused). The
network is :class:`~semiseg.models.tak.TAKNet`, whose head needs the encoder features as well as
the last decoder feature, so every head call of the host is redone with them. Per iteration, on
``L`` labeled then ``U`` unlabeled crops (the official ``train_AMOS_MagicNet_GA_TAK.py``):

1. Student forward (encoder features x1..x5, decoder, dynamic head) on the whole batch.
2. Cross-image partition and recovery: the mixed batch is encoded and decoded; the last decoder
   feature *and* x3, x4, x5 are un-mixed (at cube sizes s, s/4, s/8, s/16) and the head gives
   ``z_unmix``.
3. Teacher (EMA TAKNet) on noisy unlabeled crops: probabilities, argmax, entropy (Eq. 1).
4. ``seg_ce`` = GACE(z), ``seg_dice`` = GADice(z), ``unmix_dice`` = GADice(z_unmix) on the
   labeled crops.
5. ``location``: cube-location loss on all crops (cubes encoded one by one).
6. ``local_dice``: labeled crops' cube features decoded, decoder feature and x3..x5
   reassembled, head, GADice.
7. Pseudo labels: before iteration 101 the teacher's argmax; after, the teacher's logits
   blended per class-frequency weight with the within-image cube logits of the unlabeled
   crops, decoded by the *teacher's* decoder and head from the student's cube features, each
   cube with its own controller parameters (``pseudo_cube_decoder``, ``pseudo_cube_head``).
8. ``consistency`` = GADice(z_unmix of the unlabeled crops, pseudo label).
9. ``contrast`` (Eq. 2, from epoch ``contrast_start_epoch``): at each scale x3, x4, x5 the
   projected feature maps of the plain, cross-image recovered and within-image reassembled
   branches of all crops are labeled by ground truth (labeled) or by pseudo labels whose
   entropy is under the scheduled threshold (teacher labels for the plain and cross-image maps,
   blended labels for the within-image maps); λ_N voxels per class and scale are drawn and
   contrasted with the class text embeddings of that scale.

``L = (seg_ce + seg_dice + unmix_dice + local_dice) / 4 + 0.1 location + λ_u(e) consistency
+ λ_c contrast`` with ``λ_u(e) = 0.1 sigmoid_rampup(e, 160)`` in epochs (the official TAK ramp;
GA-MagicNet ramps over iterations), ``λ_c = 0.1`` once the contrast is on (Eq. 5).

The class text embeddings come from the method options (``prompts``, ``encoder``,
``knowledge``, ``embeddings``) through :func:`semiseg.knowledge.embeddings.resolve_embeddings`:
the packaged descriptions of the run's class set encoded by the offline MiniLM encoder and
cached on first use, unless told otherwise.

Where the paper and the official code differ, the paper is the default and the official
behaviour an option: Eq. 2 (``contrast_loss``: "paper" | "official"), λ_N per class and scale
over all maps (``contrast_sample_ratios`` [1, 0.5, 0.25] and ``contrast_sampling: per_map`` give
the official 40/20/10 per map), the start epoch (``contrast_start_epoch`` 20; the official code
starts after epoch 20, i.e. 21). See docs/methods/tak.md for every option.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from semiseg.errors import ConfigError, DataError
from semiseg.knowledge.texts import check_kinds, class_set_of
from semiseg.losses.magic_cube import (
    ClassCountLogger,
    blend_pseudo_logits,
    class_distribution_weights,
    cube_location_loss,
)
from semiseg.losses.tak import (
    IGNORE,
    entropy,
    entropy_threshold,
    sample_visual_embeddings,
    stack_scales,
    tak_contrastive_loss,
)
from semiseg.methods.base import Batch, Method, MethodContext, StepInfo, register_method
from semiseg.methods.cps import sigmoid_rampup
from semiseg.methods.ema import EMATeacher
from semiseg.methods.magicnet import (
    GAMagicNetMethod,
    GAMagicNetOptions,
    _as_triple,
    _check_options,
    split_mixed_batch,
)
from semiseg.models import create_model
from semiseg.models.magic_cube import (
    cube_location_labels,
    mix_volume,
    partition_cubes,
    random_batch_permutation,
    random_cube_order,
    unmix_volume,
)
from semiseg.models.tak import SCALE_STAGES, SCALE_STRIDES, TAKNet


@dataclass
class TAKOptions(GAMagicNetOptions):
    # -- knowledge (section 3.2-3.3; Tables 5 and 9) --
    prompts: list[str] = field(default_factory=lambda: ["position", "shape"])
    encoder: str = "minilm"  # minilm | biomedclip | clip | pmc-clip | unimed-clip | ...
    encoder_model: str | None = None  # hub id or local folder overriding the encoder default
    knowledge: str | None = None  # knowledge YAML; None = packaged file of the run's class set
    embeddings: str | None = None  # precomputed embedding file (ours or the authors' [32, 512])
    embeddings_kinds: list[str] = field(default_factory=lambda: ["shape", "position"])
    embedding_cache_dir: str | None = None  # None = $SEMISEG_CACHE_DIR or ~/.cache/semiseg
    # -- contrastive alignment (section 3.3; Tables 5, 7, 8) --
    contrast: bool = True
    contrast_weight: float = 0.1  # λ_c
    contrast_start_epoch: int = 20  # active when epoch >= this (official: > 20)
    contrast_samples: int = 40  # λ_N per class (0 = no contrast)
    contrast_sample_ratios: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])
    contrast_sampling: Literal["pooled", "per_map"] = "pooled"  # per_map = official
    contrast_views: Literal["all", "plain"] = "all"  # all = plain + cross + within (official)
    contrast_loss: Literal["paper", "official"] = "paper"
    temperature: float = 0.07
    entropy_threshold_max: float = math.log(2.0)
    entropy_threshold_floor: float = 0.75
    entropy_rampup_epochs: float = 100.0
    # -- host differences of the official TAK script --
    rampup_unit: Literal["epoch", "iteration"] = "epoch"  # λ_u = 0.1 sigmoid_rampup(epoch, 160)
    # In epochs with rampup_unit "epoch"; with "iteration" it is the host's length in units of
    # rampup_interval iterations (GA-MagicNet: 200), so set both when switching the unit.
    rampup_length: float = 160.0
    pseudo_cube_decoder: Literal["teacher", "student"] = "teacher"
    pseudo_cube_head: Literal["per_cube", "reassembled"] = "per_cube"
    # -- not in the paper or the official code --
    head_calibration: bool = False  # rescale the controller on the first batch (calibrate_head)


def _check_tak_options(opts: TAKOptions) -> None:
    check_kinds(opts.prompts, "method.options.prompts")
    check_kinds(opts.embeddings_kinds, "method.options.embeddings_kinds")
    if len(opts.contrast_sample_ratios) != len(SCALE_STAGES) or any(
            r < 0 for r in opts.contrast_sample_ratios):
        raise ConfigError("method.options.contrast_sample_ratios: three non-negative numbers "
                          f"(x3, x4, x5), got {opts.contrast_sample_ratios}")
    for key in ("contrast_weight", "contrast_samples", "contrast_start_epoch"):
        if getattr(opts, key) < 0:
            raise ConfigError(f"method.options.{key}: must be >= 0, got {getattr(opts, key)}")
    if opts.temperature <= 0:
        raise ConfigError(f"method.options.temperature: must be positive, got {opts.temperature}")


def resolve_class_embeddings(context: MethodContext, opts: TAKOptions) -> Tensor:
    """The ``[len(prompts), C, D]`` class embeddings of a run (see the module docstring)."""
    from semiseg.knowledge.embeddings import resolve_embeddings

    class_set = class_set_of(context.class_names) if context.class_names else None
    if class_set is None and opts.knowledge is None and opts.embeddings is None:
        raise ConfigError(
            f"method.options.knowledge: the run's classes {list(context.class_names)} are not "
            "the Synapse or AMOS class set; give a knowledge YAML (knowledge=FILE) or an "
            "embedding file (embeddings=FILE)")
    found = resolve_embeddings(
        class_set.name if class_set else "custom", opts.prompts, opts.encoder,
        opts.encoder_model, opts.knowledge, opts.embeddings, opts.embeddings_kinds,
        opts.embedding_cache_dir)
    if found.num_classes != context.num_classes:
        source = opts.embeddings or opts.knowledge or "the packaged knowledge"
        raise DataError(f"{source}: {found.num_classes} classes of text embeddings, but the run "
                        f"has {context.num_classes}")
    return found.tensor


def build_tak_network(context: MethodContext, cube_size: int, embeddings: Tensor) -> TAKNet:
    """The student network: ``model.name`` must be ``tak``; the method sets the cube size, the
    patch size and the text embeddings."""
    if context.model_name != "tak":
        raise ConfigError(f"model.name: TAK trains the text-driven MagicNet; set model.name: tak "
                          f"(got {context.model_name!r})")
    model_options = dict(context.model_options)
    for key in ("text_embeddings", "text_dim", "prompt_kinds"):
        if key in model_options:
            raise ConfigError(f"model.options.{key}: set by the method from its knowledge "
                              "options (prompts, encoder, knowledge, embeddings); leave it out")
    for key, value in (("cube_size", cube_size), ("patch_size", context.patch_size)):
        if key in model_options and _as_triple(model_options[key]) != _as_triple(value):
            raise ConfigError(f"model.options.{key}: {model_options[key]!r} disagrees with the "
                              f"run's {value!r} (leave it out; the method sets it)")
        model_options[key] = value
    network = create_model("tak", context.num_classes, text_embeddings=embeddings,
                           **model_options)
    assert isinstance(network, TAKNet)
    return network


@register_method("tak")
class TAKMethod(GAMagicNetMethod):
    """TAK on GA-MagicNet (see the module docstring)."""

    Options = TAKOptions
    options: TAKOptions
    network: TAKNet

    def __init__(self, context: MethodContext, options: TAKOptions) -> None:
        # The host's __init__ would build a plain MagicNet; build the same parts with TAKNet.
        Method.__init__(self, context, options)
        _check_options(options)
        _check_tak_options(options)
        embeddings = resolve_class_embeddings(context, options)
        self.network = build_tak_network(context, options.cube_size, embeddings)
        if options.teacher_init == "independent":
            self.teacher = EMATeacher(build_tak_network(context, options.cube_size, embeddings))
        else:
            self.teacher = EMATeacher.copy_of(self.network)
        self.class_logger = ClassCountLogger(context.num_classes)
        self.grid = self.network.grid
        self.location_labels: Tensor
        self.register_buffer("location_labels", cube_location_labels(self.grid),
                             persistent=False)

    # -- schedule ----------------------------------------------------------------------------
    def contrast_active(self, step: StepInfo) -> bool:
        """Whether the contrastive term is computed at ``step``."""
        opts = self.options
        return (opts.contrast and opts.contrast_weight > 0 and opts.contrast_samples > 0
                and step.epoch >= opts.contrast_start_epoch)

    def entropy_threshold(self, step: StepInfo) -> float:
        opts = self.options
        return entropy_threshold(step.epoch, opts.entropy_threshold_max,
                                 opts.entropy_threshold_floor, opts.entropy_rampup_epochs)

    def loss_weights(self, step: StepInfo) -> dict[str, float]:
        """GA-MagicNet's weights, the consistency ramp in epochs (official TAK), and λ_c."""
        weights = super().loss_weights(step)
        opts = self.options
        if opts.rampup_unit == "epoch":
            weights["consistency"] = opts.consistency * sigmoid_rampup(step.epoch,
                                                                       opts.rampup_length)
        weights["contrast"] = opts.contrast_weight if self.contrast_active(step) else 0.0
        return weights

    # -- helpers -----------------------------------------------------------------------------
    def _unmix_scales(self, features: list[Tensor], permutation: Tensor) -> list[Tensor]:
        """x1..x5 of a mixed batch with x3, x4, x5 un-mixed at their cube sizes (x1, x2 are
        unused by the head and left as they are)."""
        out = list(features)
        for stage, stride in zip(SCALE_STAGES, SCALE_STRIDES):
            out[stage] = unmix_volume(features[stage], permutation,
                                      self.options.cube_size // stride)
        return out

    def _reassemble(self, cube_features: list[Tensor], rows: slice, count: int) -> list[Tensor]:
        """x3, x4, x5 of ``count`` images reassembled from their cubes (placed at 2, 3, 4)."""
        out: list[Tensor] = [cube_features[0][rows], cube_features[1][rows]]
        out += [self._recover(cube_features[stage][rows], count) for stage in SCALE_STAGES]
        return out

    # -- training ----------------------------------------------------------------------------
    def training_step(self, batch: Batch, step: StepInfo) -> dict[str, Tensor]:
        """The seven unweighted terms of one iteration (steps 1-9 of the module docstring)."""
        opts = self.options
        net = self.network
        image, label, n_lab, n_unl = split_mixed_batch(self.name, batch)
        size = image.size(0)
        s = opts.cube_size
        num_cubes = self.location_labels.numel()
        contrast = self.contrast_active(step)
        if opts.head_calibration and step.iteration == 0:  # a resumed run is past it
            self.calibrate_head(image)
        scale_text = net.text_scale_embeddings()
        text = net.text_condition(scale_text)

        # 1-2. Plain forward and cross-image partition-and-recovery.
        features = net.encode(image)
        logits = net.head(net.decode_features(features), features, text)
        permutation = random_batch_permutation(size, self.grid)
        mixed_features = net.encode(mix_volume(image, permutation, s))
        mixed_embedding = net.decode_features(mixed_features)
        logits_unmix = net.head(unmix_volume(mixed_embedding, permutation, s),
                                self._unmix_scales(mixed_features, permutation), text)

        # 3. Teacher on noisy unlabeled crops.
        unlabeled = batch.unlabeled_image
        noise = torch.clamp(torch.randn_like(unlabeled) * opts.noise_std,
                            -opts.noise_clip, opts.noise_clip)
        with torch.no_grad():
            teacher_logits = self.teacher(unlabeled + noise).float()
            teacher_probs = torch.softmax(teacher_logits, dim=1)
            teacher_class = teacher_probs.argmax(1)
            teacher_entropy = entropy(teacher_probs)

        # 4. Supervised terms.
        terms = {
            "seg_ce": self._ce(logits[:n_lab].float(), label),
            "seg_dice": self._dice(logits[:n_lab], label),
            "unmix_dice": self._dice(logits_unmix[:n_lab], label),
        }

        # 5. Location reasoning (each cube encoded on its own).
        cube_features = net.encode(partition_cubes(image, s).flatten(0, 1))
        bottleneck = cube_features[-1].reshape(size, num_cubes, -1)
        terms["location"] = cube_location_loss(net.locate, bottleneck, self.location_labels,
                                               random_cube_order(num_cubes))

        # 6. Within-image recovery of the labeled crops.
        labeled_rows = slice(0, n_lab * num_cubes)
        local_embedding = net.decode_features([f[labeled_rows] for f in cube_features])
        local_logits = net.head(self._recover(local_embedding, n_lab),
                                self._reassemble(cube_features, labeled_rows, n_lab), text)
        terms["local_dice"] = self._dice(local_logits, label)

        # 7. Pseudo labels (blended after blend_start_iteration).
        with torch.no_grad():
            if step.iteration > opts.blend_start_iteration:
                weights = class_distribution_weights(self.class_logger.distribution(),
                                                     opts.temperature_dist)
                cube_logits = self._tak_pseudo_cube_logits(cube_features, text.detach(),
                                                            n_lab, n_unl, num_cubes)
                blended = blend_pseudo_logits(teacher_logits, cube_logits, teacher_class,
                                              weights)
                blended_probs = torch.softmax(blended, dim=1)
                pseudo = blended_probs.argmax(1)
                pseudo_entropy = entropy(blended_probs)
            else:
                pseudo, pseudo_entropy = teacher_class, teacher_entropy
            self.class_logger.append(pseudo)
            if step.iteration % opts.logger_refresh_every == 0:
                self.class_logger.refresh()

        # 8. Consistency of the cross-image recovered prediction with the pseudo label.
        terms["consistency"] = self._dice(logits_unmix[n_lab:], pseudo)

        # 9. Cross-modal contrastive alignment.
        if contrast:
            threshold = self.entropy_threshold(step)
            confident_teacher = torch.where(teacher_entropy <= threshold, teacher_class, IGNORE)
            confident_pseudo = torch.where(pseudo_entropy <= threshold, pseudo, IGNORE)
            terms["contrast"] = self._contrast(
                features, mixed_features, cube_features, permutation, scale_text, label,
                confident_teacher, confident_pseudo)
        else:
            terms["contrast"] = torch.zeros((), device=image.device)
        return terms

    def calibrate_head(self, image: Tensor) -> dict[str, float]:
        """:meth:`TAKNet.calibrate_head` on the student; the teacher's controller gets the same
        scaling (it is an independent network, so its own statistics are measured too)."""
        measured = self.network.calibrate_head(image)
        self.teacher.network.calibrate_head(image)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # Each rank measured its own slice of the batch; DDP only syncs parameters at
            # construction, so every rank takes rank 0's scaling to stay identical.
            for net in (self.network, self.teacher.network):
                for tensor in (net.controller.weight, net.controller.bias):
                    torch.distributed.broadcast(tensor.data, src=0)
        return measured

    def _tak_pseudo_cube_logits(self, cube_features: list[Tensor], text: Tensor, n_lab: int,
                                n_unl: int, num_cubes: int) -> Tensor:
        """Within-image recovered logits of the unlabeled crops (blended into the teacher's).

        Official: the teacher's decoder and head decode the student's cube features, with the
        student's text condition, each cube with its own controller parameters.
        """
        opts = self.options
        decoder: TAKNet = (self.teacher.network if opts.pseudo_cube_decoder == "teacher"
                           else self.network)  # type: ignore[assignment]
        if opts.pseudo_cube_source == "labeled":  # GALoss indexes images 0 .. U-1
            rows = slice(0, n_unl * num_cubes)
        else:
            rows = slice(n_lab * num_cubes, (n_lab + n_unl) * num_cubes)
        cubes = [f[rows].detach() for f in cube_features]
        embedding = decoder.decode_features(cubes)
        if opts.pseudo_cube_head == "per_cube":
            return self._recover(decoder.head(embedding, cubes, text), n_unl).float()
        reassembled = [cubes[0], cubes[1]] + [self._recover(cubes[st], n_unl)
                                              for st in SCALE_STAGES]
        return decoder.head(self._recover(embedding, n_unl), reassembled, text).float()

    def _contrast(self, features: list[Tensor], mixed_features: list[Tensor],
                  cube_features: list[Tensor], permutation: Tensor, scale_text: list[Tensor],
                  label: Tensor, teacher_label: Tensor, pseudo_label: Tensor) -> Tensor:
        """Eq. 2 over the three scales (step 9 of the module docstring)."""
        opts = self.options
        net = self.network
        size = features[0].size(0)
        plain_labels = torch.cat([label, teacher_label])
        within_labels = torch.cat([label, pseudo_label])
        num_classes = self.context.num_classes
        samples = []
        for index, (stage, stride) in enumerate(zip(SCALE_STAGES, SCALE_STRIDES)):
            maps = [net.project_features(index, features[stage])]
            labels = [plain_labels]
            if opts.contrast_views == "all":
                mixed = net.project_features(index, mixed_features[stage])
                maps.append(unmix_volume(mixed, permutation, opts.cube_size // stride))
                labels.append(plain_labels)
                cubes = net.project_features(index, cube_features[stage])
                maps.append(self._recover(cubes, size))
                labels.append(within_labels)
            count = round(opts.contrast_samples * opts.contrast_sample_ratios[index])
            visual, classes = sample_visual_embeddings(
                torch.cat(maps), torch.cat(labels), count,
                per_map=opts.contrast_sampling == "per_map")
            text = scale_text[index]
            text_classes = torch.arange(num_classes, device=text.device).repeat(
                text.size(0) // num_classes)
            samples.append((torch.cat([visual.float(), text.float()]),
                            torch.cat([classes, text_classes])))
        stacked, classes, scales = stack_scales(samples)
        return tak_contrastive_loss(stacked, classes, scales, opts.temperature,
                                    opts.contrast_loss)

    def inference_network(self) -> nn.Module:
        """The student (as the official script validates and saves it)."""
        return self.network

