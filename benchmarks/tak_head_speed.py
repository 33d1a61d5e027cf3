"""Forward + backward time of TAK's dynamic head on the CPU, by implementation and chunk size.

    python benchmarks/tak_head_speed.py                  # the protocol's 4 crops of 32^3
    python benchmarks/tak_head_speed.py --patch 96 --batch 2

Same process, same inputs, alternating repeats; prints seconds per forward + backward and the
ratio to the whole-crop ``bmm`` pass (``chunk`` = all voxels), which is what the head did before
it was chunked. The head's logits agree to the bit across chunk sizes (each voxel's products are
the same); the largest gradient difference is printed too.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from semiseg.models.tak import dynamic_head, head_parameter_count


def _time(fn, feature, params, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        feature.grad = None
        params.grad = None
        start = time.perf_counter()
        fn(feature, params).square().mean().backward()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patch", type=int, default=32, help="crop edge in voxels")
    parser.add_argument("--batch", type=int, default=4, help="crops per call")
    parser.add_argument("--classes", type=int, default=14, help="number of classes")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per variant")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    h = 8
    gen = torch.Generator().manual_seed(0)
    feature = torch.randn(args.batch, h, *(args.patch,) * 3, generator=gen).requires_grad_()
    params = (0.3 * torch.randn(args.batch, args.classes, head_parameter_count(h),
                                generator=gen)).requires_grad_()
    voxels = args.patch ** 3
    variants = {"whole crop": voxels, **{f"chunk {n}": n for n in (512, 1024, 2048, 4096, 16384)
                                         if n < voxels}}
    fns = {name: (lambda f, p, n=n: dynamic_head(f, p, h, impl="bmm", chunk_voxels=n))
           for name, n in variants.items()}
    reference = fns["whole crop"](feature, params)
    reference.square().mean().backward()
    ref_grad = params.grad.clone()
    for fn in fns.values():  # warm-up
        _time(fn, feature, params, 1)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(args.repeats):  # alternate, so that machine load hits every variant alike
        for name, fn in fns.items():
            samples[name] += _time(fn, feature, params, 1)
    base = statistics.median(samples["whole crop"])
    print(f"dynamic head, {args.batch} crops of {args.patch}^3, {args.classes} classes, "
          f"{args.threads} thread(s): median s per forward + backward")
    for name, fn in fns.items():
        params.grad = None
        logits = fn(feature, params)
        logits.square().mean().backward()
        same = torch.equal(logits, reference)
        grad_diff = (params.grad - ref_grad).abs().max().item()
        median = statistics.median(samples[name])
        print(f"  {name:12s} {median:.4f} s  {base / median:4.2f}x  logits identical: {same}  "
              f"max |grad diff| {grad_diff:.1e}")


if __name__ == "__main__":
    main()
