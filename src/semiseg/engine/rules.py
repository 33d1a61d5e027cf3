"""The official missing-class rules: what a case records for a class that cannot be measured.

Default rule (``rule="galoss"``) follows the GALoss test code (``cicailalala/GALoss``
``utils/test_util.py`` ``validation_all_case`` / ``cal_metric``; facts in
commit dff0493), which TAK's AMOS test (``Lunn88/TAK-Semi``) also uses and on
which SCDL's strongest hosts (GA-CPS, GA-MagicNet) are evaluated:

* per foreground class 1..N: if both prediction and label hold the class, Dice = medpy ``dc``
  (reported here x100) and ASD = medpy ``asd(prediction, label)`` **without voxel spacing, i.e.
  in voxels** of the evaluated grid;
* class in only one of them: Dice 0, ASD 128 (HD95 128);
* class in neither: Dice 100 % (the code records ``dc = 1``), ASD 0;
* prediction with no foreground at all: every class of the case gets Dice 0 and ASD 0;
* per-class value = plain mean over cases (no nan skipping: the rule never produces nan), then
  mean over classes; the per-class spread over cases is the population std.

``rule="dhc"`` follows DHC ``code/evaluate_Ntimes.py`` and GenericSSL ``code/evaluate.py``
(xmed-lab/DHC, xmed-lab/GenericSSL): identical, except that a class absent from both
records Dice **1** on the 0-100 scale (sic, 1 %, not 100 %) and there is no special case for an
all-empty prediction. ``rule="nanskip"`` is not official: undefined values become ``nan`` and
are skipped in the means (a missed or spurious class still scores Dice 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from semiseg.utils.lookup import lookup


@dataclass(frozen=True)
class Outcome:
    """Values recorded for a class that cannot be measured (Dice in %)."""

    dice: float
    asd: float
    hd95: float


@dataclass(frozen=True)
class MissingClassRule:
    """What a case records when a class is missing from the prediction, the label or both."""

    name: str
    source: str
    missed: Outcome  # class in the label only
    spurious: Outcome  # class in the prediction only
    absent: Outcome  # class in neither
    empty_prediction: Outcome | None  # every class, when the prediction has no foreground


_PENALTY = Outcome(dice=0.0, asd=128.0, hd95=128.0)
GALOSS_RULE = MissingClassRule(
    name="galoss",
    source="GALoss utils/test_util.py validation_all_case + cal_metric",
    missed=_PENALTY,
    spurious=_PENALTY,
    absent=Outcome(dice=100.0, asd=0.0, hd95=0.0),
    empty_prediction=Outcome(dice=0.0, asd=0.0, hd95=0.0),
)
DHC_RULE = MissingClassRule(
    name="dhc",
    source="DHC code/evaluate_Ntimes.py, GenericSSL code/evaluate.py",
    missed=_PENALTY,
    spurious=_PENALTY,
    absent=Outcome(dice=1.0, asd=0.0, hd95=0.0),  # sic: 1 on the 0-100 scale
    empty_prediction=None,
)
NANSKIP_RULE = MissingClassRule(
    name="nanskip",
    source="semiseg (not official): undefined values are nan and skipped in means",
    missed=Outcome(dice=0.0, asd=math.nan, hd95=math.nan),
    spurious=Outcome(dice=0.0, asd=math.nan, hd95=math.nan),
    absent=Outcome(dice=math.nan, asd=math.nan, hd95=math.nan),
    empty_prediction=None,
)
MISSING_RULES: dict[str, MissingClassRule] = {
    rule.name: rule for rule in (GALOSS_RULE, DHC_RULE, NANSKIP_RULE)
}


def get_missing_rule(rule: str | MissingClassRule) -> MissingClassRule:
    """Return the rule called ``rule`` (``galoss``, ``dhc``, ``nanskip``) or ``rule`` itself."""
    return lookup(MISSING_RULES, rule, MissingClassRule, "missing-class rule")

