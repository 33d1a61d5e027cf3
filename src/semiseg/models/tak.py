"""TAK's text-driven segmentor (Gu et al., section 3.3) on the MagicNet VNet.

The MagicNet VNet (:class:`~semiseg.models.magicnet.MagicNet`: encoder, decoder, cube-location
head) keeps its encoder and decoder; the 1x1x1 output convolution is replaced by a *dynamic
head* whose parameters a controller computes per image and class from the class's text
embeddings and the image's pooled features:

1. Text: the class embeddings ``E`` ``[K, C, D]`` (K prompt kinds, e.g. position and shape; C
   classes; a buffer, not a parameter) are mapped per encoder scale by ``Linear + ReLU`` to the
   widths of x3, x4, x5 (``4F, 8F, 16F``; :meth:`TAKNet.text_scale_embeddings`). The deepest of
   them, concatenated over the K kinds, goes through ``text_fusion`` (``Linear(K 16F -> 16F) +
   ReLU``) to one ``[C, 16F]`` text condition per class (:meth:`TAKNet.text_condition`).
2. Image: ``GroupNorm -> ReLU -> global average pool -> Linear(-> 16F)`` on each of x3, x4, x5;
   the average of the three is the global image feature ``[B, 16F]``.
3. Controller: ``Linear(2 16F -> P)`` on ``[image feature, text condition]`` gives every
   (image, class) pair the ``P = 2h² + h + 2h + 1`` parameters of a three-layer 1x1x1 head
   (``h = 8``: 8-8-1 channels, P = 153), laid out as the official code does:
   ``[W1 (h x h), W2 (h x h), W3 (1 x h), b1 (h), b2 (h), b3 (1)]``, weights output-major.
4. Head: the last decoder feature goes through ``GroupNorm -> ReLU -> Conv 1x1x1 (F -> h)``; each
   class's head maps it to one logit channel (ReLU after the first two layers). Logits of all
   classes form the output ``[B, C, X, Y, Z]``. :func:`dynamic_head` runs all images and classes
   as grouped convolutions (no Python loop over classes).

For the contrastive alignment (section 3.3) :meth:`TAKNet.project_features` maps x3, x4, x5
through ``Conv 1x1x1 -> norm -> ReLU -> Conv 1x1x1`` (same width) into the embedding space of
that scale's text embeddings.

With 16 classes, 512-d text and two prompt kinds (``create_model("tak", num_classes=16,
text_dim=512, text_embeddings=E)``) the network has exactly 18,679,740 parameters, as the
official ``VNet_Magic_CLIP_2p_Contrast``: MagicNet's VNet without ``out_conv`` (9,443,232), the
location head with a bias-free first layer (8,507,419), and 729,089 for the text and head parts.
:mod:`semiseg.models.convert_tak` converts official state dicts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from semiseg.errors import ConfigError
from semiseg.models.magicnet import MagicNet
from semiseg.models.registry import register_model
from semiseg.models.tak_controller import (
    CONTROLLER_INITS,
    CONTROLLER_INPUTS,
    class_share,
    controller_input,
    expected_image_feature,
    generated_targets,
    init_controller,
)
from semiseg.models.vnet import Inject, norm_layers

# Encoder stages the text branch works with: x3, x4, x5 (indices into encode()'s list).
SCALE_STAGES = (2, 3, 4)
SCALE_STRIDES = (4, 8, 16)  # their down-sampling relative to the input


def head_parameter_count(channels: int = 8) -> int:
    """Parameters of one class's dynamic head: ``2h² + h`` weights and ``2h + 1`` biases."""
    return 2 * channels * channels + channels + 2 * channels + 1


def head_parameter_sizes(channels: int = 8) -> list[int]:
    """Sizes of ``[W1, W2, W3, b1, b2, b3]`` in one class's controller output (official order)."""
    h = channels
    return [h * h, h * h, h, h, h, 1]


def split_head_parameters(params: Tensor, channels: int = 8) -> tuple[Tensor, ...]:
    """Split ``[..., P]`` controller outputs into ``(W1, W2, W3, b1, b2, b3)``.

    Shapes ``[..., h, h]``, ``[..., h, h]``, ``[..., 1, h]`` (output channel first, as a Conv3d
    weight), ``[..., h]``, ``[..., h]``, ``[..., 1]``: the official order, weights first.
    """
    h = channels
    if params.size(-1) != head_parameter_count(h):
        raise ValueError(f"expected {head_parameter_count(h)} head parameters per class for "
                         f"{h} channels, got {params.size(-1)}")
    lead = params.shape[:-1]
    w1, w2, w3, b1, b2, b3 = torch.split(params, head_parameter_sizes(h), dim=-1)
    return (w1.reshape(*lead, h, h), w2.reshape(*lead, h, h), w3.reshape(*lead, 1, h),
            b1, b2, b3)


HEAD_CHUNK_VOXELS = 2048
"""Voxels per chunk of the CPU dynamic head (:func:`dynamic_head`, ``impl="bmm"``)."""


def _head_bmm(feature: Tensor, w1: Tensor, w2: Tensor, w3: Tensor, b1: Tensor, b2: Tensor,
              b3: Tensor) -> Tensor:
    """The three generated layers on ``feature`` ``[B, h, N]``: logits ``[B, C, N]``."""
    b, h, voxels = feature.shape
    c = w1.size(1)
    # In-place ReLU on the fresh baddbmm outputs (their backward needs the inputs, not the
    # outputs): same numbers, one [B, C h, N] allocation less per layer, 18 % faster
    # forward + backward on the CPU (4 crops of 32^3, 14 classes).
    x = torch.baddbmm(b1.reshape(b, c * h, 1), w1.reshape(b, c * h, h), feature).relu_()
    x = torch.baddbmm(b2.reshape(b * c, h, 1), w2.reshape(b * c, h, h),
                      x.reshape(b * c, h, voxels)).relu_()
    x = torch.baddbmm(b3.reshape(b * c, 1, 1), w3.reshape(b * c, 1, h), x)
    return x.reshape(b, c, voxels)


def dynamic_head(feature: Tensor, params: Tensor, channels: int = 8,
                 impl: str = "auto", chunk_voxels: int = HEAD_CHUNK_VOXELS) -> Tensor:
    """Per-image, per-class three-layer 1x1x1 heads as grouped convolutions.

    ``feature`` ``[B, h, X, Y, Z]`` (the head input), ``params`` ``[B, C, P]`` (controller
    output). Returns logits ``[B, C, X, Y, Z]``: channel c of image b is class c's head applied
    to image b's feature. The first layer reads the shared h channels once per image (groups=B,
    no copy of the input per class); the next two are one group per (image, class).

    ``impl="bmm"`` computes the same with batched matrix products (``baddbmm``): identical
    results up to float rounding, and on CPU about 15x faster than PyTorch's grouped
    3-D convolution (measured at 96^3, 2 images, 16 classes). ``impl="auto"`` (default) takes
    ``bmm`` on the CPU and ``grouped_conv`` (cuDNN) elsewhere. ``bmm`` runs over
    ``chunk_voxels`` voxels at a time.
    """
    if feature.dim() != 5 or params.dim() != 3 or feature.size(0) != params.size(0) \
            or feature.size(1) != channels:
        raise ValueError(f"feature {tuple(feature.shape)} and params {tuple(params.shape)} do not "
                         f"match (expected [B, {channels}, X, Y, Z] and [B, C, P])")
    b, h, c = feature.size(0), channels, params.size(1)
    spatial = feature.shape[2:]
    w1, w2, w3, b1, b2, b3 = split_head_parameters(params, channels)
    if impl == "auto":
        impl = "bmm" if feature.device.type == "cpu" else "grouped_conv"
    if impl == "bmm":
        flat = feature.reshape(b, h, -1)
        voxels = flat.size(-1)
        # Voxel chunks keep each chunk's [B, C h, chunk] hidden maps in cache: forward +
        # backward about 1.8x faster than one pass over the whole crop
        # (benchmarks/tak_head_speed.py), the same logits to the bit (each voxel's products are
        # unchanged), parameter gradients summed in a different order (float rounding).
        if chunk_voxels < 1:
            raise ValueError(f"chunk_voxels must be >= 1, got {chunk_voxels}")
        chunks = [_head_bmm(flat[..., start:start + chunk_voxels], w1, w2, w3, b1, b2, b3)
                  for start in range(0, voxels, chunk_voxels)]
        logits = chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=-1)
        return logits.reshape(b, c, *spatial)
    if impl != "grouped_conv":
        raise ValueError(f"unknown dynamic head implementation {impl!r} (auto|grouped_conv|bmm)")
    x = feature.reshape(1, b * h, *spatial)
    x = F.relu(F.conv3d(x, w1.reshape(b * c * h, h, 1, 1, 1), b1.reshape(-1), groups=b))
    x = F.relu(F.conv3d(x, w2.reshape(b * c * h, h, 1, 1, 1), b2.reshape(-1), groups=b * c))
    x = F.conv3d(x, w3.reshape(b * c, h, 1, 1, 1), b3.reshape(-1), groups=b * c)
    return x.reshape(b, c, *spatial)


def _group_norm(channels: int) -> nn.GroupNorm:
    # The official head uses 16 groups (all its widths are multiples of 16); narrower test
    # networks use the largest group count dividing the width.
    return nn.GroupNorm(math.gcd(16, channels), channels)


def check_text_embeddings(embeddings: Tensor, num_classes: int, where: str = "text_embeddings"
                          ) -> Tensor:
    """Validate ``[K, C, D]`` class text embeddings (K prompt kinds) and return them as float32."""
    if not isinstance(embeddings, Tensor):
        raise ConfigError(f"{where}: expected a tensor [prompt kinds, classes, dim], got "
                          f"{type(embeddings).__name__}")
    if embeddings.dim() != 3 or embeddings.size(0) < 1:
        raise ConfigError(f"{where}: expected shape [prompt kinds, classes, dim], got "
                          f"{tuple(embeddings.shape)}")
    if embeddings.size(1) != num_classes:
        raise ConfigError(f"{where}: {embeddings.size(1)} classes, but the network has "
                          f"{num_classes}")
    if not bool(torch.isfinite(embeddings).all()):
        raise ConfigError(f"{where}: contains NaN or infinite values")
    return embeddings.detach().to(torch.float32)


class TAKNet(MagicNet):
    """MagicNet VNet with TAK's text-driven dynamic head (see the module docstring)."""

    text_embeddings: Tensor

    def __init__(self, num_classes: int, text_embeddings: Tensor | None = None,
                 text_dim: int | None = None, prompt_kinds: int = 2, in_channels: int = 1,
                 n_filters: int = 16, cube_size: int = 32,
                 patch_size: int | Sequence[int] = 96, normalization: str = "instancenorm",
                 has_dropout: bool = False, location_hidden: int = 4096,
                 location_bias: bool = False, head_channels: int = 8,
                 head_impl: str = "auto", controller_input: str = "official",
                 controller_init: str = "official") -> None:
        super().__init__(num_classes, in_channels, n_filters, cube_size, patch_size,
                         normalization, has_dropout, location_hidden)
        if text_embeddings is not None:
            text_embeddings = check_text_embeddings(text_embeddings, num_classes)
            if text_dim is not None and text_dim != text_embeddings.size(2):
                raise ConfigError(f"text_dim: {text_dim} disagrees with the text embeddings' "
                                  f"width {text_embeddings.size(2)}")
            prompt_kinds, text_dim = int(text_embeddings.size(0)), int(text_embeddings.size(2))
        elif text_dim is None:
            raise ConfigError("model tak: give text_embeddings [prompt kinds, classes, dim] or "
                              "at least text_dim")
        if prompt_kinds < 1 or text_dim < 1 or head_channels < 1:
            raise ConfigError(f"model tak: prompt_kinds ({prompt_kinds}), text_dim ({text_dim}) "
                              f"and head_channels ({head_channels}) must be positive")
        if text_embeddings is None:
            # Placeholder (meta builds, conversion checks); set_text_embeddings or a state dict
            # holding "text_embeddings" fills it.
            text_embeddings = torch.zeros(prompt_kinds, num_classes, text_dim)
        self.register_buffer("text_embeddings", text_embeddings.clone())
        self.prompt_kinds = prompt_kinds
        self.text_dim = text_dim
        self.head_channels = head_channels
        if head_impl not in ("auto", "grouped_conv", "bmm"):
            raise ConfigError(f"head_impl: {head_impl!r} is not one of 'auto', 'grouped_conv', "
                              "'bmm'")
        self.head_impl = head_impl
        if controller_input not in CONTROLLER_INPUTS:
            raise ConfigError(f"controller_input: {controller_input!r} is not one of "
                              f"{', '.join(CONTROLLER_INPUTS)}")
        if controller_init not in CONTROLLER_INITS:
            raise ConfigError(f"controller_init: {controller_init!r} is not one of "
                              f"{', '.join(CONTROLLER_INITS)}")

        # The segmentation output is the dynamic head's; MagicNet's location head keeps its
        # shape, with the official bias-free first layer.
        del self.out_conv
        if not location_bias:
            first = self.location_head[0]
            assert isinstance(first, nn.Linear)
            self.location_head[0] = nn.Linear(first.in_features, first.out_features, bias=False)

        f = n_filters
        self.scale_channels: tuple[int, ...] = (4 * f, 8 * f, 16 * f)
        embed = 16 * f
        self.embed_dim = embed
        self.text_projections = nn.ModuleList(
            nn.Sequential(nn.Linear(text_dim, ch), nn.ReLU()) for ch in self.scale_channels)
        self.text_fusion = nn.Sequential(nn.Linear(prompt_kinds * embed, embed), nn.ReLU())
        self.image_pooling = nn.ModuleList(
            nn.Sequential(_group_norm(ch), nn.ReLU(), nn.AdaptiveAvgPool3d(1), nn.Flatten(1),
                          nn.Linear(ch, embed))
            for ch in self.scale_channels)
        self.controller = nn.Linear(2 * embed, head_parameter_count(head_channels))
        # Gains of the image and text halves of the balanced controller input (models/
        # tak_controller.py); the official input has none.
        self.input_gains = (nn.Parameter(torch.ones(2)) if controller_input != "official"
                            else None)
        self.center_text = controller_input == "centered"
        # Statistics of the last training-mode controller output, for the method's logs.
        self.head_stats: dict[str, Tensor] = {}
        self.head_input = nn.Sequential(_group_norm(f), nn.ReLU(),
                                        nn.Conv3d(f, head_channels, 1))
        self.feature_projections = nn.ModuleList(
            nn.Sequential(nn.Conv3d(ch, ch, 1), *norm_layers(normalization, ch), nn.ReLU(),
                          nn.Conv3d(ch, ch, 1))
            for ch in self.scale_channels)
        if controller_init == "scaled":
            self.init_controller()

    # -- text ---------------------------------------------------------------------------------
    def set_text_embeddings(self, embeddings: Tensor) -> None:
        """Replace the class text embeddings (same shape as the current ones)."""
        embeddings = check_text_embeddings(embeddings, self.num_classes)
        if embeddings.shape != self.text_embeddings.shape:
            raise ConfigError(f"text_embeddings: shape {tuple(embeddings.shape)} != the "
                              f"network's {tuple(self.text_embeddings.shape)}")
        with torch.no_grad():
            self.text_embeddings.copy_(embeddings)

    def text_scale_embeddings(self) -> list[Tensor]:
        """Text embeddings mapped to each scale: ``[K C, C_i]`` for x3, x4, x5; row ``k C + c``
        is class c's prompt of kind k (the official row order)."""
        flat = self.text_embeddings.reshape(-1, self.text_dim)
        return [projection(flat) for projection in self.text_projections]

    def text_condition(self, scale_embeddings: Sequence[Tensor] | None = None) -> Tensor:
        """The ``[C, 16F]`` text input of the controller (kinds concatenated per class, fused)."""
        deepest = (scale_embeddings if scale_embeddings is not None
                   else self.text_scale_embeddings())[-1]
        per_class = deepest.reshape(self.prompt_kinds, self.num_classes, -1)
        return self.text_fusion(per_class.permute(1, 0, 2).reshape(self.num_classes, -1))

    # -- image --------------------------------------------------------------------------------
    def image_feature(self, features: Sequence[Tensor]) -> Tensor:
        """Global image feature ``[B, 16F]``: the mean of the pooled x3, x4, x5 projections."""
        pooled = [pool(features[stage]) for pool, stage in zip(self.image_pooling, SCALE_STAGES)]
        return (pooled[0] + pooled[1] + pooled[2]) / 3

    def project_features(self, scale: int, feature: Tensor) -> Tensor:
        """Embedding map of encoder scale ``scale`` (0: x3, 1: x4, 2: x5) for the contrastive
        alignment."""
        return self.feature_projections[scale](feature)

    # -- head ---------------------------------------------------------------------------------
    def head_parameters(self, image_feature: Tensor, text: Tensor) -> Tensor:
        """Controller output ``[B, C, P]`` for image features ``[B, E]`` and text ``[C, E]``.

        In training mode (with gradients) it also keeps the share of the generated weights
        that differs between classes and the text half's share of the input, in ``head_stats``.
        """
        pair = controller_input(image_feature, text, self.input_gains, self.center_text)
        params = self.controller(pair)
        if self.training and torch.is_grad_enabled():
            weights = slice(0, sum(head_parameter_sizes(self.head_channels)[:3]))
            half = pair.size(-1) // 2
            with torch.no_grad():
                image_sq = pair[..., :half].float().pow(2).sum(-1).mean()
                text_sq = pair[..., half:].float().pow(2).sum(-1).mean()
                self.head_stats = {"class_share": class_share(params, weights),
                                   "text_input_share": text_sq / (image_sq + text_sq)}
        return params

    # -- initialisation -----------------------------------------------------------------------
    @torch.no_grad()
    def expected_controller_input_sq_norm(self) -> float:
        """``E||[image feature, text condition]||²`` at the current parameters, without data:
        exact for the balanced input, the text half exact and the image half at its
        expectation for the official one (models/tak_controller.py)."""
        if self.input_gains is not None:
            return float(self.input_gains.pow(2).sum() / 2.0)
        image = expected_image_feature(list(self.image_pooling))
        text = self.text_condition()
        return float(image.pow(2).sum() + text.pow(2).sum(-1).mean())

    @torch.no_grad()
    def init_controller(self) -> None:
        """The analytic controller initialisation (``controller_init: scaled``): generated W1
        and W2 start with He's standard deviation ``sqrt(2/h)``, W3 and the biases with a
        static 1x1x1 convolution's ``1/sqrt(3h)``, whatever the text width, the number of
        classes or the data (models/tak_controller.py)."""
        h = self.head_channels
        init_controller(self.controller, self.expected_controller_input_sq_norm(),
                        head_parameter_sizes(h), generated_targets(h))

    def head(self, feature: Tensor, features: Sequence[Tensor] | None = None,
             text: Tensor | None = None) -> Tensor:
        """Logits from the last decoder feature ``feature`` and the encoder features
        ``features`` (``[x1..x5]`` or at least indexable at 2, 3, 4) of the same images.

        ``text`` is a precomputed :meth:`text_condition` (computed here when None).
        """
        if features is None:
            raise TypeError("TAKNet.head needs the encoder features of the same images "
                            "(head(feature, features)): the controller pools x3, x4 and x5")
        if text is None:
            text = self.text_condition()
        params = self.head_parameters(self.image_feature(features), text)
        return dynamic_head(self.head_input(feature), params, self.head_channels, self.head_impl)

    def decode(self, features: Sequence[Tensor], inject: Inject | None = None) -> Tensor:
        return self.head(self.decode_features(features, inject), features)

    def forward_with_embedding(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Logits and the last decoder feature."""
        features = self.encode(x)
        embedding = self.decode_features(features)
        return self.head(embedding, features), embedding

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))

    # -- state dicts --------------------------------------------------------------------------
    def _load_from_state_dict(self, state_dict: Mapping[str, Any], prefix: str,
                              local_metadata: dict, strict: bool, missing_keys: list[str],
                              unexpected_keys: list[str], error_msgs: list[str]) -> None:
        # A state dict without text embeddings (the official checkpoints never hold them: the
        # official network re-reads its embedding file) keeps this network's own.
        key = prefix + "text_embeddings"
        if key not in state_dict and isinstance(state_dict, dict):
            state_dict[key] = self.text_embeddings
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


@register_model("tak")
def tak(num_classes: int, text_embeddings: Tensor | None = None, text_dim: int | None = None,
        prompt_kinds: int = 2, in_channels: int = 1, n_filters: int = 16, cube_size: int = 32,
        patch_size: int | Sequence[int] = 96, normalization: str = "instancenorm",
        has_dropout: bool = False, location_hidden: int = 4096, location_bias: bool = False,
        head_channels: int = 8, head_impl: str = "auto", controller_input: str = "official",
        controller_init: str = "official") -> TAKNet:
    """TAK's text-driven MagicNet (18,679,740 parameters for 16 classes, 512-d text, two prompt
    kinds, 16 filters, 32^3 cubes in 96^3 crops). ``text_embeddings`` ``[K, C, D]`` become a
    buffer; without them a zero placeholder of ``[prompt_kinds, C, text_dim]`` is used.
    ``head_impl``: ``auto`` (default: ``bmm`` on the CPU, ``grouped_conv`` on a GPU),
    ``grouped_conv`` or ``bmm`` (same numbers). ``controller_input`` (``official`` |
    ``balanced`` | ``centered``) and ``controller_init`` (``official`` = PyTorch's default |
    ``scaled``): see :mod:`semiseg.models.tak_controller`; the official network is
    ``official``/``official``."""
    return TAKNet(num_classes, text_embeddings, text_dim, prompt_kinds, in_channels, n_filters,
                  cube_size, patch_size, normalization, has_dropout, location_hidden,
                  location_bias, head_channels, head_impl, controller_input, controller_init)
