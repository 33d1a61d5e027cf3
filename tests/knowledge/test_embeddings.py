"""Embedding files, the cache, the authors' file and the packaged MiniLM encoder."""

from pathlib import Path

import pytest
import torch

from semiseg.errors import DataError
from semiseg.knowledge import embeddings as emb_module
from semiseg.knowledge.embeddings import (
    TextEmbeddings,
    cache_path,
    cached_embeddings,
    default_cache_dir,
    encode_knowledge,
    load_embeddings,
    resolve_embeddings,
    save_embeddings,
)
from semiseg.knowledge.encoders import TextEncoder, get_encoder
from semiseg.knowledge.texts import load_knowledge

SHARED = Path(__file__).resolve().parents[2] / "../shared/data"
AUTHORS_FILE = SHARED / "tak-embeddings/amos_embedding_shape_location.pth"


def _fake_encoder(calls: list[int] | None = None, dim: int = 8) -> TextEncoder:
    """Deterministic 'encoder': the text's length and character sums, so equal texts give
    equal rows."""

    def encode(texts: list[str]) -> torch.Tensor:
        if calls is not None:
            calls.append(len(texts))
        rows = [[len(t) % (k + 3) + sum(map(ord, t)) % (k + 5) for k in range(dim)]
                for t in texts]
        return torch.tensor(rows, dtype=torch.float32)

    return TextEncoder("fake", "fake-model", encode)


def test_encode_save_load_select(tmp_path: Path) -> None:
    knowledge = load_knowledge("synapse")
    found = encode_knowledge(knowledge, _fake_encoder())
    assert found.tensor.shape == (3, 14, 8) and found.kinds == ("name", "position", "shape")
    assert found.metadata["texts_hash"] == knowledge.texts_hash()
    assert found.metadata["class_set"] == "synapse" and found.metadata["encoder"] == "fake"
    assert found.metadata["texts"]["shape"][6] == knowledge.classes[6].shape
    path = save_embeddings(found, tmp_path / "e.pt")
    loaded = load_embeddings(path)
    assert torch.equal(loaded.tensor, found.tensor) and loaded.kinds == found.kinds
    assert loaded.metadata["date"] == found.metadata["date"]
    picked = loaded.select(["shape", "position"])
    assert torch.equal(picked.tensor[0], found.tensor[2])
    assert torch.equal(picked.tensor[1], found.tensor[1])
    with pytest.raises(DataError, match=r"no prompt kind\(s\) \['name'\]"):
        picked.select(["name"])


def test_cache_computes_once_and_follows_edits(tmp_path: Path, monkeypatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(emb_module, "get_encoder", lambda *a, **k: _fake_encoder(calls))
    knowledge = load_knowledge("amos")
    first, path = cached_embeddings(knowledge, "minilm", cache_dir=tmp_path)
    assert path.parent == tmp_path and path.name.startswith("amos-minilm-")
    assert calls == [16, 16, 16]
    again, path2 = cached_embeddings(knowledge, "minilm", cache_dir=tmp_path)
    assert path2 == path and calls == [16, 16, 16]  # read back, not recomputed
    assert torch.equal(again.tensor, first.tensor)
    # Another encoder, or edited text, is another file.
    assert cache_path(knowledge, "clip", cache_dir=tmp_path) != path
    edited = knowledge.replace_classes([*knowledge.classes[:-1],
                                        knowledge.classes[-1].__class__(15, "prostate/uterus",
                                                                        "changed.", "changed.")])
    assert cache_path(edited, "minilm", cache_dir=tmp_path) != path
    # A corrupt cache file is recomputed, not trusted.
    path.write_bytes(b"garbage")
    cached_embeddings(knowledge, "minilm", cache_dir=tmp_path)
    assert len(calls) == 6 and load_embeddings(path).tensor.shape == (3, 16, 8)


def test_resolve_selects_prompts_and_prefers_a_file(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(emb_module, "get_encoder", lambda *a, **k: _fake_encoder())
    got = resolve_embeddings("synapse", ["position", "shape"], cache_dir=tmp_path)
    assert got.tensor.shape == (2, 14, 8) and got.kinds == ("position", "shape")
    bare = tmp_path / "bare.pth"
    torch.save(torch.arange(4 * 3 * 2, dtype=torch.float32).reshape(4 * 3, 2), bare)
    loaded = resolve_embeddings("synapse", ["position"], embeddings=bare,
                                authors_kinds=("shape", "position"))
    # rows 6..11 of the flat file are the second kind ("position").
    assert torch.equal(loaded.tensor[0], torch.arange(12, 24, dtype=torch.float32).view(6, 2))


def test_default_cache_dir(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SEMISEG_CACHE_DIR", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c" / "knowledge"
    monkeypatch.delenv("SEMISEG_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert default_cache_dir() == tmp_path / "x" / "semiseg" / "knowledge"


def test_bad_embedding_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        load_embeddings(tmp_path / "none.pt")
    (tmp_path / "junk.pt").write_bytes(b"not torch")
    with pytest.raises(DataError, match="not a readable"):
        load_embeddings(tmp_path / "junk.pt")
    torch.save(torch.zeros(5, 3), tmp_path / "odd.pt")
    with pytest.raises(DataError, match=r"\[kinds x classes, dim\]"):
        load_embeddings(tmp_path / "odd.pt")
    torch.save({"format": "other"}, tmp_path / "dict.pt")
    with pytest.raises(DataError, match="neither"):
        load_embeddings(tmp_path / "dict.pt")
    with pytest.raises(DataError, match="prompt kinds"):
        TextEmbeddings(torch.zeros(2, 3, 4), ("shape",))


@pytest.mark.skipif(not AUTHORS_FILE.is_file(),
                    reason=f"reference data {SHARED} absent (the TAK authors' embedding file)")
def test_the_authors_embedding_file() -> None:
    found = load_embeddings(AUTHORS_FILE)
    assert found.tensor.shape == (2, 16, 512) and found.kinds == ("shape", "position")
    raw = torch.load(AUTHORS_FILE, map_location="cpu", weights_only=True)
    assert torch.equal(found.tensor.reshape(32, 512), raw.float())
    norms = found.tensor.norm(dim=-1)
    assert norms.min() > 3.6 and norms.max() < 5.7  # not L2-normalised (as documented)
    picked = found.select(["position", "shape"])
    assert torch.equal(picked.tensor[0], raw[16:32].float())


def test_packaged_minilm_encoder() -> None:
    """The real offline encoder (a few seconds: loads all-MiniLM-L6-v2 from the package)."""
    encoder = get_encoder("minilm")
    texts = ["The liver lies in the right upper quadrant below the diaphragm.",
             "The liver is located in the upper right abdomen under the diaphragm.",
             "The urinary bladder lies in the pelvis behind the pubic symphysis."]
    vectors = encoder.encode(texts)
    assert vectors.shape == (3, 384) and vectors.dtype == torch.float32
    assert torch.allclose(vectors.norm(dim=1), torch.ones(3), atol=1e-5)  # its Normalize step
    similar, unrelated = vectors[0] @ vectors[1], vectors[0] @ vectors[2]
    assert similar > 0.8 and unrelated < similar - 0.3
    assert torch.equal(encoder.encode(texts[:1]), vectors[:1]) or torch.allclose(
        encoder.encode(texts[:1]), vectors[:1], atol=1e-5)
    assert encoder.describe()["pooling"] == "mean"
