"""Run folders: train into one, evaluate one, rebuild its network from a checkpoint.

A run folder holds ``config.yaml``, ``checkpoints/{last,best}.pt``, ``log.csv``,
``tensorboard/``, ``state.json`` (:mod:`semiseg.engine.run_folder`) and, once evaluated,
``metrics.json``, ``predictions/<case>.nii.gz`` and ``overlays/<case>.png``
(:mod:`semiseg.engine.case_outputs`). Everything the report needs is in it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from semiseg.config import Config, load_config_dict, merge, parse_override
from semiseg.data.classes import get_class_set
from semiseg.engine.case_outputs import write_overlay, write_prediction
from semiseg.engine.checkpoint import BEST, load_checkpoint
from semiseg.engine.distributed import is_main_process
from semiseg.engine.evaluation import cases_from_mappings, evaluate_cases
from semiseg.engine.inference import predict_volume
from semiseg.engine.metrics_file import METRICS_FILENAME, write_metrics
from semiseg.engine.results import EvaluationResult, RunInfo
from semiseg.engine.setup import build_method_for, open_split, open_store
from semiseg.engine.trainer import Trainer, TrainResult
from semiseg.errors import CheckpointError, SemisegError
from semiseg.utils.io import writable_folder
from semiseg.utils.seed import resolve_device
from semiseg.utils.typed import build_dataclass


def default_run_dir(config: Config) -> Path:
    exp = config.experiment
    return Path(exp.output_dir) / exp.name / f"seed{exp.seed}"


def train_and_maybe_evaluate(config: Config, run_dir: Path, resume: bool = False,
                             evaluate: bool = False, show_progress: bool = True
                             ) -> tuple[TrainResult, EvaluationResult | None]:
    """Train (or resume) ``config`` in ``run_dir``; with ``evaluate`` also score the best
    checkpoint on the test split."""
    result = Trainer(config, run_dir, resume=resume, show_progress=show_progress).fit()
    # Under torchrun only rank 0 evaluates (one writer of metrics.json).
    if evaluate and is_main_process():
        return result, evaluate_run(run_dir, show_progress=show_progress)
    return result, None


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


# Overlay PNGs written by default: every Synapse test case (6), the first 6 of AMOS's 120.
DEFAULT_OVERLAYS = 6


def _class_set_of(config: Mapping[str, Any]) -> str | None:
    data = config.get("data") or {}
    dataset = data.get("dataset")
    if dataset == "phantom":
        return (data.get("phantom") or {}).get("class_set", "synapse")
    return dataset if dataset in ("synapse", "amos") else None


# What makes two configs one run's: a checkpoint that differs here scores another run.
_SAME_RUN = ("method.name", "model.name", "data.dataset", "data.split", "data.labeled_ratio")


def _describe(key: str, config: Mapping[str, Any], class_set: str | None) -> str:
    if key == "class set":
        count = get_class_set(class_set).num_classes if class_set else None
        return f"{class_set} ({count} classes)" if count else str(class_set)
    value: Any = config
    for part in key.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    return repr(value)


def check_checkpoint_of_run(payload: Mapping[str, Any], run_config: Mapping[str, Any],
                            checkpoint: Path, run_dir: Path) -> None:
    """Refuse a checkpoint whose class set, data, split, ratio, method or network differ from
    the run's own config (its scores would overwrite the run's ``metrics.json``)."""
    saved = payload.get("config") or {}
    mine = _class_set_of(run_config)
    theirs = payload.get("class_set") or _class_set_of(saved)
    differences = []
    if mine and theirs and mine != theirs:
        differences.append(f"class set {_describe('class set', saved, theirs)} vs "
                           f"{_describe('class set', run_config, mine)}")
    for key in _SAME_RUN:
        ours, other = _describe(key, run_config, None), _describe(key, saved, None)
        if ours != other:
            differences.append(f"{key} {other} vs {ours}")
    if differences:
        raise CheckpointError(
            f"{checkpoint} is not a checkpoint of {run_dir} ({'; '.join(differences)}: the "
            f"checkpoint's value first, the run's second); evaluate it in its own run folder")


def _run_config(run_dir: Path, payload: Mapping[str, Any], checkpoint: Path) -> dict[str, Any]:
    """The run's own config: ``config.yaml``, else (an older folder) that of a checkpoint
    inside the run folder."""
    path = run_dir / "config.yaml"
    if path.is_file():
        return load_config_dict(path)
    if run_dir.resolve() in checkpoint.resolve().parents:
        return dict(payload.get("config") or {})
    raise CheckpointError(f"{run_dir} has no config.yaml: cannot tell whether {checkpoint} "
                          "belongs to it")


def evaluate_run(run_dir: Path, checkpoint: Path | None = None, split: str | None = None,
                 save_predictions: bool = True, overrides: list[str] | None = None,
                 show_progress: bool = True, device: str | None = None,
                 overlays: int = DEFAULT_OVERLAYS) -> EvaluationResult:
    """Predict the run's evaluation split with its best checkpoint (or ``checkpoint``, which
    must belong to the run) and score it into ``metrics.json``; with ``save_predictions``
    also ``predictions/<case>.nii.gz`` and the overlays of the first ``overlays`` cases
    (:mod:`semiseg.engine.case_outputs`). ``device`` overrides ``experiment.device``."""
    run_dir = Path(run_dir)
    checkpoint = Path(checkpoint or run_dir / "checkpoints" / BEST)
    if not checkpoint.exists():
        raise SemisegError(f"{checkpoint}: no checkpoint to evaluate (has {run_dir} finished "
                           "training?)")
    writable_folder(run_dir, "the run folder")  # before the inference, not after
    payload = load_checkpoint(checkpoint)
    check_checkpoint_of_run(payload, _run_config(run_dir, payload, checkpoint), checkpoint,
                            run_dir)
    overrides = [*(overrides or []), *([f"experiment.device={device}"] if device else [])]
    config = config_from_checkpoint(payload, overrides)
    run_device = resolve_device(config.experiment.device)
    network, config = network_from_payload(payload, checkpoint, run_device, overrides)
    del payload
    class_set, store = open_store(config, show_progress)
    the_split = open_split(config, store)
    which = split or config.evaluation.split
    case_ids = list(the_split.test if which == "test" else the_split.eval)
    if not case_ids:
        raise SemisegError(f"split {the_split.name!r} has no {which} cases to evaluate")
    label = config.experiment.label or config.method.name
    inf = config.inference
    predictions = {}
    for number, case_id in enumerate(tqdm(case_ids, desc=f"predict {which}",
                                          disable=not show_progress)):
        labels = predict_volume(network, store.image(case_id), inf.patch_size, inf.stride,
                                inf.sw_batch_size, inf.mode, run_device)
        predictions[case_id] = labels
        if save_predictions:
            write_prediction(run_dir, case_id, labels, store)
            if number < overlays:
                write_overlay(run_dir, case_id, labels, store, f"{label}: case {case_id} "
                              f"({which} split), ground truth | prediction")
    references = {k: store.label(k) for k in case_ids}
    spacings = {k: store.spacing(k) for k in case_ids}
    result = evaluate_cases(
        cases_from_mappings(predictions, references, spacings), class_set,
        config.evaluation.asd_unit, rule=config.evaluation.rule, show_progress=show_progress,
    ).with_run(RunInfo(
        method=label, dataset=config.data.dataset,
        labeled_ratio=config.data.labeled_ratio, seed=config.experiment.seed,
        config=str(run_dir / "config.yaml"), checkpoint=str(checkpoint),
        experiment=config.experiment.name, split=which,
    ))
    write_metrics(result, run_dir / METRICS_FILENAME)
    return result
