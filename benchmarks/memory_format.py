"""Training step in channels-last-3d against the plain layout, side by side, on the CPU.

    python benchmarks/memory_format.py                      # the comparison protocol's setting
    python benchmarks/memory_format.py --methods ga_cps --patch 96 --n-filters 16 --threads 2
    python benchmarks/memory_format.py --isa-levels default AVX2   # oneDNN's kernel levels

``train.channels_last: true`` stores weights and input crops as NDHWC. Whether that is faster
depends on the convolution kernels oneDNN picks for the CPU, so the figure is measured, per
method, in one process: two copies of the method with the same weights, one per layout, each
with its own SGD optimiser, take alternating steps on the same batch (drift in the machine's
load hits both). Printed: the median seconds per step of each, their ratio (plain /
channels-last: above 1 means channels-last is faster) and the largest relative difference of
the first step's loss terms (the same arithmetic in another order: float rounding only).

Each kernel level runs in its own process (``ONEDNN_MAX_CPU_ISA`` is read once, at start-up).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time

PROTOCOL_METHODS = ["supervised", "ga_cps", "ga_magicnet"]


def _model_name(method_name: str) -> str:
    return "magicnet" if method_name.endswith("magicnet") else "vnet"


def _measure(method_name: str, patch: int, n_filters: int, threads: int, repeats: int) -> dict:
    import torch

    from semiseg.catalog import build_method
    from semiseg.data.classes import get_class_set
    from semiseg.engine.objective import combine_losses
    from semiseg.methods.base import Batch, MethodContext, StepInfo

    torch.set_num_threads(threads)
    model_name = _model_name(method_name)
    model_options: dict = {"n_filters": n_filters}
    options: dict = {}
    if model_name == "magicnet":
        options["cube_size"] = patch // 2  # the protocol's 2x2x2 cube grid
        if options["cube_size"] < 32:  # a 1-voxel bottleneck: instance norm is undefined
            model_options["normalization"] = "batchnorm"
    context = MethodContext(num_classes=14, model_name=model_name, model_options=model_options,
                            patch_size=(patch,) * 3,
                            class_names=("background", *get_class_set("synapse").names))
    torch.manual_seed(0)
    plain = build_method(method_name, context, options).train()
    last = copy.deepcopy(plain).to(memory_format=torch.channels_last_3d)
    labeled = 2 if plain.semi_supervised else 4
    gen = torch.Generator().manual_seed(0)
    image = torch.randn(4, 1, patch, patch, patch, generator=gen)
    label = torch.randint(0, 14, (labeled, patch, patch, patch), generator=gen)
    sides = {
        "plain": (plain, Batch(image, label, labeled, ["a", "b", "c", "d"])),
        "channels_last": (last, Batch(image.contiguous(memory_format=torch.channels_last_3d),
                                      label, labeled, ["a", "b", "c", "d"])),
    }
    optimizers = {name: torch.optim.SGD(method.parameter_groups(1e-4), lr=0.01, momentum=0.9)
                  for name, (method, _) in sides.items()}
    times: dict[str, list[float]] = {name: [] for name in sides}
    first_terms: dict[str, dict[str, float]] = {}
    for it in range(repeats + 1):  # the first round warms both up and is not timed
        for name, (method, batch) in sides.items():
            step = StepInfo(it + 200, 1000, 16)  # past warm-up phases (MagicNet's blending)
            start = time.perf_counter()
            terms = method.training_step(batch, step)
            total, _ = combine_losses(terms, method.loss_weights(step), {})  # the trainer's sum
            optimizers[name].zero_grad(set_to_none=True)
            total.backward()
            optimizers[name].step()
            method.after_step(step)
            if it == 0:
                first_terms[name] = {key: float(value.detach()) for key, value in terms.items()}
            else:
                times[name].append(time.perf_counter() - start)
    loss_difference = max(abs(first_terms["plain"][key] - first_terms["channels_last"][key])
                          / max(abs(first_terms["plain"][key]), 1e-12)
                          for key in first_terms["plain"])
    plain_s = statistics.median(times["plain"])
    last_s = statistics.median(times["channels_last"])
    return {"method": method_name, "plain_s": plain_s, "channels_last_s": last_s,
            "ratio": plain_s / last_s, "first_step_loss_difference": loss_difference}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=PROTOCOL_METHODS)
    parser.add_argument("--patch", type=int, default=32, help="crop edge (protocol: 32)")
    parser.add_argument("--n-filters", type=int, default=8, help="base filters (protocol: 8)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (protocol: 1)")
    parser.add_argument("--repeats", type=int, default=7, help="timed steps per layout")
    parser.add_argument("--isa-levels", nargs="+", default=["default"],
                        help="oneDNN kernel levels, each in its own process: default, AVX2, ...")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_measure(args.child, args.patch, args.n_filters, args.threads,
                                  args.repeats)))
        return
    print(f"training step, {args.patch}^3 crops, batch 4, {args.n_filters} base filters, "
          f"{args.threads} thread(s), median of {args.repeats} alternating steps")
    print(f"{'isa':<9}{'method':<14}{'plain s':>9}{'cl s':>9}{'plain/cl':>10}"
          f"{'max rel Δ loss, step 1':>24}")
    for level in args.isa_levels:
        env = os.environ.copy()
        env.pop("ONEDNN_MAX_CPU_ISA", None)
        if level != "default":
            env["ONEDNN_MAX_CPU_ISA"] = level
        for name in args.methods:
            cmd = [sys.executable, __file__, "--child", name, "--patch", str(args.patch),
                   "--n-filters", str(args.n_filters), "--threads", str(args.threads),
                   "--repeats", str(args.repeats)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                print(f"{level:<9}{name:<14}failed: {proc.stderr.strip().splitlines()[-1]}")
                continue
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"{level:<9}{name:<14}{row['plain_s']:>9.3f}{row['channels_last_s']:>9.3f}"
                  f"{row['ratio']:>10.2f}{row['first_step_loss_difference']:>24.2e}")


if __name__ == "__main__":
    main()
