"""Train the two-stage left-atrium pipeline: a locator V-Net on downscaled volumes, then a
segmenter V-Net on fixed-size full-resolution crops placed by the locator.

    python train.py --data_dir data/phantoms --output_dir runs/demo            # both stages
    python train.py --stage locator --data_dir DATA --output_dir RUN
    python train.py --stage segmenter --data_dir DATA --output_dir RUN --locator_path RUN/locator/best.pt

Full size on the LASC 2018 data, with the reference's hyper-parameters (the defaults):

    python train.py --data_dir /data/LASC2018/Training_Set --output_dir runs/lasc --device cuda

Writes RUN/config.json, RUN/split.json, and per stage RUN/<stage>/{best.pt, latest.pt,
log.csv}; the locator also writes RUN/locator/centres.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from tqdm import tqdm

import dataset as ds
import predict
from augment import add_augment_args, augmenter_from_args, save_augmentation_grid
from losses import BOUNDARY_FLOOR, FOCAL_ALPHA, FOCAL_GAMMA, LOSS_NAMES, BoundarySchedule, SegmentationLoss
from metrics import dice
from models import VNet, count_parameters, describe, model_arch
from training import fit, init_distributed, is_main, rank_and_size
from utils import (ArgParser, UserError, load_checkpoint, parse_bool, resolve_device, run_cli, seed_everything,
                   set_cpu_threads, write_json)


def parse_args(argv=None, defaults: dict | None = None):
    p = ArgParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data and run")
    g.add_argument("--data_dir", "--root_dir", dest="data_dir", default="data/phantoms", help="dataset folder (LASC or MSD layout)")
    g.add_argument("--output_dir", default="runs/demo", help="run folder")
    g.add_argument("--stage", choices=("both", "locator", "segmenter"), default="both", help="which stage(s) to train")
    g.add_argument("--locator_path", help="trained locator for --stage segmenter (default: RUN/locator/best.pt)")
    g.add_argument("--split", help="JSON split file to reuse (default: RUN/split.json if present, else a new one)")
    g.add_argument("--val_fraction", type=float, default=0.2, help="fraction of cases held out for validation")
    g.add_argument("--seed", type=int, default=0, help="seeds the split, weights, sampling and augmentation")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where to train")
    g.add_argument("--cache_cases", type=parse_bool, nargs="?", const=True, default=None,
                   help="keep the decoded training cases in memory (default: only when the whole set is under 2 GiB)")
    g.add_argument("--num_workers", type=int, default=None, help="data-loader processes (default: 0 on CPU, 4 on CUDA)")
    g.add_argument("--warmup_epochs", type=float, default=1.0,
                   help="raise the learning rate linearly from 0 over this many epochs (0: off)")
    g.add_argument("--save_after_epochs", type=int, default=50, help="also keep a checkpoint every N epochs")
    g.add_argument("--overwrite", action="store_true", help="replace the checkpoints of a stage already trained in RUN")
    g.add_argument("--dry_run", action="store_true", help="build the stage's models, print their sizes and exit (no data)")
    g.add_argument("--resume", metavar="RUN", help="continue the run in RUN from its unfinished stage's latest.pt, "
                   "with the run's own settings, up to --max_epochs epochs in total")
    g.add_argument("--compile", action="store_true", help="torch.compile the model for training (PyTorch 2; GPU)")
    g.add_argument("--deterministic", action="store_true",
                   help="deterministic algorithms only: bit-reproducible on CPU, as far as PyTorch allows on a GPU")
    m = p.add_argument_group("segmenter model (the locator is the plain V-Net)")
    m.add_argument("--num_layers", type=int, default=1, help="V-Net convolutions per stage (2: the 16.2 M model)")
    m.add_argument("--dilation", type=int, default=1, help="dilation of the encoder's 5x5x5 convolutions")
    m.add_argument("--attention_module", type=parse_bool, nargs="?", const=True, default=False,
                   help="3D bottleneck attention after the input and encoder stages (also: --attention_module True/False)")
    m.add_argument("--no-attention_module", dest="attention_module", action="store_false", help="plain V-Net")
    m.add_argument("--init_from_locator", type=parse_bool, nargs="?", const=True, default=True,
                   help="start the segmenter from the trained locator's weights, those it shares with it "
                        "(also: --init_from_locator True/False)")
    m.add_argument("--no-init_from_locator", dest="init_from_locator", action="store_false",
                   help="start the segmenter from random weights")
    m.add_argument("--reduction", type=int, default=4, help="attention channel-gate reduction")
    m.add_argument("--attention_dilation", type=int, default=4, help="dilation of the attention spatial gate")
    m.add_argument("--base_channels", type=int, default=8,
                   help="V-Net input-stage width of both stages (8: reference; less for CPU demos)")
    s = p.add_argument_group("segmenter")
    s.add_argument("--batch_size", type=int, default=3)
    s.add_argument("--learning_rate", type=float, default=3e-4)
    s.add_argument("--loss_criterion", choices=LOSS_NAMES, default="Dice")
    s.add_argument("--patience", type=int, default=7, help="ReduceLROnPlateau patience (epochs)")
    s.add_argument("--reduce", type=float, default=0.8, help="ReduceLROnPlateau factor")
    s.add_argument("--max_epochs", type=int, default=200)
    s.add_argument("--samples_per_epoch", type=int, default=None, help="crops per epoch (default: 6 per training case)")
    s.add_argument("--patch_size", type=int, nargs=3, metavar=("D", "H", "W"), help="segmenter input size (default: derived)")
    s.add_argument("--padding", type=int, nargs=3, metavar=("D", "H", "W"), default=(30, 30, 30),
                   help="total margin added to the largest atrium extent to derive the patch size")
    loc = p.add_argument_group("locator")
    loc.add_argument("--locator_batch_size", type=int, default=5)
    loc.add_argument("--locator_learning_rate", type=float, default=1e-4)
    loc.add_argument("--locator_loss_criterion", choices=LOSS_NAMES, default="Dice")
    loc.add_argument("--locator_patience", type=int, default=15)
    loc.add_argument("--locator_reduce", type=float, default=0.85)
    loc.add_argument("--locator_max_epochs", type=int, default=None, help="default: --max_epochs")
    loc.add_argument("--locator_samples_per_epoch", type=int, default=None, help="default: 6 per training case")
    loc.add_argument("--scale_factor", type=float, nargs=3, metavar=("D", "H", "W"), default=(0.5, 0.25, 0.25),
                     help="locator downscaling, each 1/k for a whole k")
    lo = p.add_argument_group("losses (both stages)")
    lo.add_argument("--squared_dice", action="store_true", help="Dice with sum(p^2) + sum(g^2) below (the V-Net paper's form)")
    lo.add_argument("--focal_alpha", type=float, default=FOCAL_ALPHA, help="Focal: weight of the atrium class")
    lo.add_argument("--focal_gamma", type=float, default=FOCAL_GAMMA, help="Focal: focusing exponent")
    lo.add_argument("--boundary_schedule", choices=BoundarySchedule.MODES, default="epoch",
                    help="Hybrid: lower the Dice weight every epoch, or only once validation Dice passes a threshold")
    lo.add_argument("--boundary_step", type=float, default=0.01, help="Hybrid: Dice weight lowered per epoch")
    lo.add_argument("--boundary_floor", type=float, default=BOUNDARY_FLOOR, help="Hybrid: lowest Dice weight")
    lo.add_argument("--boundary_start_dice", type=float, default=0.8,
                    help="Hybrid with --boundary_schedule dice: validation Dice that starts the schedule")
    add_augment_args(p.add_argument_group("augmentation (magnitudes in full-resolution voxels)"))
    if defaults:
        p.set_defaults(**defaults)
    return p.parse_args(argv)


def check_args(args) -> None:
    """Impossible values are refused up front, naming the flag."""
    positive = ["max_epochs", "batch_size", "locator_batch_size", "learning_rate", "locator_learning_rate",
                "num_layers", "dilation", "base_channels", "save_after_epochs", "samples_per_epoch",
                "locator_samples_per_epoch", "locator_max_epochs", "reduction", "attention_dilation"]
    for name in positive:
        v = getattr(args, name)
        if v is not None and not v > 0:
            raise UserError(f"--{name} {v}: must be greater than 0")
    for name in ("patience", "locator_patience", "num_workers", "seed", "warmup_epochs", "focal_gamma"):
        v = getattr(args, name)
        if v is not None and v < 0:
            raise UserError(f"--{name} {v}: must be 0 or more")
    for name in ("reduce", "locator_reduce"):
        if not 0 < getattr(args, name) < 1:
            raise UserError(f"--{name} {getattr(args, name)}: must lie strictly between 0 and 1")
    for name in ("focal_alpha", "boundary_step", "boundary_floor", "boundary_start_dice"):
        if not 0 <= getattr(args, name) <= 1:
            raise UserError(f"--{name} {getattr(args, name)}: must lie in [0, 1]")
    if not 0 <= args.val_fraction < 1:
        raise UserError(f"--val_fraction {args.val_fraction}: must lie in [0, 1)")
    if min(args.padding) < 0:
        raise UserError(f"--padding {' '.join(map(str, args.padding))}: must be 0 or more")
    if args.patch_size and any(p <= 0 or p % 16 for p in args.patch_size):
        raise UserError(f"--patch_size {' '.join(map(str, args.patch_size))}: each size must be a positive multiple of 16")
    ds.downscale_factors(args.scale_factor)
    augmenter_from_args(args)


def stage_settings(args, name: str, n_train: int) -> SimpleNamespace:
    if name == "locator":
        return SimpleNamespace(batch_size=args.locator_batch_size, lr=args.locator_learning_rate,
                               patience=args.locator_patience, reduce=args.locator_reduce,
                               max_epochs=args.locator_max_epochs or args.max_epochs,
                               samples=args.locator_samples_per_epoch or 6 * n_train)
    return SimpleNamespace(batch_size=args.batch_size, lr=args.learning_rate, patience=args.patience,
                           reduce=args.reduce, max_epochs=args.max_epochs, samples=args.samples_per_epoch or 6 * n_train)


def stage_model(args, name: str) -> VNet:
    """The locator is the reference's plain V-Net; the model flags shape the segmenter."""
    if name == "locator":
        return VNet(base_channels=args.base_channels)
    return VNet(num_layers=args.num_layers, dilation=args.dilation, base_channels=args.base_channels,
                attention_module=args.attention_module, reduction=args.reduction,
                attention_dilation=args.attention_dilation)


def survey(cases: list[ds.Case]) -> list[dict]:
    """Read every case once: validate it and record shape, spacing and the atrium's box."""
    records = []
    for case in tqdm(cases, desc="checking data", unit="case", disable=not sys.stderr.isatty()):
        image, label, props = ds.load_case(case)
        box = ds.bounding_box(label)
        records.append({"shape": image.shape, "spacing": props["spacing"], "box": box})
    return records


def train_locator(args, cases, records, split, spacing, run_dir, device, resume=None) -> Path:
    factors = ds.downscale_factors(args.scale_factor)
    common = ds.round_up(np.max([r["shape"] for r in records], axis=0), ds.pad_multiple(factors))
    volumes = {}
    for case in cases:
        image, fill, label = ds.load_training_case(case, spacing)
        low, before = ds.locator_input(image, fill, factors, common)
        low_label = (ds.downscale(ds.pad_symmetric(label.astype(np.float32), common)[0], factors) >= 0.5).astype(np.uint8)
        volumes[case.case_id] = (low, low_label)
    train_ids, val_ids = split["train"], split["val"]
    st = stage_settings(args, "locator", len(train_ids))
    augment = augmenter_from_args(args, voxel_scale=max(factors[1:]))
    low_spacing = tuple(s * k for s, k in zip(spacing, factors))
    train_set = ds.LocatorSet([volumes[i] for i in train_ids], ds.EpochSampler(len(train_ids), st.samples, args.seed), augment,
                              low_spacing if SegmentationLoss(args.locator_loss_criterion).needs_distance_map else None)

    def validate(model, share):
        return [dice(predict.infer(model, volumes[i][0], device) >= 0.5, volumes[i][1]) for i in share(val_ids)]

    model = stage_model(args, "locator").to(device)
    config = {"role": "locator", "arch": model_arch(model), "factors": list(factors), "scale_factor": list(args.scale_factor),
              "spacing": list(spacing), "common_shape": list(common), "loss": args.locator_loss_criterion}
    best = fit("locator", model, train_set, validate, st, args, run_dir, config, device, resume)

    # Record where the best locator puts every case, as prediction will (own-shape padding).
    pipe = predict.Pipeline(load_stage_model(best, "locator", device), None, factors, None, spacing, device)
    centres = {}
    for case in cases:
        image, fill, _ = ds.load_training_case(case, spacing)
        centres[case.case_id] = predict.locate_case(pipe, image, fill)
    if is_main():
        write_json(run_dir / "locator" / "centres.json", centres)
    return best


def load_stage_model(path, role, device):
    return predict.load_model(load_checkpoint(path, role, "--locator_path"), path, device)


def train_segmenter(args, cases, records, split, spacing, run_dir, device, locator_path: Path, resume=None) -> Path:
    loc_ckpt = load_checkpoint(locator_path, "locator", "--locator_path")
    if not np.allclose(loc_ckpt["config"]["spacing"], spacing, rtol=1e-3):
        raise UserError(f"--locator_path {locator_path}: trained at spacing {loc_ckpt['config']['spacing']}, these data "
                        f"at {list(spacing)}; train the locator on the same data")
    factors = tuple(loc_ckpt["config"]["factors"])
    common = ds.round_up(np.max([r["shape"] for r in records], axis=0), ds.pad_multiple(factors))
    extents = [(r["box"][1] - r["box"][0]) for r, c in zip(records, cases) if c.case_id in split["train"]]
    patch = tuple(args.patch_size) if args.patch_size else ds.patch_size_for(extents, args.padding, common)
    print(f"segmenter patch size {patch} (volumes padded to {tuple(common)})")

    pipe = predict.Pipeline(predict.load_model(loc_ckpt, locator_path, device), None, factors, patch, spacing, device)
    by_id = {c.case_id: c for c in cases}
    total_voxels = sum(int(np.prod(r["shape"])) for r in records)
    small = total_voxels * 5 < 2 * 2**30  # float32 image + uint8 label per voxel
    cache = {} if (small if args.cache_cases is None else args.cache_cases) else None

    def load(cid):
        item = cache.get(cid) if cache is not None else None
        if item is None:
            item = ds.load_training_case(by_id[cid], spacing)
            if cache is not None:
                cache[cid] = item
        return item

    centres, gt_centres = {}, {}
    for case in cases:
        image, fill, label = load(case.case_id)
        found = predict.locate_case(pipe, image, fill)
        centres[case.case_id] = found["centre"] if found["found"] else None
        box = ds.bounding_box(label)
        gt_centres[case.case_id] = None if box is None else tuple((box[0] + box[1]) / 2)
        if found["found"] and any(e > p for e, p in zip(found["extent"], patch)):
            print(f"warning: case {case.case_id}: located atrium {found['extent']} is larger than the patch {patch}")
    missed = [i for i, c in centres.items() if c is None]
    if missed:
        print(f"warning: the locator found no atrium in {len(missed)} case(s) ({', '.join(missed[:5])}); "
              "their crops use the ground truth's centre", file=sys.stderr)

    train_ids, val_ids = split["train"], split["val"]
    st = stage_settings(args, "segmenter", len(train_ids))
    train_set = ds.SegmenterSet(lambda i: load(train_ids[i]), [centres[i] for i in train_ids],
                                [gt_centres[i] for i in train_ids], patch,
                                ds.EpochSampler(len(train_ids), st.samples, args.seed + 1), augmenter_from_args(args),
                                spacing if SegmentationLoss(args.loss_criterion).needs_distance_map else None)
    if args.augmentation_grid and is_main():
        train_set.sampler.set_epoch(0)
        save_augmentation_grid(args.augmentation_grid, [train_set[j][:2] for j in range(min(8, len(train_set)))])
        print(f"augmented training crops: {args.augmentation_grid}")

    def validate(model, share):
        pipe.segmenter, scores = model, []
        for cid in share(val_ids):
            image, fill, label = load(cid)
            centre = centres[cid] if centres[cid] is not None else tuple((s - 1) / 2 for s in image.shape)
            scores.append(dice(predict.segment_at(pipe, image, fill, centre) >= 0.5, label))
        return scores

    model = stage_model(args, "segmenter").to(device)
    if resume is not None:  # the weights come from the checkpoint; keep its record of how they started
        from_locator = bool(resume["config"].get("init_from_locator", False))
    else:
        widths = loc_ckpt["config"]["arch"].get("base_channels")
        from_locator = args.init_from_locator and widths == args.base_channels
        if from_locator:
            copied = model.load_matching(loc_ckpt["model"])
            print(f"segmenter starts from the locator's weights ({copied} of {len(model.state_dict())} tensors)")
        elif args.init_from_locator:
            print(f"note: the locator has --base_channels {widths}, the segmenter {args.base_channels}: "
                  "the segmenter starts from random weights")
    config = {"role": "segmenter", "arch": model_arch(model), "patch_size": list(patch), "spacing": list(spacing),
              "loss": args.loss_criterion, "locator_path": str(locator_path), "init_from_locator": from_locator}
    return fit("segmenter", model, train_set, validate, st, args, run_dir, config, device, resume)


def resume_settings(argv, run_dir: Path):
    """The settings of the run in `run_dir`, with the flags given now on top (e.g. more epochs)."""
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise UserError(f"--resume {run_dir}: no config.json there; pass a run folder written by train.py")
    config = json.loads(config_path.read_text())
    saved = config.get("segmenter") or config.get("locator") or {}
    saved = {k: v for k, v in saved.items() if k not in ("resume", "overwrite", "dry_run")}
    args = parse_args(argv, defaults=saved)
    args.output_dir = str(run_dir)
    return args


def resume_point(args, run_dir: Path, stages: list[str]) -> tuple[list[str], dict | None]:
    """The stages still to train and the latest.pt of the first one, if it has one. A stage
    after a resumed one is trained anew: it depends on the earlier stage's final weights."""
    for i, stage in enumerate(stages):
        latest = run_dir / stage / "latest.pt"
        if not latest.exists():
            return stages[i:], None
        ckpt = load_checkpoint(latest, stage, "--resume")
        max_epochs = (args.locator_max_epochs or args.max_epochs) if stage == "locator" else args.max_epochs
        if ckpt["epoch"] < max_epochs:
            return stages[i:], ckpt
    raise UserError(f"--resume {run_dir}: every stage has run its epochs already; raise --max_epochs "
                    "(or --locator_max_epochs) to train longer")


def main(argv=None):
    args = parse_args(argv)
    if args.resume:
        args = resume_settings(argv, Path(args.resume))
    check_args(args)
    stages = ["locator", "segmenter"] if args.stage == "both" else [args.stage]
    if args.dry_run:
        for stage in stages:
            model = stage_model(args, stage)
            print(f"{stage} {describe(model_arch(model))}: parameters: {count_parameters(model):,}")
        return
    seed_everything(args.seed)
    set_cpu_threads()
    init_distributed(args.device)
    device = resolve_device(args.device)
    if device.type == "cuda" and rank_and_size()[1] > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for deterministic matmuls
        torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = not args.deterministic
    if args.num_workers is None:
        args.num_workers = 4 if device.type == "cuda" else 0
    run_dir = Path(args.output_dir)
    resume = None
    if args.resume:
        stages, resume = resume_point(args, run_dir, stages)
    for stage in stages:
        if (run_dir / stage / "best.pt").exists() and not (args.overwrite or args.resume):
            raise UserError(f"--output_dir {run_dir}: the {stage} is already trained there ({run_dir / stage / 'best.pt'}); "
                            "choose another --output_dir or pass --overwrite")
    locator_path = Path(args.locator_path) if args.locator_path else run_dir / "locator" / "best.pt"
    if "locator" not in stages:
        load_checkpoint(locator_path, "locator", "--locator_path")  # fail before reading any data

    if args.data_dir == "data/phantoms" and not Path(args.data_dir).exists() and is_main():
        import phantoms
        print("no data at data/phantoms: generating the synthetic phantom set there")
        phantoms.write_phantom_dataset("data/phantoms", num_cases=40, shapes=((48, 128, 128), (48, 112, 112)))
    if rank_and_size()[1] > 1:
        torch.distributed.barrier()
    cases = ds.find_cases(args.data_dir, require_labels=True)
    ids = [c.case_id for c in cases]
    split_path = Path(args.split) if args.split else run_dir / "split.json"
    split = ds.read_split(split_path, ids) if split_path.exists() else ds.make_split(ids, args.val_fraction, args.seed)
    records = survey(cases)
    for case, r in zip(cases, records):
        if r["box"] is None and case.case_id in split["train"]:
            raise UserError(f"{case.label}: label is empty; every training case needs an atrium (or move it to 'val' in the split)")
    spacing = tuple(float(s) for s in np.median([r["spacing"] for r in records], axis=0))
    print(f"{len(cases)} cases ({len(split['train'])} train, {len(split['val'])} validation), spacing {spacing} mm")

    if is_main():
        write_json(run_dir / "split.json", split)
        config_path = run_dir / "config.json"
        config = json.loads(config_path.read_text()) if config_path.exists() else {}
        for stage in stages:
            config[stage] = {k: v for k, v in vars(args).items() if k != "resume"}
        write_json(config_path, config)

    if "locator" in stages:
        locator_path = train_locator(args, cases, records, split, spacing, run_dir, device, resume)
        resume = None
    if "segmenter" in stages:
        train_segmenter(args, cases, records, split, spacing, run_dir, device, locator_path, resume)


if __name__ == "__main__":
    run_cli(main)
