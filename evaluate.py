"""Score predicted masks against labels: per-case table, mean +- std, CSV and a box plot.

    python evaluate.py --pred_dir runs/demo/predictions --data_dir data/phantoms_test \
        [--csv scores.csv] [--plot scores.png] [--missing_as_empty]

Predictions are matched to labels by case id (`<pred_dir>/<case_id>.nrrd`, `.nii.gz`, `.nii`,
`.mha` or `.mhd`, 0/1 or 0/255); the labels are found in either dataset layout. A case without a
prediction is an error listing the missing ids, or scores as an empty mask with
`--missing_as_empty` (Dice 0, distances the volume's diagonal: see metrics.py).

Metrics (metrics.compute_metrics): Dice, IoU, precision, recall, specificity, and HD, HD95 and
ASSD in mm between surface voxels. Outputs: the per-case table with mean +- std printed, the same
per case as CSV (default `<pred_dir>/evaluation.csv`) and a PNG box plot of Dice and HD95 over the
cases (default: beside the CSV, `<csv name>.png`). An existing file at either path is replaced
only when this script wrote it; anything else needs `--overwrite`.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

import dataset as ds
from metrics import DISTANCE_KEYS, METRIC_KEYS, compute_metrics, summarise
from utils import ArgParser, UserError, atomic_write, run_cli

PLOT_TAG = "evaluate.py box plot"  # PNG "Software" text: marks a plot as ours to replace
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def find_prediction(pred_dir: Path, case_id: str) -> Path | None:
    return next((pred_dir / f"{case_id}{s}" for s in ds.IMAGE_SUFFIXES if (pred_dir / f"{case_id}{s}").is_file()), None)


def binary_prediction(pred: np.ndarray, path) -> np.ndarray:
    """bool mask from a prediction holding 0/1 or 0/255; anything else is a user error.
    Only the non-zero voxels are inspected, so a full-size volume costs no sort."""
    values = np.unique(pred[pred != 0])
    if values.size > 1 or (values.size == 1 and values[0] not in (1, 255)):
        shown = ", ".join(str(v) for v in values[:6].tolist()) + (", ..." if values.size > 6 else "")
        raise UserError(f"{path}: prediction is not a binary mask (non-zero values {shown}); expected 0/1 or 0/255")
    return pred != 0


def score_case(pred: np.ndarray, label: np.ndarray, props: dict) -> dict:
    """All metrics of one case; `pred`, `label`: (D, H, W) masks, `props` as `ds.read_image` gives."""
    return compute_metrics(pred > 0, label, spacing=props["spacing"])


def write_csv(path, rows: list[dict]) -> bool:
    """Write the per-case rows as CSV, atomically, unless the file already holds exactly these
    rows (a rerun that changes nothing then leaves it untouched, mtime included). True if
    written."""
    buf = io.StringIO(newline="")
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    data = buf.getvalue().encode()
    path = Path(path)
    if path.is_file() and path.read_bytes() == data:
        return False
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))
    return True


def _cell(key: str, value: float) -> str:
    return f"{value:.2f}" if key in DISTANCE_KEYS else f"{value:.4f}"


def _summary_cell(key: str, mean: float, std: float) -> str:
    return f"{mean:.2f}+-{std:.2f}" if key in DISTANCE_KEYS else f"{mean:.3f}+-{std:.3f}"


def format_table(rows: list[dict], keys=METRIC_KEYS) -> str:
    """Per-case rows, then mean +- std per metric, as the write-up's results table."""
    stats = summarise(rows, keys)
    table = [["case", *keys]]
    table += [[r["case_id"], *(_cell(k, r[k]) for k in keys)] for r in rows]
    table.append(["mean +- std", *(_summary_cell(k, *stats[k]) for k in keys)])
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))).rstrip()
             for line in table]
    distances = [k for k in keys if k in DISTANCE_KEYS]
    if distances:
        lines.append(f"({', '.join(distances)} in mm, between surface voxels)")
    return "\n".join(lines)


def png_software(path: Path) -> str | None:
    """The "Software" text chunk of a PNG file, or None (not a PNG, or no such chunk)."""
    data = path.read_bytes()
    if not data.startswith(PNG_SIGNATURE):
        return None
    pos = len(PNG_SIGNATURE)
    while pos + 8 <= len(data):  # chunks: 4-byte length, 4-byte type, data, 4-byte CRC
        length, kind = int.from_bytes(data[pos:pos + 4], "big"), data[pos + 4:pos + 8]
        if kind == b"tEXt":
            key, _, value = data[pos + 8:pos + 8 + length].partition(b"\0")
            if key == b"Software":
                return value.decode("latin-1")
        pos += 12 + length
    return None


def written_by_us(path: Path) -> bool:
    """A per-case table of this repository (evaluate.py's or predict.py's CSV), or our box plot."""
    if path.suffix.lower() == ".png":
        return png_software(path) == PLOT_TAG
    with open(path, "rb") as f:
        return f.readline().startswith(b"case_id,")


def check_output(path: Path, flag: str, overwrite: bool) -> None:
    if path.is_dir():
        raise UserError(f"{flag} {path}: is a folder; give a file name")
    if path.exists() and not overwrite and not written_by_us(path):
        raise UserError(f"{flag} {path}: exists and was not written by evaluate.py; choose another name "
                        "or pass --overwrite to replace it")


def write_box_plot(path, rows: list[dict]) -> None:
    """Box plot of Dice and HD95 over cases, each case a dot beside its box."""
    # Imported here: predict.py and train.py import this module and never plot.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    for ax, key, name in zip(fig.subplots(1, 2), ("dice", "hd95"), ("Dice", "HD95 (mm)")):
        values = np.array([r[key] for r in rows])
        ax.boxplot(values, widths=0.4, positions=[0])
        ax.plot(np.linspace(0.35, 0.55, len(values)) if len(values) > 1 else [0.45], values, "o",
                ms=4, alpha=0.6, color="tab:blue")
        ax.set_xlim(-0.5, 0.8)
        ax.set_xticks([])
        ax.set_ylabel(name)
        ax.set_title(f"{name}: {values.mean():.3f} +- {values.std():.3f}" if key == "dice"
                     else f"{name}: {values.mean():.2f} +- {values.std():.2f}", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"{len(rows)} case(s)", fontsize=10)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, metadata={"Software": PLOT_TAG}))


def main(argv=None):
    p = ArgParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pred_dir", required=True, help="folder of predicted masks <case_id>.nrrd")
    p.add_argument("--data_dir", required=True, help="dataset folder with the labels (LASC or MSD layout)")
    p.add_argument("--csv", help="where to write the per-case table (default: <pred_dir>/evaluation.csv)")
    p.add_argument("--plot", help="where to write the box plot of Dice and HD95, a .png "
                                  "(default: beside the CSV, <csv name>.png)")
    p.add_argument("--missing_as_empty", action="store_true", help="score a missing prediction as an empty mask")
    p.add_argument("--overwrite", action="store_true",
                   help="replace files at --csv/--plot that evaluate.py did not write")
    args = p.parse_args(argv)
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
            pred = binary_prediction(pred, preds[case.case_id])
        rows.append({"case_id": case.case_id, **score_case(pred, label, props)})
    print(format_table(rows))
    if missing:
        print(f"scored as empty (no prediction): {', '.join(missing)}")
    write_csv(csv_path, rows)
    write_box_plot(plot_path, rows)
    print(f"per-case table written to {csv_path}; box plot of Dice and HD95 to {plot_path}")


if __name__ == "__main__":
    run_cli(main)
