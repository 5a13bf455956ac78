"""Training of the two stages, under train.py's command line.

Read top to bottom: the settings of a stage; the survey of a data set (shapes, spacing, atrium
boxes, read from headers and labels); the locator's data (every case decoded once into its
downscaled volumes) and its stage; the segmenter's data (every case decoded once, located once,
and cut down to the region its crops can come from) and its stage; the torch datasets that draw
an epoch's samples; the epoch loop both stages share (`fit`: optimiser, plateau scheduler,
warm-up, mixed precision, validation, CSV log and curves, checkpoints, exact resume); and the few
helpers that make it run under `torchrun` (DistributedDataParallel: every process trains on its
share of each epoch's samples and validation cases, gradients and scores are averaged across
them, and only rank 0 writes files).
"""
from __future__ import annotations

import csv
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import dataset as ds
import inference
import instances
import labels as lbl
import plots
import prediction
from augment import Augmenter
from labels import Labels
from losses import (
    BOUNDARY_FLOOR,
    FOCAL_ALPHA,
    FOCAL_GAMMA,
    BoundarySchedule,
    IterativeLoss,
    SegmentationLoss,
    signed_distance_maps,
)
from metrics import dice, match_instances
from models import VNet, count_parameters, describe, model_arch
from utils import UserError, atomic_write, write_json

# The reference trains on 480 samples per epoch from 80 cases: each original and five augmented copies.
SAMPLES_PER_CASE = 6
# The segmenter keeps its cases' crop regions in memory while they take at most this many bytes
# (a float32 image and a uint8 label of at least one patch: 15 MB per LASC case at 96x144x224);
# past it, each sample is read from disk. `--cache_cases True/False` overrides it either way.
CASE_CACHE_LIMIT = 2 * 2**30
# A 2D model's default patch is the whole (median) slice up to this many voxels a side: a
# short-axis cine slice of 1.5 mm voxels covers the chest at 256.
SLICE_LIMIT = 256
LOG_COLUMNS = ["epoch", "train_loss", "val_dice", "learning_rate", "boundary_weight", "seconds"]


# ----------------------------------------------------------------------------- settings

@dataclass
class StageSettings:
    """What one stage's training loop needs; train.py fills one per stage from its flags."""
    batch_size: int
    learning_rate: float
    patience: int                    # ReduceLROnPlateau patience, epochs
    reduce: float                    # ReduceLROnPlateau factor
    max_epochs: int
    samples_per_epoch: int | None    # None: SAMPLES_PER_CASE per training case
    loss_criterion: str              # losses.LOSS_NAMES
    augment: Augmenter
    focal_alpha: float = FOCAL_ALPHA
    focal_gamma: float = FOCAL_GAMMA
    squared_dice: bool = False
    boundary_schedule: str = "epoch"  # the Hybrid loss's schedule (losses.BoundarySchedule)
    boundary_step: float = 0.01
    boundary_floor: float = BOUNDARY_FLOOR
    boundary_start_dice: float = 0.8
    warmup_epochs: float = 1.0
    save_after_epochs: int = 50
    num_workers: int = 0
    compile: bool = False
    seed: int = 0
    activation: str = "sigmoid"      # of the model's outputs: losses.SegmentationLoss
    init_from: str | None = None     # a checkpoint to start from (`start_from_checkpoint`)
    freeze_encoder_epochs: int = 0   # the encoder stays fixed for the first epochs

    def criterion(self) -> SegmentationLoss:
        return SegmentationLoss(self.loss_criterion, self.focal_alpha, self.focal_gamma, self.squared_dice,
                                activation=self.activation)

    def schedule(self) -> BoundarySchedule | None:
        """The Hybrid loss's Dice weight schedule; no other loss has a weight to schedule."""
        if self.loss_criterion != "Hybrid":
            return None
        return BoundarySchedule(self.boundary_schedule, self.boundary_step, self.boundary_floor,
                                self.boundary_start_dice)

    def samples(self, num_train: int) -> int:
        return self.samples_per_epoch or SAMPLES_PER_CASE * num_train


@dataclass
class LocatorSettings(StageSettings):
    scale_factor: tuple = (0.5, 0.25, 0.25)  # downscaling of the locator's input, each 1/k


@dataclass
class SegmenterSettings(StageSettings):
    patch_size: tuple | None = None       # None: derived from the atria and `padding`
    padding: tuple = (30, 30, 30)         # total margin around the largest atrium, voxels
    init_from_locator: bool = True        # start from the locator's weights where they fit
    cache_cases: bool | None = None       # None: while under CASE_CACHE_LIMIT
    augmentation_grid: str | None = None  # PNG of augmented crops to write first


@dataclass
class PatchSettings(StageSettings):
    patch_size: tuple | None = None       # None: the data's median shape (`Survey.patch_size`)
    max_background: float = 0.95          # a patch with more background is redrawn (ds.PatchSampler)
    foreground_fraction: float = 1.0      # of the patches drawn so; the others anywhere
    context_slices: int = 0               # a 2D model's neighbouring slices on each side (VNet)
    max_tries: int = 1000
    overlap: float = 0.5                  # of the sliding window that validates (and predicts)
    cache_cases: bool | None = None       # None: while under CASE_CACHE_LIMIT
    augmentation_grid: str | None = None


@dataclass
class IterativeSettings(StageSettings):
    patch_size: tuple | None = None       # None: the data's median shape, at most 128 a side
    max_moves: int = 20                   # of the validation search (inference.iterative_instances)
    max_instances: int = 100

    def criterion(self) -> IterativeLoss:
        return IterativeLoss(self.loss_criterion)


# ----------------------------------------------------------------------------- the data set

@dataclass(frozen=True)
class Survey:
    """What the stages need to know of a data set before decoding any image: the training
    spacing (the median, mm) and, at that spacing, each case's shape and foreground box (all
    classes together: the atrium, the whole tumour); the channels' names and z-score rules; the
    classes (declared in dataset.json, or found in the labels)."""
    spacing: tuple                  # (sz, sy, sx) mm; sz None for a 2D model (ds.working_spacing)
    shapes: dict[str, tuple[int, int, int]]
    boxes: dict[str, tuple[slice, ...] | None]
    channels: tuple[str, ...] = ("channel 0",)
    normalization: tuple[str, ...] = ("whole",)
    labels: Labels = field(default_factory=lbl.binary)
    instances: dict[str, list[float]] = field(default_factory=dict)  # the iterative strategy: volumes (ml) per case

    def padded_shape(self, factors) -> tuple[int, int, int]:
        """The largest shape, rounded up so that the locator's downscaled input divides by 16."""
        return ds.round_up(np.max(list(self.shapes.values()), axis=0), ds.pad_multiple(factors))

    def patch_size(self, ids, padding, factors) -> tuple[int, int, int]:
        """The two-stage segmenter's crop: the largest foreground box of `ids` plus `padding`."""
        extents = [[s.stop - s.start for s in self.boxes[i]] for i in ids]
        return ds.patch_size_for(extents, padding, self.padded_shape(factors))

    def default_patch(self, limit: int = 128, spatial_dims: int = 3) -> tuple[int, int, int]:
        """The patch strategy's default: the median shape rounded up to a multiple of 16, at most
        `limit`; for a 2D model (1, H, W), the median slice, at most SLICE_LIMIT."""
        median = np.median(list(self.shapes.values()), axis=0)
        if spatial_dims == 2:
            return (1, *(int(min(math.ceil(m / 16) * 16, SLICE_LIMIT)) for m in median[1:]))
        return tuple(int(min(math.ceil(m / 16) * 16, limit)) for m in median)

    def input_record(self) -> dict:
        """What a checkpoint records of its input and classes (`inference.input_record` reads it)."""
        return {"channels": list(self.channels), "normalization": list(self.normalization),
                "labels": self.labels.record()}


def read_survey(cases: list[ds.Case], train_ids, info: ds.DatasetInfo | None = None, regions=(),
                normalization: str = "auto", need_foreground: bool = True, spatial_dims: int = 3,
                spacing=None, instances: bool = False) -> Survey:
    """Image headers (shape, spacing, channels: every case alike, and as dataset.json declares)
    and labels (on their image's grid, holding declared values only; without a declaration the
    values found make the classes), then each label's foreground box; `regions` ((name,
    values) pairs) from --regions. With `need_foreground`, a training case without foreground
    is refused (the two-stage strategy's crops are placed on it). For a 2D model
    (`spatial_dims` 2) the spacing's slice axis is None: each scan keeps its own. `spacing`
    (mm, array order) replaces the median. `instances`: the labels are instance maps
    (`ds.check_instances`) of the one class dataset.json declares, if any."""
    info = info or ds.DatasetInfo()
    headers = [ds.read_case_info(c) for c in tqdm(cases, desc="reading headers", unit="case",
                                                   disable=not sys.stderr.isatty())]
    counts = [n for _, _, n in headers]
    count = len(info.channels) if info.channels else max(set(counts), key=counts.count)  # the odd case is named
    for case, n in zip(cases, counts):
        if n != count:
            declared = f"{info.path} declares {count}" if info.channels else f"most cases have {count}"
            raise UserError(f"{case.image}: has {n} channel(s), {declared}; every case needs the same channels")
    if spacing is None:
        spacing = np.median([props["spacing"] for _, props, _ in headers], axis=0)
    spacing = tuple(float(s) for s in spacing)
    if spatial_dims == 2:
        spacing = (None, *spacing[1:])
    if instances and info.labels is not None and (info.labels.num_classes != 1 or info.labels.regions):
        raise UserError(f"{info.path}: declares the classes {', '.join(info.labels.names)}; the iterative strategy "
                        "segments the instances of one class (declare one, e.g. \"1\": \"vertebra\")")
    shapes, boxes, found, volumes = {}, {}, set(), {}
    for case, (shape, props, _) in zip(cases, headers):
        label = ds.read_label(case.label, shape, props)
        if instances:
            ds.check_instances(label, case.label)
        elif info.labels is None:
            found.update(ds.label_values(label, case.label))
        else:
            ds.class_indices(label, case.label, info.labels)
        working = ds.working_spacing(props["spacing"], spacing)
        if not ds.same_spacing(props["spacing"], working):
            label, _ = ds.resample(label, props, working, label=True)
        shapes[case.case_id], boxes[case.case_id] = label.shape, ds.bounding_box(label)
        if instances:  # at the working spacing, where the search meets them
            voxel_ml = float(np.prod(working)) / 1000.0
            volumes[case.case_id] = (np.bincount(label.ravel().astype(np.int64))[1:] * voxel_ml).tolist()
        if need_foreground and boxes[case.case_id] is None and case.case_id in train_ids:
            raise UserError(f"{case.label}: label is empty; every training case needs an atrium "
                            "(or move it to 'val' in the split)")
    labels = info.labels or lbl.from_values(found)
    if regions:
        try:
            labels = labels.with_regions(regions)
        except ValueError as e:
            raise UserError(f"--regions: {e}") from None
    if instances:
        labels = info.labels or Labels((1,), ("instance",))
    names = info.channels or tuple(f"channel {k}" for k in range(count))
    return Survey(spacing, shapes, boxes, tuple(names), ds.normalization_rules(normalization, count, info.channels),
                  labels, volumes)


def training_item(image: np.ndarray, label: np.ndarray, labels: Labels, distance_spacing=None) -> tuple:
    """Tensors of one training sample: image (C, D, H, W) float32, the target (out_channels, D,
    H, W) float32 of the class indices `label` (`Labels.target`: the atrium's {0, 1} mask as
    (1, D, H, W)) and, when `distance_spacing` (mm, array order) is given, a signed distance map
    per foreground channel of the target for the boundary losses, computed here in the data
    pipeline (a data-loader worker) from the augmented label rather than in the training step."""
    target = labels.target(label)
    item = (torch.from_numpy(np.array(image, dtype=np.float32)), torch.from_numpy(target))
    if distance_spacing is not None:
        foreground = target[1:] if labels.activation == "softmax" else target
        item += (torch.from_numpy(signed_distance_maps(foreground, distance_spacing)),)
    return item


class EpochSampler:
    """The samples of one epoch: `samples_per_epoch` case indices, every case as often as
    possible, in an order drawn from (seed, epoch). Sample j of an epoch also gets its own
    augmentation generator from (seed, epoch, j), so a run is reproducible whatever the
    number of data-loader workers, and can be resumed at any epoch."""

    def __init__(self, num_cases: int, samples_per_epoch: int, seed: int):
        self.num_cases, self.samples, self.seed, self.epoch = num_cases, samples_per_epoch, seed, 0
        self.plan = []

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        rng = np.random.default_rng([self.seed, epoch])
        reps = -(-self.samples // self.num_cases)
        self.plan = np.concatenate([rng.permutation(self.num_cases) for _ in range(reps)])[: self.samples].tolist()

    def draw(self, j: int) -> tuple[int, np.random.Generator]:
        return self.plan[j], np.random.default_rng([self.seed, self.epoch, j, 1])


# ----------------------------------------------------------------------------- the locator

@dataclass
class LocatorCase:
    """One case as the locator sees it, at low resolution: `low` and `low_label` padded to the
    run's padded shape (its training input), `own_low` padded by the case's own shape as
    prediction pads a scan, with `pad_before` and the full-resolution `shape` to map back."""
    low: np.ndarray
    low_label: np.ndarray
    own_low: np.ndarray
    pad_before: tuple[int, int, int]
    shape: tuple[int, int, int]


def load_locator_cases(cases: list[ds.Case], survey: Survey, factors, padded_shape) -> dict[str, LocatorCase]:
    """Decode every case once (validating it) into its low-resolution volumes (C, d, h, w) and
    the low-resolution foreground of all classes together; they are small (48x160x160 per LASC
    case) and stay in memory for the whole stage."""
    out = {}
    for case in tqdm(cases, desc="locator data", unit="case", disable=not sys.stderr.isatty()):
        image, pads, label = ds.load_volume(case, survey.spacing, survey.labels, survey.normalization)
        low, _ = ds.locator_input(image, pads, factors, padded_shape)
        padded_label, _ = ds.pad_symmetric((label > 0).astype(np.float32), padded_shape)
        low_label = (ds.downscale(padded_label, factors) >= 0.5).astype(np.uint8)
        own_low, pad_before = ds.locator_input(image, pads, factors)
        out[case.case_id] = LocatorCase(low, low_label, own_low, pad_before, image.shape[1:])
    return out


def train_locator(model: VNet, data: dict[str, LocatorCase], split, settings: LocatorSettings, run_dir: Path,
                  survey: Survey, device, resume=None) -> tuple[Path, dict[str, ds.Location]]:
    """Train the locator; returns its best checkpoint and where it puts every case (also written
    to RUN/locator/centres.json), found as prediction finds them."""
    factors = ds.downscale_factors(settings.scale_factor)
    train_ids, val_ids = split["train"], split["val"]
    low_spacing = tuple(s * k for s, k in zip(survey.spacing, factors))
    train_set = VolumeSet([(data[i].low, data[i].low_label) for i in train_ids],
                          EpochSampler(len(train_ids), settings.samples(len(train_ids)), settings.seed),
                          settings.augment, low_spacing if settings.criterion().needs_distance_map else None)

    def validate(net, rank, size):
        return [dice(inference.probabilities(net, data[i].low, device)[0] >= 0.5, data[i].low_label)
                for i in val_ids[rank::size]]

    config = {"role": "locator", "arch": model_arch(model), "scale_factor": list(settings.scale_factor),
              "spacing": list(survey.spacing), "padded_shape": list(survey.padded_shape(factors)),
              "loss": settings.loss_criterion, **survey.input_record(), "labels": lbl.binary().record(),
              "init_from": transfer_record(model, settings, lbl.binary(), resume)}
    best = fit("locator", model, train_set, validate, settings, run_dir / "locator", config, device, resume)
    locator = inference.load_model(inference.load_checkpoint(best, "locator"), best, device)
    locations = {cid: inference.locate(locator, c.own_low, c.pad_before, c.shape, factors, device)
                 for cid, c in data.items()}
    if is_main():
        write_json(run_dir / "locator" / "centres.json", {cid: loc.record() for cid, loc in locations.items()})
    return best, locations


# ----------------------------------------------------------------------------- the segmenter

@dataclass
class Region:
    """The part of a case that its crops can cover (the union of their windows inside the
    volume), normalised image (C, d, h, w) and class indices (d, h, w), at `offset` in the
    case's volume of `shape`; what lies outside it and inside a window is outside the volume
    and reads `pad_value` (one per channel). `class_voxels` counts each class 0..K in the whole
    volume, for a validation Dice of the whole scan from the region alone."""
    image: np.ndarray
    label: np.ndarray
    offset: tuple[int, int, int]
    shape: tuple[int, int, int]
    pad_value: np.ndarray
    class_voxels: np.ndarray

    @property
    def nbytes(self) -> int:
        return self.image.nbytes + self.label.nbytes

    def start(self, centre, size) -> tuple[int, int, int]:
        """Start of the crop at `centre`, relative to the region."""
        start = ds.crop_start(centre, size, self.shape)
        assert all(max(a, 0) >= o and min(a + s, n) <= o + r for a, s, n, o, r in
                   zip(start, size, self.shape, self.offset, self.label.shape)), "crop outside its region"
        return tuple(a - o for a, o in zip(start, self.offset))

    def crop(self, centre, size) -> tuple[np.ndarray, np.ndarray]:
        start = self.start(centre, size)
        return ds.crop(self.image, start, size, self.pad_value), ds.crop(self.label, start, size, 0)

    def dice(self, pred_crop: np.ndarray, centre, labels: Labels | None = None) -> float:
        """Dice over the whole volume of a crop's class indices (a mask, for one class) pasted
        at `centre` (background elsewhere): the mean over the outputs' foreground (each class
        for softmax, each region for sigmoid; the atrium)."""
        pred = ds.paste(pred_crop, self.start(centre, pred_crop.shape), self.label.shape)
        scores = []
        for classes in output_classes(labels or lbl.binary()):
            p, t = np.isin(pred, classes), np.isin(self.label, classes)
            total = np.count_nonzero(p) + int(self.class_voxels[list(classes)].sum())
            scores.append(2 * np.count_nonzero(p & t) / total if total else 1.0)
        return float(np.mean(scores))


def output_classes(labels: Labels) -> list[tuple[int, ...]]:
    """The class indices each foreground output of a network holds: each class for softmax;
    the classes of each region (or the one class) for sigmoid."""
    if labels.activation == "softmax":
        return [(k,) for k in range(1, labels.num_classes + 1)]
    index_of = {v: k + 1 for k, v in enumerate(labels.values)}
    return [tuple(index_of[v] for v in values) for _, values in labels.outputs]


@dataclass
class SegmenterCase:
    """Where a case's crops go: `location` from the locator (the volume's centre when it found
    nothing), `gt_centre` the centre of the foreground's box; `region` when it is kept in memory."""
    location: ds.Location
    gt_centre: tuple | None
    region: Region | None = None

    def centres(self) -> list:
        return [self.location.centre] + ([self.gt_centre] if self.gt_centre is not None else [])


def cut_region(image: np.ndarray, pad_value, label: np.ndarray, centres, size, num_classes: int = 1) -> Region:
    """The Region of a case (image (C, D, H, W) or (D, H, W), class indices (D, H, W)) covering
    crops of `size` at each of `centres`."""
    image = image if image.ndim == 4 else image[None]
    starts = np.array([ds.crop_start(c, size, label.shape) for c in centres])
    lo = np.maximum(starts.min(axis=0), 0)
    hi = np.minimum(starts.max(axis=0) + np.asarray(size), label.shape)
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    counts = np.bincount(label.ravel(), minlength=num_classes + 1)
    return Region(image[(slice(None), *box)].copy(), label[box].copy(), tuple(int(a) for a in lo), label.shape,
                  np.broadcast_to(np.asarray(pad_value, np.float32), (len(image),)).copy(), counts)


def load_region(case: ds.Case, survey: Survey, seg_case: SegmenterCase, size) -> Region:
    """Decode a case and cut its region (for a case not kept in memory)."""
    image, pads, label = ds.load_volume(case, survey.spacing, survey.labels, survey.normalization)
    return cut_region(image, pads, label, seg_case.centres(), size, survey.labels.num_classes)


def load_segmenter_cases(cases, survey: Survey, patch, settings: SegmenterSettings, locate) -> dict[str, SegmenterCase]:
    """Decode every case once: find its crop's location (`locate(case_id, image, pad_value)`:
    the locator stage's record, or the locator run now) and the foreground's centre, and keep its
    region in memory while the regions stay under the cache limit (`settings.cache_cases`)."""
    cache = settings.cache_cases is not False
    limit = math.inf if settings.cache_cases else CASE_CACHE_LIMIT
    out, kept = {}, 0
    for case in tqdm(cases, desc="segmenter data", unit="case", disable=not sys.stderr.isatty()):
        image, pads, label = ds.load_volume(case, survey.spacing, survey.labels, survey.normalization)
        box = ds.bounding_box(label)
        seg_case = SegmenterCase(locate(case.case_id, image, pads), None if box is None else ds.box_centre(box))
        if seg_case.location.larger_than(patch):
            print(f"warning: case {case.case_id}: located atrium {seg_case.location.extent} is larger than "
                  f"the patch {patch}")
        if cache:
            seg_case.region = cut_region(image, pads, label, seg_case.centres(), patch, survey.labels.num_classes)
            kept += seg_case.region.nbytes
            if kept > limit:
                print(f"the training cases' crop regions exceed {limit / 2**30:.1f} GiB: each sample is read "
                      "from disk instead (--cache_cases True keeps them)")
                cache = False
                for c in out.values():
                    c.region = None
                seg_case.region = None
        out[case.case_id] = seg_case
    missed = [i for i, c in out.items() if not c.location.found]
    if missed:
        print(f"warning: the locator found no atrium in {len(missed)} case(s) ({', '.join(missed[:5])}); "
              "their training crops use the ground truth's centre", file=sys.stderr)
    return out


def train_segmenter(model: VNet, cases, data: dict[str, SegmenterCase], split, settings: SegmenterSettings,
                    run_dir: Path, survey: Survey, patch, locator_ckpt: dict, locator_path, device,
                    resume=None) -> Path:
    """Train the segmenter on crops at the locator's centres and the foreground's; validation
    Dice of whole scans from the crop at the locator's centre, as prediction places it."""
    by_id = {c.case_id: c for c in cases}
    train_ids, val_ids = split["train"], split["val"]
    labels = survey.labels
    train_set = SegmenterSet([by_id[i] for i in train_ids], [data[i] for i in train_ids], survey, patch,
                             EpochSampler(len(train_ids), settings.samples(len(train_ids)), settings.seed + 1),
                             settings.augment, survey.spacing if settings.criterion().needs_distance_map else None)
    write_augmentation_grid(settings.augmentation_grid, train_set, labels)

    def validate(net, rank, size):
        scores = []
        for i in val_ids[rank::size]:
            region = data[i].region or load_region(by_id[i], survey, data[i], patch)
            crop, _ = region.crop(data[i].location.centre, patch)
            probs = inference.probabilities(net, crop, device, activation=labels.activation)
            scores.append(region.dice(labels.to_indices(labels.label_map(probs)), data[i].location.centre, labels))
        return scores

    transfer = transfer_record(model, settings, labels, resume)
    if resume is not None:  # the weights come from the checkpoint; keep its record of how they started
        from_locator = bool(resume["config"].get("init_from_locator", False))
    else:
        from_locator = transfer is None and start_from_locator(model, locator_ckpt, settings.init_from_locator)
    config = {"role": "segmenter", "arch": model_arch(model), "patch_size": list(patch),
              "spacing": list(survey.spacing), "loss": settings.loss_criterion, "locator_path": str(locator_path),
              "init_from_locator": from_locator, "init_from": transfer, **survey.input_record()}
    return fit("segmenter", model, train_set, validate, settings, run_dir / "segmenter", config, device, resume)


def write_augmentation_grid(path, train_set, labels: Labels) -> None:
    """A PNG of the first augmented samples of epoch 0 (the first channel, the foreground's contour)."""
    if not path or not is_main():
        return
    train_set.sampler.set_epoch(0)
    samples = [train_set[j] for j in range(min(8, len(train_set)))]
    def centre(image, depth):  # a 2D model's context slices around its label's slice are left out
        skip = (len(image) - depth) // 2
        return image[skip:skip + depth]

    plots.augmentation_grid(path, [(centre(x[0], y.shape[1]), (y[1:] if labels.activation == "softmax" else y).amax(0))
                                   for x, y, *_ in samples])
    print(f"augmented training samples: {path}")


def start_from_checkpoint(model: VNet, path, labels: Labels, flag: str = "--init_from", apply: bool = True) -> dict:
    """Transfer learning: start `model` from the weights of another run's checkpoint `path`
    (another data set, other classes, 2D or 3D: `VNet.transfer_from`). The output layer starts
    anew when the checkpoint learned other classes than `labels`, even where its shape fits.
    Prints what was loaded and skipped, and returns it for the run's config; a checkpoint that
    shares no tensor with the model is an error. `apply=False`: that check alone (train.py makes
    it before writing any file), the model unchanged and nothing printed."""
    ckpt = inference.load_checkpoint(path, None, flag)
    record = ckpt["config"].get("labels")
    same_classes = (Labels.from_record(record) if record else lbl.binary()) == labels
    moved = model.transfer_from(ckpt["model"], () if same_classes else ("output.weight", "output.bias"), apply)
    taken = len(moved["loaded"]) + len(moved["converted"])
    if taken == 0:
        raise UserError(f"{flag} {path}: shares no tensor with this model ({describe(model_arch(model))}, "
                        f"the checkpoint's is {describe(ckpt['config']['arch'])}); start from a V-Net checkpoint "
                        "of the same widths (--base_channels)")
    if not apply:
        return {}
    converted = f" ({len(moved['converted'])} converted between 2D and 3D)" if moved["converted"] else ""
    print(f"starting from {path}: {taken} of {len(model.state_dict())} tensors loaded{converted}; "
          f"skipped {len(moved['skipped'])}{': ' if moved['skipped'] else ''}{', '.join(moved['skipped'][:8])}"
          f"{' ...' if len(moved['skipped']) > 8 else ''}" + ("" if same_classes else " (other classes: the "
                                                                 "output layer starts anew)"))
    return {"path": str(path), "loaded": len(moved["loaded"]), "converted": len(moved["converted"]),
            "skipped": moved["skipped"], "output_reinitialised": not same_classes}


def transfer_record(model: VNet, settings: StageSettings, labels: Labels, resume: dict | None) -> dict | None:
    """What `--init_from` loaded into a stage's model (None: it starts otherwise); a resumed
    stage keeps its first run's record, since its weights come from its own checkpoint."""
    if resume is not None:
        return resume["config"].get("init_from")
    return start_from_checkpoint(model, settings.init_from, labels) if settings.init_from else None


def start_from_locator(model: VNet, locator_ckpt: dict, wanted: bool) -> bool:
    """Copy the trained locator's weights into the segmenter where they fit (a V-Net of the
    same widths); returns whether it did."""
    widths = locator_ckpt["config"]["arch"].get("base_channels")
    if wanted and widths == model.arch["base_channels"]:
        copied = model.load_matching(locator_ckpt["model"])
        print(f"segmenter starts from the locator's weights ({copied} of {len(model.state_dict())} tensors)")
        return True
    if wanted:
        print(f"note: the locator has --base_channels {widths}, the segmenter {model.arch['base_channels']}: "
              "the segmenter starts from random weights")
    return False


# ----------------------------------------------------------------------------- the patch strategy

@dataclass
class VolumeCase:
    """One case as the patch strategy trains on it: the normalised image (C, D, H, W), the pad
    value of each channel (C,), the class indices (D, H, W), and its patch sampler."""
    image: np.ndarray
    pads: np.ndarray
    label: np.ndarray
    sampler: ds.PatchSampler

    @property
    def nbytes(self) -> int:
        return self.image.nbytes + self.label.nbytes + self.sampler.table.nbytes + self.sampler.foreground.nbytes


def load_volume_case(case: ds.Case, survey: Survey, settings: PatchSettings, patch) -> VolumeCase:
    image, pads, label = ds.load_volume(case, survey.spacing, survey.labels, survey.normalization)
    return VolumeCase(image, pads, label, ds.PatchSampler(label, patch, settings.max_background, settings.max_tries))


def load_volume_cases(cases: list[ds.Case], survey: Survey, settings: PatchSettings,
                      patch) -> list[VolumeCase | None]:
    """Decode every case once (validating it), kept in memory as `load_cached` keeps them."""
    return load_cached(cases, lambda case: load_volume_case(case, survey, settings, patch), lambda d: d.nbytes,
                       settings.cache_cases, "patch data")


def load_cached(cases: list[ds.Case], load, nbytes, cache_cases: bool | None, desc: str) -> list:
    """`load(case)` of every case (which validates it), kept in memory while the kept cases'
    `nbytes(data)` stay under the cache limit (`cache_cases` as --cache_cases: True always,
    False never); past it every entry is None, and each sample reads its case again, so
    memory stays flat in the number of cases."""
    cache = cache_cases is not False
    limit = math.inf if cache_cases else CASE_CACHE_LIMIT
    out, kept = [], 0
    for case in tqdm(cases, desc=desc, unit="case", disable=not sys.stderr.isatty()):
        data = load(case)
        kept += nbytes(data)
        if cache and kept > limit:
            print(f"the cases exceed {limit / 2**30:.1f} GiB: each sample is read from disk instead "
                  "(--cache_cases True keeps them)")
            cache = False
            out = [None] * len(out)
        out.append(data if cache else None)
    return out


class PatchSet(torch.utils.data.Dataset):
    """Random patches with a foreground bias (`ds.PatchSampler`), augmented; a case comes from
    memory, or from disk when it is not kept. Items as `training_item`."""

    def __init__(self, cases: list[ds.Case], data: list[VolumeCase | None], survey: Survey,
                 settings: PatchSettings, patch, sampler: EpochSampler, distance_spacing=None):
        self.cases, self.data, self.survey, self.settings, self.patch = cases, data, survey, settings, tuple(patch)
        self.sampler, self.distance_spacing = sampler, distance_spacing

    def __len__(self):
        return self.sampler.samples

    def __getitem__(self, j):
        i, rng = self.sampler.draw(j)
        case = self.data[i] or load_volume_case(self.cases[i], self.survey, self.settings, self.patch)
        fraction = self.settings.foreground_fraction
        # (No draw when every patch is biased, so such runs keep their random numbers.)
        start = case.sampler(rng) if fraction >= 1 or rng.random() < fraction else case.sampler.anywhere(rng)
        k = self.settings.context_slices  # a 2D model's neighbouring slices come along, and go after augmentation
        start, size = (start[0] - k, *start[1:]), (self.patch[0] + 2 * k, *self.patch[1:])
        image = ds.crop(case.image, start, size, case.pads)
        label = ds.crop(case.label, start, size, 0)
        image, label = self.settings.augment(image, label, rng)
        label = label[k:len(label) - k]
        return training_item(image, label, self.survey.labels, self.distance_spacing)


class IterativeSet(torch.utils.data.Dataset):
    """Samples of the iterative strategy (`instances.py`) from whole cases held in memory: image
    (C, D, H, W) normalised with its pad values, and its instance map. Sample j of an epoch is
    empty (no target) when j % instances.EMPTY_EVERY is the last of the cycle; the image and the
    label crop are augmented together, and the memory, target and border weights come from the
    augmented label, the completeness from the whole instance before augmentation. Items:
    (image and memory (C + 1, D, H, W), target (1, D, H, W), weights (1, D, H, W), complete ())."""

    def __init__(self, data: list[tuple[np.ndarray, np.ndarray, np.ndarray] | None], patch, sampler: EpochSampler,
                 augment, load=None):
        self.data, self.patch, self.sampler, self.augment = data, tuple(patch), sampler, augment
        self.load = load  # load(i): case i when data[i] is None (not kept in memory)

    def __len__(self):
        return self.sampler.samples

    def __getitem__(self, j):
        i, rng = self.sampler.draw(j)
        image, pads, label = self.data[i] or self.load(i)
        empty = j % instances.EMPTY_EVERY == instances.EMPTY_EVERY - 1
        start, target, memory = instances.draw(label, self.patch, rng, empty)
        complete = instances.completeness(label, start, self.patch, target)
        crop, crop_label = self.augment(ds.crop(image, start, self.patch, pads), ds.crop(label, start, self.patch, 0),
                                        rng)
        held, mask, weights = instances.patch_targets(crop_label, target, memory)
        x = np.concatenate([crop, held[None]]).astype(np.float32, copy=False)
        return (torch.from_numpy(x), torch.from_numpy(mask[None]), torch.from_numpy(weights[None]),
                torch.tensor(complete, dtype=torch.float32))


def mean_dice(probs: np.ndarray, label: np.ndarray, labels: Labels) -> float:
    """Mean Dice over the foreground outputs (`output_classes`) of the label map that the
    network's probabilities (out_channels, D, H, W) give, against class indices (D, H, W): what
    prediction writes, scored as the two-stage validation scores its crops (`Region.dice`)."""
    pred = labels.to_indices(labels.label_map(probs))
    return float(np.mean([dice(np.isin(pred, g), np.isin(label, g)) for g in output_classes(labels)]))


def train_patches(model: VNet, cases: list[ds.Case], data: dict[str, VolumeCase | None], split,
                  survey: Survey, settings: PatchSettings, patch, run_dir: Path, device, resume=None) -> Path:
    """Train one network on random patches of whole scans (the patch strategy); validation
    Dice of whole scans from the sliding window that prediction uses. `data`: the cases of
    `load_volume_cases` by id (None: read from disk when needed)."""
    by_id = {c.case_id: c for c in cases}
    train_ids, val_ids = split["train"], split["val"]
    print(f"patch size {patch}")
    train_set = PatchSet([by_id[i] for i in train_ids], [data[i] for i in train_ids], survey, settings, patch,
                         EpochSampler(len(train_ids), settings.samples(len(train_ids)), settings.seed + 1),
                         ds.working_spacing((1.0, 1.0, 1.0), survey.spacing)  # a 2D patch: one slice, any sz
                         if settings.criterion().needs_distance_map else None)
    write_augmentation_grid(settings.augmentation_grid, train_set, survey.labels)
    activation = inference.ACTIVATIONS[survey.labels.activation]

    def validate(net, rank, size):
        scores = []
        for i in val_ids[rank::size]:
            case = data[i] or load_volume_case(by_id[i], survey, settings, patch)
            probs = inference.sliding_window([net], case.image, patch, device, settings.overlap, settings.batch_size,
                                             case.pads, activation, context=settings.context_slices)
            scores.append(mean_dice(probs, case.label, survey.labels))
        return scores

    config = {"role": "segmenter", "strategy": "patches", "arch": model_arch(model), "patch_size": list(patch),
              "spacing": list(survey.spacing), "loss": settings.loss_criterion, **survey.input_record(),
              "overlap": settings.overlap, "init_from": transfer_record(model, settings, survey.labels, resume)}
    return fit("segmenter", model, train_set, validate, settings, run_dir / "segmenter", config, device, resume)


# ----------------------------------------------------------------------------- the iterative strategy

def load_instance_cases(cases: list[ds.Case], survey: Survey, cache_cases: bool | None = None) -> list[tuple | None]:
    """Decode every case once (validating it) into `(normalised image (C, D, H, W), pad values,
    instance map)` at the survey's spacing, kept in memory as `load_cached` keeps them."""
    return load_cached(cases, lambda case: load_instance_case(case, survey), lambda d: d[0].nbytes + d[2].nbytes,
                       cache_cases, "instance data")


def load_instance_case(case: ds.Case, survey: Survey) -> tuple:
    return ds.load_volume(case, survey.spacing, survey.labels, survey.normalization, instances=True)


def instance_score(pred: np.ndarray, ref: np.ndarray) -> float:
    """One number for a search's instance map against the reference: the Dice of the matched
    pairs (`metrics.match_instances`) summed over every instance of either map, so that a missed
    or a false instance counts 0; 1 only when each instance is found exactly and nothing else."""
    pairs = match_instances(pred, ref)
    total = len(np.unique(pred[pred > 0])) + int(ref.max()) - len(pairs)
    return sum(d for *_, d in pairs) / total if total else 1.0


def train_iterative(model, cases: list[ds.Case], data: dict[str, tuple | None], split, survey: Survey,
                    settings: IterativeSettings, run_dir: Path, device, resume=None) -> Path:
    """Train the iterative FCN (`instances.py`'s samples: patch, memory, next instance,
    completeness) on whole cases; validation runs the search prediction runs
    (`inference.iterative_instances`) on each validation case and scores its instance map
    (`instance_score`). `data`: `load_instance_cases` by id (None: read from disk when needed).
    The validation search stops after twice the most instances a training case holds, so an
    untrained model's scattered answers cannot make an epoch's validation long."""
    by_id = {c.case_id: c for c in cases}
    train_ids, val_ids = split["train"], split["val"]
    patch = tuple(settings.patch_size)
    print(f"patch size {patch}")

    def load(i):
        return data[train_ids[i]] or load_instance_case(by_id[train_ids[i]], survey)

    train_set = IterativeSet([data[i] for i in train_ids], patch,
                             EpochSampler(len(train_ids), settings.samples(len(train_ids)), settings.seed + 1),
                             settings.augment, load)
    most = max((len(survey.instances.get(i, ())) for i in train_ids), default=1)
    max_instances = min(settings.max_instances, 2 * most + 1)
    min_volume = instances.min_volume_ml([v for i in train_ids for v in survey.instances.get(i, ())])
    smallest = instances.min_voxels(min_volume, survey.spacing)

    def validate(net, rank, size):
        scores = []
        for i in val_ids[rank::size]:
            image, pads, label = data[i] or load_instance_case(by_id[i], survey)
            pred, _, _ = inference.iterative_instances(inference.model_segment(net, image, pads, patch, device),
                                                       label.shape, patch, settings.max_moves, max_instances,
                                                       min_voxels=smallest)
            scores.append(instance_score(pred, label))
        return scores

    config = {"role": "segmenter", "strategy": "iterative", "arch": model_arch(model), "patch_size": list(patch),
              "spacing": list(survey.spacing), "loss": settings.loss_criterion, **survey.input_record(),
              "max_moves": settings.max_moves, "max_instances": settings.max_instances,
              "min_volume_ml": min_volume,
              "complete_fraction": instances.COMPLETE_FRACTION, "init_from": None}
    return fit("segmenter", model, train_set, validate, settings, run_dir / "segmenter", config, device, resume)


# ----------------------------------------------------------------------------- a fold's validation predictions

VALIDATION = "validation"  # RUN/fold_K/validation: masks and metrics.csv of the fold's validation cases


def fold_finished(fold_dir: Path) -> bool:
    """A fold is finished once its validation metrics are written, the last thing it does."""
    return (fold_dir / VALIDATION / "metrics.csv").is_file()


def predict_validation(fold_dir: Path, val_cases: list[ds.Case], device) -> list[dict]:
    """Predict a fold's validation cases with its best locator and segmenter, as predict.py
    does with its defaults, into `fold_dir/validation` (masks with each scan's geometry, and
    metrics.csv written last); returns the metrics rows."""
    locator = fold_dir / "locator" / "best.pt"
    pipe = inference.load_pipeline(locator if locator.exists() else None, fold_dir / "segmenter" / "best.pt", device)
    out_dir = fold_dir / VALIDATION
    (out_dir / "metrics.csv").unlink(missing_ok=True)  # the fold is unfinished until it is written again
    outcome = prediction.predict_cases(pipe, val_cases, out_dir, prediction.Outputs(overwrite=True))
    if outcome.failed:
        raise UserError(f"{fold_dir}: validation case(s) failed: {'; '.join(outcome.failed)}")
    prediction.write_metrics(outcome.rows, out_dir)
    return outcome.rows


# ----------------------------------------------------------------------------- torch datasets

class VolumeSet(torch.utils.data.Dataset):
    """Whole (image, label) volumes held in memory, augmented: the locator's downscaled,
    padded training volumes. Items as `training_item`."""

    def __init__(self, volumes: list[tuple[np.ndarray, np.ndarray]], sampler: EpochSampler, augment,
                 distance_spacing=None):
        self.volumes, self.sampler, self.augment = volumes, sampler, augment
        self.distance_spacing = distance_spacing

    def __len__(self):
        return self.sampler.samples

    def __getitem__(self, j):
        i, rng = self.sampler.draw(j)
        return training_item(*self.augment(*self.volumes[i], rng), lbl.binary(), self.distance_spacing)


class SegmenterSet(torch.utils.data.Dataset):
    """Fixed-size crops for the segmenter. Half the crops sit where the trained locator puts
    them (what prediction will see), half on the ground truth's box; augmentation then moves
    them further. A case's region comes from memory, or from disk when it is not kept."""

    def __init__(self, cases: list[ds.Case], data: list[SegmenterCase], survey: Survey, patch_size,
                 sampler: EpochSampler, augment, distance_spacing=None):
        self.cases, self.data, self.survey, self.patch_size = cases, data, survey, tuple(patch_size)
        self.sampler, self.augment, self.distance_spacing = sampler, augment, distance_spacing

    def __len__(self):
        return self.sampler.samples

    def __getitem__(self, j):
        i, rng = self.sampler.draw(j)
        seg_case = self.data[i]
        region = seg_case.region or load_region(self.cases[i], self.survey, seg_case, self.patch_size)
        found = seg_case.location.found
        centre = seg_case.location.centre if (found and rng.random() < 0.5) else seg_case.gt_centre
        image, label = self.augment(*region.crop(centre, self.patch_size), rng)
        return training_item(image, label, self.survey.labels, self.distance_spacing)


# ----------------------------------------------------------------------------- the epoch loop

@dataclass
class Loop:
    """Everything one stage's training loop carries from epoch to epoch."""
    name: str
    model: VNet
    net: torch.nn.Module            # the model as trained: wrapped by DDP and/or compiled
    train_set: torch.utils.data.Dataset
    loader: torch.utils.data.DataLoader
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.ReduceLROnPlateau
    scaler: torch.amp.GradScaler
    criterion: SegmentationLoss | IterativeLoss
    schedule: BoundarySchedule | None
    settings: StageSettings
    stage_dir: Path
    config: dict
    device: torch.device
    first_epoch: int = 1
    best: float = -math.inf
    step: int = 0
    rows: list[dict] = field(default_factory=list)  # the log's rows so far


def fit(name, model: VNet, train_set, validate, settings: StageSettings, stage_dir: Path, config: dict, device,
        resume: dict | None = None) -> Path:
    """Train `model` for the stage `name`; returns the path of its best checkpoint.

    train_set: items (image, *targets) with an EpochSampler at `train_set.sampler`; the loss is
        `settings.criterion()(*model outputs, *targets, weight=...)`: (label[, distance_map])
        for a V-Net, (target, weights, complete) for the iterative FCN's two outputs.
        validate(model, rank, size) -> per-case validation scores (Dice) of the validation
        cases rank, rank + size, ... (this process's share).
    resume: the stage's latest.pt; training goes on from the epoch after it.
    """
    loop = start_loop(name, model, train_set, settings, stage_dir, config, device, resume)
    rank, size = rank_and_size()
    epoch = loop.first_epoch
    try:
        for epoch in range(loop.first_epoch, settings.max_epochs + 1):
            t0 = time.time()
            weight = loop.schedule.weight if loop.schedule else None
            train_loss = train_epoch(loop, epoch, weight)
            model.eval()
            scores = validate(model, rank, size)
            end_epoch(loop, epoch, train_loss, scores, weight, time.time() - t0)
    except KeyboardInterrupt:  # latest.pt is the last finished epoch, from which --resume is exact
        done = f"{stage_dir / 'latest.pt'} holds epoch {epoch - 1}" if epoch > 1 else "no epoch finished"
        raise UserError(f"{name} interrupted in epoch {epoch}: {done}; continue with "
                        f"python train.py --resume {stage_dir.parent}") from None
    if size > 1:
        check_in_sync(model, name)
        dist.barrier()  # the best checkpoint exists for every process once rank 0 has written it
    return stage_dir / "best.pt"


def start_loop(name, model, train_set, settings: StageSettings, stage_dir: Path, config, device, resume) -> Loop:
    """Set up a stage: the data-dependent start of a fresh model, DDP, the loader, Adam, the
    plateau scheduler, the loss scaler, and what a resumed run restores."""
    rank, size = rank_and_size()
    fmt = inference.memory_format(device)
    model.to(device, memory_format=inference.memory_format(device, model.spatial_dims))
    # Transferred weights are kept as they are; a model with normalisation layers (the iterative
    # FCN) needs no data-dependent start.
    if resume is None and config.get("init_from") is None and hasattr(model, "unit_variance_init"):
        # Every process draws the same batch, so all start from the same weights.
        train_set.sampler.set_epoch(1)
        batch = torch.stack([train_set[j][0] for j in range(min(settings.batch_size, len(train_set)))])
        model.unit_variance_init(batch.to(device, memory_format=fmt))
    net = model
    if size > 1:
        net = torch.nn.parallel.DistributedDataParallel(model,
                                                        device_ids=[device.index] if device.type == "cuda" else None)
    if settings.compile:
        net = torch.compile(net)
    loader = torch.utils.data.DataLoader(RankShare(train_set, rank, size), batch_size=settings.batch_size,
                                         shuffle=False, num_workers=settings.num_workers,
                                         pin_memory=device.type == "cuda")
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.learning_rate)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", patience=settings.patience,
                                                           factor=settings.reduce)
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda" and
                                  inference.autocast_dtype(device) == torch.float16)
    loop = Loop(name, model, net, train_set, loader, optimizer, scheduler, scaler, settings.criterion(),
                settings.schedule(), settings, stage_dir, config, device)
    log_path = stage_dir / "log.csv"
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        if loop.schedule is not None:
            loop.schedule.load_state_dict(resume["boundary_schedule"])
        scaler.load_state_dict(resume.get("scaler", {}))
        set_rng_state(resume["rng"])
        loop.first_epoch, loop.best = resume["epoch"] + 1, resume.get("best_score", resume.get("best_dice"))
        loop.rows = [r for r in read_log(log_path) if int(r["epoch"]) < loop.first_epoch] if log_path.exists() else []
        loop.step = resume["epoch"] * len(loader)
        print(f"{name}: resuming after epoch {resume['epoch']} of {settings.max_epochs}")
    if rank == 0:
        stage_dir.mkdir(parents=True, exist_ok=True)
        write_log(log_path, loop.rows)
        processes = f" over {size} processes" if size > 1 else ""
        print(f"{name} {describe(config['arch'])}: parameters: {count_parameters(model):,}; {config['loss']} loss, "
              f"{settings.max_epochs} epochs of {len(train_set)} samples{processes}")
    return loop


def train_epoch(loop: Loop, epoch: int, weight: float | None) -> float:
    """One pass over the epoch's samples; returns the mean training loss over all processes.

    Adam's first steps are nearly sign updates; in a V-Net without normalisation they move every
    5x5x5 filter coherently and can blow the logits up, so the learning rate rises linearly over
    the first `warmup_epochs`."""
    settings, device = loop.settings, loop.device
    warmup_steps = round(settings.warmup_epochs * len(loop.loader))
    amp, amp_dtype, fmt = device.type == "cuda", inference.autocast_dtype(device), inference.memory_format(device)
    loop.train_set.sampler.set_epoch(epoch)
    loop.net.train()
    frozen = [p for m in loop.model.encoder for p in m.parameters()] if epoch <= settings.freeze_encoder_epochs else []
    if frozen and epoch == loop.first_epoch and is_main():
        print(f"{loop.name}: the encoder stays fixed up to epoch {settings.freeze_encoder_epochs}")
    losses = []
    try:
        for image, *targets in tqdm(loop.loader, desc=f"{loop.name} {epoch}/{settings.max_epochs}",
                                    leave=False, disable=not is_main() or not sys.stderr.isatty()):
            image = image.to(device, non_blocking=True, memory_format=fmt)
            targets = [t.to(device, non_blocking=True) for t in targets]
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
                outputs = loop.net(image)
            outputs = outputs if isinstance(outputs, tuple) else (outputs,)  # the iterative FCN has two
            loss = loop.criterion(*(o.float() for o in outputs), *targets, weight=1.0 if weight is None else weight)
            if not torch.isfinite(loss):
                raise UserError(f"{loop.name} epoch {epoch}: the loss became {loss.item()}; training stopped, the "
                                f"last good checkpoint is {loop.stage_dir / 'latest.pt'}; lower --learning_rate "
                                "and retrain")
            loop.optimizer.zero_grad(set_to_none=True)
            loop.scaler.scale(loss).backward()
            for p in frozen:  # no gradient: Adam leaves the parameter, and its state, untouched
                p.grad = None
            loop.step += 1
            if loop.step <= warmup_steps:
                for group in loop.optimizer.param_groups:
                    group["lr"] = settings.learning_rate * loop.step / warmup_steps
            loop.scaler.step(loop.optimizer)
            loop.scaler.update()
            losses.append(loss.item())
    except torch.OutOfMemoryError:
        flag = "--locator_batch_size" if loop.name == "locator" else "--batch_size (or --patch_size)"
        raise UserError(f"{loop.name}: out of {device.type} memory with batches of {settings.batch_size}; "
                        f"lower {flag}") from None
    loss_sum, loss_count = sum_across(float(np.sum(losses)), len(losses))
    return loss_sum / loss_count


def end_epoch(loop: Loop, epoch: int, train_loss: float, scores: list[float], weight: float | None,
              seconds: float) -> None:
    """Step the schedulers on the epoch's score (validation Dice, or 1 - training loss without
    validation cases), log the epoch, write the checkpoints and redraw the curves."""
    score_sum, score_count = sum_across(float(np.sum(scores)), len(scores))
    val_dice = score_sum / score_count if score_count else None
    score = val_dice if val_dice is not None else 1 - train_loss
    loop.scheduler.step(score)
    if loop.schedule is not None:
        loop.schedule.step(score)
    best_before, loop.best = loop.best, max(loop.best, score)
    row = {"epoch": str(epoch), "train_loss": f"{train_loss:.5f}",
           "val_dice": "" if val_dice is None else f"{val_dice:.5f}",
           "learning_rate": f"{loop.optimizer.param_groups[0]['lr']:.3g}",
           "boundary_weight": "" if weight is None else f"{weight:.4g}", "seconds": f"{seconds:.1f}"}
    loop.rows.append(row)
    if not is_main():
        return
    state = {"epoch": epoch, "best_score": loop.best, "score_name": "val_dice" if val_dice is not None else
             "1 - train_loss", "optimizer": loop.optimizer.state_dict(), "scheduler": loop.scheduler.state_dict(),
             "boundary_schedule": loop.schedule.state_dict() if loop.schedule else None,
             "scaler": loop.scaler.state_dict(), "rng": rng_state()}
    write_log(loop.stage_dir / "log.csv", loop.rows)
    if score > best_before:
        save_checkpoint(loop.stage_dir / "best.pt", loop.model, loop.config, **state)
    if epoch % loop.settings.save_after_epochs == 0:
        save_checkpoint(loop.stage_dir / f"epoch_{epoch:04d}.pt", loop.model, loop.config, **state)
    save_checkpoint(loop.stage_dir / "latest.pt", loop.model, loop.config, **state)  # last: it marks the epoch done
    plots.training_curves(loop.stage_dir / "curves.png", loop.rows)
    print(f"{loop.name} epoch {epoch:>3}: loss {train_loss:.4f}  val dice {row['val_dice'] or '-'}  "
          f"({row['seconds']} s)", flush=True)


def read_log(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_log(path: Path, rows: list[dict]) -> None:
    def write(tmp):
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=LOG_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
    atomic_write(path, write)


def save_checkpoint(path: str | Path, model: torch.nn.Module, config: dict, **extra) -> None:
    """Save `{"format", "model": state_dict, "config": config, **extra}` atomically.

    `config` holds everything that rebuilds the model and its pre-processing, so a
    checkpoint alone is enough for `predict.py`.
    """
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    payload = {"format": inference.CHECKPOINT_FORMAT, "model": state, "config": config, **extra}
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


# ----------------------------------------------------------------------------- reproducibility

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every random state a training run draws from (Python, NumPy, torch CPU and CUDA), in
    types that `torch.load(weights_only=True)` accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, py_gauss = random.getstate()
    state = {"python": [version, list(internal), py_gauss], "numpy": [kind, torch.from_numpy(keys.astype(np.int64)),
             pos, has_gauss, gauss], "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, py_gauss = state["python"]
    random.setstate((version, tuple(internal), py_gauss))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def prepare_device(device_name: str, deterministic: bool) -> torch.device:
    """The training device: all CPU threads to torch, the process group under torchrun (each
    process on its own GPU), and deterministic algorithms when asked."""
    inference.set_cpu_threads()
    init_distributed(device_name)
    device = inference.resolve_device(device_name)
    if device.type == "cuda" and rank_and_size()[1] > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for deterministic matmuls
        torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = not deterministic
    return device


# ----------------------------------------------------------------------------- several processes

def rank_and_size() -> tuple[int, int]:
    """This process's rank and the number of processes (0, 1 without torchrun)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return rank_and_size()[0] == 0


def init_distributed(device_name: str) -> None:
    """Join the process group when launched by torchrun (it sets WORLD_SIZE and LOCAL_RANK)."""
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized():
        cuda = device_name != "cpu" and torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if cuda else "gloo")


def barrier() -> None:
    """Wait for every process (nothing without torchrun)."""
    if rank_and_size()[1] > 1:
        dist.barrier()


def sum_across(*values: float) -> list[float]:
    """Element-wise sums of `values` over all processes (the values themselves alone)."""
    if rank_and_size()[1] == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


class RankShare(torch.utils.data.Dataset):
    """Samples rank, rank + size, ... of `dataset`, wrapped round so that every process gets
    the same number of them (DDP needs equal step counts)."""

    def __init__(self, dataset, rank: int, size: int):
        self.dataset, self.rank, self.size = dataset, rank, size
        self.count = -(-len(dataset) // size)

    def __len__(self):
        return self.count

    def __getitem__(self, k):
        return self.dataset[(self.rank + k * self.size) % len(self.dataset)]


def check_in_sync(model, name: str) -> None:
    """After DDP training every process must hold the very same weights; compare them."""
    flat = torch.cat([p.detach().reshape(-1).double().cpu() for p in model.state_dict().values()])
    gathered = [torch.empty_like(flat) for _ in range(rank_and_size()[1])]
    dist.all_gather(gathered, flat.to(next(model.parameters()).device))
    if not all(torch.equal(g.cpu(), flat) for g in gathered):
        raise RuntimeError(f"{name}: the processes' weights differ after training")
    if is_main():
        print(f"{name}: all {len(gathered)} processes hold identical weights")
