"""Config loading, overrides and validation."""

from pathlib import Path

import pytest

from semiseg.config import Config, load_config, parse_override
from semiseg.errors import ConfigError


def test_defaults_are_the_official_sgd_recipe() -> None:
    config = load_config()
    assert isinstance(config, Config)
    assert (config.train.lr, config.train.momentum, config.train.weight_decay) == (0.01, 0.9, 1e-4)
    assert config.train.batch_size == 4 and config.train.labeled_batch_size == 2
    assert config.inference.stride == (32, 32, 16)


def test_override_parses_yaml_values() -> None:
    assert parse_override("train.lr=0.005") == {"train": {"lr": 0.005}}
    assert parse_override("data.patch_size=[64, 64, 32]") == {"data": {"patch_size": [64, 64, 32]}}
    config = load_config(None, ["train.lr=0.005", "data.patch_size=[64,64,32]"])
    assert config.train.lr == 0.005
    assert config.data.patch_size == (64, 64, 32)


def test_int_is_accepted_for_float_but_not_the_reverse() -> None:
    assert load_config(None, ["train.lr=1"]).train.lr == 1.0
    with pytest.raises(ConfigError, match="train.max_iterations: expected an integer"):
        load_config(None, ["train.max_iterations=10.5"])


def test_unknown_key_is_named_with_a_suggestion() -> None:
    with pytest.raises(ConfigError, match=r"'train.lrr'.*did you mean 'lr'"):
        load_config(None, ["train.lrr=0.1"])
    with pytest.raises(ConfigError, match="unknown config key 'trian'"):
        load_config(None, ["trian.lr=0.1"])


def test_wrong_type_and_choice_are_named(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  amp: fp8\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="train.amp: 'fp8' is not one of"):
        load_config(bad)
    with pytest.raises(ConfigError, match="data.patch_size: expected 3 values"):
        load_config(None, ["data.patch_size=[96, 96]"])
    with pytest.raises(ConfigError, match="experiment.deterministic: expected true or false"):
        load_config(None, ["experiment.deterministic=maybe"])


def test_base_include_merges_and_child_wins(tmp_path: Path) -> None:
    base = "train:\n  lr: 0.02\n  max_iterations: 100\n"
    (tmp_path / "base.yaml").write_text(base, encoding="utf-8")
    child = "base: base.yaml\ntrain:\n  max_iterations: 50\n"
    (tmp_path / "child.yaml").write_text(child, encoding="utf-8")
    config = load_config(tmp_path / "child.yaml")
    assert config.train.lr == 0.02 and config.train.max_iterations == 50


def test_unreadable_and_invalid_yaml_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="missing.yaml: cannot read config"):
        load_config(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: [unclosed\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="broken.yaml: not valid YAML"):
        load_config(broken)


def test_config_round_trips_through_yaml(tmp_path: Path) -> None:
    from semiseg.config import save_config

    config = load_config(None, ["train.lr=0.003", "method.options={loss: ga}"])
    save_config(config, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == config


def test_scientific_notation_is_a_number_in_files_and_overrides(tmp_path: Path) -> None:
    # PyYAML (YAML 1.1) reads 5e-2 and 1.0e3 as strings; a float key takes them as numbers.
    path = tmp_path / "sci.yaml"
    path.write_text("train:\n  lr: 5e-2\n  weight_decay: 1.0e3\n"
                    "  loss_weights: {dice: 2E-1}\n", encoding="utf-8")
    config = load_config(path)
    assert config.train.lr == 0.05
    assert config.train.weight_decay == 1000.0
    assert config.train.loss_weights == {"dice": 0.2}
    assert load_config(path, ["train.lr=1e-3"]).train.lr == 0.001
    assert load_config(None, ["train.lr=-.5e+1"]).train.lr == -5.0
    # Only where a number is expected: a string key keeps the text, an int key refuses it.
    assert load_config(None, ["experiment.name=1e3"]).experiment.name == "1e3"
    with pytest.raises(ConfigError, match="train.max_iterations: expected an integer"):
        load_config(None, ["train.max_iterations=1e3"])
    with pytest.raises(ConfigError, match="train.lr: expected a number, got '1e-3x'"):
        load_config(None, ["train.lr=1e-3x"])
