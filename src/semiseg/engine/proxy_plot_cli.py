"""The ``semiseg plot-proxies`` subcommand (kept apart from :mod:`semiseg.engine.proxy_plot` so
that building the command line does not import torch and matplotlib)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add ``plot-proxies`` to the ``semiseg`` command line (``handler`` -> exit status)."""
    parser = subparsers.add_parser(
        "plot-proxies", help="plot an SCDL run's class proxies among its tokens",
        description="Rebuild an scdl_* run from its checkpoint, embed the tokens (as the "
        "run's scdl.tokens takes them) of a few labeled cases (cut into training-size crops), "
        "and scatter tokens (coloured by class) and the learned proxy means (stars) in their "
        "2-D PCA plane. Writes a PNG.")
    parser.add_argument("run", type=Path, help="a run folder (uses checkpoints/best.pt, else "
                        "last.pt) or a checkpoint file")
    parser.add_argument("--out", type=Path, default=None,
                        help="PNG to write (default: proxies.png in the run folder)")
    parser.add_argument("--cases", type=int, default=2, help="cases to embed (default 2)")
    parser.add_argument("--subset", choices=["labeled", "eval", "test"], default="labeled",
                        help="where the cases come from (default: the labeled training cases)")
    parser.add_argument("--network", type=int, default=0,
                        help="which network's proxies (CPS: 0 = A, 1 = B; default 0)")
    parser.add_argument("--token-class", choices=["any", "majority"], default="any",
                        help="a token counts for every class in its cell (any, as SAC) or for "
                        "its most frequent one (majority)")
    parser.add_argument("--max-tokens-per-class", type=int, default=400,
                        help="tokens drawn per class at most (default 400)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--dpi", type=int, default=100, help="PNG resolution (7x6 inches)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a value of the run's config, "
                        "e.g. --set data.root=/data/synapse (repeatable)")
    parser.set_defaults(handler=_cmd_plot_proxies)


def _cmd_plot_proxies(args: argparse.Namespace) -> int:
    from semiseg.engine.proxy_plot import plot_proxies

    written = plot_proxies(args.run, out=args.out, cases=args.cases, network=args.network,
                           subset=args.subset, rule=args.token_class,
                           max_tokens_per_class=args.max_tokens_per_class, device=args.device,
                           overrides=args.overrides, dpi=args.dpi)
    print(written)
    return 0
