"""Official SCDL Synapse MagicNet checkpoints (Zyh55555/SCDL) convert to semiseg's MagicNet with
the official_synapse_magicnet CDBA and give its logits.

The official-named state dicts are written here from semiseg's network with the official names
spelled out (``networks/magicnet.py`` VNet_Magic, ``networks/SCDL.py`` SCDL); the check against
the official classes themselves is done outside the repository (docs/methods/checkpoints.md).
"""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from semiseg.cli import _build_parser, main
from semiseg.errors import CheckpointError
from semiseg.models import convert_official_state_dict, read_official_checkpoint
from semiseg.models.convert import KINDS, semiseg_to_official_key
from semiseg.plugins.scdl.official import official_scdl_network

KIND = "scdl-synapse-magicnet"
CLASSES, FILTERS, Z = 3, 4, 8
OPTIONS = {"num_classes": CLASSES, "n_filters": FILTERS, "cube_size": 32, "patch_size": 64,
           "embedding_dim": Z}


def _network(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    network = official_scdl_network(KIND, **OPTIONS)
    with torch.no_grad():  # away from the initial constants, so that every entry is checked
        network.injector.cdba.noise_scale.normal_()
        network.injector.cdba.projections["5"].weight.normal_()
    return network.eval()


def _official(network: nn.Module) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(VNet_Magic state, SCDL state) under the official names."""
    model: dict[str, Tensor] = {}
    eprl: dict[str, Tensor] = {}
    for key, value in network.state_dict().items():
        value = value.clone()
        if not key.startswith("injector."):
            model[semiseg_to_official_key(key, "galoss-magicnet")] = value
    cdba = {k.removeprefix("injector.cdba."): v.clone()
            for k, v in network.state_dict().items() if k.startswith("injector.")}
    model["prior_to_feat.weight"] = cdba["projections.5.weight"]
    # Modules the official inference network never calls.
    model["x4_to_xdim.weight"] = torch.randn(16, 8 * FILTERS, 1, 1, 1)
    for size, channels in ((12, 8), (24, 4), (48, 2), (96, 1)):
        model[f"decoder.p{size}.weight"] = torch.randn(channels * FILTERS, Z, 1, 1, 1)
    for layer in ("0", "3", "6"):
        for param in ("weight", "bias"):
            eprl[f"encoder.{layer}.{param}"] = cdba[f"projector.{layer}.{param}"]
    eprl["proxies"] = torch.cat([cdba["proxy_mean"], cdba["proxy_rho"]], dim=1)  # mu | rho
    eprl["sigma_emb"] = cdba["noise_scale"].reshape(1, 1, 1, Z)
    return model, eprl


def _same_tensors(converted: dict[str, Tensor], network: nn.Module) -> None:
    expected = network.state_dict()
    assert set(converted) == set(expected)
    for key, value in expected.items():
        assert torch.equal(converted[key], value), key


def test_combined_checkpoint_round_trip_loads_strictly_with_identical_logits() -> None:
    source = _network(0)
    model, eprl = _official(source)
    assert len(model) == 75 and len(eprl) == 8  # as the official modules' state dicts
    # The official training script's combined checkpoint (DataParallel names in the network).
    combined = {"model": {f"module.{k}": v for k, v in model.items()}, "eprl": eprl,
                "iter": 15000}
    converted = convert_official_state_dict(combined, KIND)
    _same_tensors(converted, source)
    target = _network(1)
    target.load_state_dict(converted, strict=True)
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        assert torch.equal(target(x), source(x))
    # The README's name of the entry.
    _same_tensors(convert_official_state_dict({"model": model, "scdl": eprl}, KIND), source)


def test_separate_scdl_state(tmp_path: Path) -> None:
    source = _network(0)
    model, eprl = _official(source)
    for separate in (eprl, {"eprl": eprl}, {"state_dict": eprl}):
        _same_tensors(convert_official_state_dict(model, KIND, eprl=separate), source)
    _same_tensors(convert_official_state_dict({"model": model}, KIND, eprl=eprl), source)
    torch.save(model, tmp_path / "iter_15000_best.pth")
    torch.save({"eprl": eprl}, tmp_path / "eprl.pth")
    converted = read_official_checkpoint(tmp_path / "iter_15000_best.pth", KIND,
                                         eprl=tmp_path / "eprl.pth")
    _same_tensors(converted, source)


def test_errors_name_the_keys() -> None:
    model, eprl = _official(_network(0))
    with pytest.raises(CheckpointError, match="holds the network only; pass the SCDL module"):
        convert_official_state_dict(model, KIND)
    with pytest.raises(CheckpointError, match="holds the SCDL module already"):
        convert_official_state_dict({"model": model, "eprl": eprl}, KIND, eprl=eprl)
    broken_model = {k: v for k, v in model.items() if k != "prior_to_feat.weight"}
    broken_model["decoder.p192.weight"] = torch.zeros(1)
    broken_eprl = {k: v for k, v in eprl.items() if k != "sigma_emb"}
    broken_eprl["encoder.9.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as info:
        convert_official_state_dict({"model": broken_model, "eprl": broken_eprl}, KIND)
    message = str(info.value)
    assert "not a scdl-synapse-magicnet checkpoint" in message
    assert "2 unexpected key(s) ['decoder.p192.weight', 'eprl.encoder.9.weight']" in message
    assert "2 missing key(s) ['eprl.sigma_emb', 'prior_to_feat.weight']" in message
    with pytest.raises(CheckpointError, match=r"proxies of shape \(3, 7\)"):
        convert_official_state_dict(model, KIND, eprl={**eprl, "proxies": torch.zeros(3, 7)})
    # A plain VNet_Magic (GALoss) is not SCDL's inference network.
    plain = {k: v for k, v in model.items() if k != "prior_to_feat.weight"}
    with pytest.raises(CheckpointError, match=r"1 missing key\(s\) \['prior_to_feat.weight'\]"):
        convert_official_state_dict(plain, KIND, eprl=eprl)
    with pytest.raises(CheckpointError, match=r"2 unexpected key\(s\) \['prior_to_feat.weight', "
                       r"'x4_to_xdim.weight'\]"):
        convert_official_state_dict(model, "scdl-amos-magicnet")


def test_official_synapse_network_computes_the_official_head() -> None:
    """The official VNetWithPrior head (inference_Synapse_MagicNet.py) written out: tokens are
    the last decoder feature adaptive-average-pooled to (X / 8)^3, the SCDL MLP embeds them,
    prior = normalize(softmax_c(cos(z, mu_c) / 0.2) @ normalize(mu)), reshaped to the grid,
    projected by a 1x1x1 convolution, resized trilinearly (align_corners=False) and added."""
    network = _network(0)
    cdba = network.injector.cdba
    x = torch.randn(2, 1, 32, 48, 32)
    with torch.no_grad():
        feature = network.decode_features(network.encode(x), inject=lambda stage, f: f)
        tokens = F.adaptive_avg_pool3d(feature, (4, 6, 4)).flatten(2).permute(0, 2, 1)
        z = F.normalize(cdba.projector(tokens), dim=-1)
        mu = F.normalize(cdba.proxy_mean, dim=-1)
        assignment = torch.softmax(torch.einsum("bld,cd->bcl", z, mu) / 0.2, dim=1)
        prior = F.normalize(torch.einsum("bcl,cd->bld", assignment, mu), dim=-1)
        prior_map = prior.permute(0, 2, 1).reshape(2, Z, 4, 6, 4)
        added = F.interpolate(cdba.projections["5"](prior_map), size=feature.shape[2:],
                              mode="trilinear", align_corners=False)
        expected = network.out_conv(feature + added)
        assert (network(x) - expected).abs().max() < 1e-5
        assert (network(x) - network.out_conv(feature)).abs().max() > 1e-2  # the prior counts


def test_builder_kinds() -> None:
    assert set(official_scdl_network("scdl-amos-cps", num_classes=16, n_filters=2)
               .state_dict()) >= {"out_conv.weight", "encoder.block_one.conv.1.running_mean"}
    amos = official_scdl_network("scdl-amos-magicnet", num_classes=16, n_filters=2)
    assert amos.injector is None and amos.out_conv.out_channels == 16
    with pytest.raises(CheckpointError, match="not an SCDL checkpoint kind: 'galoss-vnet'"):
        official_scdl_network("galoss-vnet")


def test_cli_converts_with_a_separate_scdl_file(tmp_path: Path, capsys) -> None:
    source = _network(0)
    model, eprl = _official(source)
    torch.save(model, tmp_path / "best.pth")
    torch.save({"eprl": eprl}, tmp_path / "eprl.pth")
    out = tmp_path / "converted.pt"
    assert main(["convert-checkpoint", "--from", KIND, str(tmp_path / "best.pth"),
                 "--out", str(out)]) == 2
    assert "--eprl FILE" in capsys.readouterr().err
    assert main(["convert-checkpoint", "--from", KIND, str(tmp_path / "best.pth"), "--out",
                 str(out), "--eprl", str(tmp_path / "eprl.pth")]) == 0
    printed = capsys.readouterr().out
    assert (f"official_scdl_network('{KIND}', num_classes={CLASSES}, n_filters={FILTERS}, "
            f"embedding_dim={Z})") in printed
    target = _network(1)
    target.load_state_dict(torch.load(out, weights_only=True), strict=True)
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        assert torch.equal(target(x), source(x))


def test_cli_accepts_every_kind() -> None:
    parser = _build_parser()
    for kind in KINDS:
        args = parser.parse_args(["convert-checkpoint", "--from", kind, "a", "--out", "b"])
        assert args.kind == kind
