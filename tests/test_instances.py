"""Instance segmentation scores (metrics.match_instances, metrics.instance_metrics) and
evaluate.py --instances."""
import csv

import numpy as np
import pytest

import dataset as ds
import evaluate
from conftest import assert_one_line_error, run_main
from metrics import check_instances, compute_metrics, instance_metrics, match_instances, worst_distance

SPACING = (2.0, 1.0, 1.0)


def four_vertebrae():
    """Four reference boxes of 6 x 6 x 6 voxels along z; the prediction swaps the numbers of the
    first two, shifts the third by two slices (Dice 2/3, 4 mm), misses the fourth and adds one."""
    ref = np.zeros((40, 10, 10), np.uint8)
    pred = np.zeros_like(ref)
    for k, z in enumerate((2, 10, 18, 26), 1):
        ref[z:z + 6, 2:8, 2:8] = k
    pred[2:8, 2:8, 2:8] = 2
    pred[10:16, 2:8, 2:8] = 1
    pred[20:26, 2:8, 2:8] = 3
    pred[34:38, 2:8, 2:8] = 4
    return pred, ref


def test_match_instances_pairs_swapped_numbers_and_leaves_missed_and_extra_out():
    pred, ref = four_vertebrae()
    assert match_instances(pred, ref) == [(2, 1, 1.0), (1, 2, 1.0), (3, 3, pytest.approx(2 / 3))]


def test_instance_metrics_rates_of_the_hand_built_case():
    pred, ref = four_vertebrae()
    rows, summary = instance_metrics(pred, ref, spacing=SPACING)
    worst = worst_distance(ref.shape, SPACING)
    assert [(r["ref_id"], r["pred_id"], r["detected"], r["identified"]) for r in rows] == [
        (1, 2, True, True), (2, 1, True, True), (3, 3, True, True), (4, 0, False, False), (0, 4, False, False)]
    assert rows[2]["centroid_mm"] == pytest.approx(4.0)  # two slices of 2 mm
    assert rows[3]["dice"] == 0.0 and rows[3]["hd95"] == rows[4]["assd"] == pytest.approx(worst)
    assert summary == {"ref_instances": 4, "pred_instances": 4, "matched": 3, "detected": 3, "detection_rate": 0.75,
                       "complete_instances": 4, "complete_detection_rate": 0.75, "false_instances": 1,
                       "identified": 3, "identification_rate": 0.75,
                       "dice": pytest.approx((1 + 1 + 2 / 3 + 0) / 4),
                       "hd95": pytest.approx(rows[2]["hd95"] / 4 + worst / 4),
                       "assd": pytest.approx(rows[2]["assd"] / 4 + worst / 4)}


def test_an_instance_cut_by_the_field_of_view_is_left_out_of_the_complete_rate():
    pred, ref = four_vertebrae()
    ref, pred = ref[4:], pred[4:]  # the first box now starts at slice 0: the field of view cuts it
    rows, summary = instance_metrics(pred, ref, spacing=SPACING)
    assert [r["complete"] for r in rows] == [False, True, True, True, False]
    assert summary["complete_instances"] == 3 and summary["complete_detection_rate"] == pytest.approx(2 / 3)
    assert summary["detection_rate"] == 0.75


def test_dice_of_exactly_one_half_is_not_a_detection():
    ref = np.zeros((20, 6, 6), np.uint8)
    pred = np.zeros_like(ref)
    ref[2:8, 1:5, 1:5] = 1
    pred[5:11, 1:5, 1:5] = 1  # half of each box overlaps: Dice exactly 0.5
    rows, summary = instance_metrics(pred, ref, spacing=(1.0, 1.0, 1.0))
    assert rows[0]["dice"] == 0.5 and rows[0]["pred_id"] == 1 and not rows[0]["detected"]
    assert summary["detection_rate"] == 0.0 and summary["false_instances"] == 1 and summary["matched"] == 1


def test_hungarian_matching_beats_greedy_on_total_dice():
    """Along z: references A = [0, 10), B = [10, 20); predictions X = [4, 14), Y = [0, 4).
    Dice(X, A) = 0.6 is the largest, so a greedy matcher pairs X-A and leaves Y unmatched (total
    0.6); the best pairing is Y-A (8/14) and X-B (0.4), total 0.971."""
    ref = np.zeros((24, 3, 3), np.uint8)
    pred = np.zeros_like(ref)
    ref[0:10], ref[10:20] = 1, 2
    pred[4:14], pred[0:4] = 1, 2
    pairs = match_instances(pred, ref)
    assert [(p, r) for p, r, _ in pairs] == [(2, 1), (1, 2)]
    assert [d for _, _, d in pairs] == [pytest.approx(8 / 14), pytest.approx(0.4)]

    d = np.array([[0.6, 0.4], [8 / 14, 0.0]])  # rows X, Y; columns A, B
    greedy, used_p, used_r = 0.0, set(), set()
    for i, j in sorted(np.ndindex(d.shape), key=lambda ij: -d[ij]):
        if i not in used_p and j not in used_r and d[i, j] > 0:
            greedy += d[i, j]
            used_p.add(i)
            used_r.add(j)
    assert greedy == pytest.approx(0.6)
    assert sum(d for _, _, d in pairs) == pytest.approx(0.4 + 8 / 14) and sum(d for _, _, d in pairs) > greedy + 0.3


def test_instance_scores_equal_compute_metrics_of_the_isolated_pair():
    rng = np.random.default_rng(0)
    ref = np.zeros((30, 24, 20), np.int16)
    ref[3:12, 4:16, 3:15] = 1
    ref[14:26, 6:20, 5:17] = 2
    noise = rng.random(ref.shape) < 0.15
    pred = np.where(noise, 0, ref).astype(np.int16)  # holes inside each instance
    pred[pred == 1] = 7  # a prediction may use any numbers
    pred[pred == 2] = 3
    pred[20:28, 10:14, 8:12] = 3  # grown into the background and the other instance's place
    spacing = (2.5, 0.8, 1.2)
    rows, _ = instance_metrics(pred, ref, spacing=spacing)
    assert [(r["ref_id"], r["pred_id"]) for r in rows] == [(1, 7), (2, 3)]
    for r in rows:
        expected = compute_metrics(pred == r["pred_id"], ref == r["ref_id"], spacing=spacing)
        for k in ("dice", "hd95", "assd"):
            assert r[k] == pytest.approx(expected[k], abs=1e-12), k
        assert 0 < expected["hd95"] and expected["dice"] < 1  # the check compares something non-trivial


@pytest.mark.parametrize("offset_mm, identified", [(15.0, True), (25.0, False)])
def test_identification_measures_centroids_in_mm_along_an_anisotropic_axis(offset_mm, identified):
    """z voxels are 2 mm, y and x 0.5 mm: 15 mm is 7.5 slices and 25 mm is 12.5 (both under 20
    in voxels, so a voxel count would identify both)."""
    ref = np.zeros((32, 8, 8), np.uint8)
    pred = np.zeros_like(ref)
    ref[0:30, 2:6, 2:6] = 1  # centroid z 14.5
    start = 15 if offset_mm == 15.0 else 25  # [15, 30): centroid z 22; [25, 30): z 27
    pred[start:30, 2:6, 2:6] = 1
    rows, summary = instance_metrics(pred, ref, spacing=(2.0, 0.5, 0.5))
    assert rows[0]["pred_id"] == 1 and rows[0]["centroid_mm"] == pytest.approx(offset_mm)
    assert rows[0]["identified"] is identified and summary["identification_rate"] == float(identified)


def test_no_reference_instance_follows_the_empty_mask_policy():
    empty = np.zeros((4, 4, 4), np.uint8)
    _, both = instance_metrics(empty, empty, spacing=(1.0, 1.0, 1.0))
    assert (both["detection_rate"], both["identification_rate"], both["dice"], both["hd95"]) == (1.0, 1.0, 1.0, 0.0)
    pred = empty.copy()
    pred[1, 1, 1] = 1
    rows, invented = instance_metrics(pred, empty, spacing=(1.0, 1.0, 1.0))
    assert rows == [{"ref_id": 0, "pred_id": 1, "dice": 0.0, "hd95": pytest.approx(np.sqrt(48)),
                     "assd": pytest.approx(np.sqrt(48)), "centroid_mm": pytest.approx(np.sqrt(48)),
                     "detected": False, "identified": False, "complete": False}]
    assert (invented["detection_rate"], invented["false_instances"], invented["dice"]) == (0.0, 1, 0.0)


def test_reference_instances_with_gaps_or_bad_values_are_refused():
    ref = np.zeros((4, 4, 4), np.uint8)
    ref[0], ref[2] = 1, 3
    with pytest.raises(ValueError, match="ref: instances must be numbered 1..N without gaps.*missing 2"):
        match_instances(np.zeros_like(ref), ref)
    with pytest.raises(ValueError, match="label.nii.gz: .*missing 2"):
        check_instances(ref, "label.nii.gz")
    with pytest.raises(ValueError, match="integer"):
        instance_metrics(np.zeros((4, 4, 4)), np.zeros((4, 4, 4)), spacing=(1, 1, 1))
    with pytest.raises(ValueError, match="same shape"):
        match_instances(np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4, 4), np.uint8))
    with pytest.raises(ValueError, match=">= 0"):
        match_instances(np.full((2, 2, 2), -1, np.int8), np.zeros((2, 2, 2), np.int8))


# --- evaluate.py --instances ------------------------------------------------------------------

PROPS = {"spacing": SPACING, "origin": (10.0, -5.0, 3.0), "direction": (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0)}


def write_instance_data(root):
    """An MSD-layout folder of two cases and their predictions: case_a as `four_vertebrae`,
    case_b predicted perfectly with its numbers reversed."""
    data, out = root / "data", root / "out"
    (data / "imagesTr").mkdir(parents=True)
    (data / "labelsTr").mkdir()
    out.mkdir()
    pred_a, ref_a = four_vertebrae()
    ref_b = ref_a.copy()
    pred_b = np.where(ref_b > 0, 5 - ref_b, 0).astype(np.uint8)
    for case, pred, ref in (("case_a", pred_a, ref_a), ("case_b", pred_b, ref_b)):
        ds.write_image(ref.astype(np.float32) * 10, PROPS, data / "imagesTr" / f"{case}.nii.gz")
        ds.write_image(ref, PROPS, data / "labelsTr" / f"{case}.nii.gz")
        ds.write_image(pred, PROPS, out / f"{case}.nrrd")
    return data, out


def instances(*args):
    return run_main(evaluate.main, "--instances", *args)


def test_evaluate_instances_prints_the_table_and_writes_both_csvs(tmp_path):
    data, out = write_instance_data(tmp_path)
    run = instances("--pred_dir", out, "--data_dir", data)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "mean +- std" in run.stdout and "detection_rate" in run.stdout and "in mm" in run.stdout
    assert "detected 7 (7 of the 8 complete ones), identified 7, false instances 1" in run.stdout
    rows = list(csv.DictReader(open(out / "instances.csv")))
    assert list(rows[0]) == list(evaluate.INSTANCE_COLUMNS)
    assert [(r["case_id"], r["ref_id"], r["pred_id"]) for r in rows] == [
        ("case_a", "1", "2"), ("case_a", "2", "1"), ("case_a", "3", "3"), ("case_a", "4", "0"), ("case_a", "0", "4"),
        ("case_b", "1", "4"), ("case_b", "2", "3"), ("case_b", "3", "2"), ("case_b", "4", "1")]
    assert float(rows[2]["dice"]) == pytest.approx(2 / 3) and float(rows[2]["centroid_mm"]) == pytest.approx(4.0)
    summary = {r["case_id"]: r for r in csv.DictReader(open(out / "instances_summary.csv"))}
    assert float(summary["case_a"]["detection_rate"]) == 0.75 and summary["case_a"]["false_instances"] == "1"
    assert float(summary["case_b"]["identification_rate"]) == 1.0 and float(summary["case_b"]["dice"]) == 1.0
    rerun = instances("--pred_dir", out, "--data_dir", data)  # replaces its own files
    assert rerun.returncode == 0, rerun.stderr


def test_evaluate_instances_missing_prediction_is_an_error_or_all_missed(tmp_path):
    data, out = write_instance_data(tmp_path)
    (out / "case_b.nrrd").unlink()
    assert_one_line_error(instances("--pred_dir", out, "--data_dir", data), "case_b", "--missing_as_empty")
    assert not (out / "instances.csv").exists()
    run = instances("--pred_dir", out, "--data_dir", data, "--missing_as_empty", "--csv", tmp_path / "s.csv")
    assert run.returncode == 0, run.stderr
    assert "scored as all missed (no prediction): case_b" in run.stdout
    summary = {r["case_id"]: r for r in csv.DictReader(open(tmp_path / "s_summary.csv"))}
    assert float(summary["case_b"]["detection_rate"]) == 0.0 and float(summary["case_b"]["dice"]) == 0.0


def bad_gap(data, out):
    label, props = ds.read_image(data / "labelsTr" / "case_b.nii.gz")
    ds.write_image(np.where(label == 2, 0, label).astype(np.uint8), props, data / "labelsTr" / "case_b.nii.gz")
    return "labelsTr/case_b.nii.gz", "missing 2"


def bad_grid(data, out):
    mask, props = ds.read_image(out / "case_a.nrrd")
    ds.write_image(mask, {**props, "origin": (0.0, 0.0, 0.0)}, out / "case_a.nrrd")
    return "case_a.nrrd", "grid"


def bad_values(data, out):
    mask, props = ds.read_image(out / "case_a.nrrd")
    ds.write_image(mask.astype(np.float32) + 0.5, props, out / "case_a.nrrd")
    return "case_a.nrrd", "not whole numbers"


@pytest.mark.parametrize("spoil", [bad_gap, bad_grid, bad_values])
def test_evaluate_instances_refuses_bad_files_writing_nothing(tmp_path, spoil):
    data, out = write_instance_data(tmp_path)
    fragments = spoil(data, out)
    assert_one_line_error(instances("--pred_dir", out, "--data_dir", data), *fragments)
    assert not (out / "instances.csv").exists() and not (out / "instances_summary.csv").exists()


def test_evaluate_instances_accepts_a_prediction_that_skips_numbers(tmp_path):
    data, out = write_instance_data(tmp_path)
    pred, props = ds.read_image(out / "case_a.nrrd")
    ds.write_image(np.where(pred > 0, pred * 10, 0).astype(np.uint8), props, out / "case_a.nrrd")  # 10, 20, 30, 40
    run = instances("--pred_dir", out, "--data_dir", data)
    assert run.returncode == 0, run.stderr
    rows = list(csv.DictReader(open(out / "instances.csv")))
    assert [r["pred_id"] for r in rows[:5]] == ["20", "10", "30", "0", "40"]


@pytest.mark.parametrize("flags, named", [
    (("--cardiac",), "--cardiac"), (("--crossval", "run"), "--crossval"), (("--regions", "a=1,2"), "--regions"),
    (("--plot", "x.png"), "--plot")])
def test_evaluate_instances_refuses_other_modes(tmp_path, flags, named):
    data, out = write_instance_data(tmp_path)
    assert_one_line_error(instances("--pred_dir", out, "--data_dir", data, *flags), "--instances", named)
    assert not (out / "instances.csv").exists()


def test_evaluate_instances_does_not_replace_a_file_it_did_not_write(tmp_path):
    data, out = write_instance_data(tmp_path)
    (out / "instances_summary.csv").write_text("someone's notes\n")
    assert_one_line_error(instances("--pred_dir", out, "--data_dir", data), "instances_summary.csv", "--overwrite")
    assert (out / "instances_summary.csv").read_text() == "someone's notes\n"
    assert not (out / "instances.csv").exists()
    run = instances("--pred_dir", out, "--data_dir", data, "--overwrite")
    assert run.returncode == 0, run.stderr
    assert (out / "instances_summary.csv").read_text().startswith("case_id,ref_instances,")
