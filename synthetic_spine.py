"""Synthetic CT-like spine phantoms with an instance label per vertebra, in the MSD layout, so
that vertebra instance segmentation runs with no download.

`make_spine_phantom` paints one scan in Hounsfield units: air (-1000) around a torso of soft
tissue under a fat rim; a column of 4-7 vertebrae along the volume's first axis (D), each a
vertebral body (a waisted elliptic cylinder whose cortical shell is brighter than its cancellous
core) joined to a posterior arch (a ring round the CSF-filled canal, a spinous process and two
transverse processes), with darker intervertebral discs between the bodies. The column follows a
smooth curve (a lordotic bow front to back, a mild scoliotic sway sideways, a little axial
rotation) and its vertebrae grow by 2-6 % each towards the bottom, as real ones do. Bright
clutter that is not a vertebra keeps a threshold from finding the label: a calcified aorta in
front of the column in every scan and, in some, rib stubs beside the upper vertebrae. In about
half the scans the field of view cuts off the last vertebra. The image is then blurred a little
(partial volume) and given Gaussian noise. The label is an instance map: 0 background, 1..N the
vertebrae numbered from the top of the volume (array index 0 of D), each one 26-connected
component. All sizes are in mm, drawn as fractions of the field of view in mm, so one seed gives
the same anatomy at any spacing that covers the same field of view. `write_spine_dataset` writes
cases in the MSD layout plus `instances.csv`; `python phantoms.py --kind spine` is its command
line.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage

from dataset import write_image
from synthetic import case_geometry, check_phantom_args
from utils import write_csv, write_json

MIN_SIDE = 32  # voxels per axis; below this the arches and discs of 7 vertebrae no longer resolve
COMPLETE_SHARE = 0.98  # a vertebra with less of its full volume inside the field of view is "cut"
EXTENT = 0.75  # a vertebra's half-extent along the column, in units of its size: the layout's margin
AIR = -1000.0
FULL_26 = np.ones((3, 3, 3), bool)


def _coords(centre, frame, lo_local, hi_local, shape, spacing, clip=True):
    """The voxel box around a shape given in a local frame, and the local coordinates there.

    `centre` (3,) mm in the grid's (z, y, x) about its centre; `frame` (3, 3) rows are the local
    axes (u, v, w) as unit vectors in (z, y, x); `lo_local`, `hi_local` (3,) the shape's extent in
    local mm. Returns `(lo, hi, (u, v, w))`: voxel indices `lo..hi-1` per axis (clipped to the grid
    when `clip`, else free to run past it: the extended grid a cut vertebra's full volume is
    counted on) and local coordinates broadcastable to the box, or None when the box is empty.
    Voxel i of an axis of n voxels at spacing s lies at (i - (n - 1) / 2) * s mm."""
    corners = np.array([[a, b, c] for a in (lo_local[0], hi_local[0]) for b in (lo_local[1], hi_local[1])
                        for c in (lo_local[2], hi_local[2])]) @ frame + centre  # (8, 3) mm
    n, s = np.array(shape), np.asarray(spacing, float)
    lo = np.floor(corners.min(0) / s + (n - 1) / 2).astype(int)
    hi = np.ceil(corners.max(0) / s + (n - 1) / 2).astype(int) + 1
    if clip:
        lo, hi = np.clip(lo, 0, n), np.clip(hi, 0, n)
    if np.any(hi <= lo):
        return None
    d = [((np.arange(a, b) - (m - 1) / 2) * sp - c).astype(np.float32)
         for a, b, m, sp, c in zip(lo, hi, n, s, centre)]
    d = [d[0][:, None, None], d[1][None, :, None], d[2][None, None, :]]
    local = tuple(sum(np.float32(frame[i, j]) * d[j] for j in range(3)) for i in range(3))
    return lo, hi, local


def _capsule(q, p0, p1, r: float) -> np.ndarray:
    """Mask of the points of `q` (3 broadcastable coordinate arrays) within `r` of segment p0-p1."""
    p0, e = np.asarray(p0, np.float32), np.asarray(p1, np.float32) - np.asarray(p0, np.float32)
    rel = [qi - p for qi, p in zip(q, p0)]
    t = np.clip(sum(a * b for a, b in zip(rel, e)) / max(float(e @ e), 1e-9), 0, 1)
    return sum((a - t * b) ** 2 for a, b in zip(rel, e)) <= r * r


def _paint(image, box, mask, value) -> None:
    """image[box][mask] = value, for a box (lo, hi) already clipped to the grid."""
    lo, hi = box
    image[tuple(slice(a, b) for a, b in zip(lo, hi))][mask] = value


def _frame(tangent, roll: float) -> np.ndarray:
    """Rows (u, v, w): u along the column, v towards the back (+y) and w to the side, rolled by
    `roll` radians about u (axial rotation)."""
    u = tangent / np.linalg.norm(tangent)
    v = np.array([0.0, 1.0, 0.0]) - u[1] * u
    v /= np.linalg.norm(v)
    w = np.cross(u, v)
    return np.array([u, np.cos(roll) * v + np.sin(roll) * w, -np.sin(roll) * v + np.cos(roll) * w])


def _vertebra_parts(vert: dict, shape, spacing):
    """`(lo, hi, parts)`: a vertebra rendered on its box of the extended grid (indices may run
    past the volume), parts a dict of bool masks: "shell" and "core" of the body, "arch" (ring,
    spinous and transverse processes, less the body) and "canal" (inside the ring)."""
    d = vert["dims"]
    lo_local = np.array([-d["hb"], -d["bv"], -d["wmax"]]) - 1.0
    hi_local = np.array([d["umax"], d["vmax"], d["wmax"]]) + 1.0
    lo, hi, (u, v, w) = _coords(vert["centre"], vert["frame"], lo_local, hi_local, shape, spacing, clip=False)
    # A waisted body: its sides draw in by `waist` at mid-height.
    bw = d["bw"] * (1 - d["waist"] * (1 - (u / d["hb"]) ** 2))
    body = ((v / d["bv"]) ** 2 + (w / bw) ** 2 <= 1) & (np.abs(u) <= d["hb"])
    core = ((v / (d["bv"] - d["cortex"])) ** 2 + (w / (bw - d["cortex"])) ** 2 <= 1) \
        & (np.abs(u) <= d["hb"] - d["endplate"])
    rho = np.sqrt((v - d["vc"]) ** 2 + w ** 2)
    level = np.abs(u) <= d["ha"]
    arch = level & (rho >= d["rc"]) & (rho <= d["rc"] + d["rt"])
    arch |= _capsule((u, v, w), d["spine0"], d["spine1"], d["rs"])
    for side in (-1, 1):
        p0, p1 = np.array(d["tp0"]), np.array(d["tp1"])
        p0[2] *= side
        p1[2] *= side
        arch |= _capsule((u, v, w), p0, p1, d["rtp"])
    body, core = np.broadcast_to(body, arch.shape), np.broadcast_to(core, arch.shape)
    return lo, hi, {"shell": body & ~core, "core": body & core, "arch": arch & ~body,
                    "canal": np.broadcast_to(level & (rho < d["rc"]), arch.shape) & ~body}


def _clip_box(lo, hi, shape):
    """The part of an extended-grid box inside the volume: (volume slices, box slices), or None."""
    n = np.array(shape)
    a, b = np.clip(lo, 0, n), np.clip(hi, 0, n)
    if np.any(b <= a):
        return None
    return (tuple(slice(x, y) for x, y in zip(a, b)),
            tuple(slice(x - o, y - o) for x, y, o in zip(a, b, lo)))


def _draw_column(rng: np.random.Generator, fov, num_vertebrae, thinnest: float):
    """The anatomy in mm: `(vertebrae, torso, cut)`. Every draw depends on the field of
    view `fov` (3,) mm only, so that the same seed gives the same scan at any spacing; only the
    processes' radii are at least `thinnest` mm, so that a coarse grid does not break them up."""
    n = int(rng.integers(num_vertebrae[0], num_vertebrae[1] + 1))
    cut = bool(rng.random() < 0.5)
    visible = rng.uniform(0.4, 0.65)  # of the last vertebra's extent, when cut
    growth = rng.uniform(1.02, 1.06)
    weights = growth ** np.arange(n)
    # Along D: a top margin, then the vertebrae at pitches of their sizes, then a bottom margin or
    # the cut. Lengths in units of the first vertebra's size, solved for that size in mm.
    margin_top = rng.uniform(0.03, 0.07) * fov[0]
    margin_bottom = 0.0 if cut else rng.uniform(0.03, 0.07) * fov[0]
    pitches = (weights[:-1] + weights[1:]) / 2
    tail = (2 * visible - 1) * EXTENT if cut else EXTENT
    size_z = (fov[0] - margin_top - margin_bottom) / (EXTENT + pitches.sum() + tail * weights[-1])
    z = -fov[0] / 2 + margin_top + size_z * (EXTENT + np.concatenate([[0.0], np.cumsum(pitches)]))

    # The torso (an elliptic cylinder along D) and the curve, then the in-plane size that lets the
    # column, from the aorta in front to the spinous tips behind, fit in the torso's depth.
    torso = {"centre": rng.uniform(-0.03, 0.03, 2) * fov[1:],
             "semi": np.array([rng.uniform(0.40, 0.46), rng.uniform(0.42, 0.47)]) * fov[1:],
             "fat": rng.uniform(0.06, 0.12)}
    bow = rng.uniform(0.02, 0.06) * fov[0] * rng.choice([-1, 1])   # lordosis/kyphosis, front to back
    sway = rng.uniform(0.0, 0.03) * fov[0]                          # scoliosis, sideways
    sway_freq, sway_phase = rng.uniform(0.5, 1.0), rng.uniform(0, 2 * np.pi)
    roll_amp, roll_phase = rng.uniform(0, np.deg2rad(6)), rng.uniform(0, 2 * np.pi)
    s_all = np.linspace(-1, 1, 201)
    bow_lo, bow_hi = float(np.min(bow * (s_all ** 2 - 1 / 3))), float(np.max(bow * (s_all ** 2 - 1 / 3)))
    depth = 2 * torso["semi"][0] * 0.85 - (bow_hi - bow_lo) - 3.0
    size_max = min(size_z * weights[-1] * rng.uniform(0.85, 1.0), depth / 3.6,
                   (0.8 * torso["semi"][1] - sway) / 1.15)
    size_xy = size_max / weights[-1]
    y_spine = torso["centre"][0] + 0.85 * torso["semi"][0] - 1.9 * size_max - bow_hi
    x_spine = torso["centre"][1] + rng.uniform(-0.05, 0.05) * torso["semi"][1]

    def curve(zz):
        """Centre (y, x) mm of the column at depth zz mm, and its slope (dy/dz, dx/dz)."""
        s = 2 * zz / fov[0]
        y = y_spine + bow * (s ** 2 - 1 / 3)
        x = x_spine + sway * np.sin(np.pi * sway_freq * s + sway_phase)
        dy = bow * 2 * s * 2 / fov[0]
        dx = sway * np.cos(np.pi * sway_freq * s + sway_phase) * np.pi * sway_freq * 2 / fov[0]
        return np.array([y, x]), np.array([dy, dx])

    vertebrae = []
    for k in range(n):
        uz, uxy = size_z * weights[k], size_xy * weights[k]
        j = rng.uniform(0.95, 1.05, 8)
        (yc, xc), slope = curve(z[k])
        frame = _frame(np.array([1.0, *slope]), roll_amp * np.sin(2 * np.pi * k / n + roll_phase))
        d = {"hb": 0.36 * uz * j[0], "bv": 0.48 * uxy * j[1], "bw": 0.62 * uxy * j[2],
             "waist": rng.uniform(0.04, 0.1), "rc": 0.28 * uxy * j[3], "rt": 0.14 * uxy * j[4],
             "rs": max(0.1 * uxy, thinnest), "rtp": max(0.09 * uxy, thinnest),
             "cortex": max(0.8, 0.08 * uxy), "endplate": max(0.8, 0.06 * uz)}
        d["ha"] = 0.6 * d["hb"]
        d["vc"] = d["bv"] + d["rc"]  # the canal's front touches the body's back
        back = d["vc"] + d["rc"] + d["rt"]
        d["spine0"] = (0.0, back - 0.5 * d["rt"], 0.0)
        d["spine1"] = (rng.uniform(0.2, 0.3) * uz, back + 0.5 * uxy * j[5], 0.0)
        side = d["rc"] + d["rt"] + 0.5 * uxy * j[6]
        d["tp0"] = (0.0, d["vc"], d["rc"] + 0.5 * d["rt"])
        d["tp1"] = (0.05 * uz, d["vc"] + 0.15 * uxy, side)
        d["umax"] = max(d["hb"], d["spine1"][0] + d["rs"], d["tp1"][0] + d["rtp"])
        d["vmax"] = max(back, d["spine1"][1]) + d["rs"]
        d["wmax"] = max(d["bw"], side + d["rtp"])
        vertebrae.append({"centre": np.array([z[k], yc, xc]), "frame": frame, "dims": d, "size_xy": uxy})
    return vertebrae, torso, cut


def make_spine_phantom(rng=None, shape=(96, 80, 80), spacing=(1.0, 1.0, 1.0),
                       num_vertebrae=(4, 7)) -> tuple[np.ndarray, np.ndarray, dict]:
    """One CT-like scan: `(image float32 (D, H, W) in HU, label uint8 (D, H, W), info)`.

    The label is an instance map: 0 background, 1..N one per vertebra (N drawn from
    `num_vertebrae` (lo, hi), inclusive, less any that fall wholly outside), numbered along D from
    index 0, each instance one 26-connected component; a vertebra cut by the field of view keeps
    its visible part. `info` holds "cut" (whether the field of view was placed to cut the last
    vertebra) and "instances", one dict per instance: "instance", "voxels" (labelled voxels),
    "full_voxels" (its voxels had the field of view been unbounded: it is rendered on the same
    lattice extended past the volume, so the count is exact for that lattice), "complete"
    (at least 98 % of full_voxels inside the volume; on a coarse grid a few voxels shared with
    the vertebra above go to that one and do not count against it) and "centre" (its body's
    centre in voxel coordinates, (z, y, x) float; outside the volume for some cut vertebrae).
    `spacing` (sz, sy, sx) mm: sizes are fractions of the field of view in mm, so a scan keeps
    its anatomy at any spacing that covers the same field of view. `rng` is a
    `numpy.random.Generator` (or a seed, or None for fresh entropy). About 0.05 s for the default
    shape on one CPU core.
    """
    shape, rng = check_phantom_args(shape, spacing, rng, MIN_SIDE)
    lo_n, hi_n = (int(k) for k in num_vertebrae)
    if not 1 <= lo_n <= hi_n <= 20:
        raise ValueError(f"num_vertebrae {tuple(num_vertebrae)}: expected (lo, hi) with 1 <= lo <= hi <= 20")
    spacing = tuple(float(s) for s in spacing)
    fov = np.array(shape) * np.array(spacing)
    vertebrae, torso, cut = _draw_column(rng, fov, (lo_n, hi_n), 0.6 * max(spacing))
    hu = {"soft": rng.uniform(35, 60), "fat": rng.uniform(-120, -80), "csf": rng.uniform(5, 20),
          "disc": rng.uniform(70, 110), "core": rng.uniform(150, 300), "shell": rng.uniform(700, 1000),
          "arch": rng.uniform(450, 750), "blood": rng.uniform(35, 50), "rib": rng.uniform(450, 750)}

    # The torso: soft tissue under a fat rim, air outside; the same in every slice.
    axes = [(np.arange(m) - (m - 1) / 2) * s for m, s in zip(shape, spacing)]
    ty, tx = torso["semi"]
    r2 = ((axes[1][:, None] - torso["centre"][0]) / ty) ** 2 + ((axes[2][None, :] - torso["centre"][1]) / tx) ** 2
    plane = np.where(r2 <= 1, hu["fat"], AIR)
    plane[r2 <= (1 - torso["fat"]) ** 2] = hu["soft"]
    image = np.repeat(plane[None].astype(np.float32), shape[0], axis=0)
    gap = 2.0 + max(spacing)  # clutter keeps this far from the vertebrae, so it never touches a label

    # A calcified aorta in front of the column, straight along D, with bright plaques in its wall.
    size_max = vertebrae[-1]["size_xy"]
    r_aorta = rng.uniform(0.4, 0.5) * size_max
    front = min(v["centre"][1] - 1.15 * v["dims"]["bv"] for v in vertebrae)
    aorta_yx = np.array([front - gap - r_aorta, vertebrae[0]["centre"][2] + rng.uniform(0.3, 0.6) * size_max])
    ends = [np.array([-fov[0], *aorta_yx]), np.array([fov[0], *aorta_yx])]
    found = _coords(np.zeros(3), np.eye(3), np.minimum(*ends) - r_aorta, np.maximum(*ends) + r_aorta, shape, spacing)
    if found is not None:
        lo, hi, q = found
        _paint(image, (lo, hi), np.broadcast_to(_capsule(q, *ends, r_aorta), tuple(hi - lo)), hu["blood"])
    for _ in range(rng.integers(2, 8)):
        angle, r = rng.uniform(0, 2 * np.pi), rng.uniform(1.5, 3.0) + 0.5 * max(spacing)
        p = np.array([rng.uniform(-0.45, 0.45) * fov[0],
                      *(aorta_yx + r_aorta * np.array([np.cos(angle), np.sin(angle)]))])
        found = _coords(p, np.eye(3), [-r] * 3, [r] * 3, shape, spacing)
        if found is not None:
            lo, hi, q = found
            _paint(image, (lo, hi), _capsule(q, np.zeros(3), np.zeros(3), r), rng.uniform(500, 1000))

    # Rib stubs beside the upper vertebrae of some scans: arcs that start past the transverse
    # process and bend forwards, kept inside the torso's muscle.
    n_ribbed = int(rng.integers(1, max(2, len(vertebrae) - 1))) if rng.random() < 0.6 else 0
    for vert in vertebrae[:n_ribbed]:
        d, frame, c = vert["dims"], vert["frame"], vert["centre"]
        r_rib = rng.uniform(0.07, 0.1) * vert["size_xy"]
        length = rng.uniform(0.8, 1.3) * vert["size_xy"]
        for side in (-1, 1):
            local = np.array([d["tp1"][0], d["tp1"][1], side * (d["tp1"][2] + d["rtp"] + gap + r_rib)])
            for step in range(4):
                phi = np.deg2rad(25 * (step + 0.5))
                nxt = local + length / 4 * np.array([0.15, -np.sin(phi), side * np.cos(phi)])
                p0, p1 = c + local @ frame, c + nxt @ frame
                if ((p1[1] - torso["centre"][0]) / ty) ** 2 + ((p1[2] - torso["centre"][1]) / tx) ** 2 > 0.8:
                    break
                found = _coords(np.zeros(3), np.eye(3), np.minimum(p0, p1) - r_rib, np.maximum(p0, p1) + r_rib,
                                shape, spacing)
                if found is not None:
                    lo, hi, q = found
                    _paint(image, (lo, hi), np.broadcast_to(_capsule(q, p0, p1, r_rib), tuple(hi - lo)), hu["rib"])
                local = nxt

    # Discs between consecutive bodies, painted before the bodies, which overlap them a little.
    for a, b in zip(vertebrae[:-1], vertebrae[1:]):
        bottom = a["centre"] + a["dims"]["hb"] * a["frame"][0]
        top = b["centre"] - b["dims"]["hb"] * b["frame"][0]
        frame = _frame(b["centre"] - a["centre"], 0.0)
        half = np.linalg.norm(top - bottom) / 2 + 1.0
        bv = 0.98 * (a["dims"]["bv"] + b["dims"]["bv"]) / 2
        bw = 0.98 * (a["dims"]["bw"] + b["dims"]["bw"]) / 2
        found = _coords((bottom + top) / 2, frame, [-half, -bv, -bw], [half, bv, bw], shape, spacing)
        if found is not None:
            lo, hi, (u, v, w) = found
            mask = ((v / bv) ** 2 + (w / bw) ** 2 <= 1) & (np.abs(u) <= half)
            _paint(image, (lo, hi), mask, hu["disc"])

    # The vertebrae, each on its box of the extended grid, so that a cut one's full volume is known.
    label = np.zeros(shape, np.uint8)
    instances = []
    for vert in vertebrae:
        lo, hi, parts = _vertebra_parts(vert, shape, spacing)
        full = int((parts["shell"] | parts["core"] | parts["arch"]).sum())
        inside = _clip_box(lo, hi, shape)
        if inside is None:
            continue
        vol, box = inside
        for part in ("canal", "core", "shell", "arch"):
            image[vol][parts[part][box]] = hu[part if part != "canal" else "csf"]
        mask = (parts["shell"] | parts["core"] | parts["arch"])[box]
        complete = bool(mask.sum() >= COMPLETE_SHARE * full)  # of the field of view alone
        mask &= label[vol] == 0  # on a coarse grid neighbours can share a voxel: the upper one keeps it
        components, count = ndimage.label(mask, FULL_26)
        if count == 0:
            continue
        if count > 1:  # a cut can leave a sliver apart from the rest: the label keeps the largest piece
            mask = components == np.argmax(np.bincount(components.ravel())[1:]) + 1
        instance = len(instances) + 1
        label[vol][mask] = instance
        voxels = int(mask.sum())
        centre = vert["centre"] / np.array(spacing) + (np.array(shape) - 1) / 2
        instances.append({"instance": instance, "voxels": voxels, "full_voxels": full,
                          "complete": complete,
                          "centre": tuple(float(x) for x in centre)})

    # Acquisition: partial volume (a Gaussian of 0.4-0.7 mm), then noise.
    blur = rng.uniform(0.4, 0.7)
    image = ndimage.gaussian_filter(image, [blur / s for s in spacing], truncate=3.0)
    image += rng.uniform(8, 20) * rng.standard_normal(shape, dtype=np.float32)
    assert len(instances) >= 1 and np.array_equal(np.unique(label), np.arange(len(instances) + 1)), \
        f"instances {np.unique(label).tolist()} are not consecutive from 0"
    return image.astype(np.float32), label, {"cut": cut, "instances": instances}


def write_spine_dataset(out_dir, num_cases=10, shapes=((96, 80, 80),), spacing=(1.0, 1.0, 1.0), seed=0) -> list[str]:
    """Write `num_cases` spine phantoms with ids `spine_XXX` in the MSD layout; returns the ids.

    imagesTr/spine_XXX.nii.gz  int16 HU (the image rounded, as CT is stored)
    labelsTr/spine_XXX.nii.gz  uint8 instances: 0 background, 1..N vertebrae from the top (D index 0)
    dataset.json               MSD's fields; labels 0 background, 1 vertebra (any instance > 0)
    instances.csv              one row per case and instance: case, instance, voxels, complete (0
                               for a vertebra less than 98 % inside the field of view), full_voxels
                               (its volume counted on the lattice extended past the volume)

    Case i has shape `shapes[i % len(shapes)]`, an origin tens of mm from zero and a direction
    rotated 5-20 degrees about a random axis, shared by its image and label; it depends only on
    (seed, i). Existing files of these cases are replaced; dataset.json and instances.csv list
    only this call's cases.
    """
    out_dir, ids, rows = Path(out_dir), [], []
    for i in range(num_cases):
        rng = np.random.default_rng([seed, i])
        image, label, info = make_spine_phantom(rng, shapes[i % len(shapes)], spacing)
        props = case_geometry(rng, spacing)
        case_id = f"spine_{i:03d}"
        write_image(np.rint(np.clip(image, -1024, 3071)).astype(np.int16), props,
                    out_dir / "imagesTr" / f"{case_id}.nii.gz")
        write_image(label, props, out_dir / "labelsTr" / f"{case_id}.nii.gz")
        rows += [{"case": case_id, "instance": r["instance"], "voxels": r["voxels"], "complete": int(r["complete"]),
                  "full_voxels": r["full_voxels"]} for r in info["instances"]]
        ids.append(case_id)
    meta = {"name": "SpinePhantoms",
            "description": "Synthetic CT-like spine phantoms with one instance per vertebra (synthetic_spine.py)",
            "tensorImageSize": "3D", "modality": {"0": "CT"}, "labels": {"0": "background", "1": "vertebra"},
            "numTraining": len(ids), "numTest": 0,
            "training": [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in ids],
            "test": []}
    write_json(out_dir / "dataset.json", meta)
    if rows:
        write_csv(out_dir / "instances.csv", rows)
    return ids
