"""``train.channels_last``: every protocol method computes the same losses in either layout.

The converged comparison grid (configs/compare/grid_converged.yaml) trains in channels-last-3d;
a method that reshaped a channels-last tensor by its strides (``as_strided``, a raw ``view`` of
``.data``, a hand-made flatten) would train on scrambled voxels without any error. So each
method takes a training step from the same weights in both layouts, with the same random
state (SCDL's prior samples, TAK's contrast samples), and the loss terms and the gradients of
that step must agree to float rounding. Tiny networks as in tests/methods: 32^3 crops, 4
filters, 4 classes.
"""

import copy
from pathlib import Path

import pytest
import torch

from semiseg.catalog import build_method
from semiseg.engine.objective import combine_losses
from semiseg.knowledge.embeddings import TextEmbeddings, save_embeddings
from semiseg.methods.base import Batch, Method, MethodContext, StepInfo

P = 32
CLASSES = ("background", "organ a", "organ b", "organ c")
CL = torch.channels_last_3d


@pytest.fixture(scope="module")
def embedding_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(7)
    found = TextEmbeddings(torch.randn(2, 4, 8), ("position", "shape"), {"encoder": "random"})
    return save_embeddings(found, tmp_path_factory.mktemp("emb") / "random.pt")


def _method(name: str, embedding_file: Path) -> Method:
    model = "tak" if name == "tak" else "magicnet" if "magicnet" in name else "vnet"
    model_options: dict = {"n_filters": 4}
    options: dict = {}
    if model != "vnet":  # 2x2x2 cubes of 16^3 (a 1-voxel bottleneck: batch norm, as the protocol)
        model_options.update(normalization="batchnorm", location_hidden=16)
        options["cube_size"] = 16
    if name == "tak":
        options.update(embeddings=str(embedding_file), prompts=["position", "shape"])
    if name.startswith("scdl_"):
        options = {"host": options, "scdl": {}}
    context = MethodContext(num_classes=len(CLASSES), model_name=model,
                            model_options=model_options, patch_size=(P, P, P),
                            class_names=CLASSES)
    torch.manual_seed(0)
    return build_method(name, context, options).train()


def _one_step(method: Method, batch: Batch) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """The loss terms of one training step and the gradient of every parameter."""
    torch.manual_seed(100)  # the same random draws in both layouts
    step = StepInfo(30, 100, 4)  # past MagicNet's blending start
    terms = method.training_step(batch, step)
    total, _ = combine_losses(terms, method.loss_weights(step), {})  # the trainer's objective
    total.backward()
    grads = {name: p.grad.detach().contiguous() for name, p in method.named_parameters()
             if p.grad is not None}
    return {key: float(value.detach()) for key, value in terms.items()}, grads


@pytest.mark.parametrize("name", ["supervised", "ga_cps", "ga_magicnet", "scdl_ga_cps",
                                  "scdl_ga_magicnet", "tak"])
def test_channels_last_trains_the_same_as_the_plain_layout(name: str,
                                                           embedding_file: Path) -> None:
    plain = _method(name, embedding_file)
    last = copy.deepcopy(plain).to(memory_format=CL)
    convs = [m for m in last.modules() if isinstance(m, torch.nn.Conv3d) and m.kernel_size[0] > 1]
    assert convs and all(c.weight.is_contiguous(memory_format=CL) for c in convs)
    gen = torch.Generator().manual_seed(1)
    image = torch.rand(4, 1, P, P, P, generator=gen)
    label = torch.randint(0, len(CLASSES), (4, P, P, P), generator=gen)
    labeled = 2 if plain.semi_supervised else 4
    names = ["l0", "l1", "u0", "u1"]
    expected, expected_grads = _one_step(plain, Batch(image, label[:labeled], labeled, names))
    got, got_grads = _one_step(last, Batch(image.contiguous(memory_format=CL), label[:labeled],
                                           labeled, names))
    # Float rounding only: the losses agree to 1e-4 or better here. The gradients of these tiny
    # batch-normalised networks are ill-conditioned (a float64 reference puts the plain layout's
    # own per-parameter error at up to 1 %, channels-last's at up to 9 %: oneDNN accumulates
    # the weight gradients in another order), so they are compared as one vector, where
    # scrambled voxels would be off by about 100 %. Later steps drift apart by about 10x per
    # step through the GA losses' hard voxel selection: one step is what can be compared.
    assert got.keys() == expected.keys()
    assert any(abs(value) > 1e-3 for value in expected.values())
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-3, abs=1e-6), key
    assert got_grads.keys() == expected_grads.keys() and len(expected_grads) > 10
    reference = torch.cat([grad.flatten() for grad in expected_grads.values()])
    other = torch.cat([got_grads[key].flatten() for key in expected_grads])
    assert float((other - reference).norm() / reference.norm()) < 0.2
