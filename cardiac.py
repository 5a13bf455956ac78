"""Cardiac function from label maps of a cine MRI (ACDC's labels: 1 RV cavity, 2 LV myocardium,
3 LV cavity), and its agreement with reference masks.

Per subject: the LV, RV and myocardium volume of every frame in ml (voxel count x voxel volume),
then at the end-diastolic (ED) and end-systolic (ES) frames EDV, ESV, stroke volume SV = EDV -
ESV, ejection fraction EF = 100 SV / EDV in %, for the LV and the RV, and the LV myocardial mass
(myocardium volume at ED x 1.05 g/ml). Both ventricles use the same ED and ES frames.

Rules (stated in the outputs too):
- ED and ES are the frames an ACDC subject's Info.cfg names; without them, the frames of the
  largest and the smallest LV cavity on the reference's volume curve, or on the prediction's
  when the subject has no reference. One set of frames serves prediction and reference alike,
  so that their differences compare the same instants.
- an EDV of 0 ml leaves that ventricle's EF undefined: NaN, with the reason in the subject's
  notes, and the subject is left out of that quantity's agreement statistics (its n says so).

`agreement` gives, over subjects, the mean absolute error, the bias (mean of prediction minus
reference), the 95 % limits of agreement (bias +- 1.96 sample SD, ddof=1) and Pearson's r.
numpy only: no deep-learning dependency.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import dataset as ds
from utils import UserError

CARDIAC_LABELS = {"rv": 1, "myo": 2, "lv": 3}  # ACDC's label values
MYOCARDIUM_DENSITY = 1.05  # g/ml, the usual convention for the LV mass
LOA_Z = 1.96  # limits of agreement: bias +- this many sample SDs (95 % of a normal spread)
PHASES_INFO, PHASES_REF, PHASES_PRED = "Info.cfg", "reference volume curve", "prediction volume curve"
PHASES_CURVE = "volume curve"  # `function_of_frames` without given phases
EF_RULE = "an EDV of 0 ml leaves that ventricle's EF undefined (NaN, left out of the statistics)"
PHASES_RULE = ("ED/ES from Info.cfg when it names them, else the largest/smallest LV cavity on the "
               "reference's volume curve (the prediction's when there is no reference)")
# (key, name, unit of the value, unit of a difference), in the order of the tables.
QUANTITIES = (("lv_edv", "LV EDV", "ml", "ml"), ("lv_esv", "LV ESV", "ml", "ml"), ("lv_sv", "LV SV", "ml", "ml"),
              ("lv_ef", "LV EF", "%", "pp"), ("lv_mass", "LV mass", "g", "g"),
              ("rv_edv", "RV EDV", "ml", "ml"), ("rv_esv", "RV ESV", "ml", "ml"), ("rv_sv", "RV SV", "ml", "ml"),
              ("rv_ef", "RV EF", "%", "pp"))
PLOTTED = ("lv_ef", "lv_edv", "lv_esv", "lv_mass", "rv_ef")  # the Bland-Altman panels


def _check_spacing(spacing, ndim: int) -> np.ndarray:
    s = np.asarray(spacing, dtype=np.float64)
    if s.shape != (ndim,) or not np.all(np.isfinite(s)) or not np.all(s > 0):
        raise ValueError(f"spacing: expected {ndim} positive voxel sizes in mm (array order), got {spacing!r}")
    return s


def volume_ml(label: np.ndarray, spacing, value: int) -> float:
    """Volume in ml of the voxels of `label (D, H, W)` equal to `value`: their count times the
    voxel volume sz sy sx (mm^3), over 1000. spacing: (sz, sy, sx) mm, array order."""
    label = np.asarray(label)
    s = _check_spacing(spacing, label.ndim)
    return int(np.count_nonzero(label == value)) * float(np.prod(s)) / 1000.0


def check_labels(labels: dict) -> dict[str, int]:
    """`labels` {"rv", "myo", "lv"} -> label value, checked: distinct positive integers."""
    if set(labels) != set(CARDIAC_LABELS):
        raise ValueError(f"labels: expected the structures {sorted(CARDIAC_LABELS)}, got {sorted(labels)}")
    values = list(labels.values())
    if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0 for v in values) \
            or len(set(values)) != len(values):
        raise ValueError(f"labels: expected distinct positive integer values, got {labels}")
    return {k: int(v) for k, v in labels.items()}


def frame_volumes(label: np.ndarray, spacing, labels=CARDIAC_LABELS) -> dict[str, float]:
    """{"rv", "myo", "lv"} -> ml of one frame `label (D, H, W)`."""
    return {name: volume_ml(label, spacing, value) for name, value in check_labels(labels).items()}


def phases_of_curve(lv_curve: dict[int, float]) -> tuple[int, int]:
    """(ED, ES): the frames of the largest and of the smallest LV cavity (the earliest on a tie)."""
    if not lv_curve:
        raise ValueError("phases_of_curve: no frames")
    frames = sorted(lv_curve)
    return max(frames, key=lambda f: lv_curve[f]), min(frames, key=lambda f: lv_curve[f])


@dataclass(frozen=True)
class CardiacFunction:
    """One subject's function. Volumes in ml, EF in %, mass in g; `curves`: structure ->
    {frame: ml} for every frame read; `notes`: why a value is NaN."""
    lv_edv: float
    lv_esv: float
    lv_sv: float
    lv_ef: float
    rv_edv: float
    rv_esv: float
    rv_sv: float
    rv_ef: float
    lv_mass: float
    ed_frame: int
    es_frame: int
    phases_from: str
    curves: dict
    notes: tuple[str, ...] = ()


def _ejection(curve: dict[int, float], ed: int, es: int, name: str) -> tuple[float, float, float, float, list]:
    edv, esv = curve[ed], curve[es]
    if edv == 0:
        return edv, esv, edv - esv, math.nan, [f"{name} EDV is 0 ml at frame {ed}: {name} EF undefined"]
    return edv, esv, edv - esv, 100.0 * (edv - esv) / edv, []


def function_of_curves(curves: dict[str, dict[int, float]], phases: tuple[int, int],
                       phases_from: str) -> CardiacFunction:
    """The function at ED/ES `phases` (frame numbers, keys of the curves) of volume curves
    {"rv", "myo", "lv"} -> {frame: ml}."""
    ed, es = phases
    for name, curve in curves.items():
        assert ed in curve and es in curve, f"{name}: frames {sorted(curve)} lack ED {ed} or ES {es}"
    lv = _ejection(curves["lv"], ed, es, "LV")
    rv = _ejection(curves["rv"], ed, es, "RV")
    return CardiacFunction(*lv[:4], *rv[:4], lv_mass=MYOCARDIUM_DENSITY * curves["myo"][ed], ed_frame=ed,
                           es_frame=es, phases_from=phases_from, curves=curves, notes=tuple(lv[4] + rv[4]))


def volume_curves(frames: dict[int, np.ndarray], spacing, labels=CARDIAC_LABELS) -> dict[str, dict[int, float]]:
    """{"rv", "myo", "lv"} -> {frame: ml} of label maps `frames` {frame number: (D, H, W)}."""
    per_frame = {f: frame_volumes(a, spacing, labels) for f, a in sorted(frames.items())}
    return {name: {f: v[name] for f, v in per_frame.items()} for name in CARDIAC_LABELS}


def function_of_frames(frames: dict[int, np.ndarray], spacing, phases: tuple[int, int] | None = None,
                       labels=CARDIAC_LABELS, *, phases_from: str | None = None) -> CardiacFunction:
    """One subject's function from its label maps `frames` {frame number: (D, H, W)} on one grid
    of `spacing` (sz, sy, sx) mm. `phases`: (ED, ES) frame numbers, or None for the frames of the
    largest and smallest LV cavity (`phases_from` then "volume curve", else "given" unless
    named). Raises ValueError for no frames, phases that are not among the frames, or a bad
    spacing or label set."""
    if not frames:
        raise ValueError("function_of_frames: no frames")
    if phases is not None and not set(phases) <= set(frames):
        raise ValueError(f"phases (ED, ES) {tuple(phases)} are not among the frames {sorted(frames)}")
    curves = volume_curves(frames, spacing, labels)
    if phases is None:
        phases, phases_from = phases_of_curve(curves["lv"]), phases_from or PHASES_CURVE
    return function_of_curves(curves, tuple(phases), phases_from or "given")


def agreement(pred, ref) -> dict[str, float]:
    """Agreement of paired values over subjects, the pairs with a NaN left out: n, mae = mean
    |pred - ref|, bias = mean(pred - ref), sd = sample SD of pred - ref (ddof=1), loa_low and
    loa_high = bias -+ 1.96 sd, r = Pearson's correlation of pred and ref. NaN where a value
    needs more pairs (sd and r need 2) or r a spread in both (constant values)."""
    p, t = np.asarray(pred, dtype=np.float64).ravel(), np.asarray(ref, dtype=np.float64).ravel()
    if p.shape != t.shape:
        raise ValueError(f"pred {p.shape} and ref {t.shape} must hold the same number of values")
    keep = np.isfinite(p) & np.isfinite(t)
    p, t = p[keep], t[keep]
    n = int(p.size)
    nan = math.nan
    if n == 0:
        return {"n": 0, "mae": nan, "bias": nan, "sd": nan, "loa_low": nan, "loa_high": nan, "r": nan}
    d = p - t
    bias = float(d.mean())
    sd = float(d.std(ddof=1)) if n > 1 else nan
    r = nan
    if n > 1:
        dp, dt = p - p.mean(), t - t.mean()
        den = math.sqrt(float((dp * dp).sum()) * float((dt * dt).sum()))
        r = float((dp * dt).sum()) / den if den > 0 else nan
    return {"n": n, "mae": float(np.abs(d).mean()), "bias": bias, "sd": sd,
            "loa_low": bias - LOA_Z * sd, "loa_high": bias + LOA_Z * sd, "r": r}


# ----------------------------------------------------------------------------- subjects on disk

@dataclass(frozen=True)
class Subject:
    """One subject's function from its prediction and, when labelled, its reference masks."""
    subject: str
    prediction: str  # "frames" (one file per frame) or "4D map"
    pred: CardiacFunction
    ref: CardiacFunction | None


def frame_number(case: ds.Case) -> int | None:
    """The frame YY of an ACDC frame case `<patient>_frameYY`, None for a cine `<patient>_4d`."""
    match = ds.ACDC_FRAME.fullmatch(case.case_id)
    return int(match["frame"]) if match else None


def _check_grid(grid: tuple, ref_path, ref: np.ndarray, ref_props: dict) -> None:
    """A predicted frame, `grid` = (path, shape, props), must lie on its reference's grid."""
    path, shape, props = grid
    if tuple(shape) != ref.shape or not ds.same_geometry(props, ref_props):
        raise UserError(f"{path}: prediction grid (shape/spacing/origin/direction) differs from its reference "
                        f"{ref_path}; predict on the original scan")


def _read_prediction(subject: str, cases: list[ds.Case], pred_dir: Path, find_prediction, labels):
    """(kind, curves, frame -> (path, shape, props)) of a subject's prediction: one file per
    frame case when every frame has one, else the 4D map `<subject>_4d`."""
    frames = {frame_number(c): c for c in cases if frame_number(c) is not None}
    files = {f: find_prediction(pred_dir, c.case_id) for f, c in frames.items()}
    if frames and all(files.values()):
        curves, grids = {n: {} for n in CARDIAC_LABELS}, {}
        for f, path in sorted(files.items()):
            array, props = ds.read_image(path)
            for name, v in frame_volumes(array, props["spacing"], labels).items():
                curves[name][f] = v
            grids[f] = (path, array.shape, props)
        return "frames", curves, grids
    cine = find_prediction(pred_dir, f"{subject}_4d")
    if cine is None:
        lacking = [c.case_id for f, c in sorted(frames.items()) if files[f] is None]
        missing = (f"no prediction {pred_dir / lacking[0]}.nii.gz nor a 4D map" if lacking
                   else "no prediction: no 4D map")
        raise UserError(f"{missing} {pred_dir / subject}_4d.nii.gz (or .nrrd, ...); predict the subject's frames "
                        "or its cine")
    maps, props = ds.read_image_channels(cine)
    if maps.shape[0] < 2:
        raise UserError(f"{cine}: a single 3D label map; expected a 4D map of the cine's frames (T, D, H, W)")
    for c in cases:  # a cine scan in --data_dir: the map must hold its frames on its grid
        if frame_number(c) is None:
            shape, image_props, channels = ds.read_channels_info(c.image)
            if channels != maps.shape[0] or tuple(shape) != maps.shape[1:] or not ds.same_geometry(props, image_props):
                raise UserError(f"{cine}: {maps.shape[0]} frame(s) of {maps.shape[1:]} differ from the cine {c.image} "
                                f"({channels} frame(s) of {tuple(shape)}) or its geometry; predict on that cine")
    curves = volume_curves({t + 1: m for t, m in enumerate(maps)}, props["spacing"], labels)
    return "4D map", curves, {t + 1: (cine, maps.shape[1:], props) for t in range(maps.shape[0])}


def subject_function(subject: str, cases: list[ds.Case], pred_dir, find_prediction,
                     labels=CARDIAC_LABELS) -> Subject:
    """The function of one subject (an ACDC patient folder) from its predictions in `pred_dir`,
    against the reference masks of its labelled frame cases. `find_prediction(pred_dir, name)`
    -> the prediction file of `name` or None. ED/ES as the module says; Info.cfg frames outside
    the 4D map's frames, or not among the frames read, are an error naming the file."""
    pred_dir = Path(pred_dir)
    kind, pred_curves, grids = _read_prediction(subject, cases, pred_dir, find_prediction, labels)
    ref_curves = {n: {} for n in CARDIAC_LABELS}
    for c in sorted((c for c in cases if c.label is not None and frame_number(c) is not None), key=frame_number):
        f = frame_number(c)
        label, props = ds.read_image(c.label)
        if f not in grids:
            raise UserError(f"{c.label}: frame {f} is not in the prediction's frames 1..{max(grids)}; "
                            "predict on this subject's cine")
        _check_grid(grids[f], c.label, label, props)
        for name, v in frame_volumes(label, props["spacing"], labels).items():
            ref_curves[name][f] = v
    has_ref = bool(ref_curves["lv"])
    info = cases[0].image.parent / ds.ACDC_INFO
    phases = ds.cardiac_phases(info, len(grids) if kind == "4D map" else None) if info.is_file() else None
    if phases is not None:
        for what, curve in (("the prediction", pred_curves["lv"]), ("the reference masks", ref_curves["lv"])):
            if curve and not set(phases) <= set(curve):
                raise UserError(f"{info}: ED {phases[0]} / ES {phases[1]} are not among the frames of {what} "
                                f"({', '.join(map(str, sorted(curve)))}); fix the file or add those frames")
        source = PHASES_INFO
    elif has_ref:
        phases, source = phases_of_curve(ref_curves["lv"]), PHASES_REF
    else:
        phases, source = phases_of_curve(pred_curves["lv"]), PHASES_PRED
    ref = function_of_curves(ref_curves, phases, source) if has_ref else None
    return Subject(subject, kind, function_of_curves(pred_curves, phases, source), ref)


def group_subjects(cases: list[ds.Case]) -> dict[str, list[ds.Case]]:
    """Cases by subject (`case.group`), in order of first appearance; cases without a group
    (not the ACDC layout) are left out."""
    groups: dict[str, list[ds.Case]] = {}
    for c in cases:
        if c.group is not None:
            groups.setdefault(c.group, []).append(c)
    return groups


def evaluate_subjects(cases: list[ds.Case], pred_dir, find_prediction,
                      labels=CARDIAC_LABELS) -> tuple[list[Subject], list[str]]:
    """`subject_function` of every subject of `cases`: (the subjects done, "<subject>: <why>"
    for each that failed with a user error), so that one bad subject does not stop a batch."""
    done, failed = [], []
    for subject, group in group_subjects(cases).items():
        try:
            done.append(subject_function(subject, group, pred_dir, find_prediction, labels))
        except UserError as e:
            failed.append(f"{subject}: {e}")
    return done, failed


# ----------------------------------------------------------------------------- tables

def _cell(v):
    """A table's number to 6 decimals: a microlitre is far below a voxel's volume, and float
    noise such as 0.9000000000000001 would only distract."""
    return round(v, 6) if isinstance(v, float) and math.isfinite(v) else v


def subject_row(s: Subject) -> dict:
    """A row of cardiac.csv: the phases, then per quantity the prediction's value, the
    reference's and their difference (empty without a reference), then the notes."""
    row = {"subject": s.subject, "prediction": s.prediction, "phases_from": s.pred.phases_from,
           "ed_frame": s.pred.ed_frame, "es_frame": s.pred.es_frame}
    for key, *_ in QUANTITIES:
        p = getattr(s.pred, key)
        r = getattr(s.ref, key) if s.ref else ""
        row |= {f"{key}_pred": _cell(p), f"{key}_ref": _cell(r), f"{key}_diff": _cell(p - r) if s.ref else ""}
    notes = [f"pred: {n}" for n in s.pred.notes] + [f"ref: {n}" for n in (s.ref.notes if s.ref else ())]
    row["notes"] = "; ".join(notes + ([] if s.ref else ["no reference masks"]))
    return row


def volume_rows(s: Subject) -> list[dict]:
    """Rows of cardiac_volumes.csv: the volume of every frame read, of the prediction and the
    reference, with the frame's phase (ED, ES or empty)."""
    rows = []
    for source, fn in (("pred", s.pred), ("ref", s.ref)):
        if fn is None:
            continue
        for f in sorted(fn.curves["lv"]):
            phase = "/".join(p for p, at in (("ED", fn.ed_frame), ("ES", fn.es_frame)) if at == f)
            rows.append({"subject": s.subject, "source": source, "frame": f, "phase": phase,
                         **{f"{name}_ml": _cell(fn.curves[name][f]) for name in ("lv", "rv", "myo")}})
    return rows


def summary_rows(subjects: list[Subject]) -> list[dict]:
    """Rows of cardiac_summary.csv: `agreement` of every quantity over the subjects with a
    reference, the differences' unit beside it."""
    paired = [s for s in subjects if s.ref is not None]
    rows = []
    for key, _, _, diff_unit in QUANTITIES:
        a = agreement([getattr(s.pred, key) for s in paired], [getattr(s.ref, key) for s in paired])
        rows.append({"quantity": key, "unit": diff_unit, **{k: _cell(v) for k, v in a.items()}})
    return rows


def _num(v: float, digits: int = 1) -> str:
    return "nan" if v != v else f"{v:.{digits}f}"


def format_summary_line(name: str, unit: str, a: dict) -> str:
    """e.g. `LV EF: MAE 2.1 pp, bias -0.4, LoA [-5.0, 4.2], r 0.97 (n=10)`."""
    if a["n"] == 0:
        return f"{name}: no subject with both values (n=0)"
    return (f"{name}: MAE {_num(a['mae'])} {unit}, bias {_num(a['bias'])}, LoA [{_num(a['loa_low'])}, "
            f"{_num(a['loa_high'])}], r {_num(a['r'], 2)} (n={a['n']})")


def format_subject_table(subjects: list[Subject]) -> str:
    """Per subject: the prediction's kind, the phases used and where from, and LV and RV EF of
    the reference and the prediction with the error (prediction - reference) in pp."""
    table = [["subject", "prediction", "ED/ES from", "LV EF ref", "pred", "error", "RV EF ref", "pred", "error"]]
    for s in subjects:
        cells = [s.subject, s.prediction, f"{s.pred.phases_from} ({s.pred.ed_frame}/{s.pred.es_frame})"]
        for key in ("lv_ef", "rv_ef"):
            p = getattr(s.pred, key)
            r = getattr(s.ref, key) if s.ref else math.nan
            cells += [_num(r) if s.ref else "-", _num(p), _num(p - r) if s.ref else "-"]
        table.append(cells)
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    return "\n".join("  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
                     .rstrip() for line in table)
