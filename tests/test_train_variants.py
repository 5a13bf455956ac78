"""The model variants and losses of the reference's results table, from the command line:
`--dry_run` sizes, the boolean `--attention_module`, every `--loss_criterion` training the
segmenter stage with finite numbers, and the Hybrid schedule in the CSV log."""
import csv

import numpy as np
import pytest

from conftest import TINY_TRAIN, assert_one_line_error, run_script


def dry_run(*flags):
    proc = run_script("train.py", "--dry_run", *flags)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().splitlines()


def test_dry_run_prints_reference_parameter_counts_without_data(tmp_path):
    lines = dry_run("--data_dir", tmp_path / "absent", "--output_dir", tmp_path / "run")
    assert lines == ["locator V-Net: parameters: 10,759,065", "segmenter V-Net: parameters: 10,759,065"]
    assert dry_run("--stage", "segmenter", "--num_layers", "2") == ["segmenter V-Net (num_layers=2): parameters: 16,200,025"]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flags, attention", [
    ([], False), (["--attention_module"], True), (["--attention_module", "True"], True),
    (["--attention_module", "False"], False), (["--attention_module", "--no-attention_module"], False)])
def test_attention_module_is_a_real_boolean(flags, attention):
    (line,) = dry_run("--stage", "segmenter", "--attention_dilation", "3", *flags)
    if attention:
        assert line == "segmenter V-Net (attention r=4 d=3): parameters: 10,849,652"
    else:
        assert line == "segmenter V-Net: parameters: 10,759,065"


@pytest.mark.parametrize("flags, fragment", [
    (["--attention_module", "maybe"], "--attention_module"), (["--reduction", "0"], "--reduction"),
    (["--attention_dilation", "-1"], "--attention_dilation"), (["--focal_alpha", "1.5"], "--focal_alpha"),
    (["--focal_gamma", "-1"], "--focal_gamma"), (["--boundary_floor", "2"], "--boundary_floor"),
    (["--loss_criterion", "CrossEntropy"], "--loss_criterion"), (["--boundary_schedule", "never"], "--boundary_schedule"),
    (["--cache_cases", "sometimes"], "--cache_cases")])
def test_train_refuses_bad_model_and_loss_flags(tmp_path, flags, fragment):
    assert_one_line_error(run_script("train.py", "--dry_run", "--output_dir", tmp_path / "run", *flags), fragment)
    assert not (tmp_path / "run").exists()


def train_segmenter(tiny_run, tiny_data, out, *flags):
    proc = run_script("train.py", "--stage", "segmenter", "--data_dir", tiny_data, "--output_dir", out,
                      "--locator_path", tiny_run / "locator" / "best.pt", "--split", tiny_run / "split.json",
                      *TINY_TRAIN, *flags)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = list(csv.DictReader(open(out / "segmenter" / "log.csv")))
    for row in rows:
        assert all(np.isfinite(float(v)) for v in row.values()), row
    return rows


@pytest.mark.parametrize("loss", ["Focal", "Boundary"])
def test_each_loss_trains_the_segmenter_with_finite_numbers(tiny_run, tiny_data, tmp_path, loss):
    rows = train_segmenter(tiny_run, tiny_data, tmp_path / "run", "--loss_criterion", loss, "--max_epochs", "2")
    assert [r["epoch"] for r in rows] == ["1", "2"]


def test_hybrid_epoch_schedule_shows_in_the_log(tiny_run, tiny_data, tmp_path):
    rows = train_segmenter(tiny_run, tiny_data, tmp_path / "run", "--loss_criterion", "Hybrid", "--max_epochs", "3",
                           "--boundary_schedule", "epoch", "--boundary_step", "0.1")
    assert [float(r["boundary_weight"]) for r in rows] == [1.0, 0.9, 0.8]


def test_hybrid_dice_schedule_waits_for_the_threshold(tiny_run, tiny_data, tmp_path):
    # A threshold no one-epoch model reaches: the weight must not move.
    rows = train_segmenter(tiny_run, tiny_data, tmp_path / "run", "--loss_criterion", "Hybrid", "--max_epochs", "2",
                           "--boundary_schedule", "dice", "--boundary_start_dice", "1.0", "--boundary_step", "0.1")
    assert [float(r["boundary_weight"]) for r in rows] == [1.0, 1.0]


def test_attention_segmenter_is_rebuilt_by_predict_without_model_flags(tiny_run, tiny_data, tmp_path):
    train_segmenter(tiny_run, tiny_data, tmp_path / "run", "--attention_module", "--reduction", "2",
                    "--attention_dilation", "2")
    proc = run_script("predict.py", "--data_dir", tiny_data, "--output_dir", tmp_path / "pred", "--device", "cpu",
                      "--locator_path", tiny_run / "locator" / "best.pt",
                      "--segmenter_path", tmp_path / "run" / "segmenter" / "best.pt")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert len(list((tmp_path / "pred").glob("*.nrrd"))) == 4


def test_augmentation_flags_reach_training_and_the_grid_is_written(tiny_run, tiny_data, tmp_path):
    grid = tmp_path / "grid.png"
    train_segmenter(tiny_run, tiny_data, tmp_path / "run", "--p_elastic", "1", "--elastic_magnitude", "3",
                    "--p_scale", "1", "--augmentation_grid", grid)
    assert grid.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert_one_line_error(run_script("train.py", "--dry_run", "--p_flip", "2"), "--p_flip")


@pytest.mark.parametrize("flags, from_locator", [([], True), (["--no-init_from_locator"], False),
                                                 (["--base_channels", "3"], False)])
def test_segmenter_starts_from_the_locator_weights(tiny_run, tiny_data, tmp_path, flags, from_locator):
    import torch
    train_segmenter(tiny_run, tiny_data, tmp_path / "run", "--learning_rate", "1e-12", *flags)
    loc = torch.load(tiny_run / "locator" / "best.pt", weights_only=True)["model"]
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
