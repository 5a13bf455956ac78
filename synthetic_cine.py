"""Synthetic short-axis cine MRI of the heart in the ACDC layout, with the true ventricular volumes
known in closed form, and two acquisition domains for transfer learning.

`make_cine_subject` paints one subject: a stack of thick short-axis slices (6-10 mm, as many as
cover the heart from below the apex to above the base, at most 12; 1.2-1.9 mm pixels) over the
cardiac cycle. The LV cavity is a prolate ellipsoid truncated at the base by a plane tilted 8-20
degrees from the slices (the mitral annulus is not parallel to them), inside a myocardial shell cut
by the same plane; the RV is a crescent wrapped around the septal side whose thickness follows a
profile in angle and height, its ends slanting across its span (the outflow tract rises above the
LV's base); two papillary muscles (myocardial signal, LV cavity label, as ACDC draws them) stand in
the cavity, and the atria appear above the base. The cavity volumes follow a cycle with ejection,
rapid filling, diastasis and atrial kick, V(t) = ESV + (EDV - ESV) f(t), f = 1 at ED (frame 1) and 0
at ES (30-40 % of the cycle). Each frame's shape is solved so that its analytic volume is V(t): the
long axis shortens (the base descends towards a fixed apex) and the LV radius is the root of the
truncated ellipsoid's closed form; the epicardium encloses V(t) plus a constant myocardial volume
(the wall thickens in systole); the RV's volume is a quadratic in its thickness. Sizes are in mm,
turned into voxels through the spacing. Around the heart lie a chest wall with a fat rim, lungs with
bright vessels, liver (apical slices), spine, descending aorta and sternum, so that a threshold
cannot find the ventricles; the heart's position, the in-plane rotation and the field of view
change per subject, each slice is shifted a little (one breath-hold each) and the heart moves a
few mm over the cycle. The image averages 5 samples across each slice's thickness (partial volume)
and carries a faint tissue texture; the label is the samples' majority, so voxel-counted volumes
agree with the analytic ones to a few percent (the basal slice's partial volume is the error).

The domains are two scanners (`DOMAINS`): "a" is 1.5 T bSSFP-like (blood about 3.5 times the
myocardium, Rician noise 2-4 % of blood, a mild smooth receive bias), "b" is 7 T-like (blood about
2 times the myocardium, different tissue contrasts, noise 5-9 %, a strong receive bias, a transmit
field whose standing waves leave dark patches, off-resonance banding, and a 5-10 times larger
intensity scale). A subject depends only on (seed, its number, domain): domains and numbers never
share anatomy, so a model fine-tuned on a few domain-b subjects is tested on unseen hearts.
`write_cine_dataset` writes the ACDC layout plus `subjects.csv` (analytic and voxel-counted
volumes); `python phantoms.py --kind cine` is its command line.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage, optimize

from cardiac import MYOCARDIUM_DENSITY, volume_ml
from dataset import write_image
from synthetic import case_geometry
from utils import atomic_write, write_csv

DOMAINS = ("a", "b")
MIN_FRAMES, MAX_FRAMES = 8, 40
SUB_SLICES = 5  # samples across a slice's thickness: the image averages them, the label takes their majority
VALVE_MM = 1.5  # half-thickness of the dark mitral annulus and leaflets along the LV's base plane
RV, MYO, LV = 1, 2, 3  # ACDC's labels: RV cavity, LV myocardium, LV cavity (papillary muscles included)

# Tissue classes of the image, the columns of CONTRAST.
AIR, LUNG, FAT, MUSCLE, TISSUE, LIVER, MARROW, CSF, BLOOD, MYOCARDIUM = range(10)
# Signal relative to blood. bSSFP at 1.5 T (a): T2/T1-weighted, bright blood, fat and CSF. A 7 T-like
# acquisition (b, spoiled-GRE-like, as bSSFP is hard at 7 T): blood bright by inflow, myocardium and
# muscle less dark, fat and CSF duller, the liver dark (short T2*).
CONTRAST = {
    #               AIR  LUNG  FAT   MUSCLE TISSUE LIVER MARROW CSF   BLOOD MYOCARDIUM
    "a": np.array([0.0, 0.05, 0.80, 0.28, 0.36, 0.30, 0.55, 0.95, 1.00, 0.27]),
    "b": np.array([0.0, 0.09, 0.62, 0.44, 0.50, 0.24, 0.60, 0.50, 1.00, 0.48]),
}
NOISE = {"a": (0.02, 0.04), "b": (0.05, 0.09)}        # Rician sigma as a share of the blood signal
BLOOD_SCALE = {"a": (200, 400), "b": (1500, 3000)}  # the blood signal in the file's units

# ACDC's five groups: LV EDV (ml), LV EF, wall thickness at ED (mm), cavity long/short semi-axis
# ratio (dilated hearts are rounder) and RV EDV / LV EDV, each a (low, high) range. The RV is a
# little larger than the LV, except beside a dilated LV (DCM, MINF) and in the abnormal-RV group.
GROUPS = {
    "NOR": ((110, 170), (0.55, 0.68), (8, 10), (1.7, 2.2), (1.05, 1.2)),
    "DCM": ((200, 250), (0.20, 0.35), (6, 8), (1.3, 1.7), (0.75, 1.0)),
    "HCM": ((90, 130), (0.60, 0.70), (13, 17), (1.6, 2.0), (1.1, 1.3)),
    "MINF": ((150, 230), (0.25, 0.45), (7, 9), (1.5, 1.9), (0.85, 1.1)),
    "RV": ((100, 150), (0.50, 0.65), (8, 10), (1.6, 2.1), (1.5, 1.8)),
}

# The RV crescent's thickness across its angular span, u in (-1, 1): blunt (the square root of a
# cosine), zero at the insertions. Its integral and its square's, for the RV's volume.
_U = (np.arange(100_000) + 0.5) / 50_000 - 1


def _rv_angle_profile(u):
    return np.sqrt(np.clip(np.cos(np.pi / 2 * np.clip(u, -1, 1)), 0, None))


_PROFILE_INTEGRALS = (float(np.mean(_rv_angle_profile(_U))) * 2, float(np.mean(_rv_angle_profile(_U) ** 2)) * 2)


def _rv_height_profile(zeta, top):
    """The RV crescent's thickness along its height, zeta 0 (its apex) to 1 (its top): two
    quarter-ellipses meeting at their maximum 1 at `top`, zero outside (0, 1)."""
    zeta = np.asarray(zeta)
    scale = np.where(zeta < top, top, 1 - top).astype(zeta.dtype)
    return np.sqrt(np.clip(1 - ((zeta - top) / scale) ** 2, 0, None))


def truncated_ellipsoid_ml(a: float, c: float, h: float, tan_tilt: float) -> float:
    """Volume in ml of the ellipsoid with semi-axes (a, a, c) (mm, c along the long axis) below a
    plane that crosses the long axis h mm above the centre, tilted by `tan_tilt` from the
    short-axis planes. Closed form: scaling by (1/a, 1/a, 1/c) maps the ellipsoid to the unit
    ball and the plane to one at distance delta = h / hypot(a tan_tilt, c) from its centre, which
    cuts off a cap of pi (1 - delta)^2 (2 + delta) / 3. Example: h = 0 and tan_tilt = 0 give the
    half ellipsoid 2/3 pi a^2 c."""
    delta = h / np.hypot(a * tan_tilt, c)
    assert -1 < delta < 1, f"the base plane (h {h:.1f} mm) misses the ellipsoid (a {a:.1f}, c {c:.1f} mm)"
    return a * a * c * np.pi * (4 / 3 - (1 - delta) ** 2 * (2 + delta) / 3) / 1000


def _radius_for(volume: float, c: float, h: float, tan_tilt: float, low: float) -> float:
    """The short semi-axis a (mm) > `low` whose truncated ellipsoid (a, a, c) holds `volume` ml."""
    return optimize.brentq(lambda a: truncated_ellipsoid_ml(a, c, h, tan_tilt) - volume, low, 500.0,
                           xtol=1e-9)


def cardiac_cycle(num_frames: int, es_index: int, rng: np.random.Generator) -> np.ndarray:
    """f (T,) in [0, 1] of the frames t = 0 .. T-1 over one cycle: 1 at frame 0 (ED) only, 0 at
    `es_index` (ES) only. Systole is a half cosine; diastole a rapid filling of 55-80 % of the
    stroke volume, a plateau (diastasis) and the atrial kick that ends at the next ED."""
    phase = np.arange(num_frames) / num_frames
    phase_es = es_index / num_frames
    early, fill_end, kick_start = rng.uniform(0.55, 0.8), rng.uniform(0.3, 0.5), rng.uniform(0.7, 0.85)
    s = np.clip((phase - phase_es) / (1 - phase_es), 0, 1)
    filling = early * (1 - np.cos(np.pi * np.minimum(s / fill_end, 1))) / 2 \
        + (1 - early) * (1 - np.cos(np.pi * np.clip((s - kick_start) / (1 - kick_start), 0, 1))) / 2
    f = np.where(phase <= phase_es, (1 + np.cos(np.pi * phase / phase_es)) / 2, filling)
    assert f[0] == 1 and f[es_index] == 0 and np.all(f[1:] < 1) and np.sum(f == 0) == 1, f
    return f


@dataclass
class _Heart:
    """The heart of one subject in its own frame: mm, the LV cavity's apex at the origin, z up the
    long axis towards the base, (x, y) = (patient left, posterior) at ED. Per-frame arrays are (T,)."""
    group: str
    volumes: dict             # analytic ml: lv_edv, lv_esv, rv_edv, rv_esv, myo
    f: np.ndarray             # the cycle (T,)
    es_index: int
    a: np.ndarray             # cavity short semi-axis (T,)
    c: np.ndarray             # cavity long semi-axis (T,), also the height of the common centre
    h: np.ndarray             # height of the base plane on the axis above the centre (T,)
    a_epi: np.ndarray         # epicardium short semi-axis (T,)
    apex_wall: float          # epicardium long semi-axis = c + apex_wall
    tan_tilt: float
    high_side: np.ndarray     # unit (2,): where the base plane is highest (the septal side, roughly)
    septum: float             # angle (rad) of the RV's centre seen from the LV axis
    rv_span: float            # RV half-span (rad)
    rv_apex: float            # height of the RV's apex at the middle of its span
    rv_slopes: np.ndarray     # how far (mm) its bottom and top rise from the middle to the end u = 1 of its span
    rv_top_share: float       # where along its height the RV is thickest
    rv_depth: np.ndarray      # the RV crescent's largest thickness (T,)
    rv_wall: float
    fat: float                # epicardial fat over the RV and in the grooves
    papillary: np.ndarray     # angles (2,) of the papillary muscles
    atria: list               # (centre (3,), semi-axes (3,)) of the left and right atrium
    motion: np.ndarray        # in-plane displacement of the whole heart (T, 2)
    shear: np.ndarray         # in-plane drift of the long axis per mm of height (2,): an oblique stack


def _rv_ends(heart: _Heart, t: int, u):
    """(bottom, top) heights of the RV crescent at angles u (its span's share, -1..1) in frame t:
    both slant across the span (the outflow tract rises above the inflow), so that the caps of
    the crescent do not lie in one plane parallel to the slices."""
    slopes = [float(s) for s in heart.rv_slopes]   # Python floats keep a float32 u float32
    return heart.rv_apex + slopes[0] * u, float(heart.c[t] + heart.h[t]) + slopes[1] * u


def _rv_coefficients(heart: _Heart, t: int, n_u: int = 256, n_z: int = 256) -> tuple[float, float]:
    """(A1, A2) with the RV volume in ml = A1 d + A2 d^2 in frame t for a crescent of largest
    thickness d. At angle span u and height z the crescent runs radially from the epicardium's
    radius R(z) to R(z) + d p(zeta) q(u), zeta the height's share between the crescent's ends at
    u, so its volume is span * integral of q (R d p + d^2 p^2 q / 2) dz du; midpoint rule in u and
    zeta."""
    u = (np.arange(n_u) + 0.5) / n_u * 2 - 1
    zeta = (np.arange(n_z) + 0.5) / n_z
    bottom, top = _rv_ends(heart, t, u)
    assert np.all(top > bottom), f"the RV's ends cross: {bottom} {top}"
    length = top - bottom                                               # (n_u,)
    z = bottom[:, None] + zeta[None] * length[:, None]                  # (n_u, n_z)
    c_epi = heart.c[t] + heart.apex_wall
    r_epi = heart.a_epi[t] * np.sqrt(np.clip(1 - ((z - heart.c[t]) / c_epi) ** 2, 0, None))
    p, q = _rv_height_profile(zeta, heart.rv_top_share), _rv_angle_profile(u)
    du, dzeta = 2 / n_u, 1 / n_z
    a1 = heart.rv_span * np.sum(q[:, None] * length[:, None] * r_epi * p[None]) * du * dzeta
    a2 = heart.rv_span / 2 * np.sum((q * q * length)[:, None] * (p * p)[None]) * du * dzeta
    return float(a1) / 1000, float(a2) / 1000


def _draw_heart(rng: np.random.Generator, num_frames: int) -> _Heart:
    """A heart of a random ACDC group whose analytic volumes follow its cycle frame by frame."""
    group = str(rng.choice(list(GROUPS)))
    edv_range, ef_range, wall_range, ratio_range, rv_range = GROUPS[group]
    edv, ef, wall, ratio = (rng.uniform(*r) for r in (edv_range, ef_range, wall_range, ratio_range))
    esv = edv * (1 - ef)
    rv_edv = edv * rng.uniform(*rv_range)
    # The RV ejects about the LV's stroke volume, within the RV EF a heart can have.
    rv_esv = rv_edv - np.clip((edv - esv) * rng.uniform(0.95, 1.1), 0.2 * rv_edv, 0.7 * rv_edv)
    es_index = int(np.clip(round(num_frames * rng.uniform(0.3, 0.4)), 2, num_frames - 3))
    f = cardiac_cycle(num_frames, es_index, rng)
    lv, rv = esv + (edv - esv) * f, rv_esv + (rv_edv - rv_esv) * f

    # ED: the base plane crosses the axis eta c above the centre; scaling (a, c, h) by s scales the
    # volume by s^3 and keeps delta, so the ED scale is closed form.
    tan_tilt = np.tan(np.deg2rad(rng.uniform(8, 20)))
    eta = rng.uniform(0.15, 0.35)
    s = (edv / truncated_ellipsoid_ml(1.0, ratio, eta * ratio, tan_tilt)) ** (1 / 3)
    a0, c0, h0 = s, ratio * s, eta * ratio * s
    apex_wall = wall * rng.uniform(0.6, 0.8)
    myo = truncated_ellipsoid_ml(a0 + wall, c0 + apex_wall, h0, tan_tilt) - edv
    # Over the cycle the apex stays, the long axis shortens by (V / EDV)^gamma (the base descends
    # 5-20 mm) and the radius takes the rest; the epicardium then encloses V + the myocardium.
    shorten = (lv / edv) ** rng.uniform(0.18, 0.28)
    c, h = c0 * shorten, h0 * shorten
    a = np.array([_radius_for(v, ci, hi, tan_tilt, 1e-3) for v, ci, hi in zip(lv, c, h)])
    a_epi = np.array([_radius_for(v + myo, ci + apex_wall, hi, tan_tilt, ai)
                      for v, ci, hi, ai in zip(lv, c, h, a)])

    septum = np.arctan2(-0.45, -0.9) + rng.uniform(-0.25, 0.25)  # the RV lies to the right, a little anterior
    high = septum + rng.uniform(-0.8, 0.8)
    papillary = septum + np.pi + np.array([-1, 1]) * rng.uniform(0.6, 0.9, 2)
    # Atria above the base: the left one behind the LV, the right one to the patient's right.
    atria = []
    for angle, distance in ((septum + np.pi + rng.uniform(-0.3, 0.3), 0.5 * a0),
                            (septum + rng.uniform(0.9, 1.3), a0 + wall + rng.uniform(5, 15))):
        centre = np.array([distance * np.cos(angle), distance * np.sin(angle), c0 + h0 + rng.uniform(15, 25)])
        atria.append((centre, np.array([rng.uniform(18, 26), rng.uniform(18, 26), rng.uniform(25, 35)])))
    direction = rng.normal(size=2)
    motion = (1 - f)[:, None] * rng.uniform(1, 4) * direction / np.linalg.norm(direction)
    volumes = {"lv_edv": truncated_ellipsoid_ml(a[0], c[0], h[0], tan_tilt),
               "lv_esv": truncated_ellipsoid_ml(a[es_index], c[es_index], h[es_index], tan_tilt),
               "rv_edv": float(rv[0]), "rv_esv": float(rv[es_index]), "myo": myo}
    signs = rng.choice([-1, 1], 2)
    heart = _Heart(group, volumes, f, es_index, a, c, h, a_epi, apex_wall, float(tan_tilt),
                   np.array([np.cos(high), np.sin(high)]), float(septum), rng.uniform(1.2, 1.55),
                   rng.uniform(0.15, 0.3) * (c0 + h0), signs * [rng.uniform(3, 8), rng.uniform(6, 14)],
                   rng.uniform(0.6, 0.8), np.zeros(num_frames), rng.uniform(3, 4.5), rng.uniform(1.5, 5),
                   papillary, atria, motion, rng.uniform(-0.08, 0.08, 2))
    # The RV's thickness per frame: the root of A1 d + A2 d^2 = its volume.
    for t in range(num_frames):
        a1, a2 = _rv_coefficients(heart, t)
        heart.rv_depth[t] = (-a1 + np.sqrt(a1 * a1 + 4 * a2 * rv[t])) / (2 * a2)
    return heart


def _heart_outline(heart: _Heart) -> np.ndarray:
    """Points (N, 2) of the heart-frame plane that enclose the heart at every frame and height,
    motion and the axis drift aside: the epicardium, the RV with its wall and fat, the atria."""
    theta = np.linspace(-np.pi, np.pi, 181)
    u = np.angle(np.exp(1j * (theta - heart.septum))) / heart.rv_span
    radius = heart.a_epi.max() + np.where(np.abs(u) < 1.5, heart.rv_depth.max() * _rv_angle_profile(u) * (np.abs(u) < 1)
                                          + heart.rv_wall + 1.3 * heart.fat, 0)
    points = [np.stack([radius * np.cos(theta), radius * np.sin(theta)], 1)]
    for centre, semi in heart.atria:
        points.append(centre[:2] + max(semi[:2]) * np.stack([np.cos(theta), np.sin(theta)], 1))
    return np.concatenate(points)


def _draw_body(rng: np.random.Generator, heart: _Heart) -> dict:
    """The static anatomy around the heart, in the heart frame at ED (mm): ellipses of the chest
    and the organs, the liver an ellipsoid below the apex."""
    a_epi = heart.a_epi[0]
    centre = np.array([-rng.uniform(25, 40), rng.uniform(10, 25)])  # the heart lies left and anterior
    semi = np.array([rng.uniform(150, 180), rng.uniform(105, 125)])
    fat, muscle = rng.uniform(8, 20), rng.uniform(8, 14)
    spine = centre + [rng.uniform(-6, 6), semi[1] - fat - rng.uniform(35, 45)]
    lungs = [(np.array([a_epi + rng.uniform(30, 45), rng.uniform(5, 25)]),
              np.array([rng.uniform(40, 55), rng.uniform(60, 80)])),
             (centre + [-rng.uniform(60, 80), rng.uniform(-15, 10)],
              np.array([rng.uniform(45, 60), rng.uniform(65, 85)]))]
    # Pulmonary vessels: bright dots in the lungs, drifting a little from slice to slice.
    vessels = []
    for _ in range(rng.integers(10, 25)):
        lung_centre, lung_semi = lungs[rng.integers(2)]
        angle, radius = rng.uniform(0, 2 * np.pi), 0.85 * np.sqrt(rng.uniform())
        vessels.append((lung_centre + radius * lung_semi * [np.cos(angle), np.sin(angle)], rng.normal(0, 0.15, 2),
                        rng.uniform(1.5, 3.5)))
    return {"centre": centre, "semi": semi, "fat": fat, "muscle": muscle, "lungs": lungs, "vessels": vessels,
            "liver": (np.array([*(centre + [-rng.uniform(20, 50), rng.uniform(20, 50)]), -rng.uniform(35, 60)]),
                      np.array([rng.uniform(80, 100), rng.uniform(60, 80), rng.uniform(50, 70)])),
            "spine": (spine, rng.uniform(14, 18)),
            "aorta": (spine + [rng.uniform(18, 28), -rng.uniform(18, 26)], rng.uniform(9, 13)),
            "sternum": centre + [rng.uniform(-6, 6), -semi[1] + fat + muscle + 4]}


def _inside(x, y, centre, semi) -> np.ndarray:
    return ((x - centre[0]) / semi[0]) ** 2 + ((y - centre[1]) / semi[1]) ** 2 <= 1


def _background(x: np.ndarray, y: np.ndarray, z: np.ndarray, body: dict) -> np.ndarray:
    """Tissue classes uint8 (L, H, W) of the anatomy around the heart at the heights z (L,) of the
    SUB_SLICES samples of each slice, where (x, y) (D, H, W) are each slice's heart-frame
    coordinates (mm). Only the liver changes within a slice."""
    c, semi = body["centre"], body["semi"]
    cls = np.full(x.shape, AIR, np.uint8)
    cls[_inside(x, y, c, semi)] = FAT
    cls[_inside(x, y, c, semi - body["fat"])] = MUSCLE
    inner = _inside(x, y, c, semi - body["fat"] - body["muscle"])
    cls[inner] = TISSUE
    for centre, lung_semi in body["lungs"]:
        cls[inner & _inside(x, y, centre, lung_semi)] = LUNG
    spine, radius = body["spine"]
    cls[inner & _inside(x, y, spine + [0, radius + 6], (45, 25))] = MUSCLE  # paraspinal muscles
    cls[_inside(x, y, spine, (radius, radius))] = MARROW
    cls[_inside(x, y, spine + [0, radius + 7], (6, 6))] = CSF
    centre, radius = body["aorta"]
    cls[_inside(x, y, centre, (radius, radius))] = BLOOD
    cls[_inside(x, y, body["sternum"], (12, 6))] = MARROW
    mid = z.reshape(-1, SUB_SLICES).mean(1)[:, None, None]   # each slice's centre height
    for centre, drift, radius in body["vessels"]:
        vessel = _inside(x, y, (centre[0] + drift[0] * mid, centre[1] + drift[1] * mid), (radius, radius))
        cls[vessel & (cls == LUNG)] = BLOOD
    cls, inner, x, y = (np.repeat(v, SUB_SLICES, axis=0) for v in (cls, inner, x, y))
    # The liver's cross-section shrinks away from its centre height, so it fills the apical slices.
    centre, liver = body["liver"]
    scale = np.sqrt(np.clip(1 - ((z - centre[2]) / liver[2]) ** 2, 0, None))[:, None, None] + 1e-6
    cls[inner & _inside(x, y, centre, (liver[0] * scale, liver[1] * scale))] = LIVER
    return cls


def _render_heart(x: np.ndarray, y: np.ndarray, z: np.ndarray, heart: _Heart, t: int, background: np.ndarray):
    """`(tissue classes, label)` uint8 (L, h, w) of frame t, with the heart painted over
    `background` (L, h, w). (x, y) float32 (L, h, w) are heart-frame coordinates of the voxels at
    ED and z (L,) their heights; the motion and the drift of the axis are applied here. float32
    throughout (the scalars are Python floats), as this is the generator's inner loop."""
    drift = heart.motion[t][:, None] + heart.shear[:, None] * (z - heart.c[0])[None]   # (2, L)
    x = x - drift[0].astype(np.float32)[:, None, None]
    y = y - drift[1].astype(np.float32)[:, None, None]
    r2 = x * x + y * y
    a, c, h = float(heart.a[t]), float(heart.c[t]), float(heart.h[t])
    a_epi, c_epi = float(heart.a_epi[t]), float(heart.c[t] + heart.apex_wall)
    dz = (z - c).astype(np.float32)[:, None, None]   # height above the common centre (L, 1, 1)
    tilt = heart.tan_tilt * heart.high_side
    plane = h + float(tilt[0]) * x + float(tilt[1]) * y
    below = dz < plane
    r_cav2 = a * a * np.clip(1 - dz * dz / (c * c), 0, None)
    r_epi2 = a_epi * a_epi * np.clip(1 - dz * dz / (c_epi * c_epi), 0, None)
    cavity = below & (r2 <= r_cav2)
    epi = below & (r2 <= r_epi2)

    cls, label = background.copy(), np.zeros(x.shape, np.uint8)
    for centre, semi in heart.atria:
        levels = np.abs(z - centre[2]) < semi[2]
        if levels.any():
            k = (1 - ((z[levels] - centre[2]) / semi[2]) ** 2).astype(np.float32)[:, None, None]
            atrium = ((x[levels] - float(centre[0])) / float(semi[0])) ** 2 \
                + ((y[levels] - float(centre[1])) / float(semi[1])) ** 2 <= k
            cls[levels] = np.where(atrium & ~below[levels], np.uint8(BLOOD), cls[levels])

    # The RV: a crescent outside the (uncut) epicardium, with a thin wall and fat outside it.
    lowest, highest = heart.rv_apex - abs(heart.rv_slopes[0]), c + h + abs(heart.rv_slopes[1])
    levels = (z > lowest) & (z < highest)
    if levels.any():
        r, r_epi = np.sqrt(r2[levels]), np.sqrt(r_epi2[levels])
        cos, sin = np.cos(heart.septum), np.sin(heart.septum)
        xs, ys = x[levels], y[levels]
        u = np.arctan2(ys * cos - xs * sin, xs * cos + ys * sin) / np.float32(heart.rv_span)  # signed, 0 at the centre
        bottom, top = _rv_ends(heart, t, np.clip(u, -1, 1))
        p = _rv_height_profile((z[levels].astype(np.float32)[:, None, None] - bottom) / (top - bottom),
                               heart.rv_top_share)
        u = np.abs(u)
        inside = p > 0
        depth = float(heart.rv_depth[t]) * p * _rv_angle_profile(u) * (u < 1)
        # Past the insertions the wall tapers over its own thickness, measured along the epicardium.
        taper = np.clip(1 - (u - 1) * heart.rv_span * np.maximum(r_epi, 5) / heart.rv_wall, 0, 1)
        wall = np.where(u < 1, depth + heart.rv_wall, heart.rv_wall * taper) * inside
        fat = wall + heart.fat * (0.3 + np.exp(-((u - 1) / 0.15) ** 2)) * ((u < 1.5) & inside)
        outside = r > r_epi
        sub_cls, sub_label = cls[levels], label[levels]
        sub_cls[outside & (r < r_epi + fat)] = FAT
        sub_cls[outside & (r < r_epi + wall)] = MYOCARDIUM
        rv = outside & (r < r_epi + depth)
        sub_cls[rv] = BLOOD
        sub_label[rv] = RV
        cls[levels], label[levels] = sub_cls, sub_label

    cls[epi] = MYOCARDIUM
    label[epi] = MYO
    cls[cavity] = BLOOD
    label[cavity] = LV
    # The mitral annulus and leaflets: a dark band along the base plane over the LV's footprint,
    # the image's only mark of where the cavity ends and the atrium begins in a slice the plane
    # crosses (the label keeps the plane; without the band, one pool of blood would hold both).
    cls[(np.abs(dz - plane) < VALVE_MM) & (r2 <= r_epi2)] = MYOCARDIUM
    # Papillary muscles: myocardial signal in the mid and apical cavity, labelled cavity (ACDC).
    levels = (z > 0.15 * (c + h)) & (z < 0.55 * (c + h))
    if levels.any():
        r_cav = np.sqrt(r_cav2[levels])
        sub_cls, xs, ys, sub_cavity = cls[levels], x[levels], y[levels], cavity[levels]
        for angle in heart.papillary:
            px, py = 0.62 * r_cav * np.cos(angle), 0.62 * r_cav * np.sin(angle)
            sub_cls[sub_cavity & ((xs - px) ** 2 + (ys - py) ** 2 <= (0.2 * r_cav) ** 2)] = MYOCARDIUM
        cls[levels] = sub_cls
    return cls, label


def _majority(label: np.ndarray) -> np.ndarray:
    """Per voxel, the label (uint8 (D, h, w)) most of its SUB_SLICES samples (D * S, h, w) hold;
    the slice's centre sample breaks ties."""
    label = label.reshape(-1, SUB_SLICES, *label.shape[1:])
    centre = label[:, SUB_SLICES // 2]
    votes = np.stack([(label == k).sum(1) + 0.5 * (centre == k) for k in range(4)])
    return np.argmax(votes, axis=0).astype(np.uint8)


def _texture(shape, rng: np.random.Generator, amplitude: float = 0.05) -> np.ndarray:
    """A multiplicative tissue texture float32 (D, H, W), 1 +- about `amplitude`: noise smoothed
    over a few pixels in-plane, independent between the thick slices."""
    coarse = ndimage.gaussian_filter(rng.standard_normal((shape[0], shape[1] // 3 + 2, shape[2] // 3 + 2)), (0, 1, 1))
    fine = ndimage.zoom(coarse / coarse.std(), (1, shape[1] / coarse.shape[1], shape[2] / coarse.shape[2]), order=1)
    return (1 + amplitude * fine[:, :shape[1], :shape[2]]).astype(np.float32)


def _smooth_field(shape, spacing, rng: np.random.Generator) -> np.ndarray:
    """A random quadratic in (z, y, x) over the grid (D, H, W), scaled to max |.| = 1."""
    axes = [(np.arange(n) - (n - 1) / 2) * s / 150 for n, s in zip(shape, spacing)]   # about -1..1 over a chest
    z, y, x = np.meshgrid(*axes, indexing="ij")
    field = sum(k * v for k, v in zip(rng.normal(size=9), (z, y, x, z * z, y * y, x * x, y * x, z * y, z * x)))
    return field / np.abs(field).max()


def _fields(shape, spacing, domain: str, rng: np.random.Generator) -> np.ndarray:
    """The multiplicative intensity field (D, H, W) of a domain. a: a smooth receive bias of
    +-8-16 %. b: a receive bias of +-25-40 % times a transmit field of standing waves (7 T's RF
    wavelength in tissue is about 12 cm; where waves cancel the flip angle and the signal drop)
    times bSSFP-like off-resonance bands, dark lines where the phase per TR crosses pi."""
    bias = np.exp((rng.uniform(0.08, 0.16) if domain == "a" else rng.uniform(0.25, 0.4))
                  * _smooth_field(shape, spacing, rng))
    if domain == "a":
        return bias
    z, y, x = np.meshgrid(*[(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing)], indexing="ij")
    wave = np.ones(shape, complex)
    for _ in range(3):
        k = rng.normal(size=3) * [0.3, 1, 1]
        k *= 2 * np.pi / rng.uniform(100, 140) / np.linalg.norm(k)
        wave += rng.uniform(0.3, 0.6) * np.exp(1j * (k[0] * z + k[1] * y + k[2] * x + rng.uniform(0, 2 * np.pi)))
    b1 = np.abs(wave) / np.median(np.abs(wave))
    flip = rng.uniform(0.8, 1.1)  # nominal flip angle, rad
    transmit = np.sin(np.minimum(flip * b1, 0.95 * np.pi)) / np.sin(flip)
    g = rng.normal(size=3) * [0.3, 1, 1]
    g *= 2 * np.pi * rng.uniform(0.5, 1.5) / (max(shape[1] * spacing[1], shape[2] * spacing[2]) * np.linalg.norm(g))
    phase = g[0] * z + g[1] * y + g[2] * x + rng.uniform(1, 2) * np.pi * _smooth_field(shape, spacing, rng) \
        + rng.uniform(0, 2 * np.pi)
    off = np.abs(np.angle(np.exp(1j * phase)))   # 0 .. pi; a band where it nears pi
    bands = 1 - rng.uniform(0.5, 0.85) * np.exp(-((np.pi - off) / rng.uniform(0.15, 0.3)) ** 2 / 2)
    return bias * np.clip(transmit, 0.02, None) * bands


@dataclass
class CineSubject:
    """One synthetic subject. `image` float32 (T, D, H, W) and `label` uint8 (T, D, H, W) in
    ACDC's labels (0 background, 1 RV cavity, 2 LV myocardium, 3 LV cavity) for every frame;
    `props` the 3D geometry (spacing (sz, sy, sx) mm, origin, direction); `ed`, `es` 1-based frame
    numbers; `volumes` the analytic ml (lv_edv, lv_esv, rv_edv, rv_esv, and myo, the myocardium's
    volume, the same in every frame); `group`, `height` (cm), `weight` (kg) for Info.cfg."""
    image: np.ndarray
    label: np.ndarray
    props: dict
    ed: int
    es: int
    volumes: dict
    group: str
    height: float
    weight: float


def make_cine_subject(rng=None, domain: str = "a", num_frames: int = 12) -> CineSubject:
    """One subject's short-axis cine stack and labels for all frames (see the module's docstring).
    `rng` is a `numpy.random.Generator` (or a seed, or None for fresh entropy). About 0.5 s for
    12 frames on one CPU core."""
    if domain not in DOMAINS:
        raise ValueError(f"domain {domain!r}: expected one of {DOMAINS}")
    if not MIN_FRAMES <= num_frames <= MAX_FRAMES:
        raise ValueError(f"num_frames {num_frames}: expected {MIN_FRAMES} to {MAX_FRAMES}")
    rng = np.random.default_rng(rng)
    heart = _draw_heart(rng, num_frames)
    body = _draw_body(rng, heart)

    # The stack: from below the apex to above the highest point of the basal myocardium at ED,
    # 8-12 slices of 6-10 mm (thicker when the heart is long, extra slices below a short one).
    base = float(np.max(heart.c + heart.h + np.maximum(heart.tan_tilt * heart.a_epi, abs(heart.rv_slopes[1]))))
    below, above = rng.uniform(0.2, 1.0), rng.uniform(0.1, 0.5)   # margins in slices
    extent = base + heart.apex_wall
    thickness = rng.uniform(6, 10)
    depth = int(np.ceil(extent / thickness + below + above))
    if depth > 12:
        thickness, depth = extent / (12 - below - above), 12
    depth = max(depth, 8)
    top = base + above * thickness
    z = top - (np.arange(depth * SUB_SLICES) + 0.5) / SUB_SLICES * thickness   # sample heights (L,), base first

    # In-plane: the heart's bounding box in the image decides the field of view and where it sits.
    psi = rng.uniform(-np.pi / 4, np.pi / 4)
    rot = np.array([[np.cos(psi), -np.sin(psi)], [np.sin(psi), np.cos(psi)]])
    shift_sd = rng.uniform(0.3, 1.2)   # mm; each slice is its own breath-hold
    shifts = np.clip(rng.normal(0, shift_sd, (depth, 2)), -2.5 * shift_sd, 2.5 * shift_sd)
    margin = np.abs(heart.motion).max() + np.abs(heart.shear).max() * np.sqrt(2) * abs(top - z[-1]) \
        + 2.5 * shift_sd * np.sqrt(2) + 4
    outline = _heart_outline(heart) @ rot.T     # image (x, y) relative to the heart, mm
    lo, hi = outline.min(0) - margin, outline.max(0) + margin
    pixel = rng.uniform(1.2, 1.9)
    need = (hi - lo) + 30   # at least 15 mm of surroundings on each side
    pixel = max(pixel, float(need.max()) / 176)
    size = [max(int(rng.integers(112, 177)), int(np.ceil(n / pixel))) for n in need]   # (W, H)
    fov = np.array(size) * pixel
    centre = np.array([rng.uniform(-f / 2 - a + 15, f / 2 - b - 15) for f, a, b in zip(fov, lo, hi)])
    width, height = size
    shape = (depth, height, width)
    spacing = (float(thickness), float(pixel), float(pixel))

    # Heart-frame coordinates (x, y) of every pixel of every slice, then of every sample.
    ix = (np.arange(width) - (width - 1) / 2) * pixel - centre[0]
    iy = (np.arange(height) - (height - 1) / 2) * pixel - centre[1]
    gx, gy = np.meshgrid(ix, iy)   # (H, W) image mm relative to the heart
    hx = (rot[0, 0] * gx + rot[1, 0] * gy)[None] - shifts[:, 0, None, None]   # rot^T: image -> heart frame
    hy = (rot[0, 1] * gx + rot[1, 1] * gy)[None] - shifts[:, 1, None, None]
    hx, hy = hx.astype(np.float32), hy.astype(np.float32)
    background = _background(hx, hy, z, body)
    hx, hy = np.repeat(hx, SUB_SLICES, axis=0), np.repeat(hy, SUB_SLICES, axis=0)
    box = tuple(slice(int(np.clip(np.floor((centre[i] + lo[i]) / pixel + (n - 1) / 2), 0, n)),
                      int(np.clip(np.ceil((centre[i] + hi[i]) / pixel + (n - 1) / 2) + 1, 0, n)))
                for i, n in ((1, height), (0, width)))

    contrast = (CONTRAST[domain] * rng.uniform(0.92, 1.08, len(CONTRAST[domain]))).astype(np.float32)
    contrast[BLOOD] = 1.0
    static = contrast[background].reshape(depth, SUB_SLICES, height, width).mean(1)
    image = np.repeat(static[None], num_frames, axis=0)
    label = np.zeros((num_frames, *shape), np.uint8)
    region = (slice(None), *box)
    for t in range(num_frames):
        cls, lab = _render_heart(hx[region], hy[region], z, heart, t, background[region])
        image[(t, *region)] = contrast[cls].reshape(depth, SUB_SLICES, *cls.shape[1:]).mean(1)
        label[(t, *region)] = _majority(lab)
    # The myocardium closes the cavity in every slice: a cavity voxel with a neighbour in the
    # plane that is neither cavity nor myocardium (at the tilted base, where the majority of the
    # samples of two neighbours can differ) becomes myocardium.
    open_edge = (label == LV) & ndimage.binary_dilation(label < MYO, np.ones((1, 1, 3, 3), bool))
    label[open_edge] = MYO

    # Acquisition: slice-to-slice gain, in-plane blur, the domain's fields, scale, Rician noise.
    image *= (1 + rng.normal(0, 0.02, depth)).astype(np.float32)[:, None, None]
    image *= _texture(shape, rng)
    image = ndimage.gaussian_filter(image, (0, 0, *[rng.uniform(0.5, 0.8)] * 2), truncate=3.0)
    image *= _fields(shape, spacing, domain, rng).astype(np.float32)
    scale = rng.uniform(*BLOOD_SCALE[domain])
    sigma = np.float32(rng.uniform(*NOISE[domain]) * scale)
    image *= np.float32(scale)
    real = image + sigma * rng.standard_normal(image.shape, dtype=np.float32)
    imag = sigma * rng.standard_normal(image.shape, dtype=np.float32)
    image = np.rint(np.sqrt(real * real + imag * imag))   # whole numbers, as a scanner stores them

    props = case_geometry(rng, spacing)
    height_cm = float(np.round(rng.uniform(150, 195)))
    weight_kg = float(np.round(rng.uniform(19, 32) * (height_cm / 100) ** 2))
    return CineSubject(image.astype(np.float32), label, props, 1, heart.es_index + 1, heart.volumes,
                       heart.group, height_cm, weight_kg)


def subject_row(subject_id: str, domain: str, s: CineSubject) -> dict:
    """The subject's row of subjects.csv: its frames, the analytic LV and RV volumes and EF, the
    voxel-counted ones of its ED and ES labels, and the LV mass (1.05 g/ml x the voxel-counted
    myocardium at ED; the analytic mass beside it)."""
    ed, es, v, sp = s.label[s.ed - 1], s.label[s.es - 1], s.volumes, s.props["spacing"]
    return {"id": subject_id, "domain": domain, "group": s.group, "ed_frame": s.ed, "es_frame": s.es,
            "num_frames": len(s.label),
            "lv_edv_ml": round(v["lv_edv"], 2), "lv_esv_ml": round(v["lv_esv"], 2),
            "lv_ef_pct": round(100 * (v["lv_edv"] - v["lv_esv"]) / v["lv_edv"], 2),
            "rv_edv_ml": round(v["rv_edv"], 2), "rv_esv_ml": round(v["rv_esv"], 2),
            "rv_ef_pct": round(100 * (v["rv_edv"] - v["rv_esv"]) / v["rv_edv"], 2),
            "lv_edv_voxel_ml": round(volume_ml(ed, sp, LV), 2), "lv_esv_voxel_ml": round(volume_ml(es, sp, LV), 2),
            "rv_edv_voxel_ml": round(volume_ml(ed, sp, RV), 2), "rv_esv_voxel_ml": round(volume_ml(es, sp, RV), 2),
            "lv_mass_g": round(MYOCARDIUM_DENSITY * volume_ml(ed, sp, MYO), 2),
            "lv_mass_analytic_g": round(MYOCARDIUM_DENSITY * v["myo"], 2)}


def info_cfg(s: CineSubject) -> str:
    """ACDC's Info.cfg text: `ED: 1`, `ES: 5`, `Group: NOR`, `Height: 178.0`, `NbFrame: 12`, `Weight: 80.0`."""
    return (f"ED: {s.ed}\nES: {s.es}\nGroup: {s.group}\nHeight: {s.height:.1f}\nNbFrame: {len(s.image)}\n"
            f"Weight: {s.weight:.1f}\n")


def subject_seed(seed: int, number: int, domain: str) -> list[int]:
    """The seed of subject `number` (patientXXX's XXX) of a domain: disjoint subjects per domain."""
    return [seed, number, DOMAINS.index(domain)]


def write_cine_dataset(out_dir, num_subjects: int = 10, seed: int = 0, domain: str = "a", num_frames: int = 12,
                       first_id: int = 1) -> list[str]:
    """Write subjects patient{first_id:03d} ... in the ACDC layout and return their ids:

    <out_dir>/patientXXX/patientXXX_4d.nii.gz          float32 cine, 4D (x, y, z, t)
    <out_dir>/patientXXX/patientXXX_frameYY.nii.gz     the ED and ES frames (YY 1-based)
    <out_dir>/patientXXX/patientXXX_frameYY_gt.nii.gz  uint8 labels 0 bg, 1 RV, 2 myocardium, 3 LV
    <out_dir>/patientXXX/Info.cfg                       ED, ES, Group, Height, NbFrame, Weight
    <out_dir>/subjects.csv                              one row per subject (`subject_row`)

    Subject number n depends only on (seed, n, domain). Existing files of these subjects are
    replaced; rows of subjects.csv for other patient folders still present are kept."""
    if num_subjects < 1 or first_id < 1 or first_id + num_subjects - 1 > 999:
        raise ValueError(f"first_id {first_id}, num_subjects {num_subjects}: expected at least one subject, "
                         "ids within 1..999")
    out_dir, rows = Path(out_dir), []
    for number in range(first_id, first_id + num_subjects):
        s = make_cine_subject(np.random.default_rng(subject_seed(seed, number, domain)), domain, num_frames)
        subject_id = f"patient{number:03d}"
        folder = out_dir / subject_id
        write_image(s.image, s.props, folder / f"{subject_id}_4d.nii.gz")
        for frame in (s.ed, s.es):
            write_image(s.image[frame - 1], s.props, folder / f"{subject_id}_frame{frame:02d}.nii.gz")
            write_image(s.label[frame - 1], s.props, folder / f"{subject_id}_frame{frame:02d}_gt.nii.gz")
        text = info_cfg(s)
        atomic_write(folder / "Info.cfg", lambda tmp, text=text: Path(tmp).write_text(text))
        rows.append(subject_row(subject_id, domain, s))
    ids = [r["id"] for r in rows]
    table = out_dir / "subjects.csv"
    if table.is_file():   # keep the rows of the subjects written before and still there
        with open(table, newline="") as f:
            kept = [r for r in csv.DictReader(f) if list(r) == list(rows[0]) and r["id"] not in ids
                    and (out_dir / r["id"] / "Info.cfg").is_file()]
        rows = sorted(kept + rows, key=lambda r: r["id"])
    write_csv(table, rows)
    return ids
