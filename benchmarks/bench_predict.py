"""Prediction speed, memory and accuracy: predict.py's locator + one crop against the same V-Net
run by MONAI's `sliding_window_inference` over the whole volume, in the same run (`--section
two_stage`, the default); and the patch strategy's sliding window, `inference.sliding_window`,
against MONAI's Gaussian `sliding_window_inference` of the same model (`--section
sliding_window`). Each section writes its own section of BENCHMARKS.md.

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

Sliding window (`--section sliding_window`, about 5 minutes on 2 CPU cores; `--quick`: tiny
sizes, prints only):

    .venv-bench/bin/python benchmarks/bench_predict.py --section sliding_window
    .venv-bench/bin/python benchmarks/bench_predict.py --section sliding_window --quick

Two four-channel brain-tumour phantoms (`synthetic_tumour.make_tumour_phantom`, 1 mm, z-scored
per channel over the brain as `predict_patches` does): a BraTS-size 155x240x240 scan with a
128x128x128 window and a 64x96x96 one with a 32x64x64 window. The same
`models.VNet(in_channels=4, out_channels=4, base_channels=8)` (untrained, seeded, eval mode,
no_grad) runs in `inference.sliding_window(activation=ACTIVATIONS["softmax"])` and in MONAI's
`sliding_window_inference(mode="gaussian", sigma_scale=0.125, padding_mode="constant", cval=0.0)`
with the predictor `torch.softmax(model(x), 1)`: overlap 0.5, 4 windows per batch, the same
threads, each arm from a numpy array in host memory to the probabilities as a numpy array. One
untimed call of each arm (their outputs give the maximum absolute difference), then the median of
`--sw_repeats` calls, the arms alternating; on the CPU, and also on CUDA when a GPU is present
(`--device` picks one). Memory: in a fresh process, the rise of peak RSS over a call of
`inference.predict_patches` on the BraTS-size scan, after one forward pass of a batch of windows
(so that the network's own activations are already in the peak), against the bound of C + K + 2
float32 volumes of the scan.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
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
import synthetic_tumour  # noqa: E402
from common import cpu_name, publish, sync  # noqa: E402  (benchmarks/ is sys.path[0])
from labels import Labels  # noqa: E402
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

SW_HEADING = "## Sliding window against MONAI (benchmarks/bench_predict.py --section sliding_window)"
# (C, D, H, W) scan and (d, h, w) window: a BraTS-size scan with nnU-Net's kind of window, and a
# small one; --quick swaps in tiny ones (every side a multiple of 16, as the V-Net needs).
SW_CASES = (((4, 155, 240, 240), (128, 128, 128)), ((4, 64, 96, 96), (32, 64, 64)))
SW_QUICK = (((4, 48, 64, 64), (32, 32, 32)), ((4, 32, 48, 48), (16, 32, 32)))
SW_BASE_CHANNELS = 8
SW_BATCH = 4
SW_OVERLAP = 0.5
SW_SPACING = (1.0, 1.0, 1.0)
SW_LABELS = Labels((1, 2, 3), ("edema", "non-enhancing", "enhancing"))  # softmax over K + 1 = 4 outputs
SW_RULES = ("nonzero",) * 4  # z-score each channel over the brain, as the patch strategy does for BraTS

# Starts argv[2:] and writes "<exit code> <ru_maxrss KiB>" of that process, from wait4, to argv[1].
LAUNCHER = ("import os, sys; pid = os.posix_spawn(sys.argv[2], sys.argv[2:], os.environ); "
            "_, status, usage = os.wait4(pid, 0); "
            "open(sys.argv[1], 'w').write(f'{os.waitstatus_to_exitcode(status)} {usage.ru_maxrss}')")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--section", choices=("two_stage", "sliding_window"), default="two_stage",
                   help="which comparison to run and write: predict.py's two-stage path, or the patch "
                        "strategy's sliding window")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="where the arms run (default: two_stage on the CPU; sliding_window on the CPU, and on "
                        "CUDA as well when a GPU is present)")
    p.add_argument("--no_memory", action="store_true", help="skip the peak-memory processes")
    p.add_argument("--output", default=str(ROOT / "BENCHMARKS.md"), help="file whose section to replace")
    p.add_argument("--no_write", action="store_true", help="print only")
    two = p.add_argument_group("two_stage section")
    two.add_argument("--shape", type=int, nargs=3, metavar=("D", "H", "W"), default=(88, 640, 640),
                     help="scan size for timing and memory (LASC: 88 640 640)")
    two.add_argument("--repeats", type=int, default=2, help="timed cases of our pipeline (after one untimed)")
    two.add_argument("--monai_repeats", type=int, default=1, help="timed cases of MONAI's sliding window")
    two.add_argument("--dice_run", help="run folder of a small trained model (locator/ and segmenter/best.pt)")
    two.add_argument("--dice_data", help="held-out phantoms (LASC layout, with labels) for the Dice comparison")
    sw = p.add_argument_group("sliding_window section")
    sw.add_argument("--sw_repeats", type=int, nargs=2, metavar=("LARGE", "SMALL"), default=(2, 5),
                    help="timed calls of each arm (after one untimed) on the BraTS-size scan and on the small one")
    sw.add_argument("--quick", action="store_true",
                    help=f"tiny scans and windows ({', '.join('x'.join(map(str, c)) for c, _ in SW_QUICK)}) to "
                         "check that the section runs; implies --no_write")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.monai_repeats < 1 or min(args.sw_repeats) < 1:
        p.error("--repeats, --monai_repeats and --sw_repeats must be at least 1")
    if (args.dice_run is None) != (args.dice_data is None):
        p.error("give --dice_run and --dice_data together")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    args.no_write = args.no_write or args.quick
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
    one_crop = (f"{load_only}.segmenters[0]; import numpy; "
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
        swi = sliding_window_probs(pipe.segmenters[0], z, pipe.patch_size, device)
        scores["MONAI sliding window"].append(compute_metrics(swi >= 0.5, label, spacing=props["spacing"]))
    return {"scores": scores, "patch": pipe.patch_size, "cases": len(scores["ours"]),
            "arch": torch.load(run / "segmenter" / "best.pt", weights_only=True)["config"]["arch"]}


def mean_std(values) -> str:
    return f"{np.mean(values):.3f} +- {np.std(values):.3f}"


# ----------------------------------------------------------------------------- the sliding-window section

def sw_model(device: torch.device) -> torch.nn.Module:
    """The V-Net both sliding windows run: 4 channels in, K + 1 = 4 softmax outputs, seeded
    weights, evaluation mode, in the layout `inference.load_model` gives a checkpoint's model."""
    torch.manual_seed(3)
    model = VNet(in_channels=4, out_channels=SW_LABELS.out_channels, base_channels=SW_BASE_CHANNELS)
    return model.to(device, memory_format=inference.memory_format(device)).eval()


def ours_sliding(model, volume: np.ndarray, window, device) -> tuple[float, np.ndarray]:
    """Seconds and probabilities (K + 1, D, H, W) of `inference.sliding_window` over a
    normalised (C, D, H, W) volume."""
    t0 = time.perf_counter()
    probs = inference.sliding_window([model], volume, window, device, overlap=SW_OVERLAP, batch_size=SW_BATCH,
                                     pad_value=0.0, activation=inference.ACTIVATIONS["softmax"])
    sync(device)
    return time.perf_counter() - t0, probs


def monai_sliding(model, volume: np.ndarray, window, device) -> tuple[float, np.ndarray]:
    """Seconds and probabilities (K + 1, D, H, W) of MONAI's Gaussian sliding window of the same
    model, numpy to numpy as ours. The windows get our layout (channels-last on the CPU) so that
    both arms run the same convolutions; on CUDA both run under the same autocast."""
    from monai.inferers import sliding_window_inference

    fmt = inference.memory_format(device)
    t0 = time.perf_counter()
    x = torch.from_numpy(volume)[None].to(device)  # (1, C, D, H, W)
    with torch.no_grad(), torch.autocast(device.type, dtype=inference.autocast_dtype(device),
                                         enabled=device.type == "cuda"):
        out = sliding_window_inference(
            x, roi_size=tuple(window), sw_batch_size=SW_BATCH, overlap=SW_OVERLAP, mode="gaussian",
            sigma_scale=0.125, padding_mode="constant", cval=0.0,
            predictor=lambda w: torch.softmax(model(w.contiguous(memory_format=fmt)).float(), 1))
    probs = out[0].float().cpu().numpy()
    sync(device)
    return time.perf_counter() - t0, probs


def differences(ours: np.ndarray, theirs: np.ndarray, window) -> dict[str, float]:
    """Max and mean abs difference of two (K, D, H, W) outputs, and the max at least a quarter
    window from every face of the scan, away from the margins where MONAI's clamped weights
    differ from ours most (see the section's text)."""
    diff = np.abs(ours - theirs).max(axis=0)
    inner = tuple(slice(w // 4, n - w // 4) for n, w in zip(diff.shape, window))
    return {"max": float(diff.max()), "mean": float(np.abs(ours - theirs).mean()),
            "inner": float(diff[inner].max()) if diff[inner].size else float("nan")}


def sw_starts(shape, window) -> dict[str, list[list[int]]]:
    """Window starts per axis, ours (`inference.window_starts`) and MONAI's (`dense_patch_slices`
    at its scan interval, int((1 - overlap) x window), the last window moved back to end at the
    scan's edge)."""
    from monai.data.utils import dense_patch_slices

    interval = [w if w == n else max(1, int(w * (1 - SW_OVERLAP))) for n, w in zip(shape, window)]
    slices = dense_patch_slices(tuple(shape), tuple(window), interval)
    return {"ours": [inference.window_starts(n, w, SW_OVERLAP) for n, w in zip(shape, window)],
            "MONAI": [sorted({int(box[a].start) for box in slices}) for a in range(3)]}


def patches_memory(npy: str, window, device_name: str, result: str) -> None:
    """(Runs in a fresh process: `sw_memory`.) Peak RSS around one `inference.predict_patches`
    call on the raw (C, D, H, W) scan in `npy`, written as JSON to `result`. Before the call the
    network runs once on a batch of zero windows, so that its activations (which scale with the
    window and the batch, not the scan) are already in the peak and the call's rise is what it
    holds beside them."""
    def maxrss() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)

    inference.set_cpu_threads()
    device = torch.device(device_name)
    model = sw_model(device)
    pipe = inference.Patches([model], tuple(window), SW_SPACING, synthetic_tumour.CHANNELS, SW_RULES, SW_LABELS,
                             device, overlap=SW_OVERLAP, batch_size=SW_BATCH)
    image = np.load(npy)
    loaded = maxrss()
    with torch.no_grad():  # one batch input, as sliding_window holds it (its staging copy freed before the pass)
        batch = torch.zeros((SW_BATCH, image.shape[0], *window), device=device).contiguous(
            memory_format=inference.memory_format(device))
        torch.softmax(model(batch).float(), 1)
        del batch
    sync(device)
    before = maxrss()
    props = {"spacing": SW_SPACING, "origin": (0.0, 0.0, 0.0), "direction": (1, 0, 0, 0, 1, 0, 0, 0, 1)}
    probs = inference.predict_patches(pipe, image, props)
    after = maxrss()
    assert probs.shape == (SW_LABELS.out_channels, *image.shape[1:]), f"{probs.shape} from {image.shape}"
    Path(result).write_text(json.dumps({"scan loaded": loaded, "batch forward": before,
                                        "predict_patches": after}))


def sw_memory(npy: Path, window, device: torch.device, workdir: Path) -> dict[str, int]:
    """`patches_memory` in a process of its own, started by LAUNCHER (see `peak_rss`)."""
    result = workdir / "patches_memory.json"
    code = (f"import sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); import bench_predict; "
            f"bench_predict.patches_memory({str(npy)!r}, {tuple(window)}, {device.type!r}, {str(result)!r})")
    peak = peak_rss([sys.executable, "-c", code], workdir, "patches")
    return {**json.loads(result.read_text()), "process peak (wait4)": peak}


def sliding_window_section(args, argv=None) -> None:
    import monai
    inference.set_cpu_threads()
    if args.device:
        devices = [torch.device(args.device)]
    else:
        devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    cases = SW_QUICK if args.quick else SW_CASES
    load_before = os.getloadavg()[0]
    t_start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="bench_sw_"))

    rows, starts, raw_paths = [], [], []
    for (shape, window), repeats in zip(cases, args.sw_repeats):
        raw, _ = synthetic_tumour.make_tumour_phantom(shape[1:], SW_SPACING, np.random.default_rng(0))
        assert raw.shape == shape, f"phantom {raw.shape}, expected {shape}"
        raw_paths.append(work / f"scan_{'x'.join(map(str, shape[1:]))}.npy")
        np.save(raw_paths[-1], raw)
        volume = raw.copy()
        ds.normalise(volume, SW_RULES)  # in place, as predict_patches does
        del raw
        starts.append(sw_starts(shape[1:], window))
        for device in devices:
            model = sw_model(device)
            # Untimed first calls (allocations, kernel choice).
            _, ours = ours_sliding(model, volume, window, device)
            _, theirs = monai_sliding(model, volume, window, device)
            assert ours.shape == theirs.shape == (SW_LABELS.out_channels, *shape[1:]), f"{ours.shape} {theirs.shape}"
            row = {"shape": shape, "window": window, "device": device.type, "repeats": repeats, "ours": [],
                   "MONAI": []}
            del ours, theirs
            for i in range(repeats):
                seconds, ours = ours_sliding(model, volume, window, device)
                row["ours"].append(seconds)
                seconds, theirs = monai_sliding(model, volume, window, device)
                row["MONAI"].append(seconds)
                if i == 0:
                    row.update(differences(ours, theirs, window), range=(float(ours.min()), float(ours.max())))
                del ours, theirs
            row["ratio"] = statistics.median(row["MONAI"]) / statistics.median(row["ours"])
            rows.append(row)
            print(f"{'x'.join(map(str, shape))}, window {'x'.join(map(str, window))}, {device.type}: ours "
                  + ", ".join(f"{t:.2f}" for t in row["ours"]) + " s, MONAI "
                  + ", ".join(f"{t:.2f}" for t in row["MONAI"]) + f" s, MONAI / ours {row['ratio']:.2f}x, max abs "
                  f"difference {row['max']:.2e} ({row['inner']:.2e} away from the faces)", flush=True)
            del model
        del volume
    load_after = os.getloadavg()[0]

    mem = None if args.no_memory else sw_memory(raw_paths[0], cases[0][1], devices[0], work)
    if mem:
        print("peak RSS: " + ", ".join(f"{k} {v / MIB:.0f} MiB" for k, v in mem.items()), flush=True)
    print(f"section took {time.perf_counter() - t_start:.0f} s", flush=True)
    shutil.rmtree(work)
    publish(sliding_window_lines(argv, devices, cases, rows, starts, mem, load_before, load_after, monai),
            SW_HEADING, args.output, write=not args.no_write)


def sliding_window_lines(argv, devices, cases, rows, starts, mem, load_before, load_after, monai) -> list[str]:
    def size(shape) -> str:
        return "x".join(map(str, shape))

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    given = argv if argv is not None else sys.argv[1:]
    command = " ".join([".venv-bench/bin/python benchmarks/bench_predict.py", *given])
    threads = torch.get_num_threads()
    host = f"{cpu_name()}, {os.cpu_count()} cores ({threads} torch threads)"
    cuda = any(d.type == "cuda" for d in devices)
    machine = f"{host}; GPU {torch.cuda.get_device_name()}" if cuda else f"{host}; no GPU"
    loaded = load_before > 0.5 * (os.cpu_count() or 1) + 0.5
    params = count_parameters(VNet(in_channels=4, out_channels=SW_LABELS.out_channels,
                                   base_channels=SW_BASE_CHANNELS))
    weights = inference.gaussian_weights(cases[0][1])
    lines = [
        SW_HEADING, "",
        f"`{command}` on {datetime.date.today().isoformat()}, commit {commit}: {machine}; torch {torch.__version__}, "
        f"MONAI {monai.__version__}, numpy {np.__version__}, Python {platform.python_version()}; load average "
        f"{load_before:.1f} before, {load_after:.1f} after the timings"
        + (" (other jobs were running: absolute seconds are inflated, the alternating arms' ratio less so)."
           if loaded else "."),
        "",
        "Ours: `inference.sliding_window(activation=inference.ACTIVATIONS[\"softmax\"])`. MONAI: "
        f"`sliding_window_inference(roi_size=window, sw_batch_size={SW_BATCH}, overlap={SW_OVERLAP}, "
        "mode=\"gaussian\", sigma_scale=0.125, padding_mode=\"constant\", cval=0.0)` with the predictor "
        "`torch.softmax(model(x), 1)`. Both run the same `models.VNet(in_channels=4, out_channels=4, "
        f"base_channels={SW_BASE_CHANNELS})` ({params:,} parameters; untrained, seeded weights: the time does not "
        "depend on them) in eval mode under `torch.no_grad`, a softmax over its 4 outputs applied to each window "
        f"before the Gaussian blend (sigma 1/8 of the window in both), overlap {SW_OVERLAP}, {SW_BATCH} windows per "
        f"forward pass, {threads} torch threads, the windows in the same layout"
        + (", bf16 autocast on CUDA for both" if cuda else "") + ". Input: a four-channel brain-tumour phantom "
        "(`synthetic_tumour.make_tumour_phantom`, 1 mm, seed 0) z-scored per channel over the brain "
        "(`dataset.normalise`, rule \"nonzero\", as `predict_patches` does); each arm goes from the (C, D, H, W) "
        "float32 numpy array in host memory to the (4, D, H, W) probabilities as a numpy array. One untimed call "
        "of each arm, then the median of the timed calls, the arms alternating; the first timed calls' outputs "
        "are compared (all 4 channels, every voxel; \"inner\": at least a quarter window from every face of the "
        "scan).",
        "",
        "| scan (C x D x H x W) | window | windows (ours, MONAI) | device | ours (s, median) | MONAI (s, median) | "
        "all calls, ours; MONAI (s) | MONAI / ours | max abs difference (inner) | mean abs difference | "
        "ours' probabilities |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        st = starts[[c for c, _ in cases].index(row["shape"])]
        counts = ", ".join(str(int(np.prod([len(a) for a in st[k]]))) for k in ("ours", "MONAI"))
        lines.append(
            f"| {size(row['shape'])} | {size(row['window'])} | {counts} | {row['device']} | "
            f"{statistics.median(row['ours']):.2f} | {statistics.median(row['MONAI']):.2f} | "
            f"{', '.join(f'{t:.2f}' for t in row['ours'])}; {', '.join(f'{t:.2f}' for t in row['MONAI'])} | "
            f"{row['ratio']:.2f}x | {row['max']:.1e} ({row['inner']:.1e}) | {row['mean']:.1e} | "
            f"{row['range'][0]:.3f} to {row['range'][1]:.3f} |")
    lines.append("")
    placement = []
    for (shape, window), st in zip(cases, starts):
        if st["ours"] == st["MONAI"]:
            placement.append(f"on the {size(shape[1:])} scan ({size(window)} window) the starts coincide "
                             f"({'; '.join(map(str, st['ours']))} in z; y; x)")
        else:
            placement.append(f"on the {size(shape[1:])} scan ({size(window)} window) ours start at "
                             f"{'; '.join(map(str, st['ours']))} and MONAI's at {'; '.join(map(str, st['MONAI']))} "
                             "(z; y; x)")
    lines += [
        "The outputs agree closely but are not equal, for two reasons. Weights: MONAI clamps its Gaussian "
        "importance map from below at 1e-3 (`monai.data.utils.compute_importance_map`), ours does not (its "
        f"smallest weight, at a window's corner, is {weights.min():.1e}; {np.mean(weights < 1e-3):.0%} of a "
        f"{size(cases[0][1])} window's voxels weigh under 1e-3). Near the scan's faces every window that covers a "
        "voxel has it in that margin, so MONAI weighs those windows alike there (a plain mean) while ours still "
        "favours the window whose centre is nearest; hence the larger differences there than inside (the "
        "\"inner\" figure). Placement: MONAI steps by its scan interval, "
        f"int({1 - SW_OVERLAP} x window), from 0 and moves the last window back to end at the scan's edge (a "
        "shorter last step); ours spreads the same number of windows evenly from the first to the last "
        f"(`inference.window_starts`): {'; '.join(placement)}. Where the starts coincide, the weights are the "
        "whole difference: at commit 6281e1a, which summed the same weights as a volume, ours run with MONAI's "
        "importance map gave MONAI's output within 1.2e-07 on the 4x64x96x96 scan (ours now sums them as three "
        "per-axis vectors, which only its own separable weights allow). The differences are set against the "
        "probabilities' own spread (last column) of an untrained network; a trained one's windows disagree more "
        "at their edges, and would differ more.",
        "",
    ]
    if mem:
        shape, window = cases[0]
        volume = np.prod(shape[1:]) * 4
        c, k = shape[0], SW_LABELS.num_classes
        bound = (c + k + 2) * volume
        rise = mem["predict_patches"] - mem["batch forward"]
        held = c * volume + rise
        device = devices[0].type
        lines += [
            f"Host memory of our full prediction path, `inference.predict_patches` (an `inference.Patches` of the "
            f"same model: window {size(window)}, overlap {SW_OVERLAP}, batch {SW_BATCH}, rules \"nonzero\", "
            f"{k} classes, device {device}) on the {size(shape)} scan, in a fresh process (started by a small "
            f"launcher, so that its peak RSS starts at its own size); one float32 {size(shape[1:])} volume is "
            f"{volume / MIB:.1f} MiB. The process loads the raw scan (C = {c} volumes), runs the network once on "
            f"a batch of {SW_BATCH} zero windows (its activations scale with the window and the batch, not the "
            "scan, and the bound leaves them out; this puts them in the peak first), then calls `predict_patches`; "
            "ru_maxrss after each step:",
            "",
            "| scan loaded (MiB) | + one batch's forward pass (MiB) | + predict_patches (MiB) | rise during the "
            "call (MiB) | rise (volumes) | scan + rise (volumes) | bound C + K + 2 (volumes) | (scan + rise) / bound |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
            f"| {mem['scan loaded'] / MIB:,.0f} | {mem['batch forward'] / MIB:,.0f} | "
            f"{mem['predict_patches'] / MIB:,.0f} | {rise / MIB:,.0f} | {rise / volume:.1f} | {held / volume:.1f} | "
            f"{c + k + 2} ({bound / MIB:,.0f} MiB) | {held / bound:.2f} |",
            "",
            f"The bound (C = {c} channels, K = {k} classes) allows the scan, the K + 1 accumulated probabilities "
            "and one volume more (`predict_patches` holds the first two: its summed weights are three vectors); "
            "the network's activations on "
            f"one batch of windows ({(mem['batch forward'] - mem['scan loaded']) / MIB:,.0f} MiB above "
            f"the loaded scan here) come on top. One batch of {SW_BATCH} windows, its input ({c} channels) or its "
            f"output ({k + 1}), is {SW_BATCH * c * np.prod(window) * 4 / volume:.1f} and "
            f"{SW_BATCH * (k + 1) * np.prod(window) * 4 / volume:.1f} volumes of this scan: such a buffer held "
            "into the next batch's forward pass shows in the rise at that size. The process's peak from wait4: "
            f"{mem['process peak (wait4)'] / MIB:,.0f} MiB. "
            + ("Within the bound." if held <= bound else f"Over the bound by {(held - bound) / volume:.1f} volumes."),
            "",
        ]
    if not cuda:
        lines += ["No GPU on this machine: the same command on one adds CUDA rows (both arms on the GPU under "
                  "bf16 autocast); the memory figures stay the CPU path's.", ""]
    return lines


def main(argv=None):
    args = parse_args(argv)
    if args.section == "sliding_window":
        return sliding_window_section(args, argv)
    import monai
    inference.set_cpu_threads()
    device = torch.device(args.device or "cpu")
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
    params = count_parameters(pipe.segmenters[0])

    ours_arm(pipe, scan, work / "warm.nrrd")  # untimed: first-call allocations and kernel choice
    stages = stage_times(pipe, scan, work / "stages.nrrd")
    print("our stages: " + ", ".join(f"{k} {v:.2f} s" for k, v in stages.items()), flush=True)
    times = {"ours": [], "MONAI": []}
    for i in range(max(args.repeats, args.monai_repeats)):
        if i < args.repeats:
            times["ours"].append(ours_arm(pipe, scan, work / f"ours_{i}.nrrd"))
            print(f"ours: {times['ours'][-1]:.2f} s", flush=True)
        if i < args.monai_repeats:
            times["MONAI"].append(monai_arm(pipe.segmenters[0], scan, work / f"monai_{i}.nrrd", device))
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
