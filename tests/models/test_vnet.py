"""The VNet matches the official architecture."""

import pytest
import torch

from semiseg.errors import ConfigError
from semiseg.models import count_parameters, create_model


def test_vnet_has_the_official_parameter_count() -> None:
    # GALoss / DHC VNet(n_channels=1, n_classes=14, n_filters=16, batchnorm): 9,449,070.
    assert count_parameters(create_model("vnet", num_classes=14)) == 9_449_070
    # AMOS (16 classes): the 1x1x1 head grows by 2 x (16 + 1).
    assert count_parameters(create_model("vnet", num_classes=16)) == 9_449_104


def test_vnet_state_dict_structure_matches_official_blocks() -> None:
    state = create_model("vnet", num_classes=14).state_dict()
    # 205 tensors in the official state dict (weights, biases, BN buffers).
    assert len(state) == 205
    assert state["encoder.block_five.conv.6.weight"].shape == (256, 256, 3, 3, 3)
    assert state["decoder.block_five_up.conv.0.weight"].shape == (256, 128, 2, 2, 2)
    assert state["out_conv.weight"].shape == (14, 16, 1, 1, 1)


def test_encode_decode_seam_equals_forward() -> None:
    torch.manual_seed(0)
    net = create_model("vnet", num_classes=3, n_filters=4).eval()
    x = torch.randn(1, 1, 32, 32, 32)
    features = net.encode(x)
    assert [f.shape[1] for f in features] == [4, 8, 16, 32, 64]
    assert features[-1].shape[2:] == (2, 2, 2)
    assert torch.equal(net.decode(features), net(x))
    seen = []

    def inject(stage: int, feature: torch.Tensor) -> torch.Tensor:
        seen.append((stage, feature.shape[1]))
        return feature + 1.0 if stage == 2 else feature

    out = net.decode(features, inject)
    # The bottleneck, after each up-sampling, and the head's input (HEAD_STAGE 5).
    assert seen == [(0, 64), (1, 32), (2, 16), (3, 8), (4, 4), (5, 4)]
    assert net.decoder.stage_channels == (64, 32, 16, 8, 4)
    assert not torch.allclose(out, net(x))


def test_unknown_model_and_option_are_named() -> None:
    with pytest.raises(ConfigError, match="unknown model 'vnett'.*did you mean 'vnet'"):
        create_model("vnett", num_classes=2)
    with pytest.raises(ConfigError, match="model 'vnet' has no option 'n_filter'"):
        create_model("vnet", num_classes=2, n_filter=8)


def test_attached_injector_acts_on_every_decoding_and_is_saved() -> None:
    class AddOne(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(()))

        def forward(self, stage: int, x: torch.Tensor) -> torch.Tensor:
            return x + self.scale if stage == 1 else x

    torch.manual_seed(0)
    net = create_model("vnet", num_classes=3, n_filters=4).eval()
    x = torch.randn(1, 1, 32, 32, 32)
    plain = net(x)
    net.attach_injector(AddOne())
    assert "injector.scale" in net.state_dict()
    assert not torch.allclose(net(x), plain)
    manual = net.decode(net.encode(x), lambda stage, f: f)  # an explicit inject wins
    assert torch.allclose(manual, plain)
    net.attach_injector(None)
    assert torch.allclose(net(x), plain)
