import csv
import math

import numpy as np
import pytest

import dataset as ds
import evaluate
from conftest import assert_one_line_error, run_main, run_script
from metrics import METRIC_KEYS, format_table
from plots import BOX_PLOT_TAG, png_software


def write_predictions(data, out, drop=()):
    """Predictions = the labels themselves with their first atrium voxel (a surface voxel)
    removed, except the `drop`ped cases."""
    for case in ds.find_cases(data, require_labels=True):
        if case.case_id in drop:
            continue
        label, props = ds.read_image(case.label)
        pred = (label > 0).astype(np.uint8)
        pred[tuple(np.argwhere(pred)[0])] = 0
        ds.write_image(pred, props, out / f"{case.case_id}.nrrd")


@pytest.fixture(scope="module")
def predictions(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("predictions")
    write_predictions(tiny_data, out)
    return out


def evaluate_ok(*args):
    run = run_main(evaluate.main, *args)
    assert run.returncode == 0, run.stdout + run.stderr
    return run


def evaluate_error(*args):
    return run_main(evaluate.main, *args)


def read_rows(path):
    return {r["case_id"]: r for r in csv.DictReader(open(path))}


def test_evaluate_scores_every_case_and_writes_csv_and_box_plot(tiny_data, predictions, tmp_path):
    """From the shell, as a user runs it."""
    proc = run_script("evaluate.py", "--pred_dir", predictions, "--data_dir", tiny_data, "--csv", tmp_path / "s.csv")
    assert proc.returncode == 0, proc.stderr
    rows = read_rows(tmp_path / "s.csv")
    spacing = ds.read_image(ds.find_cases(tiny_data, require_labels=True)[0].label)[1]["spacing"]
    assert list(rows) == ["case_000", "case_001", "case_002", "case_003"]
    assert list(rows["case_000"]) == ["case_id", *METRIC_KEYS]
    for case in ds.find_cases(tiny_data, require_labels=True):
        r, n = rows[case.case_id], int((ds.read_image(case.label)[0] > 0).sum())  # label voxels; one missed
        assert float(r["precision"]) == 1.0
        assert float(r["dice"]) == pytest.approx(2 * (n - 1) / (2 * n - 1), abs=1e-12)
        assert float(r["recall"]) == pytest.approx((n - 1) / n, abs=1e-12)
        # One surface voxel removed: every surface voxel is within one voxel step of the other
        # surface, and most are on both.
        assert 0 < float(r["hd"]) <= max(spacing) + 1e-9 and float(r["hd95"]) == 0.0
        assert 0 < float(r["assd"]) < 0.05 * max(spacing)
    assert "mean +- std" in proc.stdout and "hd95" in proc.stdout and "in mm" in proc.stdout
    assert png_software(tmp_path / "s.png") == BOX_PLOT_TAG  # default: beside the CSV


def test_evaluate_replaces_its_own_outputs_but_not_other_files(tiny_data, predictions, tmp_path):
    args = ("--pred_dir", predictions, "--data_dir", tiny_data, "--csv", tmp_path / "s.csv",
            "--plot", tmp_path / "b.png")
    evaluate_ok(*args)
    evaluate_ok(*args)  # a rerun replaces what it wrote
    (tmp_path / "s.csv").write_text("someone's notes\n")
    assert_one_line_error(evaluate_error(*args), "--csv", "s.csv", "--overwrite")
    assert (tmp_path / "s.csv").read_text() == "someone's notes\n"
    (tmp_path / "s.csv").unlink()
    (tmp_path / "b.png").write_bytes(b"\x89PNG\r\n\x1a\nnot ours")
    assert_one_line_error(evaluate_error(*args), "--plot", "b.png", "--overwrite")
    assert not (tmp_path / "s.csv").exists()  # refused before anything was written
    evaluate_ok(*args, "--overwrite")
    assert png_software(tmp_path / "b.png") == BOX_PLOT_TAG


def test_evaluate_lists_missing_predictions_or_scores_them_empty(tiny_data, tmp_path):
    write_predictions(tiny_data, tmp_path, drop=("case_002",))
    assert_one_line_error(evaluate_error("--pred_dir", tmp_path, "--data_dir", tiny_data),
                          "case_002", "--missing_as_empty")
    run = evaluate_ok("--pred_dir", tmp_path, "--data_dir", tiny_data, "--missing_as_empty")
    assert "scored as empty (no prediction): case_002" in run.stdout
    rows = read_rows(tmp_path / "evaluation.csv")
    assert png_software(tmp_path / "evaluation.png") == BOX_PLOT_TAG
    label, props = ds.read_image(ds.find_cases(tiny_data, require_labels=True)[2].label)
    diagonal = math.dist((0, 0, 0), np.multiply(label.shape, props["spacing"]))
    assert float(rows["case_002"]["dice"]) == 0.0 and float(rows["case_002"]["recall"]) == 0.0
    for k in ("hd", "hd95", "assd"):
        assert float(rows["case_002"][k]) == pytest.approx(diagonal)


def test_evaluate_refuses_a_prediction_on_another_grid(tiny_data, tmp_path):
    write_predictions(tiny_data, tmp_path)
    mask, props = ds.read_image(tmp_path / "case_001.nrrd")
    ds.write_image(mask, {**props, "origin": (0.0, 0.0, 0.0)}, tmp_path / "case_001.nrrd")
    assert_one_line_error(evaluate_error("--pred_dir", tmp_path, "--data_dir", tiny_data), "case_001.nrrd")
    assert_one_line_error(evaluate_error("--pred_dir", tmp_path / "nope", "--data_dir", tiny_data), "--pred_dir")


def test_evaluate_refuses_non_binary_or_corrupt_predictions(tiny_data, tmp_path):
    write_predictions(tiny_data, tmp_path)
    mask, props = ds.read_image(tmp_path / "case_003.nrrd")
    ds.write_image(mask * np.uint8(2), props, tmp_path / "case_003.nrrd")
    assert_one_line_error(evaluate_error("--pred_dir", tmp_path, "--data_dir", tiny_data),
                          "case_003.nrrd", "not a binary mask", "values 2")
    (tmp_path / "case_003.nrrd").write_bytes(b"NRRD0004\nthis is not an image\n")
    assert_one_line_error(evaluate_error("--pred_dir", tmp_path, "--data_dir", tiny_data), "case_003.nrrd")


def test_evaluate_accepts_0_255_predictions(tiny_data, tmp_path):
    write_predictions(tiny_data, tmp_path)
    for case in ds.find_cases(tiny_data, require_labels=True):
        mask, props = ds.read_image(tmp_path / f"{case.case_id}.nrrd")
        ds.write_image(mask * np.uint8(255), props, tmp_path / f"{case.case_id}.nrrd")
    evaluate_ok("--pred_dir", tmp_path, "--data_dir", tiny_data)
    as_255 = read_rows(tmp_path / "evaluation.csv")
    write_predictions(tiny_data, tmp_path)  # the same masks as 0/1
    evaluate_ok("--pred_dir", tmp_path, "--data_dir", tiny_data)
    assert read_rows(tmp_path / "evaluation.csv") == as_255


@pytest.mark.parametrize("flags, fragments", [
    (("--plot", "{tmp}/box.pdf"), ("--plot", "box.pdf", ".png")),
    (("--csv", "{tmp}"), ("--csv", "is a folder")),
    (("--csv", "{tmp}/s.png", "--plot", "{tmp}/s.png"), ("--plot", "same file")),
])
def test_evaluate_rejects_bad_output_flags(tiny_data, predictions, tmp_path, flags, fragments):
    flags = [f.format(tmp=tmp_path) for f in flags]
    assert_one_line_error(evaluate_error("--pred_dir", predictions, "--data_dir", tiny_data, *flags),
                          *fragments)


def test_format_table_prints_ratios_and_distances_with_their_units():
    rows = [{"case_id": "a", "dice": 0.5, "hd": 10.0}, {"case_id": "bb", "dice": 0.7, "hd": 30.0}]
    assert format_table(rows, ("dice", "hd")).splitlines() == [
        "case                 dice            hd",
        "a                  0.5000         10.00",
        "bb                 0.7000         30.00",
        "mean +- std  0.600+-0.100  20.00+-10.00",
        "(hd in mm, between surface voxels)",
    ]
