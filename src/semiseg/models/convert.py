"""Load official checkpoints: rename the official state-dict keys to semiseg's module names.

:func:`convert_official_state_dict` (exported as ``semiseg.models.convert_official_state_dict``)
and :func:`read_official_checkpoint` take every kind (``KINDS``); this module holds the VNet and
VNet_Magic key tables, :mod:`semiseg.models.convert_tak` TAK's. Supported kinds (key tables in
docs/methods/checkpoints.md; sources: GALoss ``networks/vnet.py`` and ``networks/magicnet.py``,
DHC ``code/models/vnet.py``, TAK-Semi ``VNet_Magic_CLIP_2p_Contrast``):

* ``galoss-vnet`` / ``dhc-vnet``: the UA-MT-family ``VNet`` of GALoss (GA-CPS) and DHC (same
  module names; DHC uses 32 filters). Official ``block_one`` … ``block_five`` (with their
  ``_dw`` down-samplings) become ``encoder.*``, ``block_five_up`` … ``block_nine`` become
  ``decoder.*``, ``out_conv`` stays ``out_conv``.
* ``galoss-magicnet``: MagicNet's / GA-MagicNet's ``VNet_Magic``: ``encoder.*`` and
  ``decoder.*`` keep their names except ``decoder.out_conv`` -> ``out_conv``;
  ``fc_layer.fc_layer.{0,1,3}`` -> ``location_head.{0,1,3}``.
* ``tak``: TAK's text-driven VNet_Magic (:mod:`semiseg.models.convert_tak`); optionally with
  the class text embeddings it was built with (``text_embeddings``).
* ``scdl-synapse-magicnet``, ``scdl-amos-magicnet``, ``scdl-synapse-cps``, ``scdl-amos-cps``:
  the official SCDL inference networks (:mod:`semiseg.models.convert_scdl`): the MagicNet or VNet
  table above plus, for Synapse MagicNet, the SCDL module (``eprl``) and its head projection.

Wrapper prefixes (``module.`` from DataParallel, ``_orig_mod.`` from ``torch.compile``) are
stripped, and a checkpoint dict that wraps the state dict (``{"state_dict": ...}``, DHC's
``{"A": ..., "B": ...}``) is unwrapped. Anything that does not map, or a module the network needs
but the file lacks, is a :class:`CheckpointError` listing the keys. Tensors are not changed:
the official layouts (ConvTranspose3d ``(in, out, k, k, k)``, Linear ``(out, in)``) are ours.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from semiseg.errors import CheckpointError
from semiseg.models.convert_scdl import (
    BASE_KINDS,
    CDBA_OFFICIAL_NAMES,
    SCDL_KINDS,
    SYNAPSE_MAGICNET,
    convert_scdl_module,
    scdl_network_key,
    split_synapse_checkpoint,
    without_dropped,
)
from semiseg.models.convert_tak import (
    convert_tak_state_dict,
    read_text_embeddings,
    tak_model_options,
)
from semiseg.models.official_state import (
    DECODER_BLOCKS,
    ENCODER_BLOCKS,
    check_complete,
    load_official_file,
    rename_state_dict,
    unwrap_state_dict,
)

KINDS = ("galoss-vnet", "dhc-vnet", "galoss-magicnet", "tak", *SCDL_KINDS)
_VNET_KINDS = ("galoss-vnet", "dhc-vnet", "galoss-magicnet", *SCDL_KINDS)
_MAGIC_HEAD = "fc_layer.fc_layer."
_OUR_HEAD = "location_head."


def _check_kind(kind: str, kinds: tuple[str, ...] = KINDS) -> None:
    if kind not in kinds:
        raise CheckpointError(f"unknown checkpoint kind {kind!r}; known: {', '.join(KINDS)}")


def official_to_semiseg_key(key: str, kind: str) -> str | None:
    """Our name for official key ``key`` (prefix-free), or None when it has no counterpart
    (VNet and VNet_Magic kinds, SCDL's by their base kind; TAK's table is
    :func:`semiseg.models.convert_tak.official_tak_key`)."""
    _check_kind(kind, _VNET_KINDS)
    kind = BASE_KINDS.get(kind, kind)
    if kind in ("galoss-vnet", "dhc-vnet"):
        block = key.split(".", 1)[0]
        if block in ENCODER_BLOCKS:
            return f"encoder.{key}"
        if block in DECODER_BLOCKS:
            return f"decoder.{key}"
        return key if block == "out_conv" and "." in key else None
    if key.startswith("decoder.out_conv."):
        return key[len("decoder."):]
    if key.startswith(_MAGIC_HEAD):
        return _OUR_HEAD + key[len(_MAGIC_HEAD):]
    head, _, rest = key.partition(".")
    block = rest.split(".", 1)[0]
    if (head == "encoder" and block in ENCODER_BLOCKS) or (
            head == "decoder" and block in DECODER_BLOCKS):
        return key
    return None


def semiseg_to_official_key(key: str, kind: str) -> str | None:
    """The official name of our key ``key`` (the inverse of :func:`official_to_semiseg_key`)."""
    _check_kind(kind, _VNET_KINDS)
    kind = BASE_KINDS.get(kind, kind)
    if kind in ("galoss-vnet", "dhc-vnet"):
        head, _, rest = key.partition(".")
        if head in ("encoder", "decoder"):
            candidate = rest
        elif head == "out_conv":
            candidate = key
        else:
            return None
    elif key.startswith("out_conv."):
        candidate = "decoder." + key
    elif key.startswith(_OUR_HEAD):
        candidate = _MAGIC_HEAD + key[len(_OUR_HEAD):]
    else:
        candidate = key
    return candidate if official_to_semiseg_key(candidate, kind) == key else None


def _reference_keys(kind: str, converted: Mapping[str, Tensor]) -> list[str]:
    """The keys our network of this kind has (built on the meta device: names only; the CDBA
    of ``scdl-synapse-magicnet`` lives in the SCDL plug-in and is listed by name)."""
    from semiseg.models.registry import create_model

    extra = list(CDBA_OFFICIAL_NAMES) if kind == SYNAPSE_MAGICNET else []
    with torch.device("meta"):
        if BASE_KINDS.get(kind, kind) == "galoss-magicnet":
            reference: nn.Module = create_model("magicnet", num_classes=2)
        else:
            # The official VNets are batch-norm; a checkpoint without BN entries was trained
            # with another normalisation and is compared against that layout.
            has_bn = any(k.endswith("running_mean") for k in converted)
            reference = create_model("vnet", num_classes=2,
                                     normalization="batchnorm" if has_bn else "none")
    return list(reference.state_dict()) + extra


def _official_name(key: str, kind: str) -> str:
    return CDBA_OFFICIAL_NAMES.get(key) or semiseg_to_official_key(key, kind) or key


def convert_official_state_dict(checkpoint: Any, kind: str, which: str | None = None,
                                text_embeddings: Tensor | None = None,
                                eprl: Any = None) -> dict[str, Tensor]:
    """Rename an official checkpoint's keys to semiseg's (see the module docstring).

    ``checkpoint`` is a state dict or a dict wrapping one; ``which`` selects an entry of a
    multi-network checkpoint (DHC, CPS: "A" or "B"); ``text_embeddings`` (``tak`` only) are
    included in the converted dict (see :func:`semiseg.models.convert_tak.
    convert_tak_state_dict`). ``scdl-synapse-magicnet`` takes the official combined
    ``{"model": ..., "eprl": ...}`` checkpoint, or the network's state with the SCDL module's
    given as ``eprl`` (a state dict or a dict wrapping one). Raises :class:`CheckpointError`
    naming every unexpected key (no semiseg counterpart) and every missing key.
    """
    _check_kind(kind)
    if kind == "tak":
        return convert_tak_state_dict(unwrap_state_dict(checkpoint, which), text_embeddings)
    if text_embeddings is not None:
        raise CheckpointError(f"text embeddings apply to tak checkpoints only, not {kind}")
    if eprl is not None and kind != SYNAPSE_MAGICNET:
        raise CheckpointError(f"a separate SCDL module (eprl) applies to {SYNAPSE_MAGICNET} "
                              f"checkpoints only, not {kind}")
    scdl: dict[str, Tensor] = {}
    unexpected: list[str] = []
    if kind == SYNAPSE_MAGICNET:
        state, module = split_synapse_checkpoint(checkpoint, which, eprl)
        scdl, unexpected = convert_scdl_module(module)
    else:
        state = unwrap_state_dict(checkpoint, which)

    def key_map(key: str) -> tuple[str, bool] | None:
        ours = official_to_semiseg_key(key, kind) or scdl_network_key(key, kind)
        return None if ours is None else (ours, False)

    converted, unexpected_network = rename_state_dict(without_dropped(state, kind), kind,
                                                      key_map)
    converted.update(scdl)
    expected = _reference_keys(kind, converted)
    missing = dict.fromkeys(_official_name(k, kind) for k in expected if k not in converted)
    check_complete(kind, unexpected_network + unexpected, missing)
    return converted


def load_official_state_dict(network: nn.Module, checkpoint: Any, kind: str,
                             which: str | None = None, eprl: Any = None) -> nn.Module:
    """Convert ``checkpoint`` and load it into ``network`` strictly (shapes included)."""
    converted = convert_official_state_dict(checkpoint, kind, which, eprl=eprl)
    try:
        network.load_state_dict(converted, strict=True)
    except RuntimeError as exc:  # shape or name mismatch: number of classes, filters, ...
        first = str(exc).strip().splitlines()
        detail = "; ".join(line.strip() for line in first[1:4]) or first[0]
        raise CheckpointError(f"{kind} checkpoint does not fit the network: {detail}") from None
    return network


def read_official_checkpoint(path: str | Path, kind: str, which: str | None = None,
                             text_embeddings: str | Path | Tensor | None = None,
                             eprl: str | Path | Mapping[str, Any] | None = None
                             ) -> dict[str, Tensor]:
    """Read an official ``.pth`` file and return its converted state dict (``tak``: with the
    embeddings of ``text_embeddings``, a tensor or an embedding file, when given;
    ``scdl-synapse-magicnet``: with the SCDL module of ``eprl``, a file or a state dict, when
    the file holds the network only)."""
    path = Path(path)
    payload = load_official_file(path)
    embeddings = read_text_embeddings(text_embeddings)
    if isinstance(eprl, (str, Path)):
        eprl = load_official_file(Path(eprl))
    try:
        return convert_official_state_dict(payload, kind, which, embeddings, eprl)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None


def converted_model(state: Mapping[str, Tensor], kind: str) -> tuple[str, dict[str, Any]]:
    """``(model name, create_model options)`` that a converted state dict of ``kind`` loads
    into (``tak``: without the text embeddings unless the dict holds them;
    ``scdl-synapse-magicnet``: the network that carries the SCDL injector, which
    :func:`semiseg.plugins.scdl.official.official_scdl_network` attaches)."""
    _check_kind(kind)
    if kind == "tak":
        return "tak", tak_model_options(state)
    head = state["out_conv.weight"]
    model = "magicnet" if BASE_KINDS.get(kind, kind) == "galoss-magicnet" else "vnet"
    return model, {"num_classes": int(head.shape[0]), "n_filters": int(head.shape[1])}
