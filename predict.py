"""Segment the left atrium with a trained locator and segmenter; write one mask per scan.

    python predict.py --data_dir DATA --locator_path RUN/locator/best.pt \
        --segmenter_path RUN/segmenter/best.pt --output_dir OUT [--tta] [--largest_component] \
        [--save_probabilities] [--overlays]
    python predict.py --input scan.nrrd --output mask.nrrd --locator_path L.pt --segmenter_path S.pt
    python predict.py --input DICOM_SERIES_FOLDER scan2.nii.gz --output_dir OUT ...

Per scan: resample to the training spacing if it differs -> z-score -> pad and downscale ->
locator -> centre of its largest component -> fixed-size crop -> segmenter -> paste into a
zero volume -> probabilities back onto the scan's own grid (linear) -> threshold at 0.5 ->
optionally the largest connected component -> mask with the scan's exact size, spacing, origin
and direction. The architecture and pre-processing come from the checkpoints, so there are no
model flags. One case is in memory at a time; a case that fails is reported and the others go
on (exit status 1 at the end). With labels present, OUT/metrics.csv holds the per-case metrics
and their mean +- std is printed.
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

import dataset as ds
import inference
import plots
from metrics import METRIC_KEYS, compute_metrics, summarise
from utils import ArgParser, UserError, run_cli, write_csv

OUTPUT_SUFFIX = {"nrrd": ".nrrd", "nii.gz": ".nii.gz", "mha": ".mha"}


def output_paths(out_path: Path) -> dict[str, Path]:
    """The files of one case beside its mask: `<name>_prob<ext>` and `<name>_overlay.png`."""
    suffix = next((s for s in OUTPUT_SUFFIX.values() if out_path.name.endswith(s)), out_path.suffix)
    base = out_path.name[: len(out_path.name) - len(suffix)] if suffix else out_path.name
    return {"mask": out_path, "prob": out_path.with_name(f"{base}_prob{suffix}"),
            "overlay": out_path.with_name(f"{base}_overlay.png")}


FLAGS = ("locator_found", "larger_than_patch")  # metrics.csv columns beside the metrics


def flag_cells(flags: dict) -> dict:
    """The locator flags as metrics.csv cells: 1 or 0, or "" where unknown (a kept mask whose
    run did not record them)."""
    return {k: "" if flags.get(k, "") == "" else int(flags[k] in (True, 1, "1")) for k in FLAGS}


def previous_flags(path: Path) -> dict[str, dict]:
    """Locator flags of each case in an earlier metrics.csv, for the masks a rerun keeps."""
    try:
        with open(path, newline="") as f:
            return {r["case_id"]: flag_cells(r) for r in csv.DictReader(f) if "locator_found" in r}
    except (OSError, KeyError, csv.Error, UnicodeDecodeError):
        return {}


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
    m.add_argument("--locator_path", default="runs/demo/locator/best.pt", help="locator checkpoint")
    m.add_argument("--segmenter_path", "--segmentor_path", dest="segmenter_path",
                   default="runs/demo/segmenter/best.pt", help="segmenter checkpoint")
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


def predict_case(pipe: inference.TwoStage, case: ds.Case, paths: dict, wanted: set, args) -> dict:
    """Predict one case and write the outputs named in `wanted` ("mask", "prob", "overlay").
    Returns its metrics row (when it has a label) and, when its mask was written now, the
    locator flags; outputs not wanted are read back from disk when needed (a kept mask still
    gets scored and drawn)."""
    image, props = ds.read_image(case.image)
    image = ds.check_image(image, case.image)
    flags = None
    if wanted & {"mask", "prob"}:
        prob, location = inference.predict_two_stage(pipe, image, props)
        mask = inference.to_mask(prob, args.largest_component)
        if "prob" in wanted:
            ds.write_image(prob, props, paths["prob"])
        del prob
        flags = flag_cells({"locator_found": location.found,
                            "larger_than_patch": location.larger_than(pipe.patch_size)})
    if "mask" in wanted:
        ds.write_image(mask * np.uint8(args.label_value), props, paths["mask"])
    elif case.label is not None or "overlay" in wanted:
        kept, kept_props = ds.read_image(paths["mask"])
        if kept.shape != image.shape or not ds.same_geometry(kept_props, props):
            raise UserError(f"{paths['mask']}: an existing mask not on its scan's grid; pass --overwrite to redo it")
        mask = ds.read_mask(kept, paths["mask"], "mask")
    label = ds.load_label(case.label, image.shape, props) if case.label is not None else None
    if "overlay" in wanted:
        plots.overlay(paths["overlay"], image, mask, label, props["spacing"], case.case_id)
    row = None if label is None else {"case_id": case.case_id, **compute_metrics(mask, label, spacing=props["spacing"])}
    return {"row": row, "flags": flags if "mask" in wanted else None}


def warnings_of(case_id: str, flags: dict) -> list[str]:
    out = []
    if flags["locator_found"] == 0:
        out.append(f"{case_id}: the locator found nothing; cropped at the volume centre")
    if flags["larger_than_patch"] == 1:
        out.append(f"{case_id}: the located atrium is larger than the segmenter's patch")
    return out


def report(rows: list[dict], out_dir: Path, written: int, kept: int, flagged: list[str], failed: list[str]) -> None:
    """What a run did: masks written and kept, the locator's warnings, the metrics of labelled
    cases (OUT/metrics.csv and their mean +- std), the failed cases (exit status 1)."""
    kept_note = f"; kept {kept} existing (--overwrite replaces them)" if kept else ""
    print(f"wrote {written} mask(s) to {out_dir}{kept_note}")
    for f in flagged:
        print(f"warning: {f}", file=sys.stderr)
    if rows:
        write_csv(out_dir / "metrics.csv", rows)
        print(f"metrics over {len(rows)} case(s) ({out_dir / 'metrics.csv'}):")
        for k, (mean, std) in summarise(rows, METRIC_KEYS).items():
            print(f"  {k:<12} {mean:.3f} +- {std:.3f}")
    if failed:
        print(f"{len(failed)} case(s) failed:\n  " + "\n  ".join(failed), file=sys.stderr)
        sys.exit(1)


def main(argv=None):
    args = parse_args(argv)
    cases = cases_from_args(args)
    inference.set_cpu_threads()
    pipe = inference.load_two_stage(args.locator_path, args.segmenter_path, inference.resolve_device(args.device),
                                    tta=args.tta)
    out_dir = Path(args.output).parent if args.output else Path(args.output_dir)
    if args.output and Path(args.output).exists() and not args.overwrite:
        raise UserError(f"--output {args.output}: already exists; pass --overwrite to replace it")
    earlier = previous_flags(out_dir / "metrics.csv")
    asked = {"mask"} | ({"prob"} if args.save_probabilities else set()) | ({"overlay"} if args.overlays else set())
    rows, failed, flagged, written = [], [], [], 0
    for case in tqdm(cases, desc="predict", unit="case", disable=not sys.stderr.isatty()):
        out_path = Path(args.output) if args.output else out_dir / f"{case.case_id}{OUTPUT_SUFFIX[args.output_format]}"
        paths = output_paths(out_path)
        wanted = {k for k in asked if args.overwrite or not paths[k].exists()}
        try:
            result = predict_case(pipe, case, paths, wanted, args)
        except UserError as e:
            if len(cases) == 1:
                raise  # nothing else to go on with: the one-line error of a single scan
            failed.append(f"{case.case_id}: {e}")
            tqdm.write(f"failed: {case.case_id}: {e}", file=sys.stderr)
            continue
        written += "mask" in wanted
        flags = result["flags"] or earlier.get(case.case_id, flag_cells({}))  # a kept mask: as its run recorded
        flagged += warnings_of(case.case_id, flags)
        if result["row"] is not None:
            rows.append({**result["row"], **flags})
    report(rows, out_dir, written, len(cases) - written - len(failed), flagged, failed)


if __name__ == "__main__":
    run_cli(main)
