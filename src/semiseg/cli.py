"""The ``semiseg`` command line.

    semiseg prepare synapse|amos|generic|phantom --out DIR ...   raw scans -> training arrays
    semiseg train --config CFG --out RUN [--set k=v]   train a method (resumable, --resume)
    semiseg evaluate RUN                       per-class Dice / ASD on the test split
    semiseg predict --checkpoint CKPT IN... --out DIR   label maps on the input's own grid
    semiseg score PRED LABEL                   Dice / ASD of any label map against any label
    semiseg report RUN... --out DIR            the papers' tables and plots
    semiseg convert-checkpoint --from KIND IN --out OUT   official weights -> semiseg
    semiseg demo                               phantom -> train -> predict -> table

One name per concept: ``--out`` is where a command writes, ``--device`` the network's device,
``--no-progress`` hides progress bars. Errors in the user's input and outputs that cannot be
written print one line naming the file or key and exit with status 2; a training stopped by
SIGINT / SIGTERM saves a checkpoint and exits 130 / 143.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from semiseg import __version__
from semiseg.engine.data_cli import add_cli as add_data_cli
from semiseg.engine.proxy_plot_cli import add_cli as add_plot_proxies_cli
from semiseg.errors import RunInterruptedError, SemisegError
from semiseg.knowledge.cli import add_cli as add_knowledge_cli
from semiseg.utils.cli_args import (
    add_device,
    add_no_progress,
    add_out,
    add_overrides,
    device_overrides,
)

if TYPE_CHECKING:
    from semiseg.config import Config

Handler = Callable[[argparse.Namespace], int]


def _add_convert_checkpoint(sub: argparse._SubParsersAction) -> None:
    """``semiseg convert-checkpoint``: every kind of :func:`semiseg.models.
    read_official_checkpoint`."""
    convert = sub.add_parser(
        "convert-checkpoint", help="official weights -> a state dict create_model loads",
        description="Rename the keys of an official checkpoint (GALoss/DHC VNet, GALoss/MagicNet "
        "VNet_Magic, TAK, the SCDL inference networks) to semiseg's modules. The output loads "
        "with create_model(NAME, num_classes).load_state_dict(torch.load(OUT)) (scdl-synapse-"
        "magicnet: official_scdl_network(...), the command prints the call) and gives the same "
        "logits as the official network.")
    convert.add_argument("--from", dest="kind", required=True,
                         choices=["galoss-vnet", "dhc-vnet", "galoss-magicnet", "tak",
                                  "scdl-synapse-magicnet", "scdl-amos-magicnet",
                                  "scdl-synapse-cps", "scdl-amos-cps"],
                         help="which official code wrote the checkpoint")
    convert.add_argument("input", type=Path, help="official .pth file")
    add_out(convert, "converted state dict (.pt) to write")
    convert.add_argument("output", type=Path, nargs="?", default=None,
                         help="the same as --out (the older spelling)")
    convert.add_argument("--which", help="network of a multi-network checkpoint (DHC, CPS: A or "
                         "B; the official SCDL CPS files hold one network each)")
    convert.add_argument("--eprl", type=Path, default=None,
                         help="scdl-synapse-magicnet only: the SCDL module's file when IN holds "
                         "the network only (the official script's --eprl_path)")
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
    add_data_cli(sub)

    train = sub.add_parser("train", help="train a method",
                           description="Train the method of a config. Checkpoints are written "
                           "atomically; --resume continues exactly where a run stopped.")
    train.add_argument("--config", "-c", type=Path, help="run config YAML (see configs/); "
                       "with --resume, default: the run folder's own config.yaml")
    add_overrides(train, "override a config value, e.g. --set train.lr=1e-3 (repeatable)")
    add_out(train, "run folder (default: <experiment.output_dir>/<experiment.name>/"
            "seed<experiment.seed>)")
    # The older name of --out, kept so that existing scripts and torchrun lines still work.
    train.add_argument("--run-dir", type=Path, dest="run_dir", help=argparse.SUPPRESS)
    train.add_argument("--resume", action="store_true",
                       help="continue the run in --out from its last checkpoint (its own "
                       "config.yaml unless --config is given)")
    add_device(train)
    add_no_progress(train)
    train.add_argument("--evaluate", action="store_true",
                       help="evaluate the best checkpoint on the test split when done")
    train.set_defaults(handler=_cmd_train)

    evaluate = sub.add_parser("evaluate", help="per-class Dice and ASD of a trained run",
                              description="Sliding-window inference on the evaluation split of a "
                              "run, then Dice and ASD per class with the official rules; writes "
                              "metrics.json in the run folder.")
    evaluate.add_argument("run_dir", type=Path, help="a run folder written by `semiseg train` "
                          "(metrics.json, predictions/ and overlays/ are written into it)")
    evaluate.add_argument("--checkpoint", type=Path, help="checkpoint of this run to evaluate "
                          "(default: RUN/checkpoints/best.pt); a checkpoint of another run "
                          "is refused")
    evaluate.add_argument("--split", choices=["eval", "test"], default=None,
                          help="which cases of the run's split to score (default: the "
                          "config's evaluation.split, test)")
    evaluate.add_argument("--save-predictions", action=argparse.BooleanOptionalAction,
                          default=True, help="write predictions/<case>.nii.gz in each case's "
                          "own geometry and overlays/<case>.png (default: on)")
    evaluate.add_argument("--overlays", type=int, default=6, metavar="N",
                          help="overlay PNGs (axial and coronal slices, ground truth beside "
                          "prediction) for the first N cases (default 6; 0 for none)")
    add_device(evaluate)
    add_no_progress(evaluate)
    add_overrides(evaluate, "override inference/evaluation settings, e.g. --set "
                  "evaluation.asd_unit=mm (repeatable)")
    evaluate.set_defaults(handler=_cmd_evaluate)

    predict = sub.add_parser("predict", help="segment new scans",
                             description="Segment NIfTI files or DICOM folders with a trained "
                             "checkpoint; label maps are written on each input's own grid and "
                             "affine, so they overlay in 3D Slicer or ITK-SNAP.")
    predict.add_argument("inputs", nargs="+", type=Path, help="NIfTI files or DICOM folders")
    predict.add_argument("--checkpoint", type=Path, required=True,
                         help="a checkpoint written by `semiseg train` (RUN/checkpoints/best.pt)")
    add_out(predict, "output folder: <scan>_seg.nii.gz per input (inputs of one name in "
            "different folders get their folder's name in front) and manifest.json",
            required=True)
    predict.add_argument("--overwrite", action="store_true",
                         help="replace outputs that exist already (default: refuse)")
    add_device(predict, default="auto")
    add_no_progress(predict)
    add_overrides(predict, "override inference settings, e.g. --set inference.sw_batch_size=1 "
                  "(repeatable)")
    predict.set_defaults(handler=_cmd_predict)

    report = sub.add_parser("report", help="tables and plots from evaluated runs",
                            description="Collect metrics.json of runs (several seeds per method) "
                            "and write the papers' tables (Markdown, CSV, JSON, LaTeX) and plots.")
    report.add_argument("runs", nargs="+", type=Path,
                        help="run folders (searched recursively) or experiment grid YAMLs")
    add_out(report, "report folder: report.md, the tables (Markdown, CSV, JSON, LaTeX) and "
            "plots", required=True)
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
    exp_run.add_argument("grid", type=Path, help="experiment grid YAML")
    _add_cell_selection(exp_run, "run")
    exp_run.add_argument("--jobs", default="1", metavar="N",
                         help="grid processes to run at once, each claiming the next free "
                         "cell and sharing the CPU cores: a number, or auto = one per core "
                         "on the CPU, one per two cores with a GPU (measured in "
                         "docs/performance.md); default 1, this process alone")
    add_device(exp_run)
    add_no_progress(exp_run)
    exp_run.set_defaults(handler=_cmd_experiment_run)
    exp_status = exp_sub.add_parser("status", help="show which cells are done")
    exp_status.add_argument("grid", type=Path, help="experiment grid YAML")
    _add_cell_selection(exp_status, "show")
    exp_status.set_defaults(handler=_cmd_experiment_status)

    _add_convert_checkpoint(sub)

    add_knowledge_cli(sub)
    add_plot_proxies_cli(sub)

    demo = sub.add_parser("demo", help="phantom -> train -> predict -> table, on the CPU",
                          description="The built-in demo: generate the phantom abdomen, train "
                          "the demo config with 20%% labeled cases, predict the test cases and "
                          "print the per-class table. Everything lands in one run folder.")
    add_out(demo, "demo folder: phantom data, run, report (default runs/demo)",
            default=Path("runs/demo"))
    demo.add_argument("--config", type=Path, default=None, help="demo config (default: built-in)")
    add_overrides(demo, "override a demo config value (repeatable)")
    add_device(demo)
    add_no_progress(demo)
    demo.set_defaults(handler=_cmd_demo)
    return parser


# ---------------------------------------------------------------------------------- handlers


def _train_config(args: argparse.Namespace) -> tuple[Config, Path]:
    """The config and run folder of ``semiseg train``: with ``--resume`` and no ``--config``,
    the run folder's own config.yaml (``--set`` on top)."""
    from semiseg.config import load_config
    from semiseg.engine.runs import default_run_dir

    if args.out is not None and args.run_dir is not None:
        raise SemisegError("--run-dir is the older name of --out; give one of them")
    out = args.out or args.run_dir
    overrides = device_overrides(args)
    if args.resume and args.config is None:
        if out is None:
            raise SemisegError("--resume needs the run folder: --out RUN")
        saved = out / "config.yaml"
        if not saved.is_file():
            raise SemisegError(f"{out}: no config.yaml, so nothing to resume there (a run "
                               "folder holds one from its first checkpoint on)")
        return load_config(saved, overrides), out
    config = load_config(args.config, overrides)
    return config, out or default_run_dir(config)


def _cmd_train(args: argparse.Namespace) -> int:
    from semiseg.engine.runs import train_and_maybe_evaluate
    from semiseg.utils.io import writable_folder

    config, run_dir = _train_config(args)
    writable_folder(run_dir)
    result, evaluation = train_and_maybe_evaluate(config, run_dir, resume=args.resume,
                                                  evaluate=args.evaluate,
                                                  show_progress=not args.no_progress)
    print(f"run folder: {result.run_dir}")
    print(f"trained {result.iterations}/{result.max_iterations} iterations in "
          f"{_duration(result.seconds)}")
    if result.validated:
        print(f"best validation Dice {result.best_score * 100:.2f} % at iteration "
              f"{result.best_iteration} (checkpoints/best.pt)")
    else:
        print("no validation ran (train.validate_every 0, or no eval cases): checkpoints/"
              "best.pt holds the final weights")
    if evaluation is not None:
        print(evaluation.to_markdown())
        print(f"next: semiseg report {result.run_dir} --out {result.run_dir / 'report'}")
    else:
        print(f"next: semiseg evaluate {result.run_dir}")
    return 0


def _duration(seconds: float) -> str:
    """``12.3 s``, ``4m 05s``, ``2h 07m``."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {secs:02d}s" if minutes else f"{seconds:.1f} s"


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from semiseg.engine.runs import evaluate_run

    result = evaluate_run(args.run_dir, checkpoint=args.checkpoint, split=args.split,
                          save_predictions=args.save_predictions, overrides=args.overrides,
                          show_progress=not args.no_progress, device=args.device,
                          overlays=args.overlays)
    print(result.to_markdown())
    print(f"metrics: {args.run_dir / 'metrics.json'}")
    if args.save_predictions:
        print(f"predictions: {args.run_dir / 'predictions'} (NIfTI, each case's own geometry); "
              f"overlays: {args.run_dir / 'overlays'}")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from semiseg.engine.predict import MANIFEST, predict_files

    def warn(message: str) -> None:
        print(f"semiseg predict: warning: {message}", file=sys.stderr)

    written = predict_files(args.checkpoint, args.inputs, args.out, device=args.device,
                            overrides=args.overrides, show_progress=not args.no_progress,
                            overwrite=args.overwrite, warn=warn)
    for path in written:
        print(path)
    print(f"inputs -> outputs: {args.out / MANIFEST}")
    return 0


def _cmd_experiment_run(args: argparse.Namespace) -> int:
    from semiseg.engine.experiment import load_selected_grid, run_command_line, run_grid

    if args.jobs != "1":
        from semiseg.engine.grid_jobs import run_grid_in_processes

        return run_grid_in_processes(args.grid, args.jobs, args.rows, args.device,
                                     show_progress=not args.no_progress, seeds=args.seeds)
    run_grid(load_selected_grid(args.grid, args.rows, args.seeds),
             show_progress=not args.no_progress, device=args.device,
             resume_command=run_command_line(args.grid, args.rows, args.seeds, args.device))
    return 0


def _add_cell_selection(parser: argparse.ArgumentParser, verb: str) -> None:
    parser.add_argument("--rows", nargs="+", default=None, metavar="ROW",
                        help=f"{verb} only these rows of the grid")
    parser.add_argument("--seeds", nargs="+", type=int, default=None, metavar="SEED",
                        help=f"{verb} only these of the grid's seeds (e.g. the seeds a new row "
                        "still lacks to pair with the others)")


def _cmd_experiment_status(args: argparse.Namespace) -> int:
    from semiseg.engine.experiment import grid_status, load_selected_grid

    rows = grid_status(load_selected_grid(args.grid, args.rows, args.seeds))
    width = max(len(key) for key, _, _ in rows)
    for key, status, run_dir in rows:
        print(f"{key:<{width}}  {status:<8}  {run_dir}")
    done = sum(status == "done" for _, status, _ in rows)
    print(f"{done}/{len(rows)} cells done")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from semiseg.engine.experiment import grid_run_dirs, load_grid
    from semiseg.engine.report import write_report
    from semiseg.utils.io import writable_folder

    sources: list[Path] = []
    for path in args.runs:
        if path.suffix in (".yaml", ".yml") and path.is_file():
            sources.extend(grid_run_dirs(load_grid(path)))
        else:
            sources.append(path)
    if not sources:
        raise SemisegError("no evaluated runs to report (has the grid run?)")
    writable_folder(args.out)  # before reading the runs
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
    from semiseg.utils.io import atomic_torch_save, writable_file

    if args.text_embeddings is not None and args.kind != "tak":
        raise SemisegError("--text-embeddings applies to --from tak only")
    if (args.out is None) == (args.output is None):
        raise SemisegError("name the converted file once: --out OUT")
    args.output = writable_file(args.out or args.output)
    state = read_official_checkpoint(args.input, args.kind, args.which, args.text_embeddings,
                                     args.eprl)
    atomic_torch_save(state, args.output)
    model, options = converted_model(state, args.kind)
    listed = ", ".join(f"{k}={v!r}" for k, v in options.items())
    if args.kind == "scdl-synapse-magicnet":
        # The network carries the SCDL plug-in's module: its builder attaches it.
        width = int(state["injector.cdba.proxy_mean"].shape[1])
        listed += f", embedding_dim={width}" if width != 256 else ""
        print(f"{args.output}: {len(state)} tensors; load with semiseg.plugins.scdl.official."
              f"official_scdl_network({args.kind!r}, {listed}) (eval mode: the official "
              "inference network)")
        return 0
    # A converted TAK network without its embeddings keeps those it is built with.
    hint = ", text_embeddings=E" if args.kind == "tak" and "text_embeddings" not in state else ""
    print(f"{args.output}: {len(state)} tensors; load with create_model({model!r}, {listed}{hint})")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from semiseg.engine.demo import run_demo

    run_demo(args.out, config_path=args.config, overrides=device_overrides(args),
             show_progress=not args.no_progress)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except RunInterruptedError as exc:
        print(f"semiseg {args.command}: {exc}", file=sys.stderr)
        return exc.exit_code
    except SemisegError as exc:
        print(f"semiseg {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        # What the checks before the work could not foresee (a disk that fills up, a folder
        # removed meanwhile): one line naming the path, as for bad input.
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"semiseg {args.command}: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"semiseg {args.command}: interrupted (a resumable run continues with --resume)",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
