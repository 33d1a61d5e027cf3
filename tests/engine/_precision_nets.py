"""Tiny networks for the precision self-check tests: one that bf16 trains correctly on any
x86 CPU, and the same with an injected op whose bf16 backward is wrong."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from semiseg.models.vnet import VNet

# 48^3: the VNet's feature maps are 48, 24, 12, 6 and 3 voxels deep, away from the 2-deep maps
# on which oneDNN's AVX-512 bf16 weight-gradient kernel fails (docs/distributed.md), so the
# healthy network is healthy on every instruction-set level.
SIZE = 48


class _ScaleGradientUnderReducedPrecision(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by ``factor`` when the forward ran
    in a reduced dtype, as a faulty low-precision kernel would."""

    @staticmethod
    def forward(ctx, x: Tensor, factor: float) -> Tensor:  # type: ignore[override]
        ctx.reduced = x.dtype in (torch.bfloat16, torch.float16)
        ctx.factor = factor
        return x.clone()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return (grad * ctx.factor if ctx.reduced else grad), None


class FaultyBlock(nn.Module):
    def __init__(self, factor: float = 1e3) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: Tensor) -> Tensor:
        return _ScaleGradientUnderReducedPrecision.apply(x, self.factor)


def _inputs() -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(1)
    image = torch.rand(2, 1, SIZE, SIZE, SIZE, generator=generator)
    # A learnable target: class = intensity band, so the gradient carries signal, not noise.
    label = (image[:, 0] * 3).long().clamp_max(2)
    return image, label


def healthy_network() -> tuple[nn.Module, Tensor, Tensor]:
    torch.manual_seed(0)
    return VNet(3, n_filters=2, normalization="none"), *_inputs()


def faulty_network(factor: float = 1e3) -> tuple[nn.Module, Tensor, Tensor]:
    net, image, label = healthy_network()
    first = net.encoder.block_one.conv
    first.insert(1, FaultyBlock(factor))  # after the first convolution
    return net, image, label


def loss_of(net: nn.Module, image: Tensor, label: Tensor) -> Callable[[], Tensor]:
    return lambda: F.cross_entropy(net(image).float(), label)
