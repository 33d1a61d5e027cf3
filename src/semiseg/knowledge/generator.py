"""The two-agent knowledge generator of TAK (section 3.2) against any OpenAI-compatible chat
endpoint, using only the standard library's HTTP client.

* **Agent 1 (drafting, text only).** It is told the names of all classes to be segmented and,
  per organ, answers the paper's templates "Describe the relative positional relationship of
  [CLS] with other organs." and "Describe the shape and structure of [CLS]." as a JSON list of
  short, self-contained claims.
* **Agent 2 (multi-modal validation).** Per organ it receives the numbered claims and PNG
  slices (axial and coronal through the organ, label outlines drawn over the CT, orientation
  letters on the edges) from randomly sampled labeled cases, and returns a verdict per claim.
  Claims judged inconsistent with the images are dropped; the kept claims form the
  description. An organ absent from every sampled case cannot be checked: its claims are kept
  and listed as unverified. A kind whose claims are all dropped keeps the base (packaged)
  description and is listed as a fallback.

The result is a knowledge file (:mod:`semiseg.knowledge.texts`) written atomically, with a
``generation`` record (endpoint, model, date, prompts, sampled cases, seed) and the ``dropped``
claims with the verifier's reasons, for a clinician to review before use
(``review.status: pending``). Background keeps the base file's descriptions.

Endpoint settings come from arguments or the environment: ``SEMISEG_LLM_BASE_URL`` /
``OPENAI_BASE_URL`` (e.g. ``https://api.openai.com/v1``), ``SEMISEG_LLM_MODEL`` /
``OPENAI_MODEL`` (e.g. ``gpt-4o``, the paper's model) and ``SEMISEG_LLM_API_KEY`` /
``OPENAI_API_KEY`` (any non-empty string for local servers that ignore it).
"""

from __future__ import annotations

import base64
import datetime
import io
import json
import os
import random
import re
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from semiseg.errors import SemisegError
from semiseg.knowledge.texts import ClassKnowledge, Knowledge, load_knowledge, write_knowledge

ENV_BASE_URL = ("SEMISEG_LLM_BASE_URL", "OPENAI_BASE_URL")
ENV_MODEL = ("SEMISEG_LLM_MODEL", "OPENAI_MODEL")
ENV_API_KEY = ("SEMISEG_LLM_API_KEY", "OPENAI_API_KEY")

POSITION_TEMPLATE = "Describe the relative positional relationship of [CLS] with other organs."
SHAPE_TEMPLATE = "Describe the shape and structure of [CLS]."
TEMPLATES = {"position": POSITION_TEMPLATE, "shape": SHAPE_TEMPLATE}

DRAFT_SYSTEM = (
    "You are an experienced abdominal radiologist writing anatomical prior knowledge for an "
    "organ segmentation model on abdominal CT. The classes to be segmented are: {names}. "
    "Answer the question about one organ with general, patient-independent anatomy that is "
    "visible on CT. Reply with JSON only, of the form {{\"claims\": [\"...\", \"...\"]}}: "
    "{min_claims} to {max_claims} short sentences, each stating one fact, each naming the organ, "
    "each understandable on its own."
)
VERIFY_SYSTEM = (
    "You are an experienced abdominal radiologist checking anatomical statements against CT "
    "images. The images are slices of labeled abdominal CT scans: each labeled organ is outlined "
    "in colour and named in the legend; the organ under review is filled. {orientation} "
    "For every numbered claim decide whether the images are consistent with it. A claim the "
    "images contradict is inconsistent. A claim the images cannot show (for example tissue "
    "texture) is consistent but not checkable. Reply with JSON only, of the form "
    "{{\"verdicts\": [{{\"claim\": 1, \"consistent\": true, \"checkable\": true, "
    "\"reason\": \"...\"}}, ...]}} with one verdict per claim."
)
ORIENTATION_RAS = (
    "Slices are shown in radiological convention: the patient's right is on the image's left "
    "(letters R and L on the edges), anterior is up in axial slices (A/P) and superior is up in "
    "coronal slices (S/I)."
)
ORIENTATION_UNKNOWN = (
    "The orientation of the slices is unknown: treat left/right and up/down statements as not "
    "checkable."
)


class LLMConfigError(SemisegError):
    """The chat endpoint, model or key is not configured."""


class LLMError(SemisegError):
    """A chat request failed or its answer could not be used."""


@dataclass(frozen=True)
class LLMEndpoint:
    """An OpenAI-compatible chat-completions endpoint."""

    base_url: str
    model: str
    api_key: str
    timeout: float = 120.0

    @classmethod
    def from_options(cls, base_url: str | None = None, model: str | None = None,
                     api_key: str | None = None, timeout: float = 120.0,
                     environ: Mapping[str, str] | None = None) -> LLMEndpoint:
        """Settings from arguments, else the environment (see the module docstring).

        Raises :class:`LLMConfigError` naming every missing setting and its variables.
        """
        env = os.environ if environ is None else environ

        def pick(value: str | None, names: Sequence[str]) -> str | None:
            if value:
                return value
            return next((env[n] for n in names if env.get(n)), None)

        values = {"base URL": (pick(base_url, ENV_BASE_URL), "--base-url", ENV_BASE_URL),
                  "model": (pick(model, ENV_MODEL), "--model", ENV_MODEL),
                  "API key": (pick(api_key, ENV_API_KEY), "--api-key", ENV_API_KEY)}
        missing = [f"{what} ({option} or {' / '.join(names)})"
                   for what, (value, option, names) in values.items() if not value]
        if missing:
            raise LLMConfigError(
                "knowledge generation needs an OpenAI-compatible chat endpoint; missing: "
                + "; ".join(missing) + ". Local servers that ignore the key accept any string.")
        return cls(str(values["base URL"][0]).rstrip("/"), str(values["model"][0]),
                   str(values["API key"][0]), timeout)


class ChatClient:
    """Minimal chat-completions client on :mod:`urllib` (no third-party HTTP library)."""

    def __init__(self, endpoint: LLMEndpoint) -> None:
        self.endpoint = endpoint

    @property
    def url(self) -> str:
        return f"{self.endpoint.base_url}/chat/completions"

    def chat(self, messages: list[dict[str, Any]], temperature: float = 0.0) -> str:
        """Send ``messages``; return the first choice's text."""
        body = json.dumps({"model": self.endpoint.model, "messages": messages,
                           "temperature": temperature}).encode("utf-8")
        request = urllib.request.Request(self.url, data=body, method="POST", headers={
            "Content-Type": "application/json",
            "Authorization": f"Bearer {self.endpoint.api_key}",
        })
        try:
            with urllib.request.urlopen(request, timeout=self.endpoint.timeout) as response:
                payload = json.loads(response.read().decode("utf-8"))
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode("utf-8", "replace")[:300]
            raise LLMError(f"{self.url}: HTTP {exc.code} {exc.reason}: {detail}") from None
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            raise LLMError(f"{self.url}: request failed ({exc})") from None
        except json.JSONDecodeError as exc:
            raise LLMError(f"{self.url}: the answer is not JSON ({exc})") from None
        try:
            content = payload["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise LLMError(f"{self.url}: unexpected answer {str(payload)[:300]}") from None
        if isinstance(content, list):  # some servers return content parts
            content = "".join(str(part.get("text", "")) for part in content
                              if isinstance(part, dict))
        return str(content)


def parse_json_answer(text: str, key: str, where: str) -> Any:
    """The value of ``key`` in a JSON object answer (code fences and surrounding prose allowed)."""
    candidates = [text.strip()]
    fenced = re.search(r"```(?:json)?\s*(.*?)```", text, re.DOTALL)
    if fenced:
        candidates.insert(0, fenced.group(1).strip())
    braces = re.search(r"\{.*\}", text, re.DOTALL)
    if braces:
        candidates.append(braces.group(0))
    for candidate in candidates:
        try:
            data = json.loads(candidate)
        except json.JSONDecodeError:
            continue
        if isinstance(data, dict) and key in data:
            return data[key]
    raise LLMError(f"{where}: the model's answer has no JSON object with {key!r}: "
                   f"{text.strip()[:300]!r}")


# ------------------------------------------------------------------------------ rendering


@dataclass(frozen=True)
class LabeledCase:
    """A labeled volume the verifier looks at (arrays are (X, Y, Z))."""

    case_id: str
    image: np.ndarray
    label: np.ndarray


def _display(plane: np.ndarray, orientation: str) -> np.ndarray:
    # (first axis, second axis) -> rows top-down, columns left-right. With RAS-ordered arrays the
    # first axis runs toward the patient's right and the second toward anterior (axial) or the
    # third toward superior (coronal); radiological display puts the patient's right on the
    # left and anterior / superior up, i.e. both axes reversed after the transpose.
    shown = plane.T
    return shown[::-1, ::-1] if orientation == "RAS" else shown


def render_slices(case: LabeledCase, class_id: int, class_names: Sequence[str],
                  orientation: str = "RAS", size_px: int = 384) -> list[bytes]:
    """PNG images (axial and coronal) through the largest cross-section of ``class_id``.

    The CT is shown in grey (window = 1st..99th percentile of the case), every labeled class
    outlined in its own colour with a legend, the organ under review filled. Empty list when
    the class is absent from the case.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    mask = case.label == class_id
    if not mask.any():
        return []
    low, high = np.percentile(case.image, [1, 99])
    colours = plt.get_cmap("tab20")
    pictures = []
    for plane_name, axis, letters in (("axial", 2, ("A", "P")), ("coronal", 1, ("S", "I"))):
        other = tuple(a for a in range(3) if a != axis)
        index = int(np.argmax(mask.sum(axis=other)))
        image = np.take(case.image, index, axis=axis)
        label = np.take(case.label, index, axis=axis)
        figure, ax = plt.subplots(figsize=(size_px / 96, size_px / 96), dpi=96)
        ax.imshow(_display(image, orientation), cmap="gray", vmin=low, vmax=high,
                  interpolation="nearest")
        shown = _display(label, orientation)
        handles = []
        for cid in np.unique(label):
            if cid == 0:
                continue
            colour = colours(int(cid) % 20)
            ax.contour(shown == cid, levels=[0.5], colors=[colour], linewidths=1.0)
            if cid == class_id:
                overlay = np.zeros((*shown.shape, 4))
                overlay[shown == cid] = (*colour[:3], 0.45)
                ax.imshow(overlay, interpolation="nearest")
            handles.append(Patch(color=colour, label=str(class_names[int(cid)])))
        if orientation == "RAS":
            for text, xy in (("R", (0.01, 0.5)), ("L", (0.97, 0.5)), (letters[0], (0.49, 0.96)),
                             (letters[1], (0.49, 0.01))):
                ax.text(*xy, text, color="yellow", transform=ax.transAxes, fontsize=9)
        ax.set_title(f"{case.case_id} {plane_name}: {class_names[class_id]}", fontsize=8)
        ax.legend(handles=handles, fontsize=5, loc="lower left", framealpha=0.6)
        ax.axis("off")
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", bbox_inches="tight")
        plt.close(figure)
        pictures.append(buffer.getvalue())
    return pictures


def image_part(png: bytes) -> dict[str, Any]:
    """A chat content part carrying a PNG as a base64 data URL."""
    return {"type": "image_url",
            "image_url": {"url": "data:image/png;base64," + base64.b64encode(png).decode()}}


# ------------------------------------------------------------------------------ the agents


@dataclass
class GenerationSettings:
    """Knobs of :func:`generate_knowledge`."""

    min_claims: int = 3
    max_claims: int = 6
    orientation: str = "RAS"  # "RAS" or "unknown"
    temperature: float = 0.0


def draft_claims(client: ChatClient, organ: str, kind: str, class_names: Sequence[str],
                 settings: GenerationSettings) -> tuple[list[str], list[dict[str, Any]]]:
    """Agent 1: claims about ``organ`` for prompt kind ``kind`` from the class names alone."""
    messages = [
        {"role": "system", "content": DRAFT_SYSTEM.format(
            names=", ".join(class_names), min_claims=settings.min_claims,
            max_claims=settings.max_claims)},
        {"role": "user", "content": TEMPLATES[kind].replace("[CLS]", f"the {organ}")},
    ]
    answer = client.chat(messages, settings.temperature)
    claims = parse_json_answer(answer, "claims", f"draft {kind} of {organ}")
    if not isinstance(claims, list) or not all(isinstance(c, str) for c in claims):
        raise LLMError(f"draft {kind} of {organ}: 'claims' must be a list of strings")
    return [" ".join(c.split()) for c in claims if c.strip()], messages


def verify_claims(client: ChatClient, organ: str, claims: Sequence[tuple[str, str]],
                  pictures: Sequence[bytes], settings: GenerationSettings
                  ) -> list[dict[str, Any]]:
    """Agent 2: one verdict per ``(kind, claim)`` from the rendered slices."""
    orientation = ORIENTATION_RAS if settings.orientation == "RAS" else ORIENTATION_UNKNOWN
    listing = "\n".join(f"{i}. [{kind}] {claim}" for i, (kind, claim) in enumerate(claims, 1))
    content: list[dict[str, Any]] = [{"type": "text", "text": (
        f"Organ under review: {organ}. Check these claims against the {len(pictures)} "
        f"images that follow:\n{listing}")}]
    content.extend(image_part(png) for png in pictures)
    messages = [{"role": "system", "content": VERIFY_SYSTEM.format(orientation=orientation)},
                {"role": "user", "content": content}]
    answer = client.chat(messages, settings.temperature)
    verdicts = parse_json_answer(answer, "verdicts", f"verification of {organ}")
    if not isinstance(verdicts, list):
        raise LLMError(f"verification of {organ}: 'verdicts' must be a list")
    by_claim: dict[int, dict[str, Any]] = {}
    for verdict in verdicts:
        if isinstance(verdict, dict) and isinstance(verdict.get("claim"), int):
            by_claim[int(verdict["claim"])] = verdict
    results = []
    for i in range(1, len(claims) + 1):
        verdict = by_claim.get(i)
        if verdict is None:  # no verdict: not shown to be inconsistent, so kept but flagged
            results.append({"consistent": True, "checkable": False,
                            "reason": "no verdict returned"})
        else:
            results.append({"consistent": bool(verdict.get("consistent", True)),
                            "checkable": bool(verdict.get("checkable", True)),
                            "reason": str(verdict.get("reason", ""))})
    return results


def generate_knowledge(base: Knowledge, cases: Sequence[LabeledCase], client: ChatClient,
                       settings: GenerationSettings | None = None, seed: int | None = None,
                       progress: Callable[[str], None] | None = None) -> Knowledge:
    """Run both agents for every organ of ``base`` (background keeps its descriptions).

    ``cases``: the randomly sampled labeled cases the verifier sees. Returns a new
    :class:`Knowledge` whose ``extra`` holds ``generation``, ``dropped``, ``unverified`` and
    ``fallbacks`` records and ``review: {status: pending}``.
    """
    settings = settings or GenerationSettings()
    names = base.names
    organ_names = names[1:]
    classes: list[ClassKnowledge] = [base.classes[0]]
    dropped: list[dict[str, Any]] = []
    unverified: list[dict[str, Any]] = []
    fallbacks: list[dict[str, Any]] = []
    for entry in base.classes[1:]:
        if progress:
            progress(f"{entry.id}: {entry.name}")
        drafted = {kind: draft_claims(client, entry.name, kind, organ_names, settings)[0]
                   for kind in ("position", "shape")}
        claims = [(kind, claim) for kind in ("position", "shape") for claim in drafted[kind]]
        pictures = [png for case in cases for png in render_slices(
            case, entry.id, names, settings.orientation)]
        if pictures and claims:
            verdicts = verify_claims(client, entry.name, claims, pictures, settings)
        else:
            verdicts = [{"consistent": True, "checkable": False,
                         "reason": "organ absent from the sampled cases"} for _ in claims]
        kept: dict[str, list[str]] = {"position": [], "shape": []}
        for (kind, claim), verdict in zip(claims, verdicts):
            record = {"id": entry.id, "name": entry.name, "kind": kind, "claim": claim,
                      "reason": verdict["reason"]}
            if verdict["consistent"]:
                kept[kind].append(claim)
                if not pictures:
                    unverified.append(record)
            else:
                dropped.append(record)
        texts = {}
        for kind in ("position", "shape"):
            if kept[kind]:
                texts[kind] = " ".join(kept[kind])
            else:
                texts[kind] = getattr(entry, kind)
                fallbacks.append({"id": entry.id, "name": entry.name, "kind": kind,
                                  "reason": "no claim kept; base description used"})
        classes.append(ClassKnowledge(entry.id, entry.name, texts["position"], texts["shape"]))
    extra = {
        "source": "generated by `semiseg knowledge generate` (two-agent pipeline, TAK 3.2)",
        "review": {"status": "pending", "reviewer": None,
                   "note": "a clinician checks every description and the dropped claims"},
        "generation": {
            "endpoint": client.url, "model": client.endpoint.model,
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "seed": seed, "cases": [c.case_id for c in cases],
            "base_knowledge": str(base.path) if base.path else None,
            "orientation": settings.orientation, "temperature": settings.temperature,
            "prompts": {"draft_system": DRAFT_SYSTEM, "position": POSITION_TEMPLATE,
                        "shape": SHAPE_TEMPLATE, "verify_system": VERIFY_SYSTEM},
        },
        "dropped": dropped,
        "unverified": unverified,
        "fallbacks": fallbacks,
    }
    return Knowledge(base.class_set, tuple(classes), base.name_template, extra)


def sample_cases(data_root: str | Path, class_set: str, num_cases: int, seed: int,
                 layout: str = "auto") -> list[LabeledCase]:
    """``num_cases`` labeled cases drawn at random (``seed``) from prepared data."""
    from semiseg.data.layouts import open_store

    store = open_store(data_root, layout=layout, class_set=class_set, in_memory=False,
                       intensity="none")
    labeled = [case_id for case_id in store.ids if store.has_label(case_id)]
    if not labeled:
        raise SemisegError(f"{data_root}: no labeled cases to show the verifier")
    chosen = sorted(random.Random(seed).sample(labeled, min(num_cases, len(labeled))))
    return [LabeledCase(case_id, np.asarray(store.image(case_id), dtype=np.float32),
                        np.asarray(store.label(case_id))) for case_id in chosen]


def run_generation(class_set: str, data_root: str | Path, out: str | Path,
                   endpoint: LLMEndpoint, num_cases: int = 3, seed: int = 0,
                   base: str | Path | None = None, layout: str = "auto",
                   settings: GenerationSettings | None = None,
                   progress: Callable[[str], None] | None = None) -> Path:
    """Sample cases, run both agents, write the knowledge file (atomically) to ``out``."""
    base_knowledge = load_knowledge(base if base is not None else class_set,
                                    class_set if base is None else None)
    cases = sample_cases(data_root, class_set, num_cases, seed, layout)
    result = generate_knowledge(base_knowledge, cases, ChatClient(endpoint), settings, seed,
                                progress)
    header = ("Generated by `semiseg knowledge generate`: review every description and the\n"
              "dropped claims below before training with it (set review.status when done).")
    return write_knowledge(result, out, header)
