"""TAK's text-driven MagicNet: parameter count, dynamic head, text buffer, conversion."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from semiseg.errors import CheckpointError, ConfigError
from semiseg.models import count_parameters, create_model
from semiseg.models.convert_tak import convert_tak_state_dict, official_tak_key, tak_model_options
from semiseg.models.tak import (
    TAKNet,
    dynamic_head,
    head_parameter_count,
    split_head_parameters,
)
from semiseg.models.tak_controller import class_share, expected_relu_mean
from semiseg.models.tak_controller import controller_input as controller_input_of

TINY = {"n_filters": 4, "cube_size": 16, "patch_size": 32, "normalization": "none",
        "location_hidden": 16}
# The official normalisation (instance norm) needs cubes of at least 32^3.
OFFICIAL_NORM = {"normalization": "instancenorm", "cube_size": 32}


def _tiny(classes: int = 3, kinds: int = 2, dim: int = 8, **extra: object) -> TAKNet:
    torch.manual_seed(0)
    net = create_model("tak", classes, text_embeddings=torch.randn(kinds, classes, dim),
                       **{**TINY, **extra})
    assert isinstance(net, TAKNet)
    return net


def test_official_parameter_count() -> None:
    net = create_model("tak", num_classes=16, text_dim=512,
                       text_embeddings=torch.randn(2, 16, 512))
    assert count_parameters(net) == 18_679_740
    assert "text_embeddings" not in dict(net.named_parameters())
    assert net.state_dict()["text_embeddings"].shape == (2, 16, 512)
    assert not hasattr(net, "out_conv")
    assert net.location_head[0].bias is None  # the official bias-free first layer
    assert head_parameter_count(8) == 153


def _loop_head(feature: torch.Tensor, params: torch.Tensor, h: int) -> torch.Tensor:
    """Reference: one plain F.conv3d chain per image and class."""
    out = torch.zeros(feature.size(0), params.size(1), *feature.shape[2:])
    for b in range(feature.size(0)):
        for c in range(params.size(1)):
            w1, w2, w3, b1, b2, b3 = split_head_parameters(params[b, c], h)
            x = F.relu(F.conv3d(feature[b:b + 1], w1[..., None, None, None], b1))
            x = F.relu(F.conv3d(x, w2[..., None, None, None], b2))
            out[b, c] = F.conv3d(x, w3[..., None, None, None], b3)[0, 0]
    return out


@pytest.mark.parametrize("impl", ["grouped_conv", "bmm"])
def test_dynamic_head_equals_a_loop_of_convolutions(impl: str) -> None:
    torch.manual_seed(0)
    feature = torch.randn(2, 8, 5, 4, 3)
    params = torch.randn(2, 3, 153)
    expected = _loop_head(feature, params, 8)
    assert torch.allclose(dynamic_head(feature, params, 8, impl), expected, atol=1e-5)
    small = torch.randn(3, 4, 2, 2, 2), torch.randn(3, 5, head_parameter_count(4))
    assert torch.allclose(dynamic_head(*small, 4, impl), _loop_head(*small, 4), atol=1e-5)


@pytest.mark.parametrize("chunk", [1, 7, 60, 10_000])
def test_chunked_head_equals_the_loop_with_gradients(chunk: int) -> None:
    """Chunking over voxels (the CPU speed-up) changes neither logits nor gradients; chunk 7
    leaves a ragged last chunk of 4 of the 60 voxels."""
    torch.manual_seed(1)
    feature = torch.randn(2, 8, 5, 4, 3, requires_grad=True)
    params = torch.randn(2, 3, 153, requires_grad=True)
    weights = torch.randn(2, 3, 5, 4, 3)
    (_loop_head(feature, params, 8) * weights).sum().backward()
    expected = feature.grad.clone(), params.grad.clone()
    feature.grad = params.grad = None
    logits = dynamic_head(feature, params, 8, "bmm", chunk_voxels=chunk)
    assert logits.shape == (2, 3, 5, 4, 3)
    (logits * weights).sum().backward()
    assert torch.allclose(feature.grad, expected[0], atol=1e-4)
    assert torch.allclose(params.grad, expected[1], atol=1e-4)
    with pytest.raises(ValueError, match="chunk_voxels"):
        dynamic_head(feature, params, 8, "bmm", chunk_voxels=0)


def test_head_parameter_layout_is_weights_then_biases() -> None:
    h = 2
    params = torch.arange(head_parameter_count(h), dtype=torch.float32)  # 8 + 2 + 2+2+1 = 15
    w1, w2, w3, b1, _, b3 = split_head_parameters(params, h)
    assert torch.equal(w1, torch.tensor([[0.0, 1.0], [2.0, 3.0]]))  # output-major rows
    assert torch.equal(w2, torch.tensor([[4.0, 5.0], [6.0, 7.0]]))
    assert torch.equal(w3, torch.tensor([[8.0, 9.0]]))
    assert torch.equal(b1, torch.tensor([10.0, 11.0])) and torch.equal(b3, torch.tensor([14.0]))
    # Identity first layers, w3 = (1, -1), zero biases: logit = relu(x0) - relu(x1).
    params = torch.tensor([1.0, 0, 0, 1, 1, 0, 0, 1, 1, -1, 0, 0, 0, 0, 0])
    feature = torch.tensor([2.0, -3.0, 1.0, 5.0]).view(1, 2, 2, 1, 1)  # voxels (2, 1), (-3, 5)
    got = dynamic_head(feature, params.view(1, 1, -1), h)
    assert torch.equal(got.flatten(), torch.tensor([2.0 - 1.0, 0.0 - 5.0]))


def test_forward_head_and_controller_shapes() -> None:
    net = _tiny()
    x = torch.rand(2, 1, 32, 32, 32)
    logits = net(x)
    assert logits.shape == (2, 3, 32, 32, 32)
    features = net.encode(x)
    scale_text = net.text_scale_embeddings()
    assert [t.shape for t in scale_text] == [(6, 16), (6, 32), (6, 64)]
    assert net.text_condition(scale_text).shape == (3, 64)
    assert net.image_feature(features).shape == (2, 64)
    again, embedding = net.forward_with_embedding(x)
    assert torch.allclose(again, logits) and embedding.shape == (2, 4, 32, 32, 32)
    with pytest.raises(TypeError, match="encoder features"):
        net.head(embedding)
    # Each image's logits depend on that image only (per-image controller parameters).
    single = net(x[1:])
    assert torch.allclose(single, logits[1:], atol=1e-5)


def test_text_changes_the_logits_of_its_class_only() -> None:
    net = _tiny().eval()
    x = torch.rand(1, 1, 32, 32, 32)
    before = net(x)
    changed = net.text_embeddings.clone()
    changed[:, 2] += 1.0
    net.set_text_embeddings(changed)
    after = net(x)
    assert torch.equal(before[:, :2], after[:, :2])
    assert not torch.allclose(before[:, 2], after[:, 2])
    with pytest.raises(ConfigError, match="shape"):
        net.set_text_embeddings(torch.zeros(1, 3, 8))


@pytest.mark.parametrize("kinds", [1, 3])
def test_one_or_three_prompt_kinds(kinds: int) -> None:
    net = _tiny(kinds=kinds)
    assert net.text_fusion[0].in_features == kinds * 64
    assert net(torch.rand(1, 1, 32, 32, 32)).shape == (1, 3, 32, 32, 32)


def test_state_dict_without_text_keeps_the_networks_own() -> None:
    net = _tiny()
    state = {k: v for k, v in net.state_dict().items() if k != "text_embeddings"}
    other = create_model("tak", 3, text_embeddings=torch.ones(2, 3, 8), **TINY)
    other.load_state_dict(state, strict=True)
    assert torch.equal(other.text_embeddings, torch.ones(2, 3, 8))
    other.load_state_dict(net.state_dict(), strict=True)
    assert torch.equal(other.text_embeddings, net.text_embeddings)


def test_bad_text_embeddings() -> None:
    with pytest.raises(ConfigError, match="3 classes"):
        create_model("tak", 4, text_embeddings=torch.zeros(2, 3, 8), **TINY)
    with pytest.raises(ConfigError, match="text_dim"):
        create_model("tak", 3, text_embeddings=torch.zeros(2, 3, 8), text_dim=16, **TINY)
    with pytest.raises(ConfigError, match="NaN"):
        create_model("tak", 3, text_embeddings=torch.full((2, 3, 8), float("nan")), **TINY)
    with pytest.raises(ConfigError, match="text_dim"):
        create_model("tak", 3, **TINY)


# ---------------------------------------------------------------------------- conversion

_OFFICIAL_HEADS = {
    "location_head": "fc_layer.fc_layer", "text_projections.0": "text_to_64",
    "text_projections.1": "text_to_128", "text_projections.2": "text_to_256",
    "text_fusion": "text_to_vision", "image_pooling.0": "Gap_64", "image_pooling.1": "GAP_128",
    "image_pooling.2": "GAP_256", "head_input": "precls_conv",
    "feature_projections.0": "features_to_64", "feature_projections.1": "features_to_128",
    "feature_projections.2": "features_to_256",
}


def _as_official(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict in the official layout (names from the official module definitions;
    pooled-vector Linear layers as 1x1x1 Conv3d weights)."""
    out = {}
    for key, value in state.items():
        if key == "text_embeddings":
            continue
        if key.startswith(("encoder.", "decoder.")):
            out[key.split(".", 1)[1]] = value
            continue
        if key.startswith("controller."):
            out[key] = value[..., None, None, None] if key.endswith("weight") else value
            continue
        for ours, official in _OFFICIAL_HEADS.items():
            if key.startswith(ours + "."):
                layer, rest = key[len(ours) + 1:].split(".", 1)
                if official.startswith(("Gap", "GAP")) and layer == "4":
                    layer = "3"
                    value = value[..., None, None, None] if rest == "weight" else value
                out[f"{official}.{layer}.{rest}"] = value
                break
        else:
            raise AssertionError(f"unmapped key {key}")
    return out


def test_conversion_round_trip_gives_identical_logits() -> None:
    torch.manual_seed(1)
    source = _tiny(**OFFICIAL_NORM).eval()
    official = _as_official(source.state_dict())
    assert official["Gap_64.3.weight"].shape == (64, 16, 1, 1, 1)
    assert official["controller.weight"].shape == (153, 128, 1, 1, 1)
    flat = source.text_embeddings.reshape(6, 8)  # the authors' [K C, D] layout
    converted = convert_tak_state_dict({"module." + k: v for k, v in official.items()}, flat)
    assert torch.equal(converted["text_embeddings"], source.text_embeddings)
    assert tak_model_options(converted) == {"text_dim": 8, "prompt_kinds": 2, "n_filters": 4,
                                            "num_classes": 3}
    target = create_model("tak", 3, text_dim=8, **{**TINY, **OFFICIAL_NORM})
    target.load_state_dict(converted, strict=True)
    x = torch.rand(2, 1, 32, 32, 32)
    with torch.no_grad():
        assert torch.equal(target.eval()(x), source(x))
    without = convert_tak_state_dict(official)
    assert "text_embeddings" not in without and len(without) == len(official)


def test_official_key_names() -> None:
    assert official_tak_key("Gap_64.3.weight") == ("image_pooling.0.4.weight", True)
    assert official_tak_key("GAP_256.0.bias") == ("image_pooling.2.0.bias", False)
    assert official_tak_key("controller.weight") == ("controller.weight", True)
    assert official_tak_key("block_five_up.conv.0.weight") == (
        "decoder.block_five_up.conv.0.weight", False)
    assert official_tak_key("fc_layer.fc_layer.1.running_var") == (
        "location_head.1.running_var", False)
    assert official_tak_key("features_to_128.3.bias") == ("feature_projections.1.3.bias", False)
    assert official_tak_key("out_conv.weight") is None


def test_conversion_errors_name_the_keys() -> None:
    official = _as_official(_tiny(**OFFICIAL_NORM).state_dict())
    broken = dict(official)
    broken.pop("controller.bias")
    broken["decoder.out_conv.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"unexpected key\(s\) \['decoder.out_conv.weight'\]"
                       r".*missing key\(s\) \['controller.bias'\]"):
        convert_tak_state_dict(broken)
    with pytest.raises(CheckpointError, match="do not fit"):
        convert_tak_state_dict(official, torch.zeros(2, 3, 5))
    with pytest.raises(CheckpointError, match="no state dict"):
        convert_tak_state_dict({"epoch": 3})


def _generated(net: TAKNet, images: int = 4) -> torch.Tensor:
    with torch.no_grad():
        image = torch.rand(images, 1, 32, 32, 32, generator=torch.Generator().manual_seed(3))
        return net.head_parameters(net.image_feature(net.encode(image)), net.text_condition())


@pytest.mark.parametrize(("classes", "dim", "controller_input"),
                         [(3, 16, "balanced"), (14, 384, "balanced"), (16, 512, "balanced"),
                          (3, 16, "official"), (14, 384, "official")])
def test_scaled_controller_init_gives_the_stated_std(classes: int, dim: int,
                                                     controller_input: str) -> None:
    # The stated std is the expectation over the controller's random rows. One network has
    # only 64 rows per generated weight tensor (8 for W3 and the biases) and nearly parallel
    # inputs, so its own sample std wanders by ~8 %: the generated parameters of 48
    # independent networks are pooled (the pooled estimate is then within ~1.2 %).
    balanced = controller_input == "balanced"
    pooled: list[list[torch.Tensor]] = [[] for _ in range(6)]
    measured, expected = [], []
    for seed in range(48 if balanced else 16):
        torch.manual_seed(seed)
        net = create_model("tak", classes, text_embeddings=torch.randn(2, classes, dim),
                           **{**TINY, "n_filters": 8, "normalization": "batchnorm"},
                           controller_input=controller_input, controller_init="scaled").eval()
        with torch.no_grad():
            image = torch.rand(2, 1, 32, 32, 32)
            pair = controller_input_of(net.image_feature(net.encode(image)),
                                       net.text_condition(), net.input_gains)
            params = net.controller(pair)
        measured.append(pair.pow(2).sum(-1).mean().item())
        expected.append(net.expected_controller_input_sq_norm())
        for part, values in zip(pooled, split_head_parameters(params)):
            part.append(values.flatten())
    # The data-free input norm is exact when balanced. For the official input the image half
    # is an expectation under "every channel standard normal after GroupNorm", which ignores
    # the spread of channel means inside a group: here it underestimates the squared norm by
    # up to 45 %, i.e. the generated std comes out up to 20-30 % high.
    assert np.mean(measured) == pytest.approx(np.mean(expected), rel=1e-4 if balanced else 0.5)
    w1, w2, w3, b1, b2, _ = (torch.cat(part) for part in pooled)
    he, default = (2 / 8) ** 0.5, 1 / (3 * 8) ** 0.5
    weight_tolerance = 0.05 if balanced else 0.35
    for generated, target, tolerance in ((w1, he, weight_tolerance), (w2, he, weight_tolerance),
                                         (w3, default, 2 * weight_tolerance),
                                         (torch.cat([b1, b2]), default, 2 * weight_tolerance)):
        assert generated.std().item() == pytest.approx(target, rel=tolerance)
    # PyTorch's default (the official one) is several times smaller.
    official = _tiny(classes=classes, dim=dim, normalization="batchnorm", n_filters=16).eval()
    assert split_head_parameters(_generated(official))[0].std().item() < he / 3


def test_scaled_init_needs_no_data_and_balanced_input_is_exact() -> None:
    torch.manual_seed(5)
    a = create_model("tak", 4, text_embeddings=torch.randn(2, 4, 8), controller_init="scaled",
                     controller_input="balanced", **TINY)
    torch.manual_seed(5)
    b = create_model("tak", 4, text_embeddings=torch.randn(2, 4, 8), controller_init="scaled",
                     controller_input="balanced", **TINY)
    assert torch.equal(a.controller.weight, b.controller.weight)  # built, never run on data
    assert torch.count_nonzero(a.controller.bias) == 0
    # Balanced: each half has norm gain / sqrt(2), so the input has unit norm at the start.
    assert a.expected_controller_input_sq_norm() == pytest.approx(1.0)
    image = torch.rand(2, 1, 32, 32, 32)
    with torch.no_grad():
        pair = controller_input_of(a.image_feature(a.encode(image)), a.text_condition(),
                                   a.input_gains)
    assert pair.pow(2).sum(-1).mean().item() == pytest.approx(1.0, rel=1e-4)
    assert count_parameters(a) == count_parameters(_tiny(classes=4)) + 2  # the two gains
    with pytest.raises(ConfigError, match="controller_init: 'he' is not one of official, scaled"):
        create_model("tak", 4, text_dim=8, controller_init="he", **TINY)


def test_expected_relu_mean() -> None:
    # E[ReLU(z)] = 1/sqrt(2 pi); E[ReLU(2z + 1)] by numerical integration.
    got = expected_relu_mean(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 1.0]))
    z = torch.linspace(-12, 12, 200_001, dtype=torch.float64)
    density = torch.exp(-z ** 2 / 2) / math.sqrt(2 * math.pi)
    numeric = torch.trapezoid(torch.relu(2 * z + 1) * density, z)
    assert got[0].item() == pytest.approx(1 / math.sqrt(2 * math.pi), rel=1e-6)
    assert got[1].item() == pytest.approx(numeric.item(), rel=1e-5)


def test_class_share_on_a_hand_built_case() -> None:
    # Two classes whose heads are (1, 1, 1, 1) and (3, 3, 3, 3): mean 2, deviations +-1, so the
    # differing part is 4 * 2 = 8 of 4 * (1 + 9) = 40.
    params = torch.tensor([[[1.0] * 4, [3.0] * 4]])
    assert class_share(params).item() == pytest.approx(0.2)
    assert class_share(torch.ones(2, 3, 5)).item() == 0.0  # one head for every class
    assert class_share(torch.tensor([[[1.0, 5.0], [-1.0, 5.0]]]), slice(0, 1)).item() == 1.0
