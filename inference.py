"""What turns checkpoints and a scan into probabilities: the device and its precision, loading
and validating a checkpoint into the model it records, running a model on a volume (optionally
averaged with its left-right mirror), and the two-stage strategy: locate the atrium on the
downscaled scan, segment a fixed-size crop around it, paste the crop back and resample the
probabilities onto the scan's own grid.

train.py validates and places its crops through these functions, so training sees what
prediction does; predict.py writes masks with them. A new inference strategy (a sliding window,
an ensemble) is a new function here beside `predict_two_stage`.
"""
from __future__ import annotations

import math
import operator
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

import dataset as ds
import instances
import labels as lbl
from labels import Labels
from models import build_model
from utils import UserError

CHECKPOINT_FORMAT = "la-seg-v1"


# ----------------------------------------------------------------------------- device

def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when present; asking for CUDA without one is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available; use --device cpu or auto")
    return torch.device(name)


def set_cpu_threads() -> None:
    """Give torch all cores when no other process competes (data loading is in-process)."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, os.cpu_count() or 1))


def autocast_dtype(device: torch.device) -> torch.dtype:
    """Mixed precision on a GPU: bf16 where it has it (float32's range, no loss scaling), else
    fp16. CPUs run float32 (autocast off); the value is then unused."""
    return torch.bfloat16 if device.type != "cuda" or torch.cuda.is_bf16_supported() else torch.float16


def memory_format(device: torch.device, spatial_dims: int = 3) -> torch.memory_format:
    """Channels-last 3D on CPU, where oneDNN's 3D convolutions were faster in that layout at
    train.py's batch of 3 (not at every size: docs/experiments.md); contiguous elsewhere, and
    for 2D models, whose 4D weights have no 3D channels-last layout. Inputs are 5D either way
    (a 2D model takes a stack of slices)."""
    return torch.channels_last_3d if device.type == "cpu" and spatial_dims == 3 else torch.contiguous_format


# ----------------------------------------------------------------------------- checkpoints

def load_checkpoint(path: str | Path, role: str | None = None, flag: str = "checkpoint") -> dict:
    """Load and validate one of our checkpoints (weights only: no pickled code runs).

    `role` ("locator" or "segmenter") is checked against the checkpoint's own record, so a
    segmenter passed as the locator is caught before it produces nonsense.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{flag} {path}: no such file; pass the best.pt written by train.py")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{flag} {path}: not a readable checkpoint of this repository ({reason[:120]}); "
                        "pass a best.pt or latest.pt written by train.py") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT \
            or not isinstance(ckpt.get("model"), dict) or not isinstance(ckpt.get("config"), dict):
        raise UserError(f"{flag} {path}: not a checkpoint written by this repository's train.py "
                        "(no model/config record); pass a best.pt or latest.pt from a run folder")
    if role is not None and ckpt["config"].get("role") != role:
        raise UserError(f"{flag} {path}: holds a {ckpt['config'].get('role')} model, expected the "
                        f"{role}; pass <run>/{role}/best.pt")
    return ckpt


def load_model(ckpt: dict, path, device: torch.device) -> torch.nn.Module:
    """The model a checkpoint records, with its weights, on `device`, in evaluation mode."""
    model = build_model(ckpt["config"]["arch"])
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError:
        raise UserError(f"{path}: weights do not fit the architecture recorded in the checkpoint; "
                        "the file is damaged or was edited, retrain or use another checkpoint") from None
    return model.to(device, memory_format=memory_format(device, model.spatial_dims)).eval()


# ----------------------------------------------------------------------------- running a model

ACTIVATIONS = {"sigmoid": torch.sigmoid, "softmax": lambda logits: torch.softmax(logits, dim=1)}
AVERAGES = ("probabilities", "logits")  # what an ensemble (and --tta) averages; see docs/prediction.md


@torch.no_grad()
def ensemble_probabilities(models: list[torch.nn.Module], array: np.ndarray, device: torch.device,
                           tta: bool = False, average: str = "probabilities",
                           activation: str = "sigmoid") -> np.ndarray:
    """Probabilities of one volume: (C, D, H, W) in, float32 (K, D, H, W) out (K the models'
    output channels); a (D, H, W) volume of a one-channel, one-output model gives (D, H, W). The
    mean over `models` of each model's output, one model in memory use at a time beside one
    accumulator; `activation` "sigmoid" (per channel) or "softmax" (over the channels).

    `tta`: each model's output is the mean over the volume and its W-mirror (mirrored back), the
    one flip training augments with; it costs a second forward pass per model. `average`:
    "probabilities" averages the activations; "logits" averages the logits and takes the
    activation of the mean (nnU-Net's choice within one prediction). Each model's mean is taken
    before the models', so that an ensemble of two identical models equals one model exactly.
    On a GPU the convolutions run in bf16 (fp16 where bf16 is missing) under autocast.
    """
    if average not in AVERAGES:
        raise ValueError(f"average {average!r}: expected one of {AVERAGES}")
    act = ACTIVATIONS[activation]
    x = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    x = (x[None, None] if array.ndim == 3 else x[None]).to(device, memory_format=memory_format(device))  # (1, C, ...)
    total = None
    with torch.autocast(device.type, dtype=autocast_dtype(device), enabled=device.type == "cuda"):
        for model in models:
            out = model(x).float()
            if tta:
                out = (out + model(x.flip(-1)).float().flip(-1)) if average == "logits" else \
                    (act(out) + act(model(x.flip(-1)).float()).flip(-1))
                out *= 0.5
            elif average == "probabilities":
                out = act(out)
            total = out if total is None else total.add_(out)
            del out
    total /= len(models)
    if average == "logits":
        total = act(total)
    if array.ndim == 3:
        assert total.shape[1] == 1, f"a (D, H, W) volume needs a one-output model, got {total.shape[1]} outputs"
        return total[0, 0].cpu().numpy()
    return total[0].cpu().numpy()


def probabilities(model: torch.nn.Module, array: np.ndarray, device: torch.device, tta: bool = False,
                  activation: str = "sigmoid") -> np.ndarray:
    """Probabilities of one model (see `ensemble_probabilities`)."""
    return ensemble_probabilities([model], array, device, tta, activation=activation)


def locate(locator: torch.nn.Module, low: np.ndarray, pad_before, shape, factors, device: torch.device,
           tta: bool = False) -> ds.Location:
    """The atrium's location in a scan of `shape` from the locator's view of it (`low`, padded
    by `pad_before` and downscaled by `factors`: `dataset.locator_input`)."""
    prob = probabilities(locator, low, device, tta)
    return ds.locate(prob if prob.ndim == 3 else prob[0], factors, pad_before, shape[-3:])


# ----------------------------------------------------------------------------- the sliding window

GAUSSIAN_SIGMA = 1 / 8  # of the window per axis: the centre of a window counts most (nnU-Net's and MONAI's value)


def gaussian_profile(n: int) -> np.ndarray:
    """float64 (n,): a Gaussian centred on a window of n voxels, sigma = GAUSSIAN_SIGMA x n, 1 at
    its peak (the middle voxel, or the two middle ones for even n, then just below 1)."""
    x = np.arange(n, dtype=np.float64) - (n - 1) / 2
    g = np.exp(-0.5 * (x / (GAUSSIAN_SIGMA * n)) ** 2)
    return g / g.max()


def gaussian_weights(window) -> np.ndarray:
    """float32 weights of one window, the product of a Gaussian per axis centred on the window
    with sigma = GAUSSIAN_SIGMA x its size, 1 at the centre. Voxels near a window's edge, where
    a convolutional model sees least context, count least where windows overlap."""
    w = np.ones((), np.float64)
    for n in window:
        w = np.multiply.outer(w, gaussian_profile(n))
    return w.astype(np.float32)


def summed_profile(size: int, window: int, starts) -> np.ndarray:
    """float64 (size,): the sum of the windows' Gaussian profiles along one axis. The weights
    are a product over axes and the windows a grid of starts, so the summed weights of all
    windows at a voxel are the product of the three axes' sums: three vectors, no volume."""
    total, g = np.zeros(size), gaussian_profile(window)
    for s in starts:
        total[s:s + window] += g
    return total


def window_starts(size: int, window: int, overlap: float) -> list[int]:
    """Starts of windows of `window` voxels covering `size` voxels (one window when it does not
    fit), spread evenly so that the first starts at 0, the last ends at `size`, and neighbours
    overlap by at least `overlap` of a window."""
    if size <= window:
        return [0]
    step = max(1, int(window * (1 - overlap)))
    n = math.ceil((size - window) / step) + 1
    return [round(i * (size - window) / (n - 1)) for i in range(n)]


@torch.no_grad()
def sliding_window(models: list[torch.nn.Module], volume: np.ndarray, window, device: torch.device,
                   overlap: float = 0.5, batch_size: int = 4, pad_value=0.0, activation=None,
                   tta: bool = False, context: int = 0) -> np.ndarray:
    """The models' outputs over a whole (C, D, H, W) volume, float32 (K, D, H, W): windows of
    `window` voxels overlapping by `overlap`, `batch_size` windows per forward pass, each
    window's output weighted by `gaussian_weights` and the weighted sum divided by the summed
    weights, the mean over `models`. `activation` (e.g. torch.sigmoid) is applied to each window's
    output before it is averaged; without one the logits are. `tta`: each window's output is
    the mean over it and its W-mirror (mirrored back). An axis shorter than its window is padded
    at its end with `pad_value` (a number, or one per channel) and cut back after. `context`:
    each window's input reaches that many slices further on both sides along D (a 2D model's
    neighbouring slices, `VNet(context_slices=...)`), `pad_value` beyond the volume.
    One accumulator of K channels is held beside the input (no copy of it unless it needs
    padding); the summed weights are three vectors (`summed_profile`)."""
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap {overlap}: must lie in [0, 1)")
    channels, shape = volume.shape[0], volume.shape[1:]
    padded_shape = tuple(max(n, w) for n, w in zip(shape, window))
    x = volume
    if padded_shape != tuple(shape) or context:
        x = np.empty((channels, padded_shape[0] + 2 * context, *padded_shape[1:]), np.float32)
        x[...] = np.asarray(pad_value, np.float32).reshape(-1, 1, 1, 1)
        x[(slice(None), slice(context, context + shape[0]), *(slice(0, n) for n in shape[1:]))] = volume
    weights = torch.from_numpy(gaussian_weights(window)).to(device)
    axis_starts = [window_starts(n, w, overlap) for n, w in zip(padded_shape, window)]
    starts = [(z, y, xx) for z in axis_starts[0] for y in axis_starts[1] for xx in axis_starts[2]]
    total = None
    with torch.autocast(device.type, dtype=autocast_dtype(device), enabled=device.type == "cuda"):
        for i in range(0, len(starts), batch_size):
            boxes = [tuple(slice(s, s + w) for s, w in zip(start, window)) for start in starts[i:i + batch_size]]
            inputs = [(slice(None), slice(b[0].start, b[0].stop + 2 * context), *b[1:]) for b in boxes]
            batch = torch.from_numpy(np.stack([x[box] for box in inputs]).astype(np.float32, copy=False))
            batch = batch.to(device, memory_format=memory_format(device))
            for model in models:
                out = model(batch).float()
                out = activation(out) if activation is not None else out
                if tta:
                    mirrored = model(batch.flip(-1)).float()
                    out = 0.5 * (out + (activation(mirrored) if activation is not None else mirrored).flip(-1))
                    del mirrored
                if total is None:
                    total = torch.zeros((out.shape[1], *padded_shape), device=device)
                for j, box in enumerate(boxes):
                    total[(slice(None), *box)].addcmul_(out[j], weights)
                del out  # before the next forward pass: one batch's outputs at a time
            del batch
    total /= len(models)
    for axis, (n, w, axis_start) in enumerate(zip(padded_shape, window, axis_starts)):
        norm = torch.from_numpy(summed_profile(n, w, axis_start).astype(np.float32)).to(device)
        total /= norm.reshape([-1 if a == axis else 1 for a in range(3)])  # in place: no volume of weights
    return total[(slice(None), *(slice(0, n) for n in shape))].cpu().numpy()


# ----------------------------------------------------------------------------- the two-stage strategy

@dataclass
class TwoStage:
    """Trained locators and segmenters (one of each, or the models of several folds) with what
    their checkpoints record about their input, which every model of a stage shares."""
    locators: list[torch.nn.Module]
    segmenters: list[torch.nn.Module]
    factors: tuple[int, int, int]      # locator downscaling blocks, e.g. (2, 4, 4)
    patch_size: tuple[int, int, int]   # segmenter input, e.g. (96, 144, 224)
    spacing: tuple[float, float, float]  # training spacing (sz, sy, sx) mm
    device: torch.device
    tta: bool = False                  # average each model over the input and its W-mirror
    average: str = "probabilities"     # what the mirrors and the models average (AVERAGES)
    channels: tuple[str, ...] = ("channel 0",)
    normalization: tuple[str, ...] = ("whole",)  # z-score rule per channel (dataset.normalise)
    labels: Labels = field(default_factory=lbl.binary)  # the segmenter's classes


def _as_paths(paths) -> list[Path]:
    return [Path(p) for p in ([paths] if isinstance(paths, (str, Path)) else paths)]


def _agree(ckpts: list[tuple[Path, dict]], flag: str, what: str, value, same=operator.eq) -> None:
    """Every checkpoint of an ensemble records the same `value(config)` (by `same`), else name
    two that differ."""
    first_path, first = ckpts[0]
    for path, ckpt in ckpts[1:]:
        a, b = value(first["config"]), value(ckpt["config"])
        if not same(a, b):
            raise UserError(f"{flag} {first_path} and {path}: trained with different {what} ({a} and {b}); "
                            "an ensemble takes the checkpoints of one run's folds")


def _channels(config: dict) -> tuple:
    return config["arch"].get("in_channels"), config["arch"].get("out_channels")


def _agree_segmenters(ckpts: list[tuple[Path, dict]], flag: str) -> None:
    """The segmenters of an ensemble (either strategy) share their input and classes."""
    _agree(ckpts, flag, "spatial dimensions and context slices",
           lambda c: (c["arch"].get("spatial_dims", 3), c["arch"].get("context_slices", 0)))
    # None (a 2D model's slice axis: each scan's own) compares as -1, which no spacing equals.
    _agree(ckpts, flag, "spacings", lambda c: [-1.0 if s is None else s for s in c["spacing"]], ds.same_spacing)
    _agree(ckpts, flag, "input channels and classes", _channels)
    _agree(ckpts, flag, "patch sizes", lambda c: list(c["patch_size"]))
    _agree(ckpts, flag, "channels, normalisation and classes", input_record)


def load_two_stage(locator_paths, segmenter_paths, device: torch.device, tta: bool = False,
                   average: str = "probabilities", flags=("--locator_path", "--segmenter_path"),
                   segmenter_ckpts=None) -> TwoStage:
    """The models of one checkpoint per stage, or of several (a fold ensemble) that agree on
    their input (spacing, downscaling or patch size, channels and classes); `segmenter_ckpts`:
    the segmenters' (path, checkpoint) pairs when already loaded."""
    locators = [(p, load_checkpoint(p, "locator", flags[0])) for p in _as_paths(locator_paths or [])]
    if not locators:
        raise UserError(f"{flags[0]}: no checkpoint given")
    _agree(locators, flags[0], "spacings", lambda c: list(c["spacing"]), ds.same_spacing)
    _agree(locators, flags[0], "input channels and classes", _channels)
    _agree(locators, flags[0], "scale factors", lambda c: list(ds.downscale_factors(c["scale_factor"])))
    segmenters = segmenter_ckpts or [(p, load_checkpoint(p, "segmenter", flags[1])) for p in _as_paths(segmenter_paths)]
    if not segmenters:
        raise UserError(f"{flags[1]}: no checkpoint given")
    _agree_segmenters(segmenters, flags[1])
    (loc_path, loc), (seg_path, seg) = locators[0], segmenters[0]
    if not ds.same_spacing(loc["config"]["spacing"], seg["config"]["spacing"]):
        raise UserError(f"{flags[0]} {loc_path} and {flags[1]} {seg_path} were trained at "
                        "different spacings; use the two checkpoints of one run")
    if _channels(loc["config"])[0] != _channels(seg["config"])[0]:
        raise UserError(f"{flags[0]} {loc_path} and {flags[1]} {seg_path} take different input channels; "
                        "use the two checkpoints of one run")
    channels, normalization, labels = input_record(seg["config"])
    return TwoStage([load_model(c, p, device) for p, c in locators], [load_model(c, p, device) for p, c in segmenters],
                    ds.downscale_factors(loc["config"]["scale_factor"]), tuple(seg["config"]["patch_size"]),
                    tuple(seg["config"]["spacing"]), device, tta, average, channels, tuple(normalization),
                    Labels.from_record(labels))


def input_record(config: dict) -> tuple:
    """(channel names, z-score rules, classes record) of a checkpoint's config; a checkpoint
    written before these were recorded is the left atrium's one channel and one class."""
    channels = config.get("channels", ["channel 0"])
    return (tuple(channels), tuple(config.get("normalization", ["whole"] * len(channels))),
            config.get("labels", lbl.binary().record()))


def locate_scan(pipe: TwoStage, image: np.ndarray, pad_value) -> ds.Location:
    """Run the locators on a z-scored scan (D, H, W) or (C, D, H, W) at training spacing, padded
    by its own shape. Their probabilities are averaged on the downscaled grid before the crop is
    placed, so that every segmenter of an ensemble sees the same crop."""
    low, pad_before = ds.locator_input(image, pad_value, pipe.factors)
    prob = ensemble_probabilities(pipe.locators, low, pipe.device, pipe.tta, pipe.average)
    return ds.locate(prob if prob.ndim == 3 else prob[0], pipe.factors, pad_before, image.shape[-3:])


def segment_at(pipe: TwoStage, image: np.ndarray, pad_value, centre) -> np.ndarray:
    """The segmenters' mean probabilities of the fixed-size crop at `centre`, pasted into a zero
    volume: (D, H, W) for a (D, H, W) scan, (K, D, H, W) for a (C, D, H, W) one."""
    shape = image.shape[-3:]
    start = ds.crop_start(centre, pipe.patch_size, shape)
    crop = ds.crop(image, start, pipe.patch_size, pad_value)
    prob = ensemble_probabilities(pipe.segmenters, crop, pipe.device, pipe.tta, pipe.average,
                                  pipe.labels.activation)
    return ds.paste(prob, start, shape)


def predict_two_stage(pipe: TwoStage, image: np.ndarray, props: dict,
                      source="scan") -> tuple[np.ndarray, ds.Location]:
    """Probabilities float32 on the grid of `image`, and where the locator put the crop (on the
    grid the models saw). A (D, H, W) scan (the atrium's one channel) gives (D, H, W); a
    (C, D, H, W) scan gives (K, D, H, W), K the segmenter's outputs.

    A scan at another spacing than the model's is resampled to it (linear), and the
    probabilities, not a thresholded mask, are resampled back onto the scan's grid (linear)
    and thresholded there: the mask's edge then falls between the model's voxels where the
    probability crosses 0.5, instead of the staircase that nearest-neighbour resampling of a
    mask leaves when the scan is finer than the model's grid.
    """
    if image.ndim == 3:
        prob, location = predict_two_stage(pipe, image[None], props, source)
        return prob[0], location
    _check_channels(pipe, image, source)
    resampled = not ds.same_spacing(props["spacing"], pipe.spacing)
    work = ds.resample_channels(image, props, pipe.spacing) if resampled else image.astype(np.float32, copy=True)
    pad_value = ds.normalise(work, pipe.normalization)
    location = locate_scan(pipe, work, pad_value)
    prob = segment_at(pipe, work, pad_value, location.centre)
    del work
    return _back_onto(prob, pipe.spacing, image, props) if resampled else prob, location


def _check_channels(pipe, image: np.ndarray, source) -> None:
    if image.shape[0] != len(pipe.channels):
        raise UserError(f"{source}: has {image.shape[0]} channel(s), the model was trained on {len(pipe.channels)} "
                        f"({', '.join(pipe.channels)}); give scans of the same channels")


def _back_onto(probs: np.ndarray, spacing, image: np.ndarray, props: dict) -> np.ndarray:
    """Probabilities (K, ...) at the models' `spacing` resampled (linear) onto the grid of
    `image (C, D, H, W)` with `props`."""
    work_props = {**props, "spacing": tuple(spacing)}
    return np.stack([ds.resample_onto(p, work_props, image.shape[1:], props, label=False) for p in probs])


# ----------------------------------------------------------------------------- the patch strategy

@dataclass
class PatchModels:
    """Trained networks of one strategy that runs on patches (one, or the models of several
    folds) with what their checkpoints record: the patch size, spacing, channels and their
    normalisation rules, and the classes (`patch_models` reads them)."""
    models: list[torch.nn.Module]
    patch_size: tuple[int, int, int]     # (1, H, W) for a 2D model: slice by slice
    spacing: tuple                       # None on the slice axis of a 2D model (ds.working_spacing)
    channels: tuple[str, ...]
    normalization: tuple[str, ...]
    labels: Labels
    device: torch.device


def patch_models(ckpts: list[tuple[Path, dict]], device: torch.device, flag: str) -> dict:
    """The `PatchModels` fields of checkpoints that agree on their input and classes."""
    _agree_segmenters(ckpts, flag)
    config = ckpts[0][1]["config"]
    return dict(models=[load_model(c, p, device) for p, c in ckpts], patch_size=tuple(config["patch_size"]),
                spacing=tuple(config["spacing"]), channels=tuple(config["channels"]),
                normalization=tuple(config["normalization"]), labels=Labels.from_record(config["labels"]),
                device=device)


@dataclass
class Patches(PatchModels):
    """The patch strategy's networks and their sliding window."""
    overlap: float = 0.5
    batch_size: int = 4
    tta: bool = False
    context: int = 0                     # a 2D model's neighbouring slices on each side


def strategy_of(ckpt: dict) -> str:
    return ckpt["config"].get("strategy", "two_stage")


def load_patches(ckpts: list[tuple[Path, dict]], device: torch.device, tta: bool = False, overlap: float | None = None,
                 batch_size: int = 4, flag: str = "--segmenter_path") -> Patches:
    """The patch strategy's models of checkpoints that agree on their input and classes."""
    config = ckpts[0][1]["config"]
    overlap = config.get("overlap", 0.5) if overlap is None else overlap
    return Patches(**patch_models(ckpts, device, flag), overlap=overlap, batch_size=batch_size, tta=tta,
                   context=config["arch"].get("context_slices", 0))


def load_pipeline(locator_paths, segmenter_paths, device: torch.device, tta: bool = False,
                  average: str = "probabilities", flags=("--locator_path", "--segmenter_path"),
                  overlap: float | None = None, batch_size: int = 4, default_locators=(), max_moves: int | None = None,
                  max_instances: int | None = None, min_volume: float | None = None) -> TwoStage | Patches | Iterative:
    """The strategy the segmenter checkpoints record, with its models: the patch and iterative
    strategies need no locator (giving one is an error), the two-stage one both
    (`default_locators` when none is given). `max_moves`, `max_instances`, `min_volume`: the
    iterative search's bounds and its smallest instance in ml (None: the checkpoint's)."""
    ckpts = [(p, load_checkpoint(p, "segmenter", flags[1])) for p in _as_paths(segmenter_paths)]
    if not ckpts:
        raise UserError(f"{flags[1]}: no checkpoint given")
    strategies = {strategy_of(c) for _, c in ckpts}
    if len(strategies) > 1:
        raise UserError(f"{flags[1]}: checkpoints of different strategies ({', '.join(sorted(strategies))}); "
                        "an ensemble takes the checkpoints of one run's folds")
    if strategies != {"two_stage"} and locator_paths:
        raise UserError(f"{flags[0]}: {ckpts[0][0]} was trained with --strategy {strategy_of(ckpts[0][1])}, which "
                        f"needs no locator; drop {flags[0]}")
    if strategies == {"patches"}:
        return load_patches(ckpts, device, tta, overlap, batch_size, flags[1])
    if strategies == {"iterative"}:
        return load_iterative(ckpts, device, max_moves, max_instances, min_volume, flags[1])
    return load_two_stage(locator_paths or default_locators, segmenter_paths, device, tta, average, flags, ckpts)


def predict_patches(pipe: Patches, image: np.ndarray, props: dict, source="scan") -> np.ndarray:
    """Probabilities (out_channels, D, H, W) float32 on the grid of `image (C, D, H, W)`: the
    scan resampled to the models' spacing when its own differs, z-scored per channel as in
    training, a Gaussian-weighted sliding window over all of it, and the probabilities
    resampled back (linear). Beside the image's C channels, the probabilities are held: C +
    out_channels float32 volumes at the models' spacing (C + K + 1 for K softmax classes)."""
    _check_channels(pipe, image, source)
    spacing = ds.working_spacing(props["spacing"], pipe.spacing)
    resampled = not ds.same_spacing(props["spacing"], spacing)
    work = ds.resample_channels(image, props, spacing) if resampled else image
    pads = ds.normalise(work, pipe.normalization)
    probs = sliding_window(pipe.models, work, pipe.patch_size, pipe.device, pipe.overlap, pipe.batch_size, pads,
                           ACTIVATIONS[pipe.labels.activation], pipe.tta, pipe.context)
    return _back_onto(probs, spacing, image, props) if resampled else probs


# ----------------------------------------------------------------------------- the iterative strategy

@dataclass
class Found:
    """One instance the iterative search added to its memory: its number (1, 2, ... in the
    order found), the completeness score of its last evaluation, the patch moves it took, and
    whether those moves ended in a cycle (then the patch settled at the cycle's mean)."""
    instance: int
    completeness: float
    moves: int
    oscillated: bool = False


def search_starts(shape, patch, overlap: float = 0.5) -> list[tuple[int, int, int]]:
    """Patch starts that cover the volume, from its first D end to its last (D slowest): where
    the search looks for the next instance. An axis shorter than the patch is centred (padding)."""
    axes = [window_starts(n, p, overlap) if p <= n else [-((p - n) // 2)] for n, p in zip(shape, patch)]
    return [(z, y, x) for z in axes[0] for y in axes[1] for x in axes[2]]


def iterative_instances(segment, shape, patch, max_moves: int = 20, max_instances: int = 100,
                        overlap: float = 0.5, min_voxels: int = 1) -> tuple[np.ndarray, list[Found], int]:
    """Find instances one at a time (Lessmann et al., MIDL 2018): `segment(start, memory)` is the
    model on the patch at `start` (its memory input is `memory`, the patch of the instances found
    so far, 0/1) and returns `(mask, completeness)`: the next instance's voxels in the patch (bool)
    and the probability that it lies wholly inside the patch. Of an answer, the voxels not yet in
    memory count, and of those only the largest 26-connected piece: an instance is one piece, and
    a stray island would pull the patch off it and come back later as an instance of its own. An
    answer of fewer than `min_voxels` voxels counts as none (the fragments a partly trained
    model leaves at the borders of instances already found).

    The search walks `search_starts` from the volume's first D end. Where the model answers with
    voxels not yet in memory, the patch follows that instance: it is centred on the answer's
    centroid (shifted inside the volume on each axis by that axis's own size) until its start
    stops changing, at most `max_moves` moves; a start seen before is a cycle, and the patch
    settles at the mean of the cycle's starts. The last answer there joins the memory as the
    next instance (voxels already in memory stay with their instance), and the search goes on
    from the same search start, where the memory now hides it. It ends when no search start
    left yields new voxels, or after `max_instances` instances. Every loop is bounded: at most
    len(search starts) + max_instances x (max_moves + 1) evaluations.

    Returns `(labels int32 (D, H, W) of 0 and 1..N in the order found, [Found], evaluations)`."""
    if max_moves < 1 or max_instances < 1:
        raise ValueError(f"max_moves and max_instances must be at least 1, got {max_moves}, {max_instances}")
    labels = np.zeros(shape, np.int32)
    found: list[Found] = []
    evaluations = 0

    def evaluate(start):
        nonlocal evaluations
        evaluations += 1
        mask, completeness = segment(start, (ds.crop(labels, start, patch, 0) > 0).astype(np.float32))
        mask = np.asarray(mask, bool) & (ds.crop(labels, start, patch, 1) == 0)
        mask = ds.largest_component(mask, connectivity=3)
        return (mask if np.count_nonzero(mask) >= min_voxels else None), float(completeness)

    starts, i = search_starts(shape, patch, overlap), 0
    while i < len(starts) and len(found) < max_instances:
        start = starts[i]
        mask, completeness = evaluate(start)
        if mask is None:
            i += 1
            continue
        seen, moves, oscillated = [start], 0, False
        while moves < max_moves and not oscillated:
            centre = [s + c for s, c in zip(start, ndimage.center_of_mass(mask))]
            nxt = ds.crop_start(centre, patch, shape)
            if nxt == start:
                break
            moves += 1
            if nxt in seen:  # a cycle: settle at the mean of its starts
                cycle = seen[seen.index(nxt):]
                nxt = tuple(int(round(np.mean([c[a] for c in cycle]))) for a in range(3))
                oscillated = True
            new_mask, new_completeness = evaluate(nxt)
            if new_mask is None:  # the instance left the model's view: keep the last answer
                break
            start, mask, completeness = nxt, new_mask, new_completeness
            seen.append(start)
        found.append(Found(len(found) + 1, completeness, moves, oscillated))
        region = tuple(slice(max(a, 0), min(a + p, n)) for a, p, n in zip(start, patch, shape))
        inside = tuple(slice(r.start - a, r.stop - a) for r, a in zip(region, start))
        labels[region][mask[inside]] = len(found)
    return labels, found, evaluations


def model_segment(models, image: np.ndarray, pads, patch, device: torch.device):
    """The `segment(start, memory)` of `iterative_instances` for a model of the iterative
    strategy (`models.iterative.IterativeFCN`), or several (a fold ensemble), on a normalised
    `image (C, D, H, W)`: the patch at `start` (padded with `pads` beyond the scan) and the memory
    patch as one more channel, with its left-right (W) mirror, the flip training augments with,
    in one batch of two per model; the probabilities of all are averaged, the segmentation
    thresholded at 0.5. The mirror comes almost free: on a CPU, PyTorch runs a single thin patch
    through a slower convolution than a batch of two, which took a third of the time
    (docs/instances.md)."""
    models = models if isinstance(models, (list, tuple)) else [models]

    @torch.no_grad()
    def segment(start, memory):
        x = np.concatenate([ds.crop(image, start, patch, pads), memory[None].astype(np.float32)])
        x = torch.from_numpy(np.stack([x, x[..., ::-1]])).to(device)
        seg, complete = 0.0, 0.0
        for model in models:
            with torch.autocast(device.type, dtype=autocast_dtype(device), enabled=device.type == "cuda"):
                s, c = model(x)
            s = torch.sigmoid(s.float())[:, 0]
            seg = seg + s[0] + s[1].flip(-1)
            complete = complete + torch.sigmoid(c.float()).sum()
        return (seg / (2 * len(models)) >= 0.5).cpu().numpy(), float(complete / (2 * len(models)))
    return segment


@dataclass
class Iterative(PatchModels):
    """The iterative strategy's networks and the search's bounds."""
    max_moves: int = 20
    max_instances: int = 100
    min_volume: float = 0.0              # ml: a smaller answer counts as none (iterative_instances)


def load_iterative(ckpts: list[tuple[Path, dict]], device: torch.device, max_moves: int | None = None,
                   max_instances: int | None = None, min_volume: float | None = None,
                   flag: str = "--segmenter_path") -> Iterative:
    """The iterative strategy's models of checkpoints that agree on their input; the search's
    bounds and smallest instance as given, else as the checkpoint records them."""
    config = ckpts[0][1]["config"]
    return Iterative(**patch_models(ckpts, device, flag), max_moves=max_moves or config.get("max_moves", 20),
                     max_instances=max_instances or config.get("max_instances", 100),
                     min_volume=config.get("min_volume_ml", 0.0) if min_volume is None else min_volume)


def predict_iterative(pipe: Iterative, image: np.ndarray, props: dict,
                      source="scan") -> tuple[np.ndarray, list[Found], int]:
    """The instance map of `image (C, D, H, W)` on its own grid (uint8, or uint16 past 255
    instances; 0 and 1..N in the order found), the instances' `Found` records and the number of
    network evaluations: the scan resampled to the models' spacing when its own differs,
    normalised as in training, searched (`iterative_instances`), and the map resampled back
    (nearest). An instance too small to keep a voxel on the scan's grid is dropped and the
    others renumbered, so that the map holds 1..N without gaps."""
    _check_channels(pipe, image, source)
    resampled = not ds.same_spacing(props["spacing"], pipe.spacing)
    work = ds.resample_channels(image, props, pipe.spacing) if resampled else image.astype(np.float32, copy=True)
    pads = ds.normalise(work, pipe.normalization)
    segment = model_segment(pipe.models, work, pads, pipe.patch_size, pipe.device)
    labels, found, evaluations = iterative_instances(segment, work.shape[1:], pipe.patch_size, pipe.max_moves,
                                                     pipe.max_instances,
                                                     min_voxels=instances.min_voxels(pipe.min_volume, pipe.spacing))
    del work
    dtype = np.uint8 if len(found) <= 255 else np.uint16
    if resampled:
        labels = ds.resample_onto(labels, {**props, "spacing": tuple(pipe.spacing)}, image.shape[1:], props,
                                  label=True)
        voxels = np.bincount(labels.ravel(), minlength=len(found) + 1)
        kept = [f for f in found if voxels[f.instance]]
        if len(kept) < len(found):
            lookup = np.zeros(len(found) + 1, np.int64)
            lookup[[f.instance for f in kept]] = np.arange(1, len(kept) + 1)
            labels = lookup[labels]
            found = [Found(k, f.completeness, f.moves, f.oscillated) for k, f in enumerate(kept, 1)]
    return labels.astype(dtype), found, evaluations


def to_mask(prob: np.ndarray, largest_component: bool = False) -> np.ndarray:
    """uint8 {0, 1} mask where `prob` >= 0.5; with `largest_component`, only its largest
    26-connected component (faces, edges and corners join, so that a thin vein stub touching
    the body along an edge stays; anything removed is a separate island)."""
    mask = (prob >= 0.5).astype(np.uint8)
    return ds.largest_component(mask, connectivity=3) if largest_component else mask
