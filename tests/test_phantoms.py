"""Tests of the phantom generators (synthetic.py, synthetic_tumour.py) and their command line
(phantoms.py): determinism, the labels' invariants (one atrium; nested tumour regions inside a
skull-stripped brain), sizes relative to the volume, the tumour's sequence contrasts, that a
threshold cannot find the label, the LASC, MSD and nnU-Net layouts on disk with their geometry,
and the command line's errors."""
import json

import numpy as np
import pytest
from scipy import ndimage

import phantoms
from conftest import assert_one_line_error, run_main, run_script
from dataset import read_image, read_image_channels, same_geometry
from synthetic import make_phantom, write_phantom_dataset
from synthetic_tumour import make_tumour_phantom, write_tumour_dataset

SMALL = (32, 64, 64)


def test_make_phantom_same_seed_is_identical_different_seed_differs():
    a_img, a_lab = make_phantom(SMALL, rng=np.random.default_rng(3))
    b_img, b_lab = make_phantom(SMALL, rng=np.random.default_rng(3))
    c_img, c_lab = make_phantom(SMALL, rng=np.random.default_rng(4))
    np.testing.assert_array_equal(a_img, b_img)
    np.testing.assert_array_equal(a_lab, b_lab)
    assert not np.array_equal(a_img, c_img)
    assert not np.array_equal(a_lab, c_lab)


@pytest.mark.parametrize("shape", [(32, 64, 48), (24, 56, 72)])
def test_make_phantom_label_is_one_inner_component_and_image_in_range(shape):
    for seed in range(2):
        image, label = make_phantom(shape, rng=np.random.default_rng(seed))
        assert image.shape == shape and label.shape == shape
        assert image.dtype == np.float32 and label.dtype == np.uint8
        assert 0 <= image.min() and image.max() <= 255
        assert set(np.unique(label).tolist()) == {0, 1}
        assert ndimage.label(label)[1] == 1  # scipy's default structure is 6-connectivity
        for axis, n in enumerate(shape):
            idx = np.nonzero(label.any(axis=tuple(a for a in range(3) if a != axis)))[0]
            assert idx.min() >= 1 and idx.max() <= n - 2, f"label touches the border on axis {axis}"


@pytest.mark.parametrize("shape", [SMALL, (24, 96, 80)])
def test_atrium_extent_is_a_fixed_share_of_the_volume(shape):
    for seed in range(3):
        _, label = make_phantom(shape, rng=np.random.default_rng(seed))
        idx = np.nonzero(label)
        share = [(i.max() - i.min() + 1) / n for i, n in zip(idx, shape)]
        assert 0.3 <= share[0] <= 0.8, f"depth share {share[0]:.2f} (seed {seed})"
        assert 0.15 <= share[1] <= 0.5 and 0.15 <= share[2] <= 0.5, f"in-plane shares {share[1:]} (seed {seed})"


def test_best_single_threshold_does_not_find_the_atrium():
    # The other blood pools share the atrium's intensity and the enhanced wall is brighter,
    # so no threshold separates the label: the network has to use shape and position.
    for seed in range(3):
        image, label = make_phantom(SMALL, rng=np.random.default_rng(seed))
        fg = label.astype(bool)
        best = max(2 * (fg & (image > t)).sum() / (fg.sum() + (image > t).sum())
                   for t in np.linspace(0, 255, 103))
        assert best < 0.7, f"seed {seed}: a threshold reaches Dice {best:.3f}"


def test_write_phantom_dataset_writes_lasc_layout_with_shared_geometry(tmp_path):
    shapes = ((32, 64, 64), (24, 48, 64))
    ids = write_phantom_dataset(tmp_path, num_cases=3, shapes=shapes, spacing=(0.8, 0.625, 0.625), seed=5)
    assert ids == ["case_000", "case_001", "case_002"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ids
    for i, case_id in enumerate(ids):
        image, props = read_image(tmp_path / case_id / "lgemri.nrrd")
        label, label_props = read_image(tmp_path / case_id / "laendo.nrrd")
        assert image.shape == label.shape == shapes[i % 2]
        assert image.dtype == label.dtype == np.uint8
        assert set(np.unique(label).tolist()) == {0, 255}
        for key in ("spacing", "origin", "direction"):
            np.testing.assert_allclose(props[key], label_props[key], atol=1e-6)
        np.testing.assert_allclose(props["spacing"], (0.8, 0.625, 0.625), atol=1e-6)
        direction = np.reshape(props["direction"], (3, 3))
        np.testing.assert_allclose(direction @ direction.T, np.eye(3), atol=1e-6)
        assert np.linalg.det(direction) == pytest.approx(1.0, abs=1e-6)
        assert not np.allclose(direction, np.eye(3), atol=1e-3)
        assert np.min(np.abs(props["origin"])) >= 10
    # case i depends on (seed, i) only
    again = write_phantom_dataset(tmp_path / "again", num_cases=1, shapes=shapes, spacing=(0.8, 0.625, 0.625), seed=5)
    np.testing.assert_array_equal(read_image(tmp_path / "again" / again[0] / "lgemri.nrrd")[0],
                                  read_image(tmp_path / "case_000" / "lgemri.nrrd")[0])


def test_cli_refuses_a_folder_that_holds_cases_without_overwrite(tmp_path):
    """From the shell, as a user runs it."""
    write_phantom_dataset(tmp_path, num_cases=1, shapes=((16, 32, 32),))
    before = (tmp_path / "case_000" / "lgemri.nrrd").read_bytes()
    proc = run_script("phantoms.py", "--out_dir", tmp_path, "--num_cases", "1", "--shape", "16", "32", "32",
                      "--seed", "1")
    assert proc.returncode == 2
    assert_one_line_error(proc, str(tmp_path), "--overwrite")
    assert (tmp_path / "case_000" / "lgemri.nrrd").read_bytes() == before


@pytest.mark.parametrize("argv, flag", [(["--shape", "8", "64", "64"], "--shape 8 64 64"),
                                        (["--num_cases", "0"], "--num_cases 0"),
                                        (["--spacing", "0", "1", "1"], "--spacing"),
                                        (["--num_cases", "many"], "--num_cases"),
                                        (["--layout", "nnunet"], "--layout nnunet"),
                                        (["--labels", "brats2021"], "--labels brats2021"),
                                        (["--kind", "brain_tumour", "--shape", "16", "48", "48"], "--shape 16 48 48"),
                                        (["--kind", "brain_tumour", "--layout", "nifti"], "--layout"),
                                        (["--domain", "b"], "--domain b"),
                                        (["--kind", "brain_tumour", "--num_frames", "12"], "--num_frames 12"),
                                        (["--first_id", "3"], "--first_id 3"),
                                        (["--kind", "cine", "--layout", "msd"], "--layout msd"),
                                        (["--kind", "cine", "--shape", "10", "128", "128"], "--shape 10 128 128"),
                                        (["--kind", "cine", "--spacing", "8", "1.5", "1.5"], "--spacing 8.0 1.5"),
                                        (["--kind", "cine", "--num_frames", "7"], "--num_frames 7"),
                                        (["--kind", "cine", "--num_frames", "41"], "--num_frames 41"),
                                        (["--kind", "cine", "--first_id", "0"], "--first_id 0"),
                                        (["--kind", "cine", "--first_id", "995", "--num_cases", "6"], "patient999"),
                                        (["--kind", "cine", "--domain", "c"], "--domain"),
                                        (["--kind", "spine", "--layout", "nnunet"], "--layout nnunet"),
                                        (["--kind", "spine", "--labels", "msd"], "--labels msd"),
                                        (["--kind", "spine", "--domain", "a"], "--domain a"),
                                        (["--kind", "spine", "--num_frames", "12"], "--num_frames 12"),
                                        (["--kind", "spine", "--first_id", "2"], "--first_id 2"),
                                        (["--kind", "spine", "--shape", "16", "80", "80"], "--shape 16 80 80"),
                                        (["--kind", "spine", "--spacing", "0", "1", "1"], "--spacing"),
                                        (["--kind", "spine", "--num_cases", "0"], "--num_cases 0")])
def test_cli_bad_values_give_one_line_error_and_status_2(tmp_path, argv, flag):
    run = run_main(phantoms.main, "--out_dir", tmp_path / "out", *argv)
    assert run.returncode == 2
    assert_one_line_error(run, flag)
    assert not (tmp_path / "out").exists()


def test_cli_refuses_a_file_as_the_folder(tmp_path):
    (tmp_path / "f").write_text("")
    assert_one_line_error(run_main(phantoms.main, "--out_dir", tmp_path / "f"), "--out_dir", "is a file")


def test_cli_overwrite_replaces_existing_cases(tmp_path):
    write_phantom_dataset(tmp_path, num_cases=1, shapes=((16, 32, 32),), seed=0)
    run = run_main(phantoms.main, "--out_dir", tmp_path, "--num_cases", "1", "--shape", "16", "32", "40", "--seed", "1",
                   "--overwrite")
    assert run.returncode == 0 and run.stdout == f"wrote 1 case(s) to {tmp_path}\n"
    assert read_image(tmp_path / "case_000" / "lgemri.nrrd")[0].shape == (16, 32, 40)


# ----------------------------------------------------------------------------- brain-tumour phantoms

TUMOUR_SMALL = (32, 48, 48)


def _tumour(seed, shape=TUMOUR_SMALL, spacing=(1.0, 1.0, 1.0)):
    return make_tumour_phantom(shape, spacing, rng=np.random.default_rng(seed))


def test_make_tumour_phantom_same_seed_is_identical_different_seed_differs():
    (a_img, a_lab), (b_img, b_lab), (c_img, c_lab) = _tumour(3), _tumour(3), _tumour(4)
    np.testing.assert_array_equal(a_img, b_img)
    np.testing.assert_array_equal(a_lab, b_lab)
    assert not np.array_equal(a_img, c_img)
    assert not np.array_equal(a_lab, c_lab)


@pytest.mark.parametrize("shape, spacing", [(TUMOUR_SMALL, (1.0, 1.0, 1.0)), ((24, 48, 40), (2.5, 1.0, 1.2))])
def test_make_tumour_phantom_is_a_skull_stripped_brain_with_four_channels(shape, spacing):
    for seed in range(2):
        image, label = _tumour(seed, shape, spacing)
        assert image.shape == (4, *shape) and label.shape == shape
        assert image.dtype == np.float32 and label.dtype == np.uint8
        assert set(np.unique(label).tolist()) <= {0, 1, 2, 3}
        brain = image[0] != 0
        for c in range(4):  # one brain mask, exactly 0 outside it in every channel, positive inside
            np.testing.assert_array_equal(image[c] != 0, brain)
            assert image[c].min() == 0 and (image[c][brain] > 0).all()
        assert ndimage.label(brain)[1] == 1
        np.testing.assert_array_equal(ndimage.binary_fill_holes(brain), brain)
        idx = np.nonzero(brain)
        share = [(i.max() - i.min() + 1) / n for i, n in zip(idx, shape)]
        assert min(share) >= 0.65, f"the brain spans only {share} of the field of view (seed {seed})"
        assert all(i.min() >= 1 and i.max() <= n - 2 for i, n in zip(idx, shape)), "brain touches the border"


def test_make_tumour_phantom_brain_size_in_mm_follows_spacing():
    # Same seed, same field of view in mm (48 mm a side) on grids of 1 and 2 mm along z: the same
    # brain in mm, so its volume in mm^3 agrees to within the coarser grid's partial voxels.
    fine, _ = _tumour(6, (48, 48, 48), (1.0, 1.0, 1.0))
    coarse, _ = _tumour(6, (24, 48, 48), (2.0, 1.0, 1.0))
    v_fine, v_coarse = (fine[0] != 0).sum() * 1.0, (coarse[0] != 0).sum() * 2.0
    assert v_coarse == pytest.approx(v_fine, rel=0.05)


def test_tumour_labels_are_nested_inside_the_brain():
    """Asserted for each case: necrosis (2) only inside the enhancing core, i.e. each of its
    6-neighbours is 2 or 3 (an enhancing rim at least one voxel thick); the core (2, 3) only inside
    the whole tumour, each 6-neighbour labelled (the edema surrounds the core); core and whole
    tumour one 6-connected component each; the tumour inside the brain, 2-15 % of its volume."""
    for seed in range(5):
        image, label = _tumour(seed)
        brain = image[0] != 0
        assert set(np.unique(label).tolist()) == {0, 1, 2, 3}, f"seed {seed}"
        core, whole = label >= 2, label >= 1
        assert not (ndimage.binary_dilation(label == 2) & ~core).any(), f"necrosis touches edema (seed {seed})"
        assert not (ndimage.binary_dilation(core) & ~whole).any(), f"core touches background (seed {seed})"
        assert ndimage.label(core)[1] == 1 and ndimage.label(whole)[1] == 1
        assert not (whole & ~brain).any()
        assert 0.015 <= whole.sum() / brain.sum() <= 0.16, f"seed {seed}: {whole.sum() / brain.sum():.3f}"


def test_tumour_contrasts_follow_the_sequences():
    flair, t1, t1gd, t2 = range(4)
    for seed in range(4):
        image, label = _tumour(seed)
        # mean[c, k]: the mean of channel c over normal brain (k = 0) and labels 1, 2, 3
        mean = np.array([[image[c][(image[0] != 0) & (label == k)].mean() for k in range(4)] for c in range(4)])
        normal, edema, necrosis, enhancing = range(4)
        assert mean[flair, edema] > 1.15 * mean[flair, normal], f"seed {seed}"
        assert mean[t2, edema] > 1.15 * mean[t2, normal], f"seed {seed}"
        assert mean[t1gd, enhancing] > 1.2 * mean[t1gd, necrosis], f"seed {seed}"
        assert mean[t1gd, enhancing] > 1.1 * mean[t1gd, normal], f"seed {seed}"
        assert mean[t1, necrosis] < 0.9 * mean[t1, normal], f"seed {seed}"


def test_best_single_threshold_does_not_find_the_tumour():
    # Vessels enhance like the rim, lesions and cortex are bright in FLAIR, and the bias field
    # shifts everything: no threshold of one channel separates enhancing tumour or whole tumour.
    def best_dice(values, target):
        return max(2 * (target & (values > t)).sum() / (target.sum() + (values > t).sum())
                   for t in np.quantile(values, np.linspace(0.5, 0.999, 60)))

    enhancing, whole = [], []
    for seed in range(4):
        image, label = _tumour(seed)
        brain = image[0] != 0
        enhancing.append(best_dice(image[2][brain], label[brain] == 3))
        whole.append(best_dice(image[0][brain], label[brain] >= 1))
    assert np.mean(enhancing) < 0.85 and np.mean(whole) < 0.9, (enhancing, whole)


def _tumour_cases(root):
    return [(read_image_channels(root / "imagesTr" / f"{c}.nii.gz"), read_image(root / "labelsTr" / f"{c}.nii.gz"))
            for c in ("BRATS_000", "BRATS_001")]


TUMOUR_SHAPES, TUMOUR_SPACING = ((32, 48, 48), (24, 40, 48)), (1.2, 1.0, 1.0)


def test_write_tumour_dataset_msd_layout_reads_back_with_its_geometry(tmp_path):
    ids = write_tumour_dataset(tmp_path, num_cases=2, shapes=TUMOUR_SHAPES, spacing=TUMOUR_SPACING, seed=5)
    assert ids == ["BRATS_000", "BRATS_001"]
    assert sorted(p.name for p in (tmp_path / "imagesTr").iterdir()) == ["BRATS_000.nii.gz", "BRATS_001.nii.gz"]
    for i, ((image, props), (label, label_props)) in enumerate(_tumour_cases(tmp_path)):
        expected_image, expected_label = make_tumour_phantom(TUMOUR_SHAPES[i], TUMOUR_SPACING,
                                                             np.random.default_rng([5, i]))
        np.testing.assert_array_equal(image, expected_image)  # float32 on disk: exact round trip
        np.testing.assert_array_equal(label, expected_label)
        assert image.dtype == np.float32 and label.dtype == np.uint8
        assert same_geometry(props, label_props)
        np.testing.assert_allclose(props["spacing"], TUMOUR_SPACING, atol=1e-6)
        direction = np.reshape(props["direction"], (3, 3))
        np.testing.assert_allclose(direction @ direction.T, np.eye(3), atol=1e-5)
        assert np.linalg.det(direction) == pytest.approx(1.0, abs=1e-5)
        assert not np.allclose(direction, np.eye(3), atol=1e-3)
        assert np.min(np.abs(props["origin"])) >= 10
    meta = json.loads((tmp_path / "dataset.json").read_text())
    assert meta.pop("description")
    assert meta == {"name": "BrainTumourPhantoms", "tensorImageSize": "4D",
                    "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
                    "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"},
                    "numTraining": 2, "numTest": 0,
                    "training": [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in ids],
                    "test": []}


def test_write_tumour_dataset_nnunet_layout_holds_the_msd_arrays(tmp_path):
    write_tumour_dataset(tmp_path / "msd", num_cases=2, shapes=TUMOUR_SHAPES, spacing=TUMOUR_SPACING, seed=5)
    write_tumour_dataset(tmp_path / "nn", num_cases=2, shapes=TUMOUR_SHAPES, spacing=TUMOUR_SPACING, seed=5,
                         layout="nnunet")
    names = sorted(p.name for p in (tmp_path / "nn" / "imagesTr").iterdir())
    assert names == [f"BRATS_00{i}_000{c}.nii.gz" for i in range(2) for c in range(4)]
    for i, ((image, props), (label, _)) in enumerate(_tumour_cases(tmp_path / "msd")):
        for c in range(4):
            channel, channel_props = read_image(tmp_path / "nn" / "imagesTr" / f"BRATS_00{i}_000{c}.nii.gz")
            np.testing.assert_array_equal(channel, image[c])
            assert same_geometry(channel_props, props)
        np.testing.assert_array_equal(read_image(tmp_path / "nn" / "labelsTr" / f"BRATS_00{i}.nii.gz")[0], label)
    assert json.loads((tmp_path / "nn" / "dataset.json").read_text()) == {
        "channel_names": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
        "labels": {"background": 0, "edema": 1, "non-enhancing tumor": 2, "enhancing tumour": 3},
        "numTraining": 2, "file_ending": ".nii.gz"}


def test_write_tumour_dataset_brats2021_labels_map_the_same_regions(tmp_path):
    write_tumour_dataset(tmp_path / "msd", num_cases=1, shapes=TUMOUR_SHAPES, seed=2)
    write_tumour_dataset(tmp_path / "brats", num_cases=1, shapes=TUMOUR_SHAPES, seed=2, labels="brats2021")
    msd = read_image(tmp_path / "msd" / "labelsTr" / "BRATS_000.nii.gz")[0]
    brats = read_image(tmp_path / "brats" / "labelsTr" / "BRATS_000.nii.gz")[0]
    assert set(np.unique(brats).tolist()) == {0, 1, 2, 4}
    for msd_value, brats_value in ((0, 0), (1, 2), (2, 1), (3, 4)):  # edema, core, enhancing
        np.testing.assert_array_equal(msd == msd_value, brats == brats_value)
    assert json.loads((tmp_path / "brats" / "dataset.json").read_text())["labels"] == {
        "0": "background", "1": "necrotic tumour core", "2": "edema", "4": "enhancing tumour"}
    write_tumour_dataset(tmp_path / "nn", num_cases=1, shapes=TUMOUR_SHAPES, seed=2, layout="nnunet",
                         labels="brats2021")
    assert json.loads((tmp_path / "nn" / "dataset.json").read_text())["labels"] == {
        "background": 0, "necrotic tumour core": 1, "edema": 2, "enhancing tumour": 4}


def test_tumour_generator_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="at least 24"):
        make_tumour_phantom((20, 48, 48))
    with pytest.raises(ValueError, match="'nifti'"):
        write_tumour_dataset(tmp_path, num_cases=1, layout="nifti")
    with pytest.raises(ValueError, match="'brats'"):
        write_tumour_dataset(tmp_path, num_cases=1, labels="brats")


def test_cli_tumour_refuses_a_folder_that_holds_cases_and_warns_of_stale_files(tmp_path):
    args = ["--kind", "brain_tumour", "--out_dir", tmp_path, "--num_cases", "2", "--shape", "24", "32", "32"]
    run = run_main(phantoms.main, *args)
    assert run.returncode == 0 and run.stdout == f"wrote 2 case(s) to {tmp_path}\n" and run.stderr == ""
    assert_one_line_error(run_main(phantoms.main, *args), "already holds 2 cases", "--overwrite")
    # Switching layout leaves the 4D files beside the new per-channel ones: a warning names them.
    run = run_main(phantoms.main, *args[:5], "1", *args[6:], "--layout", "nnunet", "--overwrite")
    assert run.returncode == 0
    assert "still holds 2 older cases (imagesTr/BRATS_000.nii.gz, ...)" in run.stderr
    assert (tmp_path / "imagesTr" / "BRATS_000_0003.nii.gz").is_file()
