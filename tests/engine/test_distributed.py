"""Data-parallel training: per-rank batches, a 2-process gloo run against a single process,
rank-0-only writes, resume under 2 processes, and the precision/batch-norm switches.

The 2-process run is exact-ish by construction: rank r's crops are rows r*b..(r+1)*b-1 of the
global batch a single process draws, the VNet has no normalization layers (no batch
statistics) and the loss is a plain voxel-mean cross entropy (GA-CE with k = 100 %, gamma = 1,
Dice weighted 0), so the mean of the two per-rank losses equals the single-process loss and
DDP's averaged gradient equals its gradient. Only the float32 summation order differs.

Why not instance norm: it is per-sample too, but on the 2x2x2 bottleneck of a 32^3 crop its
variance estimate amplifies float32 rounding chaotically (measured: max weight difference
3e-8 after one step, 3e-3 after four at lr 0.1, with DDP bit-equal to averaging per-sample
gradients by hand), which would leave the comparison no useful tolerance.
"""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from semiseg.config import load_config
from semiseg.data.sampling import TrainingBatches
from semiseg.engine import distributed
from semiseg.engine.checkpoint import load_checkpoint
from semiseg.engine.setup import prepare_run_data
from semiseg.engine.trainer import Trainer
from semiseg.errors import ConfigError

WORKER = Path(__file__).with_name("_ddp_worker.py")
# Max |w_ddp - w_single| over all weights after 4 SGD steps (lr 0.1): the two runs differ only
# in the float32 summation order of the loss and gradient (an all-reduce of two half-batch means
# vs one mean); measured 5e-7, while training moves the weights by 0.39. Bound: 1e-5.
DDP_TOLERANCE = 1e-5


# Voxel-mean cross entropy only: linear in the batch, so DDP equals the global batch.
CE_ONLY = {"method.options": "{loss: ga, ga_k: 100.0, ga_gamma: 1.0}",
           "train.loss_weights": "{dice: 0.0}"}


def _overrides(data_root: Path, batch_size: int, method: str = "supervised",
               normalization: str = "none", **extra: object) -> list[str]:
    """A tiny phantom run; ``extra`` maps dotted keys to values (CE_ONLY by default)."""
    extra = {**CE_ONLY, **extra} if method == "supervised" else extra
    overrides = [
        f"data.root={data_root}",
        "data.phantom.num_cases=10",
        "data.phantom.shape=[40, 40, 32]",
        "data.patch_size=[32, 32, 32]",
        f"model.options={{n_filters: 4, normalization: {normalization}}}",
        f"method.name={method}",
        f"train.batch_size={batch_size}",
        f"train.labeled_batch_size={batch_size}",
        "train.lr=0.1",
        "train.max_iterations=4",
        "train.checkpoint_every=2",
        "train.validate_every=2",
        "train.log_every=1",
        "inference.patch_size=[32, 32, 32]",
        "inference.validation_stride=[16, 16, 16]",
        "experiment.deterministic=true",
        "experiment.seed=5",
        "experiment.device=cpu",
    ]
    return overrides + [f"{k}={v}" for k, v in extra.items()]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _launch(spec: dict, tmp_path: Path, world: int = 2) -> None:
    """Start ``world`` worker processes with the variables torchrun would set."""
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(spec), encoding="utf-8")
    port = _free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                   WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                   OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, str(WORKER), str(spec_path)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=240)[0].decode(errors="replace"))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for rank, (proc, text) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f"rank {rank} failed:\n{text[-3000:]}"


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a
               if a[k].is_floating_point())


def test_two_gloo_processes_match_one_process_with_the_global_batch(tmp_path: Path) -> None:
    data = tmp_path / "data"
    single = load_config(None, _overrides(data, batch_size=2))
    # One thread, as the workers (OMP_NUM_THREADS=1): the thread count changes the order of
    # float reductions, which alone moves the weights by ~2e-5 over these steps.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        Trainer(single, tmp_path / "single", show_progress=False).fit()
    finally:
        torch.set_num_threads(threads)
    spec = {"overrides": _overrides(data, batch_size=1), "straight": str(tmp_path / "ddp"),
            "resumed": str(tmp_path / "ddp_resumed"), "stop_after": 3,
            "teacher": str(tmp_path / "teacher"), "out": str(tmp_path),
            "teacher_overrides": _overrides(data, 2, "mean_teacher", "batchnorm", **{
                "train.labeled_batch_size": 1, "train.max_iterations": 2,
                "train.validate_every": 0})}
    _launch(spec, tmp_path)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))

    # Each rank held its slice of the global batch: different crops, together the global one.
    assert (rank0["rank"], rank1["rank"], rank0["world_size"]) == (0, 1, 2)
    assert not torch.equal(rank0["first_image"], rank1["first_image"])
    global_image = prepare_run_data(single).batches[0]["image"]
    assert torch.equal(torch.cat([rank0["first_image"], rank1["first_image"]]), global_image)
    # (a) identical weights on both ranks after the resumed 2-process run
    assert all(torch.equal(rank0["method"][k], rank1["method"][k]) for k in rank0["method"])
    # ... also for a mean teacher: batch norm (per-process statistics on the CPU), an EMA
    # teacher outside DDP's gradient reduction, different noise per rank.
    teachers = [torch.load(tmp_path / f"teacher_rank{r}.pt")["method"] for r in (0, 1)]
    assert any(k.startswith("teacher.") for k in teachers[0])
    assert all(torch.equal(teachers[0][k], teachers[1][k]) for k in teachers[0])
    # Kill at 3 (checkpoint at 2) and resume under 2 processes: bit-identical to the straight run.
    straight = load_checkpoint(tmp_path / "ddp/checkpoints/last.pt")
    assert straight["world_size"] == 2 and len(straight["rng_per_rank"]) == 2
    assert all(torch.equal(straight["method"][k], rank0["method"][k]) for k in rank0["method"])
    # (b) the 2 x 1 run equals the single-process run with batch 2 within DDP_TOLERANCE ...
    reference = load_checkpoint(tmp_path / "single/checkpoints/last.pt")
    assert _max_diff(straight["method"], reference["method"]) <= DDP_TOLERANCE
    # ... a bound that means something: training moved the weights by far more than that.
    initial = Trainer(single, tmp_path / "unused", show_progress=False)
    initial._setup()
    assert _max_diff(initial.method.state_dict(), reference["method"]) > 100 * DDP_TOLERANCE
    np.testing.assert_allclose(straight["best_score"], reference["best_score"], atol=1e-6)

    # Rank 0 alone wrote: one TensorBoard event file, each iteration logged once.
    run = tmp_path / "ddp"
    assert len(list((run / "tensorboard").glob("events.*"))) == 1
    with open(run / "log.csv", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["iteration"]) for r in rows] == [1, 2, 3, 4]
    with open(tmp_path / "single/log.csv", encoding="utf-8") as handle:
        single_rows = list(csv.DictReader(handle))
    # The logged loss is the mean over ranks, i.e. the global-batch loss.
    np.testing.assert_allclose([float(r["loss/total"]) for r in rows],
                               [float(r["loss/total"]) for r in single_rows], rtol=1e-4)
    assert json.loads((run / "state.json").read_text())["status"] == "finished"
    assert not list(run.rglob("*.tmp"))


@pytest.mark.parametrize("semi", [False, True])
def test_shards_are_the_slices_of_the_global_batch(tmp_path: Path, semi: bool) -> None:
    config = load_config(None, _overrides(tmp_path / "data", batch_size=4))
    store_batches = prepare_run_data(config, semi_supervised=True).batches
    store, labeled, unlabeled = (store_batches.store, store_batches.labeled_ids,
                                 store_batches.unlabeled_ids if semi else [])
    patch = (32, 32, 32)
    # Global batch: 4 rows (2 labelled when semi-supervised); 2 ranks of 2 rows (1 labelled).
    whole = TrainingBatches(store, labeled, unlabeled, patch, 4, 2 if semi else 4, seed=7)
    local = [TrainingBatches(store, labeled, unlabeled, patch, 2, 1 if semi else 2,
                             seed=7).shard(r, 2) for r in (0, 1)]
    assert local[0].shard(0, 1).case_ids(3) == TrainingBatches(
        store, labeled, unlabeled, patch, 2, 1 if semi else 2, seed=7).case_ids(3)
    for iteration in (0, 5):
        g = whole[iteration]
        parts = [shard[iteration] for shard in local]
        if semi:  # labelled rows of both ranks first, then the unlabelled ones
            rows = [parts[0]["image"][:1], parts[1]["image"][:1],
                    parts[0]["image"][1:], parts[1]["image"][1:]]
        else:
            rows = [parts[0]["image"], parts[1]["image"]]
        assert torch.equal(torch.cat(rows), g["image"])
        assert torch.equal(torch.cat([p["label"] for p in parts]), g["label"])
        assert not torch.equal(parts[0]["image"], parts[1]["image"])
    with pytest.raises(ConfigError, match="rank 2 is not in 0..world_size-1"):
        whole.shard(2, 2)


def test_switch_resolution() -> None:
    cpu = torch.device("cpu")
    assert distributed.resolve_backend("auto", cpu) == "gloo"
    with pytest.raises(ConfigError, match="nccl needs CUDA"):
        distributed.resolve_backend("nccl", cpu)
    bn = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 1), torch.nn.BatchNorm3d(2))
    two_cpu = distributed.DistContext(rank=0, world_size=2, device=cpu)
    two_gpu = distributed.DistContext(rank=0, world_size=2, device=torch.device("cuda", 0))
    one_gpu = distributed.DistContext(device=torch.device("cuda", 0))
    assert distributed.resolve_sync_batchnorm("auto", two_gpu, bn) is True
    assert distributed.resolve_sync_batchnorm(False, two_gpu, bn) is False
    assert distributed.resolve_sync_batchnorm("auto", one_gpu, bn) is False
    assert distributed.resolve_sync_batchnorm("auto", two_cpu, bn) is False
    assert distributed.resolve_sync_batchnorm(True, two_gpu, torch.nn.Conv3d(1, 2, 1)) is False
    with pytest.raises(ConfigError, match="sync_batchnorm: true needs CUDA"):
        distributed.resolve_sync_batchnorm(True, two_cpu, bn)
    assert distributed.rank_seed(3, 1) != distributed.rank_seed(3, 0)


def test_env_without_torchrun_is_one_process(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    ctx = distributed.init_from_env("auto", "cpu")
    assert (ctx.rank, ctx.world_size, ctx.is_main, ctx.is_distributed) == (0, 1, True, False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ConfigError, match="RANK=2 is not in 0..WORLD_SIZE-1"):
        distributed.env_world()


def test_compile_and_channels_last_switches(tmp_path: Path) -> None:
    config = load_config(None, _overrides(tmp_path / "data", batch_size=2, **{
        "train.compile": "true", "train.channels_last": "true"}))
    trainer = Trainer(config, tmp_path / "run", show_progress=False)
    trainer._setup()  # builds only: compiling happens lazily at the first call
    assert trainer.method.network._compiled_call_impl is not None
    conv = trainer.method.network.out_conv.weight
    assert conv.is_contiguous(memory_format=torch.channels_last_3d)
    # In-place compile keeps the state-dict keys, so checkpoints load without it.
    assert "network.out_conv.weight" in trainer.method.state_dict()
