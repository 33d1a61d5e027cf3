"""TAK's controller: its input, an analytic initialisation, and what its output shares.

The controller (TAK section 3.3) is ``Linear(2E -> P)`` on ``[image feature, text condition]``
and writes the ``P = 2h² + 3h + 1`` parameters of every (image, class) head. Two choices here
are not in the paper or the official code (docs/methods/tak.md, "The dynamic head"):

* **Input balance** (``controller_input: balanced``). Officially the two halves enter as they
  come; at initialisation the image half has norm 1.6-2.2 and the text half 0.3-0.65, so the
  generated heads are 90-97 % alike across classes. ``balanced`` scales each half to norm
  ``1/sqrt(2)`` and multiplies it by a learnable gain (one per half, starting at 1), so neither
  half dominates and ``||input||² = (g_image² + g_text²) / 2``: 1 at the start. The unit norm
  matters for training, not only for the start: an SGD step on the controller moves a
  generated parameter ``w_j · x`` by ``lr ||x||²`` times its gradient, so with halves of norm
  ``sqrt(E)`` (``||x||² = 2E = 512`` at the phantom's width) the generated head took steps
  hundreds of times a static head's and TAK diverged at iteration 5 at the protocol's lr 0.1;
  with ``||x|| = 1`` it learns at the rate of a static 1x1x1 head.
  ``centered`` first subtracts the mean over classes from the text half: the part every class
  shares generates the same head for every class, which softmax ignores, and the class text
  conditions are mostly that part (their cosines are high), so without centring even the
  balanced input leaves the class heads 91-94 % alike.
* **Analytic initialisation** (``controller_init: scaled``). Every generated parameter is
  ``w_j · x + b_j`` for a controller row ``w_j``. With ``w_j`` drawn i.i.d. ``N(0, s²)`` and
  ``b_j = 0`` it is ``N(0, s² ||x||²)`` for any input ``x``, so choosing
  ``s = target / sqrt(E||x||²)`` gives the generated parameters the standard deviation
  ``target``: He's ``sqrt(2 / h)`` for W1 and W2 (a ReLU follows), and PyTorch's default
  ``1 / sqrt(3 h)`` for W3 and the biases, as a static 1x1x1 convolution starts. ``E||x||²`` is
  computed without data: exactly ``(g_image² + g_text²) / 2`` for the balanced input; for the
  official input, the text half exactly (it depends on parameters only) and the image half at
  its expectation (:func:`expected_image_feature`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

CONTROLLER_INPUTS = ("official", "balanced", "centered")
CONTROLLER_INITS = ("official", "scaled")
_EPS = 1e-6


_HALF = 1.0 / math.sqrt(2.0)  # each balanced half's norm, so the whole input has norm 1


def unit_normalize(x: Tensor) -> Tensor:
    """``x`` scaled to unit L2 norm along its last axis."""
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + _EPS)


def controller_input(image_feature: Tensor, text: Tensor, gains: Tensor | None,
                     center: bool = False) -> Tensor:
    """``[B, C, 2E]``: every image's feature ``[B, E]`` beside every class's text ``[C, E]``.

    ``gains`` (two scalars) selects the balanced input: each half scaled to norm
    ``gain / sqrt(2)``; ``None`` is the official concatenation as it comes. ``center``
    subtracts the mean over classes from the text first (``controller_input: centered``).
    """
    b, c = image_feature.size(0), text.size(0)
    if center:
        text = text - text.mean(0, keepdim=True)
    if gains is not None:
        image_feature = unit_normalize(image_feature) * (gains[0] * _HALF)
        text = unit_normalize(text) * (gains[1] * _HALF)
    return torch.cat([image_feature[:, None].expand(b, c, -1),
                      text[None].expand(b, c, -1)], dim=-1)


def expected_relu_mean(weight: Tensor, bias: Tensor) -> Tensor:
    """``E[ReLU(w z + b)]`` for ``z ~ N(0, 1)``, per channel: ``b Φ(b/|w|) + |w| φ(b/|w|)``.

    After GroupNorm every channel is standard normal over the voxels of a group; global average
    pooling of its ReLU then converges to this mean (``1/sqrt(2 pi)`` = 0.399 at the default
    affine ``w = 1``, ``b = 0``).
    """
    scale = weight.abs().clamp_min(_EPS)
    t = bias / scale
    normal = torch.distributions.Normal(0.0, 1.0)
    return bias * normal.cdf(t) + scale * normal.log_prob(t).exp()


def expected_image_feature(image_pooling: Sequence[nn.Module]) -> Tensor:
    """The controller's image half at its expectation, without data: each scale's
    ``GroupNorm -> ReLU -> pool`` at :func:`expected_relu_mean`, then its linear map; the mean
    over the scales, as :meth:`TAKNet.image_feature` takes it."""
    out = []
    for branch in image_pooling:
        norm, linear = branch[0], branch[-1]
        assert isinstance(norm, nn.GroupNorm) and isinstance(linear, nn.Linear)
        pooled = expected_relu_mean(norm.weight, norm.bias)
        out.append(linear(pooled))
    return torch.stack(out).mean(0)


def generated_targets(channels: int) -> list[float]:
    """Standard deviations of ``[W1, W2, W3, b1, b2, b3]`` after :func:`init_controller`."""
    he = math.sqrt(2.0 / channels)
    default = 1.0 / math.sqrt(3.0 * channels)
    return [he, he, default, default, default, default]


@torch.no_grad()
def init_controller(controller: nn.Linear, input_sq_norm: float, sizes: Sequence[int],
                    targets: Sequence[float], generator: torch.Generator | None = None) -> None:
    """Draw the rows of each generated tensor (``sizes``, official layout) as
    ``N(0, target² / input_sq_norm)`` with zero bias (see the module docstring)."""
    if input_sq_norm <= 0:
        raise ValueError(f"controller input norm must be positive, got {input_sq_norm}")
    start = 0
    for size, target in zip(sizes, targets, strict=True):
        rows = slice(start, start + size)
        std = target / math.sqrt(input_sq_norm)
        controller.weight[rows].normal_(0.0, std, generator=generator)
        controller.bias[rows].zero_()
        start += size


def class_share(params: Tensor, rows: slice | None = None) -> Tensor:
    """Share of the generated parameters that differs between classes.

    ``params`` ``[B, C, P]`` (controller output); ``rows`` selects the parameters (default
    all). ``sum ||P_bc - mean_c P_bc||² / sum ||P_bc||²`` over images, classes and the chosen
    rows: 0 when every class gets the same head, 1 when the class heads average to zero.
    Softmax over classes ignores the shared part, so this is the part that can separate them.
    """
    chosen = params if rows is None else params[..., rows]
    chosen = chosen.detach().float()
    spread = (chosen - chosen.mean(1, keepdim=True)).pow(2).sum()
    return spread / chosen.pow(2).sum().clamp_min(1e-30)
