import math

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage
from scipy.spatial.distance import cdist

from metrics import (
    BRATS_EMPTY_MASK_RULE,
    METRIC_KEYS,
    compute_metrics,
    describe_cases,
    describe_structures,
    dice,
    format_structure_table,
    overlap_metrics,
    structure_metrics,
    summarise,
    surface,
    worst_distance,
)


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


# ---- classes and regions of label maps

# The brief's tumour example: classes 1 edema, 2 non-enhancing, 3 enhancing, and the regions
# whole tumour {1, 2, 3}, tumour core {2, 3} and enhancing tumour {3}.
CLASSES = [("edema", (1,)), ("non-enhancing", (2,)), ("enhancing", (3,))]
REGIONS = [("whole tumour", (1, 2, 3)), ("tumour core", (2, 3)), ("enhancing tumour", (3,))]
ANISOTROPIC = (2.0, 0.8, 0.7)  # (sz, sy, sx) mm


def tumour_map(shape, rng) -> np.ndarray:
    """Smoothed noise cut at three levels: nested lumps of labels 1 < 2 < 3, like a tumour's
    edema around its core around its enhancing part, with concavities and islands."""
    field = ndimage.gaussian_filter(rng.random(shape), 1.5)
    lo, hi = np.percentile(field, (40, 97))
    return np.digitize(field, np.linspace(lo, hi, 4)[:3]).astype(np.uint8)


def random_label_pairs(count, seed):
    """`count` pairs of label maps of random shapes in which every class occurs in both maps."""
    rng = np.random.default_rng(seed)
    while count:
        shape = tuple(int(n) for n in rng.integers(10, 24, 3))
        pred, target = tumour_map(shape, rng), tumour_map(shape, rng)
        if all((pred == v).any() and (target == v).any() for v in (1, 2, 3)):
            count -= 1
            yield pred, target


def naive_rows(pred, target, structures, spacing):
    """The definition, on the full volume: `compute_metrics` of each structure's masks."""
    return [{"structure": name, **compute_metrics(np.isin(pred, v), np.isin(target, v), spacing=spacing)}
            for name, v in structures]


def test_structure_metrics_hand_computed():
    # One row of six voxels, 0.5 mm apart along x:
    # pred   0 1 1 2 3 0
    # target 0 1 2 2 3 3
    pred = np.array([[[0, 1, 1, 2, 3, 0]]], np.int16)
    target = np.array([[[0, 1, 2, 2, 3, 3]]], np.int16)
    rows = structure_metrics(pred, target, CLASSES + REGIONS[:2], spacing=(1.0, 1.0, 0.5))
    assert [r["structure"] for r in rows] == ["edema", "non-enhancing", "enhancing", "whole tumour", "tumour core"]
    edema, non_enhancing, enhancing, whole, core = rows
    # edema: pred {1, 2}, target {1}: tp 1, fp 1, fn 0, tn 4
    assert edema["dice"] == 2 / 3 and edema["iou"] == 1 / 2 and edema["precision"] == 1 / 2
    assert edema["recall"] == 1.0 and edema["specificity"] == 4 / 5
    assert edema["hd"] == 0.5  # pred's x = 2 is 0.5 mm from target's x = 1
    # non-enhancing: pred {3}, target {2, 3}; enhancing: pred {4}, target {4, 5}
    assert non_enhancing["dice"] == enhancing["dice"] == 2 / 3 and enhancing["hd"] == 0.5
    # whole tumour: pred {1, 2, 3, 4}, target {1, ..., 5}; tumour core: pred {3, 4}, target {2, ..., 5}
    assert whole["dice"] == 8 / 9 and whole["recall"] == 4 / 5 and whole["specificity"] == 1.0
    assert core["dice"] == 4 / 6 and core["iou"] == 2 / 4 and core["hd"] == 0.5


def test_per_class_overlap_agrees_with_simpleitk_label_overlap_measures():
    """SimpleITK (2.5.7, ITK 5.4) with the prediction as source image and the reference as
    target, per label: DiceCoefficient = 2|S n T| / (|S| + |T|) (computed from the Jaccard, so
    equal up to rounding), JaccardCoefficient = IoU, FalseNegativeError = |T \\ S| / |T| = 1 - recall,
    FalsePositiveError = |S \\ T| / |~T| = FP / (FP + TN) = 1 - specificity (not 1 - precision,
    which is its FalseDiscoveryRate)."""
    differs = 0
    for pred, target in random_label_pairs(6, seed=10):
        rows = structure_metrics(pred, target, CLASSES, spacing=ANISOTROPIC)
        f = sitk.LabelOverlapMeasuresImageFilter()
        f.Execute(to_sitk(pred, ANISOTROPIC), to_sitk(target, ANISOTROPIC))  # (source = prediction, target)
        for (_, (label,)), m in zip(CLASSES, rows):
            assert abs(m["dice"] - f.GetDiceCoefficient(label)) < 1e-12
            assert abs(m["iou"] - f.GetJaccardCoefficient(label)) < 1e-12
            assert abs((1 - m["recall"]) - f.GetFalseNegativeError(label)) < 1e-12
            assert abs((1 - m["specificity"]) - f.GetFalsePositiveError(label)) < 1e-12
            assert abs((1 - m["precision"]) - f.GetFalseDiscoveryRate(label)) < 1e-12
            differs += abs((1 - m["precision"]) - f.GetFalsePositiveError(label)) > 0.01
    assert differs == 18  # the false positive error is not 1 - precision on any label


def test_per_class_hd_equals_simpleitk_on_each_label_mask():
    # SimpleITK measures between all voxels of the two masks, we between their surface voxels.
    # A voxel outside the other mask has its nearest voxel of that mask on its surface, so the
    # two agree wherever the largest distance is from a part that sticks out, which is so for
    # every class of these random maps; they part only where a surface lies inside the other
    # mask (test_hd_is_measured_between_surfaces_not_foreground). Between the masks' contour
    # images SimpleITK measures what we measure, always.
    for pred, target in random_label_pairs(10, seed=11):
        rows = structure_metrics(pred, target, CLASSES, spacing=ANISOTROPIC)
        for (_, (label,)), m in zip(CLASSES, rows):
            a, b = pred == label, target == label
            assert abs(m["hd"] - sitk_hausdorff(to_sitk(a, ANISOTROPIC), to_sitk(b, ANISOTROPIC))) < 1e-4
            ca, cb = (sitk.BinaryContour(to_sitk(np.pad(x, 1), ANISOTROPIC), fullyConnected=False) for x in (a, b))
            assert abs(m["hd"] - sitk_hausdorff(ca, cb)) < 1e-4


def test_regions_equal_compute_metrics_on_the_union_of_their_classes():
    for pred, target in random_label_pairs(4, seed=12):
        rows = structure_metrics(pred, target, REGIONS, spacing=ANISOTROPIC)
        for (_, values), row in zip(REGIONS, rows):
            union_p = np.zeros(pred.shape, bool)
            union_t = np.zeros(pred.shape, bool)
            for v in values:
                union_p |= pred == v
                union_t |= target == v
            assert row == {"structure": row["structure"], **compute_metrics(union_p, union_t, spacing=ANISOTROPIC)}


def test_bounding_box_shortcut_equals_the_full_volume_computation():
    rng = np.random.default_rng(13)
    pred = np.zeros((40, 48, 36), np.int32)
    target = np.zeros_like(pred)
    pred[5:19, 20:36, 3:17] = tumour_map((14, 16, 14), rng)
    target[7:21, 18:34, 4:18] = tumour_map((14, 16, 14), rng)
    target[target == 2] = 1  # non-enhancing only in the prediction: absent in one map
    structures = CLASSES + REGIONS + [("necrosis", (4,)), ("edema or necrosis", (1, 4))]  # 4: absent in both
    for p, t in ((pred, target), (target, pred)):
        assert structure_metrics(p, t, structures, spacing=ANISOTROPIC) == naive_rows(p, t, structures, ANISOTROPIC)
    rows = {r["structure"]: r for r in structure_metrics(pred, target, structures, spacing=ANISOTROPIC)}
    assert rows["necrosis"] == compute_metrics(np.zeros((2, 2, 2)), np.zeros((2, 2, 2)), spacing=ANISOTROPIC) | {
        "structure": "necrosis"}
    # Missed everywhere: the full volume's diagonal, not the box's; its background is the full volume.
    assert rows["non-enhancing"]["hd"] == worst_distance(pred.shape, ANISOTROPIC)
    invented = np.count_nonzero(pred == 2)
    assert invented > 0 and not (target == 2).any()
    assert rows["non-enhancing"]["specificity"] == (pred.size - invented) / pred.size
    # Touching the volume's border on every side: the box is the whole volume.
    rim_p, rim_t = tumour_map((12, 14, 16), rng), tumour_map((12, 14, 16), rng)
    rim_p[0, 0, 0] = rim_t[-1, -1, -1] = 1
    rim_t[:, 0, 5] = 3
    assert structure_metrics(rim_p, rim_t, structures, spacing=ANISOTROPIC) == naive_rows(
        rim_p, rim_t, structures, ANISOTROPIC)


def test_structure_metrics_of_two_empty_maps_is_a_perfect_answer_for_every_structure():
    z = np.zeros((5, 6, 7), np.uint8)
    rows = structure_metrics(z, z.astype(np.int64), CLASSES, spacing=ANISOTROPIC)
    both_empty = compute_metrics(z, z, spacing=ANISOTROPIC)
    assert rows == [{"structure": name, **both_empty} for name, _ in CLASSES]


def test_structure_metrics_take_any_integer_dtype_alike():
    pred, target = next(random_label_pairs(1, seed=14))
    expected = structure_metrics(pred, target, REGIONS, spacing=ANISOTROPIC)
    for dtype in (np.int8, np.uint16, np.int32, np.int64):
        assert structure_metrics(pred.astype(dtype), target.astype(dtype), REGIONS, spacing=ANISOTROPIC) == expected


@pytest.mark.parametrize("pred, target, fragments", [
    (np.zeros((3, 4, 5)), np.zeros((3, 4, 5), np.uint8), ["float64", "uint8", "integer label maps"]),
    (np.zeros((3, 4, 5), np.uint8), np.zeros((3, 4, 5), bool), ["uint8", "bool", "integer label maps"]),
    (np.zeros((3, 4, 5), np.uint8), np.zeros((3, 4, 6), np.uint8), ["(3, 4, 5)", "(3, 4, 6)", "same shape"]),
])
def test_structure_metrics_rejects_bad_label_maps(pred, target, fragments):
    with pytest.raises(ValueError) as e:
        structure_metrics(pred, target, CLASSES, spacing=(1, 1, 1))
    assert all(f in str(e.value) for f in fragments), str(e.value)


@pytest.mark.parametrize("structures, fragments", [
    ([("core", ())], ["'core'", "()"]),
    ([("core", (2, 1.5))], ["'core'", "(2, 1.5)"]),
    ([("core", ("2",))], ["'core'", "('2',)"]),
    ([("core", (True,))], ["'core'", "(True,)"]),
    ([("all", (0, 1))], ["'all'", "(0, 1)", "background"]),
    ([("edema", 1)], ["'edema'", "got 1"]),
    ([("edema",)], ["(name, values) pairs", "('edema',)"]),
    ([("a", (1,)), ("a", (2,))], ["distinct names", "['a', 'a']"]),
    ([], ["at least one"]),
])
def test_structure_metrics_rejects_bad_structures(structures, fragments):
    z = np.zeros((3, 4, 5), np.uint8)
    with pytest.raises(ValueError) as e:
        structure_metrics(z, z, structures, spacing=(1, 1, 1))
    assert all(f in str(e.value) for f in fragments), str(e.value)


def test_structure_metrics_rejects_a_bad_spacing():
    z = np.zeros((3, 4, 5), np.uint8)
    with pytest.raises(ValueError, match="spacing"):
        structure_metrics(z, z, CLASSES, spacing=(1, 1))


# ---- summaries per structure


def structure_rows():
    return [{"case_id": "a", "structure": "whole tumour", "dice": 0.5, "hd": 4.0},
            {"case_id": "a", "structure": "enhancing", "dice": 1.0, "hd": 0.0},
            {"case_id": "b", "structure": "whole tumour", "dice": 1.0, "hd": 2.0},
            {"case_id": "b", "structure": "enhancing", "dice": 0.5, "hd": 6.0}]


def test_describe_structures_is_describe_cases_per_structure_in_order_of_appearance():
    described = describe_structures(structure_rows(), ("dice", "hd"))
    assert list(described) == ["whole tumour", "enhancing"]
    assert described["whole tumour"]["cases"] == 2
    assert described["whole tumour"]["dice"] == {"mean": 0.75, "std": 0.25, "median": 0.75}
    assert described["enhancing"]["hd"] == {"mean": 3.0, "std": 3.0, "median": 3.0}
    assert described["enhancing"] == describe_cases(structure_rows()[1::2], ("dice", "hd"))


def test_format_structure_table_has_one_line_per_structure():
    lines = format_structure_table(structure_rows(), ("dice", "hd")).splitlines()
    assert lines[0].split() == ["structure", "cases", "dice", "hd"]
    assert lines[1].split() == ["whole", "tumour", "2", "0.750+-0.250", "3.00+-1.00"]
    assert lines[2].split() == ["enhancing", "2", "0.750+-0.250", "3.00+-3.00"]
    assert lines[3] == "(hd in mm, between surface voxels)"


def test_brats_rule_names_our_worst_distance_on_the_brats_grid():
    # 240 x 240 x 155 voxels of 1 mm: CaPTk's diagonal in voxels is our diagonal in mm.
    assert f"{worst_distance((155, 240, 240), (1.0, 1.0, 1.0)):.2f}" == "373.13"
    assert "373.13" in BRATS_EMPTY_MASK_RULE and "374" in BRATS_EMPTY_MASK_RULE
