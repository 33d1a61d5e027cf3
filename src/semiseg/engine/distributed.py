"""Multi-process data-parallel training (PyTorch ``DistributedDataParallel``) and the
device-level switches of the trainer (SyncBatchNorm, channels-last, compile); the precision
policy lives in :mod:`semiseg.engine.precision`.

``torchrun --nproc_per_node N -m semiseg train --config CFG`` starts N processes; torchrun sets
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``, and
:func:`init_from_env` turns them into a process group (NCCL on GPUs, gloo on the CPU). Without
those variables, or with ``WORLD_SIZE=1``, nothing here does anything and the trainer runs
exactly as a plain single process.

How the pieces fit (see docs/distributed.md):

* **Data.** ``train.batch_size`` is the batch of *one* process; the global batch is
  ``batch_size x world_size``. Rank ``r`` takes rows ``r*b .. (r+1)*b - 1`` of the global batch
  that a single process with the global batch size would draw
  (:meth:`semiseg.data.sampling.TrainingBatches.shard`), so ranks see different crops and the
  union over ranks is exactly the single-process global batch.
* **Gradients.** The whole method is wrapped (:class:`TrainingForward`) and the wrapper goes
  into DDP, so one DDP forward covers every network a method runs in an iteration. DDP averages
  the gradients of the parameters that require them; EMA teachers (``requires_grad=False``) are
  not reduced: they are updated from the identical student weights and stay identical. DDP
  broadcasts rank 0's parameters and buffers once at wrapping (so independently initialised
  teachers agree too) and rank 0's buffers before every forward.
* **Batch norm.** ``train.sync_batchnorm: auto`` converts BatchNorm layers to SyncBatchNorm on
  GPUs when more than one process runs; ``false`` keeps per-process statistics.
* **Bookkeeping.** Only rank 0 writes (checkpoints, logs, TensorBoard, state.json, config).
  Every rank loads the checkpoint on resume; each rank's RNG state is saved and restored.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from semiseg.engine.objective import combine_losses
from semiseg.errors import ConfigError
from semiseg.utils.seed import resolve_device

# Rank 0 prepares the data (phantom generation can take minutes) while the others wait in a
# barrier; the default collective timeout (10 min for NCCL) would be too short for that.
PROCESS_GROUP_TIMEOUT = datetime.timedelta(minutes=60)


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in a (possibly one-process) data-parallel job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None
    owns_group: bool = False  # whether init_from_env created the group (and must destroy it)

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment variables (0, 1, 0 without)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as exc:
        raise ConfigError(f"torchrun environment: RANK/WORLD_SIZE/LOCAL_RANK must be "
                          f"integers ({exc})") from None
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"torchrun environment: RANK={rank} is not in 0..WORLD_SIZE-1 "
                          f"(WORLD_SIZE={world})")
    return rank, world, local


def resolve_backend(choice: str, device: torch.device) -> str:
    """``auto`` -> NCCL for CUDA devices, gloo otherwise; NCCL on a CPU device is an error."""
    if choice not in ("auto", "nccl", "gloo"):
        raise ConfigError(f"train.distributed_backend: {choice!r} is not one of auto, nccl, gloo")
    if choice == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if choice == "nccl" and device.type != "cuda":
        raise ConfigError("train.distributed_backend: nccl needs CUDA devices; this run is on "
                          f"{device} (use gloo or auto)")
    return choice


def init_from_env(backend: str = "auto", device: str = "auto") -> DistContext:
    """Join the process group described by torchrun's variables (no-op for one process).

    Each process of a multi-GPU job takes ``cuda:LOCAL_RANK``; an explicit ``cuda:N`` device
    in the config is refused there because every process would pick the same GPU. A process
    group that already exists (a test or a launcher made it) is used as it is and left alone.
    """
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
        owns = False
    else:
        rank, world, local = env_world()
        owns = world > 1
    resolved = resolve_device(device)
    if world > 1 and resolved.type == "cuda":
        if device.startswith("cuda:"):
            raise ConfigError(f"experiment.device: {device!r} names one GPU, but {world} "
                              "processes run; use 'cuda' or 'auto' (each process takes "
                              "cuda:LOCAL_RANK)")
        resolved = torch.device("cuda", local)
        torch.cuda.set_device(resolved)
    if world == 1:
        return DistContext(device=resolved)
    chosen = resolve_backend(backend, resolved)
    if owns:
        if not dist.is_available():
            raise ConfigError("this PyTorch build has no torch.distributed; run one process")
        dist.init_process_group(chosen, timeout=PROCESS_GROUP_TIMEOUT)
    else:
        chosen = str(dist.get_backend())
    return DistContext(rank, world, local, resolved, chosen, owns)


def teardown(ctx: DistContext) -> None:
    """Destroy the process group if :func:`init_from_env` created it."""
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def is_main_process() -> bool:
    """Rank 0 of the running group, or of torchrun's environment once the group is gone."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return os.environ.get("RANK", "0") == "0"


def barrier(ctx: DistContext) -> None:
    """Wait for every rank (no-op for one process)."""
    if ctx.is_distributed:
        dist.barrier()


@contextlib.contextmanager
def main_process_first(ctx: DistContext) -> Iterator[None]:
    """Run the block on rank 0 first, then on the others: one writer for shared files."""
    if ctx.is_distributed and not ctx.is_main:
        dist.barrier()
    try:
        yield
    finally:
        if ctx.is_distributed and ctx.is_main:
            dist.barrier()


def gather_objects(obj: Any, ctx: DistContext) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` for one process."""
    if not ctx.is_distributed:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def average_losses(total: Tensor, terms: dict[str, Tensor],
                   ctx: DistContext) -> tuple[float, dict[str, float]]:
    """The loss values to log: this process's for one process, the mean over ranks otherwise.

    Averaging also makes the non-finite-loss check collective: every rank sees the same
    values and stops together instead of leaving the others waiting in an all-reduce.
    """
    if not ctx.is_distributed:
        return float(total.detach()), {name: float(v.detach()) for name, v in terms.items()}
    stacked = torch.stack([total.detach().float(), *(v.detach().float() for v in terms.values())])
    dist.all_reduce(stacked)  # SUM: gloo has no AVG
    values = (stacked / ctx.world_size).tolist()
    return values[0], dict(zip(terms, values[1:], strict=True))


@torch.no_grad()
def broadcast_buffers(module: nn.Module, ctx: DistContext) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank."""
    if ctx.is_distributed:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def rank_seed(seed: int, rank: int, iteration: int = 0) -> int:
    """A 32-bit seed for the global RNGs of ``rank`` (ranks > 0 differ from rank 0, so their
    dropout masks and noise are not copies of rank 0's)."""
    return int(np.random.SeedSequence((int(seed), int(rank), int(iteration))).generate_state(1)[0])


def seed_rank(seed: int, rank: int, iteration: int = 0) -> None:
    """Reseed Python, NumPy and torch (all devices) with :func:`rank_seed`."""
    value = rank_seed(seed, rank, iteration)
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)


# --------------------------------------------------------------------------- switches


def has_batchnorm(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


def resolve_sync_batchnorm(choice: str | bool, ctx: DistContext, module: nn.Module) -> bool:
    """Whether to convert ``module``'s BatchNorm layers to SyncBatchNorm.

    ``auto``: on CUDA with more than one process and some BatchNorm in the method. ``true`` on
    the CPU is an error: PyTorch's SyncBatchNorm only synchronises GPU tensors.
    """
    if not ctx.is_distributed or not has_batchnorm(module):
        return False
    if choice == "auto":
        return ctx.device.type == "cuda"
    if choice is True and ctx.device.type != "cuda":
        raise ConfigError("train.sync_batchnorm: true needs CUDA devices (PyTorch's "
                          "SyncBatchNorm does not run on the CPU); use auto or false")
    return bool(choice)


def compile_networks(module: nn.Module) -> list[str]:
    """``torch.compile`` each network of a method in place (``nn.Module.compile``).

    Networks rather than the method, because a method's ``training_step`` is Python control
    flow over batches and schedules that would recompile every iteration; in-place compile
    keeps the state-dict keys, so checkpoints stay loadable without it. Nested methods
    (plug-ins wrapping a host) are searched for their networks. Returns the compiled names.
    """
    from semiseg.methods.base import Method

    compiled = []
    for name, child in module.named_children():
        if isinstance(child, Method):
            compiled += [f"{name}.{n}" for n in compile_networks(child)]
        elif any(True for _ in child.parameters()):
            child.compile()
            compiled.append(name)
    return compiled


# --------------------------------------------------------------------------- training step


class TrainingForward(nn.Module):
    """One training forward of a method as a module call, so DDP can wrap it.

    ``forward(batch, step)`` runs ``method.training_step`` under autocast, then weights and
    sums the terms with :func:`combine_losses` outside it, and returns ``(total, detached
    terms, effective weights of the terms the method schedules)``. Returning the terms
    detached matters under DDP: it then follows only the graph of ``total`` when looking for
    unused parameters, so a parameter used only by a term weighted 0 this iteration (a loss not
    switched on yet) counts as unused, not as awaited.
    """

    def __init__(self, method: nn.Module, scales: dict[str, float], device_type: str,
                 amp_dtype: torch.dtype | None) -> None:
        super().__init__()
        self.method = method
        self._scales = dict(scales)
        self._device_type = device_type
        self._amp_dtype = amp_dtype

    def forward(self, batch: Any, step: Any) -> tuple[Tensor, dict[str, Tensor],
                                                       dict[str, float]]:
        autocast = torch.autocast(self._device_type, dtype=self._amp_dtype,
                                  enabled=self._amp_dtype is not None)
        with autocast:
            terms = self.method.training_step(batch, step)
        scheduled = self.method.loss_weights(step)
        total, effective = combine_losses(terms, scheduled, self._scales)
        return (total, {name: value.detach() for name, value in terms.items()},
                {name: effective[name] for name in scheduled if name in effective})


def wrap_for_training(forward: TrainingForward, ctx: DistContext) -> nn.Module:
    """DDP around ``forward`` when several processes run; ``forward`` itself otherwise.

    ``find_unused_parameters=True`` because methods switch losses (and the parameters only
    they use) on and off by schedule. ``device_ids`` stays None: the batch is already on this
    rank's device and DDP would otherwise try to move the (non-tensor) step info.
    """
    if not ctx.is_distributed:
        return forward
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(forward, device_ids=None, find_unused_parameters=True,
                                   broadcast_buffers=True)
