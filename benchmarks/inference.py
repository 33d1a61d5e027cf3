"""Seconds per volume of sliding-window inference.

    python benchmarks/inference.py                         # VNet, 256x256x144, 96^3, 32x32x16
    python benchmarks/inference.py --shape 160 160 80 --sw-batch 1 4 16
    python benchmarks/inference.py --checkpoint runs/phantom/vnet_lower/seed0/checkpoints/best.pt \
        --volume data/phantom_small/images/phantom0029.npy --sw-batch 1 8

With ``--checkpoint`` the network is a trained run's (its patch, stride and intensity unless
given); ``--volume`` is a prepared ``.npy`` image in stored units (HU), normalised with the
run's intensity setting. Random weights give near-tied logits, where float rounding alone
can flip an argmax between batch sizes; a trained network is the meaningful identity check.

Prints, for each window batch size, the seconds per volume and the number of windows, and
checks that the label maps of every batch size are identical.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vnet")
    parser.add_argument("--num-classes", type=int, default=14)
    parser.add_argument("--shape", type=int, nargs=3, default=[256, 256, 144])
    parser.add_argument("--patch", type=int, nargs=3, default=None, help="default 96^3")
    parser.add_argument("--stride", type=int, nargs=3, default=None, help="default 32 32 16")
    parser.add_argument("--checkpoint", help="a run's checkpoint (default: random weights)")
    parser.add_argument("--volume", help="prepared .npy image (default: random volume)")
    parser.add_argument("--sw-batch", type=int, nargs="+", default=[4])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none")
    args = parser.parse_args()

    from semiseg.engine.inference import predict_volume
    from semiseg.models import create_model

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu")
                          if args.device == "auto" else args.device)
    amp = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    torch.manual_seed(0)
    patch, stride = args.patch or [96, 96, 96], args.stride or [32, 32, 16]
    if args.checkpoint:
        from pathlib import Path

        from semiseg.engine.runs import load_inference_network

        net, config = load_inference_network(Path(args.checkpoint), device)
        patch = args.patch or list(config.inference.patch_size)
        stride = args.stride or list(config.inference.stride)
        args.model = f"{config.model.name} ({args.checkpoint})"
    else:
        net = create_model(args.model, args.num_classes).to(device).eval()
    if args.volume:
        from semiseg.data.arrays import apply_intensity

        if not args.checkpoint:
            parser.error("--volume needs --checkpoint (its intensity setting)")
        volume = apply_intensity(np.load(args.volume).astype(np.float32),
                                 config.data.intensity)
        args.shape = list(volume.shape)
    else:
        volume = np.random.default_rng(0).random(args.shape, dtype=np.float32)
    args.patch, args.stride = patch, stride
    windows = int(np.prod([
        int(np.ceil(max(s - p, 0) / st)) + 1 for s, p, st in zip(args.shape, args.patch,
                                                                  args.stride)]))
    print(f"{args.model}, volume {tuple(args.shape)}, window {tuple(args.patch)}, stride "
          f"{tuple(args.stride)} ({windows} windows), device {device}, amp {args.amp}")
    reference = None
    for sw_batch in args.sw_batch:
        times = []
        for _ in range(args.repeats):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            labels = predict_volume(net, volume, args.patch, args.stride, sw_batch, "constant",
                                    device, amp)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
        same = "" if reference is None else (
            "  identical" if np.array_equal(labels, reference) else "  DIFFERENT")
        reference = labels if reference is None else reference
        print(f"sw_batch {sw_batch:>3}: {min(times):8.2f} s/volume{same}")


if __name__ == "__main__":
    main()
