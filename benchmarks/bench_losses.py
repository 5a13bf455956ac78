"""Cost of the boundary term: time per segmenter training step (forward, backward, Adam step of
the V-Net) with the Dice loss against the Hybrid loss (Dice + boundary) on the same crop,
the distance map precomputed as the data pipeline does; plus the data-loader cost of that
map per crop. Writes its section of BENCHMARKS.md.

    python benchmarks/bench_losses.py                                   # CPU-sized defaults
    python benchmarks/bench_losses.py --device cuda --crop 96 144 224 --batch_size 3 --steps 20

Steps of the two losses alternate, each on its own copy of one initialised model, so a
machine whose load changes during the run slows both alike; the medians are compared.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from common import cpu_name, replace_section, sync  # noqa: E402  (benchmarks/ is sys.path[0])
from inference import memory_format, resolve_device  # noqa: E402
from losses import LOSSES, signed_distance_map  # noqa: E402
from models import VNet, count_parameters, describe, model_arch  # noqa: E402

HEADING = "## Losses (benchmarks/bench_losses.py)"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where to train")
    p.add_argument("--crop", type=int, nargs=3, metavar=("D", "H", "W"), default=(32, 64, 96),
                   help="segmenter crop (multiples of 16; 96 144 224 on LASC)")
    p.add_argument("--batch_size", type=int, default=1, help="crops per step (3 in the reference)")
    p.add_argument("--base_channels", type=int, default=8, help="V-Net input-stage width (8: reference)")
    p.add_argument("--steps", type=int, default=16, help="timed steps per loss")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per loss first")
    p.add_argument("--weight", type=float, default=0.5, help="the hybrid's Dice weight")
    p.add_argument("--map_crop", type=int, nargs=3, metavar=("D", "H", "W"), default=(96, 144, 224),
                   help="also time the distance map at this crop (the LASC segmenter's)")
    p.add_argument("--spacing", type=float, nargs=3, default=(0.625, 0.625, 0.625), help="voxel spacing (mm)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: one per core, as train.py; 1 on a machine other jobs keep busy)")
    p.add_argument("--output", default=str(ROOT / "BENCHMARKS.md"), help="file whose section to replace")
    p.add_argument("--no_write", action="store_true", help="print only")
    args = p.parse_args(argv)
    if any(c <= 0 or c % 16 for c in args.crop):
        p.error(f"--crop {' '.join(map(str, args.crop))}: each size must be a positive multiple of 16")
    if args.steps < 1 or args.batch_size < 1 or args.base_channels < 1:
        p.error("--steps, --batch_size and --base_channels must be >= 1")
    return args


def phantom_batch(crop, batch_size, rng):
    """An ellipsoidal 'atrium' at about a sixth of the crop, its image, as float32 arrays."""
    grid = np.indices(crop).astype(np.float32)
    centre = np.array(crop, np.float32)[:, None, None, None] / 2 + rng.uniform(-2, 2, (3, 1, 1, 1))
    radii = np.array(crop, np.float32)[:, None, None, None] * 0.34
    label = (((grid - centre) / radii) ** 2).sum(0) < 1
    image = label * 1.0 + rng.normal(0, 0.5, crop)
    labels = np.repeat(label[None, None], batch_size, 0).astype(np.float32)   # (B, 1, D, H, W)
    images = np.repeat(image[None, None], batch_size, 0).astype(np.float32)
    return images, labels











def main(argv=None):
    args = parse_args(argv)
    device = resolve_device(args.device)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    fmt = memory_format(device)
    rng = np.random.default_rng(0)
    images, labels = phantom_batch(tuple(args.crop), args.batch_size, rng)

    # The data-loader side: one distance map per crop, on the CPU.
    def map_seconds(label):
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            signed_distance_map(label, args.spacing)
            best = min(best, time.perf_counter() - t0)
        return best

    dists = np.repeat(signed_distance_map(labels[0, 0], args.spacing)[None, None], args.batch_size, 0)
    map_s = map_seconds(labels[0, 0])
    big_map_s = map_seconds(phantom_batch(tuple(args.map_crop), 1, rng)[1][0, 0])

    image = torch.from_numpy(images).to(device, memory_format=fmt)
    label = torch.from_numpy(labels).to(device)
    distance_map = torch.from_numpy(dists).to(device)

    torch.manual_seed(0)
    base = VNet(base_channels=args.base_channels)
    runs = {}
    for name in ("Dice", "Hybrid"):
        model = copy.deepcopy(base).to(device, memory_format=fmt)
        runs[name] = {"model": model, "opt": torch.optim.Adam(model.parameters(), lr=1e-4), "times": []}

    def train_step(name):
        run = runs[name]
        sync(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = run["model"](image)
        loss = LOSSES[name](logits.float(), label, distance_map, args.weight)
        run["opt"].zero_grad(set_to_none=True)
        loss.backward()
        run["opt"].step()
        sync(device)
        assert torch.isfinite(loss), f"{name} loss {loss.item()}"
        return time.perf_counter() - t0

    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    for i in range(args.warmup + args.steps):
        for name in (("Dice", "Hybrid") if i % 2 == 0 else ("Hybrid", "Dice")):
            seconds = train_step(name)
            if i >= args.warmup:
                runs[name]["times"].append(seconds)
    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")

    # The losses alone, forward and backward from fixed logits: small enough to repeat until
    # the best time is a stable floor, even on a busy machine.
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        fixed = base.to(device, memory_format=fmt)(image).float()
    loss_ms = {}
    for name in ("Dice", "Hybrid"):
        best = float("inf")
        for _ in range(30):
            logits = fixed.detach().requires_grad_()
            sync(device)
            t0 = time.perf_counter()
            LOSSES[name](logits, label, distance_map, args.weight).backward()
            sync(device)
            best = min(best, time.perf_counter() - t0)
        loss_ms[name] = 1000 * best

    dice_s = statistics.median(runs["Dice"]["times"])
    hybrid_s = statistics.median(runs["Hybrid"]["times"])
    ratio = hybrid_s / dice_s
    if device.type == "cuda":
        machine = f"{torch.cuda.get_device_name(device)}; host CPU {cpu_name()}, {os.cpu_count()} cores"
    else:
        machine = f"{cpu_name()}, {os.cpu_count()} cores, torch threads: {torch.get_num_threads()}"
    arch = model_arch(base)
    crop = "x".join(map(str, args.crop))
    command = "python benchmarks/bench_losses.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        HEADING,
        "",
        f"`{command.strip()}` on {datetime.date.today().isoformat()}: {machine}; torch {torch.__version__}, "
        f"{device.type}; load average {load_before:.1f} before, {load_after:.1f} after.",
        "",
        f"{describe(arch)}, {count_parameters(base):,} parameters; batch {args.batch_size} x 1 x {crop} voxels; "
        f"forward, backward and Adam step; median of {args.steps} steps per loss after {args.warmup} untimed ones, "
        "the two losses alternating.",
        "",
        "| loss | seconds per step (median) | fastest step | median vs Dice |",
        "| --- | --- | --- | --- |",
        f"| Dice | {dice_s:.4f} | {min(runs['Dice']['times']):.4f} | 1.000 |",
        f"| Hybrid (w = {args.weight}, distance map precomputed) | {hybrid_s:.4f} | "
        f"{min(runs['Hybrid']['times']):.4f} | {ratio:.3f} |",
        "",
        f"Boundary term: {100 * (ratio - 1):+.1f} % per step (target: under +10 %). The losses alone, forward and "
        f"backward from fixed logits (best of 30): Dice {loss_ms['Dice']:.2f} ms, Hybrid {loss_ms['Hybrid']:.2f} ms, "
        f"so the boundary term itself costs {loss_ms['Hybrid'] - loss_ms['Dice']:.2f} ms, "
        f"{100 * (loss_ms['Hybrid'] - loss_ms['Dice']) / (1000 * dice_s):.2f} % of a median Dice step. "
        "The signed distance map it "
        f"needs is made in the data loader, outside the training step: {1000 * map_s:.1f} ms per {crop} crop, "
        f"{1000 * big_map_s:.0f} ms per {'x'.join(map(str, args.map_crop))} crop (one CPU core, best of 3).",
        "",
    ]
    section = "\n".join(lines)
    print(section)
    if not args.no_write:
        replace_section(Path(args.output), section, HEADING)
        print(f"wrote the section to {args.output}")


if __name__ == "__main__":
    main()
