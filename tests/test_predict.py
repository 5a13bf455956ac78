"""predict.py over folders and single scans, with a trained model that finds the atrium: masks
on the atrium with each scan's own geometry (nrrd, NIfTI, DICOM series, another spacing, a
larger scan), a batch that survives a corrupt case, reruns that change nothing, probability
maps, overlays, flip test-time augmentation, the largest component, and the one-line error of
each bad input with nothing written."""
import csv
import os
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy import ndimage

import dataset as ds
import predict
from conftest import assert_one_line_error, run_main, run_script
from metrics import dice
from plots import LABEL_COLOUR, PNG_SIGNATURE


def model_args(run, locator=None, segmenter=None):
    return ["--locator_path", locator or run / "locator" / "best.pt",
            "--segmenter_path", segmenter or run / "segmenter" / "best.pt", "--device", "cpu"]


def predict_ok(*args):
    run = run_main(predict.main, *args)
    assert run.returncode == 0, run.stdout + run.stderr
    return run


@pytest.fixture(scope="module")
def scan(tiny_data):
    """The first tiny phantom: (image, label, props), rotated direction and non-zero origin."""
    image, label, props = ds.load_case(ds.find_cases(tiny_data, require_labels=True)[0])
    return image, label, props


def subset(tiny_data, dest, n):
    """A LASC-layout folder with the first `n` tiny phantoms."""
    for case in ds.find_cases(tiny_data, require_labels=True)[:n]:
        shutil.copytree(case.image.parent, dest / case.case_id)
    return dest


def assert_on_the_atrium(mask, label, least=0.3):
    """A mask that found the atrium: not empty, and overlapping it (the model scores 0.5-0.75)."""
    assert mask.any(), "empty mask"
    assert dice(mask > 0, label) > least, dice(mask > 0, label)


def test_folder_masks_find_the_atrium_with_each_scans_geometry(trained_run, tiny_data, tmp_path):
    out = tmp_path / "out"
    run = predict_ok("--data_dir", tiny_data, "--output_dir", out, *model_args(trained_run))
    cases = ds.find_cases(tiny_data, require_labels=True)
    shapes = set()
    for case in cases:
        image, label, props = ds.load_case(case)
        mask, mprops = ds.read_image(out / f"{case.case_id}.nrrd")
        assert mask.shape == image.shape and mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 1}
        assert_on_the_atrium(mask, label)
        # nrrd stores direction x spacing, so a re-read differs in the last bit (1e-16) at most
        assert ds.same_geometry(mprops, props, tol=1e-9)
        assert props["direction"] != (1, 0, 0, 0, 1, 0, 0, 0, 1) and any(props["origin"])
        shapes.add(image.shape)
    assert len(shapes) == 2  # two in-plane sizes in one dataset
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [r["case_id"] for r in rows] == [c.case_id for c in cases]
    assert all(float(r["dice"]) > 0.3 and r["locator_found"] == "1" and r["larger_than_patch"] == "0" for r in rows)
    assert "dice" in run.stdout and "+-" in run.stdout


def test_never_overwrites_without_the_flag(trained_run, scan, tiny_data, tmp_path):
    src = ds.find_cases(tiny_data, require_labels=True)[0].image
    out = tmp_path / "mask.nrrd"
    predict_ok("--input", src, "--output", out, "--label_value", "255", *model_args(trained_run))
    mask = ds.read_image(out)[0]
    assert set(np.unique(mask)) == {0, 255}
    assert_on_the_atrium(mask, scan[1])
    before = out.read_bytes()
    out.write_bytes(b"precious")
    assert_one_line_error(run_main(predict.main, "--input", src, "--output", out, *model_args(trained_run)),
                          "--output", "--overwrite")
    assert out.read_bytes() == b"precious"
    predict_ok("--input", src, "--output", out, "--label_value", "255", "--overwrite", *model_args(trained_run))
    assert out.read_bytes() == before


def test_other_spacing_and_larger_scan_get_masks_on_their_own_grid(trained_run, scan, tmp_path):
    image, label, props = scan
    coarse, coarse_props = ds.resample(image, props, tuple(2 * s for s in props["spacing"]), label=False)
    coarse_label, _ = ds.resample(label, props, coarse_props["spacing"], label=True)
    # larger in-plane than any training scan (the tiny test model's locator knows only 32 slices)
    big, big_label = (np.pad(a, ((0, 0), (8, 8), (8, 8))) for a in (image, label))
    ds.write_image(coarse, coarse_props, tmp_path / "coarse.nrrd")
    ds.write_image(big, props, tmp_path / "big.nii.gz")
    predict_ok("--input", tmp_path / "coarse.nrrd", tmp_path / "big.nii.gz", "--output_dir", tmp_path / "out",
               *model_args(trained_run))
    for name, arr, lab, pr in [("coarse", coarse, coarse_label, coarse_props), ("big", big, big_label, props)]:
        mask, mprops = ds.read_image(tmp_path / "out" / f"{name}.nrrd")
        assert mask.shape == arr.shape and ds.same_geometry(mprops, pr)
        assert_on_the_atrium(mask, lab)


def test_batch_with_a_corrupt_case_writes_the_others_and_exits_non_zero(trained_run, tiny_data, tmp_path):
    data = subset(tiny_data, tmp_path / "data", 3)
    bad = sorted(p.name for p in data.iterdir())[1]
    (data / bad / "lgemri.nrrd").write_bytes(b"NRRD0004\ntype: float\ngarbage")
    out = tmp_path / "out"
    run = run_main(predict.main, "--data_dir", data, "--output_dir", out, *model_args(trained_run))
    assert run.returncode == 1
    good = sorted(p.name for p in data.iterdir() if p.name != bad)
    assert sorted(p.name for p in out.glob("*.nrrd")) == [f"{c}.nrrd" for c in good]
    assert f"1 case(s) failed:\n  {bad}: " in run.stderr and "cannot be read" in run.stderr
    assert [r.split(",")[0] for r in (out / "metrics.csv").read_text().splitlines()[1:]] == good


def test_rerun_without_overwrite_changes_nothing(trained_run, tiny_data, tmp_path):
    data = subset(tiny_data, tmp_path / "data", 2)
    out = tmp_path / "out"
    flags = ["--data_dir", data, "--output_dir", out, "--save_probabilities", "--overlays", *model_args(trained_run)]
    predict_ok(*flags)
    files = sorted(out.iterdir())
    assert [p.name for p in files] == ["case_000.nrrd", "case_000_overlay.png", "case_000_prob.nrrd",
                                       "case_001.nrrd", "case_001_overlay.png", "case_001_prob.nrrd", "metrics.csv"]
    for i, p in enumerate(files):  # distinct old mtimes: any rewrite would show
        os.utime(p, ns=(1_000_000_000 * (1000 + i),) * 2)
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in files}
    assert "wrote 0 mask(s)" in predict_ok(*flags).stdout
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(out.iterdir())} == before
    # a missing extra is made again without touching the kept mask
    (out / "case_001_overlay.png").unlink()
    predict_ok(*flags)
    assert (out / "case_001_overlay.png").read_bytes() == before["case_001_overlay.png"][0]
    assert (out / "case_001.nrrd").stat().st_mtime_ns == before["case_001.nrrd"][1]


def test_probabilities_are_float32_on_the_scans_grid_and_threshold_to_the_mask(trained_run, tiny_data, scan,
                                                                               tmp_path):
    image, label, props = scan
    out = tmp_path / "out"
    src = ds.find_cases(tiny_data, require_labels=True)[0].image
    predict_ok("--input", src, "--output_dir", out, "--save_probabilities", "--output_format", "mha",
               *model_args(trained_run))
    prob, pprops = ds.read_image(out / "lgemri_prob.mha")
    mask, mprops = ds.read_image(out / "lgemri.mha")
    assert prob.dtype == np.float32 and prob.shape == image.shape and 0 <= prob.min() and prob.max() <= 1
    assert ds.same_geometry(pprops, props, tol=1e-9) and ds.same_geometry(mprops, props, tol=1e-9)
    np.testing.assert_array_equal(mask, (prob >= 0.5).astype(np.uint8))
    assert prob[label > 0].mean() > 0.5 > prob[label == 0].mean()


@pytest.mark.parametrize("fmt", ["nii.gz", "nrrd"])
def test_nifti_input_geometry_survives(trained_run, scan, tmp_path, fmt):
    image, label, props = scan
    src = tmp_path / "scan.nii.gz"
    ds.write_image(image, props, src)
    _, nprops = ds.read_image(src)
    predict_ok("--input", src, "--output_dir", tmp_path / "out", "--output_format", fmt, *model_args(trained_run))
    mask, mprops = ds.read_image(tmp_path / "out" / f"scan.{fmt}")
    assert mask.shape == image.shape and ds.same_geometry(mprops, nprops)
    assert ds.same_geometry(mprops, props)  # and NIfTI kept the phantom's rotation and origin
    assert_on_the_atrium(mask, label)


def write_dicom_series(array, props, folder):
    """Write `array (D, H, W)` as one int16 DICOM series, a file per axial slice, with the
    geometry of `props` in the slices' position, orientation and pixel-spacing tags."""
    folder.mkdir(parents=True)
    volume = ds.to_sitk(array.astype(np.int16), props)
    d = props["direction"]
    uid = "1.2.826.0.1.3680043.2.1125.4242"
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(array.shape[0]):
        sl = volume[:, :, k]
        position = volume.TransformIndexToPhysicalPoint((0, 0, k))
        tags = {"0008|0060": "MR", "0020|000d": f"{uid}.1", "0020|000e": f"{uid}.2", "0008|0018": f"{uid}.3.{k}",
                "0020|0013": str(k + 1), "0018|0050": f"{props['spacing'][0]:.6f}",
                "0020|0037": "\\".join(f"{v:.8f}" for v in (d[0], d[3], d[6], d[1], d[4], d[7])),
                "0020|0032": "\\".join(f"{v:.6f}" for v in position),
                "0028|0030": f"{props['spacing'][1]:.6f}\\{props['spacing'][2]:.6f}"}
        for tag, value in tags.items():
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice_{k:03d}.dcm"))
        writer.Execute(sl)


def test_dicom_series_folder_geometry_survives(trained_run, scan, tmp_path):
    image, label, props = scan
    rotation = sitk.VersorTransform((0.2, -0.4, 0.9), 0.35).GetMatrix()
    geometry = {"spacing": props["spacing"], "origin": (-41.5, 17.25, 102.0), "direction": rotation}
    series = tmp_path / "patient 7"
    write_dicom_series(image, geometry, series)
    read, rprops = ds.read_image(series)
    np.testing.assert_array_equal(read, image.astype(np.int16))
    assert ds.same_geometry(rprops, geometry, tol=1e-5)
    predict_ok("--input", series, "--output_dir", tmp_path / "out", *model_args(trained_run))
    mask, mprops = ds.read_image(tmp_path / "out" / "patient 7.nrrd")  # case id: the folder's name
    assert mask.shape == image.shape and ds.same_geometry(mprops, rprops, tol=1e-9)
    assert_on_the_atrium(mask, label)


def test_a_coarser_labelled_scan_is_scored_on_its_own_grid(trained_run, scan, tmp_path):
    assert torch.load(trained_run / "segmenter" / "best.pt", weights_only=True)["config"]["spacing"] == [0.625] * 3
    image, label, props = scan
    coarse, cprops = ds.resample(image, props, (1.25, 1.25, 1.25), label=False)
    coarse_label, _ = ds.resample(label, props, (1.25, 1.25, 1.25), label=True)
    ds.write_image(coarse, cprops, tmp_path / "c" / "coarse" / "lgemri.nrrd")
    ds.write_image(coarse_label, cprops, tmp_path / "c" / "coarse" / "laendo.nrrd")
    out = tmp_path / "out"
    predict_ok("--data_dir", tmp_path / "c", "--output_dir", out, "--save_probabilities", *model_args(trained_run))
    for name in ("coarse.nrrd", "coarse_prob.nrrd"):
        arr, mprops = ds.read_image(out / name)
        assert arr.shape == coarse.shape == (16, 32, 32) and mprops["spacing"] == (1.25, 1.25, 1.25)
        assert ds.same_geometry(mprops, cprops)
    (row,) = csv.DictReader(open(out / "metrics.csv"))  # scored against the coarse label, on its grid
    assert float(row["dice"]) == pytest.approx(dice(ds.read_image(out / "coarse.nrrd")[0] > 0, coarse_label))
    assert float(row["dice"]) > 0.3


def test_overlay_png_shows_three_views_with_the_label_contour(trained_run, tiny_data, tmp_path):
    import matplotlib.image
    data = subset(tiny_data, tmp_path / "data", 1)
    predict_ok("--data_dir", data, "--output_dir", tmp_path / "out", "--overlays", *model_args(trained_run))
    png = tmp_path / "out" / "case_000_overlay.png"
    assert png.read_bytes()[:8] == PNG_SIGNATURE and png.stat().st_size > 10_000
    rgb = matplotlib.image.imread(png)[..., :3]
    assert rgb.shape[1] > 2 * rgb.shape[0]  # three panels side by side
    colour = np.array([int(LABEL_COLOUR[i:i + 2], 16) for i in (1, 3, 5)]) / 255
    assert (np.abs(rgb - colour).max(axis=-1) < 0.02).sum() > 50  # the label's contour is drawn


def symmetrised(path, dest):
    """A copy of a checkpoint whose convolution kernels are mirror-symmetric in W, so that the
    model commutes with a W flip (the V-Net has no other W-asymmetric operation)."""
    ckpt = torch.load(path, weights_only=True)
    ckpt["model"] = {k: (v + v.flip(-1)) / 2 if v.ndim == 5 else v for k, v in ckpt["model"].items()}
    torch.save(ckpt, dest)
    return dest


def test_tta_with_a_flip_equivariant_model_changes_nothing(trained_run, tiny_data, tmp_path):
    loc = symmetrised(trained_run / "locator" / "best.pt", tmp_path / "loc.pt")
    seg = symmetrised(trained_run / "segmenter" / "best.pt", tmp_path / "seg.pt")
    src = ds.find_cases(tiny_data, require_labels=True)[1].image
    probs = {}
    for name, models, extra in [("plain", (loc, seg), []), ("tta", (loc, seg), ["--tta"]),
                                ("asymmetric_tta", (None, None), ["--tta"]), ("asymmetric", (None, None), [])]:
        out = tmp_path / name
        predict_ok("--input", src, "--output_dir", out, "--save_probabilities", *extra,
                   *model_args(trained_run, *models))
        probs[name] = (ds.read_image(out / "lgemri_prob.nrrd")[0], (out / "lgemri.nrrd").read_bytes())
    np.testing.assert_allclose(probs["tta"][0], probs["plain"][0], atol=1e-5)
    assert probs["tta"][1] == probs["plain"][1]
    # the check has teeth: the trained (asymmetric) model's probabilities do change with TTA
    assert np.abs(probs["asymmetric_tta"][0] - probs["asymmetric"][0]).max() > 1e-3


def test_largest_component_flag_keeps_one_component_of_the_mask(trained_run, scan, tiny_data, tmp_path):
    src = ds.find_cases(tiny_data, require_labels=True)[0].image
    predict_ok("--input", src, "--output_dir", tmp_path, "--largest_component", "--save_probabilities",
               *model_args(trained_run))
    mask = ds.read_image(tmp_path / "lgemri.nrrd")[0]
    prob = ds.read_image(tmp_path / "lgemri_prob.nrrd")[0]
    assert_on_the_atrium(mask, scan[1])
    assert ndimage.label(mask, structure=np.ones((3, 3, 3)))[1] == 1
    assert not (mask & (prob < 0.5)).any()  # only removes voxels, never adds
    full = (prob >= 0.5).astype(np.uint8)
    np.testing.assert_array_equal(mask, ds.largest_component(full, connectivity=3))


def test_one_line_errors_name_the_bad_input(trained_run, scan, tmp_path):
    image, _, props = scan
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no slices here")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "a.dcm").write_bytes(b"not a dicom file")
    (tmp_path / "broken" / "b.dcm").write_bytes(b"nor this")
    two = tmp_path / "two_series"
    write_dicom_series(image[:4], props, two)
    write_dicom_series(image[4:8], props, tmp_path / "other")
    for f in (tmp_path / "other").iterdir():  # same folder, another series UID
        data = f.read_bytes().replace(b"1.2.826.0.1.3680043.2.1125.4242.2", b"1.2.826.0.1.3680043.2.1125.4242.9")
        (two / f"x_{f.name}").write_bytes(data)
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    src = tmp_path / "scan.nrrd"
    ds.write_image(image, props, src)
    cases = [(["--input", tmp_path / "empty"], ["--input", "empty", ".dcm"]),
             (["--input", tmp_path / "broken"], ["broken", "DICOM"]),
             (["--input", two], ["two_series", "2 DICOM series"]),
             (["--input", tmp_path / "missing.nii.gz"], ["--input", "missing.nii.gz", "no such file"]),
             (["--input", tmp_path / "notes.txt"], ["--input", "notes.txt", "unknown image format"]),
             (["--input", src, src], ["--input", "scan", "twice"]),
             (["--input", src, "--output_dir", a_file], ["--output_dir", "a_file"]),
             (["--input", src, src, "--output", tmp_path / "m.nrrd"], ["--output", "single --input"]),
             ([], ["--data_dir", "--input"]),
             (["--input", src, "--tta", "--largest_component", "--overlays", "--save_probabilities",
               "--output_format", "png"], ["--output_format", "png"])]
    for args, fragments in cases:
        assert_one_line_error(run_main(predict.main, "--output_dir", tmp_path / "out", *args,
                                       *model_args(trained_run)), *fragments)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["empty", "broken", "two_series", "other", "a_file", "scan.nrrd"])  # nothing written


def test_bad_checkpoints_are_refused_naming_the_file(trained_run, tiny_data, tmp_path):
    scan = ds.find_cases(tiny_data, require_labels=True)[0].image
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    plain = tmp_path / "plain.pt"
    torch.save({"conv.weight": torch.zeros(3)}, plain)
    edited = tmp_path / "edited.pt"
    ckpt = torch.load(trained_run / "segmenter" / "best.pt", weights_only=True)
    ckpt["config"]["arch"]["base_channels"] = 3
    torch.save(ckpt, edited)
    seg = trained_run / "segmenter" / "best.pt"
    loc = trained_run / "locator" / "best.pt"
    for locator, segmenter, fragments in [(junk, seg, ["--locator_path", "junk.pt"]),
                                          (plain, seg, ["--locator_path", "plain.pt"]),
                                          (seg, seg, ["--locator_path", "segmenter"]),
                                          (loc, edited, ["edited.pt", "architecture"]),
                                          (loc, tmp_path / "none.pt", ["--segmenter_path", "none.pt"])]:
        out = tmp_path / "out"
        run = run_main(predict.main, "--input", scan, "--output_dir", out, "--locator_path", locator,
                       "--segmenter_path", segmenter, "--device", "cpu")
        assert_one_line_error(run, *fragments)
        assert not out.exists()


class Exploit:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_script_refuses_pickled_code_in_a_checkpoint_and_never_runs_it(trained_run, tiny_data, tmp_path):
    """From the shell, as a user runs it: a crafted checkpoint is one line and exit status 2."""
    bad = tmp_path / "evil.pt"
    torch.save({"format": "la-seg-v1", "model": {}, "config": {"role": "segmenter"}, "x": Exploit()}, bad)
    proc = run_script("predict.py", "--data_dir", tiny_data, "--output_dir", tmp_path / "out", "--device", "cpu",
                      "--locator_path", trained_run / "locator" / "best.pt", "--segmenter_path", bad, cwd=tmp_path)
    assert_one_line_error(proc, "--segmenter_path", "evil.pt")
    assert proc.returncode == 2
    assert not (tmp_path / "PWNED").exists() and not (tmp_path / "out").exists()
