"""What the iterative strategy trains on (Lessmann et al., MIDL 2018): from an image and its
instance label map (0 background, 1..N numbered in the order the search meets them), one
sample is a patch of the image, the instance memory (the instances before the target, 0/1), the
target (the first instance in the patch not in memory; none in an "empty" sample, whose memory
holds every instance the patch touches), the target's completeness (whether at least
COMPLETE_FRACTION of it lies in the patch) and voxel weights that stress the instances' borders.
Pure numpy: the torch datasets wrap it."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

import dataset as ds

COMPLETE_FRACTION = 0.98  # of an instance's voxels inside the patch for it to count as complete (the paper's)
BORDER_WEIGHT, BORDER_SIGMA2 = 8.0, 36.0  # weights 1 + 8 exp(-d^2 / 36), d in voxels (the paper's)
EMPTY_EVERY = 5  # every 5th sample has no target (the paper's)
# The search's smallest instance, as a fraction of the training instances' median volume: the
# border fragments a partly trained model leaves were at most a seventh of it, the smallest
# whole vertebra of either phantom generator above three tenths (docs/instances.md).
# predict.py --min_volume overrides it.
MIN_VOLUME_FRACTION = 0.25


def min_volume_ml(volumes_ml) -> float:
    """The smallest instance the search keeps, ml: MIN_VOLUME_FRACTION of the median of the
    training instances' volumes (0 without any)."""
    return MIN_VOLUME_FRACTION * float(np.median(volumes_ml)) if len(volumes_ml) else 0.0


def min_voxels(volume_ml: float, spacing) -> int:
    """The voxels of `volume_ml` at `spacing` (mm), at least 1."""
    return max(1, int(np.ceil(volume_ml * 1000.0 / float(np.prod(spacing)))))


@dataclass
class Sample:
    """One training patch: `image` (C, D, H, W) float32, `memory` (D, H, W) float32 0/1,
    `target` (D, H, W) float32 0/1, `weights` (D, H, W) float32, `complete` 0.0 or 1.0, and
    which instance was the target (0: none)."""
    image: np.ndarray
    memory: np.ndarray
    target: np.ndarray
    weights: np.ndarray
    complete: float
    instance: int


def border_weights(mask: np.ndarray) -> np.ndarray:
    """float32 weights 1 + BORDER_WEIGHT exp(-d^2 / BORDER_SIGMA2), d the distance in voxels from
    a voxel to the border of `mask` (the nearest voxel of the other side), so that voxels where a
    segmentation is decided count most; all ones for an empty or full mask."""
    mask = np.asarray(mask, bool)
    if not mask.any() or mask.all():
        return np.ones(mask.shape, np.float32)
    d = np.where(mask, ndimage.distance_transform_edt(mask), ndimage.distance_transform_edt(~mask))
    return (1 + BORDER_WEIGHT * np.exp(-(d ** 2) / BORDER_SIGMA2)).astype(np.float32)


def draw(label: np.ndarray, patch, rng: np.random.Generator, empty: bool, jitter: float = 0.25):
    """`(start, target, memory)` of one sample: a target instance drawn uniformly from 1..N, the
    patch centred on its centroid shifted by up to `jitter` of the patch on each axis (and inside
    the volume where it fits), the memory the instances before it. `empty`: no target, and the
    memory every instance up to the last one the patch touches."""
    n = int(label.max())
    if n == 0:
        return ds.crop_start(np.array(label.shape) / 2, patch, label.shape), 0, 0
    target = int(rng.integers(1, n + 1))
    centre = np.array(ndimage.center_of_mass(label == target))
    centre += rng.uniform(-jitter, jitter, 3) * np.array(patch)
    start = ds.crop_start(centre, patch, label.shape)
    if empty:
        touched = ds.crop(label, start, patch, 0)
        return start, 0, int(touched.max())
    return start, target, target - 1


def touches_edge(mask: np.ndarray) -> bool:
    """Whether a mask reaches a face of its volume: an instance there runs on past the field of
    view, so it is never complete, however much of what the scan shows a patch holds."""
    return any(np.take(mask, i, axis=a).any() for a in range(mask.ndim) for i in (0, -1))


def completeness(label: np.ndarray, start, patch, target: int) -> float:
    """1.0 when the patch at `start` holds COMPLETE_FRACTION of instance `target` and the
    instance does not reach the scan's edge, else 0.0 (also for no target)."""
    if not target:
        return 0.0
    whole = label == target
    inside = np.count_nonzero(ds.crop(label, start, patch, 0) == target)
    return float(inside >= COMPLETE_FRACTION * np.count_nonzero(whole) and not touches_edge(whole))


def patch_targets(crop: np.ndarray, target: int, memory: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`(memory, target, weights)` float32 of a label patch: instances 1..`memory`, instance
    `target` (0: none), and the target's border weights."""
    mask = crop == target if target else np.zeros(crop.shape, bool)
    return ((crop > 0) & (crop <= memory)).astype(np.float32), mask.astype(np.float32), border_weights(mask)


def sample(image: np.ndarray, pads, label: np.ndarray, start, patch, target: int, memory: int) -> Sample:
    """The sample at `start`: memory = instances 1..`memory`, target = instance `target` (0: none),
    complete as `completeness` says."""
    held, mask, weights = patch_targets(ds.crop(label, start, patch, 0), target, memory)
    return Sample(ds.crop(image, start, patch, pads), held, mask, weights,
                  completeness(label, start, patch, target), target)
