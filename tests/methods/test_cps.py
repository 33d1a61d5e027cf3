"""CPS and GA-CPS: terms, ramp-up and the ensemble used at inference."""

import math

import pytest
import torch

from semiseg.catalog import build_method
from semiseg.losses.schedule import sigmoid_rampup
from semiseg.methods.base import Batch, MethodContext, StepInfo


def _context() -> MethodContext:
    return MethodContext(num_classes=3, model_options={"n_filters": 4}, patch_size=(16, 16, 16))


def _batch() -> Batch:
    gen = torch.Generator().manual_seed(0)
    image = torch.randn(4, 1, 16, 16, 16, generator=gen)
    label = torch.randint(0, 3, (2, 16, 16, 16), generator=gen)
    return Batch(image, label, 2, ["a", "b", "c", "d"])


def test_sigmoid_rampup_by_hand() -> None:
    assert sigmoid_rampup(0, 10) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(5, 10) == pytest.approx(math.exp(-5 * 0.25))
    assert sigmoid_rampup(10, 10) == 1.0
    assert sigmoid_rampup(25, 10) == 1.0


@pytest.mark.parametrize(("name", "sup_keys"), [
    ("cps", {"sup_dice_ce_a", "sup_dice_ce_b"}),
    ("ga_cps", {"sup_ce_a", "sup_dice_a", "sup_ce_b", "sup_dice_b"}),
])
def test_terms_and_weights(name: str, sup_keys: set[str]) -> None:
    torch.manual_seed(0)
    method = build_method(name, _context(), {})
    terms = method.training_step(_batch(), StepInfo(0, 100, 10))
    assert set(terms) == sup_keys | {"cps"}
    assert all(torch.isfinite(v) for v in terms.values())
    # 100 iterations of 10 per epoch: max_epoch = 11; epoch 3 -> 0.1 * exp(-5 (1 - 3/11)^2)
    weight = method.loss_weights(StepInfo(35, 100, 10))["cps"]
    assert weight == pytest.approx(0.1 * math.exp(-5 * (1 - 3 / 11) ** 2))
    # The cross term alone must reach both networks (it would not if a side were detached).
    terms["cps"].backward()
    for net in (method.net_a, method.net_b):
        assert net.out_conv.weight.grad is not None
        assert net.out_conv.weight.grad.abs().sum() > 0


def test_inference_averages_logits_and_state_dict_is_not_duplicated() -> None:
    torch.manual_seed(0)
    method = build_method("cps", _context(), {}).eval()
    x = torch.randn(1, 1, 16, 16, 16)
    expected = (method.net_a(x) + method.net_b(x)) / 2
    assert torch.allclose(method.inference_network()(x), expected)
    assert all(k.startswith(("net_a.", "net_b.")) for k in method.state_dict())


def test_ga_cps_cross_term_is_class_balanced_ce_over_all_voxels() -> None:
    from semiseg.losses.ga import ga_ce_loss

    torch.manual_seed(0)
    method = build_method("ga_cps", _context(), {})
    batch = _batch()
    terms = method.training_step(batch, StepInfo(0, 10, 1))
    with torch.no_grad():
        la, lb = method.net_a(batch.image), method.net_b(batch.image)
    expected = ga_ce_loss(la, lb.argmax(1), 100, 0.5) + ga_ce_loss(lb, la.argmax(1), 100, 0.5)
    assert terms["cps"].item() == pytest.approx(expected.item(), rel=1e-4)


def test_ga_cps_cross_gamma_one_is_the_plain_mean_cross_entropy() -> None:
    # GACE with k = 100 and γ = 1 divides every class's sum by K = all voxels: the plain mean
    # cross entropy of the pseudo labels, with no class balancing.
    torch.manual_seed(0)
    method = build_method("ga_cps", _context(), {"ga_cross_gamma": 1.0})
    batch = _batch()
    terms = method.training_step(batch, StepInfo(0, 10, 1))
    with torch.no_grad():
        la, lb = method.net_a(batch.image), method.net_b(batch.image)
    ce = torch.nn.functional.cross_entropy
    expected = ce(la, lb.argmax(1)) + ce(lb, la.argmax(1))
    assert terms["cps"].item() == pytest.approx(expected.item(), rel=1e-4)
    # The supervised terms keep ga_gamma (0.5): the same as without the option.
    torch.manual_seed(0)
    default = build_method("ga_cps", _context(), {}).training_step(batch, StepInfo(0, 10, 1))
    assert terms["sup_ce_a"].item() == pytest.approx(default["sup_ce_a"].item(), rel=1e-6)
    assert abs(terms["cps"].item() - default["cps"].item()) > 1e-3
