"""A second spine generator, written apart from `synthetic_spine.py`, to check that vertebra
instance segmentation generalises beyond the phantoms it was tuned on: 4-7 vertebrae stacked
along the first array axis, each a superellipsoid body (trabecular 250-400 HU in a 600-900 HU
shell of 1-2 mm) with a posterior arch of capsules (a pedicle pair, a lamina, a spinous process),
9-14 mm high, with 3-6 mm discs of ~80 HU between them, on a centre line that drifts as a sine in
both in-plane axes; an elliptic soft-tissue body with a fat layer in air, an aorta with
calcifications in front of the column and, in about half the cases, ribs leaving it sideways
(never within 2 voxels of a vertebra). About half the cases cut the first or the last vertebra
at the field of view. MSD layout with instance labels 1..N along the first axis, dataset.json and
instances.csv (case_id, instance, voxels, complete).

    .venv/bin/python benchmarks/block_spine.py --out_dir BLOCKSPINE --num_cases 20 --seed 1
    .venv/bin/python benchmarks/block_spine.py --out_dir BLOCKSPINE_TEST --num_cases 10 --seed 7

Case k depends only on (seed, k). A folder that already holds cases is refused unless
--overwrite, which replaces them and removes blockspine_* cases this call did not write.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import dataset as ds  # noqa: E402
from utils import ArgParser, UserError, run_cli, write_csv, write_json  # noqa: E402

SLIVER = 150  # a cut vertebra with fewer visible voxels is background
CUBE = np.ones((3, 3, 3), bool)


def geometry(rng: np.random.Generator) -> tuple[tuple[int, int, int], dict]:
    """Shape (D, H, W) about 96x80x80 mm at 1 mm (1 case in 10 at 1.5 mm along D with fewer
    slices), an origin within 200 mm of zero and, in 4 cases in 10, a direction with one axis
    flipped or rotated 5-20 degrees about the first array axis (ITK's third index axis)."""
    d, h, w = (int(n) for n in rng.integers([88, 72, 72], [105, 89, 89]))
    spacing = (1.0, 1.0, 1.0)
    if rng.random() < 0.1:
        spacing = (1.5, 1.0, 1.0)
        d = int(round(d / 1.5))
    direction = np.eye(3)
    kind = rng.random()
    if kind < 0.2:
        direction[(a := int(rng.integers(3))), a] = -1.0
    elif kind < 0.4:
        t = np.deg2rad(rng.uniform(5, 20)) * rng.choice([-1, 1])
        direction[:2, :2] = [[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]
    props = {"spacing": spacing, "origin": tuple(float(o) for o in rng.uniform(-200, 200, 3)),
             "direction": tuple(float(v) for v in direction.ravel())}
    return (d, h, w), props


def capsule(p, a, b) -> np.ndarray:
    """Distance of the points `p` (a tuple of broadcastable coordinate arrays) to segment a-b."""
    ab = [bi - ai for ai, bi in zip(a, b)]
    t = sum((pi - ai) * e for pi, ai, e in zip(p, a, ab)) / max(sum(e * e for e in ab), 1e-9)
    t = np.clip(t, 0, 1)
    return np.sqrt(sum((pi - ai - t * e) ** 2 for pi, ai, e in zip(p, a, ab)))


def make_case(rng: np.random.Generator):
    """(image float32 HU, label uint8 instances, props, rows [(instance, voxels, complete)])."""
    shape, props = geometry(rng)
    d, h, w = shape
    sz, sy, sx = props["spacing"]
    zlen, hmm, wmm = (d - 1) * sz, h * sy, w * sx
    z = (np.arange(d) * sz)[:, None, None]
    y = (np.arange(h) * sy)[None, :, None]
    x = (np.arange(w) * sx)[None, None, :]

    # the column's centre line, one (cy, cx) per slice
    amp = rng.uniform(0, 6, 2)
    period, phase = rng.uniform(80, 220, 2), rng.uniform(0, 2 * np.pi, 2)
    y0, x0 = hmm * rng.uniform(0.40, 0.45), wmm / 2 + rng.uniform(-4, 4)
    zs = np.arange(d) * sz
    cy = y0 + amp[0] * np.sin(2 * np.pi * zs / period[0] + phase[0])
    cx = x0 + amp[1] * np.sin(2 * np.pi * zs / period[1] + phase[1])
    cy3, cx3 = cy[:, None, None], cx[:, None, None]

    # the vertebrae along z: heights, discs, then where the column starts
    heights, discs = rng.uniform(9, 14, 7), rng.uniform(3, 6, 7)
    cut = rng.choice(["none", "first", "last"], p=[0.5, 0.25, 0.25])
    frac = rng.uniform(0.2, 0.95)  # the part of the cut vertebra outside the volume
    margin = 2.0
    room = {"none": lambda m: zlen - 2 * margin, "first": lambda m: zlen - margin + frac * heights[0],
            "last": lambda m: zlen - margin + frac * heights[m - 1]}[cut]
    fits = max(m for m in range(1, 8) if heights[:m].sum() + discs[:m - 1].sum() <= room(m))
    if fits < 4:
        raise RuntimeError(f"only {fits} vertebrae fit a field of view of {zlen:.0f} mm")
    n = int(rng.integers(4, min(fits, 7) + 1))
    heights, discs = heights[:n], discs[:n - 1]
    length = heights.sum() + discs.sum()
    if cut == "none":
        start = rng.uniform(margin, zlen - margin - length)
    elif cut == "first":
        start = -frac * heights[0]
    else:
        start = zlen + frac * heights[-1] - length
    tops = start + np.concatenate([[0], np.cumsum(heights[:-1] + discs)])

    # the body: soft tissue in an ellipse with a fat layer, in air
    image = np.full(shape, -1000.0, np.float32)
    by, bx = hmm / 2 + rng.uniform(-3, 3), wmm / 2 + rng.uniform(-3, 3)
    ry, rx = hmm * rng.uniform(0.44, 0.52), wmm * rng.uniform(0.44, 0.52)
    fat = rng.uniform(3, 7)
    outer = ((y - by) / ry) ** 2 + ((x - bx) / rx) ** 2
    inner = ((y - by) / (ry - fat)) ** 2 + ((x - bx) / (rx - fat)) ** 2
    texture = ndimage.gaussian_filter(rng.normal(0, 1, shape).astype(np.float32), 2.5) * 40
    image[np.broadcast_to(outer < 1, shape)] = rng.uniform(-120, -80)
    soft = np.broadcast_to(inner < 1, shape)
    image[soft] = rng.uniform(30, 50) + texture[soft]

    # the aorta: a tube in front of the column, left of it, with calcified plaques on its wall
    ra = rng.uniform(4, 7)
    ay_max = 11.0
    aorta_y = cy3 - ay_max - rng.uniform(2, 4) - ra
    aorta_x = cx3 - rng.uniform(2, 8) + 2 * np.sin(2 * np.pi * z / rng.uniform(100, 200) + rng.uniform(0, 6.3))
    r_aorta = np.hypot(y - aorta_y, x - aorta_x)
    image[r_aorta < ra] = rng.uniform(150, 280)
    for _ in range(int(rng.integers(2, 7))):
        i = int(rng.integers(d))
        t = rng.uniform(0, 2 * np.pi)
        py, px = aorta_y[i, 0, 0] + ra * np.cos(t), aorta_x[i, 0, 0] + ra * np.sin(t)
        plaque = ((z - i * sz) / rng.uniform(2, 5)) ** 2 + ((y - py) ** 2 + (x - px) ** 2) / rng.uniform(1, 2.5) ** 2
        image[plaque < 1] = rng.uniform(300, 500)

    # the vertebrae: discs between bodies first, then bodies and arches on top
    label = np.zeros(shape, np.uint8)
    bone = np.zeros(shape, bool)
    trabecular = ndimage.gaussian_filter(rng.normal(0, 1, shape).astype(np.float32), 1.0) * 60
    axes = [(rng.uniform(11, 16), rng.uniform(8, ay_max)) for _ in range(n)]
    powers = [(rng.uniform(2.5, 4), rng.uniform(4, 8)) for _ in range(n)]
    for k in range(n - 1):
        z0, z1 = tops[k] + heights[k] - 0.5, tops[k + 1] + 0.5
        sl = slice(max(int(np.floor(z0 / sz)), 0), min(int(np.ceil(z1 / sz)) + 1, d))
        if sl.start >= sl.stop:
            continue
        ax_, ay_ = (axes[k][0] + axes[k + 1][0]) / 2 * 0.95, (axes[k][1] + axes[k + 1][1]) / 2 * 0.95
        p = (powers[k][0] + powers[k + 1][0]) / 2
        zz = z[sl]
        disc = ((np.abs(x - cx3[sl]) / ax_) ** p + (np.abs(y - cy3[sl]) / ay_) ** p < 1) & (zz >= z0) & (zz <= z1)
        image[sl][disc] = rng.uniform(70, 90) + texture[sl][disc] * 0.3
    present = []  # (k, complete)
    for k in range(n):
        top, hk = tops[k], heights[k]
        sl = slice(max(int(np.floor((top - 1) / sz)), 0), min(int(np.ceil((top + hk + 1) / sz)) + 1, d))
        if sl.start >= sl.stop:
            continue
        u = z[sl] - (top + hk / 2)
        dy, dx = y - cy3[sl], x - cx3[sl]
        ax_, ay_ = axes[k]
        p, q = powers[k]
        shell_t = rng.uniform(1, 2)
        body = (np.abs(dx) / ax_) ** p + (np.abs(dy) / ay_) ** p + (np.abs(u) / (hk / 2)) ** q < 1
        core = ((np.abs(dx) / (ax_ - shell_t)) ** p + (np.abs(dy) / (ay_ - shell_t)) ** p
                + (np.abs(u) / (hk / 2 - shell_t)) ** q < 1)
        # the arch: pedicles from inside the body back to the lamina, the spinous process behind it;
        # a child capsule is never thicker than its parent, so every slice of the arch is connected
        rp = rng.uniform(2.0, 3.0)
        rl = rp * rng.uniform(0.75, 1.0)
        rs = rl * rng.uniform(0.75, 1.0)
        c = 0.35 * hk / rp  # stretch along z: the arch spans |u| <= 0.35 h
        ped = rng.uniform(5, 9)
        room_y = hmm - 2.5 - (y0 + amp[0] + ay_ + ped + rs)
        spin = min(rng.uniform(6, 12), room_y)
        if spin < 2:
            raise RuntimeError(f"no room for a spinous process ({spin:.1f} mm)")
        pts = (u / c, dy, dx)
        lam_y, spread = ay_ + ped, rng.uniform(0.4, 0.5) * ax_
        arch = np.zeros(body.shape, bool)
        for side in (-1, 1):
            arch |= capsule(pts, (0, 0.6 * ay_, side * 0.55 * ax_), (0, lam_y, side * spread)) < rp
        arch |= capsule(pts, (0, lam_y, -spread), (0, lam_y, spread)) < rl
        tilt = rng.uniform(-0.2, 0.2) * spin
        arch |= capsule(pts, (0, lam_y, 0), (0, lam_y + spin, tilt)) < rs
        # where the arch thins out along z, its voxels can break off as specks: keep the piece
        # that holds the body (or the largest, where only the arch is in the volume)
        pieces, count = ndimage.label(body | arch, structure=CUBE)
        if count > 1:
            sizes = np.bincount(pieces.ravel())[1:]
            main_piece = np.bincount(pieces[body]).argmax() if body.any() else sizes.argmax() + 1
            arch &= pieces == main_piece
            body &= pieces == main_piece
        image[sl][body] = rng.uniform(600, 900)
        image[sl][core] = rng.uniform(250, 400) + trabecular[sl][core]
        image[sl][arch & ~body] = rng.uniform(450, 700) + trabecular[sl][arch & ~body] * 0.5
        mask = body | arch
        bone[sl] |= mask
        if mask.sum() < SLIVER:
            continue
        overlap = label[sl][mask]
        if overlap.any():
            raise RuntimeError(f"vertebra {k} overlaps vertebra {overlap.max()}")
        label[sl][mask] = len(present) + 1
        present.append((k, bool(top >= 0 and top + hk <= zlen)))
    if not present:
        raise RuntimeError("no vertebra inside the volume")

    # ribs: arcs leaving the column sideways and sloping along z, kept 2 voxels off every vertebra
    if rng.random() < 0.5:
        line = np.zeros(shape, bool)
        radius = np.zeros(shape, np.float32)
        for k, _ in present:
            if rng.random() < 0.2:
                continue
            zc = tops[k] + heights[k] / 2
            i = int(np.clip(round(zc / sz), 0, d - 1))
            ax_, ay_ = axes[k]
            for side in (-1, 1):
                rr = rng.uniform(2, 3.5)
                r0 = max(ax_, ay_) + rng.uniform(5, 8) + rr
                t = np.linspace(np.deg2rad(rng.uniform(55, 70)), np.deg2rad(rng.uniform(140, 170)), 200)
                rad = r0 + rng.uniform(8, 16) * (t - t[0])
                arc = rad * (t - t[0])
                pz = zc + rng.uniform(0.15, 0.35) * arc
                py = cy[i] + ay_ * 0.3 + rad * np.cos(t)
                px = cx[i] + side * rad * np.sin(t)
                idx = np.rint(np.stack([pz / sz, py / sy, px / sx])).astype(int)
                inside = np.all((idx >= 0) & (idx < np.array(shape)[:, None]), axis=0)
                line[tuple(idx[:, inside])] = True
                radius[tuple(idx[:, inside])] = rr
        if line.any():
            dist, near = ndimage.distance_transform_edt(~line, sampling=props["spacing"], return_indices=True)
            rib = dist < radius[tuple(near)]
            rib &= ~ndimage.binary_dilation(label > 0, CUBE, iterations=2)
            rib &= ~bone
            image[rib] = rng.uniform(400, 700) + trabecular[rib] * 0.5

    image = ndimage.gaussian_filter(image, rng.uniform(0.5, 0.8))
    image += rng.normal(0, rng.uniform(20, 40), shape).astype(np.float32)
    rows = [(v, int((label == v).sum()), int(complete)) for v, (_, complete) in enumerate(present, 1)]
    check(label, image, rows)
    return image, label, props, rows


def check(label: np.ndarray, image: np.ndarray, rows) -> None:
    """Instances 1..N without a gap, each one 26-connected piece, none touching the in-plane
    border, rows matching the label."""
    values = [int(v) for v in np.unique(label) if v]
    if values != list(range(1, len(rows) + 1)):
        raise RuntimeError(f"instance values {values} are not 1..{len(rows)}")
    for v, box in enumerate(ndimage.find_objects(label), 1):
        _, pieces = ndimage.label(label[box] == v, structure=CUBE)
        if pieces != 1:
            raise RuntimeError(f"instance {v} is {pieces} pieces")
    if label[:, [0, -1], :].any() or label[:, :, [0, -1]].any():
        raise RuntimeError("a vertebra touches the in-plane border")
    counts = np.bincount(label.ravel(), minlength=len(rows) + 1)
    if any(counts[v] != voxels or voxels < SLIVER for v, voxels, _ in rows):
        raise RuntimeError("instance voxel counts do not match the label")
    if not np.isfinite(image).all():
        raise RuntimeError("image has non-finite values")


def main(argv=None):
    p = ArgParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out_dir", required=True)
    p.add_argument("--num_cases", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace the cases already in --out_dir")
    args = p.parse_args(argv)
    out = Path(args.out_dir)
    if args.num_cases < 1:
        raise UserError(f"--num_cases {args.num_cases}: must be at least 1")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out_dir {out}: is a file; pass a folder")
    existing = sorted(out.glob("imagesTr/*.nii.gz")) + sorted(out.glob("labelsTr/*.nii.gz"))
    if existing and not args.overwrite:
        raise UserError(f"--out_dir {out}: already holds {len(existing)} image/label files; "
                        "pass --overwrite to replace them or choose another folder")
    ids = [f"blockspine_{k:03d}" for k in range(args.num_cases)]
    foreign = [f for f in existing if not f.name.startswith("blockspine_")]
    if foreign:
        raise UserError(f"--out_dir {out}: holds cases this script did not write ({foreign[0].name}, ...); "
                        "choose another folder")
    rows = []
    for k, case_id in enumerate(ids):
        image, label, props, info = make_case(np.random.default_rng([args.seed, k]))
        hu = np.rint(np.clip(image, -1024, 3071)).astype(np.int16)
        ds.write_image(hu, props, out / "imagesTr" / f"{case_id}.nii.gz")
        ds.write_image(label, props, out / "labelsTr" / f"{case_id}.nii.gz")
        rows += [{"case_id": case_id, "instance": v, "voxels": voxels, "complete": complete}
                 for v, voxels, complete in info]
    keep = {f"{c}.nii.gz" for c in ids}
    for f in existing:
        if f.name not in keep:
            f.unlink()  # a blockspine case of an earlier, larger run
    write_json(out / "dataset.json", {
        "name": "BlockSpine", "description": "CT-like spine phantoms, vertebra instances (benchmarks/block_spine.py)",
        "tensorImageSize": "3D", "modality": {"0": "CT"}, "labels": {"0": "background", "1": "vertebra"},
        "numTraining": len(ids), "numTest": 0,
        "training": [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in ids],
        "test": []})
    write_csv(out / "instances.csv", rows)
    print(f"wrote {len(ids)} case(s), {len(rows)} vertebrae, to {out}")


if __name__ == "__main__":
    run_cli(main)
