"""Cross-validation and fold ensembles: train.py --num_folds writes nnU-Net's splits_final.json
and one run per fold with its validation predictions, evaluate.py --crossval reports them,
predict.py averages the folds' models (identical models: exactly one model; the locators'
average placed before the one crop), and every bad input is one line with nothing written."""
import csv
import json
import shutil
import statistics

import numpy as np
import pytest
import torch

import dataset as ds
import evaluate
import inference
import predict
import train
from conftest import TINY_TRAIN, assert_nnunet_folds, assert_one_line_error, run_main, train_ok


@pytest.fixture(scope="module")
def crossval_run(tiny_data, tmp_path_factory):
    """Three folds of the four tiny phantoms (weights that do not matter)."""
    run = tmp_path_factory.mktemp("crossval") / "run"
    train_ok("--data_dir", tiny_data, "--output_dir", run, "--num_folds", "3", "--fold", "all", *TINY_TRAIN)
    return run


def test_num_folds_writes_nnunet_splits_and_each_fold_with_its_validation(crossval_run, tiny_data):
    cases = {c.case_id: c for c in ds.find_cases(tiny_data, require_labels=True)}
    folds = json.loads((crossval_run / "splits_final.json").read_text())
    assert len(folds) == 3
    assert_nnunet_folds(folds, list(cases))
    for k, fold in enumerate(folds):
        d = crossval_run / f"fold_{k}"
        assert json.loads((d / "split.json").read_text()) == fold
        for rel in ("config.json", "locator/best.pt", "segmenter/best.pt", "segmenter/log.csv"):
            assert (d / rel).is_file(), rel
        with open(d / "validation" / "metrics.csv", newline="") as f:
            assert sorted(r["case_id"] for r in csv.DictReader(f)) == fold["val"]
        for cid in fold["val"]:
            mask, props = ds.read_image(d / "validation" / f"{cid}.nrrd")
            image, image_props = ds.read_image(cases[cid].image)
            assert mask.shape == image.shape and ds.same_geometry(props, image_props)
    assert json.loads((crossval_run / "config.json").read_text())["crossval"]["num_folds"] == 3


def test_a_finished_fold_is_skipped_and_overwrite_is_needed_to_retrain(crossval_run, tiny_data):
    before = {k: (crossval_run / f"fold_{k}" / "segmenter" / "best.pt").read_bytes() for k in range(3)}
    run = train_ok("--data_dir", tiny_data, "--output_dir", crossval_run, "--num_folds", "3", *TINY_TRAIN)
    assert all(f"fold {k}: finished" in run.stdout for k in range(3))
    assert all((crossval_run / f"fold_{k}" / "segmenter" / "best.pt").read_bytes() == before[k] for k in range(3))


def test_evaluate_crossval_reports_every_fold_and_all_cases_pooled(crossval_run):
    run = run_main(evaluate.main, "--crossval", crossval_run)
    assert run.returncode == 0, run.stderr
    folds = json.loads((crossval_run / "splits_final.json").read_text())
    with open(crossval_run / "crossval.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted((r["case_id"], int(r["fold"])) for r in rows) == sorted(
        (c, k) for k, fold in enumerate(folds) for c in fold["val"])
    summary = json.loads((crossval_run / "crossval_summary.json").read_text())
    dice = [float(r["dice"]) for r in rows]
    pooled = summary["pooled"]
    assert pooled["cases"] == len(rows) == 4
    assert pooled["dice"]["mean"] == pytest.approx(statistics.mean(dice))
    assert pooled["dice"]["std"] == pytest.approx(statistics.pstdev(dice))
    assert pooled["dice"]["median"] == pytest.approx(statistics.median(dice))
    for k in range(3):
        hd95 = [float(r["hd95"]) for r in rows if r["fold"] == str(k)]
        assert summary["folds"][str(k)]["cases"] == len(folds[k]["val"])
        assert summary["folds"][str(k)]["hd95"]["mean"] == pytest.approx(statistics.mean(hd95))
    assert set(pooled) == {"cases", "dice", "iou", "precision", "recall", "specificity", "hd", "hd95", "assd"}
    assert "diagonal" in summary["empty_mask_rule"] and summary["missing"] == []
    assert "pooled" in run.stdout and "fold 2" in run.stdout


def test_evaluate_crossval_names_an_unfinished_fold(crossval_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(crossval_run, run_dir)
    (run_dir / "fold_1" / "validation" / "metrics.csv").unlink()
    (run_dir / "crossval.csv").unlink(missing_ok=True)
    assert_one_line_error(run_main(evaluate.main, "--crossval", run_dir), "fold 1", "unfinished", "--partial")
    assert not (run_dir / "crossval.csv").exists()
    run = run_main(evaluate.main, "--crossval", run_dir, "--partial")
    assert run.returncode == 0 and "left out: fold 1" in run.stdout
    summary = json.loads((run_dir / "crossval_summary.json").read_text())
    assert "1" not in summary["folds"] and summary["missing"] and summary["pooled"]["cases"] < 4
    assert_one_line_error(run_main(evaluate.main, "--crossval", tmp_path), "splits_final.json")
    assert_one_line_error(run_main(evaluate.main, "--crossval", run_dir, "--pred_dir", tmp_path), "--crossval")


def test_resume_finishes_a_fold_whose_validation_was_cut_short(crossval_run, tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(crossval_run, run_dir)
    shutil.rmtree(run_dir / "fold_2" / "validation")
    assert_one_line_error(run_main(train.main, "--data_dir", tiny_data, "--output_dir", run_dir, "--num_folds", "3",
                                   *TINY_TRAIN), "fold_2", "--resume")
    before = (run_dir / "fold_2" / "segmenter" / "best.pt").read_bytes()
    run = train_ok("--resume", run_dir)
    assert "fold 0: finished" in run.stdout and "fold 1: finished" in run.stdout
    assert (run_dir / "fold_2" / "validation" / "metrics.csv").is_file()
    assert (run_dir / "fold_2" / "segmenter" / "best.pt").read_bytes() == before  # nothing retrained
    shutil.rmtree(run_dir / "fold_2" / "validation")
    run = train_ok("--resume", run_dir / "fold_2")  # the fold's own folder: the same as --resume RUN --fold 2
    assert "fold 0" not in run.stdout and (run_dir / "fold_2" / "validation" / "metrics.csv").is_file()


def test_a_split_file_written_by_nnunet_trains_the_fold_asked_for(tiny_data, tmp_path):
    ids = [c.case_id for c in ds.find_cases(tiny_data, require_labels=True)]
    folds = [{"train": ids[:2], "val": ids[2:]}, {"train": ids[2:], "val": ids[:2]}]
    nnunet = tmp_path / "splits_final.json"
    nnunet.write_text(json.dumps(folds, sort_keys=True, indent=4))  # as nnU-Net's save_json writes it
    run = tmp_path / "run"
    train_ok("--data_dir", tiny_data, "--output_dir", run, "--split", nnunet, "--fold", "1", *TINY_TRAIN)
    assert json.loads((run / "splits_final.json").read_text()) == folds
    assert json.loads((run / "fold_1" / "split.json").read_text()) == folds[1]
    assert not (run / "fold_0").exists() and (run / "fold_1" / "validation" / "metrics.csv").is_file()
    other = tmp_path / "other.json"
    other.write_text(json.dumps(folds[::-1]))
    assert_one_line_error(run_main(train.main, "--data_dir", tiny_data, "--output_dir", run, "--split", other,
                                   "--fold", "0", *TINY_TRAIN), "--split", "differs from the folds this run trains")
    assert not (run / "fold_0").exists()


@pytest.mark.parametrize("flags, fragment", [
    (["--num_folds", "3", "--fold", "3"], "--fold 3"),
    (["--num_folds", "3", "--fold", "one"], "--fold one"),
    (["--num_folds", "1"], "--num_folds 1"),
    (["--num_folds", "5"], "more folds than the 4 cases"),
    (["--fold", "0"], "--num_folds"),
    (["--num_folds", "2", "--group_by", "^(patient)"], "matches no case id"),
    (["--num_folds", "3", "--group_by", r"^(case)_"], "more folds than the 1 patients"),
    (["--num_folds", "2", "--stage", "locator"], "--stage locator"),
    (["--num_folds", "2", "--locator_path", "x.pt"], "--locator_path"),
    (["--group_by", "^(patient)"], "matches no case id"),  # a single split groups too
])
def test_bad_fold_flags_are_one_line_and_write_nothing(tiny_data, tmp_path, flags, fragment):
    run = tmp_path / "run"
    assert_one_line_error(run_main(train.main, "--data_dir", tiny_data, "--output_dir", run, *TINY_TRAIN, *flags),
                          fragment)
    assert not run.exists()


@pytest.mark.parametrize("content, fragment", [
    ([{"train": ["case_000", "case_001"], "val": ["case_002", "case_009"]}], "case_009"),
    ([{"train": ["case_000", "case_001", "case_002"], "val": ["case_002", "case_003"]}], "both trains and validates"),
    ([{"train": ["case_000", "case_001"], "val": ["case_002"]}], "leaves out case_003"),
    ({"train": ["case_000", "case_001"], "val": ["case_002", "case_003"]}, "a single train/validation split"),
])
def test_bad_split_files_are_one_line_and_write_nothing(tiny_data, tmp_path, content, fragment):
    split = tmp_path / "s.json"
    split.write_text(json.dumps(content))
    run = tmp_path / "run"
    assert_one_line_error(run_main(train.main, "--data_dir", tiny_data, "--output_dir", run, "--split", split,
                                   "--num_folds", "1" if isinstance(content, list) else "2", "--fold", "0",
                                   *TINY_TRAIN), "--split", fragment)
    assert not run.exists()


def test_predict_with_the_run_writes_masks_with_each_scans_geometry(crossval_run, tiny_data, tmp_path):
    out = tmp_path / "out"
    run = run_main(predict.main, "--data_dir", tiny_data, "--run", crossval_run, "--folds", "0", "1", "2",
                   "--output_dir", out, "--device", "cpu", "--tta")
    assert run.returncode == 0, run.stderr
    assert "ensemble of 3 locator(s) and 3 segmenter(s)" in run.stdout
    for case in ds.find_cases(tiny_data, require_labels=True):
        mask, props = ds.read_image(out / f"{case.case_id}.nrrd")
        image, image_props = ds.read_image(case.image)
        assert mask.shape == image.shape and ds.same_geometry(props, image_props)
    for flags, fragment in [(["--run", crossval_run, "--folds", "0", "3"], "--folds 0 3"),
                            (["--run", crossval_run, "--folds", "1", "1"], "each fold once"),
                            (["--run", tmp_path, "--folds", "0"], "splits_final.json"),
                            (["--folds", "0"], "--run"),
                            (["--run", crossval_run, "--locator_path", "x.pt"], "--run")]:
        assert_one_line_error(run_main(predict.main, "--data_dir", tiny_data, "--output_dir", tmp_path / "bad",
                                       "--device", "cpu", *flags), fragment)
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("tta", [False, True])
def test_an_ensemble_of_two_identical_checkpoints_equals_one_exactly(trained_run, tiny_data, tta):
    loc, seg, cpu = trained_run / "locator" / "best.pt", trained_run / "segmenter" / "best.pt", torch.device("cpu")
    image, _, props = ds.load_case(ds.find_cases(tiny_data, require_labels=True)[1])
    one, where = inference.predict_two_stage(inference.load_two_stage(loc, seg, cpu, tta), image, props)
    two, where2 = inference.predict_two_stage(inference.load_two_stage([loc, loc], [seg, seg], cpu, tta), image, props)
    assert one.any() and np.array_equal(one, two) and where.centre == where2.centre


def test_the_locators_are_averaged_before_the_one_crop(trained_run, tiny_data, tmp_path, monkeypatch):
    """Two different locators: one crop, placed where their mean probability puts it (neither
    locator's own centre), and each segmenter runs on that same crop."""
    loc, seg, cpu = trained_run / "locator" / "best.pt", trained_run / "segmenter" / "best.pt", torch.device("cpu")
    ckpt = torch.load(loc, weights_only=True)
    g = torch.Generator().manual_seed(0)
    ckpt["model"] = {k: v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
                     for k, v in ckpt["model"].items()}
    other = tmp_path / "other_locator.pt"
    torch.save(ckpt, other)
    image, _, props = ds.load_case(ds.find_cases(tiny_data, require_labels=True)[0])
    pipe = inference.load_two_stage([loc, other], [seg, seg], cpu)
    work, pad_value = ds.zscore(image)
    low, pad_before = ds.locator_input(work, pad_value, pipe.factors)
    singles = [inference.probabilities(m, low, cpu) for m in pipe.locators]
    assert not np.allclose(singles[0], singles[1])
    expected = ds.locate((singles[0] + singles[1]) / 2, pipe.factors, pad_before, image.shape)
    crops = []
    real_crop = ds.crop
    monkeypatch.setattr(ds, "crop", lambda *a, **k: crops.append(a[1]) or real_crop(*a, **k))
    _, location = inference.predict_two_stage(pipe, image, props)
    assert location.centre == expected.centre
    assert crops == [ds.crop_start(expected.centre, pipe.patch_size, image.shape)]  # one crop for both segmenters


def edited(src, dest, edit):
    ckpt = torch.load(src, weights_only=True)
    edit(ckpt["config"])
    torch.save(ckpt, dest)
    return dest


def test_ensemble_checkpoints_that_disagree_are_refused_naming_both(trained_run, tiny_data, tmp_path):
    loc, seg = trained_run / "locator" / "best.pt", trained_run / "segmenter" / "best.pt"
    patch = edited(seg, tmp_path / "patch.pt", lambda c: c.update(patch_size=[p + 16 for p in c["patch_size"]]))
    spacing = edited(seg, tmp_path / "spacing.pt", lambda c: c.update(spacing=[1.0, 1.0, 1.0]))
    channels = edited(seg, tmp_path / "channels.pt", lambda c: c["arch"].update(in_channels=4))
    classes = edited(seg, tmp_path / "classes.pt", lambda c: c["arch"].update(out_channels=3))
    factor = edited(loc, tmp_path / "factor.pt", lambda c: c.update(scale_factor=[0.25, 0.25, 0.25]))
    for flag, paths, what in [("--segmenter_path", [seg, patch], "patch sizes"),
                              ("--segmenter_path", [seg, spacing], "spacings"),
                              ("--segmenter_path", [seg, channels], "channels"),
                              ("--segmenter_path", [seg, classes], "classes"),
                              ("--locator_path", [loc, factor], "scale factors")]:
        other = ["--segmenter_path", seg] if flag == "--locator_path" else ["--locator_path", loc]
        out = tmp_path / "out"
        run = run_main(predict.main, "--data_dir", tiny_data, "--output_dir", out, "--device", "cpu",
                       flag, *paths, *other)
        assert_one_line_error(run, flag, str(paths[0]), str(paths[1]), what)
        assert not out.exists()


def test_resume_with_more_epochs_trains_finished_folds_on(crossval_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(crossval_run, run_dir)
    locator = (run_dir / "fold_1" / "locator" / "best.pt").read_bytes()
    train_ok("--resume", run_dir, "--max_epochs", "2")
    for k in range(3):
        with open(run_dir / f"fold_{k}" / "segmenter" / "log.csv", newline="") as f:
            assert [r["epoch"] for r in csv.DictReader(f)] == ["1", "2"]
    assert (run_dir / "fold_1" / "locator" / "best.pt").read_bytes() == locator  # its epochs were done
