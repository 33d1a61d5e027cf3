"""One rank of the 2-process gloo test (tests/engine/test_distributed.py), started with
torchrun's environment variables. Not collected by pytest (no ``test_`` prefix).

Usage: python _ddp_worker.py SPEC.json, where SPEC holds ``overrides`` (config --set list),
``straight`` / ``resumed`` / ``teacher`` run folders, ``teacher_overrides``, ``stop_after``
and ``out`` (a folder for this test's
own per-rank outputs). The straight run goes through the command line (``semiseg train``), the
killed and resumed runs through :class:`~semiseg.engine.trainer.Trainer`, all in one process
group so the processes start only once.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from semiseg.cli import main as cli_main
from semiseg.config import load_config
from semiseg.engine import distributed
from semiseg.engine.trainer import Trainer


def run(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    ctx = distributed.init_from_env("gloo", "cpu")
    out = Path(spec["out"])
    overrides = list(spec["overrides"])
    args = ["train", "--run-dir", spec["straight"], "--no-progress"]
    for item in overrides:
        args += ["--set", item]
    if cli_main(args) != 0:
        raise SystemExit(f"rank {ctx.rank}: semiseg train failed")
    config = load_config(None, overrides)
    Trainer(config, spec["resumed"], show_progress=False, stop_after=spec["stop_after"]).fit()
    trainer = Trainer(config, spec["resumed"], resume=True, show_progress=False)
    result = trainer.fit()
    batches = trainer.data.batches
    torch.save({"method": trainer.method.state_dict(), "iterations": result.iterations,
                "rank": batches.rank, "world_size": batches.world_size,
                "first_image": batches[0]["image"],
                "iterations_per_epoch": trainer.data.iterations_per_epoch},
               out / f"rank{ctx.rank}.pt")
    # A mean teacher (batch-norm VNet, EMA teacher, noise from the global RNG) for 2 steps.
    teacher = Trainer(load_config(None, spec["teacher_overrides"]), spec["teacher"],
                      show_progress=False)
    teacher.fit()
    torch.save({"method": teacher.method.state_dict()}, out / f"teacher_rank{ctx.rank}.pt")
    distributed.teardown(ctx)


if __name__ == "__main__":
    run(sys.argv[1])
