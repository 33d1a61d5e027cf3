"""How much of the encoder's gradient SCDL's own terms carry, per option, at a run's start.

Builds the method of a config (default: the comparison protocol's ``scdl_ga_cps`` row), takes
its first training batches, and prints for each variant the mean over ``--batches`` steps of
``diag/scdl/encoder_grad_ratio``: the norm of the SCDL terms' gradient on the first network's
encoder over the host terms' (method weights), the quantity a user watches in TensorBoard.
Nothing is trained: every variant sees the same freshly initialised weights and batches.

    python benchmarks/scdl_gradient_share.py
    python benchmarks/scdl_gradient_share.py --config configs/compare/scdl_ga_magicnet.yaml

docs/methods/scdl.md ("Defaults") quotes the output.
"""

from __future__ import annotations

import argparse
import statistics

import torch

VARIANTS: list[tuple[str, list[str]]] = [
    ("defaults", []),
    ("e2p_reduction sum (paper)", ["method.options.scdl.e2p_reduction=sum"]),
    ("weights 1.0", ["method.options.scdl.e2p_weight=1.0", "method.options.scdl.p2e_weight=1.0",
                     "method.options.scdl.sac_weight=1.0"]),
    ("token_stride 8 (official)", ["method.options.scdl.token_stride=8"]),
    ("preset paper", ["method.options.scdl.preset=paper"]),
]


def encoder_share(config_path: str, overrides: list[str], batches: int, seed: int) -> float:
    """Mean SCDL/host encoder-gradient ratio over the first ``batches`` training batches."""
    from semiseg.config import load_config
    from semiseg.engine.setup import build_method_for, prepare_run_data
    from semiseg.methods.base import Batch, StepInfo

    config = load_config(config_path, overrides=overrides)
    data = prepare_run_data(config)
    torch.manual_seed(seed)
    method = build_method_for(config, data)
    method.train()
    ratios = []
    for index in range(batches):
        batch = Batch.from_dict(data.batches[index])
        method.training_step(batch, StepInfo(index, config.train.max_iterations, log=True))
        ratios.append(float(method.diagnostics()["scdl/encoder_grad_ratio"]))
    return statistics.mean(ratios)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/compare/scdl_ga_cps.yaml")
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"SCDL / host gradient norm on the first network's encoder ({args.config}, "
          f"first {args.batches} batches, initial weights)")
    for name, overrides in VARIANTS:
        share = encoder_share(args.config, overrides, args.batches, args.seed)
        print(f"{name:28s} {share:10.2e}")


if __name__ == "__main__":
    main()
