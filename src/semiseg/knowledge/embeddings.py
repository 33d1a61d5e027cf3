"""Class text embeddings: encode knowledge once, cache the result, load precomputed files.

An embedding file (``torch.save`` of a dict, ``format: semiseg-tak-embeddings/1``) holds

* ``embeddings``: float32 ``[K, C, D]``: K prompt kinds (``kinds``, e.g. name, position,
  shape), C classes in label order (background first), D the encoder's width;
* metadata: ``kinds``, ``encoder`` and ``model``, ``texts_hash`` (SHA-256 of the prompt texts),
  ``class_set``, ``class_names``, ``texts``, ``date`` (UTC), ``semiseg`` version.

:func:`load_embeddings` also reads the TAK authors' file (a bare ``[32, 512]`` tensor, rows
``k C + c``): it becomes ``[2, 16, 512]`` whose kinds are ``authors_kinds`` (default
``("shape", "position")``, the order of its file name ``..._shape_location.pth``; the code never
states it).

The cache (:func:`resolve_embeddings`): ``<cache dir>/<class set>-<encoder>-<hash>.pt`` with the
cache dir ``$SEMISEG_CACHE_DIR/knowledge``, else ``$XDG_CACHE_HOME/semiseg/knowledge``, else
``~/.cache/semiseg/knowledge``. The hash covers the texts of all three kinds and the encoder and
model, so editing a description or switching encoders computes a new file; a fresh machine
computes the packaged MiniLM embeddings on first use (about a second) and reuses them after.
"""

from __future__ import annotations

import datetime
import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from semiseg.errors import DataError
from semiseg.knowledge.encoders import TextEncoder, encoder_key, get_encoder
from semiseg.knowledge.texts import PROMPT_KINDS, Knowledge, check_kinds, load_knowledge

FORMAT = "semiseg-tak-embeddings/1"
AUTHORS_KINDS: tuple[str, ...] = ("shape", "position")


@dataclass
class TextEmbeddings:
    """Class text embeddings ``tensor`` ``[K, C, D]`` with their prompt ``kinds`` and metadata."""

    tensor: Tensor
    kinds: tuple[str, ...]
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.tensor.dim() != 3 or self.tensor.size(0) != len(self.kinds):
            raise DataError(f"text embeddings of shape {tuple(self.tensor.shape)} do not match "
                            f"their {len(self.kinds)} prompt kinds {list(self.kinds)}")

    @property
    def num_classes(self) -> int:
        return int(self.tensor.size(1))

    @property
    def dim(self) -> int:
        return int(self.tensor.size(2))

    def select(self, kinds: Sequence[str]) -> TextEmbeddings:
        """The embeddings of ``kinds``, in that order (the controller concatenates them so)."""
        kinds = check_kinds(kinds)
        missing = [k for k in kinds if k not in self.kinds]
        if missing:
            source = self.metadata.get("path", "the embeddings")
            raise DataError(f"{source}: no prompt kind(s) {missing}; it holds "
                            f"{list(self.kinds)}")
        index = [self.kinds.index(k) for k in kinds]
        return TextEmbeddings(self.tensor[index].clone(), kinds, dict(self.metadata))

    def to_payload(self) -> dict[str, Any]:
        return {"format": FORMAT, "embeddings": self.tensor.detach().cpu().float(),
                "kinds": list(self.kinds), **self.metadata}


def encode_knowledge(knowledge: Knowledge, encoder: TextEncoder,
                     kinds: Sequence[str] = PROMPT_KINDS) -> TextEmbeddings:
    """Embed every class's prompt of every kind: ``[K, C, D]``."""
    kinds = check_kinds(kinds)
    texts = knowledge.texts(kinds)
    rows = [encoder.encode(texts[kind]) for kind in kinds]
    tensor = torch.stack(rows)
    if not bool(torch.isfinite(tensor).all()):
        raise DataError(f"encoder {encoder.name!r} produced non-finite embeddings")
    metadata = {
        **encoder.describe(),
        "texts_hash": knowledge.texts_hash(),
        "class_set": knowledge.class_set,
        "class_names": knowledge.names,
        "texts": texts,
        "knowledge_file": str(knowledge.path) if knowledge.path else None,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "semiseg": _version(),
    }
    return TextEmbeddings(tensor, kinds, metadata)


def _version() -> str:
    from semiseg import __version__

    return str(__version__)


def save_embeddings(embeddings: TextEmbeddings, path: str | Path) -> Path:
    """Write an embedding file atomically."""
    from semiseg.utils.io import atomic_torch_save

    path = Path(path)
    payload = embeddings.to_payload()
    payload.pop("path", None)
    atomic_torch_save(payload, path)
    return path


def load_embeddings(path: str | Path, authors_kinds: Sequence[str] = AUTHORS_KINDS
                    ) -> TextEmbeddings:
    """Read an embedding file written by :func:`save_embeddings`, or the TAK authors' bare
    ``[K C, D]`` tensor (K = ``len(authors_kinds)``)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: embedding file not found")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt or foreign files
        raise DataError(f"{path}: not a readable embedding file ({exc})") from None
    if isinstance(payload, Tensor):
        kinds = check_kinds(authors_kinds, "authors_kinds")
        if payload.dim() != 2 or payload.size(0) % len(kinds):
            raise DataError(f"{path}: a bare tensor must be [kinds x classes, dim] with "
                            f"{len(kinds)} kinds, got {tuple(payload.shape)}")
        tensor = payload.float().reshape(len(kinds), -1, payload.size(1))
        metadata = {"encoder": "precomputed", "model": "authors' file", "path": str(path),
                    "texts_hash": _file_hash(path)}
        return TextEmbeddings(tensor, kinds, metadata)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise DataError(f"{path}: neither a {FORMAT} file nor a bare [kinds x classes, dim] "
                        "tensor")
    tensor = payload.get("embeddings")
    kinds = payload.get("kinds")
    if not isinstance(tensor, Tensor) or not isinstance(kinds, list):
        raise DataError(f"{path}: 'embeddings' (tensor) or 'kinds' (list) missing")
    metadata = {k: v for k, v in payload.items() if k not in ("format", "embeddings", "kinds")}
    metadata["path"] = str(path)
    return TextEmbeddings(tensor.float(), tuple(check_kinds(kinds, f"{path}: kinds")), metadata)


def _file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def default_cache_dir() -> Path:
    """``$SEMISEG_CACHE_DIR/knowledge``, ``$XDG_CACHE_HOME/semiseg/knowledge`` or
    ``~/.cache/semiseg/knowledge``."""
    if os.environ.get("SEMISEG_CACHE_DIR"):
        return Path(os.environ["SEMISEG_CACHE_DIR"]).expanduser() / "knowledge"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "semiseg" / "knowledge"


def cache_path(knowledge: Knowledge, encoder: str, model: str | None = None,
               cache_dir: str | Path | None = None) -> Path:
    """Where the embeddings of ``knowledge`` under (``encoder``, ``model``) are cached."""
    key = encoder_key(encoder, model)
    digest = hashlib.sha256(f"{knowledge.texts_hash()}|{key}".encode()).hexdigest()[:16]
    directory = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    return directory / f"{knowledge.class_set}-{encoder}-{digest}.pt"


def cached_embeddings(knowledge: Knowledge, encoder: str = "minilm", model: str | None = None,
                      cache_dir: str | Path | None = None, device: str = "cpu",
                      refresh: bool = False) -> tuple[TextEmbeddings, Path]:
    """All three prompt kinds of ``knowledge`` encoded with ``encoder``: read from the cache,
    or computed and written there (atomically). Returns the embeddings and the cache file."""
    path = cache_path(knowledge, encoder, model, cache_dir)
    if path.is_file() and not refresh:
        try:
            found = load_embeddings(path)
        except DataError:
            found = None  # unreadable (interrupted copy, old format): recompute below
        if found is not None and found.metadata.get("texts_hash") == knowledge.texts_hash() \
                and set(found.kinds) == set(PROMPT_KINDS):
            return found, path
    computed = encode_knowledge(knowledge, get_encoder(encoder, model, device), PROMPT_KINDS)
    save_embeddings(computed, path)
    computed.metadata["path"] = str(path)
    return computed, path


def resolve_embeddings(class_set: str, kinds: Sequence[str], encoder: str = "minilm",
                       model: str | None = None, knowledge: str | Path | None = None,
                       embeddings: str | Path | None = None,
                       authors_kinds: Sequence[str] = AUTHORS_KINDS,
                       cache_dir: str | Path | None = None, device: str = "cpu"
                       ) -> TextEmbeddings:
    """The ``[len(kinds), C, D]`` class embeddings a TAK run uses.

    ``embeddings`` (a precomputed file) wins; otherwise ``knowledge`` (a YAML file, default the
    packaged one of ``class_set``) is encoded with ``encoder``/``model`` through the cache.
    """
    if embeddings is not None:
        return load_embeddings(embeddings, authors_kinds).select(kinds)
    source = knowledge if knowledge is not None else class_set
    loaded = load_knowledge(source, class_set if knowledge is None else None)
    found, _ = cached_embeddings(loaded, encoder, model, cache_dir, device)
    return found.select(kinds)
