"""GenericSSL's DiffVNet: official parameter counts, shapes, time conditioning and the seam."""

import pytest
import torch
from torch import Tensor, nn

from semiseg.models import count_parameters, create_model
from semiseg.models.diff_vnet import DiffVNet, timestep_embedding


@pytest.mark.parametrize(("filters", "classes", "total", "embedding", "decoder", "denoiser"), [
    # Counted by instantiating the official DiffVNet(n_channels=1, n_classes, n_filters,
    # "batchnorm", has_dropout=True) of xmed-lab/GenericSSL 4158615 (Synapse: 32 filters).
    (32, 14, 57_903_466, 346_080, 8_282_830, 40_991_726),
    (16, 14, 15_701_962, 337_392, 2_072_174, 11_220_222),
    (8, 14, 4_785_082, 333_048, 518_782, 3_414_470),
    (4, 3, 1_871_257, 330_876, 130_015, 1_280_351),
])
def test_parameter_counts_equal_the_official_network(filters: int, classes: int, total: int,
                                                     embedding: int, decoder: int,
                                                     denoiser: int) -> None:
    with torch.device("meta"):  # counts only: no memory, no init time
        net = create_model("diff_vnet", classes, n_filters=filters, has_dropout=True)
    assert count_parameters(net) == total
    assert count_parameters(net.image_embedding) == embedding
    assert count_parameters(net.decoder_theta) == decoder
    assert count_parameters(net.decoder_psi) == decoder
    assert count_parameters(net.denoiser) == denoiser
    assert len(net.state_dict()) == 466  # as the official state dict (batch-norm buffers too)


def _net(**options: object) -> DiffVNet:
    torch.manual_seed(0)
    net = create_model("diff_vnet", 3, n_filters=4, **options)
    assert isinstance(net, DiffVNet)
    return net


def test_shapes_of_every_path() -> None:
    net = _net().eval()
    x = torch.randn(2, 1, 16, 16, 16)
    features = net.encode(x)
    assert [tuple(f.shape[1:]) for f in features] == [
        (4, 16, 16, 16), (8, 8, 8, 8), (16, 4, 4, 4), (32, 2, 2, 2), (64, 1, 1, 1)]
    assert net.decoder_stage_channels == (64, 32, 16, 8, 4)
    assert net.bottleneck_channels == 64
    with torch.no_grad():
        assert net(x).shape == (2, 3, 16, 16, 16)
        assert torch.equal(net(x), net.theta(x))
        assert net.psi(x).shape == (2, 3, 16, 16, 16)
        x_t = torch.randn(2, 3, 16, 16, 16)
        assert net.denoise(x_t, torch.tensor([0, 999]), x).shape == (2, 3, 16, 16, 16)


def test_timestep_embedding_and_time_conditioning() -> None:
    emb = timestep_embedding(torch.tensor([0, 1]), 4)
    # half = 2 frequencies: exp(0) = 1 and exp(-ln(10000) / 1) = 1e-4.
    assert emb[0].tolist() == [0.0, 0.0, 1.0, 1.0]
    assert emb[1].tolist() == pytest.approx([0.8414710, 1e-4, 0.5403023, 1.0], rel=1e-5)
    net = _net().eval()
    x, x_t = torch.randn(1, 1, 16, 16, 16), torch.randn(1, 3, 16, 16, 16)
    with torch.no_grad():
        early = net.denoise(x_t, torch.tensor([0]), x)
        late = net.denoise(x_t, torch.tensor([999]), x)
    assert (early - late).abs().max() > 1e-4


def test_theta_and_psi_share_conv_names_with_xi_but_not_time_projections() -> None:
    net = _net()
    theta = dict(net.decoder_theta.named_parameters())
    xi = dict(net.denoiser.decoder.named_parameters())
    shared = [k for k in theta if k in xi and xi[k].shape == theta[k].shape]
    assert len(shared) == len(theta) == 54  # every D_θ tensor (official: 54 of 54)
    assert len(xi) - len(shared) == 26  # D_ξ's time projections (weight + bias x 13)


class Recorder(nn.Module):
    """Injector that records (stage, channels) and adds ``value``."""

    def __init__(self, value: float = 0.0) -> None:
        super().__init__()
        self.value = value
        self.calls: list[tuple[int, int]] = []

    def forward(self, stage: int, x: Tensor) -> Tensor:
        self.calls.append((stage, x.size(1)))
        return x + self.value


def test_injector_is_called_at_every_decoder_stage_of_every_decoder() -> None:
    net = _net().eval()
    x, x_t, t = torch.randn(1, 1, 16, 16, 16), torch.randn(1, 3, 16, 16, 16), torch.tensor([5])
    with torch.no_grad():
        plain = (net.theta(x), net.psi(x), net.denoise(x_t, t, x))
    recorder = Recorder(0.0)
    net.attach_injector(recorder)
    stages = [(0, 64), (1, 32), (2, 16), (3, 8), (4, 4), (5, 4)]  # 5: the head's input
    with torch.no_grad():
        for path, before in zip((lambda: net.theta(x), lambda: net.psi(x),
                                 lambda: net.denoise(x_t, t, x)), plain):
            recorder.calls.clear()
            out = path()
            assert recorder.calls == stages
            assert torch.equal(out, before)  # adding 0 changes nothing
        recorder.value = 1.0
        assert not torch.allclose(net.theta(x), plain[0])
    assert "injector.value" not in net.state_dict()  # plain attribute; SCDL's has parameters
    net.attach_injector(None)
    with torch.no_grad():
        assert torch.equal(net.theta(x), plain[0])


def test_denoiser_can_be_left_without_injection() -> None:
    net = _net(inject_denoiser=False).eval()
    recorder = Recorder()
    net.attach_injector(recorder)
    with torch.no_grad():
        net.denoise(torch.randn(1, 3, 16, 16, 16), torch.tensor([1]), torch.randn(1, 1, 16, 16, 16))
        assert recorder.calls == []
        net.psi(torch.randn(1, 1, 16, 16, 16))
    assert len(recorder.calls) == 6
