"""Synthetic LGE-MRI-like phantoms with a left-atrium label: the data set that tests and the demo
use, so the whole pipeline runs with no download.

`make_phantom` paints one axial stack: a thorax with a fat rim, lungs and spine; a mediastinum
holding the left atrium (body, appendage and four pulmonary-vein stubs: the label) inside a thin,
patchily enhanced wall; and the bright blood pools beside it that are not atrium (aortic root,
right atrium, left ventricle inside its dark myocardium, descending aorta), so that a threshold
cannot find the atrium and a network has to use shape and position. The image is then blurred a
little (partial volume), multiplied by a smooth bias field and given Rician noise. The heart is
built in its own frame, whose unit is about the atrial body's semi-axis, scaled per axis with the
volume's shape: the atrium covers about 1/4-1/3 of the field of view in-plane and 1/2-2/3 of the
depth at any shape, as in the LASC 2018 scans. `write_phantom_dataset` writes cases in the
LASC layout, each with its own origin and direction, so that geometry handling is exercised
too; `python phantoms.py` is its command line.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage

from dataset import largest_component, write_image

MIN_SIDE = 16  # voxels per axis; below this the vein stubs and the wall no longer resolve
# Voxels per heart-frame unit as fractions of (D, H, W). The atrial body's semi-axes are about
# one unit, so these set the atrium's share of the volume (1/2-2/3 of D, 1/4-1/3 of H and W).
HEART_SCALE = np.array([0.27, 0.105, 0.105])


def _rotation(axis, angle: float) -> np.ndarray:
    """Rotation matrix (3, 3) by `angle` radians about `axis` (Rodrigues); det +1."""
    k = np.asarray(axis, float) / np.linalg.norm(axis)
    cross = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + np.sin(angle) * cross + (1 - np.cos(angle)) * cross @ cross


def _surface(direction, semi) -> np.ndarray:
    """The point where a ray from the centre along `direction` leaves an ellipsoid `semi`."""
    d = np.asarray(direction, float)
    return d / np.sqrt(np.sum((d / semi) ** 2))


# A primitive lives in the heart frame: ("ellipsoid", centre, semi_axes) or
# ("tube", p0, p1, r0, r1), a capsule whose radius tapers from r0 at p0 to r1 at p1.

def _extent(m: np.ndarray, prim) -> tuple[np.ndarray, np.ndarray]:
    """Voxel offsets (lo, hi) per axis of a primitive from the frame centre, where a voxel
    offset is `m @ t` for heart-frame coordinates t. Exact for both kinds: a sphere of radius
    r maps to an axis-aligned box of half-width r * |row i of m|."""
    if prim[0] == "ellipsoid":
        _, centre, semi = prim
        mid, half = m @ centre, np.sqrt(((m * semi) ** 2).sum(axis=1))
    else:
        _, p0, p1, r0, r1 = prim
        a, b = m @ p0, m @ p1
        mid, half = (a + b) / 2, np.abs(a - b) / 2 + max(r0, r1) * np.linalg.norm(m, axis=1)
    return mid - half, mid + half


def _rasterise(shape, centre, m, prim):
    """`(box, mask)`: the slices of the volume a primitive can touch and its mask there
    (bool, the box's shape), or `(None, None)` when it lies outside the volume."""
    lo, hi = _extent(m, prim)
    lo = np.clip(np.floor(centre + lo).astype(int), 0, shape)
    hi = np.clip(np.ceil(centre + hi).astype(int) + 1, 0, shape)
    if np.any(hi <= lo):
        return None, None
    m_inv = np.linalg.inv(m).astype(np.float32)
    axes = [np.arange(a, b, dtype=np.float32) - c for a, b, c in zip(lo, hi, centre)]
    axes = [axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :]]
    # heart-frame coordinates relative to the primitive's first point, built by broadcasting
    origin = np.asarray(prim[1], np.float32)
    t = [sum(m_inv[i, j] * axes[j] for j in range(3)) - origin[i] for i in range(3)]
    if prim[0] == "ellipsoid":
        mask = sum((ti / s) ** 2 for ti, s in zip(t, prim[2])) <= 1
    else:
        _, p0, p1, r0, r1 = prim
        u = np.asarray(p1, np.float32) - origin
        s = np.clip(sum(ti * ui for ti, ui in zip(t, u)) / float(u @ u), 0, 1)
        mask = sum((ti - s * ui) ** 2 for ti, ui in zip(t, u)) <= (r0 + (r1 - r0) * s) ** 2
    return tuple(slice(a, b) for a, b in zip(lo, hi)), mask


def _atrium(rng: np.random.Generator) -> tuple[list, np.ndarray]:
    """`(primitives, body semi-axes (3,))` of the atrial blood pool: body, appendage and four
    vein stubs. Heart-frame axes are (z, y, x) = (superior, posterior, patient-left), as in
    an axial stack."""
    semi = np.array([1.0, 0.8, 1.0]) * rng.uniform(0.85, 1.15, 3)
    prims = [("ellipsoid", np.zeros(3), semi)]
    for side in (-1, 1):            # right and left veins leave backwards and sideways
        for level in (-1, 1):       # inferior and superior vein of each side
            root = _surface([0.5 * level, 0.6, 0.8 * side] + rng.normal(0, 0.1, 3), semi)
            out = np.array([0.3 * level, 0.75, 0.65 * side]) + rng.normal(0, 0.1, 3)
            end = root + rng.uniform(0.15, 0.6) * out / np.linalg.norm(out)
            # starting inside the body keeps the stub connected to it
            prims.append(("tube", 0.6 * root, end, *[rng.uniform(0.27, 0.36)] * 2))
    # The appendage: a tapering hook off the anterior-left, a quadratic Bezier curve.
    base = _surface([0.35, -0.6, 0.75], semi)
    p0, p1 = 0.6 * base, base + rng.uniform(0.4, 0.6) * np.array([0.1, -0.5, 0.85])
    p2 = p1 + rng.uniform(0.35, 0.55) * np.array([-0.25, -0.9, -0.35]) + rng.normal(0, 0.08, 3)
    s = np.linspace(0, 1, 6)[:, None]
    curve = (1 - s) ** 2 * p0 + 2 * s * (1 - s) * p1 + s ** 2 * p2
    radii = np.linspace(rng.uniform(0.35, 0.45), rng.uniform(0.18, 0.25), len(curve))
    prims += [("tube", curve[i], curve[i + 1], radii[i], radii[i + 1]) for i in range(len(curve) - 1)]
    return prims, semi


def _neighbours(rng: np.random.Generator, semi) -> list:
    """(outer, inner) primitive pairs of the blood pools around the atrium: a dark rim of
    myocardium or vessel wall (outer) holding bright blood (inner)."""
    pairs = []
    r = rng.uniform(0.42, 0.55)     # aortic root, in front of the atrium, touching or close
    y = -(semi[1] + r + rng.uniform(0.05, 0.35))
    x = rng.uniform(-0.45, -0.05)
    p0, p1 = np.array([-1.3, y, x]), np.array([2.5, y - 0.3, x - 0.4])
    pairs.append((("tube", p0, p1, r + 0.1, r + 0.1), ("tube", p0, p1, r, r)))
    c = np.array([rng.uniform(-0.3, 0.2), -0.3, -(semi[2] + 0.9 + rng.uniform(0.1, 0.3))])
    s = np.array([1.1, 0.95, 0.8]) * rng.uniform(0.9, 1.1, 3)   # right atrium
    pairs.append((("ellipsoid", c, s + 0.1), ("ellipsoid", c, s)))
    c = np.array([-1.7, -1.3, 1.1]) + rng.normal(0, 0.1, 3)     # left ventricle, below and in front
    s = np.array([1.1, 1.0, 1.0]) * rng.uniform(0.9, 1.1, 3)
    pairs.append((("ellipsoid", c, s + rng.uniform(0.3, 0.45)), ("ellipsoid", c, s)))
    r = rng.uniform(0.3, 0.4)       # descending aorta, behind and to the left
    p0, p1 = np.array([-4.0, semi[1] + 0.85, 0.35]), np.array([4.0, semi[1] + 0.85, 0.35])
    pairs.append((("tube", p0, p1, r + 0.08, r + 0.08), ("tube", p0, p1, r, r)))
    return pairs


def check_phantom_args(shape, spacing, rng, min_side: int) -> tuple[tuple[int, int, int], np.random.Generator]:
    """A phantom's shape as ints and its generator, or ValueError for a shape with an axis under
    `min_side` voxels or a spacing that is not three positive sizes."""
    shape = tuple(int(n) for n in shape)
    if len(shape) != 3 or min(shape) < min_side:
        raise ValueError(f"shape {shape}: expected (D, H, W) with at least {min_side} voxels per axis")
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"spacing {tuple(spacing)}: expected three positive values (sz, sy, sx) mm")
    return shape, np.random.default_rng(rng)


def make_phantom(shape=(48, 128, 128), spacing=(0.625, 0.625, 0.625), rng=None) -> tuple[np.ndarray, np.ndarray]:
    """One phantom: `(image float32 (D, H, W) in [0, 255], label uint8 (D, H, W) in {0, 1})`.

    The label is the atrial blood pool, one 6-connected component at least ~4 % of each axis
    away from the border. `rng` is a `numpy.random.Generator` (or a seed, or None for fresh
    entropy). `spacing` (sz, sy, sx) mm does not change the anatomy, which scales with the
    shape in voxels; it is accepted so that callers can pass a case's geometry unchanged.
    """
    shape, rng = check_phantom_args(shape, spacing, rng, MIN_SIDE)
    n = np.array(shape, float)
    air, tissue, lung, fat = rng.uniform(0, 8), rng.uniform(60, 90), rng.uniform(15, 30), rng.uniform(100, 140)
    blood, myo, scar = rng.uniform(110, 150), rng.uniform(30, 50), rng.uniform(170, 230)

    # Pose: rotations up to 15 degrees about each axis, size +-12 % on top of the anatomy's own.
    rot = (_rotation([1, 0, 0], rng.uniform(-0.26, 0.26)) @ _rotation([0, 1, 0], rng.uniform(-0.26, 0.26))
           @ _rotation([0, 0, 1], rng.uniform(-0.26, 0.26)))
    m = np.diag(HEART_SCALE * n * rng.uniform(0.88, 1.12)) @ rot
    atrium, semi = _atrium(rng)
    lo, hi = np.min([_extent(m, p)[0] for p in atrium], 0), np.max([_extent(m, p)[1] for p in atrium], 0)
    margin = np.maximum(2, np.round(0.04 * n))
    shrink = min(1.0, np.min((n - 1 - 2 * margin) / (hi - lo)))   # only for extreme aspect ratios
    m, lo, hi = m * shrink, lo * shrink, hi * shrink
    centre = (np.array([0.5, 0.54, 0.5]) + rng.uniform(-1, 1, 3) * [0.06, 0.08, 0.08]) * (n - 1)
    centre = np.clip(centre, margin - lo, n - 1 - margin - hi)  # keeps the atrium inside

    # Thorax, fat rim, spine and lungs: in-plane ellipses, the lungs narrowing towards the top.
    z = np.linspace(-1, 1, shape[0])[:, None, None]
    y = (np.arange(shape[1])[:, None] - (0.5 + rng.uniform(-0.03, 0.03)) * (n[1] - 1)) / n[1]
    x = (np.arange(shape[2])[None, :] - (0.5 + rng.uniform(-0.03, 0.03)) * (n[2] - 1)) / n[2]
    ty, tx = rng.uniform(0.34, 0.42), rng.uniform(0.44, 0.48)
    body = (y / ty) ** 2 + (x / tx) ** 2
    plane = np.where(body <= 1, fat, air)
    plane[body <= 0.88] = tissue
    plane[((y - 0.82 * ty) / 0.07) ** 2 + (x / 0.06) ** 2 <= 1] = myo + 10
    image = np.repeat(plane[None].astype(np.float32), shape[0], axis=0)
    for sx in (-1, 1):
        ly, lx = rng.uniform(0.24, 0.28) * (1 - 0.1 * z), rng.uniform(0.14, 0.17) * (1 - 0.1 * z)
        image[((y - 0.02) / ly) ** 2 + ((x - sx * 0.26) / lx) ** 2 <= 1] = lung

    def paint(prim, value):
        box, mask = _rasterise(shape, centre, m, prim)
        if box is not None:
            image[box][mask] = value

    paint(("ellipsoid", np.array([-0.8, -0.6, 0.0]), np.array([5.0, 2.4, 2.9])), tissue)  # mediastinum
    for outer, inner in _neighbours(rng, semi):
        paint(outer, myo)
        paint(inner, blood * rng.uniform(0.9, 1.1))

    label = np.zeros(shape, bool)
    for prim in atrium:
        box, mask = _rasterise(shape, centre, m, prim)
        label[box] |= mask
    label = largest_component(label, connectivity=1)  # thin tips can touch only diagonally on small grids

    # The wall: a 1-2 voxel shell, nulled myocardium with enhanced (scar-like) patches.
    box = tuple(slice(max(0, int(np.floor(c + a)) - 3), int(np.ceil(c + b)) + 4) for c, a, b in zip(centre, lo, hi))
    inner = label[box]
    shell = ndimage.binary_dilation(inner, ndimage.generate_binary_structure(3, 2), rng.integers(1, 3)) & ~inner
    step = np.maximum(1.0, 0.35 * np.abs(np.diag(m)))  # patches about a third of the body's semi-axis
    field = ndimage.gaussian_filter(rng.standard_normal(np.ceil(np.array(inner.shape) / step).astype(int) + 2), 1)
    where = np.nonzero(shell)
    values = ndimage.map_coordinates(field, np.array(where) / step[:, None], order=1)
    wall = np.where(values > np.quantile(values, 1 - rng.uniform(0.3, 0.6)), scar, myo)
    image[box][where] = wall
    image[label] = blood

    image = ndimage.gaussian_filter(image, 0.6, truncate=3.0)
    # Bias: a quadratic in z times a quadratic in (y, x), scaled to about +-20-30 %.
    pz = rng.normal(0, 1, 2) @ [z[:, 0, 0], z[:, 0, 0] ** 2]
    yy, xx = np.broadcast_arrays(y, x)
    pxy = sum(c * t for c, t in zip(rng.normal(0, 1, 5), [yy, xx, yy * yy, xx * xx, xx * yy]))
    bias = (1 + rng.uniform(0.04, 0.08) * pz / np.abs(pz).max())[:, None, None] \
        * (1 + rng.uniform(0.15, 0.22) * pxy / np.abs(pxy).max())[None]
    image *= bias.astype(np.float32)
    # Rician noise: the magnitude of the signal plus complex Gaussian noise.
    sigma = rng.uniform(4, 10)
    real = rng.standard_normal(shape, dtype=np.float32) * sigma + image
    imag = rng.standard_normal(shape, dtype=np.float32) * sigma
    image = np.clip(np.sqrt(real * real + imag * imag), 0, 255)
    return image.astype(np.float32), label.astype(np.uint8)


def case_geometry(rng: np.random.Generator, spacing) -> dict:
    """A phantom's geometry (`dataset.read_image`'s props): `spacing`, an origin tens of mm from
    zero and a direction matrix rotated 5-20 degrees about a random axis."""
    direction = _rotation(rng.normal(size=3), np.deg2rad(rng.uniform(5, 20)))
    origin = rng.uniform(20, 120, 3) * rng.choice([-1, 1], 3)
    return {"spacing": tuple(float(s) for s in spacing), "origin": tuple(float(o) for o in origin),
            "direction": tuple(float(d) for d in direction.ravel())}


def write_phantom_dataset(out_dir, num_cases=10, shapes=((48, 128, 128),), spacing=(0.625, 0.625, 0.625),
                          seed=0) -> list[str]:
    """Write `num_cases` phantoms in the LASC layout: `<out_dir>/case_XXX/lgemri.nrrd` (uint8
    0..255) and `laendo.nrrd` (uint8 0/255). Case i has shape `shapes[i % len(shapes)]`, an
    origin tens of mm from zero and a direction matrix rotated up to 20 degrees about a random
    axis, shared by its image and label. Case i depends only on (seed, i). Existing files are
    replaced. Returns the case ids."""
    out_dir, ids = Path(out_dir), []
    for i in range(num_cases):
        rng = np.random.default_rng([seed, i])
        image, label = make_phantom(shapes[i % len(shapes)], spacing, rng)
        props = case_geometry(rng, spacing)
        case_id = f"case_{i:03d}"
        write_image(np.rint(image).astype(np.uint8), props, out_dir / case_id / "lgemri.nrrd")
        write_image(label * np.uint8(255), props, out_dir / case_id / "laendo.nrrd")
        ids.append(case_id)
    return ids
