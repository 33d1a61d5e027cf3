"""The diffusion and debiasing parts of GenericSSL / A&D (Wang & Li, "Towards Generic
Semi-Supervised Framework for Volumetric Medical Image Segmentation", NeurIPS 2023;
``xmed-lab/GenericSSL`` ``code/train_diffusion.py`` and ``code/DiffVNet``), as pure functions.

Paper references are to its method section (Sec. 3: the aggregating decoder D_θ, the
diffusion decoder D_ξ, the difficulty-aware decoder D_ψ); equation numbers were not re-checked
against the PDF here, so the docstrings name the component instead. "Official" means the
repository at 4158615 (facts in ``/work/notes/dhc_genericssl.md`` §7). Every official
difference is a keyword argument; the method (:mod:`semiseg.methods.generic_ssl`) passes the
official values by default.

* What is denoised: the labeled crop's label map as ``x_0 = 2 onehot(y) - 1`` in {-1, 1}
  (:func:`label_to_x0`), diffused with a linear β schedule over T = 1000 steps
  (:func:`linear_beta_schedule`, :func:`q_sample`) at a timestep drawn uniformly from
  ``0..T-1`` (:func:`sample_timesteps`); the network predicts ``x_0`` itself (guided-diffusion
  ``START_X``), and its prediction is used as segmentation logits.
* Sampling (pseudo labels of unlabeled crops): deterministic DDIM (η = 0) over 10 of the
  1000 steps (:func:`spaced_timesteps`, :func:`ddim_sample`), each ``x_0`` prediction clamped
  to [-1, 1]; the result is the last ``x_0`` prediction.
* Pseudo label (:func:`fuse_pseudo_label`): argmax of the diffusion prediction, turned into
  probabilities, plus the softmax of D_ψ.
* Debiasing (:func:`difficulty_weights`): DHC's difficulty-aware weights, from D_ξ's hard
  Dice on the labeled crops, weighting D_ψ's Dice and cross entropy.
* Aggregation (:func:`aggregate`): D_θ ← s D_θ + (1 - s)(D_ξ + D_ψ) / 2.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from semiseg.losses.labels import class_argmax

# guided-diffusion's linear schedule (Ho et al. 2020) for T = 1000, scaled by 1000 / T.
BETA_START = 1e-4
BETA_END = 0.02
# The official hard Dice smooths with 1e-8 (numerator and denominator) plus another 1e-8 in
# the denominator, so a class absent from prediction and label scores 0.5.
DICE_SMOOTH = 1e-8
# Added to the learning / unlearning histories before their ratio (official 1e-8).
DIFFICULTY_EPS = 1e-8


# ----------------------------------------------------------------------------- diffusion


def linear_beta_schedule(num_steps: int = 1000, scale: bool = True) -> Tensor:
    """β_t, t = 0..T-1, linear from 1e-4 to 0.02 (float64).

    Paper Sec. 3 (diffusion decoder): the DDPM forward process. Official: guided-diffusion's
    ``get_named_beta_schedule("linear", T, use_scale=True)``, which multiplies both ends by
    ``1000 / T`` so that any T keeps the total noise of the T = 1000 schedule (identical at
    the official T = 1000). ``scale=False`` keeps 1e-4 and 0.02 for any T.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    factor = 1000.0 / num_steps if scale else 1.0
    return torch.linspace(factor * BETA_START, factor * BETA_END, num_steps,
                          dtype=torch.float64)


def alphas_cumprod(betas: Tensor) -> Tensor:
    """ᾱ_t = Π_{s<=t} (1 - β_s), float64 (the variance kept by ``x_t``)."""
    if betas.dim() != 1 or bool(((betas <= 0) | (betas > 1)).any()):
        raise ValueError("betas must be a 1-D tensor with values in (0, 1]")
    return torch.cumprod(1.0 - betas.to(torch.float64), dim=0)


def label_to_x0(label: Tensor, num_classes: int) -> Tensor:
    """What is denoised: ``2 onehot(y) - 1``, ``[B, X, Y, Z]`` -> ``[B, C, X, Y, Z]`` in {-1, 1}.

    Paper Sec. 3 (diffusion decoder): the label is the diffusion's data ``x_0``; official
    ``label_l_onehot * 2 - 1`` (train_diffusion.py).
    """
    if label.dim() == 5:
        label = label[:, 0]
    onehot = F.one_hot(label.long(), num_classes).movedim(-1, 1)
    return onehot.float() * 2.0 - 1.0


def sample_timesteps(batch: int, num_steps: int = 1000,
                     generator: torch.Generator | None = None,
                     device: torch.device | str = "cpu") -> Tensor:
    """Training timesteps, uniform over ``0..T-1`` (int64 ``[batch]``).

    Official: guided-diffusion's ``UniformSampler`` (its importance weights are all 1 and
    unused). It draws with NumPy's global generator; here torch's (or ``generator``).
    """
    return torch.randint(0, num_steps, (batch,), generator=generator).to(device)


def _at(values: Tensor, t: Tensor, like: Tensor) -> Tensor:
    """``values[t]`` (float64 table) as float32 on ``like``'s device, broadcastable to it."""
    out = values.to(t.device)[t.long()].to(device=like.device, dtype=torch.float32)
    return out.view(-1, *([1] * (like.dim() - 1)))


def q_sample(x0: Tensor, t: Tensor, noise: Tensor, cumprod: Tensor) -> Tensor:
    """``x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε`` (DDPM's closed-form forward process).

    ``cumprod`` is :func:`alphas_cumprod`; ``t`` one index per sample. The coefficients are
    taken in float64 and applied in float32, as guided-diffusion does.
    """
    if noise.shape != x0.shape:
        raise ValueError(f"noise {tuple(noise.shape)} and x0 {tuple(x0.shape)} differ")
    return _at(cumprod.sqrt(), t, x0) * x0 + _at((1.0 - cumprod).sqrt(), t, x0) * noise


def spaced_timesteps(num_steps: int = 1000, count: int = 10) -> list[int]:
    """The ``count`` timesteps DDIM visits, ascending: ``round(i (T - 1) / (count - 1))``.

    Official: guided-diffusion's ``space_timesteps(1000, [10])`` = 0, 111, ..., 888, 999.
    """
    if not 1 <= count <= num_steps:
        raise ValueError(f"count must be in 1..{num_steps}, got {count}")
    if count == 1:
        return [0]
    stride = (num_steps - 1) / (count - 1)
    # Python's round (half to even), as the official code.
    return sorted({round(i * stride) for i in range(count)})


def ddim_step(x_t: Tensor, pred_x0: Tensor, abar_t: Tensor, abar_prev: Tensor,
              eta: float = 0.0, noise: Tensor | None = None) -> Tensor:
    """One DDIM update (Song et al. 2021, Eq. 12) from an ``x_0`` prediction.

    ``ε = (x_t / sqrt(ᾱ_t) - x_0) / sqrt(1 / ᾱ_t - 1)``,
    ``σ = η sqrt((1 - ᾱ_prev) / (1 - ᾱ_t)) sqrt(1 - ᾱ_t / ᾱ_prev)``,
    ``x_prev = sqrt(ᾱ_prev) x_0 + sqrt(1 - ᾱ_prev - σ²) ε + σ z``.
    ``abar_*`` broadcast against ``x_t`` (one value per sample).
    """
    eps = (x_t / abar_t.sqrt() - pred_x0) / (1.0 / abar_t - 1.0).sqrt()
    sigma = eta * ((1.0 - abar_prev) / (1.0 - abar_t)).sqrt() * (1.0 - abar_t / abar_prev).sqrt()
    out = pred_x0 * abar_prev.sqrt() + (1.0 - abar_prev - sigma * sigma).sqrt() * eps
    if eta > 0:
        out = out + sigma * (noise if noise is not None else torch.randn_like(x_t))
    return out


def ddim_sample(denoise: Callable[[Tensor, Tensor], Tensor], shape: Sequence[int],
                cumprod: Tensor, timesteps: Sequence[int], clip: bool = True,
                eta: float = 0.0, noise: Tensor | None = None,
                device: torch.device | str = "cpu") -> Tensor:
    """The final ``x_0`` prediction of a DDIM chain started from Gaussian noise.

    Paper Sec. 3 (diffusion decoder, inference on unlabeled crops). ``denoise(x_t, t)``
    predicts ``x_0`` for original timesteps ``t`` (``[B]``, int64). The chain visits
    ``timesteps`` (:func:`spaced_timesteps`) from the last to the first; ``ᾱ_prev`` of the
    first is 1. Each prediction is clamped to [-1, 1] (``clip``, official
    ``clip_denoised=True``). Returns the prediction made at the first timestep (official
    ``ddim_sample_loop(...)["pred_xstart"]``, η = 0), not the last sample.
    """
    steps = sorted(int(t) for t in timesteps)
    if not steps:
        raise ValueError("ddim_sample needs at least one timestep")
    x = noise.to(device) if noise is not None else torch.randn(*shape, device=device)
    batch = int(shape[0])
    pred = x
    for index in range(len(steps) - 1, -1, -1):
        t = torch.full((batch,), steps[index], dtype=torch.long, device=x.device)
        pred = denoise(x, t).float()
        if clip:
            pred = pred.clamp(-1.0, 1.0)
        abar_t = torch.full((batch,), float(cumprod[steps[index]]), dtype=torch.float64)
        prev = float(cumprod[steps[index - 1]]) if index > 0 else 1.0
        abar_prev = torch.full((batch,), prev, dtype=torch.float64)
        view = (-1, *([1] * (x.dim() - 1)))
        x = ddim_step(x.float(), pred, abar_t.float().view(view).to(x.device),
                      abar_prev.float().view(view).to(x.device), eta)
    return pred


# ----------------------------------------------------------------------------- pseudo labels


def gaussian_kernel(size: int = 3, sigma: float = 1.0, dims: int = 3) -> Tensor:
    """A normalised separable Gaussian kernel of ``size`` taps per axis (float32).

    Official ``GaussianSmoothing(C, 3, 1)``: ``exp(-((i - (size-1)/2) / σ)² / 2)`` per axis,
    multiplied, divided by the sum. Hand-written because MONAI's ``GaussianFilter`` sizes the
    kernel from σ (truncation 4σ: 9 taps for σ = 1), not from a given 3.
    """
    if size < 1 or sigma <= 0:
        raise ValueError(f"kernel size must be >= 1 and sigma > 0, got {size}, {sigma}")
    grid = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    taps = torch.exp(-0.5 * (grid / sigma) ** 2)
    kernel = taps
    for _ in range(dims - 1):
        kernel = kernel[..., None] * taps
    return kernel / kernel.sum()


def gaussian_smooth(x: Tensor, kernel: Tensor) -> Tensor:
    """Depthwise 'same' convolution of every channel of ``x`` ``[B, C, X, Y, Z]`` with
    ``kernel`` (zero padding), official ``F.conv3d(..., groups=C, padding="same")``."""
    channels = x.size(1)
    weight = kernel.to(x)[None, None].expand(channels, 1, *kernel.shape).contiguous()
    return F.conv3d(x, weight, groups=channels, padding="same")


def gumbel_softmax(logits: Tensor, tau: float = 1.0, gumbel: Tensor | None = None) -> Tensor:
    """``softmax((logits + g) / τ)`` over channels with Gumbel noise ``g = -ln E``, E ~ Exp(1).

    Same formula as ``F.gumbel_softmax(hard=False, dim=1)`` (the official call); written out
    so that a test can pass the noise ``gumbel``.
    """
    if gumbel is None:
        gumbel = -torch.empty_like(logits).exponential_().log()
    return torch.softmax((logits + gumbel) / tau, dim=1)


def fuse_pseudo_label(xi_x0: Tensor, psi_logits: Tensor, smoothing: str = "official",
                      kernel_size: int = 3, sigma: float = 1.0, tau: float = 1.0,
                      gumbel: Tensor | None = None) -> Tensor:
    """The unlabeled crops' pseudo label ``argmax(p̃_ξ + p̃_ψ)`` (int64 ``[B, X, Y, Z]``).

    Paper Sec. 3: the pseudo label combines the diffusion decoder's and the difficulty-aware
    decoder's predictions. ``p̃_ψ = softmax(D_ψ)``. ``p̃_ξ`` from the DDIM ``x_0`` prediction
    ``xi_x0`` (in [-1, 1], read as logits):

    * ``"official"``: Gaussian smoothing (3 taps, σ = 1) of ``gumbel_softmax(x_0, τ = 1)``
      (train_diffusion.py, pseudo-label block);
    * ``"softmax"``: plain ``softmax(x_0)``, no noise, no smoothing (the two decoders'
      probabilities simply added; our reading of the paper's description).
    """
    psi = torch.softmax(psi_logits.float(), dim=1)
    if smoothing == "official":
        xi = gaussian_smooth(gumbel_softmax(xi_x0.float(), tau, gumbel),
                             gaussian_kernel(kernel_size, sigma))
    elif smoothing == "softmax":
        xi = torch.softmax(xi_x0.float(), dim=1)
    else:
        raise ValueError(f"unknown pseudo-label smoothing {smoothing!r} (official|softmax)")
    return class_argmax(xi + psi)


# ----------------------------------------------------------------------------- debiasing


def hard_dice(pred: Tensor, target: Tensor, num_classes: int) -> Tensor:
    """Hard batch Dice per class, background included (float64 ``[C]``).

    ``d_c = (2 tp + s) / (2 tp + fp + fn + s + 1e-8)``, s = 1e-8, tp/fp/fn pooled over the
    batch: the official ``SoftDiceLoss(smooth=1e-8, do_bg=True)`` on one-hot argmax maps. A
    class absent from both scores 0.5.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    # One bincount of (label, prediction) pairs instead of C one-hot channels.
    pairs = target.reshape(-1).long() * num_classes + pred.reshape(-1).long()
    joint = torch.bincount(pairs, minlength=num_classes * num_classes).double()
    joint = joint.reshape(num_classes, num_classes)
    tp = joint.diagonal()
    fp = joint.sum(0) - tp
    fn = joint.sum(1) - tp
    return (2 * tp + DICE_SMOOTH) / (2 * tp + fp + fn + DICE_SMOOTH + 1e-8)


@dataclass(frozen=True)
class DifficultyState:
    """The difficulty history of :func:`difficulty_weights` (float64 ``[C]`` each).

    Start (official ``Difficulty.__init__``): previous Dice 1e-8, learning and unlearning
    histories 0, running ``1 - Dice`` 1 (:meth:`initial`).
    """

    last_dice: Tensor
    learn: Tensor
    unlearn: Tensor
    dice_weight: Tensor

    @classmethod
    def initial(cls, num_classes: int) -> DifficultyState:
        c = num_classes
        return cls(torch.full((c,), 1e-8, dtype=torch.float64),
                   torch.zeros(c, dtype=torch.float64), torch.zeros(c, dtype=torch.float64),
                   torch.ones(c, dtype=torch.float64))


def difficulty_weights(state: DifficultyState, dice: Tensor, accumulate_iters: float = 50.0,
                       power: float = 0.2, normalize: bool = True
                       ) -> tuple[Tensor, DifficultyState]:
    """Difficulty-aware class weights of D_ψ from this iteration's per-class Dice.

    Paper Sec. 3 (difficulty-aware decoder D_ψ; DHC's DiffDW, Wang & Li MICCAI 2023). With
    ``m = (K - 1) / K``, ``K = accumulate_iters`` (official 50) and ``d'`` the previous Dice:

    * ``Δ_c = d_c - d'_c``; ``learn_c = max(Δ_c, 0) ln(d_c / d'_c)``;
      ``unlearn_c = min(Δ_c, 0) ln(d_c / d'_c)`` (both >= 0);
    * ``L_c <- m L_c + (1 - m) learn_c``, ``U_c <- m U_c + (1 - m) unlearn_c``;
    * ``diff_c = ((U_c + 1e-8) / (L_c + 1e-8)) ** power`` (power 1/5);
    * ``D_c <- m D_c + (1 - m)(1 - d_c)``;
    * ``w_c = C diff_c D_c / max_k(diff_k D_k)`` with ``normalize`` (DHC's DiffDW, which the
      paper reuses), or ``w_c = C diff_c D_c`` without (official GenericSSL ``Difficulty``,
      ``normalize=False``: no division by the maximum).

    The learning/unlearning amounts are exponential moving averages of effective length K,
    as in both official codes. Returns ``(weights float32 [C], new state)``.
    """
    if accumulate_iters < 1.0:
        raise ValueError(f"accumulate_iters must be >= 1, got {accumulate_iters}")
    dice = dice.detach().to(torch.float64).cpu()
    if dice.shape != state.last_dice.shape:
        raise ValueError(f"expected {tuple(state.last_dice.shape)} Dice values, got "
                         f"{tuple(dice.shape)}")
    m = (accumulate_iters - 1.0) / accumulate_iters
    delta = dice - state.last_dice
    log_ratio = torch.log(dice / state.last_dice)
    zero = torch.zeros_like(delta)
    learn = torch.where(delta > 0, delta, zero) * log_ratio
    unlearn = torch.where(delta <= 0, delta, zero) * log_ratio
    new = DifficultyState(
        last_dice=dice.clone(),
        learn=m * state.learn + (1.0 - m) * learn,
        unlearn=m * state.unlearn + (1.0 - m) * unlearn,
        dice_weight=m * state.dice_weight + (1.0 - m) * (1.0 - dice),
    )
    difficulty = ((new.unlearn + DIFFICULTY_EPS) / (new.learn + DIFFICULTY_EPS)) ** power
    weights = difficulty * new.dice_weight
    if normalize:
        weights = weights / weights.max()
    return (dice.numel() * weights).to(torch.float32), new


# ----------------------------------------------------------------------------- aggregation


def aggregate(theta: Tensor, xi: Tensor, psi: Tensor, momentum: float = 0.99) -> Tensor:
    """``s θ + (1 - s)(ξ + ψ) / 2``: one aggregation step of a D_θ parameter.

    Paper Sec. 3 (aggregation): D_θ is the exponential moving average of the two decoupled
    decoders. Official: done for every D_θ parameter whose name and shape exist in D_ξ, before
    each iteration's forward pass, with s = ``ema_w`` = 0.99; batch-norm buffers are not
    averaged, and D_θ also keeps receiving gradients from the unlabeled loss.
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    return momentum * theta + (1.0 - momentum) * (xi + psi) / 2.0

