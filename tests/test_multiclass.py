"""The patch strategy on scans of C channels and K classes, end to end on tiny brain-tumour
phantoms (synthetic_tumour.py): dataset.json in MSD and nnU-Net form, nnU-Net's channel files
reading exactly as MSD's 4D images, BraTS 2021 label values (1, 2, 4) in and out, regions,
probability maps; the one-line error of each bad input with nothing written; and the pieces
beneath: the foreground-biased patch sampler, per-channel z-scores, and the sliding window's
memory rule. Two tiny runs are trained once for the module (1 epoch: the weights do not matter
here, only what is read and written)."""
import json
import os
import tracemalloc

import numpy as np
import pytest
import torch

import dataset as ds
import inference
import labels as lbl
import predict
import train
from conftest import assert_one_line_error, run_main
from labels import Labels
from synthetic_tumour import write_tumour_dataset

SHAPE = (32, 48, 48)
SEED = 5
# One epoch of two steps on (16, 32, 32) patches at the narrowest width.
TINY = ["--strategy", "patches", "--patch_size", "16", "32", "32", "--base_channels", "2", "--max_epochs", "1",
        "--samples_per_epoch", "4", "--batch_size", "2", "--device", "cpu"]
BRATS_REGIONS = ["whole=1,2,4", "core=1,4", "enhancing=4"]


def train_ok(*args):
    run = run_main(train.main, *args)
    assert run.returncode == 0, run.stdout + run.stderr
    return run


def predict_ok(*args):
    run = run_main(predict.main, *args)
    assert run.returncode == 0, run.stdout + run.stderr
    return run


def linked(src, dst, skip=(), json_text=None):
    """A data set folder `dst` whose image and label files are links to those of `src` (but the
    paths in `skip`, e.g. "labelsTr/X.nii.gz"), with its own copy of dataset.json (or
    `json_text`), to spoil one file without copying the others."""
    for sub in ("imagesTr", "labelsTr"):
        (dst / sub).mkdir(parents=True)
        for f in sorted((src / sub).iterdir()):
            if f"{sub}/{f.name}" not in skip:
                os.symlink(f, dst / sub / f.name)
    (dst / "dataset.json").write_text((src / "dataset.json").read_text() if json_text is None else json_text)
    return dst


def unlabelled(src, dst, ids):
    """`dst/imagesTs` with links to the image files of cases `ids` of `src`: scans to predict,
    no labels to score."""
    (dst / "imagesTs").mkdir(parents=True)
    for f in sorted((src / "imagesTr").iterdir()):
        if any(f.name.startswith(i) for i in ids):
            os.symlink(f, dst / "imagesTs" / f.name)
    return dst


def assert_nothing_in(folder):
    assert not folder.exists() or not any(folder.iterdir()), sorted(folder.rglob("*"))


# ----------------------------------------------------------------------------- data and runs, once

@pytest.fixture(scope="module")
def msd_data(tmp_path_factory):
    """Six MSD Task01-style cases: one 4D image of 4 channels each, labels 1, 2, 3."""
    root = tmp_path_factory.mktemp("msd")
    write_tumour_dataset(root, num_cases=6, shapes=(SHAPE,), seed=SEED, layout="msd")
    return root


@pytest.fixture(scope="module")
def nnunet_data(tmp_path_factory):
    """The first two cases of `msd_data` in nnU-Net's layout: one 3D file per channel."""
    root = tmp_path_factory.mktemp("nnunet")
    write_tumour_dataset(root, num_cases=2, shapes=(SHAPE,), seed=SEED, layout="nnunet")
    return root


@pytest.fixture(scope="module")
def brats_data(tmp_path_factory):
    """Six cases in nnU-Net's layout with BraTS 2021's values: 1 necrosis, 2 edema, 4 enhancing."""
    root = tmp_path_factory.mktemp("brats")
    write_tumour_dataset(root, num_cases=6, shapes=(SHAPE,), seed=SEED + 1, layout="nnunet", labels="brats2021")
    return root


@pytest.fixture(scope="module")
def msd_run(msd_data, tmp_path_factory):
    """A softmax network over the background and the three MSD classes."""
    run = tmp_path_factory.mktemp("msd_run")
    train_ok("--data_dir", msd_data, "--output_dir", run, *TINY)
    return run


@pytest.fixture(scope="module")
def brats_run(brats_data, tmp_path_factory):
    """A sigmoid network of three BraTS regions over the BraTS 2021 values."""
    run = tmp_path_factory.mktemp("brats_run")
    train_ok("--data_dir", brats_data, "--output_dir", run, *TINY, "--regions", *BRATS_REGIONS)
    return run


@pytest.fixture(scope="module")
def msd_predictions(msd_run, msd_data, tmp_path_factory):
    """The softmax run's label maps and probability maps of the first two MSD cases."""
    scans = unlabelled(msd_data, tmp_path_factory.mktemp("msd_scans"), ["BRATS_000", "BRATS_001"])
    out = tmp_path_factory.mktemp("msd_pred")
    predict_ok("--data_dir", scans, "--output_dir", out, "--segmenter_path", msd_run / "segmenter" / "best.pt",
               "--device", "cpu", "--save_probabilities")
    return out


@pytest.fixture(scope="module")
def brats_predictions(brats_run, brats_data, tmp_path_factory):
    """The region run's label map and probability maps of the first BraTS case."""
    scans = unlabelled(brats_data, tmp_path_factory.mktemp("brats_scans"), ["BRATS_000"])
    out = tmp_path_factory.mktemp("brats_pred")
    predict_ok("--data_dir", scans, "--output_dir", out, "--segmenter_path", brats_run / "segmenter" / "best.pt",
               "--device", "cpu", "--save_probabilities")
    return out


# ----------------------------------------------------------------------------- dataset.json

def test_dataset_json_msd_form(msd_data):
    info = ds.read_dataset_json(msd_data)
    assert info.channels == ("FLAIR", "T1w", "t1gd", "T2w")
    assert info.labels == Labels((1, 2, 3), ("edema", "non-enhancing tumor", "enhancing tumour"))
    assert info.path == msd_data / "dataset.json"
    # Channels named as MRI sequences are z-scored over the brain (non-zero voxels).
    assert ds.normalization_rules("auto", 4, info.channels) == ("nonzero",) * 4


def test_dataset_json_nnunet_form(brats_data):
    info = ds.read_dataset_json(brats_data)
    assert info.channels == ("FLAIR", "T1w", "t1gd", "T2w")
    assert info.labels == Labels((1, 2, 4), ("necrotic tumour core", "edema", "enhancing tumour"))
    assert info.labels.activation == "softmax" and info.labels.out_channels == 4


def test_dataset_json_nnunet_regions_and_their_class_order(tmp_path):
    (tmp_path / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "FLAIR", "1": "T1w", "2": "T1Gd", "3": "T2w"},
        "labels": {"background": 0, "whole tumour": [1, 2, 3], "tumour core": [2, 3], "enhancing tumour": 3},
        "regions_class_order": [1, 2, 3], "file_ending": ".nii.gz"}))
    info = ds.read_dataset_json(tmp_path)
    # The classes are the values the regions hold; a single-valued entry names its class.
    assert info.labels.values == (1, 2, 3) and info.labels.names == ("label 1", "label 2", "enhancing tumour")
    assert info.labels.regions == (("whole tumour", (1, 2, 3)), ("tumour core", (2, 3)), ("enhancing tumour", (3,)))
    assert info.labels.region_order == (1, 2, 3) and info.labels.activation == "sigmoid"


def test_dataset_json_nnunet_regions_order_derived_when_not_given(tmp_path):
    (tmp_path / "dataset.json").write_text(json.dumps({
        "labels": {"background": 0, "whole": [1, 2, 4], "core": [1, 4], "enhancing": [4]}}))
    info = ds.read_dataset_json(tmp_path)
    assert info.channels is None and info.labels.region_order == (2, 1, 4)


def test_no_dataset_json_declares_nothing(tmp_path):
    assert ds.read_dataset_json(tmp_path) == ds.DatasetInfo()


MALFORMED = {
    "not JSON": ("{\"labels\": {\"0\": \"background\",", "not readable as JSON"),
    "not an object": ("[1, 2]", "expected a JSON object"),
    "labels a list": (json.dumps({"labels": ["background", "edema"]}), "\"labels\" must map values to names"),
    "labels empty": (json.dumps({"labels": {}}), "\"labels\" must map"),
    "msd value above 255": (json.dumps({"labels": {"0": "background", "300": "edema"}}), "values in 0..255"),
    "nnunet value above 255": (json.dumps({"labels": {"background": 0, "edema": 256}}), "values in 0..255"),
    "nnunet value negative": (json.dumps({"labels": {"background": 0, "edema": -1}}), "values in 0..255"),
    "nnunet value not a number": (json.dumps({"labels": {"background": 0, "edema": "1"}}), "values in 0..255"),
    "only background": (json.dumps({"labels": {"background": 0}}), "\"labels\" must map"),
    "channel_names with a gap": (json.dumps({"channel_names": {"0": "FLAIR", "2": "T1w"},
                                             "labels": {"background": 0, "edema": 1}}),
                                 "\"channel_names\" must map \"0\", \"1\", ..."),
    "modality not a dict": (json.dumps({"modality": ["FLAIR"], "labels": {"0": "background", "1": "edema"}}),
                            "\"modality\" must map"),
    "regions_class_order not a list": (json.dumps({"labels": {"background": 0, "whole": [1, 2], "core": 2},
                                                   "regions_class_order": 1}), "\"regions_class_order\" must be"),
    "regions out of order": (json.dumps({"labels": {"background": 0, "core": [2], "whole": [1, 2]}}),
                             "region core: cannot tell which class it paints"),
}


@pytest.mark.parametrize("kind", sorted(MALFORMED))
def test_malformed_dataset_json_is_one_line_error_naming_it(kind, msd_data, tmp_path):
    text, fragment = MALFORMED[kind]
    data = linked(msd_data, tmp_path / "data", json_text=text)
    run = run_main(train.main, "--data_dir", data, "--output_dir", tmp_path / "run", *TINY)
    assert_one_line_error(run, data / "dataset.json", fragment)
    assert_nothing_in(tmp_path / "run")


def test_dataset_json_with_eleven_channels(tmp_path):
    names = {str(i): f"channel {i}" for i in range(11)}
    (tmp_path / "dataset.json").write_text(json.dumps({"channel_names": names, "labels": {"background": 0, "a": 1}}))
    assert ds.read_dataset_json(tmp_path).channels == tuple(f"channel {i}" for i in range(11))


def test_dataset_json_region_holding_the_background_is_a_user_error(tmp_path):
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "all": [0, 1], "one": 1}}))
    with pytest.raises(ds.UserError, match="dataset.json"):
        ds.read_dataset_json(tmp_path)


# ----------------------------------------------------------------------------- layouts

def test_nnunet_channel_files_read_as_the_msd_4d_image(msd_data, nnunet_data):
    msd = {c.case_id: c for c in ds.find_cases(msd_data, require_labels=True)}
    for case in ds.find_cases(nnunet_data, require_labels=True):
        assert [f.name for f in case.files] == [f"{case.case_id}_{k:04d}.nii.gz" for k in range(4)]
        image, props = ds.read_case_image(case)
        image4d, props4d = ds.read_case_image(msd[case.case_id])
        assert image.shape == (4, *SHAPE) and image.dtype == np.float32
        assert np.array_equal(image, image4d) and ds.same_geometry(props, props4d)
        (shape, props, n), (shape4d, props4d, n4d) = ds.read_case_info(case), ds.read_case_info(msd[case.case_id])
        assert (shape, n) == (shape4d, n4d) and props == {k: v for k, v in props4d.items() if k != "axis4"}


def test_apple_double_files_are_ignored(nnunet_data, tmp_path):
    data = linked(nnunet_data, tmp_path / "data")
    (data / "imagesTr" / "._BRATS_000_0000.nii.gz").write_bytes(b"\x00\x05\x16\x07 not an image")
    (data / "imagesTr" / "._BRATS_000_0003.nii.gz").write_bytes(b"\x00\x05\x16\x07 not an image")
    cases = ds.find_cases(data, require_labels=True)
    assert [c.case_id for c in cases] == ["BRATS_000", "BRATS_001"] and all(len(c.files) == 4 for c in cases)


def test_nnunet_layout_predicts_the_same_label_maps_as_msd(msd_run, msd_predictions, nnunet_data, tmp_path):
    scans = unlabelled(nnunet_data, tmp_path / "scans", ["BRATS_000", "BRATS_001"])
    out = tmp_path / "out"
    predict_ok("--data_dir", scans, "--output_dir", out, "--segmenter_path", msd_run / "segmenter" / "best.pt",
               "--device", "cpu")
    for case_id in ("BRATS_000", "BRATS_001"):
        a, props_a = ds.read_image(out / f"{case_id}.nrrd")
        b, props_b = ds.read_image(msd_predictions / f"{case_id}.nrrd")
        assert np.array_equal(a, b) and ds.same_geometry(props_a, props_b)
        assert set(np.unique(a).tolist()) <= {0, 1, 2, 3}


# ----------------------------------------------------------------------------- classes out as declared

def test_brats2021_run_writes_its_own_values_on_the_scans_geometry(brats_run, brats_data, brats_predictions):
    config = json.loads((brats_run / "config.json").read_text())["segmenter"]
    assert config["regions"] == BRATS_REGIONS
    ckpt = inference.load_checkpoint(brats_run / "segmenter" / "best.pt", "segmenter")
    labels = Labels.from_record(ckpt["config"]["labels"])
    assert labels.values == (1, 2, 4) and labels.region_order == (2, 1, 4)
    assert ckpt["config"]["arch"]["in_channels"] == 4 and ckpt["config"]["arch"]["out_channels"] == 3

    mask, props = ds.read_image(brats_predictions / "BRATS_000.nrrd")
    label, label_props = ds.read_image(brats_data / "labelsTr" / "BRATS_000.nii.gz")
    assert set(np.unique(label).tolist()) == {0, 1, 2, 4}  # the data hold the BraTS 2021 values
    assert mask.dtype == np.uint8 and mask.shape == label.shape == SHAPE
    assert ds.same_geometry(props, label_props)
    assert set(np.unique(mask).tolist()) <= {0, 1, 2, 4}


def test_region_probability_maps_one_per_region_paint_the_mask(brats_predictions, brats_data):
    out = brats_predictions
    labels = Labels((1, 2, 4), ("a", "b", "c")).with_regions(lbl.parse_regions(BRATS_REGIONS))
    names = [n for n, _ in labels.regions]
    assert sorted(p.name for p in out.iterdir() if "_prob" in p.name) == \
        sorted(f"BRATS_000_prob_{n}.nrrd" for n in names)
    _, scan_props = ds.read_image(brats_data / "imagesTr" / "BRATS_000_0000.nii.gz")
    probs = []
    for n in names:
        p, props = ds.read_image(out / f"BRATS_000_prob_{n}.nrrd")
        assert p.dtype == np.float32 and p.shape == SHAPE and ds.same_geometry(props, scan_props)
        assert 0 <= p.min() and p.max() <= 1
        probs.append(p)
    # The mask is the maps painted in the run's order: whole -> 2, core -> 1, enhancing -> 4.
    mask, _ = ds.read_image(out / "BRATS_000.nrrd")
    assert np.array_equal(mask, labels.label_map(np.stack(probs)))


def test_softmax_probability_maps_one_per_class(msd_predictions, msd_data):
    out = msd_predictions
    names = ["edema", "non-enhancing_tumor", "enhancing_tumour"]  # dataset.json's names, as file-name parts
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("BRATS_000_prob")) == \
        sorted(f"BRATS_000_prob_{n}.nrrd" for n in names)
    _, scan_props, channels = ds.read_channels_info(msd_data / "imagesTr" / "BRATS_000.nii.gz")
    assert channels == 4
    probs = []
    for n in names:
        p, props = ds.read_image(out / f"BRATS_000_prob_{n}.nrrd")
        assert p.dtype == np.float32 and p.shape == SHAPE and ds.same_geometry(props, scan_props)
        probs.append(p)
    probs = np.stack(probs)
    # Softmax: the classes' maps and the background's (not written) sum to 1.
    background = 1 - probs.sum(axis=0)
    assert probs.min() >= 0 and background.min() >= -1e-5
    full = np.concatenate([background[None], probs])
    mask, _ = ds.read_image(out / "BRATS_000.nrrd")
    clear = np.sort(full, axis=0)[-1] - np.sort(full, axis=0)[-2] > 1e-4  # no near-tie for float rounding to flip
    assert clear.mean() > 0.99
    assert np.array_equal(mask[clear], np.array([0, 1, 2, 3], np.uint8)[np.argmax(full, axis=0)][clear])


# ----------------------------------------------------------------------------- bad inputs

def test_missing_channel_file_is_one_line_error(nnunet_data, msd_run, tmp_path):
    data = linked(nnunet_data, tmp_path / "data", skip={"imagesTr/BRATS_001_0002.nii.gz"})
    missing = data / "imagesTr" / "BRATS_001_0002.nii.gz"
    run = run_main(train.main, "--data_dir", data, "--output_dir", tmp_path / "run", *TINY)
    assert_one_line_error(run, "case BRATS_001", missing)
    assert_nothing_in(tmp_path / "run")
    run = run_main(predict.main, "--data_dir", data, "--output_dir", tmp_path / "out",
                   "--segmenter_path", msd_run / "segmenter" / "best.pt", "--device", "cpu")
    assert_one_line_error(run, "case BRATS_001", missing)
    assert_nothing_in(tmp_path / "out")


@pytest.mark.parametrize("spoil", ["spacing", "shape", "origin"])
def test_channels_off_the_first_ones_grid_is_one_line_error(spoil, nnunet_data, tmp_path):
    data = linked(nnunet_data, tmp_path / "data", skip={"imagesTr/BRATS_001_0001.nii.gz"})
    channel, props = ds.read_image(nnunet_data / "imagesTr" / "BRATS_001_0001.nii.gz")
    if spoil == "spacing":
        props = {**props, "spacing": (1.0, 1.0, 1.5)}
    elif spoil == "origin":
        props = {**props, "origin": tuple(o + 2.0 for o in props["origin"])}
    else:
        channel = channel[:, :, :40]
    bad = data / "imagesTr" / "BRATS_001_0001.nii.gz"
    ds.write_image(channel, props, bad)
    run = run_main(train.main, "--data_dir", data, "--output_dir", tmp_path / "run", *TINY)
    assert_one_line_error(run, bad, "channel 1", "the channels must share one grid")
    assert_nothing_in(tmp_path / "run")


def test_scan_of_other_channel_count_at_predict_time(msd_run, msd_data, tmp_path):
    scans = unlabelled(msd_data, tmp_path / "scans", ["BRATS_000"])
    image, props = ds.read_image_channels(msd_data / "imagesTr" / "BRATS_001.nii.gz")
    three = scans / "imagesTs" / "BRATS_009.nii.gz"
    ds.write_image(image[:3], props, three)
    model = ["--segmenter_path", msd_run / "segmenter" / "best.pt", "--device", "cpu"]
    # Several cases: that one fails, reported, and the others are written; exit status 1.
    out = tmp_path / "out"
    run = run_main(predict.main, "--data_dir", scans, "--output_dir", out, *model)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "BRATS_009" in run.stderr and f"{three}: has 3 channel(s), the model was trained on 4" in run.stderr
    assert "Traceback" not in run.stderr
    assert sorted(p.name for p in out.iterdir()) == ["BRATS_000.nrrd"]
    # One scan: its one-line error, nothing written.
    out = tmp_path / "single"
    run = run_main(predict.main, "--input", three, "--output_dir", out, *model)
    assert_one_line_error(run, three, "has 3 channel(s), the model was trained on 4", "FLAIR, T1w, t1gd, T2w")
    assert_nothing_in(out)


def test_undeclared_label_value_is_one_line_error(msd_data, tmp_path):
    data = linked(msd_data, tmp_path / "data", skip={"labelsTr/BRATS_002.nii.gz"})
    label, props = ds.read_image(msd_data / "labelsTr" / "BRATS_002.nii.gz")
    label[0, 0, 0] = 5
    bad = data / "labelsTr" / "BRATS_002.nii.gz"
    ds.write_image(label, props, bad)
    run = run_main(train.main, "--data_dir", data, "--output_dir", tmp_path / "run", *TINY)
    assert_one_line_error(run, bad, "label values 5 are not among the classes 1, 2, 3")
    assert_nothing_in(tmp_path / "run")


@pytest.mark.parametrize("flags, fragments", [
    (["--regions", "foo=9"], ["--regions", "region foo", "[9]", "not classes (1, 2, 3)"]),
    (["--regions", "whole=1,2,3", "foo"], ["--regions foo: expected NAME=V1,V2"]),
    (["--regions", "a=1", "a=2"], ["--regions: region names must differ"]),
    (["--regions", "enhancing=3", "whole=1,2,3"], ["--regions", "region enhancing: cannot tell which class"]),
    (["--max_background", "0"], ["--max_background 0.0: must lie in (0, 1]"]),
    (["--max_background", "1.5"], ["--max_background 1.5: must lie in (0, 1]"]),
    (["--max_tries", "0"], ["--max_tries 0"]),
    (["--overlap", "1"], ["--overlap 1.0"]),
    (["--stage", "locator"], ["--stage locator", "--strategy patches"]),
    (["--locator_path", "x.pt"], ["--locator_path", "--strategy patches"]),
])
def test_bad_patch_flags_are_one_line_errors(flags, fragments, msd_data, tmp_path):
    run = run_main(train.main, "--data_dir", msd_data, "--output_dir", tmp_path / "run", *TINY, *flags)
    assert_one_line_error(run, *fragments)
    assert_nothing_in(tmp_path / "run")


def test_locator_for_a_patches_checkpoint_is_one_line_error(msd_run, msd_data, tmp_path):
    segmenter = msd_run / "segmenter" / "best.pt"
    run = run_main(predict.main, "--data_dir", msd_data, "--output_dir", tmp_path / "out", "--segmenter_path",
                   segmenter, "--locator_path", segmenter, "--device", "cpu")
    assert_one_line_error(run, "--locator_path", segmenter, "--strategy patches")
    assert_nothing_in(tmp_path / "out")


# ----------------------------------------------------------------------------- the patch sampler

def crop_foreground(label, start, size) -> int:
    """An independent count: the foreground voxels of the crop itself."""
    return int(np.count_nonzero(ds.crop(label, start, size, 0)))


def test_sampler_keeps_background_at_most_max_background():
    label = np.zeros((24, 24, 24), np.uint8)
    label[14:18, 5:9, 10:14] = 2  # 64 voxels; a patch of 512 needs 52 of them (10 %)
    size = (8, 8, 8)
    sampler = ds.PatchSampler(label, size, max_background=0.9, max_tries=1000)
    rng = np.random.default_rng(0)
    starts = [sampler(rng) for _ in range(500)]
    for start in starts:
        assert all(0 <= a <= n - s for a, n, s in zip(start, label.shape, size)), start
        assert crop_foreground(label, start, size) >= 0.1 * 512, start
        assert sampler.foreground_in(start) == crop_foreground(label, start, size)
    assert len(set(starts)) > 20  # drawn, not one fixed patch


def test_sampler_falls_back_to_a_patch_centred_on_foreground_when_the_bias_is_impossible():
    label = np.zeros((24, 24, 24), np.uint8)
    label[3, 20, 4] = label[20, 2, 19] = 1  # two voxels: 10 % of a 512-voxel patch is out of reach
    size = (8, 8, 8)
    sampler = ds.PatchSampler(label, size, max_background=0.9, max_tries=20)
    rng = np.random.default_rng(1)
    centres = {ds.crop_start(c, size, label.shape) for c in [(3, 20, 4), (20, 2, 19)]}
    starts = [sampler(rng) for _ in range(100)]
    assert set(starts) == centres  # every draw is a fallback, around one voxel or the other
    assert all(crop_foreground(label, s, size) >= 1 for s in starts)


def test_sampler_with_max_background_one_draws_uniform_starts():
    label = np.zeros((12, 12, 12), np.uint8)
    label[0, 0, 0] = 1
    size = (8, 8, 8)  # 5 starts per axis
    sampler = ds.PatchSampler(label, size, max_background=1.0)
    starts = np.array([sampler(np.random.default_rng([7, i])) for i in range(500)])
    # The first draw is taken: the same starts as a generator of the same seed draws.
    expected = []
    for i in range(500):
        rng = np.random.default_rng([7, i])
        expected.append([int(rng.integers(0, 5)) for _ in range(3)])
    assert starts.tolist() == expected
    for axis in range(3):
        counts = np.bincount(starts[:, axis], minlength=5)
        assert len(counts) == 5 and counts.min() > 60 and counts.max() < 140, counts  # 100 +- 4.4 sd
    assert (np.array([crop_foreground(label, s, size) for s in starts]) == 0).mean() > 0.5  # mostly background


def test_sampler_patch_larger_than_the_volume_is_centred():
    label = np.zeros((6, 40, 40), np.uint8)
    label[:, 28:36, 28:36] = 1  # 384 voxels, of the 205 needed (5 %)
    sampler = ds.PatchSampler(label, (16, 16, 16), max_background=0.95)
    rng = np.random.default_rng(0)
    for _ in range(50):
        start = sampler(rng)
        assert start[0] == -5  # (16 - 6) // 2 voxels of padding before
        assert crop_foreground(label, start, (16, 16, 16)) >= 0.05 * 16 ** 3


@pytest.mark.parametrize("value", [0, -0.1, 1.5])
def test_sampler_refuses_max_background_outside_zero_one(value):
    with pytest.raises(ValueError, match=f"max_background {value}: must lie in"):
        ds.PatchSampler(np.ones((4, 4, 4), np.uint8), (2, 2, 2), max_background=value)


# ----------------------------------------------------------------------------- per-channel z-score

def test_normalise_nonzero_and_whole_by_hand():
    image = np.array([[[[0, 1, 0, 2, 3, 0]]],     # nonzero: mean 2, std sqrt(2/3)
                      [[[1, 2, 3, 4, 5, 6]]]],    # whole: mean 3.5, std sqrt(35/12)
                     np.float32)
    pads = ds.normalise(image, ("nonzero", "whole"))  # in place
    s = np.sqrt(2 / 3)
    np.testing.assert_allclose(image[0].ravel(), [0, -1 / s, 0, 0, 1 / s, 0], atol=1e-6)
    w = np.sqrt(35 / 12)
    np.testing.assert_allclose(image[1].ravel(), (np.arange(1, 7) - 3.5) / w, atol=1e-6)
    assert pads.dtype == np.float32
    np.testing.assert_allclose(pads, [0, -3.5 / w], atol=1e-6)  # what a raw 0 becomes


def test_normalise_nonzero_leaves_zeros_and_standardises_the_rest():
    rng = np.random.default_rng(3)
    image = (rng.random((3, 6, 7, 8)) * [[[[10.0]]], [[[200.0]]], [[[3.0]]]] + 5).astype(np.float32)
    image[:, :2] = 0
    image[1, :, :, :3] = 0
    zero = image == 0
    raw = image.copy()
    pads = ds.normalise(image, ("nonzero",) * 3)
    assert np.array_equal(image == 0, zero) and np.array_equal(pads, np.zeros(3))
    for c in range(3):
        inside = image[c][~zero[c]]
        assert abs(inside.mean()) < 1e-5 and abs(inside.std() - 1) < 1e-5
        # The same as the whole-scan z-score of the non-zero voxels alone.
        np.testing.assert_allclose(inside, ds.zscore(raw[c][~zero[c]])[0], atol=1e-5)


def test_normalise_whole_is_zscore_per_channel():
    rng = np.random.default_rng(4)
    image = rng.normal(40, 9, (2, 5, 6, 7)).astype(np.float32)
    image[:, 0] = 0
    expected = [ds.zscore(c) for c in image]
    pads = ds.normalise(image, ("whole", "whole"))
    for c, (z, pad) in enumerate(expected):
        np.testing.assert_allclose(image[c], z, atol=1e-5)
        assert abs(pads[c] - pad) < 1e-5
        np.testing.assert_allclose(image[c, 0], pad, atol=1e-5)  # the raw zeros took the pad value


def test_normalise_constant_channel_keeps_unit_scale():
    image = np.full((1, 2, 2, 2), 5, np.float32)
    pads = ds.normalise(image, ("whole",))
    assert np.array_equal(image, np.zeros_like(image)) and pads.tolist() == [-5.0]


# ----------------------------------------------------------------------------- the sliding window's memory

def test_predict_patches_makes_no_copy_of_the_scan():
    """tracemalloc sees numpy's allocations (numpy reports them) but not torch's own allocator.
    Of the (C + K + 2) float32 volumes allowed, the K + 1 of the sliding window's accumulator
    and weight volume are torch's and the C of the scan were allocated before tracing, so numpy
    may add 1 volume (the z-score's temporary `x - mean`) plus a margin of one batch of windows
    (batch_size x C x window voxels: the batch is stacked from the scan) and 1 MiB (the
    window's Gaussian weights, small arrays). A copy of the scan would add C volumes; a scan
    that needs padding is copied, and that copy is seen. The model is a 1x1x1 convolution of
    K outputs: what it holds is torch's, and the rule is the sliding window's."""
    torch.manual_seed(0)
    labels = Labels((1, 2, 3), ("a", "b", "c"))
    model = torch.nn.Conv3d(4, labels.out_channels, 1).eval()
    window, batch = (32, 48, 48), 2
    pipe = inference.Patches([model], window, (1.0, 1.0, 1.0), ("a", "b", "c", "d"), ("whole",) * 4, labels,
                             torch.device("cpu"), overlap=0.5, batch_size=batch)
    props = {"spacing": (1.0, 1.0, 1.0), "origin": (0.0, 0.0, 0.0), "direction": tuple(np.eye(3).ravel())}
    rng = np.random.default_rng(0)

    def traced_peak(image):
        tracemalloc.start()
        try:
            probs = inference.predict_patches(pipe, image, props)
            return probs, tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    image = rng.random((4, 64, 96, 96), dtype=np.float32)  # needs no padding: 3 x 3 x 3 windows
    volume = image[0].nbytes
    probs, peak = traced_peak(image)
    assert probs.shape == (4, 64, 96, 96) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=0), 1, atol=1e-5)  # softmax
    margin = batch * 4 * np.prod(window) * 4 + 2 ** 20
    assert peak <= volume + margin, (peak / volume, margin / volume)

    # The instrument sees a copy: a scan shorter than the window in D is padded into a new array.
    short = rng.random((4, 30, 96, 96), dtype=np.float32)
    _, peak = traced_peak(short)
    assert peak >= 4 * 32 * 96 * 96 * 4  # the padded (C, 32, 96, 96) copy


# ----------------------------------------------------------------------------- the two-stage strategy

def test_two_stage_trains_on_four_channels_and_writes_the_declared_classes(msd_data, tmp_path):
    """The locator sees the four channels and learns the whole tumour; the segmenter a softmax
    over the three classes on its crop; predict.py writes label maps of the declared values on
    each scan's 3D grid, one probability map per class, and rows per class and region."""
    run = tmp_path / "run"
    train_ok("--data_dir", msd_data, "--output_dir", run, "--base_channels", "2", "--max_epochs", "1",
             "--locator_max_epochs", "1", "--samples_per_epoch", "2", "--locator_samples_per_epoch", "2",
             "--padding", "4", "4", "4", "--device", "cpu")
    locator = torch.load(run / "locator" / "best.pt", weights_only=True)
    segmenter = torch.load(run / "segmenter" / "best.pt", weights_only=True)
    assert locator["config"]["arch"]["in_channels"] == 4 and locator["config"]["arch"]["out_channels"] == 1
    assert segmenter["config"]["arch"]["in_channels"] == 4 and segmenter["config"]["arch"]["out_channels"] == 4
    assert segmenter["config"]["loss"] == "DiceCE" and segmenter["config"]["normalization"] == ["nonzero"] * 4
    out = tmp_path / "out"
    predict_ok("--data_dir", msd_data, "--output_dir", out, "--locator_path", run / "locator" / "best.pt",
               "--segmenter_path", run / "segmenter" / "best.pt", "--device", "cpu", "--save_probabilities",
               "--regions", "whole_tumour=1,2,3")
    for case in ds.find_cases(msd_data, require_labels=True):
        mask, props = ds.read_image(out / f"{case.case_id}.nrrd")
        _, label_props = ds.read_image(case.label)
        assert mask.dtype == np.uint8 and set(np.unique(mask).tolist()) <= {0, 1, 2, 3}
        assert mask.shape == SHAPE and ds.same_geometry(props, label_props)
        assert sorted(p.name for p in out.glob(f"{case.case_id}_prob_*")) == [
            f"{case.case_id}_prob_{n}.nrrd" for n in ("edema", "enhancing_tumour", "non-enhancing_tumor")]
    with open(out / "metrics.csv") as f:
        structures = [line.split(",")[1] for line in f.read().splitlines()[1:5]]
    assert structures == ["edema", "non-enhancing tumor", "enhancing tumour", "whole_tumour"]


def test_a_vector_image_reads_as_channels_like_a_4d_image(tmp_path):
    """Channels stored as vector voxels (SimpleITK's, or a NIfTI of dim 5) read as the 4D image's."""
    import SimpleITK as sitk
    rng = np.random.default_rng(0)
    image = rng.random((3, 5, 6, 7)).astype(np.float32)
    props = {"spacing": (2.0, 1.0, 0.5), "origin": (1.0, 2.0, 3.0), "direction": (0, 1, 0, 1, 0, 0, 0, 0, 1)}
    ds.write_image(image, props, tmp_path / "four_d.nii.gz")
    vector = sitk.GetImageFromArray(np.moveaxis(image, 0, -1), isVector=True)
    vector.CopyInformation(ds.to_sitk(image[0], props))
    sitk.WriteImage(vector, str(tmp_path / "vector.nrrd"))
    a, a_props = ds.read_image_channels(tmp_path / "four_d.nii.gz")
    b, b_props = ds.read_image_channels(tmp_path / "vector.nrrd")
    np.testing.assert_array_equal(a, b)
    assert ds.same_geometry(a_props, b_props)
    assert ds.read_channels_info(tmp_path / "vector.nrrd")[::2] == ((5, 6, 7), 3)
