"""The two-agent knowledge generator against a fake OpenAI-compatible server on 127.0.0.1."""

import argparse
import base64
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import yaml

from semiseg.data.classes import SYNAPSE
from semiseg.data.writer import CaseWriter
from semiseg.knowledge.cli import add_cli
from semiseg.knowledge.generator import (
    ChatClient,
    GenerationSettings,
    LabeledCase,
    LLMConfigError,
    LLMEndpoint,
    LLMError,
    generate_knowledge,
    parse_json_answer,
    render_slices,
)
from semiseg.knowledge.texts import load_knowledge

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class FakeChat:
    """Canned answers: agent 1 gets two claims per question; agent 2 marks every second claim
    inconsistent. Records every request body and header."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.headers: list[dict] = []

    def answer(self, body: dict) -> str:
        user = body["messages"][-1]["content"]
        if isinstance(user, str):  # agent 1: text only
            organ = user.split(" of the ")[-1].split(" with")[0].rstrip(".") \
                if "positional" in user else user.split(" of the ")[-1].rstrip(".")
            return json.dumps({"claims": [f"The {organ} claim one.", f"The {organ} claim two."]})
        listing = next(p["text"] for p in user if p["type"] == "text")
        count = sum(1 for line in listing.splitlines() if line[:1].isdigit())
        verdicts = [{"claim": i, "consistent": i % 2 == 1, "checkable": True,
                     "reason": f"reason {i}"} for i in range(1, count + 1)]
        return "Here you go:\n```json\n" + json.dumps({"verdicts": verdicts}) + "\n```"


@pytest.fixture
def server() -> Iterator[tuple[str, FakeChat]]:
    chat = FakeChat()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # http.server's method name
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            chat.requests.append({"path": self.path, **body})
            chat.headers.append(dict(self.headers))
            if self.path != "/v1/chat/completions":
                self.send_response(404)
                self.end_headers()
                self.wfile.write(b"no such route")
                return
            reply = {"choices": [{"message": {"role": "assistant",
                                              "content": chat.answer(body)}}]}
            data = json.dumps(reply).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/v1", chat
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


def _case(case_id: str, organs: list[int]) -> LabeledCase:
    rng = np.random.default_rng(0)
    image = rng.normal(0, 50, (24, 24, 16)).astype(np.float32)
    label = np.zeros((24, 24, 16), np.uint8)
    for k, organ in enumerate(organs):
        label[2 + 5 * k: 6 + 5 * k, 4:12, 3:9] = organ
    return LabeledCase(case_id, image, label)


def test_endpoint_settings_and_missing_ones() -> None:
    env = {"OPENAI_BASE_URL": "http://x/v1/", "SEMISEG_LLM_MODEL": "m", "OPENAI_API_KEY": "k"}
    endpoint = LLMEndpoint.from_options(environ=env)
    assert (endpoint.base_url, endpoint.model, endpoint.api_key) == ("http://x/v1", "m", "k")
    assert LLMEndpoint.from_options(model="override", environ=env).model == "override"
    with pytest.raises(LLMConfigError) as info:
        LLMEndpoint.from_options(environ={"OPENAI_MODEL": "gpt-4o"})
    message = str(info.value)
    for name in ("SEMISEG_LLM_BASE_URL", "OPENAI_BASE_URL", "SEMISEG_LLM_API_KEY",
                 "OPENAI_API_KEY", "--base-url", "--api-key"):
        assert name in message
    assert "SEMISEG_LLM_MODEL" not in message  # the model was given


def test_parse_json_answer() -> None:
    assert parse_json_answer('{"claims": ["a"]}', "claims", "x") == ["a"]
    assert parse_json_answer('Sure!\n```json\n{"claims": [1]}\n```', "claims", "x") == [1]
    assert parse_json_answer('prefix {"claims": []} suffix', "claims", "x") == []
    with pytest.raises(LLMError, match="no JSON object with 'claims'"):
        parse_json_answer("I cannot help", "claims", "draft of liver")


def test_render_slices_draws_pngs_through_the_organ() -> None:
    case = _case("c1", [6, 1])
    names = ["background", *SYNAPSE.names]
    pictures = render_slices(case, 6, names)
    assert len(pictures) == 2 and all(p.startswith(PNG_SIGNATURE) for p in pictures)
    assert render_slices(case, 3, names) == []  # absent organ


def test_two_agents_drop_inconsistent_claims(server) -> None:
    url, chat = server
    base = load_knowledge("synapse")
    cases = [_case("c1", [1, 6]), _case("c2", [6])]
    client = ChatClient(LLMEndpoint(url, "fake-gpt", "secret"))
    result = generate_knowledge(base, cases, client, GenerationSettings(), seed=5)
    # 13 organs: 2 drafts each; a verification for the two organs present in some case.
    assert len(chat.requests) == 13 * 2 + 2
    assert all(r["model"] == "fake-gpt" for r in chat.requests)
    assert all(h["Authorization"] == "Bearer secret" for h in chat.headers)
    drafts = [r for r in chat.requests if isinstance(r["messages"][-1]["content"], str)]
    assert drafts[0]["messages"][-1]["content"] == (
        "Describe the relative positional relationship of the spleen with other organs.")
    assert drafts[1]["messages"][-1]["content"] == "Describe the shape and structure of the spleen."
    assert "right kidney" in drafts[0]["messages"][0]["content"]  # all class names given
    verify = [r for r in chat.requests if not isinstance(r["messages"][-1]["content"], str)]
    images = [p for p in verify[0]["messages"][-1]["content"] if p["type"] == "image_url"]
    assert len(images) == 2  # spleen is in case c1 only: axial + coronal
    for part in images:
        url_data = part["image_url"]["url"]
        assert url_data.startswith("data:image/png;base64,")
        assert base64.b64decode(url_data.split(",", 1)[1]).startswith(PNG_SIGNATURE)
    assert len([p for p in verify[1]["messages"][-1]["content"]
                if p["type"] == "image_url"]) == 4  # liver in both cases
    # Claims 1 and 3 (position one, shape one) kept; 2 and 4 dropped.
    spleen = result.classes[1]
    assert spleen.position == "The spleen claim one." and spleen.shape == "The spleen claim one."
    dropped = result.extra["dropped"]
    assert {(d["name"], d["kind"], d["claim"]) for d in dropped} == {
        (organ, kind, f"The {organ} claim two.") for organ in ("spleen", "liver")
        for kind in ("position", "shape")}
    assert dropped[0]["reason"] == "reason 2"
    # Organs absent from the sampled cases are kept unverified.
    assert result.classes[3].position == "The left kidney claim one. The left kidney claim two."
    assert {u["name"] for u in result.extra["unverified"]} == set(SYNAPSE.names) - {"spleen",
                                                                                     "liver"}
    assert result.classes[0] == base.classes[0]  # background kept
    generation = result.extra["generation"]
    assert generation["model"] == "fake-gpt" and generation["seed"] == 5
    assert generation["endpoint"] == url + "/chat/completions"
    assert generation["cases"] == ["c1", "c2"]
    assert "positional relationship" in generation["prompts"]["position"]
    assert result.extra["review"]["status"] == "pending"


def test_http_errors_are_clear(server) -> None:
    url, _ = server
    client = ChatClient(LLMEndpoint(url.replace("/v1", "/v2"), "m", "k"))
    with pytest.raises(LLMError, match="HTTP 404"):
        client.chat([{"role": "user", "content": "hi"}])
    closed = ChatClient(LLMEndpoint("http://127.0.0.1:9/v1", "m", "k", timeout=2))
    with pytest.raises(LLMError, match="request failed"):
        closed.chat([{"role": "user", "content": "hi"}])


def _prepared_store(root: Path) -> None:
    writer = CaseWriter(root, "synapse", SYNAPSE, {"profile": "test"})
    for case_id, organs in (("0001", [1, 6]), ("0002", [6, 7]), ("0003", [2])):
        case = _case(case_id, organs)
        writer.write(case_id, case.image, case.label, (1.0, 1.0, 1.0))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="semiseg")
    add_cli(parser.add_subparsers(dest="command"))
    return parser


def test_cli_generate_writes_the_reviewed_yaml_atomically(server, tmp_path: Path,
                                                          monkeypatch) -> None:
    url, chat = server
    _prepared_store(tmp_path / "data")
    for name in ("SEMISEG_LLM_BASE_URL", "OPENAI_BASE_URL", "SEMISEG_LLM_MODEL", "OPENAI_MODEL",
                 "SEMISEG_LLM_API_KEY", "OPENAI_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SEMISEG_LLM_BASE_URL", url)
    monkeypatch.setenv("SEMISEG_LLM_MODEL", "fake-gpt")
    monkeypatch.setenv("SEMISEG_LLM_API_KEY", "k")
    out = tmp_path / "generated.yaml"
    args = _parser().parse_args(["knowledge", "generate", "--class-set", "synapse", "--data",
                                 str(tmp_path / "data"), "--out", str(out), "--num-cases", "2",
                                 "--seed", "1"])
    assert args.handler(args) == 0
    data = yaml.safe_load(out.read_text())
    assert out.read_text().startswith("# Generated by `semiseg knowledge generate`")
    assert data["format"] == "semiseg-tak-knowledge/1" and data["class_set"] == "synapse"
    assert len(data["generation"]["cases"]) == 2 and data["generation"]["model"] == "fake-gpt"
    assert data["dropped"] and all(d["claim"].endswith("claim two.") for d in data["dropped"])
    assert load_knowledge(out, "synapse").num_classes == 14
    assert any(not isinstance(r["messages"][-1]["content"], str) for r in chat.requests)
    assert not list(tmp_path.glob(".generated.yaml*"))


def test_cli_generate_without_endpoint(tmp_path: Path, monkeypatch) -> None:
    for name in ("SEMISEG_LLM_BASE_URL", "OPENAI_BASE_URL", "SEMISEG_LLM_MODEL", "OPENAI_MODEL",
                 "SEMISEG_LLM_API_KEY", "OPENAI_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    args = _parser().parse_args(["knowledge", "generate", "--class-set", "amos", "--data",
                                 str(tmp_path), "--out", str(tmp_path / "o.yaml")])
    with pytest.raises(LLMConfigError, match="SEMISEG_LLM_BASE_URL / OPENAI_BASE_URL"):
        args.handler(args)
    assert not (tmp_path / "o.yaml").exists()
