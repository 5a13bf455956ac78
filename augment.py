"""On-the-fly augmentation of (image, label) pairs: the horizontal flip, additive Gaussian noise,
small rotation about the depth axis and in-plane translation of the reference write-up
(VNet_PyTorch-Atriaseg2018), plus an in-plane elastic deformation (off by default, as in the
write-up) and intensity scaling (off by default: the defaults are the write-up's set), and the
command-line flags that set them (`plots.augmentation_grid` draws what they do).

Each transform takes `(image, label, rng)` with an explicit `numpy.random.Generator` and
returns `(image, label)`: image float32 (D, H, W), or (C, D, H, W) for C channels, label uint8
(D, H, W) of class indices. Image and label move together, every channel alike; the label is
resampled by nearest neighbour and keeps its values. Intensity transforms (scaling, noise) draw
per channel.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from utils import UserError


def flip_w(image, label, rng):
    """Mirror the W (left-right) axis."""
    return np.ascontiguousarray(image[..., ::-1]), np.ascontiguousarray(label[..., ::-1])


def gaussian_noise(image, label, rng, std: float = 0.1):
    """Add N(0, std^2) noise, std in units of the z-scored image."""
    return (image + rng.normal(0.0, std, image.shape)).astype(np.float32), label


def rotate_depth(image, label, rng, max_degrees: float = 3.0):
    """Rotate every axial slice by one angle in [-max, +max] degrees (about the D axis)."""
    angle = rng.uniform(-max_degrees, max_degrees)
    image = ndimage.rotate(image, angle, axes=(image.ndim - 2, image.ndim - 1), reshape=False, order=1, mode="nearest")
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
    if image.ndim == 4:  # each channel filled with its own minimum
        return np.stack([shift(channel, offset, float(channel.min())) for channel in image]), shift(label, offset, 0)
    return shift(image, offset, float(image.min())), shift(label, offset, 0)


def scale_intensity(image, label, rng, max_scale: float = 0.1, max_offset: float = 0.0):
    """Multiply by a factor drawn from [1 - max_scale, 1 + max_scale], then add an offset drawn
    from [-max_offset, +max_offset]. The image is z-scored, so the factor changes the contrast
    about the scan's mean (0) and the offset moves the mean, in units of the scan's std."""
    if image.ndim == 4:  # one factor and one offset per channel
        factor = rng.uniform(1.0 - max_scale, 1.0 + max_scale, (len(image), 1, 1, 1)).astype(np.float32)
        offset = rng.uniform(-max_offset, max_offset, (len(image), 1, 1, 1)).astype(np.float32)
        return (image * factor + offset).astype(np.float32), label
    factor = rng.uniform(1.0 - max_scale, 1.0 + max_scale)
    offset = rng.uniform(-max_offset, max_offset)
    return (image * np.float32(factor) + np.float32(offset)).astype(np.float32), label


# ----------------------------------------------------------------------------- elastic deformation

def bspline_basis(n: int, grid: int) -> np.ndarray:
    """(n, grid) float32 matrix whose column j is the cubic B-spline bump of control point j
    sampled on n voxels, the first and last control points on the first and last voxels.

    `basis @ c` equals `ndimage.zoom(c, n / grid, order=3, mode="nearest", prefilter=False)`;
    built once per axis, it upsamples a control grid axis by axis as matrix products, far
    faster than zooming the grid (docs/experiments.md). Rows sum to 1 and are
    non-negative, so every upsampled value is a weighted mean of control values.
    """
    basis = np.stack([ndimage.zoom(e, n / grid, order=3, mode="nearest", prefilter=False)
                      for e in np.eye(grid)], axis=1).astype(np.float32)
    assert basis.shape == (n, grid), f"basis of {grid} control points on {n} voxels has shape {basis.shape}"
    return basis


def elastic_field(shape, rng, magnitude: float, grid: int = 4) -> np.ndarray:
    """In-plane displacement field (2, D, H, W) float32 in voxels: (dH, dW) at every voxel.

    A coarse grid of `grid` control points per axis (fewer along an axis shorter than that)
    gets displacements drawn uniformly from [-magnitude, +magnitude] voxels per component; the
    field is their cubic B-spline blend (a free-form deformation), smooth, and never larger
    than `magnitude` because each value is a weighted mean of control values. The blend
    averages neighbours, so the largest displacement in a crop is typically below `magnitude`
    (docs/experiments.md).
    """
    g = [max(1, min(grid, n)) for n in shape]
    control = rng.uniform(-magnitude, magnitude, (2, *g)).astype(np.float32)
    bd, bh, bw = (bspline_basis(n, k) for n, k in zip(shape, g))
    return np.einsum("di,hj,wk,cijk->cdhw", bd, bh, bw, control, optimize=True)


def warp_in_plane(image, label, field):
    """Resample image (linear) and label (nearest neighbour) at (h + dH, w + dW) in every
    axial slice; `field` (2, D, H, W) as `elastic_field`. Outside the array both repeat their
    edge, so the two stay aligned up to the border.

    The displacement has no D component, so each slice is a 2D interpolation, with half the
    neighbours of a 3D linear one."""
    d, h, w = label.shape
    hh, ww = np.meshgrid(np.arange(h, dtype=np.float32), np.arange(w, dtype=np.float32), indexing="ij")
    out_image, out_label = np.empty_like(image), np.empty_like(label)
    channels = image if image.ndim == 4 else image[None]
    out_channels = out_image if image.ndim == 4 else out_image[None]
    for k in range(d):
        coords = np.stack([hh + field[0, k], ww + field[1, k]])  # (2, H, W)
        for channel, out in zip(channels, out_channels):
            ndimage.map_coordinates(channel[k], coords, output=out[k], order=1, mode="nearest")
        ndimage.map_coordinates(label[k], coords, output=out_label[k], order=0, mode="nearest")
    return out_image, out_label


def elastic_deform(image, label, rng, magnitude: float = 6.0, grid: int = 4):
    """Smooth random in-plane deformation of up to `magnitude` voxels (see `elastic_field`).

    In-plane only, like the rotation and translation: the through-plane (D) axis is the
    coarse one in LGE-MRI and in the locator's downscaled grid, and slices stay whole slices.
    The displacement still varies smoothly along D, so neighbouring slices deform alike."""
    image, label = warp_in_plane(image, label, elastic_field(label.shape, rng, magnitude, grid))
    return image, label


# ----------------------------------------------------------------------------- the augmenter

@dataclass
class Augmenter:
    """Applies each transform with its probability, in a fixed order: flip, rotation,
    translation, elastic deformation, intensity scaling, noise. `max_translation` and
    `elastic_magnitude` are in voxels of the arrays it is given; `noise_std` and
    `max_offset` in units of the z-scored image."""
    p_flip: float = 0.5
    p_noise: float = 0.3
    noise_std: float = 0.1
    p_rotate: float = 0.5
    max_degrees: float = 3.0
    p_translate: float = 0.5
    max_translation: int = 5
    p_elastic: float = 0.0
    elastic_magnitude: float = 6.0
    elastic_grid: int = 4
    p_scale: float = 0.0
    max_scale: float = 0.1
    max_offset: float = 0.0

    def __call__(self, image, label, rng: np.random.Generator):
        # A transform that is off draws nothing, so switching one on or off leaves the others'
        # random draws (and a seeded run's results) as they were.
        if self.p_flip > 0 and rng.random() < self.p_flip:
            image, label = flip_w(image, label, rng)
        if self.p_rotate > 0 and rng.random() < self.p_rotate:
            image, label = rotate_depth(image, label, rng, self.max_degrees)
        if self.p_translate > 0 and rng.random() < self.p_translate and self.max_translation > 0:
            image, label = translate_hw(image, label, rng, self.max_translation)
        if self.p_elastic > 0 and rng.random() < self.p_elastic and self.elastic_magnitude > 0:
            image, label = elastic_deform(image, label, rng, self.elastic_magnitude, self.elastic_grid)
        if self.p_scale > 0 and rng.random() < self.p_scale:
            image, label = scale_intensity(image, label, rng, self.max_scale, self.max_offset)
        if self.p_noise > 0 and rng.random() < self.p_noise:
            image, label = gaussian_noise(image, label, rng, self.noise_std)
        return image, label


def add_augment_args(group) -> None:
    """Add the augmentation flags to an argparse parser or argument group."""
    a = Augmenter()
    group.add_argument("--p_flip", type=float, default=a.p_flip, help="probability of mirroring W (left-right)")
    group.add_argument("--p_rotate", type=float, default=a.p_rotate, help="probability of an in-plane rotation")
    group.add_argument("--max_rotation", type=float,
                       help=f"largest rotation about the depth axis, degrees (unset: {a.max_degrees:g}, or the "
                            "caller's default)")
    group.add_argument("--p_translate", type=float, default=a.p_translate,
                       help="probability of an in-plane translation")
    group.add_argument("--max_translation", type=int, default=a.max_translation,
                       help="largest translation along H and/or W, full-resolution voxels")
    group.add_argument("--p_elastic", type=float, default=a.p_elastic,
                       help="probability of an in-plane elastic deformation (0: off, as in the reference)")
    group.add_argument("--elastic_magnitude", type=float, default=a.elastic_magnitude,
                       help="largest elastic displacement of a control point, full-resolution voxels")
    group.add_argument("--elastic_grid", type=int, default=a.elastic_grid,
                       help="elastic control points per axis (fewer: smoother, larger-scale deformation)")
    group.add_argument("--p_scale", type=float,
                       help=f"probability of an intensity scaling (unset: {a.p_scale:g}, or the caller's default)")
    group.add_argument("--max_scale", type=float, default=a.max_scale,
                       help="intensity factor drawn from [1 - max_scale, 1 + max_scale]")
    group.add_argument("--max_offset", type=float,
                       help="intensity offset drawn from [-max_offset, +max_offset], in z-score units "
                            f"(unset: {a.max_offset:g}, or the caller's default)")
    group.add_argument("--p_noise", type=float, default=a.p_noise, help="probability of additive Gaussian noise")
    group.add_argument("--noise_std", type=float, default=a.noise_std, help="noise std, in z-score units")
    group.add_argument("--augmentation_grid", metavar="PATH",
                       help="write a PNG of augmented training samples (axial slices, label contour) to PATH")


def augmenter_from_args(args, voxel_scale: float = 1.0) -> Augmenter:
    """The `Augmenter` of the flags added by `add_augment_args`, refusing impossible values.

    `voxel_scale` is how many full-resolution voxels one in-plane voxel of the augmented arrays
    spans (the locator's in-plane downscale factor, 4 by default); the translation and elastic
    magnitudes, given in full-resolution voxels, are divided by it. A translation that is on
    stays at least 1 voxel: 5 / 4 -> 1.
    """
    unset = Augmenter()
    args = argparse.Namespace(**{**vars(args), "p_scale": unset.p_scale if args.p_scale is None else args.p_scale,
                                 "max_offset": unset.max_offset if args.max_offset is None else args.max_offset,
                                 "max_rotation": unset.max_degrees if args.max_rotation is None else args.max_rotation})
    for name in ("p_flip", "p_rotate", "p_translate", "p_elastic", "p_scale", "p_noise"):
        if not 0 <= getattr(args, name) <= 1:
            raise UserError(f"--{name} {getattr(args, name)}: a probability must lie in [0, 1]")
    for name in ("max_rotation", "max_translation", "elastic_magnitude", "max_offset", "noise_std"):
        if not getattr(args, name) >= 0:
            raise UserError(f"--{name} {getattr(args, name)}: must be 0 or more")
    if args.elastic_grid < 2:
        raise UserError(f"--elastic_grid {args.elastic_grid}: must be 2 or more control points per axis")
    if not 0 <= args.max_scale < 1:
        raise UserError(f"--max_scale {args.max_scale}: must lie in [0, 1) so that the factor stays positive")
    assert voxel_scale > 0, f"voxel_scale must be positive, got {voxel_scale}"
    translation = max(1, round(args.max_translation / voxel_scale)) if args.max_translation > 0 else 0
    return Augmenter(p_flip=args.p_flip, p_noise=args.p_noise, noise_std=args.noise_std,
                     p_rotate=args.p_rotate, max_degrees=args.max_rotation,
                     p_translate=args.p_translate, max_translation=translation,
                     p_elastic=args.p_elastic, elastic_magnitude=args.elastic_magnitude / voxel_scale,
                     elastic_grid=args.elastic_grid, p_scale=args.p_scale, max_scale=args.max_scale,
                     max_offset=args.max_offset)
