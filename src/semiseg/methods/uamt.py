"""UA-MT: uncertainty-aware mean teacher (Yu et al., MICCAI 2019) as the DHC authors run it
on CT multi-organ data (``xmed-lab/DHC`` ``code/train_uamt.py``, README command ``-m uamt -l
3e-2 -w 0.1``, ``-r``).

* A student VNet and a teacher VNet, both with dropout and PyTorch's default initialisation,
  built independently (different random starts; the teacher is *not* a copy of the student).
  After each step the teacher's parameters (not its buffers) become
  ``α θ_t + (1 - α) θ_s`` with ``α = min(1 - 1/(e + 1), 0.99)`` and e the official **epoch**
  index (the script passes ``epoch_num`` as the "global step"): the teacher is a copy of the
  student throughout epoch 0. The teacher is never put in eval mode: its dropout is active
  (Monte-Carlo dropout) and batch norm uses batch statistics.
* Teacher target: one pass on ``x_u + clip(0.1 N(0, 1), ±0.2)``.
* Uncertainty: T = 8 further noisy teacher passes (4 passes of the unlabeled crops
  duplicated), predictive entropy of the mean softmax (:mod:`semiseg.losses.uamt`).
* Per iteration::

      L = 0.5 [Dice_1e-8(p^l, y) + CE(z^l, y)] + λ(e) Σ m (p_s - p_t)² / (2 Σ m + 1e-16)
      m = [u < (0.75 + 0.25 sigmoid_rampup(e, E)) ln 2]

  with the batch soft Dice (no background, smoothing 1e-8), the consistency on the unlabeled
  crops, ``λ(e) = 0.1 sigmoid_rampup(e - 1, E)`` (:mod:`.dhc_schedule`) and the threshold
  ramped over the current epoch e (no lag). The student is evaluated and saved.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from semiseg.errors import DataError
from semiseg.losses.segmentation import soft_dice_loss
from semiseg.losses.uamt import masked_consistency, predictive_entropy, uncertainty_threshold
from semiseg.methods.base import Batch, Method, MethodContext, MethodNetworks, StepInfo
from semiseg.methods.dhc_schedule import consistency_weight, official_epoch, official_max_epoch
from semiseg.methods.ema import EMATeacher, ema_decay_at
from semiseg.methods.registry import register_method
from semiseg.models import create_model


@dataclass
class UAMTOptions:
    """Options of ``uamt``; defaults are the official run (README command, ``-r``)."""

    consistency: float = 0.1  # -w (README 0.1; script default 1)
    rampup: bool = True  # -r (the driver passes it; the script's default is no ramp)
    rampup_epochs: float = 0.0  # 0 = max_epoch (official -cr None)
    rampup_lag: bool = True  # λ of epoch k is λ(k - 1), as the official loop updates it
    # Iterations per official epoch (ceil(U / 2)); 0 = derived from the trainer's epoch.
    epoch_iterations: int = 0
    supervised_weight: float = 0.5  # 0.5 (Dice + CE)
    dice_smooth: float = 1e-8  # SoftDiceLoss(smooth=1e-8)
    ema_decay: float = 0.99
    ema_step: Literal["epoch", "iteration"] = "epoch"  # official: the epoch index
    noise_std: float = 0.1
    noise_clip: float = 0.2
    mc_passes: int = 8  # T (run as T / 2 passes of the duplicated unlabeled crops)
    # U_max of the threshold: ln 2 (both official codes) or ln C (the paper's maximum entropy
    # generalised to C classes).
    max_uncertainty: Literal["ln2", "ln_classes"] = "ln2"
    # Threshold ramp length in official epochs; 0 = max_epoch (official).
    threshold_rampup_epochs: float = 0.0
    halve_consistency: bool = True  # official 2 Σ m denominator; false = paper Eq. 3

    def __post_init__(self) -> None:
        # ValueError is reported by the config loader as a ConfigError naming method.options.
        if self.consistency < 0 or self.rampup_epochs < 0 or self.epoch_iterations < 0:
            raise ValueError("consistency, rampup_epochs and epoch_iterations must be >= 0")
        if self.threshold_rampup_epochs < 0 or self.supervised_weight < 0:
            raise ValueError("threshold_rampup_epochs and supervised_weight must be >= 0")
        if not 0.0 <= self.ema_decay <= 1.0:
            raise ValueError(f"ema_decay must be in [0, 1], got {self.ema_decay}")
        if self.mc_passes < 2 or self.mc_passes % 2:
            raise ValueError(f"mc_passes must be even and >= 2, got {self.mc_passes}")
        if self.noise_std < 0 or self.noise_clip < 0:
            raise ValueError("noise_std and noise_clip must be >= 0")


@register_method("uamt")
class UAMT(Method):
    """Student + EMA teacher; consistency on the voxels where the teacher is certain."""

    Options = UAMTOptions

    def __init__(self, context: MethodContext, options: UAMTOptions) -> None:
        super().__init__(context, options)
        self.network: nn.Module = create_model(context.model_name, context.num_classes,
                                               **context.model_options)
        self.teacher = EMATeacher(create_model(context.model_name, context.num_classes,
                                               **context.model_options))
        # What the last step used, for logging and tests.
        self.last_threshold = float("nan")
        self.last_mask_fraction = float("nan")

    def _noisy(self, x: Tensor) -> Tensor:
        noise = torch.randn_like(x) * self.options.noise_std
        return x + torch.clamp(noise, -self.options.noise_clip, self.options.noise_clip)

    def max_uncertainty(self) -> float:
        """U_max: ln 2 (official) or ln C."""
        if self.options.max_uncertainty == "ln2":
            return math.log(2.0)
        return math.log(self.context.num_classes)

    def threshold(self, step: StepInfo) -> float:
        """The uncertainty threshold of iteration ``step`` (current official epoch)."""
        opts = self.options
        length = opts.threshold_rampup_epochs or official_max_epoch(step, opts.epoch_iterations)
        return uncertainty_threshold(official_epoch(step, opts.epoch_iterations), length,
                                     self.max_uncertainty())

    @torch.no_grad()
    def uncertainty(self, unlabeled: Tensor) -> Tensor:
        """Predictive entropy [B_u, 1, ...] of T noisy teacher passes."""
        doubled = unlabeled.repeat(2, *([1] * (unlabeled.dim() - 1)))
        passes = [torch.softmax(self.teacher(self._noisy(doubled)).float(), 1)
                  for _ in range(self.options.mc_passes // 2)]
        # Pass i holds [u_0 .. u_{B-1}, u_0 .. u_{B-1}]: reshaping the concatenation to
        # [T, B, ...] puts the T samples of crop b at [:, b].
        stacked = torch.cat(passes)
        probs = stacked.reshape(self.options.mc_passes, unlabeled.size(0), *stacked.shape[1:])
        return predictive_entropy(probs)

    def training_step(self, batch: Batch, step: StepInfo) -> dict[str, Tensor]:
        n = batch.num_labeled
        if n == 0 or n == batch.image.size(0):
            raise DataError(f"{self.name}: a batch needs labeled and unlabeled crops "
                            f"(got {n} of {batch.image.size(0)} labeled)")
        unlabeled = batch.unlabeled_image
        logits = self.network(batch.image)
        with torch.no_grad():
            teacher_logits = self.teacher(self._noisy(unlabeled))
        uncertainty = self.uncertainty(unlabeled)
        threshold = self.threshold(step)
        mask = (uncertainty < threshold).float()
        self.last_threshold = threshold
        self.last_mask_fraction = float(mask.mean())
        label = batch.label.long()
        labeled_logits = logits[:n].float()
        supervised = (soft_dice_loss(torch.softmax(labeled_logits, 1), label,
                                     smooth=self.options.dice_smooth)
                      + F.cross_entropy(labeled_logits, label))
        return {
            "sup_dice_ce": supervised,
            "consistency": masked_consistency(logits[n:], teacher_logits, mask,
                                              self.options.halve_consistency),
        }

    def loss_weights(self, step: StepInfo) -> dict[str, float]:
        opts = self.options
        if opts.rampup:
            lam = consistency_weight(step, opts.consistency, opts.epoch_iterations,
                                     opts.rampup_epochs, opts.rampup_lag)
        else:
            lam = opts.consistency
        return {"sup_dice_ce": opts.supervised_weight, "consistency": lam}

    def after_step(self, step: StepInfo) -> None:
        """EMA update counting official epochs (default) or iterations."""
        counter = (official_epoch(step, self.options.epoch_iterations)
                   if self.options.ema_step == "epoch" else step.iteration)
        self.teacher.update(self.network, ema_decay_at(counter, self.options.ema_decay))

    def networks(self) -> MethodNetworks:
        return MethodNetworks(trained=(self.network,), teachers=(self.teacher.network,))

    def inference_network(self) -> nn.Module:
        """The student, as the official script evaluates and saves it."""
        return self.network
