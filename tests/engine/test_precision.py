"""The training precision policy and the numerics self-check (semiseg.engine.precision).

The self-check scenarios also run in subprocesses under both oneDNN instruction-set levels a
CPU here may have (the default, AVX-512 with bf16 units on some machines, and AVX2), so that a
machine of either kind exercises the kernels of the other.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from semiseg.cli import main
from semiseg.config import load_config
from semiseg.engine import precision
from semiseg.engine.objective import combine_losses
from semiseg.engine.trainer import Trainer
from semiseg.errors import ConfigError, NumericsError
from semiseg.methods.supervised import Supervised

sys.path.insert(0, str(Path(__file__).parent))
from _precision_nets import faulty_network, healthy_network, loss_of

HERE = Path(__file__).parent
CPU = torch.device("cpu")
CUDA = torch.device("cuda", 0)


def _tiny_run(data_root: Path, **extra: object) -> list[str]:
    overrides = {
        "data.root": data_root, "data.phantom.num_cases": 8,
        "data.phantom.shape": "[40, 40, 32]", "data.patch_size": "[32, 32, 32]",
        "model.options": "{n_filters: 4}", "train.batch_size": 2,
        "train.labeled_batch_size": 2, "train.max_iterations": 3, "train.checkpoint_every": 1,
        "train.validate_every": 0, "train.log_every": 1, "experiment.device": "cpu",
        "inference.patch_size": "[32, 32, 32]", **extra}
    return [f"{k}={v}" for k, v in overrides.items()]


def test_policy_auto_is_fp32_and_the_cpu_refuses_reduced_precision() -> None:
    for device in (CPU, CUDA):
        assert precision.resolve_amp_dtype("auto", device) is None
        assert precision.resolve_amp_dtype("none", device) is None
    assert precision.resolve_amp_dtype("bf16", CUDA) is torch.bfloat16
    assert precision.resolve_amp_dtype("fp16", CUDA) is torch.float16
    for name in ("bf16", "fp16"):
        with pytest.raises(ConfigError, match=rf"train.amp: {name} autocast is refused on the "
                                              r"CPU: .* train.amp=auto or none"):
            precision.resolve_amp_dtype(name, CPU)
    with pytest.raises(ConfigError, match="'fp8' is not one of auto, none, bf16, fp16"):
        precision.resolve_amp_dtype("fp8", CUDA)
    # TF32 is switched on for auto on CUDA only.
    assert precision.configure_tf32("auto", CPU) is False
    assert precision.configure_tf32("none", CUDA) is False


def test_cli_refuses_bf16_training_on_the_cpu_in_one_line(tmp_path: Path, capsys) -> None:
    args = ["train", "--run-dir", str(tmp_path / "run"), "--no-progress"]
    for override in _tiny_run(tmp_path / "data", **{"train.amp": "bf16"}):
        args += ["--set", override]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err  # refused before any data work
    assert err.startswith("semiseg train: error: train.amp: bf16 autocast is refused on the CPU")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_combine_losses_weights_scales_and_skips_zero_weights() -> None:
    terms = {"a": torch.tensor(2.0), "b": torch.tensor(float("nan")), "c": torch.tensor(3.0)}
    total, effective = combine_losses(terms, {"a": 0.5, "b": 0.0}, {"c": 2.0})
    assert effective == {"a": 0.5, "b": 0.0, "c": 2.0}
    assert float(total) == 0.5 * 2.0 + 2.0 * 3.0  # the NaN term, weighted 0, is left out


def test_self_check_passes_a_healthy_network_and_sees_autocast() -> None:
    net, image, label = healthy_network()
    result = precision.check_precision(loss_of(net, image, label), dict(net.named_parameters()),
                                       torch.bfloat16, CPU)
    assert result.loss_error < 1e-3 and abs(result.grad_norm_ratio - 1) < 0.05
    assert result.loss_reduced != result.loss_fp32  # bf16 did change the arithmetic
    assert all(p.grad is None for p in net.parameters())  # gradients are not left behind


@pytest.mark.parametrize("factor", [1e3, float("inf")])
def test_self_check_stops_a_faulty_reduced_precision_op(factor: float) -> None:
    net, image, label = faulty_network(factor)
    with pytest.raises(NumericsError) as info:
        precision.check_precision(loss_of(net, image, label), dict(net.named_parameters()),
                                  torch.bfloat16, CPU)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("train.amp: the bf16 self-check on cpu failed before the first "
                              "step: ")
    assert message.endswith("train in fp32 with train.amp=none")
    if factor == float("inf"):
        assert "non-finite values (encoder.block_one.conv.0.weight" in message
    else:  # the measured disagreement is in the message, with its bound
        assert "gradient norm of encoder.block_one.conv.0.weight is" in message
        assert "(allowed 1/10..10)" in message and "allowed 1/1.5..1.5" in message


def test_self_check_bound_on_the_loss() -> None:
    check = precision.PrecisionCheck("bf16", "cuda:0", 2.0, 2.1, 1.0, 1.0, "w", 1.0, ())
    assert check.loss_error == pytest.approx(0.05)
    (failure,) = check.failures(precision.PrecisionBound())
    assert failure == "loss 2.1 vs fp32 2 (relative error 0.05 > 0.02)"
    assert check.failures(precision.PrecisionBound(loss_rtol=0.06)) == []


@pytest.mark.parametrize("isa", ["default", "AVX2"])
def test_self_check_at_each_onednn_level(isa: str) -> None:
    env = dict(os.environ)
    env.pop("ONEDNN_MAX_CPU_ISA", None)
    env.pop("ATEN_CPU_CAPABILITY", None)
    if isa != "default":  # oneDNN's and ATen's own kernels both at the AVX2 level
        env["ONEDNN_MAX_CPU_ISA"] = isa
        env["ATEN_CPU_CAPABILITY"] = isa.lower()
    proc = subprocess.run([sys.executable, str(HERE / "_precision_probe.py")], env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["onednn_max_cpu_isa"] == isa
    healthy, faulty = out["healthy"], out["faulty"]
    assert healthy["failures"] == [], healthy
    assert healthy["loss_error"] < 1e-3 and abs(healthy["grad_norm_ratio"] - 1) < 0.05
    assert faulty["grad_norm_ratio"] > 10 and len(faulty["failures"]) == 2, faulty


def _faulty_head(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every VNet's head gets the injected faulty op in front of it."""
    from _precision_nets import FaultyBlock

    from semiseg.models.vnet import VNet

    original = VNet.head
    monkeypatch.setattr(VNet, "head", lambda self, x: original(self, FaultyBlock()(x)))


@pytest.mark.parametrize("faulty", [False, True])
def test_trainer_runs_the_self_check_before_the_first_step(tmp_path: Path, faulty: bool,
                                                           monkeypatch) -> None:
    # Stand in for a device that allows bf16 autocast: the CPU policy is lifted for this test.
    monkeypatch.setattr(precision, "resolve_amp_dtype", lambda choice, device: torch.bfloat16)
    if faulty:
        _faulty_head(monkeypatch)
    # 48^3 crops: no feature map is 2 voxels deep, where oneDNN's AVX-512 bf16 kernel fails
    # (with 32^3 crops this very check stops the run on such a CPU).
    config = load_config(None, _tiny_run(tmp_path / "data", **{
        "train.amp": "bf16", "data.phantom.shape": "[56, 56, 48]",
        "data.patch_size": "[48, 48, 48]", "model.options": "{n_filters: 2}"}))
    trainer = Trainer(config, tmp_path / "run", show_progress=False)
    if faulty:
        with pytest.raises(NumericsError, match="the bf16 self-check on cpu failed"):
            trainer.fit()
        assert not (tmp_path / "run" / "checkpoints").exists()  # nothing trained
        return
    trainer.fit()
    report = json.loads((tmp_path / "run" / "precision_check.json").read_text())
    assert report["dtype"] == "bf16" and report["device"] == "cpu"
    assert report["loss_error"] < precision.BOUNDS[torch.bfloat16].loss_rtol
    assert report["loss_reduced"] != report["loss_fp32"]


def test_a_non_finite_loss_stops_the_run_with_one_line(tmp_path: Path, capsys,
                                                       monkeypatch) -> None:
    original = Supervised.training_step

    def poisoned(self, batch, step):
        terms = original(self, batch, step)
        if step.iteration == 1:
            terms = {k: v * float("nan") for k, v in terms.items()}
        return terms

    monkeypatch.setattr(Supervised, "training_step", poisoned)
    run = tmp_path / "run"
    args = ["train", "--run-dir", str(run), "--no-progress"]
    for override in _tiny_run(tmp_path / "data"):
        args += ["--set", override]
    assert main(args) == 2
    captured = capsys.readouterr().err
    assert "Traceback" not in captured
    err = captured.strip().splitlines()[-1]  # after the phantom generator's progress bar
    assert err.startswith("semiseg train: error: the loss became nan at iteration 1 (terms: ")
    assert "Try: lower train.lr, or set train.grad_clip" in err
    assert json.loads((run / "state.json").read_text())["status"] == "failed"
    # The checkpoint written after iteration 1 (0-based 0) is there and finite.
    with open(run / "log.csv", encoding="utf-8") as handle:
        assert [int(r["iteration"]) for r in csv.DictReader(handle)] == [1]
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=False)
    assert state["iteration"] == 1
    assert all(torch.isfinite(v).all() for v in state["method"].values()
               if v.is_floating_point())
