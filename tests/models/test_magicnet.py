"""The MagicNet VNet matches the official VNet_Magic and exposes the VNet seam."""

import pytest
import torch
from torch import nn

from semiseg.errors import ConfigError
from semiseg.models import count_parameters, create_model
from semiseg.models.magicnet import MagicNet


def test_official_parameter_count() -> None:
    # Official VNet_Magic(n_channels=1, n_classes=14, cube_size=32, patch_size=96): 17,954,985.
    net = create_model("magicnet", num_classes=14)
    assert isinstance(net, MagicNet)
    assert count_parameters(net) == 17_954_985
    head = sum(p.numel() for p in net.location_head.parameters())
    assert head == 2048 * 4096 + 4096 + 2 * 4096 + 4096 * 27 + 27 == 8_511_515
    assert count_parameters(net) - head == 9_443_470  # the instance-norm VNet
    assert count_parameters(create_model("magicnet", num_classes=16)) == 17_955_019
    state = net.state_dict()
    assert len(state) == 69  # as the official state dict
    assert state["location_head.0.weight"].shape == (4096, 2048)
    assert state["location_head.3.weight"].shape == (27, 4096)
    assert state["out_conv.weight"].shape == (14, 16, 1, 1, 1)


def test_instance_norm_without_state() -> None:
    net = create_model("magicnet", num_classes=3, n_filters=4, cube_size=32, patch_size=64,
                       location_hidden=8)
    norms = [m for m in net.modules() if isinstance(m, nn.InstanceNorm3d)]
    assert len(norms) == 29  # one after every convolution / (de)convolution of the VNet
    assert all(not m.affine and not m.track_running_stats for m in norms)
    assert not any(isinstance(m, nn.BatchNorm3d) for m in net.modules())


def test_seam_embedding_and_location_head() -> None:
    torch.manual_seed(0)
    # Head sized for 2x2x2 = 8 cubes of 32^3 in a 64^3 crop; forward on one 32^3 input only.
    net = create_model("magicnet", num_classes=3, n_filters=4, cube_size=32, patch_size=64,
                       location_hidden=8).eval()
    x = torch.randn(2, 1, 32, 32, 32)
    logits = net(x)
    assert logits.shape == (2, 3, 32, 32, 32)
    features = net.encode(x)
    assert [f.shape[1] for f in features] == [4, 8, 16, 32, 64]
    assert torch.equal(net.decode(features), logits)
    with_embedding, embedding = net.forward_with_embedding(x)
    assert embedding.shape == (2, 4, 32, 32, 32)
    assert torch.equal(with_embedding, logits)
    assert torch.equal(net.head(embedding), logits)
    # One 32^3 cube has a 64 x 2^3 bottleneck = 512 features -> 8 location logits.
    assert net.location_head[0].in_features == 512
    assert net.num_locations == 8 and net.grid == (2, 2, 2)
    location = net.locate(features[-1])
    assert location.shape == (2, 8)
    assert torch.equal(location, net.location_head(features[-1].reshape(2, 512)))


def test_invalid_cube_sizes_are_named() -> None:
    with pytest.raises(ConfigError, match="cube_size: 24 is not a multiple of 16"):
        create_model("magicnet", num_classes=2, cube_size=24, patch_size=48)
    with pytest.raises(ConfigError, match="1-voxel bottleneck"):
        create_model("magicnet", num_classes=2, cube_size=16, patch_size=32)
    with pytest.raises(ConfigError, match="not a multiple of cube_size 32"):
        create_model("magicnet", num_classes=2, cube_size=32, patch_size=80)
    # Without instance norm a 16^3 cube is allowed (tiny method tests use it).
    net = create_model("magicnet", num_classes=2, n_filters=4, cube_size=16, patch_size=32,
                       normalization="none", location_hidden=8)
    assert net.location_head[0].in_features == 64 and net.num_locations == 8
