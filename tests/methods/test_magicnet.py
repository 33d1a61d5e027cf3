"""MagicNet / GA-MagicNet training steps on a tiny batch.

The official setting (27 cubes of 32^3 in 96^3 crops) is too slow on CPU, and a VNet needs
sides that are multiples of 16, so the tests use 32^3 crops cut into 2x2x2 cubes of 16^3,
4 filters and a 16-unit location head. A 16^3 cube has a 1-voxel bottleneck, which instance
norm cannot normalise, so these networks run without normalisation; the instance-norm network
itself is tested in tests/models/test_magicnet.py.
"""

import pytest
import torch
import torch.nn.functional as F

from semiseg.catalog import build_method
from semiseg.errors import ConfigError, DataError
from semiseg.losses.ga import ga_ce_loss, ga_dice_loss
from semiseg.losses.magic_cube import squared_dice_loss
from semiseg.methods.base import Batch, Method, MethodContext, StepInfo
from semiseg.models.magic_cube import partition_cubes, recover_cubes

P = 32
TERMS = {"seg_ce", "seg_dice", "unmix_dice", "local_dice", "location", "consistency"}


def _context(model_name: str = "magicnet", **extra: object) -> MethodContext:
    options = {"n_filters": 4, "normalization": "none", "location_hidden": 16, **extra}
    return MethodContext(num_classes=4, model_name=model_name, model_options=options,
                         patch_size=(P, P, P))


def _method(name: str = "magicnet", **options: object) -> Method:
    torch.manual_seed(0)
    method = build_method(name, _context(), {"cube_size": 16, **options})
    method.train()
    return method


def _batch() -> Batch:
    gen = torch.Generator().manual_seed(1)
    image = torch.rand(4, 1, P, P, P, generator=gen)
    label = torch.randint(0, 4, (2, P, P, P), generator=gen)
    return Batch(image, label, 2, ["l0", "l1", "u0", "u1"])


def _step(method: Method, batch: Batch, iteration: int,
          optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], StepInfo]:
    step = StepInfo(iteration, 100)
    terms = method.training_step(batch, step)
    weights = method.loss_weights(step)
    total = sum(weights[name] * value for name, value in terms.items())
    optimizer.zero_grad()
    total.backward()
    optimizer.step()
    return terms, step


def test_loss_weights_follow_the_official_schedule() -> None:
    method = _method()
    expected = {  # 0.1 exp(-5 (1 - min(t // 350, 200) / 200)^2)
        0: 0.1 * 0.006737946999085467,  # exp(-5)
        349: 0.1 * 0.006737946999085467,
        350: 0.0007082523558272816,  # 0.1 exp(-5 x 0.995^2)
        17000: 0.005568747626326995,  # t // 350 = 48: 0.1 exp(-5 x 0.76^2); GALoss's last λ
        35000: 0.028650479686019012,  # 100 of 200: 0.1 exp(-1.25)
        70000: 0.1,
        90000: 0.1,
    }
    for iteration, value in expected.items():
        weights = method.loss_weights(StepInfo(iteration, 70000))
        assert weights["consistency"] == pytest.approx(value, rel=1e-12)
        assert {k: weights[k] for k in TERMS - {"consistency"}} == {
            "seg_ce": 0.25, "seg_dice": 0.25, "unmix_dice": 0.25, "local_dice": 0.25,
            "location": 0.1}


def test_training_steps_terms_logger_and_ema() -> None:
    method = _method(blend_start_iteration=0, logger_refresh_every=2)
    optimizer = torch.optim.SGD(method.parameter_groups(1e-4)[0]["params"], lr=0.01)
    batch = _batch()
    student, teacher = method.network, method.teacher.network
    assert not any(p.requires_grad for p in teacher.parameters())
    assert not any(p is q for p in optimizer.param_groups[0]["params"]
                   for q in teacher.parameters())

    terms, step = _step(method, batch, 0, optimizer)
    assert set(terms) == TERMS
    assert all(torch.isfinite(v) and v.dim() == 0 for v in terms.values())
    assert terms["location"].item() > 0.0
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in student.location_head.parameters())
    # Iteration 0 is a refresh iteration: the counts are the 2 x 32^3 pseudo-label voxels.
    assert int(method.class_logger.counts.sum()) == 2 * P**3
    method.after_step(step)  # alpha = min(1 - 1/1, 0.99) = 0: the teacher becomes the student
    for p, q in zip(student.parameters(), teacher.parameters()):
        assert torch.equal(p, q)

    terms, step = _step(method, batch, 1, optimizer)  # blending is active from here on
    assert all(torch.isfinite(v) for v in terms.values())
    assert int(method.class_logger.pending_batches) == 1
    before = [q.clone() for q in teacher.parameters()]
    method.after_step(step)  # alpha = min(1 - 1/2, 0.99) = 0.5
    for old, p, q in zip(before, student.parameters(), teacher.parameters()):
        assert torch.allclose(q, 0.5 * old + 0.5 * p, atol=1e-7)
    assert not torch.equal(before[0], student.encoder.block_one.conv[0].weight)

    _step(method, batch, 2, optimizer)
    # Refresh at iteration 2: the pseudo labels of iterations 1 and 2.
    assert int(method.class_logger.counts.sum()) == 2 * 2 * P**3
    assert int(method.class_logger.pending_batches) == 0


def test_supervised_terms_equal_the_losses_on_the_plain_forward() -> None:
    batch = _batch()
    for name in ("magicnet", "ga_magicnet"):
        method = _method(name)
        with torch.no_grad():
            logits = method.network(batch.image)[:2]
        terms = method.training_step(batch, StepInfo(0, 100))
        probs = torch.softmax(logits, 1)
        if name == "magicnet":
            ce, dice = F.cross_entropy(logits, batch.label), squared_dice_loss(probs, batch.label)
        else:
            ce, dice = ga_ce_loss(logits, batch.label, 10, 0.5), ga_dice_loss(probs, batch.label)
        assert terms["seg_ce"].item() == pytest.approx(ce.item(), rel=1e-5)
        assert terms["seg_dice"].item() == pytest.approx(dice.item(), rel=1e-5)


def test_identity_mixing_makes_the_unmixed_prediction_the_plain_one(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import semiseg.methods.magicnet as module

    def identity(batch_size: int, grid: tuple[int, int, int],
                 generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.arange(batch_size).view(-1, 1, 1, 1).expand(batch_size, *grid).clone()

    monkeypatch.setattr(module, "random_batch_permutation", identity)
    terms = _method().training_step(_batch(), StepInfo(0, 100))
    assert terms["unmix_dice"].item() == pytest.approx(terms["seg_dice"].item(), rel=1e-6)


@pytest.mark.parametrize("source", ["unlabeled", "labeled"])
def test_within_image_pseudo_logits_source(source: str) -> None:
    method = _method(pseudo_cube_source=source)
    net = method.network
    batch = _batch()
    with torch.no_grad():
        features = net.encode(partition_cubes(batch.image, 16).flatten(0, 1))  # 4 x 8 cubes
        local = net.decode_features([f[:16] for f in features])
        got = method._pseudo_cube_logits(features, local, 2, 2, 8)
        rows = slice(16, 32) if source == "unlabeled" else slice(0, 16)  # GALoss: images 0, 1
        cubes = net.head(net.decode_features([f[rows] for f in features]))
        expected = recover_cubes(cubes.reshape(2, 8, 4, 16, 16, 16), (2, 2, 2))
    assert got.shape == (2, 4, P, P, P)
    assert torch.allclose(got, expected, atol=1e-6)


def test_official_transposed_recovery_option_reaches_the_within_image_terms() -> None:
    cubes = torch.arange(8.0).view(8, 1, 1, 1, 1).expand(8, 1, 16, 16, 16)
    paper = _method()._recover(cubes, 1)
    official = _method(official_transposed_recovery=True)._recover(cubes, 1)
    assert torch.equal(paper, recover_cubes(cubes.reshape(1, 8, 1, 16, 16, 16), (2, 2, 2)))
    # Cube (0, 0, 1) (module index 1) comes back at (1, 0, 0) in the official assembly.
    assert official[0, 0, 16, 0, 0] == 1.0 and paper[0, 0, 16, 0, 0] == 4.0


def test_teacher_mode_init_and_state() -> None:
    method = _method(teacher_init="copy")
    assert list(method.frozen_modules()) == []
    assert method.teacher.training  # official ema_model.train()
    method.eval()
    assert not method.teacher.training
    for p, q in zip(method.network.parameters(), method.teacher.parameters()):
        assert torch.equal(p, q)
    independent = _method()
    assert not torch.equal(independent.network.out_conv.weight,
                           independent.teacher.network.out_conv.weight)
    state = independent.state_dict()
    assert {"class_logger.counts", "class_logger.pending", "class_logger.pending_batches"} <= set(
        state)
    assert "location_labels" not in state
    assert any(k.startswith("teacher.network.location_head.") for k in state)
    independent.class_logger.append(torch.tensor([1, 2, 2]))
    resumed = _method()
    resumed.load_state_dict(independent.state_dict())
    assert resumed.class_logger.pending.tolist() == [0, 1, 2, 0]
    assert torch.equal(resumed.teacher.network.out_conv.weight,
                       independent.teacher.network.out_conv.weight)


def test_configuration_errors_are_named() -> None:
    with pytest.raises(ConfigError, match="set model.name: magicnet"):
        build_method("magicnet", _context("vnet"), {})
    with pytest.raises(ConfigError, match="model.options.cube_size"):
        build_method("magicnet", _context(cube_size=32), {"cube_size": 16})
    with pytest.raises(ConfigError, match="temperature_dist"):
        build_method("magicnet", _context(), {"cube_size": 16, "temperature_dist": 0.0})
    batch = _batch()
    labeled_only = Batch(batch.image[:2], batch.label, 2, ["l0", "l1"])
    with pytest.raises(DataError, match="needs labeled and unlabeled crops"):
        _method().training_step(labeled_only, StepInfo(0, 100))
