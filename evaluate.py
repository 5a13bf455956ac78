"""Score predicted masks against labels: per-case table, mean +- std, CSV and a box plot.

    python evaluate.py --pred_dir runs/demo/predictions --data_dir data/phantoms_test \
        [--csv scores.csv] [--plot scores.png] [--missing_as_empty]
    python evaluate.py --crossval RUN      # a cross-validation run of train.py --num_folds
    python evaluate.py --cardiac --pred_dir OUT --data_dir ACDC_TEST [--cardiac_labels lv=3 myo=2 rv=1]

Predictions are matched to labels by case id (`<pred_dir>/<case_id>.nrrd`, `.nii.gz`, `.nii`,
`.mha` or `.mhd`, 0/1 or 0/255); the labels are found in either dataset layout. A case without a
prediction is an error listing the missing ids, or scores as an empty mask with
`--missing_as_empty` (Dice 0, distances the volume's diagonal: see metrics.py).

Metrics (metrics.compute_metrics): Dice, IoU, precision, recall, specificity, and HD, HD95 and
ASSD in mm between surface voxels. Outputs: the per-case table with mean +- std printed, the same
per case as CSV (default `<pred_dir>/evaluation.csv`) and a PNG box plot of Dice and HD95 over the
cases (default: beside the CSV, `<csv name>.png`). An existing file at either path is replaced
only when this script wrote it; anything else needs `--overwrite`.

`--crossval RUN` collects the validation metrics of every fold (RUN/fold_K/validation/
metrics.csv, written by train.py) into RUN/crossval.csv (one row per case, with its fold) and
RUN/crossval_summary.json (per fold and pooled over all cases: the number of cases and the
mean, std and median of every metric, and the empty-mask rule), and prints them as a table. A
fold missing or unfinished is an error naming it, or, with `--partial`, named in the summary
and left out.

`--cardiac` reports cardiac function per subject of an ACDC-layout --data_dir (cardiac.py):
LV and RV EDV, ESV, stroke volume and EF, and the LV mass, from the predicted ED/ES frames
(`<pred_dir>/<patient>_frameYY.*`) or the predicted 4D map (`<pred_dir>/<patient>_4d.*`), and
the same from the reference masks. ED/ES come from Info.cfg, else from the reference's LV volume
curve, else the prediction's; the output says which per subject. It writes
`<pred_dir>/cardiac.csv` (per subject: phases, predicted and reference values, differences),
`<pred_dir>/cardiac_volumes.csv` (every frame's volumes), `<pred_dir>/cardiac_summary.csv` (per
quantity: MAE, bias, limits of agreement, Pearson r, n) and `<pred_dir>/cardiac_bland_altman.png`,
under the same rule of replacing only its own files. A subject that fails (a missing
prediction, Info.cfg frames outside the predicted 4D map, ...) is reported at the end with exit
status 1, the others written; when every subject fails, nothing is written.

`--instances` scores instance label maps (0 background, 1..N one value per instance, e.g. each
vertebra) with metrics.instance_metrics: instances paired one-to-one by maximal total Dice, each
pair's Dice, HD95 and ASSD in mm, and per case the detection rate (Dice > 0.5), the false
instances and the identification rate (centroids within 20 mm, VerSe). A reference whose
instances skip a number is an error naming it; a prediction may skip numbers. It writes one row
per instance to --csv (default `<pred_dir>/instances.csv`) and one per case beside it
(`<csv name>_summary.csv`), under the same rule of replacing only its own files, and prints the
per-case table with mean +- std.
"""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np

import cardiac
import dataset as ds
import labels as lbl
import plots
from labels import Labels
from metrics import (
    CENTROID_MM,
    EMPTY_MASK_RULE,
    INSTANCE_RULE,
    INSTANCE_TABLE_KEYS,
    METRIC_KEYS,
    STRUCTURE,
    describe_cases,
    describe_structures,
    format_instance_table,
    format_structure_table,
    format_summary_table,
    format_table,
    instance_metrics,
)
from prediction import case_rows
from utils import ArgParser, UserError, atomic_write, run_cli, write_csv, write_json


def find_prediction(pred_dir: Path, case_id: str) -> Path | None:
    return next((pred_dir / f"{case_id}{s}" for s in ds.IMAGE_SUFFIXES if (pred_dir / f"{case_id}{s}").is_file()), None)


def written_by_us(path: Path, csv_start: bytes = b"case_id,", png_tag: str = plots.BOX_PLOT_TAG) -> bool:
    """A table of this repository whose header starts with `csv_start` (by default a per-case
    table, evaluate.py's or predict.py's), or a PNG of ours tagged `png_tag` (the box plot)."""
    if path.suffix.lower() == ".png":
        return plots.png_software(path) == png_tag
    with open(path, "rb") as f:
        return f.readline().startswith(csv_start)


def check_output(path: Path, flag: str, overwrite: bool, fix: str = "choose another name", **ours) -> None:
    """Refuse to replace a file that evaluate.py did not write (`written_by_us(path, **ours)`)."""
    if path.is_dir():
        raise UserError(f"{flag} {path}: is a folder; give a file name")
    if path.exists() and not overwrite and not written_by_us(path, **ours):
        raise UserError(f"{flag} {path}: exists and was not written by evaluate.py; {fix} "
                        "or pass --overwrite to replace it")


def score(case: ds.Case, prediction: Path | None, labels: Labels | None = None, regions=()) -> list[dict]:
    """The metrics rows of one labelled case (`prediction.case_rows`: one row for a binary mask,
    else one per class and region); a missing prediction scores as an empty mask."""
    label, props = ds.read_image(case.label)
    label = ds.class_indices(label, case.label, labels)
    if prediction is None:
        pred = np.zeros_like(label)
    else:
        pred, pred_props = ds.read_image(prediction)
        if pred.shape != label.shape or not ds.same_geometry(pred_props, props):
            raise UserError(f"{prediction}: prediction grid (shape/spacing/origin/direction) differs "
                            f"from its label {case.label}; predict on the original scan")
        pred = ds.class_indices(pred, prediction, labels)
    if labels is not None and not labels.binary or regions:
        label, pred = labels.to_values(label), labels.to_values(pred)
    return case_rows(case.case_id, pred, label, labels, props["spacing"], regions)


def dataset_labels(data_dir, cases: list[ds.Case]) -> Labels:
    """The classes that dataset.json declares, or else the values found in the labels (a single
    value, 1 or 255, is the binary atrium)."""
    declared = ds.read_dataset_json(data_dir).labels
    if declared is not None:
        return declared
    found = set()
    for case in cases:
        label, _ = ds.read_image(case.label)
        found.update(ds.label_values(label, case.label))
    return lbl.from_values(found)


def fold_rows(run_dir: Path, k: int, val_ids: list[str]) -> tuple[list[dict], str | None]:
    """The validation metrics of fold `k`, or why there are none (a missing fold, or one whose
    metrics lack some of its validation cases): METRIC_KEYS per case (and structure), or the
    instance metrics' INSTANCE_TABLE_KEYS per case for the iterative strategy."""
    path = run_dir / f"fold_{k}" / "validation" / "metrics.csv"
    if not path.is_file():
        return [], f"fold {k} is unfinished (no {path})"
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            keys = INSTANCE_TABLE_KEYS if "detection_rate" in (reader.fieldnames or ()) else METRIC_KEYS
            rows = [{"case_id": r["case_id"], "fold": k, **({STRUCTURE: r[STRUCTURE]} if STRUCTURE in r else {}),
                     **{m: float(r[m]) for m in keys}} for r in reader]
    except (OSError, KeyError, ValueError, TypeError, csv.Error, UnicodeDecodeError):
        return [], f"fold {k}: {path} is not a metrics table of predict.py; retrain the fold"
    wanted = set(val_ids)
    lacking = sorted(wanted - {r["case_id"] for r in rows})
    if lacking:
        return [], f"fold {k}: {path} lacks validation case(s) {', '.join(lacking[:5])}"
    return [r for r in rows if r["case_id"] in wanted], None


def crossval(run_dir: Path, partial: bool) -> None:
    """RUN/crossval.csv and RUN/crossval_summary.json from every fold's validation metrics."""
    try:
        folds = json.loads((run_dir / "splits_final.json").read_text())
        val = [list(fold["val"]) for fold in folds]
    except (OSError, ValueError, TypeError, KeyError):
        raise UserError(f"--crossval {run_dir}: no readable splits_final.json there; pass a run folder of "
                        "train.py --num_folds N") from None
    rows, missing = [], []
    for k, ids in enumerate(val):
        got, why = fold_rows(run_dir, k, ids)
        rows += got
        missing += [why] if why else []
    if missing and not partial:
        raise UserError(f"--crossval {run_dir}: {'; '.join(missing)}; finish it with train.py --resume {run_dir}, "
                        "or pass --partial to report the finished folds")
    if not rows:
        raise UserError(f"--crossval {run_dir}: no fold is finished yet")
    done = sorted({r["fold"] for r in rows})
    keys = INSTANCE_TABLE_KEYS if "detection_rate" in rows[0] else METRIC_KEYS
    if len({"detection_rate" in r for r in rows}) > 1:
        raise UserError(f"--crossval {run_dir}: some folds hold instance metrics, others not; retrain the folds "
                        "with one strategy")
    if STRUCTURE in rows[0]:  # several classes: each fold and the pool described per class and region
        folds_of = {str(k): describe_structures([r for r in rows if r["fold"] == k]) for k in done}
        pooled = describe_structures(rows)
        table = [(f"fold {k} {name}", d) for k, by in folds_of.items() for name, d in by.items()]
        table += [(f"pooled {name}", d) for name, d in pooled.items()]
    else:
        folds_of = {str(k): describe_cases([r for r in rows if r["fold"] == k], keys) for k in done}
        pooled = describe_cases(rows, keys)
        table = [*((f"fold {k}", d) for k, d in folds_of.items()), ("pooled", pooled)]
    summary = {"num_folds": len(folds), "folds": folds_of, "pooled": pooled,
               "missing": missing, "empty_mask_rule": EMPTY_MASK_RULE,
               "units": "ratios in [0, 1]; hd, hd95 and assd in mm, between surface voxels"}
    write_csv(run_dir / "crossval.csv", rows)
    write_json(run_dir / "crossval_summary.json", summary)
    print(format_summary_table(table, keys))
    if STRUCTURE not in rows[0]:
        print("pooled median: " + ", ".join(f"{k} {pooled[k]['median']:.3f}" for k in keys))
    print(f"empty masks: {EMPTY_MASK_RULE}")
    for why in missing:
        print(f"left out: {why}")
    print(f"per-case table written to {run_dir / 'crossval.csv'}; summary to {run_dir / 'crossval_summary.json'}")


# evaluate.py --cardiac's files in --pred_dir, each with how to recognise it as ours.
CARDIAC_OUTPUTS = {"cardiac.csv": {"csv_start": b"subject,"}, "cardiac_volumes.csv": {"csv_start": b"subject,"},
                   "cardiac_summary.csv": {"csv_start": b"quantity,"},
                   "cardiac_bland_altman.png": {"png_tag": plots.BLAND_ALTMAN_TAG}}


def parse_cardiac_labels(items) -> dict[str, int]:
    """`--cardiac_labels lv=3 myo=2 rv=1` over ACDC's values (those not named keep theirs)."""
    labels = dict(cardiac.CARDIAC_LABELS)
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep or name not in labels or not value.strip().isdigit():
            raise UserError(f"--cardiac_labels {item}: expected NAME=VALUE with NAME one of "
                            f"{', '.join(labels)} and VALUE a label value, e.g. lv=3")
        labels[name] = int(value)
    try:
        return cardiac.check_labels(labels)
    except ValueError as e:
        raise UserError(f"--cardiac_labels: {e}") from None


def cardiac_evaluation(pred_dir: Path, data_dir, labels: dict[str, int], overwrite: bool) -> None:
    """Cardiac function of every subject of `data_dir` from the predictions in `pred_dir`:
    the tables and the Bland-Altman plot written there, the summary printed (cardiac.py)."""
    outputs = {name: pred_dir / name for name in CARDIAC_OUTPUTS}
    for name, path in outputs.items():
        check_output(path, "--cardiac", overwrite, "move it", **CARDIAC_OUTPUTS[name])
    cases = ds.find_cases(data_dir, require_labels=False)
    if not cardiac.group_subjects(cases):
        raise UserError(f"--data_dir {data_dir}: no ACDC subjects (<patient>/Info.cfg with its frames or "
                        "<patient>_4d.nii.gz); --cardiac needs each subject's cine frames")
    subjects, failed = cardiac.evaluate_subjects(cases, pred_dir, find_prediction, labels)
    if not subjects:
        more = f" (and {len(failed) - 1} more subject(s) failed)" if len(failed) > 1 else ""
        raise UserError(f"{failed[0]}{more}")
    summary = cardiac.summary_rows(subjects)
    write_csv(outputs["cardiac.csv"], [cardiac.subject_row(s) for s in subjects])
    write_csv(outputs["cardiac_volumes.csv"], [r for s in subjects for r in cardiac.volume_rows(s)])
    write_csv(outputs["cardiac_summary.csv"], summary)
    paired = [s for s in subjects if s.ref is not None]
    units = {key: (name, unit) for key, name, unit, _ in cardiac.QUANTITIES}
    plots.bland_altman(outputs["cardiac_bland_altman.png"], {
        units[key][0]: ([getattr(s.pred, key) for s in paired], [getattr(s.ref, key) for s in paired], units[key][1])
        for key in cardiac.PLOTTED})

    print(f"cardiac function of {len(subjects)} subject(s); labels "
          + " ".join(f"{name}={value}" for name, value in labels.items()))
    print(cardiac.format_subject_table(subjects))
    for s in subjects:
        for source, fn in (("pred", s.pred), ("ref", s.ref)):
            for note in fn.notes if fn else ():
                print(f"note: {s.subject} {source}: {note}, left out of its agreement statistics")
    scored = [(c, find_prediction(pred_dir, c.case_id)) for c in cases if c.label is not None]
    scored = [(c, path) for c, path in scored if path is not None]
    if scored:  # the frames' overlap beside the function they give
        classes = dataset_labels(data_dir, [c for c, _ in scored])
        print(f"Dice per class over the {len(scored)} labelled frame(s):")
        print(format_structure_table([r for c, path in scored for r in score(c, path, classes)]))
    print(f"rules: {cardiac.PHASES_RULE}; {cardiac.EF_RULE}")
    print(f"agreement over {len(paired)} subject(s) with reference masks (prediction - reference, "
          f"LoA = bias +- {cardiac.LOA_Z} SD):")
    for row, (_, name, _, diff_unit) in zip(summary, cardiac.QUANTITIES):
        print("  " + cardiac.format_summary_line(name, diff_unit, row))
    print(f"per-subject table written to {outputs['cardiac.csv']}, volumes of every frame to "
          f"{outputs['cardiac_volumes.csv']}, summary to {outputs['cardiac_summary.csv']}, "
          f"Bland-Altman plot to {outputs['cardiac_bland_altman.png']}")
    if failed:
        print(f"{len(failed)} subject(s) failed:\n  " + "\n  ".join(failed), file=sys.stderr)
        sys.exit(1)


# evaluate.py --instances's tables, each recognised as ours by its header.
INSTANCE_COLUMNS = ("case_id", "ref_id", "pred_id", "dice", "hd95", "assd", "centroid_mm", "detected", "identified",
                    "complete")
INSTANCE_CSV = {"csv_start": b"case_id,ref_id,"}
INSTANCE_SUMMARY_CSV = {"csv_start": b"case_id,ref_instances,"}


def read_instance_map(path: Path) -> tuple[np.ndarray, dict]:
    """An instance label map (whole numbers 0..255, as `ds.label_values` checks any label) as
    int64, and its geometry."""
    array, props = ds.read_image(path)
    ds.label_values(array, path)
    return np.asarray(array).astype(np.int64), props


def score_instances(case: ds.Case, prediction: Path | None) -> tuple[list[dict], dict]:
    """`metrics.instance_metrics` of one case, with its id in every row; a missing prediction
    scores as every instance missed."""
    ref, props = read_instance_map(case.label)
    ds.check_instances(ref, case.label)
    if prediction is None:
        pred = np.zeros_like(ref)
    else:
        pred, pred_props = read_instance_map(prediction)
        if pred.shape != ref.shape or not ds.same_geometry(pred_props, props):
            raise UserError(f"{prediction}: prediction grid (shape/spacing/origin/direction) differs "
                            f"from its label {case.label}; predict on the original scan")
    rows, summary = instance_metrics(pred, ref, spacing=props["spacing"])
    return [{"case_id": case.case_id, **r} for r in rows], {"case_id": case.case_id, **summary}


def instance_evaluation(pred_dir: Path, data_dir, csv_path: Path, overwrite: bool, missing_as_empty: bool) -> None:
    """Instance scores of every labelled case of `data_dir` against `pred_dir`: the per-instance
    table at `csv_path`, the per-case one beside it, the per-case table printed. Every case is
    read and scored before anything is written, so a bad file leaves no partial output."""
    summary_path = csv_path.with_name(f"{csv_path.stem}_summary{csv_path.suffix or '.csv'}")
    check_output(csv_path, "--csv", overwrite, **INSTANCE_CSV)
    check_output(summary_path, "--csv", overwrite, **INSTANCE_SUMMARY_CSV)
    cases = [c for c in ds.find_cases(data_dir, require_labels=False) if c.label is not None]
    if not cases:
        raise UserError(f"--data_dir {data_dir}: no labelled cases to score against")
    preds = {c.case_id: find_prediction(pred_dir, c.case_id) for c in cases}
    missing = [cid for cid, path in preds.items() if path is None]
    if missing and not missing_as_empty:
        raise UserError(f"--pred_dir {pred_dir}: no prediction for {len(missing)} case(s): {', '.join(missing[:10])}"
                        f"{' ...' if len(missing) > 10 else ''}; predict them or pass --missing_as_empty")
    scored = [score_instances(c, preds[c.case_id]) for c in cases]
    rows = [r for per_instance, _ in scored for r in per_instance]
    summaries = [s for _, s in scored]
    print(format_instance_table(summaries))
    n_ref = sum(s["ref_instances"] for s in summaries)
    complete = sum(r["complete"] for r in rows)
    print(f"pooled over {n_ref} reference instance(s): detected {sum(s['detected'] for s in summaries)} "
          f"({sum(r['complete'] and r['detected'] for r in rows)} of the {complete} complete ones), "
          f"identified {sum(s['identified'] for s in summaries)}, "
          f"false instances {sum(s['false_instances'] for s in summaries)}")
    print(f"rules: {INSTANCE_RULE} (radius {CENTROID_MM:g} mm)")
    if missing:
        print(f"scored as all missed (no prediction): {', '.join(missing)}")
    if rows:
        write_csv(csv_path, rows)
    else:  # no instance in any map: the header alone
        atomic_write(csv_path, lambda tmp: Path(tmp).write_text(",".join(INSTANCE_COLUMNS) + "\n"))
    write_csv(summary_path, summaries)
    print(f"per-instance table written to {csv_path}; per-case summary to {summary_path}")


def main(argv=None):
    p = ArgParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pred_dir", help="folder of predicted masks <case_id>.nrrd")
    p.add_argument("--data_dir", help="dataset folder with the labels (LASC or MSD layout)")
    p.add_argument("--crossval", metavar="RUN", help="instead: report the validation folds of a cross-validation run")
    p.add_argument("--partial", action="store_true", help="with --crossval: report the finished folds only")
    p.add_argument("--csv", help="where to write the per-case table (default: <pred_dir>/evaluation.csv)")
    p.add_argument("--plot", help="where to write the box plot of Dice and HD95, a .png "
                                  "(default: beside the CSV, <csv name>.png)")
    p.add_argument("--missing_as_empty", action="store_true", help="score a missing prediction as an empty mask")
    p.add_argument("--regions", nargs="+", metavar="NAME=V1,V2",
                   help="also score these regions of label values (e.g. whole_tumour=1,2,3 tumour_core=2,3 "
                        "enhancing=3) beside each class")
    p.add_argument("--overwrite", action="store_true",
                   help="replace files at --csv/--plot (or --cardiac's) that evaluate.py did not write")
    heart = p.add_argument_group("cardiac function (ACDC layout)")
    heart.add_argument("--cardiac", action="store_true",
                       help="instead: EDV, ESV, SV, EF and LV mass per subject against the reference masks, "
                            "written to <pred_dir>/cardiac*.csv and cardiac_bland_altman.png")
    heart.add_argument("--cardiac_labels", nargs="+", metavar="NAME=VALUE", default=None,
                       help="label values of the structures, for data not labelled as ACDC "
                            "(default: lv=3 myo=2 rv=1)")
    inst = p.add_argument_group("instance segmentation (e.g. vertebrae)")
    inst.add_argument("--instances", action="store_true",
                      help="instead: score instance label maps (1..N per case), matched one-to-one by Dice; "
                           "writes per-instance rows to --csv (default <pred_dir>/instances.csv) and per-case "
                           "rows to <csv name>_summary.csv")
    args = p.parse_args(argv)
    if args.cardiac_labels and not args.cardiac:
        raise UserError("--cardiac_labels applies to --cardiac only; add --cardiac or drop it")
    if args.instances:
        given = [f for f, v in (("--cardiac", args.cardiac), ("--crossval", args.crossval), ("--regions", args.regions),
                                ("--plot", args.plot), ("--partial", args.partial)) if v]
        if given:
            raise UserError(f"--instances scores instance label maps on its own: drop {', '.join(given)}")
        if not (args.pred_dir and args.data_dir):
            raise UserError("--instances needs --pred_dir and --data_dir")
        pred_dir = Path(args.pred_dir)
        if not pred_dir.is_dir():
            raise UserError(f"--pred_dir {pred_dir}: no such folder")
        instance_evaluation(pred_dir, args.data_dir, Path(args.csv) if args.csv else pred_dir / "instances.csv",
                            args.overwrite, args.missing_as_empty)
        return
    if args.cardiac:
        given = [f for f, v in (("--crossval", args.crossval), ("--csv", args.csv), ("--plot", args.plot),
                                ("--regions", args.regions), ("--missing_as_empty", args.missing_as_empty),
                                ("--partial", args.partial)) if v]
        if given:
            raise UserError(f"--cardiac writes its own files into --pred_dir and scores every subject: "
                            f"drop {', '.join(given)}")
        if not (args.pred_dir and args.data_dir):
            raise UserError("--cardiac needs --pred_dir and --data_dir")
        if not Path(args.pred_dir).is_dir():
            raise UserError(f"--pred_dir {args.pred_dir}: no such folder")
        cardiac_evaluation(Path(args.pred_dir), args.data_dir, parse_cardiac_labels(args.cardiac_labels),
                           args.overwrite)
        return
    if args.crossval:
        if args.pred_dir or args.data_dir:
            raise UserError("--crossval reads the run's own validation predictions: drop --pred_dir/--data_dir")
        crossval(Path(args.crossval), args.partial)
        return
    if not (args.pred_dir and args.data_dir):
        raise UserError("give --pred_dir and --data_dir (or --crossval RUN)")
    pred_dir = Path(args.pred_dir)
    if not pred_dir.is_dir():
        raise UserError(f"--pred_dir {pred_dir}: no such folder")
    csv_path = Path(args.csv) if args.csv else pred_dir / "evaluation.csv"
    plot_path = Path(args.plot) if args.plot else csv_path.with_suffix(".png")
    if plot_path.suffix.lower() != ".png":
        raise UserError(f"--plot {plot_path}: the box plot is a PNG; give a name ending in .png")
    if plot_path.resolve() == csv_path.resolve():
        raise UserError(f"--plot {plot_path}: is the same file as --csv; give them different names")
    check_output(csv_path, "--csv", args.overwrite)
    check_output(plot_path, "--plot", args.overwrite)

    cases = [c for c in ds.find_cases(args.data_dir, require_labels=False) if c.label is not None]
    if not cases:
        raise UserError(f"--data_dir {args.data_dir}: no labelled cases to score against")
    preds = {c.case_id: find_prediction(pred_dir, c.case_id) for c in cases}
    missing = [cid for cid, path in preds.items() if path is None]
    if missing and not args.missing_as_empty:
        raise UserError(f"--pred_dir {pred_dir}: no prediction for {len(missing)} case(s): {', '.join(missing[:10])}"
                        f"{' ...' if len(missing) > 10 else ''}; predict them or pass --missing_as_empty")
    labels = dataset_labels(args.data_dir, cases)
    try:
        regions = tuple(lbl.parse_regions(args.regions or []))
        lbl.scored_structures(labels, regions)
    except ValueError as e:
        raise UserError(f"--regions: {e}") from None
    rows = [r for case in cases for r in score(case, preds[case.case_id], labels, regions)]
    if STRUCTURE in rows[0]:
        print(format_table([{**r, "case_id": f"{r['case_id']} {r[STRUCTURE]}"} for r in rows]))
        print(format_structure_table(rows))
    else:
        print(format_table(rows))
    if missing:
        print(f"scored as empty (no prediction): {', '.join(missing)}")
    write_csv(csv_path, rows)
    plots.box_plot(plot_path, rows)
    print(f"per-case table written to {csv_path}; box plot of Dice and HD95 to {plot_path}")


if __name__ == "__main__":
    run_cli(main)
