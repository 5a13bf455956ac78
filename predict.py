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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import dataset as ds
from evaluate import METRIC_KEYS, score_case, write_csv
from metrics import summarise
from models import build_model
from utils import (ArgParser, UserError, atomic_write, autocast_dtype, load_checkpoint, memory_format,
                   resolve_device, run_cli, set_cpu_threads)

OUTPUT_SUFFIX = {"nrrd": ".nrrd", "nii.gz": ".nii.gz", "mha": ".mha"}


@dataclass
class Pipeline:
    locator: torch.nn.Module
    segmenter: torch.nn.Module
    factors: tuple        # locator downscaling blocks, e.g. (2, 4, 4)
    patch_size: tuple     # segmenter input, e.g. (96, 144, 224)
    spacing: tuple        # training spacing (sz, sy, sx) mm
    device: torch.device
    tta: bool = False     # average each model over the input and its W-mirror


def load_model(ckpt: dict, path, device) -> torch.nn.Module:
    model = build_model(ckpt["config"]["arch"])
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError:
        raise UserError(f"{path}: weights do not fit the architecture recorded in the checkpoint; "
                        "the file is damaged or was edited, retrain or use another checkpoint") from None
    return model.to(device, memory_format=memory_format(device)).eval()


def load_pipeline(locator_path, segmenter_path, device) -> Pipeline:
    loc = load_checkpoint(locator_path, "locator", "--locator_path")
    seg = load_checkpoint(segmenter_path, "segmenter", "--segmenter_path")
    if not np.allclose(loc["config"]["spacing"], seg["config"]["spacing"], rtol=1e-3):
        raise UserError(f"--locator_path {locator_path} and --segmenter_path {segmenter_path} were trained at "
                        "different spacings; use the two checkpoints of one run")
    return Pipeline(load_model(loc, locator_path, device), load_model(seg, segmenter_path, device),
                    tuple(loc["config"]["factors"]), tuple(seg["config"]["patch_size"]),
                    tuple(seg["config"]["spacing"]), device)


@torch.no_grad()
def infer(model: torch.nn.Module, array: np.ndarray, device: torch.device, tta: bool = False) -> np.ndarray:
    """Foreground probabilities of one (D, H, W) volume, float32 (D, H, W).

    `tta`: the mean of the probabilities on the volume and on its W-mirror (mirrored back),
    the one flip training augments with (`augment.flip_w`); it costs a second forward pass.
    On a GPU the convolutions run in bf16 (fp16 where bf16 is missing) under autocast.
    """
    x = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None]  # (1, 1, D, H, W)
    x = x.to(device, memory_format=memory_format(device))
    with torch.autocast(device.type, dtype=autocast_dtype(device), enabled=device.type == "cuda"):
        probs = torch.sigmoid(model(x).float())
        if tta:
            probs += torch.sigmoid(model(x.flip(-1)).float()).flip(-1)
            probs *= 0.5
    return probs[0, 0].cpu().numpy()


def locate_case(pipe: Pipeline, image: np.ndarray, fill: float) -> dict:
    """Run the locator on a z-scored scan at training spacing; fall back to the volume
    centre (flagged `found: False`) when it finds nothing."""
    low, before = ds.locator_input(image, fill, pipe.factors)
    found = ds.locate(infer(pipe.locator, low, pipe.device, pipe.tta), pipe.factors, before)
    if not found["found"]:
        found["centre"] = tuple((s - 1) / 2 for s in image.shape)
    return found


def segment_at(pipe: Pipeline, image: np.ndarray, fill: float, centre) -> np.ndarray:
    """Segmenter probabilities of the fixed-size crop at `centre`, pasted into a zero volume."""
    start = ds.crop_start(centre, pipe.patch_size, image.shape)
    prob = infer(pipe.segmenter, ds.crop(image, start, pipe.patch_size, fill), pipe.device, pipe.tta)
    return ds.paste(prob, start, image.shape)


def segment(pipe: Pipeline, image: np.ndarray, props: dict) -> tuple[np.ndarray, dict]:
    """Atrium probabilities float32 on the grid of `image (D, H, W)`, and a record of the
    location (`locator_found`, `atrium_larger_than_patch`).

    A scan at another spacing than the model's is resampled to it (linear), and the
    probabilities, not a thresholded mask, are resampled back onto the scan's grid (linear)
    and thresholded there: the mask's edge then falls between the model's voxels where the
    probability crosses 0.5, instead of the staircase that nearest-neighbour resampling of a
    mask leaves when the scan is finer than the model's grid.
    """
    resampled = not np.allclose(props["spacing"], pipe.spacing, rtol=1e-3, atol=0)
    work, work_props = ds.resample(image, props, pipe.spacing, label=False) if resampled else (image, props)
    work, fill = ds.zscore(work)
    loc = locate_case(pipe, work, fill)
    prob = segment_at(pipe, work, fill, loc["centre"])
    del work
    if resampled:
        prob = ds.resample_onto(prob, work_props, image.shape, props, label=False)
    info = {"locator_found": loc["found"],
            "atrium_larger_than_patch": bool(loc["found"] and any(
                e > p for e, p in zip(loc["extent"], pipe.patch_size)))}
    return prob, info


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 26-connected component of a (D, H, W) mask, uint8 {0, 1}: faces, edges and
    corners join, so that a thin vein stub touching the body only along an edge stays;
    anything removed is a separate island."""
    return ds.largest_component(mask.astype(np.uint8, copy=False), connectivity=3)


def slice_centre(mask: np.ndarray, label: np.ndarray | None) -> tuple[int, int, int]:
    """Voxel through which the overlay's three slices pass: the centre of the label's bounding
    box (the atrium itself, when known), else the prediction's, else the volume's."""
    for m in (label, mask):
        box = ds.bounding_box(m) if m is not None else None
        if box is not None:
            return tuple(int(c) for c in (box[0] + box[1] - 1) // 2)
    return tuple(s // 2 for s in mask.shape)


def write_overlay(path: Path, image: np.ndarray, mask: np.ndarray, label: np.ndarray | None,
                  spacing, title: str) -> None:
    """PNG of axial, coronal and sagittal slices (array axes D, H, W; voxel order, not
    patient orientation) through the atrium with the prediction's contour and, when there is
    a label, the label's, drawn with the voxel spacing's aspect ratio. Written atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # plotting only when asked
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    z, y, x = slice_centre(mask, label)
    sz, sy, sx = spacing
    views = [(f"axial (D = {z})", np.s_[z, :, :], sy / sx), (f"coronal (H = {y})", np.s_[:, y, :], sz / sx),
             (f"sagittal (W = {x})", np.s_[:, :, x], sz / sy)]
    slices = [np.asarray(image[s], np.float32) for _, s, _ in views]
    lo, hi = np.percentile(np.concatenate([s.ravel() for s in slices]), (1, 99))
    fig = Figure(figsize=(13, 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    for ax, (name, s, aspect), img in zip(fig.subplots(1, 3), views, slices):
        # axial keeps row 0 on top as viewers do; coronal and sagittal put D upwards
        origin = "upper" if name.startswith("axial") else "lower"
        ax.imshow(img, cmap="gray", vmin=lo, vmax=max(hi, lo + 1e-6), aspect=aspect, origin=origin,
                  interpolation="nearest")
        for m, colour in ((label, "#00c8ff"), (mask, "#ffb000")):
            part = None if m is None else m[s]
            if part is not None and part.any() and not part.all():
                ax.contour(part.astype(np.float32), levels=[0.5], colors=colour, linewidths=1.0, origin=origin)
        ax.set_title(name, fontsize=10)
        ax.set_axis_off()
    handles = [Line2D([], [], color="#ffb000", label="prediction")]
    if label is not None:
        handles.append(Line2D([], [], color="#00c8ff", label="label"))
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), frameon=False)
    fig.suptitle(title, fontsize=11)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=90))


def output_paths(out_path: Path) -> dict[str, Path]:
    """The files of one case beside its mask: `<name>_prob<ext>` and `<name>_overlay.png`."""
    suffix = next((s for s in OUTPUT_SUFFIX.values() if out_path.name.endswith(s)), out_path.suffix)
    base = out_path.name[: len(out_path.name) - len(suffix)] if suffix else out_path.name
    return {"mask": out_path, "prob": out_path.with_name(f"{base}_prob{suffix}"),
            "overlay": out_path.with_name(f"{base}_overlay.png")}


def previous_flags(path: Path) -> dict[str, dict]:
    """Locator flags of each case in an earlier metrics.csv, for the masks a rerun keeps."""
    try:
        with open(path, newline="") as f:
            return {r["case_id"]: r for r in csv.DictReader(f) if "locator_found" in r}
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
                    help="also write the atrium probabilities (float32, the scan's geometry) as <case_id>_prob.<format>")
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
        stem = ds._strip_suffix(f.name)
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


def predict_case(pipe: Pipeline, case: ds.Case, paths: dict, wanted: set, args) -> dict:
    """Predict one case and write the outputs named in `wanted` ("mask", "prob", "overlay").
    Returns its metrics row (when it has a label) and flags; outputs not wanted are read back
    from disk when needed (a kept mask still gets scored and drawn)."""
    image, props = ds.read_image(case.image)
    image = ds.check_image(image, case.image)
    info = {}
    if wanted & {"mask", "prob"}:
        prob, info = segment(pipe, image, props)
        mask = (prob >= 0.5).astype(np.uint8)
        if args.largest_component:
            mask = largest_component(mask)
        if "prob" in wanted:
            ds.write_image(prob, props, paths["prob"])
        del prob
    if "mask" in wanted:
        ds.write_image(mask * np.uint8(args.label_value), props, paths["mask"])
    elif case.label is not None or "overlay" in wanted:
        kept, kept_props = ds.read_image(paths["mask"])
        if kept.shape != image.shape or not ds.same_geometry(kept_props, props):
            raise UserError(f"{paths['mask']}: an existing mask not on its scan's grid; pass --overwrite to redo it")
        mask = (kept > 0).astype(np.uint8)
    label = ds.load_label(case.label, image.shape, props) if case.label is not None else None
    if "overlay" in wanted:
        write_overlay(paths["overlay"], image, mask, label, props["spacing"], case.case_id)
    row = {"case_id": case.case_id, **score_case(mask, label, props)} if label is not None else None
    return {"row": row, **info}


def main(argv=None):
    args = parse_args(argv)
    cases = cases_from_args(args)
    set_cpu_threads()
    device = resolve_device(args.device)
    pipe = load_pipeline(args.locator_path, args.segmenter_path, device)
    pipe.tta = args.tta
    out_dir = Path(args.output).parent if args.output else Path(args.output_dir)
    if args.output and Path(args.output).exists() and not args.overwrite:
        raise UserError(f"--output {args.output}: already exists; pass --overwrite to replace it")
    earlier = previous_flags(out_dir / "metrics.csv")

    rows, failed, kept, written, flagged = [], [], 0, 0, []
    for case in tqdm(cases, desc="predict", unit="case", disable=not sys.stderr.isatty()):
        out_path = Path(args.output) if args.output else out_dir / f"{case.case_id}{OUTPUT_SUFFIX[args.output_format]}"
        paths = output_paths(out_path)
        asked = {"mask"} | ({"prob"} if args.save_probabilities else set()) | ({"overlay"} if args.overlays else set())
        wanted = {k for k in asked if args.overwrite or not paths[k].exists()}
        try:
            result = predict_case(pipe, case, paths, wanted, args)
        except UserError as e:
            if len(cases) == 1:
                raise  # nothing else to go on with: the one-line error of a single scan
            failed.append(f"{case.case_id}: {e}")
            tqdm.write(f"failed: {case.case_id}: {e}", file=sys.stderr)
            continue
        if "mask" in wanted:
            written += 1
            found, larger = result["locator_found"], result["atrium_larger_than_patch"]
        else:  # a kept mask: its flags as the run that wrote it recorded them, if it did
            kept += 1
            old = earlier.get(case.case_id, {})
            found, larger = old.get("locator_found", ""), old.get("larger_than_patch", "")
        if found in (False, "0"):
            flagged.append(f"{case.case_id}: the locator found nothing; cropped at the volume centre")
        if larger in (True, "1"):
            flagged.append(f"{case.case_id}: the located atrium is larger than the segmenter's patch")
        if result["row"] is not None:
            rows.append({**result["row"], "locator_found": int(found) if found != "" else "",
                         "larger_than_patch": int(larger) if larger != "" else ""})

    print(f"wrote {written} mask(s) to {out_dir}" + (f"; kept {kept} existing (--overwrite replaces them)" if kept else ""))
    for f in flagged:
        print(f"warning: {f}", file=sys.stderr)
    if rows:
        write_csv(out_dir / "metrics.csv", rows)
        stats = summarise(rows, METRIC_KEYS)
        print(f"metrics over {len(rows)} case(s) ({out_dir / 'metrics.csv'}):")
        for k, (mean, std) in stats.items():
            print(f"  {k:<12} {mean:.3f} +- {std:.3f}")
    if failed:
        print(f"{len(failed)} case(s) failed:\n  " + "\n  ".join(failed), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    run_cli(main)
