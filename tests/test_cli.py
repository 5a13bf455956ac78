"""End-to-end runs of train.py and predict.py on tiny phantoms, and every bad input they
must refuse with one line, a non-zero exit and nothing written."""
import csv
import shutil

import numpy as np
import pytest
import torch

import dataset as ds
from conftest import TINY_TRAIN, assert_one_line_error, run_script


def predict_args(run, *extra):
    return ["--locator_path", run / "locator" / "best.pt", "--segmenter_path", run / "segmenter" / "best.pt",
            "--device", "cpu", *extra]


def test_train_writes_the_run_folder(tiny_run):
    for rel in ["config.json", "split.json", "locator/best.pt", "locator/latest.pt", "locator/log.csv",
                "locator/centres.json", "segmenter/best.pt", "segmenter/latest.pt", "segmenter/log.csv"]:
        assert (tiny_run / rel).is_file(), rel
    ckpt = torch.load(tiny_run / "segmenter" / "best.pt", weights_only=True)
    assert {"model", "config", "epoch", "best_dice"} <= set(ckpt)
    assert ckpt["config"]["role"] == "segmenter" and all(p % 16 == 0 for p in ckpt["config"]["patch_size"])
    rows = list(csv.reader(open(tiny_run / "segmenter" / "log.csv")))
    assert rows[0][:3] == ["epoch", "train_loss", "val_dice"] and len(rows) == 2
    assert all(np.isfinite(float(v)) for v in rows[1])


def test_predict_folder_keeps_each_scans_geometry_and_scores_it(tiny_run, tiny_data, tmp_path):
    out = tmp_path / "out"
    proc = run_script("predict.py", "--data_dir", tiny_data, "--output_dir", out, *predict_args(tiny_run))
    assert proc.returncode == 0, proc.stderr
    cases = ds.find_cases(tiny_data, require_labels=True)
    shapes = set()
    for case in cases:
        image, props = ds.read_image(case.image)
        mask, mprops = ds.read_image(out / f"{case.case_id}.nrrd")
        assert mask.shape == image.shape and mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
        # nrrd stores direction x spacing, so a re-read differs in the last bit (1e-16) at most
        assert ds.same_geometry(mprops, props, tol=1e-9)
        assert props["direction"] != (1, 0, 0, 0, 1, 0, 0, 0, 1) and any(props["origin"])
        shapes.add(image.shape)
    assert len(shapes) == 2  # two in-plane sizes in one dataset
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [r["case_id"] for r in rows] == [c.case_id for c in cases]
    assert "dice" in proc.stdout and "+-" in proc.stdout


def test_predict_never_overwrites_without_the_flag(tiny_run, tiny_data, tmp_path):
    scan = ds.find_cases(tiny_data, require_labels=True)[0].image
    out = tmp_path / "mask.nrrd"
    assert run_script("predict.py", "--input", scan, "--output", out, "--label_value", "255",
                      *predict_args(tiny_run)).returncode == 0
    assert set(np.unique(ds.read_image(out)[0])) <= {0, 255}
    before = out.read_bytes()
    out.write_bytes(b"precious")
    assert_one_line_error(run_script("predict.py", "--input", scan, "--output", out, *predict_args(tiny_run)),
                          "--overwrite")
    assert out.read_bytes() == b"precious"
    assert run_script("predict.py", "--input", scan, "--output", out, "--label_value", "255", "--overwrite",
                      *predict_args(tiny_run)).returncode == 0
    assert out.read_bytes() == before


def test_predict_other_spacing_and_larger_scan_get_masks_on_their_own_grid(tiny_run, tiny_data, tmp_path):
    case = ds.find_cases(tiny_data, require_labels=True)[0]
    image, props = ds.read_image(case.image)
    coarse, coarse_props = ds.resample(image.astype(np.float32), props, tuple(2 * s for s in props["spacing"]), label=False)
    big = np.pad(image, ((10, 7), (20, 30), (5, 40)))
    ds.write_image(coarse, coarse_props, tmp_path / "coarse.nrrd")
    ds.write_image(big, props, tmp_path / "big.nii.gz")
    proc = run_script("predict.py", "--input", tmp_path / "coarse.nrrd", tmp_path / "big.nii.gz",
                      "--output_dir", tmp_path / "out", *predict_args(tiny_run))
    assert proc.returncode == 0, proc.stderr
    for name, arr, pr in [("coarse", coarse, coarse_props), ("big", big, props)]:
        mask, mprops = ds.read_image(tmp_path / "out" / f"{name}.nrrd")
        assert mask.shape == arr.shape and ds.same_geometry(mprops, pr)


def test_predict_batch_reports_a_corrupt_case_and_goes_on(tiny_run, tiny_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    (data / "case_001" / "lgemri.nrrd").write_bytes(b"NRRD0004\ngarbage")
    proc = run_script("predict.py", "--data_dir", data, "--output_dir", tmp_path / "out", *predict_args(tiny_run))
    assert proc.returncode == 1
    assert "case_001" in proc.stderr and "failed" in proc.stderr
    assert sorted(p.name for p in (tmp_path / "out").glob("*.nrrd")) == ["case_000.nrrd", "case_002.nrrd", "case_003.nrrd"]


def corrupt(data, problem):
    case = data / "case_000"
    image, props = ds.read_image(case / "lgemri.nrrd")
    if problem == "missing label":
        (case / "laendo.nrrd").unlink()
    elif problem == "non-binary label":
        label = ds.read_image(case / "laendo.nrrd")[0]
        label[0, 0, 0] = 7
        ds.write_image(label, props, case / "laendo.nrrd")
    elif problem == "NaN voxels":
        image = image.astype(np.float32)
        image[3, 3, 3] = np.nan
        ds.write_image(image, props, case / "lgemri.nrrd")
    elif problem == "shape mismatch":
        ds.write_image(np.zeros((8, 8, 8), np.uint8), props, case / "laendo.nrrd")
    elif problem == "corrupt file":
        (case / "lgemri.nrrd").write_bytes((case / "lgemri.nrrd").read_bytes()[:100])
    elif problem == "4D volume":
        import SimpleITK as sitk
        sitk.WriteImage(sitk.GetImageFromArray(np.zeros((2, 4, 4, 4), np.uint8), isVector=False), str(case / "lgemri.nrrd"))
    return case


@pytest.mark.parametrize("problem, fragment", [
    ("missing label", "laendo.nrrd"), ("non-binary label", "not binary"), ("NaN voxels", "NaN"),
    ("shape mismatch", "label shape"), ("corrupt file", "cannot be read"), ("4D volume", "4D")])
def test_train_refuses_bad_data_with_one_line_and_writes_nothing(tiny_data, tmp_path, problem, fragment):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    corrupt(data, problem)
    out = tmp_path / "run"
    assert_one_line_error(run_script("train.py", "--data_dir", data, "--output_dir", out, *TINY_TRAIN),
                          "case_000", fragment)
    assert not out.exists()


def test_train_refuses_empty_or_misnamed_data_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "misnamed" / "case_a").mkdir(parents=True)
    (tmp_path / "misnamed" / "case_a" / "image.nrrd").write_bytes(b"")
    for folder in ("empty", "misnamed", "absent"):
        assert_one_line_error(run_script("train.py", "--data_dir", tmp_path / folder, "--output_dir", tmp_path / "run",
                                         *TINY_TRAIN), "--data_dir", folder)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flags, fragment", [
    (["--max_epochs", "-1"], "--max_epochs"), (["--scale_factor", "0.3", "0.25", "0.25"], "--scale_factor"),
    (["--reduce", "1.5"], "--reduce"), (["--patch_size", "20", "64", "64"], "--patch_size"),
    (["--learning_rate", "0"], "--learning_rate"), (["--padding", "-2", "0", "0"], "--padding"),
    (["--stage", "everything"], "--stage"), (["--batch_size", "two"], "--batch_size")])
def test_train_refuses_impossible_flags(tiny_data, tmp_path, flags, fragment):
    assert_one_line_error(run_script("train.py", "--data_dir", tiny_data, "--output_dir", tmp_path / "run",
                                     *TINY_TRAIN, *flags), fragment)
    assert not (tmp_path / "run").exists()


def test_train_does_not_clobber_a_trained_stage(tiny_run, tiny_data):
    before = (tiny_run / "locator" / "best.pt").read_bytes()
    assert_one_line_error(run_script("train.py", "--data_dir", tiny_data, "--output_dir", tiny_run, *TINY_TRAIN),
                          "--overwrite")
    assert (tiny_run / "locator" / "best.pt").read_bytes() == before


def test_segmenter_stage_needs_a_locator(tiny_data, tmp_path):
    assert_one_line_error(run_script("train.py", "--stage", "segmenter", "--data_dir", tiny_data,
                                     "--output_dir", tmp_path / "run", *TINY_TRAIN), "--locator_path")


def test_predict_refuses_bad_checkpoints(tiny_run, tiny_data, tmp_path):
    scan = ds.find_cases(tiny_data, require_labels=True)[0].image
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    plain = tmp_path / "plain.pt"
    torch.save({"conv.weight": torch.zeros(3)}, plain)
    edited = tmp_path / "edited.pt"
    ckpt = torch.load(tiny_run / "segmenter" / "best.pt", weights_only=True)
    ckpt["config"]["arch"]["base_channels"] = 3
    torch.save(ckpt, edited)
    seg = tiny_run / "segmenter" / "best.pt"
    loc = tiny_run / "locator" / "best.pt"
    for locator, segmenter, fragment in [(junk, seg, "junk.pt"), (plain, seg, "plain.pt"), (seg, seg, "segmenter"),
                                         (loc, edited, "edited.pt"), (loc, tmp_path / "none.pt", "none.pt")]:
        out = tmp_path / "out"
        proc = run_script("predict.py", "--input", scan, "--output_dir", out, "--locator_path", locator,
                          "--segmenter_path", segmenter, "--device", "cpu")
        assert_one_line_error(proc, fragment)
        assert not out.exists()
