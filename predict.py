"""Segment the left atrium (or the classes a checkpoint learned) in each scan; write one mask per scan.

    python predict.py --data_dir DATA --locator_path RUN/locator/best.pt \
        --segmenter_path RUN/segmenter/best.pt --output_dir OUT [--tta] [--largest_component] \
        [--save_probabilities] [--overlays]
    python predict.py --input scan.nrrd --output mask.nrrd --locator_path L.pt --segmenter_path S.pt
    python predict.py --input DICOM_SERIES_FOLDER scan2.nii.gz --output_dir OUT ...
    python predict.py --data_dir DATA --run RUN --folds 0 1 2 3 4 --output_dir OUT   # fold ensemble
    python predict.py --data_dir TUMOURS --segmenter_path RUN/segmenter/best.pt --output_dir OUT \
        --regions whole_tumour=1,2,3 tumour_core=2,3 enhancing=3      # the patch strategy: no locator
    python predict.py --data_dir SPINE --segmenter_path RUN/segmenter/best.pt --output_dir OUT \
        [--max_moves 20] [--max_instances 100] [--min_volume ML]         # the iterative strategy: instances

Per scan: resample to the training spacing if it differs -> z-score -> pad and downscale ->
locator -> centre of its largest component -> fixed-size crop -> segmenter -> paste into a
zero volume -> probabilities back onto the scan's own grid (linear) -> threshold at 0.5 ->
optionally the largest connected component -> mask with the scan's exact size, spacing, origin
and direction. A fold ensemble (several checkpoints per stage, or --run) averages the locators'
probabilities on the downscaled grid, places one crop, and averages the segmenters' on it. The
architecture and pre-processing come from the checkpoints, so there are no
model flags. One case is in memory at a time; a case that fails is reported and the others go
on (exit status 1 at the end). With labels present, OUT/metrics.csv holds the per-case metrics
and their mean +- std is printed.

Scans of C channels and K classes (docs/multiclass.md) go the same way with each channel
z-scored by the checkpoint's rule; a patch-strategy checkpoint replaces locator and crop by a
Gaussian-weighted sliding window over the whole scan. The mask then holds the dataset's label
values, and metrics.csv a row per case and class or region. An iterative-strategy checkpoint
searches the scan for instances one at a time (docs/instances.md) and writes the instance map
(0, 1..N in the order found) and OUT/<case_id>_instances.csv; metrics.csv then holds each
case's instance metrics.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import dataset as ds
import inference
import labels as lbl
import prediction
from metrics import METRIC_KEYS, STRUCTURE, format_instance_table, format_structure_table, summarise
from prediction import OUTPUT_SUFFIX
from utils import ArgParser, UserError, run_cli


def parse_args(argv=None):
    p = ArgParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    io = p.add_argument_group("inputs and outputs")
    io.add_argument("--data_dir", help="dataset folder (LASC or MSD layout); labels, if present, are scored")
    io.add_argument("--input", nargs="+",
                    help="scans instead of --data_dir: files (nrrd, nii, nii.gz, mha, mhd) or DICOM series folders "
                         "(a folder holding .dcm files is one series; its case id is the folder's name)")
    io.add_argument("--output", help="mask file for a single --input")
    io.add_argument("--output_dir", default="predictions", help="folder for <case_id> masks and metrics.csv")
    io.add_argument("--output_format", choices=sorted(OUTPUT_SUFFIX), default="nrrd",
                    help="file format of masks and probability maps")
    io.add_argument("--label_value", type=int, choices=(1, 255), default=1,
                    help="foreground value written (255: the challenge's convention)")
    io.add_argument("--save_probabilities", action="store_true",
                    help="also write the atrium probabilities (float32, the scan's geometry) as "
                         "<case_id>_prob.<format>")
    io.add_argument("--overlays", action="store_true",
                    help="also write <case_id>_overlay.png: axial, coronal and sagittal slices through the atrium "
                         "with the prediction's contour and the label's, if any")
    io.add_argument("--regions", nargs="+", metavar="NAME=V1,V2",
                    help="also score these regions of label values (e.g. whole_tumour=1,2,3 tumour_core=2,3 "
                         "enhancing=3) beside each class, in metrics.csv")
    io.add_argument("--overwrite", action="store_true",
                    help="replace outputs that already exist (otherwise a case whose outputs all exist is skipped, "
                         "and only missing ones are written)")
    post = p.add_argument_group("test-time augmentation and post-processing")
    post.add_argument("--tta", action="store_true",
                      help="average each model's probabilities over the scan and its left-right (W) mirror, the one "
                           "flip training augments with; twice the inference time")
    post.add_argument("--largest_component", action="store_true",
                      help="keep only the largest 26-connected component of each mask (drops stray islands)")
    m = p.add_argument_group("models")
    m.add_argument("--locator_path", nargs="+",
                   help="locator checkpoint(s); several: their probabilities are averaged before the crop is placed "
                        "(default: runs/demo/locator/best.pt)")
    m.add_argument("--segmenter_path", "--segmentor_path", dest="segmenter_path", nargs="+",
                   help="segmenter checkpoint(s); several: their probabilities on the crop are averaged "
                        "(default: runs/demo/segmenter/best.pt)")
    m.add_argument("--run", help="cross-validation run folder (train.py --num_folds): predict with the ensemble of "
                                 "its folds' best.pt")
    m.add_argument("--folds", type=int, nargs="+", metavar="K", help="with --run: which folds (default: all)")
    m.add_argument("--overlap", type=float, help="patch strategy: overlap of neighbouring sliding windows "
                                                 "(default: the checkpoint's, 0.5)")
    m.add_argument("--batch_size", type=int, default=4, help="patch strategy: windows per forward pass")
    m.add_argument("--max_moves", type=int, help="iterative strategy: moves of the patch after one instance before "
                                                 "it is taken where it is (default: the checkpoint's, 20)")
    m.add_argument("--max_instances", type=int, help="iterative strategy: the search stops after this many "
                                                     "instances (default: the checkpoint's, 100)")
    m.add_argument("--min_volume", type=float, metavar="ML",
                   help="iterative strategy: an answer of the network smaller than this (ml) is no instance "
                        "(default: the checkpoint's, a quarter of its training instances' median volume; 0 keeps "
                        "every answer)")
    m.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where to run")
    return p.parse_args(argv)


def cases_from_args(args) -> list[ds.Case]:
    if (args.data_dir is None) == (args.input is None):
        raise UserError("give exactly one of --data_dir DIR or --input FILE [FILE ...]")
    if args.output and (args.input is None or len(args.input) != 1):
        raise UserError("--output names one mask: use it with a single --input, or use --output_dir")
    if not args.output and Path(args.output_dir).is_file():
        raise UserError(f"--output_dir {args.output_dir}: is a file; give a folder for the masks")
    if args.data_dir is not None:
        return ds.find_cases(args.data_dir, require_labels=False)
    cases = []
    for f in map(Path, args.input):
        if f.is_dir():
            if not ds.is_dicom_folder(f):
                raise UserError(f"--input {f}: a folder without .dcm files; give scan files, a DICOM series folder, "
                                "or a dataset folder with --data_dir")
            cases.append(ds.Case(f.resolve().name, f, None))
            continue
        stem = ds.strip_image_suffix(f.name)
        if stem is None:
            raise UserError(f"--input {f}: unknown image format; expected one of {', '.join(ds.IMAGE_SUFFIXES)} "
                            "or a DICOM series folder")
        if not f.exists():
            raise UserError(f"--input {f}: no such file")
        cases.append(ds.Case(stem, f, None))
    ids = [c.case_id for c in cases]
    twice = sorted({i for i in ids if ids.count(i) > 1})
    if twice:
        raise UserError(f"--input: case id {twice[0]} given twice (masks are named by case id); "
                        "rename one of the scans")
    return cases


def report(outcome: prediction.Outcome, out_dir: Path) -> None:
    """What a run did: masks written and kept, the locator's warnings, the metrics of labelled
    cases (OUT/metrics.csv and their mean +- std), the failed cases (exit status 1)."""
    kept_note = f"; kept {outcome.kept} existing (--overwrite replaces them)" if outcome.kept else ""
    print(f"wrote {outcome.written} mask(s) to {out_dir}{kept_note}")
    for f in outcome.flagged:
        print(f"warning: {f}", file=sys.stderr)
    if prediction.write_metrics(outcome.rows, out_dir):
        if "detection_rate" in outcome.rows[0]:  # instances: one row per case
            print(f"instance metrics over {len(outcome.rows)} case(s) ({out_dir / 'metrics.csv'}):")
            print(format_instance_table(outcome.rows))
        elif STRUCTURE in outcome.rows[0]:  # one row per case and class or region
            print(f"metrics over {len({r['case_id'] for r in outcome.rows})} case(s) ({out_dir / 'metrics.csv'}):")
            print(format_structure_table(outcome.rows))
        else:
            print(f"metrics over {len(outcome.rows)} case(s) ({out_dir / 'metrics.csv'}):")
            for k, (mean, std) in summarise(outcome.rows, METRIC_KEYS).items():
                print(f"  {k:<12} {mean:.3f} +- {std:.3f}")
    if outcome.failed:
        print(f"{len(outcome.failed)} case(s) failed:\n  " + "\n  ".join(outcome.failed), file=sys.stderr)
        sys.exit(1)


def model_paths(args) -> tuple[list[Path] | None, list[Path], tuple[str, str]]:
    """The locator and segmenter checkpoints: those given, or best.pt of each of `--folds` of
    the cross-validation run `--run` (all its folds by default), or the demo run's segmenter.
    No locator (None) unless given or the run has one: the patch strategy needs none, and the
    two-stage one then takes the demo run's."""
    if args.run is None:
        if args.folds is not None:
            raise UserError("--folds picks folds of a cross-validation run: give it with --run RUN")
        return ([Path(p) for p in args.locator_path] if args.locator_path else None,
                [Path(p) for p in args.segmenter_path or ["runs/demo/segmenter/best.pt"]],
                ("--locator_path", "--segmenter_path"))
    run = Path(args.run)
    if args.locator_path or args.segmenter_path:
        raise UserError("--run takes the checkpoints of its folds: drop --locator_path/--segmenter_path, "
                        "or drop --run")
    splits_path = run / "splits_final.json"
    try:
        num_folds = len(json.loads(splits_path.read_text()))
    except (OSError, ValueError, TypeError):
        raise UserError(f"--run {run}: no readable splits_final.json there; pass a run folder trained with "
                        "train.py --num_folds N") from None
    folds = args.folds if args.folds is not None else list(range(num_folds))
    bad = [k for k in folds if not 0 <= k < num_folds]
    if bad or len(set(folds)) < len(folds):
        raise UserError(f"--folds {' '.join(map(str, folds))}: each fold once, from 0 to {num_folds - 1} "
                        f"({splits_path} holds {num_folds})")
    two_stage = (run / f"fold_{folds[0]}" / "locator").is_dir()  # the patch strategy trains no locator
    return ([run / f"fold_{k}" / "locator" / "best.pt" for k in folds] if two_stage else None,
            [run / f"fold_{k}" / "segmenter" / "best.pt" for k in folds], ("--run", "--run"))


def check_strategy_flags(args, pipe, checkpoint: Path) -> None:
    """Flags that belong to another strategy than the checkpoint's are refused, naming both."""
    iterative = isinstance(pipe, inference.Iterative)
    if iterative:
        given = [f for f, on in (("--tta", args.tta), ("--largest_component", args.largest_component),
                                 ("--save_probabilities", args.save_probabilities), ("--regions", args.regions),
                                 ("--overlap", args.overlap is not None), ("--label_value", args.label_value != 1))
                 if on]
        why = "the iterative strategy writes an instance map, found patch by patch"
    else:
        given = [f for f, on in (("--max_moves", args.max_moves), ("--max_instances", args.max_instances),
                                 ("--min_volume", args.min_volume is not None)) if on]
        why = "they bound the iterative strategy's search"
    if given:
        raise UserError(f"{given[0]}: {checkpoint} was trained with --strategy "
                        f"{inference.strategy_of(inference.load_checkpoint(checkpoint))}; {why}; drop {given[0]}")


def main(argv=None):
    args = parse_args(argv)
    cases = cases_from_args(args)
    locators, segmenters, flags = model_paths(args)
    if args.overlap is not None and not 0 <= args.overlap < 1:
        raise UserError(f"--overlap {args.overlap}: must lie in [0, 1)")
    if args.batch_size < 1:
        raise UserError(f"--batch_size {args.batch_size}: must be at least 1")
    for flag in ("max_moves", "max_instances"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise UserError(f"--{flag} {getattr(args, flag)}: must be at least 1")
    if args.min_volume is not None and not args.min_volume >= 0:
        raise UserError(f"--min_volume {args.min_volume}: must be 0 or more (ml)")
    inference.set_cpu_threads()
    pipe = inference.load_pipeline(locators, segmenters, inference.resolve_device(args.device), tta=args.tta,
                                   flags=flags, overlap=args.overlap, batch_size=args.batch_size,
                                   default_locators=[Path("runs/demo/locator/best.pt")], max_moves=args.max_moves,
                                   max_instances=args.max_instances, min_volume=args.min_volume)
    check_strategy_flags(args, pipe, segmenters[0])
    regions = ()
    if args.regions:
        try:
            regions = tuple(lbl.parse_regions(args.regions))
            lbl.scored_structures(pipe.labels, regions)
        except ValueError as e:
            raise UserError(f"--regions: {e}") from None
    if not isinstance(pipe, inference.TwoStage):
        if len(pipe.models) > 1:
            print(f"ensemble of {len(pipe.models)} models")
    elif len(pipe.locators) + len(pipe.segmenters) > 2:
        print(f"ensemble of {len(pipe.locators)} locator(s) and {len(pipe.segmenters)} segmenter(s)")
    out_dir = Path(args.output).parent if args.output else Path(args.output_dir)
    if args.output and Path(args.output).exists() and not args.overwrite:
        raise UserError(f"--output {args.output}: already exists; pass --overwrite to replace it")
    opts = prediction.Outputs(output_format=args.output_format, label_value=args.label_value,
                              largest_component=args.largest_component, probabilities=args.save_probabilities,
                              overlays=args.overlays, overwrite=args.overwrite, regions=regions)
    outcome = prediction.predict_cases(pipe, cases, out_dir, opts, Path(args.output) if args.output else None)
    report(outcome, out_dir)


if __name__ == "__main__":
    run_cli(main)
