"""What the hosts' supervised terms on labeled crops share: the choice of losses and the GA
constants.

* ``dice_ce``: DHC's ``train_fully.py`` / ``train_cps.py`` (batch soft Dice without background
  + CE, :func:`semiseg.losses.segmentation.dice_ce_loss`), one term ``dice_ce``;
* ``ga``: the GA hosts (GACE over the top-k % hardest voxels + GADice,
  :mod:`semiseg.losses.ga`), two terms ``ce`` and ``dice``.

Each host computes its terms itself: the order in which a method builds the softmax and the
cross entropy decides in which order autograd sums their gradients at the logits, and so the
last bits of every update, which must stay as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

SupervisedLoss = Literal["dice_ce", "ga"]


@dataclass
class GAOptions:
    """The GA losses' constants, part of the options of every host that can use them."""

    ga_k: float = 10.0  # GACE top-k % of the supervised terms (GALoss: 10)
    ga_gamma: float = 0.5  # GACE γ (GALoss: 0.5)
