"""Training speed and memory: steps per second and peak host memory of our V-Net against
MONAI's `VNet` on the same batch in the same run; peak host memory of `train.py` against the
number of training cases; on a GPU, samples per second at the reference's 3x1x96x144x224 with
mixed precision, the projected time of its 200-epoch schedule and the fraction of the GPU's
peak reached. Writes its section of BENCHMARKS.md.

    python3 -m venv .venv-bench && .venv-bench/bin/pip install -r requirements.txt -r requirements-bench.txt
    .venv-bench/bin/python benchmarks/bench_train.py                      # CPU-sized defaults
    .venv-bench/bin/python benchmarks/bench_train.py --device cuda        # 3x1x96x144x224, bf16
    .venv-bench/bin/python benchmarks/bench_train.py --no_cases --no_write --steps 2

Step timing: each (model, memory layout) pair is an "arm" with its own model and Adam; one
round runs one step of every arm, the order rotating from round to round, so a machine whose
load changes slows every arm alike; untimed warm-up rounds first, then medians. A step is
forward (autocast on CUDA), `losses.dice_loss`, backward and Adam step. Both layouts are timed
for both models: train.py uses channels-last-3D on the CPU and contiguous on CUDA, and a
layout that suits our PReLU net need not suit MONAI's BatchNorm one.

Peak host memory is the peak resident set size (ru_maxrss from wait4) of a separate process
per measurement: one per arm running two steps, and one per phantom set running
`train.py --stage both` for one short epoch per stage. ru_maxrss is a high-water mark, so
measuring in fresh processes is the only way to keep one figure from hiding the next; each is
started by a small launcher (`WAIT4`), not by this process, whose size it would inherit.

FLOPs are those of the convolutions, counted with forward hooks (`conv_flops`); a training
step is taken as 3 x the forward (the backward computes a gradient for the input and one for
the weights, each about a forward's work).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench_losses import phantom_batch  # noqa: E402  (benchmarks/ is sys.path[0])

import dataset as ds  # noqa: E402
from common import cpu_name, publish, sync  # noqa: E402  (benchmarks/ is sys.path[0])
from inference import resolve_device  # noqa: E402
from losses import dice_loss  # noqa: E402
from models import VNet, count_parameters  # noqa: E402
from utils import run_cli  # noqa: E402

HEADING = "## Training (benchmarks/bench_train.py)"
REFERENCE_HOURS = 14.5  # the write-up's training time of one segmenter
REFERENCE_EPOCHS, REFERENCE_SAMPLES = 200, 480  # its schedule: 200 epochs of 480 crops
REFERENCE_BATCH, REFERENCE_PATCH = 3, (96, 144, 224)
LAYOUTS = {"channels_last": torch.channels_last_3d, "contiguous": torch.contiguous_format}
MODELS = ("ours", "MONAI")

# Dense (no sparsity) bf16/fp16 tensor-core peaks from the vendors' data sheets, TFLOPS. The
# first name fragment found in torch.cuda.get_device_name() wins, so the longer names of a
# family come first; `--peak_tflops` overrides the table.
PEAK_TFLOPS = (
    ("H200", 989.0, "H200 (SXM), bf16 dense"),
    ("H100 PCIe", 756.0, "H100 PCIe, bf16 dense"),
    ("H100 NVL", 835.0, "H100 NVL, bf16 dense"),
    ("H100", 989.0, "H100 SXM, bf16 dense"),
    ("A100", 312.0, "A100, bf16 dense"),
    ("L40S", 362.0, "L40S, bf16 dense"),
    ("L4", 121.0, "L4, bf16 dense"),
    ("V100", 125.0, "V100, fp16 tensor cores"),
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("training steps (ours against MONAI)")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where to train")
    g.add_argument("--batch_size", type=int, default=None, help="crops per step (default: 1 on CPU, 3 on CUDA)")
    g.add_argument("--patch_size", type=int, nargs=3, metavar=("D", "H", "W"), default=None,
                   help="crop size, multiples of 16 (default: 32 64 64 on CPU, 96 144 224 on CUDA)")
    g.add_argument("--base_channels", type=int, default=8, help="our V-Net's input-stage width (8: reference)")
    g.add_argument("--steps", type=int, default=None, help="timed steps per arm (default: 5 on CPU, 20 on CUDA)")
    g.add_argument("--warmup", type=int, default=None,
                   help="untimed steps per arm first (default: 1 on CPU, 3 on CUDA)")
    g.add_argument("--amp", choices=("auto", "off", "bf16", "fp16"), default="auto",
                   help="autocast dtype; auto: bf16 on CUDA where supported, else fp16 with a gradient scaler; "
                        "off on CPU")
    g.add_argument("--layouts", nargs="+", choices=tuple(LAYOUTS), default=tuple(LAYOUTS),
                   help="memory layouts to time, each for both models")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: one per core, as train.py)")
    g.add_argument("--peak_tflops", type=float, default=None,
                   help="the GPU's peak for the utilisation figure (default: looked up from its name)")
    c = p.add_argument_group("peak memory against the number of training cases (train.py)")
    c.add_argument("--cases", type=int, nargs="+", default=(4, 8, 16, 32),
                   help="phantom set sizes (a run's peak strays by some 20 MiB: the span must show more)")
    c.add_argument("--case_shape", type=int, nargs=3, metavar=("D", "H", "W"), default=(48, 128, 128),
                   help="phantom volume shape")
    c.add_argument("--train_base_channels", type=int, default=4, help="--base_channels of those train.py runs")
    c.add_argument("--train_patch_size", type=int, nargs=3, metavar=("D", "H", "W"), default=(32, 64, 64),
                   help="--patch_size of those runs, fixed so that only the number of cases varies")
    c.add_argument("--no_cases", action="store_true", help="skip the train.py runs (the section then lacks them)")
    o = p.add_argument_group("output")
    o.add_argument("--output", default=str(ROOT / "BENCHMARKS.md"), help="file whose section to replace")
    o.add_argument("--no_write", action="store_true", help="print only")
    p.add_argument("--probe", default=None, help=argparse.SUPPRESS)  # internal: one arm's memory, in a child
    args = p.parse_args(argv)
    if args.patch_size and any(s <= 0 or s % 16 for s in args.patch_size):
        p.error(f"--patch_size {' '.join(map(str, args.patch_size))}: each size must be a positive multiple of 16")
    if any(s <= 0 or s % 16 for s in args.train_patch_size):
        p.error(f"--train_patch_size {' '.join(map(str, args.train_patch_size))}: each size must be a positive "
                "multiple of 16")
    for name in ("batch_size", "steps", "base_channels", "train_base_channels", "threads", "peak_tflops"):
        v = getattr(args, name)
        if v is not None and v <= 0:
            p.error(f"--{name} {v}: must be greater than 0")
    if args.warmup is not None and args.warmup < 0:
        p.error(f"--warmup {args.warmup}: must be 0 or more")
    if min(args.cases) < 2 or min(args.case_shape) < 32:
        p.error("--cases needs at least 2 cases per set (one is held out), --case_shape at least 32 voxels per axis")
    return args


# ----------------------------------------------------------------------------- FLOPs


def conv_flops(build, patch) -> float:
    """Forward FLOPs (2 x multiply-adds) of the Conv3d and ConvTranspose3d layers of `build()`
    on one (1, 1, D, H, W) sample, counted by forward hooks on the meta device (shapes only,
    nothing computed). Conv3d: every output value takes in_channels / groups x kernel volume
    multiply-adds. ConvTranspose3d: every input value is spread over out_channels / groups x
    kernel volume outputs. Bias additions are left out.

    Example: Conv3d(1, 8, 5, padding=2) on 1x1x16x16x16 gives 8 x 4096 outputs x 1 x 125
    = 4,096,000 multiply-adds = 8.192 MFLOP.
    """
    total = 0

    def hook(module, inputs, output):
        nonlocal total
        kernel = int(np.prod(module.kernel_size))
        if isinstance(module, nn.ConvTranspose3d):
            total += inputs[0].numel() * module.out_channels // module.groups * kernel
        else:
            total += output.numel() * module.in_channels // module.groups * kernel

    with torch.device("meta"):
        model = build().eval()
    for m in model.modules():
        if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d)):
            m.register_forward_hook(hook)
    with torch.no_grad():
        model(torch.empty(1, 1, *patch, device="meta"))
    return 2.0 * total


def torch_counted_training_flops(build, patch) -> float | None:
    """torch.utils.flop_counter's count of one forward and backward, as an independent check
    of `3 x conv_flops`; None where it cannot run."""
    try:
        from torch.utils.flop_counter import FlopCounterMode
        with torch.device("meta"):
            model = build()
        counter = FlopCounterMode(display=False)
        with counter:
            model(torch.empty(1, 1, *patch, device="meta")).sum().backward()
        return float(counter.get_total_flops())
    except Exception:  # an older torch, or an op without a meta kernel: the check is skipped
        return None


def peak_tflops(name: str, override: float | None) -> tuple[float | None, str]:
    if override:
        return override, f"{override:g} TFLOPS (--peak_tflops)"
    for fragment, tflops, what in PEAK_TFLOPS:
        if fragment in name:
            return tflops, f"{tflops:g} TFLOPS ({what}, data sheet; matched '{fragment}' in '{name}')"
    return None, f"no peak known for '{name}' (pass --peak_tflops)"


# ----------------------------------------------------------------------------- training steps


def builders(base_channels: int) -> dict:
    def ours():
        return VNet(base_channels=base_channels)

    def monai_vnet():
        from monai.networks.nets import VNet as MonaiVNet
        return MonaiVNet(spatial_dims=3, in_channels=1, out_channels=1)

    return {"ours": ours, "MONAI": monai_vnet}


def make_arm(model_name: str, layout: str, build, images: np.ndarray, labels: np.ndarray, device, amp_dtype) -> dict:
    fmt = LAYOUTS[layout]
    torch.manual_seed(0)
    model = build().to(device, memory_format=fmt).train()  # MONAI's dropout stays on, as its defaults have it
    return {"name": f"{model_name}, {layout}", "model_name": model_name, "layout": layout, "model": model,
            "parameters": count_parameters(model), "opt": torch.optim.Adam(model.parameters(), lr=1e-4),
            "scaler": torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16),
            "image": torch.from_numpy(images).to(device, memory_format=fmt),
            "label": torch.from_numpy(labels).to(device), "times": []}


def train_step(arm: dict, device, amp_dtype) -> float:
    """One forward, Dice loss, backward and Adam step; seconds, the device synchronised."""
    sync(device)
    t0 = time.perf_counter()
    with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        logits = arm["model"](arm["image"])
    loss = dice_loss(logits.float(), arm["label"])
    arm["opt"].zero_grad(set_to_none=True)
    arm["scaler"].scale(loss).backward()
    arm["scaler"].step(arm["opt"])
    arm["scaler"].update()
    sync(device)
    seconds = time.perf_counter() - t0
    assert torch.isfinite(loss), f"{arm['name']}: loss {loss.item()}"
    return seconds


# Starts `argv[2:]` and writes "<exit code> <ru_maxrss>" of it, read with wait4, to `argv[1]`.
# The measured process must be started by a small one: on Linux a child's ru_maxrss starts at
# the resident size of the process it was spawned from (the address space it ran in until its
# exec), so spawned straight from this benchmark, with its models in memory, every child would
# report at least this benchmark's size.
WAIT4 = ("import os, sys; pid = os.posix_spawn(sys.argv[2], sys.argv[2:], os.environ); "
         "_, status, usage = os.wait4(pid, 0); "
         "open(sys.argv[1], 'w').write(f'{os.waitstatus_to_exitcode(status)} {usage.ru_maxrss}')")


def run_measured(cmd, log_path: Path, timeout: float = 1800.0) -> tuple[int, int, float]:
    """Run `cmd` (cmd[0] an absolute path) with its output in `log_path`; (exit code, peak RSS
    in bytes, seconds). The peak is that process's own ru_maxrss."""
    result = log_path.with_suffix(".rusage")
    with open(log_path, "wb") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-c", WAIT4, str(result), *cmd], stdout=log,
                                stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
        timer = threading.Timer(timeout, lambda: os.killpg(proc.pid, 9))
        timer.start()
        try:
            proc.wait()
        finally:
            timer.cancel()
        seconds = time.perf_counter() - t0
    if proc.returncode != 0 or not result.exists():
        return proc.returncode or -9, 0, seconds
    code, maxrss = map(int, result.read_text().split())
    unit = 1 if sys.platform == "darwin" else 1024  # Linux reports KiB, macOS bytes
    return code, maxrss * unit, seconds


def child_failed(what: str, code: int, log_path: Path):
    tail = log_path.read_text(errors="replace").strip().splitlines()[-15:]
    return RuntimeError(f"{what} exited with status {code}; its last lines:\n" + "\n".join(tail))


def probe_memory(args, arm_name: str, workdir: Path) -> dict:
    """Peak RSS (and CUDA peak) of a child process that runs two steps of one arm, or, for
    `baseline`, only imports and makes the batch."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--probe", arm_name, "--device", args.device,
           "--batch_size", str(args.batch_size), "--patch_size", *map(str, args.patch_size),
           "--base_channels", str(args.base_channels), "--amp", args.amp, "--threads", str(args.threads)]
    log = workdir / f"probe_{arm_name.replace(', ', '_')}.log"
    code, rss, _ = run_measured(cmd, log)
    if code != 0:
        raise child_failed(f"memory probe '{arm_name}'", code, log)
    result = json.loads(log.read_text().strip().splitlines()[-1])
    return {"rss": rss, "cuda_peak": result.get("cuda_peak")}


def probe_main(args, device, amp_dtype) -> None:
    """The child side of `probe_memory`: prints one JSON line."""
    import monai.networks.nets  # noqa: F401  (in every probe, so that all share the baseline's imports)
    images, labels = phantom_batch(tuple(args.patch_size), args.batch_size, np.random.default_rng(0))
    if args.probe != "baseline":
        model_name, layout = args.probe.split(", ")
        arm = make_arm(model_name, layout, builders(args.base_channels)[model_name], images, labels, device, amp_dtype)
        for _ in range(2):  # the second step holds Adam's state as well as the activations
            train_step(arm, device, amp_dtype)
    cuda_peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    print(json.dumps({"cuda_peak": cuda_peak}))


def time_arms(args, device, amp_dtype) -> list[dict]:
    images, labels = phantom_batch(tuple(args.patch_size), args.batch_size, np.random.default_rng(0))
    build = builders(args.base_channels)
    arms = [make_arm(m, layout, build[m], images, labels, device, amp_dtype) for m in MODELS for layout in args.layouts]
    for r in range(args.warmup + args.steps):
        k = r % len(arms)
        for arm in arms[k:] + arms[:k]:
            arm["last"] = train_step(arm, device, amp_dtype)
            if r >= args.warmup:
                arm["times"].append(arm["last"])
        print(f"round {r + 1}/{args.warmup + args.steps}{' (warm-up)' if r < args.warmup else ''}: "
              + ", ".join(f"{a['name']} {a['last']:.3f} s" for a in arms), flush=True)
    for arm in arms:
        arm["median"] = statistics.median(arm["times"])
        arm["fastest"] = min(arm["times"])
        del arm["model"], arm["opt"], arm["image"], arm["label"]
    return arms


# ----------------------------------------------------------------------------- memory against cases

# train.py keeps each training case's crop region in memory while they stay under
# training.CASE_CACHE_LIMIT (`--cache_cases` default); the "cache off" runs pass `--cache_cases False`.
def train_command(argv, no_cache=False) -> list[str]:
    argv = [*argv, "--cache_cases", "False"] if no_cache else argv
    return [sys.executable, str(ROOT / "train.py"), *argv]


def memory_against_cases(args, workdir: Path) -> dict:
    import synthetic
    data = workdir / "phantoms"
    t0 = time.perf_counter()
    synthetic.write_phantom_dataset(data / "all", num_cases=max(args.cases), shapes=(tuple(args.case_shape),))
    print(f"wrote {max(args.cases)} phantoms of {'x'.join(map(str, args.case_shape))} in "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    all_cases = sorted(p for p in (data / "all").iterdir() if p.is_dir())
    code, baseline, _ = run_measured(train_command(["--help"]), workdir / "import_train.log")
    if code != 0:
        raise child_failed("train.py --help", code, workdir / "import_train.log")
    rows = []
    for n in sorted(set(args.cases)):
        subset = data / f"n{n:03d}"
        subset.mkdir()
        for case in all_cases[:n]:
            (subset / case.name).symlink_to(case, target_is_directory=True)
        row = {"cases": n}
        for mode in ("as_is", "no_cache"):
            run_dir = workdir / f"run_n{n:03d}_{mode}"
            argv = ["--data_dir", str(subset), "--output_dir", str(run_dir), "--stage", "both", "--device", "cpu",
                    "--num_workers", "0", "--max_epochs", "1", "--locator_max_epochs", "1",
                    "--samples_per_epoch", "6", "--locator_samples_per_epoch", "6",
                    "--base_channels", str(args.train_base_channels),
                    "--patch_size", *map(str, args.train_patch_size)]
            log = workdir / f"train_n{n:03d}_{mode}.log"
            code, rss, seconds = run_measured(train_command(argv, no_cache=mode == "no_cache"), log)
            if code != 0:
                raise child_failed(f"train.py on {n} cases ({mode})", code, log)
            row[mode], row[f"{mode}_s"] = rss, seconds
            split = json.loads((run_dir / "split.json").read_text())
            row["train"] = len(split["train"])
            print(f"{n} cases, {mode}: peak RSS {rss / 2**20:.0f} MiB ({seconds:.0f} s)", flush=True)
            shutil.rmtree(run_dir)
        rows.append(row)
    factors = ds.downscale_factors((0.5, 0.25, 0.25))  # train.py's default --scale_factor
    common = ds.round_up(args.case_shape, ds.pad_multiple(factors))
    low_voxels = int(np.prod(common)) // int(np.prod(factors))
    return {"rows": rows, "baseline": baseline,
            # float32 image + uint8 label of the crop region, at least one patch (two when the
            # locator's crop and the ground truth's do not overlap)
            "cache_per_case": 5 * int(np.prod(args.train_patch_size)),
            "locator_per_case": 5 * low_voxels, "low_shape": tuple(c // f for c, f in zip(common, factors))}


# ----------------------------------------------------------------------------- report





def mib(n: float) -> str:
    return f"{n / 2**20:,.0f}"


def step_lines(args, arms, flops, probes, device, amp_name) -> list[str]:
    patch = "x".join(map(str, args.patch_size))
    train_layout = "channels_last" if device.type == "cpu" else "contiguous"
    ref = next((a for a in arms if a["model_name"] == "ours" and a["layout"] == train_layout), arms[0])
    ours = [a for a in arms if a["model_name"] == "ours"]
    theirs = [a for a in arms if a["model_name"] == "MONAI"]
    best_ours, best_theirs = min(ours, key=lambda a: a["median"]), min(theirs, key=lambda a: a["median"])
    cuda = device.type == "cuda"
    lines = [
        "### Training step: ours against MONAI's VNet", "",
        f"Batch {args.batch_size} x 1 x {patch} voxels, the same phantom crop for every arm; forward "
        f"({amp_name}), `losses.dice_loss`, backward, Adam step; median of {args.steps} steps per arm after "
        f"{args.warmup} untimed, the arms taking turns in an order that rotates each round. Ours: "
        f"`models.VNet(base_channels={args.base_channels})` (PReLU, no normalisation). MONAI: "
        "`monai.networks.nets.VNet(spatial_dims=3, in_channels=1, out_channels=1)` at its own defaults "
        f"(16 to 256 channels{', twice ours at every stage' if args.base_channels == 8 else ''}; BatchNorm, ELU, "
        "dropout 0.5 in training). FLOPs: "
        "the convolutions', 3 x the forward per training sample. Peak RSS: a fresh process running two steps "
        "of that arm alone; the baseline process (imports and batch, no model) peaks at "
        f"{mib(probes['baseline']['rss'])} MiB.",
        "",
        "| model | layout | parameters | GFLOP per sample (training) | s per step (median) | fastest | samples/s "
        f"| time vs ours, {ref['layout']} | GFLOP/s | peak RSS (MiB) | above baseline (MiB) |"
        + (" CUDA peak (MiB) |" if cuda else ""),
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |" + (" --- |" if cuda else ""),
    ]
    for a in arms:
        train_flops = 3 * flops[a["model_name"]]
        sps = args.batch_size / a["median"]
        p = probes[a["name"]]
        lines.append(
            f"| {a['model_name']} | {a['layout']}{' (train.py)' if a is ref and a['layout'] == train_layout else ''} | "
            f"{a['parameters']:,} | "
            f"{train_flops / 1e9:,.1f} | {a['median']:.3f} | {a['fastest']:.3f} | {sps:.2f} | "
            f"{a['median'] / ref['median']:.2f} | {train_flops * sps / 1e9:,.1f} | {mib(p['rss'])} | "
            f"{mib(p['rss'] - probes['baseline']['rss'])} |" + (f" {mib(p['cuda_peak'])} |" if cuda else ""))
    ratio = best_theirs["median"] / ref["median"]
    lines += [
        "",
        f"Steps per second: ours {1 / ref['median']:.2f} ({ref['layout']}"
        f"{', train.py' if ref['layout'] == train_layout else ''}), MONAI "
        f"{1 / best_theirs['median']:.2f} in its faster layout ({best_theirs['layout']}): MONAI's step takes "
        f"{ratio:.1f}x ours, for {flops['MONAI'] / flops['ours']:.1f}x the convolution FLOPs and "
        f"{best_theirs['parameters'] / ref['parameters']:.1f}x the parameters. "
        f"Our faster layout here is {best_ours['layout']}"
        + ("." if len(ours) < 2 else
           f" ({max(a['median'] for a in ours) / best_ours['median']:.2f}x the other)."),
        "",
    ]
    return lines


def gpu_lines(args, arms, flops, flops_ref, device, amp_name) -> list[str]:
    lines = ["### On a GPU", ""]
    samples = REFERENCE_EPOCHS * REFERENCE_SAMPLES
    ref_sps = samples / (REFERENCE_HOURS * 3600)
    if device.type != "cuda":
        reference_flops = 3 * conv_flops(VNet, REFERENCE_PATCH)  # the reference's width, whatever --base_channels
        lines += [
            "No GPU on this machine; `--device cuda` measures samples per second at 3 x 1 x 96x144x224 with "
            "bf16 autocast, the projected time of the reference's schedule and the fraction of the GPU's peak. "
            "Figures it will use: our V-Net"
            f"{'' if args.base_channels == 8 else f' (base_channels={args.base_channels})'} "
            f"does {3 * flops_ref['ours'] / 1e9:,.0f} GFLOP of convolutions per "
            f"training sample at 96x144x224 (MONAI's VNet {3 * flops_ref['MONAI'] / 1e9:,.0f}); the reference's "
            f"{REFERENCE_EPOCHS} epochs x {REFERENCE_SAMPLES} samples in {REFERENCE_HOURS} h are "
            f"{ref_sps:.2f} samples/s, {ref_sps * reference_flops / 1e12:.1f} TFLOP/s of its V-Net's convolutions.",
            "",
        ]
        return lines
    name = torch.cuda.get_device_name(device)
    peak, assumption = peak_tflops(name, args.peak_tflops)
    at_reference = args.batch_size == REFERENCE_BATCH and tuple(args.patch_size) == REFERENCE_PATCH
    ref = next(a for a in arms if a["model_name"] == "ours" and a["layout"] == "contiguous") \
        if "contiguous" in args.layouts else next(a for a in arms if a["model_name"] == "ours")
    lines.append(f"{name}, {amp_name}, cudnn.benchmark on; our V-Net in the {ref['layout']} layout"
                 f"{' (train.py)' if ref['layout'] == 'contiguous' else ''}; peak assumed: {assumption}.")
    lines.append("")
    if not at_reference:
        lines += [f"Measured at batch {args.batch_size} x {'x'.join(map(str, args.patch_size))}, not the "
                  "reference's 3 x 96x144x224: the projection below is for this crop.", ""]
    lines += ["| model | layout | samples/s | projected 200 x 480 samples (h) | vs reference 14.5 h | TFLOP/s "
              "| fraction of peak |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for a in arms:
        sps = args.batch_size / a["median"]
        tflops = 3 * flops[a["model_name"]] * sps / 1e12
        hours = samples / sps / 3600
        frac = f"{100 * tflops / peak:.1f} %" if peak else "-"
        lines.append(f"| {a['model_name']} | {a['layout']} | {sps:.2f} | {hours:.2f} | "
                     f"{REFERENCE_HOURS / hours:.1f}x faster | {tflops:.1f} | {frac} |")
    sps = args.batch_size / ref["median"]
    hours = samples / sps / 3600
    lines += [
        "",
        f"Ours: {sps:.2f} samples/s, so the reference's {REFERENCE_EPOCHS} epochs x {REFERENCE_SAMPLES} samples "
        f"would take {hours:.2f} h of training steps against its {REFERENCE_HOURS} h "
        f"({REFERENCE_HOURS / hours:.1f}x faster); data loading, validation, checkpoints and the locator stage "
        "are not in this figure."
        + (f" It reaches {100 * 3 * flops['ours'] * sps / 1e12 / peak:.1f} % of the assumed peak." if peak else ""),
        "",
    ]
    return lines


def cases_lines(args, mem) -> list[str]:
    shape = "x".join(map(str, args.case_shape))
    rows = mem["rows"]
    lines = [
        "### Peak host memory against the number of training cases", "",
        f"`train.py --stage both --device cpu --num_workers 0 --max_epochs 1 --locator_max_epochs 1 "
        f"--samples_per_epoch 6 --locator_samples_per_epoch 6 --base_channels {args.train_base_channels} "
        f"--patch_size {' '.join(map(str, args.train_patch_size))}` on phantom sets of {shape} voxels "
        "(`synthetic.write_phantom_dataset`; a set is the first n cases of one written set, 20 % held out for "
        "validation), each run in its own process; peak RSS from wait4. `train.py --help` (its imports, no data) "
        f"peaks at {mib(mem['baseline'])} MiB.",
        "",
    ]
    lines[-2] += " Seconds per run: as it is, then cache off (`--cache_cases False`)."
    lines += ["| cases (train + validation) | peak RSS, train.py as it is (MiB) | peak RSS, case cache off (MiB) "
              "| seconds per run |", "| --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['cases']} ({r['train']} + {r['cases'] - r['train']}) | {mib(r['as_is'])} | "
                     f"{mib(r['no_cache'])} | {r['as_is_s']:.0f}, {r['no_cache_s']:.0f} |")
    # Least-squares slope over all the sets: a single run's peak can stray by tens of MiB.
    n = [r["cases"] for r in rows]
    slope = {k: float(np.polyfit(n, [r[k] for r in rows], 1)[0]) for k in ("as_is", "no_cache")}
    lines += [
        "",
        f"Peak growth per case (least-squares slope over the {len(rows)} sets): "
        f"{slope['as_is'] / 2**20:+.2f} MiB as train.py is, {slope['no_cache'] / 2**20:+.2f} MiB with the case "
        "cache off.",
        "By design train.py holds, per case: the segmenter's crop region (the part of the case its crops can "
        "cover), while the regions stay under 2 GiB (`--cache_cases`), at least one patch, "
        f"{mem['cache_per_case'] / 2**20:.2f} MiB here (float32 image + uint8 label); "
        f"and the locator's downscaled volumes ({'x'.join(map(str, mem['low_shape']))}), "
        f"{mem['locator_per_case'] / 2**20:.2f} MiB per case here, {5 * 48 * 160 * 160 / 2**20:.1f} MiB per LASC case "
        "(48x160x160).",
    ]
    # Flat: what remains per case is within the locator's downscaled volumes plus a quarter of
    # one cached region (RSS varies by a few MiB from run to run).
    key = "no_cache"
    limit = mem["locator_per_case"] + 0.25 * mem["cache_per_case"]
    flat = slope[key] <= limit
    lines.append("With the cache off, memory is "
                 + ("flat: " if flat else "NOT flat: ")
                 + f"{slope[key] / 2**20:+.2f} MiB per case against {limit / 2**20:.2f} MiB allowed (the locator's "
                 "volumes plus a quarter of one patch)"
                 + f"; as train.py is, the growth is {slope['as_is'] / mem['cache_per_case']:.2f} patches' "
                 "worth per case.")
    lines.append("")
    return lines


def main(argv=None):
    args = parse_args(argv)
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    args.device = device.type
    args.batch_size = args.batch_size or (REFERENCE_BATCH if cuda else 1)
    args.patch_size = tuple(args.patch_size or (REFERENCE_PATCH if cuda else (32, 64, 64)))
    args.steps = args.steps or (20 if cuda else 5)
    args.warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    args.threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=FutureWarning)  # MONAI's deprecation notices
    if args.amp == "auto":
        args.amp = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else "off"
    amp_dtype = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    if cuda:
        torch.backends.cudnn.benchmark = True
    if args.probe:
        probe_main(args, device, amp_dtype)
        return
    import monai
    amp_name = "no autocast" if amp_dtype is None else \
        f"{args.amp} autocast" + (" with a gradient scaler" if amp_dtype == torch.float16 else "")

    build = builders(args.base_channels)
    flops = {m: conv_flops(build[m], args.patch_size) for m in MODELS}
    flops_ref = {m: conv_flops(build[m], REFERENCE_PATCH) for m in MODELS}
    for m in MODELS:
        check = torch_counted_training_flops(build[m], args.patch_size)
        if check is not None:
            print(f"{m}: 3 x forward {3 * flops[m] / 1e9:.2f} GFLOP per sample; torch.utils.flop_counter's "
                  f"forward + backward {check / 1e9:.2f} GFLOP ({check / (3 * flops[m]):.4f}x)")

    load_before = os.getloadavg()[0]
    arms = time_arms(args, device, amp_dtype)
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        workdir = Path(tmp)
        probes = {"baseline": probe_memory(args, "baseline", workdir)}
        for arm in arms:
            probes[arm["name"]] = probe_memory(args, arm["name"], workdir)
        load_mid = os.getloadavg()[0]
        mem = None if args.no_cases else memory_against_cases(args, workdir)
    load_after = os.getloadavg()[0]

    host = f"{cpu_name()}, {os.cpu_count()} cores ({args.threads} torch threads)"
    machine = f"{torch.cuda.get_device_name(device)}; host {host}" if cuda else host
    command = ".venv-bench/bin/python benchmarks/bench_train.py " + " ".join(argv if argv is not None else sys.argv[1:])
    loaded = max(load_before, load_mid, load_after) > 0.5 * (os.cpu_count() or 1) + 0.5
    lines = [
        HEADING, "",
        f"`{command.strip()}` on {datetime.date.today().isoformat()}: {machine}; torch {torch.__version__}, "
        f"MONAI {monai.__version__}, Python {platform.python_version()}; device {device.type}; load average "
        f"{load_before:.1f} before, {load_mid:.1f} after the step timings, {load_after:.1f} at the end"
        + (" (the machine was running other jobs: absolute times are inflated, the interleaved ratios less so)."
           if loaded else "."),
        "",
    ]
    lines += step_lines(args, arms, flops, probes, device, amp_name)
    lines += gpu_lines(args, arms, flops, flops_ref, device, amp_name)
    if mem is not None:
        lines += cases_lines(args, mem)
    publish(lines, HEADING, args.output, write=not args.no_write)


if __name__ == "__main__":
    run_cli(main)
