"""Load official checkpoints: rename the official state-dict keys to semiseg's module names.

Supported kinds (key tables in docs/methods/checkpoints.md; sources: GALoss
``networks/vnet.py`` and ``networks/magicnet.py``, DHC ``code/models/vnet.py``):

* ``galoss-vnet`` / ``dhc-vnet``: the UA-MT-family ``VNet`` of GALoss (GA-CPS) and DHC (same
  module names; DHC uses 32 filters). Official ``block_one`` … ``block_five`` (with their
  ``_dw`` down-samplings) become ``encoder.*``, ``block_five_up`` … ``block_nine`` become
  ``decoder.*``, ``out_conv`` stays ``out_conv``.
* ``galoss-magicnet``: MagicNet's / GA-MagicNet's ``VNet_Magic``: ``encoder.*`` and
  ``decoder.*`` keep their names except ``decoder.out_conv`` -> ``out_conv``;
  ``fc_layer.fc_layer.{0,1,3}`` -> ``location_head.{0,1,3}``.

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

KINDS = ("galoss-vnet", "dhc-vnet", "galoss-magicnet")

_ENCODER_BLOCKS = frozenset({
    "block_one", "block_one_dw", "block_two", "block_two_dw", "block_three", "block_three_dw",
    "block_four", "block_four_dw", "block_five",
})
_DECODER_BLOCKS = frozenset({
    "block_five_up", "block_six", "block_six_up", "block_seven", "block_seven_up",
    "block_eight", "block_eight_up", "block_nine",
})
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "network")
_MAGIC_HEAD = "fc_layer.fc_layer."
_OUR_HEAD = "location_head."


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise CheckpointError(f"unknown checkpoint kind {kind!r}; known: {', '.join(KINDS)}")


def official_to_semiseg_key(key: str, kind: str) -> str | None:
    """Our name for official key ``key`` (prefix-free), or None when it has no counterpart."""
    _check_kind(kind)
    if kind in ("galoss-vnet", "dhc-vnet"):
        block = key.split(".", 1)[0]
        if block in _ENCODER_BLOCKS:
            return f"encoder.{key}"
        if block in _DECODER_BLOCKS:
            return f"decoder.{key}"
        return key if block == "out_conv" and "." in key else None
    if key.startswith("decoder.out_conv."):
        return key[len("decoder."):]
    if key.startswith(_MAGIC_HEAD):
        return _OUR_HEAD + key[len(_MAGIC_HEAD):]
    head, _, rest = key.partition(".")
    block = rest.split(".", 1)[0]
    if (head == "encoder" and block in _ENCODER_BLOCKS) or (
            head == "decoder" and block in _DECODER_BLOCKS):
        return key
    return None


def semiseg_to_official_key(key: str, kind: str) -> str | None:
    """The official name of our key ``key`` (the inverse of :func:`official_to_semiseg_key`)."""
    _check_kind(kind)
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


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())


def unwrap_state_dict(checkpoint: Any, which: str | None = None) -> dict[str, Tensor]:
    """The state dict inside ``checkpoint``: itself, ``checkpoint[which]``, or the value of a
    usual wrapper key (``state_dict``, ``model``, ...)."""
    if which is not None:
        if not isinstance(checkpoint, Mapping) or which not in checkpoint:
            keys = list(checkpoint) if isinstance(checkpoint, Mapping) else []
            raise CheckpointError(f"checkpoint has no entry {which!r} (entries: {keys[:10]})")
        return unwrap_state_dict(checkpoint[which])
    if _is_state_dict(checkpoint):
        return dict(checkpoint)
    if isinstance(checkpoint, Mapping):
        for key in _WRAPPER_KEYS:
            if key in checkpoint and _is_state_dict(checkpoint[key]):
                return dict(checkpoint[key])
        nested = [k for k, v in checkpoint.items() if _is_state_dict(v)]
        if nested:
            raise CheckpointError(
                f"checkpoint holds several networks {nested}; choose one with which=..."
                " (DHC saves its two networks as 'A' and 'B')"
            )
    raise CheckpointError("checkpoint holds no state dict (expected a mapping of names to "
                          "tensors, possibly under 'state_dict' or 'model')")


def strip_wrappers(key: str) -> str:
    """``key`` without DataParallel (``module.``) and torch.compile (``_orig_mod.``) prefixes."""
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def _reference_keys(kind: str, converted: Mapping[str, Tensor]) -> list[str]:
    """The keys our network of this kind has (built on the meta device: names only)."""
    from semiseg.models.registry import create_model

    with torch.device("meta"):
        if kind == "galoss-magicnet":
            reference: nn.Module = create_model("magicnet", num_classes=2)
        else:
            # The official VNets are batch-norm; a checkpoint without BN entries was trained
            # with another normalisation and is compared against that layout.
            has_bn = any(k.endswith("running_mean") for k in converted)
            reference = create_model("vnet", num_classes=2,
                                     normalization="batchnorm" if has_bn else "none")
    return list(reference.state_dict())


def convert_official_state_dict(checkpoint: Any, kind: str,
                                which: str | None = None) -> dict[str, Tensor]:
    """Rename an official checkpoint's keys to semiseg's (see the module docstring).

    ``checkpoint`` is a state dict or a dict wrapping one; ``which`` selects an entry of a
    multi-network checkpoint (DHC: "A" or "B"). Raises :class:`CheckpointError` naming every
    unexpected key (no semiseg counterpart) and every missing key.
    """
    _check_kind(kind)
    state = unwrap_state_dict(checkpoint, which)
    converted: dict[str, Tensor] = {}
    unexpected: list[str] = []
    for key, value in state.items():
        ours = official_to_semiseg_key(strip_wrappers(key), kind)
        if ours is None:
            unexpected.append(key)
        elif ours in converted:
            raise CheckpointError(f"{kind} checkpoint: key {key!r} appears twice")
        else:
            converted[ours] = value
    expected = _reference_keys(kind, converted)
    missing = [semiseg_to_official_key(k, kind) or k for k in expected if k not in converted]
    if unexpected or missing:
        raise CheckpointError(
            f"not a {kind} checkpoint: {len(unexpected)} unexpected key(s) {unexpected[:20]}, "
            f"{len(missing)} missing key(s) {missing[:20]}"
        )
    return converted


def load_official_state_dict(network: nn.Module, checkpoint: Any, kind: str,
                             which: str | None = None) -> nn.Module:
    """Convert ``checkpoint`` and load it into ``network`` strictly (shapes included)."""
    converted = convert_official_state_dict(checkpoint, kind, which)
    try:
        network.load_state_dict(converted, strict=True)
    except RuntimeError as exc:  # shape or name mismatch: number of classes, filters, ...
        first = str(exc).strip().splitlines()
        detail = "; ".join(line.strip() for line in first[1:4]) or first[0]
        raise CheckpointError(f"{kind} checkpoint does not fit the network: {detail}") from None
    return network


def load_official_file(path: Path) -> Any:
    """The object in an official ``.pth`` file, or a :class:`CheckpointError` naming it."""
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        # Official checkpoints are plain state dicts: the safe loader suffices.
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt or foreign files
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({exc})") from None


def read_official_checkpoint(path: str | Path, kind: str,
                             which: str | None = None) -> dict[str, Tensor]:
    """Read an official ``.pth`` file and return its converted state dict."""
    path = Path(path)
    payload = load_official_file(path)
    try:
        return convert_official_state_dict(payload, kind, which)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
