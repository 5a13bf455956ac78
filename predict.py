"""Segment the left atrium with a trained locator and segmenter; write one mask per scan.

    python predict.py --data_dir DATA --locator_path RUN/locator/best.pt \
        --segmenter_path RUN/segmenter/best.pt --output_dir OUT
    python predict.py --input scan.nrrd --output mask.nrrd --locator_path L.pt --segmenter_path S.pt

Per scan: resample to the training spacing if it differs -> z-score -> pad and downscale ->
locator -> centre of its largest component -> fixed-size crop -> segmenter -> paste into a
zero volume -> back onto the scan's own grid -> threshold -> mask with the scan's exact
size, spacing, origin and direction. The architecture and pre-processing come from the
checkpoints, so there are no model flags. With labels present, OUT/metrics.csv holds the
per-case metrics and their mean +- std is printed.
"""
from __future__ import annotations

import argparse
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
from utils import (ArgParser, UserError, load_checkpoint, memory_format, resolve_device, run_cli,
                   set_cpu_threads)

OUTPUT_SUFFIX = {"nrrd": ".nrrd", "nii.gz": ".nii.gz", "mha": ".mha"}


@dataclass
class Pipeline:
    locator: torch.nn.Module
    segmenter: torch.nn.Module
    factors: tuple        # locator downscaling blocks, e.g. (2, 4, 4)
    patch_size: tuple     # segmenter input, e.g. (96, 144, 224)
    spacing: tuple        # training spacing (sz, sy, sx) mm
    device: torch.device


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
def infer(model: torch.nn.Module, array: np.ndarray, device: torch.device) -> np.ndarray:
    """Foreground probabilities of one (D, H, W) volume, float32 (D, H, W)."""
    x = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None]
    x = x.to(device, memory_format=memory_format(device))
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        logits = model(x)
    return torch.sigmoid(logits.float())[0, 0].cpu().numpy()


def locate_case(pipe: Pipeline, image: np.ndarray, fill: float) -> dict:
    """Run the locator on a z-scored scan at training spacing; fall back to the volume
    centre (flagged `found: False`) when it finds nothing."""
    low, before = ds.locator_input(image, fill, pipe.factors)
    found = ds.locate(infer(pipe.locator, low, pipe.device), pipe.factors, before)
    if not found["found"]:
        found["centre"] = tuple((s - 1) / 2 for s in image.shape)
    return found


def segment_at(pipe: Pipeline, image: np.ndarray, fill: float, centre) -> np.ndarray:
    """Segmenter probabilities of the fixed-size crop at `centre`, pasted into a zero volume."""
    start = ds.crop_start(centre, pipe.patch_size, image.shape)
    prob = infer(pipe.segmenter, ds.crop(image, start, pipe.patch_size, fill), pipe.device)
    return ds.paste(prob, start, image.shape)


def segment(pipe: Pipeline, image: np.ndarray, props: dict) -> tuple[np.ndarray, dict]:
    """Mask uint8 {0, 1} on the grid of `image (D, H, W)` and a record of the location."""
    resampled = not np.allclose(props["spacing"], pipe.spacing, rtol=1e-3, atol=0)
    work, work_props = ds.resample(image, props, pipe.spacing, label=False) if resampled else (image, props)
    work, fill = ds.zscore(work)
    loc = locate_case(pipe, work, fill)
    prob = segment_at(pipe, work, fill, loc["centre"])
    if resampled:
        prob = ds.resample_onto(prob, work_props, image.shape, props, label=False)
    info = {"locator_found": loc["found"],
            "atrium_larger_than_patch": bool(loc["found"] and any(
                e > p for e, p in zip(loc["extent"], pipe.patch_size)))}
    return (prob >= 0.5).astype(np.uint8), info


def parse_args(argv=None):
    p = ArgParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    io = p.add_argument_group("inputs and outputs")
    io.add_argument("--data_dir", help="dataset folder (LASC or MSD layout); labels, if present, are scored")
    io.add_argument("--input", nargs="+", help="one or more scan files instead of --data_dir")
    io.add_argument("--output", help="mask file for a single --input")
    io.add_argument("--output_dir", default="predictions", help="folder for <case_id> masks and metrics.csv")
    io.add_argument("--output_format", choices=sorted(OUTPUT_SUFFIX), default="nrrd", help="mask file format")
    io.add_argument("--label_value", type=int, choices=(1, 255), default=1,
                    help="foreground value written (255: the challenge's convention)")
    io.add_argument("--overwrite", action="store_true", help="replace masks that already exist")
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
    if args.data_dir is not None:
        return ds.find_cases(args.data_dir, require_labels=False)
    cases = []
    for f in map(Path, args.input):
        stem = ds._strip_suffix(f.name)
        if stem is None:
            raise UserError(f"--input {f}: unknown image format; expected one of {', '.join(ds.IMAGE_SUFFIXES)}")
        cases.append(ds.Case(stem, f, None))
    return cases


def main(argv=None):
    args = parse_args(argv)
    cases = cases_from_args(args)
    set_cpu_threads()
    device = resolve_device(args.device)
    pipe = load_pipeline(args.locator_path, args.segmenter_path, device)
    out_dir = Path(args.output).parent if args.output else Path(args.output_dir)
    if args.output and Path(args.output).exists() and not args.overwrite:
        raise UserError(f"--output {args.output}: already exists; pass --overwrite to replace it")

    rows, failed, kept, flagged = [], [], 0, []
    for case in tqdm(cases, desc="predict", unit="case", disable=not sys.stderr.isatty()):
        out_path = Path(args.output) if args.output else out_dir / f"{case.case_id}{OUTPUT_SUFFIX[args.output_format]}"
        try:
            image, props = ds.read_image(case.image)
            image = ds.check_image(image, case.image)
            info = {"locator_found": True, "atrium_larger_than_patch": False}
            if out_path.exists() and not args.overwrite:
                kept += 1
                mask = (ds.read_image(out_path)[0] > 0).astype(np.uint8) if case.label else None
            else:
                mask, info = segment(pipe, image, props)
                ds.write_image(mask * np.uint8(args.label_value), props, out_path)
            if not info["locator_found"]:
                flagged.append(f"{case.case_id}: the locator found nothing; cropped at the volume centre")
            elif info["atrium_larger_than_patch"]:
                flagged.append(f"{case.case_id}: the located atrium is larger than the segmenter's patch")
            if case.label is not None:
                label = ds.load_label(case.label, image.shape, props)
                rows.append({"case_id": case.case_id, **score_case(mask, label, props),
                             "locator_found": int(info["locator_found"])})
        except UserError as e:
            failed.append(f"{case.case_id}: {e}")
            tqdm.write(f"failed: {case.case_id}: {e}", file=sys.stderr)

    done = len(cases) - len(failed) - kept
    print(f"wrote {done} mask(s) to {out_dir}" + (f"; kept {kept} existing (--overwrite replaces them)" if kept else ""))
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
