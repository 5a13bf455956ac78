"""2D models and cine data: the ACDC layout (frames grouped by patient, Info.cfg), the 2D V-Net
and its 5D stacks of slices, slice-by-slice training and prediction on each scan's own slice
spacing, a 4D cine in and a 4D label map out, and transfer learning (--init_from,
--freeze_encoder_epochs)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import dataset as ds
import evaluate
import inference
import predict
import splits
import train
import training
from conftest import assert_one_line_error, run_main
from labels import Labels
from models import VNet, build_model, count_parameters, describe, model_arch
from utils import UserError

TINY_2D = ["--spatial_dims", "2", "--patch_size", "32", "32", "--base_channels", "2", "--max_epochs", "1",
           "--samples_per_epoch", "4", "--batch_size", "4", "--device", "cpu"]
OBLIQUE = (0.8, -0.6, 0.0, 0.6, 0.8, 0.0, 0.0, 0.0, 1.0)


def write_subject(root: Path, i: int, rng, frames: int = 4, slice_mm: float = 8.0, size=(24, 40)) -> Path:
    """An ACDC-layout subject: rings (myocardium 2 around cavity 3) and an RV (1) in every inner
    slice, the cavity shrinking towards frame `frames // 2 + 1` (ES)."""
    d = root / f"patient{i:03d}"
    d.mkdir(parents=True)
    props = {"spacing": (slice_mm, 1.5, 1.4), "origin": (10.0, -4.0, 2.0), "direction": OBLIQUE}
    h, w = size
    yy, xx = np.mgrid[:h, :w]
    cy, cx = h / 2 + rng.integers(-2, 3), w / 2 + rng.integers(-2, 3)
    images, labels = [], []
    for t in range(frames):
        r = 5.0 - 2.0 * np.sin(np.pi * t / frames)
        label = np.zeros((5, h, w), np.uint8)
        dist = np.hypot(yy - cy, xx - cx)
        for z in range(1, 4):
            label[z][dist < r + 2] = 2
            label[z][dist < r] = 3
            label[z][(np.hypot(yy - cy, xx - cx - r - 5) < r) & (label[z] == 0)] = 1
        image = np.select([label == 3, label == 2, label == 1], [1.0, 0.2, 0.8], 0.5) + rng.normal(0, 0.05, label.shape)
        images.append(image.astype(np.float32))
        labels.append(label)
    ds.write_image(np.stack(images), {**props, "axis4": (30.0, 0.0)}, d / f"{d.name}_4d.nii.gz")
    es = frames // 2 + 1
    for f in (1, es):
        ds.write_image(images[f - 1], props, d / f"{d.name}_frame{f:02d}.nii.gz")
        ds.write_image(labels[f - 1], props, d / f"{d.name}_frame{f:02d}_gt.nii.gz")
    (d / "Info.cfg").write_text(f"ED: 1\nES: {es}\nGroup: NOR\nHeight: 170.0\nNbFrame: {frames}\nWeight: 70.0\n")
    return d


@pytest.fixture(scope="module")
def acdc(tmp_path_factory):
    root = tmp_path_factory.mktemp("acdc")
    rng = np.random.default_rng(0)
    for i in range(1, 6):
        write_subject(root, i, rng, slice_mm=8.0 if i % 2 else 10.0)  # two slice spacings
    return root


@pytest.fixture(scope="module")
def run2d(acdc, tmp_path_factory):
    run = tmp_path_factory.mktemp("run2d")
    result = run_main(train.main, "--data_dir", acdc, "--output_dir", run, *TINY_2D)
    assert result.returncode == 0, result.stderr
    return run


# ----------------------------------------------------------------------------- the ACDC layout

def test_acdc_frames_are_cases_grouped_by_patient(acdc):
    cases = ds.find_cases(acdc, require_labels=True)
    assert [c.case_id for c in cases[:2]] == ["patient001_frame01", "patient001_frame03"]
    assert all(c.group == c.case_id.split("_")[0] and c.label.name == f"{c.case_id}_gt.nii.gz" for c in cases)
    assert len(cases) == 10
    assert ds.read_dataset_json(acdc).labels == ds.ACDC_LABELS  # ACDC's classes without a dataset.json


def test_acdc_frames_without_their_gt_are_left_out_of_training_only(acdc, tmp_path):
    d = tmp_path / "patient001"
    d.mkdir()
    for f in (acdc / "patient001").iterdir():
        (d / f.name).symlink_to(f)
    (d / "patient001_frame02.nii.gz").symlink_to(acdc / "patient001" / "patient001_frame01.nii.gz")  # no _gt
    assert [c.case_id for c in ds.find_cases(tmp_path, require_labels=True)] == ["patient001_frame01",
                                                                                 "patient001_frame03"]
    assert len(ds.find_cases(tmp_path, require_labels=False)) == 3  # prediction takes every frame
    for f in d.glob("*_gt.nii.gz"):
        f.unlink()
    with pytest.raises(UserError, match="missing label"):  # no labelled frame at all
        ds.find_cases(tmp_path, require_labels=True)


def test_acdc_patient_without_frames_gives_its_cine(acdc, tmp_path):
    d = tmp_path / "patient009"
    d.mkdir()
    (d / "patient009_4d.nii.gz").symlink_to(acdc / "patient001" / "patient001_4d.nii.gz")
    (d / "Info.cfg").write_text("ED: 1\nES: 3\n")
    (case,) = ds.find_cases(tmp_path, require_labels=False)
    assert case.case_id == "patient009_4d" and case.label is None and case.group == "patient009"
    with pytest.raises(UserError, match="patient009_4d_gt.nii.gz"):
        ds.find_cases(tmp_path, require_labels=True)


@pytest.mark.parametrize("text, fragment", [
    ("ED: 1\nES: 31\nNbFrame: 30\n", "ES: 31 is not a frame number from 1 to 30"),
    ("ED: 0\nES: 3\n", "ED: 0"),
    ("ED: one\nES: 3\n", "ED: one"),
    ("ED 1\n", "line 1"),
])
def test_info_cfg_bad_frames_name_the_file(tmp_path, text, fragment):
    path = tmp_path / "Info.cfg"
    path.write_text(text)
    with pytest.raises(UserError, match=fragment) as e:
        ds.cardiac_phases(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_info_cfg_phases_checked_against_the_cine(tmp_path):
    path = tmp_path / "Info.cfg"
    path.write_text("ED: 1\nES: 12\nGroup: DCM\nNbFrame: 30\n")
    assert ds.read_info_cfg(path)["Group"] == "DCM"
    assert ds.cardiac_phases(path) == (1, 12)
    with pytest.raises(UserError, match="from 1 to 10"):
        ds.cardiac_phases(path, num_frames=10)  # the 4D image holds fewer frames than Info.cfg says
    path.write_text("Group: NOR\n")
    assert ds.cardiac_phases(path) is None


def test_split_keeps_a_patients_frames_together(acdc):
    cases = ds.find_cases(acdc, require_labels=True)
    groups = {c.case_id: c.group for c in cases}
    for seed in range(5):
        split = splits.make_split(list(groups), 0.4, seed, groups)
        assert split["val"] and not {groups[c] for c in split["train"]} & {groups[c] for c in split["val"]}
        assert len(split["val"]) == 4  # two of five patients, both frames each
    ids = [f"case_{k:03d}" for k in range(10)]
    assert splits.make_split(ids, 0.2, 3, {c: c for c in ids}) == splits.make_split(ids, 0.2, 3)
    assert splits.make_split(ids, 0, 3) == {"train": ids, "val": []}  # 0: every case trains (k-subject runs)
    assert len(splits.make_split(ids, 0.01, 3)["val"]) == 1  # any other fraction holds one out at least


def test_a_split_file_dividing_a_patient_is_refused(acdc, tmp_path):
    ids = [c.case_id for c in ds.find_cases(acdc, require_labels=True)]
    split = tmp_path / "split.json"
    train_ids = [i for i in ids if i != "patient001_frame03"]
    split.write_text(json.dumps({"train": train_ids, "val": ["patient001_frame03"]}))
    run = tmp_path / "run"
    assert_one_line_error(run_main(train.main, "--data_dir", acdc, "--output_dir", run, "--split", split, *TINY_2D),
                          "splits patient patient001")
    assert not run.exists()


# ----------------------------------------------------------------------------- the 2D V-Net

def conv_count(cin, cout, k, dims):
    return cin * cout * k ** dims + cout


def vnet_count(c, n, dims, cin=1, cout=1):
    """Parameters of the V-Net by hand: convolutions (weights and biases) and PReLUs."""
    total = conv_count(cin, c, 5, dims) + c                                        # input stage
    for width, layers in ((c, n), (2 * c, n), (4 * c, n + 1), (8 * c, n + 1)):    # down stages
        total += conv_count(width, 2 * width, 2, dims) + 2 * width
        total += layers * (conv_count(2 * width, 2 * width, 5, dims) + 2 * width)
    for cin_, cout_, layers in ((16 * c, 16 * c, n + 1), (16 * c, 8 * c, n + 1), (8 * c, 4 * c, n), (4 * c, 2 * c, n)):
        total += conv_count(cin_, cout_ // 2, 2, dims) + cout_ // 2                   # up-convolution
        total += layers * (conv_count(cout_, cout_, 5, dims) + cout_)
    return total + conv_count(2 * c, cout, 1, dims)


@pytest.mark.parametrize("dims", [2, 3])
def test_parameter_counts_by_hand(dims):
    assert vnet_count(8, 1, 3) == 10_759_065  # the formula reproduces the reference's 3D count
    assert count_parameters(VNet(spatial_dims=dims)) == vnet_count(8, 1, dims)
    assert count_parameters(VNet(2, 4, num_layers=2, base_channels=4, spatial_dims=dims)) == \
        vnet_count(4, 2, dims, 2, 4)


def test_2d_vnet_segments_each_slice_of_a_stack_on_its_own():
    torch.manual_seed(0)
    model = VNet(1, 3, base_channels=2, spatial_dims=2, attention_module=True).eval()
    stack = torch.randn(2, 1, 3, 32, 48)
    with torch.no_grad():
        out = model(stack)
        assert out.shape == (2, 3, 3, 32, 48)
        for z in range(3):
            assert torch.allclose(out[:, :, z], model(stack[:, :, z]), atol=1e-5)
    arch = model_arch(model)
    assert arch["spatial_dims"] == 2 and describe(arch).startswith("2D V-Net")
    assert build_model(arch).state_dict().keys() == model.state_dict().keys()
    old = {k: v for k, v in model_arch(VNet(base_channels=2)).items() if k != "spatial_dims"}
    assert build_model(old).spatial_dims == 3  # a record from before 2D models
    with pytest.raises(ValueError, match="spatial_dims"):
        VNet(spatial_dims=4)


# ----------------------------------------------------------------------------- transfer learning

def test_3d_kernels_become_2d_ones_that_answer_a_constant_depth_alike():
    torch.manual_seed(0)
    net3, net2 = VNet(1, 2, base_channels=2), VNet(1, 2, base_channels=2, spatial_dims=2)
    moved = net2.transfer_from(net3.state_dict())
    assert not moved["skipped"] and "input.conv.weight" in moved["converted"] and "input.act.weight" in moved["loaded"]
    image = torch.randn(1, 1, 1, 32, 32)
    with torch.no_grad():
        deep = net3.down1(net3.input(image.expand(1, 1, 16, 32, 32)))  # the slice repeated along depth
        flat = net2.down1(net2.input(image[:, :, 0]))
    assert torch.allclose(deep[:, :, 4], flat, atol=1e-5)  # away from the depth's zero padding
    back = VNet(1, 2, base_channels=2)
    back.transfer_from(net2.state_dict())  # inflated 2D kernels: the 3D network answers alike again
    with torch.no_grad():
        deep = back.input(image.expand(1, 1, 16, 32, 32))
        assert torch.allclose(deep[:, :, 8], net2.input(image[:, :, 0]), atol=1e-5)


def test_init_from_reinitialises_the_output_when_the_classes_differ(run2d, tmp_path, capsys):
    ckpt = run2d / "segmenter" / "best.pt"
    same = VNet(1, 4, base_channels=2, spatial_dims=2)
    record = training.start_from_checkpoint(same, ckpt, ds.ACDC_LABELS)
    assert record["loaded"] == len(same.state_dict()) and not record["output_reinitialised"]
    other = VNet(1, 4, base_channels=2, spatial_dims=2)
    before = other.output.weight.clone()
    record = training.start_from_checkpoint(other, ckpt, Labels((1, 2, 4), ("a", "b", "c")))
    assert record["output_reinitialised"] and record["skipped"] == ["output.weight", "output.bias"]
    assert torch.equal(other.output.weight, before)
    assert "output layer starts anew" in capsys.readouterr().out
    with pytest.raises(UserError, match="shares no tensor"):
        training.start_from_checkpoint(VNet(1, 2, base_channels=3, spatial_dims=2), ckpt, ds.ACDC_LABELS)


def test_freeze_encoder_keeps_it_bit_identical_then_trains_it(acdc, run2d, tmp_path):
    start = torch.load(run2d / "segmenter" / "best.pt", weights_only=True)["model"]
    run = tmp_path / "tuned"
    result = run_main(train.main, "--data_dir", acdc, "--output_dir", run, *TINY_2D, "--max_epochs", "2",
                      "--init_from", run2d / "segmenter" / "best.pt", "--freeze_encoder_epochs", "2")
    assert result.returncode == 0, result.stderr
    assert "65 of 65 tensors loaded" in result.stdout
    after = torch.load(run / "segmenter" / "latest.pt", weights_only=True)
    encoder = [k for k in start if k.split(".")[0] in ("input", "down1", "down2", "down3", "down4")]
    assert encoder and all(torch.equal(start[k], after["model"][k]) for k in encoder)
    assert not torch.equal(start["up1.convs.0.weight"], after["model"]["up1.convs.0.weight"])
    assert after["config"]["init_from"]["loaded"] == 65
    config = json.loads((run / "config.json").read_text())["segmenter"]
    assert config["init_from"] == str(run2d / "segmenter" / "best.pt")
    result = run_main(train.main, "--resume", run, "--max_epochs", "3")  # past the frozen epochs
    assert result.returncode == 0, result.stderr
    last = torch.load(run / "segmenter" / "latest.pt", weights_only=True)["model"]
    assert not torch.equal(start["down1.down.weight"], last["down1.down.weight"])


@pytest.mark.parametrize("flags, fragment", [
    (["--spatial_dims", "4"], "--spatial_dims"),
    (["--patch_size", "32", "32", "32"], "H W (two sizes)"),
    (["--strategy", "two_stage"], "--strategy two_stage"),
    (["--freeze_encoder_epochs", "2"], "--init_from"),
    (["--freeze_encoder_epochs", "-1"], "--freeze_encoder_epochs -1"),
    (["--init_from", "nowhere.pt"], "--init_from nowhere.pt"),
    (["--locator_init_from", "nowhere.pt"], "--locator_init_from"),
    (["--foreground_fraction", "1.5"], "--foreground_fraction 1.5"),
    (["--spatial_dims", "3", "--patch_size", "16", "16", "16", "--strategy", "patches", "--context_slices", "1"],
     "--context_slices 1"),
])
def test_bad_2d_and_transfer_flags_are_one_line_and_write_nothing(acdc, tmp_path, flags, fragment):
    run = tmp_path / "run"
    assert_one_line_error(run_main(train.main, "--data_dir", acdc, "--output_dir", run, *TINY_2D, *flags), fragment)
    assert not run.exists()


def test_init_from_a_file_that_is_not_a_checkpoint(acdc, tmp_path):
    bad = tmp_path / "weights.pt"
    torch.save({"state": 1}, bad)
    run = tmp_path / "run"
    assert_one_line_error(run_main(train.main, "--data_dir", acdc, "--output_dir", run, *TINY_2D, "--init_from", bad),
                          "--init_from", "not a checkpoint written by this repository")
    assert not run.exists()


# ----------------------------------------------------------------------------- 2D training and prediction

def test_2d_run_keeps_each_scans_slices(run2d, acdc):
    config = torch.load(run2d / "segmenter" / "best.pt", weights_only=True)["config"]
    assert config["spacing"][0] is None and config["patch_size"] == [1, 32, 32]
    assert config["arch"]["spatial_dims"] == 2 and config["strategy"] == "patches"
    assert config["labels"] == ds.ACDC_LABELS.record()
    assert np.allclose(ds.working_spacing((10.0, 1.2, 1.2), config["spacing"]), (10.0, 1.5, 1.4))


def test_2d_prediction_of_frames_and_of_a_4d_cine(run2d, acdc, tmp_path):
    out = tmp_path / "out"
    result = run_main(predict.main, "--data_dir", acdc, "--output_dir", out, "--output_format", "nii.gz",
                      "--segmenter_path", run2d / "segmenter" / "best.pt", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    mask, props = ds.read_image(out / "patient002_frame03.nii.gz")
    _, own = ds.read_image(acdc / "patient002" / "patient002_frame03.nii.gz")
    assert mask.shape == (5, 24, 40) and ds.same_geometry(props, own) and props["spacing"][0] == 10.0
    assert set(np.unique(mask)) <= {0, 1, 2, 3}
    assert "LV cavity" in (out / "metrics.csv").read_text()
    cine = acdc / "patient002" / "patient002_4d.nii.gz"
    result = run_main(predict.main, "--input", cine, "--output_dir", tmp_path / "cine", "--output_format", "nii.gz",
                      "--segmenter_path", run2d / "segmenter" / "best.pt", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    written, source = sitk.ReadImage(str(tmp_path / "cine" / "patient002_4d.nii.gz")), sitk.ReadImage(str(cine))
    assert written.GetSize() == source.GetSize() == (40, 24, 5, 4)
    for get in ("GetSpacing", "GetOrigin", "GetDirection"):
        assert np.allclose(getattr(written, get)(), getattr(source, get)())
    frames = sitk.GetArrayFromImage(written)
    assert np.array_equal(frames[2], mask)  # frame 3 of the cine is the frame predicted on its own


def test_4d_image_of_one_frame_is_refused(run2d, acdc, tmp_path):
    image, props = ds.read_image(acdc / "patient001" / "patient001_frame01.nii.gz")
    one = tmp_path / "one_4d.nrrd"  # (NIfTI drops a last axis of size 1: ITK reads such a file as 3D)
    ds.write_image(image[None], props, one)
    out = tmp_path / "out"
    assert_one_line_error(run_main(predict.main, "--input", one, "--output_dir", out, "--segmenter_path",
                                   run2d / "segmenter" / "best.pt", "--device", "cpu"), str(one), "one frame")
    assert not out.exists() or not any(out.iterdir())


def test_2d_and_3d_checkpoints_do_not_make_an_ensemble(run2d, msd3d_like, tmp_path):
    assert_one_line_error(run_main(predict.main, "--input", msd3d_like[0], "--output_dir", tmp_path / "out",
                                   "--segmenter_path", run2d / "segmenter" / "best.pt", msd3d_like[1],
                                   "--device", "cpu"), "spatial dimensions")


@pytest.fixture(scope="module")
def msd3d_like(acdc, tmp_path_factory):
    """A 3D patch-strategy checkpoint trained on the same frames, and a scan to predict."""
    run = tmp_path_factory.mktemp("run3d")
    result = run_main(train.main, "--data_dir", acdc, "--output_dir", run, "--strategy", "patches", "--patch_size",
                      "16", "16", "16", "--base_channels", "2", "--max_epochs", "1", "--samples_per_epoch", "2",
                      "--device", "cpu")
    assert result.returncode == 0, result.stderr
    return acdc / "patient001" / "patient001_frame01.nii.gz", run / "segmenter" / "best.pt"


# ----------------------------------------------------------------------------- sampling slices

def test_sampler_anywhere_covers_every_start_uniformly():
    label = np.zeros((3, 6, 6), np.uint8)
    label[1, 2, 2] = 1
    sampler = ds.PatchSampler(label, (1, 4, 4))
    rng = np.random.default_rng(0)
    counts = {}
    for _ in range(2700):
        start = sampler.anywhere(rng)
        counts[start] = counts.get(start, 0) + 1
    assert len(counts) == 3 * 3 * 3 and min(counts.values()) > 60  # 27 starts, about 100 each
    assert all(sampler.foreground_in(sampler(rng)) > 0 for _ in range(50))  # the biased draw keeps its rule


@pytest.mark.parametrize("fraction, empty", [(1.0, False), (0.0, True)])
def test_foreground_fraction_lets_slices_beyond_the_heart_be_drawn(acdc, fraction, empty):
    cases = ds.find_cases(acdc, require_labels=True)[:2]
    survey = training.read_survey(cases, [c.case_id for c in cases], ds.read_dataset_json(acdc), spatial_dims=2)
    settings = training.PatchSettings(batch_size=1, learning_rate=1e-3, patience=1, reduce=0.5, max_epochs=1,
                                      samples_per_epoch=64, loss_criterion="DiceCE", augment=lambda x, y, rng: (x, y),
                                      max_background=0.95, foreground_fraction=fraction)
    patch = (1, 16, 16)
    data = training.load_volume_cases(cases, survey, settings, patch)
    patches = training.PatchSet(cases, data, survey, settings, patch, training.EpochSampler(2, 64, 0))
    patches.sampler.set_epoch(1)
    foreground = [float(patches[j][1][1:].sum()) for j in range(64)]  # the softmax target's classes
    assert any(f == 0 for f in foreground) == empty  # the empty end slices (0 and 4) are drawn only anywhere


# ----------------------------------------------------------------------------- neighbouring slices (2.5D)

def test_context_slices_stack_each_slices_neighbours_into_channels():
    torch.manual_seed(0)
    model = VNet(2, 3, base_channels=2, spatial_dims=2, context_slices=1).eval()
    stack = torch.randn(1, 2, 5, 32, 32)
    with torch.no_grad():
        out = model(stack)
        assert out.shape == (1, 3, 3, 32, 32)  # two slices fewer: the ends serve as context only
        for z in range(1, 4):  # slice z with z - 1 and z + 1, slice-major: (z-1: c0 c1, z: c0 c1, z+1: c0 c1)
            channels = stack[:, :, z - 1:z + 2].transpose(1, 2).reshape(1, 6, 32, 32)
            assert torch.allclose(out[:, :, z - 1], model(channels), atol=1e-5)
    assert model.input.own == slice(2, 4) and model_arch(model)["context_slices"] == 1
    with pytest.raises(ValueError, match="context_slices"):
        VNet(context_slices=1)  # a 3D model sees its neighbours already


class Neighbour(torch.nn.Module):
    """A stand-in 2D model with one context slice a side that answers each slice with the slice
    `offset` away from it (0: itself)."""
    context = 1

    def __init__(self, offset):
        super().__init__()
        self.offset = offset

    def forward(self, x):
        return x[:, :, 1 + self.offset:x.shape[2] - 1 + self.offset]


@pytest.mark.parametrize("offset", [-1, 0, 1])
def test_sliding_window_gives_each_slice_its_neighbours(offset):
    volume = np.random.default_rng(0).normal(size=(1, 6, 20, 24)).astype(np.float32)
    out = inference.sliding_window([Neighbour(offset)], volume, (1, 16, 16), torch.device("cpu"), overlap=0.5,
                                   batch_size=3, pad_value=-7.0, context=1)
    expected = np.full_like(volume, -7.0)  # beyond the volume's ends: the pad value
    src = slice(max(offset, 0), 6 + min(offset, 0))
    dst = slice(max(-offset, 0), 6 + min(-offset, 0))
    expected[:, dst] = volume[:, src]
    assert np.allclose(out, expected, atol=1e-5)


def test_context_slices_train_and_predict_a_cine(acdc, tmp_path):
    run = tmp_path / "run"
    result = run_main(train.main, "--data_dir", acdc, "--output_dir", run, *TINY_2D, "--context_slices", "1")
    assert result.returncode == 0, result.stderr
    assert "1 context slice(s) a side" in result.stdout
    cine = acdc / "patient003" / "patient003_4d.nii.gz"
    result = run_main(predict.main, "--input", cine, "--output_dir", tmp_path / "out", "--segmenter_path",
                      run / "segmenter" / "best.pt", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    frames, _ = ds.read_image_channels(tmp_path / "out" / "patient003_4d.nrrd")
    assert frames.shape == (4, 5, 24, 40)


def test_init_from_a_checkpoint_sharing_nothing_writes_nothing(acdc, run2d, tmp_path):
    ckpt = torch.load(run2d / "segmenter" / "best.pt", weights_only=True)
    ckpt["config"]["labels"] = Labels((1, 2, 4), ("a", "b", "c")).record()  # other classes: no output layer
    other = tmp_path / "other.pt"
    torch.save(ckpt, other)
    run = tmp_path / "run"
    result = run_main(train.main, "--data_dir", acdc, "--output_dir", run, *TINY_2D, "--base_channels", "3",
                      "--init_from", other)
    assert_one_line_error(result, f"--init_from {other}", "shares no tensor")
    assert not run.exists()


def test_acdc_frames_without_info_cfg_are_read_and_their_phases_come_from_the_volumes(acdc, run2d, tmp_path):
    data = tmp_path / "data"
    for d in sorted(acdc.iterdir())[:2]:
        (data / d.name).mkdir(parents=True)
        for f in d.glob("*_frame*"):
            (data / d.name / f.name).symlink_to(f)
    cases = ds.find_cases(data, require_labels=True)
    assert [c.case_id for c in cases][:2] == ["patient001_frame01", "patient001_frame03"] and len(cases) == 4
    assert ds.read_dataset_json(data).labels == ds.ACDC_LABELS
    out = tmp_path / "out"
    assert run_main(predict.main, "--data_dir", data, "--output_dir", out, "--segmenter_path",
                    run2d / "segmenter" / "best.pt", "--device", "cpu").returncode == 0
    result = run_main(evaluate.main, "--cardiac", "--pred_dir", out, "--data_dir", data)
    assert result.returncode == 0, result.stderr
    assert "reference volume curve" in result.stdout  # no Info.cfg: ED and ES from the reference's LV volumes
