"""What moves SCDL's proxy means in a trained run: each loss term's gradient on mu and sigma.

    python benchmarks/scdl_proxy_gradient.py runs/compare/scdl_ga_cps/seed0
    python benchmarks/scdl_proxy_gradient.py runs/compare/scdl_ga_magicnet/seed0 --checkpoint best

Rebuilds the run's method from its checkpoint, takes one training step's terms on a batch of the
run's own data (the two labelled crops with the most foreground, one crop of each of two
unlabelled cases; the training step of the checkpoint's iteration, in train mode) and prints the
norm of each weighted term's gradient with respect to the first network's proxy means
``proxy_mean`` and ``proxy_rho`` (sigma = softplus(rho)), the host's terms and SCDL's summed
apart, and the cosine between the two sums. A host/SCDL ratio far above 1 says that the
segmentation loss, through the injected prior, decides where the proxies go, not Eq. 3, 4 and 8
(docs/methods/scdl.md, "What moves the proxies").
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor


def proxy_gradients(run_dir: Path, checkpoint_name: str = "last") -> tuple[int, dict]:
    """``(iteration, {term: (|d/dmu|, |d/drho|)})`` plus ``host``/``scdl`` sums and cosines."""
    from semiseg.engine.proxy_plot import case_crops, load_scdl_run
    from semiseg.engine.setup import open_split, open_store
    from semiseg.methods.base import Batch, StepInfo
    from semiseg.plugins.scdl.method import TERM_PREFIX

    run = load_scdl_run(run_dir / "checkpoints" / f"{checkpoint_name}.pt")
    payload, config, method = run.payload, run.config, run.method
    method.train()
    _, store = open_store(config)
    split = open_split(config, store)
    labelled = split.labeled_ids(config.data.labeled_ratio)
    unlabelled = [i for i in split.train if i not in labelled]
    crops = [case_crops(store.image(i), store.label(i), config.data.patch_size) for i in labelled]
    images, labels = torch.cat([c[0] for c in crops]), torch.cat([c[1] for c in crops])
    richest = (labels > 0).flatten(1).float().mean(1).argsort(descending=True)[:2]
    others = [case_crops(store.image(i), store.label(i), config.data.patch_size)[0][:1]
              for i in unlabelled[:2]]
    batch = Batch(torch.cat([images[richest], *others]), labels[richest], 2,
                  ["l0", "l1", "u0", "u1"])
    iteration = int(payload.get("iteration", config.train.max_iterations))
    step = StepInfo(max(iteration - 1, 0), config.train.max_iterations, 10)
    terms = method.training_step(batch, step)
    weights = method.loss_weights(step)
    _, cdba = method.proxy_networks()[0]
    params = [cdba.proxy_mean, cdba.proxy_rho]
    grads: dict[str, list[Tensor]] = {}
    for name, value in terms.items():
        found = torch.autograd.grad(weights.get(name, 1.0) * value, params, retain_graph=True,
                                    allow_unused=True)
        grads[name] = [torch.zeros_like(p) if g is None else g for g, p in zip(found, params)]
    host = [sum(g[i] for k, g in grads.items() if not k.startswith(TERM_PREFIX))
            for i in range(2)]
    scdl = [sum(g[i] for k, g in grads.items() if k.startswith(TERM_PREFIX)) for i in range(2)]
    out = {name: tuple(float(x.norm()) for x in g) for name, g in grads.items()}
    out["host"] = tuple(float(x.norm()) for x in host)
    out["scdl"] = tuple(float(x.norm()) for x in scdl)
    out["cosine"] = tuple(float(F.cosine_similarity(h.flatten(), s.flatten(), 0))
                          for h, s in zip(host, scdl))
    return iteration, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="an scdl_* run folder")
    parser.add_argument("--checkpoint", default="last", choices=["last", "best"],
                        help="which checkpoint of the run")
    args = parser.parse_args()
    torch.manual_seed(0)
    from semiseg.errors import SemisegError

    try:
        iteration, out = proxy_gradients(args.run, args.checkpoint)
    except SemisegError as exc:  # one line naming the run, never a traceback
        raise SystemExit(f"error: {exc}") from None
    print(f"{args.run} at iteration {iteration}: gradient norm of each weighted term")
    print(f"  {'term':16s} {'d/d mu':>10s} {'d/d rho':>10s}")
    for name, (mu, rho) in out.items():
        if name != "cosine":
            print(f"  {name:16s} {mu:10.3e} {rho:10.3e}")
    host, scdl = out["host"][0], out["scdl"][0]
    ratio = host / scdl if scdl > 0 else float("inf")
    print(f"  host / SCDL on mu: {ratio:.1f}x, cosine of the two {out['cosine'][0]:+.3f}")


if __name__ == "__main__":
    main()
