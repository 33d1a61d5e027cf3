"""``semiseg knowledge``: the subcommand tree, its help, and ``encode``."""

import argparse
from pathlib import Path

import pytest
import torch

from semiseg.knowledge import cli as knowledge_cli
from semiseg.knowledge import embeddings as emb_module
from semiseg.knowledge.embeddings import cache_path, load_embeddings
from semiseg.knowledge.encoders import TextEncoder
from semiseg.knowledge.texts import load_knowledge


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="semiseg")
    knowledge_cli.add_cli(parser.add_subparsers(dest="command"))
    return parser


def _fake_encoder(*args: object, **kwargs: object) -> TextEncoder:
    return TextEncoder("fake", "fake-model",
                       lambda texts: torch.tensor([[float(len(t)), 1.0] for t in texts]))


def test_help_describes_both_actions(capsys) -> None:
    parser = _parser()
    for action, words in (("generate", ["SEMISEG_LLM_BASE_URL", "--num-cases", "PNG"]),
                          ("encode", ["biomedclip", "minilm", "--cache-dir", "offline"])):
        with pytest.raises(SystemExit):
            parser.parse_args(["knowledge", action, "--help"])
        text = capsys.readouterr().out
        assert all(word in text for word in words), (action, text)
    with pytest.raises(SystemExit):
        parser.parse_args(["knowledge"])  # an action is required


def test_encode_to_a_file(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr("semiseg.knowledge.encoders.get_encoder", _fake_encoder)
    out = tmp_path / "amos.pt"
    args = _parser().parse_args(["knowledge", "encode", "--class-set", "amos", "--out", str(out)])
    assert args.handler(args) == 0
    found = load_embeddings(out)
    knowledge = load_knowledge("amos")
    assert found.tensor.shape == (3, 16, 2) and found.kinds == ("name", "position", "shape")
    assert found.tensor[2, 6, 0].item() == len(knowledge.classes[6].shape)
    assert found.metadata["class_set"] == "amos" and found.metadata["encoder"] == "fake"
    assert found.metadata["texts_hash"] == knowledge.texts_hash()
    assert "[3, 16, 2]" in capsys.readouterr().out


def test_encode_fills_the_training_cache(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(emb_module, "get_encoder", _fake_encoder)
    args = _parser().parse_args(["knowledge", "encode", "--class-set", "synapse",
                                 "--cache-dir", str(tmp_path)])
    assert args.handler(args) == 0
    expected = cache_path(load_knowledge("synapse"), "minilm", cache_dir=tmp_path)
    assert expected.is_file() and load_embeddings(expected).tensor.shape == (3, 14, 2)
