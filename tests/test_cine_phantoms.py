"""Tests of the cardiac cine generator (synthetic_cine.py) and its command line (phantoms.py --kind
cine): the ACDC layout with Info.cfg and subjects.csv, the labels' anatomy (ACDC's values, a
myocardium closing the LV cavity in every slice, the RV against the septum), the analytic volumes
against the truncated-ellipsoid formula, a grid and the voxel counts, the cycle (ED the largest
cavity, ES the smallest, the myocardium's volume constant), the two domains' contrast and noise,
determinism, and the command line's errors."""
import csv
import re

import numpy as np
import pytest
from scipy import ndimage

import dataset
import phantoms
import synthetic_cine as sc
from conftest import assert_one_line_error, run_main
from dataset import read_image, read_image_channels, same_geometry

IN_PLANE = np.ones((1, 3, 3), bool)  # 8-neighbours within a slice of a (D, H, W) label


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """Two domain-a subjects (patient001, patient002) written in the ACDC layout."""
    root = tmp_path_factory.mktemp("cine")
    assert sc.write_cine_dataset(root, num_subjects=2, seed=0, domain="a") == ["patient001", "patient002"]
    return root


@pytest.fixture(scope="module")
def subjects():
    """Subjects 1 and 2 of each domain, at the defaults (12 frames)."""
    return {d: [sc.make_cine_subject(sc.subject_seed(0, n, d), d) for n in (1, 2)] for d in sc.DOMAINS}


def read_rows(root):
    with open(root / "subjects.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_write_cine_dataset_writes_the_acdc_layout_with_shared_geometry(written):
    assert sorted(p.name for p in written.iterdir()) == ["patient001", "patient002", "subjects.csv"]
    for row in read_rows(written):
        pid, es = row["id"], int(row["es_frame"])
        folder = written / pid
        frames = [f"{pid}_frame01", f"{pid}_frame{es:02d}"]
        assert sorted(p.name for p in folder.iterdir()) == sorted(
            ["Info.cfg", f"{pid}_4d.nii.gz"] + [f"{f}{s}.nii.gz" for f in frames for s in ("", "_gt")])
        cine, props = read_image_channels(folder / f"{pid}_4d.nii.gz")
        assert cine.dtype == np.float32 and cine.shape[0] == 12
        assert np.all(cine >= 0) and np.array_equal(cine, np.rint(cine))
        depth, height, width = cine.shape[1:]
        assert 8 <= depth <= 12 and 112 <= height <= 176 and 112 <= width <= 176
        assert 6 <= props["spacing"][0] <= 10 and props["spacing"][1] == props["spacing"][2]
        assert 1.2 <= props["spacing"][1] <= 1.9
        for name, t in zip(frames, (0, es - 1)):  # the frame files are the 4D image's ED and ES frames
            image, image_props = read_image(folder / f"{name}.nii.gz")
            label, label_props = read_image(folder / f"{name}_gt.nii.gz")
            np.testing.assert_array_equal(image, cine[t])
            assert label.dtype == np.uint8 and label.shape == image.shape
            assert same_geometry(image_props, props) and same_geometry(label_props, props)
    # the pipeline's reader finds the ED and ES frames as cases grouped by patient
    cases = dataset.find_cases(written, require_labels=True)
    assert [c.group for c in cases] == ["patient001"] * 2 + ["patient002"] * 2
    assert [c.case_id for c in cases][0] == "patient001_frame01"


def test_info_cfg_holds_acdc_lines_that_name_the_written_frames(written):
    for row in read_rows(written):
        path = written / row["id"] / "Info.cfg"
        lines = path.read_text().splitlines()
        assert [line.split(":")[0] for line in lines] == ["ED", "ES", "Group", "Height", "NbFrame", "Weight"]
        info = dataset.read_info_cfg(path)
        assert (info["ED"], info["ES"], info["NbFrame"]) == ("1", row["es_frame"], "12")
        assert info["Group"] == row["group"] and info["Group"] in sc.GROUPS
        assert re.fullmatch(r"1\d\d\.0", info["Height"]) and re.fullmatch(r"\d+\.0", info["Weight"])
        assert dataset.cardiac_phases(path) == (1, int(row["es_frame"]))
        assert 4 <= int(row["es_frame"]) <= 6  # 30-40 % of 12 frames, 1-based


def test_subjects_csv_holds_the_voxel_counts_of_the_written_labels(written):
    for row in read_rows(written):
        pid, es = row["id"], int(row["es_frame"])
        ed_label, props = read_image(written / pid / f"{pid}_frame01_gt.nii.gz")
        es_label, _ = read_image(written / pid / f"{pid}_frame{es:02d}_gt.nii.gz")
        ml = np.prod(props["spacing"]) / 1000
        for key, label, value in (("lv_edv", ed_label, 3), ("lv_esv", es_label, 3), ("rv_edv", ed_label, 1),
                                  ("rv_esv", es_label, 1)):
            assert float(row[f"{key}_voxel_ml"]) == pytest.approx((label == value).sum() * ml, abs=0.006), key
        assert float(row["lv_mass_g"]) == pytest.approx(1.05 * (ed_label == 2).sum() * ml, abs=0.006)
        edv, esv = float(row["lv_edv_ml"]), float(row["lv_esv_ml"])
        assert float(row["lv_ef_pct"]) == pytest.approx(100 * (edv - esv) / edv, abs=0.01)
        assert 90 <= edv <= 250 and 20 <= float(row["lv_ef_pct"]) <= 70
        assert row["domain"] == "a" and row["ed_frame"] == "1" and row["num_frames"] == "12"


def test_truncated_ellipsoid_volume_is_the_half_ellipsoid_untilted_and_matches_a_grid_tilted():
    assert sc.truncated_ellipsoid_ml(20, 40, 0, 0) == pytest.approx(2 / 3 * np.pi * 20 * 20 * 40 / 1000, rel=1e-12)
    # Tilted: count the cells of a 0.4 mm grid below z = 10 + 0.3 x inside the ellipsoid (20, 20, 40).
    g = np.arange(-40, 40, 0.4) + 0.2
    z, y, x = np.meshgrid(g, g[np.abs(g) < 20.5], g[np.abs(g) < 20.5], indexing="ij", sparse=True)
    inside = (x * x + y * y) / 400 + z * z / 1600 <= 1
    counted = np.count_nonzero(inside & (z < 10 + 0.3 * x)) * 0.4 ** 3 / 1000
    assert sc.truncated_ellipsoid_ml(20, 40, 10, 0.3) == pytest.approx(counted, rel=0.003)


def test_labels_are_acdc_values_with_a_closed_myocardium_and_the_rv_against_the_septum(subjects):
    for domain, group in subjects.items():
        for s in group:
            assert s.label.dtype == np.uint8 and set(np.unique(s.label).tolist()) == {0, 1, 2, 3}
            assert set(np.unique(s.label[0]).tolist()) == {0, 1, 2, 3}
            for t, label in enumerate(s.label):
                cavity, rv = label == 3, label == 1
                # every in-plane neighbour of the cavity is cavity or myocardium, in every slice
                assert np.all(label[ndimage.binary_dilation(cavity, IN_PLANE)] >= 2), (domain, t)
                assert not (ndimage.binary_dilation(rv, IN_PLANE) & cavity).any(), (domain, t)
                # mid-ventricular slices (cavity at least half its largest area): the RV touches the septum
                area = cavity.sum(axis=(1, 2))
                for k in np.nonzero(area >= area.max() / 2)[0]:
                    assert (ndimage.binary_dilation(rv[k], IN_PLANE[0]) & (label[k] == 2)).any(), (domain, t, k)


def test_analytic_volumes_agree_with_voxel_counts(subjects):
    for domain, group in subjects.items():
        for s in group:
            row = sc.subject_row("p", domain, s)
            for key, tol in (("lv_edv", 0.03), ("rv_edv", 0.03), ("lv_esv", 0.06), ("rv_esv", 0.06)):
                assert row[f"{key}_voxel_ml"] == pytest.approx(row[f"{key}_ml"], rel=tol), (domain, key, row)
            voxel_ef = 100 * (1 - row["lv_esv_voxel_ml"] / row["lv_edv_voxel_ml"])
            assert voxel_ef == pytest.approx(row["lv_ef_pct"], abs=2.5), (domain, row)
            assert row["lv_mass_g"] == pytest.approx(row["lv_mass_analytic_g"], rel=0.05), (domain, row)
            if s.group in ("NOR", "HCM", "RV"):  # the RV is a little larger than an undilated LV
                assert row["rv_edv_ml"] > row["lv_edv_ml"], (domain, row)


def test_ed_holds_the_largest_cavities_es_the_smallest_and_the_myocardium_keeps_its_volume(subjects):
    for domain, group in subjects.items():
        for s in group:
            lv, rv, myo = ((s.label == k).sum(axis=(1, 2, 3)) for k in (3, 1, 2))
            assert s.ed == 1 and np.argmax(lv) == 0 and np.argmin(lv) == s.es - 1, (domain, lv)
            assert np.sum(lv == lv.max()) == 1 and np.sum(lv == lv.min()) == 1
            assert np.argmax(rv) == 0 and np.argmin(rv) == s.es - 1, (domain, rv)
            assert myo.max() / myo.min() < 1.05, (domain, myo)  # incompressible: the wall thickens in systole
            assert lv[s.es - 1] / lv[0] < 0.85  # while the cavity shrinks


@pytest.mark.parametrize("num_frames", [8, 12, 40])
def test_cardiac_cycle_is_one_at_ed_only_and_zero_at_es_only(num_frames):
    es = round(0.35 * num_frames)
    f = sc.cardiac_cycle(num_frames, es, np.random.default_rng(0))
    assert f.shape == (num_frames,) and f[0] == 1 and f[es] == 0
    assert np.all((f[1:] < 1) & (np.delete(f, es) > 0))
    assert np.all(np.diff(f[:es + 1]) < 0) and np.all(np.diff(f[es:]) >= 0)  # ejection, then filling


def _contrast_and_noise(s):
    """(blood / myocardium, noise sd / blood) at ED: medians over the eroded cavity and myocardium;
    the noise from two frames' difference, robustly, as the heart covers a small part of them."""
    image, label = s.image[0], s.label[0]
    blood = np.median(image[ndimage.binary_erosion(label == 3, IN_PLANE)])
    myo = np.median(image[ndimage.binary_erosion(label == 2, IN_PLANE)])
    diff = (s.image[1] - s.image[2]).ravel()
    sigma = 1.4826 * np.median(np.abs(diff - np.median(diff))) / np.sqrt(2)
    return blood / myo, sigma / blood


def test_domain_b_has_lower_contrast_and_more_noise_than_domain_a(subjects):
    a = np.array([_contrast_and_noise(s) for s in subjects["a"]])
    b = np.array([_contrast_and_noise(s) for s in subjects["b"]])
    assert np.all(a[:, 0] > 2.8) and np.all(b[:, 0] < 2.5), (a, b)
    assert np.all(a[:, 1] < 0.04) and b[:, 1].mean() > 2 * a[:, 1].mean(), (a, b)
    assert np.median(subjects["b"][0].image) > 4 * np.median(subjects["a"][0].image)  # another scale
    # the same subject number in the other domain is another heart
    assert subjects["a"][0].volumes["lv_edv"] != subjects["b"][0].volumes["lv_edv"]


def test_same_seed_writes_identical_files_and_a_subject_depends_on_its_number_only(written, tmp_path):
    # patient002 alone, written as the first subject of another run, is byte for byte the same
    assert sc.write_cine_dataset(tmp_path / "again", 1, seed=0, domain="a", first_id=2) == ["patient002"]
    files = sorted(p.name for p in (written / "patient002").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "again" / "patient002").iterdir())
    for name in files:
        assert (tmp_path / "again" / "patient002" / name).read_bytes() == (written / "patient002" / name).read_bytes()
    sc.write_cine_dataset(tmp_path / "other", 1, seed=1, domain="a", num_frames=8, first_id=2)
    other = read_image_channels(tmp_path / "other" / "patient002" / "patient002_4d.nii.gz")[0]
    assert other.shape[0] == 8 and not np.array_equal(other[0], read_image(written / "patient002" /
                                                                           "patient002_frame01.nii.gz")[0])


def test_generator_rejects_bad_arguments_before_writing(tmp_path):
    with pytest.raises(ValueError, match="'c'"):
        sc.make_cine_subject(0, domain="c")
    with pytest.raises(ValueError, match="num_frames 7"):
        sc.make_cine_subject(0, num_frames=7)
    with pytest.raises(ValueError, match="first_id 0"):
        sc.write_cine_dataset(tmp_path / "out", 1, first_id=0)
    with pytest.raises(ValueError, match="1..999"):
        sc.write_cine_dataset(tmp_path / "out", 5, first_id=996)
    assert not (tmp_path / "out").exists()


def test_cli_cine_writes_refuses_existing_subjects_and_keeps_the_table_of_those_left(tmp_path):
    args = ["--kind", "cine", "--out_dir", tmp_path, "--num_cases", "1", "--num_frames", "8"]
    run = run_main(phantoms.main, *args)
    assert (run.returncode, run.stdout, run.stderr) == (0, f"wrote 1 case(s) to {tmp_path}\n", "")
    assert dataset.read_info_cfg(tmp_path / "patient001" / "Info.cfg")["NbFrame"] == "8"
    assert_one_line_error(run_main(phantoms.main, *args), "already holds 1 cases", "--overwrite")
    # the other kinds see the ACDC folder as cases too
    assert_one_line_error(run_main(phantoms.main, "--out_dir", tmp_path), "already holds 1 cases")
    run = run_main(phantoms.main, *args, "--first_id", "2", "--domain", "b", "--overwrite")
    assert run.returncode == 0 and "still holds 1 older cases (patient001, ...)" in run.stderr
    assert [(r["id"], r["domain"]) for r in read_rows(tmp_path)] == [("patient001", "a"), ("patient002", "b")]


