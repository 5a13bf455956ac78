"""cardiac.py and evaluate.py --cardiac: volumes, EF and mass against hand-computed values, the
agreement statistics, the ED/ES rules, and the command line on small ACDC-layout folders."""
import csv
import math
import shutil

import numpy as np
import pytest
import scipy.stats

import cardiac
import dataset as ds
import evaluate
import plots
from conftest import assert_one_line_error, run_main

IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
SPACING = (10.0, 1.5, 1.5)  # ACDC-like: thick slices, fine pixels
PROPS = {"spacing": SPACING, "origin": (0.0, 0.0, 0.0), "direction": IDENTITY}
VOXEL_ML = 10.0 * 1.5 * 1.5 / 1000


def disk(size: int, radius_mm: float, pixel_mm: float) -> np.ndarray:
    """(size, size) bool: the pixels whose centres lie within `radius_mm` of the image centre."""
    y, x = np.mgrid[:size, :size]
    c = (size - 1) / 2
    return ((y - c) * pixel_mm) ** 2 + ((x - c) * pixel_mm) ** 2 <= radius_mm ** 2


def heart(lv_radius: int, shape=(4, 32, 32)) -> np.ndarray:
    """A toy ACDC label map: on the middle slices an LV cavity disk (3) of `lv_radius` pixels,
    a myocardium ring (2) two pixels thick around it, and an RV box (1) beside it."""
    label = np.zeros(shape, np.uint8)
    y, x = np.mgrid[:shape[1], :shape[2]]
    r2 = (y - 16) ** 2 + (x - 18) ** 2
    for z in range(1, shape[0] - 1):
        label[z][r2 <= (lv_radius + 2) ** 2] = 2
        label[z][r2 <= lv_radius ** 2] = 3
        label[z, 12:20, 2:7] = 1
    return label


def counts(label):
    return {name: int(np.count_nonzero(label == v)) for name, v in cardiac.CARDIAC_LABELS.items()}


def erode_lv(label: np.ndarray) -> np.ndarray:
    """The label with the LV cavity's outer pixels (in-plane 4-neighbours of non-LV) set to 0."""
    lv = label == 3
    inner = lv.copy()
    inner[:, 1:, :] &= lv[:, :-1, :]
    inner[:, :-1, :] &= lv[:, 1:, :]
    inner[:, :, 1:] &= lv[:, :, :-1]
    inner[:, :, :-1] &= lv[:, :, 1:]
    out = label.copy()
    out[lv & ~inner] = 0
    return out


def write_subject(root, name, frames: dict, info: str, cine: int = 0):
    """An ACDC patient folder: Info.cfg, `<name>_frameYY` images with `_gt` labels for `frames`
    {frame: label}, or with `cine` frames a 4D image `<name>_4d` only."""
    d = root / name
    d.mkdir(parents=True)
    (d / "Info.cfg").write_text(info)
    for f, label in frames.items():
        ds.write_image(label.astype(np.float32), PROPS, d / f"{name}_frame{f:02d}.nii.gz")
        ds.write_image(label, PROPS, d / f"{name}_frame{f:02d}_gt.nii.gz")
    if cine:
        ds.write_image(np.zeros((cine, 4, 32, 32), np.float32), PROPS, d / f"{name}_4d.nii.gz")


def close(expected):
    """A value of our CSVs, written to 6 decimals."""
    return pytest.approx(expected, abs=1e-6)


def read_csv(path):
    return list(csv.DictReader(open(path)))


def cardiac_ok(*args):
    run = run_main(evaluate.main, "--cardiac", *args)
    assert run.returncode == 0, run.stdout + run.stderr
    return run


# ----------------------------------------------------------------------------- cardiac.py

def test_volume_ml_of_a_cylinder_with_anisotropic_spacing_is_pi_r2_h():
    spacing = (10.0, 1.25, 1.25)
    label = np.zeros((10, 96, 96), np.uint8)
    label[1:9][:, disk(96, 50.0, 1.25)] = 3  # r 50 mm, h 8 slices x 10 mm
    expected = math.pi * 50.0 ** 2 * 80.0 / 1000
    assert cardiac.volume_ml(label, spacing, 3) == pytest.approx(expected, rel=0.005)
    assert cardiac.volume_ml(label, spacing, 2) == 0.0


def test_volume_ml_counts_voxels_of_the_value_times_voxel_volume():
    label = np.zeros((2, 3, 4), np.uint8)
    label[0, 0, :3] = 2
    label[1, 2, 3] = 3
    assert cardiac.volume_ml(label, (2.0, 1.5, 1.0), 2) == pytest.approx(3 * 3.0 / 1000, abs=1e-15)
    with pytest.raises(ValueError, match="spacing"):
        cardiac.volume_ml(label, (2.0, 1.5), 2)
    with pytest.raises(ValueError, match="spacing"):
        cardiac.volume_ml(label, (2.0, 0.0, 1.0), 2)


def test_function_of_frames_gives_the_ef_of_an_ed_es_cylinder_pair():
    spacing, size = (8.0, 0.5, 0.5), 160
    ed, es = np.zeros((10, size, size), np.uint8), np.zeros((10, size, size), np.uint8)
    ed[1:9][:, disk(size, 30.0, 0.5)] = 3  # r 30 mm over 8 slices
    es[2:8][:, disk(size, 20.0, 0.5)] = 3  # r 20 mm over 6 slices
    ring = disk(size, 36.0, 0.5) & ~disk(size, 30.0, 0.5)
    ed[1:9][:, ring] = 2
    fn = cardiac.function_of_frames({1: ed, 9: es}, spacing, phases=(1, 9), phases_from=cardiac.PHASES_INFO)
    expected_ef = 100 * (1 - (20.0 ** 2 * 6) / (30.0 ** 2 * 8))
    assert abs(fn.lv_ef - expected_ef) < 0.1
    assert fn.lv_sv == pytest.approx(fn.lv_edv - fn.lv_esv, abs=1e-12)
    myo_ml = math.pi * (36.0 ** 2 - 30.0 ** 2) * 64.0 / 1000
    assert fn.lv_mass == pytest.approx(1.05 * myo_ml, rel=0.005)
    assert (fn.ed_frame, fn.es_frame, fn.phases_from) == (1, 9, "Info.cfg")


def test_function_of_frames_takes_ed_es_from_the_lv_volume_curve_unless_given():
    frames = {1: heart(5), 2: heart(7), 3: heart(3), 4: heart(4)}
    fn = cardiac.function_of_frames(frames, SPACING)
    assert (fn.ed_frame, fn.es_frame, fn.phases_from) == (2, 3, "volume curve")
    c2, c3 = counts(frames[2]), counts(frames[3])
    assert fn.lv_edv == pytest.approx(c2["lv"] * VOXEL_ML) and fn.lv_esv == pytest.approx(c3["lv"] * VOXEL_ML)
    assert fn.lv_ef == pytest.approx(100 * (c2["lv"] - c3["lv"]) / c2["lv"])
    assert fn.rv_ef == 0.0  # the RV box does not change
    assert fn.curves["lv"] == {f: pytest.approx(counts(a)["lv"] * VOXEL_ML) for f, a in frames.items()}
    given = cardiac.function_of_frames(frames, SPACING, phases=(1, 4))
    assert (given.ed_frame, given.es_frame, given.phases_from) == (1, 4, "given")
    with pytest.raises(ValueError, match="not among the frames"):
        cardiac.function_of_frames(frames, SPACING, phases=(1, 5))


def test_ef_of_a_zero_edv_is_nan_with_its_reason():
    empty = np.zeros((4, 32, 32), np.uint8)
    fn = cardiac.function_of_frames({1: empty, 2: empty}, SPACING)
    assert math.isnan(fn.lv_ef) and math.isnan(fn.rv_ef) and fn.lv_edv == 0.0 and fn.lv_sv == 0.0
    assert fn.notes == ("LV EDV is 0 ml at frame 1: LV EF undefined", "RV EDV is 0 ml at frame 1: RV EF undefined")


def test_agreement_equals_hand_computed_values_and_scipy_pearson():
    pred, ref = [1.0, 2.0, 3.0, 4.0], [1.0, 3.0, 2.0, 6.0]
    a = cardiac.agreement(pred, ref)
    # differences 0, -1, 1, -2: bias -0.5, squared deviations 0.25 + 0.25 + 2.25 + 2.25 = 5 over n - 1 = 3
    sd = math.sqrt(5 / 3)
    assert a["n"] == 4 and a["mae"] == pytest.approx(1.0) and a["bias"] == pytest.approx(-0.5)
    assert a["sd"] == pytest.approx(sd)
    assert a["loa_low"] == pytest.approx(-0.5 - 1.96 * sd) and a["loa_high"] == pytest.approx(-0.5 + 1.96 * sd)
    assert a["r"] == pytest.approx(scipy.stats.pearsonr(pred, ref)[0], abs=1e-12)


def test_agreement_leaves_out_nan_pairs_and_is_nan_where_undefined():
    a = cardiac.agreement([1.0, math.nan, 3.0, 5.0], [2.0, 4.0, math.nan, 5.0])
    assert a["n"] == 2 and a["mae"] == pytest.approx(0.5) and a["bias"] == pytest.approx(-0.5)
    one = cardiac.agreement([1.0], [3.0])
    assert one["n"] == 1 and one["bias"] == -2.0 and math.isnan(one["sd"]) and math.isnan(one["r"])
    assert cardiac.agreement([], [])["n"] == 0 and math.isnan(cardiac.agreement([], [])["mae"])
    assert math.isnan(cardiac.agreement([2.0, 2.0], [1.0, 3.0])["r"])  # no spread in pred
    with pytest.raises(ValueError, match="same number"):
        cardiac.agreement([1.0, 2.0], [1.0])


def test_bland_altman_draws_the_agreement_and_tags_the_png(tmp_path):
    path = tmp_path / "ba.png"
    drawn = plots.bland_altman(path, {"LV EF": ([50.0, 60.0, 55.0], [52.0, 59.0, 55.0], "%"),
                                      "RV EF": ([], [], "%")})
    assert plots.png_software(path) == plots.BLAND_ALTMAN_TAG
    assert drawn["LV EF"]["bias"] == pytest.approx(-1 / 3) and drawn["LV EF"]["n"] == 3
    assert drawn["RV EF"]["n"] == 0


# ----------------------------------------------------------------------------- evaluate.py --cardiac

@pytest.fixture
def acdc(tmp_path):
    """Three patients with ED/ES frames: patient001 with Info.cfg phases and a prediction whose
    ES LV is eroded, patient002 without phases in Info.cfg (its ED is frame 4, the larger LV),
    patient003 with phases and a prediction whose ED LV is eroded."""
    data, out = tmp_path / "CINE_TEST", tmp_path / "OUT"
    out.mkdir()
    subjects = {"patient001": ({1: heart(7), 5: heart(4)}, "ED: 1\nES: 5\nNbFrame: 10\n", 5),
                "patient002": ({1: heart(4), 4: heart(6)}, "NbFrame: 10\nGroup: NOR\n", None),
                "patient003": ({1: heart(8), 6: heart(5)}, "ED: 1\nES: 6\n", 1)}
    for name, (frames, info, eroded) in subjects.items():
        write_subject(data, name, frames, info)
        for f, label in frames.items():
            ds.write_image(erode_lv(label) if f == eroded else label, PROPS, out / f"{name}_frame{f:02d}.nii.gz")
    return data, out


def test_evaluate_cardiac_prints_ef_errors_and_writes_tables_and_plot(acdc):
    data, out = acdc
    run = cardiac_ok("--pred_dir", out, "--data_dir", data)
    rows = {r["subject"]: r for r in read_csv(out / "cardiac.csv")}
    assert list(rows) == ["patient001", "patient002", "patient003"]
    assert [(r["phases_from"], r["ed_frame"], r["es_frame"]) for r in rows.values()] == [
        ("Info.cfg", "1", "5"), ("reference volume curve", "4", "1"), ("Info.cfg", "1", "6")]
    # patient001: the ES LV loses its outer ring, so its ESV falls and its EF rises
    ed, es = counts(heart(7))["lv"], counts(heart(4))["lv"]
    es_pred = counts(erode_lv(heart(4)))["lv"]
    ref_ef, pred_ef = 100 * (ed - es) / ed, 100 * (ed - es_pred) / ed
    r1 = rows["patient001"]
    assert float(r1["lv_ef_ref"]) == close(ref_ef) and float(r1["lv_ef_pred"]) == close(pred_ef)
    assert float(r1["lv_ef_diff"]) == close(pred_ef - ref_ef)
    assert float(r1["lv_esv_diff"]) == close((es_pred - es) * VOXEL_ML)
    assert float(r1["lv_mass_ref"]) == close(1.05 * counts(heart(7))["myo"] * VOXEL_ML)
    assert float(rows["patient002"]["lv_ef_diff"]) == 0.0
    ed3, ed3_pred, es3 = counts(heart(8))["lv"], counts(erode_lv(heart(8)))["lv"], counts(heart(5))["lv"]
    diffs = [pred_ef - ref_ef, 0.0, 100 * (ed3_pred - es3) / ed3_pred - 100 * (ed3 - es3) / ed3]
    summary = {r["quantity"]: r for r in read_csv(out / "cardiac_summary.csv")}
    ef = summary["lv_ef"]
    assert ef["unit"] == "pp" and ef["n"] == "3"
    assert float(ef["bias"]) == close(np.mean(diffs))
    assert float(ef["mae"]) == close(np.abs(diffs).mean())
    assert float(ef["loa_high"]) == close(np.mean(diffs) + 1.96 * np.std(diffs, ddof=1))
    volumes = read_csv(out / "cardiac_volumes.csv")
    assert len(volumes) == 12 and {(v["subject"], v["frame"], v["phase"]) for v in volumes if v["source"] == "ref"} >= {
        ("patient002", "4", "ED"), ("patient002", "1", "ES")}
    assert plots.png_software(out / "cardiac_bland_altman.png") == plots.BLAND_ALTMAN_TAG
    lines = run.stdout.splitlines()
    p1 = next(line for line in lines if line.startswith("patient001"))
    assert f"{ref_ef:.1f}" in p1 and f"{pred_ef:.1f}" in p1 and f"{pred_ef - ref_ef:.1f}" in p1
    assert any(line.strip().startswith("LV EF: MAE ") and "pp, bias " in line and "LoA [" in line and "(n=3)" in line
               for line in lines), run.stdout
    assert "Dice per class over the" in run.stdout  # the frames' overlap beside their function
    lv = next(line for line in lines if line.startswith("LV cavity"))
    assert float(lv.split()[3].split("+-")[0]) < 1.0  # patient001's eroded prediction scores below 1


def test_evaluate_cardiac_replaces_its_own_files_but_not_others(acdc):
    data, out = acdc
    cardiac_ok("--pred_dir", out, "--data_dir", data)
    cardiac_ok("--pred_dir", out, "--data_dir", data)  # a rerun replaces what it wrote
    (out / "cardiac_summary.csv").write_text("my notes\n")
    (out / "cardiac.csv").unlink()
    assert_one_line_error(run_main(evaluate.main, "--cardiac", "--pred_dir", out, "--data_dir", data),
                          "cardiac_summary.csv", "--overwrite")
    assert not (out / "cardiac.csv").exists() and (out / "cardiac_summary.csv").read_text() == "my notes\n"
    cardiac_ok("--pred_dir", out, "--data_dir", data, "--overwrite")
    assert (out / "cardiac.csv").exists()


def test_evaluate_cardiac_4d_map_takes_ed_es_from_its_volume_curve(tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    radii = [6, 8, 5, 3, 4]
    write_subject(data, "patient010", {}, "NbFrame: 5\n", cine=5)
    out.mkdir()
    ds.write_image(np.stack([heart(r) for r in radii]), PROPS, out / "patient010_4d.nii.gz")
    run = cardiac_ok("--pred_dir", out, "--data_dir", data)
    (row,) = read_csv(out / "cardiac.csv")
    assert (row["prediction"], row["phases_from"], row["ed_frame"], row["es_frame"]) == (
        "4D map", "prediction volume curve", "2", "4")
    ed, es = counts(heart(8))["lv"], counts(heart(3))["lv"]
    assert float(row["lv_ef_pred"]) == close(100 * (ed - es) / ed)
    assert row["lv_ef_ref"] == "" and "no reference" in row["notes"]
    volumes = read_csv(out / "cardiac_volumes.csv")
    assert [float(v["lv_ml"]) for v in volumes] == close([counts(heart(r))["lv"] * VOXEL_ML for r in radii])
    assert "(n=0)" in run.stdout


def test_evaluate_cardiac_4d_map_uses_info_cfg_phases_against_reference_frames(tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    write_subject(data, "patient011", {1: heart(7), 3: heart(4)}, "ED: 1\nES: 3\nNbFrame: 4\n")
    out.mkdir()
    ds.write_image(np.stack([heart(7), heart(9), erode_lv(heart(4)), heart(2)]), PROPS, out / "patient011_4d.nii.gz")
    cardiac_ok("--pred_dir", out, "--data_dir", data)
    (row,) = read_csv(out / "cardiac.csv")
    assert (row["prediction"], row["phases_from"], row["ed_frame"], row["es_frame"]) == ("4D map", "Info.cfg", "1", "3")
    assert float(row["lv_esv_diff"]) == close((counts(erode_lv(heart(4)))["lv"] - counts(heart(4))["lv"])
                                                      * VOXEL_ML)
    assert float(row["lv_edv_diff"]) == 0.0
    assert sum(v["source"] == "pred" for v in read_csv(out / "cardiac_volumes.csv")) == 4


def test_evaluate_cardiac_info_cfg_frame_outside_the_4d_map_is_one_line_error(tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    write_subject(data, "patient012", {}, "ED: 1\nES: 7\n", cine=5)
    out.mkdir()
    ds.write_image(np.stack([heart(r) for r in (6, 8, 5, 3, 4)]), PROPS, out / "patient012_4d.nii.gz")
    run = run_main(evaluate.main, "--cardiac", "--pred_dir", out, "--data_dir", data)
    assert_one_line_error(run, "patient012", "Info.cfg", "ES: 7", "1 to 5")
    assert sorted(p.name for p in out.iterdir()) == ["patient012_4d.nii.gz"]


def test_evaluate_cardiac_batch_goes_on_past_a_bad_subject_and_exits_1(acdc):
    data, out = acdc
    (data / "patient002" / "Info.cfg").write_text("ED: 1\nES: 12\nNbFrame: 10\n")
    (out / "patient003_frame06.nii.gz").unlink()
    run = run_main(evaluate.main, "--cardiac", "--pred_dir", out, "--data_dir", data)
    assert run.returncode == 1, run.stdout + run.stderr
    assert [r["subject"] for r in read_csv(out / "cardiac.csv")] == ["patient001"]
    assert "2 subject(s) failed" in run.stderr and "Traceback" not in run.stderr
    assert "patient002: " in run.stderr and "Info.cfg: ES: 12" in run.stderr
    assert "patient003: no prediction" in run.stderr and "patient003_frame06.nii.gz" in run.stderr


def test_evaluate_cardiac_labels_override_reads_other_label_values(acdc, tmp_path):
    data, out = acdc
    swap = np.array([0, 3, 2, 1], np.uint8)  # RV and LV values exchanged
    for path in list(data.glob("*/*_gt.nii.gz")) + list(out.glob("*.nii.gz")):
        label, props = ds.read_image(path)
        ds.write_image(swap[label], props, path)
    cardiac_ok("--pred_dir", out, "--data_dir", data, "--cardiac_labels", "lv=1", "rv=3")
    row = read_csv(out / "cardiac.csv")[0]
    ed, es = counts(heart(7))["lv"], counts(heart(4))["lv"]
    assert float(row["lv_ef_ref"]) == close(100 * (ed - es) / ed)


@pytest.mark.parametrize("args, fragments", [
    (["--cardiac_labels", "lv=2"], ["--cardiac_labels", "distinct"]),
    (["--cardiac_labels", "aorta=4"], ["--cardiac_labels", "aorta=4"]),
    (["--csv", "x.csv"], ["--cardiac", "--csv"]),
])
def test_evaluate_cardiac_bad_flags_are_one_line_errors(acdc, args, fragments):
    data, out = acdc
    before = sorted(p.name for p in out.iterdir())
    assert_one_line_error(run_main(evaluate.main, "--cardiac", "--pred_dir", out, "--data_dir", data, *args),
                          *fragments)
    assert sorted(p.name for p in out.iterdir()) == before


def test_evaluate_cardiac_needs_acdc_subjects(tmp_path):
    data, out = tmp_path / "lasc", tmp_path / "out"
    (data / "case_000").mkdir(parents=True)
    out.mkdir()
    ds.write_image(np.zeros((4, 8, 8), np.float32), PROPS, data / "case_000" / "lgemri.nrrd")
    assert_one_line_error(run_main(evaluate.main, "--cardiac", "--pred_dir", out, "--data_dir", data),
                          "no ACDC subjects")
    assert list(out.iterdir()) == []


def test_evaluate_cardiac_prediction_off_its_reference_grid_is_an_error(acdc):
    data, out = acdc
    for name in ("patient002", "patient003"):
        shutil.rmtree(data / name)
    ds.write_image(heart(4), {**PROPS, "spacing": (8.0, 1.5, 1.5)}, out / "patient001_frame05.nii.gz")
    assert_one_line_error(run_main(evaluate.main, "--cardiac", "--pred_dir", out, "--data_dir", data),
                          "patient001", "patient001_frame05.nii.gz", "differs from its reference")
    assert not (out / "cardiac.csv").exists()
