"""TAK training steps on a tiny batch (32^3 crops in 2x2x2 cubes of 16^3, 4 filters, no
normalisation, 4 classes, 8-d random text embeddings; see tests/methods/test_magicnet.py)."""

import math
from pathlib import Path

import pytest
import torch

from semiseg.catalog import build_method
from semiseg.config import load_config, validate_options
from semiseg.errors import ConfigError, DataError
from semiseg.knowledge.embeddings import TextEmbeddings, save_embeddings
from semiseg.losses.tak import IGNORE, entropy, stack_scales, tak_contrastive_loss
from semiseg.methods.base import Batch, Method, MethodContext, StepInfo
from semiseg.methods.tak import TAKMethod, TAKOptions
from semiseg.models.tak import SCALE_STAGES

P = 32
CLASSES = ("background", "organ a", "organ b", "organ c")
TERMS = {"seg_ce", "seg_dice", "unmix_dice", "local_dice", "location", "consistency", "contrast"}
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def embedding_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(7)
    found = TextEmbeddings(torch.randn(3, 4, 8), ("name", "position", "shape"),
                           {"encoder": "random"})
    return save_embeddings(found, tmp_path_factory.mktemp("emb") / "random.pt")


def _context(model_name: str = "tak", **extra: object) -> MethodContext:
    options = {"n_filters": 4, "normalization": "none", "location_hidden": 16, **extra}
    return MethodContext(num_classes=4, model_name=model_name, model_options=options,
                         patch_size=(P, P, P), class_names=CLASSES)


def _method(embedding_file: Path, **options: object) -> TAKMethod:
    torch.manual_seed(0)
    method = build_method("tak", _context(), {"cube_size": 16, "embeddings": str(embedding_file),
                                              **options})
    assert isinstance(method, TAKMethod)
    method.train()
    return method


def _batch() -> Batch:
    gen = torch.Generator().manual_seed(1)
    image = torch.rand(4, 1, P, P, P, generator=gen)
    label = torch.randint(0, 4, (2, P, P, P), generator=gen)
    return Batch(image, label, 2, ["l0", "l1", "u0", "u1"])


def test_loss_weights(embedding_file: Path) -> None:
    method = _method(embedding_file)
    per_epoch = 10

    def weights(epoch: int) -> dict[str, float]:
        return method.loss_weights(StepInfo(epoch * per_epoch, 10_000, per_epoch))

    assert weights(0)["consistency"] == pytest.approx(0.1 * math.exp(-5))
    assert weights(80)["consistency"] == pytest.approx(0.1 * math.exp(-1.25))
    assert weights(160)["consistency"] == pytest.approx(0.1)
    assert weights(19)["contrast"] == 0.0 and weights(20)["contrast"] == 0.1
    assert {k: weights(30)[k] for k in ("seg_ce", "local_dice", "location")} == {
        "seg_ce": 0.25, "local_dice": 0.25, "location": 0.1}
    host = _method(embedding_file, rampup_unit="iteration", rampup_length=200.0,
                   contrast_weight=0.5, contrast_start_epoch=21)
    step = StepInfo(350, 70_000, 1)  # GA-MagicNet's 0.1 sigmoid_rampup(t // 350, 200)
    assert host.loss_weights(step)["consistency"] == pytest.approx(0.1 * math.exp(-5 * 0.995**2))
    assert host.loss_weights(StepInfo(20, 100, 1))["contrast"] == 0.0
    assert host.loss_weights(StepInfo(21, 100, 1))["contrast"] == 0.5
    off = _method(embedding_file, contrast=False)
    assert off.loss_weights(StepInfo(50, 100, 1))["contrast"] == 0.0


def _run(method: Method, iteration: int, per_epoch: int = 1) -> tuple[dict, StepInfo]:
    step = StepInfo(iteration, 100, per_epoch)
    terms = method.training_step(_batch(), step)
    weights = method.loss_weights(step)
    total = sum(weights.get(k, 1.0) * v for k, v in terms.items())
    total.backward()
    return terms, step


def test_training_step_terms_gradients_and_ema(embedding_file: Path) -> None:
    method = _method(embedding_file, blend_start_iteration=0, contrast_start_epoch=1)
    net, teacher = method.network, method.teacher.network
    assert net.text_embeddings.shape == (2, 4, 8)  # prompts: position, shape
    assert torch.equal(net.text_embeddings, teacher.text_embeddings)

    terms, step = _run(method, 0)  # epoch 0: no contrast
    assert set(terms) == TERMS
    assert terms["contrast"].item() == 0.0 and not terms["contrast"].requires_grad
    assert all(torch.isfinite(v) and v.dim() == 0 for v in terms.values())
    assert net.feature_projections[0][0].weight.grad is None  # unused before the contrast
    assert net.controller.weight.grad is not None and net.text_fusion[0].weight.grad is not None
    assert all(p.grad is None for p in teacher.parameters())
    method.after_step(step)  # α = 0: the teacher becomes the student
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), teacher.parameters()))

    method.zero_grad()
    terms, _ = _run(method, 1)  # epoch 1: contrast on
    assert terms["contrast"].item() != 0.0 and torch.isfinite(terms["contrast"])
    for scale in range(3):
        assert net.feature_projections[scale][0].weight.grad.abs().sum() > 0
        assert net.text_projections[scale][0].weight.grad.abs().sum() > 0
    assert "text_embeddings" not in dict(method.named_parameters())


def test_contrast_term_equals_eq2_on_all_confident_voxels(embedding_file: Path) -> None:
    # Plain maps only, λ_N larger than any class, no teacher noise: every labeled voxel and every
    # confident unlabeled voxel is sampled, so the term is deterministic.
    method = _method(embedding_file, contrast_views="plain", contrast_samples=10**6,
                     contrast_start_epoch=0, noise_std=0.0, entropy_threshold_floor=1.0)
    batch = _batch()
    step = StepInfo(0, 100, 1)
    with torch.no_grad():
        probs = torch.softmax(method.teacher(batch.unlabeled_image), 1)
        # A threshold that keeps about half of the (untrained, near-uniform) teacher's voxels.
        method.options.entropy_threshold_max = float(entropy(probs).median())
        threshold = method.entropy_threshold(step)
        assert threshold == method.options.entropy_threshold_max
        got = method.training_step(batch, step)["contrast"]
        net = method.network
        features = net.encode(batch.image)
        pseudo = torch.where(entropy(probs) <= threshold, probs.argmax(1), IGNORE)
        labels = torch.cat([batch.label, pseudo])
        assert (pseudo == IGNORE).any() and (pseudo != IGNORE).any()
        samples = []
        for index, (stage, stride) in enumerate(zip(SCALE_STAGES, (4, 8, 16))):
            emb = net.project_features(index, features[stage])
            small = labels[:, ::stride, ::stride, ::stride].reshape(-1)
            flat = emb.movedim(1, -1).reshape(-1, emb.size(1))
            text = net.text_scale_embeddings()[index]
            samples.append((torch.cat([flat[small >= 0], text]),
                            torch.cat([small[small >= 0], torch.arange(4).repeat(2)])))
        expected = tak_contrastive_loss(*stack_scales(samples), temperature=0.07)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)


def test_official_variants_run(embedding_file: Path) -> None:
    method = _method(embedding_file, contrast_start_epoch=0, blend_start_iteration=0,
                     contrast_loss="official", contrast_sampling="per_map",
                     contrast_sample_ratios=[1.0, 0.5, 0.25], official_transposed_recovery=True,
                     pseudo_cube_head="reassembled", pseudo_cube_decoder="student",
                     pseudo_cube_source="labeled", prompts=["shape", "position", "name"])
    assert method.network.text_embeddings.shape == (3, 4, 8)
    terms, _ = _run(method, 0)
    assert all(torch.isfinite(v) for v in terms.values()) and terms["contrast"].item() != 0.0


def test_per_cube_pseudo_logits_use_the_teachers_head(embedding_file: Path) -> None:
    method = _method(embedding_file)
    batch = _batch()
    with torch.no_grad():
        method.teacher.network.controller.bias.add_(1.0)  # teacher differs from the student
        net = method.network
        from semiseg.models.magic_cube import partition_cubes

        cubes = net.encode(partition_cubes(batch.image, 16).flatten(0, 1))
        text = net.text_condition()
        got = method._tak_pseudo_cube_logits(cubes, text, 2, 2, 8)
        teacher = method.teacher.network
        rows = [f[16:32] for f in cubes]
        per_cube = teacher.head(teacher.decode_features(rows), rows, text)
        # Cube k of image u is per_cube[8 u + k]; cube (1, 0, 1) -> index 5 sits at [16:, :16, 16:].
        assert torch.allclose(got[1, :, 16:, :16, 16:], per_cube[8 + 5], atol=1e-6)
        assert got.shape == (2, 4, P, P, P)


def test_configuration_errors(embedding_file: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="model.name: TAK"):
        build_method("tak", _context("magicnet"), {"cube_size": 16,
                                                   "embeddings": str(embedding_file)})
    with pytest.raises(ConfigError, match="model.options.text_dim"):
        build_method("tak", _context(text_dim=8), {"cube_size": 16,
                                                   "embeddings": str(embedding_file)})
    with pytest.raises(ConfigError, match="not the Synapse or AMOS class set"):
        build_method("tak", _context(), {"cube_size": 16})
    with pytest.raises(DataError, match="prompts"):
        build_method("tak", _context(), {"cube_size": 16, "prompts": ["size"],
                                         "embeddings": str(embedding_file)})
    small = save_embeddings(TextEmbeddings(torch.zeros(3, 3, 8), ("name", "position", "shape")),
                            tmp_path / "three.pt")
    with pytest.raises(DataError, match="3 classes of text embeddings, but the run has 4"):
        build_method("tak", _context(), {"cube_size": 16, "embeddings": str(small)})
    with pytest.raises(ConfigError, match="contrast_sample_ratios"):
        build_method("tak", _context(), {"cube_size": 16, "embeddings": str(embedding_file),
                                         "contrast_sample_ratios": [1.0, 0.5]})


def test_batch_needs_both_kinds_of_crops(embedding_file: Path) -> None:
    method = _method(embedding_file)
    batch = _batch()
    with pytest.raises(DataError, match="labeled and unlabeled"):
        method.training_step(Batch(batch.image[:2], batch.label, 2, ["a", "b"]),
                             StepInfo(0, 100))


def test_shipped_configs_validate() -> None:
    paths = sorted(REPO.glob("configs/*/tak*.yaml"))
    names = {p.relative_to(REPO / "configs").as_posix() for p in paths}
    assert {"amos/tak_2p.yaml", "amos/tak_5p.yaml", "synapse/tak_10p.yaml",
            "synapse/tak_20p.yaml", "amos/tak_5p_name_nocontrast.yaml",
            "amos/tak_5p_position_nocontrast.yaml", "amos/tak_5p_shape_nocontrast.yaml",
            "amos/tak_5p_both_nocontrast.yaml", "amos/tak_5p_name.yaml"} <= names
    table5 = {}
    for path in paths:
        config = load_config(path)
        assert config.method.name == "tak" and config.model.name == "tak"
        options = validate_options(TAKOptions, config.method.options, "method.options")
        assert options.encoder == "minilm" and options.contrast_weight == 0.1
        if path.name.startswith("tak_5p"):
            table5[path.stem] = (tuple(options.prompts), options.contrast)
    assert table5["tak_5p"] == (("position", "shape"), True)
    assert table5["tak_5p_name_nocontrast"] == (("name",), False)
    assert table5["tak_5p_shape_nocontrast"] == (("shape",), False)
    assert load_config(REPO / "configs/amos/tak_5p.yaml").train.max_iterations == 161 * 206


@pytest.mark.slow
def test_trainer_runs_tak_and_rebuilds_it_from_the_checkpoint(embedding_file: Path,
                                                               tmp_path: Path) -> None:
    from semiseg.engine.checkpoint import load_checkpoint
    from semiseg.engine.runs import network_from_payload
    from semiseg.engine.trainer import Trainer

    phantom_embeddings = save_embeddings(
        TextEmbeddings(torch.randn(3, 14, 8), ("name", "position", "shape")),
        tmp_path / "phantom.pt")
    overrides = [
        f"data.root={tmp_path / 'data'}", "data.phantom.num_cases=6",
        "data.phantom.shape=[32, 32, 32]", "data.patch_size=[32, 32, 32]",
        "model.name=tak",
        "model.options={n_filters: 4, normalization: none, location_hidden: 16}",
        "method.name=tak",
        f"method.options={{cube_size: 16, embeddings: {phantom_embeddings}, "
        "contrast_start_epoch: 0}",
        "train.max_iterations=1", "train.validate_every=0", "train.checkpoint_every=1",
        "inference.patch_size=[32, 32, 32]",
    ]
    config = load_config(None, overrides)
    Trainer(config, tmp_path / "run", show_progress=False).fit()
    payload = load_checkpoint(tmp_path / "run/checkpoints/last.pt")
    assert torch.equal(payload["method"]["network.text_embeddings"],
                       torch.load(phantom_embeddings)["embeddings"][1:])
    network, _ = network_from_payload(payload, tmp_path / "run/checkpoints/last.pt")
    x = torch.rand(1, 1, P, P, P)
    with torch.no_grad():
        assert network(x).shape == (1, 14, P, P, P)


def test_head_diagnostics_after_a_step(embedding_file: Path) -> None:
    method = _method(embedding_file)
    assert method.diagnostics() == {}  # nothing generated yet
    _run(method, 0)
    diag = method.diagnostics()
    assert set(diag) == {"tak/class_share", "tak/text_input_share"}
    assert 0.0 < diag["tak/class_share"] < 1.0 and 0.0 < diag["tak/text_input_share"] < 1.0
    # The same with the balanced input: each half carries exactly half of the input.
    balanced = build_method("tak", _context(controller_input="balanced"),
                            {"cube_size": 16, "embeddings": str(embedding_file)})
    _run(balanced.train(), 0)
    assert balanced.diagnostics()["tak/text_input_share"] == pytest.approx(0.5, abs=1e-4)


def test_text_controls_and_row_norm(embedding_file: Path) -> None:
    base = _method(embedding_file).network.text_embeddings  # kinds (position, shape)
    shared = _method(embedding_file, text_control="shared").network.text_embeddings
    assert torch.allclose(shared, base.mean(1, keepdim=True).expand_as(base))
    random_a = _method(embedding_file, text_control="random").network.text_embeddings
    random_b = _method(embedding_file, text_control="random").network.text_embeddings
    assert torch.equal(random_a, random_b)  # one fixed code, whatever the run
    assert torch.allclose(random_a.norm(dim=-1), torch.ones(2, 4))
    assert not torch.allclose(random_a[:, 0], random_a[:, 1])
    # "names": the name prompt's embedding for every prompt kind (the file's row 0).
    names = _method(embedding_file, text_control="names").network.text_embeddings
    stored = torch.load(embedding_file)["embeddings"]
    assert torch.allclose(names, stored[0].expand(2, 4, 8))
    rms = _method(embedding_file, text_norm="rms").network.text_embeddings
    assert torch.allclose(rms.norm(dim=-1), torch.full((2, 4), 8 ** 0.5))
    assert torch.allclose(rms / rms.norm(dim=-1, keepdim=True),
                          base / base.norm(dim=-1, keepdim=True), atol=1e-6)



@pytest.mark.parametrize("controller_input", ["centered", "official"])
def test_shared_text_gives_every_class_the_same_logit_for_good(
        embedding_file: Path, controller_input: str) -> None:
    # Control (d) of docs/methods/tak.md: with one text vector for every class the controller
    # writes the same head for every class, and training cannot break the tie (every class's
    # head gets its gradient through the same controller from the same input), so the logits
    # stay equal across classes and argmax is background everywhere: 0 Dice by construction.
    torch.manual_seed(0)
    method = build_method("tak", _context(controller_input=controller_input),
                          {"cube_size": 16, "embeddings": str(embedding_file),
                           "text_control": "shared"})
    optimizer = torch.optim.SGD(method.parameters(), lr=0.05, momentum=0.9)
    image = _batch().image[:1]
    for iteration in range(3):
        logits = method.network(image)
        assert torch.allclose(logits, logits[:, :1].expand_as(logits), atol=1e-6), iteration
        method.train()
        terms = method.training_step(_batch(), StepInfo(iteration, 100, 1))
        weights = method.loss_weights(StepInfo(iteration, 100, 1))
        optimizer.zero_grad()
        sum(weights.get(k, 1.0) * v for k, v in terms.items()).backward()
        optimizer.step()
    # Still tied after the last step. (The tie is what makes argmax pick background; the test
    # checks the tie itself, since which of near-equal floats argmax takes can depend on the
    # CPU's kernels.)
    logits = method.network(image)
    assert torch.allclose(logits, logits[:, :1].expand_as(logits), atol=1e-6)
    # With the packaged (distinct) texts the classes differ from the start.
    distinct = _method(embedding_file).network(image)
    assert (distinct - distinct[:, :1]).abs().amax() > 1e-3


def test_resuming_keeps_the_trained_controller(embedding_file: Path) -> None:
    # The analytic initialisation happens when the network is built, from no data; a resumed
    # run then loads its checkpoint over it, so the trained controller is what it continues.
    context = _context(controller_init="scaled", controller_input="balanced")
    trained = build_method("tak", context, {"cube_size": 16, "embeddings": str(embedding_file)})
    with torch.no_grad():
        trained.network.controller.weight.mul_(3.0)
    torch.manual_seed(123)
    resumed = build_method("tak", context, {"cube_size": 16, "embeddings": str(embedding_file)})
    fresh = resumed.network.controller.weight.detach().clone()
    resumed.load_state_dict(trained.state_dict())
    assert torch.equal(resumed.network.controller.weight, trained.network.controller.weight)
    assert not torch.equal(resumed.network.controller.weight, fresh)
