"""Experiment grids: one command runs every cell, survives a kill, and reports."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from semiseg.cli import main
from semiseg.engine.experiment import cell_status, grid_cells, load_grid
from semiseg.errors import ConfigError


def _grid(tmp_path: Path, iterations: int = 4) -> Path:
    base = {
        "data": {"dataset": "phantom", "root": str(tmp_path / "data"),
                 "patch_size": [32, 32, 32], "phantom": {"num_cases": 10, "shape": [40, 40, 32]}},
        "model": {"options": {"n_filters": 4}},
        "train": {"max_iterations": iterations, "checkpoint_every": 2, "validate_every": 0,
                  "log_every": 1, "batch_size": 2, "labeled_batch_size": 1},
        "inference": {"patch_size": [32, 32, 32], "stride": [16, 16, 16]},
    }
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base), encoding="utf-8")
    grid = {
        "name": "tiny", "output_dir": str(tmp_path / "runs"), "seeds": [0, 1],
        "rows": [
            {"name": "lower", "config": "base.yaml",
             "set": ["method.name=supervised", "method.options={loss: ga}"]},
            {"name": "cps", "config": "base.yaml", "set": ["method.name=ga_cps"]},
        ],
    }
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid), encoding="utf-8")
    return path


def _run_state(path: Path) -> dict:
    """A run's state.json, or {} while it is missing or being replaced."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _wait_until_training(proc: subprocess.Popen, run_dirs: list[Path], iteration: int = 3,
                         timeout: float = 240) -> None:
    """Wait until every run in ``run_dirs`` is training past ``iteration``; a failure naming
    their states when ``proc`` ends first or the time is up."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        states = [_run_state(d / "state.json") for d in run_dirs]
        if all(state.get("status") == "running" and state.get("iteration", -1) >= iteration
               for state in states):
            return
        time.sleep(0.2)
    states = [_run_state(d / "state.json") for d in run_dirs]
    if proc.poll() is None:
        _kill_grid(proc, run_dirs[0].parent.parent)  # runs/<row>/seed<n>: the grid folder
    pytest.fail(f"the grid never had {len(run_dirs)} run(s) training past iteration "
                f"{iteration} (exit status {proc.returncode}): {states}")


def _kill_grid(proc: subprocess.Popen, runs: Path) -> None:
    """Kill a grid process and the cell processes its manifest names (a failing test's cleanup).

    The signal tests' grids train for 100,000 iterations: a lost stop would leave them running
    after the test. ``--jobs`` children run in sessions of their own, so they are found by the
    pids in the manifest (checked to still be semiseg processes: a pid can be reused).
    """
    proc.kill()
    proc.wait()
    try:
        cells = json.loads((runs / "manifest.json").read_text(encoding="utf-8"))["cells"]
    except (OSError, ValueError, KeyError):
        cells = {}
    for entry in cells.values():
        cmdline = Path(f"/proc/{entry.get('pid')}/cmdline")
        with contextlib.suppress(OSError):
            if b"semiseg" in cmdline.read_bytes():
                os.kill(entry["pid"], signal.SIGKILL)


def _communicate_or_fail(proc: subprocess.Popen, runs: Path, what: str,
                         timeout: float = 120) -> str:
    """Wait for a grid process that was told to stop; its stderr, or a failure naming the stop."""
    try:
        return proc.communicate(timeout=timeout)[1]
    except subprocess.TimeoutExpired:
        _kill_grid(proc, runs)
        pytest.fail(f"{what} did not stop the grid within {timeout:.0f} s")


def test_grid_cells_and_validation(tmp_path: Path) -> None:
    grid = load_grid(_grid(tmp_path))
    cells = grid_cells(grid)
    assert [c.key for c in cells] == ["lower/seed0", "lower/seed1", "cps/seed0", "cps/seed1"]
    assert cells[1].config.experiment.seed == 1
    assert cells[2].config.method.name == "ga_cps"
    assert cells[0].config.experiment.name == "tiny_lower"
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\noutput_dir: y\nrows: [{name: a, confg: b}]\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="confg"):
        load_grid(bad)


def test_grid_survives_a_kill_and_does_not_redo_finished_cells(tmp_path: Path) -> None:
    # 20 iterations and a 20-ms poll: the kill lands while the second cell trains. With 6 and
    # 0.2 s, the cell sometimes finished its last 4 iterations between two polls (stop 25).
    grid_path = _grid(tmp_path, iterations=20)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "semiseg", "experiment", "run",
                             str(grid_path), "--no-progress"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    grid = load_grid(grid_path)
    cells = grid_cells(grid)
    first_metrics = cells[0].run_dir / "metrics.json"
    second_ckpt = cells[1].run_dir / "checkpoints" / "last.pt"
    deadline = time.time() + 240
    while time.time() < deadline and not second_ckpt.exists():
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert first_metrics.exists(), "the first cell finished before the kill"
    assert cell_status(cells[1]) == "partial"
    stamp = first_metrics.stat().st_mtime_ns
    assert main(["experiment", "run", str(grid_path), "--no-progress", "--device", "cpu"]) == 0
    assert first_metrics.stat().st_mtime_ns == stamp, "a finished cell was redone"
    assert all(cell_status(c) == "done" for c in cells)
    manifest = json.loads((tmp_path / "runs" / "manifest.json").read_text(encoding="utf-8"))
    assert set(manifest["cells"]) == {c.key for c in cells}
    assert all(entry["status"] == "done" for entry in manifest["cells"].values())
    assert manifest["cells"]["cps/seed1"]["config"]["method"]["name"] == "ga_cps"
    # --device overrides every cell's experiment.device (the grid's configs say "auto").
    assert {e["config"]["experiment"]["device"] for e in manifest["cells"].values()} == {"cpu"}
    assert main(["experiment", "status", str(grid_path)]) == 0
    assert main(["report", str(grid_path), "--out", str(tmp_path / "report")]) == 0
    table = (tmp_path / "report" / "report.md").read_text(encoding="utf-8")
    assert "| cps " in table and "| lower " in table
    # Per-class layout with the sample std over the two seeds, checked against numpy.
    import numpy as np

    out = tmp_path / "report_std"
    assert main(["report", str(grid_path), "--out", str(out), "--layout", "per_class",
                 "--std", "always", "--ddof", "1"]) == 0
    assert not (out / "table1.md").exists()
    means = [json.loads((c.run_dir / "metrics.json").read_text(encoding="utf-8"))
             ["summary"]["dice"]["mean"] for c in cells if c.row == "lower"]
    lines = next(out.glob("per_class_dice_*.md")).read_text(encoding="utf-8").splitlines()
    lower = next(line for line in lines if line.startswith("| lower |"))
    all_cell = lower.split("|")[2].strip().strip("*")  # the "All" column (bold when best)
    assert all_cell == f"{np.mean(means):.2f}±{np.std(means, ddof=1):.2f}"


def test_a_cell_claimed_by_another_process_is_skipped_and_rows_select(tmp_path: Path,
                                                                      capsys) -> None:
    from semiseg.engine.experiment import run_grid, select_rows
    from semiseg.utils.io import exclusive_lock

    grid = select_rows(load_grid(_grid(tmp_path, iterations=2)), ["lower"])
    assert [row.name for row in grid.rows] == ["lower"]
    with pytest.raises(ConfigError, match="no row named"):
        select_rows(load_grid(_grid(tmp_path)), ["nope"])
    claimed, free = grid_cells(grid)
    # Another process holds seed0: this run must leave it alone and still finish seed1.
    with exclusive_lock(claimed.run_dir.parent / f".{claimed.run_dir.name}.lock") as held:
        assert held
        run_grid(grid, show_progress=False)
    assert "lower/seed0: running in another process, skipped" in capsys.readouterr().out
    assert cell_status(claimed) == "pending"
    assert cell_status(free) == "done"
    manifest = json.loads((tmp_path / "runs" / "manifest.json").read_text(encoding="utf-8"))
    assert set(manifest["cells"]) == {"lower/seed1"}


def test_seeds_select_cells_and_the_selection_is_what_a_grid_process_runs(tmp_path: Path,
                                                                         capsys) -> None:
    from semiseg.engine.experiment import run_arguments, run_command_line, select_seeds
    from semiseg.engine.grid_jobs import child_command

    grid_path = _grid(tmp_path, iterations=2)
    assert select_seeds(load_grid(grid_path), [1]).seeds == [1]
    assert select_seeds(load_grid(grid_path), [1, 0]).seeds == [0, 1]  # the grid's order
    with pytest.raises(ConfigError, match=r"no seed \[7\]; seeds are \[0, 1\]"):
        select_seeds(load_grid(grid_path), [7])
    assert run_arguments("g.yaml", ["a", "b"], [1, 3], "cuda") == [
        "experiment", "run", "g.yaml", "--rows", "a", "b", "--seeds", "1", "3",
        "--device", "cuda"]
    assert run_arguments("g.yaml") == ["experiment", "run", "g.yaml"]
    assert run_command_line("my grid.yaml", None, [2], None, "auto") == \
        "semiseg experiment run 'my grid.yaml' --seeds 2 --jobs auto"
    assert child_command(grid_path, None, None, [1])[-5:] == [
        "--seeds", "1", "--no-progress", "--jobs", "1"]
    # One cell of four runs; the others stay pending.
    assert main(["experiment", "run", str(grid_path), "--rows", "lower", "--seeds", "1",
                 "--no-progress"]) == 0
    assert "[1/1] lower/seed1: training" in capsys.readouterr().out
    assert {c.key: cell_status(c) for c in grid_cells(load_grid(grid_path))} == {
        "lower/seed0": "pending", "lower/seed1": "done",
        "cps/seed0": "pending", "cps/seed1": "pending"}
    assert main(["experiment", "status", str(grid_path), "--seeds", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in lines[:-1]] == [["lower/seed1", "done"],
                                                         ["cps/seed1", "pending"]]
    assert lines[-1] == "1/2 cells done"


def test_a_failing_cell_is_recorded_and_the_grid_goes_on(tmp_path: Path) -> None:
    from semiseg.engine.experiment import run_grid
    from semiseg.errors import SemisegError

    path = _grid(tmp_path, iterations=2)
    grid = yaml.safe_load(path.read_text(encoding="utf-8"))
    grid["seeds"] = [0]
    grid["rows"].insert(0, {"name": "broken", "config": "base.yaml",
                            "set": ["method.name=ga_cps", "method.options={no_such: 1}"]})
    grid["rows"] = grid["rows"][:2]  # broken, lower
    path.write_text(yaml.safe_dump(grid), encoding="utf-8")
    loaded = load_grid(path)
    with pytest.raises(SemisegError, match=r"(?s)1 cell\(s\) failed.*broken/seed0.*no_such"):
        run_grid(loaded, show_progress=False)
    _, lower = grid_cells(loaded)
    assert cell_status(lower) == "done", "the cell after the broken one still ran"
    manifest = json.loads((tmp_path / "runs" / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["cells"]["broken/seed0"]["status"] == "failed"
    assert "no_such" in manifest["cells"]["broken/seed0"]["error"]


def test_a_stop_signal_stops_the_grid_with_its_cell_saved(tmp_path: Path) -> None:
    grid_path = _grid(tmp_path, iterations=100000)
    cells = grid_cells(load_grid(grid_path))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "semiseg", "experiment", "run",
                             str(grid_path), "--no-progress", "--seeds", "0", "1"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_until_training(proc, [cells[0].run_dir])
    proc.send_signal(signal.SIGINT)
    err = _communicate_or_fail(proc, tmp_path / "runs", "SIGINT")
    assert proc.returncode == 130, err
    # The way to continue repeats the selection it was started with.
    assert err.strip().splitlines()[-1].endswith(
        f"continue with: semiseg experiment run {grid_path} --seeds 0 1")
    manifest = json.loads((tmp_path / "runs" / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["cells"]["lower/seed0"]["status"] == "interrupted"
    assert not cells[1].run_dir.exists(), "the grid went on after the signal"
    assert cell_status(cells[0]) == "partial"  # the next run resumes it


def test_plan_jobs_by_hand() -> None:
    from semiseg.engine.grid_jobs import plan_jobs, threads_per_job

    # auto: one per core on the CPU, one per two cores with a GPU, capped by the open cells.
    assert plan_jobs("auto", "cpu", 2, 35) == 2
    assert plan_jobs("auto", "cuda", 16, 35) == 8
    assert plan_jobs("auto", "cuda", 16, 3) == 3
    assert plan_jobs("auto", "cuda", 1, 5) == 1
    assert plan_jobs("4", "cpu", 2, 10) == 4  # a number is taken as given
    assert plan_jobs(4, "cpu", 2, 1) == 1
    assert plan_jobs("auto", "cpu", 2, 0) == 1
    for bad in ("0", "-2", "many"):
        with pytest.raises(ConfigError, match="--jobs"):
            plan_jobs(bad, "cpu", 2, 4)
    assert threads_per_job(16, 7) == 2
    assert threads_per_job(2, 2) == 1
    assert threads_per_job(1, 3) == 1
    assert threads_per_job(8, 1) == 8


def test_jobs_run_the_grid_in_child_processes_with_a_share_of_the_cores(
        tmp_path: Path, monkeypatch, capsys) -> None:
    from semiseg.engine.grid_jobs import available_cpus, threads_per_job

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    grid_path = _grid(tmp_path, iterations=2)
    assert main(["experiment", "run", str(grid_path), "--jobs", "2", "--no-progress",
                 "--device", "cpu"]) == 0
    assert "4 of 4 cells to run, 2 processes with " \
           f"{threads_per_job(available_cpus(), 2)} thread(s) each" in capsys.readouterr().out
    cells = grid_cells(load_grid(grid_path))
    assert all(cell_status(c) == "done" for c in cells)
    manifest = json.loads((tmp_path / "runs" / "manifest.json").read_text(encoding="utf-8"))
    pids = {entry["pid"] for entry in manifest["cells"].values()}
    assert os.getpid() not in pids and 1 <= len(pids) <= 2, pids
    assert {entry["threads"] for entry in manifest["cells"].values()} == {
        threads_per_job(available_cpus(), 2)}
    # Everything done: a second call starts no process.
    assert main(["experiment", "run", str(grid_path), "--jobs", "auto", "--no-progress"]) == 0
    assert "all 4 cells are done" in capsys.readouterr().out


def test_a_stop_signal_reaches_every_grid_process(tmp_path: Path) -> None:
    grid_path = _grid(tmp_path, iterations=100000)
    cells = grid_cells(load_grid(grid_path))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "semiseg", "experiment", "run",
                             str(grid_path), "--no-progress", "--jobs", "2"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_until_training(proc, [cell.run_dir for cell in cells[:2]])
    proc.send_signal(signal.SIGTERM)  # to the parent only: it must pass it on
    err = _communicate_or_fail(proc, tmp_path / "runs",
                               "SIGTERM to the parent of 2 grid processes")
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1].endswith(
        f"continue with: semiseg experiment run {grid_path} --jobs 2")
    manifest = json.loads((tmp_path / "runs" / "manifest.json").read_text(encoding="utf-8"))
    # Both processes saved their cell and stopped; nothing went on to the next cells.
    assert [manifest["cells"][c.key]["status"] for c in cells[:2]] == ["interrupted"] * 2
    assert all(cell_status(c) == "partial" for c in cells[:2])
    assert not any(c.run_dir.exists() for c in cells[2:])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_grid_processes_save_and_stop_when_their_parent_is_killed(tmp_path: Path) -> None:
    grid_path = _grid(tmp_path, iterations=100000)
    cells = grid_cells(load_grid(grid_path))
    proc = subprocess.Popen([sys.executable, "-m", "semiseg", "experiment", "run",
                             str(grid_path), "--no-progress", "--jobs", "2"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    states = [cell.run_dir / "state.json" for cell in cells[:2]]
    _wait_until_training(proc, [cell.run_dir for cell in cells[:2]])
    proc.kill()  # SIGKILL: the parent can pass nothing on
    proc.wait()
    deadline = time.time() + 120
    while time.time() < deadline and not all(_run_state(p).get("status") == "interrupted"
                                             for p in states):
        time.sleep(0.2)
    final = [_run_state(p) for p in states]
    statuses = [state.get("status") for state in final]
    if statuses != ["interrupted"] * 2:
        _kill_grid(proc, tmp_path / "runs")  # the orphans would train on after the test
    assert statuses == ["interrupted"] * 2, final
    assert all(cell_status(c) == "partial" for c in cells[:2])
