"""Predicting a list of cases into a folder: one mask per case with the scan's geometry,
optional probability maps and overlays, the metrics of labelled cases and the locator's flags.
The one loop behind predict.py and the validation predictions of each cross-validation fold.
"""
from __future__ import annotations

import csv
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage
from tqdm import tqdm

import dataset as ds
import inference
import labels as lbl
import plots
from labels import Labels
from metrics import compute_metrics, instance_metrics, structure_metrics
from utils import UserError, write_csv

Pipeline = inference.TwoStage | inference.Patches | inference.Iterative  # what load_pipeline returns
OUTPUT_SUFFIX = {"nrrd": ".nrrd", "nii.gz": ".nii.gz", "mha": ".mha"}
FLAGS = ("locator_found", "larger_than_patch")  # metrics.csv columns beside the metrics
INSTANCE_COLUMNS = ("instance", "voxels", "volume_ml", "centroid_x_mm", "centroid_y_mm", "centroid_z_mm",
                    "completeness", "complete")  # <case>_instances.csv


@dataclass
class Outputs:
    """What to write per case, and how."""
    output_format: str = "nrrd"
    label_value: int = 1             # the mask's foreground value (255: the challenge's convention)
    largest_component: bool = False
    probabilities: bool = False      # also <case>_prob.<format>
    overlays: bool = False           # also <case>_overlay.png
    overwrite: bool = False          # else a case's existing outputs are kept
    regions: tuple = ()              # more regions to score, ((name, values), ...)


@dataclass
class Outcome:
    """What predicting a list of cases did."""
    rows: list[dict] = field(default_factory=list)     # metrics and flags of the labelled cases
    written: int = 0
    kept: int = 0
    flagged: list[str] = field(default_factory=list)   # the locator's warnings, the search's notes
    failed: list[str] = field(default_factory=list)    # "<case>: <reason>"


def output_paths(out_path: Path, prob_names=()) -> dict[str, Path]:
    """The files of one case beside its mask: `<name>_prob<ext>` (with several outputs, one
    `<name>_prob_<output><ext>` per class or region: keys "prob_<output>") and
    `<name>_overlay.png`, and `<name>_instances.csv` (the iterative strategy's table)."""
    suffix = next((s for s in OUTPUT_SUFFIX.values() if out_path.name.endswith(s)), out_path.suffix)
    base = out_path.name[: len(out_path.name) - len(suffix)] if suffix else out_path.name
    probs = {f"prob_{n}": out_path.with_name(f"{base}_prob_{n}{suffix}") for n in prob_names} or \
        {"prob": out_path.with_name(f"{base}_prob{suffix}")}
    return {"mask": out_path, **probs, "overlay": out_path.with_name(f"{base}_overlay.png"),
            "instances": out_path.with_name(f"{base}_instances.csv")}


def prob_names(pipe) -> list[str]:
    """The names of a pipeline's probability maps, as file-name parts: none for one binary
    output (`<case>_prob`), else one per class (softmax) or region (sigmoid)."""
    if pipe.labels.binary:
        return []
    outputs = pipe.labels.outputs or list(zip(pipe.labels.names, ((v,) for v in pipe.labels.values)))
    return [re.sub(r"[^\w-]+", "_", name).strip("_") or f"output{k}" for k, (name, _) in enumerate(outputs)]


def case_rows(case_id: str, pred: np.ndarray, target: np.ndarray, labels: Labels | None, spacing,
              regions=()) -> list[dict]:
    """The metrics rows of one case: one row of `compute_metrics` for a binary mask pair (no
    structure column, as the left atrium has always been scored), else one row per class and
    region (`structure_metrics` on the label maps of the declared values; `regions`: more
    regions to score, `labels.scored_structures`)."""
    if labels is None or (labels.binary and not regions):
        return [{"case_id": case_id, **compute_metrics(pred > 0, target > 0, spacing=spacing)}]
    structures = lbl.scored_structures(labels, regions)
    return [{"case_id": case_id, **r} for r in structure_metrics(pred, target, structures, spacing=spacing)]


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


def label_map(probs: np.ndarray, labels: Labels, opts: Outputs) -> np.ndarray:
    """The mask written for the probabilities (K, D, H, W): the label map of the declared
    values, its foreground's largest component with `opts.largest_component`, the atrium's
    `opts.label_value` for one class."""
    mask = labels.label_map(probs)
    if opts.largest_component:
        mask *= ds.largest_component(mask > 0, connectivity=3)
    if labels.binary:
        mask = (mask > 0).astype(np.uint8) * np.uint8(opts.label_value)
    return mask


def predict_case(pipe: Pipeline, case: ds.Case, paths: dict, wanted: set,
                 opts: Outputs) -> dict:
    """Predict one case (a scan of C channels) and write the outputs named in `wanted` ("mask",
    "prob" or "prob_<output>", "overlay"): a label map of the declared values (the atrium's
    mask: `opts.label_value`) with the scan's 3D geometry, a probability map per output.
    Returns its metrics rows (when it has a label: per class and region for several classes)
    and, when the two-stage mask was written now, the locator flags; outputs not wanted are read
    back from disk when needed (a kept mask still gets scored and drawn).
    `opts.largest_component` keeps the largest 26-connected component of the foreground (all
    classes together)."""
    image, props = ds.read_case_image(case)
    if isinstance(pipe, inference.Iterative):
        return predict_instances(pipe, case, image, props, paths, wanted)
    if is_cine(pipe, image, props, case.image):
        return predict_cine(pipe, case, image, props, paths, wanted, opts)
    labels = pipe.labels
    flags = None
    if wanted - {"overlay"}:
        if isinstance(pipe, inference.Patches):
            probs = inference.predict_patches(pipe, image, props, case.image)
        else:
            probs, location = inference.predict_two_stage(pipe, image, props, case.image)
            flags = flag_cells({"locator_found": location.found,
                                "larger_than_patch": location.larger_than(pipe.patch_size)})
        first = 1 if labels.activation == "softmax" else 0  # the background's map is not written
        for k, key in enumerate(k for k in paths if k.startswith("prob")):
            if key in wanted:
                ds.write_image(probs[first + k], props, paths[key])
        mask = label_map(probs, labels, opts)
        del probs
    if "mask" in wanted:
        ds.write_image(mask, props, paths["mask"])
    elif case.label is not None or "overlay" in wanted:
        kept, kept_props = ds.read_image(paths["mask"])
        if kept.shape != image.shape[1:] or not ds.same_geometry(kept_props, props):
            raise UserError(f"{paths['mask']}: an existing mask not on its scan's grid; pass --overwrite to redo it")
        mask = labels.to_values(ds.class_indices(kept, paths["mask"], labels))
    label = None
    if case.label is not None:
        label = labels.to_values(ds.load_label(case.label, image.shape[1:], props, labels))
    if "overlay" in wanted:
        plots.overlay(paths["overlay"], image[0], mask > 0, None if label is None else label > 0, props["spacing"],
                      case.case_id)
    rows = [] if label is None else case_rows(case.case_id, mask, label, labels, props["spacing"], opts.regions)
    return {"rows": rows, "flags": flags if "mask" in wanted else None}


def predict_instances(pipe: inference.Iterative, case: ds.Case, image: np.ndarray, props: dict, paths: dict,
                      wanted: set) -> dict:
    """Predict one scan with the iterative strategy and write what `wanted` names: the instance
    map ("mask": 0 and 1..N in the order found, the scan's geometry), its table ("instances":
    `instance_rows`) and "overlay". Returns the instance metrics of a labelled case
    (`metrics.instance_metrics`' summary, one row) and notes: a scan smaller than the patch
    (padded), a search stopped by --max_instances, the evaluations it took."""
    notes, rows = [], []
    if wanted - {"overlay"}:
        shape = ds.resampled_shape(image.shape[1:], props["spacing"], pipe.spacing)
        if any(n < p for n, p in zip(shape, pipe.patch_size)):
            notes.append(f"{case.case_id}: smaller than the patch {pipe.patch_size} at {pipe.spacing} mm "
                         f"({shape} voxels); padded with the background value")
        t0 = time.time()
        labels, found, evaluations = inference.predict_iterative(pipe, image, props, case.image)
        if len(found) >= pipe.max_instances:
            notes.append(f"{case.case_id}: the search stopped at --max_instances {pipe.max_instances}; raise it "
                         "if the scan holds more")
        tqdm.write(f"{case.case_id}: {len(found)} instance(s), {sum(f.completeness >= 0.5 for f in found)} complete; "
                   f"{evaluations} network evaluations, {time.time() - t0:.1f} s")
        if "instances" in wanted:
            write_csv(paths["instances"], instance_rows(labels, props, found), INSTANCE_COLUMNS)
        if "mask" in wanted:
            ds.write_image(labels, props, paths["mask"])
    else:
        labels, kept_props = ds.read_image(paths["mask"])
        if labels.shape != image.shape[1:] or not ds.same_geometry(kept_props, props):
            raise UserError(f"{paths['mask']}: an existing instance map not on its scan's grid; pass --overwrite "
                            "to redo it")
    reference = None
    if case.label is not None:
        reference = ds.load_instances(case.label, image.shape[1:], props)
        _, summary = instance_metrics(labels, reference, spacing=props["spacing"])
        rows = [{"case_id": case.case_id, **summary}]
    if "overlay" in wanted:
        plots.overlay(paths["overlay"], image[0], labels > 0, None if reference is None else reference > 0,
                      props["spacing"], case.case_id)
    return {"rows": rows, "flags": None, "notes": notes}


def is_cine(pipe, image: np.ndarray, props: dict, source) -> bool:
    """Whether a scan is a cine to predict frame by frame: a 4D file (`props["axis4"]`) of
    several volumes given to models of one channel (several channels make a multi-channel
    scan). A 4D file of one volume is refused: as one channel or one frame, its output would
    lose a dimension or gain one."""
    if "axis4" not in props or len(pipe.channels) != 1:
        return False
    if image.shape[0] == 1:
        raise UserError(f"{source}: a 4D image of one frame; save it as a 3D image, or give the whole cine")
    return True


def predict_cine(pipe, case: ds.Case, image: np.ndarray, props: dict, paths: dict, wanted: set,
                 opts: Outputs) -> dict:
    """Predict each frame of a cine (T, D, H, W) as a 3D scan and write the label maps as one 4D
    image with the cine's geometry (its time axis included), and the probability maps likewise.
    A cine carries no per-frame reference here, so it yields no metrics rows."""
    if not wanted - {"overlay"}:
        return {"rows": [], "flags": None}
    labels = pipe.labels
    first = 1 if labels.activation == "softmax" else 0
    prob_keys = [k for k in paths if k.startswith("prob")]
    masks, probs_out = [], {k: [] for k in prob_keys if k in wanted}
    for t in tqdm(range(image.shape[0]), desc=f"{case.case_id} frames", leave=False, disable=not sys.stderr.isatty()):
        frame = image[t:t + 1]
        if isinstance(pipe, inference.Patches):
            probs = inference.predict_patches(pipe, frame, props, f"{case.image} frame {t + 1}")
        else:
            probs, _ = inference.predict_two_stage(pipe, frame, props, f"{case.image} frame {t + 1}")
        for k, key in enumerate(prob_keys):
            if key in probs_out:
                probs_out[key].append(probs[first + k])
        masks.append(label_map(probs, labels, opts))
    for key, frames in probs_out.items():
        ds.write_image(np.stack(frames), props, paths[key])
    if "mask" in wanted:
        ds.write_image(np.stack(masks), props, paths["mask"])
    if "overlay" in wanted:
        plots.overlay(paths["overlay"], image[0], masks[0] > 0, None, props["spacing"], f"{case.case_id} frame 1")
    return {"rows": [], "flags": None}


def warnings_of(case_id: str, flags: dict) -> list[str]:
    out = []
    if flags["locator_found"] == 0:
        out.append(f"{case_id}: the locator found nothing; cropped at the volume centre")
    if flags["larger_than_patch"] == 1:
        out.append(f"{case_id}: the located atrium is larger than the segmenter's patch")
    return out


def predict_cases(pipe: Pipeline, cases: list[ds.Case], out_dir: Path, opts: Outputs,
                  single_output: Path | None = None) -> Outcome:
    """Predict `cases` into `out_dir` (`<case_id>.<format>`, or `single_output` for one case).
    A case whose outputs all exist is kept unless `opts.overwrite`; a case that fails is
    recorded and the others go on, unless it is the only one (its error is raised)."""
    earlier = previous_flags(out_dir / "metrics.csv")
    iterative = isinstance(pipe, inference.Iterative)
    names = [] if iterative else prob_names(pipe)
    asked = {"mask"} | ({"overlay"} if opts.overlays else set()) | ({"instances"} if iterative else set())
    asked |= ({f"prob_{n}" for n in names} or {"prob"}) if opts.probabilities else set()
    outcome = Outcome()
    for case in tqdm(cases, desc="predict", unit="case", disable=not sys.stderr.isatty()):
        out_path = single_output or out_dir / f"{case.case_id}{OUTPUT_SUFFIX[opts.output_format]}"
        paths = output_paths(out_path, names)
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
        outcome.flagged += result.get("notes", [])
        if not isinstance(pipe, inference.TwoStage):  # no locator, no flags
            outcome.rows += result["rows"]
            continue
        flags = result["flags"] or earlier.get(case.case_id, flag_cells({}))  # a kept mask: as its run recorded
        outcome.flagged += warnings_of(case.case_id, flags)
        outcome.rows += [{**row, **flags} for row in result["rows"]]
    return outcome


def instance_rows(labels: np.ndarray, props: dict, found: list[inference.Found]) -> list[dict]:
    """One row per instance of an instance map (values 1..N as `found` lists them): its voxels,
    volume in ml, centroid in the scanner's mm (x, y, z), the completeness score and whether it
    is complete (score >= 0.5): `<case>_instances.csv`."""
    counts = np.bincount(labels.ravel(), minlength=len(found) + 1)
    centres = ndimage.center_of_mass(labels > 0, labels, range(1, len(found) + 1)) if found else []
    voxel_ml = float(np.prod(props["spacing"])) / 1000.0
    rows = []
    for f, centre in zip(found, centres):
        x, y, z = ds.physical_point(centre, props) if counts[f.instance] else (float("nan"),) * 3
        rows.append({"instance": f.instance, "voxels": int(counts[f.instance]),
                     "volume_ml": round(int(counts[f.instance]) * voxel_ml, 6), "centroid_x_mm": round(x, 3),
                     "centroid_y_mm": round(y, 3), "centroid_z_mm": round(z, 3),
                     "completeness": round(f.completeness, 6), "complete": int(f.completeness >= 0.5)})
    return rows


def write_metrics(rows: list[dict], out_dir: Path) -> Path | None:
    """OUT/metrics.csv of the labelled cases (none: nothing written)."""
    if not rows:
        return None
    write_csv(out_dir / "metrics.csv", rows)
    return out_dir / "metrics.csv"
