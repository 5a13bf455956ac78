"""Synthetic multi-sequence brain-tumour phantoms in the style of the Medical Segmentation
Decathlon's Task01 (BraTS): four co-registered channels (FLAIR, T1w, T1-Gd, T2w) of a
skull-stripped brain and a label of nested tumour regions (1 edema, 2 necrotic/non-enhancing
core, 3 enhancing tumour), so that multi-channel, multi-class segmentation runs with no download.

`make_tumour_phantom` paints one case. The brain is a lobulated ellipsoid filling most of the
field of view, with white matter, a grey-matter rim cut by sulci, deep grey nuclei, lateral and
third ventricles, an interhemispheric cleft and a few small enhancing vessels (bright in T1-Gd but
not tumour, so that one threshold cannot find the enhancing rim). The tumour is an irregular core
(a blob deformed by smooth noise) whose inside is necrotic and whose rim enhances, with a rim of
random thickness (solid to thin), inside an irregular edema that reaches further along a few
directions. Its volumes are set by ranks of a level function, so the whole tumour is 2-15 % of the
brain. The contrasts follow the sequences (edema bright in FLAIR and T2, enhancing tumour bright
in T1-Gd, necrosis dark in T1 and T1-Gd), with per-case jitter, texture, blur, a smooth bias field,
Rician noise and a random global scale and offset per channel; outside the brain every channel is
exactly 0, as in skull-stripped BraTS data. Sizes are in mm through `spacing`: the brain's
semi-axes are fractions of the field of view in mm and all smaller structures fractions of those.
`write_tumour_dataset` writes cases in the MSD layout (one 4D image per case) or the nnU-Net v2
one (one 3D file per channel), with labels in the MSD or the BraTS 2021 convention;
`python phantoms.py --kind brain_tumour` is its command line.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage

from dataset import write_image
from synthetic import _rotation, case_geometry, check_phantom_args
from utils import write_json

MIN_SIDE = 24  # voxels per axis; below this the enhancing rim and the ventricles no longer resolve
CHANNELS = ("FLAIR", "T1w", "t1gd", "T2w")  # MSD Task01's order and names
# Label names as the two conventions spell them (MSD Task01's own mix of "tumor" and "tumour").
LABEL_NAMES = {"msd": {0: "background", 1: "edema", 2: "non-enhancing tumor", 3: "enhancing tumour"},
               "brats2021": {0: "background", 1: "necrotic tumour core", 2: "edema", 4: "enhancing tumour"}}
TO_BRATS2021 = np.array([0, 2, 1, 4], np.uint8)  # indexed by an MSD label: edema 2, core 1, enhancing 4

# Tissue classes, the columns of CONTRAST. LESION: small white-matter hyperintensities (bright in
# FLAIR and T2, label 0), VESSEL: cortical vessels and choroid plexus (bright in T1-Gd, label 0),
# the look-alikes that keep one channel's threshold from finding the tumour.
BG, WM, GM, CSF, VESSEL, LESION, EDEMA, NECROSIS, ENHANCING = range(9)
# Nominal intensity relative to white matter, rows (FLAIR, T1w, T1-Gd, T2w). CSF is dark in FLAIR
# (suppressed) and T1, bright in T2; vessels are flow voids in T2. Edema's value is its core-side
# one: towards its outer edge it fades into white matter.
CONTRAST = np.array([
    # BG   WM    GM    CSF  VESSEL LESION EDEMA NECR  ENH
    [0.0, 1.00, 1.22, 0.30, 0.70, 1.50, 1.60, 1.20, 1.40],  # FLAIR
    [0.0, 1.00, 0.78, 0.35, 0.90, 0.85, 0.75, 0.50, 0.85],  # T1w
    [0.0, 1.00, 0.80, 0.35, 1.55, 0.85, 0.80, 0.50, 1.60],  # T1-Gd
    [0.0, 1.00, 1.35, 2.30, 0.55, 1.60, 1.90, 2.00, 1.50],  # T2w
], np.float32)


def _unit(rng: np.random.Generator) -> np.ndarray:
    v = rng.normal(size=3)
    return v / np.linalg.norm(v)


def _smooth_noise(axes, corr: float, rng: np.random.Generator) -> np.ndarray:
    """A smooth random field `(len(axes[0]), len(axes[1]), len(axes[2]))` float32, zero mean and
    unit standard deviation over the grid: Gaussian bumps about `corr` mm wide on a lattice of
    step `corr` mm, each with a normal weight. `axes` are the grid's coordinates in mm, (z, y, x).
    It is separable, so it costs three small matrix products rather than a 3D filter."""
    kernels = []
    for t in axes:
        nodes = np.arange(t[0] - 2 * corr, t[-1] + 2.5 * corr, corr)
        kernels.append(np.exp(-0.5 * ((t[:, None] - nodes[None]) / (0.7 * corr)) ** 2).astype(np.float32))
    f = rng.standard_normal([k.shape[1] for k in kernels], dtype=np.float32)
    f = f @ kernels[2].T                                 # (mz, my, W)
    f = kernels[1] @ f                                   # (mz, H, W)
    f = np.tensordot(kernels[0], f, axes=(1, 0))         # (D, H, W)
    f -= f.mean()
    return f / max(float(f.std()), 1e-6)


def _sphere(axes, centre, radius: float):
    """`(box, mask)`: the slices of the grid a ball (centre (3,) and radius in mm) can touch and
    its mask there, or `(None, None)` when it misses the grid."""
    box, local = [], []
    for t, c in zip(axes, centre):
        lo, hi = np.searchsorted(t, c - radius), np.searchsorted(t, c + radius, side="right")
        if hi <= lo:
            return None, None
        box.append(slice(lo, hi))
        local.append(t[lo:hi] - c)
    mask = (local[0][:, None, None] ** 2 + local[1][None, :, None] ** 2 + local[2][None, None, :] ** 2) <= radius ** 2
    return tuple(box), mask


def _kth_smallest(values: np.ndarray, k: int) -> float:
    """The k-th smallest of `values` (1-based, k clipped to their number)."""
    k = int(np.clip(k, 1, values.size))
    return float(np.partition(values, k - 1)[k - 1])


def _head(axes, fov, spacing, rng: np.random.Generator):
    """The healthy brain: `(tissue uint8 (D, H, W) of BG, WM, GM, CSF, VESSEL, LESION, brain bool
    (D, H, W), to_volume, semi)`, where `to_volume(a)` maps brain-frame coordinates (3,), in units of the
    semi-axes `semi` (3,) mm, to volume mm about the grid's centre."""
    sp = np.asarray(spacing, float)
    centre = rng.uniform(-0.03, 0.03, 3) * fov
    rot = _rotation(_unit(rng), np.deg2rad(rng.uniform(0, 6)))
    lobes = rng.uniform(0.035, 0.06)
    # Superior-inferior and anterior-posterior fill more of the field of view than left-right.
    semi = fov / 2 * np.array([rng.uniform(0.80, 0.88), rng.uniform(0.80, 0.88), rng.uniform(0.70, 0.80)])
    # The lobulated, tilted brain keeps 1.5 voxels clear of the border at any aspect ratio.
    half = np.sqrt(((rot * semi) ** 2).sum(axis=1)) * (1 + lobes)
    semi *= min(1.0, float(np.min((fov / 2 - np.abs(centre) - 1.5 * sp) / half)))

    # Brain-frame coordinates in units of the semi-axes: a = rot^T (p - centre) / semi.
    p = [t - c for t, c in zip(axes, centre)]
    p = [p[0][:, None, None], p[1][None, :, None], p[2][None, None, :]]
    a = [(rot[0, i] * p[0] + rot[1, i] * p[1] + rot[2, i] * p[2]) / semi[i] for i in range(3)]
    a = [x.astype(np.float32) for x in a]
    rho = np.sqrt(a[0] ** 2 + a[1] ** 2 + a[2] ** 2) + np.float32(1e-6)
    # Lobulation: the boundary's radius is 1 + g(direction), g a few random plane waves on the sphere.
    weights = rng.uniform(-1, 1, 5)
    weights *= lobes / np.abs(weights).sum()
    g = np.zeros_like(rho)
    for w in weights:
        k = _unit(rng)
        g += np.float32(w) * np.cos((k[0] * a[0] + k[1] * a[1] + k[2] * a[2]) / rho * rng.uniform(2, 4.5)
                                    + rng.uniform(0, 2 * np.pi))
    r = rho / (1 + g)
    brain = r <= 1

    def ellipsoid(c, s, bend=0.0):
        # `bend` lowers the ends of an ellipsoid long in y: the arch of a lateral ventricle.
        return ((a[0] - c[0] + bend * a[1] ** 2) / s[0]) ** 2 + ((a[1] - c[1]) / s[1]) ** 2 \
            + ((a[2] - c[2]) / s[2]) ** 2 <= 1

    tissue = np.where(brain, np.uint8(WM), np.uint8(BG))
    # Cortex: a rim of varying depth; sulci are the zero sheet of a smooth field, CSF-filled.
    sulcal = _smooth_noise(axes, 0.09 * float(semi.mean()), rng)
    cortex = brain & (r > 1 - rng.uniform(0.07, 0.1) * (1 + 0.3 * sulcal))
    tissue[cortex] = GM
    tissue[cortex & (np.abs(sulcal) < 0.12)] = CSF
    for side in (-1, 1):  # deep grey nuclei (thalamus, basal ganglia)
        tissue[brain & ellipsoid([-0.05, 0.05, 0.22 * side], [0.18, 0.22, 0.1])] = GM
    size = rng.uniform(0.75, 1.35)  # ventricles vary most between subjects
    for side in (-1, 1):
        tissue[brain & ellipsoid([0.12, -0.02, 0.1 * side * size], np.array([0.16, 0.42, 0.075]) * size,
                                 bend=0.35)] = CSF
        tissue[brain & ellipsoid([0.05, 0.3, 0.1 * side * size], [0.05, 0.08, 0.035])] = VESSEL  # choroid plexus
    tissue[brain & ellipsoid([-0.05, 0.05, 0.0], [0.15, 0.2, 0.025 * size])] = CSF  # third ventricle
    # The interhemispheric cleft, about 2 % of the left-right semi-axis wide.
    tissue[brain & (np.abs(a[2]) < 0.02) & (a[0] > -0.15) & (r > 0.45)] = CSF

    def to_volume(v):
        return rot @ (np.asarray(v) * semi) + centre

    # Small cortical vessels near the surface and white-matter lesions deeper in.
    for kind, count, depth, size in ((VESSEL, rng.integers(4, 10), (0.82, 0.94), (0.02, 0.04)),
                                     (LESION, rng.integers(2, 7), (0.3, 0.75), (0.03, 0.07))):
        for _ in range(count):
            box, mask = _sphere(axes, to_volume(_unit(rng) * rng.uniform(*depth)),
                                rng.uniform(*size) * float(semi.mean()))
            if box is not None:
                tissue[box][mask & brain[box]] = kind
    return tissue, brain, to_volume, semi


def _tumour(axes, brain, centre, v_wt: float, core_share: float, necrosis_share: float, spacing,
            rng: np.random.Generator):
    """One try at a tumour around `centre` (3,) mm whose whole tumour holds `v_wt` voxels:
    `(box, label uint8 in the box, edema weight float32 in the box, core noise float32 in the
    box)`, or None when its core would leave the brain or the box. The label is 1 edema, 2
    necrosis, 3 enhancing; the edema weight (0.2-1) mixes edema into white matter, 1 next to the
    core. Nesting holds by construction: necrosis lies in the core eroded by one voxel, so the
    enhancing rim is at least one voxel thick (6-neighbours), and the edema contains the core
    dilated by one voxel."""
    r_wt = (3 * v_wt * float(np.prod(spacing)) / (4 * np.pi)) ** (1 / 3)  # mm, of a ball of that volume
    r_core = r_wt * core_share ** (1 / 3)
    box, local = [], []
    for t, c in zip(axes, centre):
        lo, hi = np.searchsorted(t, c - 2.2 * r_wt), np.searchsorted(t, c + 2.2 * r_wt, side="right")
        box.append(slice(lo, hi))
        local.append((t[lo:hi] - c).astype(np.float32))
    box = tuple(box)
    sub_axes = [t[s] for t, s in zip(axes, box)]
    p = [local[0][:, None, None], local[1][None, :, None], local[2][None, None, :]]
    inside = brain[box]

    # Core: a tilted ellipsoid deformed by smooth noise; its most central voxels by the level s_core.
    rot = _rotation(_unit(rng), rng.uniform(0, np.pi))
    semi = rng.uniform(0.75, 1.3, 3)
    semi /= np.prod(semi) ** (1 / 3)
    dist = np.sqrt(sum(((rot[0, i] * p[0] + rot[1, i] * p[1] + rot[2, i] * p[2]) / semi[i]) ** 2 for i in range(3)))
    s_core = dist / r_core + rng.uniform(0.15, 0.35) * _smooth_noise(sub_axes, 0.8 * r_core, rng)
    core = s_core <= _kth_smallest(s_core.ravel(), round(core_share * v_wt))
    labels, n = ndimage.label(core)
    if n > 1:
        core = labels == np.argmax(np.bincount(labels.ravel())[1:]) + 1
    grown = ndimage.binary_dilation(core)
    faces = [np.take(grown, i, axis=ax) for ax in range(3) for i in (0, -1)]
    if not np.all(inside[grown]) or any(f.any() for f in faces):
        return None

    # Necrosis: the lowest of a second level whose noise makes the rim's thickness vary.
    detail = _smooth_noise(sub_axes, 0.5 * r_core, rng)
    s_necrosis = s_core + rng.uniform(0.1, 0.3) * detail
    deep = ndimage.binary_erosion(core)
    necrosis = np.zeros_like(core)
    if round(necrosis_share * core.sum()) >= 1 and deep.any():
        necrosis = deep & (s_necrosis <= _kth_smallest(s_necrosis[deep], round(necrosis_share * core.sum())))

    # Edema: grown from the core's surface, further along 1-3 directions (as along white-matter
    # tracts) and unevenly (noise), until the whole tumour reaches its volume inside the brain.
    depth = ndimage.distance_transform_edt(~core, sampling=spacing).astype(np.float32)  # mm from the core
    dist = np.sqrt(p[0] ** 2 + p[1] ** 2 + p[2] ** 2) + np.float32(1e-6)
    stretch = np.ones_like(dist)
    for _ in range(rng.integers(1, 4)):
        v = _unit(rng)
        stretch += rng.uniform(0.5, 2.0) * np.clip((v[0] * p[0] + v[1] * p[1] + v[2] * p[2]) / dist, 0, None) ** 3
    s_edema = depth / (r_wt * stretch) + rng.uniform(0.1, 0.25) * _smooth_noise(sub_axes, 0.6 * r_wt, rng)
    free = inside & ~grown
    edge = _kth_smallest(s_edema[free], round(v_wt) - int(grown.sum())) if free.any() else 0.0
    whole = grown | (free & (s_edema <= edge))
    labels, _ = ndimage.label(whole)
    whole = labels == labels[core][0]  # islands of edema apart from the tumour are dropped

    label = np.where(whole, np.uint8(1), np.uint8(0))
    label[core] = 3
    label[necrosis] = 2
    w0 = rng.uniform(0.2, 0.5)
    weight = w0 + (1 - w0) * np.clip((edge - s_edema) / (0.5 * abs(edge) + 1e-6), 0, 1)
    return box, label, weight.astype(np.float32), detail


def make_tumour_phantom(shape=(64, 96, 96), spacing=(1.0, 1.0, 1.0), rng=None) -> tuple[np.ndarray, np.ndarray]:
    """One case: `(image float32 (4, D, H, W), label uint8 (D, H, W))`, arrays in (z, y, x) order.

    Channels in MSD Task01's order: 0 FLAIR, 1 T1w, 2 T1-Gd, 3 T2w, each with its own arbitrary
    scale; every channel is exactly 0 outside the brain and positive inside. Label in MSD Task01's
    convention: 0 background, 1 edema, 2 necrotic/non-enhancing core, 3 enhancing tumour. The
    tumour lies inside the brain; every 6-neighbour of a label-2 voxel is 2 or 3 (an enhancing rim
    encloses the necrosis) and every 6-neighbour of a 2-3 voxel is labelled (edema encloses the
    core). `spacing` (sz, sy, sx) mm sets the anatomy's physical proportions: the brain's
    semi-axes are fractions of the field of view in mm. `rng` is a `numpy.random.Generator` (or a
    seed, or None for fresh entropy). About 0.25 s for the default shape on one CPU core.
    """
    shape, rng = check_phantom_args(shape, spacing, rng, MIN_SIDE)
    fov = np.array(shape) * np.asarray(spacing, float)
    axes = [(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing)]  # mm about the grid's centre
    tissue, brain, to_volume, semi = _head(axes, fov, spacing, rng)

    # The tumour: sizes drawn first, then positions until the core fits inside the brain; every
    # fifth miss shrinks it, so a tumour too big for its brain ends as a smaller one near the centre.
    n_brain = int(brain.sum())
    v_wt = rng.uniform(0.02, 0.15) * n_brain
    core_share = rng.uniform(0.15, 0.5)
    # Some cases have a solid enhancing core with little or no necrosis, most a necrotic centre.
    necrosis_share = rng.uniform(0, 0.05) if rng.random() < 0.15 else rng.uniform(0.1, 0.7)
    voxel_mm3 = float(np.prod(spacing))
    tumour = None
    for attempt in range(40):
        if attempt and attempt % 5 == 0:
            v_wt *= 0.8
        r_core = (3 * v_wt * core_share * voxel_mm3 / (4 * np.pi)) ** (1 / 3)
        room = max(0.0, 0.9 - 1.6 * r_core / float(semi.min()))  # how far from the brain's centre, in semi-axes
        where = _unit(rng) * room * rng.uniform() ** (1 / 3)
        tumour = _tumour(axes, brain, to_volume(where), v_wt, core_share, necrosis_share, spacing,
                         rng)
        if tumour is not None:
            break
    assert tumour is not None, f"no tumour fits the brain of a {shape} volume at spacing {tuple(spacing)}"
    box, sub_label, weight, detail = tumour
    label = np.zeros(shape, np.uint8)
    label[box] = sub_label

    # Intensities: the class table with per-case jitter, then edema mixed into white matter with
    # its weight, a heterogeneous enhancement, and anatomical texture shared by the channels.
    contrast = CONTRAST * rng.uniform(0.92, 1.08, CONTRAST.shape).astype(np.float32)
    sub_tissue = tissue[box]
    sub_tissue[sub_label == 1] = EDEMA
    sub_tissue[sub_label == 2] = NECROSIS
    sub_tissue[sub_label == 3] = ENHANCING
    image = contrast[:, tissue]  # (4, D, H, W)
    sub = image[(slice(None), *box)]
    edema = sub_label == 1
    sub[:, edema] = contrast[:, WM, None] + weight[edema] * (contrast[:, EDEMA, None] - contrast[:, WM, None])
    enhancing = sub_label == 3
    sub[2, enhancing] *= 1 + 0.25 * detail[enhancing]
    texture = _smooth_noise(axes, max(0.04 * float(semi.mean()), float(min(spacing))), rng)
    image *= 1 + rng.uniform(0.04, 0.08, (4, 1, 1, 1)).astype(np.float32) * texture

    # Acquisition: partial volume, a smooth bias field, Rician noise, the scanner's scale and offset.
    image = ndimage.gaussian_filter(image, (0, *[rng.uniform(0.5, 0.75)] * 3), truncate=3.0)
    z = np.linspace(-1, 1, shape[0])
    y, x = np.meshgrid(np.linspace(-1, 1, shape[1]), np.linspace(-1, 1, shape[2]), indexing="ij")
    for c in range(4):
        # Separable (a profile in z times a surface in (y, x)): a full 3D polynomial costs more.
        bz = rng.normal(0, 1, 2) @ [z, z * z]
        byx = sum(k * t for k, t in zip(rng.normal(0, 1, 5), [y, x, y * y, x * x, x * y]))
        amp = rng.uniform(0.1, 0.3)
        bias = np.exp(amp * (0.4 * bz / np.abs(bz).max())[:, None, None] + amp * (byx / np.abs(byx).max())[None])
        image[c] *= bias.astype(np.float32)
    sigma = rng.uniform(0.03, 0.07, (4, 1, 1, 1)).astype(np.float32)
    real = image + sigma * rng.standard_normal(image.shape, dtype=np.float32)
    imag = sigma * rng.standard_normal(image.shape, dtype=np.float32)
    image = np.sqrt(real * real + imag * imag)
    scale = np.exp(rng.uniform(np.log(50), np.log(2000), (4, 1, 1, 1))).astype(np.float32)
    offset = rng.uniform(0.01, 0.25, (4, 1, 1, 1)).astype(np.float32) * scale
    image = (image * scale + offset) * brain  # skull-stripped: exactly 0 outside the brain
    return image.astype(np.float32), label


def write_tumour_dataset(out_dir, num_cases=10, shapes=((64, 96, 96),), spacing=(1.0, 1.0, 1.0), seed=0,
                         layout="msd", labels="msd") -> list[str]:
    """Write `num_cases` tumour phantoms with ids `BRATS_XXX` and a `dataset.json`; returns the ids.

    layout "msd":    imagesTr/BRATS_XXX.nii.gz, one 4D image of the 4 channels (MSD Task01);
    layout "nnunet": imagesTr/BRATS_XXX_0000.nii.gz ... _0003.nii.gz, one 3D file per channel.
    Both: labelsTr/BRATS_XXX.nii.gz uint8, in MSD's convention (labels "msd": 1 edema,
    2 non-enhancing, 3 enhancing) or BraTS 2021's (labels "brats2021": 1 necrotic core, 2 edema,
    4 enhancing). Case i has shape `shapes[i % len(shapes)]`, an origin tens of mm from zero and a
    direction rotated 5-20 degrees about a random axis, shared by its channels and label; it
    depends only on (seed, i), so both layouts hold the same arrays. Existing files are replaced.
    """
    if layout not in ("msd", "nnunet"):
        raise ValueError(f"layout {layout!r}: expected 'msd' or 'nnunet'")
    if labels not in LABEL_NAMES:
        raise ValueError(f"labels {labels!r}: expected 'msd' or 'brats2021'")
    out_dir, ids = Path(out_dir), []
    for i in range(num_cases):
        rng = np.random.default_rng([seed, i])
        image, label = make_tumour_phantom(shapes[i % len(shapes)], spacing, rng)
        props = case_geometry(rng, spacing)
        case_id = f"BRATS_{i:03d}"
        # float32, MSD Task01's own type: the files then read back exactly as generated.
        if layout == "msd":
            write_image(image, props, out_dir / "imagesTr" / f"{case_id}.nii.gz")
        else:
            for c, channel in enumerate(image):
                write_image(channel, props, out_dir / "imagesTr" / f"{case_id}_{c:04d}.nii.gz")
        write_image(TO_BRATS2021[label] if labels == "brats2021" else label, props,
                    out_dir / "labelsTr" / f"{case_id}.nii.gz")
        ids.append(case_id)
    names = LABEL_NAMES[labels]
    if layout == "msd":
        meta = {"name": "BrainTumourPhantoms",
                "description": "Synthetic MSD Task01-style brain-tumour phantoms (synthetic_tumour.py)",
                "tensorImageSize": "4D", "modality": {str(c): n for c, n in enumerate(CHANNELS)},
                "labels": {str(v): n for v, n in names.items()}, "numTraining": len(ids), "numTest": 0,
                "training": [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in ids],
                "test": []}
    else:
        meta = {"channel_names": {str(c): n for c, n in enumerate(CHANNELS)},
                "labels": {n: v for v, n in names.items()}, "numTraining": len(ids), "file_ending": ".nii.gz"}
    write_json(out_dir / "dataset.json", meta)
    return ids
