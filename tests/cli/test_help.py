"""Every option of every command explains itself, and one concept has one name across the
commands (issue 16, item 10)."""

import argparse

import pytest

from semiseg.cli import _build_parser, main


def _commands(parser: argparse.ArgumentParser, prefix: str = ""
              ) -> dict[str, argparse.ArgumentParser]:
    found = {prefix.strip(): parser} if prefix else {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found.update(_commands(sub, f"{prefix}{name} "))
    return found


COMMANDS = _commands(_build_parser())


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {action.option_strings[-1] if action.option_strings else action.dest: action
            for action in parser._actions
            if not isinstance(action, (argparse._HelpAction, argparse._SubParsersAction))}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_option_has_a_line_of_help(command: str) -> None:
    missing = [name for name, action in _options(COMMANDS[command]).items()
               if action.help != argparse.SUPPRESS and not (action.help or "").strip()]
    assert missing == [], f"semiseg {command}: no help for {missing}"


def test_one_name_per_concept() -> None:
    writes = {"prepare", "train", "predict", "score", "report", "demo", "convert-checkpoint",
              "plot-proxies", "knowledge generate", "knowledge encode"}
    networks = {"train", "evaluate", "predict", "demo", "experiment run", "plot-proxies",
                "knowledge encode"}
    progress = {"prepare", "train", "evaluate", "predict", "demo", "experiment run"}
    for command, parser in COMMANDS.items():
        names = {name for name, action in _options(parser).items()
                 if action.help != argparse.SUPPRESS}
        assert ("--out" in names) == (command in writes), command
        assert ("--device" in names) == (command in networks), command
        assert ("--no-progress" in names) == (command in progress), command
        assert not names & {"--output", "--out-dir", "--run-dir", "--output-dir"}, command


def test_the_older_names_still_work(tmp_path, capsys) -> None:
    # --run-dir (train) and the positional output (convert-checkpoint) are hidden aliases.
    args = _build_parser().parse_args(["train", "--run-dir", str(tmp_path)])
    assert args.run_dir == tmp_path and args.out is None
    assert main(["train", "--run-dir", str(tmp_path), "--out", str(tmp_path)]) == 2
    assert "--run-dir is the older name of --out" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "--run-dir" not in capsys.readouterr().out


def test_top_level_help_lists_every_command(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("prepare", "train", "evaluate", "predict", "score", "report", "experiment",
                    "demo", "convert-checkpoint"):
        assert command in out


def test_no_progress_silences_every_bar_the_phantom_included(tiny_config, tmp_path,
                                                             capsys) -> None:
    config = tiny_config(data={"root": str(tmp_path / "fresh"), "patch_size": [32, 32, 32],
                               "phantom": {"num_cases": 3, "shape": [40, 40, 32]}},
                         train={"max_iterations": 1})
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "run"),
                 "--no-progress", "--evaluate"]) == 0
    assert (tmp_path / "fresh" / "dataset.json").is_file()  # the phantom was generated here
    assert capsys.readouterr().err == ""
