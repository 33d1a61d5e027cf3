"""The trainer: kill-and-resume gives the uninterrupted result; logs, checkpoints, errors."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from semiseg.config import load_config
from semiseg.engine.checkpoint import load_checkpoint
from semiseg.engine.metrics import quick_dice
from semiseg.engine.optim import learning_rate, poly_lr
from semiseg.engine.trainer import Trainer
from semiseg.errors import CheckpointError, ConfigError


def tiny_config(data_root: Path, method: str = "supervised", **extra: object):
    overrides = [
        f"data.root={data_root}",
        "data.phantom.num_cases=10",
        "data.phantom.shape=[40, 40, 32]",
        "data.patch_size=[32, 32, 32]",
        "model.options={n_filters: 4}",
        f"method.name={method}",
        "train.max_iterations=6",
        "train.checkpoint_every=3",
        "train.validate_every=3",
        "train.log_every=1",
        "inference.patch_size=[32, 32, 32]",
        "inference.validation_stride=[16, 16, 16]",
        "experiment.deterministic=true",
        "experiment.seed=3",
    ]
    overrides += [f"{k}={v}" for k, v in extra.items()]
    return load_config(None, overrides)


def _states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method", ["supervised", "ga_cps", "mean_teacher"])
def test_killed_and_resumed_run_ends_with_the_same_weights(tmp_path: Path, method: str) -> None:
    config = tiny_config(tmp_path / "data", method)
    straight = Trainer(config, tmp_path / "straight", show_progress=False).fit()
    assert straight.iterations == 6
    # "Kill" after 4 iterations: the last checkpoint holds 3, iteration 4 is lost.
    Trainer(config, tmp_path / "resumed", show_progress=False, stop_after=4).fit()
    assert load_checkpoint(tmp_path / "resumed/checkpoints/last.pt")["iteration"] == 3
    resumed = Trainer(config, tmp_path / "resumed", resume=True, show_progress=False).fit()
    assert resumed.iterations == 6
    a = load_checkpoint(tmp_path / "straight/checkpoints/last.pt")
    b = load_checkpoint(tmp_path / "resumed/checkpoints/last.pt")
    assert _states_equal(a["method"], b["method"])
    assert a["best_score"] == b["best_score"] and a["best_iteration"] == b["best_iteration"]
    with open(tmp_path / "resumed/log.csv", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    iterations = [int(r["iteration"]) for r in rows if r["loss/total"]]
    assert iterations == [1, 2, 3, 4, 5, 6]


def test_run_folder_contents_and_checkpoint_payload(tmp_path: Path) -> None:
    config = tiny_config(tmp_path / "data")
    Trainer(config, tmp_path / "run", show_progress=False).fit()
    run = tmp_path / "run"
    for name in ("config.yaml", "log.csv", "state.json", "checkpoints/last.pt",
                 "checkpoints/best.pt"):
        assert (run / name).exists(), name
    assert any((run / "tensorboard").iterdir())
    payload = load_checkpoint(run / "checkpoints/last.pt")
    assert payload["config"]["method"]["name"] == "supervised"
    assert payload["intensity"] == "ga"
    assert payload["preprocessing"]["profile"] == "native"
    assert {"python", "numpy", "torch"} <= set(payload["rng"])
    assert not list(run.rglob("*.tmp")), "no temporary files left behind"


def test_refuses_to_overwrite_or_resume_nothing(tmp_path: Path) -> None:
    config = tiny_config(tmp_path / "data", **{"train.max_iterations": 1})
    with pytest.raises(CheckpointError, match="nothing to resume"):
        Trainer(config, tmp_path / "run", resume=True, show_progress=False).fit()
    Trainer(config, tmp_path / "run", show_progress=False).fit()
    with pytest.raises(CheckpointError, match="already holds a run"):
        Trainer(config, tmp_path / "run", show_progress=False).fit()


def test_unknown_loss_weight_is_named(tmp_path: Path) -> None:
    config = tiny_config(tmp_path / "data", **{"train.loss_weights": "{dice: 2.0}"})
    with pytest.raises(ConfigError, match=r"names \['dice'\].*returns \['dice_ce'\]"):
        Trainer(config, tmp_path / "run", show_progress=False).fit()


def test_poly_lr_and_quick_dice_by_hand() -> None:
    assert poly_lr(0.01, 0, 100, 0.9) == 0.01
    assert poly_lr(0.01, 50, 100, 0.9) == pytest.approx(0.01 * 0.5**0.9)
    from semiseg.config import TrainConfig

    # The run's own length, or a longer horizon (GALoss: 70,000) that the rate never reaches.
    train = TrainConfig(lr=0.1, max_iterations=100, lr_schedule="poly", poly_power=0.9)
    assert learning_rate(train, 99) == pytest.approx(0.1 * 0.01**0.9)
    assert learning_rate(train, 150) == learning_rate(train, 99)  # held, never negative
    train.lr_schedule_iterations = 200
    assert learning_rate(train, 100) == pytest.approx(0.1 * 0.5**0.9)
    train.lr_schedule = "constant"
    assert learning_rate(train, 100) == 0.1
    import numpy as np

    ref = np.array([0, 1, 1, 2, 2, 2, 0, 0])
    pred = np.array([0, 1, 0, 2, 2, 0, 0, 0])
    # class 1: 2*1/(1+2) = 2/3; class 2: 2*2/(2+3) = 0.8; class 3 absent from both: 0
    np.testing.assert_allclose(quick_dice(pred, ref, 4), [2 / 3, 0.8, 0.0])


def test_training_log_has_per_organ_validation(tmp_path: Path) -> None:
    config = tiny_config(tmp_path / "data", **{"train.max_iterations": 3})
    Trainer(config, tmp_path / "run", show_progress=False).fit()
    with open(tmp_path / "run/log.csv", encoding="utf-8") as handle:
        rows = [row for row in csv.DictReader(handle) if row["val/dice"]]
    assert [int(row["iteration"]) for row in rows] == [3]
    row = rows[0]
    organs = [key[len("val/dice/"):] for key in row if key.startswith("val/dice/")]
    assert len(organs) == 13 and organs[0] == "Sp"
    # The selection score is the mean of the per-organ means (equal case counts per organ).
    per_organ = [float(row[f"val/dice/{name}"]) for name in organs]
    assert float(row["val/dice"]) == pytest.approx(np.mean(per_organ), rel=1e-4)
    # Every organ is in the phantom's eval cases, so every organ has a volume ratio.
    volumes = [float(row[f"val/volume/{name}"]) for name in organs]
    assert all(v >= 0 for v in volumes)


def test_a_second_stop_signal_inside_a_checkpoint_write_is_an_interruption(
        tmp_path: Path, monkeypatch) -> None:
    import os
    import signal

    import semiseg.engine.trainer as trainer_module

    real_save = trainer_module.save_checkpoint

    def save_like_torch(path: Path, payload: dict) -> None:
        if payload["iteration"] == 6:
            os.kill(os.getpid(), signal.SIGTERM)  # first: stop after this iteration
            try:
                os.kill(os.getpid(), signal.SIGTERM)  # second, mid-write: stop at once
            except KeyboardInterrupt:
                # What torch.save's C++ writer makes of an interrupt in its write callback
                # (measured: "[enforce fail at inline_container.cc:672] . unexpected pos").
                raise RuntimeError("[enforce fail at inline_container.cc] unexpected pos") \
                    from None
        real_save(path, payload)

    monkeypatch.setattr(trainer_module, "save_checkpoint", save_like_torch)
    config = tiny_config(tmp_path / "data", **{"train.max_iterations": 100,
                                               "train.validate_every": 0})
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        Trainer(config, run, show_progress=False).fit()
    state = json.loads((run / "state.json").read_text(encoding="utf-8"))
    assert state["status"] == "interrupted" and "error" not in state, state
    # The checkpoint the interrupted write would have replaced is the one to resume.
    assert state["checkpoint_iteration"] == 3 and state["iteration"] == 6
    assert load_checkpoint(run / "checkpoints/last.pt")["iteration"] == 3
