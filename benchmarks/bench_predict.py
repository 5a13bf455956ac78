"""Prediction speed, memory and accuracy: predict.py's locator + one crop against the same V-Net
run by MONAI's `sliding_window_inference` over the whole volume, in the same run. Writes its
section of BENCHMARKS.md.

    python3 -m venv .venv-bench && .venv-bench/bin/pip install -r requirements.txt -r requirements-bench.txt
    python phantoms.py --out_dir /tmp/p6/train --num_cases 16 --shape 48 128 128 --shape 48 112 112 --seed 5
    python phantoms.py --out_dir /tmp/p6/val12 --num_cases 12 --shape 48 128 128 --shape 48 112 112 --seed 21
    python train.py --data_dir /tmp/p6/train --output_dir /tmp/p6/run --device cpu --base_channels 4 \\
        --padding 12 16 16 --locator_max_epochs 8 --max_epochs 10
    .venv-bench/bin/python benchmarks/bench_predict.py --dice_run /tmp/p6/run --dice_data /tmp/p6/val12
    .venv-bench/bin/python benchmarks/bench_predict.py --device cuda ...          # both arms on the GPU
    .venv-bench/bin/python benchmarks/bench_predict.py --shape 48 128 128 --no_write   # a quick look

Timing (one 88x640x640 phantom at 0.625 mm written as a uint8 nrrd, as LASC scans are): each arm
goes from the file on disk to the mask on disk. Ours is predict.py's path for one scan (read,
`inference.predict_two_stage`: z-score, pad and downscale, locator, centre, one 96x144x224 crop,
segmenter, paste; then threshold, write).
MONAI's reads and z-scores the same way, then `sliding_window_inference(roi_size=(96, 144, 224),
overlap=0.5, sw_batch_size=1)` of the segmenter over the whole volume (probabilities averaged
over overlapping windows, MONAI's constant blending), threshold 0.5, write. Both use the full
width V-Net (`base_channels` 8, 10.76 M parameters) with untrained, seeded weights: the time
of a forward pass does not depend on the weights, and an untrained locator's empty output only
moves the crop to the volume centre. The arms alternate, so a machine whose load changes slows
both alike; on CUDA both run under bf16 autocast.

Memory: peak resident set size (ru_maxrss read with wait4) of `predict.py` itself predicting one
case, and a folder of two, each in a fresh process started by a small launcher (a child's
ru_maxrss would otherwise start at this benchmark's own size); against a process that only
imports what predict.py imports and loads the two models.

Accuracy (`--dice_run`, `--dice_data`): a small trained run (e.g. the commands above) predicts
held-out phantoms both ways, ours as predict.py does and MONAI's sliding window of the same
segmenter over the whole z-scored volume with its patch size as the window; Dice and HD95 per
approach, mean +- std.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import dataset as ds  # noqa: E402
import inference  # noqa: E402
import synthetic  # noqa: E402
from common import cpu_name, publish, sync  # noqa: E402  (benchmarks/ is sys.path[0])
from metrics import compute_metrics  # noqa: E402
from models import VNet, count_parameters, model_arch  # noqa: E402
from training import save_checkpoint  # noqa: E402

HEADING = "## Prediction (benchmarks/bench_predict.py)"
TARGET_RATIO = 5.0
ROI = (96, 144, 224)
SCALE_FACTOR = (0.5, 0.25, 0.25)
FACTORS = ds.downscale_factors(SCALE_FACTOR)
SPACING = (0.625, 0.625, 0.625)
MIB = 2**20

# Starts argv[2:] and writes "<exit code> <ru_maxrss KiB>" of that process, from wait4, to argv[1].
LAUNCHER = ("import os, sys; pid = os.posix_spawn(sys.argv[2], sys.argv[2:], os.environ); "
            "_, status, usage = os.wait4(pid, 0); "
            "open(sys.argv[1], 'w').write(f'{os.waitstatus_to_exitcode(status)} {usage.ru_maxrss}')")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--shape", type=int, nargs=3, metavar=("D", "H", "W"), default=(88, 640, 640),
                   help="scan size for timing and memory (LASC: 88 640 640)")
    p.add_argument("--repeats", type=int, default=2, help="timed cases of our pipeline (after one untimed)")
    p.add_argument("--monai_repeats", type=int, default=1, help="timed cases of MONAI's sliding window")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where both arms run")
    p.add_argument("--dice_run", help="run folder of a small trained model (locator/ and segmenter/best.pt)")
    p.add_argument("--dice_data", help="held-out phantoms (LASC layout, with labels) for the Dice comparison")
    p.add_argument("--no_memory", action="store_true", help="skip the peak-memory processes")
    p.add_argument("--output", default=str(ROOT / "BENCHMARKS.md"), help="file whose section to replace")
    p.add_argument("--no_write", action="store_true", help="print only")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.monai_repeats < 1:
        p.error("--repeats and --monai_repeats must be at least 1")
    if (args.dice_run is None) != (args.dice_data is None):
        p.error("give --dice_run and --dice_data together")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    return args


def write_checkpoints(folder: Path, patch) -> tuple[Path, Path]:
    """Untrained full-width locator and segmenter, saved as train.py saves them."""
    paths = []
    for seed, role in ((1, "locator"), (2, "segmenter")):
        torch.manual_seed(seed)
        model = VNet(base_channels=8)
        config = {"role": role, "arch": model_arch(model), "spacing": list(SPACING), "scale_factor": list(SCALE_FACTOR)}
        if role == "segmenter":
            config["patch_size"] = list(patch)
        save_checkpoint(folder / f"{role}.pt", model, config)
        paths.append(folder / f"{role}.pt")
    return tuple(paths)


def ours_arm(pipe: inference.TwoStage, scan: Path, out: Path) -> float:
    """predict.py's path for one scan and its mask, file to file."""
    t0 = time.perf_counter()
    image, props = ds.read_image(scan)
    prob, _ = inference.predict_two_stage(pipe, ds.check_image(image, scan), props)
    ds.write_image(inference.to_mask(prob), props, out)
    sync(pipe.device)
    return time.perf_counter() - t0


def sliding_window_probs(model, image: np.ndarray, roi, device) -> np.ndarray:
    """MONAI's sliding window of `model` over a z-scored (D, H, W) volume: probabilities averaged
    over the overlapping windows, (D, H, W) float32."""
    from monai.inferers import sliding_window_inference

    x = torch.from_numpy(image)[None, None].to(device)  # (1, 1, D, H, W)
    fmt = inference.memory_format(device)
    with torch.no_grad(), torch.autocast(device.type, dtype=inference.autocast_dtype(device),
                                         enabled=device.type == "cuda"):
        probs = sliding_window_inference(
            x, roi_size=roi, sw_batch_size=1, overlap=0.5, mode="constant",
            predictor=lambda w: torch.sigmoid(model(w.contiguous(memory_format=fmt)).float()))
    return probs[0, 0].float().cpu().numpy()


def monai_arm(model, scan: Path, out: Path, device) -> float:
    t0 = time.perf_counter()
    image, props = ds.read_image(scan)
    image, _ = ds.zscore(ds.check_image(image, scan))
    mask = (sliding_window_probs(model, image, ROI, device) >= 0.5).astype(np.uint8)
    ds.write_image(mask, props, out)
    sync(device)
    return time.perf_counter() - t0


def stage_times(pipe: inference.TwoStage, scan: Path, out: Path) -> dict[str, float]:
    """Seconds of each step of our pipeline on one case (an extra, separately timed run)."""
    t = {}
    t0 = time.perf_counter()
    image, props = ds.read_image(scan)
    image = ds.check_image(image, scan)
    t["read"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    work, pad_value = ds.zscore(image)
    location = inference.locate_scan(pipe, work, pad_value)
    sync(pipe.device)
    t["z-score + locator"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    prob = inference.segment_at(pipe, work, pad_value, location.centre)
    sync(pipe.device)
    t["crop + segmenter + paste"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    ds.write_image((prob >= 0.5).astype(np.uint8), props, out)
    t["threshold + write"] = time.perf_counter() - t0
    return t


def peak_rss(cmd: list[str], workdir: Path, name: str) -> int:
    """Peak RSS in bytes of `cmd` run in a fresh process (see LAUNCHER)."""
    result = workdir / f"{name}.rusage"
    proc = subprocess.run([sys.executable, "-c", LAUNCHER, str(result), *cmd], cwd=ROOT,
                          capture_output=True, text=True)
    code, maxrss = map(int, result.read_text().split())
    assert code == 0 and proc.returncode == 0, f"{name}: exit {code}\n{proc.stdout}\n{proc.stderr}"
    return maxrss * (1 if sys.platform == "darwin" else 1024)


def memory(locator: Path, segmenter: Path, scan: Path, workdir: Path, patch) -> dict[str, int]:
    two = workdir / "two_cases"
    for name in ("a", "b"):
        (two / name).mkdir(parents=True, exist_ok=True)
        os.link(scan, two / name / "lgemri.nrrd")
    models = ["--locator_path", str(locator), "--segmenter_path", str(segmenter), "--device", "cpu"]
    load_only = (f"import sys, torch; sys.path.insert(0, {str(ROOT)!r}); "
                 "import dataset, inference, metrics, plots, utils; "  # what predict.py imports
                 f"inference.set_cpu_threads(); inference.load_two_stage({str(locator)!r}, {str(segmenter)!r}, "
                 "torch.device('cpu'))")
    one_crop = (f"{load_only}.segmenter; import numpy; "
                f"inference.probabilities(_, numpy.zeros({tuple(patch)}, numpy.float32), torch.device('cpu'))")
    one_crop = one_crop.replace("inference.load_two_stage", "_ = inference.load_two_stage", 1)
    return {"models loaded, no case": peak_rss([sys.executable, "-c", load_only], workdir, "base"),
            "models loaded, one segmenter pass on a zero crop": peak_rss([sys.executable, "-c", one_crop], workdir,
                                                                        "crop"),
            "one case": peak_rss([sys.executable, str(ROOT / "predict.py"), "--input", str(scan), "--output_dir",
                                  str(workdir / "mem1"), *models], workdir, "one"),
            "a folder of two cases": peak_rss([sys.executable, str(ROOT / "predict.py"), "--data_dir", str(two),
                                               "--output_dir", str(workdir / "mem2"), *models], workdir, "two")}


def dice_comparison(run: Path, data: Path, device) -> dict:
    """Dice and HD95 of our pipeline and of MONAI's sliding window (same trained segmenter)."""
    pipe = inference.load_two_stage(run / "locator" / "best.pt", run / "segmenter" / "best.pt", device)
    scores = {"ours": [], "MONAI sliding window": []}
    for case in ds.find_cases(data, require_labels=True):
        image, label, props = ds.load_case(case)
        prob, _ = inference.predict_two_stage(pipe, image, props)
        scores["ours"].append(compute_metrics(prob >= 0.5, label, spacing=props["spacing"]))
        z, _ = ds.zscore(image)
        swi = sliding_window_probs(pipe.segmenter, z, pipe.patch_size, device)
        scores["MONAI sliding window"].append(compute_metrics(swi >= 0.5, label, spacing=props["spacing"]))
    return {"scores": scores, "patch": pipe.patch_size, "cases": len(scores["ours"]),
            "arch": torch.load(run / "segmenter" / "best.pt", weights_only=True)["config"]["arch"]}


def mean_std(values) -> str:
    return f"{np.mean(values):.3f} +- {np.std(values):.3f}"


def main(argv=None):
    args = parse_args(argv)
    import monai
    inference.set_cpu_threads()
    device = torch.device(args.device)
    shape = tuple(args.shape)
    patch = tuple(min(r, ds.round_up(shape, ds.pad_multiple(FACTORS))[i]) for i, r in enumerate(ROI))
    load_before = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="bench_predict_"))
    print(f"work folder {work}", flush=True)

    image, _ = synthetic.make_phantom(shape, SPACING, np.random.default_rng(0))
    scan = work / "scan.nrrd"
    ds.write_image(np.clip(np.rint(image), 0, 255).astype(np.uint8),
                   {"spacing": SPACING, "origin": (0.0, 0.0, 0.0), "direction": (1, 0, 0, 0, 1, 0, 0, 0, 1)}, scan)
    del image
    locator, segmenter = write_checkpoints(work, patch)
    pipe = inference.load_two_stage(locator, segmenter, device)
    params = count_parameters(pipe.segmenter)

    ours_arm(pipe, scan, work / "warm.nrrd")  # untimed: first-call allocations and kernel choice
    stages = stage_times(pipe, scan, work / "stages.nrrd")
    print("our stages: " + ", ".join(f"{k} {v:.2f} s" for k, v in stages.items()), flush=True)
    times = {"ours": [], "MONAI": []}
    for i in range(max(args.repeats, args.monai_repeats)):
        if i < args.repeats:
            times["ours"].append(ours_arm(pipe, scan, work / f"ours_{i}.nrrd"))
            print(f"ours: {times['ours'][-1]:.2f} s", flush=True)
        if i < args.monai_repeats:
            times["MONAI"].append(monai_arm(pipe.segmenter, scan, work / f"monai_{i}.nrrd", device))
            print(f"MONAI sliding window: {times['MONAI'][-1]:.2f} s", flush=True)
    load_after_timing = os.getloadavg()[0]
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["MONAI"] / med["ours"]
    print(f"ratio {ratio:.1f}x", flush=True)

    mem = None if args.no_memory or args.device == "cuda" else memory(locator, segmenter, scan, work, patch)
    if mem:
        print("peak RSS: " + ", ".join(f"{k} {v / MIB:.0f} MiB" for k, v in mem.items()), flush=True)
    acc = dice_comparison(Path(args.dice_run), Path(args.dice_data), device) if args.dice_run else None

    volume_mib = np.prod(shape) * 4 / MIB
    windows = int(np.prod([1 if n <= r else int(np.ceil((n - r) / (r * 0.5))) + 1 for n, r in zip(shape, ROI)]))
    date = datetime.date.today().isoformat()
    machine = (torch.cuda.get_device_name() if device.type == "cuda" else
               f"{cpu_name()}, {os.cpu_count()} cores ({torch.get_num_threads()} torch threads)")
    lines = [
        HEADING, "",
        f"`.venv-bench/bin/python benchmarks/bench_predict.py{' --device cuda' if device.type == 'cuda' else ''}"
        f"{' --dice_run RUN --dice_data TEST' if acc else ''}` on {date}: {machine}; torch {torch.__version__}, "
        f"MONAI {monai.__version__}, Python {platform.python_version()}; load average {load_before:.1f} before, "
        f"{load_after_timing:.1f} after the timings (the machine runs other jobs too: absolute seconds are "
        "inflated, the alternating arms' ratio less so).",
        "",
        f"One {'x'.join(map(str, shape))} phantom at 0.625 mm (uint8 nrrd), from the file on disk to the mask on disk. "
        f"Both arms run the same full-width V-Net segmenter (`base_channels` 8, {params:,} parameters, untrained "
        f"seeded weights: time does not depend on them). Ours: read, z-score, locator (the same V-Net on "
        f"{'x'.join(str(s // k) for s, k in zip(ds.round_up(shape, ds.pad_multiple(FACTORS)), FACTORS))}), "
        f"one {'x'.join(map(str, patch))} crop, segmenter, paste, threshold, write (`inference.predict_two_stage`). "
        f"MONAI: read, z-score, `sliding_window_inference(roi_size={ROI}, overlap=0.5, sw_batch_size=1)` over the "
        f"whole volume ({windows} windows), threshold, write. Median of {args.repeats} (ours, after one untimed) "
        f"and {args.monai_repeats} (MONAI) cases, the arms alternating.",
        "",
        "| approach | device | seconds per case (median) | all cases (s) | MONAI / ours |",
        "| --- | --- | --- | --- | --- |",
        f"| ours (locator + one crop) | {device.type} | {med['ours']:.1f} | "
        f"{', '.join(f'{t:.1f}' for t in times['ours'])} | 1.0 |",
        f"| MONAI sliding window | {device.type} | {med['MONAI']:.1f} | "
        f"{', '.join(f'{t:.1f}' for t in times['MONAI'])} | {ratio:.1f}x |",
        "",
        f"Target (ours at least {TARGET_RATIO:.0f}x faster): {'met' if ratio >= TARGET_RATIO else 'NOT met'}, "
        f"{ratio:.1f}x. Where our time goes (one more case, timed by step): "
        + ", ".join(f"{k} {v:.1f} s" for k, v in stages.items()) + ".",
        "",
    ]
    if device.type == "cpu":
        lines += ["No GPU on this machine: `--device cuda` times both arms on the GPU under bf16 autocast "
                  "(seconds per case for both), with the same table.", ""]
    if mem:
        base = mem["models loaded, no case"]
        lines += [
            "Peak host memory of `predict.py --device cpu` (peak RSS from wait4, each in a fresh process; "
            f"one float32 {'x'.join(map(str, shape))} volume is {volume_mib:.0f} MiB):",
            "",
            "| process | peak RSS (MiB) | above models loaded (MiB) | in float32 volumes |",
            "| --- | --- | --- | --- |",
        ]
        for k, v in mem.items():
            above = (v - base) / MIB
            lines.append(f"| {k} | {v / MIB:,.0f} | {above:,.0f} | {above / volume_mib:.1f} |")
        activations = mem["models loaded, one segmenter pass on a zero crop"] - base
        lines += ["", f"Of one case's {(mem['one case'] - base) / MIB:,.0f} MiB, the segmenter's activations on its "
                  f"{'x'.join(map(str, patch))} crop take {activations / MIB:,.0f} MiB (the zero-crop process); the "
                  f"rest, {(mem['one case'] - base - activations) / MIB:,.0f} MiB, is "
                  f"{(mem['one case'] - base - activations) / MIB / volume_mib:.1f} float32 volumes of the scan "
                  "(the scan and its z-scored copy while the models run, then the probabilities and the mask). "
                  "One case at a time: a folder of two cases peaks "
                  f"{(mem['a folder of two cases'] - mem['one case']) / MIB:+.0f} MiB from one case.", ""]
    if acc:
        keys = (("dice", "Dice"), ("hd95", "HD95 (mm)"))
        arch = acc["arch"]
        lines += [
            f"Accuracy on {acc['cases']} held-out phantoms (48x128x128 and 48x112x112) with a small trained run "
            f"(`base_channels` {arch.get('base_channels')}, see the docstring for its commands); MONAI's window is "
            f"the segmenter's patch, {'x'.join(map(str, acc['patch']))}, overlap 0.5, over the whole volume:",
            "",
            "| approach | " + " | ".join(name for _, name in keys) + " |",
            "| --- | " + " | ".join("---" for _ in keys) + " |",
        ]
        for approach, rows in acc["scores"].items():
            lines.append(f"| {approach} | " + " | ".join(mean_std([r[k] for r in rows]) for k, _ in keys) + " |")
        lines.append("")
    publish(lines, HEADING, args.output, write=not args.no_write)


if __name__ == "__main__":
    main()
