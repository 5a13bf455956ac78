"""Score predicted masks against labels: per-case table, mean +- std, CSV.

    python evaluate.py --pred_dir runs/demo/predictions --data_dir data/phantoms_test [--csv scores.csv]

Predictions are matched to labels by case id (`<pred_dir>/<case_id>.nrrd`, `.nii.gz` or
`.mha`); the labels are found in either dataset layout. A case without a prediction is an
error listing the missing ids, or scores as an empty mask with `--missing_as_empty`.
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

import dataset as ds
from metrics import compute_metrics, summarise
from utils import ArgParser, UserError, atomic_write, run_cli

METRIC_KEYS = ("dice", "iou", "precision", "recall", "specificity")


def find_prediction(pred_dir: Path, case_id: str) -> Path | None:
    return next((pred_dir / f"{case_id}{s}" for s in ds.IMAGE_SUFFIXES if (pred_dir / f"{case_id}{s}").is_file()), None)


def score_case(pred: np.ndarray, label: np.ndarray, props: dict) -> dict:
    return compute_metrics(pred > 0, label, spacing=props["spacing"])


def write_csv(path, rows: list[dict]) -> None:
    def write(tmp):
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    atomic_write(path, write)


def format_table(rows: list[dict], keys=METRIC_KEYS) -> str:
    """Per-case rows, then mean +- std per metric, as the write-up's results table."""
    width = max(len("case"), *(len(r["case_id"]) for r in rows))
    lines = [f"{'case':<{width}}  " + "  ".join(f"{k:>11}" for k in keys)]
    lines += [f"{r['case_id']:<{width}}  " + "  ".join(f"{r[k]:>11.4f}" for k in keys) for r in rows]
    stats = summarise(rows, keys)
    lines.append(f"{'mean +- std':<{width}}  " + "  ".join(f"{m:>5.3f}+-{s:<5.3f}" for m, s in stats.values()))
    return "\n".join(lines)


def main(argv=None):
    p = ArgParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pred_dir", required=True, help="folder of predicted masks <case_id>.nrrd")
    p.add_argument("--data_dir", required=True, help="dataset folder with the labels (LASC or MSD layout)")
    p.add_argument("--csv", help="where to write the per-case table (default: <pred_dir>/evaluation.csv)")
    p.add_argument("--missing_as_empty", action="store_true", help="score a missing prediction as an empty mask")
    args = p.parse_args(argv)
    pred_dir = Path(args.pred_dir)
    if not pred_dir.is_dir():
        raise UserError(f"--pred_dir {pred_dir}: no such folder")
    cases = [c for c in ds.find_cases(args.data_dir, require_labels=False) if c.label is not None]
    if not cases:
        raise UserError(f"--data_dir {args.data_dir}: no labelled cases to score against")
    preds = {c.case_id: find_prediction(pred_dir, c.case_id) for c in cases}
    missing = [cid for cid, path in preds.items() if path is None]
    if missing and not args.missing_as_empty:
        raise UserError(f"--pred_dir {pred_dir}: no prediction for {len(missing)} case(s): {', '.join(missing[:10])}"
                        f"{' ...' if len(missing) > 10 else ''}; predict them or pass --missing_as_empty")
    rows = []
    for case in cases:
        label, props = ds.read_image(case.label)
        label = ds.binary_label(label, case.label)
        if preds[case.case_id] is None:
            pred = np.zeros_like(label)
        else:
            pred, pred_props = ds.read_image(preds[case.case_id])
            if pred.shape != label.shape or not ds.same_geometry(pred_props, props):
                raise UserError(f"{preds[case.case_id]}: prediction grid (shape/spacing/origin/direction) differs "
                                f"from its label {case.label}; predict on the original scan")
        rows.append({"case_id": case.case_id, **score_case(pred, label, props)})
    print(format_table(rows))
    out = Path(args.csv) if args.csv else pred_dir / "evaluation.csv"
    write_csv(out, rows)
    print(f"per-case table written to {out}")


if __name__ == "__main__":
    run_cli(main)
