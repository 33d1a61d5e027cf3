"""Every shipped config (table rows, phantom rows, grids, the demo) loads and validates."""

from pathlib import Path

import pytest

from semiseg.catalog import parse_method_options
from semiseg.config import load_config
from semiseg.engine.experiment import grid_cells, load_grid
from semiseg.models.registry import check_model_options

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p for p in (REPO / "configs").rglob("*.yaml")
                 if not p.name.startswith(("_", "grid")))
GRIDS = sorted((REPO / "configs").rglob("grid*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(REPO)))
def test_config_validates(path: Path) -> None:
    config = load_config(path)
    check_model_options(config.model.name, dict(config.model.options))
    # The code's own parsing (a plug-in splits host and plug-in options and checks each part).
    parse_method_options(config.method.name, dict(config.method.options))
    if path.parent.name in ("synapse", "amos"):
        assert config.experiment.name == f"{path.parent.name}_{path.stem}"
        assert config.data.dataset == path.parent.name


def test_table_rows_cover_every_host_and_ratio() -> None:
    rows = {(p.parent.name, p.stem) for p in CONFIGS}
    for host in ("vnet_lower", "cps", "ga_cps", "mean_teacher", "magicnet", "ga_magicnet"):
        for suffix in ("10p", "20p"):
            assert ("synapse", f"{host}_{suffix}") in rows
        for suffix in ("2p", "5p", "10p"):
            assert ("amos", f"{host}_{suffix}") in rows
    assert ("synapse", "vnet_fully") in rows and ("amos", "vnet_fully") in rows


@pytest.mark.parametrize("path", GRIDS, ids=lambda p: p.name)
def test_grids_validate(path: Path) -> None:
    cells = grid_cells(load_grid(path))
    assert cells
    for cell in cells:  # a row's overrides are checked like a config's own keys
        check_model_options(cell.config.model.name, dict(cell.config.model.options))
        parse_method_options(cell.config.method.name, dict(cell.config.method.options))


def test_the_demo_is_a_two_row_grid_of_valid_configs(tmp_path: Path) -> None:
    from semiseg.engine.demo import BASELINE, demo_grid

    grid = load_grid(demo_grid(tmp_path, overrides=["train.max_iterations=7"]))
    cells = grid_cells(grid)
    assert [c.row for c in cells] == [BASELINE, "scdl_ga_cps"]
    for cell in cells:
        parse_method_options(cell.config.method.name, dict(cell.config.method.options))
        assert cell.config.train.max_iterations == 7  # overrides reach every row
        assert cell.config.data.root == str(tmp_path / "data")
        assert cell.run_dir == tmp_path / "runs" / cell.row / "seed0"
    assert cells[0].config.method.name == "supervised"


@pytest.mark.parametrize("row,host", [("scdl_ga_cps", "ga_cps"), ("scdl_ga_cps_e2p_sum", "ga_cps"),
                                      ("scdl_ga_cps_cdba_only", "ga_cps"),
                                      ("scdl_ga_magicnet", "ga_magicnet"),
                                      ("scdl_ga_magicnet_no_injection", "ga_magicnet"),
                                      ("scdl_ga_magicnet_zero_init", "ga_magicnet")])
def test_compare_scdl_rows_are_their_hosts_plus_the_plug_in(row: str, host: str) -> None:
    # A paired difference means something only if the rows differ in the plug-in alone.
    with_scdl = load_config(REPO / "configs" / "compare" / f"{row}.yaml")
    plain = load_config(REPO / "configs" / "compare" / f"{host}.yaml")
    assert with_scdl.method.name == f"scdl_{host}"
    assert dict(with_scdl.method.options)["host"] == dict(plain.method.options)
    for section in ("data", "model", "train", "inference", "evaluation"):
        assert getattr(with_scdl, section) == getattr(plain, section), section


SCHEDULE_KEYS = {"rampup_interval", "blend_start_iteration", "logger_refresh_every",
                 "contrast_start_epoch", "entropy_rampup_epochs", "rampup_length"}


def _schedule_values(options: dict, prefix: str = "") -> dict[str, float]:
    found: dict[str, float] = {}
    for key, value in options.items():
        if isinstance(value, dict):
            found.update(_schedule_values(value, f"{prefix}{key}."))
        elif key in SCHEDULE_KEYS:
            found[prefix + key] = float(value)
    return found


def test_the_converged_grid_doubles_every_iteration_schedule_with_the_run() -> None:
    # grid_converged.yaml runs the rows of grid.yaml twice as long; a schedule constant left
    # at its 1,800-iteration value would silently change the method, not just its length.
    short = {c.row: c.config for c in grid_cells(load_grid(REPO / "configs/compare/grid.yaml"))}
    long = {c.row: c.config for c in grid_cells(
        load_grid(REPO / "configs/compare/grid_converged.yaml"))}
    assert set(long) == set(short)
    for row, config in long.items():
        factor = config.train.max_iterations / short[row].train.max_iterations
        assert factor == (6000 / 1800 if row == "vnet_upper" else 2.0), row
        # One layout for every row: the layouts round differently (test_memory_format.py).
        assert config.train.channels_last, row
        before = _schedule_values(dict(short[row].method.options))
        after = _schedule_values(dict(config.method.options))
        assert set(after) == set(before), row
        for key, value in before.items():
            assert after[key] == pytest.approx(2 * value), (row, key)


def test_ga_cps_plain_cross_row_differs_from_ga_cps_in_the_cross_gamma_alone() -> None:
    ablation = load_config(REPO / "configs/compare/ga_cps_plain_cross.yaml")
    host = load_config(REPO / "configs/compare/ga_cps.yaml")
    options = dict(ablation.method.options)
    assert options.pop("ga_cross_gamma") == 1.0
    assert ablation.method.name == host.method.name and options == dict(host.method.options)
    for section in ("data", "model", "train", "inference", "evaluation"):
        assert getattr(ablation, section) == getattr(host, section), section
    # On the converged grid it runs as the converged GA-CPS row does.
    (cell,) = [c for c in grid_cells(load_grid(REPO / "configs/compare/grid_converged_ga_cps.yaml"))
               if c.seed == 0]
    (ga_cps,) = [c for c in grid_cells(load_grid(REPO / "configs/compare/grid_converged.yaml"))
                 if c.row == "ga_cps" and c.seed == 0]
    assert cell.config.train == ga_cps.config.train
    assert cell.run_dir.parent.parent == ga_cps.run_dir.parent.parent  # same output folder



@pytest.mark.parametrize("row,scdl_options", [
    ("scdl_ga_magicnet_no_injection", {"injection": "none"}),
    ("scdl_ga_magicnet_zero_init", {"zero_init_projection": True})])
def test_scdl_diagnosis_rows_differ_from_the_converged_scdl_row_in_one_option(
        row: str, scdl_options: dict) -> None:
    # The diagnosis of SCDL-GA-MagicNet's loss at convergence pairs these rows seed by seed
    # with the converged scdl_ga_magicnet row.
    diagnosis_grid = load_grid(REPO / "configs/compare/grid_converged_scdl.yaml")
    (diagnosis,) = [c for c in grid_cells(diagnosis_grid) if c.seed == 0 and c.row == row]
    (scdl,) = [c for c in grid_cells(load_grid(REPO / "configs/compare/grid_converged.yaml"))
               if c.row == "scdl_ga_magicnet" and c.seed == 0]
    options = dict(diagnosis.config.method.options)
    reference = dict(scdl.config.method.options)
    assert dict(options.pop("scdl")) == scdl_options
    assert dict(reference.pop("scdl")) == {}
    assert options == reference
    for section in ("data", "model", "train", "inference", "evaluation"):
        assert getattr(diagnosis.config, section) == getattr(scdl.config, section), section
    assert diagnosis.run_dir.parent.parent == scdl.run_dir.parent.parent  # same output folder
