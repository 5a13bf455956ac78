"""predict.py over folders and single scans: a batch that survives a corrupt case, reruns that
change nothing, geometry of NIfTI and DICOM-series inputs, another spacing than the model's,
probability maps, overlays, flip test-time augmentation, the largest component, and the
one-line error of each bad input. Successful runs are in-process (fast), errors through the
script (exit status and stderr as a user sees them)."""
import os
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import dataset as ds
import predict
from conftest import assert_one_line_error, run_script

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def model_args(run, locator=None, segmenter=None):
    return ["--locator_path", locator or run / "locator" / "best.pt",
            "--segmenter_path", segmenter or run / "segmenter" / "best.pt", "--device", "cpu"]


def run_predict(*args):
    """predict.main in this process; returns its exit status (0 when it returns)."""
    try:
        predict.main([str(a) for a in args])
    except SystemExit as e:
        return e.code
    return 0


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


def symmetrised(path, dest):
    """A copy of a checkpoint whose convolution kernels are mirror-symmetric in W, so that the
    model commutes with a W flip (the V-Net has no other W-asymmetric operation)."""
    ckpt = torch.load(path, weights_only=True)
    ckpt["model"] = {k: (v + v.flip(-1)) / 2 if v.ndim == 5 else v for k, v in ckpt["model"].items()}
    torch.save(ckpt, dest)
    return dest


def test_batch_with_a_corrupt_case_writes_the_others_and_exits_non_zero(tiny_run, tiny_data, tmp_path, capsys):
    data = subset(tiny_data, tmp_path / "data", 3)
    bad = sorted(p.name for p in data.iterdir())[1]
    (data / bad / "lgemri.nrrd").write_bytes(b"NRRD0004\ntype: float\ngarbage")
    out = tmp_path / "out"
    assert run_predict("--data_dir", data, "--output_dir", out, *model_args(tiny_run)) == 1
    err = capsys.readouterr().err
    good = sorted(p.name for p in data.iterdir() if p.name != bad)
    assert sorted(p.name for p in out.glob("*.nrrd")) == [f"{c}.nrrd" for c in good]
    assert f"1 case(s) failed:\n  {bad}: " in err and "cannot be read" in err
    assert [r.split(",")[0] for r in (out / "metrics.csv").read_text().splitlines()[1:]] == good


def test_rerun_without_overwrite_changes_nothing(tiny_run, tiny_data, tmp_path, capsys):
    data = subset(tiny_data, tmp_path / "data", 2)
    out = tmp_path / "out"
    flags = ["--data_dir", data, "--output_dir", out, "--save_probabilities", "--overlays", *model_args(tiny_run)]
    assert run_predict(*flags) == 0
    files = sorted(out.iterdir())
    assert [p.name for p in files] == ["case_000.nrrd", "case_000_overlay.png", "case_000_prob.nrrd",
                                       "case_001.nrrd", "case_001_overlay.png", "case_001_prob.nrrd", "metrics.csv"]
    for i, p in enumerate(files):  # distinct old mtimes: any rewrite would show
        os.utime(p, ns=(1_000_000_000 * (1000 + i),) * 2)
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in files}
    capsys.readouterr()
    assert run_predict(*flags) == 0
    assert "wrote 0 mask(s)" in capsys.readouterr().out
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(out.iterdir())} == before
    # a missing extra is made again without touching the kept mask
    (out / "case_001_overlay.png").unlink()
    assert run_predict(*flags) == 0
    assert (out / "case_001_overlay.png").read_bytes() == before["case_001_overlay.png"][0]
    assert (out / "case_001.nrrd").stat().st_mtime_ns == before["case_001.nrrd"][1]


def test_probabilities_are_float32_on_the_scans_grid_and_threshold_to_the_mask(tiny_run, tiny_data, scan, tmp_path):
    image, _, props = scan
    out = tmp_path / "out"
    src = ds.find_cases(tiny_data, require_labels=True)[0].image
    assert run_predict("--input", src, "--output_dir", out, "--save_probabilities", "--output_format", "mha",
                       *model_args(tiny_run)) == 0
    prob, pprops = ds.read_image(out / "lgemri_prob.mha")
    mask, mprops = ds.read_image(out / "lgemri.mha")
    assert prob.dtype == np.float32 and prob.shape == image.shape and 0 <= prob.min() and prob.max() <= 1
    assert ds.same_geometry(pprops, props, tol=1e-9) and ds.same_geometry(mprops, props, tol=1e-9)
    np.testing.assert_array_equal(mask, (prob >= 0.5).astype(np.uint8))


@pytest.mark.parametrize("fmt", ["nii.gz", "nrrd"])
def test_nifti_input_geometry_survives(tiny_run, scan, tmp_path, fmt):
    image, _, props = scan
    src = tmp_path / "scan.nii.gz"
    ds.write_image(image, props, src)
    _, nprops = ds.read_image(src)
    assert run_predict("--input", src, "--output_dir", tmp_path / "out", "--output_format", fmt,
                       *model_args(tiny_run)) == 0
    mask, mprops = ds.read_image(tmp_path / "out" / f"scan.{fmt}")
    assert mask.shape == image.shape and ds.same_geometry(mprops, nprops)
    assert ds.same_geometry(mprops, props)  # and NIfTI kept the phantom's rotation and origin


def test_dicom_series_folder_geometry_survives(tiny_run, scan, tmp_path):
    image, _, props = scan
    rotation = sitk.VersorTransform((0.2, -0.4, 0.9), 0.35).GetMatrix()
    geometry = {"spacing": props["spacing"], "origin": (-41.5, 17.25, 102.0), "direction": rotation}
    series = tmp_path / "patient 7"
    write_dicom_series(image, geometry, series)
    read, rprops = ds.read_image(series)
    np.testing.assert_array_equal(read, image.astype(np.int16))
    assert ds.same_geometry(rprops, geometry, tol=1e-5)
    assert run_predict("--input", series, "--output_dir", tmp_path / "out", *model_args(tiny_run)) == 0
    mask, mprops = ds.read_image(tmp_path / "out" / "patient 7.nrrd")  # case id: the folder's name
    assert mask.shape == image.shape and ds.same_geometry(mprops, rprops, tol=1e-9)


def test_a_coarser_scan_gets_a_mask_on_its_own_grid(tiny_run, tiny_data, tmp_path):
    assert torch.load(tiny_run / "segmenter" / "best.pt", weights_only=True)["config"]["spacing"] == [0.625] * 3
    case = ds.find_cases(tiny_data, require_labels=True)[0]
    image, label, props = ds.load_case(case)
    coarse, cprops = ds.resample(image, props, (1.25, 1.25, 1.25), label=False)
    coarse_label, _ = ds.resample(label, props, (1.25, 1.25, 1.25), label=True)
    (tmp_path / "c" / "coarse").mkdir(parents=True)
    ds.write_image(coarse, cprops, tmp_path / "c" / "coarse" / "lgemri.nrrd")
    ds.write_image(coarse_label, cprops, tmp_path / "c" / "coarse" / "laendo.nrrd")
    out = tmp_path / "out"
    assert run_predict("--data_dir", tmp_path / "c", "--output_dir", out, "--save_probabilities",
                       *model_args(tiny_run)) == 0
    for name in ("coarse.nrrd", "coarse_prob.nrrd"):
        arr, mprops = ds.read_image(out / name)
        assert arr.shape == coarse.shape == (16, 32, 32) and mprops["spacing"] == (1.25, 1.25, 1.25)
        assert ds.same_geometry(mprops, cprops)
    assert (out / "metrics.csv").is_file()  # scored against the coarse label, on the same grid


def test_overlay_png_shows_three_views_with_the_label_contour(tiny_run, tiny_data, tmp_path):
    import matplotlib.image
    data = subset(tiny_data, tmp_path / "data", 1)
    assert run_predict("--data_dir", data, "--output_dir", tmp_path / "out", "--overlays",
                       *model_args(tiny_run)) == 0
    png = tmp_path / "out" / "case_000_overlay.png"
    assert png.read_bytes()[:8] == PNG_SIGNATURE and png.stat().st_size > 10_000
    rgb = matplotlib.image.imread(png)[..., :3]
    assert rgb.shape[1] > 2 * rgb.shape[0]  # three panels side by side
    label_colour = np.array([0x00, 0xC8, 0xFF]) / 255
    assert (np.abs(rgb - label_colour).max(axis=-1) < 0.02).sum() > 50  # the label's contour is drawn


def test_overlay_draws_the_prediction_contour(scan, tmp_path):
    image, label, props = scan
    mask = np.roll(label, 2, axis=2)
    path = tmp_path / "o.png"
    predict.write_overlay(path, image, mask, None, props["spacing"], "x")
    import matplotlib.image
    rgb = matplotlib.image.imread(path)[..., :3]
    pred_colour = np.array([0xFF, 0xB0, 0x00]) / 255
    assert (np.abs(rgb - pred_colour).max(axis=-1) < 0.02).sum() > 50
    assert not list(tmp_path.glob(".*"))  # the temporary file was renamed


def test_tta_with_a_flip_equivariant_model_changes_nothing(tiny_run, tiny_data, tmp_path):
    loc = symmetrised(tiny_run / "locator" / "best.pt", tmp_path / "loc.pt")
    seg = symmetrised(tiny_run / "segmenter" / "best.pt", tmp_path / "seg.pt")
    src = ds.find_cases(tiny_data, require_labels=True)[1].image
    probs = {}
    for name, models, extra in [("plain", (loc, seg), []), ("tta", (loc, seg), ["--tta"]),
                                ("asymmetric_tta", (None, None), ["--tta"]), ("asymmetric", (None, None), [])]:
        out = tmp_path / name
        assert run_predict("--input", src, "--output_dir", out, "--save_probabilities", *extra,
                           *model_args(tiny_run, *models)) == 0
        probs[name] = (ds.read_image(out / "lgemri_prob.nrrd")[0], (out / "lgemri.nrrd").read_bytes())
    np.testing.assert_allclose(probs["tta"][0], probs["plain"][0], atol=1e-5)
    assert probs["tta"][1] == probs["plain"][1]
    # the check has teeth: the trained (asymmetric) model's probabilities do change with TTA
    assert np.abs(probs["asymmetric_tta"][0] - probs["asymmetric"][0]).max() > 1e-3


def test_infer_tta_is_the_mean_over_the_w_flip():
    torch.manual_seed(0)
    model = torch.nn.Conv3d(1, 1, 3, padding=1).eval()
    x = np.random.default_rng(0).standard_normal((4, 6, 8)).astype(np.float32)
    cpu = torch.device("cpu")
    expected = (predict.infer(model, x, cpu) + predict.infer(model, x[..., ::-1], cpu)[..., ::-1]) / 2
    np.testing.assert_allclose(predict.infer(model, x, cpu, tta=True), expected, atol=1e-6)


def test_largest_component_uses_26_connectivity():
    mask = np.zeros((6, 8, 8), np.uint8)
    mask[1:4, 1:4, 1:4] = 1       # the body, 27 voxels
    mask[4, 4, 4] = 1             # touches the body at a corner only: kept
    mask[1, 6:8, 6:8] = 1         # a separate 4-voxel island: dropped
    out = predict.largest_component(mask)
    expected = mask.copy()
    expected[1, 6:8, 6:8] = 0
    np.testing.assert_array_equal(out, expected)
    assert out.dtype == np.uint8
    assert not predict.largest_component(np.zeros((3, 3, 3), np.uint8)).any()


def test_largest_component_flag_leaves_one_component(tiny_run, tiny_data, tmp_path):
    from scipy import ndimage
    src = ds.find_cases(tiny_data, require_labels=True)[0].image
    assert run_predict("--input", src, "--output_dir", tmp_path, "--largest_component", "--save_probabilities",
                       *model_args(tiny_run)) == 0
    mask = ds.read_image(tmp_path / "lgemri.nrrd")[0]
    prob = ds.read_image(tmp_path / "lgemri_prob.nrrd")[0]
    assert ndimage.label(mask, structure=np.ones((3, 3, 3)))[1] <= 1
    assert not (mask & (prob < 0.5)).any()  # only removes voxels, never adds


def test_one_line_errors_name_the_bad_input(tiny_run, scan, tmp_path):
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
             (["--input", src, src], ["--input", "scan", "twice"]),
             (["--input", src, "--output_dir", a_file], ["--output_dir", "a_file"]),
             (["--input", src, "--tta", "--largest_component", "--overlays", "--save_probabilities",
               "--output_format", "png"], ["--output_format", "png"])]
    for args, fragments in cases:
        proc = run_script("predict.py", "--output_dir", tmp_path / "out", *args, *model_args(tiny_run))
        assert_one_line_error(proc, *fragments)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["empty", "broken", "two_series", "other", "a_file", "scan.nrrd"])  # nothing written
