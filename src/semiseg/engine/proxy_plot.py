"""Where the SCDL proxies sit among the tokens: a 2-D scatter of both.

``semiseg plot-proxies RUN_OR_CHECKPOINT`` rebuilds an ``scdl_*`` run's method from its
checkpoint, cuts a few labeled cases of its dataset into crops of the training patch size,
embeds every crop's tokens (the bottleneck voxels, or the pooled last decoder feature, as the
run's ``scdl.tokens`` says) with the network's CDBA projector and centring (the embeddings the
alignment losses see), labels each token with the classes of its voxel cell, and projects
tokens and learned proxy means together to 2-D with PCA (an exact SVD of the centred points;
t-SNE would need scikit-learn, which is not a dependency). Tokens are coloured by class with the
report colours (:func:`semiseg.engine.plots.class_colors`, background grey), drawn most frequent
class first so tail classes end up on top; every class is capped at a number of tokens so that
the liver does not hide the adrenal glands. Proxies are large stars labelled with the class
abbreviation. The PNG is written atomically (:func:`semiseg.engine.plots.save_figure`).

By default (``token_class="any"``) a token counts for every class present in its cell, the rule
SAC uses for its anchors, so a token covering liver and an adrenal gland appears in both
colours; ``"majority"`` gives each token the single most frequent class of its cell.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from torch import Tensor, nn

from semiseg.data.classes import ClassSet
from semiseg.engine.plots import class_colors, save_figure
from semiseg.errors import DataError, SemisegError
from semiseg.losses.scdl import token_class_proportions

if TYPE_CHECKING:  # annotations only: the method layer is imported where it is used
    from semiseg.config import Config
    from semiseg.plugins.scdl.method import SCDLMethod

TokenClassRule = Literal["any", "majority"]
BACKGROUND_RGB = (0.62, 0.62, 0.62)


# ------------------------------------------------------------------------------ numbers


def pca_2d(points: Tensor) -> Tensor:
    """The first two principal-component coordinates of ``points`` ``[N, D]`` -> ``[N, 2]``.

    Exact SVD of the centred points (a few thousand tokens; no randomised low-rank solver
    needed). Each component's sign is fixed so that its largest loading is positive, so the
    same points always give the same picture. Fewer than two dimensions are padded with zeros.
    """
    if points.dim() != 2 or points.size(0) == 0:
        raise DataError(f"PCA needs a non-empty [N, D] matrix, got shape {tuple(points.shape)}")
    x = points.double()
    x = x - x.mean(0, keepdim=True)
    _, _, vh = torch.linalg.svd(x, full_matrices=False)
    components = vh[:2]
    index = components.abs().argmax(1)
    signs = torch.sign(components[torch.arange(components.size(0)), index])
    components = components * torch.where(signs == 0, torch.ones_like(signs), signs)[:, None]
    coords = x @ components.T
    if coords.size(1) < 2:
        coords = F.pad(coords, (0, 2 - coords.size(1)))
    return coords.to(points.dtype)


def token_classes(label: Tensor, grid: Sequence[int], num_classes: int,
                  rule: TokenClassRule = "any") -> tuple[Tensor, Tensor]:
    """Token index and class pairs of crops ``label`` ``[B, X, Y, Z]`` on the token ``grid``.

    Returns ``(token [M], cls [M])`` indexing the ``B * L`` flattened tokens. ``any``: one pair
    per class present in the token's cell; ``majority``: one pair per token, its cell's most
    frequent class (ties: the lower id).
    """
    proportions = token_class_proportions(label, grid, num_classes).flatten(0, 1)  # [B L, C]
    if rule == "majority":
        cls = proportions.argmax(1)
        return torch.arange(cls.numel(), device=cls.device), cls
    token, cls = torch.nonzero(proportions > 0, as_tuple=True)
    return token, cls


@torch.no_grad()
def collect_tokens(network: nn.Module, cdba: nn.Module, images: Tensor, labels: Tensor,
                   num_classes: int, rule: TokenClassRule = "any") -> tuple[Tensor, Tensor]:
    """Embeddings ``[M, D]`` and classes ``[M]`` of the tokens of ``images``.

    The token-stage feature (the bottleneck, or the pooled last decoder feature, as the run's
    ``scdl.tokens`` says) and ``cdba.embed`` give the tokens, as SAC's passes take them;
    classes by :func:`token_classes`. Run the network in eval mode for a stable picture.
    """
    from semiseg.plugins.scdl.sac import token_stage_feature

    feature = token_stage_feature(network, cdba, images)
    z = cdba.embed(feature).flatten(0, 1)
    token, cls = token_classes(labels, cdba.token_grid(feature.shape[2:]), num_classes, rule)
    return z[token].float().cpu(), cls.cpu()


def _class_rgb(class_set: ClassSet) -> dict[int, tuple[float, float, float]]:
    colors = {0: BACKGROUND_RGB}
    colors.update(class_colors(class_set))
    return colors


def _abbreviation(class_set: ClassSet, label: int) -> str:
    return "BG" if label == 0 else class_set.organs[label - 1].abbreviation


def plot_proxy_embedding(tokens: Tensor, classes: Tensor, proxies: Tensor, class_set: ClassSet,
                         out_path: str | Path, title: str | None = None,
                         max_tokens_per_class: int = 400, normalize: bool = True,
                         seed: int = 0, size: tuple[float, float] = (7.0, 6.0),
                         dpi: int = 100) -> Path:
    """Scatter tokens (coloured by class) and proxy means (stars) in their 2-D PCA plane.

    ``tokens`` ``[M, D]`` with ``classes`` ``[M]`` (label ids), ``proxies`` ``[C, D]`` for the
    ``C = class_set.num_classes`` classes. ``normalize`` projects unit vectors (the alignment
    losses only see directions). Each class keeps at most ``max_tokens_per_class`` tokens, drawn
    with ``seed``.
    """
    num_classes = class_set.num_classes
    if proxies.dim() != 2 or proxies.size(0) != num_classes:
        raise DataError(f"proxy plot: {proxies.size(0) if proxies.dim() else 0} proxies for the "
                        f"{num_classes} classes of {class_set.name}")
    if tokens.dim() != 2 or tokens.size(1) != proxies.size(1) or classes.shape != tokens.shape[:1]:
        raise DataError(f"proxy plot: tokens {tuple(tokens.shape)} / classes "
                        f"{tuple(classes.shape)} do not match proxies {tuple(proxies.shape)}")
    if max_tokens_per_class < 1:
        raise DataError(f"proxy plot: max_tokens_per_class must be >= 1, got "
                        f"{max_tokens_per_class}")
    classes = classes.long().cpu()
    if classes.numel() and (int(classes.min()) < 0 or int(classes.max()) >= num_classes):
        raise DataError(f"proxy plot: token classes outside 0..{num_classes - 1}")
    rng = np.random.default_rng(seed)
    counts = torch.bincount(classes, minlength=num_classes).tolist()
    keep = []
    for c in range(num_classes):
        index = torch.nonzero(classes == c).flatten().numpy()
        if index.size > max_tokens_per_class:
            index = np.sort(rng.choice(index, max_tokens_per_class, replace=False))
        keep.append(index)
    kept = torch.from_numpy(np.concatenate(keep)).long()
    points = torch.cat([tokens.detach().float().cpu()[kept], proxies.detach().float().cpu()])
    if normalize:
        points = F.normalize(points, dim=1, eps=1e-8)
    coords = pca_2d(points).numpy()
    token_xy, proxy_xy = coords[: kept.numel()], coords[kept.numel():]
    kept_classes = classes[kept].numpy()

    colors = _class_rgb(class_set)
    figure = Figure(figsize=size)
    ax = figure.add_subplot()
    # Most frequent class first: the rarest (tail) classes are drawn last, on top.
    order = sorted((c for c in range(num_classes) if counts[c]), key=lambda c: (-counts[c], c))
    handles = []
    for c in order:
        xy = token_xy[kept_classes == c]
        ax.scatter(xy[:, 0], xy[:, 1], s=7, color=colors[c], alpha=0.55, linewidths=0,
                   zorder=2 + order.index(c) / max(1, len(order)))
        handles.append(Line2D([], [], marker="o", linestyle="", color=colors[c],
                              label=f"{_abbreviation(class_set, c)} ({counts[c]})"))
    for c in range(num_classes):
        x, y = proxy_xy[c]
        ax.scatter([x], [y], s=260, marker="*", color=colors[c], edgecolors="black",
                   linewidths=0.9, zorder=10)
        ax.annotate(_abbreviation(class_set, c), (x, y), xytext=(5, 5),
                    textcoords="offset points", fontsize=8, fontweight="bold", zorder=11)
    handles.append(Line2D([], [], marker="*", linestyle="", color="white",
                          markeredgecolor="black", markersize=12, label="proxy mean"))
    ax.legend(handles=handles, fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5),
              frameon=False, title="class (tokens)", title_fontsize=7)
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.grid(linewidth=0.3)
    ax.set_title(title or f"SCDL proxies and tokens ({class_set.name}, "
                 f"{'cosine ' if normalize else ''}PCA)", fontsize=9)
    figure.subplots_adjust(left=0.1, right=0.78, top=0.92, bottom=0.09)
    return save_figure(figure, out_path, dpi)


# ------------------------------------------------------------------------------ from a run


def resolve_checkpoint(path: str | Path) -> Path:
    """A run folder -> its ``checkpoints/best.pt`` (else ``last.pt``); a file -> itself."""
    path = Path(path)
    if path.is_dir():
        for name in ("best.pt", "last.pt"):
            candidate = path / "checkpoints" / name
            if candidate.is_file():
                return candidate
        raise SemisegError(f"{path}: no checkpoints/best.pt or checkpoints/last.pt (not a run "
                           "folder, or training has not written a checkpoint yet)")
    if not path.exists():
        raise SemisegError(f"{path}: no such run folder or checkpoint")
    return path


@dataclass(frozen=True)
class SCDLRun:
    """An ``scdl_*`` run rebuilt from one of its checkpoints (weights loaded, on the CPU)."""

    checkpoint: Path
    payload: dict[str, Any]
    config: Config
    class_set: ClassSet
    method: SCDLMethod


def load_scdl_run(path: str | Path, overrides: list[str] | None = None) -> SCDLRun:
    """Rebuild the SCDL method of a run folder (its best, else last checkpoint) or of one
    checkpoint file, with the checkpoint's weights. One clear error when the run is not an
    ``scdl_*`` run with proxies, or when the weights do not fit its configuration."""
    from semiseg.data.classes import get_class_set
    from semiseg.engine.checkpoint import load_checkpoint
    from semiseg.engine.runs import config_from_checkpoint
    from semiseg.engine.setup import build_method_for
    from semiseg.errors import CheckpointError
    from semiseg.plugins.scdl.method import SCDLMethod

    checkpoint = resolve_checkpoint(path)
    payload = load_checkpoint(checkpoint)
    config = config_from_checkpoint(payload, overrides)
    class_set = get_class_set(payload.get("class_set") or config.data.dataset)
    method = build_method_for(config, class_set=class_set)
    if not isinstance(method, SCDLMethod) or not method.proxy_networks():
        raise SemisegError(f"{checkpoint}: method {config.method.name!r} has no SCDL proxies "
                           "(an scdl_* run with cdba on is needed)")
    try:
        method.load_state_dict(payload["method"])
    except RuntimeError as exc:
        raise CheckpointError(f"{checkpoint}: weights do not fit the configured method "
                              f"({exc})") from None
    return SCDLRun(checkpoint, payload, config, class_set, method)


def tile_starts(shape: Sequence[int], patch: Sequence[int]) -> list[tuple[int, ...]]:
    """Crop starts covering a volume of ``shape`` with ``patch``-sized crops, evenly spread.

    Per axis: one crop at 0 when the side is at most the patch (it is zero-padded), else
    ``ceil(side / patch)`` starts from 0 to ``side - patch``.
    """
    axes = []
    for size, p in zip(shape, patch):
        if size <= p:
            axes.append([0])
            continue
        n = math.ceil(size / p)
        axes.append(sorted({round(i * (size - p) / (n - 1)) for i in range(n)}))
    grid = np.meshgrid(*axes, indexing="ij")
    return [tuple(int(v) for v in start) for start in zip(*(g.ravel() for g in grid))]


def case_crops(image: np.ndarray, label: np.ndarray,
               patch: Sequence[int]) -> tuple[Tensor, Tensor]:
    """All :func:`tile_starts` crops of one case: ``[K, 1, *patch]`` images, ``[K, *patch]``
    labels (sides shorter than the patch are zero-padded at the end, as background)."""
    pad = [(0, max(0, p - s)) for s, p in zip(image.shape, patch)]
    image = np.pad(image, pad)
    label = np.pad(label, pad)
    crops, labels = [], []
    for start in tile_starts(image.shape, patch):
        box = tuple(slice(s, s + p) for s, p in zip(start, patch))
        crops.append(image[box])
        labels.append(label[box])
    return (torch.from_numpy(np.stack(crops)[:, None].astype(np.float32)),
            torch.from_numpy(np.stack(labels).astype(np.int64)))


def plot_proxies(path: str | Path, out: str | Path | None = None, cases: int = 2,
                 network: int = 0, subset: Literal["labeled", "eval", "test"] = "labeled",
                 rule: TokenClassRule = "any", max_tokens_per_class: int = 400,
                 device: str = "auto", overrides: list[str] | None = None,
                 dpi: int = 100) -> Path:
    """Plot the proxies of an SCDL run (folder or checkpoint) over tokens of its data.

    ``cases``: how many cases of ``subset`` (the run's labeled training cases by default) to
    embed; ``network``: which of the method's networks (CPS: 0 = A, 1 = B). Writes ``out``
    (default: ``proxies.png`` in the run folder, or next to the checkpoint).
    """
    from semiseg.engine.setup import open_split, open_store
    from semiseg.utils.seed import resolve_device

    run = load_scdl_run(path, overrides)
    checkpoint, payload, config, class_set, method = (
        run.checkpoint, run.payload, run.config, run.class_set, run.method)
    pairs = method.proxy_networks()
    if not 0 <= network < len(pairs):
        raise SemisegError(f"--network {network}: method {config.method.name!r} has "
                           f"{len(pairs)} network(s) with proxies (0..{len(pairs) - 1})")
    if cases < 1:
        raise SemisegError(f"--cases must be at least 1, got {cases}")
    run_device = resolve_device(device)
    method.to(run_device).eval()
    net, cdba = pairs[network]

    _, store = open_store(config)
    split = open_split(config, store)
    ids = (split.labeled_ids(config.data.labeled_ratio) if subset == "labeled"
           else list(split.test if subset == "test" else split.eval))
    ids = [i for i in ids if store.has_label(i)][:cases]
    if not ids:
        raise SemisegError(f"split {split.name!r} has no labeled {subset} cases to plot")
    tokens, classes = [], []
    for case_id in ids:
        images, labels = case_crops(store.image(case_id), store.label(case_id),
                                    config.data.patch_size)
        z, cls = collect_tokens(net, cdba, images.to(run_device), labels.to(run_device),
                                class_set.num_classes, rule)
        tokens.append(z)
        classes.append(cls)
    if out is None:
        run_dir = Path(path) if Path(path).is_dir() else checkpoint.parent
        out = run_dir / "proxies.png"
    title = (f"{config.method.name} - network {network}, {len(ids)} {subset} case(s), "
             f"iteration {payload.get('iteration', '?')}")
    return plot_proxy_embedding(torch.cat(tokens), torch.cat(classes), cdba.proxy_mean,
                                class_set, out, title=title,
                                max_tokens_per_class=max_tokens_per_class, dpi=dpi)
