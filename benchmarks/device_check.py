"""Everything a GPU session should measure, in one run of at most 8 minutes, as one Markdown
report (run it through ``benchmarks/device_check.sh``; docs/performance.md holds its output).

    python benchmarks/device_check.py --out runs/device_check            # on a GPU
    python benchmarks/device_check.py --out /tmp/dc --smoke              # minutes on a CPU

Sections:

1. **Numerics self-check** (semiseg.engine.precision) of one training step per host method at
   96^3, batch 4: bf16 and fp16 autocast against fp32, and fp32 with TF32 against strict fp32.
2. **Training step** seconds and peak memory per host method, 96^3, batch 4 (2 labelled),
   16 base filters, fp32 (``benchmarks/train_step.py`` in a child process per method).
3. **Sliding-window inference** seconds per 256x256x144 volume at 1, 4 and 16 windows per batch
   (96^3 windows, stride 32x32x16), with the trained phantom network of section 4 checking that
   the label maps of every batch size are identical.
4. **A short phantom run** (the comparison protocol's lower bound, shortened) in fp32 and in
   bf16, with the test Dice of each.
5. **The comparison grid, many cells at once**: one ``semiseg experiment run`` process per
   row of ``configs/compare/grid_converged.yaml`` (seed 0, shortened), all on the one GPU at
   the same time, as ``experiment.device`` runs the grid unchanged; each row's steady seconds
   per iteration under that sharing, and from them the GPU hours of the whole 5-seed grid.

Each section has its own time budget and is cut short, said so in the report, when it runs
out; a failing section is reported and the next one runs.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
HOSTS = ["supervised", "ga_cps", "ga_magicnet", "scdl_ga_cps", "scdl_ga_magicnet", "tak"]


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    import platform

    return f"CPU {platform.processor() or platform.machine()} (torch {torch.__version__}, " \
           f"{torch.get_num_threads()} threads)"


def _method_batch(name: str, patch: int, n_filters: int, device: torch.device):
    sys.path.insert(0, str(HERE))
    from train_step import _model_name

    from semiseg.catalog import build_method
    from semiseg.data.classes import get_class_set
    from semiseg.methods.base import Batch, MethodContext

    model = _model_name(name)
    host: dict = {}
    model_options: dict = {"n_filters": n_filters}
    if model in ("magicnet", "tak"):
        # The official 3x3x3 grid of 32^3 cubes at 96^3; a 2x2x2 grid when 3 does not divide.
        host["cube_size"] = patch // 3 if patch % 3 == 0 else patch // 2
        if host["cube_size"] < 32:
            model_options["normalization"] = "batchnorm"
    context = MethodContext(num_classes=14, model_name=model, model_options=model_options,
                            patch_size=(patch,) * 3,
                            class_names=("background", *get_class_set("synapse").names))
    options = {"host": host} if name.startswith("scdl_") else host
    torch.manual_seed(0)
    method = build_method(name, context, options).to(device).train()
    gen = torch.Generator().manual_seed(0)
    # Phantom-like input: smooth blobs whose label is an intensity band (a learnable signal).
    image = torch.nn.functional.avg_pool3d(torch.rand(4, 1, patch, patch, patch, generator=gen),
                                           5, 1, 2)
    image = (image - image.min()) / (image.max() - image.min())
    label = (image[:2, 0] * 14).long().clamp_max(13)
    return method, Batch(image.to(device), label.to(device), 2, ["a", "b", "c", "d"])


def numerics(device: torch.device, patch: int, n_filters: int, methods: list[str],
             budget: float) -> list[str]:
    from semiseg.engine.objective import combine_losses
    from semiseg.engine.precision import BOUNDS, PrecisionBound, measure_precision
    from semiseg.methods.base import StepInfo

    lines = ["| method | precision | loss rel. error | grad-norm ratio | worst parameter ratio |"
             " verdict |", "|---|---|---:|---:|---:|---|"]
    start = time.perf_counter()
    step = StepInfo(999, 1000, 16)
    for name in methods:
        method, batch = _method_batch(name, patch, n_filters, device)
        params = {n: p for n, p in method.named_parameters() if p.requires_grad}

        def loss(m=method, b=batch):
            return combine_losses(m.training_step(b, step), m.loss_weights(step), {})[0]

        for label, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16), ("tf32", None)):
            if time.perf_counter() - start > budget:
                lines.append(f"| ... | | | | | budget of {budget:.0f} s spent |")
                return lines
            if dtype is None:  # TF32 against strict fp32, as train.amp=auto runs on GPUs
                if device.type != "cuda":
                    continue
                result = _tf32_check(loss, params, device)
                bound = PrecisionBound()
            else:
                result = measure_precision(loss, params, dtype, device)
                bound = BOUNDS[dtype]
            failures = result.failures(bound)
            verdict = "ok" if not failures else "FAIL: " + "; ".join(failures)
            lines.append(f"| {name} | {label} | {result.loss_error:.2e} | "
                         f"{result.grad_norm_ratio:.4f} | {result.worst_parameter_ratio:.3f} "
                         f"({result.worst_parameter}) | {verdict} |")
        del method
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return lines


def _tf32_check(loss, params, device):
    from semiseg.engine.precision import measure_precision

    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    # measure_precision's reference pass is "no autocast"; run it with TF32 off, then on.
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    strict = measure_precision(loss, params, torch.float32, device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    relaxed = measure_precision(loss, params, torch.float32, device)
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
    from dataclasses import replace

    return replace(relaxed, loss_fp32=strict.loss_fp32, grad_norm_fp32=strict.grad_norm_fp32)


def train_steps(device: torch.device, patch: int, n_filters: int, methods: list[str],
                iters: int, budget: float) -> list[str]:
    lines = ["| method | s / iteration | peak memory (MB) | parameters (M) |",
             "|---|---:|---:|---:|"]
    start = time.perf_counter()
    for name in methods:
        left = budget - (time.perf_counter() - start)
        if left < 5:
            lines.append(f"| ... | budget of {budget:.0f} s spent | | |")
            break
        cmd = [sys.executable, str(HERE / "train_step.py"), "--child", name, "--patch",
               str(patch), "--batch", "4", "--labeled", "2", "--iters", str(iters),
               "--warmup", "1", "--device", str(device), "--n-filters", str(n_filters)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=left)
        except subprocess.TimeoutExpired:
            lines.append(f"| {name} | timed out | | |")
            continue
        if proc.returncode != 0:
            tail = proc.stderr.strip().splitlines()[-1:] or ["?"]
            lines.append(f"| {name} | failed: {tail[0][:120]} | | |")
            continue
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        lines.append(f"| {name} | {row['s_per_iter']:.3f} | {row['peak_mb']:.0f} | "
                     f"{row['parameters'] / 1e6:.2f} |")
    return lines


def phantom_runs(device: torch.device, out: Path, iterations: int, smoke: bool) -> tuple[
        list[str], Path | None]:
    from semiseg.config import load_config
    from semiseg.engine.runs import evaluate_run
    from semiseg.engine.trainer import Trainer

    lines = ["| precision | iterations | test mean Dice | large | small | train s |",
             "|---|---:|---:|---:|---:|---:|"]
    trained = None
    precisions = ["none", "bf16"] if device.type == "cuda" else ["none"]
    for amp in precisions:
        overrides = [f"train.amp={amp}", f"train.max_iterations={iterations}",
                     f"experiment.device={device}", "train.validate_every=0",
                     f"train.checkpoint_every={iterations}",
                     f"data.root={out / 'phantom' / 'data'}"]
        if smoke:
            overrides += ["data.phantom.num_cases=10", "data.split=phantom",
                          "model.options={n_filters: 4}"]
        # The comparison protocol's lower bound (configs/compare/), shortened.
        config = load_config(REPO / "configs" / "compare" / "vnet_lower.yaml", overrides)
        run_dir = out / "phantom" / f"run_{amp}"
        started = time.perf_counter()
        Trainer(config, run_dir, resume=(run_dir / "checkpoints").exists(),
                show_progress=False).fit()
        seconds = time.perf_counter() - started
        result = evaluate_run(run_dir, save_predictions=False, show_progress=False)
        summary = result.summary
        label = "fp32" if amp == "none" else amp
        lines.append(f"| {label} | {iterations} | {summary.mean_dice:.2f} | "
                     f"{summary.large_dice:.2f} | {summary.small_dice:.2f} | {seconds:.0f} |")
        trained = trained or run_dir / "checkpoints" / "best.pt"
    return lines, trained


def inference(device: torch.device, checkpoint: Path | None, shape: list[int],
              batches: list[int], budget: float) -> list[str]:
    from semiseg.engine.inference import predict_volume
    from semiseg.models import create_model

    lines = ["| network | windows per batch | s / volume | labels |", "|---|---:|---:|---|"]
    torch.manual_seed(0)
    nets = [("VNet 16 filters, random weights, 96^3 windows",
             create_model("vnet", 14).to(device).eval(), [96, 96, 96], [32, 32, 16])]
    if checkpoint is not None and checkpoint.exists():
        from semiseg.engine.runs import load_inference_network

        net, config = load_inference_network(checkpoint, device)
        nets.append(("phantom run of section 4 (trained)", net,
                     list(config.inference.patch_size), list(config.inference.stride)))
    volume = _phantom_volume(checkpoint, shape)
    start = time.perf_counter()
    for title, net, patch, stride in nets:
        reference = None
        for sw in batches:
            if time.perf_counter() - start > budget:
                lines.append(f"| ... | | | budget of {budget:.0f} s spent |")
                return lines
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            labels = predict_volume(net, volume, patch, stride, sw, "constant", device, None)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - t0
            same = "reference" if reference is None else (
                "identical" if np.array_equal(labels, reference) else
                f"{int((labels != reference).sum())} voxels differ")
            reference = labels if reference is None else reference
            lines.append(f"| {title} | {sw} | {seconds:.2f} | {same} |")
    return lines


def _probe_grid(out: Path, iterations: int, smoke: bool) -> tuple[Path, list[str], dict]:
    """A copy of the converged comparison grid, seed 0, shortened to ``iterations``, with its
    data in the phantom run's folder; returns the grid file, its rows and the full grid's
    iterations per row (for the extrapolation)."""
    import yaml

    source = REPO / "configs" / "compare" / "grid_converged.yaml"
    grid = yaml.safe_load(source.read_text(encoding="utf-8"))
    full = {}
    shared = [s for s in grid.get("set", []) if not s.startswith("train.max_iterations=")]
    default_length = next(int(s.split("=")[1]) for s in grid.get("set", [])
                          if s.startswith("train.max_iterations="))
    rows = []
    for row in grid["rows"]:
        if smoke and row["name"] not in ("vnet_lower", "ga_cps"):
            continue
        own = row.get("set", [])
        full[row["name"]] = next((int(s.split("=")[1]) for s in own
                                  if s.startswith("train.max_iterations=")), default_length)
        rows.append({"name": row["name"], "config": str(source.parent / row["config"]),
                     "set": [s for s in own if not s.startswith("train.max_iterations=")]})
    overrides = [*shared, f"train.max_iterations={iterations}",
                 f"data.root={out / 'phantom' / 'data'}"]
    if smoke:
        overrides += ["data.phantom.num_cases=10", "data.split=phantom",
                      "model.options={n_filters: 4}", "train.validate_every=0"]
    probe = {"name": "device_probe", "output_dir": str(out / "grid_probe" / "runs"),
             "seeds": [0], "set": overrides, "rows": rows}
    path = out / "grid_probe" / "grid.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(probe, sort_keys=False), encoding="utf-8")
    return path, [row["name"] for row in rows], full


def grid_probe(device: torch.device, out: Path, iterations: int, smoke: bool,
               budget: float, seeds: int = 5) -> list[str]:
    """Section 5: every row of the converged grid at once, one process each, on ``device``."""
    import os
    import signal

    import yaml

    from semiseg.config import load_config
    from semiseg.engine.setup import ensure_phantom

    path, rows, full = _probe_grid(out, iterations, smoke)
    # The data first, in this process, so that the row processes do not race to make it.
    probe = yaml.safe_load(path.read_text(encoding="utf-8"))
    ensure_phantom(load_config(REPO / "configs" / "compare" / "vnet_lower.yaml",
                               [s for s in probe["set"] if s.startswith("data.")]),
                   show_progress=False)
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    logs = out / "grid_probe"
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        procs = []
        for i in range(len(rows)):  # one process per row: each claims the next free cell
            log = stack.enter_context(open(logs / f"worker{i}.log", "w", encoding="utf-8"))
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "semiseg", "experiment", "run", str(path), "--device",
                 str(device), "--no-progress"], stdout=log, stderr=subprocess.STDOUT, env=env,
                start_new_session=True))
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(1.0, budget - (time.perf_counter() - started)))
        cut = [p for p in procs if p.poll() is None]
        for proc in cut:  # the budget is spent: what the logs hold so far is reported
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    wall = time.perf_counter() - started
    lines = [f"{len(rows)} processes at once, {iterations} iterations each, wall {wall:.0f} s"
             f"{f' ({len(cut)} cut at the budget)' if cut else ''}.", "",
             "| row | iterations done | s / iteration (steady, device shared) | "
             f"{seeds} seeds at full length, device minutes of steps |", "|---|---:|---:|---:|"]
    total = 0.0
    for name in rows:
        log = logs / "runs" / name / "seed0" / "log.csv"
        times, done = [], 0
        if log.exists():
            with open(log, newline="", encoding="utf-8") as handle:
                for record in csv.DictReader(handle):
                    done = max(done, int(float(record["iteration"])))
                    if record.get("time/iter_s"):
                        times.append(float(record["time/iter_s"]))
        # The first logged window holds the warm-up (cuDNN autotuning, allocator growth).
        steady = float(np.median(times[1:] if len(times) > 1 else times)) if times else None
        if steady is None:
            lines.append(f"| {name} | {done} | no timing logged | |")
            continue
        minutes = seeds * full[name] * steady / 60
        total += minutes
        lines.append(f"| {name} | {done} | {steady:.4f} | {minutes:.1f} |")
    lines += ["", f"Steps of the whole {seeds}-seed grid, {len(rows)} cells at a time: about "
              f"{total / len(rows):.0f} minutes of wall time on this device (the sum over rows "
              f"divided by the {len(rows)} cells sharing it; validation and test evaluation "
              "not included)."]
    return lines


def _phantom_volume(checkpoint: Path | None, shape: list[int]) -> np.ndarray:
    """A phantom test image (intensity-normalised as trained) resized to ``shape``; random
    noise when there is no trained run."""
    if checkpoint is None or not checkpoint.exists():
        return np.random.default_rng(0).random(shape, dtype=np.float32)
    from scipy import ndimage

    from semiseg.data.arrays import apply_intensity

    data = checkpoint.parents[2] / "data" / "images"
    first = sorted(data.glob("*.npy"))[-1]
    image = apply_intensity(np.load(first).astype(np.float32), "ga")
    zoom = [t / s for t, s in zip(shape, image.shape)]
    return ndimage.zoom(image, zoom, order=1).astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for runs and report")
    parser.add_argument("--device", default="auto", help="auto = cuda when there is one")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes, to check the script itself on a CPU")
    parser.add_argument("--iterations", type=int, default=1000, help="phantom run length")
    parser.add_argument("--probe-iterations", type=int, default=300,
                        help="length of each row in the grid section (cut at its budget)")
    args = parser.parse_args()
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu")
                          if args.device == "auto" else args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.smoke:
        patch, filters, methods, iters = 48, 2, ["supervised", "ga_cps"], 1
        shape, batches, iterations = [64, 64, 48], [1, 4], 3
        probe_iterations, probe_budget = 4, 120
    else:
        patch, filters, methods, iters = 96, 16, HOSTS, 3
        shape, batches, iterations = [256, 256, 144], [1, 4, 16], args.iterations
        probe_iterations, probe_budget = args.probe_iterations, 120
    report = [f"# Device check: {_device_name(device)}", "",
              f"`python benchmarks/device_check.py` on {time.strftime('%Y-%m-%d')}"
              f"{' (smoke sizes)' if args.smoke else ''}.", ""]
    trained: Path | None = None
    sections = [
        ("Numerics self-check, one training step at "
         f"{patch}^3, batch 4, {filters} filters (vs strict fp32)",
         lambda: numerics(device, patch, filters, methods, 90)),
        (f"Training step, {patch}^3, batch 4 (2 labelled), {filters} filters, fp32",
         lambda: train_steps(device, patch, filters, methods, iters, 150)),
        (f"Phantom run (configs/compare/vnet_lower.yaml), {iterations} iterations",
         lambda: phantom_runs(device, args.out, iterations, args.smoke)),
        (f"Sliding-window inference, {'x'.join(map(str, shape))} volume",
         lambda: inference(device, trained, shape, batches, 60)),
        ("Comparison grid (configs/compare/grid_converged.yaml), every row at once, seed 0",
         lambda: grid_probe(device, args.out, probe_iterations, args.smoke, probe_budget)),
    ]
    for title, run in sections:
        started = time.perf_counter()
        try:
            lines = run()
            if title.startswith("Phantom run"):
                lines, trained = lines
        except Exception as exc:  # a failing section is reported; the next one runs
            lines = [f"FAILED: {type(exc).__name__}: {exc}", "", "```",
                     traceback.format_exc()[-1500:], "```"]
        report += [f"## {title}", "", *lines, "",
                   f"({time.perf_counter() - started:.0f} s)", ""]
        text = "\n".join(report)
        (args.out / "device_check.md").write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
