"""The semiseg networks that converted official SCDL checkpoints load into
(``semiseg convert-checkpoint --from scdl-...``, :mod:`semiseg.models.convert_scdl`).

``official_scdl_network("scdl-synapse-magicnet")`` is the official Synapse inference network
(``VNetWithPrior``): a MagicNet with the ``official_synapse_magicnet`` CDBA attached, whose
prior token of the 12^3 pooled head-input tokens is projected and added at the head. In eval
mode it computes the official network's logits. The other kinds are plain networks
(``magicnet`` for AMOS MagicNet, ``vnet`` for either CPS network).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from semiseg.config import validate_options
from semiseg.errors import CheckpointError
from semiseg.models import create_model
from semiseg.models.convert_scdl import SCDL_KINDS, SYNAPSE_MAGICNET
from semiseg.plugins.scdl.cdba import CDBA, CDBAInjector
from semiseg.plugins.scdl.options import SCDLOptions, apply_preset, check_options

PRESET = "official_synapse_magicnet"


def official_scdl_network(kind: str, num_classes: int = 14, n_filters: int = 16,
                          cube_size: int = 32, patch_size: int | Sequence[int] = 96,
                          embedding_dim: int = 256) -> nn.Module:
    """The network a converted ``kind`` state dict loads into strictly (official defaults:
    14 Synapse classes, 16 filters, 32^3 cubes in 96^3 crops, z = 256; AMOS has 16 classes).

    ``scdl-synapse-magicnet``: ``magicnet`` + :class:`CDBAInjector` of a :class:`CDBA` with the
    ``official_synapse_magicnet`` preset (embedding width ``embedding_dim``).
    """
    if kind not in SCDL_KINDS:
        raise CheckpointError(f"not an SCDL checkpoint kind: {kind!r}; known: "
                              f"{', '.join(SCDL_KINDS)}")
    if kind.endswith("-cps"):
        return create_model("vnet", num_classes, n_filters=n_filters)
    network = create_model("magicnet", num_classes, n_filters=n_filters, cube_size=cube_size,
                           patch_size=patch_size)
    if kind == SYNAPSE_MAGICNET:
        where = f"{kind} SCDL options"
        options = validate_options(
            SCDLOptions, apply_preset({"preset": PRESET, "embedding_dim": embedding_dim}, where),
            where)
        check_options(options, where)
        cdba = CDBA(network.bottleneck_channels, network.decoder_stage_channels, num_classes,
                    options)
        network.attach_injector(CDBAInjector(cdba))
    return network
