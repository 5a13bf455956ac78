"""Accuracy against nnU-Net v2 on the same phantoms, the same folds and the same wall-clock
budget: our train.py trains each fold of a k-fold split (a process of its own, timed), nnU-Net's
3d_fullres trains the same fold from the same splits_final.json for the same seconds
(benchmarks/nnunet.py), each method's fold ensemble predicts a held-out phantom set, and
metrics.py scores both (Dice, HD95, ASSD); then a learning curve over the number of training
cases (subsets of fold 0's). Writes its section of BENCHMARKS.md.

    python3 -m venv .venv-bench && .venv-bench/bin/pip install -r requirements.txt -r requirements-bench.txt
    .venv-bench/bin/python benchmarks/bench_accuracy.py --device cuda      # full size, on a GPU
    .venv-bench/bin/python benchmarks/bench_accuracy.py --device cpu --cases 9 --test_cases 2 \\
        --shape 32 64 64 --curve 2 4 --locator_max_epochs 2 --max_epochs 2 --no_write      # a quick look

The budget: nnU-Net's training of a fold, its process's start-up, data loading and final
checkpoint included, ends within the wall-clock seconds our train.py took for that fold
(times `--budget_scale`), which include our start-up, both stages and the prediction of the
fold's validation cases. nnU-Net's planning and preprocessing run once per data set, beforehand,
outside the budget (their seconds are reported). Both use the same torch threads (every core)
and device; neither compiles its model. On a 2-core CPU nnU-Net's default plan for 48x128x128
phantoms (patch 48x128x128, batch 2, 30 M parameters) takes some 13 to 15 s per iteration on idle
cores (twice that while another training shares them), so a budget of minutes buys it tens of
iterations of the 250,000 it is designed for: CPU figures measure what each method learns in a
CPU's minutes, not what nnU-Net reaches; the GPU run is the comparison of record.

Prediction: ours as the demo predicts (`--tta --largest_component` by default, `--predict_flags`),
nnU-Net's predictor as it ships (sliding window, Gaussian weighting, mirroring over all three
axes: 8 passes per window), both ensembling the folds' probabilities. nnU-Net's own
post-processing step (keep the largest component where cross-validation says it helps) needs
its full validation run, which the budget leaves out; a row applies ours (`largest_component`,
26-connected) to its masks instead. Prediction seconds per case are each process's wall clock
(start-up and model loading included) over the number of cases.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import nnunet  # noqa: E402  (benchmarks/ is sys.path[0])

import dataset as ds  # noqa: E402
import synthetic  # noqa: E402
from common import cpu_name, publish  # noqa: E402  (benchmarks/ is sys.path[0])
from inference import resolve_device  # noqa: E402
from metrics import compute_metrics  # noqa: E402
from utils import run_cli, write_json  # noqa: E402

HEADING = "## Accuracy against nnU-Net v2 (benchmarks/bench_accuracy.py)"
SCORES = ("dice", "hd95", "assd")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = p.add_argument_group("data and folds")
    d.add_argument("--work", default=str(ROOT / "runs" / "bench_accuracy"),
                   help="phantoms, runs and predictions go here (its phantoms/, ours/, nnunet/, predictions/ and "
                        "curve/ are replaced)")
    d.add_argument("--cases", type=int, default=48, help="training phantoms, split into the folds")
    d.add_argument("--test_cases", type=int, default=10, help="held-out phantoms (seed + 1000)")
    d.add_argument("--shape", type=int, nargs=3, action="append", metavar=("D", "H", "W"),
                   help="phantom shape; repeat to cycle (default: 48 128 128 and 48 112 112, the demo's)")
    d.add_argument("--num_folds", type=int, default=3, help="folds of the split (train.py --num_folds)")
    d.add_argument("--curve", type=int, nargs="*", default=[4, 8, 16, 32],
                   help="learning curve: numbers of training cases, the first n of fold 0's, validated on fold 0's "
                        "validation cases (none: no curve)")
    d.add_argument("--seed", type=int, default=0, help="phantoms and our training")
    o = p.add_argument_group("our side (train.py, predict.py)")
    o.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="both methods train here")
    o.add_argument("--locator_max_epochs", type=int, default=6, help="train.py --locator_max_epochs (the demo's)")
    o.add_argument("--max_epochs", type=int, default=7, help="train.py --max_epochs (the demo's)")
    o.add_argument("--train_flags", default="--base_channels 4 --padding 12 16 16",
                   help="further train.py flags, one string (--train_flags='...'); default: the demo's CPU recipe")
    o.add_argument("--predict_flags", default="--tta --largest_component",
                   help="further predict.py flags, one string (--predict_flags='...'); default: the demo's")
    n = p.add_argument_group("nnU-Net")
    n.add_argument("--budget_scale", type=float, default=1.0,
                   help="nnU-Net's wall-clock budget per training = this x our train.py's seconds")
    n.add_argument("--dataset_id", type=int, default=501, help="nnU-Net dataset id (inside --work only)")
    n.add_argument("--processes", type=int, default=None, help="nnU-Net's preprocessing processes (default: cores)")
    n.add_argument("--n_proc_da", type=int, default=None,
                   help="nnU-Net's augmentation workers (default: its rule, 12 capped at the cores)")
    n.add_argument("--max_iterations_per_epoch", type=int, default=25,
                   help="BudgetTrainer: iterations per epoch at most (nnU-Net's own: 250)")
    n.add_argument("--no_mirroring", action="store_true", help="nnU-Net predicts without its mirroring")
    r = p.add_argument_group("output")
    r.add_argument("--single_folds", action="store_true", help="also predict the held-out set with each fold alone")
    r.add_argument("--output", default=str(ROOT / "BENCHMARKS.md"), help="file whose section to replace")
    r.add_argument("--no_write", action="store_true", help="print only")
    args = p.parse_args(argv)
    args.train_flags, args.predict_flags = shlex.split(args.train_flags), shlex.split(args.predict_flags)
    if args.num_folds < 2:
        p.error(f"--num_folds {args.num_folds}: cross-validation needs 2 folds or more")
    if args.cases < args.num_folds or args.test_cases < 1:
        p.error(f"--cases {args.cases} --test_cases {args.test_cases}: need a case per fold and a held-out case")
    if any(c < 1 for c in args.curve):
        p.error(f"--curve {' '.join(map(str, args.curve))}: numbers of training cases, at least 1")
    if args.budget_scale <= 0:
        p.error(f"--budget_scale {args.budget_scale}: must be positive")
    return args


# ----------------------------------------------------------------------------- the two methods

def train_ours(args, data: Path, run: Path, fold: int, log: Path, split: Path | None = None) -> float:
    """Seconds of one `train.py` process training fold `fold` (both stages, then its
    validation predictions). Without `split` the first call makes RUN/splits_final.json with
    --num_folds and later folds reuse it."""
    cmd = [sys.executable, "train.py", "--data_dir", str(data), "--output_dir", str(run), "--fold", str(fold),
           "--seed", str(args.seed), "--device", args.device, "--locator_max_epochs", str(args.locator_max_epochs),
           "--max_epochs", str(args.max_epochs), *args.train_flags]
    cmd += ["--split", str(split)] if split else ["--num_folds", str(args.num_folds)]
    return nnunet.run_logged(cmd, log, f"train.py fold {fold}", cwd=ROOT)


def predict_ours(args, run: Path, folds: list[int], test: Path, out: Path, log: Path) -> float:
    """Seconds of one `predict.py` process predicting the held-out set with the ensemble of
    `folds` of `run` (one fold: that fold's own checkpoints)."""
    if len(folds) == 1:
        k = folds[0]
        models = ["--locator_path", str(run / f"fold_{k}" / "locator" / "best.pt"),
                  "--segmenter_path", str(run / f"fold_{k}" / "segmenter" / "best.pt")]
    else:
        models = ["--run", str(run), "--folds", *map(str, folds)]
    cmd = [sys.executable, "predict.py", "--data_dir", str(test), "--output_dir", str(out), "--overwrite",
           "--device", args.device, *models, *args.predict_flags]
    return nnunet.run_logged(cmd, log, f"predict.py folds {folds}", cwd=ROOT)


def score(pred_dir: Path, cases: list[ds.Case], largest: bool = False) -> dict[str, list[float]]:
    """Per-case Dice, HD95 and ASSD of `pred_dir/<case_id>.nrrd` against the labels; with
    `largest`, of each mask's largest 26-connected component."""
    out = {k: [] for k in SCORES}
    for case in cases:
        _, label, props = ds.load_case(case)
        mask, mprops = ds.read_image(pred_dir / f"{case.case_id}.nrrd")
        assert mask.shape == label.shape and ds.same_geometry(mprops, props), f"{case.case_id}: mask off its scan"
        mask = ds.read_mask(mask, pred_dir / f"{case.case_id}.nrrd", "prediction")
        if largest:
            mask = ds.largest_component(mask, connectivity=3)
        m = compute_metrics(mask, label, spacing=props["spacing"])
        for k in SCORES:
            out[k].append(m[k])
    return out


def mean_std(values: list[float], digits: int) -> str:
    return f"{statistics.mean(values):.{digits}f} +- {statistics.pstdev(values):.{digits}f}"


def link_subset(src: Path, dst: Path, case_ids: list[str]) -> Path:
    """A data folder holding only `case_ids` of `src` (LASC layout), as symlinks: train.py's
    split must name every case of its data folder."""
    dst.mkdir(parents=True)
    for c in case_ids:
        (dst / c).symlink_to((src / c).resolve(), target_is_directory=True)
    return dst


# ----------------------------------------------------------------------------- the benchmark

def main(argv=None):
    args = parse_args(argv)
    device = resolve_device(args.device)
    args.device = device.type
    threads = nnunet.default_threads()
    torch.set_num_threads(threads)
    shapes = [tuple(s) for s in args.shape] if args.shape else [(48, 128, 128), (48, 112, 112)]
    work = Path(args.work).resolve()
    for sub in ("phantoms", "phantoms_test", "ours", "nnunet", "predictions", "curve", "logs"):
        if (work / sub).exists():
            shutil.rmtree(work / sub)
    logs = work / "logs"
    train_dir, test_dir = work / "phantoms", work / "phantoms_test"
    synthetic.write_phantom_dataset(train_dir, args.cases, shapes, seed=args.seed)
    synthetic.write_phantom_dataset(test_dir, args.test_cases, shapes, seed=args.seed + 1000)
    cases = ds.find_cases(train_dir, require_labels=True)
    test_cases = ds.find_cases(test_dir, require_labels=True)
    load_before = os.getloadavg()[0]

    # Ours, fold by fold, each a timed train.py process; the first makes the folds.
    ours_run, nn_work = work / "ours", work / "nnunet"
    ours_s = []
    for k in range(args.num_folds):
        ours_s.append(train_ours(args, train_dir, ours_run, k, logs / f"ours_fold{k}.log"))
        print(f"ours: fold {k} trained in {ours_s[-1]:.1f} s")
    folds = json.loads((ours_run / "splits_final.json").read_text())

    # Learning-curve folds: the first n of fold 0's training cases, fold 0's validation cases.
    curve = sorted({n for n in args.curve if n <= len(folds[0]["train"])})
    dropped = sorted(set(args.curve) - set(curve))
    if dropped:
        print(f"--curve {dropped}: more than fold 0's {len(folds[0]['train'])} training cases; left out")
    curve_folds = [{"train": folds[0]["train"][:n], "val": folds[0]["val"]} for n in curve]

    # nnU-Net: export, plan and preprocess once, the same folds (+ the curve's as further folds).
    nnunet.export_dataset(cases, nn_work, args.dataset_id, "Phantoms")
    plan_s = nnunet.plan_and_preprocess(nn_work, args.dataset_id, processes=args.processes or threads,
                                        log=logs / "nnunet_plan.log")
    plan = nnunet.plan_summary(nn_work, args.dataset_id)
    print(f"nnU-Net plan ({plan_s:.0f} s): {nnunet.describe_plan(plan)}")
    nnunet.install_splits(nn_work, args.dataset_id, folds + curve_folds)
    nn_runs = []
    for k in range(args.num_folds):
        nn_runs.append(nnunet.train_fold(nn_work, args.dataset_id, k, args.budget_scale * ours_s[k],
                                         device=args.device, threads=threads, n_proc_da=args.n_proc_da,
                                         max_iterations_per_epoch=args.max_iterations_per_epoch,
                                         log=logs / f"nnunet_fold{k}.log"))
        r = nn_runs[-1]
        print(f"nnU-Net: fold {k} trained in {r['seconds']:.1f} s of {r['budget_s']:.1f}: {r['total_iterations']} "
              f"iterations, {r['seconds_per_iteration']:.2f} s each")

    # Held-out predictions: each method's fold ensemble (and each fold alone with --single_folds).
    preds = work / "predictions"
    all_folds = list(range(args.num_folds))
    results = {}  # (method, what) -> {"scores", "s_per_case", ...}

    def predict(method: str, what: str, fold_list: list[int], run_dir: Path = ours_run) -> None:
        out = preds / f"{method}_{what}"
        if method == "ours":
            seconds = predict_ours(args, run_dir, fold_list, test_dir, out, logs / f"predict_{method}_{what}.log")
            results[(method, what)] = {"scores": score(out, test_cases), "s_per_case": seconds / len(test_cases)}
        else:
            p = nnunet.predict_cases(nn_work, args.dataset_id, fold_list, test_cases, out, device=args.device,
                                     threads=threads, mirroring=not args.no_mirroring,
                                     log=logs / f"predict_{method}_{what}.log")
            results[(method, what)] = {"scores": score(out, test_cases), "s_per_case": p["seconds"] / len(test_cases),
                                       "inner_s_per_case": statistics.mean(p["case_seconds"].values())}
            if what == "ensemble":
                results[(method, "ensemble_lcc")] = {"scores": score(out, test_cases, largest=True),
                                                     "s_per_case": results[(method, what)]["s_per_case"]}
        print(f"{method} {what}: held-out Dice {mean_std(results[(method, what)]['scores']['dice'], 3)}")

    for method in ("ours", "nnunet"):
        predict(method, "ensemble", all_folds)
        if args.single_folds:
            for k in all_folds:
                predict(method, f"fold{k}", [k])

    # Learning curve: train both on each subset (the same seconds), predict with that model alone.
    curve_rows = []
    for i, n in enumerate(curve):
        fold_index = args.num_folds + i  # the curve's folds follow the k-fold ones in nnU-Net's splits
        cdir = work / "curve" / f"n{n}"
        data = link_subset(train_dir, cdir / "data", curve_folds[i]["train"] + curve_folds[i]["val"])
        write_json(cdir / "splits_final.json", [curve_folds[i]])
        t_ours = train_ours(args, data, cdir / "ours", 0, logs / f"ours_curve{n}.log", split=cdir / "splits_final.json")
        r = nnunet.train_fold(nn_work, args.dataset_id, fold_index, args.budget_scale * t_ours, device=args.device,
                              threads=threads, n_proc_da=args.n_proc_da,
                              max_iterations_per_epoch=args.max_iterations_per_epoch, log=logs / f"nnunet_curve{n}.log")
        predict("ours", f"curve{n}", [0], run_dir=cdir / "ours")
        predict("nnunet", f"curve{n}", [fold_index])
        curve_rows.append((n, t_ours, r))
    load_after = os.getloadavg()[0]

    lines = report_lines(args, argv, device, threads, shapes, folds, ours_s, nn_runs, plan, plan_s, results,
                         curve_rows, load_before, load_after)
    publish(lines, HEADING, args.output, write=not args.no_write)


def report_lines(args, argv, device, threads, shapes, folds, ours_s, nn_runs, plan, plan_s, results, curve_rows,
                 load_before, load_after) -> list[str]:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    host = f"{cpu_name()}, {os.cpu_count()} cores ({threads} torch threads)"
    machine = f"{torch.cuda.get_device_name(device)}; host {host}" if device.type == "cuda" else host
    given = argv if argv is not None else sys.argv[1:]
    command = ".venv-bench/bin/python benchmarks/bench_accuracy.py " + " ".join(given)
    loaded = load_before > 0.5 * (os.cpu_count() or 1) + 0.5  # the load after includes this run's own
    nn_version = importlib.metadata.version("nnunetv2")
    shape_text = ", ".join("x".join(map(str, s)) for s in shapes)
    k = args.num_folds
    lines = [
        HEADING, "",
        f"`{command.strip()}` on {datetime.date.today().isoformat()}, commit {commit}: {machine}; torch "
        f"{torch.__version__}, nnunetv2 {nn_version}, Python {platform.python_version()}; device {device.type}; "
        f"load average {load_before:.1f} before, {load_after:.1f} after"
        + (" (other jobs were running: times are inflated, and nnU-Net's budget with them)." if loaded else "."),
        "",
        f"{args.cases} training phantoms (seed {args.seed}; {shape_text}) in {k} folds, the same "
        f"splits_final.json for both (made by train.py); {args.test_cases} held-out phantoms (seed "
        f"{args.seed + 1000}). Ours: `train.py --locator_max_epochs {args.locator_max_epochs} --max_epochs "
        f"{args.max_epochs} {' '.join(args.train_flags)}`, `predict.py {' '.join(args.predict_flags)}`. nnU-Net v2: "
        f"its 3d_fullres plan ({nnunet.describe_plan(plan)}; planning and preprocessing {plan_s:.0f} s, outside "
        f"the budget), `BudgetTrainer` (its recipe, the schedule fitted to the budget) for {args.budget_scale:g} x "
        f"our seconds per fold, its predictor with {'no ' if args.no_mirroring else ''}mirroring.",
        "",
        "| method | held-out Dice | HD95 (mm) | ASSD (mm) | training s per fold | prediction s per case |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    names = {("ours", "ensemble"): f"ours, ensemble of {k} folds",
             ("nnunet", "ensemble"): f"nnU-Net v2, ensemble of {k} folds",
             ("nnunet", "ensemble_lcc"): f"nnU-Net v2, ensemble of {k} folds, largest component (ours)"}
    train_s = {"ours": statistics.mean(ours_s), "nnunet": statistics.mean(r["seconds"] for r in nn_runs)}
    for key, name in names.items():
        res = results[key]
        sc = res["scores"]
        lines.append(f"| {name} | {mean_std(sc['dice'], 3)} | {mean_std(sc['hd95'], 2)} | {mean_std(sc['assd'], 2)} | "
                     f"{train_s[key[0]]:.0f} | {res['s_per_case']:.1f} |")
    nn_inner = results[("nnunet", "ensemble")]["inner_s_per_case"]
    lines += [
        "",
        f"nnU-Net's prediction seconds per case without its process start and model loading: {nn_inner:.1f}.",
        "",
        "Per fold (nnU-Net's budget is our seconds; its iterations are what fitted):", "",
        "| fold | training cases | ours (s) | nnU-Net (s) | nnU-Net iterations (epochs) | s per iteration | "
        "final lr"
        + (" | ours Dice, fold alone | nnU-Net Dice, fold alone |" if args.single_folds else " |"),
        "| --- | --- | --- | --- | --- | --- | ---" + (" | --- | --- |" if args.single_folds else " |"),
    ]
    for f, (t, r) in enumerate(zip(ours_s, nn_runs)):
        row = (f"| {f} | {len(folds[f]['train'])} | {t:.0f} | {r['seconds']:.0f} | {r['total_iterations']} "
               f"({r['epochs']}) | {r['seconds_per_iteration']:.2f} | "
               f"{r['final_lr']:.1e} |")
        if args.single_folds:
            row += (f" {mean_std(results[('ours', f'fold{f}')]['scores']['dice'], 3)} | "
                    f"{mean_std(results[('nnunet', f'fold{f}')]['scores']['dice'], 3)} |")
        lines.append(row)
    if curve_rows:
        lines += [
            "",
            f"Learning curve: the first n of fold 0's training cases, validated on its {len(folds[0]['val'])}; "
            "each model alone on the held-out set:", "",
            "| training cases | ours Dice | nnU-Net Dice | seconds (ours = nnU-Net's budget) | nnU-Net iterations |",
            "| --- | --- | --- | --- | --- |",
        ]
        for n, t, r in curve_rows:
            lines.append(f"| {n} | {mean_std(results[('ours', f'curve{n}')]['scores']['dice'], 3)} | "
                         f"{mean_std(results[('nnunet', f'curve{n}')]['scores']['dice'], 3)} | {t:.0f} "
                         f"({r['seconds']:.0f}) | {r['total_iterations']} |")
    lines.append("")
    return lines


if __name__ == "__main__":
    run_cli(main)
