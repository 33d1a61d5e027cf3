"""Seconds per training iteration and peak memory, per method, at the papers' setting.

    python benchmarks/train_step.py                       # all registered hosts, 96^3, batch 4
    python benchmarks/train_step.py --methods supervised ga_cps --patch 64 --iters 3
    python benchmarks/train_step.py --methods ga_cps scdl_ga_cps scdl_ga_cps:cdba_only

A method name may carry a variant after a colon: ``scdl_<host>:cdba_only`` (CDBA without SAC)
and ``scdl_<host>:sac_cap4`` (SAC limited to the 4 rarest classes per step), so that the cost
of each SCDL part over its host can be read off. MagicNet methods build the MagicNet VNet and
``tak`` the text-driven network (Synapse class names, packaged MiniLM embeddings).

Each method runs in its own process so that peak memory is its own (peak RSS on the CPU,
``torch.cuda.max_memory_allocated`` on a GPU). One iteration = the method's forward, the
weighted loss, backward, an SGD step and the method's after-step hook (EMA), on random data
with the official 2 labeled + 2 unlabeled batch.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

DEFAULT_METHODS = ["supervised", "cps", "ga_cps", "mean_teacher", "magicnet", "ga_magicnet",
                   "scdl_ga_cps:cdba_only", "scdl_ga_cps", "scdl_ga_magicnet:cdba_only",
                   "scdl_ga_magicnet", "tak", "dhc", "scdl_dhc", "generic_ssl", "scdl_generic_ssl",
                   "cld", "simis", "uamt"]
VARIANTS: dict[str, dict] = {
    "": {},
    "cdba_only": {"scdl": {"sac": False}},
    "sac_cap4": {"scdl": {"sac_max_classes": 4}},
}


def _model_name(method_name: str) -> str:
    if method_name == "tak":
        return "tak"
    if method_name.endswith("generic_ssl"):  # GenericSSL's diffusion VNet (DiffVNet)
        return "diff_vnet"
    return "magicnet" if method_name.endswith("magicnet") else "vnet"


def _measure(spec: str, patch: int, batch: int, labeled: int, iters: int, warmup: int,
             num_classes: int, device_name: str, threads: int, n_filters: int,
             cube: int = 0) -> dict:
    import torch

    from semiseg.catalog import build_method
    from semiseg.data.classes import get_class_set
    from semiseg.methods.base import Batch, MethodContext, StepInfo

    if threads:
        torch.set_num_threads(threads)
    method_name, _, variant = spec.partition(":")
    device = torch.device(device_name)
    class_names: tuple[str, ...] = ()
    if num_classes == 14:  # the Synapse set, so that tak finds its packaged knowledge
        class_names = ("background", *get_class_set("synapse").names)
    model_name = _model_name(method_name)
    model_options: dict = {"n_filters": n_filters}
    host_options: dict = {}
    # The official 3x3x3 magic cube; instance norm needs cubes >= 32.
    if model_name in ("magicnet", "tak"):
        host_options["cube_size"] = cube or patch // 3
        if host_options["cube_size"] < 32:
            model_options["normalization"] = "batchnorm"
    context = MethodContext(num_classes=num_classes, model_name=model_name,
                            model_options=model_options, patch_size=(patch,) * 3,
                            class_names=class_names)
    if method_name.startswith("scdl_"):
        options = {**VARIANTS[variant], "host": host_options}
    else:
        options = host_options
    method = build_method(method_name, context, options).to(device).train()
    if not method.semi_supervised:
        labeled = batch
    optimizer = torch.optim.SGD(method.parameter_groups(1e-4), lr=0.01, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    image = torch.randn(batch, 1, patch, patch, patch, generator=gen).to(device)
    label = torch.randint(0, num_classes, (labeled, patch, patch, patch), generator=gen).to(device)
    data = Batch(image, label, labeled, [str(i) for i in range(batch)])
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for it in range(warmup + iters):
        step = StepInfo(it + 200, 1000, 16)  # past warm-up phases (e.g. MagicNet's blending)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        terms = method.training_step(data, step)
        weights = method.loss_weights(step)
        total = sum(weights.get(k, 1.0) * v for k, v in terms.items())
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        method.after_step(step)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if it >= warmup:
            times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    params = sum(p.numel() for p in method.parameters())
    return {"method": spec, "device": device_name, "patch": patch, "batch": batch,
            "s_per_iter": sum(times) / len(times), "peak_mb": peak_mb, "parameters": params,
            "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=None)
    parser.add_argument("--patch", type=int, default=96)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--labeled", type=int, default=2)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--num-classes", type=int, default=14)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--n-filters", type=int, default=16, help="base filters (papers: 16)")
    parser.add_argument("--cube", type=int, default=0,
                        help="MagicNet cube size (default: patch / 3, the official 3x3x3 grid)")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()

    import torch

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.child:
        row = _measure(args.child, args.patch, args.batch, args.labeled, args.iters, args.warmup,
                       args.num_classes, device, args.threads, args.n_filters,
                       args.cube)
        print(json.dumps(row))
        return

    from semiseg.catalog import list_methods

    known = set(list_methods())
    methods = args.methods or [m for m in DEFAULT_METHODS if m.partition(":")[0] in known]
    rows = []
    for name in methods:
        cmd = [sys.executable, __file__, "--child", name, "--patch", str(args.patch),
               "--batch", str(args.batch), "--labeled", str(args.labeled),
               "--iters", str(args.iters), "--warmup", str(args.warmup),
               "--num-classes", str(args.num_classes), "--device", device,
               "--threads", str(args.threads), "--n-filters", str(args.n_filters),
               "--cube", str(args.cube)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
        if proc.returncode != 0:
            print(f"{name}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    title = (f"training step, patch {args.patch}^3, batch {args.batch} ({args.labeled} labeled), "
             f"{args.n_filters} base filters, device {device}")
    print(title)
    print(f"{'method':<28}{'s/iter':>10}{'peak MB':>12}{'params (M)':>12}")
    for row in rows:
        print(f"{row['method']:<28}{row['s_per_iter']:>10.3f}{row['peak_mb']:>12.0f}"
              f"{row['parameters'] / 1e6:>12.2f}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"title": title, "rows": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
