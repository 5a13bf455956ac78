import csv

import numpy as np

import dataset as ds
from conftest import assert_one_line_error, run_script


def write_predictions(data, out, drop=()):
    """Predictions = the labels themselves, one voxel removed, except the `drop`ped cases."""
    for case in ds.find_cases(data, require_labels=True):
        if case.case_id in drop:
            continue
        label, props = ds.read_image(case.label)
        pred = (label > 0).astype(np.uint8)
        lo, _ = ds.bounding_box(pred)
        pred[tuple(lo)] = 0 if pred[tuple(lo)] else pred[tuple(lo)]
        ds.write_image(pred, props, out / f"{case.case_id}.nrrd")


def test_evaluate_scores_every_case_and_writes_csv(tiny_data, tmp_path):
    write_predictions(tiny_data, tmp_path)
    proc = run_script("evaluate.py", "--pred_dir", tmp_path, "--data_dir", tiny_data, "--csv", tmp_path / "s.csv")
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader(open(tmp_path / "s.csv")))
    assert [r["case_id"] for r in rows] == ["case_000", "case_001", "case_002", "case_003"]
    for r in rows:
        assert float(r["precision"]) == 1.0 and 0.99 < float(r["dice"]) <= 1.0
    assert "mean +- std" in proc.stdout


def test_evaluate_lists_missing_predictions_or_scores_them_empty(tiny_data, tmp_path):
    write_predictions(tiny_data, tmp_path, drop=("case_002",))
    assert_one_line_error(run_script("evaluate.py", "--pred_dir", tmp_path, "--data_dir", tiny_data),
                          "case_002", "--missing_as_empty")
    proc = run_script("evaluate.py", "--pred_dir", tmp_path, "--data_dir", tiny_data, "--missing_as_empty")
    assert proc.returncode == 0, proc.stderr
    rows = {r["case_id"]: r for r in csv.DictReader(open(tmp_path / "evaluation.csv"))}
    assert float(rows["case_002"]["dice"]) == 0.0


def test_evaluate_refuses_a_prediction_on_another_grid(tiny_data, tmp_path):
    write_predictions(tiny_data, tmp_path)
    mask, props = ds.read_image(tmp_path / "case_001.nrrd")
    ds.write_image(mask, {**props, "origin": (0.0, 0.0, 0.0)}, tmp_path / "case_001.nrrd")
    assert_one_line_error(run_script("evaluate.py", "--pred_dir", tmp_path, "--data_dir", tiny_data), "case_001.nrrd")
    assert_one_line_error(run_script("evaluate.py", "--pred_dir", tmp_path / "nope", "--data_dir", tiny_data), "--pred_dir")
