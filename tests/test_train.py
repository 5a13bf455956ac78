"""train.py from the command line: the run folder it writes, the model variants and losses of the
reference's results table, the segmenter's start from the locator, the Hybrid schedule in the
log (and no schedule for the other losses), each case decoded once per stage and located once,
and every bad input refused with one line, a non-zero exit and nothing written."""
import csv
import json
import shutil

import numpy as np
import pytest
import torch

import dataset as ds
import inference
import plots
import predict
import train
from conftest import TINY_TRAIN, assert_one_line_error, run_main, train_ok


def log_rows(run, stage):
    with open(run / stage / "log.csv") as f:
        return list(csv.DictReader(f))


def test_train_writes_the_run_folder(trained_run):
    for rel in ["config.json", "split.json", "locator/best.pt", "locator/latest.pt", "locator/log.csv",
                "locator/curves.png", "locator/centres.json", "segmenter/best.pt", "segmenter/latest.pt",
                "segmenter/log.csv", "segmenter/curves.png"]:
        assert (trained_run / rel).is_file(), rel
    ckpt = torch.load(trained_run / "segmenter" / "best.pt", weights_only=True)
    assert {"model", "config", "epoch", "best_score", "score_name"} <= set(ckpt)
    assert ckpt["config"]["role"] == "segmenter" and all(p % 16 == 0 for p in ckpt["config"]["patch_size"])
    assert ckpt["score_name"] == "val_dice"
    assert ckpt["best_score"] == pytest.approx(max(float(r["val_dice"]) for r in log_rows(trained_run, "segmenter")),
                                               abs=1e-5)  # the log's 5 decimals
    locator = torch.load(trained_run / "locator" / "best.pt", weights_only=True)["config"]
    assert locator["scale_factor"] == [0.5, 0.25, 0.25] and "factors" not in locator
    split = json.loads((trained_run / "split.json").read_text())
    centres = json.loads((trained_run / "locator" / "centres.json").read_text())
    assert sorted(centres) == sorted(split["train"] + split["val"]) and all(c["found"] for c in centres.values())
    for stage, epochs in (("locator", 20), ("segmenter", 10)):
        rows = log_rows(trained_run, stage)
        assert [r["epoch"] for r in rows] == [str(e) for e in range(1, epochs + 1)]
        assert all(np.isfinite(float(r[k])) for r in rows for k in ("train_loss", "val_dice", "learning_rate"))


def test_dice_loss_logs_no_boundary_weight_and_checkpoints_no_schedule(trained_run, tiny_data, tmp_path):
    """Only the Hybrid loss has a Dice weight: other losses leave the column empty, store no
    schedule and draw no weight curve, in a resumed run too."""
    for stage in ("locator", "segmenter"):
        assert {r["boundary_weight"] for r in log_rows(trained_run, stage)} == {""}
        assert torch.load(trained_run / stage / "latest.pt", weights_only=True)["boundary_schedule"] is None
    run = tmp_path / "run"
    train_segmenter(trained_run, tiny_data, run, "--loss_criterion", "Focal", "--max_epochs", "1")
    train_ok("--resume", run, "--max_epochs", "2")
    assert json.loads((run / "config.json").read_text())["segmenter"]["max_epochs"] == 2
    assert [r["boundary_weight"] for r in log_rows(run, "segmenter")] == ["", ""]
    assert plots.training_curves(tmp_path / "c.png", log_rows(run, "segmenter")) == ["training loss", "validation Dice"]


def train_segmenter(trained_run, data, out, *flags):
    """The segmenter stage alone on the trained run's locator, one step per epoch."""
    train_ok("--stage", "segmenter", "--data_dir", data, "--output_dir", out,
             "--locator_path", trained_run / "locator" / "best.pt", *TINY_TRAIN, *flags)
    rows = log_rows(out, "segmenter")
    for row in rows:
        assert all(np.isfinite(float(v)) for v in row.values() if v != ""), row
    return rows


@pytest.mark.parametrize("loss", ["Focal", "Boundary"])
def test_each_loss_trains_the_segmenter_with_finite_numbers(trained_run, tiny_data, tmp_path, loss):
    rows = train_segmenter(trained_run, tiny_data, tmp_path / "run", "--loss_criterion", loss, "--max_epochs", "2")
    assert [r["epoch"] for r in rows] == ["1", "2"]


def test_hybrid_epoch_schedule_shows_in_the_log_checkpoint_and_curves(trained_run, tiny_data, tmp_path):
    rows = train_segmenter(trained_run, tiny_data, tmp_path / "run", "--loss_criterion", "Hybrid",
                           "--max_epochs", "3", "--boundary_schedule", "epoch", "--boundary_step", "0.1")
    assert [float(r["boundary_weight"]) for r in rows] == [1.0, 0.9, 0.8]
    latest = torch.load(tmp_path / "run" / "segmenter" / "latest.pt", weights_only=True)
    assert latest["boundary_schedule"] == {"weight": pytest.approx(0.7), "started": True}  # for epoch 4
    assert "hybrid Dice weight" in plots.training_curves(tmp_path / "c.png", rows)


def test_hybrid_dice_schedule_waits_for_the_threshold(trained_run, tiny_data, tmp_path):
    # A threshold no one-step model reaches: the weight must not move.
    rows = train_segmenter(trained_run, tiny_data, tmp_path / "run", "--loss_criterion", "Hybrid", "--max_epochs", "2",
                           "--boundary_schedule", "dice", "--boundary_start_dice", "1.0", "--boundary_step", "0.1")
    assert [float(r["boundary_weight"]) for r in rows] == [1.0, 1.0]


def test_attention_segmenter_is_rebuilt_by_predict_without_model_flags(trained_run, tiny_data, tmp_path):
    train_segmenter(trained_run, tiny_data, tmp_path / "run", "--attention_module", "--reduction", "2",
                    "--attention_dilation", "2")
    run = run_main(predict.main, "--data_dir", tiny_data, "--output_dir", tmp_path / "pred", "--device", "cpu",
                   "--locator_path", trained_run / "locator" / "best.pt",
                   "--segmenter_path", tmp_path / "run" / "segmenter" / "best.pt")
    assert run.returncode == 0, run.stderr
    assert len(list((tmp_path / "pred").glob("*.nrrd"))) == 4


def test_augmentation_flags_reach_training_and_the_grid_is_written(trained_run, tiny_data, tmp_path):
    grid = tmp_path / "grid.png"
    train_segmenter(trained_run, tiny_data, tmp_path / "run", "--p_elastic", "1", "--elastic_magnitude", "3",
                    "--p_scale", "1", "--augmentation_grid", grid)
    assert grid.read_bytes()[:8] == plots.PNG_SIGNATURE
    assert_one_line_error(run_main(train.main, "--dry_run", "--p_flip", "2"), "--p_flip")


@pytest.mark.parametrize("flags, from_locator", [(["--base_channels", "4"], True),  # the trained locator's
                                                 (["--base_channels", "4", "--no-init_from_locator"], False),
                                                 (["--base_channels", "3"], False)])
def test_segmenter_starts_from_the_locator_weights(trained_run, tiny_data, tmp_path, flags, from_locator):
    train_segmenter(trained_run, tiny_data, tmp_path / "run", "--learning_rate", "1e-12", *flags)
    loc = torch.load(trained_run / "locator" / "best.pt", weights_only=True)["model"]
    seg = torch.load(tmp_path / "run" / "segmenter" / "best.pt", weights_only=True)
    assert seg["config"]["init_from_locator"] is from_locator  # a locator of other widths is not copied
    # unit_variance_init rescales each convolution by a positive factor, so a kernel started
    # from the locator's points the same way; trained with a vanishing rate it stays there
    same_shape = [k for k, v in loc.items() if v.ndim == 5 and v.numel() >= 64 and seg["model"][k].shape == v.shape]
    cosines = [torch.nn.functional.cosine_similarity(seg["model"][k].flatten(), loc[k].flatten(), dim=0).item()
               for k in same_shape]  # every kernel but the logit layer's, where the widths agree
    if from_locator:
        assert len(cosines) > 20 and min(cosines) > 0.999
    else:
        assert max(cosines, default=0) < 0.9


def test_each_case_is_decoded_once_per_stage_and_located_once(trained_run, tiny_data, tmp_path, monkeypatch):
    decoded, located = [], []
    read_image, read_channels, locate = ds.read_image, ds.read_image_channels, inference.locate
    monkeypatch.setattr(ds, "read_image", lambda path: decoded.append(path.name) or read_image(path))
    monkeypatch.setattr(ds, "read_image_channels", lambda path: decoded.append(path.name) or read_channels(path))
    monkeypatch.setattr(inference, "locate", lambda *a, **k: located.append(1) or locate(*a, **k))
    train_ok("--data_dir", tiny_data, "--output_dir", tmp_path / "both", *TINY_TRAIN)
    assert decoded.count("lgemri.nrrd") == 2 * 4  # locator stage, segmenter stage
    assert decoded.count("laendo.nrrd") == 3 * 4  # and once before, for the atria's boxes
    assert len(located) == 4  # by the locator stage, for its centres.json and the segmenter's crops
    decoded.clear()
    located.clear()
    train_segmenter(trained_run, tiny_data, tmp_path / "segmenter")  # the given locator, run once per case
    assert (decoded.count("lgemri.nrrd"), decoded.count("laendo.nrrd"), len(located)) == (4, 2 * 4, 4)


def test_crop_regions_in_memory_train_exactly_as_cases_read_from_disk(trained_run, tiny_data, tmp_path):
    weights = {}
    for cache in ("True", "False"):
        out = tmp_path / cache
        train_segmenter(trained_run, tiny_data, out, "--cache_cases", cache, "--max_epochs", "2",
                        "--samples_per_epoch", "6", "--num_workers", "0")
        weights[cache] = torch.load(out / "segmenter" / "latest.pt", weights_only=True)["model"]
        rows = log_rows(out, "segmenter")
        weights[cache + "_log"] = [(r["train_loss"], r["val_dice"]) for r in rows]
    assert weights["True_log"] == weights["False_log"]
    assert all(torch.equal(weights["True"][k], weights["False"][k]) for k in weights["True"])


def test_dry_run_prints_reference_parameter_counts_without_data(tmp_path):
    run = run_main(train.main, "--dry_run", "--data_dir", tmp_path / "absent", "--output_dir", tmp_path / "run")
    assert run.stdout.splitlines() == ["locator V-Net: parameters: 10,759,065",
                                       "segmenter V-Net: parameters: 10,759,065"]
    run = run_main(train.main, "--dry_run", "--stage", "segmenter", "--num_layers", "2")
    assert run.stdout.splitlines() == ["segmenter V-Net (num_layers=2): parameters: 16,200,025"]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flags, attention", [
    ([], False), (["--attention_module"], True), (["--attention_module", "True"], True),
    (["--attention_module", "False"], False), (["--attention_module", "--no-attention_module"], False)])
def test_attention_module_is_a_real_boolean(flags, attention):
    run = run_main(train.main, "--dry_run", "--stage", "segmenter", "--attention_dilation", "3", *flags)
    if attention:
        assert run.stdout == "segmenter V-Net (attention r=4 d=3): parameters: 10,849,652\n"
    else:
        assert run.stdout == "segmenter V-Net: parameters: 10,759,065\n"


@pytest.mark.parametrize("flags, fragment", [
    (["--attention_module", "maybe"], "--attention_module"), (["--reduction", "0"], "--reduction"),
    (["--attention_dilation", "-1"], "--attention_dilation"), (["--focal_alpha", "1.5"], "--focal_alpha"),
    (["--focal_gamma", "-1"], "--focal_gamma"), (["--boundary_floor", "2"], "--boundary_floor"),
    (["--loss_criterion", "CrossEntropy"], "--loss_criterion"),
    (["--boundary_schedule", "never"], "--boundary_schedule"),
    (["--cache_cases", "sometimes"], "--cache_cases"), (["--max_epochs", "-1"], "--max_epochs"),
    (["--scale_factor", "0.3", "0.25", "0.25"], "--scale_factor"), (["--reduce", "1.5"], "--reduce"),
    (["--patch_size", "20", "64", "64"], "--patch_size"), (["--learning_rate", "0"], "--learning_rate"),
    (["--padding", "-2", "0", "0"], "--padding"), (["--stage", "everything"], "--stage"),
    (["--batch_size", "two"], "--batch_size")])
def test_train_refuses_impossible_flags(tiny_data, tmp_path, flags, fragment):
    assert_one_line_error(run_main(train.main, "--data_dir", tiny_data, "--output_dir", tmp_path / "run",
                                   *TINY_TRAIN, *flags), fragment)
    assert not (tmp_path / "run").exists()


def corrupt(data, problem):
    case = data / "case_000"
    image, props = ds.read_image(case / "lgemri.nrrd")
    if problem == "missing label":
        (case / "laendo.nrrd").unlink()
    elif problem == "fractional label":
        label = ds.read_image(case / "laendo.nrrd")[0].astype(np.float32)
        label[0, 0, 0] = 0.5
        ds.write_image(label, props, case / "laendo.nrrd")
    elif problem == "NaN voxels":
        image = image.astype(np.float32)
        image[3, 3, 3] = np.nan
        ds.write_image(image, props, case / "lgemri.nrrd")
    elif problem == "shape mismatch":
        ds.write_image(np.zeros((8, 8, 8), np.uint8), props, case / "laendo.nrrd")
    elif problem == "corrupt file":
        (case / "lgemri.nrrd").write_bytes((case / "lgemri.nrrd").read_bytes()[:100])
    elif problem == "truncated voxels":
        (case / "lgemri.nrrd").write_bytes((case / "lgemri.nrrd").read_bytes()[:-1000])
    elif problem == "4D volume":
        import SimpleITK as sitk
        four_d = sitk.GetImageFromArray(np.zeros((2, 4, 4, 4), np.uint8), isVector=False)
        sitk.WriteImage(four_d, str(case / "lgemri.nrrd"))
    elif problem == "empty label":
        ds.write_image(np.zeros(image.shape, np.uint8), props, case / "laendo.nrrd")


@pytest.mark.parametrize("problem, fragment", [
    ("missing label", "laendo.nrrd"), ("fractional label", "whole numbers"), ("NaN voxels", "NaN"),
    ("shape mismatch", "label shape"), ("corrupt file", "cannot be read"), ("truncated voxels", "cannot be read"),
    ("4D volume", "2 channel"), ("empty label", "label is empty")])
def test_train_refuses_bad_data_with_one_line_and_writes_nothing(tiny_data, tmp_path, problem, fragment):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    corrupt(data, problem)
    out = tmp_path / "run"
    split = tmp_path / "split.json"  # case_000 in training, where an empty label is refused
    split.write_text(json.dumps({"train": ["case_000", "case_001", "case_002"], "val": ["case_003"]}))
    assert_one_line_error(run_main(train.main, "--data_dir", data, "--output_dir", out, "--split", split,
                                   *TINY_TRAIN), "case_000", fragment)
    assert not out.exists()


def test_train_refuses_empty_or_misnamed_data_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "misnamed" / "case_a").mkdir(parents=True)
    (tmp_path / "misnamed" / "case_a" / "image.nrrd").write_bytes(b"")
    for folder in ("empty", "misnamed", "absent"):
        assert_one_line_error(run_main(train.main, "--data_dir", tmp_path / folder, "--output_dir", tmp_path / "run",
                                       *TINY_TRAIN), "--data_dir", folder)
    assert not (tmp_path / "run").exists()


def test_train_does_not_clobber_a_trained_stage(trained_run, tiny_data):
    before = (trained_run / "locator" / "best.pt").read_bytes()
    assert_one_line_error(run_main(train.main, "--data_dir", tiny_data, "--output_dir", trained_run, *TINY_TRAIN),
                          "--overwrite")
    assert (trained_run / "locator" / "best.pt").read_bytes() == before


def test_segmenter_stage_needs_a_locator_of_the_same_spacing(trained_run, tiny_data, tmp_path):
    assert_one_line_error(run_main(train.main, "--stage", "segmenter", "--data_dir", tiny_data,
                                   "--output_dir", tmp_path / "run", *TINY_TRAIN), "--locator_path")
    coarse = tmp_path / "coarse"
    for case in ds.find_cases(tiny_data, require_labels=True):
        image, label, props = ds.load_case(case)
        for name, array, is_label in (("lgemri.nrrd", image, False), ("laendo.nrrd", label, True)):
            ds.write_image(ds.resample(array, props, (1.25,) * 3, label=is_label)[0],
                           {**props, "spacing": (1.25,) * 3}, coarse / case.case_id / name)
    assert_one_line_error(run_main(train.main, "--stage", "segmenter", "--data_dir", coarse, "--output_dir",
                                   tmp_path / "run", "--locator_path", trained_run / "locator" / "best.pt",
                                   *TINY_TRAIN), "--locator_path", "spacing")
    assert not (tmp_path / "run").exists()
