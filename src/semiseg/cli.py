"""The ``semiseg`` command line.

    semiseg prepare synapse|amos|phantom ...   raw downloads -> training arrays
    semiseg train --config CFG [--set k=v]     train a method (resumable)
    semiseg evaluate RUN_DIR                   per-class Dice / ASD on the test split
    semiseg predict --checkpoint CKPT IN...    label maps on the input's own grid
    semiseg report RUN_DIR... --out DIR        the papers' tables and plots
    semiseg convert-checkpoint --from KIND IN OUT   official weights -> semiseg
    semiseg demo                               phantom -> train -> predict -> table

Errors in the user's input print one line naming the file or key and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from semiseg import __version__
from semiseg.engine.proxy_plot_cli import add_cli as add_plot_proxies_cli
from semiseg.errors import SemisegError
from semiseg.knowledge.cli import add_cli as add_knowledge_cli

Handler = Callable[[argparse.Namespace], int]


def _add_overrides(parser: argparse.ArgumentParser, help: str) -> None:
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help=help)


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", type=Path, help="run config YAML (see configs/)")
    _add_overrides(parser, "override a config value, e.g. --set train.lr=0.005 (repeatable)")


def _add_convert_checkpoint(sub: argparse._SubParsersAction) -> None:
    """``semiseg convert-checkpoint``: every kind of :func:`semiseg.models.
    read_official_checkpoint`."""
    convert = sub.add_parser(
        "convert-checkpoint", help="official weights -> a state dict create_model loads",
        description="Rename the keys of an official checkpoint (GALoss/DHC VNet, GALoss/MagicNet "
        "VNet_Magic) to semiseg's modules. The output loads with "
        "create_model(NAME, num_classes).load_state_dict(torch.load(OUT)) and gives the same "
        "logits as the official network.")
    convert.add_argument("--from", dest="kind", required=True,
                         choices=["galoss-vnet", "dhc-vnet", "galoss-magicnet", "tak"])
    convert.add_argument("input", type=Path, help="official .pth file")
    convert.add_argument("output", type=Path, help="converted state dict (.pt)")
    convert.add_argument("--which", help="network of a multi-network checkpoint (DHC: A or B)")
    convert.add_argument("--text-embeddings", type=Path, default=None,
                         help="tak only: embedding file to store in the converted state dict "
                         "(e.g. the authors' amos_embedding_shape_location.pth)")
    convert.set_defaults(handler=_cmd_convert)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="semiseg",
        description="Class-imbalanced semi-supervised 3D multi-organ CT segmentation "
                    "(SCDL, TAK, their hosts and baselines).",
    )
    parser.add_argument("--version", action="version", version=f"semiseg {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    prep = sub.add_parser("prepare", help="turn raw downloads into training arrays",
                          description="Prepare a dataset: read raw NIfTI volumes, apply the "
                          "official preprocessing (DHC paper-era grid: whole volume resized to "
                          "160x160x80), and write the semiseg layout (resumable).")
    prep.add_argument("dataset", choices=["synapse", "amos", "phantom"])
    prep.add_argument("--raw", type=Path, help="raw download folder (synapse: the folder "
                      "holding RawData/Training; amos: the folder with imagesTr/labelsTr)")
    prep.add_argument("--out", type=Path, required=True, help="output folder")
    prep.add_argument("--target-shape", type=int, nargs=3, metavar=("X", "Y", "Z"),
                      default=None, help="resized grid (default 160 160 80)")
    prep.add_argument("--profile", choices=["galoss", "dhc", "native"], default="galoss",
                      help="resampling profile: galoss/dhc = the 160x160x80 grid with the "
                      "pipeline's intensity window as default; native = keep the raw grid")
    prep.add_argument("--ct-only", action="store_true",
                      help="amos: skip the MRI cases (ids >= 500); the published splits then "
                      "no longer validate")
    prep.add_argument("--num-cases", type=int, default=30, help="phantom: number of cases")
    prep.add_argument("--shape", type=int, nargs=3, default=None, metavar=("X", "Y", "Z"),
                      help="phantom: volume shape")
    prep.add_argument("--class-set", default="synapse", choices=["synapse", "amos"],
                      help="phantom: organ set")
    prep.add_argument("--seed", type=int, default=0, help="phantom: generator seed")
    prep.set_defaults(handler=_cmd_prepare)

    train = sub.add_parser("train", help="train a method",
                           description="Train the method of a config. Checkpoints are written "
                           "atomically; --resume continues exactly where a run stopped.")
    _add_config_args(train)
    train.add_argument("--run-dir", type=Path, help="run folder (default: "
                       "<experiment.output_dir>/<experiment.name>/seed<seed>)")
    train.add_argument("--resume", action="store_true", help="continue the run in --run-dir")
    train.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    train.add_argument("--evaluate", action="store_true",
                       help="evaluate the best checkpoint on the test split when done")
    train.set_defaults(handler=_cmd_train)

    evaluate = sub.add_parser("evaluate", help="per-class Dice and ASD of a trained run",
                              description="Sliding-window inference on the evaluation split of a "
                              "run, then Dice and ASD per class with the official rules; writes "
                              "metrics.json in the run folder.")
    evaluate.add_argument("run_dir", type=Path, help="a run folder written by `semiseg train`")
    evaluate.add_argument("--checkpoint", type=Path, help="checkpoint (default: best.pt)")
    evaluate.add_argument("--split", choices=["eval", "test"], default=None)
    evaluate.add_argument("--save-predictions", action="store_true",
                          help="also write predictions/<case>.nii.gz")
    _add_overrides(evaluate, "override inference/evaluation settings")
    evaluate.set_defaults(handler=_cmd_evaluate)

    predict = sub.add_parser("predict", help="segment new scans",
                             description="Segment NIfTI files or DICOM folders with a trained "
                             "checkpoint; label maps are written on each input's own grid and "
                             "affine, so they overlay in 3D Slicer or ITK-SNAP.")
    predict.add_argument("inputs", nargs="+", type=Path, help="NIfTI files or DICOM folders")
    predict.add_argument("--checkpoint", type=Path, required=True)
    predict.add_argument("--out", type=Path, required=True, help="output folder")
    predict.add_argument("--device", default="auto")
    _add_overrides(predict, "override inference settings")
    predict.set_defaults(handler=_cmd_predict)

    report = sub.add_parser("report", help="tables and plots from evaluated runs",
                            description="Collect metrics.json of runs (several seeds per method) "
                            "and write the papers' tables (Markdown, CSV, JSON, LaTeX) and plots.")
    report.add_argument("runs", nargs="+", type=Path,
                        help="run folders (searched recursively) or experiment grid YAMLs")
    report.add_argument("--out", type=Path, required=True)
    report.add_argument("--layout", nargs="+", choices=["table1", "per_class", "ablation"],
                        default=None, help="tables to write (default: table1 and per_class, "
                        "plus ablation when the runs record SCDL/TAK switches)")
    report.add_argument("--std", choices=["auto", "always", "never"], default="auto",
                        help="show ±std over seeds in every table (always), in none (never), or "
                        "in table1 and ablation tables only (auto)")
    report.add_argument("--ddof", type=int, choices=[0, 1], default=0,
                        help="std over seeds: 0 population (DHC's evaluate_Ntimes, default), "
                        "1 sample")
    report.add_argument("--paired", metavar="BASELINE",
                        help="also compare every method with BASELINE (a method name) seed by "
                        "seed: per-seed differences, mean and 95%% t-interval of mean / large "
                        "/ small Dice and ASD, a table and a plot per setting")
    report.set_defaults(handler=_cmd_report)

    experiment = sub.add_parser(
        "experiment", help="run a whole table (methods x ratios x seeds) from a grid YAML",
        description="Run every cell of an experiment grid in turn: finished cells are skipped, "
        "interrupted ones resume from their last checkpoint, each cell is evaluated, and "
        "manifest.json records what ran with which config and code version.")
    exp_sub = experiment.add_subparsers(dest="experiment_command", required=True,
                                        metavar="ACTION")
    exp_run = exp_sub.add_parser("run", help="run (or resume) the grid")
    exp_run.add_argument("grid", type=Path)
    exp_run.add_argument("--no-progress", action="store_true")
    exp_run.add_argument("--rows", nargs="+", default=None, metavar="ROW",
                         help="run only these rows of the grid")
    exp_run.set_defaults(handler=_cmd_experiment_run)
    exp_status = exp_sub.add_parser("status", help="show which cells are done")
    exp_status.add_argument("grid", type=Path)
    exp_status.set_defaults(handler=_cmd_experiment_status)

    _add_convert_checkpoint(sub)

    add_knowledge_cli(sub)
    add_plot_proxies_cli(sub)

    demo = sub.add_parser("demo", help="phantom -> train -> predict -> table, on the CPU",
                          description="The built-in demo: generate the phantom abdomen, train "
                          "the demo config with 20%% labeled cases, predict the test cases and "
                          "print the per-class table. Everything lands in one run folder.")
    demo.add_argument("--out", type=Path, default=Path("runs/demo"))
    demo.add_argument("--config", type=Path, default=None, help="demo config (default: built-in)")
    _add_overrides(demo, "override a demo config value")
    demo.set_defaults(handler=_cmd_demo)
    return parser


# ---------------------------------------------------------------------------------- handlers


def _cmd_prepare(args: argparse.Namespace) -> int:
    from semiseg.data import prepare

    if args.dataset == "phantom":
        from semiseg.data.classes import get_class_set
        from semiseg.data.phantom import generate_dataset

        kwargs = {} if args.shape is None else {"shape": tuple(args.shape)}
        generate_dataset(args.out, num_cases=args.num_cases, class_set=get_class_set(
            args.class_set), seed=args.seed, **kwargs)
        print(f"phantom with {args.num_cases} cases in {args.out}")
        return 0
    if args.raw is None:
        raise SemisegError(f"prepare {args.dataset}: --raw (the raw download folder) is required")
    kwargs: dict = {"profile": args.profile}
    if args.target_shape is not None:
        kwargs["target_shape"] = tuple(args.target_shape)
    if args.dataset == "synapse":
        prepare.prepare_synapse(args.raw, args.out, **kwargs)
    else:
        prepare.prepare_amos(args.raw, args.out, ct_only=args.ct_only, **kwargs)
    print(f"prepared {args.dataset} in {args.out}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from semiseg.config import load_config
    from semiseg.engine.runs import default_run_dir, train_and_maybe_evaluate

    config = load_config(args.config, args.overrides)
    run_dir = args.run_dir or default_run_dir(config)
    result = train_and_maybe_evaluate(config, run_dir, resume=args.resume,
                                      evaluate=args.evaluate,
                                      show_progress=not args.no_progress)
    print(f"run folder: {result.run_dir}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from semiseg.engine.runs import evaluate_run

    result = evaluate_run(args.run_dir, checkpoint=args.checkpoint, split=args.split,
                          save_predictions=args.save_predictions, overrides=args.overrides)
    print(result.to_markdown())
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from semiseg.engine.predict import predict_files

    written = predict_files(args.checkpoint, args.inputs, args.out, device=args.device,
                            overrides=args.overrides)
    for path in written:
        print(path)
    return 0


def _cmd_experiment_run(args: argparse.Namespace) -> int:
    from semiseg.engine.experiment import load_grid, run_grid, select_rows

    run_grid(select_rows(load_grid(args.grid), args.rows), show_progress=not args.no_progress)
    return 0


def _cmd_experiment_status(args: argparse.Namespace) -> int:
    from semiseg.engine.experiment import grid_status, load_grid

    rows = grid_status(load_grid(args.grid))
    width = max(len(key) for key, _, _ in rows)
    for key, status, run_dir in rows:
        print(f"{key:<{width}}  {status:<8}  {run_dir}")
    done = sum(status == "done" for _, status, _ in rows)
    print(f"{done}/{len(rows)} cells done")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from semiseg.engine.experiment import grid_run_dirs, load_grid
    from semiseg.engine.report import write_report

    sources: list[Path] = []
    for path in args.runs:
        if path.suffix in (".yaml", ".yml") and path.is_file():
            sources.extend(grid_run_dirs(load_grid(path)))
        else:
            sources.append(path)
    if not sources:
        raise SemisegError("no evaluated runs to report (has the grid run?)")
    show_std = {"auto": None, "always": True, "never": False}[args.std]
    outputs = write_report(sources, args.out, args.layout, ddof=args.ddof, show_std=show_std,
                           paired=args.paired)
    print(f"report written to {args.out}")
    for path in outputs if isinstance(outputs, (list, tuple)) else []:
        print(f"  {path}")
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from semiseg.models import read_official_checkpoint
    from semiseg.models.convert import converted_model
    from semiseg.utils.io import atomic_torch_save

    if args.text_embeddings is not None and args.kind != "tak":
        raise SemisegError("--text-embeddings applies to --from tak only")
    state = read_official_checkpoint(args.input, args.kind, args.which, args.text_embeddings)
    atomic_torch_save(state, args.output)
    model, options = converted_model(state, args.kind)
    listed = ", ".join(f"{k}={v!r}" for k, v in options.items())
    # A converted TAK network without its embeddings keeps those it is built with.
    hint = ", text_embeddings=E" if args.kind == "tak" and "text_embeddings" not in state else ""
    print(f"{args.output}: {len(state)} tensors; load with create_model({model!r}, {listed}{hint})")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from semiseg.engine.demo import run_demo

    run_demo(args.out, config_path=args.config, overrides=args.overrides)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except SemisegError as exc:
        print(f"semiseg {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"semiseg {args.command}: interrupted (a resumable run continues with --resume)",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
