"""The CPU bf16 fault behind semiseg's precision policy, measured at each oneDNN level.

    python benchmarks/cpu_bf16_probe.py

For each oneDNN instruction-set level (the machine's default, then ``ONEDNN_MAX_CPU_ISA=AVX2``;
each in its own process, since oneDNN reads the variable once) it prints:

* the relative error ``||g_bf16 - g_fp32|| / ||g_fp32||`` of the weight gradient of a 3x3x3,
  padding-1 convolution (32 -> 32 channels, batch 2) on bf16 inputs, against the fp32
  gradient of the same bf16-rounded inputs, for feature maps of several shapes (three calls
  each: the faulty kernel's result changes from call to call);
* the time of a forward+backward of a 16-filter VNet on one 64^3 crop in fp32 and under bf16
  autocast.

A correct bf16 kernel gives ~2e-3 (bf16 rounding of the output). See docs/distributed.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

SHAPES = [(2, 2, 2), (2, 6, 6), (2, 3, 4), (3, 3, 3), (4, 4, 2), (6, 6, 6)]


def _probe() -> dict:
    import torch
    import torch.nn.functional as F

    from semiseg.models.vnet import VNet

    torch.manual_seed(0)
    errors = {}
    for shape in SHAPES:
        values = []
        for _ in range(3):
            x = torch.randn(2, 32, *shape).relu().bfloat16()
            w = (torch.randn(32, 32, 3, 3, 3) * 0.05).bfloat16().requires_grad_()
            out = F.conv3d(x, w, None, padding=1)
            grad = torch.randn_like(out)
            out.backward(grad)
            w32 = w.detach().float().requires_grad_()
            F.conv3d(x.float(), w32, None, padding=1).backward(grad.float())
            values.append(float((w.grad.float() - w32.grad).norm() / w32.grad.norm()))
        errors["x".join(map(str, shape))] = values
    net = VNet(14, n_filters=16)
    image, label = torch.randn(1, 1, 64, 64, 64), torch.randint(0, 14, (1, 64, 64, 64))
    seconds = {}
    for name, enabled in (("fp32", False), ("bf16", True), ("fp32 again", False),
                          ("bf16 again", True)):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            out = net(image)
        F.cross_entropy(out.float(), label).backward()
        seconds[name] = time.perf_counter() - start
    return {"level": os.environ.get("ONEDNN_MAX_CPU_ISA", "default"), "errors": errors,
            "fp32_s": min(seconds["fp32"], seconds["fp32 again"]),
            "bf16_s": min(seconds["bf16"], seconds["bf16 again"]),
            "torch": torch.__version__, "threads": torch.get_num_threads()}


def main() -> None:
    if "--child" in sys.argv:
        print(json.dumps(_probe()))
        return
    for level in (None, "AVX2"):
        env = dict(os.environ)
        env.pop("ONEDNN_MAX_CPU_ISA", None)
        if level:
            env["ONEDNN_MAX_CPU_ISA"] = level
        proc = subprocess.run([sys.executable, __file__, "--child"], env=env,
                              capture_output=True, text=True, check=True)
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"oneDNN level {row['level']} (torch {row['torch']}, {row['threads']} threads)")
        print(f"  {'feature map (D x H x W)':<26}relative error of the bf16 weight gradient")
        for shape, values in row["errors"].items():
            print(f"  {shape:<26}" + "  ".join(f"{v:9.3g}" for v in values))
        print(f"  VNet-16 forward+backward, 64^3: fp32 {row['fp32_s']:.2f} s, bf16 "
              f"{row['bf16_s']:.2f} s ({row['fp32_s'] / row['bf16_s']:.2f}x)")


if __name__ == "__main__":
    main()
