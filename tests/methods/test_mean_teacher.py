"""EMA teacher helper and the mean-teacher method on hand-computed cases."""

import math

import pytest
import torch
from torch import nn

from semiseg.catalog import build_method
from semiseg.methods.base import Batch, MethodContext, StepInfo
from semiseg.methods.ema import EMATeacher, ema_decay_at
from semiseg.methods.mean_teacher import softmax_mse_consistency, uamt_consistency


def test_ema_decay_warm_up() -> None:
    assert [ema_decay_at(t, 0.99) for t in (0, 1, 3, 99, 1000)] == [0.0, 0.5, 0.75, 0.99, 0.99]


def test_ema_update_parameters_only_by_default() -> None:
    student = nn.Sequential(nn.Linear(1, 1), nn.BatchNorm1d(1))
    teacher = EMATeacher.copy_of(student)
    assert not any(p.requires_grad for p in teacher.parameters())
    with torch.no_grad():
        student[0].weight.fill_(3.0)
        teacher.network[0].weight.fill_(1.0)
        student[1].running_mean.fill_(4.0)
    teacher.update(student, 0.25)
    assert teacher.network[0].weight.item() == pytest.approx(0.25 * 1 + 0.75 * 3)  # 2.5
    assert teacher.network[1].running_mean.item() == 0.0  # buffers untouched
    teacher.update(student, 0.5, include_buffers=True)
    assert teacher.network[0].weight.item() == pytest.approx(0.5 * 2.5 + 0.5 * 3)  # 2.75
    assert teacher.network[1].running_mean.item() == pytest.approx(2.0)
    student[1].num_batches_tracked.fill_(7)
    teacher.update(student, 0.5, include_buffers=True)
    assert int(teacher.network[1].num_batches_tracked) == 7  # counters are copied
    with pytest.raises(ValueError, match="differ in parameters"):
        teacher.update(nn.Linear(1, 1), 0.5)


def test_consistency_hand_case() -> None:
    # Student uniform over 4 classes; teacher softmax (5/8, 1/8, 1/8, 1/8):
    # squared differences per voxel sum to 0.375^2 + 3 x 0.125^2 = 0.1875.
    student = torch.zeros(1, 4, 3)
    teacher = torch.tensor([math.log(5.0), 0.0, 0.0, 0.0]).view(1, 4, 1).expand(1, 4, 3)
    assert softmax_mse_consistency(student, teacher).item() == pytest.approx(0.1875 / 4)
    assert uamt_consistency(student, teacher).item() == pytest.approx(0.1875 / 2)


def _context() -> MethodContext:
    return MethodContext(num_classes=4, model_name="vnet", model_options={"n_filters": 4},
                         patch_size=(32, 32, 32))


def test_mean_teacher_step_weights_and_ema() -> None:
    torch.manual_seed(0)
    method = build_method("mean_teacher", _context(), {})
    method.train()
    assert method.teacher.training  # the official teachers are never put in eval mode
    gen = torch.Generator().manual_seed(1)
    batch = Batch(torch.rand(4, 1, 32, 32, 32, generator=gen),
                  torch.randint(0, 4, (2, 32, 32, 32), generator=gen), 2, list("abcd"))
    step = StepInfo(0, 100, iterations_per_epoch=10)
    terms = method.training_step(batch, step)
    assert set(terms) == {"dice_ce", "consistency"}
    assert all(torch.isfinite(v) for v in terms.values())
    weights = method.loss_weights(step)
    # Whole run = 100 // 10 + 1 = 11 epochs; epoch 0 -> 0.1 exp(-5).
    assert weights == {"dice_ce": 1.0, "consistency": pytest.approx(0.1 * math.exp(-5))}
    assert method.loss_weights(StepInfo(55, 100, 10))["consistency"] == pytest.approx(
        0.1 * math.exp(-5 * (1 - 5 / 11) ** 2))
    (terms["dice_ce"] + terms["consistency"]).backward()
    assert all(p.grad is None for p in method.teacher.parameters())
    with torch.no_grad():
        for p in method.network.parameters():
            p.add_(0.01)
    before = [q.clone() for q in method.teacher.parameters()]
    method.after_step(StepInfo(3, 100, 10))  # alpha = 0.75
    for old, p, q in zip(before, method.network.parameters(), method.teacher.parameters()):
        assert torch.allclose(q, 0.75 * old + 0.25 * p, atol=1e-7)


def test_mean_teacher_epoch_ema_step_and_ga_losses() -> None:
    torch.manual_seed(0)
    method = build_method("mean_teacher", _context(),
                          {"ema_step": "epoch", "losses": "ga", "consistency_type": "mse",
                           "rampup_unit": "iteration", "rampup_interval": 10,
                           "rampup_length": 5})
    # Iteration 9 of 10 per epoch is still epoch 0: alpha = 0, the teacher copies the student.
    method.after_step(StepInfo(9, 100, 10))
    for p, q in zip(method.network.parameters(), method.teacher.parameters()):
        assert torch.equal(p, q)
    weights = method.loss_weights(StepInfo(25, 100, 10))  # ramp 25 // 10 = 2 of 5
    assert weights == {"ce": 1.0, "dice": 1.0,
                       "consistency": pytest.approx(0.1 * math.exp(-5 * 0.6**2))}
