"""The iterative strategy through the command line: train.py --strategy iterative on spine
phantoms, predict.py writing instance maps and their tables with the scans' geometry, the
search's evaluations counted on a real model, and every bad input of the path refused in one
line with nothing written."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

import dataset as ds
import evaluate
import inference
import labels as lbl
import metrics
import predict
import prediction
import synthetic_spine
import train
import training
from conftest import run_main
from models import IterativeFCN, VNet, build_model, model_arch

SHAPE = (48, 32, 32)
TINY = ["--strategy", "iterative", "--patch_size", "32", "32", "32", "--base_channels", "2", "--max_epochs", "1",
        "--samples_per_epoch", "4", "--batch_size", "2", "--device", "cpu"]


def ok(main, *args):
    run = run_main(main, *args)
    assert run.returncode == 0, run.stdout + run.stderr
    return run


def refused(main, *args, match: str):
    run = run_main(main, *args)
    assert run.returncode != 0 and match in run.stderr, run.stdout + run.stderr
    assert "Traceback" not in run.stderr
    return run


@pytest.fixture(scope="module")
def spine(tmp_path_factory):
    root = tmp_path_factory.mktemp("spine")
    synthetic_spine.write_spine_dataset(root / "data", num_cases=3, shapes=(SHAPE,), seed=0)
    synthetic_spine.write_spine_dataset(root / "test", num_cases=1, shapes=(SHAPE,), seed=9)
    run = ok(train.main, "--data_dir", root / "data", "--output_dir", root / "run", *TINY)
    return root, run


def test_train_records_the_strategy_and_rebuilds_the_model(spine):
    root, run = spine
    assert "instances (vertebra) in 3 cases" in run.stdout
    ckpt = inference.load_checkpoint(root / "run" / "segmenter" / "best.pt", "segmenter")
    config = ckpt["config"]
    assert config["strategy"] == "iterative" and config["patch_size"] == [32, 32, 32]
    assert config["arch"] == {"name": "iterative_fcn", "in_channels": 2, "base_channels": 2, "levels": 4}
    assert config["normalization"] == ["ct"] and config["loss"] == "WeightedBCEDice"
    cases = ds.find_cases(root / "data", require_labels=True)
    train_ids = json.loads((root / "run" / "split.json").read_text())["train"]
    volumes = [v * 1e-3 for c in cases if c.case_id in train_ids  # 1 mm voxels: voxels / 1000 ml
               for v in np.bincount(ds.read_image(c.label)[0].ravel().astype(np.int64))[1:]]
    assert config["min_volume_ml"] == pytest.approx(0.25 * np.median(volumes))
    model = build_model(config["arch"])
    assert isinstance(model, IterativeFCN) and model_arch(model) == config["arch"]
    model.load_state_dict(ckpt["model"])
    saved = json.loads((root / "run" / "config.json").read_text())["segmenter"]
    assert saved["strategy"] == "iterative" and saved["base_channels"] == 2
    log = list(csv.DictReader(open(root / "run" / "segmenter" / "log.csv")))
    assert len(log) == 1 and 0 <= float(log[0]["val_dice"]) <= 1


def test_predict_writes_instance_maps_and_tables_on_the_scans_geometry(spine, tmp_path):
    root, _ = spine
    out = tmp_path / "out"
    run = ok(predict.main, "--data_dir", root / "test", "--output_dir", out, "--segmenter_path",
             root / "run" / "segmenter" / "best.pt", "--device", "cpu", "--max_instances", "3")
    assert "instance metrics over 1 case(s)" in run.stdout and "network evaluations" in run.stdout
    case = ds.find_cases(root / "test", require_labels=True)[0]
    labels, props = ds.read_image(out / "spine_000.nrrd")
    _, image_props = ds.read_image(case.image)
    assert labels.shape == SHAPE and ds.same_geometry(props, image_props)
    n = metrics.check_instances(labels, "prediction")  # 1..N without gaps (an untrained model's are in pieces)
    rows = list(csv.DictReader(open(out / "spine_000_instances.csv")))
    assert list(rows[0] if rows else prediction.INSTANCE_COLUMNS) == list(prediction.INSTANCE_COLUMNS)
    assert len(rows) == n <= 3
    scores = list(csv.DictReader(open(out / "metrics.csv")))
    assert scores[0]["case_id"] == "spine_000" and int(scores[0]["ref_instances"]) >= 4


def test_predict_resamples_a_scan_of_another_spacing_and_back(spine, tmp_path):
    """A scan at 1.5 mm given to a model trained at 1 mm: the map comes back on the scan's grid,
    instances numbered 1..N in the table's order."""
    root, _ = spine
    image, label, _ = synthetic_spine.make_spine_phantom(np.random.default_rng(3), (32, 32, 32), (1.5, 1.5, 1.5))
    props = {"spacing": (1.5, 1.5, 1.5), "origin": (10.0, -20.0, 5.0), "direction": (1, 0, 0, 0, 1, 0, 0, 0, 1)}
    ds.write_image(image, props, tmp_path / "coarse.nii.gz")
    ckpt = inference.load_checkpoint(root / "run" / "segmenter" / "best.pt")
    pipe = inference.load_iterative([(root / "run" / "segmenter" / "best.pt", ckpt)], torch.device("cpu"),
                                    max_instances=4)
    labels, found, evaluations = inference.predict_iterative(pipe, image[None], props)
    assert labels.shape == image.shape and labels.dtype == np.uint8
    assert sorted(set(np.unique(labels).tolist()) - {0}) == [f.instance for f in found]
    assert [f.instance for f in found] == list(range(1, len(found) + 1)) and len(found) <= 4


def test_a_search_with_a_real_model_takes_the_search_plus_bounded_moves_per_instance(spine):
    """Evaluations of one scan: each search start once, plus at most max_moves + 1 per instance
    (no dense sliding window), counted on the trained model."""
    root, _ = spine
    case = ds.find_cases(root / "test", require_labels=True)[0]
    ckpt = inference.load_checkpoint(root / "run" / "segmenter" / "best.pt")
    pipe = inference.load_iterative([(case.image, ckpt)], torch.device("cpu"), max_moves=3, max_instances=5)
    image, props = ds.read_case_image(case)
    calls = []
    segment = inference.model_segment(pipe.models, image.astype(np.float32), ds.normalise(image.copy(), ["ct"]),
                                      pipe.patch_size, pipe.device)

    def counted(start, memory):
        calls.append(start)
        return segment(start, memory)
    labels, found, evaluations = inference.iterative_instances(counted, SHAPE, pipe.patch_size, 3, 5)
    starts = len(inference.search_starts(SHAPE, pipe.patch_size))
    assert evaluations == len(calls) <= starts + len(found) * (3 + 1)


# ----------------------------------------------------------------------------- bad input

def test_instances_not_one_to_n_are_refused_before_any_file(spine, tmp_path):
    root, _ = spine
    data = tmp_path / "data"
    synthetic_spine.write_spine_dataset(data, num_cases=2, shapes=(SHAPE,), seed=1)
    path = data / "labelsTr" / "spine_001.nii.gz"
    label, props = ds.read_image(path)
    label[label == 2] = 0
    ds.write_image(label, props, path)
    refused(train.main, "--data_dir", data, "--output_dir", tmp_path / "run", *TINY,
            match=f"{path}: instance values 1, 3")
    ds.write_image((label > 0).astype(np.uint8), props, path)  # a binary mask of the whole spine
    refused(train.main, "--data_dir", data, "--output_dir", tmp_path / "run", *TINY,
            match=f"{path}: instance 1 is")
    assert not (tmp_path / "run").exists()


def test_a_dataset_json_of_several_classes_is_refused(spine, tmp_path):
    root, _ = spine
    data = tmp_path / "data"
    synthetic_spine.write_spine_dataset(data, num_cases=2, shapes=(SHAPE,), seed=1)
    meta = json.loads((data / "dataset.json").read_text())
    meta["labels"] = {"0": "background", "1": "vertebra", "2": "rib"}
    (data / "dataset.json").write_text(json.dumps(meta))
    refused(train.main, "--data_dir", data, "--output_dir", tmp_path / "run", *TINY,
            match="the iterative strategy segments the instances of one class")
    assert not (tmp_path / "run").exists()


def test_a_scan_smaller_than_the_patch_is_padded_and_said(spine, tmp_path):
    root, _ = spine
    data = tmp_path / "data"
    synthetic_spine.write_spine_dataset(data, num_cases=2, shapes=((40, 32, 32),), seed=2)
    run = ok(train.main, "--data_dir", data, "--output_dir", tmp_path / "run", *TINY[:2], "--patch_size", "48", "32",
             "32", *TINY[6:])
    assert "smaller than the patch (48, 32, 32)" in run.stdout and "padded" in run.stdout
    run = ok(predict.main, "--data_dir", data, "--output_dir", tmp_path / "out", "--segmenter_path",
             tmp_path / "run" / "segmenter" / "best.pt", "--device", "cpu", "--max_instances", "2")
    assert "smaller than the patch (48, 32, 32)" in run.stderr
    assert ds.read_image(tmp_path / "out" / "spine_000.nrrd")[0].shape == (40, 32, 32)


@pytest.mark.parametrize("flag, value, match", [("--max_moves", "0", "--max_moves 0: must be at least 1"),
                                               ("--max_instances", "0", "--max_instances 0: must be at least 1"),
                                               ("--min_volume", "-1", "--min_volume -1.0: must be 0 or more")])
def test_search_bounds_out_of_range_are_refused(spine, tmp_path, flag, value, match):
    root, _ = spine
    refused(predict.main, "--data_dir", root / "test", "--output_dir", tmp_path / "out", "--segmenter_path",
            root / "run" / "segmenter" / "best.pt", flag, value, match=match)
    assert not (tmp_path / "out").exists()


def patch_checkpoint(path):
    """A patch-strategy checkpoint of one CT channel, as train.py --strategy patches writes it."""
    model = VNet(1, 1, base_channels=2)
    config = {"role": "segmenter", "strategy": "patches", "arch": model_arch(model), "patch_size": [16, 16, 16],
              "spacing": [1.0, 1.0, 1.0], "channels": ["CT"], "normalization": ["ct"], "labels": lbl.binary().record()}
    training.save_checkpoint(path, model, config)
    return path


def test_flags_of_another_strategy_are_refused(spine, tmp_path):
    root, _ = spine
    tiny_patch_run = patch_checkpoint(tmp_path / "patches.pt")
    iterative = root / "run" / "segmenter" / "best.pt"
    out = tmp_path / "out"
    for extra, match in ((["--tta"], "--tta: "), (["--save_probabilities"], "--save_probabilities: "),
                         (["--locator_path", iterative], "needs no locator")):
        refused(predict.main, "--data_dir", root / "test", "--output_dir", out, "--segmenter_path", iterative,
                *extra, match=match)
    for flag, value in (("--max_moves", "5"), ("--min_volume", "2")):
        refused(predict.main, "--data_dir", root / "test", "--output_dir", out, "--segmenter_path", tiny_patch_run,
                flag, value, match=f"{flag}: ")
    assert not out.exists()


@pytest.mark.parametrize("args, match", [
    (["--loss_criterion", "Dice"], "--loss_criterion Dice: the iterative strategy trains with WeightedBCE"),
    (["--regions", "a=1"], "--regions: the iterative strategy"),
    (["--stage", "locator"], "--strategy iterative trains one network"),
    (["--spacing", "1", "2"], "--spacing 1.0 2.0: give one spacing"),
    (["--spacing", "0"], "--spacing 0.0: give one spacing"),
    (["--num_layers", "2"], "the iterative FCN has --base_channels alone"),
    (["--augmentation_grid", "grid.png"], "--augmentation_grid grid.png: draws the V-Net strategies' samples"),
])
def test_train_flags_that_do_not_fit_the_strategy_are_refused(spine, tmp_path, args, match):
    root, _ = spine
    refused(train.main, "--data_dir", root / "data", "--output_dir", tmp_path / "run", *TINY, *args, match=match)
    assert not (tmp_path / "run").exists()


def test_an_iterative_loss_needs_the_iterative_strategy(spine, tmp_path):
    root, _ = spine
    refused(train.main, "--data_dir", root / "data", "--output_dir", tmp_path / "run", "--strategy", "patches",
            "--loss_criterion", "WeightedBCE", match="a loss of the iterative strategy")


def test_spacing_resamples_the_training_data(spine, tmp_path):
    root, _ = spine
    run = ok(train.main, "--data_dir", root / "data", "--output_dir", tmp_path / "run", *TINY, "--spacing", "1.5",
             "--patch_size", "32", "32", "32")
    assert "spacing (1.5, 1.5, 1.5) mm" in run.stdout
    config = inference.load_checkpoint(tmp_path / "run" / "segmenter" / "best.pt")["config"]
    assert config["spacing"] == [1.5, 1.5, 1.5]


def test_cases_past_the_cache_limit_are_read_again_per_sample(spine, monkeypatch, capsys):
    root, _ = spine
    cases = ds.find_cases(root / "data", require_labels=True)
    survey = training.read_survey(cases, [c.case_id for c in cases], ds.read_dataset_json(root / "data"),
                                  need_foreground=False, instances=True)
    kept = training.load_instance_cases(cases, survey)
    monkeypatch.setattr(training, "CASE_CACHE_LIMIT", 1)
    assert training.load_instance_cases(cases, survey) == [None] * len(cases)
    assert "each sample is read from disk" in capsys.readouterr().out
    assert all(training.load_instance_cases(cases, survey, cache_cases=True))  # --cache_cases True keeps them

    def make(data):
        return training.IterativeSet(data, (32, 32, 32), training.EpochSampler(len(cases), 4, 0),
                                     lambda a, b, r: (a, b),
                                     lambda i: training.load_instance_case(cases[i], survey))
    from_memory, from_disk = make(kept), make([None] * len(cases))
    from_memory.sampler.set_epoch(1)
    from_disk.sampler.set_epoch(1)
    for j in range(4):
        assert all(torch.equal(a, b) for a, b in zip(from_memory[j], from_disk[j]))


def test_folds_resume_and_the_fold_ensemble_take_the_iterative_strategy(tmp_path):
    data, run = tmp_path / "data", tmp_path / "run"
    synthetic_spine.write_spine_dataset(data, num_cases=4, shapes=(SHAPE,), seed=4)
    ok(train.main, "--data_dir", data, "--output_dir", run, *TINY, "--num_folds", "2")
    assert "detection_rate" in (run / "fold_1" / "validation" / "metrics.csv").read_text().splitlines()[0]
    ok(train.main, "--resume", run, "--fold", "0", "--max_epochs", "2")
    assert len(list(csv.DictReader(open(run / "fold_0" / "segmenter" / "log.csv")))) == 2
    report = ok(evaluate.main, "--crossval", run)
    assert "pooled" in report.stdout and "complete_detection_rate" in report.stdout
    assert json.loads((run / "crossval_summary.json").read_text())["pooled"]["cases"] == 4
    ok(predict.main, "--data_dir", data, "--run", run, "--output_dir", tmp_path / "out", "--device", "cpu",
       "--max_instances", "2")
    assert len(list((tmp_path / "out").glob("*_instances.csv"))) == 4


def test_an_instance_lost_on_the_way_back_to_the_scans_grid_is_dropped_and_the_rest_renumbered(monkeypatch):
    """Found at 0.5 mm, written at 2 mm: a one-voxel instance between the scan's voxels vanishes,
    and the map and the records close up to 1..N."""
    work = np.zeros((32, 32, 32), np.int32)
    work[0:12, 4:28, 4:28] = 1
    work[13, 1, 1] = 2  # 6.5 mm: between the scan's voxels at 6 and 8 mm
    work[16:32, 4:28, 4:28] = 3
    found = [inference.Found(1, 0.9, 1), inference.Found(2, 0.5, 0), inference.Found(3, 0.2, 2)]
    monkeypatch.setattr(inference, "iterative_instances", lambda *a, **k: (work.copy(), found, 7))
    pipe = inference.Iterative([], (16, 16, 16), (0.5, 0.5, 0.5), ("CT",), ("ct",), lbl.binary(), torch.device("cpu"))
    props = {"spacing": (2.0, 2.0, 2.0), "origin": (0.0, 0.0, 0.0), "direction": (1, 0, 0, 0, 1, 0, 0, 0, 1)}
    labels, kept, evaluations = inference.predict_iterative(pipe, np.zeros((1, 8, 8, 8), np.float32), props)
    assert labels.shape == (8, 8, 8) and sorted(np.unique(labels).tolist()) == [0, 1, 2]
    assert [(f.instance, f.completeness) for f in kept] == [(1, 0.9), (2, 0.2)] and evaluations == 7
    assert (labels[4:, 1:7, 1:7] == 2).all() and (labels[:3, 1:7, 1:7] == 1).all()
