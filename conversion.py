"""Conversion of clinical files into the pipeline's volumes: a folder of cine DICOM (one
short-axis stack, several cardiac phases per slice position) into a 4D image `(T, D, H, W)`,
and Sunnybrook-style contour files into masks on their DICOM slice, each written with its
geometry in `dataset.py`'s convention (`spacing` (sz, sy, sx) mm, array order; `origin` and
`direction` in ITK's physical (x, y, z) form).

Rules for a cine folder. Each is applied openly: a refusal is a one-line `UserError` naming the
files, a repair is a line of the report `cine_volume` returns.

- Files: every file under the folder (subfolders too, hidden ones skipped) is tried, with or
  without a `.dcm` suffix; files that are not DICOM, or DICOM without an image (a DICOMDIR),
  are skipped and named. No image at all is refused.
- One study: images of several StudyInstanceUIDs are refused.
- Parallel slices: an ImageOrientationPatient differing from another file's by more than
  `ORIENTATION_TOL` in any direction cosine is refused, naming both files.
- One pixel grid: Rows/Columns or PixelSpacing differing between files are refused, naming both.
- Slice order: by position along the stack normal n = row cosine x column cosine (ascending, so
  the first slice is the one at the smallest n.position); positions within `SAME_POSITION_MM`
  are one slice position. The slice spacing is the median step between positions; a step that
  differs from it by more than `GAP_TOL` (a gap, or a stray slice) is refused, naming the two
  positions, because a 4D grid needs uniform spacing. A slice position lying off the stack's
  axis (shifted in plane by more than `IN_PLANE_TOL` pixel) is refused. One slice position
  takes SliceThickness as its spacing (1 mm without it).
- Repeat acquisitions: files of several series (SeriesInstanceUID) at one slice position are
  repeats; the later series is kept, "later" meaning the larger SeriesNumber, then the later
  AcquisitionTime, then the larger InstanceNumber, and the files of the others are dropped and
  named. Two files of one series at one position and one TriggerTime: the later one by
  AcquisitionTime, then InstanceNumber, is kept and the other named.
- Phases: sorted by TriggerTime at each slice position; when a file lacks TriggerTime, by
  InstanceNumber (reported) and a position with fewer phases is taken to miss its last ones.
  T is the most phases at any position. A position with fewer phases is matched to the
  reference trigger times (per phase, the median over the positions that have all T) and each
  missing phase is filled with that position's phase nearest in trigger time (the earlier on a
  tie), as curated cardiac data sets do; each fill is reported.
- Values: RescaleSlope and RescaleIntercept applied, float32. One phase gives a 3D volume
  `(D, H, W)`. A 4D image's fourth spacing is the median trigger-time step in ms (1 without
  trigger times).

Contours: `IM-0001-NNNN-<kind>contour-manual.txt` is drawn on the DICOM slice `IM-0001-NNNN.dcm`
(or without suffix) found anywhere under the DICOM folder; a pixel is inside when its centre is
(`contour_mask`). A contour file that cannot be converted is an error line and the others go on.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from scipy.optimize import linear_sum_assignment

import dataset
from utils import UserError

ORIENTATION_TOL = 1e-3  # direction-cosine difference beyond which two slices are not parallel
PIXEL_SPACING_TOL = 1e-3  # mm
SAME_POSITION_MM = 1e-2  # positions along the normal closer than this are one slice position
GAP_TOL = 0.1  # relative deviation of one slice step from the median step that is refused
IN_PLANE_TOL = 0.1  # pixel: how far a slice position may lie off the stack's axis
TRIGGER_TOL_MS = 0.5  # two trigger times closer than this are one phase
CINE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")  # single-file formats SimpleITK writes in 4D
MASK_FORMATS = ("nii.gz", "nrrd")
CONTOUR_NAME = re.compile(r"(?P<image>.+-\d+)-(?P<kind>[A-Za-z0-9]*contour)-manual\.txt")


# ----------------------------------------------------------------------------- DICOM headers

@dataclass(frozen=True)
class SliceHeader:
    """What the sorting needs of one DICOM image file, read without its pixel data. Geometry
    fields are None when the file lacks the tag; `pixel_spacing` is DICOM's (row spacing sy,
    column spacing sx); `shape` is (Rows, Columns); times are ms (TriggerTime) and seconds since
    midnight (AcquisitionTime)."""
    path: Path
    study: str
    series: str
    series_number: int | None
    acquisition_time: float | None
    instance: int | None
    trigger_time: float | None
    position: tuple[float, float, float] | None
    orientation: tuple[float, ...] | None
    pixel_spacing: tuple[float, float] | None
    shape: tuple[int, int]
    thickness: float | None


def _numbers(ds, keyword: str, count: int, path: Path) -> tuple[float, ...] | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    values = value if isinstance(value, (list, tuple, pydicom.multival.MultiValue)) else [value]
    try:
        numbers = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise UserError(f"{path}: {keyword} {value!r} is not numeric; fix or remove the file") from None
    if len(numbers) != count:
        raise UserError(f"{path}: {keyword} has {len(numbers)} values, expected {count}; fix or remove the file")
    return numbers


def _number(ds, keyword: str, path: Path) -> float | None:
    value = _numbers(ds, keyword, 1, path)
    return None if value is None else value[0]


def _seconds(tm) -> float | None:
    """Seconds since midnight of a DICOM TM value (`HHMMSS.FFFFFF`, shorter forms allowed)."""
    text = str(tm or "").strip().replace(":", "")
    if not re.fullmatch(r"\d{2}(\d{2}(\d{2}(\.\d*)?)?)?", text):
        return None
    return int(text[:2]) * 3600 + int(text[2:4] or 0) * 60 + float(text[4:] or 0)


def read_header(path: str | Path) -> SliceHeader | None:
    """The header of one DICOM image file; None when the file is not DICOM or holds no image
    (a DICOMDIR, a report). A multi-frame or colour image, or a corrupt file, is refused."""
    path = Path(path)
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except InvalidDicomError:
        return None
    except Exception as e:  # any failure past the DICM magic means a corrupt file
        raise UserError(f"{path}: cannot be read as DICOM ({e.__class__.__name__}: {str(e)[:100]}); "
                        "replace or remove the file") from None
    if "Rows" not in ds or "Columns" not in ds:
        return None
    if int(ds.get("NumberOfFrames") or 1) > 1:
        raise UserError(f"{path}: a multi-frame DICOM image ({ds.NumberOfFrames} frames); "
                        "export the series as one image per file")
    if int(ds.get("SamplesPerPixel") or 1) != 1:
        raise UserError(f"{path}: a colour image ({ds.SamplesPerPixel} samples per pixel); expected greyscale")
    number = _number(ds, "SeriesNumber", path)
    instance = _number(ds, "InstanceNumber", path)
    return SliceHeader(
        path=path, study=str(ds.get("StudyInstanceUID", "")), series=str(ds.get("SeriesInstanceUID", "")),
        series_number=None if number is None else int(number), acquisition_time=_seconds(ds.get("AcquisitionTime")),
        instance=None if instance is None else int(instance), trigger_time=_number(ds, "TriggerTime", path),
        position=_numbers(ds, "ImagePositionPatient", 3, path),
        orientation=_numbers(ds, "ImageOrientationPatient", 6, path),
        pixel_spacing=_numbers(ds, "PixelSpacing", 2, path), shape=(int(ds.Rows), int(ds.Columns)),
        thickness=_number(ds, "SliceThickness", path))


def _files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*")
                  if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def read_dicom_folder(folder: str | Path) -> tuple[list[SliceHeader], list[Path]]:
    """`(headers, skipped)`: the header of every DICOM image file under `folder` (sorted by
    path, any suffix), and the files skipped as not DICOM images."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: no such folder; give the folder of the DICOM files")
    headers, skipped = [], []
    for path in _files_under(folder):
        header = read_header(path)
        if header is None:
            skipped.append(path)
        else:
            headers.append(header)
    return headers, skipped


def _checked_geometry(h: SliceHeader) -> None:
    for name, value in (("ImagePositionPatient", h.position), ("ImageOrientationPatient", h.orientation),
                        ("PixelSpacing", h.pixel_spacing)):
        if value is None:
            raise UserError(f"{h.path}: has no {name}, so it cannot be placed in the stack; "
                            "remove it or export the series with its geometry")


def _axes(orientation) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row cosine (direction of increasing column, x), column cosine (increasing row, y) and
    their normal, each of unit length."""
    r, c = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
    n = np.cross(r, c)
    return r / np.linalg.norm(r), c / np.linalg.norm(c), n / np.linalg.norm(n)


def slice_props(h: SliceHeader, slice_spacing: float) -> dict:
    """`dataset.py` props of a grid whose first slice is the file `h` and whose slices step by
    `slice_spacing` mm along its normal: direction columns = row cosine, column cosine, normal."""
    _checked_geometry(h)
    r, c, n = _axes(h.orientation)
    return {"spacing": (float(slice_spacing), float(h.pixel_spacing[0]), float(h.pixel_spacing[1])),
            "origin": tuple(float(p) for p in h.position),
            "direction": tuple(float(v) for v in np.stack([r, c, n], axis=1).ravel())}


# ----------------------------------------------------------------------------- cine stacks

@dataclass(frozen=True)
class CineVolume:
    """A sorted cine stack: `array` (T, D, H, W) float32, or (D, H, W) with one phase; `props`
    its 3D geometry; `phase_step` the fourth axis's spacing (ms, 1 without trigger times);
    `files[t][d]` the file of each frame; `report` one line per fact and repair."""
    array: np.ndarray
    props: dict
    phase_step: float
    files: tuple[tuple[Path, ...], ...]
    report: tuple[str, ...]


def _names(paths, folder: Path) -> str:
    return ", ".join(str(p.relative_to(folder)) if p.is_relative_to(folder) else str(p) for p in paths)


def _check_one_grid(headers: list[SliceHeader], folder: Path) -> None:
    studies = {}
    for h in headers:
        studies.setdefault(h.study, h)
    if len(studies) > 1:
        a, b = list(studies.values())[:2]
        raise UserError(f"{folder}: holds {len(studies)} studies (StudyInstanceUID {a.study} in "
                        f"{_names([a.path], folder)}, {b.study} in {_names([b.path], folder)}); "
                        "put one study's cine series in the folder")
    first = headers[0]
    for h in headers:
        _checked_geometry(h)
    for h in headers[1:]:
        if np.abs(np.subtract(h.orientation, first.orientation)).max() > ORIENTATION_TOL:
            raise UserError(f"{h.path}: ImageOrientationPatient {list(h.orientation)} is not parallel to "
                            f"{list(first.orientation)} of {first.path} (beyond {ORIENTATION_TOL}); "
                            "keep one stack of one orientation in the folder")
        if h.shape != first.shape:
            raise UserError(f"{h.path}: Rows x Columns {h.shape[0]} x {h.shape[1]} differ from "
                            f"{first.shape[0]} x {first.shape[1]} of {first.path}; keep one stack in the folder")
        if np.abs(np.subtract(h.pixel_spacing, first.pixel_spacing)).max() > PIXEL_SPACING_TOL:
            raise UserError(f"{h.path}: PixelSpacing {list(h.pixel_spacing)} differs from "
                            f"{list(first.pixel_spacing)} of {first.path}; keep one stack in the folder")


def _later(h: SliceHeader) -> tuple:
    """Sort key of the repeat rule: SeriesNumber, then AcquisitionTime, then InstanceNumber."""
    return (h.series_number if h.series_number is not None else -1,
            h.acquisition_time if h.acquisition_time is not None else -1.0,
            h.instance if h.instance is not None else -1)


def _drop_repeats(group: list[SliceHeader], label: str, folder: Path, report: list) -> list[SliceHeader]:
    """The files of one slice position less its repeat acquisitions (the module's rule)."""
    runs = {}
    for h in group:
        runs.setdefault(h.series, []).append(h)
    if len(runs) > 1:
        ordered = sorted(runs.values(), key=lambda run: max(_later(h) for h in run))
        kept = ordered[-1]
        dropped = sorted(h.path for run in ordered[:-1] for h in run)
        report.append(f"{label}: {len(runs)} series acquired here; kept the later (series "
                      f"{kept[0].series_number}, by SeriesNumber, then AcquisitionTime, then InstanceNumber), "
                      f"dropped {len(dropped)} files: {_names(dropped, folder)}")
        group = kept
    if any(h.trigger_time is None for h in group):
        return group
    kept, dropped = [], []
    for h in sorted(group, key=lambda h: h.trigger_time):
        if kept and h.trigger_time - kept[-1].trigger_time < TRIGGER_TOL_MS:
            earlier, h = sorted([kept.pop(), h], key=lambda x: _later(x)[1:])
            dropped.append(earlier)
        kept.append(h)
    if dropped:
        names = _names([h.path for h in dropped], folder)
        report.append(f"{label}: {len(dropped)} files repeat a trigger time of their series; kept the later "
                      f"(by AcquisitionTime, then InstanceNumber), dropped: {names}")
    return kept


def _slice_positions(headers: list[SliceHeader], normal: np.ndarray) -> tuple[list, np.ndarray]:
    """Files grouped by slice position, ascending along `normal`, with each position's height
    (mm along the normal, of its first file)."""
    heights = [float(np.dot(h.position, normal)) for h in headers]
    groups, starts = [], []
    for height, h in sorted(zip(heights, headers), key=lambda pair: (pair[0], str(pair[1].path))):
        if not starts or height - starts[-1] > SAME_POSITION_MM:
            groups.append([])
            starts.append(height)
        groups[-1].append(h)
    return groups, np.array(starts)


def _slice_spacing(groups, heights: np.ndarray, folder: Path, report: list) -> float:
    if len(groups) == 1:
        thickness = groups[0][0].thickness
        report.append(f"one slice position: slice spacing {thickness or 1.0:g} mm "
                      f"({'SliceThickness' if thickness else 'no SliceThickness, 1 mm'})")
        return float(thickness or 1.0)
    steps = np.diff(heights)
    spacing = float(np.median(steps))
    for k, step in enumerate(steps):
        if abs(step - spacing) > GAP_TOL * spacing:
            a, b = groups[k][0], groups[k + 1][0]
            raise UserError(f"{folder}: slices at {heights[k]:.2f} mm ({_names([a.path], folder)}) and "
                            f"{heights[k + 1]:.2f} mm ({_names([b.path], folder)}) along the normal are "
                            f"{step:.2f} mm apart, the others {spacing:.2f} mm; a 4D grid needs uniform "
                            "slice spacing: add the missing slices or remove the stray ones")
    return spacing


def _check_on_axis(kept: list[list[SliceHeader]], normal: np.ndarray) -> None:
    first = kept[0][0]
    for group in kept:
        for h in group:
            offset = np.subtract(h.position, first.position)
            in_plane = float(np.linalg.norm(offset - np.dot(offset, normal) * normal))
            if in_plane > IN_PLANE_TOL * min(first.pixel_spacing):
                raise UserError(f"{h.path}: lies {in_plane:.2f} mm in plane off the stack's axis through "
                                f"{first.path}, so the slices share no grid; keep one stack in the folder")


def _phase_order(kept: list[list[SliceHeader]], report: list) -> tuple[list, list[np.ndarray], bool]:
    """Each position's files in phase order, their times (ms, or ranks without TriggerTime), and
    whether the times are trigger times."""
    by_trigger = all(h.trigger_time is not None for group in kept for h in group)
    if not by_trigger and max(len(g) for g in kept) > 1:
        report.append("phases ordered by InstanceNumber: not every file has a TriggerTime")
    ordered, times = [], []
    for group in kept:
        if by_trigger:
            group = sorted(group, key=lambda h: (h.trigger_time, _later(h)))
            times.append(np.array([h.trigger_time for h in group]))
        else:
            group = sorted(group, key=lambda h: (h.instance if h.instance is not None else -1, str(h.path)))
            times.append(np.arange(len(group), dtype=float))
        ordered.append(group)
    return ordered, times, by_trigger


def _fill_phases(ordered, times, labels, folder: Path, by_trigger: bool, report: list):
    """`(frames[d][t] files, reference times (T,))`: every position with T phases, each missing
    phase filled with the position's phase nearest in time to the reference (the module's rule)."""
    num_phases = max(len(g) for g in ordered)
    full = np.stack([t for t in times if len(t) == num_phases])
    reference = np.median(full, axis=0)
    frames = []
    for group, t, label in zip(ordered, times, labels):
        if len(group) == num_phases:
            frames.append(list(group))
            continue
        cost = np.abs(t[:, None] - reference[None, :])
        slots = np.sort(linear_sum_assignment(cost)[1])  # sorted: in 1D the monotone matching is optimal
        filled = [None] * num_phases
        for h, slot in zip(group, slots):
            filled[slot] = h
        for slot in range(num_phases):
            if filled[slot] is None:
                nearest = int(np.argmin(np.abs(t - reference[slot])))  # first minimum: the earlier on a tie
                filled[slot] = group[nearest]
                near = f"near {reference[slot]:.1f} ms" if by_trigger else "(InstanceNumber order: a last phase)"
                at = f" at {t[nearest]:.1f} ms" if by_trigger else ""
                report.append(f"{label}: {len(group)} of {num_phases} phases; no phase {near} (t = {slot}), "
                              f"filled with its phase{at} from {_names([group[nearest].path], folder)}")
        frames.append(filled)
    return frames, reference


def _pixels(h: SliceHeader) -> np.ndarray:
    """The rescaled pixel values (H, W) float32 of one file."""
    try:
        ds = pydicom.dcmread(h.path)
        pixels = ds.pixel_array
    except Exception as e:  # a decoder fails in many ways, each the file's fault
        raise UserError(f"{h.path}: its pixel data cannot be decoded ({e.__class__.__name__}: {str(e)[:100]}); "
                        "convert it to uncompressed DICOM (e.g. gdcmconv --raw)") from None
    assert pixels.shape == h.shape, f"{h.path}: pixel array {pixels.shape} differs from Rows x Columns {h.shape}"
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    slope = 1.0 if slope in (None, "") else float(slope)
    intercept = 0.0 if intercept in (None, "") else float(intercept)
    return (pixels.astype(np.float64) * slope + intercept).astype(np.float32)


def cine_volume(folder: str | Path) -> CineVolume:
    """Sort and stack the cine DICOM images under `folder` by the module's rules: slices by
    position along the stack normal, phases by trigger time. Returns a `CineVolume` whose
    `array` is (T, D, H, W) float32, or (D, H, W) with one phase."""
    folder = Path(folder)
    headers, skipped = read_dicom_folder(folder)
    if not headers:
        found = f" ({len(skipped)} other files: {_names(skipped[:5], folder)})" if skipped else ""
        raise UserError(f"{folder}: holds no DICOM image{found}; give the folder of one cine series")
    report = [f"read {len(headers)} DICOM images from {folder}"]
    if skipped:
        report.append(f"skipped {len(skipped)} files that are not DICOM images: {_names(skipped, folder)}")
    _check_one_grid(headers, folder)
    _, _, normal = _axes(headers[0].orientation)
    groups, heights = _slice_positions(headers, normal)
    labels = [f"slice {d} ({height:.2f} mm along the normal)" for d, height in enumerate(heights)]
    slice_spacing = _slice_spacing(groups, heights, folder, report)
    kept = [_drop_repeats(group, label, folder, report) for group, label in zip(groups, labels)]
    _check_on_axis(kept, normal)
    ordered, times, by_trigger = _phase_order(kept, report)
    frames, reference = _fill_phases(ordered, times, labels, folder, by_trigger, report)
    num_phases = len(reference)
    phase_step = float(np.median(np.diff(reference))) if by_trigger and num_phases > 1 else 1.0
    props = slice_props(kept[0][0], slice_spacing)
    report.append(f"{len(groups)} slice positions, {slice_spacing:.3f} mm apart along the normal "
                  f"{np.round(normal, 4).tolist()}; {num_phases} phase(s)"
                  + (f", {phase_step:.1f} ms apart" if by_trigger and num_phases > 1 else ""))
    unique = {h.path: h for group in frames for h in group}  # a filled phase repeats a file: read it once
    pixels = {path: _pixels(h) for path, h in unique.items()}
    array = np.stack([np.stack([pixels[h.path] for h in group]) for group in frames], axis=1)  # (T, D, H, W)
    files = tuple(tuple(frames[d][t].path for d in range(len(frames))) for t in range(num_phases))
    return CineVolume(array[0] if num_phases == 1 else array, props, phase_step, files, tuple(report))


def write_cine(cine: CineVolume, path: str | Path) -> None:
    """Write a cine volume atomically: one phase as a 3D image, several as a 4D image whose first
    three axes carry the 3D geometry and whose fourth spacing is `cine.phase_step`, so that
    `dataset.read_image_channels` reads it back as (T, D, H, W) with the same props."""
    dataset.write_image(cine.array, {**cine.props, "axis4": (cine.phase_step, 0.0)}, path)


# ----------------------------------------------------------------------------- contours

def read_contour(path: str | Path) -> np.ndarray:
    """The points `(N, 2)` (x = column, y = row, pixel units) of a Sunnybrook contour file: one
    `x y` pair of numbers per line, blank lines skipped, at least three points."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not readable ({e.__class__.__name__}); expected lines of 'x y'") from None
    points = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            x, y = (float(v) for v in line.split())
        except ValueError:
            raise UserError(f"{path}: line {n} {line.strip()[:40]!r} is not two numbers 'x y'; fix the file") from None
        points.append((x, y))
    if len(points) < 3:
        raise UserError(f"{path}: {len(points)} points; a contour needs at least 3")
    points = np.array(points)
    if not np.isfinite(points).all():
        raise UserError(f"{path}: holds a non-finite coordinate; fix the file")
    return points


def contour_mask(points: np.ndarray, shape) -> np.ndarray:
    """The mask `(H, W)` uint8 of the polygon `points (N, 2)` (x = column, y = row, in pixel
    coordinates whose pixel centres are the integers; the polygon closes itself).

    A pixel is inside when its centre is inside the polygon by the even-odd rule. A centre
    exactly on the boundary is decided half-open, as rasterisers do: inside on a left or top
    edge, outside on a right or bottom edge, so a rectangle from x = 2 to 6 and y = 1 to 3 covers
    columns 2..5 and rows 1..2, its area, and two polygons sharing an edge never share a pixel.
    Example: contour_mask([(2, 1), (6, 1), (6, 3), (2, 3)], (4, 8)) sets mask[1:3, 2:6]."""
    points = np.asarray(points, dtype=float)
    assert points.ndim == 2 and points.shape[1] == 2, f"expected points (N, 2), got shape {points.shape}"
    height, width = shape
    x0, y0 = points[:, 0], points[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    rows = np.arange(height)
    # Half-open in y: an edge crosses row y when one end has y_end <= y and the other not.
    crosses = (y0[:, None] <= rows) != (y1[:, None] <= rows)  # (E, H)
    edge, row = np.nonzero(crosses)
    x_cross = x0[edge] + (row - y0[edge]) * (x1[edge] - x0[edge]) / (y1[edge] - y0[edge])
    # A centre x = j is inside when an odd number of crossings lie at or left of it: each
    # crossing toggles the columns from ceil(x_cross) on.
    start = np.clip(np.ceil(x_cross), 0, width).astype(int)
    toggles = np.zeros((height, width + 1), np.int32)
    np.add.at(toggles, (row, start), 1)
    return (np.cumsum(toggles[:, :width], axis=1) % 2).astype(np.uint8)


def _dicom_index(dicom_dir: Path) -> dict[str, list[Path]]:
    """Files under `dicom_dir` by name less a `.dcm` suffix (any case)."""
    index = {}
    for path in _files_under(dicom_dir):
        stem = path.name[:-4] if path.name.lower().endswith(".dcm") else path.name
        index.setdefault(stem, []).append(path)
    return index


def _contour_to_mask(contour: Path, index: dict, dicom_dir: Path, image: str) -> tuple[np.ndarray, dict]:
    """The mask (1, H, W) of one contour file and the props of its DICOM slice."""
    matches = index.get(image, [])
    if not matches:
        raise UserError(f"{contour}: no DICOM image {image}.dcm under {dicom_dir}; put the slice's file there "
                        "or pass the folder that holds it as --dicom_dir")
    if len(matches) > 1:
        raise UserError(f"{contour}: {len(matches)} DICOM files named {image} under {dicom_dir} "
                        f"({_names(matches[:2], dicom_dir)}); pass the one patient's folder as --dicom_dir")
    points = read_contour(contour)
    header = read_header(matches[0])
    if header is None:
        raise UserError(f"{contour}: its slice {matches[0]} is not a DICOM image; replace the file")
    height, width = header.shape
    # A point well outside the image means the contour belongs to another slice or image size.
    if (points < -1).any() or (points[:, 0] > width).any() or (points[:, 1] > height).any():
        raise UserError(f"{contour}: points reach beyond the {height} x {width} image {matches[0].name}; "
                        "check that the contour belongs to this slice")
    props = slice_props(header, header.thickness or 1.0)
    return contour_mask(points, header.shape)[None], props


def sunnybrook_masks(dicom_dir: str | Path, contour_dir: str | Path, out_dir: str | Path, *,
                     output_format: str = "nii.gz", overwrite: bool = False) -> tuple[list[Path], list[str]]:
    """One mask per contour file `<image>-<kind>contour-manual.txt` under `contour_dir`
    (subfolders too), drawn on the DICOM slice `<image>.dcm` (or `<image>`) found under
    `dicom_dir` and written as `out_dir/<image>-<kind>contour.<output_format>`: a 3D image
    (1, H, W) uint8 with the slice's geometry (origin its ImagePositionPatient, direction its
    orientation, slice spacing its SliceThickness or 1 mm).

    Returns `(written, errors)`: a contour file that cannot be converted is an error line and
    the others still go on. Refused before anything is written: no contour file, two contour
    files naming one output, an existing output without `overwrite`."""
    dicom_dir, contour_dir, out_dir = Path(dicom_dir), Path(contour_dir), Path(out_dir)
    assert output_format in MASK_FORMATS, f"output_format {output_format!r} not in {MASK_FORMATS}"
    for name, folder in (("DICOM", dicom_dir), ("contour", contour_dir)):
        if not folder.is_dir():
            raise UserError(f"{folder}: no such folder; give the folder of the {name} files")
    contours = [p for p in _files_under(contour_dir) if p.name.endswith("-manual.txt")]
    if not contours:
        raise UserError(f"{contour_dir}: holds no contour files (*-manual.txt, e.g. IM-0001-0048-icontour-manual.txt)")
    outputs, errors, jobs = {}, [], []
    for contour in contours:
        match = CONTOUR_NAME.fullmatch(contour.name)
        if match is None:
            errors.append(f"{contour}: name is not <image>-<kind>contour-manual.txt "
                          "(e.g. IM-0001-0048-icontour-manual.txt); rename it")
            continue
        out = out_dir / f"{match['image']}-{match['kind']}.{output_format}"
        if out in outputs:
            raise UserError(f"{contour} and {outputs[out]} would both write {out}; convert one patient at a time")
        outputs[out] = contour
        jobs.append((contour, match["image"], out))
    existing = [out for out in outputs if out.exists()]
    if existing and not overwrite:
        raise UserError(f"{out_dir}: already holds {len(existing)} of the masks ({existing[0].name}, ...); "
                        "pass --overwrite to replace them or choose another folder")
    index = _dicom_index(dicom_dir)
    written = []
    for contour, image, out in jobs:
        try:
            mask, props = _contour_to_mask(contour, index, dicom_dir, image)
        except UserError as e:
            errors.append(str(e))
            continue
        dataset.write_image(mask, props, out)
        written.append(out)
    return written, errors
