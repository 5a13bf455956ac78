"""The patch strategy against a standard MONAI 3D U-Net on the same brain-tumour phantoms, the
same training patches and the same number of steps. Ours runs as a user runs it (phantoms.py,
then `train.py --strategy patches` and `predict.py`, each a process of its own) and is read from
OUT/metrics.csv. The peer, `monai.networks.nets.UNet` (instance norm, residual units), trains in
this process on the patches our own modules draw (`training.PatchSet` with the same split,
`EpochSampler` seeds and the augmentation train.py recorded in RUN/config.json, so every batch is ours, voxel for
voxel) with MONAI's `DiceCELoss` and Adam at MONAI's tutorials' learning rate and at ours, keeps
the epoch of best validation Dice as our training does, and predicts the held-out phantoms with
MONAI's Gaussian `sliding_window_inference`; `metrics.structure_metrics` scores both. Writes its
section of docs/experiments.md.

    .venv-bench/bin/python benchmarks/bench_tumour.py                     # 40 + 10 phantoms, 320 steps
    .venv-bench/bin/python benchmarks/bench_tumour.py --cases 6 --test_cases 2 --max_epochs 2 \\
        --samples_per_epoch 6 --no_write                                  # a quick look

What differs between the two on purpose: the network (our V-Net at --base_channels 4, no
normalisation layers, LSUV start, 5x5x5 convolutions; MONAI's U-Net, instance norm, 3x3x3), the
loss's implementation (both Dice + cross-entropy over softmax; ours smooths the Dice by 1, MONAI's
by 1e-5), the schedule (ours: one warm-up epoch, then ReduceLROnPlateau on validation Dice; the
peer: a constant rate, as MONAI's tutorials train) and the window blending (ours averages
probabilities, MONAI's sliding window averages logits).
"""
from __future__ import annotations

import argparse
import copy
import csv
import datetime
import importlib.metadata
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import dataset as ds  # noqa: E402
import splits  # noqa: E402
import training  # noqa: E402
from augment import augmenter_from_args  # noqa: E402
from common import cpu_name, publish  # noqa: E402  (benchmarks/ is sys.path[0])
from metrics import STRUCTURE, structure_metrics  # noqa: E402
from models import build_model, count_parameters  # noqa: E402
from utils import ArgParser, UserError, run_cli  # noqa: E402

HEADING = "## Brain-tumour phantoms: the patch strategy against MONAI's 3D U-Net (benchmarks/bench_tumour.py)"
# BraTS's evaluated regions of MSD Task01's label values (1 edema, 2 non-enhancing, 3 enhancing).
REGIONS = (("whole_tumour", (1, 2, 3)), ("tumour_core", (2, 3)), ("enhancing", (3,)))
SHORT = {"whole_tumour": "WT", "tumour_core": "TC", "enhancing": "ET"}
# MONAI's peer, built as its 3D tutorials build it (residual units, instance norm), narrower and one level
# shallower than their (16, 32, 64, 128, 256) for a 2-core CPU's budget.
UNET = dict(spatial_dims=3, in_channels=4, out_channels=4, channels=(8, 16, 32, 64), strides=(2, 2, 2),
            num_res_units=2)


def parse_args(argv=None):
    p = ArgParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = p.add_argument_group("data")
    d.add_argument("--work", default=str(ROOT / "runs" / "bench_tumour"),
                   help="phantoms, our run and predictions go here (its data/, test/, run/, out/ are replaced)")
    d.add_argument("--cases", type=int, default=40, help="training phantoms (20 %% of them validate)")
    d.add_argument("--test_cases", type=int, default=10, help="held-out phantoms (seed + 1000)")
    d.add_argument("--shape", type=int, nargs=3, action="append", metavar=("D", "H", "W"),
                   help="phantom shape; repeat to cycle (default: phantoms.py's, 64 96 96)")
    d.add_argument("--seed", type=int, default=0, help="phantoms, split, sampling, augmentation, weights")
    t = p.add_argument_group("training (both methods)")
    t.add_argument("--patch_size", type=int, nargs=3, default=[32, 64, 64], metavar=("D", "H", "W"))
    t.add_argument("--max_epochs", type=int, default=20)
    t.add_argument("--samples_per_epoch", type=int, default=48)
    t.add_argument("--batch_size", type=int, default=3)
    t.add_argument("--base_channels", type=int, default=4, help="our V-Net's width (train.py --base_channels)")
    t.add_argument("--monai_learning_rates", type=float, nargs="+", default=[1e-3, 3e-4],
                   help="the peer trains once per rate (1e-3: MONAI's tutorials and our patch strategy's default; "
                        "3e-4: our two-stage default)")
    t.add_argument("--threads", type=int, default=2, help="torch threads, here and in our processes")
    o = p.add_argument_group("output")
    o.add_argument("--output", default=str(ROOT / "docs" / "experiments.md"), help="file whose section to replace")
    o.add_argument("--no_write", action="store_true", help="print only")
    args = p.parse_args(argv)
    if args.cases < 2 or args.test_cases < 1:
        p.error(f"--cases {args.cases} --test_cases {args.test_cases}: need 2 training cases (one validates) "
                "and a held-out case")
    if any(s <= 0 or s % 16 for s in args.patch_size):
        p.error(f"--patch_size {' '.join(map(str, args.patch_size))}: each a positive multiple of 16 (train.py's rule)")
    if min(args.max_epochs, args.samples_per_epoch, args.batch_size, args.threads, args.base_channels) < 1:
        p.error("--max_epochs, --samples_per_epoch, --batch_size, --threads and --base_channels must be at least 1")
    return args


def run(cmd: list[str], threads: int) -> float:
    """Seconds of one of our scripts as a process of its own, with `threads` torch threads."""
    start = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}  # inference.set_cpu_threads leaves it as set
    subprocess.run([sys.executable, *cmd], cwd=ROOT, check=True, env=env)
    return time.perf_counter() - start


def read_dice(metrics_csv: Path) -> dict[str, list[float]]:
    """Per-case Dice of each region in predict.py's metrics.csv (rows per case and structure)."""
    out = {name: [] for name, _ in REGIONS}
    with open(metrics_csv, newline="") as f:
        for row in csv.DictReader(f):
            if row[STRUCTURE] in out:
                out[row[STRUCTURE]].append(float(row["dice"]))
    return out


# ----------------------------------------------------------------------------- ours

def train_and_predict_ours(args, data: Path, test: Path, run_dir: Path, out: Path) -> dict:
    """Our commands; returns their seconds, the training loop's seconds (log.csv), the best
    epoch, and the held-out Dice per region."""
    regions = [f"{n}={','.join(map(str, v))}" for n, v in REGIONS]
    train_s = run(["train.py", "--data_dir", str(data), "--output_dir", str(run_dir), "--strategy", "patches",
                   "--patch_size", *map(str, args.patch_size), "--base_channels", str(args.base_channels),
                   "--max_epochs", str(args.max_epochs), "--samples_per_epoch", str(args.samples_per_epoch),
                   "--batch_size", str(args.batch_size), "--seed", str(args.seed), "--device", "cpu"], args.threads)
    predict_s = run(["predict.py", "--data_dir", str(test), "--output_dir", str(out), "--segmenter_path",
                     str(run_dir / "segmenter" / "best.pt"), "--device", "cpu", "--regions", *regions], args.threads)
    log = training.read_log(run_dir / "segmenter" / "log.csv")
    val = [float(r["val_dice"]) for r in log]
    arch = torch.load(run_dir / "segmenter" / "best.pt", map_location="cpu", weights_only=True)["config"]["arch"]
    return {"process_s": train_s, "loop_s": sum(float(r["seconds"]) for r in log), "predict_s": predict_s,
            "best_epoch": int(np.argmax(val)) + 1, "best_val": max(val), "dice": read_dice(out / "metrics.csv"),
            "parameters": count_parameters(build_model(arch)),
            "lr": json.loads((run_dir / "config.json").read_text())["segmenter"]["learning_rate"]}


# ----------------------------------------------------------------------------- the MONAI peer

def monai_probe(model, image: np.ndarray, patch, device) -> torch.Tensor:
    """Logits (K, D, H, W) of a normalised image (C, D, H, W), MONAI's Gaussian sliding window."""
    from monai.inferers import sliding_window_inference
    x = torch.from_numpy(np.ascontiguousarray(image))[None].to(device)
    return sliding_window_inference(x, roi_size=tuple(patch), sw_batch_size=4, predictor=model, overlap=0.5,
                                    mode="gaussian")[0]


def check_one_hot(target: torch.Tensor, channels: int) -> None:
    """Our softmax target, as MONAI's DiceCELoss(to_onehot_y=False) takes it: (B, K + 1, ...)
    one-hot, every voxel exactly one 1."""
    assert target.shape[1] == channels, f"target has {target.shape[1]} channels, the network {channels}"
    assert torch.all((target == 0) | (target == 1)), "target is not binary"
    assert torch.all(target.sum(1) == 1), "target is not one-hot over its channels"


def train_monai(args, lr: float, train_set: training.PatchSet, val: list[training.VolumeCase], survey,
                device) -> dict:
    """MONAI's UNet on our patches: Adam at `lr` (constant), DiceCE over softmax without the
    background's Dice, batches as ours (same sampler, same order), validation Dice after every
    epoch as ours (mean over the classes of the argmax), the best epoch's weights kept."""
    from monai.losses import DiceCELoss
    from monai.networks.nets import UNet
    training.seed_everything(args.seed)
    model = UNet(**UNET).to(device)
    criterion = DiceCELoss(softmax=True, to_onehot_y=False, include_background=False)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    train_set.sampler = training.EpochSampler(len(train_set.data), args.samples_per_epoch, args.seed + 1)
    loader = torch.utils.data.DataLoader(train_set, batch_size=args.batch_size, shuffle=False, num_workers=0)
    best, best_epoch, best_state, steps, rows = -1.0, 0, None, 0, []
    start = time.perf_counter()
    for epoch in range(1, args.max_epochs + 1):
        t0 = time.perf_counter()
        train_set.sampler.set_epoch(epoch)
        model.train()
        losses = []
        for image, target in loader:  # image (B, C, D, H, W), target (B, K + 1, D, H, W) one-hot
            check_one_hot(target, UNET["out_channels"])
            loss = criterion(model(image.to(device)), target.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            steps += 1
        model.eval()
        with torch.no_grad():
            scores = [training.mean_dice(torch.softmax(monai_probe(model, c.image, args.patch_size, device), 0).numpy(),
                                         c.label, survey.labels) for c in val]
        score = float(np.mean(scores))
        if score > best:
            best, best_epoch, best_state = score, epoch, copy.deepcopy(model.state_dict())
        rows.append((epoch, float(np.mean(losses)), score))
        print(f"MONAI UNet lr {lr:g} epoch {epoch:>3}: loss {rows[-1][1]:.4f}  val dice {score:.5f}  "
              f"({time.perf_counter() - t0:.1f} s)", flush=True)
    loop_s = time.perf_counter() - start
    model.load_state_dict(best_state)
    model.eval()
    return {"model": model, "loop_s": loop_s, "steps": steps, "best_epoch": best_epoch, "best_val": best,
            "parameters": sum(p.numel() for p in model.parameters()), "rows": rows}


def score_monai(model, cases: list[ds.Case], survey, patch, device) -> dict[str, list[float]]:
    """Held-out Dice per region: each scan read, resampled to the training spacing when its own
    differs, z-scored per channel by the survey's rules, the window's logits resampled back,
    argmax -> label values, scored against the label on the scan's own grid."""
    out = {name: [] for name, _ in REGIONS}
    for case in cases:
        image, props = ds.read_case_image(case)
        label = survey.labels.to_values(ds.load_label(case.label, image.shape[1:], props, survey.labels))
        resampled = not ds.same_spacing(props["spacing"], survey.spacing)
        work = ds.resample_channels(image, props, survey.spacing) if resampled else image
        ds.normalise(work, survey.normalization)
        with torch.no_grad():
            logits = monai_probe(model, work, patch, device).numpy()
        if resampled:
            work_props = {**props, "spacing": tuple(survey.spacing)}
            logits = np.stack([ds.resample_onto(x, work_props, image.shape[1:], props, label=False) for x in logits])
        pred = survey.labels.to_values(np.argmax(logits, axis=0).astype(np.uint8))
        for row in structure_metrics(pred, label, REGIONS, spacing=props["spacing"]):
            out[row[STRUCTURE]].append(row["dice"])
    return out


# ----------------------------------------------------------------------------- the benchmark

def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    work = Path(args.work).resolve()
    data, test, run_dir, out = work / "data", work / "test", work / "run", work / "out"
    for d in (data, test, run_dir, out):
        if d.exists():
            shutil.rmtree(d)
    load_before = os.getloadavg()[0]
    shapes = [a for s in args.shape or [] for a in ("--shape", *map(str, s))]
    for folder, n, seed in ((data, args.cases, args.seed), (test, args.test_cases, args.seed + 1000)):
        run(["phantoms.py", "--kind", "brain_tumour", "--out_dir", str(folder), "--num_cases", str(n),
             "--seed", str(seed), *shapes], args.threads)

    ours = train_and_predict_ours(args, data, test, run_dir, out)

    # The peer's data, built as train.py's patch strategy builds it (train.train_patches).
    cases = ds.find_cases(data, require_labels=True)
    info = ds.read_dataset_json(data)
    survey = training.read_survey(cases, [], info, (), "auto", need_foreground=False)
    if survey.labels.out_channels != UNET["out_channels"] or len(survey.channels) != UNET["in_channels"]:
        raise UserError(f"{data}: {len(survey.channels)} channels and {survey.labels.out_channels} softmax outputs; "
                        f"the peer is built for {UNET['in_channels']} and {UNET['out_channels']}")
    eye = survey.labels.target(np.arange(survey.labels.num_classes + 1, dtype=np.uint8))
    assert np.array_equal(eye, np.eye(len(eye), dtype=np.float32)), f"target is not one-hot, background first: {eye}"
    split = splits.make_split([c.case_id for c in cases], 0.2, args.seed)
    ours_split = splits.read_splits(run_dir / "split.json", [c.case_id for c in cases])[0][0]
    assert split == ours_split, f"split {split} differs from train.py's {ours_split}"
    patch = tuple(args.patch_size)
    # The peer's patches augmented exactly as ours were: train.py's resolved flags.
    recorded = argparse.Namespace(**json.loads((run_dir / "config.json").read_text())["segmenter"])
    settings = training.PatchSettings(batch_size=args.batch_size, learning_rate=0.0, patience=0, reduce=0.5,
                                      max_epochs=args.max_epochs, samples_per_epoch=args.samples_per_epoch,
                                      loss_criterion="DiceCE", augment=augmenter_from_args(recorded),
                                      patch_size=patch, seed=args.seed,
                                      activation=survey.labels.activation)
    by_id = {c.case_id: c for c in cases}
    ids = split["train"] + split["val"]
    loaded = dict(zip(ids, training.load_volume_cases([by_id[i] for i in ids], survey, settings, patch)))
    loaded = {i: c or training.load_volume_case(by_id[i], survey, settings, patch) for i, c in loaded.items()}
    train_set = training.PatchSet([by_id[i] for i in split["train"]], [loaded[i] for i in split["train"]], survey,
                                  settings, patch, training.EpochSampler(len(split["train"]), args.samples_per_epoch,
                                                                         args.seed + 1))
    val = [loaded[i] for i in split["val"]]
    test_cases = ds.find_cases(test, require_labels=True)
    peers = []
    for lr in args.monai_learning_rates:
        peer = train_monai(args, lr, train_set, val, survey, device)
        start = time.perf_counter()
        peer["dice"] = score_monai(peer.pop("model"), test_cases, survey, patch, device)
        peer["predict_s"] = time.perf_counter() - start
        peer["lr"] = lr
        peers.append(peer)
    load_after = os.getloadavg()[0]
    lines = report(args, argv, ours, peers, split, survey, load_before, load_after)
    publish(lines, HEADING, args.output, write=not args.no_write)


def mean_std(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f} +- {statistics.pstdev(values):.3f}"


def report(args, argv, ours, peers, split, survey, load_before, load_after) -> list[str]:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                           text=True).stdout.strip()
    given = argv if argv is not None else sys.argv[1:]
    command = " ".join([".venv-bench/bin/python benchmarks/bench_tumour.py", *given])
    steps = args.max_epochs * -(-args.samples_per_epoch // args.batch_size)
    shape = " and ".join("x".join(map(str, s)) for s in args.shape) if args.shape else "64x96x96"
    loaded = load_before > 0.5 * (os.cpu_count() or 1) + 0.5
    unet = ", ".join(f"{k}={v}" for k, v in UNET.items())
    lines = [
        HEADING, "",
        f"{datetime.date.today().isoformat()}, commit {commit}{' (with uncommitted changes)' if dirty else ''}; "
        f"{cpu_name()}, {os.cpu_count()} cores, {args.threads} torch threads; torch {torch.__version__}, monai "
        f"{importlib.metadata.version('monai')}, Python {platform.python_version()}; load average "
        f"{load_before:.1f} before, {load_after:.1f} after"
        + (" (other jobs were running: seconds are inflated)." if loaded else "."), "",
        "```bash", command.strip(), "```", "",
        f"{args.cases} training phantoms (`phantoms.py --kind brain_tumour`, seed {args.seed}, {shape}; "
        f"{len(split['train'])} train, {len(split['val'])} validate), {args.test_cases} held-out phantoms (seed "
        f"{args.seed + 1000}). Both methods: the same {steps} steps of {args.batch_size} patches "
        f"{'x'.join(map(str, args.patch_size))} ({args.max_epochs} epochs of {args.samples_per_epoch}; the same "
        f"patches, drawn by `training.PatchSet`, augmented as train.py's config.json records), softmax over "
        "background and "
        f"{survey.labels.num_classes} classes, Dice + cross-entropy, Adam, the epoch of best validation Dice (mean "
        f"over the classes, sliding window over the validation scans) kept; held-out Dice of the label maps' "
        f"regions by `metrics.structure_metrics`, mean +- std over the {args.test_cases} cases.", "",
        f"Ours: `train.py --strategy patches --patch_size {' '.join(map(str, args.patch_size))} --base_channels "
        f"{args.base_channels} --max_epochs {args.max_epochs} --samples_per_epoch {args.samples_per_epoch}` (V-Net, "
        f"no normalisation layers, LSUV start; DiceCE; lr {ours['lr']:g} (train.py's default for the patch strategy) "
        "after a one-epoch warm-up, ReduceLROnPlateau), "
        "`predict.py --regions ...` (Gaussian sliding window, overlap 0.5, probabilities averaged). MONAI: "
        f"`UNet({unet})` (instance norm, PReLU), `DiceCELoss(softmax=True, to_onehot_y=False, "
        "include_background=False)` on our one-hot targets, constant lr, `sliding_window_inference(roi_size="
        f"{tuple(args.patch_size)}, sw_batch_size=4, overlap=0.5, mode=\"gaussian\")` on our per-channel "
        "z-scored scans, argmax.", "",
        "| method | parameters | steps | training s | best epoch (val Dice) | WT Dice | TC Dice | ET Dice |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    rows = [(f"ours: V-Net, base_channels {args.base_channels}, lr {ours['lr']:g}", ours["parameters"], steps,
             ours["loop_s"], ours)]
    rows += [(f"MONAI UNet, lr {p['lr']:g}", p["parameters"], p["steps"], p["loop_s"], p) for p in peers]
    for name, params, n, seconds, r in rows:
        dice = [mean_std(r["dice"][region]) for region, _ in REGIONS]
        lines.append(f"| {name} | {params:,} | {n} | {seconds:.0f} | {r['best_epoch']} ({r['best_val']:.3f}) | "
                     + " | ".join(dice) + " |")
    lines += [
        "",
        f"Training seconds are the epochs' own (steps and validation): ours from its log.csv (its whole train.py "
        f"process took {ours['process_s']:.0f} s with start-up and data loading), MONAI's timed in this process. "
        f"Prediction of the {args.test_cases} held-out scans: ours {ours['predict_s']:.0f} s (predict.py's process), "
        + ", ".join(f"MONAI lr {p['lr']:g} {p['predict_s']:.0f} s" for p in peers) + ".",
        "",
    ]
    return lines


if __name__ == "__main__":
    run_cli(main)
