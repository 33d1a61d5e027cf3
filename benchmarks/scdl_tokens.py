"""What SCDL's tokens can tell apart, and whether its losses can put the proxies on them.

Two measurements on the features of a trained network (a run folder's checkpoint, e.g. the
comparison protocol's labelled-only lower bound), on whole phantom training cases:

1. **Token purity** for each token source SCDL can use (``tokens: bottleneck`` and
   ``tokens: decoder`` at strides 8, 4 and 2): how many organs are ever the majority of a
   token's cell, the share of tokens whose majority is an organ, and how often the nearest
   class mean (built on the first half of the cases, centred) names the majority class of a
   held-out foreground token. A token grid whose cells no organ dominates gives the proxies
   nothing to learn.
2. **Proxy-only fits** on decoder tokens (stride 4, centred): the proxies alone trained from
   the official Xavier-uniform start with SGD (lr 0.1, momentum 0.9, SCDL's loss weights 0.1)
   for ``--steps`` steps on Eq. 3 + Eq. 4 (+ Eq. 9 with anchors from the labelled tokens), for
   the paper's temperature 1, the official 0.2, and the assignment variants of
   ``labelled_assignment``. Printed: how often a held-out foreground token's nearest proxy is
   its majority class, the mean of that over organs, and over all tokens.

docs/methods/scdl.md ("Defaults, and the measurements behind them") quotes the output::

    python benchmarks/scdl_tokens.py runs/compare/vnet_lower/seed0
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor


def _features(run_dir: Path, cases: int) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """Bottleneck features, head-stage features and labels of the first ``cases`` training
    cases (whole volumes, cut to a multiple of 16 voxels), through the run's best network."""
    from semiseg.engine.checkpoint import load_checkpoint
    from semiseg.engine.runs import config_from_checkpoint
    from semiseg.engine.setup import build_method_for, prepare_run_data

    checkpoint = load_checkpoint(run_dir / "checkpoints" / "best.pt")
    config = config_from_checkpoint(checkpoint)
    data = prepare_run_data(config)
    method = build_method_for(config, data)
    method.load_state_dict(checkpoint["method"])
    method.eval()
    network = method.inference_network()
    bottleneck, head, labels = [], [], []
    with torch.no_grad():
        for case in list(data.split.train)[:cases]:
            image = torch.from_numpy(data.store.image(case)).float()[None, None]
            label = torch.from_numpy(data.store.label(case)).long()[None]
            shape = [s - s % 16 for s in image.shape[2:]]
            image = image[..., : shape[0], : shape[1], : shape[2]]
            label = label[..., : shape[0], : shape[1], : shape[2]]
            encoded = network.encode(image)
            network.decode_features(encoded, lambda stage, x: _keep_head(stage, x, head))
            bottleneck.append(encoded[-1])
            labels.append(label)
    return bottleneck, head, labels


def _keep_head(stage: int, feature: Tensor, into: list[Tensor]) -> Tensor:
    """Decoder seam hook: keep the head stage's input, change nothing."""
    from semiseg.models.vnet import HEAD_STAGE

    if stage == HEAD_STAGE:
        into.append(feature)
    return feature


def _tokens(features: list[Tensor], labels: list[Tensor], stride: int | None,
            num_classes: int) -> tuple[Tensor, Tensor, int]:
    """Tokens ``[N, D]`` (pooled by ``stride``; None = the feature's own voxels), their cells'
    class proportions ``[N, C]`` and the number of tokens per case."""
    from semiseg.losses.scdl import token_class_proportions

    tokens, proportions = [], []
    for feature, label in zip(features, labels):
        grid = tuple(feature.shape[2:]) if stride is None else tuple(
            s // stride for s in label.shape[1:])
        if stride is not None:
            feature = F.adaptive_avg_pool3d(feature, grid)
        tokens.append(feature.flatten(2).transpose(1, 2)[0])
        proportions.append(token_class_proportions(label, grid, num_classes)[0])
    return torch.cat(tokens), torch.cat(proportions), tokens[0].size(0)


def token_purity(features: list[Tensor], labels: list[Tensor], stride: int | None,
                 num_classes: int) -> tuple[int, float, float]:
    """(organs ever a token's majority, foreground-majority share, held-out nearest class
    mean accuracy on foreground tokens)."""
    from semiseg.losses.scdl import token_anchors

    z, proportions, per_case = _tokens(features, labels, stride, num_classes)
    majority = proportions.argmax(-1)
    foreground = majority > 0
    split = per_case * (len(features) // 2)
    centred = z - z[:split].mean(0)
    means, _ = token_anchors(centred[:split][None], proportions[:split][None])
    nearest = (F.normalize(centred[split:], dim=-1) @ F.normalize(means, dim=-1).T).argmax(-1)
    held_fg = foreground[split:]
    accuracy = float((nearest == majority[split:])[held_fg].float().mean()) if held_fg.any() \
        else float("nan")
    return int(torch.unique(majority[foreground]).numel()), float(foreground.float().mean()), \
        accuracy


def proxy_fit(z: Tensor, proportions: Tensor, split: int, temperature: float, steps: int,
              truth: bool, sac_weight: float, seed: int = 0) -> tuple[float, float, float]:
    """Proxies alone on fixed tokens; the first half of ``z[:split]`` counts as labelled."""
    from semiseg.losses.scdl import e2p_loss, p2e_loss, sac_loss, token_anchors

    num_classes, dim = proportions.size(1), z.size(1)
    train_z, train_p = z[:split][None], proportions[:split][None]
    mask = torch.zeros(1, split, dtype=torch.bool)
    mask[0, : split // 2] = True  # the labelled crops' tokens
    anchors, present = token_anchors(train_z[:, : split // 2], train_p[:, : split // 2])
    torch.manual_seed(seed)
    bound = math.sqrt(6.0 / (num_classes + 2 * dim))  # the official Xavier-uniform table
    mu = torch.empty(num_classes, dim).uniform_(-bound, bound).requires_grad_()
    optimiser = torch.optim.SGD([mu], lr=0.1, momentum=0.9)
    given = (train_p, mask) if truth else (None, None)
    for _ in range(steps):
        loss = 0.1 * e2p_loss(train_z, mu, temperature, "mean", *given) \
            + 0.1 * p2e_loss(train_z, mu, temperature, *given)
        if sac_weight:
            loss = loss + sac_weight * sac_loss(mu, anchors, present)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    majority = proportions[split:].argmax(-1)
    nearest = (F.normalize(z[split:], dim=-1) @ F.normalize(mu.detach(), dim=-1).T).argmax(-1)
    hit = nearest == majority
    organs = [float(hit[majority == c].float().mean()) for c in range(1, num_classes)
              if (majority == c).any()]
    return (float(hit[majority > 0].float().mean()), sum(organs) / max(len(organs), 1),
            float(hit.float().mean()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a finished run folder (checkpoints/best.pt)")
    parser.add_argument("--cases", type=int, default=12, help="training cases to use")
    parser.add_argument("--steps", type=int, default=1800, help="steps of each proxy-only fit")
    args = parser.parse_args()
    torch.manual_seed(0)
    bottleneck, head, labels = _features(args.run, args.cases)
    num_classes = 14
    print(f"token purity ({args.cases} training cases of {args.run}; nearest class mean "
          "fitted on the first half, scored on the second)")
    print(f"{'tokens':22s} {'organs ever majority':>21s} {'fg-majority share':>18s} "
          f"{'nearest-mean acc (fg)':>22s}")
    for name, features, stride in [("bottleneck", bottleneck, None), ("decoder stride 8", head, 8),
                                   ("decoder stride 4", head, 4), ("decoder stride 2", head, 2)]:
        organs, share, accuracy = token_purity(features, labels, stride, num_classes)
        print(f"{name:22s} {organs:21d} {share:18.3f} {accuracy:22.2f}")
    z, proportions, per_case = _tokens(head, labels, 4, num_classes)
    split = per_case * (args.cases // 2)
    z = z - z[:split].mean(0)  # center_tokens
    print(f"\nproxy-only fits on decoder stride-4 tokens, {args.steps} SGD steps "
          "(held-out cases; agreement = nearest proxy is the token's majority class)")
    print(f"{'variant':46s} {'fg agreement':>13s} {'per-organ mean':>15s} {'all tokens':>11s}")
    variants = [("paper: tau 1, soft", 1.0, False, 0.0),
                ("tau 0.2, soft (official temperature)", 0.2, False, 0.0),
                ("tau 0.2, soft + SAC on labelled tokens", 0.2, False, 0.1),
                ("tau 0.2, truth on labelled tokens", 0.2, True, 0.0),
                ("tau 0.2, truth + SAC on labelled tokens", 0.2, True, 0.1)]
    for name, temperature, truth, sac in variants:
        fg, organs, every = proxy_fit(z, proportions, split, temperature, args.steps, truth, sac)
        print(f"{name:46s} {fg:13.2f} {organs:15.2f} {every:11.2f}")


if __name__ == "__main__":
    main()
