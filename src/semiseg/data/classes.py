"""The class sets of Synapse (BTCV) and AMOS, described once.

Tables, knowledge texts, label maps and the phantom all read these descriptions. Label ids
follow each dataset's own label order (background is 0). The large/small grouping is the one
of the TAK paper, section 4.3: a class is *large* when it holds more than 5 % of the organ
voxels of the dataset (Synapse: Li, St, Sp, LK, RK; AMOS: those and Bl).
"""

from __future__ import annotations

from dataclasses import dataclass

from semiseg.errors import ConfigError


@dataclass(frozen=True)
class OrganClass:
    """One foreground class of a dataset."""

    label: int
    name: str
    abbreviation: str
    large: bool

    @property
    def group(self) -> str:
        return "large" if self.large else "small"


@dataclass(frozen=True)
class ClassSet:
    """A dataset's label set: background (0) plus ``organs`` in label order."""

    name: str
    organs: tuple[OrganClass, ...]

    def __post_init__(self) -> None:
        labels = [organ.label for organ in self.organs]
        if labels != list(range(1, len(labels) + 1)):
            raise ValueError(f"class set {self.name}: labels must be 1..N in order, got {labels}")

    @property
    def num_classes(self) -> int:
        """Number of output channels, background included."""
        return len(self.organs) + 1

    @property
    def names(self) -> list[str]:
        return [organ.name for organ in self.organs]

    @property
    def abbreviations(self) -> list[str]:
        return [organ.abbreviation for organ in self.organs]

    @property
    def large_labels(self) -> list[int]:
        return [organ.label for organ in self.organs if organ.large]

    @property
    def small_labels(self) -> list[int]:
        return [organ.label for organ in self.organs if not organ.large]

    def organ(self, key: int | str) -> OrganClass:
        """Look an organ up by label id, name or abbreviation."""
        for organ in self.organs:
            if key in (organ.label, organ.name, organ.abbreviation):
                return organ
        raise KeyError(f"class set {self.name} has no class {key!r}")


def _organs(rows: list[tuple[str, str, bool]]) -> tuple[OrganClass, ...]:
    return tuple(
        OrganClass(label=i, name=name, abbreviation=abbr, large=large)
        for i, (name, abbr, large) in enumerate(rows, start=1)
    )


# Data tables (the two class sets share their first rows, which a duplicate finder pairs).
SYNAPSE = ClassSet(
    name="synapse",
    organs=_organs(
        [
            ("spleen", "Sp", True),
            ("right kidney", "RK", True),
            ("left kidney", "LK", True),
            ("gallbladder", "Ga", False),
            ("esophagus", "Es", False),
            ("liver", "Li", True),
            ("stomach", "St", True),
            ("aorta", "Ao", False),
            ("inferior vena cava", "IVC", False),
            ("portal and splenic veins", "PSV", False),
            ("pancreas", "PA", False),
            ("right adrenal gland", "RAG", False),
            ("left adrenal gland", "LAG", False),
        ]
    ),
)

AMOS = ClassSet(
    name="amos",
    organs=_organs(
        [
            ("spleen", "Sp", True),
            ("right kidney", "RK", True),
            ("left kidney", "LK", True),
            ("gallbladder", "Ga", False),
            ("esophagus", "Es", False),
            ("liver", "Li", True),
            ("stomach", "St", True),
            ("aorta", "Ao", False),
            ("inferior vena cava", "IVC", False),
            ("pancreas", "PA", False),
            ("right adrenal gland", "RAG", False),
            ("left adrenal gland", "LAG", False),
            ("duodenum", "Du", False),
            ("bladder", "Bl", True),
            ("prostate/uterus", "P/U", False),
        ]
    ),
)

CLASS_SETS: dict[str, ClassSet] = {SYNAPSE.name: SYNAPSE, AMOS.name: AMOS}


def get_class_set(name: str) -> ClassSet:
    """Return the class set called ``name`` (``synapse`` or ``amos``)."""
    try:
        return CLASS_SETS[name.lower()]
    except KeyError:
        raise ConfigError(
            f"unknown class set {name!r}; known: {', '.join(sorted(CLASS_SETS))}"
        ) from None
