"""Run folders: train into one, evaluate one, rebuild its network from a checkpoint.

A run folder holds ``config.yaml``, ``checkpoints/{last,best}.pt``, ``log.csv``,
``tensorboard/``, ``state.json`` and, once evaluated, ``metrics.json`` (and optionally
``predictions/``). Everything the report needs is in it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from semiseg.config import Config, load_config, merge, parse_override
from semiseg.data.classes import get_class_set
from semiseg.engine.checkpoint import BEST, load_checkpoint
from semiseg.engine.distributed import is_main_process
from semiseg.engine.evaluation import cases_from_mappings, evaluate_cases
from semiseg.engine.inference import predict_volume
from semiseg.engine.metrics_file import METRICS_FILENAME, write_metrics
from semiseg.engine.results import EvaluationResult, RunInfo
from semiseg.engine.setup import build_method_for, open_split, open_store
from semiseg.engine.trainer import Trainer, TrainResult
from semiseg.errors import CheckpointError, SemisegError
from semiseg.utils.seed import resolve_device
from semiseg.utils.typed import build_dataclass


def default_run_dir(config: Config) -> Path:
    exp = config.experiment
    return Path(exp.output_dir) / exp.name / f"seed{exp.seed}"


def train_and_maybe_evaluate(config: Config, run_dir: Path, resume: bool = False,
                             evaluate: bool = False, show_progress: bool = True) -> TrainResult:
    result = Trainer(config, run_dir, resume=resume, show_progress=show_progress).fit()
    # Under torchrun only rank 0 evaluates (one writer of metrics.json).
    if evaluate and is_main_process():
        evaluate_run(run_dir, show_progress=show_progress)
    return result


def config_from_checkpoint(payload: dict, overrides: list[str] | None = None) -> Config:
    data = payload.get("config")
    if not isinstance(data, dict):
        raise CheckpointError("checkpoint holds no run config")
    for override in overrides or []:
        data = merge(data, parse_override(override))
    return build_dataclass(Config, data)


def load_inference_network(checkpoint: Path, device: torch.device | str = "cpu",
                           overrides: list[str] | None = None) -> tuple[nn.Module, Config]:
    """Rebuild a run's method from a checkpoint and return its inference network (eval mode)."""
    return network_from_payload(load_checkpoint(checkpoint), checkpoint, device, overrides)


def network_from_payload(payload: dict, checkpoint: Path, device: torch.device | str = "cpu",
                         overrides: list[str] | None = None) -> tuple[nn.Module, Config]:
    """The inference network (eval mode) and config of an already loaded checkpoint."""
    config = config_from_checkpoint(payload, overrides)
    class_set = get_class_set(payload.get("class_set") or config.data.dataset)
    method = build_method_for(config, class_set=class_set)
    try:
        method.load_state_dict(payload["method"])
    except RuntimeError as exc:
        raise CheckpointError(f"{checkpoint}: weights do not fit the configured method ({exc})"
                              ) from None
    if isinstance(device, str):
        device = resolve_device(device)
    network = method.inference_network().to(device)
    network.eval()
    return network, config


def evaluate_run(run_dir: Path, checkpoint: Path | None = None, split: str | None = None,
                 save_predictions: bool = False, overrides: list[str] | None = None,
                 show_progress: bool = True) -> EvaluationResult:
    """Predict the run's evaluation split with its best checkpoint and score it."""
    run_dir = Path(run_dir)
    checkpoint = checkpoint or run_dir / "checkpoints" / BEST
    if not checkpoint.exists():
        raise SemisegError(f"{checkpoint}: no checkpoint to evaluate (has {run_dir} finished "
                           "training?)")
    config_path = run_dir / "config.yaml"
    config = load_config(config_path if config_path.exists() else None, overrides)
    device = resolve_device(config.experiment.device)
    network, config = load_inference_network(checkpoint, device, overrides)
    class_set, store = open_store(config)
    the_split = open_split(config, store)
    which = split or config.evaluation.split
    case_ids = list(the_split.test if which == "test" else the_split.eval)
    if not case_ids:
        raise SemisegError(f"split {the_split.name!r} has no {which} cases to evaluate")
    inf = config.inference
    predictions = {}
    for case_id in tqdm(case_ids, desc=f"predict {which}", disable=not show_progress):
        predictions[case_id] = predict_volume(network, store.image(case_id), inf.patch_size,
                                              inf.stride, inf.sw_batch_size, inf.mode, device)
    if save_predictions:
        _save_predictions(run_dir / "predictions", predictions, store)
    references = {k: store.label(k) for k in case_ids}
    spacings = {k: store.spacing(k) for k in case_ids}
    result = evaluate_cases(
        cases_from_mappings(predictions, references, spacings), class_set,
        config.evaluation.asd_unit, rule=config.evaluation.rule, show_progress=show_progress,
    ).with_run(RunInfo(
        method=config.experiment.label or config.method.name, dataset=config.data.dataset,
        labeled_ratio=config.data.labeled_ratio, seed=config.experiment.seed,
        config=str(config_path), checkpoint=str(checkpoint),
        experiment=config.experiment.name, split=which,
    ))
    write_metrics(result, run_dir / METRICS_FILENAME)
    return result


def _save_predictions(folder: Path, predictions: dict, store: object) -> None:
    from semiseg.utils.io import atomic_numpy_save

    folder.mkdir(parents=True, exist_ok=True)
    for case_id, labels in predictions.items():
        atomic_numpy_save(folder / f"{case_id}.npy", labels)
