"""A second ACDC-layout cine generator, written apart from `synthetic_cine.py`, to check that the
2D pipeline generalises beyond the phantoms it was tuned on: an elliptic LV cavity in a ring of
myocardium of constant area, a round RV beside it, blobs of other tissue inside an elliptic body,
a smooth receive bias and Rician noise; stacks of 8-11 slices of 7-10 mm, 150-229 pixels a side of
1.25-1.8 mm, 10-20 frames, ES between a third and a half of the cycle, any in-plane orientation.

    .venv/bin/python benchmarks/ring_cine.py --out_dir RINGS --num_subjects 30 --seed 1
    .venv/bin/python benchmarks/ring_cine.py --out_dir RINGS_TEST --num_subjects 10 --seed 7

docs/cardiac.md gives the commands that train on one such set and score the other.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import dataset as ds  # noqa: E402
from utils import ArgParser, run_cli  # noqa: E402


def write_subject(root: Path, number: int, rng: np.random.Generator) -> None:
    d = root / f"patient{number:03d}"
    d.mkdir(parents=True, exist_ok=True)
    frames, depth = int(rng.integers(10, 21)), int(rng.integers(8, 12))
    height, width = int(rng.integers(150, 230)), int(rng.integers(150, 230))
    pixel, thickness = rng.uniform(1.25, 1.8), rng.uniform(7, 10)
    props = {"spacing": (thickness, pixel, pixel), "origin": tuple(rng.uniform(-100, 100, 3)),
             "direction": (1, 0, 0, 0, 1, 0, 0, 0, 1)}
    yy, xx = np.mgrid[:height, :width] * pixel  # mm
    cy, cx = height * pixel / 2 + rng.uniform(-20, 20), width * pixel / 2 + rng.uniform(-20, 20)
    angle = rng.uniform(0, np.pi)
    u = (xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)
    v = -(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)
    es = int(rng.integers(frames // 3, frames // 2 + 2))
    r_ed, ef = rng.uniform(22, 32), rng.uniform(0.25, 0.7)
    r_es = r_ed * np.sqrt(1 - ef)
    wall, stretch = rng.uniform(7, 11), rng.uniform(0.85, 1.0)
    coarse = ndimage.gaussian_filter(rng.normal(0, 1, (height // 8 + 1, width // 8 + 1)), 2)
    bias = ndimage.zoom(1 + 0.3 * coarse, (height / coarse.shape[0], width / coarse.shape[1]), order=1)
    bias = bias[:height, :width]
    organs = sum(rng.uniform(0.3, 0.8) * (np.hypot(xx - rng.uniform(0, width * pixel),
                                                   yy - rng.uniform(0, height * pixel)) < rng.uniform(15, 40))
                 for _ in range(6))
    body = (((xx - width * pixel / 2) / (width * pixel * 0.45)) ** 2
            + ((yy - height * pixel / 2) / (height * pixel * 0.42)) ** 2) < 1
    myo_area = np.pi * ((r_ed + wall) ** 2 - r_ed ** 2)
    images, labels = [], []
    for t in range(frames):
        phase = min(t / es if t <= es else (frames - t) / (frames - es), 1)
        r = r_ed + (r_es - r_ed) * (0.5 - 0.5 * np.cos(np.pi * phase))
        r_out = np.sqrt(r ** 2 + myo_area / np.pi)
        label = np.zeros((depth, height, width), np.uint8)
        image = np.zeros((depth, height, width), np.float32)
        for z in range(depth):
            taper = 1 - (z / (depth - 1)) ** 2 * 0.9 if z > 0 else 0  # above the base at z = 0, apex last
            rr = np.hypot(u / stretch, v)
            cavity, myo = rr < r * taper, (rr < r_out * taper) & ~(rr < r * taper)
            rv = (np.hypot(u + r_out * taper * 0.9, v) < r_out * taper * 1.1) & ~(rr < r_out * taper + 2)
            rv &= taper > 0.3
            label[z][myo], label[z][cavity], label[z][rv] = 2, 3, 1
            tissue = 0.15 + 0.35 * body + organs * body
            signal = np.select([label[z] == 3, label[z] == 2, label[z] == 1], [1.0, 0.25, 0.9], tissue)
            signal = ndimage.gaussian_filter(signal, 0.8) * bias * 300
            image[z] = np.abs(signal + rng.normal(0, 15, signal.shape) + 1j * rng.normal(0, 15, signal.shape))
        images.append(image)
        labels.append(label)
    ds.write_image(np.stack(images), props, d / f"{d.name}_4d.nii.gz")
    for f in (1, es + 1):
        ds.write_image(images[f - 1], props, d / f"{d.name}_frame{f:02d}.nii.gz")
        ds.write_image(labels[f - 1], props, d / f"{d.name}_frame{f:02d}_gt.nii.gz")
    (d / "Info.cfg").write_text(f"ED: 1\nES: {es + 1}\nGroup: NOR\nHeight: 170\nNbFrame: {frames}\nWeight: 70\n")


def main(argv=None):
    p = ArgParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out_dir", required=True)
    p.add_argument("--num_subjects", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--first_id", type=int, default=101)
    args = p.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    for i in range(args.num_subjects):
        write_subject(Path(args.out_dir), args.first_id + i, rng)
    print(f"wrote {args.num_subjects} subject(s) to {args.out_dir}")


if __name__ == "__main__":
    run_cli(main)
