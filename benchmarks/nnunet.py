"""nnU-Net v2 as the accuracy peer of benchmarks/bench_accuracy.py: our cases written in its raw
layout, its own fingerprint, planning and preprocessing (3d_fullres), our folds as its
splits_final.json, its default trainer's recipe trained for a wall-clock budget on the same
CPU threads as ours, and its predictor writing one mask per scan with the scan's geometry.

Installed, pinned, into the benchmark environment on top of the CPU build of torch (the
constraint keeps pip from replacing it with a CUDA build):

    .venv-bench/bin/pip install -c <(echo torch==2.13.0) nnunetv2==2.8.1
    # or, from a fresh clone: .venv-bench/bin/pip install -r requirements.txt -r requirements-bench.txt

End to end on tiny phantoms (export, plan, 3 folds, fold 0 for 90 s, predict its 2 validation
cases, score them with metrics.py), and the plan of a larger set with its seconds per iteration:

    .venv-bench/bin/python phantoms.py --out_dir /tmp/nn_smoke/data --num_cases 6 --shape 32 64 64 --seed 0
    .venv-bench/bin/python benchmarks/nnunet.py smoke --data_dir /tmp/nn_smoke/data --work /tmp/nn_smoke/work
    .venv-bench/bin/python benchmarks/nnunet.py plan --data_dir DATA --work WORK --time_budget_s 120

From Python (what bench_accuracy.py does), every path under one work folder:

    export_dataset(ds.find_cases(data, require_labels=True), work, 501, "Phantoms")
    plan_and_preprocess(work, 501)                     # -> plan_summary(work, 501)
    install_splits(work, 501, "RUN/splits_final.json")  # the folds our train.py used
    run = train_fold(work, 501, fold=0, budget_s=600)   # -> run["seconds"], run["output_folder"]
    pred = predict_cases(work, 501, [0], cases, out_dir)  # -> OUT/<case_id>.nrrd, seconds per case

nnunetv2 is never imported by this process: planning is its command-line entry point, training
and prediction run in a child process (`python benchmarks/nnunet.py _train|_predict`) whose
environment names the work folder (nnU-Net resolves `nnUNet_raw`, `nnUNet_preprocessed` and
`nnUNet_results` from the environment, at import time in older releases), and whose torch
threads, augmentation workers and memory cannot leak into the benchmark or into our side's
timings. The child's wall clock, start-up and imports included, is what `train_fold` reports
and what the budget bounds, as bench_accuracy.py times our train.py as a whole process.

What is nnU-Net's and what is ours. Its: the planner (`ExperimentPlanner`, the "nnUNetPlans"
defaults: patch and batch size, target spacing, the PlainConvUNet's stages), z-score
normalisation (the channel is named "MRI", which nnU-Net maps to its default z-score, masked to
the non-zero region when cropping to it shrinks the scans by a quarter or more, as it decides
for any z-scored channel), the network, Dice + cross-entropy with deep supervision, SGD with Nesterov
momentum 0.99 from lr 0.01, its augmentation pipeline and foreground oversampling, the poly
learning-rate schedule, the sliding-window predictor (step 0.5, Gaussian weighting, mirroring
over every axis it trained with) and its resampling back to the scan's grid. Ours, in
`budget_trainer_class`: how many epochs of how many iterations fit the budget (its 1000 x 250
become what the CPU affords; the poly schedule still reaches its end), a hard stop at the
budget, 1 validation iteration per epoch instead of 50 (its per-epoch pseudo-Dice is not part
of the comparison), no `checkpoint_best.pth` and one `progress.png` at the end instead of one
per epoch (each costs seconds on a CPU and we predict with `checkpoint_final.pth`, nnU-Net's own
default), and no final validation-set prediction (we predict held-out scans ourselves).
nnU-Net seeds nothing, so two runs differ.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import dataset as ds  # noqa: E402
from splits import kfold_splits  # noqa: E402
from utils import UserError, run_cli, write_json  # noqa: E402

CONFIGURATION = "3d_fullres"
PLANS = "nnUNetPlans"
TRAINER = "BudgetTrainer"  # the class name nnU-Net records in checkpoints and folder names
CHANNEL_NAME = "MRI"  # not one of nnU-Net's named schemes (CT, noNorm, ...): its default z-score
LABELS = {"background": 0, "atrium": 1}
FILE_ENDING = ".nii.gz"


# ----------------------------------------------------------------------------- folders and environment

def dataset_name(dataset_id: int, name: str) -> str:
    """nnU-Net's folder name: dataset_name(501, "Phantoms") -> "Dataset501_Phantoms"."""
    if not 1 <= dataset_id <= 999:
        raise ValueError(f"dataset_id {dataset_id}: nnU-Net needs 1..999 (three digits)")
    if not name or not name.replace("_", "").isalnum():
        raise ValueError(f"name {name!r}: letters, digits and underscores only")
    return f"Dataset{dataset_id:03d}_{name}"


def folders(work: str | Path) -> dict[str, Path]:
    """The three folders nnU-Net works in, all under `work`."""
    work = Path(work).resolve()
    return {"nnUNet_raw": work / "nnUNet_raw", "nnUNet_preprocessed": work / "nnUNet_preprocessed",
            "nnUNet_results": work / "nnUNet_results"}


def find_dataset(work: str | Path, dataset_id: int) -> str:
    """The `DatasetXXX_Name` folder of `dataset_id` that `export_dataset` wrote under `work`."""
    raw = folders(work)["nnUNet_raw"]
    found = sorted(raw.glob(f"Dataset{dataset_id:03d}_*")) if raw.is_dir() else []
    if len(found) != 1:
        raise UserError(f"{raw}: expected one Dataset{dataset_id:03d}_* folder, found {len(found)}; "
                        "run export_dataset first")
    return found[0].name


def nnunet_env(work: str | Path, *, n_proc_da: int | None = None, processes: int | None = None,
               threads: int | None = None) -> dict[str, str]:
    """The environment of an nnU-Net child process: its three folders under `work`, the
    augmentation worker processes (`nnUNet_n_proc_DA`, 0 = in the training process; unset,
    nnU-Net's own rule: 12, at most one per core), the processes of its planning and
    preprocessing (`nnUNet_def_n_proc`), and torch's threads (`OMP_NUM_THREADS`, which the child
    also passes to torch.set_num_threads)."""
    env = dict(os.environ)
    env.update({k: str(v) for k, v in folders(work).items()})
    env["nnUNet_compile"] = env.get("nnUNet_compile", "false")  # nnU-Net compiles on CUDA by default; ours does not
    if n_proc_da is not None:
        env["nnUNet_n_proc_DA"] = str(n_proc_da)
    if processes is not None:
        env["nnUNet_def_n_proc"] = str(processes)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def default_threads() -> int:
    """torch threads for both methods: what inference.set_cpu_threads gives our train.py and
    predict.py (every core, unless OMP_NUM_THREADS says otherwise)."""
    return int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1)


# ----------------------------------------------------------------------------- raw dataset

def export_dataset(cases: list[ds.Case], work: str | Path, dataset_id: int, name: str = "Phantoms") -> Path:
    """Write labelled `cases` (from `ds.find_cases(..., require_labels=True)`) as nnU-Net's raw
    dataset `work/nnUNet_raw/DatasetXXX_Name/`:

        imagesTr/<case_id>_0000.nii.gz   float32, the scan's spacing, origin and direction
        labelsTr/<case_id>.nii.gz        uint8 {0, 1} (LASC's 0/255 read as 0/1), same grid
        dataset.json                     channel "MRI", labels background 0 / atrium 1

    Returns the dataset folder. An existing folder of that id is replaced."""
    if not cases:
        raise UserError("export_dataset: no cases given")
    folder = folders(work)["nnUNet_raw"] / dataset_name(dataset_id, name)
    for old in folder.parent.glob(f"Dataset{dataset_id:03d}_*") if folder.parent.is_dir() else []:
        shutil.rmtree(old)
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    for case in cases:
        if case.label is None:
            raise UserError(f"case {case.case_id}: no label; nnU-Net trains on labelled cases only")
        image, label, props = ds.load_case(case)
        ds.write_image(image, props, folder / "imagesTr" / f"{case.case_id}_0000{FILE_ENDING}")
        ds.write_image(label, props, folder / "labelsTr" / f"{case.case_id}{FILE_ENDING}")
    write_json(folder / "dataset.json", {
        "name": name, "channel_names": {"0": CHANNEL_NAME}, "labels": LABELS,
        "numTraining": len(cases), "file_ending": FILE_ENDING})
    return folder


# ----------------------------------------------------------------------------- planning

def plan_and_preprocess(work: str | Path, dataset_id: int, *, processes: int = 1, planner: str = "ExperimentPlanner",
                        verify: bool = True, log: Path | None = None) -> float:
    """nnU-Net's fingerprint extraction, experiment planning and 3d_fullres preprocessing of
    the exported dataset, through its command-line entry point (`nnUNetv2_plan_and_preprocess
    -d ID -c 3d_fullres -np P -npfp P --verify_dataset_integrity`), with `processes` worker
    processes. The planner is nnU-Net's default unless `planner` names another (e.g.
    "nnUNetPlannerResEncM", its residual-encoder preset). Returns the seconds it took."""
    cmd = ["-d", str(dataset_id), "-c", CONFIGURATION, "-np", str(processes), "-npfp", str(processes),
           "-pl", planner, "--no_pbar"] + (["--verify_dataset_integrity"] if verify else [])
    if planner != "ExperimentPlanner":
        cmd += ["-overwrite_plans_name", PLANS]  # one plans name for training and prediction
    code = ("import sys; from nnunetv2.experiment_planning.plan_and_preprocess_entrypoints import "
            "plan_and_preprocess_entry as main; sys.argv[0] = 'nnUNetv2_plan_and_preprocess'; main()")
    return run_logged([sys.executable, "-c", code, *cmd], log, f"nnU-Net planning of dataset {dataset_id}",
                      env=nnunet_env(work, processes=processes))


def plans_path(work: str | Path, dataset_id: int) -> Path:
    return folders(work)["nnUNet_preprocessed"] / find_dataset(work, dataset_id) / f"{PLANS}.json"


def plan_summary(work: str | Path, dataset_id: int) -> dict:
    """What the planner chose for 3d_fullres: patch size, batch size, target spacing (array
    order, mm), median shape after resampling, normalisation, and the network's stages
    (features, strides and kernel sizes per stage)."""
    plans = json.loads(plans_path(work, dataset_id).read_text())
    c = plans["configurations"][CONFIGURATION]
    arch = c["architecture"]["arch_kwargs"]
    return {"patch_size": c["patch_size"], "batch_size": c["batch_size"], "spacing": c["spacing"],
            "median_shape": c["median_image_size_in_voxels"], "normalization": c["normalization_schemes"],
            "use_mask_for_norm": c["use_mask_for_norm"], "network": c["architecture"]["network_class_name"],
            "n_stages": arch["n_stages"], "features_per_stage": arch["features_per_stage"],
            "strides": arch["strides"], "kernel_sizes": arch["kernel_sizes"],
            "n_conv_per_stage": arch["n_conv_per_stage"], "planner": plans.get("experiment_planner_used")}


def describe_plan(p: dict) -> str:
    strides = " ".join("x".join(map(str, s)) for s in p["strides"])
    median = "x".join(f"{s:g}" for s in p["median_shape"])
    return (f"patch {'x'.join(map(str, p['patch_size']))}, batch {p['batch_size']}, spacing "
            f"{'x'.join(f'{s:g}' for s in p['spacing'])} mm, median shape {median}, "
            f"{p['network']} with {p['n_stages']} stages (features {p['features_per_stage']}, strides {strides}), "
            f"{p['normalization'][0]}{' inside the non-zero mask' if p['use_mask_for_norm'][0] else ''}")


def install_splits(work: str | Path, dataset_id: int, splits) -> Path:
    """Write `splits` (nnU-Net's format: a list of {"train": [ids], "val": [ids]}, one per fold,
    or the path of such a JSON file, as our train.py writes RUN/splits_final.json) into
    nnUNet_preprocessed/DatasetXXX_Name/splits_final.json, so nnU-Net trains exactly our folds.
    Every id must be an exported case."""
    if isinstance(splits, (str, Path)):
        splits = json.loads(Path(splits).read_text())
    name = find_dataset(work, dataset_id)
    exported = {ds.strip_image_suffix(p.name) for p in (folders(work)["nnUNet_raw"] / name / "labelsTr").iterdir()}
    if not isinstance(splits, list) or not splits:
        raise UserError("splits: expected a non-empty list of {'train': [...], 'val': [...]}")
    for k, fold in enumerate(splits):
        if set(fold) != {"train", "val"} or not fold["train"]:
            raise UserError(f"splits fold {k}: expected keys 'train' (non-empty) and 'val'")
        unknown = sorted((set(fold["train"]) | set(fold["val"])) - exported)
        if unknown:
            raise UserError(f"splits fold {k}: cases {unknown[:3]} are not in the exported dataset {name}")
        overlap = sorted(set(fold["train"]) & set(fold["val"]))
        if overlap:
            raise UserError(f"splits fold {k}: cases {overlap[:3]} are in both train and val")
    path = folders(work)["nnUNet_preprocessed"] / name / "splits_final.json"
    if not path.parent.is_dir():
        raise UserError(f"{path.parent}: not preprocessed; run plan_and_preprocess first")
    write_json(path, [{"train": list(f["train"]), "val": list(f["val"])} for f in splits])
    return path


# ----------------------------------------------------------------------------- training

def fit_schedule(remaining_s: float, s_per_iteration: float, s_per_epoch_overhead: float,
                 max_iterations: int, min_epochs: int) -> tuple[int, int]:
    """(iterations per epoch, epochs) that fill `remaining_s` seconds: at most `max_iterations`
    per epoch, fewer when that would leave under `min_epochs` epochs (the poly schedule steps
    once per epoch, so it needs some), at least one iteration; the epochs are as many as fit.

    Example: 300 s left, 2 s per iteration, 1 s of validation and logging per epoch, at most
    25 iterations, at least 10 epochs: 25 iterations make 51 s epochs, 5 epochs, too few; 14
    iterations make 29 s epochs, 10 of them -> (14, 10)."""
    assert s_per_iteration > 0 and max_iterations >= 1 and min_epochs >= 1, \
        (s_per_iteration, max_iterations, min_epochs)
    remaining_s = max(0.0, remaining_s)
    iterations = max_iterations
    if remaining_s / (iterations * s_per_iteration + s_per_epoch_overhead) < min_epochs:
        iterations = int((remaining_s / min_epochs - s_per_epoch_overhead) // s_per_iteration)
        iterations = max(1, min(max_iterations, iterations))
    epochs = int(remaining_s // (iterations * s_per_iteration + s_per_epoch_overhead))
    return iterations, epochs


def budget_trainer_class():
    """`BudgetTrainer`, a subclass of nnU-Net's `nnUNetTrainer` that trains its recipe unchanged
    but fits the length of the schedule to a wall-clock deadline. Built by a function because
    nnunetv2 may only be imported in the child process, once its environment names the work
    folder.

    Set after construction (the base class records its constructor's arguments by name, so
    the signature stays nnU-Net's): `deadline` (time.time() by which the process must have
    written checkpoint_final.pth), `max_iterations_per_epoch`, `min_epochs`,
    `num_val_iterations_per_epoch`, `first_epoch_fraction` (epoch 0, which times the
    iterations, ends early after that fraction of the budget)."""
    import numpy as np
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    CUDA = torch.device("cuda")  # nnUNetTrainer's default device

    class BudgetTrainer(nnUNetTrainer):
        def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                     device: torch.device = CUDA):
            super().__init__(plans, configuration, fold, dataset_json, device)
            self.deadline = float("inf")
            self.started = time.time()
            self.max_iterations_per_epoch = 25
            self.min_epochs = 10
            self.num_val_iterations_per_epoch = 1
            self.first_epoch_fraction = 0.25
            self.end_reserve_s = 3.0  # final checkpoint, augmentation workers shut down, exit
            self.report = {"epoch_seconds": [], "train_seconds": [], "train_cpu_seconds": [], "iterations": [],
                           "step_seconds_epoch0": [], "hard_stop": False}

        def _train_epoch(self, iterations: int, stop_at: float) -> None:
            """One epoch of at most `iterations` training steps, cut short at time `stop_at`,
            then nnU-Net's validation iterations and its epoch-end bookkeeping."""
            t0, cpu0 = time.time(), time.process_time()
            self.on_epoch_start()
            self.on_train_epoch_start()
            outputs = []
            while len(outputs) < iterations and (not outputs or time.time() < stop_at):
                t_step = time.time()
                outputs.append(self.train_step(next(self.dataloader_train)))
                if self.current_epoch == 0:
                    self.report["step_seconds_epoch0"].append(time.time() - t_step)
            self.on_train_epoch_end(outputs)
            t_train, cpu_train = time.time() - t0, time.process_time() - cpu0
            with torch.no_grad():
                self.on_validation_epoch_start()
                self.on_validation_epoch_end([self.validation_step(next(self.dataloader_val))
                                              for _ in range(self.num_val_iterations_per_epoch)])
            self.on_epoch_end()
            self.report["epoch_seconds"].append(time.time() - t0)
            self.report["train_seconds"].append(t_train)
            self.report["train_cpu_seconds"].append(cpu_train)  # this process's threads, not the workers'
            self.report["iterations"].append(len(outputs))

        def _refit(self) -> None:
            """Set the number of epochs (after epoch 0 also the iterations per epoch) so that the
            rest of the schedule ends by the deadline; the poly schedule's length follows."""
            r = self.report
            if len(r["epoch_seconds"]) == 1:
                # The first step pays for allocations and kernel selection: time the others.
                steps = r["step_seconds_epoch0"]
                per_it = statistics.median(steps[1:] or steps)
                overhead = r["epoch_seconds"][0] - r["train_seconds"][0]  # validation and bookkeeping
                self.end_reserve_s += overhead  # a cut-short last epoch still validates
                remaining = self.deadline - self.end_reserve_s - time.time()
                self.num_iterations_per_epoch, more = fit_schedule(
                    remaining, per_it, overhead, self.max_iterations_per_epoch, self.min_epochs)
                r["seconds_per_iteration_epoch0"] = per_it
            else:
                remaining = self.deadline - self.end_reserve_s - time.time()
                more = int(max(0.0, remaining) // statistics.median(r["epoch_seconds"][1:]))
            self.num_epochs = self.current_epoch + more
            self.lr_scheduler.max_steps = max(self.num_epochs, 1)

        def run_training(self):
            self.on_train_start()
            self.disable_checkpointing = True  # no checkpoint_best.pth: we predict with the final one
            plot = self.logger.plot_progress_png
            self.logger.plot_progress_png = lambda folder: None  # once at the end instead
            # Epoch 0 times the steps; its lr is the initial one whatever the schedule's length.
            first_stop = self.started + self.first_epoch_fraction * (self.deadline - self.started)
            self._train_epoch(self.max_iterations_per_epoch, min(first_stop, self.deadline - self.end_reserve_s))
            self._refit()
            while self.current_epoch < self.num_epochs:
                stop_at = self.deadline - self.end_reserve_s
                self._train_epoch(self.num_iterations_per_epoch, stop_at)
                if time.time() >= stop_at:
                    self.report["hard_stop"] = self.current_epoch < self.num_epochs  # slower than fitted
                    break
                self._refit()
            self.disable_checkpointing = False
            self.logger.plot_progress_png = plot
            t_plot = time.time()
            if self.local_rank == 0:
                plot(self.output_folder)
            self.report.update(plot_seconds=time.time() - t_plot, epochs=self.current_epoch,
                               final_lr=float(self.optimizer.param_groups[0]["lr"]),
                               parameters=sum(p.numel() for p in self.network.parameters()),
                               iterations_per_epoch=self.num_iterations_per_epoch,
                               total_iterations=int(np.sum(self.report["iterations"])))
            self.on_train_end()

    return BudgetTrainer


def train_fold(work: str | Path, dataset_id: int, fold: int | str, budget_s: float, *, device: str = "cpu",
               threads: int | None = None, n_proc_da: int | None = None, max_iterations_per_epoch: int = 25,
               min_epochs: int = 10, val_iterations: int = 1, log: Path | None = None) -> dict:
    """Train fold `fold` (an index into splits_final.json, or "all") of nnU-Net's 3d_fullres
    with `BudgetTrainer`, in a child process that must end within `budget_s` seconds of its
    start. Returns {"seconds": the child's wall clock, "output_folder": the fold's folder
    holding checkpoint_final.pth, "epochs", "iterations_per_epoch", "total_iterations",
    "seconds_per_iteration" (median over the epochs after the first), "cpu_seconds_per_iteration"
    (the training process's CPU time, all its threads: over `threads` it is the wall clock the
    step would take on otherwise idle cores), "final_lr", "hard_stop"}. A previous run of that fold is replaced."""
    name = find_dataset(work, dataset_id)
    out = folders(work)["nnUNet_results"] / name / f"{TRAINER}__{PLANS}__{CONFIGURATION}" / f"fold_{fold}"
    if out.exists():
        shutil.rmtree(out)
    threads = threads or default_threads()
    result = Path(work).resolve() / f".train_{dataset_id}_fold{fold}.json"
    result.unlink(missing_ok=True)
    t0 = time.time()
    cmd = [sys.executable, str(Path(__file__).resolve()), "_train", "--work", str(work), "--dataset_id",
           str(dataset_id), "--fold", str(fold), "--deadline", repr(t0 + budget_s), "--device", device,
           "--threads", str(threads), "--max_iterations_per_epoch", str(max_iterations_per_epoch),
           "--min_epochs", str(min_epochs), "--val_iterations", str(val_iterations), "--result", str(result)]
    seconds = run_logged(cmd, log, f"nnU-Net training of fold {fold}", timeout=budget_s + 300,
                         env=nnunet_env(work, n_proc_da=n_proc_da, threads=threads))
    report = json.loads(result.read_text())
    steady = [t / n for t, n in zip(report["train_seconds"][1:], report["iterations"][1:]) if n]
    cpu = [t / n for t, n in zip(report["train_cpu_seconds"], report["iterations"]) if n]
    report.update(seconds=seconds, budget_s=budget_s, output_folder=str(out), threads=threads,
                  n_proc_da=n_proc_da if n_proc_da is not None else min(12, os.cpu_count() or 1),
                  seconds_per_iteration=statistics.median(steady) if steady
                  else report.get("seconds_per_iteration_epoch0"),
                  cpu_seconds_per_iteration=statistics.median(cpu))
    if not (out / "checkpoint_final.pth").is_file():
        raise RuntimeError(f"{out}: no checkpoint_final.pth after training")
    return report


def _train_child(args) -> None:
    import torch
    torch.set_num_threads(args.threads)
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.paths import nnUNet_preprocessed
    name = find_dataset(args.work, args.dataset_id)
    plans = load_json(os.path.join(nnUNet_preprocessed, name, f"{PLANS}.json"))
    plans["continue_training"] = False
    dataset_json = load_json(os.path.join(nnUNet_preprocessed, name, "dataset.json"))
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as nnU-Net's run_training does
    fold = args.fold if args.fold == "all" else int(args.fold)
    trainer = budget_trainer_class()(plans=plans, configuration=CONFIGURATION, fold=fold,
                                     dataset_json=dataset_json, device=device)
    trainer.deadline = args.deadline
    trainer.max_iterations_per_epoch = args.max_iterations_per_epoch
    trainer.min_epochs = args.min_epochs
    trainer.num_val_iterations_per_epoch = args.val_iterations
    trainer.run_training()
    write_json(args.result, trainer.report)


# ----------------------------------------------------------------------------- prediction

def predict_cases(work: str | Path, dataset_id: int, folds, cases: list[ds.Case], out_dir: str | Path, *,
                  checkpoint: str = "checkpoint_final.pth", mirroring: bool = True, tile_step: float = 0.5,
                  device: str = "cpu", threads: int | None = None, log: Path | None = None) -> dict:
    """Predict the scans of `cases` with the trained `folds` (several: nnU-Net averages their
    softmax, its fold ensemble) and nnU-Net's predictor as it ships: sliding window with step
    `tile_step` of the patch, Gaussian weighting, mirroring over every axis it trained with
    (8 passes per window in 3D) unless `mirroring` is False, then its resampling back to the
    scan's grid. Each mask is written as `out_dir/<case_id>.nrrd` (uint8 0/1, predict.py's
    naming) with the scan's spacing, origin and direction, read back and checked against the
    scan. Runs in a child process; returns {"seconds": its wall clock, "load_seconds": until
    the model was ready, "case_seconds": {case_id: read + predict + write}, "masks": {case_id: path}}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    folds = [folds] if isinstance(folds, (int, str)) else list(folds)
    threads = threads or default_threads()
    request = Path(work).resolve() / f".predict_{dataset_id}.json"
    write_json(request, {"cases": [[c.case_id, str(c.image)] for c in cases]})
    result = request.with_name(f".predict_{dataset_id}_result.json")
    result.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "_predict", "--work", str(work), "--dataset_id",
           str(dataset_id), "--folds", *map(str, folds), "--checkpoint", checkpoint, "--tile_step", str(tile_step),
           "--device", device, "--threads", str(threads), "--request", str(request), "--result", str(result),
           "--out_dir", str(out_dir)] + ([] if mirroring else ["--no_mirroring"])
    seconds = run_logged(cmd, log, "nnU-Net prediction", env=nnunet_env(work, threads=threads, processes=1))
    report = json.loads(result.read_text())
    for case in cases:  # the masks must lie on their scans' grids
        shape, props = ds.read_image_info(case.image)
        mshape, mprops = ds.read_image_info(report["masks"][case.case_id])
        if tuple(mshape) != tuple(shape) or not ds.same_geometry(props, mprops):
            raise RuntimeError(f"{report['masks'][case.case_id]}: geometry differs from its scan {case.image}")
    report["seconds"] = seconds
    return report


def _predict_child(args) -> None:
    t_start = time.time()
    import numpy as np
    import torch
    torch.set_num_threads(args.threads)
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.paths import nnUNet_results
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    name = find_dataset(args.work, args.dataset_id)
    model_dir = Path(nnUNet_results.require()) / name / f"{TRAINER}__{PLANS}__{CONFIGURATION}"
    plans_manager = PlansManager(load_json(str(model_dir / "plans.json")))
    dataset_json = load_json(str(model_dir / "dataset.json"))
    config = plans_manager.get_configuration(CONFIGURATION)
    params, mirror_axes = [], None
    for fold in args.folds:
        ckpt = torch.load(model_dir / f"fold_{fold}" / args.checkpoint, map_location="cpu", weights_only=False)
        params.append(ckpt["network_weights"])
        mirror_axes = ckpt.get("inference_allowed_mirroring_axes")
    # BudgetTrainer keeps nnUNetTrainer's network, so its builder rebuilds it; the predictor is
    # initialised by hand because its own loader looks trainer classes up inside nnunetv2.
    network = nnUNetTrainer.build_network_architecture(
        plans_manager, config, determine_num_input_channels(plans_manager, config, dataset_json),
        plans_manager.get_label_manager(dataset_json).num_segmentation_heads, enable_deep_supervision=False)
    network.load_state_dict(params[0])
    predictor = nnUNetPredictor(tile_step_size=args.tile_step, use_gaussian=True, use_mirroring=args.mirroring,
                                perform_everything_on_device=args.device == "cuda", device=torch.device(args.device),
                                verbose=False, allow_tqdm=False)
    predictor.manual_initialization(network, plans_manager, config, params, dataset_json, TRAINER, mirror_axes)
    load_seconds = time.time() - t_start

    out_dir = Path(args.out_dir)
    case_seconds, masks = {}, {}
    for case_id, image_path in json.loads(Path(args.request).read_text())["cases"]:
        t0 = time.time()
        image, props = ds.read_image(image_path)
        # nnU-Net's arrays are (C, D, H, W) with spacing in array order, as SimpleITKIO reads them.
        seg = predictor.predict_single_npy_array(image[None].astype(np.float32), {"spacing": list(props["spacing"])})
        assert seg.shape == image.shape, f"{case_id}: mask {seg.shape} vs scan {image.shape}"
        path = out_dir / f"{case_id}.nrrd"
        ds.write_image(seg.astype(np.uint8), props, path)
        case_seconds[case_id] = time.time() - t0
        masks[case_id] = str(path)
        print(f"{case_id}: {case_seconds[case_id]:.1f} s", flush=True)
    write_json(args.result, {"load_seconds": load_seconds, "case_seconds": case_seconds, "masks": masks,
                             "mirror_axes": list(mirror_axes) if mirror_axes is not None and args.mirroring else None,
                             "folds": args.folds, "checkpoint": args.checkpoint})


# ----------------------------------------------------------------------------- children

def run_logged(cmd: list[str], log: Path | None, what: str, *, env: dict | None = None, cwd: Path | None = None,
               timeout: float | None = None) -> float:
    """Run `cmd` with its output appended to `log` (or shown when None); its wall-clock
    seconds. A failure raises RuntimeError with the tail of the log."""
    t0 = time.perf_counter()
    if log is None:
        proc = subprocess.run(cmd, env=env, cwd=cwd, timeout=timeout)
        tail = ""
    else:
        Path(log).parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as f:
            proc = subprocess.run(cmd, env=env, cwd=cwd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
        tail = "\n".join(Path(log).read_text(errors="replace").splitlines()[-20:])
    seconds = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"{what} failed (exit {proc.returncode}){': see ' + str(log) if log else ''}\n{tail}")
    return seconds


# ----------------------------------------------------------------------------- command line

def smoke(args) -> None:
    """Export, plan, install k folds, train fold 0 for the budget, predict its validation
    cases, score them with metrics.py."""
    from metrics import compute_metrics
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    log = work / "nnunet.log"
    cases = ds.find_cases(args.data_dir, require_labels=True)
    t0 = time.time()
    export_dataset(cases, work, args.dataset_id, "Phantoms")
    print(f"export: {len(cases)} cases in {time.time() - t0:.1f} s")
    seconds = plan_and_preprocess(work, args.dataset_id, processes=args.processes, log=log)
    plan = plan_summary(work, args.dataset_id)
    print(f"plan and preprocess: {seconds:.1f} s; {describe_plan(plan)}")
    splits = kfold_splits([c.case_id for c in cases], args.num_folds, seed=0)
    install_splits(work, args.dataset_id, splits)
    run = train_fold(work, args.dataset_id, 0, args.budget_s, n_proc_da=args.n_proc_da, log=log,
                     max_iterations_per_epoch=args.max_iterations_per_epoch)
    print(f"train fold 0: {run['seconds']:.1f} s of a {args.budget_s:g} s budget; {run['epochs']} epochs x "
          f"{run['iterations_per_epoch']} iterations ({run['total_iterations']} in all, first epoch "
          f"{run['iterations'][0]}), {run['seconds_per_iteration']:.2f} s per iteration, final lr "
          f"{run['final_lr']:.2e}{', hard stop' if run['hard_stop'] else ''}; {run['output_folder']}")
    held = [c for c in cases if c.case_id in splits[0]["val"]]
    pred = predict_cases(work, args.dataset_id, [0], held, work / "predictions", log=log,
                         mirroring=not args.no_mirroring)
    print(f"predict: model ready in {pred['load_seconds']:.1f} s, child {pred['seconds']:.1f} s in all")
    for case in held:
        _, target, props = ds.load_case(case)
        mask, _ = ds.read_image(pred["masks"][case.case_id])
        m = compute_metrics(mask, target, spacing=props["spacing"])
        print(f"  {case.case_id}: Dice {m['dice']:.3f}, HD95 {m['hd95']:.2f} mm, ASSD {m['assd']:.2f} mm, "
              f"{pred['case_seconds'][case.case_id]:.1f} s")


def plan_command(args) -> None:
    """Export and plan a data set, print the plan; with --time_budget_s, train fold 0 of a
    5-fold split that long and print the seconds per iteration."""
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    log = work / "nnunet.log"
    cases = ds.find_cases(args.data_dir, require_labels=True)
    export_dataset(cases, work, args.dataset_id, "Phantoms")
    seconds = plan_and_preprocess(work, args.dataset_id, processes=args.processes, log=log)
    print(f"plan and preprocess of {len(cases)} cases: {seconds:.1f} s")
    print(json.dumps(plan_summary(work, args.dataset_id)))
    print(describe_plan(plan_summary(work, args.dataset_id)))
    if args.time_budget_s:
        install_splits(work, args.dataset_id, kfold_splits([c.case_id for c in cases], 5, seed=0))
        for n in args.n_proc_da:
            run = train_fold(work, args.dataset_id, 0, args.time_budget_s, n_proc_da=n, log=log,
                             max_iterations_per_epoch=args.max_iterations_per_epoch)
            print(f"nnUNet_n_proc_DA={run['n_proc_da']}: {run['seconds_per_iteration']:.2f} s per iteration "
                  f"after epoch 0 (epoch 0: {run['seconds_per_iteration_epoch0']:.2f}), CPU "
                  f"{run['cpu_seconds_per_iteration']:.1f} s per iteration over {run['threads']} threads; "
                  f"{run['total_iterations']} iterations in {run['seconds']:.1f} s of {args.time_budget_s:g}; "
                  f"{run['epochs']} epochs of {run['iterations_per_epoch']}; epoch seconds "
                  f"{', '.join(f'{s:.1f}' for s in run['epoch_seconds'])}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("smoke", help="export, plan, train fold 0 for a budget, predict and score its validation cases")
    s.add_argument("--data_dir", required=True, help="labelled cases (LASC or MSD layout)")
    s.add_argument("--work", required=True, help="nnU-Net's work folder (raw, preprocessed, results)")
    s.add_argument("--dataset_id", type=int, default=501, help="nnU-Net dataset id")
    s.add_argument("--num_folds", type=int, default=3, help="folds of the split")
    s.add_argument("--budget_s", type=float, default=90.0, help="wall-clock seconds for fold 0's training")
    s.add_argument("--processes", type=int, default=1, help="nnU-Net's planning/preprocessing processes")
    s.add_argument("--n_proc_da", type=int, default=None, help="augmentation workers (default: nnU-Net's rule)")
    s.add_argument("--max_iterations_per_epoch", type=int, default=25, help="iterations per epoch at most")
    s.add_argument("--no_mirroring", action="store_true", help="predict without nnU-Net's mirroring")
    q = sub.add_parser("plan", help="export and plan a data set; optionally time training iterations")
    q.add_argument("--data_dir", required=True, help="labelled cases (LASC or MSD layout)")
    q.add_argument("--work", required=True, help="nnU-Net's work folder")
    q.add_argument("--dataset_id", type=int, default=502, help="nnU-Net dataset id")
    q.add_argument("--processes", type=int, default=1, help="nnU-Net's planning/preprocessing processes")
    q.add_argument("--time_budget_s", type=float, default=0.0, help="train fold 0 this long per --n_proc_da value")
    q.add_argument("--n_proc_da", type=int, nargs="+", default=[None],
                   help="augmentation worker counts to time (default: nnU-Net's rule)")
    q.add_argument("--max_iterations_per_epoch", type=int, default=25, help="iterations per epoch at most")
    t = sub.add_parser("_train", help=argparse.SUPPRESS)
    t.add_argument("--work", required=True)
    t.add_argument("--dataset_id", type=int, required=True)
    t.add_argument("--fold", required=True)
    t.add_argument("--deadline", type=float, required=True)
    t.add_argument("--device", default="cpu")
    t.add_argument("--threads", type=int, required=True)
    t.add_argument("--max_iterations_per_epoch", type=int, default=25)
    t.add_argument("--min_epochs", type=int, default=10)
    t.add_argument("--val_iterations", type=int, default=1)
    t.add_argument("--result", required=True)
    r = sub.add_parser("_predict", help=argparse.SUPPRESS)
    r.add_argument("--work", required=True)
    r.add_argument("--dataset_id", type=int, required=True)
    r.add_argument("--folds", nargs="+", required=True)
    r.add_argument("--checkpoint", default="checkpoint_final.pth")
    r.add_argument("--tile_step", type=float, default=0.5)
    r.add_argument("--no_mirroring", dest="mirroring", action="store_false")
    r.add_argument("--device", default="cpu")
    r.add_argument("--threads", type=int, required=True)
    r.add_argument("--request", required=True)
    r.add_argument("--result", required=True)
    r.add_argument("--out_dir", required=True)
    args = p.parse_args(argv)
    {"smoke": smoke, "plan": plan_command, "_train": _train_child, "_predict": _predict_child}[args.command](args)


if __name__ == "__main__":
    run_cli(main)
