import argparse

import numpy as np
import pytest
from scipy import ndimage

import augment as A
from utils import UserError

SHAPE = (12, 40, 48)  # (D, H, W)


def phantom():
    """An off-centre ellipsoid label, kept 9+ voxels from the in-plane edges, and an image that
    is 100 inside it plus a smooth ramp of 0..10 everywhere: image > 50 recovers the label."""
    d, h, w = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in SHAPE], indexing="ij")
    label = (((d - 6) / 4) ** 2 + ((h - 17) / 8) ** 2 + ((w - 27) / 12) ** 2 <= 1).astype(np.uint8)
    image = (100 * label + 10 * (h / SHAPE[1]) * (w / SHAPE[2])).astype(np.float32)
    return image, label


TRANSFORMS = {
    "flip": lambda i, lab, rng: A.flip_w(i, lab, rng),
    "noise": lambda i, lab, rng: A.gaussian_noise(i, lab, rng, std=0.5),
    "rotate": lambda i, lab, rng: A.rotate_depth(i, lab, rng, max_degrees=3.0),
    "translate": lambda i, lab, rng: A.translate_hw(i, lab, rng, max_voxels=5),
    "elastic": lambda i, lab, rng: A.elastic_deform(i, lab, rng, magnitude=3.0, grid=4),
    "scale": lambda i, lab, rng: A.scale_intensity(i, lab, rng, max_scale=0.1, max_offset=0.2),
}
GEOMETRIC = ["flip", "rotate", "translate", "elastic"]
RANDOM = ["noise", "rotate", "translate", "elastic", "scale"]


def in_plane_band(label):
    """Voxels within one in-plane step of the label's boundary."""
    cross = ndimage.generate_binary_structure(2, 1)[None]  # (1, 3, 3): no step along D
    return ndimage.binary_dilation(label, cross) & ~ndimage.binary_erosion(label, cross)


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_transform_keeps_shape_dtype_and_binary_label(name):
    image, label = phantom()
    for seed in range(3):
        out_image, out_label = TRANSFORMS[name](image, label, np.random.default_rng(seed))
        assert out_image.shape == SHAPE and out_label.shape == SHAPE
        assert out_image.dtype == np.float32 and out_label.dtype == np.uint8
        assert set(np.unique(out_label).tolist()) == {0, 1}


@pytest.mark.parametrize("name", GEOMETRIC)
def test_geometric_transform_moves_image_and_label_together(name):
    image, label = phantom()
    moved = 0
    for seed in (3, 4, 5):  # rotations of 2.5, 2.7 and 1.8 degrees
        out_image, out_label = TRANSFORMS[name](image, label, np.random.default_rng(seed))
        moved += not np.array_equal(out_label, label)
        mismatch = (out_image > 50) != out_label.astype(bool)
        if name in ("flip", "translate"):  # whole-voxel moves: exact
            assert not mismatch.any()
        else:  # linear image vs nearest-neighbour label may disagree on the boundary only
            assert not (mismatch & ~in_plane_band(out_label)).any()
            assert mismatch.sum() <= 0.05 * label.sum(), (mismatch.sum(), label.sum())
        if name != "elastic":  # rigid: the structure keeps its volume (it stays inside the array)
            assert abs(int(out_label.sum()) - int(label.sum())) <= 0.02 * label.sum()
    assert moved >= 2, moved  # a small angle or a zero offset may leave one draw in place


def test_flip_mirrors_w_and_twice_is_identity():
    image, label = phantom()
    out_image, out_label = A.flip_w(image, label, None)
    assert np.array_equal(out_label, label[..., ::-1]) and np.array_equal(out_image, image[..., ::-1])
    assert np.array_equal(A.flip_w(out_image, out_label, None)[1], label)


def test_translation_is_a_whole_voxel_shift_in_range():
    image, label = phantom()
    found = []
    for seed in range(6):
        _, out_label = A.translate_hw(image, label, np.random.default_rng(seed), max_voxels=5)
        offsets = [(0, dh, dw) for dh in range(-5, 6) for dw in range(-5, 6)
                   if np.array_equal(A.shift(label, (0, dh, dw), 0), out_label)]
        assert len(offsets) == 1, (seed, offsets)
        found += offsets
    assert len(set(found)) > 3  # (0, 0, 0) may be drawn, but not always


@pytest.mark.parametrize("name", RANDOM)
def test_same_seed_same_output_and_other_seeds_differ(name):
    image, label = phantom()
    first = TRANSFORMS[name](image, label, np.random.default_rng(7))
    again = TRANSFORMS[name](image, label, np.random.default_rng(7))
    assert np.array_equal(first[0], again[0]) and np.array_equal(first[1], again[1])
    others = [TRANSFORMS[name](image, label, np.random.default_rng(s))[0] for s in range(3)]
    assert not any(np.array_equal(first[0], o) for o in others)


def test_elastic_with_magnitude_zero_is_identity():
    image, label = phantom()
    out_image, out_label = A.elastic_deform(image, label, np.random.default_rng(0), magnitude=0.0)
    assert np.array_equal(out_image, image) and np.array_equal(out_label, label)


def test_elastic_field_is_in_plane_smooth_and_bounded_by_magnitude():
    field = A.elastic_field(SHAPE, np.random.default_rng(1), magnitude=3.0, grid=4)
    assert field.shape == (2, *SHAPE) and field.dtype == np.float32
    assert np.abs(field).max() <= 3.0 and np.abs(field).max() > 1.0
    # Smooth: between neighbouring voxels the displacement changes by at most the largest
    # control-point difference (2 x magnitude) over the control spacing (n - 1) / (grid - 1).
    for axis, n in zip((1, 2, 3), SHAPE):
        assert np.abs(np.diff(field, axis=axis)).max() <= 2 * 3.0 / ((n - 1) / 3), axis


def test_bspline_basis_agrees_with_ndimage_zoom():
    control = np.random.default_rng(2).uniform(-1, 1, (3, 4, 5))
    shape = (12, 40, 48)
    zoomed = ndimage.zoom(control, [n / g for n, g in zip(shape, control.shape)], order=3, mode="nearest",
                          prefilter=False)
    bd, bh, bw = (A.bspline_basis(n, g) for n, g in zip(shape, control.shape))
    ours = np.einsum("di,hj,wk,ijk->dhw", bd, bh, bw, control)
    assert zoomed.shape == shape
    np.testing.assert_allclose(ours, zoomed, atol=1e-6)
    assert np.allclose(bd.sum(axis=1), 1) and bd.min() >= 0  # a weighted mean of control values


def test_warp_with_constant_whole_voxel_field_equals_translation():
    image, label = phantom()
    field = np.stack([np.full(SHAPE, 2, np.float32), np.full(SHAPE, -3, np.float32)])
    out_image, out_label = A.warp_in_plane(image, label, field)
    # Sampling at (h + 2, w - 3) moves the content by (-2, +3); edges differ (repeated, not filled).
    inner = (slice(None), slice(0, SHAPE[1] - 2), slice(3, None))
    assert np.array_equal(out_label[inner], A.shift(label, (0, -2, 3), 0)[inner])
    assert np.array_equal(out_image[inner], A.shift(image, (0, -2, 3), 0)[inner])


def test_scale_intensity_factor_and_offset_stay_in_range():
    ones, label = np.ones(SHAPE, np.float32), np.zeros(SHAPE, np.uint8)
    values = [A.scale_intensity(ones, label, np.random.default_rng(s), 0.1, 0.0)[0] for s in range(20)]
    assert all(np.all(v == v.flat[0]) for v in values)  # one factor per volume
    factors = np.array([v.flat[0] for v in values])
    assert factors.min() >= 0.9 - 1e-6 and factors.max() <= 1.1 + 1e-6 and factors.std() > 0.02
    zeros = np.zeros(SHAPE, np.float32)
    offsets = np.array([A.scale_intensity(zeros, label, np.random.default_rng(s), 0.1, 0.2)[0].flat[0]
                        for s in range(20)])
    assert np.abs(offsets).max() <= 0.2 + 1e-6 and offsets.std() > 0.02


def test_augmenter_with_every_probability_zero_is_identity():
    image, label = phantom()
    off = A.Augmenter(p_flip=0, p_noise=0, p_rotate=0, p_translate=0, p_elastic=0, p_scale=0)
    out_image, out_label = off(image, label, np.random.default_rng(0))
    assert np.array_equal(out_image, image) and np.array_equal(out_label, label)


def test_augmenter_with_everything_on_is_reproducible_and_keeps_types():
    image, label = phantom()
    on = A.Augmenter(p_flip=1, p_noise=1, p_rotate=1, p_translate=1, p_elastic=1, elastic_magnitude=3, p_scale=1)
    a = on(image, label, np.random.default_rng([0, 1, 2]))
    b = on(image, label, np.random.default_rng([0, 1, 2]))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert a[0].dtype == np.float32 and a[1].dtype == np.uint8 and set(np.unique(a[1]).tolist()) == {0, 1}
    assert not np.array_equal(a[1], label)
    assert A.Augmenter().p_elastic == 0  # off by default, as in the reference


def parse(*argv):
    p = argparse.ArgumentParser()
    A.add_augment_args(p.add_argument_group("augmentation"))
    return p.parse_args(list(argv))


def test_augmenter_from_args_defaults_match_the_dataclass_and_voxel_scale_shrinks_magnitudes():
    assert A.augmenter_from_args(parse()) == A.Augmenter()
    assert parse().augmentation_grid is None
    locator = A.augmenter_from_args(parse("--p_elastic", "0.2", "--elastic_magnitude", "6"), voxel_scale=4)
    assert locator.max_translation == 1  # round(5 / 4), as train.py's locator had it
    assert locator.elastic_magnitude == 1.5 and locator.p_elastic == 0.2
    assert A.augmenter_from_args(parse("--max_translation", "0"), voxel_scale=4).max_translation == 0
    assert A.augmenter_from_args(parse("--max_translation", "1"), voxel_scale=4).max_translation == 1
    args = parse("--max_rotation", "2", "--p_scale", "1", "--max_scale", "0.2", "--max_offset", "0.1",
                 "--elastic_grid", "6", "--augmentation_grid", "grid.png")
    aug = A.augmenter_from_args(args)
    assert (aug.max_degrees, aug.p_scale, aug.max_scale, aug.max_offset, aug.elastic_grid) == (2, 1, 0.2, 0.1, 6)
    assert args.augmentation_grid == "grid.png"


@pytest.mark.parametrize("flag, value", [("--p_flip", "1.5"), ("--p_elastic", "-0.1"), ("--noise_std", "-1"),
                                         ("--max_translation", "-2"), ("--elastic_magnitude", "-1"),
                                         ("--elastic_grid", "1"), ("--max_scale", "1"), ("--max_offset", "-0.5")])
def test_augmenter_from_args_refuses_impossible_values_naming_the_flag(flag, value):
    with pytest.raises(UserError, match=f"^{flag} {value}"):
        A.augmenter_from_args(parse(flag, value))


def test_a_transform_that_is_off_draws_nothing():
    """Switching elastic or scaling on must not be needed to reproduce a run without them:
    with them off, the other transforms see exactly the draws they saw before they existed."""
    image = np.linspace(0, 1, 8 * 16 * 16, dtype=np.float32).reshape(8, 16, 16)
    label = (image > 0.5).astype(np.uint8)
    rng_a, rng_b = np.random.default_rng(7), np.random.default_rng(7)
    A.Augmenter(p_elastic=0, p_scale=0)(image, label, rng_a)
    # The draws of the four reference transforms alone, in order.
    if rng_b.random() < 0.5:
        A.flip_w(image, label, rng_b)
    if rng_b.random() < 0.5:
        A.rotate_depth(image, label, rng_b, 3.0)
    if rng_b.random() < 0.5:
        A.translate_hw(image, label, rng_b, 5)
    if rng_b.random() < 0.3:
        A.gaussian_noise(image, label, rng_b, 0.1)
    assert rng_a.random() == rng_b.random()
