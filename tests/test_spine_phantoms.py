"""Tests of the CT-like spine phantoms (synthetic_spine.py) and `phantoms.py --kind spine`: the
instance map's invariants (consecutive 1..N, one 26-connected component each, numbered along D),
the HU contrasts (bone over soft tissue over air, discs darker than bodies, bright clutter outside
the label), vertebrae cut by the field of view and their flag in instances.csv, physical sizes
across spacings, determinism, the MSD layout on disk and the command line's errors."""
import csv
import json

import numpy as np
import pytest
from scipy import ndimage

import phantoms
from conftest import assert_one_line_error, run_main
from dataset import read_image, same_geometry
from synthetic_spine import make_spine_phantom, write_spine_dataset

FULL_26 = np.ones((3, 3, 3), bool)
SMALL = (48, 40, 40)  # a 48 x 40 x 40 mm field of view at 1 mm


def _spine(seed, shape=(96, 80, 80), spacing=(1.0, 1.0, 1.0), **kwargs):
    return make_spine_phantom(np.random.default_rng(seed), shape, spacing, **kwargs)


def _read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("num_vertebrae", [(4, 7), (8, 8)])
def test_instances_are_consecutive_26_connected_and_numbered_along_d(num_vertebrae):
    for seed in range(4):
        image, label, info = _spine(seed, num_vertebrae=num_vertebrae)
        assert image.shape == label.shape == (96, 80, 80)
        assert image.dtype == np.float32 and label.dtype == np.uint8
        n = int(label.max())
        assert num_vertebrae[0] <= n <= num_vertebrae[1], f"seed {seed}: {n} vertebrae"
        assert np.array_equal(np.unique(label), np.arange(n + 1)), f"seed {seed}: {np.unique(label)}"
        assert [r["instance"] for r in info["instances"]] == list(range(1, n + 1))
        for k in range(1, n + 1):
            assert ndimage.label(label == k, FULL_26)[1] == 1, f"seed {seed}: instance {k} is in pieces"
            assert info["instances"][k - 1]["voxels"] == int((label == k).sum())
        centroid_d = ndimage.center_of_mass(label > 0, label, range(1, n + 1))
        assert np.all(np.diff([c[0] for c in centroid_d]) > 0), f"seed {seed}: {centroid_d}"


def test_hounsfield_units_bone_over_soft_tissue_over_air():
    for seed in range(3):
        image, label, _ = _spine(seed)
        air = image[:, :3, :3]                                  # a corner column outside the torso
        far = ndimage.distance_transform_edt(label == 0) > 3    # not blurred into by bone
        soft = float(np.median(image[far & (image > -500)]))
        vertebra = float(image[label > 0].mean())
        assert abs(float(air.mean()) + 1000) < 10, f"seed {seed}: air {air.mean():.0f} HU"
        assert 20 < soft < 80, f"seed {seed}: soft tissue {soft:.0f} HU"
        assert vertebra > soft + 200, f"seed {seed}: vertebra {vertebra:.0f} HU, soft tissue {soft:.0f} HU"


def test_discs_are_darker_than_the_bodies_either_side():
    for seed in range(3):
        image, label, info = _spine(seed)
        centres = [np.array(r["centre"]) for r in info["instances"] if r["complete"]]
        assert len(centres) >= 3
        for k, (a, b) in enumerate(zip(centres[:-1], centres[1:]), start=1):
            z, y, x = np.rint((a + b) / 2).astype(int)
            assert label[z, y, x] == 0, f"seed {seed}: the disc below instance {k} is labelled"
            disc = float(image[z, y - 1:y + 2, x - 1:x + 2].mean())
            bodies = [float(image[tuple(np.rint(c).astype(int))]) for c in (a, b)]
            means = [float(image[label == i].mean()) for i in (k, k + 1)]
            assert disc < min(means) - 100, f"seed {seed}: disc {disc:.0f} HU below {k}, vertebrae {means}"
            assert disc < max(bodies), f"seed {seed}: disc {disc:.0f} HU, body centres {bodies}"


def test_bright_clutter_lies_outside_the_label():
    # Ribs and aortic calcifications: bone-bright voxels well away from every vertebra.
    for seed in range(4):
        image, label, _ = _spine(seed)
        far = ndimage.distance_transform_edt(label == 0) > 2
        assert ((image > 300) & far).sum() >= 10, f"seed {seed}: no bright clutter"


def test_anisotropic_spacing_keeps_physical_sizes():
    # The same field of view (96 x 80 x 80 mm) at 1 mm and at 2.4 x 0.8 x 0.8 mm: the same anatomy.
    fine = _spine(5, (96, 80, 80), (1.0, 1.0, 1.0))[1]
    coarse = _spine(5, (40, 100, 100), (2.4, 0.8, 0.8))[1]
    assert fine.max() == coarse.max()
    for k in range(1, int(fine.max()) + 1):
        extents = []
        for lab, spacing in ((fine, (1.0, 1.0, 1.0)), (coarse, (2.4, 0.8, 0.8))):
            idx = np.nonzero(lab == k)
            extents.append(np.array([(i.max() - i.min() + 1) * s for i, s in zip(idx, spacing)]))
        np.testing.assert_allclose(extents[0], extents[1], atol=2 * 2.4 + 0.1, err_msg=f"instance {k}")
        volumes = [float((fine == k).sum()), float((coarse == k).sum()) * 2.4 * 0.8 * 0.8]
        assert abs(volumes[0] / volumes[1] - 1) < 0.2, f"instance {k}: {volumes} mm^3"


def test_write_spine_dataset_writes_msd_layout_and_instances_csv(tmp_path):
    shapes = ((48, 40, 40), (40, 48, 32))
    ids = write_spine_dataset(tmp_path, num_cases=3, shapes=shapes, spacing=(1.0, 0.8, 0.8), seed=2)
    assert ids == ["spine_000", "spine_001", "spine_002"]
    meta = json.loads((tmp_path / "dataset.json").read_text())
    assert meta["labels"] == {"0": "background", "1": "vertebra"} and meta["modality"] == {"0": "CT"}
    assert meta["numTraining"] == 3
    assert [t["image"] for t in meta["training"]] == [f"./imagesTr/{c}.nii.gz" for c in ids]
    rows = _read_rows(tmp_path / "instances.csv")
    assert list(rows[0]) == ["case", "instance", "voxels", "complete", "full_voxels"]
    for i, case_id in enumerate(ids):
        image, props = read_image(tmp_path / "imagesTr" / f"{case_id}.nii.gz")
        label, label_props = read_image(tmp_path / "labelsTr" / f"{case_id}.nii.gz")
        assert image.shape == label.shape == shapes[i % 2]
        assert image.dtype == np.int16 and label.dtype == np.uint8
        assert same_geometry(props, label_props)
        np.testing.assert_allclose(props["spacing"], (1.0, 0.8, 0.8), atol=1e-6)
        assert np.abs(props["origin"]).min() > 10
        assert not np.allclose(np.reshape(props["direction"], (3, 3)), np.eye(3), atol=0.05)
        assert image.min() < -900 and image.max() > 500
        case_rows = [r for r in rows if r["case"] == case_id]
        assert [int(r["instance"]) for r in case_rows] == list(range(1, int(label.max()) + 1))
        assert [int(r["voxels"]) for r in case_rows] == np.bincount(label.ravel())[1:].tolist()


def test_a_cut_vertebra_is_the_last_and_flagged_incomplete(tmp_path):
    write_spine_dataset(tmp_path, num_cases=6, shapes=(SMALL,), seed=0)
    rows = _read_rows(tmp_path / "instances.csv")
    cut = complete = 0
    for case_id in sorted({r["case"] for r in rows}):
        flags = [int(r["complete"]) for r in rows if r["case"] == case_id]
        assert all(flags[:-1]), f"{case_id}: an inner vertebra is flagged cut: {flags}"
        last = [r for r in rows if r["case"] == case_id][-1]
        voxels, full = int(last["voxels"]), int(last["full_voxels"])
        if flags[-1]:
            complete += 1
            assert voxels >= 0.98 * full
        else:
            cut += 1
            assert 0.1 * full < voxels < 0.98 * full, f"{case_id}: {voxels} of {full} voxels inside"
            label = read_image(tmp_path / "labelsTr" / f"{case_id}.nii.gz")[0]
            assert (label[-1] == label.max()).any(), f"{case_id}: the cut vertebra does not reach the bottom"
    assert cut >= 1 and complete >= 1, f"{cut} cut and {complete} whole columns in 6 cases"


def test_same_seed_gives_identical_files_and_another_seed_differs(tmp_path):
    for folder, seed in (("a", 7), ("b", 7), ("c", 8)):
        write_spine_dataset(tmp_path / folder, num_cases=2, shapes=(SMALL,), seed=seed)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 6
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    assert (tmp_path / "a" / "labelsTr" / "spine_000.nii.gz").read_bytes() != \
        (tmp_path / "c" / "labelsTr" / "spine_000.nii.gz").read_bytes()


def test_make_spine_phantom_rejects_bad_arguments():
    with pytest.raises(ValueError, match="shape"):
        _spine(0, (16, 80, 80))
    with pytest.raises(ValueError, match="spacing"):
        _spine(0, SMALL, (0.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="num_vertebrae"):
        _spine(0, SMALL, num_vertebrae=(5, 3))


def test_cli_spine_writes_cases_and_refuses_to_overwrite(tmp_path):
    out = tmp_path / "spine"
    run = run_main(phantoms.main, "--kind", "spine", "--out_dir", out, "--num_cases", "2", "--shape", "48", "40", "40",
                   "--spacing", "2.5", "0.7", "0.7", "--seed", "3")
    assert run.returncode == 0 and run.stdout == f"wrote 2 case(s) to {out}\n", run.stderr
    assert sorted(p.name for p in (out / "imagesTr").iterdir()) == ["spine_000.nii.gz", "spine_001.nii.gz"]
    assert read_image(out / "labelsTr" / "spine_001.nii.gz")[1]["spacing"] == pytest.approx((2.5, 0.7, 0.7))
    before = (out / "instances.csv").read_bytes()
    again = run_main(phantoms.main, "--kind", "spine", "--out_dir", out, "--num_cases", "1", "--seed", "4")
    assert again.returncode == 2
    assert_one_line_error(again, str(out), "--overwrite")
    assert (out / "instances.csv").read_bytes() == before
