"""Knowledge files: the packaged descriptions, prompts, hashing, validation, writing."""

from pathlib import Path

import pytest
import yaml

from semiseg.data.classes import AMOS, SYNAPSE
from semiseg.errors import DataError
from semiseg.knowledge.texts import (
    NAME_TEMPLATE,
    check_kinds,
    class_set_of,
    load_knowledge,
    packaged_knowledge_path,
    write_knowledge,
)


@pytest.mark.parametrize("class_set", [SYNAPSE, AMOS])
def test_packaged_files_cover_every_class(class_set) -> None:
    knowledge = load_knowledge(class_set.name, class_set.name)
    assert knowledge.class_set == class_set.name
    assert knowledge.names == ["background", *class_set.names]
    assert [c.id for c in knowledge.classes] == list(range(class_set.num_classes))
    for entry in knowledge.classes:
        for text in (entry.position, entry.shape):
            sentences = [s for s in text.replace("e.g.", "eg").split(". ") if s]
            assert 1 <= len(sentences) <= 3, (entry.name, text)
            assert 40 <= len(text) <= 500
        if entry.id:  # organ descriptions name the organ (they include the "Name" information)
            first = entry.name.split("/")[0].split()[-1].rstrip("s")
            assert first in entry.position.lower() and first in entry.shape.lower(), entry.name
    assert knowledge.name_template == NAME_TEMPLATE
    assert packaged_knowledge_path(class_set.name).is_file()


def test_prompts_of_each_kind() -> None:
    knowledge = load_knowledge("amos")
    names = knowledge.prompts("name")
    assert names[1] == "A computerized tomography scan of the human abdomen includes the spleen"
    assert names[15].endswith("includes the prostate/uterus")
    assert knowledge.prompts("position")[6].startswith("The liver")
    assert len(knowledge.prompts("shape")) == 16
    with pytest.raises(DataError, match="prompt kinds"):
        knowledge.prompts("texture")


def test_class_set_of_names() -> None:
    assert class_set_of(["background", *SYNAPSE.names]) is SYNAPSE
    assert class_set_of(["Background", *[n.upper() for n in AMOS.names]]) is AMOS
    assert class_set_of(["background", "liver"]) is None


def test_hash_follows_the_texts(tmp_path: Path) -> None:
    knowledge = load_knowledge("synapse")
    digest = knowledge.texts_hash()
    assert digest == load_knowledge("synapse").texts_hash()
    data = yaml.safe_load(packaged_knowledge_path("synapse").read_text())
    data["classes"][3]["shape"] += " Edited."
    edited = tmp_path / "edited.yaml"
    edited.write_text(yaml.safe_dump(data))
    assert load_knowledge(edited, "synapse").texts_hash() != digest


def test_write_round_trip(tmp_path: Path) -> None:
    knowledge = load_knowledge("amos")
    knowledge.extra["dropped"] = [{"id": 3, "claim": "x"}]
    path = write_knowledge(knowledge, tmp_path / "out.yaml", header="line one\nline two")
    text = path.read_text()
    assert text.startswith("# line one\n# line two\n")
    again = load_knowledge(path, "amos")
    assert again.classes == knowledge.classes and again.extra["dropped"] == [{"id": 3,
                                                                             "claim": "x"}]
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize(("edit", "message"), [
    (lambda d: d["classes"][2].update(id=5), r"classes\[2\].id is 5"),
    (lambda d: d["classes"][4].pop("shape"), r"classes\[4\].shape must be a non-empty string"),
    (lambda d: d.update(name_template="no placeholder"), "name_template"),
    (lambda d: d.update(classes=[]), "'classes' must be a non-empty list"),
    (lambda d: d.update(format="other/2"), "format"),
])
def test_bad_files_name_the_key(tmp_path: Path, edit, message: str) -> None:
    data = yaml.safe_load(packaged_knowledge_path("synapse").read_text())
    edit(data)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(DataError, match=message) as info:
        load_knowledge(path)
    assert str(path) in str(info.value)


def test_wrong_class_set_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="do not match class set amos"):
        load_knowledge(packaged_knowledge_path("synapse"), "amos")
    with pytest.raises(DataError, match="not found"):
        load_knowledge(tmp_path / "none.yaml")
    with pytest.raises(DataError, match="distinct"):
        check_kinds(["shape", "shape"])
