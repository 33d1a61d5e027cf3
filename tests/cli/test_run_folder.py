"""A run folder through `semiseg train`: resumable from itself alone, one trainer at a time,
an honest state.json, no stray temporaries, a checkpoint on SIGINT / SIGTERM, a summary at
the end (issue 16, items 4, 5, 7 and 10)."""

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
from semiseg.engine.checkpoint import load_checkpoint
from semiseg.engine.run_folder import PARENT_DIED, StopSignals

SRC = Path(__file__).resolve().parents[2] / "src"


def _state(run: Path) -> dict:
    # parse_constant refuses -Infinity / NaN, which json.loads would otherwise accept.
    def refuse(name: str) -> None:
        raise ValueError(f"state.json holds {name}, not valid JSON")

    return json.loads((run / "state.json").read_text(encoding="utf-8"), parse_constant=refuse)


def _start(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1",
           "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "semiseg", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_iteration(run: Path, proc: subprocess.Popen, iteration: int) -> dict:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"trainer ended early: {proc.communicate()}")
        try:
            state = _state(run)
        except (OSError, ValueError):
            state = {}
        if state.get("status") == "running" and state.get("iteration", 0) >= iteration:
            return state
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("the trainer never reached the iteration")


def _long_run(tiny_config) -> Path:
    return tiny_config("long.yaml", train={"max_iterations": 100000, "checkpoint_every": 5,
                                           "log_every": 1})


def test_scientific_notation_in_a_config_file_and_in_set(tiny_config, tmp_path: Path) -> None:
    base = tiny_config("tiny.yaml")
    config = tmp_path / "sci.yaml"
    # Written as text: a YAML dump would quote the value, which is not what users write.
    config.write_text("base: tiny.yaml\ntrain:\n  lr: 5e-2\n  max_iterations: 1\n",
                      encoding="utf-8")
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "a"),
                 "--no-progress"]) == 0
    assert yaml.safe_load((tmp_path / "a/config.yaml").read_text())["train"]["lr"] == 0.05
    assert main(["train", "--config", str(base), "--set", "train.lr=1e-3", "--set",
                 "train.max_iterations=1", "--out", str(tmp_path / "b"), "--no-progress"]) == 0
    assert yaml.safe_load((tmp_path / "b/config.yaml").read_text())["train"]["lr"] == 0.001


def test_resume_needs_nothing_but_the_run_folder(tiny_config, tmp_path: Path, monkeypatch,
                                                 capsys) -> None:
    config = tiny_config(train={"max_iterations": 2, "checkpoint_every": 1})
    run = tmp_path / "run"
    assert main(["train", "--config", str(config), "--out", str(run), "--no-progress"]) == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the default config would write ./data and ./runs here
    capsys.readouterr()
    assert main(["train", "--out", str(run), "--resume", "--set", "train.max_iterations=4",
                 "--no-progress"]) == 0
    assert _state(run)["iteration"] == 4 and _state(run)["status"] == "finished"
    assert load_checkpoint(run / "checkpoints/last.pt")["iteration"] == 4
    assert list(elsewhere.iterdir()) == []
    summary = capsys.readouterr().out
    assert "trained 4/4 iterations in" in summary
    assert f"next: semiseg evaluate {run}" in summary

    # What would change the network or the data is refused in one line naming the key.
    assert main(["train", "--out", str(run), "--resume", "--set",
                 "model.options.n_filters=8"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "model.options {'n_filters': 4} -> {'n_filters': 8}" in err
    other = tiny_config("other.yaml", method={"name": "ga_cps"})
    assert main(["train", "--config", str(other), "--out", str(run), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "method.name 'supervised' -> 'ga_cps'" in err and "Traceback" not in err
    assert main(["train", "--resume"]) == 2
    assert "--resume needs the run folder: --out RUN" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "none"), "--resume"]) == 2
    assert "no config.yaml, so nothing to resume" in capsys.readouterr().err


def test_state_json_is_valid_json_without_eval_cases(tiny_config, tmp_path: Path,
                                                     capsys) -> None:
    ids = [f"phantom{i:04d}" for i in range(10)]
    split = tmp_path / "split.yaml"
    split.write_text(yaml.safe_dump({
        "name": "noeval", "dataset": "phantom", "class_set": "synapse", "train": ids[:7],
        "eval": [], "test": ids[7:], "labeled": {"1": ids[:7]}}), encoding="utf-8")
    config = tiny_config(data={"split": str(split), "labeled_ratio": 1.0},
                         train={"validate_every": 1})
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "run"),
                 "--no-progress"]) == 0
    state = _state(tmp_path / "run")  # raised on -Infinity before
    assert state["best_score"] is None and state["best_iteration"] == 3
    assert "no validation ran" in capsys.readouterr().out


def _deliver(sig: int) -> None:
    """Send ``sig`` to this process; its handler runs before ``os.kill`` returns."""
    try:
        os.kill(os.getpid(), sig)
    except KeyboardInterrupt:
        pytest.fail(f"{signal.Signals(sig).name} asked to stop at once")


def test_stop_signals_by_hand() -> None:
    before = {sig: signal.getsignal(sig) for sig in StopSignals.SIGNALS}
    signals = StopSignals().install()
    try:
        # The parent's death, however often the kernel hands it on, asks for one orderly stop.
        for _ in range(3):
            _deliver(PARENT_DIED)
        assert signals.received == PARENT_DIED and signals.exit_code == 128 + PARENT_DIED
        assert signals.name == "the death of its grid parent"
        # A person's SIGTERM after it is a first signal; the parent's death never stops at once.
        _deliver(signal.SIGTERM)
        assert signals.received == signal.SIGTERM and signals.exit_code == 143
        _deliver(PARENT_DIED)
        assert signals.received == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):  # a second person's signal does
            os.kill(os.getpid(), signal.SIGINT)
        # Held back during a write that must not be torn; raised as the block ends.
        written = False
        with pytest.raises(KeyboardInterrupt), signals.held():
            _deliver(signal.SIGINT)
            written = True
        assert written
    finally:
        signals.restore()
    assert {sig: signal.getsignal(sig) for sig in StopSignals.SIGNALS} == before
    # Once the parent has died, its late copies must not kill the saved, ending process.
    signals = StopSignals().install()
    _deliver(PARENT_DIED)
    signals.restore()
    try:
        assert signal.getsignal(PARENT_DIED) is signal.SIG_IGN
        os.kill(os.getpid(), PARENT_DIED)  # by default, this would end the test run
    finally:
        signal.signal(PARENT_DIED, before[PARENT_DIED])


@pytest.mark.slow
def test_sigint_and_sigterm_save_a_checkpoint_and_an_honest_state(tiny_config,
                                                                   tmp_path: Path) -> None:
    config = _long_run(tiny_config)
    run = tmp_path / "run"
    saved = 0
    # PARENT_DIED is what a --jobs grid process gets when its parent dies, as often as the
    # parent had threads to hand it on to: sent three times apart, it is still one orderly stop.
    for sig, code, args, times, name in (
            (signal.SIGINT, 130, ["--config", str(config)], 1, "SIGINT"),
            (signal.SIGTERM, 143, ["--resume"], 1, "SIGTERM"),
            (PARENT_DIED, 128 + PARENT_DIED, ["--resume"], 3, "the death of its grid parent")):
        proc = _start(["train", *args, "--out", str(run), "--no-progress"], tmp_path)
        before = _wait_for_iteration(run, proc, saved + 7)
        for _ in range(times):
            proc.send_signal(sig)
            time.sleep(0.05)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == code, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in err
        assert lines[0].endswith(f"continue with: semiseg train --out {run} --resume")
        assert f"stopped by {name} after iteration" in lines[0]
        state = _state(run)
        saved = load_checkpoint(run / "checkpoints/last.pt")["iteration"]
        assert state["status"] == "interrupted"
        # The true iteration, saved: a resume loses nothing.
        assert state["iteration"] == state["checkpoint_iteration"] == saved
        assert saved >= before["iteration"]
    assert not list(run.rglob(".*.tmp"))


@pytest.mark.slow
def test_a_second_trainer_is_refused_and_a_killed_one_leaves_no_lock(tiny_config,
                                                                     tmp_path: Path,
                                                                     capsys) -> None:
    config = _long_run(tiny_config)
    run = tmp_path / "run"
    proc = _start(["train", "--config", str(config), "--out", str(run), "--no-progress"],
                  tmp_path)
    try:
        _wait_for_iteration(run, proc, 6)
        rows_before = (run / "log.csv").read_text(encoding="utf-8").count("\n")
        # (max_iterations=1: were it not refused, it would end at once instead of training on)
        assert main(["train", "--config", str(config), "--out", str(run), "--resume",
                     "--set", "train.max_iterations=1"]) == 2
        err = capsys.readouterr().err.strip()
        assert err == (f"semiseg train: error: {run}: already being trained by process "
                       f"{proc.pid}; wait for it to end or train into another --out folder")
        assert (run / "log.csv").read_text(encoding="utf-8").count("\n") >= rows_before
    finally:
        proc.kill()  # kill -9: no handler runs, nothing is saved or released by hand
        proc.wait()
    state = _state(run)
    assert state["status"] == "running" and state["pid"] == proc.pid  # what a kill leaves
    assert state["iteration"] >= 6
    # A write that the kill cut short leaves its temporary file; a new trainer clears it.
    stray = run / "checkpoints" / ".last.pt.abc12_xy.tmp"
    stray.write_bytes(b"half a checkpoint")
    unrelated = run / "notes.tmp"
    unrelated.write_text("mine", encoding="utf-8")
    assert main(["train", "--out", str(run), "--resume", "--set", "train.max_iterations="
                 f"{state['checkpoint_iteration'] + 1}", "--no-progress"]) == 0
    assert not stray.exists() and unrelated.exists()
    assert _state(run)["status"] == "finished"
