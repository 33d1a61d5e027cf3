"""What every official checkpoint conversion shares: reading the file, finding the state dict
inside it, stripping wrapper prefixes, renaming its keys and reporting what did not map.

The key tables themselves are in :mod:`semiseg.models.convert` (VNet, VNet_Magic) and
:mod:`semiseg.models.convert_tak` (TAK's VNet_Magic_CLIP).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from semiseg.errors import CheckpointError

# The UA-MT-family VNet's module names, shared by every official network of the lineage.
ENCODER_BLOCKS = frozenset({
    "block_one", "block_one_dw", "block_two", "block_two_dw", "block_three", "block_three_dw",
    "block_four", "block_four_dw", "block_five",
})
DECODER_BLOCKS = frozenset({
    "block_five_up", "block_six", "block_six_up", "block_seven", "block_seven_up",
    "block_eight", "block_eight_up", "block_nine",
})
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "network")

# official key (wrappers stripped) -> (our key, reshape the tensor to 2-D), or None if unmapped
KeyMap = Callable[[str], tuple[str, bool] | None]


def is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())


def select_entry(checkpoint: Any, which: str) -> Any:
    """``checkpoint[which]``, or a :class:`CheckpointError` listing the entries there are."""
    if not isinstance(checkpoint, Mapping) or which not in checkpoint:
        keys = list(checkpoint) if isinstance(checkpoint, Mapping) else []
        raise CheckpointError(f"checkpoint has no entry {which!r} (entries: {keys[:10]})")
    return checkpoint[which]


def unwrap_state_dict(checkpoint: Any, which: str | None = None) -> dict[str, Tensor]:
    """The state dict inside ``checkpoint``: itself, ``checkpoint[which]``, or the value of a
    usual wrapper key (``state_dict``, ``model``, ...)."""
    if which is not None:
        return unwrap_state_dict(select_entry(checkpoint, which))
    if is_state_dict(checkpoint):
        return dict(checkpoint)
    if isinstance(checkpoint, Mapping):
        for key in _WRAPPER_KEYS:
            if key in checkpoint and is_state_dict(checkpoint[key]):
                return dict(checkpoint[key])
        nested = [k for k, v in checkpoint.items() if is_state_dict(v)]
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


def load_official_file(path: Path) -> Any:
    """The object in an official ``.pth`` file, or a :class:`CheckpointError` naming it."""
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        # Official checkpoints are plain state dicts: the safe loader suffices.
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt or foreign files
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({exc})") from None


def rename_state_dict(state: Mapping[str, Tensor], kind: str, key_map: KeyMap
                      ) -> tuple[dict[str, Tensor], list[str]]:
    """``state`` with our key names (1x1x1 convolutions that are ``Linear`` layers here
    reshaped to 2-D), and the official keys that map to nothing."""
    converted: dict[str, Tensor] = {}
    unexpected: list[str] = []
    for key, value in state.items():
        mapped = key_map(strip_wrappers(key))
        if mapped is None:
            unexpected.append(key)
            continue
        ours, flatten = mapped
        if ours in converted:
            raise CheckpointError(f"{kind} checkpoint: key {key!r} appears twice")
        converted[ours] = value.reshape(value.shape[0], -1) if flatten else value
    return converted, unexpected


def check_complete(kind: str, unexpected: list[str], missing: Iterable[str]) -> None:
    """A :class:`CheckpointError` naming every unexpected and missing key, if there are any."""
    missing = list(missing)
    if unexpected or missing:
        raise CheckpointError(
            f"not a {kind} checkpoint: {len(unexpected)} unexpected key(s) {unexpected[:20]}, "
            f"{len(missing)} missing key(s) {missing[:20]}")
