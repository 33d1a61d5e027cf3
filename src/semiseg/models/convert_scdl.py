"""Official SCDL checkpoints (``Zyh55555/SCDL``): what differs from GALoss's VNet / VNet_Magic.

The kinds and what the official *inference* networks compute (``inference_*.py``):

* ``scdl-synapse-magicnet``: ``VNetWithPrior`` = SCDL's ``VNet_Magic`` (``networks/magicnet.py``)
  + the ``SCDL`` module (``networks/SCDL.py``, the scripts' ``eprl``): the decoder runs without
  priors, its last feature is pooled to 12^3 tokens, the module's prior token is projected by
  ``prior_to_feat`` (1x1x1, 256 -> 16), resized and added to the head's input. semiseg: a
  ``magicnet`` with the ``official_synapse_magicnet`` CDBA attached at the head stage
  (:func:`semiseg.plugins.scdl.official.official_scdl_network` builds it).
* ``scdl-amos-magicnet``: ``VNet_Magic_SCDL_Prior5`` tested with ``prior=None``: a plain
  MagicNet (``magicnet``).
* ``scdl-synapse-cps`` / ``scdl-amos-cps``: GALoss's ``VNet`` (``vnet``), one file per network
  (``_A.pth`` / ``_B.pth``; the test averages the two networks' logits).

Key map on top of ``galoss-magicnet`` / ``galoss-vnet`` (:mod:`semiseg.models.convert`):

=====================================  ===================================================
official                               semiseg
=====================================  ===================================================
``prior_to_feat.weight``               ``injector.cdba.projections.5.weight``
SCDL ``encoder.{0,3,6}.*``             ``injector.cdba.projector.{0,3,6}.*``
SCDL ``proxies[:, :z]`` / ``[:, z:]``  ``injector.cdba.proxy_mean`` / ``.proxy_rho``
SCDL ``sigma_emb`` ``[1, 1, 1, z]``    ``injector.cdba.noise_scale`` ``[z]``
``decoder.p{12,24,48,96}.weight``      dropped (the decoder runs with ``prior_map=None``)
``x4_to_xdim.weight``                  dropped (never called)
``prior_proj5.weight`` (AMOS)          dropped (the test network runs with ``prior=None``)
=====================================  ===================================================

(``proxy_rho`` is the official sigma parametrisation, ``sigma = softplus(rho)``.)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from semiseg.errors import CheckpointError
from semiseg.models.official_state import (
    is_state_dict,
    select_entry,
    strip_wrappers,
    unwrap_state_dict,
)
from semiseg.models.vnet import HEAD_STAGE

SYNAPSE_MAGICNET = "scdl-synapse-magicnet"
# Each SCDL kind converts like this base kind, plus the SCDL entries below.
BASE_KINDS: dict[str, str] = {
    SYNAPSE_MAGICNET: "galoss-magicnet",
    "scdl-amos-magicnet": "galoss-magicnet",
    "scdl-synapse-cps": "galoss-vnet",
    "scdl-amos-cps": "galoss-vnet",
}
SCDL_KINDS = tuple(BASE_KINDS)

_DECODER_PRIORS = tuple(f"decoder.p{size}.weight" for size in (12, 24, 48, 96))
# Official keys of modules the official inference network never calls (dropped if present).
DROPPED: dict[str, frozenset[str]] = {
    SYNAPSE_MAGICNET: frozenset({*_DECODER_PRIORS, "x4_to_xdim.weight"}),
    "scdl-amos-magicnet": frozenset({*_DECODER_PRIORS, "prior_proj5.weight"}),
}

CDBA_PREFIX = "injector.cdba."
_PRIOR_TO_FEAT = "prior_to_feat.weight"
_HEAD_PROJECTION = f"{CDBA_PREFIX}projections.{HEAD_STAGE}.weight"
_MLP_LAYERS = ("0", "3", "6")  # Linear layers of Linear-ReLU-Dropout-Linear-ReLU-Dropout-Linear
# The SCDL module's entries under the name an error reports them with.
SCDL_ENTRY = "eprl."
# Our key -> its official name, for the CDBA entries of a scdl-synapse-magicnet state dict.
CDBA_OFFICIAL_NAMES: dict[str, str] = {
    f"{CDBA_PREFIX}proxy_mean": f"{SCDL_ENTRY}proxies",
    f"{CDBA_PREFIX}proxy_rho": f"{SCDL_ENTRY}proxies",
    f"{CDBA_PREFIX}noise_scale": f"{SCDL_ENTRY}sigma_emb",
    **{f"{CDBA_PREFIX}projector.{layer}.{param}": f"{SCDL_ENTRY}encoder.{layer}.{param}"
       for layer in _MLP_LAYERS for param in ("weight", "bias")},
    _HEAD_PROJECTION: _PRIOR_TO_FEAT,
}
# Where the combined official checkpoint keeps the SCDL module (the code says ``eprl``, the
# README ``scdl``).
_SCDL_ENTRIES = ("eprl", "scdl")


def scdl_network_key(key: str, kind: str) -> str | None:
    """Our name of a network key (prefix-free) that only SCDL's VNet_Magic has, or None."""
    return _HEAD_PROJECTION if kind == SYNAPSE_MAGICNET and key == _PRIOR_TO_FEAT else None


def without_dropped(state: Mapping[str, Tensor], kind: str) -> dict[str, Tensor]:
    """``state`` without the entries :data:`DROPPED` names for ``kind``."""
    dropped = DROPPED.get(kind, frozenset())
    return {k: v for k, v in state.items() if strip_wrappers(k) not in dropped}


def _scdl_state(eprl: Any) -> dict[str, Tensor]:
    if isinstance(eprl, Mapping) and not is_state_dict(eprl):
        for entry in _SCDL_ENTRIES:
            if is_state_dict(eprl.get(entry)):
                return dict(eprl[entry])
    return unwrap_state_dict(eprl)


def split_synapse_checkpoint(checkpoint: Any, which: str | None = None, eprl: Any = None
                             ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """``(network state, SCDL module state)`` of an official Synapse MagicNet checkpoint (its
    entry ``which``, when given): the combined ``{"model": ..., "eprl": ...}`` dict, or the
    network alone with the module given as ``eprl`` (a state dict or a dict wrapping one: the
    official ``--eprl_path`` file)."""
    if which is not None:
        checkpoint = select_entry(checkpoint, which)
    if isinstance(checkpoint, Mapping) and not is_state_dict(checkpoint):
        entries = [e for e in _SCDL_ENTRIES if is_state_dict(checkpoint.get(e))]
        if entries:
            if eprl is not None:
                raise CheckpointError(
                    f"the checkpoint holds the SCDL module already (entry {entries[0]!r}); "
                    "leave out the separate SCDL state (eprl / --eprl)")
            if "model" not in checkpoint:
                raise CheckpointError(f"the checkpoint has the SCDL module ({entries[0]!r}) but "
                                      f"no 'model' entry (entries: {list(checkpoint)[:10]})")
            return unwrap_state_dict(checkpoint["model"]), dict(checkpoint[entries[0]])
    network = unwrap_state_dict(checkpoint)
    if eprl is None:
        raise CheckpointError(
            f"{SYNAPSE_MAGICNET}: the checkpoint holds the network only; pass the SCDL module's "
            "state too (eprl=..., --eprl FILE: the official script's --eprl_path)")
    return network, _scdl_state(eprl)


def convert_scdl_module(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """The official ``SCDL`` module's entries under our CDBA keys, and the keys that map to
    nothing (named ``eprl.<key>``)."""
    converted: dict[str, Tensor] = {}
    unexpected: list[str] = []
    for original, value in state.items():
        key = strip_wrappers(original)
        layer, _, param = key.removeprefix("encoder.").partition(".")
        if key == "proxies":
            if value.dim() != 2 or value.size(1) % 2:
                raise CheckpointError(f"SCDL proxies of shape {tuple(value.shape)} are not a "
                                      "[classes, 2 x z] table of means and sigmas")
            z = value.size(1) // 2
            entries = {"proxy_mean": value[:, :z].contiguous(),
                       "proxy_rho": value[:, z:].contiguous()}
        elif key == "sigma_emb":
            entries = {"noise_scale": value.reshape(-1)}
        elif key.startswith("encoder.") and layer in _MLP_LAYERS and param in ("weight", "bias"):
            entries = {f"projector.{layer}.{param}": value}
        else:
            unexpected.append(SCDL_ENTRY + original)
            continue
        for name, tensor in entries.items():
            if CDBA_PREFIX + name in converted:
                raise CheckpointError(f"SCDL module: key {original!r} appears twice")
            converted[CDBA_PREFIX + name] = tensor
    return converted, unexpected
