"""SAC's masked passes (SCDL paper 2.2): which (crop, class) pairs a step encodes, and the
class anchors (Eq. 8) their tokens give. Eq. 8 and Eq. 9 themselves are in
:mod:`semiseg.losses.scdl`."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from semiseg.errors import ConfigError
from semiseg.losses.scdl import semantic_anchors, token_fractions
from semiseg.models.vnet import HEAD_STAGE
from semiseg.plugins.scdl.cdba import CDBA, FeatureCapture
from semiseg.plugins.scdl.options import SCDLOptions


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


def token_stage_feature(network: nn.Module, cdba: CDBA, image: Tensor) -> Tensor:
    """The token-stage feature of ``image`` through ``network`` without the prior: the
    bottleneck of its encoder, or the head's input of a whole forward pass (read through a
    :class:`FeatureCapture` put in the injector's place for the pass)."""
    if cdba.options.tokens == "bottleneck":
        return network.encode(image)[-1]
    injector = network.injector
    capture = FeatureCapture(HEAD_STAGE)
    network.attach_injector(capture)
    try:
        network(image)
    finally:
        network.attach_injector(injector)
    if capture.feature is None:
        raise ConfigError(f"SCDL decoder tokens: {type(network).__name__} never reached the "
                          "head stage of its decoder seam")
    return capture.feature


def sac_pairs(label: Tensor, num_classes: int, options: SCDLOptions,
              iteration: int = 0) -> list[tuple[int, int]]:
    """(labeled crop, class) pairs of one step's masked passes.

    The classes present in the labeled crops (background only with
    ``sac_include_background``); with a cap ``sac_max_classes = k``, ``sac_class_order``
    ``rarest`` keeps the k rarest by voxel count in the batch (ties: lower id) and ``rotate``
    the window of k classes (in id order, cyclically) that starts at ``iteration x k``. Each
    class is paired with every crop holding it; the pairs come class by class in that order.
    """
    flat = label.reshape(label.size(0), -1).long()
    per_crop = torch.stack([torch.bincount(row, minlength=num_classes) for row in flat])
    counts = per_crop.sum(0).tolist()
    first = 0 if options.sac_include_background else 1
    present = [c for c in range(first, num_classes) if counts[c] > 0]
    cap = options.sac_max_classes
    if options.sac_class_order == "rarest":
        classes = sorted(present, key=lambda c: (counts[c], c))[: cap or None]
    elif cap and cap < len(present):
        start = (iteration * cap) % len(present)
        classes = [present[(start + j) % len(present)] for j in range(cap)]
    else:
        classes = present
    return [(i, c) for c in classes for i in range(label.size(0)) if per_crop[i, c] > 0]


@torch.no_grad()
def class_anchors(network: nn.Module, cdba: CDBA, image: Tensor, label: Tensor,
                  pairs: list[tuple[int, int]], options: SCDLOptions) -> tuple[Tensor, Tensor]:
    """Eq. 8 anchors from masked crops through ``network``'s encoder (no gradients).

    Each pair ``(i, c)``: crop ``i`` with every voxel not labelled ``c`` set to
    ``sac_fill_value``; its tokens (bottleneck voxels, or the pooled decoder feature of a
    pass without the prior) whose cell's c-fraction exceeds ``sac_min_fraction`` are
    class-c embeddings. Returns ``(anchors [C, D], present [C])``.
    """
    opts = options
    embeddings, classes = [], []
    with _buffers_restored(network):
        for start in range(0, len(pairs), opts.sac_max_batch):
            chunk = pairs[start: start + opts.sac_max_batch]
            rows = torch.tensor([i for i, _ in chunk], device=label.device)
            cls = torch.tensor([c for _, c in chunk], device=label.device)
            masks = label[rows] == cls.view(-1, 1, 1, 1)
            fill = torch.full((), opts.sac_fill_value, dtype=image.dtype, device=image.device)
            masked = torch.where(masks[:, None], image[rows], fill)
            feature = token_stage_feature(network, cdba, masked)
            with torch.autocast(image.device.type, enabled=False):
                z = cdba.embed(feature)  # [P, L, D]
            fraction = token_fractions(masks, cdba.token_grid(feature.shape[2:]))  # [P, L]
            keep = fraction > opts.sac_min_fraction
            embeddings.append(z[keep])
            classes.append(cls[:, None].expand_as(keep)[keep])
    return semantic_anchors(torch.cat(embeddings), torch.cat(classes), cdba.num_classes,
                            normalize=opts.sac_normalize_tokens)
