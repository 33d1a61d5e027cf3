"""The ``semiseg prepare`` and ``semiseg score`` subcommands: data files in, prepared arrays
or scores out (kept apart from the modules doing the work so that building the command line
stays light)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from semiseg.errors import SemisegError
from semiseg.utils.cli_args import add_no_progress, add_out

if TYPE_CHECKING:
    from semiseg.data.label_maps import LabelMap

_CLASS_SETS = ["synapse", "amos"]
PREPARE_HELP = (
    "Prepare a dataset: read raw volumes, apply the official preprocessing (DHC paper-era "
    "grid: whole volume resized to 160x160x80), and write the semiseg layout (resumable). "
    "`generic` takes your own scans: an images and a labels folder, or a list file, with a "
    "label map for their ids (docs/data.md).")
SCORE_HELP = (
    "Per-class Dice and ASD of PRED against LABEL with the rules of `semiseg evaluate` "
    "(docs/evaluation.md). LABEL may use other ids (--label-map). Files of one scan on "
    "different grids are compared on LABEL's grid: PRED is resampled there by world "
    "coordinates (nearest neighbour); files that do not overlap are refused.")


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add ``prepare`` and ``score`` to the ``semiseg`` command line."""
    _add_prepare(subparsers)
    _add_score(subparsers)


def _add_prepare(subparsers: argparse._SubParsersAction) -> None:
    prep = subparsers.add_parser("prepare", help="turn raw scans into training arrays",
                                 description=PREPARE_HELP)
    prep.add_argument("dataset", choices=["synapse", "amos", "generic", "phantom"],
                      help="synapse / amos: the official downloads; generic: your own "
                      "labelled scans; phantom: the built-in synthetic abdomen")
    add_out(prep, "output folder (created; an interrupted run continues there)", required=True)
    prep.add_argument("--raw", type=Path, help="synapse / amos: the raw download folder "
                      "(synapse: the folder holding RawData/Training; amos: the folder with "
                      "imagesTr/labelsTr)")
    prep.add_argument("--images", type=Path, help="generic: folder of scans (NIfTI, "
                      ".mha/.nrrd files or DICOM series folders), one case each")
    prep.add_argument("--labels", type=Path, help="generic: folder of label files named like "
                      "the scans (scan01.nii.gz for scan01.nii.gz or scan01_0000.nii.gz)")
    prep.add_argument("--list", type=Path, dest="case_list", metavar="CSV",
                      help="generic, instead of --images/--labels: a CSV file with the header "
                      "case,image,label (an empty label = an unlabelled scan)")
    prep.add_argument("--label-map", metavar="MAP", help="generic: YAML file mapping the "
                      "labels' ids to the class set (ids it does not list become background), "
                      "or a shipped map: totalseg_to_synapse, totalseg_to_amos; without it "
                      "the labels must hold the class set's own ids")
    prep.add_argument("--name", help="generic: the dataset's name, as configs give it in "
                      "data.dataset (default: the --out folder's name)")
    prep.add_argument("--class-set", default=None, choices=_CLASS_SETS,
                      help="generic / phantom: organ set (default: the label map's, else "
                      "synapse)")
    prep.add_argument("--target-shape", type=int, nargs=3, metavar=("X", "Y", "Z"),
                      default=None, help="resized grid (default 160 160 80)")
    prep.add_argument("--profile", choices=["galoss", "dhc", "native"], default="galoss",
                      help="resampling profile: galoss/dhc = the 160x160x80 grid with the "
                      "pipeline's intensity window as default; native = keep the raw grid")
    prep.add_argument("--ct-only", action="store_true",
                      help="amos: skip the MRI cases (ids >= 500); the published splits then "
                      "no longer validate")
    prep.add_argument("--overwrite", action="store_true", help="discard cases that --out "
                      "holds from a preparation with other settings (default: refuse)")
    prep.add_argument("--num-cases", type=int, default=30, help="phantom: number of cases")
    prep.add_argument("--shape", type=int, nargs=3, default=None, metavar=("X", "Y", "Z"),
                      help="phantom: volume shape")
    prep.add_argument("--seed", type=int, default=0, help="phantom: generator seed")
    add_no_progress(prep)
    prep.set_defaults(handler=_cmd_prepare)


def _add_score(subparsers: argparse._SubParsersAction) -> None:
    score = subparsers.add_parser("score", help="score a label map against a reference label "
                                  "file", description=SCORE_HELP)
    score.add_argument("prediction", type=Path, help="predicted label map (NIfTI, .mha/.nrrd, "
                       "or a DICOM folder)")
    score.add_argument("label", type=Path, help="reference label map")
    score.add_argument("--classes", default=None, choices=_CLASS_SETS,
                       help="class set of the ids (default: the label map's, else synapse)")
    score.add_argument("--label-map", metavar="MAP", help="YAML file or shipped map "
                       "(totalseg_to_synapse, totalseg_to_amos) for LABEL's ids")
    score.add_argument("--rule", choices=["galoss", "dhc", "nanskip"], default="galoss",
                       help="missing-class rule (default galoss, as evaluate)")
    score.add_argument("--asd-unit", choices=["voxel", "mm"], default="voxel",
                       help="ASD in voxels of LABEL's grid (official) or in mm")
    add_out(score, "also write the scores as a metrics JSON file (schema semiseg.metrics/1)")
    score.set_defaults(handler=_cmd_score)


def _label_map(name: str | None, class_set: str | None) -> LabelMap | None:
    from semiseg.data.label_maps import load_label_map

    return None if name is None else load_label_map(name, class_set)


def _cmd_prepare(args: argparse.Namespace) -> int:
    from semiseg.utils.io import writable_folder

    generic_only = [flag for flag, value in (("--images", args.images), ("--labels", args.labels),
                                             ("--list", args.case_list),
                                             ("--label-map", args.label_map),
                                             ("--name", args.name)) if value is not None]
    if args.dataset != "generic" and generic_only:
        raise SemisegError(f"{', '.join(generic_only)}: only for `prepare generic`")
    if args.dataset in ("synapse", "amos") and args.class_set is not None:
        raise SemisegError(f"--class-set: {args.dataset} has its own class set; only for "
                           "`prepare generic` and `prepare phantom`")
    if args.dataset in ("synapse", "amos") and args.raw is None:
        raise SemisegError(f"prepare {args.dataset}: --raw (the raw download folder) is required")
    writable_folder(args.out)  # before reading anything
    if args.dataset == "phantom":
        return _prepare_phantom(args)
    if args.dataset == "generic":
        return _prepare_generic(args)
    from semiseg.data import prepare

    kwargs: dict = {"profile": args.profile, "overwrite": args.overwrite,
                    "progress": not args.no_progress}
    if args.target_shape is not None:
        kwargs["target_shape"] = tuple(args.target_shape)
    if args.dataset == "synapse":
        prepare.prepare_synapse(args.raw, args.out, **kwargs)
    else:
        prepare.prepare_amos(args.raw, args.out, ct_only=args.ct_only, **kwargs)
    print(f"prepared {args.dataset} in {args.out}")
    return 0


def _prepare_phantom(args: argparse.Namespace) -> int:
    from semiseg.data.classes import get_class_set
    from semiseg.data.phantom import generate_dataset

    kwargs = {} if args.shape is None else {"shape": tuple(args.shape)}
    generate_dataset(args.out, num_cases=args.num_cases,
                     class_set=get_class_set(args.class_set or "synapse"), seed=args.seed,
                     overwrite=args.overwrite, progress=not args.no_progress, **kwargs)
    print(f"phantom with {args.num_cases} cases in {args.out}")
    return 0


def _prepare_generic(args: argparse.Namespace) -> int:
    from semiseg.data.classes import get_class_set
    from semiseg.data.own_data import find_folder_cases, prepare_own_data, read_case_list

    if args.case_list is not None and (args.images or args.labels):
        raise SemisegError("prepare generic: give --list or --images/--labels, not both")
    if args.case_list is None and not (args.images and args.labels):
        raise SemisegError("prepare generic: --images and --labels (two folders) or --list "
                           "(a CSV file) name the cases")
    label_map = _label_map(args.label_map, args.class_set)
    class_set = label_map.class_set if label_map else get_class_set(args.class_set or "synapse")
    cases = (read_case_list(args.case_list) if args.case_list is not None
             else find_folder_cases(args.images, args.labels))
    name = args.name or Path(args.out).resolve().name
    out, split, written = prepare_own_data(
        cases, args.out, name, class_set, label_map, profile=args.profile,
        target_shape=None if args.target_shape is None else tuple(args.target_shape),
        overwrite=args.overwrite, progress=not args.no_progress)
    labelled = sum(case.label is not None for case in cases)
    print(f"prepared {len(cases)} cases ({labelled} labelled) of dataset {name!r} "
          f"({class_set.name} classes) in {out}")
    if label_map is not None:
        print(f"label ids mapped with {label_map.where}; ids it does not list became "
              "background")
    print(f"split: {split}" + ("" if written else " (kept: it existed already)"))
    print(f"train with data.dataset: {name}, data.root: {out}, data.split: {split}")
    return 0


def _cmd_score(args: argparse.Namespace) -> int:
    from semiseg.engine.metrics_file import write_metrics
    from semiseg.engine.score import score_files
    from semiseg.utils.io import writable_file

    if args.out is not None:
        if args.out.suffix != ".json":
            raise SemisegError(f"{args.out}: --out names the metrics file, a .json file")
        writable_file(args.out)
    label_map = _label_map(args.label_map, args.classes)
    classes = label_map.class_set if label_map else (args.classes or "synapse")
    score = score_files(args.prediction, args.label, classes, label_map, rule=args.rule,
                        asd_unit=args.asd_unit)
    for note in score.notes:
        print(f"note: {note}")
    print(score.result.to_markdown())
    if args.out is not None:
        print(f"scores written to {write_metrics(score.result, args.out)}")
    return 0
