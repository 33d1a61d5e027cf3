"""GenericSSL / A&D: Aggregating & Decoupling (Wang & Li, NeurIPS 2023; ``xmed-lab/GenericSSL``
``code/train_diffusion.py``, the only 3D training script).

One :class:`~semiseg.models.diff_vnet.DiffVNet` (shared encoder; decoders D_ξ diffusion, D_ψ
difficulty-aware, D_θ aggregated). One iteration on ``n`` labeled crops ``(x_l, y)`` and the
unlabeled crops ``x_u``:

1. aggregation, before the forward passes: every D_θ parameter with a same-named,
   same-shaped D_ξ parameter becomes ``s θ + (1 - s)(ξ + ψ) / 2``, s = 0.99 (buffers not);
2. ``x_0 = 2 onehot(y) - 1``, ``t ~ U{0..999}``, ``x_t = q_sample(x_0, t, ε)``;
   ``L_deno = DiceCE(D_ξ(x_t, t, x_l), y)``;
3. difficulty weights ``w`` from D_ξ's hard Dice on the labeled crops (K = 50, power 1/5, no
   max-normalisation); ``L_diff = DiceCE_w(D_ψ(x_l), y)`` (w in Dice and CE);
4. without gradients: ``p̃_ξ`` = DDIM-10 sample of D_ξ given ``x_u`` (the network in train
   mode, as officially), Gumbel-softmax and 3-tap Gaussian smoothing; ``p̃_ψ =
   softmax(D_ψ(x_u))``; ``ŷ = argmax(p̃_ξ + p̃_ψ)``;
5. ``L_u = DiceCE(D_θ(x_u), ŷ)``; ``L = L_deno + L_diff + μ(e) L_u`` with
   ``μ(e) = mu · exp(-5 (1 - e / R)²)``, mu = 10 (README), R = max_epoch, e the official
   epoch (``floor(U / 2)`` iterations) lagged by one as the official loop recomputes μ after
   each epoch.

DiceCE is DHC's batch soft Dice (no background) + cross entropy
(:func:`semiseg.losses.segmentation.dice_ce_loss`). Terms: ``deno``, ``diff``, ``unsup``.
Inference (validation, test) is D_θ alone (``DiffVNet.forward``), as the official test.

Deviations (docs/methods/generic_ssl.md): D_ψ on the labeled crops is computed before D_ξ
(official: after), so that the first decoding with gradients is an image-path one (SCDL's
``token_source: first`` then records image tokens, the space its SAC anchors come from); the
losses are the same functions, only the order of batch-norm running-statistic updates and of
random draws differs. Timesteps come from torch's generator (official: NumPy's).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from semiseg.errors import ConfigError, DataError
from semiseg.losses.generic_ssl import (
    DifficultyState,
    aggregate,
    alphas_cumprod,
    ddim_sample,
    difficulty_weights,
    fuse_pseudo_label,
    hard_dice,
    label_to_x0,
    linear_beta_schedule,
    q_sample,
    sample_timesteps,
    spaced_timesteps,
)
from semiseg.losses.labels import class_argmax
from semiseg.losses.segmentation import dice_ce_loss, soft_dice_loss
from semiseg.methods.base import Batch, Method, MethodContext, MethodNetworks, StepInfo
from semiseg.methods.dhc_schedule import consistency_weight, official_max_epoch
from semiseg.methods.registry import register_method
from semiseg.models import create_model
from semiseg.models.diff_vnet import DiffVNet


@dataclass
class GenericSSLOptions:
    """Options of ``generic_ssl``; defaults are the official run (README command)."""

    mu: float = 10.0  # -w (README 10; the script's default 2.0)
    # Ramp-up length in official epochs; 0 = max_epoch (official -cr None; M&Ms passes 100).
    rampup_epochs: float = 0.0
    # μ of epoch k is μ(k - 1) (official: recomputed after each epoch); false: μ(k).
    rampup_lag: bool = True
    # Iterations per official epoch (floor(U / 2), drop_last); 0 = half the trainer's epoch,
    # which is U for the 2 labeled + 2 unlabeled batch. max_epoch = max_iterations /
    # epoch_iterations - 1 (the official loop runs max_epoch + 1 epochs).
    epoch_iterations: int = 0
    ema_w: float = 0.99  # -s: aggregation momentum s
    diffusion_steps: int = 1000  # T
    beta_scale: bool = True  # guided-diffusion use_scale (betas x 1000 / T)
    sample_steps: int = 10  # DDIM steps of the pseudo-label sampler
    ddim_eta: float = 0.0
    clip_denoised: bool = True  # clamp every x_0 prediction to [-1, 1] while sampling
    # Pseudo-label fusion: "official" (Gumbel-softmax + Gaussian smoothing of p_ξ) or
    # "softmax" (plain softmax of the x_0 prediction).
    pseudo_label: Literal["official", "softmax"] = "official"
    smoothing_kernel: int = 3
    smoothing_sigma: float = 1.0
    gumbel_tau: float = 1.0
    diff_accumulate_iters: float = 50.0  # Difficulty K (class default 20; script 50)
    diff_power: float = 0.2  # exponent 1/5
    diff_normalize: bool = False  # official GenericSSL: no C w / max w (DHC's DiffDW: true)
    # Official --sup_loss w_ce+dice (weights in Dice and CE); "wce+dice"; "ce+dice" (none).
    sup_loss: Literal["w_ce+dice", "wce+dice", "ce+dice"] = "w_ce+dice"

    def __post_init__(self) -> None:
        # ValueError is reported by the config loader as a ConfigError naming method.options.
        if self.mu < 0:
            raise ValueError(f"mu must be >= 0, got {self.mu}")
        if self.rampup_epochs < 0 or self.epoch_iterations < 0:
            raise ValueError("rampup_epochs and epoch_iterations must be >= 0")
        if not 0.0 <= self.ema_w <= 1.0:
            raise ValueError(f"ema_w must be in [0, 1], got {self.ema_w}")
        if self.diffusion_steps < 2:
            raise ValueError(f"diffusion_steps must be >= 2, got {self.diffusion_steps}")
        if not 1 <= self.sample_steps <= self.diffusion_steps:
            raise ValueError(f"sample_steps must be in 1..diffusion_steps, got "
                             f"{self.sample_steps}")
        if self.ddim_eta < 0:
            raise ValueError(f"ddim_eta must be >= 0, got {self.ddim_eta}")
        if self.diff_accumulate_iters < 1.0:
            raise ValueError(f"diff_accumulate_iters must be >= 1, got "
                             f"{self.diff_accumulate_iters}")
        if self.diff_power <= 0 or self.smoothing_sigma <= 0 or self.gumbel_tau <= 0:
            raise ValueError("diff_power, smoothing_sigma and gumbel_tau must be > 0")
        if self.smoothing_kernel < 1:
            raise ValueError(f"smoothing_kernel must be >= 1, got {self.smoothing_kernel}")


@register_method("generic_ssl")
class GenericSSL(Method):
    """A&D on one DiffVNet: diffusion, difficulty-aware and aggregated decoders."""

    Options = GenericSSLOptions

    last_dice: Tensor
    learn: Tensor
    unlearn: Tensor
    dice_weight: Tensor
    class_weights: Tensor

    def __init__(self, context: MethodContext, options: GenericSSLOptions) -> None:
        super().__init__(context, options)
        network = create_model(context.model_name, context.num_classes, **context.model_options)
        if not isinstance(network, DiffVNet):
            raise ConfigError(f"method generic_ssl needs model.name: diff_vnet (three decoders "
                              f"on one encoder), got model.name: {context.model_name}")
        self.network = network
        betas = linear_beta_schedule(options.diffusion_steps, options.beta_scale)
        # Float64 on the CPU (as guided-diffusion's NumPy tables); indexed, then cast.
        self._cumprod = alphas_cumprod(betas)
        self._sample_timesteps = spaced_timesteps(options.diffusion_steps, options.sample_steps)
        state = DifficultyState.initial(context.num_classes)
        for name in ("last_dice", "learn", "unlearn", "dice_weight"):
            self.register_buffer(name, getattr(state, name).clone())
        # The last difficulty weights (official init_weights: C for every class), for logs.
        c = context.num_classes
        self.register_buffer("class_weights", torch.full((c,), float(c)))

    def _aggregation_pairs(self) -> list[tuple[nn.Parameter, Tensor, Tensor]]:
        """(θ, ξ, ψ) parameter triples: D_θ names also in D_ξ with the same shape."""
        net = self.network
        xi = dict(net.denoiser.decoder.named_parameters())
        psi = dict(net.decoder_psi.named_parameters())
        return [(p, xi[name], psi[name]) for name, p in net.decoder_theta.named_parameters()
                if name in xi and xi[name].shape == p.shape]

    # -- pieces --------------------------------------------------------------------------------
    @torch.no_grad()
    def aggregate_decoders(self) -> int:
        """One aggregation step of D_θ; returns the number of parameters averaged."""
        pairs = self._aggregation_pairs()
        for theta, xi, psi in pairs:
            theta.copy_(aggregate(theta, xi, psi, self.options.ema_w))
        return len(pairs)

    def difficulty_state(self) -> DifficultyState:
        return DifficultyState(self.last_dice.cpu(), self.learn.cpu(), self.unlearn.cpu(),
                               self.dice_weight.cpu())

    @torch.no_grad()
    def update_difficulty(self, logits: Tensor, label: Tensor) -> Tensor:
        """New difficulty weights from ``argmax(logits)`` vs ``label``; stores the state."""
        dice = hard_dice(class_argmax(logits.detach()), label, self.context.num_classes)
        opts = self.options
        weights, state = difficulty_weights(self.difficulty_state(), dice,
                                            opts.diff_accumulate_iters, opts.diff_power,
                                            opts.diff_normalize)
        for name in ("last_dice", "learn", "unlearn", "dice_weight"):
            getattr(self, name).copy_(getattr(state, name))
        self.class_weights.copy_(weights)
        return weights.to(logits.device)

    @torch.no_grad()
    def pseudo_label(self, image_u: Tensor) -> Tensor:
        """``argmax(p̃_ξ + p̃_ψ)`` of the unlabeled crops (the network in its current mode)."""
        net, opts = self.network, self.options
        shape = (image_u.size(0), self.context.num_classes, *image_u.shape[2:])
        xi = ddim_sample(lambda x, t: net.denoise(x, t, image_u), shape, self._cumprod,
                         self._sample_timesteps, opts.clip_denoised, opts.ddim_eta,
                         device=image_u.device)
        psi = net.psi(image_u)
        return fuse_pseudo_label(xi, psi, opts.pseudo_label, opts.smoothing_kernel,
                                 opts.smoothing_sigma, opts.gumbel_tau)

    def _supervised(self, logits: Tensor, label: Tensor, weight: Tensor | None) -> Tensor:
        loss = self.options.sup_loss
        if loss == "w_ce+dice" or weight is None:
            return dice_ce_loss(logits.float(), label, weight)
        if loss == "wce+dice":  # weights in the cross entropy only
            return (soft_dice_loss(torch.softmax(logits.float(), 1), label)
                    + nn.functional.cross_entropy(logits.float(), label, weight=weight))
        return dice_ce_loss(logits.float(), label)

    # -- training ------------------------------------------------------------------------------
    def training_step(self, batch: Batch, step: StepInfo) -> dict[str, Tensor]:
        """``deno`` (D_ξ), ``diff`` (D_ψ, difficulty-weighted), ``unsup`` (D_θ on ŷ)."""
        n = batch.num_labeled
        if n == 0 or n == batch.image.size(0):
            raise DataError(f"{self.name}: a batch needs labeled and unlabeled crops "
                            f"(got {n} of {batch.image.size(0)} labeled)")
        self.aggregate_decoders()
        net = self.network
        image_l, image_u = batch.labeled_image, batch.unlabeled_image
        label = batch.label.long()
        x0 = label_to_x0(label, self.context.num_classes).to(image_l.device)
        t = sample_timesteps(n, self.options.diffusion_steps, device=image_l.device)
        x_t = q_sample(x0, t, torch.randn_like(x0), self._cumprod)
        p_psi = net.psi(image_l)  # before D_ξ: see the module docstring
        p_xi = net.denoise(x_t, t, image_l)
        weights = self.update_difficulty(p_xi, label)
        terms = {"deno": dice_ce_loss(p_xi.float(), label),
                 "diff": self._supervised(p_psi, label, weights)}
        pseudo = self.pseudo_label(image_u)
        terms["unsup"] = dice_ce_loss(net.theta(image_u).float(), pseudo)
        return terms

    def max_epoch(self, step: StepInfo) -> int:
        """The official ``max_epoch``: the run holds max_epoch + 1 epochs of floor(U / 2)."""
        return official_max_epoch(step, self.options.epoch_iterations, round_up=False)

    def unsup_weight(self, step: StepInfo) -> float:
        """μ(e) of the iteration ``step``."""
        opts = self.options
        return consistency_weight(step, opts.mu, opts.epoch_iterations, opts.rampup_epochs,
                                  opts.rampup_lag, round_up=False)

    def loss_weights(self, step: StepInfo) -> dict[str, float]:
        return {"deno": 1.0, "diff": 1.0, "unsup": self.unsup_weight(step)}

    def networks(self) -> MethodNetworks:
        return MethodNetworks(trained=(self.network,))

    def inference_network(self) -> nn.Module:
        """The DiffVNet, whose forward is D_θ (official test.py)."""
        return self.network

