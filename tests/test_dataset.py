from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

import dataset as ds
from utils import UserError

ROTATED = {"spacing": (2.0, 0.7, 0.5), "origin": (-12.5, 40.0, 7.25),
           "direction": (0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0)}


def write_case(root: Path, case_id: str, image, label, props=ROTATED, layout="lasc"):
    if layout == "lasc":
        ds.write_image(image, props, root / case_id / "lgemri.nrrd")
        if label is not None:
            ds.write_image(label, props, root / case_id / "laendo.nrrd")
    else:
        ds.write_image(image, props, root / "imagesTr" / f"{case_id}_0000.nii.gz")
        if label is not None:
            ds.write_image(label, props, root / "labelsTr" / f"{case_id}.nii.gz")


def test_read_write_round_trip_keeps_array_and_geometry(tmp_path):
    a = np.arange(2 * 3 * 4, dtype=np.int16).reshape(2, 3, 4)
    for name in ("x.nrrd", "x.nii.gz", "x.mha"):
        ds.write_image(a, ROTATED, tmp_path / name)
        b, props = ds.read_image(tmp_path / name)
        assert np.array_equal(a, b) and ds.same_geometry(props, ROTATED)
    # Spacing is stored reversed for SimpleITK: (x, y, z) = (0.5, 0.7, 2.0).
    assert sitk.ReadImage(str(tmp_path / "x.nrrd")).GetSpacing() == (0.5, 0.7, 2.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.mha", "x.nii.gz", "x.nrrd"]  # no temp files left


def test_find_cases_lasc_layout_reads_255_labels_as_one(tmp_path):
    img = np.zeros((4, 4, 4), np.uint8)
    lab = np.zeros((4, 4, 4), np.uint8)
    lab[1, 1, 1] = 255
    write_case(tmp_path, "b", img, lab)
    write_case(tmp_path, "a", img, lab)
    (tmp_path / ".hidden").mkdir()
    (tmp_path / "_skip").mkdir()
    cases = ds.find_cases(tmp_path, require_labels=True)
    assert [c.case_id for c in cases] == ["a", "b"]
    _, label, _ = ds.load_case(cases[0])
    assert label.dtype == np.uint8 and set(np.unique(label)) == {0, 1}


def test_find_cases_msd_layout_strips_channel_suffix(tmp_path):
    img = np.zeros((4, 4, 4), np.float32)
    write_case(tmp_path, "la_003", img, img.astype(np.uint8), layout="msd")
    ds.write_image(img, ROTATED, tmp_path / "imagesTr" / "la_003_0001.nii.gz")  # second channel: ignored
    ds.write_image(img, ROTATED, tmp_path / "imagesTr" / "._la_003.nii.gz")  # macOS litter: ignored
    cases = ds.find_cases(tmp_path, require_labels=True)
    assert [(c.case_id, c.label.name) for c in cases] == [("la_003", "la_003.nii.gz")]


def test_empty_or_misnamed_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no cases found"):
        ds.find_cases(tmp_path, require_labels=False)
    (tmp_path / "case1").mkdir()
    ds.write_image(np.zeros((4, 4, 4)), ROTATED, tmp_path / "case1" / "image.nrrd")
    with pytest.raises(UserError, match="lgemri.nrrd"):
        ds.find_cases(tmp_path, require_labels=False)
    with pytest.raises(UserError, match="no such folder"):
        ds.find_cases(tmp_path / "nope", require_labels=False)


def test_missing_label_is_named(tmp_path):
    write_case(tmp_path, "c1", np.zeros((4, 4, 4), np.uint8), None)
    with pytest.raises(UserError, match="c1.*laendo.nrrd"):
        ds.find_cases(tmp_path, require_labels=True)


@pytest.mark.parametrize("problem", ["shape", "geometry", "values", "nan", "2d", "4d", "corrupt"])
def test_bad_case_files_are_user_errors(tmp_path, problem):
    img = np.zeros((4, 5, 6), np.float32)
    lab = np.zeros((4, 5, 6), np.uint8)
    props = ROTATED
    if problem == "shape":
        lab = np.zeros((4, 5, 7), np.uint8)
    if problem == "values":
        lab[0, 0, :3] = [1, 2, 3]
    if problem == "nan":
        img[1, 1, 1] = np.nan
    write_case(tmp_path, "c", img, lab, props)
    if problem == "geometry":
        ds.write_image(lab, {**props, "origin": (0.0, 0.0, 0.0)}, tmp_path / "c" / "laendo.nrrd")
    if problem == "2d":
        sitk.WriteImage(sitk.GetImageFromArray(np.zeros((5, 6), np.float32)), str(tmp_path / "c" / "lgemri.nrrd"))
    if problem == "4d":
        sitk.WriteImage(sitk.GetImageFromArray(np.zeros((2, 3, 4, 5), np.float32), isVector=False),
                        str(tmp_path / "c" / "lgemri.nrrd"))
    if problem == "corrupt":
        data = (tmp_path / "c" / "lgemri.nrrd").read_bytes()
        (tmp_path / "c" / "lgemri.nrrd").write_bytes(data[:40])
    expected = {"shape": "label shape", "geometry": "geometry", "values": "not a binary mask", "nan": "NaN",
                "2d": "2D image", "4d": "4D image", "corrupt": "cannot be read"}[problem]
    with pytest.raises(UserError, match=expected):
        ds.load_case(ds.find_cases(tmp_path, require_labels=True)[0])


def test_padding_rule_and_downscaling():
    assert ds.pad_multiple(ds.downscale_factors((0.5, 0.25, 0.25))) == (32, 64, 64)
    assert ds.round_up((88, 576, 640), (32, 64, 64)) == (96, 576, 640)
    a = np.ones((3, 5, 4), np.float32)
    p, before = ds.pad_symmetric(a, (6, 8, 4), value=-1)
    assert before == (1, 1, 0) and p.shape == (6, 8, 4)
    assert p[1:4, 1:6].min() == 1 and p[0].max() == -1 and p[4:].max() == -1
    x = np.arange(4 * 8 * 8, dtype=np.float32).reshape(4, 8, 8)
    assert np.allclose(ds.downscale(x, (2, 4, 4))[0, 0, 0], x[:2, :4, :4].mean())
    for bad in [(0.3, 0.25, 0.25), (0.0, 0.5, 0.5), (2.0, 1.0, 1.0)]:
        with pytest.raises(UserError, match="scale_factor"):
            ds.downscale_factors(bad)


def test_zscore_statistics_come_from_the_scan_only():
    image = np.array([0, 2, 4, 6], np.float32).reshape(1, 1, 4)
    z, fill = ds.zscore(image)
    assert abs(z.mean()) < 1e-6 and abs(z.std() - 1) < 1e-6
    assert abs(fill - (0 - 3) / np.std([0, 2, 4, 6])) < 1e-6  # what a zero-padded voxel becomes


def test_crop_and_paste_are_inverse_inside_and_outside_the_volume():
    rng = np.random.default_rng(0)
    vol = rng.random((10, 12, 14)).astype(np.float32)
    for start, size in [((2, 3, 4), (4, 6, 8)), ((-3, -2, 0), (16, 16, 16)), ((8, 10, 12), (4, 4, 4))]:
        patch = ds.crop(vol, start, size, fill=-7)
        back = ds.paste(patch, start, vol.shape)
        inside = ds.paste(np.ones(size, np.float32), start, vol.shape) > 0
        assert np.array_equal(back[inside], vol[inside]) and back[~inside].max(initial=0) == 0
        assert (patch == -7).sum() == np.prod(size) - inside.sum()


def test_crop_start_shifts_inside_and_centres_oversized_windows():
    assert ds.crop_start((1, 50, 60), (16, 32, 32), (40, 64, 64)) == (0, 32, 32)
    assert ds.crop_start((20, 32, 32), (48, 32, 32), (40, 64, 64)) == (-4, 16, 16)


def test_largest_component_connectivity_ties_and_dtype():
    mask = np.zeros((6, 6, 6), bool)
    mask[0:2, 0:2, 0:2] = True     # body, 8 voxels
    mask[2, 2, 2] = True           # touches it at a corner only
    mask[4:6, 4, 4] = True         # a separate 2-voxel island
    faces = ds.largest_component(mask, connectivity=1)
    assert faces.dtype == bool and faces.sum() == 8 and not faces[2, 2, 2]
    corners = ds.largest_component(mask, connectivity=3)
    assert corners.sum() == 9 and corners[2, 2, 2] and not corners[4:6, 4, 4].any()
    tie = np.zeros((4, 4, 4), np.uint8)
    tie[3, 0, 0] = tie[0, 3, 3] = 1            # equal sizes: the first in (z, y, x) order wins
    np.testing.assert_array_equal(np.argwhere(ds.largest_component(tie, connectivity=1)), [[0, 3, 3]])
    assert not ds.largest_component(np.zeros((2, 2, 2), np.uint8), connectivity=3).any()


def test_locate_scales_box_back_and_removes_padding():
    prob = np.zeros((8, 8, 8), np.float32)
    prob[2:4, 3:5, 1:2] = 0.9   # the atrium
    prob[7, 7, 7] = 0.9         # a stray voxel: not the largest component
    found = ds.locate(prob, (2, 4, 4), pad_before=(1, 2, 3), shape=(14, 28, 26))
    # low-res box [2, 4) x [3, 5) x [1, 2) -> full res [4, 8) x [12, 20) x [4, 8), minus padding
    assert found == ds.Location(centre=(5.0, 14.0, 3.0), extent=(4, 8, 4)) and found.found
    assert found.record() == {"centre": [5.0, 14.0, 3.0], "extent": [4, 8, 4], "found": True}
    assert found.larger_than((4, 8, 4)) is False and found.larger_than((4, 4, 16)) is True
    nothing = ds.locate(np.zeros((4, 4, 4)), (2, 4, 4), (0, 0, 0), shape=(7, 16, 16))
    assert not nothing.found and nothing.centre == (3.0, 7.5, 7.5) and not nothing.larger_than((1, 1, 1))


def test_patch_size_rule():
    assert ds.patch_size_for([(60, 110, 180), (50, 100, 100)], (30, 30, 30), (96, 640, 640)) == (96, 144, 224)
    assert ds.patch_size_for([(90, 110, 180)], (30, 30, 30), (96, 640, 640)) == (96, 144, 224)


def test_resample_keeps_physical_extent_and_labels_binary():
    lab = np.zeros((10, 20, 20), np.uint8)
    lab[3:7, 5:15, 5:15] = 1
    props = {**ROTATED, "spacing": (1.25, 1.25, 1.25)}
    out, out_props = ds.resample(lab, props, (0.625, 0.625, 0.625), label=True)
    assert out.shape == (20, 40, 40) and set(np.unique(out)) == {0, 1}
    assert out_props["origin"] == props["origin"] and out_props["spacing"] == (0.625, 0.625, 0.625)
    back = ds.resample_onto(out, out_props, lab.shape, props, label=True)
    assert np.array_equal(back, lab)


def test_read_image_info_reads_the_header_as_read_image_reads_the_file(tmp_path):
    a = np.arange(2 * 3 * 4, dtype=np.int16).reshape(2, 3, 4)
    ds.write_image(a, ROTATED, tmp_path / "x.nrrd")
    shape, props = ds.read_image_info(tmp_path / "x.nrrd")
    assert shape == (2, 3, 4) and props == ds.read_image(tmp_path / "x.nrrd")[1]
    four_d = sitk.GetImageFromArray(np.zeros((2, 3, 4, 5), np.float32), isVector=False)
    sitk.WriteImage(four_d, str(tmp_path / "4d.nrrd"))
    with pytest.raises(UserError, match="4d.nrrd: is a 4D image"):
        ds.read_image_info(tmp_path / "4d.nrrd")
    (tmp_path / "bad.nrrd").write_bytes((tmp_path / "x.nrrd").read_bytes()[:40])
    with pytest.raises(UserError, match="bad.nrrd: cannot be read"):
        ds.read_image_info(tmp_path / "bad.nrrd")


def test_binary_mask_is_the_one_check_of_every_mask():
    m = np.zeros((3, 4, 5), np.uint8)
    m[1, 1, 1:3] = 255
    assert ds.binary_mask(m, "m", (1, 255)).sum() == 2
    assert ds.binary_mask(m.astype(bool), "m").dtype == bool
    assert ds.binary_mask((m > 0).astype(np.float32), "m").sum() == 2
    for bad, shown in [(m, "255"), (m * 0 + 2, "2"), (np.where(m, 0.5, 0), "0.5"), (np.full(m.shape, np.nan), "nan")]:
        with pytest.raises(ValueError, match=f"m is not a binary mask \\(non-zero values {shown}\\)"):
            ds.binary_mask(bad, "m")
    mixed = m.copy()
    mixed[0, 0, 0] = 1  # 1 and 255 in one mask
    with pytest.raises(UserError, match="f.nrrd: label is not a binary mask .*values 1, 255.*0 and 1 or 0 and 255"):
        ds.read_mask(mixed, "f.nrrd")
    with pytest.raises(ValueError, match="dtype"):
        ds.binary_mask(np.zeros(3, "U1"), "m")


def test_bounding_box_and_its_centre():
    m = np.zeros((6, 7, 8), bool)
    m[1:3, 2, 4:8] = True
    box = ds.bounding_box(m)
    assert box == (slice(1, 3), slice(2, 3), slice(4, 8)) and ds.box_centre(box) == (2.0, 2.5, 6.0)
    assert ds.bounding_box(np.zeros((2, 2, 2))) is None


def test_resampled_shape_matches_resample():
    image = np.zeros((10, 21, 20), np.float32)
    props = {**ROTATED, "spacing": (1.25, 0.7, 0.5)}
    for spacing in [(0.625, 0.625, 0.625), (2.0, 1.0, 0.3)]:
        assert ds.resample(image, props, spacing, label=False)[0].shape == ds.resampled_shape(
            image.shape, props["spacing"], spacing)
    assert ds.resampled_shape((10, 20, 20), (1.25,) * 3, (0.625,) * 3) == (20, 40, 40)


def test_patch_sampler_counts_like_a_crop_and_keeps_background_under_the_limit():
    rng = np.random.default_rng(0)
    label = np.zeros((30, 50, 40), np.uint8)
    label[5:11, 30:38, 8:14] = 2  # 288 foreground voxels, one corner of the volume
    label[20, 10, 30] = 1
    sampler = ds.PatchSampler(label, (8, 16, 16), max_background=0.95, max_tries=1000)
    for _ in range(50):  # the summed-volume count equals counting the crop, inside and across the edges
        start = tuple(int(v) for v in rng.integers(-10, 40, 3))
        assert sampler.foreground_in(start) == int((ds.crop(label, start, (8, 16, 16)) > 0).sum())
    fractions = []
    for _ in range(200):
        patch = ds.crop(label, sampler(rng), (8, 16, 16))
        fractions.append(1 - (patch > 0).mean())
    assert max(fractions) <= 0.95  # every patch holds at least 5 % foreground (103 of 2048 voxels)
    # Unbiased patches of this size are mostly pure background; the sampler never returns one.
    plain = ds.PatchSampler(label, (8, 16, 16), max_background=1.0)
    assert np.mean([(ds.crop(label, plain(rng), (8, 16, 16)) > 0).any() for _ in range(200)]) < 0.5


def test_patch_sampler_falls_back_to_a_foreground_voxel_and_pads_small_volumes():
    rng = np.random.default_rng(1)
    label = np.zeros((20, 20, 20), np.uint8)
    label[3, 4, 5] = 1  # one voxel: no patch reaches 5 % foreground, so every draw falls back
    sampler = ds.PatchSampler(label, (8, 8, 8), max_background=0.95, max_tries=20)
    for _ in range(10):
        assert ds.crop(label, sampler(rng), (8, 8, 8)).sum() == 1
    small = ds.PatchSampler(np.ones((4, 30, 30), np.uint8), (8, 16, 16), max_background=0.5)
    start = small(rng)
    assert start[0] == -2 and ds.crop(np.ones((4, 30, 30)), start, (8, 16, 16)).sum() == 4 * 16 * 16
    with pytest.raises(ValueError, match="max_background"):
        ds.PatchSampler(label, (8, 8, 8), max_background=0.0)
