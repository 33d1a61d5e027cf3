"""Training precision: the ``train.amp`` policy and the numerics self-check.

Policy (evidence in docs/distributed.md, "Precision policy"):

* ``auto`` trains in fp32 on every device; on CUDA devices TF32 matrix multiplications and
  convolutions are allowed. It will mean bf16 on GPUs only once a GPU run shows bf16 reaching
  the fp32 Dice (docs/performance.md).
* ``none`` trains in fp32 with PyTorch's own TF32 defaults.
* ``bf16`` / ``fp16`` autocast the training forward. On the CPU they are refused: oneDNN's
  AVX-512 bf16 kernel for the weight gradient of a 3x3x3 convolution returns wrong values (0.6
  to inf relative error, different from call to call) when a feature map is two voxels deep,
  which the bottleneck of every 32^3 crop is (measured with torch 2.13.0 on AMD EPYC with
  AVX512-BF16; ``benchmarks/cpu_bf16_probe.py`` reproduces it). On other devices the run first
  passes :func:`check_precision`.

The self-check runs one training step of the run's own method on the run's own first batch
twice, in fp32 and under autocast to the requested dtype, from the same weights and random
state, and compares the total loss and the gradients. Criteria and bounds are
:class:`PrecisionBound`; a failure stops the run before its first step with one line naming
the dtype, the device and the measured disagreement.
"""

from __future__ import annotations

import contextlib
import copy
import math
import random
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn

from semiseg.errors import ConfigError, NumericsError

if TYPE_CHECKING:
    from semiseg.methods.base import Batch, StepInfo

DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}

CPU_REFUSAL = (
    "train.amp: {name} autocast is refused on the CPU: oneDNN's bf16 kernel for the weight "
    "gradient of a 3x3x3 convolution returns wrong gradients (relative error 0.6 to inf) when "
    "a feature map is two voxels deep, as the bottleneck of a 32^3 crop is (AVX-512 CPUs, "
    "torch 2.13.0; docs/distributed.md). Train in fp32 on the CPU: train.amp=auto or none"
)


def resolve_amp_dtype(choice: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype of ``train.amp`` for training on ``device`` (None = fp32).

    ``auto`` and ``none`` are fp32 everywhere; ``bf16`` / ``fp16`` name the dtype and are
    refused on the CPU (see the module docstring).
    """
    if choice == "auto":
        return None
    if choice not in DTYPES:
        raise ConfigError(f"train.amp: {choice!r} is not one of auto, none, bf16, fp16")
    dtype = DTYPES[choice]
    if dtype is not None and device.type == "cpu":
        raise ConfigError(CPU_REFUSAL.format(name=choice))
    return dtype


def configure_tf32(choice: str, device: torch.device) -> bool:
    """Allow TF32 matmuls and convolutions on CUDA under ``train.amp: auto``; returns whether
    TF32 was switched on (``none`` leaves PyTorch's defaults alone)."""
    if choice != "auto" or device.type != "cuda":
        return False
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return True


@dataclass(frozen=True)
class PrecisionBound:
    """How far a reduced-precision step may stray from fp32 and still train.

    * ``loss_rtol``: ``|L_amp / L_fp32 - 1|``. Measured for bf16 on the CPU: 1e-5 to 6e-5 on
      VNets of 4 to 16 filters with and without normalisation (32^3 to 64^3 crops), up to
      2.9e-3 for a GA-CPS step of two 2-filter batch-norm VNets (48^3); fp16 up to 6.2e-3.
    * ``grad_norm_ratio``: the total gradient norm may differ by this factor either way.
      Measured: 0.94 to 1.03 on the VNets above, 0.86 to 1.21 on the 2-filter GA-CPS step.
    * ``param_norm_ratio``: so may the gradient norm of each parameter tensor that carries at
      least ``material_share`` of the squared total. Measured: up to a factor 3.4 (a batch-norm
      bias of 2 channels); parameters below the share (conv biases in front of a normalisation,
      whose true gradient is ~0 and whose reduced-precision gradient is rounding noise) are
      only required to be finite.
    Everything must be finite. The faults this is for are far outside: the AVX-512 bf16
    weight-gradient fault gave a total gradient norm of 3e36 against 2.2 (a 32^3 VNet step).
    """

    loss_rtol: float = 2e-2
    grad_norm_ratio: float = 1.5
    param_norm_ratio: float = 10.0
    material_share: float = 1e-3


# fp16 keeps 3 more mantissa bits than bf16 but has a narrow range (a gradient scaler handles
# the range in training; the self-check's single step is unscaled): the same bounds.
BOUNDS: dict[torch.dtype, PrecisionBound] = {
    torch.bfloat16: PrecisionBound(),
    torch.float16: PrecisionBound(),
}


@dataclass(frozen=True)
class PrecisionCheck:
    """What one fp32-vs-reduced training step measured."""

    dtype: str
    device: str
    loss_fp32: float
    loss_reduced: float
    grad_norm_fp32: float
    grad_norm_reduced: float
    worst_parameter: str  # the material parameter whose gradient norm ratio is furthest from 1
    worst_parameter_ratio: float  # its ||g_reduced|| / ||g_fp32||
    nonfinite: tuple[str, ...]  # parameters whose reduced-precision gradient is not finite

    @property
    def loss_error(self) -> float:
        if not (math.isfinite(self.loss_reduced) and math.isfinite(self.loss_fp32)):
            return math.inf
        return abs(self.loss_reduced / self.loss_fp32 - 1.0) if self.loss_fp32 else math.inf

    @property
    def grad_norm_ratio(self) -> float:
        return self.grad_norm_reduced / self.grad_norm_fp32 if self.grad_norm_fp32 else math.inf

    def failures(self, bound: PrecisionBound) -> list[str]:
        """Each criterion of ``bound`` that this step breaks, as a phrase with its numbers."""
        out = []
        if self.nonfinite or not math.isfinite(self.loss_reduced):
            names = ", ".join(self.nonfinite[:3]) or "the loss"
            out.append(f"non-finite values ({names})")
        if not self.loss_error <= bound.loss_rtol:
            out.append(f"loss {self.loss_reduced:.6g} vs fp32 {self.loss_fp32:.6g} "
                       f"(relative error {self.loss_error:.2g} > {bound.loss_rtol:g})")
        if not _within(self.grad_norm_ratio, bound.grad_norm_ratio):
            out.append(f"gradient norm {self.grad_norm_reduced:.4g} vs fp32 "
                       f"{self.grad_norm_fp32:.4g} (ratio {self.grad_norm_ratio:.3g}, allowed "
                       f"1/{bound.grad_norm_ratio:g}..{bound.grad_norm_ratio:g})")
        if self.worst_parameter and not _within(self.worst_parameter_ratio,
                                                bound.param_norm_ratio):
            out.append(f"gradient norm of {self.worst_parameter} is "
                       f"{self.worst_parameter_ratio:.3g} x fp32 (allowed "
                       f"1/{bound.param_norm_ratio:g}..{bound.param_norm_ratio:g})")
        return out

    def to_dict(self) -> dict[str, object]:
        return {**asdict(self), "nonfinite": list(self.nonfinite),
                "loss_error": self.loss_error, "grad_norm_ratio": self.grad_norm_ratio}


def _within(ratio: float, factor: float) -> bool:
    return math.isfinite(ratio) and ratio > 0 and 1.0 / factor <= ratio <= factor


@contextlib.contextmanager
def _same_randomness(seed: int, device: torch.device) -> Iterator[None]:
    """Run the block from a fixed random state and give the caller's state back afterwards."""
    py_state, np_state = random.getstate(), np.random.get_state()
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def _step_gradients(loss_fn: Callable[[], Tensor], parameters: Mapping[str, nn.Parameter],
                    dtype: torch.dtype | None, device: torch.device,
                    seed: int) -> tuple[float, dict[str, Tensor]]:
    for p in parameters.values():
        p.grad = None
    with _same_randomness(seed, device):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = loss_fn()
        loss.float().backward()
    grads = {name: (p.grad.detach().float().clone() if p.grad is not None
                    else torch.zeros_like(p, dtype=torch.float32))
             for name, p in parameters.items()}
    for p in parameters.values():
        p.grad = None
    return float(loss.detach()), grads


def _norm(tensors: Mapping[str, Tensor]) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors.values()))


def measure_precision(loss_fn: Callable[[], Tensor], parameters: Mapping[str, nn.Parameter],
                      dtype: torch.dtype, device: torch.device, seed: int = 0,
                      material_share: float = PrecisionBound.material_share) -> PrecisionCheck:
    """One forward+backward of ``loss_fn`` in fp32 and under ``dtype`` autocast, compared.

    ``loss_fn`` computes the scalar training loss from scratch (it is called twice, each time
    from the same random state ``seed``); ``parameters`` are the trainable tensors whose
    gradients are compared. Their values are not changed; their ``.grad`` ends as None.
    Intended for a copy of the method, since a training step may update running statistics.
    """
    loss_ref, ref = _step_gradients(loss_fn, parameters, None, device, seed)
    loss_amp, amp = _step_gradients(loss_fn, parameters, dtype, device, seed)
    nonfinite = tuple(name for name, g in amp.items() if not bool(torch.isfinite(g).all()))
    total_ref = _norm(ref)
    worst, worst_ratio, worst_distance = "", 1.0, -1.0
    for name, g in ref.items():
        norm_ref = float(g.double().norm())
        if total_ref == 0 or norm_ref**2 < material_share * total_ref**2:
            continue
        ratio = float(amp[name].double().norm()) / norm_ref
        distance = abs(math.log(ratio)) if math.isfinite(ratio) and ratio > 0 else math.inf
        if distance > worst_distance:
            worst, worst_ratio, worst_distance = name, ratio, distance
    return PrecisionCheck(
        dtype=DTYPE_NAMES.get(dtype, str(dtype)), device=str(device),
        loss_fp32=loss_ref, loss_reduced=loss_amp, grad_norm_fp32=total_ref,
        grad_norm_reduced=_norm(amp), worst_parameter=worst, worst_parameter_ratio=worst_ratio,
        nonfinite=nonfinite)


def check_precision(loss_fn: Callable[[], Tensor], parameters: Mapping[str, nn.Parameter],
                    dtype: torch.dtype, device: torch.device, seed: int = 0,
                    bound: PrecisionBound | None = None) -> PrecisionCheck:
    """:func:`measure_precision`, raising :class:`NumericsError` when ``bound`` is broken."""
    bound = bound or BOUNDS.get(dtype, PrecisionBound())
    result = measure_precision(loss_fn, parameters, dtype, device, seed, bound.material_share)
    failures = result.failures(bound)
    if failures:
        raise NumericsError(precision_failure_message(result, failures))
    return result


def precision_failure_message(result: PrecisionCheck, failures: list[str]) -> str:
    return (f"train.amp: the {result.dtype} self-check on {result.device} failed before the "
            f"first step: {'; '.join(failures)}. Reduced precision does not train this network "
            "correctly on this device; train in fp32 with train.amp=none")


def loss_failure_message(value: float, iteration: int, terms: Mapping[str, float],
                         amp_dtype: torch.dtype | None) -> str:
    """The one line a non-finite loss stops a run with: where, which terms, what to try."""
    shown = ", ".join(f"{name}={v:.4g}" for name, v in terms.items())
    advice = "lower train.lr, or set train.grad_clip (e.g. 1.0)"
    if amp_dtype is not None:
        advice = f"train in fp32 (train.amp=none; this run used {DTYPE_NAMES[amp_dtype]}), " \
                 + advice
    return (f"the loss became {value} at iteration {iteration} (terms: {shown}); the last "
            f"checkpoint holds the weights before it. Try: {advice}")


def measure_method_precision(method: nn.Module, batch: Batch, step: StepInfo,
                             scales: Mapping[str, float], dtype: torch.dtype,
                             device: torch.device, seed: int = 0) -> PrecisionCheck:
    """:func:`measure_precision` of a method's weighted training loss on one batch at ``step``
    (its scheduled loss weights), run on a deep copy so the method itself is untouched."""
    from semiseg.engine.objective import combine_losses

    probe = copy.deepcopy(method)
    probe.train()

    def total_loss() -> Tensor:
        terms = probe.training_step(batch, step)
        return combine_losses(terms, probe.loss_weights(step), scales)[0]

    parameters = {name: p for name, p in probe.named_parameters() if p.requires_grad}
    return measure_precision(total_loss, parameters, dtype, device, seed=seed)
