"""Run the numerics self-check scenarios in this process and print one JSON line.

Started by tests/engine/test_precision.py as a subprocess under each oneDNN instruction-set
level (``ONEDNN_MAX_CPU_ISA`` is read once, when oneDNN starts, so a level needs a process).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _precision_nets import faulty_network, healthy_network, loss_of

from semiseg.engine.precision import BOUNDS, measure_precision

cpu = torch.device("cpu")
out = {"onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", "default")}
for name, build in (("healthy", healthy_network), ("faulty", faulty_network)):
    net, image, label = build()
    params = dict(net.named_parameters())
    result = measure_precision(loss_of(net, image, label), params, torch.bfloat16, cpu)
    out[name] = {"failures": result.failures(BOUNDS[torch.bfloat16]), **result.to_dict()}
print(json.dumps(out))
