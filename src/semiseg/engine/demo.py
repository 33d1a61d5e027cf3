"""``semiseg demo``: phantom -> train -> predict -> per-class table, in one folder.

Re-running the demo continues an interrupted run and skips a finished one, so ``make demo``
is cheap the second time.
"""

from __future__ import annotations

import json
import time
from importlib import resources
from pathlib import Path

from semiseg.config import Config, load_config_dict, merge, parse_override
from semiseg.engine.metrics_file import METRICS_FILENAME
from semiseg.engine.runs import evaluate_run
from semiseg.engine.trainer import Trainer
from semiseg.utils.typed import build_dataclass


def demo_config(out: Path, config_path: Path | None = None,
                overrides: list[str] | None = None) -> Config:
    """The packaged demo config with its paths pointed into ``out``."""
    if config_path is None:
        config_path = Path(str(resources.files("semiseg") / "configs" / "demo.yaml"))
    data = load_config_dict(config_path)
    data = merge(data, {
        "data": {"root": str(out / "data")},
    })
    for override in overrides or []:
        data = merge(data, parse_override(override))
    return build_dataclass(Config, data)


def _state(run_dir: Path) -> str | None:
    path = run_dir / "state.json"
    if not path.exists():
        return None
    return json.loads(path.read_text(encoding="utf-8")).get("status")


def run_demo(out: Path, config_path: Path | None = None,
             overrides: list[str] | None = None, show_progress: bool = True) -> Path:
    """Run the whole demo in ``out`` and print the table; returns the run folder."""
    from semiseg.engine.report import write_report

    out = Path(out)
    config = demo_config(out, config_path, overrides)
    run_dir = out / "run"
    started = time.perf_counter()
    status = _state(run_dir)
    if status == "finished":
        print(f"[demo] training already finished in {run_dir}; skipping to evaluation")
    else:
        print(f"[demo] phantom data in {config.data.root}; training {config.method.name} "
              f"({config.train.max_iterations} iterations, "
              f"{config.data.labeled_ratio:.0%} labeled) in {run_dir}")
        Trainer(config, run_dir, resume=status is not None, show_progress=show_progress).fit()
    print("[demo] predicting and scoring the test cases")
    result = evaluate_run(run_dir, save_predictions=True, show_progress=show_progress)
    write_report([run_dir], out / "report")
    print()
    print(result.to_markdown())
    print()
    minutes = (time.perf_counter() - started) / 60
    print(f"[demo] done in {minutes:.1f} min. Everything is in {out}:")
    print(f"  checkpoints   {run_dir / 'checkpoints'}")
    print(f"  predictions   {run_dir / 'predictions'}  (NIfTI, open with the phantom images)")
    print(f"  metrics       {run_dir / METRICS_FILENAME}")
    print(f"  tables/plots  {out / 'report'}")
    print(f"  logs          {run_dir / 'log.csv'}, tensorboard --logdir {run_dir / 'tensorboard'}")
    return run_dir
