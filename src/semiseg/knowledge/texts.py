"""Textual anatomical knowledge files: one position and one shape description per class.

A knowledge file (YAML, ``format: semiseg-tak-knowledge/1``) lists, for every class id of a
dataset's class set (0 = background), the class ``name``, a ``position`` description (relations
to neighbouring organs) and a ``shape`` description, plus the ``name_template`` of the paper's
"Name" prompt (Table 5). The packaged files ``descriptions/synapse.yaml`` and
``descriptions/amos.yaml`` are hand-written; ``semiseg knowledge generate`` writes files of the
same format with a ``generation`` record and the ``dropped`` claims for review.

Prompt kinds (:data:`PROMPT_KINDS`): ``name`` (the template with the class name), ``position``
and ``shape`` (the descriptions as written).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from semiseg.data.classes import CLASS_SETS, ClassSet, get_class_set
from semiseg.errors import DataError

FORMAT = "semiseg-tak-knowledge/1"
PROMPT_KINDS: tuple[str, ...] = ("name", "position", "shape")
NAME_TEMPLATE = "A computerized tomography scan of the human abdomen includes the [CLS]"
PLACEHOLDER = "[CLS]"


@dataclass(frozen=True)
class ClassKnowledge:
    """The descriptions of one class."""

    id: int
    name: str
    position: str
    shape: str


@dataclass
class Knowledge:
    """A knowledge file in memory."""

    class_set: str
    classes: tuple[ClassKnowledge, ...]
    name_template: str = NAME_TEMPLATE
    extra: dict[str, Any] = field(default_factory=dict)  # source, review, generation, dropped
    path: Path | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.classes]

    def prompts(self, kind: str) -> list[str]:
        """The texts of prompt kind ``kind`` (name, position or shape) in class order."""
        check_kinds([kind])
        if kind == "name":
            return [self.name_template.replace(PLACEHOLDER, c.name) for c in self.classes]
        return [getattr(c, kind) for c in self.classes]

    def texts(self, kinds: Sequence[str] = PROMPT_KINDS) -> dict[str, list[str]]:
        return {kind: self.prompts(kind) for kind in kinds}

    def texts_hash(self, kinds: Sequence[str] = PROMPT_KINDS) -> str:
        """SHA-256 of the prompt texts (kinds and class order included): the cache key of the
        embeddings, so any edit of a description invalidates them."""
        payload = json.dumps({"class_set": self.class_set, "texts": self.texts(kinds)},
                             sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        """The YAML mapping (format, class_set, template, extra keys, classes)."""
        data: dict[str, Any] = {"format": FORMAT, "class_set": self.class_set,
                                "name_template": self.name_template}
        data.update(self.extra)
        data["classes"] = [{"id": c.id, "name": c.name, "position": c.position,
                            "shape": c.shape} for c in self.classes]
        return data

    def replace_classes(self, classes: Sequence[ClassKnowledge]) -> Knowledge:
        return Knowledge(self.class_set, tuple(classes), self.name_template, dict(self.extra))


def check_kinds(kinds: Sequence[str], where: str = "prompt kinds") -> tuple[str, ...]:
    """Validate a list of prompt kinds (non-empty, known, no repeats)."""
    kinds = tuple(kinds)
    unknown = [k for k in kinds if k not in PROMPT_KINDS]
    if unknown or not kinds or len(set(kinds)) != len(kinds):
        raise DataError(f"{where}: {list(kinds)} must be distinct entries of "
                        f"{list(PROMPT_KINDS)}")
    return kinds


def class_set_of(names: Sequence[str]) -> ClassSet | None:
    """The class set whose ``["background", *organs]`` equals ``names`` (case-insensitive)."""
    wanted = [n.lower() for n in names]
    for class_set in CLASS_SETS.values():
        if ["background", *class_set.names] == wanted:
            return class_set
    return None


def packaged_knowledge_path(class_set: str | ClassSet) -> Path:
    """The packaged knowledge file of ``synapse`` or ``amos``."""
    name = class_set.name if isinstance(class_set, ClassSet) else get_class_set(class_set).name
    resource = resources.files("semiseg.knowledge") / "descriptions" / f"{name}.yaml"
    return Path(str(resource))


def load_knowledge(source: str | Path | ClassSet, class_set: str | ClassSet | None = None
                   ) -> Knowledge:
    """Read a knowledge file.

    ``source`` is a path, or a class-set name (``synapse``/``amos``) for the packaged file.
    ``class_set`` (optional) is checked against the file: same class count, ids ``0..C-1`` in
    order, and the same names (background first). Raises :class:`DataError` naming the file and
    the offending key.
    """
    if isinstance(source, ClassSet) or (isinstance(source, str) and source.lower() in CLASS_SETS
                                        and not Path(source).exists()):
        path = packaged_knowledge_path(source)  # type: ignore[arg-type]
    else:
        path = Path(source)
    if not path.is_file():
        raise DataError(f"{path}: knowledge file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise DataError(f"{path}: not a readable YAML knowledge file ({exc})") from None
    knowledge = knowledge_from_dict(data, str(path))
    knowledge.path = path
    if class_set is not None:
        check_knowledge(knowledge, class_set, str(path))
    return knowledge


def knowledge_from_dict(data: Any, where: str = "knowledge") -> Knowledge:
    """Build and validate a :class:`Knowledge` from its YAML mapping."""
    if not isinstance(data, dict):
        raise DataError(f"{where}: a knowledge file must be a mapping")
    if data.get("format", FORMAT) != FORMAT:
        raise DataError(f"{where}: format {data.get('format')!r} is not {FORMAT!r}")
    class_set = data.get("class_set")
    if not isinstance(class_set, str) or not class_set:
        raise DataError(f"{where}: 'class_set' must name the class set (synapse, amos, ...)")
    template = data.get("name_template", NAME_TEMPLATE)
    if not isinstance(template, str) or PLACEHOLDER not in template:
        raise DataError(f"{where}: 'name_template' must be a string containing {PLACEHOLDER}")
    rows = data.get("classes")
    if not isinstance(rows, list) or not rows:
        raise DataError(f"{where}: 'classes' must be a non-empty list")
    classes = []
    for index, row in enumerate(rows):
        key = f"{where}: classes[{index}]"
        if not isinstance(row, dict):
            raise DataError(f"{key} must be a mapping with id, name, position, shape")
        if row.get("id") != index:
            raise DataError(f"{key}.id is {row.get('id')!r}; ids must be 0, 1, 2, ... in order "
                            "(the dataset's label ids, background first)")
        values = {}
        for name in ("name", "position", "shape"):
            value = row.get(name)
            if not isinstance(value, str) or not value.strip():
                raise DataError(f"{key}.{name} must be a non-empty string")
            values[name] = " ".join(value.split())
        classes.append(ClassKnowledge(index, values["name"], values["position"], values["shape"]))
    extra = {k: v for k, v in data.items()
             if k not in ("format", "class_set", "name_template", "classes")}
    return Knowledge(class_set, tuple(classes), template, extra)


def check_knowledge(knowledge: Knowledge, class_set: str | ClassSet, where: str = "knowledge"
                    ) -> None:
    """Check that ``knowledge`` describes exactly the classes of ``class_set``."""
    cs = class_set if isinstance(class_set, ClassSet) else get_class_set(class_set)
    expected = ["background", *cs.names]
    if [n.lower() for n in knowledge.names] != expected:
        raise DataError(f"{where}: classes {knowledge.names} do not match class set {cs.name} "
                        f"{expected}")


def write_knowledge(knowledge: Knowledge, path: str | Path, header: str = "") -> Path:
    """Write ``knowledge`` as YAML, atomically (``header``: comment lines put first)."""
    from semiseg.utils.io import atomic_write_text

    text = yaml.safe_dump(knowledge.to_dict(), sort_keys=False, width=96, allow_unicode=True)
    if header:
        text = "".join(f"# {line}\n" if line else "#\n" for line in header.splitlines()) + text
    path = Path(path)
    atomic_write_text(path, text)
    return path
