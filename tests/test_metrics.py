import numpy as np
import SimpleITK as sitk

from metrics import compute_metrics, overlap_metrics


def masks():
    a = np.zeros((4, 5, 6), np.uint8)
    b = np.zeros((4, 5, 6), np.uint8)
    a[1:3, 1:4, 1:4] = 1  # 18 voxels
    b[1:3, 2:5, 1:4] = 1  # 18 voxels, 12 shared
    return a, b


def test_overlap_metrics_hand_computed():
    a, b = masks()
    m = overlap_metrics(a, b)
    assert m["dice"] == 2 * 12 / 36
    assert m["iou"] == 12 / 24  # |A n B| / |A u B|, not the write-up's inverse
    assert m["precision"] == 12 / 18 and m["recall"] == 12 / 18
    assert m["specificity"] == (120 - 24) / (120 - 18)


def test_overlap_metrics_agree_with_simpleitk():
    rng = np.random.default_rng(0)
    a = (rng.random((10, 12, 14)) < 0.3).astype(np.uint8)
    b = (rng.random((10, 12, 14)) < 0.4).astype(np.uint8)
    f = sitk.LabelOverlapMeasuresImageFilter()
    f.Execute(sitk.GetImageFromArray(b), sitk.GetImageFromArray(a))
    m = overlap_metrics(a, b)
    assert abs(m["dice"] - f.GetDiceCoefficient()) < 1e-12
    assert abs(m["iou"] - f.GetJaccardCoefficient()) < 1e-12


def test_both_empty_is_a_perfect_answer():
    z = np.zeros((3, 3, 3), np.uint8)
    assert compute_metrics(z, z, spacing=(1, 1, 1)) == {
        "dice": 1.0, "iou": 1.0, "precision": 1.0, "recall": 1.0, "specificity": 1.0}


def test_missed_or_invented_atrium_scores_zero_not_nan():
    z = np.zeros((3, 3, 3), np.uint8)
    o = z.copy()
    o[1, 1, 1] = 1
    missed = overlap_metrics(z, o)
    invented = overlap_metrics(o, z)
    assert missed["dice"] == 0 and missed["precision"] == 0 and missed["recall"] == 0
    assert invented["dice"] == 0 and invented["precision"] == 0 and invented["recall"] == 0
