"""benchmarks/scdl_proxy_gradient.py on two-iteration SCDL-GA-CPS runs."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from semiseg.config import load_config

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("scdl_proxy_gradient",
                                               REPO / "benchmarks" / "scdl_proxy_gradient.py")
scdl_proxy_gradient = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(scdl_proxy_gradient)


def _run(tmp_path: Path, name: str, detach: bool) -> Path:
    from semiseg.engine.trainer import Trainer

    overrides = [
        f"data.root={tmp_path / 'data'}", "data.phantom.num_cases=10",
        "data.phantom.shape=[40, 40, 32]", "data.patch_size=[32, 32, 32]",
        "data.labeled_ratio=0.3", "model.options={n_filters: 4}", "method.name=scdl_ga_cps",
        f"method.options={{scdl: {{detach_prior_mean: {str(detach).lower()}}}}}",
        "train.max_iterations=2", "train.batch_size=4", "train.labeled_batch_size=2",
        "train.validate_every=0", "train.log_every=1", "experiment.seed=3",
    ]
    run = tmp_path / name
    Trainer(load_config(None, overrides), run, show_progress=False).fit()
    return run


@pytest.mark.parametrize("detach", [False, True])
def test_proxy_gradient_split_by_term(tmp_path: Path, detach: bool) -> None:
    run = _run(tmp_path, "run", detach)
    iteration, out = scdl_proxy_gradient.proxy_gradients(run)
    assert iteration == 2
    assert {"sup_ce_a", "scdl_e2p", "scdl_p2e", "scdl_sac", "host", "scdl", "cosine"} <= set(out)
    host_mu, host_rho = out["host"]
    scdl_mu, scdl_rho = out["scdl"]
    assert scdl_mu > 0 and scdl_rho == 0  # Eq. 3, 4 and 8 read the means only
    assert host_rho > 0  # sigma learns through the sampled proxies either way
    if detach:
        assert host_mu == 0 and out["cosine"][0] == 0
    else:
        assert host_mu > 0 and -1 <= out["cosine"][0] <= 1
