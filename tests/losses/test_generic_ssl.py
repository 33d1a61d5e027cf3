"""GenericSSL's diffusion and debiasing functions on hand-computed cases."""

import math

import pytest
import torch

from semiseg.losses.generic_ssl import (
    DifficultyState,
    aggregate,
    alphas_cumprod,
    ddim_sample,
    ddim_step,
    difficulty_weights,
    fuse_pseudo_label,
    gaussian_kernel,
    gaussian_smooth,
    gumbel_softmax,
    hard_dice,
    label_to_x0,
    linear_beta_schedule,
    q_sample,
    sample_timesteps,
    spaced_timesteps,
)


def test_linear_schedule_official_values() -> None:
    betas = linear_beta_schedule(1000)
    # Linear from 1e-4 to 0.02 in 999 equal steps of (0.02 - 1e-4) / 999 = 1.992e-5.
    assert betas[0].item() == pytest.approx(1e-4)
    assert betas[1].item() == pytest.approx(1e-4 + 1.992e-5)
    assert betas[999].item() == pytest.approx(0.02)
    cumprod = alphas_cumprod(betas)
    assert cumprod[0].item() == pytest.approx(0.9999)
    # Values printed by the official guided-diffusion GaussianDiffusion (alphas_cumprod).
    assert cumprod[499].item() == pytest.approx(7.85872429e-02, rel=1e-8)
    assert cumprod[999].item() == pytest.approx(4.03582977e-05, rel=1e-8)


def test_schedule_scaling_and_cumulative_product_by_hand() -> None:
    # use_scale multiplies both ends by 1000 / T: T = 100 -> 1e-3 .. 0.2.
    scaled = linear_beta_schedule(100)
    assert (scaled[0].item(), scaled[-1].item()) == pytest.approx((1e-3, 0.2))
    betas = linear_beta_schedule(4, scale=False)  # step (0.02 - 1e-4) / 3 = 0.0066333...
    step = (0.02 - 1e-4) / 3
    assert betas.tolist() == pytest.approx([1e-4, 1e-4 + step, 1e-4 + 2 * step, 0.02])
    expected, prod = [], 1.0
    for beta in (1e-4, 1e-4 + step, 1e-4 + 2 * step, 0.02):
        prod *= 1.0 - beta
        expected.append(prod)
    assert alphas_cumprod(betas).tolist() == pytest.approx(expected, rel=1e-12)
    assert expected[-1] == pytest.approx(0.9999 * 0.9932667 * 0.9866333 * 0.98, rel=1e-6)
    with pytest.raises(ValueError, match="betas"):
        alphas_cumprod(linear_beta_schedule(10))  # 100 x 0.02 = 2 > 1


def test_label_to_x0_and_q_sample() -> None:
    x0 = label_to_x0(torch.tensor([[[[0, 2]]]]), 3)  # [1, 1, 1, 2] labels
    assert x0.shape == (1, 3, 1, 1, 2)
    assert x0[0, :, 0, 0, 0].tolist() == [1.0, -1.0, -1.0]
    assert x0[0, :, 0, 0, 1].tolist() == [-1.0, -1.0, 1.0]
    cumprod = alphas_cumprod(linear_beta_schedule(1000))
    ones = torch.ones(2, 1, 1, 1, 1)
    noise = torch.full_like(ones, 2.0)
    out = q_sample(ones, torch.tensor([0, 999]), noise, cumprod)
    # t=0: sqrt(0.9999) + sqrt(1e-4) * 2 = 0.99995 + 0.02
    assert out[0].item() == pytest.approx(math.sqrt(0.9999) + 0.02, rel=1e-6)
    abar = 4.03582977e-05
    assert out[1].item() == pytest.approx(math.sqrt(abar) + 2 * math.sqrt(1 - abar), rel=1e-6)


def test_timesteps() -> None:
    t = sample_timesteps(1000, 10, generator=torch.Generator().manual_seed(0))
    assert t.dtype == torch.int64 and int(t.min()) == 0 and int(t.max()) == 9
    assert spaced_timesteps(1000, 10) == [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]
    assert spaced_timesteps(10, 4) == [0, 3, 6, 9]
    # Stride 999 / 6 = 166.5: Python rounds halves to even, as the official code does.
    assert spaced_timesteps(1000, 7) == [0, 166, 333, 500, 666, 832, 999]


def test_ddim_step_by_hand() -> None:
    x_t, x0 = torch.tensor([1.0]), torch.tensor([0.5])
    # eps = (1 / sqrt(0.25) - 0.5) / sqrt(1 / 0.25 - 1) = 1.5 / sqrt(3) = 0.8660254
    # abar_prev 0.64: 0.5 * 0.8 + sqrt(0.36) * 0.8660254 = 0.91961524
    out = ddim_step(x_t, x0, torch.tensor([0.25]), torch.tensor([0.64]))
    assert out.item() == pytest.approx(0.91961524, rel=1e-6)
    # abar_prev 1 (the last step): the x0 prediction itself.
    assert ddim_step(x_t, x0, torch.tensor([0.25]), torch.tensor([1.0])).item() == 0.5


def test_ddim_sample_visits_steps_backwards_and_returns_clamped_x0() -> None:
    seen = []

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        seen.append(int(t[0]))
        return torch.full_like(x, 2.0)

    cumprod = alphas_cumprod(linear_beta_schedule(1000))
    out = ddim_sample(denoise, (2, 3, 1, 1, 1), cumprod, [0, 333, 666, 999])
    assert seen == [999, 666, 333, 0]
    assert torch.equal(out, torch.ones(2, 3, 1, 1, 1))  # 2 clamped to 1
    raw = ddim_sample(denoise, (1, 1, 1, 1, 1), cumprod, [0, 999], clip=False)
    assert raw.item() == 2.0


def test_gaussian_kernel_and_smoothing_by_hand() -> None:
    kernel = gaussian_kernel(3, 1.0)
    # 1-D taps e^-0.5, 1, e^-0.5 over 1 + 2 e^-0.5 = 2.2130613: 0.2740686, 0.4518628.
    side, centre = 0.60653066 / 2.21306132, 1 / 2.21306132
    assert kernel.sum().item() == pytest.approx(1.0)
    assert kernel[1, 1, 1].item() == pytest.approx(centre ** 3, rel=1e-6)  # 0.0922625
    assert kernel[0, 0, 0].item() == pytest.approx(side ** 3, rel=1e-6)  # 0.0205864
    ones = torch.ones(1, 2, 3, 3, 3)
    smooth = gaussian_smooth(ones, kernel)
    assert smooth[0, 1, 1, 1, 1].item() == pytest.approx(1.0)  # interior of a constant
    # A corner sees one 2x2x2 octant of the kernel (zero padding): (0.4518628 + 0.2740686)^3.
    assert smooth[0, 0, 0, 0, 0].item() == pytest.approx((centre + side) ** 3, rel=1e-6)


def test_gumbel_softmax_and_pseudo_label_fusion() -> None:
    logits = torch.tensor([1.0, -1.0]).view(1, 2, 1, 1, 1)
    assert gumbel_softmax(logits, 1.0, torch.zeros_like(logits)).flatten().tolist() == \
        pytest.approx([0.8807971, 0.1192029])
    # softmax(1, -1) = (0.881, 0.119); softmax(0, 3) = (0.047, 0.953): sum (0.928, 1.072) -> 1
    # softmax(0, 1) = (0.269, 0.731): sum (1.150, 0.850) -> 0
    psi = torch.tensor([[0.0, 3.0], [0.0, 1.0]]).T.reshape(1, 2, 1, 1, 2)
    xi = torch.tensor([1.0, -1.0]).view(1, 2, 1, 1, 1).expand(1, 2, 1, 1, 2)
    assert fuse_pseudo_label(xi, psi, "softmax").flatten().tolist() == [1, 0]
    # Official fusion with zero Gumbel noise: at the centre of a constant 3^3 field the
    # smoothing is the identity, so the same decisions.
    xi3 = torch.tensor([1.0, -1.0]).view(1, 2, 1, 1, 1).expand(1, 2, 3, 3, 3)
    for psi_logits, expected in (((0.0, 3.0), 1), ((0.0, 1.0), 0)):
        psi3 = torch.tensor(psi_logits).view(1, 2, 1, 1, 1).expand(1, 2, 3, 3, 3)
        out = fuse_pseudo_label(xi3, psi3, "official", gumbel=torch.zeros(1, 2, 3, 3, 3))
        assert out[0, 1, 1, 1].item() == expected


def test_hard_dice_by_hand() -> None:
    pred = torch.tensor([0, 0, 1, 1])
    target = torch.tensor([0, 1, 1, 1])
    # class 0: tp 1, fp 1 -> 2/3; class 1: tp 2, fn 1 -> 4/5; class 2 absent -> 0.5
    assert hard_dice(pred, target, 3).tolist() == pytest.approx([2 / 3, 0.8, 0.5])


def test_difficulty_weights_by_hand() -> None:
    state = DifficultyState(torch.tensor([0.5, 0.5], dtype=torch.float64),
                            torch.tensor([0.2, 0.1], dtype=torch.float64),
                            torch.tensor([0.1, 0.2], dtype=torch.float64),
                            torch.tensor([0.6, 0.4], dtype=torch.float64))
    # K = 2 -> m = 0.5. Dice unchanged: learn = unlearn = 0 this step, so
    # L = (0.1, 0.05), U = (0.05, 0.1), diff = (0.5^0.2, 2^0.2) = (0.8705506, 1.1486984),
    # D = 0.5 (0.6, 0.4) + 0.5 (0.5, 0.5) = (0.55, 0.45),
    # w = 2 diff D = (0.9576056, 1.0338285) (official: no max-normalisation).
    dice = torch.tensor([0.5, 0.5])
    weights, new = difficulty_weights(state, dice, accumulate_iters=2, normalize=False)
    assert weights.tolist() == pytest.approx([0.9576056, 1.0338285], rel=1e-6)
    assert new.learn.tolist() == pytest.approx([0.1, 0.05])
    assert new.unlearn.tolist() == pytest.approx([0.05, 0.1])
    assert new.dice_weight.tolist() == pytest.approx([0.55, 0.45])
    # DHC's normalisation: 2 w / max w = (2 x 0.9576056 / 1.0338285, 2) = (1.8525425, 2).
    normalized, _ = difficulty_weights(state, dice, accumulate_iters=2, normalize=True)
    assert normalized.tolist() == pytest.approx([1.8525425, 2.0], rel=1e-6)
    # Class 0 improves 0.5 -> 1 (learn 0.5 ln 2 = 0.3465736), class 1 drops 0.5 -> 0.25
    # (unlearn -0.25 ln 0.5 = 0.1732868): L = (0.1 + 0.1732868, 0.05), U = (0.05, 0.1 + 0.0866434).
    _, moved = difficulty_weights(state, torch.tensor([1.0, 0.25]), accumulate_iters=2)
    assert moved.learn.tolist() == pytest.approx([0.2732868, 0.05], rel=1e-6)
    assert moved.unlearn.tolist() == pytest.approx([0.05, 0.1866434], rel=1e-6)
    assert moved.last_dice.tolist() == [1.0, 0.25]
    assert state.last_dice.tolist() == [0.5, 0.5]  # pure: the input state is untouched


def test_difficulty_first_step_from_the_official_start() -> None:
    # Start: previous Dice 1e-8, histories 0, D = 1. A Dice of 0.5 for both classes is pure
    # learning: U stays 0, so diff = (1e-8 / (L + 1e-8))^0.2 is the same for both, and
    # D = 0.98 + 0.02 x 0.5 = 0.99 (K = 50): the weights are equal.
    weights, new = difficulty_weights(DifficultyState.initial(2), torch.tensor([0.5, 0.5]),
                                      normalize=False)
    learn = 0.02 * 0.5 * math.log(0.5 / 1e-8)
    assert new.learn.tolist() == pytest.approx([learn, learn])
    expected = 2 * (1e-8 / (learn + 1e-8)) ** 0.2 * 0.99
    assert weights.tolist() == pytest.approx([expected, expected], rel=1e-5)  # 0.0702968
    # With DHC's normalisation equal weights are C = 2 each.
    normalized, _ = difficulty_weights(DifficultyState.initial(2), torch.tensor([0.5, 0.5]))
    assert normalized.tolist() == [2.0, 2.0]


def test_aggregate() -> None:
    out = aggregate(torch.tensor(1.0), torch.tensor(3.0), torch.tensor(5.0), 0.99)
    assert out.item() == pytest.approx(0.99 + 0.01 * 4)  # 1.03
    with pytest.raises(ValueError):
        aggregate(torch.tensor(1.0), torch.tensor(1.0), torch.tensor(1.0), 1.5)
