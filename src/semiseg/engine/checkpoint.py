"""Checkpoints: everything needed to continue a run exactly, written atomically.

A training checkpoint holds the method (all its networks and buffers), the optimiser, the
AMP scaler, the iteration, every random-number-generator state, the best validation score,
and the run's config, so ``semiseg train --resume`` continues bit-for-bit on CPU in
deterministic mode and ``semiseg predict`` can rebuild the network from the file alone.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from semiseg.errors import CheckpointError
from semiseg.utils.io import atomic_torch_save

FORMAT = "semiseg-checkpoint-v1"
LAST = "last.pt"
BEST = "best.pt"


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Atomically write ``payload`` (plus the format tag) to ``path``."""
    atomic_torch_save({"format": FORMAT, **payload}, path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a semiseg checkpoint, with a clear error for a missing or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        # Our checkpoints hold RNG states and config dicts, which weights_only rejects.
        payload = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # torch raises many types for corrupt files
        raise CheckpointError(f"{path}: not a readable checkpoint ({exc})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(
            f"{path}: not a semiseg checkpoint (official weights? convert them with "
            "`semiseg convert-checkpoint`)"
        )
    return payload
