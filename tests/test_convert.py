"""Tests of the DICOM and contour conversion (conversion.py) and its command line (convert.py): a
synthetic oblique cine folder written with pydicom (a repeat acquisition, a missing phase,
files with and without .dcm, non-DICOM litter) into the expected 4D image and report; pydicom's
real 5-slice CT series against SimpleITK's series reader and pydicom's own pixel values;
contour masks against the area and the lattice points of a disc and against scikit-image; and
the one-line error, with nothing written, for each bad input."""
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid
from skimage.draw import polygon2mask

import conversion
import convert
import dataset
from conftest import assert_one_line_error, run_main
from utils import UserError

CT5N = Path(pydicom.__file__).parent / "data" / "test_files" / "dicomdirtests" / "98892001" / "CT5N"
STUDY = "1.2.826.0.1.3680043.9.7777.1"
SHAPE = (16, 20)  # (Rows, Columns): not square, so a transposed grid shows
PIXEL_SPACING = (1.5, 1.25)  # DICOM order: row spacing (y), column spacing (x)
SLICE_MM = 8.0
PHASE_MS = np.array([0.0, 40.0, 80.0, 130.0, 180.0])  # uneven, so the nearest phase to 80 ms is 40 ms
ORIGIN = np.array([-40.5, 12.25, 30.0])


def _rotation(degrees_z: float, degrees_x: float) -> np.ndarray:
    a, b = np.radians(degrees_z), np.radians(degrees_x)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return rz @ rx


# Oblique: row and column cosines are neither axes nor in an axis plane. Rounded as DICOM stores them.
OBLIQUE = tuple(round(float(v), 10) for v in np.concatenate([_rotation(30, -20)[:, 0], _rotation(30, -20)[:, 1]]))
IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def write_dicom(path: Path, pixels: np.ndarray, position, *, orientation=OBLIQUE, trigger=None, series=1,
                instance=1, study=STUDY, acquisition_time="120000", pixel_spacing=PIXEL_SPACING, rescale=None) -> Path:
    """One uncompressed MR image file as a scanner writes it (explicit VR little endian)."""
    uid = generate_uid(entropy_srcs=[str(path)])
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, f"{study}.{series}"
    ds.SeriesNumber, ds.InstanceNumber, ds.AcquisitionTime = series, instance, acquisition_time
    ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
    ds.ImageOrientationPatient = [f"{v:.10f}" for v in orientation]
    ds.PixelSpacing = [str(s) for s in pixel_spacing]
    ds.SliceThickness = "6.0"
    if trigger is not None:
        ds.TriggerTime = f"{trigger:.2f}"
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = (str(v) for v in rescale)
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = pixels.astype("<u2").tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def frame(d: int, t: int, offset: int = 0) -> np.ndarray:
    """Pixel values unique to slice d and phase t, and to each pixel (row-major ramp)."""
    return np.arange(SHAPE[0] * SHAPE[1]).reshape(SHAPE) + 400 * (d * len(PHASE_MS) + t) + 1 + offset


def position(d: int, orientation=OBLIQUE, spacing=SLICE_MM) -> np.ndarray:
    return np.round(ORIGIN + d * spacing * np.cross(orientation[:3], orientation[3:]), 6)


def write_cine_folder(folder: Path) -> Path:
    """4 slice positions x 5 phases, oblique; slice 1 lacks phase 2 (80 ms); slice 2 is acquired
    again later as series 2 (its pixel values + 30000); slice 3's files have no .dcm suffix; a
    text file and an image-less DICOM file lie beside them. Files are named against position order."""
    instance = 0
    for d in reversed(range(4)):
        for t, ms in enumerate(PHASE_MS):
            if (d, t) == (1, 2):
                continue
            instance += 1
            name = f"IM-0001-{instance:04d}" + ("" if d == 3 else ".dcm")
            write_dicom(folder / name, frame(d, t), position(d), trigger=ms + 0.5 * d, instance=instance)
    for t, ms in enumerate(PHASE_MS):
        write_dicom(folder / "repeat" / f"IM-0002-{t + 1:04d}.dcm", frame(2, t, offset=30000), position(2),
                    trigger=ms + 1.0, series=2, instance=t + 1, acquisition_time="121500")
    (folder / "notes.txt").write_text("short-axis cine, breath-hold\n")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.1.3.10"  # Media Storage Directory: no image
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=["dicomdir"])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    directory = Dataset()
    directory.file_meta = meta
    directory.FileSetID = "CINE"
    directory.save_as(folder / "DICOMDIR", enforce_file_format=True)
    return folder


# ----------------------------------------------------------------------------- cine

def test_cine_folder_gives_expected_4d_image_geometry_and_report(tmp_path):
    folder = write_cine_folder(tmp_path / "dicom")
    cine = conversion.cine_volume(folder)
    assert cine.array.shape == (5, 4, *SHAPE) and cine.array.dtype == np.float32
    for d in range(4):
        for t in range(5):
            expected = frame(2, t, offset=30000) if d == 2 else frame(1, 1) if (d, t) == (1, 2) else frame(d, t)
            np.testing.assert_array_equal(cine.array[t, d], expected, err_msg=f"slice {d}, phase {t}")
    r, c = np.array(OBLIQUE[:3]), np.array(OBLIQUE[3:])
    n = np.cross(r, c)
    np.testing.assert_allclose(cine.props["spacing"], (SLICE_MM, *PIXEL_SPACING), atol=1e-5)
    np.testing.assert_allclose(cine.props["origin"], position(0), atol=1e-6)
    np.testing.assert_allclose(np.reshape(cine.props["direction"], (3, 3)), np.stack([r, c, n], axis=1), atol=1e-6)
    # Reference trigger times are PHASE_MS + 1 ms (the median jitter of the full slices): steps 40, 40, 50, 50.
    assert cine.phase_step == pytest.approx(45.0)
    report = "\n".join(cine.report)
    assert "kept the later (series 2" in report
    assert all(f"IM-0001-{i:04d}.dcm" in report for i in range(6, 11))  # slice 2's first acquisition, dropped
    assert "t = 2" in report and "filled with its phase at 40.5 ms from IM-0001-0012.dcm" in report
    assert "DICOMDIR" in report and "notes.txt" in report


def test_cine_cli_writes_4d_image_that_reads_back_with_its_geometry(tmp_path):
    folder = write_cine_folder(tmp_path / "dicom")
    out = tmp_path / "out" / "cine.nii.gz"
    run = run_main(convert.main, "cine", "--input", folder, "--output", out)
    assert run.returncode == 0, run.stderr
    assert "kept the later" in run.stdout and "(5, 4, 16, 20) (T, D, H, W)" in run.stdout
    array, props = dataset.read_image_channels(out)
    cine = conversion.cine_volume(folder)
    np.testing.assert_array_equal(array, cine.array)
    assert dataset.same_geometry(props, cine.props)
    img = sitk.ReadImage(str(out))
    assert img.GetSpacing()[3] == pytest.approx(45.0)
    # Voxel (column j, row i, slice d) sits where slice d's file puts that pixel.
    r, c = np.array(OBLIQUE[:3]), np.array(OBLIQUE[3:])
    for j, i, d in ((0, 0, 0), (19, 3, 2), (5, 15, 3)):
        expected = position(d) + j * PIXEL_SPACING[1] * r + i * PIXEL_SPACING[0] * c
        np.testing.assert_allclose(img.TransformIndexToPhysicalPoint((j, i, d, 0))[:3], expected, atol=1e-3)
    assert sorted(p.name for p in out.parent.iterdir()) == ["cine.nii.gz"]  # no temporary file left


def test_cine_repeat_within_one_series_keeps_later_acquisition(tmp_path):
    for d in range(2):
        for t, ms in enumerate(PHASE_MS[:2]):
            write_dicom(tmp_path / f"a{d}{t}.dcm", frame(d, t), position(d), trigger=ms, instance=10 * d + t)
    write_dicom(tmp_path / "b.dcm", frame(1, 0, offset=30000), position(1), trigger=0.0, instance=99,
                acquisition_time="130000")
    cine = conversion.cine_volume(tmp_path)
    assert cine.array.shape == (2, 2, *SHAPE)
    np.testing.assert_array_equal(cine.array[0, 1], frame(1, 0, offset=30000))
    assert any("repeat a trigger time" in line and "a10.dcm" in line for line in cine.report)


def test_cine_without_trigger_time_orders_phases_by_instance_number_and_says_so(tmp_path):
    for d in range(2):
        for t in range(3):
            write_dicom(tmp_path / f"s{d}_{2 - t}.dcm", frame(d, t), position(d), instance=t + 1)
    cine = conversion.cine_volume(tmp_path)
    for t in range(3):
        np.testing.assert_array_equal(cine.array[t, 1], frame(1, t))
    assert cine.phase_step == 1.0
    assert any("InstanceNumber" in line for line in cine.report)


def test_cine_applies_rescale_slope_and_intercept(tmp_path):
    for d in range(2):
        write_dicom(tmp_path / f"s{d}.dcm", frame(d, 0), position(d), rescale=(0.25, -100.5))
    cine = conversion.cine_volume(tmp_path)
    np.testing.assert_array_equal(cine.array, np.stack([frame(d, 0) * 0.25 - 100.5 for d in range(2)]))


def test_real_ct_series_matches_simpleitk_geometry_and_pydicom_values(tmp_path):
    out = tmp_path / "ct.nrrd"
    run = run_main(convert.main, "cine", "--input", CT5N, "--output", out)
    assert run.returncode == 0, run.stderr
    array, props = dataset.read_image(out)  # one phase: a 3D image
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(CT5N)))
    ref = reader.Execute()
    np.testing.assert_allclose(props["spacing"], tuple(reversed(ref.GetSpacing())), atol=1e-5)
    np.testing.assert_allclose(props["origin"], ref.GetOrigin(), atol=1e-5)
    np.testing.assert_allclose(props["direction"], ref.GetDirection(), atol=1e-6)
    slices = sorted((pydicom.dcmread(f) for f in CT5N.iterdir()), key=lambda ds: float(ds.ImagePositionPatient[2]))
    assert props["spacing"][0] == pytest.approx(np.diff([float(ds.ImagePositionPatient[2]) for ds in slices])[0])
    expected = np.stack([ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in slices])
    assert array.shape == (5, 16, 16) and float(np.abs(expected).max()) > 0
    np.testing.assert_array_equal(array, expected)


def _no_image(folder):
    (folder / "notes.txt").write_text("not an image\n")


def _two_studies(folder):
    write_dicom(folder / "a.dcm", frame(0, 0), position(0))
    write_dicom(folder / "b.dcm", frame(1, 0), position(1), study=STUDY + ".2")


def _non_parallel(folder):
    write_dicom(folder / "a.dcm", frame(0, 0), position(0))
    write_dicom(folder / "b.dcm", frame(1, 0), position(1), orientation=IDENTITY)


def _gap(folder):
    for d, z in enumerate((0.0, 8.0, 16.0, 32.0)):
        write_dicom(folder / f"s{d}.dcm", frame(d, 0), (0.0, 0.0, z), orientation=IDENTITY)


def _other_grid(folder):
    write_dicom(folder / "a.dcm", frame(0, 0), position(0))
    write_dicom(folder / "b.dcm", frame(1, 0)[:, :12], position(1))


def _other_pixel_spacing(folder):
    write_dicom(folder / "a.dcm", frame(0, 0), position(0))
    write_dicom(folder / "b.dcm", frame(1, 0), position(1), pixel_spacing=(1.5, 1.5))


def _off_axis(folder):
    write_dicom(folder / "a.dcm", frame(0, 0), position(0))
    write_dicom(folder / "b.dcm", frame(1, 0), position(1) + 3.0 * np.array(OBLIQUE[:3]))


@pytest.mark.parametrize("make, fragments", [
    (_no_image, ["no DICOM image", "notes.txt"]),
    (_two_studies, ["2 studies", "a.dcm", "b.dcm"]),
    (_non_parallel, ["not parallel", "a.dcm", "b.dcm"]),
    (_gap, ["16.00 mm (s2.dcm)", "32.00 mm (s3.dcm)", "uniform"]),
    (_other_grid, ["b.dcm", "16 x 12", "a.dcm"]),
    (_other_pixel_spacing, ["b.dcm", "PixelSpacing", "a.dcm"]),
    (_off_axis, ["b.dcm", "3.00 mm in plane", "a.dcm"]),
])
def test_cine_bad_folder_is_one_line_error_and_writes_nothing(tmp_path, make, fragments):
    folder = tmp_path / "dicom"
    folder.mkdir()
    make(folder)
    out = tmp_path / "out" / "cine.nii.gz"
    run = run_main(convert.main, "cine", "--input", folder, "--output", out)
    assert_one_line_error(run, *fragments)
    assert not out.parent.exists()


def test_cine_refuses_existing_output_without_overwrite(tmp_path):
    out = tmp_path / "cine.nrrd"
    out.write_text("earlier result")
    assert_one_line_error(run_main(convert.main, "cine", "--input", CT5N, "--output", out), "--output", "--overwrite")
    assert out.read_text() == "earlier result"
    assert run_main(convert.main, "cine", "--input", CT5N, "--output", out, "--overwrite").returncode == 0
    assert dataset.read_image(out)[0].shape == (5, 16, 16)


@pytest.mark.parametrize("input_dir, output, flag", [("absent", "x.nii.gz", "--input"), (CT5N, "x.png", "--output")])
def test_cine_bad_flag_is_a_user_error_naming_it(tmp_path, input_dir, output, flag):
    with pytest.raises(UserError, match=flag):
        convert.main(["cine", "--input", str(tmp_path / input_dir), "--output", str(tmp_path / output)])
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- contours

def circle(cx: float, cy: float, r: float, n: int = 720) -> np.ndarray:
    a = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([cx + r * np.cos(a), cy + r * np.sin(a)], axis=1)


@pytest.mark.parametrize("r", [9.6, 12.3, 17.8, 25.0])
@pytest.mark.parametrize("cx, cy", [(32.0, 32.0), (31.37, 32.81), (30.5, 33.5), (32.9, 31.1)])
def test_contour_mask_of_circle_fills_pi_r_squared_and_the_disc_lattice_points(r, cx, cy):
    mask = conversion.contour_mask(circle(cx, cy, r), (64, 72))
    assert mask.dtype == np.uint8
    assert abs(mask.sum() / (np.pi * r * r) - 1) < 0.02
    # Sub-pixel: exactly the pixels whose centre lies inside the circle, away from its boundary.
    rows, cols = np.mgrid[:64, :72]
    distance = np.hypot(cols - cx, rows - cy) - r
    clear = np.abs(distance) > 1e-3
    np.testing.assert_array_equal(mask[clear], (distance < 0)[clear])


def test_contour_mask_x_is_column_y_is_row_and_edges_are_half_open():
    mask = conversion.contour_mask(np.array([(2, 1), (6, 1), (6, 3), (2, 3)]), (4, 8))
    expected = np.zeros((4, 8), np.uint8)
    expected[1:3, 2:6] = 1  # x from 2 to 6 = columns 2..5, y from 1 to 3 = rows 1..2
    np.testing.assert_array_equal(mask, expected)


def test_contour_mask_agrees_with_skimage_when_no_centre_is_on_an_edge():
    # A concave, asymmetric polygon with off-grid vertices, partly outside the image.
    polygon = np.array([(1.3, 2.2), (17.7, 0.6), (12.1, 9.4), (20.9, 13.7), (3.4, 14.2), (-2.6, 8.1)])
    mask = conversion.contour_mask(polygon, (12, 19))
    np.testing.assert_array_equal(mask, polygon2mask((12, 19), polygon[:, ::-1]).astype(np.uint8))
    assert 0 < mask.sum() < mask.size


def write_sunnybrook(root: Path, numbers=(48,), contours=(48,)) -> tuple[Path, Path]:
    dicom_dir, contour_dir = root / "dicom", root / "contours"
    for k in numbers:
        write_dicom(dicom_dir / "SC-HF-I-01" / f"IM-0001-{k:04d}.dcm", frame(0, 0), position(0), instance=k)
    contour_dir.mkdir(parents=True)
    for k in contours:
        points = circle(9.3, 7.6, 5.2, n=60)
        (contour_dir / f"IM-0001-{k:04d}-icontour-manual.txt").write_text(
            "".join(f"{x:.2f} {y:.2f}\n" for x, y in points))
    return dicom_dir, contour_dir


def test_contours_cli_writes_mask_with_the_slice_geometry(tmp_path):
    dicom_dir, contour_dir = write_sunnybrook(tmp_path)
    out_dir = tmp_path / "masks"
    run = run_main(convert.main, "contours", "--dicom_dir", dicom_dir, "--contour_dir", contour_dir,
                   "--output_dir", out_dir, "--output_format", "nrrd")
    assert run.returncode == 0, run.stderr
    mask, props = dataset.read_image(out_dir / "IM-0001-0048-icontour.nrrd")
    points = conversion.read_contour(contour_dir / "IM-0001-0048-icontour-manual.txt")
    assert mask.dtype == np.uint8 and mask.shape == (1, *SHAPE)
    np.testing.assert_array_equal(mask[0], conversion.contour_mask(points, SHAPE))
    r, c = np.array(OBLIQUE[:3]), np.array(OBLIQUE[3:])
    np.testing.assert_allclose(props["spacing"], (6.0, *PIXEL_SPACING), atol=1e-6)
    np.testing.assert_allclose(props["origin"], position(0), atol=1e-6)
    np.testing.assert_allclose(np.reshape(props["direction"], (3, 3))[:, :2], np.stack([r, c], axis=1), atol=1e-6)
    # The mask's centroid lies at the contour centre's physical point on the slice.
    i, j = np.nonzero(mask[0])
    img = dataset.to_sitk(mask, props)
    centroid = img.TransformContinuousIndexToPhysicalPoint((float(j.mean()), float(i.mean()), 0.0))
    expected = position(0) + 9.3 * PIXEL_SPACING[1] * r + 7.6 * PIXEL_SPACING[0] * c
    np.testing.assert_allclose(centroid, expected, atol=0.25)  # a transposed mask is 3 mm off


def test_contours_bad_file_is_reported_and_the_others_go_on(tmp_path):
    dicom_dir, contour_dir = write_sunnybrook(tmp_path, numbers=(48, 60), contours=(48, 49, 60))
    out_dir = tmp_path / "masks"
    run = run_main(convert.main, "contours", "--dicom_dir", dicom_dir, "--contour_dir", contour_dir,
                   "--output_dir", out_dir)
    assert run.returncode == 1
    errors = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: ") and "IM-0001-0049-icontour-manual.txt" in errors[0]
    assert "IM-0001-0049.dcm" in errors[0] and "--dicom_dir" in errors[0]
    assert sorted(p.name for p in out_dir.iterdir()) == ["IM-0001-0048-icontour.nii.gz",
                                                         "IM-0001-0060-icontour.nii.gz"]


def test_contours_refuse_existing_masks_without_overwrite_and_write_nothing(tmp_path):
    dicom_dir, contour_dir = write_sunnybrook(tmp_path, numbers=(48, 60), contours=(48, 60))
    out_dir = tmp_path / "masks"
    out_dir.mkdir()
    (out_dir / "IM-0001-0060-icontour.nii.gz").write_text("earlier result")
    run = run_main(convert.main, "contours", "--dicom_dir", dicom_dir, "--contour_dir", contour_dir,
                   "--output_dir", out_dir)
    assert_one_line_error(run, "--overwrite", "IM-0001-0060-icontour.nii.gz")
    assert sorted(p.name for p in out_dir.iterdir()) == ["IM-0001-0060-icontour.nii.gz"]


def test_contours_empty_contour_folder_is_one_line_error(tmp_path):
    dicom_dir, contour_dir = write_sunnybrook(tmp_path, contours=())
    run = run_main(convert.main, "contours", "--dicom_dir", dicom_dir, "--contour_dir", contour_dir,
                   "--output_dir", tmp_path / "masks")
    assert_one_line_error(run, str(contour_dir), "-manual.txt")
    assert not (tmp_path / "masks").exists()
