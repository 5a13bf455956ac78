import math

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage
from scipy.spatial.distance import cdist

from metrics import METRIC_KEYS, compute_metrics, dice, overlap_metrics, summarise, surface, worst_distance


def masks():
    a = np.zeros((4, 5, 6), np.uint8)
    b = np.zeros((4, 5, 6), np.uint8)
    a[1:3, 1:4, 1:4] = 1  # 18 voxels
    b[1:3, 2:5, 1:4] = 1  # 18 voxels, 12 shared
    return a, b


def ellipsoid(shape, rng) -> np.ndarray:
    grid = np.ogrid[tuple(slice(0, n) for n in shape)]
    centre = [rng.uniform(0.3 * n, 0.7 * n) for n in shape]
    radii = [rng.uniform(0.15 * n, 0.35 * n) for n in shape]
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)) <= 1


def irregular_blob(shape, rng) -> np.ndarray:
    """Smoothed noise thresholded: several lumps, concavities and sometimes holes."""
    return ndimage.binary_opening(ndimage.gaussian_filter(rng.random(shape), 1.5) > 0.5)


def random_pairs(make, count, seed):
    """`count` non-empty mask pairs of random shapes (8 to 23 voxels per axis) and spacings."""
    rng = np.random.default_rng(seed)
    while count:
        shape = tuple(int(n) for n in rng.integers(8, 24, 3))
        spacing = rng.uniform(0.3, 2.5, 3)  # (sz, sy, sx) mm, different per axis
        a, b = make(shape, rng), make(shape, rng)
        if a.any() and b.any():
            count -= 1
            yield a, b, spacing


def to_sitk(mask: np.ndarray, spacing) -> sitk.Image:
    img = sitk.GetImageFromArray(mask.astype(np.uint8))
    img.SetSpacing(tuple(float(s) for s in reversed(spacing)))  # SimpleITK is (x, y, z)
    return img


def sitk_hausdorff(a: sitk.Image, b: sitk.Image) -> float:
    f = sitk.HausdorffDistanceImageFilter()
    f.Execute(a, b)
    return f.GetHausdorffDistance()


def brute_force_distances(a, b, spacing):
    """Independent reference: scipy's erosion for the surfaces, all pairwise distances."""
    pa = np.argwhere(a & ~ndimage.binary_erosion(a)) * spacing
    pb = np.argwhere(b & ~ndimage.binary_erosion(b)) * spacing
    d = cdist(pa, pb)
    return d.min(axis=1), d.min(axis=0)


# ---- overlap ratios


def test_overlap_metrics_hand_computed():
    a, b = masks()
    m = overlap_metrics(a, b)
    assert m["dice"] == 2 * 12 / 36
    assert m["iou"] == 12 / 24  # |A n B| / |A u B|, not the write-up's inverse
    assert m["precision"] == 12 / 18 and m["recall"] == 12 / 18
    assert m["specificity"] == (120 - 24) / (120 - 18)
    assert dice(a, b) == m["dice"]


def test_compute_metrics_counts_like_overlap_metrics():
    a, b = masks()
    m = compute_metrics(a, b, spacing=(1, 1, 1))
    assert list(m) == list(METRIC_KEYS)
    assert {k: m[k] for k in overlap_metrics(a, b)} == overlap_metrics(a, b)


def test_overlap_metrics_agree_with_simpleitk():
    for a, b, spacing in random_pairs(irregular_blob, 5, seed=0):
        f = sitk.LabelOverlapMeasuresImageFilter()
        f.Execute(to_sitk(b, spacing), to_sitk(a, spacing))  # (target, prediction)
        m = compute_metrics(a, b, spacing=spacing)
        assert abs(m["dice"] - f.GetDiceCoefficient()) < 1e-12
        assert abs(m["iou"] - f.GetJaccardCoefficient()) < 1e-12


# ---- surfaces


def test_surface_of_a_cube_is_all_but_its_centre():
    m = np.zeros((5, 5, 5), bool)
    m[1:4, 1:4, 1:4] = True
    expected = m.copy()
    expected[2, 2, 2] = False
    assert np.array_equal(surface(m), expected)


def test_surface_counts_outside_the_array_as_background():
    full = np.ones((3, 4, 5), bool)
    # Only the 1 x 2 x 3 core has all six face neighbours inside the array.
    assert np.count_nonzero(surface(full)) == 60 - 6


def test_surface_equals_scipy_erosion_and_simpleitk_contour():
    for a, _, _ in random_pairs(irregular_blob, 10, seed=1):
        assert np.array_equal(surface(a), a & ~ndimage.binary_erosion(a))
        # SimpleITK's contour does not count the image border as background: pad first.
        contour = sitk.BinaryContour(to_sitk(np.pad(a, 1), (1, 1, 1)), fullyConnected=False)
        assert np.array_equal(np.pad(surface(a), 1), sitk.GetArrayFromImage(contour) > 0)


# ---- distances, hand-computed


def test_distances_on_a_line_hand_computed():
    # Every voxel of a 1-voxel-thin line is surface. dA = x 0..2, dB = x 0..5, 0.5 mm apart:
    # A -> B: 0, 0, 0;  B -> A: 0, 0, 0, 0.5, 1.0, 1.5.
    a = np.zeros((1, 1, 8), bool)
    b = a.copy()
    a[0, 0, 0:3] = True
    b[0, 0, 0:6] = True
    m = compute_metrics(a, b, spacing=(1.0, 1.0, 0.5))
    assert m["hd"] == 1.5
    # 95th percentile of B -> A: position 0.95 * 5 = 4.75 between 1.0 and 1.5.
    assert m["hd95"] == pytest.approx(1.375, abs=1e-12)
    # medpy pools both directions: position 0.95 * 8 = 7.6 between 1.0 and 1.5 -> 1.3.
    assert m["hd95"] != pytest.approx(1.3)
    assert m["assd"] == pytest.approx(3.0 / 9, abs=1e-12)
    assert m["dice"] == 6 / 9 and m["iou"] == 3 / 6 and m["precision"] == 1 and m["recall"] == 0.5
    assert m["specificity"] == 1.0


def test_distances_of_two_cubes_with_anisotropic_spacing_hand_computed():
    # A is a 3x3x3 cube, B the same with a fourth layer in z; spacing z 2, y 1, x 0.5 mm.
    # dA (26 voxels) and dB (34) share 25. A's (3, 2, 2) lies inside B, 0.5 mm from dB (along x);
    # B's 9 voxels of layer z = 4 are 2 mm from dA (along z).
    a = np.zeros((6, 5, 5), bool)
    b = a.copy()
    a[1:4, 1:4, 1:4] = True
    b[1:5, 1:4, 1:4] = True
    m = compute_metrics(a, b, spacing=(2.0, 1.0, 0.5))
    assert m["hd"] == 2.0
    assert m["hd95"] == 2.0  # B -> A: position 0.95 * 33 = 31.35, in the run of 2.0s
    assert m["assd"] == pytest.approx((0.5 + 9 * 2.0) / 60, abs=1e-12)
    assert m["dice"] == 2 * 27 / 63


def test_one_voxel_each():
    a = np.zeros((3, 4, 5), bool)
    b = a.copy()
    a[0, 0, 0] = True
    b[2, 3, 4] = True
    m = compute_metrics(a, b, spacing=(1.5, 1.0, 2.0))
    d = math.sqrt(3.0**2 + 3.0**2 + 8.0**2)
    assert m["hd"] == pytest.approx(d) and m["hd95"] == pytest.approx(d) and m["assd"] == pytest.approx(d)


def test_identical_masks_have_zero_distances():
    for a, _, spacing in random_pairs(irregular_blob, 3, seed=2):
        m = compute_metrics(a, a, spacing=spacing)
        assert m["hd"] == m["hd95"] == m["assd"] == 0.0 and m["dice"] == 1.0


# ---- distances against independent implementations


def test_distances_agree_with_brute_force():
    for a, b, spacing in random_pairs(irregular_blob, 10, seed=3):
        d_ab, d_ba = brute_force_distances(a, b, spacing)
        m = compute_metrics(a, b, spacing=spacing)
        assert m["hd"] == pytest.approx(max(d_ab.max(), d_ba.max()), abs=1e-9)
        assert m["hd95"] == pytest.approx(max(np.percentile(d_ab, 95), np.percentile(d_ba, 95)), abs=1e-9)
        assert m["assd"] == pytest.approx(np.concatenate([d_ab, d_ba]).mean(), abs=1e-9)


def test_hd_and_assd_equal_medpy_whose_hd95_pools_both_directions():
    """medpy 0.5.2 (requirements-dev.txt) measures from the same surface voxels (connectivity 1).
    Its assd pools both directions since 0.5.2, as ours does; its hd95 takes the percentile of
    the pooled distances, where ours takes the larger of the two directed percentiles."""
    medpy = pytest.importorskip("medpy.metric.binary")
    differs = 0
    for a, b, spacing in random_pairs(irregular_blob, 30, seed=6):
        m = compute_metrics(a, b, spacing=spacing)
        assert m["hd"] == pytest.approx(medpy.hd(a, b, voxelspacing=spacing, connectivity=1), abs=1e-9)
        assert m["assd"] == pytest.approx(medpy.assd(a, b, voxelspacing=spacing, connectivity=1), abs=1e-9)
        d_ab, d_ba = brute_force_distances(a, b, spacing)
        theirs = medpy.hd95(a, b, voxelspacing=spacing, connectivity=1)
        assert theirs == pytest.approx(np.percentile(np.concatenate([d_ab, d_ba]), 95), abs=1e-9)
        differs += abs(theirs - m["hd95"]) > 1e-6
    assert differs > 15  # and the two hd95 conventions do differ on most pairs


def test_hd_equals_simpleitk_on_random_anisotropic_ellipsoids():
    # SimpleITK's filter measures between all foreground voxels, we between surfaces. For a
    # voxel outside the other mask the nearest foreground voxel of that mask is on its surface
    # (an interior voxel always has a neighbour one step closer), so both measure the same
    # distance for the parts of one mask that stick out of the other. Where a surface lies
    # inside the other mask they part: foreground gives 0 there, surfaces do not (see the hole
    # test below). For two convex shapes the largest distance is between parts that stick out,
    # so the two definitions agree, here on 40 pairs with a different spacing per axis.
    for a, b, spacing in random_pairs(ellipsoid, 40, seed=4):
        expected = sitk_hausdorff(to_sitk(a, spacing), to_sitk(b, spacing))
        assert abs(compute_metrics(a, b, spacing=spacing)["hd"] - expected) < 1e-4


def test_hd_equals_simpleitk_on_surfaces_of_random_shapes():
    # Any shapes, holes and concavities included: SimpleITK measures between surface images
    # that its own contour filter extracts (face connectivity, after padding).
    for a, b, spacing in random_pairs(irregular_blob, 15, seed=5):
        sa, sb = (sitk.BinaryContour(to_sitk(np.pad(m, 1), spacing), fullyConnected=False) for m in (a, b))
        assert abs(compute_metrics(a, b, spacing=spacing)["hd"] - sitk_hausdorff(sa, sb)) < 1e-4


def test_hd_is_measured_between_surfaces_not_foreground():
    # A prediction with a one-voxel hole in an 11^3 cube: the hole's walls are surface, 4 voxels
    # from the cube's faces; every foreground voxel of either mask is within 1 voxel of the other.
    target = np.zeros((13, 13, 13), bool)
    target[1:12, 1:12, 1:12] = True
    pred = target.copy()
    pred[6, 6, 6] = False
    assert sitk_hausdorff(to_sitk(pred, (1, 1, 1)), to_sitk(target, (1, 1, 1))) == 1.0
    assert compute_metrics(pred, target, spacing=(1, 1, 1))["hd"] == 4.0


# ---- empty masks


def test_both_empty_is_a_perfect_answer():
    z = np.zeros((3, 3, 3), np.uint8)
    assert compute_metrics(z, z, spacing=(1, 1, 1)) == {
        "dice": 1.0, "iou": 1.0, "precision": 1.0, "recall": 1.0, "specificity": 1.0,
        "hd": 0.0, "hd95": 0.0, "assd": 0.0}


def test_missed_or_invented_atrium_scores_zero_and_the_worst_distance():
    z = np.zeros((3, 4, 5), np.uint8)
    o = z.copy()
    o[1, 1, 1] = 1
    diagonal = math.sqrt((3 * 2.0) ** 2 + (4 * 1.0) ** 2 + (5 * 0.5) ** 2)
    assert worst_distance(z.shape, (2.0, 1.0, 0.5)) == pytest.approx(diagonal)
    missed = compute_metrics(z, o, spacing=(2.0, 1.0, 0.5))
    invented = compute_metrics(o, z, spacing=(2.0, 1.0, 0.5))
    for m in (missed, invented):
        assert m["dice"] == 0 and m["iou"] == 0 and m["precision"] == 0 and m["recall"] == 0
        assert m["hd"] == m["hd95"] == m["assd"] == pytest.approx(diagonal)
        assert all(math.isfinite(v) for v in m.values())
    assert missed["specificity"] == 1.0  # nothing predicted: no false positive
    assert invented["specificity"] == 59 / 60


def test_worst_distance_exceeds_any_real_distance():
    a = np.zeros((4, 5, 6), bool)
    b = a.copy()
    a[0, 0, 0] = b[-1, -1, -1] = True
    spacing = (2.0, 1.0, 0.5)
    assert compute_metrics(a, b, spacing=spacing)["hd"] < worst_distance(a.shape, spacing)


def test_zero_denominators_follow_the_emptiness_agreement():
    z = np.zeros((2, 2, 2), np.uint8)
    full = np.ones_like(z)
    # Everything is atrium and everything was predicted: no background to be specific about.
    assert compute_metrics(full, full, spacing=(1, 1, 1))["specificity"] == 1.0
    # Everything is atrium but nothing was predicted: the background is invented.
    assert compute_metrics(z, full, spacing=(1, 1, 1))["specificity"] == 0.0


# ---- inputs


def test_compute_metrics_takes_bool_integer_and_float_masks_alike():
    a, b = masks()
    expected = compute_metrics(a.astype(bool), b.astype(bool), spacing=(1.0, 0.7, 0.7))
    for dtype in (np.uint8, np.int32, np.float32, np.float64):
        assert compute_metrics(a.astype(dtype), b.astype(dtype), spacing=(1.0, 0.7, 0.7)) == expected


@pytest.mark.parametrize("pred, spacing, fragment", [
    (np.zeros((4, 5, 7)), (1, 1, 1), "same shape"),
    (masks()[0] * 2, (1, 1, 1), "values 2"),
    (np.full((4, 5, 6), 0.5), (1, 1, 1), "binary mask"),
    (np.full((4, 5, 6), np.nan), (1, 1, 1), "binary mask"),
    (np.zeros((4, 5, 6), "U1"), (1, 1, 1), "dtype"),
    (np.zeros((4, 5, 6)), (1, 1), "spacing"),
    (np.zeros((4, 5, 6)), (1, 0, 1), "spacing"),
    (np.zeros((4, 5, 6)), (1, np.inf, 1), "spacing"),
])
def test_compute_metrics_rejects_bad_input(pred, spacing, fragment):
    _, target = masks()
    with pytest.raises(ValueError) as e:
        compute_metrics(pred, target, spacing=spacing)
    assert fragment in str(e.value)


def test_summarise_is_mean_and_population_std():
    rows = [{"dice": 0.5, "hd": 1.0}, {"dice": 0.7, "hd": 3.0}]
    stats = summarise(rows, ("dice", "hd"))
    assert stats["dice"] == pytest.approx((0.6, 0.1)) and stats["hd"] == pytest.approx((2.0, 1.0))
