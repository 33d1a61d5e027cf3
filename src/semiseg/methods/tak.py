"""TAK (Gu et al., "Leveraging Textual Anatomical Knowledge for Class-Imbalanced Semi-Supervised
Multi-Organ Segmentation"): GA-MagicNet with a text-driven segmentation head and a cross-modal
contrastive alignment of visual and text embeddings.

The host is GA-MagicNet (:mod:`semiseg.methods.magicnet`, subclassed: its options, GA losses,
cube-location loss, class logger, EMA teacher, pseudo-label blending and the whole step are
reused). The network is :class:`~semiseg.models.tak.TAKNet`, whose head needs the encoder
features and the text condition as well as the last decoder feature: TAK overrides the host's
hooks (network builder, step condition, head and the scales it reads, the within-image pseudo
logits) and adds the contrastive term. Per iteration, on
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

import functools
import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from semiseg.errors import ConfigError, DataError
from semiseg.knowledge.texts import check_kinds, class_set_of
from semiseg.losses.labels import class_argmax
from semiseg.losses.schedule import sigmoid_rampup
from semiseg.losses.tak import (
    IGNORE,
    entropy,
    entropy_threshold,
    sample_visual_embeddings,
    stack_scales,
    tak_contrastive_loss,
)
from semiseg.methods.base import MethodContext, StepInfo
from semiseg.methods.magicnet import (
    CubeStep,
    GAMagicNetMethod,
    GAMagicNetOptions,
    build_cube_network,
)
from semiseg.methods.registry import register_method
from semiseg.models.magic_cube import unmix_volume
from semiseg.models.tak import SCALE_STAGES, SCALE_STRIDES, TAKNet


@dataclass(frozen=True)
class TextCondition:
    """The text side of one step: the class embeddings projected to each scale (x3, x4, x5)
    and the fused ``[C, 16F]`` condition of the dynamic head."""

    scales: list[Tensor]
    text: Tensor


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
    # -- not in the paper or the official code (docs/methods/tak.md, "The dynamic head") --
    # Every embedding row rescaled to unit root mean square (norm sqrt(D)), so MiniLM's unit
    # rows, BiomedCLIP's and the authors' file (norm ~4.8) enter alike; "none" = as encoded.
    text_norm: Literal["none", "rms"] = "none"
    # Text controls: "none" = the prompts' embeddings; "names" = "a computerized tomography of
    # a {name}" for every prompt kind; "random" = a fixed random vector per class and kind;
    # "shared" = every class gets the classes' mean embedding (the text cannot tell them apart).
    text_control: Literal["none", "names", "random", "shared"] = "none"


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
    tensor = found.tensor
    if opts.text_control == "names":
        # The name prompt of the same source: an embedding file's "name" kind, else the
        # knowledge's names encoded by the same encoder.
        names = resolve_embeddings(
            class_set.name if class_set else "custom", ["name"], opts.encoder, opts.encoder_model,
            opts.knowledge, opts.embeddings, opts.embeddings_kinds, opts.embedding_cache_dir)
        tensor = names.tensor.expand_as(tensor).clone()
    elif opts.text_control != "none":
        tensor = text_control_embeddings(tensor, opts.text_control)
    return normalize_text_rows(tensor) if opts.text_norm == "rms" else tensor


# The random text control is the same code for every run (a fixed generator), so it is one
# control, not a fresh random draw per seed.
RANDOM_TEXT_SEED = 20251126


def text_control_embeddings(embeddings: Tensor, control: str) -> Tensor:
    """``[K, C, D]`` replaced for a text control: ``random`` = i.i.d. Gaussian unit vectors per
    kind and class (fixed seed), ``shared`` = every class the mean over classes of its kind."""
    if control == "random":
        generator = torch.Generator().manual_seed(RANDOM_TEXT_SEED)
        noise = torch.randn(embeddings.shape, generator=generator)
        return noise / noise.norm(dim=-1, keepdim=True)
    if control == "shared":
        return embeddings.mean(1, keepdim=True).expand_as(embeddings).clone()
    raise ConfigError(f"method.options.text_control: unknown control {control!r}")


def normalize_text_rows(embeddings: Tensor) -> Tensor:
    """Every embedding row rescaled to unit root mean square (L2 norm ``sqrt(D)``)."""
    rms = embeddings.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-12)
    return embeddings / rms


@register_method("tak")
class TAKMethod(GAMagicNetMethod):
    """TAK on GA-MagicNet (see the module docstring): the host's step with TAKNet, its
    text-driven head (the hooks below) and the contrastive term."""

    Options = TAKOptions
    options: TAKOptions
    network: TAKNet

    # -- hooks of the host -------------------------------------------------------------------
    def check_options(self) -> None:
        super().check_options()
        _check_tak_options(self.options)

    @functools.cached_property
    def class_embeddings(self) -> Tensor:
        """The ``[K, C, D]`` class text embeddings, resolved once for student and teacher."""
        return resolve_class_embeddings(self.context, self.options)

    def build_network(self) -> TAKNet:
        """TAKNet: ``model.name`` must be ``tak``; the method sets the cube size, the patch size
        and the text embeddings."""
        network = build_cube_network(
            self.context, "tak", self.options.cube_size, "TAK trains the text-driven MagicNet",
            reserved=("text_embeddings", "text_dim", "prompt_kinds"),
            why="from its knowledge options (prompts, encoder, knowledge, embeddings)",
            text_embeddings=self.class_embeddings)
        assert isinstance(network, TAKNet)
        return network

    def step_condition(self, image: Tensor, step: StepInfo) -> TextCondition:
        """The text condition of the step (per scale, and fused)."""
        scales = self.network.text_scale_embeddings()
        return TextCondition(scales, self.network.text_condition(scales))

    def head(self, embedding: Tensor, scales: list[Tensor] | None,
             condition: TextCondition) -> Tensor:
        return self.network.head(embedding, scales, condition.text)

    def unmixed_scales(self, mixed_features: list[Tensor], permutation: Tensor) -> list[Tensor]:
        """x1..x5 of a mixed batch with x3, x4, x5 un-mixed at their cube sizes (x1, x2 are
        unused by the head and left as they are)."""
        out = list(mixed_features)
        for stage, stride in zip(SCALE_STAGES, SCALE_STRIDES):
            out[stage] = unmix_volume(mixed_features[stage], permutation,
                                      self.options.cube_size // stride)
        return out

    def reassembled_scales(self, cube_features: list[Tensor], rows: slice, count: int
                           ) -> list[Tensor]:
        """x3, x4, x5 of ``count`` images reassembled from their cubes (placed at 2, 3, 4)."""
        out: list[Tensor] = [cube_features[0][rows], cube_features[1][rows]]
        out += [self._recover(cube_features[stage][rows], count) for stage in SCALE_STAGES]
        return out

    def pseudo_cube_logits(self, cube_features: list[Tensor], local_embedding: Tensor,
                           condition: TextCondition, n_lab: int, n_unl: int,
                           num_cubes: int) -> Tensor:
        return self._tak_pseudo_cube_logits(cube_features, condition.text.detach(), n_lab,
                                            n_unl, num_cubes)

    def extra_terms(self, state: CubeStep) -> dict[str, Tensor]:
        """Step 9: the contrastive alignment (zero before ``contrast_start_epoch``)."""
        if not self.contrast_active(state.step):
            return {"contrast": torch.zeros((), device=state.image.device)}
        threshold = self.entropy_threshold(state.step)
        with torch.no_grad():
            teacher_class = class_argmax(state.teacher_probs)
            confident_teacher = torch.where(entropy(state.teacher_probs) <= threshold,
                                            teacher_class, IGNORE)
            confident_pseudo = torch.where(entropy(state.pseudo_probs) <= threshold,
                                           state.pseudo, IGNORE)
        return {"contrast": self._contrast(
            state.features, state.mixed_features, state.cube_features, state.permutation,
            state.condition.scales, state.label, confident_teacher, confident_pseudo)}

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

    # -- TAK's own parts ---------------------------------------------------------------------
    def diagnostics(self) -> dict[str, float]:
        """What the dynamic head looked like at the last training step: the share of the
        generated head weights that differs between classes (``tak/class_share``) and the text
        half's share of the controller input (``tak/text_input_share``)."""
        return {f"tak/{name}": float(value) for name, value in self.network.head_stats.items()}

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
