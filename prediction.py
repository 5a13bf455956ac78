"""Predicting a list of cases into a folder: one mask per case with the scan's geometry,
optional probability maps and overlays, the metrics of labelled cases and the locator's flags.
The one loop behind predict.py and the validation predictions of each cross-validation fold.
"""
from __future__ import annotations

import csv
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

import dataset as ds
import inference
import plots
from metrics import compute_metrics
from utils import UserError, write_csv

OUTPUT_SUFFIX = {"nrrd": ".nrrd", "nii.gz": ".nii.gz", "mha": ".mha"}
FLAGS = ("locator_found", "larger_than_patch")  # metrics.csv columns beside the metrics


@dataclass
class Outputs:
    """What to write per case, and how."""
    output_format: str = "nrrd"
    label_value: int = 1             # the mask's foreground value (255: the challenge's convention)
    largest_component: bool = False
    probabilities: bool = False      # also <case>_prob.<format>
    overlays: bool = False           # also <case>_overlay.png
    overwrite: bool = False          # else a case's existing outputs are kept


@dataclass
class Outcome:
    """What predicting a list of cases did."""
    rows: list[dict] = field(default_factory=list)     # metrics and flags of the labelled cases
    written: int = 0
    kept: int = 0
    flagged: list[str] = field(default_factory=list)   # the locator's warnings
    failed: list[str] = field(default_factory=list)    # "<case>: <reason>"


def output_paths(out_path: Path) -> dict[str, Path]:
    """The files of one case beside its mask: `<name>_prob<ext>` and `<name>_overlay.png`."""
    suffix = next((s for s in OUTPUT_SUFFIX.values() if out_path.name.endswith(s)), out_path.suffix)
    base = out_path.name[: len(out_path.name) - len(suffix)] if suffix else out_path.name
    return {"mask": out_path, "prob": out_path.with_name(f"{base}_prob{suffix}"),
            "overlay": out_path.with_name(f"{base}_overlay.png")}


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


def predict_case(pipe: inference.TwoStage, case: ds.Case, paths: dict, wanted: set, opts: Outputs) -> dict:
    """Predict one case and write the outputs named in `wanted` ("mask", "prob", "overlay").
    Returns its metrics row (when it has a label) and, when its mask was written now, the
    locator flags; outputs not wanted are read back from disk when needed (a kept mask still
    gets scored and drawn)."""
    image, props = ds.read_image(case.image)
    image = ds.check_image(image, case.image)
    flags = None
    if wanted & {"mask", "prob"}:
        prob, location = inference.predict_two_stage(pipe, image, props)
        mask = inference.to_mask(prob, opts.largest_component)
        if "prob" in wanted:
            ds.write_image(prob, props, paths["prob"])
        del prob
        flags = flag_cells({"locator_found": location.found,
                            "larger_than_patch": location.larger_than(pipe.patch_size)})
    if "mask" in wanted:
        ds.write_image(mask * np.uint8(opts.label_value), props, paths["mask"])
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


def predict_cases(pipe: inference.TwoStage, cases: list[ds.Case], out_dir: Path, opts: Outputs,
                  single_output: Path | None = None) -> Outcome:
    """Predict `cases` into `out_dir` (`<case_id>.<format>`, or `single_output` for one case).
    A case whose outputs all exist is kept unless `opts.overwrite`; a case that fails is
    recorded and the others go on, unless it is the only one (its error is raised)."""
    earlier = previous_flags(out_dir / "metrics.csv")
    asked = {"mask"} | ({"prob"} if opts.probabilities else set()) | ({"overlay"} if opts.overlays else set())
    outcome = Outcome()
    for case in tqdm(cases, desc="predict", unit="case", disable=not sys.stderr.isatty()):
        out_path = single_output or out_dir / f"{case.case_id}{OUTPUT_SUFFIX[opts.output_format]}"
        paths = output_paths(out_path)
        wanted = {k for k in asked if opts.overwrite or not paths[k].exists()}
        try:
            result = predict_case(pipe, case, paths, wanted, opts)
        except UserError as e:
            if len(cases) == 1:
                raise  # nothing else to go on with: the one-line error of a single scan
            outcome.failed.append(f"{case.case_id}: {e}")
            tqdm.write(f"failed: {case.case_id}: {e}", file=sys.stderr)
            continue
        outcome.written += "mask" in wanted
        outcome.kept += "mask" not in wanted
        flags = result["flags"] or earlier.get(case.case_id, flag_cells({}))  # a kept mask: as its run recorded
        outcome.flagged += warnings_of(case.case_id, flags)
        if result["row"] is not None:
            outcome.rows.append({**result["row"], **flags})
    return outcome


def write_metrics(rows: list[dict], out_dir: Path) -> Path | None:
    """OUT/metrics.csv of the labelled cases (none: nothing written)."""
    if not rows:
        return None
    write_csv(out_dir / "metrics.csv", rows)
    return out_dir / "metrics.csv"
