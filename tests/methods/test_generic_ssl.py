"""GenericSSL (A&D): one iteration replayed term by term, μ ramp, aggregation, SCDL, trainer."""

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from semiseg.catalog import build_method
from semiseg.config import load_config
from semiseg.errors import ConfigError
from semiseg.losses.generic_ssl import (
    DifficultyState,
    alphas_cumprod,
    difficulty_weights,
    hard_dice,
    label_to_x0,
    linear_beta_schedule,
    q_sample,
)
from semiseg.losses.segmentation import dice_ce_loss
from semiseg.methods.base import Batch, MethodContext, StepInfo
from semiseg.methods.generic_ssl import GenericSSL


def _context(model: str = "diff_vnet") -> MethodContext:
    return MethodContext(num_classes=3, model_name=model,
                         model_options={"n_filters": 4, "has_dropout": True},
                         patch_size=(16, 16, 16))


def _batch() -> Batch:
    gen = torch.Generator().manual_seed(0)
    image = torch.randn(4, 1, 16, 16, 16, generator=gen)
    label = torch.randint(0, 3, (2, 16, 16, 16), generator=gen)
    return Batch(image, label, 2, ["a", "b", "c", "d"])


def _method(options: dict | None = None) -> GenericSSL:
    torch.manual_seed(0)
    method = build_method("generic_ssl", _context(), options or {})
    assert isinstance(method, GenericSSL)
    return method


def test_step_terms_replayed_by_hand() -> None:
    method = _method()
    # Official conv stages always drop 10 % of channels; switch dropout off so that the
    # replay below sees the same train-mode (batch-statistics) outputs.
    for module in method.modules():
        if isinstance(module, nn.Dropout3d):
            module.p = 0.0
    net, batch = method.network, _batch()
    torch.manual_seed(5)
    terms = method.training_step(batch, StepInfo(0, 100, 16))
    assert set(terms) == {"deno", "diff", "unsup"}
    # Replay with the same random draws: timesteps, noise, DDIM start, Gumbel noise.
    torch.manual_seed(5)
    with torch.no_grad():
        x_l, x_u, y = batch.labeled_image, batch.unlabeled_image, batch.label
        t = torch.randint(0, 1000, (2,))
        x0 = label_to_x0(y, 3)
        x_t = q_sample(x0, t, torch.randn_like(x0), alphas_cumprod(linear_beta_schedule()))
        p_psi = net.psi(x_l)
        p_xi = net.denoise(x_t, t, x_l)
        weights, _ = difficulty_weights(DifficultyState.initial(3),
                                        hard_dice(p_xi.argmax(1), y, 3), 50, 0.2, False)
        pseudo = method.pseudo_label(x_u)
        p_theta = net.theta(x_u)
    assert terms["deno"].item() == pytest.approx(dice_ce_loss(p_xi, y).item(), rel=1e-5)
    assert method.class_weights.tolist() == pytest.approx(weights.tolist(), rel=1e-6)
    assert terms["diff"].item() == pytest.approx(dice_ce_loss(p_psi, y, weights).item(),
                                                 rel=1e-5)
    assert terms["unsup"].item() == pytest.approx(dice_ce_loss(p_theta, pseudo).item(),
                                                  rel=1e-5)
    sum(terms.values()).backward()
    for decoder in (net.denoiser.decoder, net.decoder_psi, net.decoder_theta):
        assert decoder.out_conv.weight.grad is not None


def test_mu_rampup_counts_official_epochs_with_a_lag() -> None:
    method = _method()
    # 100 iterations, trainer epoch 16 (U = 16) -> official epoch 8 iterations,
    # max_epoch = round(100 / 8) - 1 = 11. Iteration 35 is epoch 4, which uses μ(3).
    weights = method.loss_weights(StepInfo(35, 100, 16))
    assert weights["deno"] == weights["diff"] == 1.0
    assert weights["unsup"] == pytest.approx(10 * math.exp(-5 * (1 - 3 / 11) ** 2))  # 0.7103
    # Epochs 0 and 1 both use μ(0) = 10 e^-5 = 0.0673795.
    for iteration in (0, 15):
        assert method.loss_weights(StepInfo(iteration, 100, 16))["unsup"] == \
            pytest.approx(10 * math.exp(-5))
    assert method.loss_weights(StepInfo(99, 100, 16))["unsup"] == pytest.approx(10.0)
    plain = _method({"rampup_lag": False, "epoch_iterations": 10, "mu": 2.0})
    # epoch 3 of max_epoch round(100 / 10) - 1 = 9: 2 exp(-5 (1 - 3/9)^2) = 2 e^-2.2222
    assert plain.loss_weights(StepInfo(35, 100, 16))["unsup"] == \
        pytest.approx(2 * math.exp(-5 * (2 / 3) ** 2))


def test_aggregation_before_the_forward_pass() -> None:
    method = _method()
    net = method.network
    theta0 = {k: v.detach().clone() for k, v in net.decoder_theta.named_parameters()}
    xi = dict(net.denoiser.decoder.named_parameters())
    psi = dict(net.decoder_psi.named_parameters())
    assert method.aggregate_decoders() == 54
    for name, param in net.decoder_theta.named_parameters():
        expected = 0.99 * theta0[name] + 0.01 * (xi[name] + psi[name]) / 2
        assert torch.allclose(param, expected, atol=1e-7), name


def test_other_networks_are_rejected() -> None:
    with pytest.raises(ConfigError, match="diff_vnet"):
        build_method("generic_ssl", _context("vnet"), {})
    with pytest.raises(ConfigError, match="sample_steps"):
        build_method("generic_ssl", _context(), {"sample_steps": 0})


def test_scdl_generic_ssl_attaches_to_the_shared_encoder_and_adds_its_terms() -> None:
    torch.manual_seed(0)
    method = build_method("scdl_generic_ssl", _context(), {"host": {"mu": 5.0}, "scdl": {}})
    host = method.host
    assert isinstance(host, GenericSSL)
    assert host.network.injector is not None
    terms = method.training_step(_batch(), StepInfo(0, 100, 16))
    assert set(terms) == {"deno", "diff", "unsup", "scdl_e2p", "scdl_p2e", "scdl_sac"}
    assert all(torch.isfinite(v) for v in terms.values())
    weights = method.loss_weights(StepInfo(0, 100, 16))
    assert weights["unsup"] == pytest.approx(5 * math.exp(-5))
    assert weights["scdl_e2p"] == weights["scdl_p2e"] == weights["scdl_sac"] == 0.1
    groups = method.parameter_groups(3e-5)
    assert [g["weight_decay"] for g in groups] == [3e-5, 1e-4]
    sum(terms.values()).backward()
    cdba = host.network.injector.cdba
    assert cdba.proxy_mean.grad is not None and cdba.proxy_mean.grad.abs().sum() > 0
    # Inference is D_θ with the prior injected; the injector is in the network's state dict.
    assert method.inference_network() is host.network
    assert any(k.startswith("host.network.injector.") for k in method.state_dict())


def test_trainer_runs_generic_ssl_and_rebuilds_it_from_the_checkpoint(tmp_path: Path) -> None:
    from semiseg.engine.checkpoint import load_checkpoint
    from semiseg.engine.runs import network_from_payload
    from semiseg.engine.trainer import Trainer

    overrides = [
        f"data.root={tmp_path / 'data'}", "data.phantom.num_cases=6",
        "data.phantom.shape=[16, 16, 16]", "data.patch_size=[16, 16, 16]",
        "data.intensity=dhc",
        "model.name=diff_vnet", "model.options={n_filters: 4, has_dropout: true}",
        "method.name=generic_ssl", "method.options={sample_steps: 2}",
        "train.max_iterations=2", "train.validate_every=0", "train.checkpoint_every=2",
        "inference.patch_size=[16, 16, 16]", "inference.stride=[8, 8, 8]",
    ]
    config = load_config(None, overrides)
    Trainer(config, tmp_path / "run", show_progress=False).fit()
    payload = load_checkpoint(tmp_path / "run/checkpoints/last.pt")
    state = payload["method"]
    # Difficulty state after two iterations is saved (resume continues the history).
    assert state["dice_weight"].shape == (14,)
    assert not torch.equal(state["dice_weight"], torch.ones(14, dtype=torch.float64))
    network, _ = network_from_payload(payload, tmp_path / "run/checkpoints/last.pt")
    x = torch.rand(1, 1, 16, 16, 16)
    with torch.no_grad():
        out = network(x)
    assert out.shape == (1, 14, 16, 16, 16)
    theta = {k[len("network.decoder_theta."):]: v for k, v in state.items()
             if k.startswith("network.decoder_theta.")}
    assert torch.equal(network.decoder_theta.out_conv.weight, theta["out_conv.weight"])
