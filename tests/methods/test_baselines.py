"""CLD, SimiS and UA-MT (the DHC baselines): one training step on a 16^3 batch with 4-filter
VNets (term names, hand-checked terms and weights) and a short trainer run each."""

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from semiseg.catalog import build_method
from semiseg.config import load_config
from semiseg.losses.cld import confidence_statistics, masked_weighted_cross_entropy
from semiseg.losses.labels import class_histogram as class_counts
from semiseg.losses.simis import simis_gap_weights, weighted_mean_cross_entropy
from semiseg.losses.uamt import uncertainty_threshold
from semiseg.methods.base import Batch, MethodContext, StepInfo

# StepInfo(35, 100, 10): the trainer's epoch is 10 iterations, the official one ceil(10/2) = 5;
# iteration 35 is official epoch 7 and max_epoch E = 100 / 5 - 1 = 19. With the one-epoch lag
# λ = 0.1 exp(-5 (1 - 6/19)^2) = 0.1 exp(-2.3407202) = 0.00962583.
STEP = StepInfo(35, 100, 10)
LAMBDA = 0.00962583


def _context() -> MethodContext:
    return MethodContext(num_classes=3, model_options={"n_filters": 4}, patch_size=(16, 16, 16))


def _batch() -> Batch:
    gen = torch.Generator().manual_seed(0)
    image = torch.randn(4, 1, 16, 16, 16, generator=gen)
    label = torch.randint(0, 3, (2, 16, 16, 16), generator=gen)
    return Batch(image, label, 2, ["a", "b", "c", "d"])


@pytest.mark.parametrize(("name", "terms"), [
    ("cld", {"sup_dice_ce_a", "sup_dice_ce_b", "cps"}),
    ("simis", {"sup_dice_ce_a", "sup_dice_ce_b", "cps"}),
    ("uamt", {"sup_dice_ce", "consistency"}),
])
def test_terms_and_ramped_weight(name: str, terms: set[str]) -> None:
    torch.manual_seed(0)
    method = build_method(name, _context(), {})
    values = method.training_step(_batch(), StepInfo(0, 100, 10))
    assert set(values) == terms
    assert all(torch.isfinite(v) for v in values.values())
    weights = method.loss_weights(STEP)
    key = "consistency" if name == "uamt" else "cps"
    assert weights[key] == pytest.approx(LAMBDA, rel=1e-5)
    if name == "uamt":
        assert weights["sup_dice_ce"] == 0.5
    # Epochs 0 and 1 both use λ(0) = 0.1 e^-5 (official update after each epoch).
    assert method.loss_weights(StepInfo(7, 100, 10))[key] == pytest.approx(0.1 * math.exp(-5))
    # Pinned official epoch (Synapse 20 %: 8 iterations, 2408 = 301 epochs, E = 300):
    # iteration 2407 is epoch 300 -> λ(299) = 0.1 exp(-5 (1/300)^2) = 0.1 exp(-5.5556e-5)
    # = 0.0999944.
    pinned = build_method(name, _context(), {"epoch_iterations": 8})
    assert pinned.loss_weights(StepInfo(2407, 2408, 16))[key] == pytest.approx(0.0999944,
                                                                                rel=1e-6)
    sum(values.values()).backward()


def test_cld_weights_banks_and_cross_term() -> None:
    torch.manual_seed(0)
    method = build_method("cld", _context(), {"confidence_iters": 1})
    # Labeled histogram (1000, 125, 8) -> w = (1, 2, 5).
    method.observe_labeled_labels([np.repeat(np.arange(3), [1000, 125, 8]).astype(np.uint8)])
    assert method.class_weight.tolist() == pytest.approx([1.0, 2.0, 5.0])
    assert torch.equal(method.bank_a.confidence, method.bank_b.confidence)  # shared start
    batch = _batch()
    terms = method.training_step(batch, StepInfo(0, 100, 10))
    with torch.no_grad():  # train-mode BN, no dropout: the same logits again
        la, lb = method.net_a(batch.image), method.net_b(batch.image)
    # Window of one iteration: the bank is A's mean true-class softmax on the labeled crops.
    sums, counts = confidence_statistics(la[:2], batch.label, 3)
    assert torch.allclose(method.bank_a.confidence, sums / counts, atol=1e-6)
    # Supervised: weighted Dice + CE with w = (1, 2, 5).
    from semiseg.losses.segmentation import dice_ce_loss
    assert terms["sup_dice_ce_a"].item() == pytest.approx(
        dice_ce_loss(la[:2], batch.label, torch.tensor([1.0, 2.0, 5.0])).item(), rel=1e-5)
    # Equal confidences give r = 1 for every class: nothing is dropped, and the cross term is
    # mean(w_ŷ CE) over all 4 x 16^3 voxels for each network.
    method.bank_a.confidence.fill_(0.5)
    method.bank_b.confidence.fill_(0.5)
    method.bank_a.update_iters = method.bank_b.update_iters = 10**6  # freeze the banks
    terms = method.training_step(batch, StepInfo(0, 100, 10))
    w = method.class_weight
    expected = (masked_weighted_cross_entropy(la, lb.argmax(1), w, None)
                + masked_weighted_cross_entropy(lb, la.argmax(1), w, None))
    assert terms["cps"].item() == pytest.approx(expected.item(), rel=1e-4)


def test_simis_weights_update_before_the_losses() -> None:
    torch.manual_seed(0)
    method = build_method("simis", _context(), {"class_counts": [6, 3, 1]})
    # Start: 0.99 x 3 + 0.01 x 3 (0.6 - (0.6, 0.3, 0.1)) = (2.97, 2.979, 2.985).
    assert method.weights_a.weights.tolist() == pytest.approx([2.97, 2.979, 2.985])
    batch = _batch()
    terms = method.training_step(batch, StepInfo(0, 100, 10))
    with torch.no_grad():
        la, lb = method.net_a(batch.image), method.net_b(batch.image)
    start = torch.tensor([2.97, 2.979, 2.985], dtype=torch.float64)
    w_a = 0.99 * start + 0.01 * simis_gap_weights(class_counts(la.argmax(1), 3))
    w_b = 0.99 * start + 0.01 * simis_gap_weights(class_counts(lb.argmax(1), 3))
    assert torch.allclose(method.weights_a.weights, w_a)
    assert torch.allclose(method.weights_b.weights, w_b)
    expected = (weighted_mean_cross_entropy(la, lb.argmax(1), w_a)
                + weighted_mean_cross_entropy(lb, la.argmax(1), w_b))
    assert terms["cps"].item() == pytest.approx(expected.item(), rel=1e-4)
    assert build_method("simis", _context(), {"rampup": False}).loss_weights(STEP) == \
        {"cps": 0.1}


def test_uamt_threshold_mask_and_epoch_counted_ema() -> None:
    torch.manual_seed(0)
    method = build_method("uamt", _context(), {})
    # Official epoch 7 of E = 19, no lag: exp(-5 (12/19)^2) = exp(-1.9944598) = 0.1360882,
    # (0.75 + 0.25 x 0.1360882) ln 2 = 0.7840220 x 0.6931472 = 0.5434425.
    assert method.threshold(STEP) == pytest.approx(0.5434425, rel=1e-6)
    assert method.threshold(STEP) == pytest.approx(uncertainty_threshold(7, 19))
    # ln C option: the same ramp times ln 3.
    wide = build_method("uamt", _context(), {"max_uncertainty": "ln_classes"})
    assert wide.threshold(STEP) == pytest.approx(0.7840220 * math.log(3), rel=1e-6)
    # Teacher and student start different (independent inits); epoch 0 has α = 0: a copy.
    student = method.network.out_conv.weight
    teacher = method.teacher.network.out_conv.weight
    assert not torch.equal(student, teacher)
    terms = method.training_step(_batch(), StepInfo(4, 100, 10))
    assert 0.0 <= method.last_mask_fraction <= 1.0
    method.after_step(StepInfo(4, 100, 10))  # official epoch 0
    assert torch.equal(student, teacher)
    # Epoch 1 (iteration 5 of 5-iteration epochs): α = 1 - 1/2 = 0.5.
    before = teacher.clone()
    with torch.no_grad():
        student.add_(1.0)
    method.after_step(StepInfo(5, 100, 10))
    assert torch.allclose(teacher, 0.5 * before + 0.5 * student)
    assert torch.isfinite(terms["consistency"])


def test_uamt_consistency_with_a_threshold_above_every_entropy() -> None:
    """Last epoch with U_max = ln 3: H = ln 3 exceeds every entropy of 3 classes, so every
    voxel is kept and the term is Σ (p_s - p_t)^2 / (2 V) over the unlabeled crops."""
    from semiseg.methods.mean_teacher import uamt_consistency

    torch.manual_seed(0)
    method = build_method("uamt", _context(), {"max_uncertainty": "ln_classes"})
    batch = _batch()
    last = StepInfo(99, 100, 10)  # official epoch 19 = E
    assert method.threshold(last) == pytest.approx(math.log(3.0))
    torch.manual_seed(5)  # no dropout: the teacher's input noise is the first draw
    terms = method.training_step(batch, last)
    assert method.last_mask_fraction == 1.0
    with torch.no_grad():
        student = method.network(batch.image)[2:]
        torch.manual_seed(5)
        noise = torch.clamp(torch.randn_like(batch.unlabeled_image) * 0.1, -0.2, 0.2)
        teacher = method.teacher(batch.unlabeled_image + noise)
    expected = uamt_consistency(student, teacher)
    assert terms["consistency"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert expected.item() > 0


def _phantom_overrides(tmp_path: Path, name: str) -> list[str]:
    return [
        f"data.root={tmp_path / 'data'}", "data.phantom.num_cases=6",
        "data.phantom.shape=[24, 24, 20]", "data.patch_size=[16, 16, 16]",
        "data.intensity=dhc", "model.options={n_filters: 4, has_dropout: true}",
        f"method.name={name}", "method.options={epoch_iterations: 1}",
        "train.max_iterations=3", "train.validate_every=0", "train.checkpoint_every=3",
        "train.log_every=1", "inference.patch_size=[16, 16, 16]",
    ]


@pytest.mark.parametrize("name", ["cld", "simis", "uamt"])
def test_trainer_runs_each_baseline(tmp_path: Path, name: str) -> None:
    from semiseg.engine.checkpoint import load_checkpoint
    from semiseg.engine.runs import network_from_payload
    from semiseg.engine.setup import prepare_run_data
    from semiseg.engine.trainer import Trainer
    from semiseg.losses.cld import cld_class_weights
    from semiseg.losses.simis import simis_initial_weights

    overrides = _phantom_overrides(tmp_path, name)
    config = load_config(None, overrides)
    run = tmp_path / "run"
    Trainer(config, run, show_progress=False).fit()
    with open(run / "log.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    key = "weight/consistency" if name == "uamt" else "weight/cps"
    # 1-iteration epochs, 3 iterations: E = 2; iterations 0, 1 use λ(0) = 0.1 e^-5 =
    # 0.000673795, iteration 2 uses λ(1) = 0.1 exp(-5 / 4) = 0.0286505.
    assert [float(r[key]) for r in rows] == pytest.approx(
        [0.000673795, 0.000673795, 0.0286505], rel=1e-5)
    payload = load_checkpoint(run / "checkpoints/last.pt")
    state = payload["method"]
    assert payload["iteration"] == 3
    data = prepare_run_data(config)
    counts = sum(class_counts(torch.from_numpy(np.asarray(data.store.label(c))), 14)
                 for c in data.labeled_ids)
    if name == "cld":  # static weights from the whole labeled phantom volumes
        assert torch.allclose(state["class_weight"], cld_class_weights(counts).float())
    elif name == "simis":  # 3 updates from the labeled start: each gap weight is in [0, 14]
        start = simis_initial_weights(counts)
        low, high = 0.99**3 * start, 0.99**3 * start + (1 - 0.99**3) * 14
        assert bool(((state["weights_a.weights"] >= low - 1e-9)
                     & (state["weights_a.weights"] <= high + 1e-9)).all())
    else:  # epochs 0, 1, 2: α = 0, 1/2, 2/3; after epoch 0 the teacher was the student
        assert set(state) >= {"network.out_conv.weight", "teacher.network.out_conv.weight"}
    network, _ = network_from_payload(payload, run / "checkpoints/last.pt")
    with torch.no_grad():
        assert network(torch.rand(1, 1, 16, 16, 16)).shape == (1, 14, 16, 16, 16)
