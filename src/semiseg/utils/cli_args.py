"""The options that mean one thing across ``semiseg`` commands, defined once so that every
command spells and explains them alike: ``--out``, ``--device``, ``--no-progress``, ``--set``."""

from __future__ import annotations

import argparse
from pathlib import Path

DEVICE_HELP = ("device for the network: auto (the first GPU, else the CPU), cpu, cuda or "
               "cuda:N")


def add_out(parser: argparse.ArgumentParser, help: str, required: bool = False,
            default: Path | None = None) -> None:
    parser.add_argument("--out", type=Path, required=required, default=default, help=help)


def add_device(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    """``--device``; None (the default) leaves the run config's ``experiment.device``."""
    suffix = f" (default {default})" if default else " (default: the config's experiment.device)"
    parser.add_argument("--device", default=default, metavar="DEVICE", help=DEVICE_HELP + suffix)


def add_no_progress(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bars (for logs and batch jobs)")


def add_overrides(parser: argparse.ArgumentParser, help: str) -> None:
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help=help)


def device_overrides(args: argparse.Namespace) -> list[str]:
    """``--set`` overrides plus ``experiment.device`` from ``--device`` when given."""
    device = getattr(args, "device", None)
    return [*args.overrides, *([f"experiment.device={device}"] if device else [])]
