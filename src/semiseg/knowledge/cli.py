"""``semiseg knowledge``: generate and encode TAK's textual anatomical knowledge.

    semiseg knowledge generate --class-set amos --data data/amos --out amos_generated.yaml
    semiseg knowledge encode --class-set synapse [--encoder minilm] [--out FILE]

:func:`add_cli` adds the subcommand to the main parser; every action sets ``handler``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from semiseg.knowledge.encoders import list_encoders
from semiseg.knowledge.texts import PROMPT_KINDS


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add ``knowledge`` with its ``generate`` and ``encode`` actions to ``subparsers``."""
    knowledge = subparsers.add_parser(
        "knowledge", help="generate or encode TAK's textual anatomical knowledge",
        description="TAK's textual anatomical knowledge: per class a position and a shape "
        "description (packaged for Synapse and AMOS; see docs/methods/tak.md). 'generate' drafts "
        "new descriptions with an LLM and checks them against labeled slices; 'encode' embeds "
        "descriptions once and caches the result for training.")
    actions = knowledge.add_subparsers(dest="knowledge_command", required=True, metavar="ACTION")

    generate = actions.add_parser(
        "generate", help="draft descriptions with two LLM agents and check them on labeled CT",
        description="The paper's two-agent pipeline against an OpenAI-compatible chat endpoint: "
        "agent 1 drafts position and shape claims per organ from the class names alone, agent 2 "
        "checks every claim against axial and coronal slices of randomly sampled labeled cases "
        "(sent as PNG images) and inconsistent claims are dropped. Writes a knowledge YAML with "
        "the dropped claims and the generation record for a clinician to review. Endpoint "
        "settings: --base-url/--model/--api-key or SEMISEG_LLM_BASE_URL, SEMISEG_LLM_MODEL, "
        "SEMISEG_LLM_API_KEY (or OPENAI_BASE_URL, OPENAI_MODEL, OPENAI_API_KEY).")
    generate.add_argument("--class-set", required=True, choices=["synapse", "amos"],
                          help="which organs to describe: synapse (13 organs) or amos (15)")
    generate.add_argument("--data", type=Path, required=True,
                          help="prepared data folder with labeled cases (semiseg or official "
                          "layout) from which the verifier's slices are drawn")
    generate.add_argument("--out", type=Path, required=True, help="output knowledge YAML")
    generate.add_argument("--base", type=Path, default=None,
                          help="knowledge file giving background and fallback texts (default: "
                          "the packaged one)")
    generate.add_argument("--base-url", default=None,
                          help="chat endpoint base URL, e.g. https://api.openai.com/v1")
    generate.add_argument("--model", default=None, help="chat model, e.g. gpt-4o")
    generate.add_argument("--api-key", default=None, help="API key (prefer the environment)")
    generate.add_argument("--num-cases", type=int, default=3,
                          help="labeled cases sampled for the verifier (default 3)")
    generate.add_argument("--seed", type=int, default=0, help="case sampling seed")
    generate.add_argument("--layout", default="auto", help="data layout (default auto)")
    generate.add_argument("--orientation", choices=["RAS", "unknown"], default="RAS",
                          help="array orientation of the data (RAS: left/right and up/down "
                          "are labeled on the slices; unknown: they are not checked)")
    generate.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    generate.set_defaults(handler=cmd_generate)

    encode = actions.add_parser(
        "encode", help="embed descriptions once and cache them",
        description="Embed the name, position and shape prompts of every class with a text "
        "encoder and write [3, classes, dim] embeddings with their metadata (encoder, texts "
        "hash, class set, date). Without --out the file goes to the cache that training reads "
        "($SEMISEG_CACHE_DIR/knowledge or ~/.cache/semiseg/knowledge), so a later "
        "`semiseg train` needs neither the encoder nor the network. Encoders: "
        + ", ".join(list_encoders()) + " (minilm is packaged and works offline; biomedclip, "
        "pmc-clip and unimed-clip need open_clip: pip install 'semiseg[clip]').")
    encode.add_argument("--class-set", required=True, choices=["synapse", "amos"],
                        help="whose descriptions to encode: synapse (13 organs) or amos (15)")
    encode.add_argument("--knowledge", type=Path, default=None,
                        help="knowledge YAML (default: the packaged one of the class set)")
    encode.add_argument("--encoder", default="minilm", choices=list_encoders(),
                        help="text encoder (default minilm)")
    encode.add_argument("--model", default=None,
                        help="hub id or local folder overriding the encoder's default model")
    encode.add_argument("--out", type=Path, default=None,
                        help="output .pt (default: the training cache)")
    encode.add_argument("--cache-dir", type=Path, default=None,
                        help="cache folder (default $SEMISEG_CACHE_DIR/knowledge or "
                        "~/.cache/semiseg/knowledge)")
    encode.add_argument("--refresh", action="store_true", help="recompute a cached file")
    encode.add_argument("--device", default="cpu", help="encoder device (default cpu)")
    encode.set_defaults(handler=cmd_encode)


def cmd_generate(args: argparse.Namespace) -> int:
    """Handler of ``semiseg knowledge generate``."""
    from semiseg.knowledge.generator import GenerationSettings, LLMEndpoint, run_generation

    endpoint = LLMEndpoint.from_options(args.base_url, args.model, args.api_key, args.timeout)
    path = run_generation(
        args.class_set, args.data, args.out, endpoint, num_cases=args.num_cases,
        seed=args.seed, base=args.base, layout=args.layout,
        settings=GenerationSettings(orientation=args.orientation),
        progress=lambda line: print(f"  {line}", file=sys.stderr))
    print(f"{path}: generated knowledge; review it (dropped claims listed inside) before use")
    return 0


def cmd_encode(args: argparse.Namespace) -> int:
    """Handler of ``semiseg knowledge encode``."""
    from semiseg.knowledge.embeddings import (
        cached_embeddings,
        encode_knowledge,
        save_embeddings,
    )
    from semiseg.knowledge.encoders import get_encoder
    from semiseg.knowledge.texts import load_knowledge

    source = args.knowledge if args.knowledge is not None else args.class_set
    knowledge = load_knowledge(source, args.class_set)
    if args.out is None:
        embeddings, path = cached_embeddings(knowledge, args.encoder, args.model, args.cache_dir,
                                             args.device, refresh=args.refresh)
    else:
        encoder = get_encoder(args.encoder, args.model, args.device)
        embeddings = encode_knowledge(knowledge, encoder, PROMPT_KINDS)
        path = save_embeddings(embeddings, args.out)
    kinds = ", ".join(embeddings.kinds)
    digest = str(embeddings.metadata.get("texts_hash"))[:12]
    print(f"{path}: embeddings {list(embeddings.tensor.shape)} ({kinds}; encoder "
          f"{embeddings.metadata.get('encoder')}, texts {digest})")
    return 0
