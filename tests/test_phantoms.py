"""Tests of the phantom generator (synthetic.py) and its command line (phantoms.py):
determinism, the label's invariants, the atrium's size relative to the volume, that a threshold
cannot find it, the LASC layout on disk with its geometry, and the command line's errors."""
import numpy as np
import pytest
from scipy import ndimage

import phantoms
from conftest import assert_one_line_error, run_main, run_script
from dataset import read_image
from synthetic import make_phantom, write_phantom_dataset

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
                                        (["--num_cases", "many"], "--num_cases")])
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
