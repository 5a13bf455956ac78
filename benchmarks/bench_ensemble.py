"""Fold ensembles on held-out phantoms: does the ensemble of a k-fold run score at least the mean
of its single folds, should it average probabilities or logits, and how does its time grow with
the number of models? Trains `train.py --num_folds K --fold all` on a phantom set (a process of
its own), reports the folds' cross-validation (`evaluate.py --crossval`), then predicts a
held-out phantom set with each fold alone and with the ensemble of all folds, averaging
probabilities and averaging logits, with and without `--tta`, through `inference` (the code
predict.py runs). Writes its section of docs/experiments.md.

    .venv-bench/bin/python benchmarks/bench_ensemble.py                      # CPU-sized defaults
    .venv-bench/bin/python benchmarks/bench_ensemble.py --cases 12 --test_cases 3 --no_write   # quick look
"""
from __future__ import annotations

import argparse
import datetime
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import dataset as ds  # noqa: E402
import inference  # noqa: E402
import synthetic  # noqa: E402
from common import cpu_name, publish  # noqa: E402  (benchmarks/ is sys.path[0])
from metrics import compute_metrics  # noqa: E402
from utils import run_cli  # noqa: E402

HEADING = "## Fold ensembles (benchmarks/bench_ensemble.py)"
# The demo's CPU recipe (Makefile), with epochs of the demo's length per fold.
TRAIN_FLAGS = ["--device", "cpu", "--base_channels", "4", "--padding", "12", "16", "16"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="runs/bench_ensemble", help="phantoms and the run go here")
    p.add_argument("--cases", type=int, default=30, help="training phantoms (split into the folds)")
    p.add_argument("--test_cases", type=int, default=10, help="held-out phantoms")
    p.add_argument("--shape", type=int, nargs=3, action="append", help="phantom shape(s) (default 48 128 128 and "
                   "48 112 112)")
    p.add_argument("--num_folds", type=int, default=3)
    p.add_argument("--locator_max_epochs", type=int, default=12)
    p.add_argument("--max_epochs", type=int, default=14)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=str(ROOT / "docs" / "experiments.md"))
    p.add_argument("--no_write", action="store_true", help="print the section only")
    return p.parse_args(argv)


def score(pipe: inference.TwoStage, cases: list[ds.Case]) -> tuple[list[float], float]:
    """Held-out Dice per case and the mean seconds per case (read to mask, without writing)."""
    dice, seconds = [], []
    for case in cases:
        image, label, props = ds.load_case(case)
        start = time.perf_counter()
        prob, _ = inference.predict_two_stage(pipe, image, props)
        mask = inference.to_mask(prob)
        seconds.append(time.perf_counter() - start)
        dice.append(compute_metrics(mask, label, spacing=props["spacing"])["dice"])
    return dice, statistics.mean(seconds)


def main(argv=None):
    args = parse_args(argv)
    inference.set_cpu_threads()
    shapes = [tuple(s) for s in args.shape] if args.shape else [(48, 128, 128), (48, 112, 112)]
    work = Path(args.work)
    train_dir, test_dir, run = work / "phantoms", work / "phantoms_test", work / "run"
    synthetic.write_phantom_dataset(train_dir, args.cases, shapes, seed=args.seed)
    synthetic.write_phantom_dataset(test_dir, args.test_cases, shapes, seed=args.seed + 1000)
    epochs = ["--locator_max_epochs", str(args.locator_max_epochs), "--max_epochs", str(args.max_epochs)]
    start = time.perf_counter()
    subprocess.run([sys.executable, "train.py", "--data_dir", str(train_dir), "--output_dir", str(run), "--overwrite",
                    "--num_folds", str(args.num_folds), "--seed", str(args.seed), *TRAIN_FLAGS, *epochs],
                   cwd=ROOT, check=True)
    train_s = time.perf_counter() - start
    crossval = subprocess.run([sys.executable, "evaluate.py", "--crossval", str(run)], cwd=ROOT, check=True,
                              capture_output=True, text=True).stdout
    table = "\n".join(line for line in crossval.strip().splitlines() if "written to" not in line)
    cases = ds.find_cases(test_dir, require_labels=True)
    cpu = torch.device("cpu")
    folds = list(range(args.num_folds))
    loc = [run / f"fold_{k}" / "locator" / "best.pt" for k in folds]
    seg = [run / f"fold_{k}" / "segmenter" / "best.pt" for k in folds]
    rows = []
    for tta in (False, True):
        singles = [score(inference.load_two_stage(loc[k], seg[k], cpu, tta), cases) for k in folds]
        for k, (dice, sec) in enumerate(singles):
            rows.append((f"fold {k}", tta, dice, sec))
        fold_mean = [statistics.mean(d[i] for d, _ in singles) for i in range(len(cases))]
        rows.append(("mean of the single folds", tta, fold_mean, statistics.mean(s for _, s in singles)))
        for average in inference.AVERAGES:
            dice, sec = score(inference.load_two_stage(loc, seg, cpu, tta, average), cases)
            rows.append((f"ensemble of {args.num_folds}, mean of {average}", tta, dice, sec))

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    lines = [HEADING, "",
             f"{datetime.date.today()}, commit {commit}, {cpu_name()} ({torch.get_num_threads()} threads), "
             f"torch {torch.__version__}. {args.cases} training phantoms (seed {args.seed}) in {args.num_folds} folds, "
             f"{args.test_cases} held-out phantoms (seed {args.seed + 1000}), shapes "
             f"{', '.join('x'.join(map(str, s)) for s in shapes)}; the demo's recipe with "
             f"{args.locator_max_epochs} locator and {args.max_epochs} segmenter epochs per fold; all folds trained "
             f"in {train_s / 60:.1f} min.", "",
             "```bash",
             f".venv-bench/bin/python benchmarks/bench_ensemble.py --cases {args.cases} --test_cases {args.test_cases} "
             f"--num_folds {args.num_folds} --locator_max_epochs {args.locator_max_epochs} "
             f"--max_epochs {args.max_epochs}", "```", "",
             "Cross-validation of the run (`evaluate.py --crossval`):", "", "```", table, "```", "",
             "Held-out Dice (mean +- std over the held-out phantoms, and each model's seconds per case on this CPU, "
             "read to mask):", "",
             "| predicted with | `--tta` | held-out Dice | min | s / case |", "| --- | --- | --- | --- | --- |"]
    for name, tta, dice, sec in rows:
        mean, std = statistics.mean(dice), statistics.pstdev(dice)
        lines.append(f"| {name} | {'yes' if tta else 'no'} | {mean:.4f} +- {std:.4f} | {min(dice):.4f} | {sec:.2f} |")
    lines.append("")
    publish(lines, HEADING, args.output, write=not args.no_write)


if __name__ == "__main__":
    run_cli(main)
