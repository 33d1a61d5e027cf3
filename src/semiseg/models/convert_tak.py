"""Convert official TAK checkpoints (``Lunn88/TAK-Semi``, ``VNet_Magic_CLIP_2p_Contrast``) into
state dicts of :class:`semiseg.models.tak.TAKNet`.

Key map (official -> semiseg); 1x1x1 convolutions that act on pooled vectors become ``Linear``
layers here, so their ``(out, in, 1, 1, 1)`` weights are reshaped to ``(out, in)``:

============================================  ============================================
``block_one`` … ``block_five`` (and ``_dw``)  ``encoder.<same>``
``block_five_up`` … ``block_nine``            ``decoder.<same>``
``fc_layer.fc_layer.{0,1,3}.*``               ``location_head.{0,1,3}.*``
``text_to_64.0.*`` / ``_128`` / ``_256``      ``text_projections.{0,1,2}.0.*``
``text_to_vision.0.*``                        ``text_fusion.0.*``
``Gap_64.0.*`` / ``GAP_128`` / ``GAP_256``    ``image_pooling.{0,1,2}.0.*`` (GroupNorm)
``Gap_64.3.*`` / ``GAP_128`` / ``GAP_256``    ``image_pooling.{0,1,2}.4.*`` (reshaped)
``controller.*``                              ``controller.*`` (reshaped)
``precls_conv.{0,2}.*``                       ``head_input.{0,2}.*``
``features_to_64.{0,3}.*`` / ``_128`` / ``_256``  ``feature_projections.{0,1,2}.{0,3}.*``
============================================  ============================================

The official state dict holds no text embeddings (the network reads
``CLIP/amos_embedding_shape_location.pth`` when it is built). Pass them as ``text_embeddings``
to include them (the authors' ``[32, 512]`` file is split into ``[2, 16, 512]`` in file row
order, which is the order the official controller concatenates); otherwise the converted dict
loads into a ``TAKNet`` built with the embeddings, which keeps its own.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from semiseg.errors import CheckpointError
from semiseg.models.official_state import (
    DECODER_BLOCKS,
    ENCODER_BLOCKS,
    check_complete,
    rename_state_dict,
    unwrap_state_dict,
)

KIND = "tak"

# official module prefix -> (our prefix, {official layer index: our layer index}, reshape to 2-D)
_HEAD_MODULES: dict[str, tuple[str, dict[str, str], frozenset[str]]] = {
    "fc_layer.fc_layer": ("location_head", {"0": "0", "1": "1", "3": "3"}, frozenset()),
    "text_to_64": ("text_projections.0", {"0": "0"}, frozenset()),
    "text_to_128": ("text_projections.1", {"0": "0"}, frozenset()),
    "text_to_256": ("text_projections.2", {"0": "0"}, frozenset()),
    "text_to_vision": ("text_fusion", {"0": "0"}, frozenset()),
    "Gap_64": ("image_pooling.0", {"0": "0", "3": "4"}, frozenset({"3"})),
    "GAP_128": ("image_pooling.1", {"0": "0", "3": "4"}, frozenset({"3"})),
    "GAP_256": ("image_pooling.2", {"0": "0", "3": "4"}, frozenset({"3"})),
    "precls_conv": ("head_input", {"0": "0", "2": "2"}, frozenset()),
    "features_to_64": ("feature_projections.0", {"0": "0", "3": "3"}, frozenset()),
    "features_to_128": ("feature_projections.1", {"0": "0", "3": "3"}, frozenset()),
    "features_to_256": ("feature_projections.2", {"0": "0", "3": "3"}, frozenset()),
}
def official_tak_key(key: str) -> tuple[str, bool] | None:
    """``(our key, reshape to 2-D)`` for official key ``key``, or None when it has no
    counterpart."""
    block = key.split(".", 1)[0]
    if block in ENCODER_BLOCKS:
        return f"encoder.{key}", False
    if block in DECODER_BLOCKS:
        return f"decoder.{key}", False
    if key in ("controller.weight", "controller.bias"):
        return key, key.endswith("weight")
    for official, (ours, layers, flatten) in _HEAD_MODULES.items():
        if key.startswith(official + "."):
            layer, _, rest = key[len(official) + 1:].partition(".")
            if layer in layers and rest:
                return f"{ours}.{layers[layer]}.{rest}", layer in flatten and rest == "weight"
    return None


def authors_embeddings(tensor: Tensor, prompt_kinds: int = 2) -> Tensor:
    """The authors' flattened ``[K C, D]`` embedding tensor as ``[K, C, D]`` (row ``k C + c`` is
    class c's prompt of kind k). ``[K, C, D]`` input is returned unchanged."""
    if tensor.dim() == 3:
        return tensor
    if tensor.dim() != 2 or tensor.size(0) % prompt_kinds:
        raise CheckpointError(f"text embeddings of shape {tuple(tensor.shape)} are neither "
                              f"[kinds, classes, dim] nor [{prompt_kinds} x classes, dim]")
    return tensor.reshape(prompt_kinds, tensor.size(0) // prompt_kinds, tensor.size(1))


def convert_tak_state_dict(state_dict: Any, text_embeddings: Tensor | None = None
                           ) -> dict[str, Tensor]:
    """Convert an official TAK state dict (or a dict wrapping one) to :class:`TAKNet` keys.

    ``text_embeddings`` (optional): the class embeddings the official network was built with,
    ``[K C, D]`` (the authors' file) or ``[K, C, D]``; included as ``text_embeddings`` when given.
    Raises :class:`CheckpointError` listing unexpected and missing keys.
    """
    converted, unexpected = rename_state_dict(unwrap_state_dict(state_dict), KIND,
                                              official_tak_key)
    check_complete(KIND, unexpected,
                   [key for key in _expected_keys(converted) if key not in converted])
    if text_embeddings is not None:
        options = tak_model_options(converted)
        embeddings = authors_embeddings(text_embeddings.detach().float().cpu(),
                                        options["prompt_kinds"])
        if embeddings.size(0) != options["prompt_kinds"] or \
                embeddings.size(2) != options["text_dim"]:
            raise CheckpointError(
                f"text embeddings {tuple(embeddings.shape)} do not fit the checkpoint "
                f"({options['prompt_kinds']} prompt kinds of width {options['text_dim']})")
        converted["text_embeddings"] = embeddings
    return converted


def tak_model_options(converted: Mapping[str, Tensor]) -> dict[str, Any]:
    """The ``create_model("tak", ...)`` options a converted state dict needs: ``text_dim``,
    ``prompt_kinds``, ``n_filters`` and, when the embeddings are included, ``num_classes``."""
    try:
        text_dim = int(converted["text_projections.0.0.weight"].shape[1])
        embed = int(converted["text_fusion.0.weight"].shape[0])
        prompt_kinds = int(converted["text_fusion.0.weight"].shape[1]) // embed
        n_filters = int(converted["encoder.block_one.conv.0.weight"].shape[0])
    except KeyError as exc:
        raise CheckpointError(f"converted tak state dict lacks {exc}") from None
    options: dict[str, Any] = {"text_dim": text_dim, "prompt_kinds": prompt_kinds,
                               "n_filters": n_filters}
    if "text_embeddings" in converted:
        options["num_classes"] = int(converted["text_embeddings"].shape[1])
    return options


def _expected_keys(converted: Mapping[str, Tensor]) -> list[str]:
    """Keys of a TAKNet shaped like ``converted`` (built on the meta device: names only)."""
    from semiseg.models.tak import TAKNet

    try:
        options = tak_model_options(converted)
    except CheckpointError:
        options = {"text_dim": 1, "prompt_kinds": 2, "n_filters": 16}
    options.pop("num_classes", None)
    with torch.device("meta"):
        reference = TAKNet(num_classes=2, **options)
    return [k for k in reference.state_dict() if k != "text_embeddings"]


def read_text_embeddings(text_embeddings: str | Path | Tensor | None) -> Tensor | None:
    """Class text embeddings given as a tensor or as an embedding file (ours or the authors'
    ``[32, 512]`` file, :func:`semiseg.knowledge.embeddings.load_embeddings`)."""
    if isinstance(text_embeddings, (str, Path)):
        from semiseg.knowledge.embeddings import load_embeddings

        return load_embeddings(text_embeddings).tensor
    return text_embeddings
