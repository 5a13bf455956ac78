"""On-the-fly augmentation of (image, label) pairs, as in the reference write-up: horizontal
flip, additive Gaussian noise, small rotation about the depth axis, translation in-plane.

Each transform takes `(image, label, rng)` with an explicit `numpy.random.Generator` and
returns `(image, label)`: image float32 (D, H, W), label uint8 (D, H, W) in {0, 1}. Image and
label move together; the label is resampled by nearest neighbour and stays binary.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage


def flip_w(image, label, rng):
    """Mirror the W (left-right) axis."""
    return np.ascontiguousarray(image[..., ::-1]), np.ascontiguousarray(label[..., ::-1])


def gaussian_noise(image, label, rng, std: float = 0.1):
    """Add N(0, std^2) noise, std in units of the z-scored image."""
    return (image + rng.normal(0.0, std, image.shape)).astype(np.float32), label


def rotate_depth(image, label, rng, max_degrees: float = 3.0):
    """Rotate every axial slice by one angle in [-max, +max] degrees (about the D axis)."""
    angle = rng.uniform(-max_degrees, max_degrees)
    image = ndimage.rotate(image, angle, axes=(1, 2), reshape=False, order=1, mode="nearest")
    label = ndimage.rotate(label, angle, axes=(1, 2), reshape=False, order=0, mode="constant", cval=0)
    return image.astype(np.float32), label


def shift(array: np.ndarray, offset, fill) -> np.ndarray:
    """Translate by whole voxels `offset` (D, H, W), filling what comes in with `fill`."""
    out = np.full_like(array, fill)
    src = tuple(slice(max(-o, 0), n - max(o, 0)) for o, n in zip(offset, array.shape))
    dst = tuple(slice(max(o, 0), n - max(-o, 0)) for o, n in zip(offset, array.shape))
    out[dst] = array[src]
    return out


def translate_hw(image, label, rng, max_voxels: int = 5):
    """Translate by up to +-max_voxels along H and/or W (one, the other or both)."""
    offset = [0, 0, 0]
    axes = [[1], [2], [1, 2]][rng.integers(3)]
    for ax in axes:
        offset[ax] = int(rng.integers(-max_voxels, max_voxels + 1))
    return shift(image, offset, float(image.min())), shift(label, offset, 0)


@dataclass
class Augmenter:
    """Applies each transform with its probability; `max_translation` and `noise_std` are in
    the voxel and intensity units of the arrays it is given."""
    p_flip: float = 0.5
    p_noise: float = 0.3
    noise_std: float = 0.1
    p_rotate: float = 0.5
    max_degrees: float = 3.0
    p_translate: float = 0.5
    max_translation: int = 5

    def __call__(self, image, label, rng: np.random.Generator):
        if rng.random() < self.p_flip:
            image, label = flip_w(image, label, rng)
        if rng.random() < self.p_rotate:
            image, label = rotate_depth(image, label, rng, self.max_degrees)
        if rng.random() < self.p_translate and self.max_translation > 0:
            image, label = translate_hw(image, label, rng, self.max_translation)
        if rng.random() < self.p_noise:
            image, label = gaussian_noise(image, label, rng, self.noise_std)
        return image, label
