"""Training throughput, inference speed, FLOPs and the achieved fraction of the device's peak.

    python benchmarks/throughput.py                                  # the papers' setting
    python benchmarks/throughput.py --patch 32 --volume 64 64 48 --n-filters 8 --iters 1
                                                                      # CI-sized CPU run

For every method: training iterations per second and peak memory at ``--patch``^3, batch 4
(2 labeled + 2 unlabeled; one process per method, see ``train_step.py``), the forward FLOPs of
its inference network on one ``--patch``^3 crop, the sliding-window seconds per ``--volume``
volume, and the fraction of the device's peak FLOP/s that training achieves (a training
iteration costs about 3x the forward FLOPs of every network pass it makes; we count the
forward passes of the inference network only, so the fraction is a lower bound).

FLOPs are counted with PyTorch's own ``torch.utils.flop_counter.FlopCounterMode`` (no extra
dependency; it counts a multiply-add as 2 FLOPs). The papers' Table 6 (TAK) reports GFLOPs as
thop/ptflops do, i.e. multiply-accumulates: we print both, next to the published figures
(GA 143.40, TAK 150.96 at 96^3).

The device peak: ``--peak-tflops`` if given; on a known GPU the vendor's dense figure for the
precision in use; on the CPU the best float32 GEMM rate measured here (so the CPU fraction is
relative to what this machine's BLAS reaches, not a datasheet).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
PAPER_GMACS = {"ga_magicnet": 143.40, "tak": 150.96}  # TAK paper Table 6, 96^3 input
# Dense tensor-core peak (TFLOP/s) by device-name fragment and precision.
GPU_PEAKS = {
    "H200": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    "H100": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5},
}
DEFAULT_METHODS = ["supervised", "ga_cps", "scdl_ga_cps", "ga_magicnet", "scdl_ga_magicnet", "tak"]


def _model_for(method: str) -> str:
    if method == "tak":
        return "tak"
    return "magicnet" if method.endswith("magicnet") else "vnet"


def _cube(patch: int) -> int:
    """The official 3x3x3 magic-cube grid where it fits VNet's /16, else 16^3 cubes."""
    return patch // 3 if (patch // 3) % 16 == 0 else 16


def _network(method: str, num_classes: int, n_filters: int, patch: int) -> torch.nn.Module:
    """The inference network of ``method`` (built through the method, so plug-ins are in it)."""
    from semiseg.catalog import build_method
    from semiseg.data.classes import get_class_set
    from semiseg.methods.base import MethodContext

    model = _model_for(method)
    model_options: dict = {"n_filters": n_filters}
    host: dict = {}
    if model != "vnet":
        host["cube_size"] = _cube(patch)
        if host["cube_size"] < 32:
            model_options["normalization"] = "batchnorm"
    names = ("background", *get_class_set("synapse").names) if num_classes == 14 else ()
    context = MethodContext(num_classes=num_classes, model_name=model, model_options=model_options,
                            patch_size=(patch,) * 3, class_names=names)
    options = {"host": host} if method.startswith("scdl_") else host
    return build_method(method, context, options).eval().inference_network()


def count_flops(net: torch.nn.Module, patch: int, device: torch.device) -> float:
    """Forward FLOPs (multiply-add = 2) of ``net`` on one ``1 x 1 x patch^3`` crop."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, 1, patch, patch, patch, device=device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(x)
    return float(counter.get_total_flops())


def cpu_peak_tflops(size: int = 1024, repeats: int = 5) -> float:
    """Best float32 GEMM rate this process reaches (TFLOP/s): the CPU's practical peak."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e12


def device_peak_tflops(device: torch.device, precision: str, override: float | None) -> float:
    if override:
        return override
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for fragment, peaks in GPU_PEAKS.items():
            if fragment in name:
                return peaks[precision]
        raise SystemExit(f"unknown GPU {name!r}: pass --peak-tflops")
    return cpu_peak_tflops()


def train_rows(args: argparse.Namespace, device: str) -> dict[str, dict]:
    """Run ``train_step.py`` (one process per method) and return its rows by method."""
    out = Path(args.work) / "train_step.json"
    cmd = [sys.executable, str(HERE / "train_step.py"), "--methods", *args.methods,
           "--patch", str(args.patch), "--batch", "4", "--labeled", "2", "--iters",
           str(args.iters), "--warmup", "1", "--device", device, "--threads", str(args.threads),
           "--n-filters", str(args.n_filters), "--cube", str(_cube(args.patch)),
           "--json", str(out)]
    subprocess.run(cmd, check=True, env=os.environ.copy(), stdout=subprocess.DEVNULL)
    return {row["method"]: row for row in json.loads(out.read_text())["rows"]}


def inference_seconds(net: torch.nn.Module, shape: list[int], patch: int, stride: list[int],
                      sw_batch: int, device: torch.device, amp: torch.dtype | None) -> float:
    from semiseg.engine.inference import predict_volume

    volume = np.random.default_rng(0).random(shape, dtype=np.float32)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    predict_volume(net, volume, (patch,) * 3, stride, sw_batch, "constant", device, amp)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def fmt(value: float | None, spec: str) -> str:
    """``value`` formatted with ``spec``, or a right-aligned dash of the same width."""
    return format(value, spec) if value is not None else format("-", ">" + spec.split(".")[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    parser.add_argument("--patch", type=int, default=96)
    parser.add_argument("--volume", type=int, nargs=3, default=[256, 256, 144])
    parser.add_argument("--stride", type=int, nargs=3, default=[32, 32, 16])
    parser.add_argument("--sw-batch", type=int, default=4)
    parser.add_argument("--n-filters", type=int, default=16)
    parser.add_argument("--iters", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--amp", choices=["auto", "none", "bf16"], default="auto",
                        help="inference precision (auto: bf16 on a GPU that supports it)")
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--skip-inference", action="store_true")
    parser.add_argument("--work", default="runs/benchmarks")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu")
                          if args.device == "auto" else args.device)
    amp = None
    if args.amp == "bf16" or (args.amp == "auto" and device.type == "cuda"
                              and torch.cuda.is_bf16_supported()):
        amp = torch.bfloat16
    precision = "bf16" if amp is not None else "fp32"
    Path(args.work).mkdir(parents=True, exist_ok=True)

    peak = device_peak_tflops(device, "fp32", args.peak_tflops)
    train = train_rows(args, device.type)
    rows = []
    for method in args.methods:
        torch.manual_seed(0)
        net = _network(method, 14, args.n_filters, args.patch).to(device)
        flops = count_flops(net, args.patch, device)
        seconds = None
        if not args.skip_inference:
            seconds = inference_seconds(net, args.volume, args.patch, args.stride,
                                        args.sw_batch, device, amp)
        step = train.get(method)
        row = {"method": method, "fwd_gflops": flops / 1e9, "fwd_gmacs": flops / 2e9,
               "paper_gmacs": PAPER_GMACS.get(method), "infer_s": seconds,
               "it_per_s": 1 / step["s_per_iter"] if step else None,
               "peak_mb": step["peak_mb"] if step else None}
        # Lower bound: 4 crops x (forward + ~2x backward) of the inference network per step.
        if step:
            row["train_tflops"] = 4 * 3 * flops / step["s_per_iter"] / 1e12
            row["peak_fraction"] = row["train_tflops"] / peak
        rows.append(row)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device {device} ({name}, {torch.get_num_threads()} threads), train fp32 at "
          f"{args.patch}^3 batch 4, "
          f"{args.n_filters} filters; inference {precision} on {tuple(args.volume)}, stride "
          f"{tuple(args.stride)}, {args.sw_batch} windows per batch; peak {peak:.2f} TFLOP/s")
    print(f"{'method':<20}{'it/s':>8}{'peak MB':>9}{'GFLOPs':>9}{'GMACs':>8}{'paper':>8}"
          f"{'s/volume':>10}{'% peak':>8}")
    for row in rows:
        print(f"{row['method']:<20}{fmt(row['it_per_s'], '8.3f')}{fmt(row['peak_mb'], '9.0f')}"
              f"{row['fwd_gflops']:9.2f}{row['fwd_gmacs']:8.2f}{fmt(row['paper_gmacs'], '8.2f')}"
              f"{fmt(row['infer_s'], '10.2f')}"
              f"{fmt(100 * row['peak_fraction'] if 'peak_fraction' in row else None, '8.2f')}")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": str(device), "peak_tflops": peak,
                                               "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
