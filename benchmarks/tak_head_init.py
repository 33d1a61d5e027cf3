"""How flat TAK's text-driven head is at initialisation, next to MagicNet's static head.

TAK's controller (a PyTorch-default ``Linear``, as the official ``nn.Conv3d`` controller)
generates every class's 8-8-1 head from small inputs, so the generated weights start far below
the scale of a directly initialised convolution, and the three stacked products shrink the
voxel-to-voxel variation of the logits. This script prints, for freshly built networks on one
random crop:

* the standard deviation of each generated head tensor (W1, W2, W3, b1, b2, b3);
* the logits' standard deviation over voxels (mean over images and classes) for ``tak`` and
  ``magicnet`` with the same encoder and decoder;
* the gradient norm that a cross-entropy loss against a random label map sends to the first
  encoder block, for both;
* for TAK: the class-separating logit variation (std over classes of the logits, mean over
  voxels), the share of the generated head weights that differs between classes, and the text
  half's share of the controller input;

for the official TAK network and for the choices of docs/methods/tak.md ("The dynamic
head"): ``controller_init: scaled``, ``controller_input: balanced`` or ``centered``, text rows
at unit RMS.

Run with the authors' embedding file for the official setting, or without for random unit
embeddings (the scale of the offline MiniLM encoder)::

    python benchmarks/tak_head_init.py \
        --embeddings ../shared/data/tak-embeddings/amos_embedding_shape_location.pth
    python benchmarks/tak_head_init.py --n-filters 8 --patch 32 --cube 16 --num-classes 14 \
        --text-dim 384
"""

from __future__ import annotations

import argparse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--embeddings", help="embedding file (ours or the authors' [32, 512])")
    parser.add_argument("--num-classes", type=int, default=16)
    parser.add_argument("--text-dim", type=int, default=512)
    parser.add_argument("--n-filters", type=int, default=16)
    parser.add_argument("--patch", type=int, default=64)
    parser.add_argument("--cube", type=int, default=32)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch
    import torch.nn.functional as F

    from semiseg.models import create_model
    from semiseg.models.tak import split_head_parameters

    torch.manual_seed(args.seed)
    if args.embeddings:
        from semiseg.knowledge.embeddings import load_embeddings

        embeddings = load_embeddings(args.embeddings).tensor
        source = args.embeddings
    else:
        embeddings = F.normalize(torch.randn(2, args.num_classes, args.text_dim), dim=-1)
        source = "random unit vectors"
    num_classes = int(embeddings.size(1))
    norm = "batchnorm" if args.cube < 32 else "instancenorm"
    common = dict(n_filters=args.n_filters, cube_size=args.cube, patch_size=args.patch,
                  normalization=norm)
    image = torch.rand(args.batch, 1, args.patch, args.patch, args.patch)
    label = torch.randint(0, num_classes, (args.batch, args.patch, args.patch, args.patch))
    print(f"{num_classes} classes, text {tuple(embeddings.shape)} from {source} "
          f"(row norm {embeddings.norm(dim=-1).mean():.2f}), {args.n_filters} filters, "
          f"{args.patch}^3 crop")

    from semiseg.methods.tak import normalize_text_rows

    variants = [
        ("magicnet", "magicnet", {}, embeddings),
        ("tak official", "tak", {}, embeddings),
        ("tak scaled", "tak", {"controller_init": "scaled"}, embeddings),
        ("tak balanced", "tak", {"controller_input": "balanced"}, embeddings),
        ("tak scaled+balanced", "tak",
         {"controller_init": "scaled", "controller_input": "balanced"}, embeddings),
        ("  + text rms", "tak", {"controller_init": "scaled", "controller_input": "balanced"},
         normalize_text_rows(embeddings)),
        ("tak scaled+centered", "tak",
         {"controller_init": "scaled", "controller_input": "centered"}, embeddings),
        ("  + text rms", "tak", {"controller_init": "scaled", "controller_input": "centered"},
         normalize_text_rows(embeddings)),
    ]
    rows = []
    for title, name, options, text in variants:
        torch.manual_seed(args.seed)
        extra = {"text_embeddings": text, **options} if name == "tak" else {}
        network = create_model(name, num_classes, **common, **extra)
        logits = network(image)
        F.cross_entropy(logits, label).backward()
        first = network.encoder.block_one
        grad = torch.sqrt(sum(p.grad.pow(2).sum() for p in first.parameters()
                              if p.grad is not None))
        spread = float(logits.detach().std(dim=(2, 3, 4)).mean())
        separating = float(logits.detach().std(dim=1).mean())
        share = text_share = float("nan")
        stds = ""
        if name == "tak":
            share = float(network.head_stats["class_share"])
            text_share = float(network.head_stats["text_input_share"])
            with torch.no_grad():
                params = network.head_parameters(network.image_feature(network.encode(image)),
                                                 network.text_condition())
            stds = " ".join(f"{float(t.std()):.3f}" for t in split_head_parameters(params)[:3])
        rows.append((title, spread, separating, float(grad), share, text_share, stds))
    print(f"{'network':<22}{'logit std/voxels':>17}{'class-separating':>17}{'grad block1':>13}"
          f"{'class share':>12}{'text share':>11}  W1 W2 W3 std")
    for title, spread, separating, grad, share, text_share, stds in rows:
        print(f"{title:<22}{spread:>17.5f}{separating:>17.5f}{grad:>13.5f}{share:>12.3f}"
              f"{text_share:>11.3f}  {stds}")
    base = rows[0]
    for row in rows[1:]:
        print(f"magicnet / {row[0].strip()}: logit spread {base[1] / row[1]:.1f}x, encoder "
              f"gradient {base[3] / row[3]:.1f}x")


if __name__ == "__main__":
    main()
