"""DHC's two debiased class weightings (Wang & Li, "DHC: Dual-debiased Heterogeneous Co-training
Framework for Class-imbalanced Semi-supervised Medical Image Segmentation", MICCAI 2023).

* **DistDW** (paper Sec. 2, "Distribution-aware Debiased Weighting"): classes that are rare in
  the (pseudo-)label distribution get large weights, ``w_c ∝ ln(N_max / N_c)``, normalised by
  the largest such log-ratio and scaled by the class count C; a momentum average over
  iterations smooths the per-batch pseudo-label estimate. Network B of DHC.
* **DiffDW** (paper Sec. 2, "Difficulty-aware Debiased Weighting"): classes whose Dice keeps
  dropping ("unlearning") relative to how much it rises ("learning") and whose Dice is low get
  large weights. Network A of DHC.

Every formula below is the official ``xmed-lab/DHC`` ``code/train_dhc.py`` one (classes
``DistDW`` and ``DiffDW``), rewritten here; its constants are the script's (DistDW momentum
0.99, DiffDW accumulation length 50 and exponent 1/5), which override the classes' own
defaults (0.95 and 20). Where the official code differs from the paper's wording, the docstring
of the function says so; the official behaviour is the default.

Also here: the supervised / cross losses of DHC with a per-class weight vector, which add a
guard the official code lacks (a weighted cross entropy whose target voxels all have weight 0
is 0 here, NaN officially; see :func:`weighted_cross_entropy`).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from semiseg.losses.labels import class_argmax, class_histogram
from semiseg.losses.segmentation import dice_ce_loss, soft_dice_loss

# The official code adds 1e-8 to every count before taking the ratio, so an absent class
# (N_c = 0) gets a finite, very large log-ratio rather than infinity.
COUNT_EPS = 1e-8
# The official hard Dice (SoftDiceLoss(smooth=1e-8)) smooths numerator and denominator with
# 1e-8 and adds another 1e-8 to the denominator: a class absent from both masks scores 0.5.
DICE_SMOOTH = 1e-8


def ema(current: Tensor, previous: Tensor, momentum: float) -> Tensor:
    """``momentum * previous + (1 - momentum) * current`` (DHC ``utils.EMA``)."""
    return momentum * previous + (1.0 - momentum) * current


def distdw_weights(counts: Tensor) -> Tensor:
    """DistDW weights of one class histogram: ``C * ln P_c / max_k ln P_k`` with
    ``P_c = (max_k N_k + 1e-8) / (N_c + 1e-8)`` (paper Sec. 2, DistDW; official
    ``DistDW._cal_weights`` times ``num_cls``).

    The most frequent class gets exactly 0 (with DHC's data: background, so network B's
    weighted cross entropy ignores background voxels), the rarest class gets C, and a class
    absent from the histogram (``N_c = 0``) gets the largest log-ratio, hence C, compressing
    every other weight. No exponent, no clipping.

    Differs from the official code only where the official one is undefined: a histogram
    whose non-empty classes are all equally frequent and has no empty class has
    ``max ln P = 0`` (official: 0/0 = NaN); we return C for every class (no class is more
    frequent than another, so none is down-weighted). Computed in float64 (the official code
    uses float32; the difference is below 1e-6 relative), returned as float32.
    """
    counts = counts.to(torch.float64)
    if counts.dim() != 1 or counts.numel() < 2:
        raise ValueError(f"expected a 1-D histogram of >= 2 classes, got shape "
                         f"{tuple(counts.shape)}")
    if bool((counts < 0).any()):
        raise ValueError(f"class histogram has negative counts: {counts.tolist()}")
    num_classes = counts.numel()
    log_ratio = torch.log((counts.max() + COUNT_EPS) / (counts + COUNT_EPS))
    top = log_ratio.max()
    if float(top) <= 0.0:
        return torch.full((num_classes,), float(num_classes), dtype=torch.float32)
    return (num_classes * log_ratio / top).to(torch.float32)


def hard_dice_per_class(pred: Tensor, target: Tensor, num_classes: int,
                        smooth: float = DICE_SMOOTH) -> Tensor:
    """Hard batch Dice of every class, background included, float64 ``[C]``.

    ``pred`` and ``target`` are integer label maps of the same shape (the argmax of a
    network's logits and the ground truth). tp, fp and fn are pooled over the whole batch;
    ``d_c = (2 tp + s) / (2 tp + fp + fn + s + 1e-8)``, DHC's
    ``SoftDiceLoss(smooth=1e-8, do_bg=True)`` on one-hot maps, so a class absent from both
    gets 0.5. One bincount of (target, pred) pairs instead of C one-hot channels.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    joint = torch.bincount(target.reshape(-1).long() * num_classes + pred.reshape(-1).long(),
                           minlength=num_classes * num_classes)
    joint = joint[: num_classes * num_classes].reshape(num_classes, num_classes).double()
    tp = joint.diagonal()
    fp = joint.sum(0) - tp  # predicted c, labelled otherwise
    fn = joint.sum(1) - tp  # labelled c, predicted otherwise
    return (2 * tp + smooth) / (2 * tp + fp + fn + smooth + 1e-8)


class DistDW(nn.Module):
    """Distribution-aware debiased weighting with its momentum (network B of DHC).

    State (buffers, so checkpoints resume it): ``weights`` ``[C]`` and ``initialised``.

    * :meth:`initialise` sets the weights from a ground-truth histogram. The official code
      uses every voxel of every labeled training volume (``DistDW.init_weights``).
    * :meth:`update` (every iteration) takes the histogram of the argmax of network B's logits
      on the **unlabeled** crops, computes :func:`distdw_weights` of it and moves the weights
      towards it: ``w <- m w + (1 - m) w_cur`` with ``m = 0.99`` (official script; the class
      default 0.95 is overridden). Weights are averaged, not counts.

    The paper (Sec. 2, DistDW) re-estimates the distribution from pseudo labels during
    training with a momentum update; the official script's constants are the defaults here.
    """

    weights: Tensor
    initialised: Tensor

    def __init__(self, num_classes: int, momentum: float = 0.99) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"DistDW needs >= 2 classes, got {num_classes}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"DistDW momentum must be in [0, 1), got {momentum}")
        self.num_classes = num_classes
        self.momentum = momentum
        self.register_buffer("weights", torch.full((num_classes,), float(num_classes)))
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))

    def initialise(self, counts: Tensor) -> Tensor:
        """Set the weights to :func:`distdw_weights` of the ground-truth histogram ``counts``."""
        self.weights.copy_(distdw_weights(counts.detach().cpu()).to(self.weights))
        self.initialised.fill_(True)
        return self.weights.clone()

    @torch.no_grad()
    def update(self, pseudo_label: Tensor) -> Tensor:
        """One momentum step from integer pseudo labels (any shape); returns the new weights."""
        current = distdw_weights(class_histogram(pseudo_label, self.num_classes).cpu())
        self.weights.copy_(ema(current.to(self.weights), self.weights, self.momentum))
        return self.weights.clone()


class DiffDW(nn.Module):
    """Difficulty-aware debiased weighting and its difficulty history (network A of DHC).

    Per class c, from the hard Dice ``d_c`` of network A's labeled outputs at each iteration
    (:func:`hard_dice_per_class`; the previous value ``d'_c`` starts at 1e-8):

    * ``Δ_c = d_c - d'_c``; ``learn_c = max(Δ_c, 0) ln(d_c / d'_c)``,
      ``unlearn_c = min(Δ_c, 0) ln(d_c / d'_c)`` (both >= 0);
    * history with ``m = (K - 1) / K``, ``K = accumulate_iters = 50``:
      ``L_c <- m L_c + (1 - m) learn_c``, ``U_c <- m U_c + (1 - m) unlearn_c`` (start 0);
    * difficulty ``diff_c = ((U_c + 1e-8) / (L_c + 1e-8)) ** (1/5)``;
    * ``D_c <- m D_c + (1 - m)(1 - d_c)`` (start 1), a running 1 - Dice;
    * ``w_c = diff_c D_c``, then ``w <- C w / max_k w_k``.

    Paper vs official code (paper Sec. 2, DiffDW): as we read the paper, it accumulates the
    learning / unlearning amounts over the recent τ iterations; the official code keeps the
    exponential moving averages above (effective length K), which we follow (the equation
    numbers of the paper were not checked against its text here). The official DHC normalises
    by the maximum before scaling by C (``normalize=True``, default); GenericSSL's copy of the
    same weighting (``Difficulty``) omits the division by the maximum and keeps the factor C
    (``normalize=False``). Before the first
    update the weights are C for every class (official ``init_weights``); DHC never uses them,
    because the update precedes the loss in every iteration.
    """

    last_dice: Tensor
    learn: Tensor
    unlearn: Tensor
    dice_weight: Tensor
    weights: Tensor

    def __init__(self, num_classes: int, accumulate_iters: float = 50.0, power: float = 0.2,
                 normalize: bool = True) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"DiffDW needs >= 2 classes, got {num_classes}")
        if accumulate_iters < 1.0:
            raise ValueError(f"DiffDW accumulate_iters must be >= 1, got {accumulate_iters}")
        self.num_classes = num_classes
        self.momentum = (accumulate_iters - 1.0) / accumulate_iters
        self.power = power
        self.normalize = normalize
        c = num_classes
        self.register_buffer("last_dice", torch.full((c,), 1e-8, dtype=torch.float64))
        self.register_buffer("learn", torch.zeros(c, dtype=torch.float64))
        self.register_buffer("unlearn", torch.zeros(c, dtype=torch.float64))
        self.register_buffer("dice_weight", torch.ones(c, dtype=torch.float64))
        self.register_buffer("weights", torch.full((c,), float(c)))

    @torch.no_grad()
    def update(self, dice: Tensor) -> Tensor:
        """One step from this iteration's per-class hard Dice ``[C]``; returns the weights."""
        dice = dice.detach().to(self.last_dice)
        if dice.shape != (self.num_classes,):
            raise ValueError(f"expected {self.num_classes} Dice values, got {tuple(dice.shape)}")
        delta = dice - self.last_dice
        log_ratio = torch.log(dice / self.last_dice)
        learn = torch.where(delta > 0, delta, torch.zeros_like(delta)) * log_ratio
        unlearn = torch.where(delta <= 0, delta, torch.zeros_like(delta)) * log_ratio
        self.last_dice.copy_(dice)
        self.learn.copy_(ema(learn, self.learn, self.momentum))
        self.unlearn.copy_(ema(unlearn, self.unlearn, self.momentum))
        difficulty = ((self.unlearn + 1e-8) / (self.learn + 1e-8)) ** self.power
        self.dice_weight.copy_(ema(1.0 - dice, self.dice_weight, self.momentum))
        weights = difficulty * self.dice_weight
        if self.normalize:
            weights = weights / weights.max()
        weights = self.num_classes * weights
        self.weights.copy_(weights.to(self.weights))
        return self.weights.clone()

    def update_from_logits(self, logits: Tensor, label: Tensor) -> Tensor:
        """:meth:`update` with the hard Dice of ``argmax(logits)`` against ``label``."""
        pred = class_argmax(logits.detach())
        if label.dim() == logits.dim():
            label = label[:, 0]
        return self.update(hard_dice_per_class(pred, label, self.num_classes))


def weighted_cross_entropy(logits: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
    """Class-weighted mean cross entropy ``Σ_i w_{y_i} l_i / Σ_i w_{y_i}``.

    PyTorch's ``cross_entropy(weight=w)`` (the official ``RobustCrossEntropyLoss``) except when
    every target voxel has weight 0 (DistDW gives the most frequent class 0, so a crop batch
    holding only that class): there PyTorch returns 0/0 = NaN, and the official AMP
    ``GradScaler`` then silently skips the whole iteration for both networks. Here the term is
    0 (with a graph, so the backward still runs) and the other terms still train.
    """
    target = target.long()
    if target.dim() == logits.dim():
        target = target[:, 0]
    if weight is None:
        return F.cross_entropy(logits, target)
    weight = weight.to(device=logits.device, dtype=torch.float32)
    per_voxel = F.cross_entropy(logits.float(), target, reduction="none")
    voxel_weight = weight[target]
    total = voxel_weight.sum()
    return (voxel_weight * per_voxel).sum() / total.clamp_min(torch.finfo(torch.float32).tiny)


def weighted_dice_ce(logits: Tensor, target: Tensor, dice_weight: Tensor | None,
                     ce_weight: Tensor | None) -> Tensor:
    """DHC's ``DC_and_CE_loss``: batch soft Dice without background (each class's Dice times
    ``dice_weight``, :func:`semiseg.losses.segmentation.soft_dice_loss`) plus
    :func:`weighted_cross_entropy` with ``ce_weight``. DHC's default (``--sup_loss
    w_ce+dice``) passes the same vector as both."""
    target = target.long()
    if target.dim() == logits.dim():
        target = target[:, 0]
    dice = soft_dice_loss(torch.softmax(logits.float(), dim=1), target, dice_weight)
    return dice + weighted_cross_entropy(logits, target, ce_weight)


SupLoss = Literal["w_ce+dice", "wce+dice", "ce+dice"]


def dhc_supervised_loss(logits: Tensor, label: Tensor, weight: Tensor | None,
                        kind: SupLoss = "w_ce+dice") -> Tensor:
    """The DHC scripts' ``--sup_loss``: ``w_ce+dice`` (class weights in Dice and CE),
    ``wce+dice`` (weights in the CE only) or ``ce+dice`` (unweighted); batch soft Dice without
    background, smoothing 1, as :func:`semiseg.losses.segmentation.dice_ce_loss`."""
    if kind == "ce+dice" or weight is None:
        return dice_ce_loss(logits, label)
    if kind == "w_ce+dice":
        return dice_ce_loss(logits, label, weight.to(torch.float32))
    target = label.long()
    return (soft_dice_loss(torch.softmax(logits, 1), target)
            + F.cross_entropy(logits, target, weight=weight.to(logits.dtype)))
