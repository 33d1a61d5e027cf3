"""Shared set-up of the command-line tests: a tiny phantom run config.

The phantom data folder is shared by the whole session (generation is deterministic and
resumable), so each test pays only for its own training.
"""

from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

TINY = {
    "model": {"name": "vnet", "options": {"n_filters": 4}},
    "method": {"name": "supervised"},
    "train": {"max_iterations": 3, "batch_size": 2, "labeled_batch_size": 2,
              "checkpoint_every": 3, "validate_every": 0, "log_every": 1},
    "inference": {"patch_size": [32, 32, 32], "stride": [16, 16, 16],
                  "validation_stride": [16, 16, 16], "sw_batch_size": 4},
    "experiment": {"device": "cpu"},
}


@pytest.fixture(scope="session")
def phantom_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("phantom") / "data"


@pytest.fixture(scope="session")
def write_tiny_config(phantom_root: Path) -> Callable[..., Path]:
    """``write_tiny_config(path, **sections)`` writes a tiny phantom config whose sections are
    updated by ``sections`` (``train={"max_iterations": 6}``) and returns ``path``."""

    def write(path: Path, **sections: dict) -> Path:
        data = {key: dict(value) for key, value in TINY.items()}
        data["data"] = {"dataset": "phantom", "root": str(phantom_root),
                        "patch_size": [32, 32, 32],
                        "phantom": {"num_cases": 10, "shape": [40, 40, 32]}}
        for key, value in sections.items():
            data[key] = {**data.get(key, {}), **value}
        path.write_text(yaml.safe_dump(data), encoding="utf-8")
        return path

    return write


@pytest.fixture
def tiny_config(tmp_path: Path, write_tiny_config: Callable[..., Path]) -> Callable[..., Path]:
    """``tiny_config(name="config.yaml", **sections)``: a tiny config in the test's folder."""

    def write(name: str = "config.yaml", **sections: dict) -> Path:
        return write_tiny_config(tmp_path / name, **sections)

    return write
