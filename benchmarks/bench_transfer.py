"""The transfer experiment of docs/cardiac.md: a 2D V-Net trained on many cine subjects of one
acquisition domain (phantoms' domain a, 1.5T-like), then on k = 1, 3 and 8 subjects of another
(domain b, 7T-like: other contrast, more noise, strong inhomogeneity): from scratch, fine-tuned
from the domain-a checkpoint (`--init_from`), and fine-tuned with its encoder fixed for the first
half of the epochs (`--freeze_encoder_epochs`), each with the same budget; every model is
scored on the same held-out domain-b subjects (Dice per class of the ED and ES frames, LV EF
error). Each step is the command a user types (phantoms.py, train.py, predict.py, evaluate.py,
each a process of its own); the table is read from their outputs and written to its section of
docs/cardiac.md with the date, commit, machine and commands.

    .venv/bin/python benchmarks/bench_transfer.py                  # about 30 minutes on 2 cores
    .venv/bin/python benchmarks/bench_transfer.py --k 1 --max_epochs 2 --test_subjects 2 --no_write  # a look

Domain b's k training subjects are the first k of one pool (k = 3 holds k = 1's subject), all
used for training (`--val_fraction 0`: the checkpoint kept is the epoch of lowest training loss).
"""
from __future__ import annotations

import csv
import datetime
import platform
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from common import cpu_name, replace_section  # noqa: E402  (benchmarks/ is sys.path[0])
from utils import ArgParser, run_cli  # noqa: E402

HEADING = "## Transfer from domain a to domain b (benchmarks/bench_transfer.py)"
STRUCTURES = ("LV cavity", "LV myocardium", "RV cavity")


def run(*args, log: Path) -> None:
    """One script as a user runs it, its output appended to `log`."""
    cmd = [sys.executable, *map(str, args)]
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd[1:]) + "\n")
        f.flush()
        done = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(cmd[1:])}; see {log}")


def subset(pool: Path, k: int, out: Path) -> Path:
    """A data folder of the first k subjects of `pool` (links, no copies)."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for d in sorted(p for p in pool.iterdir() if (p / "Info.cfg").is_file())[:k]:
        (out / d.name).symlink_to(d.resolve())
    return out


def loop_seconds(run_dir: Path) -> float:
    """The seconds a run's training loop took, summed over its epochs (RUN/segmenter/log.csv)."""
    with open(run_dir / "segmenter" / "log.csv", newline="") as f:
        return sum(float(r["seconds"]) for r in csv.DictReader(f))


def scores(pred_dir: Path) -> dict:
    """Mean Dice per class over the held-out frames (predict.py's metrics.csv) and the LV EF
    mean absolute error (evaluate.py --cardiac's summary)."""
    with open(pred_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    out = {s: statistics.mean(float(r["dice"]) for r in rows if r["structure"] == s) for s in STRUCTURES}
    with open(pred_dir / "cardiac_summary.csv", newline="") as f:
        summary = {r["quantity"]: r for r in csv.DictReader(f)}
    out["LV EF MAE"] = float(summary["lv_ef"]["mae"])
    return out


def main(argv=None):
    p = ArgParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work_dir", default="runs/transfer", help="phantoms, runs and predictions go here")
    p.add_argument("--source_subjects", type=int, default=40, help="domain-a training subjects")
    p.add_argument("--test_subjects", type=int, default=10, help="held-out domain-b subjects")
    p.add_argument("--k", type=int, nargs="+", default=[1, 3, 8], help="domain-b training subjects")
    p.add_argument("--max_epochs", type=int, default=20, help="epochs of every run (the same budget)")
    p.add_argument("--samples_per_epoch", type=int, default=128)
    p.add_argument("--reuse", action="store_true",
                   help="keep what an earlier run left in --work_dir: the phantoms, the runs and their scores")
    p.add_argument("--no_write", action="store_true", help="print the table only")
    args = p.parse_args(argv)
    work = (ROOT / args.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    log = work / "log.txt"
    if not args.reuse:
        log.write_text("")
    budget = ["--spatial_dims", "2", "--patch_size", "128", "128", "--base_channels", "4", "--max_epochs",
              args.max_epochs, "--samples_per_epoch", args.samples_per_epoch, "--device", "cpu", "--overwrite"]
    a, pool, test = work / "a", work / "b_pool", work / "b_test"
    source = work / "run_a" / "segmenter" / "best.pt"
    if not (args.reuse and source.is_file()):
        run("phantoms.py", "--kind", "cine", "--domain", "a", "--out_dir", a, "--num_cases", args.source_subjects,
            "--seed", 0, "--overwrite", log=log)
        run("phantoms.py", "--kind", "cine", "--domain", "b", "--out_dir", pool, "--num_cases", max(args.k),
            "--seed", 0, "--first_id", 101, "--overwrite", log=log)
        run("phantoms.py", "--kind", "cine", "--domain", "b", "--out_dir", test, "--num_cases", args.test_subjects,
            "--seed", 1000, "--first_id", 901, "--overwrite", log=log)
        run("train.py", "--data_dir", a, "--output_dir", work / "run_a", *budget, log=log)

    def score(name: str, ckpt: Path) -> dict:
        out = work / f"pred_{name}"
        if not (args.reuse and (out / "cardiac_summary.csv").is_file()):
            run("predict.py", "--data_dir", test, "--output_dir", out, "--segmenter_path", ckpt, "--output_format",
                "nii.gz", "--device", "cpu", "--overwrite", log=log)
            run("evaluate.py", "--cardiac", "--pred_dir", out, "--data_dir", test, "--overwrite", log=log)
        return scores(out)

    results = [("domain a only (k = 0)", 0, score("a", source))]
    arms = (("from scratch", "scratch", []), ("fine-tuned from domain a", "tuned", ["--init_from", source]),
            (f"fine-tuned, encoder fixed for {args.max_epochs // 2} epochs", "frozen",
             ["--init_from", source, "--freeze_encoder_epochs", args.max_epochs // 2]))
    for k in args.k:
        data = subset(pool, k, work / f"b_{k}")
        for start, tag, extra in arms:
            name = f"b{k}_{tag}"
            if not (args.reuse and (work / name / "segmenter" / "best.pt").is_file()):
                run("train.py", "--data_dir", data, "--output_dir", work / name, "--val_fraction", 0, *budget, *extra,
                    log=log)
            results.append((start, k, score(name, work / name / "segmenter" / "best.pt")))

    head = "| start | k (domain-b subjects) | " + " | ".join(f"Dice {s}" for s in STRUCTURES) + " | LV EF MAE (pp) |"
    lines = [head, "|" + " --- |" * (len(STRUCTURES) + 3)]
    for start, k, r in results:
        dice = " | ".join(f"{r[s]:.3f}" for s in STRUCTURES)
        lines.append(f"| {start} | {k} | {dice} | {r['LV EF MAE']:.1f} |")
    table = "\n".join(lines)
    print(table)
    if args.no_write:
        return
    runs = sorted(log_csv.parent.parent for log_csv in work.glob("*/segmenter/log.csv"))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    section = "\n".join([
        HEADING, "",
        f"{datetime.date.today()}, commit {commit}, {cpu_name()} ({platform.machine()}), CPU only; "
        f"`.venv/bin/python benchmarks/bench_transfer.py` ({args.source_subjects} domain-a subjects, "
        f"{args.test_subjects} held-out domain-b subjects, every run {args.max_epochs} epochs of "
        f"{args.samples_per_epoch} slices at `--base_channels 4`, patch 128 x 128). Each row's commands are in "
        f"`{args.work_dir}/log.txt`; the held-out frames are the ED and ES frames of each test subject.", "",
        table, "",
        "Seconds of each training loop (log.csv): " + ", ".join(f"{d.name} {loop_seconds(d):.0f}" for d in runs) + ".",
        ""])
    replace_section(ROOT / "docs" / "cardiac.md", section, HEADING)
    print(f"written to {ROOT / 'docs' / 'cardiac.md'}")


if __name__ == "__main__":
    run_cli(main)
