"""The SCDL plug-in (semiseg.plugins.scdl) on tiny hosts, and the proxy plot.

Networks have 4 filters and 32^3 crops (a 2x2x2 token grid, 8 tokens per crop); MagicNet cuts
them into 2x2x2 cubes of 16^3 and runs without normalisation, as tests/methods/test_magicnet.py.
"""

import argparse
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from semiseg.catalog import build_method, is_semi_supervised, list_methods
from semiseg.config import load_config
from semiseg.data.classes import SYNAPSE
from semiseg.engine.checkpoint import save_checkpoint
from semiseg.errors import ConfigError, DataError, SemisegError
from semiseg.losses.scdl import e2p_loss, p2e_loss
from semiseg.methods.base import Batch, Method, MethodContext, StepInfo
from semiseg.plugins.scdl import CDBA, CDBAInjector, SCDLMethod, SCDLOptions

P = 32
CLASSES = 4
SCDL_TERMS = {"scdl_e2p", "scdl_p2e", "scdl_sac"}
GA_CPS_TERMS = {"sup_ce_a", "sup_dice_a", "sup_ce_b", "sup_dice_b", "cps"}
MAGIC_TERMS = {"seg_ce", "seg_dice", "unmix_dice", "local_dice", "location", "consistency"}


def _context(model: str = "vnet", num_classes: int = CLASSES) -> MethodContext:
    options: dict = {"n_filters": 4}
    if model == "magicnet":
        options.update(normalization="none", location_hidden=16)
    return MethodContext(num_classes=num_classes, model_name=model, model_options=options,
                         patch_size=(P, P, P))


# Most tests below exercise the bottleneck-token path with the paper's prior at every stage
# and masked-image anchors (the plug-in's defaults before the decoder tokens;
# tests/plugins/test_scdl_defaults.py covers the current defaults); a test's keys override these.
BOTTLENECK = {"tokens": "bottleneck", "projector": "none", "injection": "all",
              "temperature": 1.0, "token_source": "first", "sac_source": "masked_images"}


def _build(name: str, seed: int = 0, host: dict | None = None, **scdl: object) -> SCDLMethod:
    torch.manual_seed(seed)
    model = "magicnet" if "magicnet" in name else "vnet"
    if model == "magicnet":
        host = {"cube_size": 16, **(host or {})}
    options = scdl if scdl.get("preset") else {**BOTTLENECK, **scdl}
    method = build_method(name, _context(model), {"host": host or {}, "scdl": options})
    assert isinstance(method, SCDLMethod)
    return method.train()


def _batch(seed: int = 1) -> Batch:
    gen = torch.Generator().manual_seed(seed)
    image = torch.rand(4, 1, P, P, P, generator=gen)
    label = torch.randint(0, CLASSES, (2, P, P, P), generator=gen)
    return Batch(image, label, 2, ["l0", "l1", "u0", "u1"])


def _train(method: Method, batch: Batch, steps: int) -> list[dict[str, torch.Tensor]]:
    optimizer = torch.optim.SGD(method.parameter_groups(1e-4), lr=0.05, momentum=0.9)
    history = []
    for iteration in range(steps):
        step = StepInfo(iteration, 100)
        terms = method.training_step(batch, step)
        weights = method.loss_weights(step)
        total = sum(weights.get(k, 1.0) * v for k, v in terms.items())
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        method.after_step(step)
        history.append({k: v.detach() for k, v in terms.items()})
    return history


def _tokens(network: nn.Module, cdba: CDBA, image: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return cdba.embed(network.encode(image)[-1])


def test_registered_for_every_host() -> None:
    names = set(list_methods())
    for host in ("ga_cps", "ga_magicnet", "cps", "magicnet", "mean_teacher", "supervised"):
        assert f"scdl_{host}" in names
    assert not is_semi_supervised("scdl_supervised") and is_semi_supervised("scdl_ga_cps")


def test_scdl_ga_cps_steps_terms_proxies_and_first_tokens() -> None:
    method = _build("scdl_ga_cps")
    batch = _batch()
    pairs = method.proxy_networks()
    assert [net for net, _ in pairs] == [method.host.net_a, method.host.net_b]
    assert pairs[0][1] is not pairs[1][1]  # one CDBA per network by default
    assert method.host.net_a.injector.cdba is pairs[0][1]
    # "first" token source: each network's plain forward on the whole batch (train mode, batch
    # norm on batch statistics, so recomputing it gives the same tokens).
    expected_e2p = sum(e2p_loss(_tokens(n, c, batch.image), c.proxy_mean) for n, c in pairs)
    expected_p2e = sum(p2e_loss(_tokens(n, c, batch.image), c.proxy_mean) for n, c in pairs)
    before = [c.proxy_mean.detach().clone() for _, c in pairs]
    history = _train(method, batch, 2)
    assert set(history[0]) == GA_CPS_TERMS | SCDL_TERMS
    assert history[0]["scdl_e2p"].item() == pytest.approx(expected_e2p.item(), rel=1e-5)
    assert history[0]["scdl_p2e"].item() == pytest.approx(expected_p2e.item(), rel=1e-5)
    for terms in history:
        assert all(torch.isfinite(v) and v.dim() == 0 for v in terms.values())
    for old, (_, cdba) in zip(before, pairs):
        assert not torch.allclose(old, cdba.proxy_mean)
    weights = method.loss_weights(StepInfo(0, 100))
    assert {k: weights[k] for k in SCDL_TERMS} == dict.fromkeys(SCDL_TERMS, 0.1)
    assert "cps" in weights


def test_sac_gradient_reaches_the_proxies_only_and_keeps_running_stats() -> None:
    method = _build("scdl_ga_cps")
    terms = method.training_step(_batch(), StepInfo(0, 100))
    method.zero_grad()
    terms["scdl_sac"].backward()
    for net, cdba in method.proxy_networks():
        assert all(p.grad is None for p in net.encoder.parameters())
        assert all(p.grad is None for p in net.decoder.parameters())
        assert cdba.proxy_mean.grad is not None and cdba.proxy_mean.grad.abs().sum() > 0
        assert cdba.proxy_rho.grad is None  # SAC aligns the means only
    # The masked passes leave the batch-norm running statistics as they were.
    net, cdba = method.proxy_networks()[0]
    batch = _batch()
    saved = {k: v.clone() for k, v in net.state_dict().items() if "running" in k}
    method.class_anchors(net, cdba, batch.labeled_image, batch.label,
                         method.sac_pairs(batch.label))
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in saved.items())


def test_parameter_groups_give_scdl_its_weight_decay() -> None:
    method = _build("scdl_ga_cps", weight_decay=5e-4)
    groups = method.parameter_groups(1e-4)
    scdl_ids = {id(p) for _, c in method.proxy_networks() for p in c.parameters()}
    assert [g["weight_decay"] for g in groups] == [1e-4, 5e-4]
    assert {id(p) for p in groups[1]["params"]} == scdl_ids
    assert not scdl_ids & {id(p) for p in groups[0]["params"]}
    every = [id(p) for g in groups for p in g["params"]]
    assert len(every) == len(set(every))
    assert set(every) == {id(p) for p in method.parameters() if p.requires_grad}


def test_state_dict_round_trip_and_deterministic_inference() -> None:
    method = _build("scdl_ga_cps")
    state = method.state_dict()
    assert "host.net_a.injector.cdba.proxy_mean" in state
    assert "host.net_b.injector.cdba.projections.4.weight" in state
    other = _build("scdl_ga_cps", seed=5)
    other.load_state_dict(state)
    x = torch.rand(1, 1, P, P, P)
    method.eval()
    other.eval()
    with torch.no_grad():
        first = method.inference_network()(x)
        assert torch.equal(first, method.inference_network()(x))  # eval: no sampling
        assert torch.allclose(first, other.inference_network()(x), atol=1e-6)


def _encoder_calls(method: SCDLMethod) -> list[int]:
    calls = [0]

    def count(*_: object) -> None:
        calls[0] += 1

    for net, _ in method.proxy_networks():
        net.encoder.register_forward_hook(count)
    return calls


def test_ablation_switches() -> None:
    batch = _batch()
    full = _build("scdl_ga_cps")
    calls = _encoder_calls(full)
    full.training_step(batch, StepInfo(0, 100))
    # 2 networks x (1 batch pass + ceil(pairs / 4) masked passes)
    pairs = len(full.sac_pairs(batch.label))
    assert pairs == 2 * CLASSES
    assert calls[0] == 2 * (1 + math.ceil(pairs / 4))

    cdba_only = _build("scdl_ga_cps", sac=False)  # Table 4 row 2
    calls = _encoder_calls(cdba_only)
    terms = cdba_only.training_step(batch, StepInfo(0, 100))
    assert set(terms) == GA_CPS_TERMS | {"scdl_e2p", "scdl_p2e"}
    assert calls[0] == 2  # no masked passes
    assert "scdl_sac" not in cdba_only.loss_weights(StepInfo(0, 100))
    assert "scdl_sac" not in _build("scdl_ga_cps", sac_weight=0.0).training_step(
        batch, StepInfo(0, 100))

    off = _build("scdl_ga_cps", cdba=False, sac=False)  # nothing attached: the host itself
    assert off.host.net_a.injector is None and not off.proxy_networks()
    torch.manual_seed(0)
    plain = build_method("ga_cps", _context(), {})
    off_terms = off.training_step(batch, StepInfo(0, 100))
    plain_terms = plain.training_step(batch, StepInfo(0, 100))
    assert off_terms.keys() == plain_terms.keys() == GA_CPS_TERMS
    assert all(torch.equal(off_terms[k], plain_terms[k]) for k in off_terms)
    with pytest.raises(ConfigError, match="sac needs cdba"):
        _build("scdl_ga_cps", cdba=False)


def test_options_layout_and_validation() -> None:
    context = _context()
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['consistency'\].*options.host"):
        build_method("scdl_ga_cps", context, {"consistency": 0.2})
    with pytest.raises(ConfigError, match=r"method.options.scdl.temprature.*'temperature'"):
        build_method("scdl_ga_cps", context, {"scdl": {"temprature": 0.2}})
    with pytest.raises(ConfigError, match=r"method.options.host.consistancy"):
        build_method("scdl_ga_cps", context, {"host": {"consistancy": 0.2}})
    with pytest.raises(ConfigError, match="scdl.temperature: must be positive"):
        build_method("scdl_ga_cps", context, {"scdl": {"temperature": 0.0}})
    with pytest.raises(ConfigError, match="sac_min_fraction"):
        build_method("scdl_ga_cps", context, {"scdl": {"sac_min_fraction": 1.0}})
    with pytest.raises(ConfigError, match="options.scdl: expected a mapping"):
        build_method("scdl_ga_cps", context, {"scdl": [1]})
    method = build_method("scdl_ga_cps", context, {"host": {"consistency": 0.3},
                                                   "scdl": {"temperature": 0.5}})
    assert method.host.options.consistency == 0.3 and method.options.temperature == 0.5
    assert method.name == "scdl_ga_cps"


def test_scdl_ga_magicnet_token_sources_teacher_ema_and_training() -> None:
    method = _build("scdl_ga_magicnet")
    host = method.host
    batch = _batch()
    (student, cdba), = method.proxy_networks()
    (teacher, teacher_cdba), = method.teacher_networks()
    assert student is host.network and teacher is host.teacher.network
    assert not any(p.requires_grad for p in teacher_cdba.parameters())
    assert not {id(p) for p in teacher_cdba.parameters()} & {
        id(p) for g in method.parameter_groups(1e-4) for p in g["params"]}
    # Decodings with gradients in one MagicNet step: the batch, the cross-image mixed batch,
    # the labeled crops' cubes (the teacher and the pseudo-label cubes have none).
    injector = host.network.injector
    injector.start_recording()
    host.training_step(batch, StepInfo(0, 100))
    records = injector.stop_recording()
    assert [(r.batch, r.grid) for r in records] == [(4, (2, 2, 2)), (4, (2, 2, 2)),
                                                     (2 * 8, (1, 1, 1))]
    chosen = {}
    for rule in ("first", "batch", "full_patch", "all"):
        built = _build("scdl_ga_magicnet", token_source=rule)
        chosen[rule] = len(built._selected(records, batch, built.proxy_networks()[0][1]))
    # "batch": the first whole-crop decoding already covers the 4 crops.
    assert chosen == {"first": 1, "batch": 1, "full_patch": 2, "all": 3}

    expected = e2p_loss(_tokens(student, cdba, batch.image), cdba.proxy_mean)
    before = cdba.proxy_mean.detach().clone()
    history = _train(method, batch, 1)
    assert set(history[0]) == MAGIC_TERMS | SCDL_TERMS
    assert history[0]["scdl_e2p"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert all(torch.isfinite(v) for v in history[0].values())
    assert not torch.allclose(before, cdba.proxy_mean)
    # The host's EMA covers the injector: alpha(0) = 0 makes the teacher's SCDL parameters a
    # copy of the student's; after iteration 1 (alpha = 0.5) they are the mean of that copy and
    # the student's new values.
    teacher_params = dict(teacher_cdba.named_parameters())
    assert teacher_params.keys() == dict(cdba.named_parameters()).keys()
    for name, p in cdba.named_parameters():
        assert torch.equal(p, teacher_params[name]), name
    old = {k: v.detach().clone() for k, v in teacher_params.items()}
    optimizer = torch.optim.SGD(method.parameter_groups(1e-4), lr=0.05)
    terms = method.training_step(batch, StepInfo(1, 100))
    assert all(torch.isfinite(v) for v in terms.values())
    sum(terms.values()).backward()
    optimizer.step()
    method.after_step(StepInfo(1, 100))
    for name, p in cdba.named_parameters():
        assert not torch.equal(p, old[name]), name
        assert torch.allclose(teacher_params[name], 0.5 * old[name] + 0.5 * p, atol=1e-7)


def test_mean_teacher_teacher_carries_a_frozen_copy() -> None:
    method = _build("scdl_mean_teacher", host={"teacher_init": "copy"})
    (student, cdba), = method.proxy_networks()
    (teacher, teacher_cdba), = method.teacher_networks()
    assert student is method.host.network and student.injector.cdba is cdba
    assert teacher is method.host.teacher.network and teacher.injector.cdba is teacher_cdba
    for (name, p), (_, q) in zip(cdba.named_parameters(), teacher_cdba.named_parameters()):
        assert torch.equal(p, q), name  # teacher_init: copy -> the teacher starts equal
        assert p.requires_grad and not q.requires_grad
    history = _train(method, _batch(), 2)
    assert set(history[0]) == {"dice_ce", "consistency"} | SCDL_TERMS


def test_injection_modes_stage_cache_and_zero_init() -> None:
    x = torch.rand(2, 1, P, P, P)
    zero = _build("scdl_supervised", zero_init_projection=True).eval()
    (net, _), = zero.proxy_networks()
    with torch.no_grad():
        with_prior = net(x)
        injector = net.injector
        net.attach_injector(None)
        without = net(x)
        net.attach_injector(injector)
    assert torch.equal(with_prior, without)  # zero projections: exactly the host network

    method = _build("scdl_supervised").eval()
    (net, cdba), = method.proxy_networks()
    assert sorted(cdba.projections.keys()) == ["0", "1", "2", "3", "4"]
    assert cdba.prior_dim == 3 * 64  # Eq. 7: r_dist, r_center, z_sam of D = 16 x 4
    with torch.no_grad():
        assert not torch.allclose(net(x), net.decode(net.encode(x), lambda s, f: f))
        train_a, train_b = (method.train().host.network(x) for _ in range(2))
    assert not torch.equal(train_a, train_b)  # training: sampled proxies and token noise

    bottleneck = _build("scdl_supervised", injection="bottleneck")
    (_, cdba), = bottleneck.proxy_networks()
    assert list(cdba.projections.keys()) == ["0"]
    injector = CDBAInjector(cdba)
    feature = torch.rand(2, 64, 2, 2, 2)
    every_stage = CDBAInjector(_build("scdl_supervised").proxy_networks()[0][1])
    with pytest.raises(RuntimeError, match="decoder stage 2 before the token stage"):
        every_stage(2, torch.rand(2, 16, 8, 8, 8))
    assert torch.equal(injector(2, feature), feature)  # not an injection stage: untouched
    assert not torch.equal(injector(0, feature), feature)
    later = torch.rand(2, 32, 4, 4, 4)
    assert torch.equal(injector(1, later), later)  # bottleneck mode: later stages untouched


def test_official_variant_terms() -> None:
    method = _build("scdl_ga_cps", loss="official", prior="official", projector="mlp",
                    embedding_dim=32, temperature=0.2, injection="bottleneck",
                    noise_scale="raw", official_label_weights=True, sac_normalize_tokens=True)
    (_, cdba), _ = method.proxy_networks()
    assert cdba.embedding_dim == 32 and cdba.prior_dim == 64
    assert torch.allclose(cdba.noise_scale, torch.full((32,), 0.05))  # raw official init
    history = _train(method, _batch(), 2)
    assert set(history[0]) == GA_CPS_TERMS | {"scdl_proxy", "scdl_kl", "scdl_sac"}
    assert all(torch.isfinite(v) for terms in history for v in terms.values())
    assert abs(history[0]["scdl_kl"].item()) < 1e-5  # equal temperatures: P2E == E2P
    assert {"scdl_proxy", "scdl_kl", "scdl_sac"} <= set(method.loss_weights(StepInfo(0, 100)))


def test_shared_proxies_between_cps_networks() -> None:
    method = _build("scdl_cps", share_proxies=True)
    (_, a), (_, b) = method.proxy_networks()
    assert a is b
    assert method.host.net_a.injector is not method.host.net_b.injector  # own records
    assert len(method.scdl_parameters()) == len(list(a.parameters()))
    terms = _train(method, _batch(), 1)[0]
    assert {"sup_dice_ce_a", "sup_dice_ce_b", "cps"} | SCDL_TERMS == set(terms)
    other = _build("scdl_cps", seed=3, share_proxies=True)
    other.load_state_dict(method.state_dict())
    assert torch.equal(other.proxy_networks()[0][1].proxy_mean, a.proxy_mean)


class _PoolNet(nn.Module):
    """A stand-in encoder: token = (mean intensity, non-zero fraction) of its 16^3 cell."""

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [torch.cat([F.avg_pool3d(x, 16), F.avg_pool3d((x != 0).float(), 16)], 1)]


def test_sac_pairs_and_the_token_region_rule_by_hand() -> None:
    method = _build("scdl_supervised")
    label = torch.zeros(2, P, P, P, dtype=torch.long)
    label[0, :16, :16, :16] = 1  # token 0 (cell (0, 0, 0)) entirely class 1
    label[0, :16, :16, 16:20] = 1  # a quarter of token 1 (cell (0, 0, 1))
    label[0, 31, 31, 31] = 2  # one voxel of token 7
    method.options.sac_class_order = "rarest"
    method.options.sac_max_classes = 0
    # Rarest first (class 2: 1 voxel, class 1: 5120, background), every crop holding a class.
    assert method.sac_pairs(label) == [(0, 2), (0, 1), (0, 0), (1, 0)]
    method.options.sac_max_classes = 2
    assert method.sac_pairs(label) == [(0, 2), (0, 1)]
    # Rotation: windows of 2 of the present classes (0, 1, 2) in id order, one further per step.
    method.options.sac_class_order = "rotate"
    assert [method.sac_pairs(label, it) for it in range(3)] == [
        [(0, 0), (1, 0), (0, 1)], [(0, 2), (0, 0), (1, 0)], [(0, 1), (0, 2)]]
    method.options.sac_class_order = "rarest"
    method.options.sac_max_classes = 0
    method.options.sac_include_background = False
    assert method.sac_pairs(label) == [(0, 2), (0, 1)]

    image = torch.full((2, 1, P, P, P), 0.5)
    cdba = CDBA(2, (2, 2, 2, 2, 2), 3, SCDLOptions(**BOTTLENECK))
    anchors, present = method.class_anchors(_PoolNet(), cdba, image, label, [(0, 1), (0, 2)])
    # "any" voxel: class 1 = tokens 0 (0.5, 1) and 1 (0.5 x 1/4, 1/4); class 2 = token 7.
    assert present.tolist() == [False, True, True]
    assert torch.allclose(anchors[1], torch.tensor([(0.5 + 0.125) / 2, (1 + 0.25) / 2]))
    assert torch.allclose(anchors[2], torch.tensor([0.5 / 4096, 1 / 4096]))
    method.options.sac_min_fraction = 0.5  # majority: token 1 and the one-voxel class drop
    anchors, present = method.class_anchors(_PoolNet(), cdba, image, label, [(0, 1), (0, 2)])
    assert present.tolist() == [False, True, False]
    assert torch.allclose(anchors[1], torch.tensor([0.5, 1.0]))
    method.options.sac_fill_value = 1.0  # the background value fills the masked voxels
    anchors, _ = method.class_anchors(_PoolNet(), cdba, image, label, [(0, 1)])
    assert torch.allclose(anchors[1], torch.tensor([0.5, 1.0]))


# ----------------------------------------------------------------------------- the plot


def test_pca_tile_starts_and_token_classes_by_hand() -> None:
    from semiseg.engine.proxy_plot import pca_2d, tile_starts, token_classes

    t = torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0])
    line = torch.stack([t, 2 * t, torch.zeros(5)], 1) + torch.tensor([1.0, 1.0, 3.0])
    coords = pca_2d(line)
    assert torch.allclose(coords[:, 0], t * math.sqrt(5.0), atol=1e-5)  # along (1, 2, 0) / √5
    assert torch.allclose(coords[:, 1], torch.zeros(5), atol=1e-5)
    assert tile_starts((160, 160, 80), (96, 96, 96)) == [
        (0, 0, 0), (0, 64, 0), (64, 0, 0), (64, 64, 0)]
    assert tile_starts((200, 96, 50), (96, 96, 96)) == [(0, 0, 0), (52, 0, 0), (104, 0, 0)]
    label = torch.zeros(1, 4, 4, 4, dtype=torch.long)
    label[0, 0, 0, 0] = 2  # 1 of 8 voxels of token 0
    token, cls = token_classes(label, (2, 2, 2), 3, "any")
    assert list(zip(token.tolist(), cls.tolist())) == [(0, 0), (0, 2)] + [(i, 0)
                                                                          for i in range(1, 8)]
    token, cls = token_classes(label, (2, 2, 2), 3, "majority")
    assert token.tolist() == list(range(8)) and cls.tolist() == [0] * 8


def test_plot_proxy_embedding_writes_a_png(tmp_path: Path) -> None:
    from matplotlib.image import imread

    from semiseg.engine.proxy_plot import plot_proxy_embedding

    gen = torch.Generator().manual_seed(0)
    classes = torch.cat([torch.zeros(500, dtype=torch.long), torch.randint(1, 14, (200,),
                                                                           generator=gen)])
    proxies = torch.randn(14, 8, generator=gen)
    tokens = proxies[classes] + 0.3 * torch.randn(700, 8, generator=gen)
    out = plot_proxy_embedding(tokens, classes, proxies, SYNAPSE, tmp_path / "p.png",
                               max_tokens_per_class=50)
    assert imread(out).shape[:2] == (600, 700)  # 7 x 6 inches at 100 dpi
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(DataError, match="4 proxies for the 14 classes"):
        plot_proxy_embedding(tokens, classes, proxies[:4], SYNAPSE, tmp_path / "q.png")
    assert not (tmp_path / "q.png").exists()


def test_plot_proxies_from_a_two_iteration_run(tmp_path: Path) -> None:
    from matplotlib.image import imread

    from semiseg.engine.proxy_plot import plot_proxies
    from semiseg.engine.proxy_plot_cli import add_cli
    from semiseg.engine.trainer import Trainer

    overrides = [
        f"data.root={tmp_path / 'data'}", "data.phantom.num_cases=10",
        "data.phantom.shape=[40, 40, 32]", "data.patch_size=[32, 32, 32]",
        "model.options={n_filters: 4}", "method.name=scdl_supervised",
        "method.options={scdl: {sac_max_classes: 3}}", "train.max_iterations=2",
        "train.batch_size=2", "train.labeled_batch_size=2", "train.validate_every=0",
        "train.log_every=1", "experiment.seed=3",
    ]
    run = tmp_path / "run"
    Trainer(load_config(None, overrides), run, show_progress=False).fit()
    written = plot_proxies(run, cases=1, device="cpu")
    assert written == run / "proxies.png" and imread(written).shape[:2] == (600, 700)

    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["plot-proxies", str(run / "checkpoints" / "last.pt"), "--out",
                              str(tmp_path / "cli.png"), "--cases", "1", "--device", "cpu",
                              "--token-class", "majority"])
    assert args.handler(args) == 0 and (tmp_path / "cli.png").exists()

    plain = load_config(None, ["method.name=supervised", "model.options={n_filters: 4}"])
    save_checkpoint(tmp_path / "plain.pt", {"config": plain.to_dict(), "method": {},
                                            "class_set": "synapse"})
    with pytest.raises(SemisegError, match="has no SCDL proxies"):
        plot_proxies(tmp_path / "plain.pt")
    with pytest.raises(SemisegError, match="no checkpoints/best.pt"):
        plot_proxies(tmp_path)
