"""DHC (semiseg.methods.dhc): terms, weights, ramp-up, heterogeneous networks, SCDL on top,
and a short run through the trainer."""

import csv
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from semiseg.catalog import build_method
from semiseg.config import load_config
from semiseg.errors import ConfigError
from semiseg.losses.dhc import (
    distdw_weights,
    hard_dice_per_class,
    weighted_cross_entropy,
    weighted_dice_ce,
)
from semiseg.losses.labels import class_histogram
from semiseg.methods.base import Batch, MethodContext, StepInfo
from semiseg.methods.dhc import DHC

C = 3


def _context() -> MethodContext:
    return MethodContext(num_classes=C, model_options={"n_filters": 4, "has_dropout": True},
                         patch_size=(16, 16, 16))


def _batch() -> Batch:
    gen = torch.Generator().manual_seed(0)
    image = torch.randn(4, 1, 16, 16, 16, generator=gen)
    label = torch.randint(0, C, (2, 16, 16, 16), generator=gen)
    return Batch(image, label, 2, ["a", "b", "c", "d"])


def _dhc(**options: object) -> DHC:
    torch.manual_seed(0)
    method = build_method("dhc", _context(), dict(options))
    assert isinstance(method, DHC)
    return method.train()


def test_training_step_terms_and_the_weights_they_use() -> None:
    method = _dhc()
    batch = _batch()
    state = torch.get_rng_state()
    terms = method.training_step(batch, StepInfo(0, 100, 10))
    assert set(terms) == {"sup_dice_ce_a", "sup_dice_ce_b", "cps"}
    assert all(torch.isfinite(v) for v in terms.values())

    # Recompute the same forward (same dropout masks) and check every term by its definition.
    torch.set_rng_state(state)
    with torch.no_grad():
        la, lb = method.net_a(batch.image), method.net_b(batch.image)
    # B: DistDW, initialised from the labeled crops' histogram, one 0.99 step towards the
    # histogram of B's argmax on the two unlabeled crops.
    w_b = (0.99 * distdw_weights(class_histogram(batch.label, C))
           + 0.01 * distdw_weights(class_histogram(lb[2:].argmax(1), C)))
    assert method.distdw.weights.tolist() == pytest.approx(w_b.tolist(), rel=1e-5)
    # A: DiffDW after one iteration from A's hard Dice d on the labeled crops (K = 50):
    # L = 0.02 d ln(d / 1e-8), U = 0, D = 0.98 + 0.02 (1 - d), w ∝ L^(-1/5) D, max = C.
    d = hard_dice_per_class(la[:2].argmax(1), batch.label, C)
    assert method.diffdw.last_dice.tolist() == pytest.approx(d.tolist())
    raw = (0.02 * (d - 1e-8) * torch.log(d / 1e-8) + 1e-8) ** -0.2 * (0.98 + 0.02 * (1 - d))
    w_a = C * raw / raw.max()
    assert method.diffdw.weights.tolist() == pytest.approx(w_a.tolist(), rel=1e-5)
    assert float(method.diffdw.weights.max()) == pytest.approx(C)
    w_a, w_b = method.diffdw.weights, method.distdw.weights
    expected = {
        "sup_dice_ce_a": weighted_dice_ce(la[:2], batch.label, w_a, w_a),
        "sup_dice_ce_b": weighted_dice_ce(lb[:2], batch.label, w_b, w_b),
        "cps": weighted_cross_entropy(la, lb.argmax(1), w_a)
        + weighted_cross_entropy(lb, la.argmax(1), w_b),
    }
    for name, value in expected.items():
        assert terms[name].item() == pytest.approx(value.item(), rel=1e-4), name
    sum(terms.values()).backward()
    assert method.net_a.out_conv.weight.grad is not None
    assert method.net_b.out_conv.weight.grad is not None


def test_consistency_weight_by_hand() -> None:
    method = _dhc()
    # 100 iterations, trainer epoch 10 -> DHC epoch ceil(10 / 2) = 5 iterations, 20 epochs,
    # max_epoch E = 19. Iteration 35 is in epoch 7 and uses λ(6) (official lag):
    # 0.1 exp(-5 (1 - 6/19)^2) = 0.1 exp(-5 (13/19)^2) = 0.1 exp(-2.340720) = 0.00962583.
    assert method.loss_weights(StepInfo(35, 100, 10))["cps"] == pytest.approx(0.00962583,
                                                                              rel=1e-5)
    # Epochs 0 and 1 both use λ(0) = 0.1 e^-5 = 0.000673795.
    for iteration in (0, 4, 5, 9):
        assert method.loss_weights(StepInfo(iteration, 100, 10))["cps"] == pytest.approx(
            0.000673795, rel=1e-5)
    # Last iteration 99: epoch 19 -> λ(18) = 0.1 exp(-5 / 361) = 0.0986245.
    assert method.loss_weights(StepInfo(99, 100, 10))["cps"] == pytest.approx(0.0986245,
                                                                              rel=1e-5)
    # No lag, explicit 8-iteration epochs (Synapse 20 %: 2408 = 301 x 8, E = 300):
    # iteration 1200 is epoch 150 -> 0.1 exp(-5 * 0.25) = 0.0286505.
    plain = _dhc(rampup_lag=False, epoch_iterations=8)
    assert plain.max_epoch(StepInfo(0, 2408, 16)) == 300
    assert plain.loss_weights(StepInfo(1200, 2408, 16))["cps"] == pytest.approx(0.0286505,
                                                                                rel=1e-5)


def test_two_kaiming_networks_differ_by_init_and_by_weighting() -> None:
    method = _dhc()
    # Same architecture, both Kaiming-normal (official): Conv3d weights have std
    # sqrt(2 / fan_in); block_five has 64 -> 64 channels, fan_in 64 * 27 = 1728,
    # std sqrt(2 / 1728) = 0.034021 (Xavier, CPS's network B, would give sqrt(2 / 3456) =
    # 0.024056). BatchNorm weights 1, biases 0.
    for net in (method.net_a, method.net_b):
        conv = net.encoder.block_five.conv[0].weight
        assert conv.std().item() == pytest.approx(math.sqrt(2 / 1728), rel=0.03)
        bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm3d)]
        assert all(torch.all(m.weight == 1) and torch.all(m.bias == 0) for m in bns)
    # ... but drawn one after the other: different weights.
    wa = method.net_a.encoder.block_five.conv[0].weight
    wb = method.net_b.encoder.block_five.conv[0].weight
    assert not torch.equal(wa, wb)
    assert [type(m) for m in method.net_a.modules()] == [type(m) for m in method.net_b.modules()]
    # The heterogeneity DHC relies on: after one step A's DiffDW and B's DistDW weights differ.
    method.training_step(_batch(), StepInfo(0, 100, 10))
    assert not torch.allclose(method.diffdw.weights, method.distdw.weights)
    # DistDW: the most frequent class of the labeled histogram starts at exactly 0.
    fresh = _dhc(dist_init_counts=[900.0, 90.0, 9.0])
    assert fresh.distdw.weights.tolist() == pytest.approx([0.0, 1.5, 3.0], rel=1e-6)


def test_inference_averages_logits_and_state_dict_holds_the_weightings() -> None:
    method = _dhc().eval()
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        expected = (method.net_a(x) + method.net_b(x)) / 2
        assert torch.allclose(method.inference_network()(x), expected)
    keys = set(method.state_dict())
    assert {"distdw.weights", "distdw.initialised", "diffdw.learn", "diffdw.unlearn",
            "diffdw.last_dice", "diffdw.dice_weight", "diffdw.weights"} <= keys
    assert all(k.startswith(("net_a.", "net_b.", "distdw.", "diffdw.")) for k in keys)


def test_options_are_validated() -> None:
    with pytest.raises(ConfigError, match="dist_momentum"):
        build_method("dhc", _context(), {"dist_momentum": 1.0})
    with pytest.raises(ConfigError, match="dist_init_counts"):
        build_method("dhc", _context(), {"dist_init_counts": [1.0, 2.0]})
    with pytest.raises(ConfigError, match="sup_loss"):
        build_method("dhc", _context(), {"sup_loss": "dice"})


def test_unweighted_variant_is_plain_dice_ce_and_ce() -> None:
    method = _dhc(sup_loss="ce+dice", cps_loss="ce")
    batch = _batch()
    state = torch.get_rng_state()
    terms = method.training_step(batch, StepInfo(0, 100, 10))
    torch.set_rng_state(state)
    with torch.no_grad():
        la, lb = method.net_a(batch.image), method.net_b(batch.image)
    assert terms["sup_dice_ce_a"].item() == pytest.approx(
        weighted_dice_ce(la[:2], batch.label, None, None).item(), rel=1e-4)
    cps = (nn.functional.cross_entropy(la, lb.argmax(1))
           + nn.functional.cross_entropy(lb, la.argmax(1)))
    assert terms["cps"].item() == pytest.approx(cps.item(), rel=1e-4)


def test_scdl_dhc_attaches_to_both_networks_and_adds_its_terms() -> None:
    from semiseg.plugins.scdl import SCDLMethod

    torch.manual_seed(0)
    method = build_method("scdl_dhc", _context(),
                          {"host": {"consistency": 0.2}, "scdl": {"sac_max_classes": 2}})
    assert isinstance(method, SCDLMethod)
    assert [net for net, _ in method.proxy_networks()] == [method.host.net_a, method.host.net_b]
    terms = method.train().training_step(_batch(), StepInfo(0, 100, 10))
    assert set(terms) == {"sup_dice_ce_a", "sup_dice_ce_b", "cps",
                          "scdl_e2p", "scdl_p2e", "scdl_sac"}
    assert all(torch.isfinite(v) for v in terms.values())
    weights = method.loss_weights(StepInfo(0, 100, 10))
    # The host option reaches DHC: λ(0) = 0.2 e^-5 = 0.00134759.
    assert weights["cps"] == pytest.approx(0.00134759, rel=1e-5)
    assert {"scdl_e2p", "scdl_p2e", "scdl_sac"} <= set(weights)


def test_trainer_runs_dhc_and_restores_the_weightings(tmp_path: Path) -> None:
    from semiseg.data.classes import get_class_set
    from semiseg.engine.checkpoint import load_checkpoint
    from semiseg.engine.runs import network_from_payload
    from semiseg.engine.setup import build_method_for
    from semiseg.engine.trainer import Trainer

    overrides = [
        f"data.root={tmp_path / 'data'}", "data.phantom.num_cases=6",
        "data.phantom.shape=[24, 24, 20]", "data.patch_size=[16, 16, 16]",
        "data.intensity=dhc", "model.options={n_filters: 4, has_dropout: true}",
        "method.name=dhc", "method.options={epoch_iterations: 1}",
        "train.max_iterations=3", "train.validate_every=0", "train.checkpoint_every=1",
        "train.log_every=1", "inference.patch_size=[16, 16, 16]",
    ]
    run = tmp_path / "run"
    Trainer(load_config(None, overrides), run, show_progress=False).fit()
    with open(run / "log.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    # 1-iteration epochs, 3 iterations: E = 3 / 1 - 1 = 2. Iterations 0, 1 use λ(0) =
    # 0.1 e^-5 = 0.000673795; iteration 2 uses λ(1) = 0.1 exp(-5 (1/2)^2) = 0.0286505.
    assert [float(r["weight/cps"]) for r in rows] == pytest.approx(
        [0.000673795, 0.000673795, 0.0286505], rel=1e-5)
    payload = load_checkpoint(run / "checkpoints/last.pt")
    state = payload["method"]
    assert payload["iteration"] == 3 and bool(state["distdw.initialised"])
    assert float(state["diffdw.weights"].max()) == pytest.approx(14.0)  # C w / max w, C = 14
    assert float(state["distdw.weights"].min()) >= 0.0
    assert float(state["distdw.weights"].max()) <= 14.0 + 1e-5
    # D after 3 updates from 1: 0.98^3 + (1 - 0.98^3) * (mean 1 - d) lies in [0.941192, 1].
    assert all(0.941191 <= v <= 1.0 for v in state["diffdw.dice_weight"].tolist())
    # A fresh method restores the weighting state from the checkpoint.
    config = load_config(None, overrides)
    fresh = build_method_for(config, class_set=get_class_set("synapse"))
    fresh.load_state_dict(state)
    assert torch.equal(fresh.distdw.weights, state["distdw.weights"])
    assert torch.equal(fresh.diffdw.learn, state["diffdw.learn"])
    network, _ = network_from_payload(payload, run / "checkpoints/last.pt")
    with torch.no_grad():
        assert network(torch.rand(1, 1, 16, 16, 16)).shape == (1, 14, 16, 16, 16)


def test_distdw_starts_from_the_histogram_of_every_labeled_volume(tmp_path: Path) -> None:
    """The trainer's setup hands the labeled label volumes to DHC (official init_weights)."""
    import numpy as np

    from semiseg.engine.setup import build_method_for, prepare_run_data
    from semiseg.losses.dhc import distdw_weights

    overrides = [
        f"data.root={tmp_path / 'data'}", "data.phantom.num_cases=6",
        "data.phantom.shape=[24, 24, 20]", "data.patch_size=[16, 16, 16]",
        "model.options={n_filters: 4}", "method.name=scdl_dhc",
    ]
    config = load_config(None, overrides)
    data = prepare_run_data(config)
    method = build_method_for(config, data)
    histogram = sum(np.bincount(data.store.label(case).ravel(), minlength=14)
                    for case in data.labeled_ids)
    dhc = method.host  # through the SCDL wrapper, as scdl_dhc runs it
    assert bool(dhc.distdw.initialised)
    expected = distdw_weights(torch.tensor(histogram, dtype=torch.float64))
    assert torch.allclose(dhc.distdw.weights.double(), expected.double(), rtol=1e-6)
