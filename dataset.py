"""Data without a deep-learning dependency: reading and writing volumes with their geometry,
finding cases in the LASC and MSD/nnU-Net layouts, the train/validation split, masks (the one
binary-mask check, bounding boxes, the largest component), and the geometric rules of the
pipeline (padding to a multiple, integer downscaling, z-score, the locator's centre, fixed-size
crops and their paste-back).

Arrays are (D, H, W), SimpleITK's (z, y, x). The turn from SimpleITK's (x, y, z) order
happens in `read_image`, `read_image_info`, `to_sitk` and `write_image` only:
`props["spacing"]` is (sz, sy, sx) in mm, array order; `props["origin"]` and
`props["direction"]` stay in ITK's physical (x, y, z) form because nothing but the writers use
them.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

import labels as lbl
from labels import Labels
from utils import UserError, atomic_write

IMAGE_SUFFIXES = (".nrrd", ".nii.gz", ".nii", ".mha", ".mhd")
GEOMETRY_TOL = 1e-4  # mm / direction-cosine tolerance when comparing two files' geometry
LABEL_VALUES = (1, 255)  # a label's foreground: 1, or 255 as the LASC files store it


# ----------------------------------------------------------------------------- reading / writing

def read_image(path: str | Path) -> tuple[np.ndarray, dict]:
    """Read a 3D scalar volume: a file SimpleITK reads (nrrd, nii, nii.gz, mha, mhd) or a
    folder holding one DICOM series. Returns `(array (D, H, W), props)` with
    `props = {"spacing": (sz, sy, sx), "origin": (x, y, z), "direction": 9 floats}`."""
    path = Path(path)
    if path.is_dir():
        return _from_sitk(_read_dicom_series(path), path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as e:
        raise UserError(f"{path}: cannot be read as an image ({_sitk_reason(e)}); replace the corrupt file") from None
    return _from_sitk(img, path)


def _header(path: Path) -> sitk.ImageFileReader:
    """A reader holding a file's header (size, spacing, origin, direction), its voxels not decoded."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        raise UserError(f"{path}: cannot be read as an image ({_sitk_reason(e)}); replace the corrupt file") from None
    return reader


def read_image_info(path: str | Path) -> tuple[tuple[int, int, int], dict]:
    """`(shape (D, H, W), props)` of a volume from its header alone, without decoding voxels
    (a DICOM series folder is read whole). Refuses what `read_image` refuses for its header."""
    path = Path(path)
    if path.is_dir() or not path.is_file():
        array, props = read_image(path)
        return array.shape, props
    reader = _header(path)
    _check_scalar_3d(reader.GetNumberOfComponents(), reader.GetDimension(), path)
    return tuple(reversed(reader.GetSize())), _props(reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection())


def is_dicom_folder(path: Path) -> bool:
    """A folder is a DICOM series when it holds `.dcm` files (any case) directly."""
    return path.is_dir() and any(f.is_file() and f.suffix.lower() == ".dcm" for f in path.iterdir())


def _sitk_reason(e: RuntimeError) -> str:
    return str(e).strip().splitlines()[-1][:150] if str(e).strip() else "unreadable"


def _read_dicom_series(folder: Path) -> sitk.Image:
    """The one DICOM series in `folder`, slices ordered by GDCM along the slice normal (so
    spacing, origin and direction come from the slices' positions and orientation)."""
    if not is_dicom_folder(folder):
        raise UserError(f"{folder}: a folder but holds no .dcm files; give a scan file or a DICOM series folder")
    warnings = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # ITK's multi-line warning; our error says it
    try:
        series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    except RuntimeError as e:
        raise UserError(f"{folder}: cannot be read as a DICOM series ({_sitk_reason(e)})") from None
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(warnings)
    if len(series) != 1:
        found = "no readable DICOM series" if not series else f"{len(series)} DICOM series"
        raise UserError(f"{folder}: holds {found}; put exactly one series per folder")
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series[0])
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        img = reader.Execute()
    except RuntimeError as e:
        raise UserError(f"{folder}: cannot be read as a DICOM series ({_sitk_reason(e)}); "
                        "replace the corrupt slices") from None
    if img.GetDimension() == 2 or (img.GetDimension() == 3 and img.GetSize()[2] == 1):
        raise UserError(f"{folder}: a DICOM series of one slice; expected a 3D volume (D, H, W)")
    return img


def _check_scalar_3d(components: int, dimension: int, path) -> None:
    if components != 1:
        raise UserError(f"{path}: has {components} components per voxel; expected a scalar 3D volume")
    if dimension != 3:
        raise UserError(f"{path}: is a {dimension}D image; expected a 3D volume (D, H, W)")


def _props(spacing_xyz, origin, direction) -> dict:
    return {"spacing": tuple(float(s) for s in reversed(spacing_xyz)),
            "origin": tuple(float(o) for o in origin), "direction": tuple(float(d) for d in direction)}


def _from_sitk(img: sitk.Image, path) -> tuple[np.ndarray, dict]:
    _check_scalar_3d(img.GetNumberOfComponentsPerPixel(), img.GetDimension(), path)
    return sitk.GetArrayFromImage(img), _props(img.GetSpacing(), img.GetOrigin(), img.GetDirection())


def _spatial_props(spacing, origin, direction, dimension: int) -> dict:
    """The 3D geometry of an image of `dimension` 3 or 4. A 4D image's fourth axis holds its
    channels or the frames of a cine: its spacing and origin are kept as `props["axis4"]`, so
    that a 4D output (a cine's label maps) is written back with them, and mark the file as 4D."""
    if dimension != 4:
        return _props(spacing[:3], origin[:3], direction)
    direction = np.asarray(direction, dtype=float).reshape(4, 4)[:3, :3].ravel()
    return {**_props(spacing[:3], origin[:3], direction), "axis4": (float(spacing[3]), float(origin[3]))}


def read_image_channels(path: str | Path) -> tuple[np.ndarray, dict]:
    """Read a multi-channel volume: a 4D file of C channels (the MSD layout, channels last in
    (x, y, z, c) order), a 3D file of C-component vector voxels, or a 3D scalar volume (one
    channel). Returns `(array (C, D, H, W), props)` with the 3D geometry of `read_image`."""
    path = Path(path)
    if path.is_dir() or not path.is_file():
        array, props = read_image(path)
        return array[None], props
    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as e:
        raise UserError(f"{path}: cannot be read as an image ({_sitk_reason(e)}); replace the corrupt file") from None
    if img.GetDimension() == 3 and img.GetNumberOfComponentsPerPixel() > 1:  # channels as vector voxels
        array = np.moveaxis(sitk.GetArrayFromImage(img), -1, 0)  # (D, H, W, C) -> (C, D, H, W)
        return np.ascontiguousarray(array), _props(img.GetSpacing(), img.GetOrigin(), img.GetDirection())
    if img.GetDimension() != 4:
        array, props = _from_sitk(img, path)
        return array[None], props
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise UserError(f"{path}: has {img.GetNumberOfComponentsPerPixel()} components per voxel; "
                        "expected scalar voxels")
    return sitk.GetArrayFromImage(img), _spatial_props(img.GetSpacing(), img.GetOrigin(), img.GetDirection(), 4)


def read_channels_info(path: str | Path) -> tuple[tuple[int, int, int], dict, int]:
    """`(shape (D, H, W), props, channels)` of a 3D or 4D volume from its header alone."""
    path = Path(path)
    if path.is_dir() or not path.is_file():
        shape, props = read_image_info(path)
        return shape, props, 1
    reader = _header(path)
    if reader.GetDimension() == 3 and reader.GetNumberOfComponents() > 1:  # channels as vector voxels
        props = _props(reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection())
        return tuple(reversed(reader.GetSize())), props, int(reader.GetNumberOfComponents())
    if reader.GetDimension() != 4:  # a 3D scalar volume: refused as read_image_info refuses it
        _check_scalar_3d(reader.GetNumberOfComponents(), reader.GetDimension(), path)
        return tuple(reversed(reader.GetSize())), _props(reader.GetSpacing(), reader.GetOrigin(),
                                                         reader.GetDirection()), 1
    if reader.GetNumberOfComponents() != 1:
        raise UserError(f"{path}: has {reader.GetNumberOfComponents()} components per voxel; expected scalar voxels")
    size = reader.GetSize()
    props = _spatial_props(reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection(), 4)
    return tuple(reversed(size[:3])), props, int(size[3])


def to_sitk(array: np.ndarray, props: dict) -> sitk.Image:
    """A SimpleITK image of `array (D, H, W)` with the geometry in `props`."""
    img = sitk.GetImageFromArray(np.ascontiguousarray(array))
    img.SetSpacing(tuple(float(s) for s in reversed(props["spacing"])))
    img.SetOrigin(props["origin"])
    img.SetDirection(props["direction"])
    return img


def write_image(array: np.ndarray, props: dict, path: str | Path) -> None:
    """Write `array (D, H, W)`, or `(C, D, H, W)` as a 4D image of C channels (the MSD layout)
    or frames (a cine; with the fourth axis's spacing and origin of `props["axis4"]` when the
    props are a 4D file's), with the geometry in `props` (as `read_image` returns it),
    atomically: a reader never sees a half-written file."""
    assert array.ndim in (3, 4), f"expected a (D, H, W) or (C, D, H, W) array, got shape {array.shape}"
    if array.ndim == 3:
        img = to_sitk(array, props)
    else:
        step, start = props.get("axis4", (1.0, 0.0))
        img = sitk.JoinSeries([to_sitk(a, props) for a in array], start, step)
    atomic_write(path, lambda tmp: sitk.WriteImage(img, tmp, True))


def physical_point(index, props: dict) -> tuple[float, float, float]:
    """The scanner's (x, y, z) in mm of a continuous voxel index (z, y, x) in array order:
    origin + direction (spacing x index), ITK's rule, so that centroids read in Slicer or ITK-SNAP."""
    ixyz = np.asarray(index, dtype=np.float64)[::-1] * np.asarray(props["spacing"], dtype=np.float64)[::-1]
    return tuple(float(v) for v in np.asarray(props["origin"]) + np.asarray(props["direction"]).reshape(3, 3) @ ixyz)


def same_geometry(a: dict, b: dict, tol: float = GEOMETRY_TOL) -> bool:
    return all(np.allclose(a[k], b[k], atol=tol, rtol=0) for k in ("spacing", "origin", "direction"))


def working_spacing(own, spacing) -> tuple[float, float, float]:
    """The spacing a scan of spacing `own` is worked at: `spacing` (a model's), except on axes
    where it is None, which keep the scan's own: a 2D model's slices are never interpolated
    across, so the slice axis stays as acquired."""
    return tuple(float(o if s is None else s) for o, s in zip(own, spacing))


def same_spacing(a, b) -> bool:
    """Two spacings (mm) equal within 0.1 %: the tolerance below which nothing is resampled."""
    return bool(np.allclose(a, b, rtol=1e-3, atol=0))


def resampled_shape(shape, spacing, new_spacing) -> tuple[int, int, int]:
    """The shape of a volume resampled from `spacing` to `new_spacing` over the same extent.
    Example: resampled_shape((10, 20, 20), (1.25,) * 3, (0.625,) * 3) -> (20, 40, 40)."""
    return tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, new_spacing))


def resample(array: np.ndarray, props: dict, spacing, *, label: bool) -> tuple[np.ndarray, dict]:
    """Resample `array (D, H, W)` to `spacing` (array order, mm) over the same physical
    extent, keeping origin and direction. Linear for images, nearest neighbour for labels."""
    img = to_sitk(array, props)
    size = tuple(reversed(resampled_shape(array.shape, props["spacing"], spacing)))
    out = sitk.Resample(img, size, sitk.Transform(), sitk.sitkNearestNeighbor if label else sitk.sitkLinear,
                        img.GetOrigin(), tuple(float(s) for s in reversed(spacing)), img.GetDirection(), 0.0,
                        img.GetPixelID())
    return sitk.GetArrayFromImage(out), {**props, "spacing": tuple(float(s) for s in spacing)}


def resample_onto(array: np.ndarray, props: dict, shape, target_props: dict, *, label: bool) -> np.ndarray:
    """Resample `array` (on the grid of `props`) onto the grid `shape` + `target_props`."""
    ref = sitk.Image([int(s) for s in reversed(shape)], sitk.sitkUInt8)  # a grid, no voxels to copy
    ref.SetSpacing(tuple(float(s) for s in reversed(target_props["spacing"])))
    ref.SetOrigin(target_props["origin"])
    ref.SetDirection(target_props["direction"])
    out = sitk.Resample(to_sitk(array, props), ref, sitk.Transform(),
                        sitk.sitkNearestNeighbor if label else sitk.sitkLinear, 0.0)
    return sitk.GetArrayFromImage(out)


# ----------------------------------------------------------------------------- cases and layouts

@dataclass(frozen=True)
class Case:
    """One scan: `image` a 3D file (one channel), a 4D file of C channels (MSD), or the first of
    nnU-Net's channel files `<case>_0000`, with the others in `more`; `label` when labelled.
    `group`: the subject the scan belongs to when a subject has several (ACDC: the patient of
    an ED or ES frame), so that splits keep a subject's scans on one side."""
    case_id: str
    image: Path
    label: Path | None
    more: tuple[Path, ...] = ()
    group: str | None = None

    @property
    def files(self) -> tuple[Path, ...]:
        return (self.image, *self.more)


ACDC_FRAME = re.compile(r"(?P<subject>.+)_frame(?P<frame>\d+)")  # patient001_frame01
ACDC_INFO = "Info.cfg"
ACDC_LABELS = Labels((1, 2, 3), ("RV cavity", "LV myocardium", "LV cavity"))  # ACDC's label values


@dataclass(frozen=True)
class DatasetInfo:
    """What a data set's dataset.json declares (MSD or nnU-Net v2 form): the channels' names in
    order (None: not declared) and the classes (None: found in the training labels)."""
    channels: tuple[str, ...] | None = None
    labels: Labels | None = None
    path: Path | None = None


def _channel_names(table, path: Path, key: str) -> tuple[str, ...]:
    if not isinstance(table, dict) or not table or set(table) != {str(i) for i in range(len(table))} \
            or not all(isinstance(v, str) for v in table.values()):
        raise UserError(f"{path}: \"{key}\" must map \"0\", \"1\", ... to channel names, got {json.dumps(table)[:80]}")
    return tuple(table[str(i)] for i in range(len(table)))


def _is_value(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= lbl.MAX_VALUE


def _labels_of(table, order, path: Path) -> Labels:
    """Classes (and regions) of a dataset.json's "labels": MSD form {"0": "background", "1":
    "edema", ...}, or nnU-Net v2 form {"background": 0, "edema": 1, ...} whose entries may be
    regions ({"whole tumour": [1, 2, 3], ...}, painted in "regions_class_order")."""
    bad = f"{path}: \"labels\" must map values to names (MSD: {{\"0\": \"background\", \"1\": \"edema\"}}) or names " \
          f"to values (nnU-Net: {{\"background\": 0, \"edema\": 1}}), values in 0..{lbl.MAX_VALUE}"
    if not isinstance(table, dict) or not table:
        raise UserError(bad)
    if all(k.isdigit() and isinstance(v, str) for k, v in table.items()):  # MSD
        pairs = sorted((int(k), v) for k, v in table.items() if int(k) != 0)
        if not pairs or pairs[-1][0] > lbl.MAX_VALUE:
            raise UserError(bad)
        return Labels(tuple(v for v, _ in pairs), tuple(n for _, n in pairs))
    entries = []
    for name, v in table.items():
        vs = v if isinstance(v, list) else [v]
        if not vs or not all(_is_value(x) for x in vs) or (0 in vs and len(vs) > 1):
            raise UserError(bad + "; a region cannot hold the background 0")
        if vs != [0]:
            entries.append((name, tuple(sorted(set(vs))), isinstance(v, list)))
    if not entries:
        raise UserError(bad)
    values = sorted(set().union(*(vs for _, vs, _ in entries)))
    if not any(is_region for *_, is_region in entries):
        named = {vs[0]: n for n, vs, _ in entries}
        return Labels(tuple(values), tuple(named[v] for v in values))
    named = {vs[0]: n for n, vs, _ in entries if len(vs) == 1}
    classes = Labels(tuple(values), tuple(named.get(v, f"label {v}") for v in values))
    try:
        return classes.with_regions([(n, vs) for n, vs, _ in entries], order)
    except ValueError as e:
        raise UserError(f"{path}: {e}") from None


def read_dataset_json(root: str | Path) -> DatasetInfo:
    """The declarations of `<root>/dataset.json`; when there is none, those of the layout's own
    convention (ACDC's three classes), else an empty DatasetInfo."""
    path = Path(root) / "dataset.json"
    if not path.is_file():
        acdc = Path(root).is_dir() and any(is_acdc_subject(d) for d in Path(root).iterdir() if d.is_dir())
        return DatasetInfo(labels=ACDC_LABELS) if acdc else DatasetInfo()
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not readable as JSON ({str(e)[:100]}); fix or remove it") from None
    if not isinstance(meta, dict):
        raise UserError(f"{path}: expected a JSON object with \"labels\" and \"channel_names\" or \"modality\"")
    key = "channel_names" if "channel_names" in meta else "modality" if "modality" in meta else None
    channels = _channel_names(meta[key], path, key) if key else None
    order = meta.get("regions_class_order")
    if order is not None and not (isinstance(order, list) and all(_is_value(v) for v in order)):
        raise UserError(f"{path}: \"regions_class_order\" must be a list of label values, got {order!r}")
    labels = _labels_of(meta["labels"], order, path) if "labels" in meta else None
    return DatasetInfo(channels, labels, path)


def _is_hidden(p: Path) -> bool:
    return p.name.startswith((".", "_"))


def strip_image_suffix(name: str) -> str | None:
    """The file name without its image suffix (`scan.nii.gz` -> `scan`); None when it has none
    of IMAGE_SUFFIXES."""
    for s in IMAGE_SUFFIXES:
        if name.endswith(s):
            return name[: -len(s)]
    return None


def _is_channel(stem: str) -> bool:
    return stem[-5:-4] == "_" and stem[-4:].isdigit()


def _check_channel_files(cases: list[Case], names: set, images_dir: Path) -> None:
    """Every case in nnU-Net's layout has the same channel files `_0000`...; a later channel
    without its case's `_0000` is a missing first channel."""
    split = [c for c in cases if strip_image_suffix(c.image.name).endswith("_0000")]
    most = max((len(c.files) for c in split), default=1)
    for c in split:
        if len(c.files) < most:
            missing = images_dir / f"{c.case_id}_{len(c.files):04d}{c.image.name[len(c.case_id) + 5:]}"
            raise UserError(f"case {c.case_id}: missing channel file {missing}"
                            f" (other cases have {most} channels, _0000 to _{most - 1:04d}); add it or remove the case")
    firsts = {c.case_id for c in split}
    for name in sorted(names):
        stem = strip_image_suffix(name)
        if stem and not name.startswith((".", "_")) and _is_channel(stem) and stem[:-5] not in firsts \
                and not any(c.case_id == stem for c in cases):
            raise UserError(f"{images_dir / name}: a channel file without its case's first channel "
                            f"{stem[:-5]}_0000; add it or remove the file")




def read_info_cfg(path: str | Path) -> dict[str, str]:
    """The `Key: value` lines of an ACDC subject's Info.cfg (`ED: 1`, `ES: 12`, `NbFrame: 30`,
    ...); blank lines are skipped, any other line is an error naming the file."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not readable ({e.__class__.__name__}); expected ACDC's 'ED: 1' lines") from None
    info = {}
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        key, sep, value = line.partition(":")
        if not sep or not key.strip():
            raise UserError(f"{path}: line {n} {line.strip()[:40]!r} is not 'Key: value'; fix the file")
        info[key.strip()] = value.strip()
    return info


def cardiac_phases(path: str | Path, num_frames: int | None = None) -> tuple[int, int] | None:
    """(ED, ES) frame numbers (1-based, ACDC's) of an Info.cfg, None when it names neither; a
    frame that is not a whole number from 1 to `num_frames` (or to its own NbFrame) is an error."""
    info = read_info_cfg(path)
    if "ED" not in info and "ES" not in info:
        return None
    limit = num_frames
    if limit is None and info.get("NbFrame", "").isdigit():
        limit = int(info["NbFrame"])
    frames = []
    for key in ("ED", "ES"):
        value = info.get(key, "")
        if not value.isdigit() or int(value) < 1 or (limit is not None and int(value) > limit):
            within = f" from 1 to {limit}" if limit is not None else " of 1 or more"
            raise UserError(f"{path}: {key}: {value or '(missing)'} is not a frame number{within}; "
                            "fix the file or remove it")
        frames.append(int(value))
    return frames[0], frames[1]


def is_acdc_subject(d: Path) -> bool:
    """A folder of ACDC's layout: its Info.cfg, or frame files named after it (`<d>_frameYY`)."""
    return (d / ACDC_INFO).is_file() or any(
        ACDC_FRAME.fullmatch(strip_image_suffix(f.name) or "") and f.name.startswith(f"{d.name}_frame")
        for f in d.iterdir())


def _acdc_cases(root: Path) -> list[Case]:
    """ACDC's layout: `<root>/<patient>/Info.cfg` beside `<patient>_frameYY.nii.gz` (the ED and
    ES frames, each a case grouped by patient, labelled by `<patient>_frameYY_gt.nii.gz`; the
    frames without the Info.cfg too); a patient folder with no frame files contributes its 4D
    cine `<patient>_4d.nii.gz`."""
    cases = []
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not _is_hidden(p)):
        if not is_acdc_subject(d):
            continue
        found, cine = [], None
        for f in sorted(d.iterdir()):
            stem = strip_image_suffix(f.name)
            if stem is None or _is_hidden(f):
                continue
            if ACDC_FRAME.fullmatch(stem):
                label = next((d / f"{stem}_gt{s}" for s in IMAGE_SUFFIXES if (d / f"{stem}_gt{s}").is_file()), None)
                found.append(Case(stem, f, label, group=d.name))
            elif stem == f"{d.name}_4d":
                cine = Case(stem, f, None, group=d.name)
        cases += found or ([cine] if cine else [])
    return cases


def find_cases(root: str | Path, *, require_labels: bool, flag: str = "--data_dir") -> list[Case]:
    """Cases under `root`, sorted by id, in either layout:

    LASC 2018:      <root>/<case>/lgemri.nrrd   (+ <root>/<case>/laendo.nrrd)
    MSD / nnU-Net:  <root>/imagesTr/<case>[_0000].nii.gz  (+ <root>/labelsTr/<case>.nii.gz)
                    (imagesTs/ too when there is no imagesTr/)
    ACDC:           <root>/<patient>/<patient>_frameYY.nii.gz (+ _gt), Info.cfg (`_acdc_cases`)
    Names starting with "." or "_" are ignored.
    """
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{flag} {root}: no such folder; point it at a LASC or MSD-layout dataset")
    cases = []
    images_dir = next((root / d for d in ("imagesTr", "imagesTs") if (root / d).is_dir()), None)
    if images_dir is not None:
        labels_dir = root / ("labelsTr" if images_dir.name == "imagesTr" else "labelsTs")
        names = {f.name for f in images_dir.iterdir()}
        for name in sorted(names):
            stem = strip_image_suffix(name)
            if name.startswith((".", "_")) or stem is None or (_is_channel(stem) and stem[-4:] != "0000"):
                continue  # hidden (the MSD archive's ._ files), not an image, or a later channel (<case>_0001)
            case_id = stem[:-5] if stem.endswith("_0000") else stem
            label = next((labels_dir / f"{case_id}{s}" for s in IMAGE_SUFFIXES
                          if (labels_dir / f"{case_id}{s}").is_file()), None)
            more = []
            while stem.endswith("_0000") and f"{case_id}_{len(more) + 1:04d}{name[len(stem):]}" in names:
                more.append(images_dir / f"{case_id}_{len(more) + 1:04d}{name[len(stem):]}")
            cases.append(Case(case_id, images_dir / name, label, tuple(more)))
        _check_channel_files(cases, names, images_dir)
    else:
        cases = _acdc_cases(root)
        for d in sorted(p for p in root.iterdir() if p.is_dir() and not _is_hidden(p)):
            if (d / "lgemri.nrrd").is_file():
                label = d / "laendo.nrrd"
                cases.append(Case(d.name, d / "lgemri.nrrd", label if label.is_file() else None))
    if not cases:
        raise UserError(f"{flag} {root}: no cases found; expected <case>/lgemri.nrrd (LASC layout), imagesTr/"
                        "<case>.nii.gz (MSD layout) or <patient>/Info.cfg with <patient>_frameYY.nii.gz (ACDC)")
    if require_labels:
        # An ACDC frame without its _gt is an unlabelled phase of the cine, not a missing file:
        # the labelled frames train.
        cases = [c for c in cases if c.label is not None or not ACDC_FRAME.fullmatch(c.case_id)] or cases
        for c in cases:
            if c.label is None:
                expected = (c.image.parent / "laendo.nrrd" if c.image.name == "lgemri.nrrd"
                            else c.image.parent / f"{c.case_id}_gt.nii.gz" if c.group is not None
                            else root / "labelsTr" / f"{c.case_id}.nii.gz")
                raise UserError(f"case {c.case_id}: missing label {expected}; add it or remove the case")
    return cases


def check_image(image: np.ndarray, path) -> np.ndarray:
    if not np.isfinite(image).all():
        raise UserError(f"{path}: contains NaN or inf voxels; repair or remove the scan")
    return image.astype(np.float32, copy=False)


def binary_mask(array, name: str, foreground=(1,)) -> np.ndarray:
    """A bool mask of `array`, every non-zero voxel of which must hold the same one of the
    `foreground` values (bool arrays pass as they are). Only the non-zero voxels are inspected,
    so a full-size volume with a small atrium costs no sort. Raises ValueError naming `name`
    and the values found: the one check of every mask, in metrics, labels and predictions."""
    a = np.asarray(array)
    if a.dtype == bool:
        return a
    if a.dtype.kind not in "uif":
        raise ValueError(f"{name}: expected a binary mask, got dtype {a.dtype}")
    if a.dtype.kind in "ui" and 1 in foreground and a.size and a.min() >= 0 and a.max() <= 1:
        return a.view(bool) if a.dtype.itemsize == 1 else a != 0  # 0/1 integers: two reductions suffice
    values = np.unique(a[a != 0])  # NaN is non-zero, and never a foreground value
    if values.size > 1 or (values.size == 1 and values[0] not in foreground):
        shown = ", ".join(str(v) for v in values[:6].tolist()) + (", ..." if values.size > 6 else "")
        expected = " or ".join(f"0 and {v}" for v in foreground)
        raise ValueError(f"{name} is not a binary mask (non-zero values {shown}); expected {expected}")
    return a != 0  # floats 0/1, or integers 0/255 (0/1 integers returned above)


def read_mask(array: np.ndarray, path, what: str = "label") -> np.ndarray:
    """uint8 {0, 1} of a mask read from `path` (0/1 or 0/255); anything else is a user error."""
    try:
        return binary_mask(array, f"{path}: {what}", LABEL_VALUES).astype(np.uint8)
    except ValueError as e:
        raise UserError(str(e)) from None


def label_values(label: np.ndarray, path) -> list[int]:
    """The values a label map holds, each checked to be a whole number in 0..255."""
    a = np.asarray(label)
    if a.dtype == np.uint8:
        return np.flatnonzero(np.bincount(a.ravel(), minlength=256)).tolist()  # no sort: a count suffices
    if a.dtype.kind not in "uif" or (a.dtype.kind == "f" and not np.all(np.isfinite(a) & (a == np.round(a)))):
        raise UserError(f"{path}: label holds values that are not whole numbers; expected class values 0..255")
    values = np.unique(a)
    if values[0] < 0 or values[-1] > lbl.MAX_VALUE:
        raise UserError(f"{path}: label values {', '.join(str(v) for v in values[:8].tolist())} lie outside 0..255")
    return [int(v) for v in values]


def check_instances(label: np.ndarray, path) -> int:
    """The number N of instances in an instance label map (0 background, 1..N one per structure,
    a vertebra each): the values must run 1..N without a gap, and each must be one connected
    piece (26-connectivity), since a value over several pieces is a mask of several structures
    (a binary mask given for instances). Errors name the file."""
    values = [v for v in label_values(label, path) if v]
    if values != list(range(1, len(values) + 1)):
        missing = sorted(set(range(1, max(values, default=0) + 1)) - set(values))
        raise UserError(f"{path}: instance values {', '.join(map(str, values[:10]))} are not 1..N without a gap "
                        f"(missing {', '.join(map(str, missing[:10]))}); number the instances 1, 2, ... along the scan")
    a = np.asarray(label)
    boxes = ndimage.find_objects(a.astype(np.int32)) if values else []
    for v, box in enumerate(boxes, 1):
        _, pieces = ndimage.label(a[box] == v, structure=np.ones((3,) * a.ndim, bool))
        if pieces > 1:
            raise UserError(f"{path}: instance {v} is {pieces} separate pieces; each instance must be one connected "
                            "structure (a binary mask of several structures is not an instance map)")
    return len(values)


def class_indices(label: np.ndarray, path, labels: Labels | None) -> np.ndarray:
    """uint8 class indices 0..K of a label map read from `path`. Binary classes (None, or the one
    value 1) read a mask as today (0/1, or 0/255 as LASC stores it); otherwise every value must
    be declared, or the error names the file and the undeclared values."""
    if labels is None or labels.values == (1,):
        return read_mask(label, path)
    present = label_values(label, path)
    undeclared = [v for v in present if v != 0 and v not in labels.values]
    if undeclared:
        raise UserError(f"{path}: label values {', '.join(map(str, undeclared))} are not among the classes "
                        f"{', '.join(map(str, labels.values))}; fix the label or declare them in dataset.json")
    return labels.to_indices(label.astype(np.uint8, copy=False))


def load_label(path, image_shape, image_props: dict, labels: Labels | None = None) -> np.ndarray:
    """Read a label, check it against its image, and return its class indices uint8 0..K
    (`class_indices`: one class is {0, 1}, the LASC convention 0/255 read as 0/1)."""
    return class_indices(read_label(path, image_shape, image_props), path, labels)


def load_instances(path, image_shape, image_props: dict) -> np.ndarray:
    """Read an instance label map (`check_instances`: 0 and 1..N, one piece each), checked
    against its image, as uint8."""
    label = read_label(path, image_shape, image_props)
    check_instances(label, path)
    return label.astype(np.uint8, copy=False)


def read_label(path, image_shape, image_props: dict) -> np.ndarray:
    """A label map as stored, checked to lie on its image's grid."""
    label, props = read_image(path)
    if label.shape != tuple(image_shape):
        raise UserError(f"{path}: label shape {label.shape} differs from its image's {tuple(image_shape)}; "
                        "they must be on the same grid")
    if not same_geometry(props, image_props):
        raise UserError(f"{path}: label geometry (spacing/origin/direction) differs from its image's; "
                        "resample the label onto the image grid")
    return label


def load_case(case: Case, *, with_label: bool = True):
    """`(image float32 (D, H, W), label uint8 {0, 1} or None, props)`, validated."""
    image, props = read_image(case.image)
    image = check_image(image, case.image)
    label = load_label(case.label, image.shape, props) if with_label and case.label is not None else None
    return image, label, props


# ----------------------------------------------------------------------------- scans of C channels

# z-score over the whole scan, or over its non-zero voxels; or CT's fixed scale (CT_WINDOW)
NORMALIZATIONS = ("whole", "nonzero", "ct")
# Hounsfield units kept by the "ct" rule, then divided by 1000: air -1, water 0, bone about 1;
# dense metal saturates. A fixed scale, since a HU value means the same tissue in every scan.
CT_WINDOW = (-1000.0, 3000.0)


def normalization_rules(choice: str, channels: int, names=None) -> tuple[str, ...]:
    """The rule of each channel: `choice` for every channel, or for "auto" "nonzero" for a
    channel that dataset.json names as an MRI sequence (any name but CT: brain MRI is
    skull-stripped to a zero background), "ct" for CT, and "whole" for undeclared channels."""
    if choice != "auto":
        assert choice in NORMALIZATIONS, f"normalisation {choice!r}"
        return (choice,) * channels
    if names is None:
        return ("whole",) * channels
    return tuple("ct" if name.strip().upper() == "CT" else "nonzero" for name in names)


def read_case_info(case: Case) -> tuple[tuple[int, int, int], dict, int]:
    """`(shape (D, H, W), props, channels)` of a case's image from the headers alone."""
    shape, props, channels = read_channels_info(case.image)
    return shape, props, channels + len(case.more)


def read_case_image(case: Case) -> tuple[np.ndarray, dict]:
    """`(image float32 (C, D, H, W), props)` of a case: its 4D file, its 3D file (C = 1), or its
    channel files stacked, which must share one grid; checked for NaN and inf."""
    image, props = read_image_channels(case.image)
    if case.more:
        out = np.empty((len(case.files), *image.shape[1:]), np.float32)
        out[0] = check_image(image[0], case.image)
        for k, path in enumerate(case.more, 1):
            channel, channel_props = read_image(path)
            if channel.shape != out.shape[1:] or not same_geometry(channel_props, props):
                differ = (f"has shape {channel.shape} and spacing {channel_props['spacing']}, channel 0 "
                          f"({case.image.name}) {out.shape[1:]} and {props['spacing']}"
                          if channel.shape != out.shape[1:] or not same_spacing(channel_props["spacing"],
                                                                              props["spacing"])
                          else f"has another origin or direction than channel 0 ({case.image.name})")
                raise UserError(f"{path}: channel {k} {differ}; the channels must share one grid "
                                "(resample them onto channel 0's)")
            out[k] = check_image(channel, path)
        return out, props
    return check_image(image, case.image), props


def normalise(image: np.ndarray, rules) -> np.ndarray:
    """Normalise each channel of `image (C, D, H, W)` float32 in place by its rule: z-score
    "whole" over the whole scan (as `zscore`), "nonzero" over its non-zero voxels (an MRI's
    skull-stripped brain), the zero background staying 0; "ct": HU clipped to CT_WINDOW and
    divided by 1000. Returns the value per channel (C,) with which anything beyond the scan is
    padded: what a raw 0 becomes, or air (-1) for CT."""
    assert image.ndim == 4 and len(rules) == image.shape[0], f"{image.shape} vs rules {rules}"
    pads = np.zeros(len(rules), np.float32)
    for c, rule in enumerate(rules):
        channel = image[c]
        if rule == "ct":
            np.clip(channel, *CT_WINDOW, out=channel)
            channel /= 1000.0
            pads[c] = CT_WINDOW[0] / 1000.0
            continue
        inside = channel != 0 if rule == "nonzero" else None
        if inside is not None and np.count_nonzero(inside) > 1:
            values = channel[inside]
            mean, std = float(values.mean()), float(values.std())
            channel[inside] = (values - mean) / (std if std > 1e-6 else 1.0)
            continue  # the background stays 0, and so pads with 0
        assert rule in NORMALIZATIONS, f"normalisation {rule!r}"
        mean, std = float(channel.mean()), float(channel.std())
        std = std if std > 1e-6 else 1.0
        channel -= mean
        channel /= std
        pads[c] = -mean / std
    return pads


def resample_channels(image: np.ndarray, props: dict, spacing) -> np.ndarray:
    """Each channel of `image (C, D, H, W)` resampled (linearly) to `spacing`."""
    return np.stack([resample(channel, props, spacing, label=False)[0] for channel in image])


def load_volume(case: Case, spacing, labels: Labels | None, rules,
                instances: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """`(normalised image (C, D, H, W), pad value per channel (C,), class indices or None)` of a
    case at `spacing` (resampled when its own differs: linear, labels nearest; an axis whose
    `spacing` is None keeps its own, `working_spacing`). `instances`: the label is an instance
    map (`load_instances`), kept as its values 0..N."""
    image, props = read_case_image(case)
    if len(rules) != image.shape[0]:
        raise UserError(f"{case.image}: has {image.shape[0]} channel(s), expected {len(rules)} "
                        "(as the data set's other scans, or the checkpoint)")
    label = None
    if case.label is not None:
        label = (load_instances(case.label, image.shape[1:], props) if instances
                 else load_label(case.label, image.shape[1:], props, labels))
    spacing = working_spacing(props["spacing"], spacing)
    if not same_spacing(props["spacing"], spacing):
        image = resample_channels(image, props, spacing)
        label = None if label is None else resample(label, props, spacing, label=True)[0]
    return image, normalise(image, rules), label


# ----------------------------------------------------------------------------- masks

def bounding_box(mask: np.ndarray) -> tuple[slice, ...] | None:
    """Slices of the smallest box holding every non-zero voxel of `mask`; None when it is empty.

    One axis at a time on an already narrowed array, so that only the first projection reads
    the whole volume."""
    box = [slice(0, n) for n in mask.shape]
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hit = np.flatnonzero(mask[tuple(box)].any(axis=other))
        if hit.size == 0:
            return None
        box[axis] = slice(box[axis].start + int(hit[0]), box[axis].start + int(hit[-1]) + 1)
    return tuple(box)


def box_centre(box: tuple[slice, ...]) -> tuple[float, ...]:
    """The centre of a box in voxel coordinates: [2, 6) -> 4.0 (stop is exclusive)."""
    return tuple((s.start + s.stop) / 2 for s in box)


def largest_component(mask: np.ndarray, *, connectivity: int) -> np.ndarray:
    """The largest connected component of a (D, H, W) mask, same dtype, the rest zero.

    `connectivity` 1 joins face neighbours (6-connected), 3 also edges and corners
    (26-connected). Labelled inside the mask's bounding box only, so a full-size scan costs no
    full-size label volume. Ties go to the component met first in (z, y, x) order."""
    box = bounding_box(mask)
    if box is None:
        return np.zeros_like(mask)
    labels, _ = ndimage.label(mask[box], structure=ndimage.generate_binary_structure(3, connectivity))
    out = np.zeros_like(mask)
    out[box] = labels == 1 + int(np.argmax(np.bincount(labels.ravel())[1:]))
    return out


# ----------------------------------------------------------------------------- geometric rules

def downscale_factors(scale_factor) -> tuple[int, int, int]:
    """Integer block sizes of a scale factor: (0.5, 0.25, 0.25) -> (2, 4, 4)."""
    factors = []
    for s in scale_factor:
        k = round(1 / s) if s > 0 else 0
        if s <= 0 or s > 1 or abs(k * s - 1) > 1e-6:
            raise UserError(f"--scale_factor {' '.join(str(x) for x in scale_factor)}: each factor must be "
                            "1/k for a whole number k (e.g. 0.5 0.25 0.25)")
        factors.append(k)
    return tuple(factors)


def pad_multiple(factors) -> tuple[int, int, int]:
    """Full-resolution multiple that makes the downscaled shape divisible by 16 (the V-Net's
    four halvings): 32 in D and 64 in H and W for factors (2, 4, 4)."""
    return tuple(16 * k for k in factors)


def round_up(shape, multiple) -> tuple[int, int, int]:
    """Example: round_up((88, 576, 640), (32, 64, 64)) -> (96, 576, 640)."""
    return tuple(int(math.ceil(s / m) * m) for s, m in zip(shape, multiple))


def pad_symmetric(array: np.ndarray, shape, value=0.0) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Pad `array` to `shape`, half before and half after (the odd voxel after). Returns the
    padded array and the padding before each axis, which the locator's centres need. An array
    (C, D, H, W) is padded alike in every channel, `value` then one number or one per channel."""
    lead = array.shape[:array.ndim - len(shape)]
    if lead:
        values = np.broadcast_to(np.asarray(value, np.float64), lead)
        padded = [pad_symmetric(channel, shape, v) for channel, v in zip(array, values)]
        return np.stack([p for p, _ in padded]), padded[0][1]
    pad_before = tuple((t - s) // 2 for s, t in zip(array.shape, shape))
    assert min(pad_before) >= 0, f"cannot pad {array.shape} to smaller {tuple(shape)}"
    widths = [(b, t - s - b) for b, s, t in zip(pad_before, array.shape, shape)]
    return np.pad(array, widths, constant_values=value), pad_before


def downscale(array: np.ndarray, factors) -> np.ndarray:
    """Block mean over `factors` of the last three axes (their shape must divide): exact area
    downsampling, of each channel of a (C, D, H, W) array alike."""
    lead, spatial = array.shape[:-3], array.shape[-3:]
    d, h, w = (s // k for s, k in zip(spatial, factors))
    assert (d * factors[0], h * factors[1], w * factors[2]) == spatial, f"{array.shape} vs {factors}"
    blocks = array.reshape(*lead, d, factors[0], h, factors[1], w, factors[2])
    return blocks.mean(axis=tuple(len(lead) + a for a in (1, 3, 5)), dtype=np.float32)


def zscore(image: np.ndarray) -> tuple[np.ndarray, float]:
    """Normalise by the scan's own mean and standard deviation. Returns the normalised
    image and the value a raw 0 takes, which is what the zero padding becomes."""
    mean, std = float(image.mean()), float(image.std())
    std = std if std > 1e-6 else 1.0
    return ((image - mean) / std).astype(np.float32), -mean / std


def locator_input(image: np.ndarray, pad_value, factors, shape=None) -> tuple[np.ndarray, tuple]:
    """The locator's view of a z-scored scan (D, H, W), or (C, D, H, W) with a pad value per
    channel: padded symmetrically to `shape` (default: its own shape rounded up to the pad
    multiple) with `pad_value`, then block-averaged by `factors`. Returns `(low-resolution
    (d, h, w) or (C, d, h, w) float32, padding before each axis)`."""
    shape = round_up(image.shape[-3:], pad_multiple(factors)) if shape is None else shape
    padded, pad_before = pad_symmetric(image, shape, pad_value)
    return downscale(padded, factors), pad_before


@dataclass(frozen=True)
class Location:
    """Where the locator puts the atrium of one scan: `centre` (z, y, x) in voxels of the scan,
    and `extent` (d, h, w) in voxels of the located atrium, None when the locator found nothing
    (the centre is then the volume's)."""
    centre: tuple[float, float, float]
    extent: tuple[int, int, int] | None

    @property
    def found(self) -> bool:
        return self.extent is not None

    def larger_than(self, patch_size) -> bool:
        return self.found and any(e > p for e, p in zip(self.extent, patch_size))

    def record(self) -> dict:
        """JSON form (`centres.json`): centre, extent and found."""
        return {"centre": list(self.centre), "extent": None if self.extent is None else list(self.extent),
                "found": self.found}


def locate(prob: np.ndarray, factors, pad_before, shape, threshold: float = 0.5) -> Location:
    """The atrium's `Location` in a scan of `shape` from the locator's low-resolution
    probabilities.

    Keeps the largest 6-connected component above `threshold`, scales its bounding box back
    to full resolution (a low-resolution voxel i covers [i k, (i + 1) k)) and removes the
    padding; its centre is the crop's centre. With nothing found, the volume's centre.
    """
    box = bounding_box(largest_component(prob >= threshold, connectivity=1))
    if box is None:
        return Location(tuple((s - 1) / 2 for s in shape), None)
    k, pad = np.asarray(factors), np.asarray(pad_before)
    lo = np.array([s.start for s in box]) * k - pad
    hi = np.array([s.stop for s in box]) * k - pad
    return Location(tuple(float(c) for c in (lo + hi) / 2), tuple(int(e) for e in hi - lo))


def patch_size_for(extents, padding, limit) -> tuple[int, int, int]:
    """The segmenter's fixed input size: the largest atrium extent plus the total margin
    `padding`, rounded up to a multiple of 16, at most `limit` (the padded volume).

    Example: patch_size_for([(60, 110, 180)], (30, 30, 30), (96, 640, 640)) -> (96, 144, 224).
    """
    largest = np.max(np.asarray(extents), axis=0)
    return tuple(int(min(math.ceil((e + p) / 16) * 16, m)) for e, p, m in zip(largest, padding, limit))


def crop_start(centre, size, shape) -> tuple[int, int, int]:
    """Start of a `size` window centred on `centre`, shifted to lie inside `shape`; a window
    larger than the volume on an axis is centred on the volume (the rest is padding).

    Example: crop_start((10, 50, 50), (16, 32, 32), (40, 64, 64)) -> (2, 32, 32).
    """
    start = []
    for c, s, n in zip(centre, size, shape):
        if s <= n:
            start.append(int(min(max(round(c - s / 2), 0), n - s)))
        else:
            start.append(-((s - n) // 2))
    return tuple(start)


def crop(array: np.ndarray, start, size, fill=0.0) -> np.ndarray:
    """`array[start:start+size]` per spatial axis, reading `fill` outside the volume. An array
    with a leading channel axis (C, D, H, W) is cropped alike in every channel, `fill` then one
    number or one per channel."""
    lead = array.shape[:array.ndim - len(size)]
    out = np.empty((*lead, *size), dtype=array.dtype)
    out[...] = np.asarray(fill, dtype=array.dtype).reshape(-1, *[1] * len(size)) if lead else fill
    spatial = array.shape[len(lead):]
    src = tuple(slice(max(a, 0), min(a + s, n)) for a, s, n in zip(start, size, spatial))
    if any(sl.stop <= sl.start for sl in src):
        return out  # the window lies wholly outside the volume
    dst = tuple(slice(sl.start - a, sl.stop - a) for sl, a in zip(src, start))
    out[(..., *dst)] = array[(..., *src)]
    return out


def paste(patch: np.ndarray, start, shape) -> np.ndarray:
    """A zero volume of `shape` with `patch` placed at `start` (the inverse of `crop`); a patch
    (K, d, h, w) gives (K, *shape)."""
    lead = patch.shape[:patch.ndim - len(shape)]
    out = np.zeros((*lead, *shape), dtype=patch.dtype)
    dst = tuple(slice(max(a, 0), min(a + s, n)) for a, s, n in zip(start, patch.shape[len(lead):], shape))
    src = tuple(slice(sl.start - a, sl.stop - a) for sl, a in zip(dst, start))
    out[(..., *dst)] = patch[(..., *src)]
    return out


class PatchSampler:
    """Random starts of `size` patches of a labelled volume with a foreground bias: a patch
    whose background (label 0, and any part beyond the volume) exceeds `max_background` of its
    voxels is redrawn, up to `max_tries` draws; after that, the patch is placed around a random
    foreground voxel (centred on it, shifted inside the volume: `crop_start`). A summed-volume
    table of the foreground makes each draw's count 8 reads, so `max_tries` in the thousands
    costs nothing beside the crop itself."""

    def __init__(self, label: np.ndarray, size, max_background: float = 0.95, max_tries: int = 1000):
        if not 0 < max_background <= 1:
            raise ValueError(f"max_background {max_background}: must lie in (0, 1]")
        self.shape, self.size = label.shape, tuple(int(s) for s in size)
        self.max_background, self.max_tries = max_background, max_tries
        fg = label > 0
        self.table = np.zeros(tuple(n + 1 for n in fg.shape), np.int64)
        self.table[1:, 1:, 1:] = fg.cumsum(0, dtype=np.int64).cumsum(1).cumsum(2)
        self.foreground = np.flatnonzero(fg)  # for the fallback draw

    def foreground_in(self, start) -> int:
        """Foreground voxels inside the patch at `start` (parts beyond the volume hold none)."""
        (z0, y0, x0) = (max(a, 0) for a in start)
        (z1, y1, x1) = (min(a + s, n) for a, s, n in zip(start, self.size, self.shape))
        if z1 <= z0 or y1 <= y0 or x1 <= x0:
            return 0
        t = self.table
        return int(t[z1, y1, x1] - t[z0, y1, x1] - t[z1, y0, x1] - t[z1, y1, x0]
                   + t[z0, y0, x1] + t[z0, y1, x0] + t[z1, y0, x0] - t[z0, y0, x0])

    def anywhere(self, rng: np.random.Generator) -> tuple[int, int, int]:
        """A patch start drawn uniformly, without regard to the foreground."""
        highs = [max(n - s, 0) + 1 for n, s in zip(self.shape, self.size)]
        return tuple(int(rng.integers(0, h)) - max(s - n, 0) // 2 for h, s, n in zip(highs, self.size, self.shape))

    def __call__(self, rng: np.random.Generator) -> tuple[int, int, int]:
        """One patch start (may be negative or reach past the volume where the patch is larger
        than it: `crop` fills there)."""
        least = (1 - self.max_background) * math.prod(self.size)
        for _ in range(self.max_tries):
            start = self.anywhere(rng)
            if self.foreground_in(start) >= least - 1e-9:
                return start
        if self.foreground.size == 0:
            return start  # nothing to centre on: the last draw
        centre = np.unravel_index(int(rng.choice(self.foreground)), self.shape)
        return crop_start(centre, self.size, self.shape)
