"""Train the two-stage left-atrium pipeline: a locator V-Net on downscaled volumes, then a
segmenter V-Net on fixed-size full-resolution crops placed by the locator.

    python train.py --data_dir data/phantoms --output_dir runs/demo            # both stages
    python train.py --stage locator --data_dir DATA --output_dir RUN
    python train.py --stage segmenter --data_dir DATA --output_dir RUN --locator_path RUN/locator/best.pt

Full size on the LASC 2018 data, with the reference's hyper-parameters (the defaults):

    python train.py --data_dir /data/LASC2018/Training_Set --output_dir runs/lasc --device cuda

Several channels and classes (MSD / nnU-Net layouts, dataset.json; docs/multiclass.md): the same
two stages (the locator learns all classes' foreground), or one network on foreground-biased
random patches, predicted with a sliding window:

    python train.py --data_dir TUMOURS --output_dir RUN --strategy patches --patch_size 32 64 64 \
        [--regions whole_tumour=1,2,3 tumour_core=2,3 enhancing=3]

Instances one at a time (vertebrae; labels 0 and 1..N; docs/instances.md): the iterative FCN
sees a patch and the instances found so far, and segments the next one:

    python train.py --data_dir SPINE --output_dir RUN --strategy iterative --patch_size 48 64 64 [--spacing 1]

k-fold cross-validation (nnU-Net's splits_final.json; one run folder per fold, each ending with
the prediction of its validation cases):

    python train.py --data_dir DATA --output_dir RUN --num_folds 5 [--fold K|all] [--group_by REGEX]

Writes RUN/config.json, RUN/split.json, and per stage RUN/<stage>/{best.pt, latest.pt,
log.csv, curves.png}; the locator also writes RUN/locator/centres.json. With folds: RUN/
splits_final.json and RUN/fold_K/ (those files, and validation/ with masks and metrics.csv). The work itself is in
training.py; this script turns flags into its settings.
"""
from __future__ import annotations

import argparse
import functools
import json
import re
from pathlib import Path

import dataset as ds
import inference
import labels as lbl
import splits
import synthetic
import training
from augment import add_augment_args, augmenter_from_args
from losses import BOUNDARY_FLOOR, FOCAL_ALPHA, FOCAL_GAMMA, ITERATIVE_LOSSES, LOSS_NAMES, BoundarySchedule
from models import IterativeFCN, VNet, count_parameters, describe, model_arch
from utils import ArgParser, UserError, parse_bool, run_cli, write_json

STAGES = ["locator", "segmenter"]
STRATEGIES = ("two_stage", "patches", "iterative")
ITERATIVE_WIDTH = 64  # the iterative FCN's constant width in the paper (--base_channels' default there)
DEMO_DATA = "data/phantoms"  # the default --data_dir: phantoms are generated there when it is absent
# In 2D most patches are drawn anywhere: slices beyond the base and the apex, where a 2D network
# must learn that the heart ends, hold no foreground and are never drawn otherwise (docs/cardiac.md).
FOREGROUND_FRACTION_2D = 0.33
# Short-axis slices are rotated in plane from subject to subject far more than the reference's 3
# degrees cover; a 2D model trains with rotations up to this many degrees (docs/cardiac.md).
ROTATION_2D = 15.0


def parse_args(argv=None, defaults: dict | None = None):
    p = ArgParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data and run")
    g.add_argument("--data_dir", "--root_dir", dest="data_dir", default=DEMO_DATA,
                   help="dataset folder (LASC, MSD or nnU-Net layout)")
    g.add_argument("--output_dir", default="runs/demo", help="run folder")
    g.add_argument("--strategy", choices=STRATEGIES,
                   help="two_stage: a locator on the downscaled scan, a segmenter on a crop around what it finds; "
                        "patches: one network on random patches, predicting with a sliding window (no locator); "
                        "iterative: instances one at a time (vertebrae; labels 0 and 1..N, one per instance), a "
                        "network of two inputs (scan and the instances found) that segments the next one and says "
                        "whether it is complete (default: two_stage in 3D, patches in 2D)")
    g.add_argument("--stage", choices=("both", "locator", "segmenter"), default="both", help="which stage(s) to train")
    g.add_argument("--locator_path", help="trained locator for --stage segmenter (default: RUN/locator/best.pt)")
    g.add_argument("--split", help="JSON split file to reuse: {\"train\": [...], \"val\": [...]}, or nnU-Net's "
                   "splits_final.json (a list of those, one per fold: pick with --fold) (default: the run's own "
                   "split.json or splits_final.json if present, else a new one)")
    g.add_argument("--num_folds", type=int, help="cross-validation: split the cases into N folds "
                   "(RUN/splits_final.json) and train fold K into RUN/fold_K/")
    g.add_argument("--fold", help="which fold to train, 0..N-1, or 'all' (the default with --num_folds): each "
                   "in turn, skipping folds already finished (unless --overwrite)")
    g.add_argument("--group_by", metavar="REGEX", help="keep the cases of one patient on one side of the split (in "
                   "one fold): the regex's first group, searched in the case id, names the patient (e.g. "
                   "'^(patient\\d+)_') (default: ACDC's patient folders; else each case is its own patient)")
    g.add_argument("--val_fraction", type=float, default=0.2,
                   help="fraction of cases (patients) held out for validation, at least one; 0: none, every case "
                        "trains and the checkpoint kept is the epoch of lowest training loss")
    g.add_argument("--seed", type=int, default=0, help="seeds the split, weights, sampling and augmentation")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where to train")
    g.add_argument("--cache_cases", type=parse_bool, nargs="?", const=True, default=None,
                   help="keep each training case's crop region in memory (default: while they take under "
                        f"{training.CASE_CACHE_LIMIT / 2**30:g} GiB)")
    g.add_argument("--num_workers", type=int, default=None, help="data-loader processes (default: 0 on CPU, 4 on CUDA)")
    g.add_argument("--warmup_epochs", type=float, default=1.0,
                   help="raise the learning rate linearly from 0 over this many epochs (0: off)")
    g.add_argument("--save_after_epochs", type=int, default=50, help="also keep a checkpoint every N epochs")
    g.add_argument("--overwrite", action="store_true", help="replace the checkpoints of a stage already trained in RUN")
    g.add_argument("--dry_run", action="store_true",
                   help="build the stage's models, print their sizes and exit (no data)")
    g.add_argument("--resume", metavar="RUN", help="continue the run in RUN from its unfinished stage's latest.pt, "
                   "with the run's own settings, up to --max_epochs epochs in total")
    g.add_argument("--compile", action="store_true", help="torch.compile the model for training (PyTorch 2; GPU)")
    g.add_argument("--deterministic", action="store_true",
                   help="deterministic algorithms only: bit-reproducible on CPU, as far as PyTorch allows on a GPU")
    m = p.add_argument_group("segmenter model (the locator is the plain V-Net)")
    m.add_argument("--spatial_dims", type=int, choices=(2, 3), default=3,
                   help="2: a V-Net of 2D convolutions trained on slices (or in-plane patches) along the scan's first "
                        "array axis (the slice stack), predicting slice by slice (--strategy patches)")
    m.add_argument("--context_slices", type=int, default=0,
                   help="2D: also give the model this many neighbouring slices on each side of its slice, as "
                        "channels (2.5D); 0: the slice alone")
    m.add_argument("--init_from", metavar="CKPT",
                   help="transfer learning: start the segmenter (or patch network) from another run's checkpoint, "
                        "tensors matched by name and shape (2D and 3D kernels converted); the output layer starts "
                        "anew when its classes differ")
    m.add_argument("--locator_init_from", metavar="CKPT", help="the same for the locator")
    m.add_argument("--freeze_encoder_epochs", type=int, default=0,
                   help="with --init_from: keep the encoder (input and down stages) fixed for the first N epochs, "
                        "then train everything")
    m.add_argument("--num_layers", type=int, default=1, help="V-Net convolutions per stage (2: the 16.2 M model)")
    m.add_argument("--dilation", type=int, default=1, help="dilation of the encoder's 5x5x5 convolutions")
    m.add_argument("--attention_module", type=parse_bool, nargs="?", const=True, default=False,
                   help="3D bottleneck attention after the input and encoder stages "
                        "(also: --attention_module True/False)")
    m.add_argument("--no-attention_module", dest="attention_module", action="store_false", help="plain V-Net")
    m.add_argument("--init_from_locator", type=parse_bool, nargs="?", const=True, default=True,
                   help="start the segmenter from the trained locator's weights, those it shares with it "
                        "(also: --init_from_locator True/False)")
    m.add_argument("--no-init_from_locator", dest="init_from_locator", action="store_false",
                   help="start the segmenter from random weights")
    m.add_argument("--reduction", type=int, default=4, help="attention channel-gate reduction")
    m.add_argument("--attention_dilation", type=int, default=4, help="dilation of the attention spatial gate")
    m.add_argument("--base_channels", type=int,
                   help="V-Net input-stage width of both stages (default 8: the reference); the iterative FCN's "
                        f"constant width (default {ITERATIVE_WIDTH}: the paper's); less for CPU demos")
    s = p.add_argument_group("segmenter")
    s.add_argument("--batch_size", type=int,
                   help="default: 3 (the reference's); 2 for the iterative strategy (docs/instances.md)")
    s.add_argument("--learning_rate", type=float,
                   help="default: 3e-4 for the two-stage segmenter (the reference's); 1e-3 for the patch strategy "
                        "(docs/multiclass.md measures both); 3e-3 for the iterative one (docs/instances.md)")
    s.add_argument("--loss_criterion", choices=LOSS_NAMES + ITERATIVE_LOSSES,
                   help="default: Dice for the two-stage segmenter of one class (the reference's); DiceCE otherwise: a "
                        "patch or crop that lacks a class saturates a Dice term once the class is predicted in it, "
                        "and the cross-entropy keeps penalising it (nnU-Net's loss). The iterative strategy: "
                        f"{' or '.join(ITERATIVE_LOSSES)} (the paper's border-weighted cross-entropy, alone or "
                        "with the soft Dice: the default, docs/instances.md), plus the completeness cross-entropy")
    s.add_argument("--patience", type=int, default=7, help="ReduceLROnPlateau patience (epochs)")
    s.add_argument("--reduce", type=float, default=0.8, help="ReduceLROnPlateau factor")
    s.add_argument("--max_epochs", type=int, default=200)
    s.add_argument("--samples_per_epoch", type=int, default=None, help="crops per epoch (default: 6 per training case)")
    s.add_argument("--patch_size", type=int, nargs="+", metavar="N",
                   help="segmenter input size: D H W, or H W in 2D (default: derived; in 2D the median slice; "
                        "patches and iterative: the median shape, at most 128 a side)")
    s.add_argument("--spacing", type=float, nargs="+", metavar="MM",
                   help="training spacing in mm, D H W or one for all axes; scans are resampled to it and "
                        "predictions back (default: the data's median spacing)")
    s.add_argument("--padding", type=int, nargs=3, metavar=("D", "H", "W"), default=(30, 30, 30),
                   help="total margin added to the largest atrium extent to derive the patch size")
    c = p.add_argument_group("channels and classes; the patch strategy")
    c.add_argument("--regions", nargs="+", metavar="NAME=V1,V2",
                   help="train one sigmoid output per region of label values (e.g. whole_tumour=1,2,3 "
                        "tumour_core=2,3 enhancing=3) instead of a softmax over the classes (default: dataset.json's "
                        "nnU-Net regions, if any)")
    c.add_argument("--normalization", choices=("auto", *ds.NORMALIZATIONS), default="auto",
                   help="each channel: z-scored over the whole scan, or over its non-zero voxels (a skull-stripped "
                        "MRI's brain), or CT's fixed scale (HU clipped to -1000..3000, / 1000); auto: nonzero for "
                        "channels dataset.json names as MRI, ct for CT, whole for undeclared channels")
    c.add_argument("--max_background", type=float, default=0.95,
                   help="patches: a patch with more background than this fraction is redrawn")
    c.add_argument("--foreground_fraction", type=float,
                   help="patches: the fraction of patches drawn with the foreground bias (--max_background); the "
                        "others anywhere, so that the network also sees what lies beyond the structure (default: 1 "
                        f"in 3D, {FOREGROUND_FRACTION_2D} in 2D)")
    c.add_argument("--max_tries", type=int, default=1000,
                   help="patches: draws before a patch is centred on a random foreground voxel instead")
    c.add_argument("--overlap", type=float, default=0.5,
                   help="patches: overlap of the sliding window's neighbouring windows (validation and prediction)")
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
    lo.add_argument("--squared_dice", action="store_true",
                    help="Dice with sum(p^2) + sum(g^2) below (the V-Net paper's form)")
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
    if args.strategy is None:
        args.strategy = "patches" if args.spatial_dims == 2 else "two_stage"
    if args.spatial_dims == 2 and args.strategy != "patches":
        raise UserError(f"--strategy {args.strategy}: a 2D model (--spatial_dims 2) trains with --strategy patches "
                        "(whole slices or in-plane patches); drop --strategy or --spatial_dims")
    if args.base_channels is None:
        args.base_channels = ITERATIVE_WIDTH if args.strategy == "iterative" else 8
    if args.batch_size is None:
        args.batch_size = 2 if args.strategy == "iterative" else 3
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
    if not 0 < args.max_background <= 1:
        raise UserError(f"--max_background {args.max_background}: must lie in (0, 1] (0.95: at least 5 % foreground)")
    if args.foreground_fraction is None:
        args.foreground_fraction = FOREGROUND_FRACTION_2D if args.spatial_dims == 2 else 1.0
    if args.max_rotation is None and args.spatial_dims == 2:
        args.max_rotation = ROTATION_2D
    if not 0 <= args.foreground_fraction <= 1:
        raise UserError(f"--foreground_fraction {args.foreground_fraction}: must lie in [0, 1]")
    if args.max_tries < 1:
        raise UserError(f"--max_tries {args.max_tries}: must be at least 1")
    if not 0 <= args.overlap < 1:
        raise UserError(f"--overlap {args.overlap}: must lie in [0, 1)")
    if args.regions:
        try:
            lbl.parse_regions(args.regions)
        except ValueError as e:
            raise UserError(str(e)) from None
    if args.strategy != "two_stage" and (args.stage != "both" or args.locator_path):
        raise UserError(f"{'--stage ' + args.stage if args.stage != 'both' else '--locator_path'}: "
                        f"--strategy {args.strategy} trains one network and no locator; drop it")
    check_iterative_args(args)
    if args.spacing is not None:
        if len(args.spacing) not in (1, 3) or not all(v > 0 for v in args.spacing):
            raise UserError(f"--spacing {' '.join(map(str, args.spacing))}: give one spacing in mm for all axes, or "
                            "three (D H W), each greater than 0")
        args.spacing = list(args.spacing) * (3 // len(args.spacing))
    if min(args.padding) < 0:
        raise UserError(f"--padding {' '.join(map(str, args.padding))}: must be 0 or more")
    if args.context_slices < 0 or (args.context_slices and args.spatial_dims != 2):
        raise UserError(f"--context_slices {args.context_slices}: neighbouring slices are a 2D model's input; "
                        "give a number of 1 or more with --spatial_dims 2, or 0")
    if args.patch_size and len(args.patch_size) != (2 if args.spatial_dims == 2 else 3):
        raise UserError(f"--patch_size {' '.join(map(str, args.patch_size))}: give "
                        + ("H W (two sizes) for --spatial_dims 2" if args.spatial_dims == 2 else "D H W (three sizes)"))
    if args.patch_size and any(p <= 0 or p % 16 for p in args.patch_size):
        raise UserError(f"--patch_size {' '.join(map(str, args.patch_size))}: "
                        "each size must be a positive multiple of 16")
    if args.freeze_encoder_epochs < 0:
        raise UserError(f"--freeze_encoder_epochs {args.freeze_encoder_epochs}: must be 0 or more")
    if args.freeze_encoder_epochs and not args.init_from and not args.resume:
        raise UserError(f"--freeze_encoder_epochs {args.freeze_encoder_epochs}: keeps a transferred encoder fixed; "
                        "give the checkpoint to start from with --init_from")
    for flag, path in (("--init_from", args.init_from), ("--locator_init_from", args.locator_init_from)):
        if path:
            inference.load_checkpoint(path, None, flag)  # a bad file fails before any data is read
    if args.locator_init_from and args.strategy != "two_stage":
        raise UserError(f"--locator_init_from {args.locator_init_from}: --strategy {args.strategy} trains no "
                        "locator" + ("; use --init_from" if args.strategy == "patches" else ""))
    ds.downscale_factors(args.scale_factor)
    augmenter_from_args(args)


def check_iterative_args(args) -> None:
    """The iterative strategy's losses, and the flags that belong to the other strategies."""
    iterative = args.strategy == "iterative"
    if args.loss_criterion is not None and iterative != (args.loss_criterion in ITERATIVE_LOSSES):
        raise UserError(f"--loss_criterion {args.loss_criterion}: "
                        + (f"the iterative strategy trains with {' or '.join(ITERATIVE_LOSSES)}" if iterative else
                           f"a loss of the iterative strategy; give --strategy iterative, or one of "
                           f"{', '.join(LOSS_NAMES)}"))
    if not iterative:
        return
    if args.regions:
        raise UserError("--regions: the iterative strategy segments instances of one class, not regions; drop it")
    if args.init_from or args.freeze_encoder_epochs:
        raise UserError(f"--{'init_from' if args.init_from else 'freeze_encoder_epochs'}: transfer learning takes "
                        "V-Net checkpoints; the iterative FCN trains from random weights (drop it)")
    if args.attention_module or args.num_layers != 1 or args.dilation != 1:
        raise UserError("--attention_module/--num_layers/--dilation: shape the V-Net; the iterative FCN has "
                        "--base_channels alone; drop them")
    if args.augmentation_grid:
        raise UserError(f"--augmentation_grid {args.augmentation_grid}: draws the V-Net strategies' samples; "
                        "the iterative strategy has none to draw; drop it")


def stage_settings(args, stage: str) -> training.StageSettings:
    """The settings of one stage from the flags: the `--locator_*` ones for the locator."""
    shared = dict(focal_alpha=args.focal_alpha, focal_gamma=args.focal_gamma, squared_dice=args.squared_dice,
                  boundary_schedule=args.boundary_schedule, boundary_step=args.boundary_step,
                  boundary_floor=args.boundary_floor, boundary_start_dice=args.boundary_start_dice,
                  warmup_epochs=args.warmup_epochs, save_after_epochs=args.save_after_epochs,
                  num_workers=args.num_workers, compile=args.compile, seed=args.seed)
    if stage == "locator":
        factors = ds.downscale_factors(args.scale_factor)
        return training.LocatorSettings(
            batch_size=args.locator_batch_size, learning_rate=args.locator_learning_rate,
            patience=args.locator_patience, reduce=args.locator_reduce,
            max_epochs=args.locator_max_epochs or args.max_epochs, samples_per_epoch=args.locator_samples_per_epoch,
            loss_criterion=args.locator_loss_criterion, augment=augmenter_from_args(args, voxel_scale=max(factors[1:])),
            scale_factor=tuple(args.scale_factor), init_from=args.locator_init_from, **shared)
    shared.update(init_from=args.init_from, freeze_encoder_epochs=args.freeze_encoder_epochs)
    if args.strategy == "iterative":
        return training.IterativeSettings(
            batch_size=args.batch_size, learning_rate=args.learning_rate, patience=args.patience, reduce=args.reduce,
            max_epochs=args.max_epochs, samples_per_epoch=args.samples_per_epoch,
            loss_criterion=args.loss_criterion, augment=augmenter_from_args(args), patch_size=patch_of(args),
            **shared)
    if args.strategy == "patches":
        return training.PatchSettings(
            batch_size=args.batch_size, learning_rate=args.learning_rate, patience=args.patience, reduce=args.reduce,
            max_epochs=args.max_epochs, samples_per_epoch=args.samples_per_epoch,
            loss_criterion=args.loss_criterion, augment=augmenter_from_args(args),
            patch_size=patch_of(args), max_background=args.max_background, foreground_fraction=args.foreground_fraction,
            context_slices=args.context_slices,
            max_tries=args.max_tries, overlap=args.overlap, cache_cases=args.cache_cases,
            augmentation_grid=args.augmentation_grid, **shared)
    return training.SegmenterSettings(
        batch_size=args.batch_size, learning_rate=args.learning_rate, patience=args.patience, reduce=args.reduce,
        max_epochs=args.max_epochs, samples_per_epoch=args.samples_per_epoch, loss_criterion=args.loss_criterion,
        augment=augmenter_from_args(args), patch_size=tuple(args.patch_size) if args.patch_size else None,
        padding=tuple(args.padding), init_from_locator=args.init_from_locator, cache_cases=args.cache_cases,
        augmentation_grid=args.augmentation_grid, **shared)


def stage_model(args, stage: str, in_channels: int = 1, out_channels: int = 1) -> VNet:
    """The locator is the reference's plain V-Net (one output: the foreground of all classes);
    the model flags shape the segmenter."""
    if stage == "locator":
        return VNet(in_channels, 1, base_channels=args.base_channels)
    if args.strategy == "iterative":  # the scan's channels and the instance memory
        return IterativeFCN(in_channels + 1, args.base_channels)
    return VNet(in_channels, out_channels, num_layers=args.num_layers, dilation=args.dilation,
                base_channels=args.base_channels, attention_module=args.attention_module, reduction=args.reduction,
                attention_dilation=args.attention_dilation, spatial_dims=args.spatial_dims,
                context_slices=args.context_slices)


def patch_of(args) -> tuple[int, int, int] | None:
    """--patch_size as a 3D size: D H W, or (1, H, W) for a 2D model (a patch is one slice)."""
    if not args.patch_size:
        return None
    return (1, *args.patch_size) if args.spatial_dims == 2 else tuple(args.patch_size)


def run_stages(args) -> list[str]:
    """The stages a run trains: both, the one --stage names, or the one network of the patch and
    iterative strategies."""
    if args.strategy != "two_stage":
        return ["segmenter"]
    return list(STAGES) if args.stage == "both" else [args.stage]


def resume_settings(argv, run_dir: Path):
    """The settings of the run in `run_dir`, with the flags given now on top (e.g. more epochs).
    A fold's folder RUN/fold_K resumes as `--resume RUN --fold K`, so that the fold's
    validation is predicted again after it trains."""
    fold = re.fullmatch(r"fold_(\d+)", run_dir.name)
    if fold and (run_dir.parent / "splits_final.json").is_file() and (run_dir.parent / "config.json").is_file():
        args = resume_settings(argv, run_dir.parent)
        args.fold = fold.group(1)
        return args
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise UserError(f"--resume {run_dir}: no config.json there; pass a run folder written by train.py")
    config = json.loads(config_path.read_text())
    saved = config.get("segmenter") or config.get("locator") or config.get("crossval") or {}
    saved = {k: v for k, v in saved.items() if k not in ("resume", "overwrite", "dry_run")}
    args = parse_args(argv, defaults=saved)
    args.output_dir = str(run_dir)
    return args


def resume_point(args, run_dir: Path, stages: list[str], finished_ok: bool = False) -> tuple[list[str], dict | None]:
    """The stages still to train and the latest.pt of the first one, if it has one. A stage
    after a resumed one is trained anew: it depends on the earlier stage's final weights.
    Every stage finished: no stage (`finished_ok`, a fold whose validation is still to run),
    else an error."""
    for i, stage in enumerate(stages):
        latest = run_dir / stage / "latest.pt"
        if not latest.exists():
            return stages[i:], None
        ckpt = inference.load_checkpoint(latest, stage, "--resume")
        max_epochs = (args.locator_max_epochs or args.max_epochs) if stage == "locator" else args.max_epochs
        if ckpt["epoch"] < max_epochs:
            return stages[i:], ckpt
    if finished_ok:
        return [], None
    raise UserError(f"--resume {run_dir}: every stage has run its epochs already; raise --max_epochs "
                    "(or --locator_max_epochs) to train longer")


def plan_stages(args, run_dir: Path, stages: list[str], finished_ok: bool = False):
    """`(stages to train, checkpoint to resume from, locator path)` for the run in `run_dir`,
    refusing a stage already trained there unless --overwrite or --resume (reads no data)."""
    stages, resume = resume_point(args, run_dir, stages, finished_ok) if args.resume else (stages, None)
    for stage in stages:
        if (run_dir / stage / "best.pt").exists() and not (args.overwrite or args.resume):
            raise UserError(f"--output_dir {run_dir}: the {stage} is already trained there "
                            f"({run_dir / stage / 'best.pt'}); choose another --output_dir, pass --resume "
                            f"{args.output_dir} to finish it, or --overwrite")
    locator_path = Path(args.locator_path) if args.locator_path else run_dir / "locator" / "best.pt"
    if stages and "locator" not in stages and args.strategy == "two_stage":
        inference.load_checkpoint(locator_path, "locator", "--locator_path")  # fail before reading any data
    return stages, resume, locator_path


def write_run_files(args, run_dir: Path, split: dict, stages: list[str]) -> None:
    """split.json and the resolved flags of each stage trained now in config.json (rank 0)."""
    if not training.is_main():
        return
    write_json(run_dir / "split.json", split)
    config_path = run_dir / "config.json"
    config = json.loads(config_path.read_text()) if config_path.exists() else {}
    for stage in stages:
        config[stage] = {k: v for k, v in vars(args).items() if k != "resume"}
    write_json(config_path, config)


def train_locator(args, cases, split, survey: training.Survey, run_dir: Path, device, resume, write_files):
    """The locator stage: its data (validated as they are decoded), the run files
    (`write_files()`, once the data passed), training."""
    factors = ds.downscale_factors(args.scale_factor)
    data = training.load_locator_cases(cases, survey, factors, survey.padded_shape(factors))
    model = stage_model(args, "locator", len(survey.channels))
    check_transfer(args.locator_init_from, "--locator_init_from", model, lbl.binary(), resume)
    write_files()
    return training.train_locator(model, data, split, stage_settings(args, "locator"), run_dir, survey, device, resume)


def check_transfer(path, flag: str, model, labels, resume) -> None:
    """A checkpoint to start from that shares no tensor with the stage's model is refused
    before the run writes any file (a resumed stage starts from its own checkpoint)."""
    if path and resume is None:
        training.start_from_checkpoint(model, path, labels, flag, apply=False)


def train_segmenter(args, cases, split, survey: training.Survey, run_dir: Path, device, resume,
                    locator_path: Path, locations: dict | None, write_files) -> Path:
    """The segmenter stage on a trained locator: where the locator stage put each case, or where
    this locator puts it now; the crops' size; the data; the run files when no locator stage
    wrote them; training."""
    locator_ckpt = inference.load_checkpoint(locator_path, "locator", "--locator_path")
    if not ds.same_spacing(locator_ckpt["config"]["spacing"], survey.spacing):
        raise UserError(f"--locator_path {locator_path}: trained at spacing {locator_ckpt['config']['spacing']}, "
                        f"these data at {list(survey.spacing)}; train the locator on the same data")
    if inference.input_record(locator_ckpt["config"])[0] != survey.channels:
        raise UserError(f"--locator_path {locator_path}: trained on the channels "
                        f"{', '.join(inference.input_record(locator_ckpt['config'])[0])}, these data have "
                        f"{', '.join(survey.channels)}; train the locator on the same data")
    factors = ds.downscale_factors(locator_ckpt["config"]["scale_factor"])
    patch = tuple(args.patch_size) if args.patch_size else survey.patch_size(split["train"], args.padding, factors)
    print(f"segmenter patch size {patch} (volumes padded to {survey.padded_shape(factors)})")
    if locations is None:
        locator = inference.load_model(locator_ckpt, locator_path, device)

        def locate(case_id, image, pad_value):
            low, pad_before = ds.locator_input(image, pad_value, factors)
            return inference.locate(locator, low, pad_before, image.shape[-3:], factors, device)
    else:
        def locate(case_id, image, pad_value):
            return locations[case_id]
    settings = stage_settings(args, "segmenter")
    settings.activation = survey.labels.activation
    data = training.load_segmenter_cases(cases, survey, patch, settings, locate)
    model = stage_model(args, "segmenter", len(survey.channels), survey.labels.out_channels)
    if locations is None:
        write_files()
    return training.train_segmenter(model, cases, data, split, settings, run_dir, survey, patch, locator_ckpt,
                                    locator_path, device, resume)


def train_patches(args, cases, split: dict, run_dir: Path, device, resume, write_files) -> Path:
    """The patch strategy: the data's channels and classes (dataset.json, --regions), the data
    (validated as they are decoded), the run files once the data passed, training."""
    survey = read_survey(args, cases, split, need_foreground=False)
    settings = stage_settings(args, "segmenter")
    settings.activation = survey.labels.activation
    patch = tuple(settings.patch_size or survey.default_patch(spatial_dims=args.spatial_dims))
    by_id = {c.case_id: c for c in cases}
    ids = split["train"] + split["val"]
    data = dict(zip(ids, training.load_volume_cases([by_id[i] for i in ids], survey, settings, patch)))
    model = stage_model(args, "segmenter", len(survey.channels), survey.labels.out_channels)
    check_transfer(args.init_from, "--init_from", model, survey.labels, resume)
    write_files(["segmenter"])
    return training.train_patches(model, cases, data, split, survey, settings, patch, run_dir, device, resume)


def train_iterative(args, cases, split: dict, run_dir: Path, device, resume, write_files) -> Path:
    """The iterative strategy: the instance maps checked (1..N, one piece each), the cases
    decoded at the training spacing, the run files once the data passed, training."""
    survey = read_survey(args, cases, split)
    settings = stage_settings(args, "segmenter")
    patch = tuple(settings.patch_size or survey.default_patch())
    small = [i for i, shape in survey.shapes.items() if any(n < p for n, p in zip(shape, patch))]
    if small:
        print(f"note: {len(small)} case(s) ({', '.join(small[:3])}{' ...' if len(small) > 3 else ''}) are smaller "
              f"than the patch {patch} at spacing {survey.spacing} mm on some axis: padded (with the scan's "
              "background value) where a patch runs past them")
    settings.patch_size = patch
    by_id = {c.case_id: c for c in cases}
    ids = split["train"] + split["val"]
    data = dict(zip(ids, training.load_instance_cases([by_id[i] for i in ids], survey, args.cache_cases)))
    model = stage_model(args, "segmenter", len(survey.channels))
    write_files(["segmenter"])
    return training.train_iterative(model, cases, data, split, survey, settings, run_dir, device, resume)


def read_survey(args, cases, split: dict, need_foreground: bool = True) -> training.Survey:
    """The data set's survey (`training.read_survey`) with dataset.json's declarations and the
    flags' regions, spacing and normalisation, printed in a few lines."""
    iterative = args.strategy == "iterative"
    survey = training.read_survey(cases, split["train"], ds.read_dataset_json(args.data_dir),
                                  lbl.parse_regions(args.regions or []), args.normalization,
                                  need_foreground and not iterative, args.spatial_dims, args.spacing, iterative)
    shown = tuple("each scan's" if s is None else s for s in survey.spacing)
    print(f"{len(cases)} cases ({len(split['train'])} train, {len(split['val'])} validation), spacing {shown} mm")
    reference = args.strategy == "two_stage" and survey.labels.binary  # the left atrium's recipe
    if args.loss_criterion is None:
        args.loss_criterion = "WeightedBCEDice" if iterative else "Dice" if reference else "DiceCE"
    if args.learning_rate is None:
        args.learning_rate = {"two_stage": 3e-4, "patches": 1e-3, "iterative": 3e-3}[args.strategy]
    if args.p_scale is None:  # scans of several sequences vary in contrast per channel (docs/multiclass.md)
        args.p_scale = 0.0 if reference else 0.5
    if args.max_offset is None:
        args.max_offset = 0.0 if reference else 0.1
    if iterative:
        counts = [len(v) for v in survey.instances.values()]
        print(f"{sum(counts)} instances ({survey.labels.names[0]}) in {len(counts)} cases, {min(counts)} to "
              f"{max(counts)} a case; channel(s) {', '.join(survey.channels)} ({'/'.join(survey.normalization)})")
    elif len(survey.channels) > 1 or not survey.labels.binary:
        print(f"{len(survey.channels)} channel(s) ({', '.join(survey.channels)}), z-scored "
              f"{'/'.join(survey.normalization)}; classes {dict(zip(survey.labels.values, survey.labels.names))}"
              + (f"; regions {dict(survey.labels.regions)}" if survey.labels.regions else ""))
    return survey


def train_stages(args, run_dir: Path, cases, split: dict, device, plan, write_files) -> None:
    """Train the planned stages (`plan_stages`) of one run, a single split or one fold."""
    stages, resume, locator_path = plan
    if args.strategy == "patches":
        train_patches(args, cases, split, run_dir, device, resume, write_files)
        return
    if args.strategy == "iterative":
        train_iterative(args, cases, split, run_dir, device, resume, write_files)
        return
    survey = read_survey(args, cases, split)
    if args.init_from and "segmenter" in stages:  # before the locator stage trains and writes its files
        check_transfer(args.init_from, "--init_from", stage_model(args, "segmenter", len(survey.channels),
                                                                  survey.labels.out_channels), survey.labels,
                       resume if stages == ["segmenter"] else None)
    locations = None
    if "locator" in stages:
        locator_path, locations = train_locator(args, cases, split, survey, run_dir, device, resume,
                                                lambda: write_files(stages))
        resume = None
    if "segmenter" in stages:
        train_segmenter(args, cases, split, survey, run_dir, device, resume, locator_path, locations,
                        lambda: write_files(["segmenter"]))


# ----------------------------------------------------------------------------- cross-validation

def is_crossval(args) -> bool:
    """Folds were asked for: --num_folds, --fold, or a --split file holding a list of folds."""
    if args.num_folds is not None or args.fold is not None:
        return True
    if args.split and Path(args.split).is_file():
        try:
            return isinstance(json.loads(Path(args.split).read_text()), list)
        except (OSError, ValueError, UnicodeDecodeError):
            return False  # splits.read_splits names the problem
    return False


def case_groups(args, cases: list[ds.Case]) -> dict[str, str]:
    """The patient of each case: --group_by's, else the layout's (ACDC's patient folders), else
    each case its own."""
    if args.group_by:
        return splits.patient_groups([c.case_id for c in cases], args.group_by)
    return {c.case_id: c.group or c.case_id for c in cases}


def crossval_folds(args, run_dir: Path, cases: list[ds.Case]) -> tuple[list[dict], list[int]]:
    """The run's folds (from --split, the run's splits_final.json, or made now) and the ones
    to train (--fold), checked against the data, the patients and each other."""
    ids = [c.case_id for c in cases]
    groups = case_groups(args, cases)
    own = run_dir / "splits_final.json"
    if args.split:
        (folds, kfold), where = splits.read_splits(args.split, ids), f"--split {args.split}"
        if not kfold:
            raise UserError(f"--split {args.split}: a single train/validation split; for cross-validation give "
                            "nnU-Net's splits_final.json (a list of folds) or drop --split and set --num_folds")
        if own.exists() and splits.read_splits(own, ids, flag="--output_dir")[0] != folds:
            raise UserError(f"--split {args.split}: differs from the folds this run trains ({own}); "
                            "choose another --output_dir for other folds")
    elif own.exists():
        folds, where = splits.read_splits(own, ids, flag="--output_dir")[0], f"--output_dir {run_dir}"
    else:
        if args.num_folds is None:
            raise UserError(f"--fold {args.fold}: give --num_folds N to make the folds (or a --split file with folds)")
        folds, where = splits.kfold_splits(ids, args.num_folds, args.seed, groups), "--num_folds"
    if args.num_folds is not None and args.num_folds != len(folds):
        raise UserError(f"--num_folds {args.num_folds}: {where} holds {len(folds)} folds; drop --num_folds, "
                        "or choose another --output_dir for a new set of folds")
    splits.check_groups(folds, groups, where)
    if args.fold in (None, "all"):
        return folds, list(range(len(folds)))
    if not (args.fold.isdigit() and int(args.fold) < len(folds)):
        raise UserError(f"--fold {args.fold}: give a fold from 0 to {len(folds) - 1}, or 'all'")
    return folds, [int(args.fold)]


def fold_args(args, run_dir: Path, k: int):
    """The flags of fold K as a run of its own in RUN/fold_K, as its config.json records them."""
    return argparse.Namespace(**{**vars(args), "output_dir": str(run_dir / f"fold_{k}"), "num_folds": None,
                                 "fold": None, "split": None, "group_by": None})


def crossval(args, run_dir: Path, cases, folds: list[dict], chosen: list[int], device) -> None:
    """Train each chosen fold into RUN/fold_K, then predict its validation cases with its best
    checkpoints into RUN/fold_K/validation. A finished fold is skipped, unless --overwrite
    retrains it or --resume finds epochs left to train (more --max_epochs)."""
    todo = []
    for k in chosen:  # every fold is checked before any trains
        fold_dir, fargs = run_dir / f"fold_{k}", fold_args(args, run_dir, k)
        finished = training.fold_finished(fold_dir) and not args.overwrite
        # An unfinished fold is planned now to refuse one trained part-way without --resume.
        left = plan_stages(fargs, fold_dir, run_stages(args), True)[0] if args.resume or not finished else []
        if finished and not left:
            print(f"fold {k}: finished ({fold_dir / 'validation' / 'metrics.csv'}); skipped "
                  "(--overwrite retrains it, --resume with more --max_epochs trains it on)")
        else:
            todo.append(k)

    def write_files(fargs, fold_dir, split, stages):
        if training.is_main():
            write_json(run_dir / "splits_final.json", folds)
            write_json(run_dir / "config.json", {"crossval": {k: v for k, v in vars(args).items() if k != "resume"}})
        write_run_files(fargs, fold_dir, split, stages)

    for k in todo:
        fold_dir, fargs, split = run_dir / f"fold_{k}", fold_args(args, run_dir, k), folds[k]
        print(f"fold {k} of {len(folds)}: {fold_dir}")
        training.seed_everything(args.seed)  # a fold trains the same alone or after others
        plan = plan_stages(fargs, fold_dir, run_stages(args), True)
        if plan[0]:  # else trained to the end already: only its validation is missing
            files = functools.partial(write_files, fargs, fold_dir, split)
            train_stages(fargs, fold_dir, cases, split, device, plan, files)
        if training.is_main():
            rows = training.predict_validation(fold_dir, [c for c in cases if c.case_id in set(split["val"])], device)
            print(f"fold {k}: validation Dice {sum(r['dice'] for r in rows) / len(rows):.3f} over "
                  f"{len({r['case_id'] for r in rows})} case(s) ({fold_dir / 'validation'})")
        training.barrier()
    print(f"folds {', '.join(map(str, chosen))} of {run_dir}; report with: python evaluate.py --crossval {run_dir}")


def main(argv=None):
    args = parse_args(argv)
    if args.resume:
        args = resume_settings(argv, Path(args.resume))
    check_args(args)
    stages = run_stages(args)
    if args.dry_run:
        for stage in stages:
            model = stage_model(args, stage)
            print(f"{stage} {describe(model_arch(model))}: parameters: {count_parameters(model):,}")
        return
    folds = is_crossval(args)
    if folds and (args.stage != "both" or args.locator_path):
        raise UserError(f"{'--stage ' + args.stage if args.stage != 'both' else '--locator_path'}: "
                        "cross-validation trains both stages of every fold; drop it")
    training.seed_everything(args.seed)
    device = training.prepare_device(args.device, args.deterministic)
    if args.num_workers is None:
        args.num_workers = 4 if device.type == "cuda" else 0
    run_dir = Path(args.output_dir)
    plan = None if folds else plan_stages(args, run_dir, stages)

    if args.data_dir == DEMO_DATA and not Path(args.data_dir).exists() and training.is_main():
        print(f"no data at {DEMO_DATA}: generating the synthetic phantom set there")
        synthetic.write_phantom_dataset(DEMO_DATA, num_cases=40, shapes=((48, 128, 128), (48, 112, 112)))
    training.barrier()
    cases = ds.find_cases(args.data_dir, require_labels=True)
    ids = [c.case_id for c in cases]
    if folds:
        crossval(args, run_dir, cases, *crossval_folds(args, run_dir, cases), device)
        return
    split_path = Path(args.split) if args.split else run_dir / "split.json"
    groups = case_groups(args, cases)
    if args.split or split_path.exists():
        split = splits.read_splits(split_path, ids)[0][0]
        splits.check_groups([split], groups, f"--split {split_path}")
    else:
        split = splits.make_split(ids, args.val_fraction, args.seed, groups)
    train_stages(args, run_dir, cases, split, device, plan,
                 lambda stages_now: write_run_files(args, run_dir, split, stages_now))


if __name__ == "__main__":
    run_cli(main)
