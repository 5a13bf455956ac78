"""Speed and agreement of metrics.compute_metrics against MONAI on full-size LASC volumes:
all eight metrics of ours against MONAI's HD95, HD and ASSD, each measured in the same run on
the same 88x640x640 masks. Writes its section of BENCHMARKS.md.

    python3 -m venv .venv-bench && .venv-bench/bin/pip install -r requirements.txt -r requirements-bench.txt
    .venv-bench/bin/python benchmarks/bench_metrics.py              # prints, and updates BENCHMARKS.md
    .venv-bench/bin/python benchmarks/bench_metrics.py --no_write --repeats 1

MONAI is a benchmark-only dependency (requirements-bench.txt), kept out of the test environment.
The masks are atrium-like blobs: an ellipsoid of radii 26 x 60 x 72 voxels (about 110 mL at
0.625 mm) whose radius is perturbed by smooth noise, against a prediction that is another such blob, shifted and
rescaled a little; one pair adds a stray false-positive island, as a real prediction can have.
Ours and MONAI's calls alternate, so a machine whose load changes slows both alike; the medians
are compared. MONAI gets the masks as bool tensors of shape (1, 1, D, H, W), ours as the uint8
arrays that reading an nrrd gives; neither conversion is timed.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import scipy
import torch
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from common import cpu_name, publish  # noqa: E402  (benchmarks/ is sys.path[0])
from metrics import compute_metrics  # noqa: E402

HEADING = "## Metrics (benchmarks/bench_metrics.py)"
TARGET_RATIO = 3.0  # ours (all metrics) must take under a third of MONAI's HD95 time

# name, prediction's centre shift (voxels), radius scale, roughness, stray island
PAIRS = (
    ("close", (1, 2, -2), 1.03, 0.12, False),
    ("looser", (3, 6, -5), 0.92, 0.20, False),
    ("close + stray island", (1, -2, 2), 0.97, 0.12, True),
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--shape", type=int, nargs=3, metavar=("D", "H", "W"), default=(88, 640, 640),
                   help="volume size (LASC: 88 640 640 or 88 576 576)")
    p.add_argument("--spacing", type=float, nargs=3, metavar=("SZ", "SY", "SX"), default=(0.625, 0.625, 0.625),
                   help="voxel spacing in mm, array order")
    p.add_argument("--repeats", type=int, default=5, help="timed calls of each method per pair")
    p.add_argument("--seed", type=int, default=0, help="seed of the masks' noise")
    p.add_argument("--output", default=str(ROOT / "BENCHMARKS.md"), help="file whose section to replace")
    p.add_argument("--no_write", action="store_true", help="print only")
    args = p.parse_args(argv)
    if min(args.shape) < 32 or args.repeats < 1 or min(args.spacing) <= 0:
        p.error("--shape needs at least 32 voxels per axis, --repeats at least 1, --spacing positive sizes")
    return args


def blob(shape, centre, radii, roughness: float, rng: np.random.Generator) -> np.ndarray:
    """uint8 ellipsoid whose squared radius is perturbed by smooth noise (features about 12
    voxels wide), drawn only in a box around it so that a full-size volume is quick to make."""
    lo = [max(0, int(c - 1.5 * r)) for c, r in zip(centre, radii)]
    hi = [min(n, int(c + 1.5 * r) + 1) for n, c, r in zip(shape, centre, radii)]
    size = [b - a for a, b in zip(lo, hi)]
    grid = np.ogrid[tuple(slice(a, b) for a, b in zip(lo, hi))]
    r2 = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii))
    coarse = rng.standard_normal([max(2, n // 12) for n in size])
    noise = ndimage.zoom(coarse, [n / m for n, m in zip(size, coarse.shape)], order=3)
    noise = noise[tuple(slice(0, n) for n in size)]  # zoom may round one voxel up
    mask = np.zeros(shape, np.uint8)
    mask[tuple(slice(a, b) for a, b in zip(lo, hi))] = r2 < 1 + roughness * noise
    return mask


def make_pair(shape, shift, scale, roughness, island, rng) -> tuple[np.ndarray, np.ndarray]:
    centre = np.array(shape) / 2
    radii = np.minimum((26.0, 60.0, 72.0), np.array(shape) / 4)
    target = blob(shape, centre, radii, 0.12, rng)
    pred = blob(shape, centre + shift, radii * scale, roughness, rng)
    if island:  # a false positive 30 voxels beyond the atrium's edge in W
        where = (int(centre[0]), int(centre[1]), int(min(shape[2] - 6, centre[2] + radii[2] * 1.1 + 30)))
        pred |= blob(shape, where, (3, 4, 4), 0.0, rng)
    return pred, target


def monai_metrics():
    """MONAI's three calls, imported here: MONAI is only in the benchmark environment."""
    from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance

    def hd95(p, t, s):
        return compute_hausdorff_distance(p, t, percentile=95, spacing=s).item()

    def hd(p, t, s):
        return compute_hausdorff_distance(p, t, spacing=s).item()

    def assd(p, t, s):
        return compute_average_surface_distance(p, t, symmetric=True, spacing=s).item()

    return {"hd95": hd95, "hd": hd, "assd": assd}


def timed(fn, *a, **kw):
    start = time.perf_counter()
    out = fn(*a, **kw)
    return time.perf_counter() - start, out








def main(argv=None):
    args = parse_args(argv)
    import monai
    monai_fns = monai_metrics()
    warnings.filterwarnings("ignore", category=FutureWarning)  # MONAI's own deprecation notices
    shape, spacing = tuple(args.shape), tuple(args.spacing)
    rng = np.random.default_rng(args.seed)
    load_before = os.getloadavg()[0]

    results = []
    for name, shift, scale, roughness, island in PAIRS:
        pred, target = make_pair(shape, shift, scale, roughness, island, rng)
        pred_t = torch.from_numpy(pred.astype(bool))[None, None]  # (B, C, D, H, W), B = C = 1
        target_t = torch.from_numpy(target.astype(bool))[None, None]
        times = {k: [] for k in ("ours", *monai_fns)}
        for _ in range(args.repeats):
            t, ours = timed(compute_metrics, pred, target, spacing=spacing)
            times["ours"].append(t)
            theirs = {}
            for key, fn in monai_fns.items():
                t, theirs[key] = timed(fn, pred_t, target_t, spacing)
                times[key].append(t)
        med = {k: statistics.median(v) for k, v in times.items()}
        diff = {k: abs(ours[k] - theirs[k]) for k in monai_fns}
        results.append({"name": name, "pred": int(pred.sum()), "target": int(target.sum()), "ours": ours,
                        "theirs": theirs, "med": med, "diff": diff})
        print(f"{name}: ours {med['ours']:.3f} s (all metrics), MONAI HD95 {med['hd95']:.3f} s, HD {med['hd']:.3f} s, "
              f"ASSD {med['assd']:.3f} s; ratio {med['hd95'] / med['ours']:.1f}x; |ours - MONAI| HD {diff['hd']:.1e}, "
              f"HD95 {diff['hd95']:.1e}, ASSD {diff['assd']:.1e} mm", flush=True)

    ratios = [r["med"]["hd95"] / r["med"]["ours"] for r in results]
    worst = max(max(r["diff"].values()) for r in results)
    date = datetime.date.today().isoformat()
    lines = [
        HEADING, "",
        f"`.venv-bench/bin/python benchmarks/bench_metrics.py` on {date}: {cpu_name()}, {os.cpu_count()} cores "
        f"({torch.get_num_threads()} torch threads); torch {torch.__version__}, MONAI {monai.__version__}, "
        f"numpy {np.__version__}, scipy {scipy.__version__}, Python {platform.python_version()}; "
        f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after.",
        "",
        f"Masks {'x'.join(map(str, shape))} voxels at {' x '.join(f'{s:g}' for s in spacing)} mm, atrium-like blobs "
        f"(see the script's docstring); median of {args.repeats} calls of each, ours and MONAI's alternating. "
        "Ours is one `compute_metrics` call (Dice, IoU, precision, recall, specificity, HD, HD95, ASSD); each "
        "MONAI column is one call for that metric alone (`compute_hausdorff_distance(percentile=95)`, "
        "`compute_hausdorff_distance()`, `compute_average_surface_distance(symmetric=True)`).",
        "",
        "| pair | voxels pred / target | ours, all metrics (s) | MONAI HD95 (s) | MONAI HD (s) | MONAI ASSD (s) "
        "| MONAI HD95 / ours | HD, HD95, ASSD (mm) | abs. difference to MONAI (mm) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r, ratio in zip(results, ratios):
        m, o, d = r["med"], r["ours"], r["diff"]
        lines.append(f"| {r['name']} | {r['pred']:,} / {r['target']:,} | {m['ours']:.3f} | {m['hd95']:.3f} | "
                     f"{m['hd']:.3f} | {m['assd']:.3f} | {ratio:.1f}x | {o['hd']:.3f}, {o['hd95']:.3f}, "
                     f"{o['assd']:.3f} | {d['hd']:.1e}, {d['hd95']:.1e}, {d['assd']:.1e} |")
    met = "met" if min(ratios) >= TARGET_RATIO else "NOT met"
    lines += [
        "",
        f"Target (all our metrics in under a third of MONAI's HD95 time): {met}, ours is "
        f"{min(ratios):.1f}x to {max(ratios):.1f}x faster. Largest difference from MONAI's values: {worst:.1e} mm "
        "(MONAI computes in float32, ours in float64).",
        "",
    ]
    publish(lines, HEADING, args.output, write=not args.no_write)


if __name__ == "__main__":
    main()
