"""Segmentation metrics of binary masks: overlap ratios and surface distances in millimetres,
and their summary over cases.

numpy in, floats out. `compute_metrics` is the one entry point that evaluation, prediction
and training share; `overlap_metrics` and `dice` are its voxel-counting part, cheap enough to
call every validation epoch. Distances are exact Euclidean distances between surface voxel
centres, scaled by the voxel spacing, found with nearest-neighbour queries between the two
surface point sets inside the union's bounding box (no distance transform of the volume).
`structure_metrics` scores the classes and regions (unions of classes) of two integer label maps
with the same metrics, one row per structure, and `describe_structures` and
`format_structure_table` summarise those rows per structure.
How these definitions compare with MONAI's, medpy's, surface-distance's and SimpleITK's:
docs/metrics.md.

Empty-mask policy (tested in tests/test_metrics.py): no metric is ever NaN or inf, so a mean
over cases never silently drops a case that a model got wrong.
- both masks empty: a perfect answer, every ratio 1 and every distance 0;
- exactly one empty (a missed or an invented atrium): Dice and IoU 0, and every distance is the
  volume's diagonal in mm, |(D sz, H sy, W sx)|, more than any two voxel centres can be apart,
  so such a case always scores worse than any prediction that found something;
- any other ratio with a zero denominator (precision with nothing predicted, recall with
  nothing to find, specificity with no background) is 1 when both masks agree on that
  emptiness and 0 otherwise.
"""
from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.spatial import cKDTree

from dataset import binary_mask, bounding_box

METRIC_KEYS = ("dice", "iou", "precision", "recall", "specificity", "hd", "hd95", "assd")
DISTANCE_KEYS = ("hd", "hd95", "assd")  # millimetres


def _counts(pred: np.ndarray, target: np.ndarray) -> tuple[int, int, int, int]:
    assert pred.shape == target.shape, f"pred {pred.shape} vs target {target.shape}"
    p, t = pred.astype(bool, copy=False), target.astype(bool, copy=False)
    tp = int(np.count_nonzero(p & t))
    fp = int(np.count_nonzero(p)) - tp
    fn = int(np.count_nonzero(t)) - tp
    tn = p.size - tp - fp - fn
    return tp, fp, fn, tn


def _ratio(num: int, den: int, agree: bool) -> float:
    return num / den if den else (1.0 if agree else 0.0)


def _overlap_from_counts(tp: int, fp: int, fn: int, tn: int) -> dict[str, float]:
    both_empty = tp + fp + fn == 0
    return {
        "dice": _ratio(2 * tp, 2 * tp + fp + fn, both_empty),
        "iou": _ratio(tp, tp + fp + fn, both_empty),
        "precision": _ratio(tp, tp + fp, fn == 0),
        "recall": _ratio(tp, tp + fn, fp == 0),
        "specificity": _ratio(tn, tn + fp, fn == 0),
    }


def overlap_metrics(pred: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """Dice = 2|A n B| / (|A| + |B|), IoU = |A n B| / |A u B|, precision = |A n B| / |A|,
    recall = |A n B| / |B| and specificity = |~A n ~B| / |~B| of a prediction A and a target B,
    both (D, H, W) masks (bool or 0/1). Zero denominators follow the module's empty-mask policy."""
    return _overlap_from_counts(*_counts(pred, target))


def dice(pred: np.ndarray, target: np.ndarray) -> float:
    """Dice of two (D, H, W) masks; 1 when both are empty."""
    return overlap_metrics(pred, target)["dice"]


def _check_spacing(spacing, ndim: int) -> np.ndarray:
    s = np.asarray(spacing, dtype=np.float64)
    if s.shape != (ndim,) or not np.all(np.isfinite(s)) or not np.all(s > 0):
        raise ValueError(f"spacing: expected {ndim} positive voxel sizes in mm (array order), got {spacing!r}")
    return s


def surface(mask: np.ndarray) -> np.ndarray:
    """Surface voxels of a bool mask: foreground voxels with at least one of their 2 * ndim face
    neighbours (6 in 3D) in the background.

    Voxels outside the array count as background, so foreground on the array's border is
    surface. This equals `mask & ~scipy.ndimage.binary_erosion(mask)` with its default cross
    structuring element and `border_value=0`, the edges MONAI (`get_mask_edges`) and medpy
    (connectivity 1) measure from; written with shifted slices, which is faster than the
    generic erosion.
    SimpleITK's BinaryContourImageFilter (face connectivity) marks the same voxels except on
    the image border, which it does not treat as background.
    """
    padded = np.pad(mask, 1)
    core = tuple(slice(1, -1) for _ in range(mask.ndim))
    interior = mask.copy()
    for axis in range(mask.ndim):
        for start in (0, 2):
            shifted = list(core)
            shifted[axis] = slice(start, start + mask.shape[axis])
            interior &= padded[tuple(shifted)]
    return mask & ~interior


def _directed_distances(from_surface: np.ndarray, to_surface: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """Distance in mm from each voxel of `from_surface` to the nearest voxel of `to_surface`.

    A voxel on both surfaces is at distance 0 and needs no query: for a good segmentation that
    is a large share of the surface, and the query is the expensive part."""
    shared = int(np.count_nonzero(from_surface & to_surface))
    others = np.argwhere(from_surface & ~to_surface) * spacing
    if others.shape[0] == 0:
        return np.zeros(shared)
    tree = cKDTree(np.argwhere(to_surface) * spacing, leafsize=32, balanced_tree=False, compact_nodes=False)
    nearest, _ = tree.query(others, k=1)
    return np.concatenate([np.zeros(shared), nearest])


def surface_distances(pred: np.ndarray, target: np.ndarray, *, spacing) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances of two non-empty (D, H, W) bool masks.

    `spacing`: (sz, sy, sx) mm, array order. Returns `(pred_to_target, target_to_pred)`: for each
    surface voxel of `pred` the distance in mm to the nearest surface voxel of `target`, and the
    other way round (unordered 1-D float64 arrays)."""
    assert pred.any() and target.any(), "surface distances need two non-empty masks"
    box = bounding_box(pred | target)
    p, t = surface(pred[box]), surface(target[box])
    s = np.asarray(spacing, dtype=np.float64)
    return _directed_distances(p, t, s), _directed_distances(t, p, s)


def worst_distance(shape, spacing) -> float:
    """The volume's diagonal in mm, |(D sz, H sy, W sx)|: the distance given to a missed or an
    invented atrium, larger than any distance between two voxel centres of the volume."""
    return float(np.linalg.norm(np.asarray(shape, dtype=np.float64) * np.asarray(spacing, dtype=np.float64)))


def compute_metrics(pred: np.ndarray, target: np.ndarray, *, spacing) -> dict[str, float]:
    """All metrics of one case: a prediction A against a target B.

    pred, target: (D, H, W) masks, bool or numbers in {0, 1}. spacing: (sz, sy, sx) mm, array
    order. Returns floats keyed by METRIC_KEYS: the ratios of `overlap_metrics`, then

    - hd: Hausdorff distance, max(max_{a in dA} d(a, dB), max_{b in dB} d(b, dA)), where dA is
      the surface of A (see `surface`) and d(x, S) the distance in mm from voxel centre x to the
      nearest voxel centre of S;
    - hd95: the larger of the two directed 95th percentiles, max(P95{d(a, dB)}, P95{d(b, dA)}),
      percentiles interpolated linearly between order statistics (numpy's and torch's
      default);
    - assd: average symmetric surface distance, the mean of all |dA| + |dB| distances pooled,
      so each surface voxel weighs the same.

    MONAI 1.6 computes the same hd95 and assd, medpy 0.5.2 the same hd and assd but pools both
    directions for its hd95; docs/metrics.md gives each peer's convention.

    Empty masks follow the module's policy: both empty -> ratios 1 and distances 0; one empty
    -> Dice 0 and every distance `worst_distance(shape, spacing)`. Raises ValueError for masks
    of different shapes, non-binary values, or a spacing that is not one positive size per axis.
    """
    p, t = binary_mask(pred, "pred"), binary_mask(target, "target")
    if p.shape != t.shape:
        raise ValueError(f"pred {p.shape} and target {t.shape} must have the same shape")
    return _metrics_in_box(p, t, p.shape, _check_spacing(spacing, p.ndim))


def _metrics_in_box(p: np.ndarray, t: np.ndarray, shape: tuple[int, ...], s: np.ndarray) -> dict[str, float]:
    """`compute_metrics` of two bool masks cut out of a volume of `shape` by a box that holds all
    their foreground: the voxels outside it are true negatives, and the worst distance is the
    whole volume's diagonal."""
    size = int(np.prod(shape))
    box = bounding_box(p | t)
    if box is None:
        return {**_overlap_from_counts(0, 0, 0, size), "hd": 0.0, "hd95": 0.0, "assd": 0.0}
    # Every foreground voxel is inside the box, so counting there is counting everywhere.
    p, t = p[box], t[box]
    tp, fp, fn, _ = _counts(p, t)
    out = _overlap_from_counts(tp, fp, fn, size - tp - fp - fn)
    if tp + fp == 0 or tp + fn == 0:
        worst = worst_distance(shape, s)
        return {**out, "hd": worst, "hd95": worst, "assd": worst}
    d_pt, d_tp = surface_distances(p, t, spacing=s)
    return {**out,
            "hd": float(max(d_pt.max(), d_tp.max())),
            "hd95": float(max(np.percentile(d_pt, 95), np.percentile(d_tp, 95))),
            "assd": float((d_pt.sum() + d_tp.sum()) / (d_pt.size + d_tp.size))}


STRUCTURE = "structure"  # the column naming a class or a region in per-structure rows


def _label_maps(pred, target) -> tuple[np.ndarray, np.ndarray]:
    p, t = np.asarray(pred), np.asarray(target)
    if p.dtype.kind not in "iu" or t.dtype.kind not in "iu":
        raise ValueError(f"pred ({p.dtype}) and target ({t.dtype}) must be integer label maps; "
                         "score a binary mask with compute_metrics")
    if p.shape != t.shape:
        raise ValueError(f"pred {p.shape} and target {t.shape} must have the same shape")
    return p, t


def _check_structures(structures) -> list[tuple[str, tuple[int, ...]]]:
    checked = []
    for item in structures:
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise ValueError(f"structures: expected (name, values) pairs, got {item!r}")
        name, values = item
        ok = isinstance(values, (tuple, list)) and len(values) > 0 and all(
            isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)) and v != 0 for v in values)
        if not ok:
            raise ValueError(f"structure {name!r}: values must be a non-empty tuple of non-zero integer labels "
                             f"(0 is background), got {values!r}")
        checked.append((str(name), tuple(int(v) for v in values)))
    names = [n for n, _ in checked]
    if not checked or len(set(names)) != len(names):
        raise ValueError(f"structures: expected at least one (name, values) pair and distinct names, got {names}")
    return checked


def _hull(a: tuple[slice, ...] | None, b: tuple[slice, ...] | None) -> tuple[slice, ...] | None:
    if a is None or b is None:
        return a or b
    return tuple(slice(min(x.start, y.start), max(x.stop, y.stop)) for x, y in zip(a, b))


def structure_metrics(pred: np.ndarray, target: np.ndarray, structures, *, spacing) -> list[dict]:
    """`compute_metrics` of each class or region of two label maps, one row per structure.

    pred, target: (D, H, W) integer label maps (any integer dtype, 0 background). structures:
    `(name, values)` pairs, `values` a tuple of non-zero labels: a class is one value, a region
    several, e.g. `[("edema", (1,)), ("whole tumour", (1, 2, 3)), ("tumour core", (2, 3))]`.
    spacing: (sz, sy, sx) mm, array order. Returns, in the order given,
    `{"structure": name, **compute_metrics(np.isin(pred, values), np.isin(target, values))}`:
    the module's empty-mask policy per structure, so a structure absent from both maps scores
    as a perfect answer.

    Each structure's masks are made inside the bounding box of both maps' non-zero voxels only:
    outside it every structure's voxels are true negatives, counted from the full shape, and
    the worst distance is the full volume's diagonal, so the rows equal the full-volume ones.
    Raises ValueError for float or bool maps, maps of different shapes, a bad spacing, or a
    structure whose values are empty, non-integer or 0.
    """
    p, t = _label_maps(pred, target)
    s = _check_spacing(spacing, p.ndim)
    checked = _check_structures(structures)
    shape = p.shape
    box = _hull(bounding_box(p), bounding_box(t)) or tuple(slice(0, 0) for _ in shape)
    p, t = p[box], t[box]
    return [{STRUCTURE: name, **_metrics_in_box(np.isin(p, values), np.isin(t, values), shape, s)}
            for name, values in checked]


EMPTY_MASK_RULE = ("both masks empty: every ratio 1 and every distance 0; exactly one empty (a missed or an "
                   "invented atrium): Dice and IoU 0 and every distance the volume's diagonal in mm")
# How BraTS's own evaluations score empty regions; docs/metrics.md gives the sources.
BRATS_EMPTY_MASK_RULE = (
    "BraTS 2021 (CaPTk's GetBraTSLabelStatistics): both empty -> Dice 1 and HD95 0, as ours; exactly one empty -> "
    "Dice 0 and HD95 the image diagonal counted in voxels, sqrt(240^2 + 240^2 + 155^2) = 373.13 on BraTS's 1 mm "
    "grid, where it equals ours (ours scales each axis by its spacing). BraTS 2023 lesion-wise (BraTS-2023-Metrics): "
    "each missed or invented lesion scores Dice 0 and HD95 a fixed 374, a region absent from both Dice 1 and HD95 0, "
    "and its full-volume ('legacy') HD95 with one side empty is 374, not the diagonal. MONAI's DiceMetric with "
    "ignore_empty=True (its default) gives NaN whenever the reference is empty, invented regions included, so its "
    "mean leaves those cases out; ignore_empty=False scores an empty reference 1 if the prediction is empty too, "
    "else 0.")


def describe_cases(rows: list[dict[str, float]], keys=METRIC_KEYS) -> dict:
    """The number of cases and, per metric, mean, standard deviation (population) and median."""
    out: dict = {"cases": len(rows)}
    for k in keys:
        v = np.array([r[k] for r in rows], dtype=np.float64)
        out[k] = {"mean": float(v.mean()), "std": float(v.std()), "median": float(np.median(v))}
    return out


def describe_structures(rows: list[dict], keys=METRIC_KEYS) -> dict[str, dict]:
    """`describe_cases` per structure of per-structure rows (each with a "case_id" and a
    "structure", as `structure_metrics` makes them), the structures in order of first appearance."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r[STRUCTURE], []).append(r)
    return {name: describe_cases(group, keys) for name, group in groups.items()}


def summarise(rows: list[dict[str, float]], keys) -> dict[str, tuple[float, float]]:
    """Mean and standard deviation (population) of each metric over cases (`describe_cases`)."""
    described = describe_cases(rows, keys)
    return {k: (described[k]["mean"], described[k]["std"]) for k in keys}


def _cell(key: str, value: float) -> str:
    return f"{value:.2f}" if key in DISTANCE_KEYS else f"{value:.4f}"


def _summary_cell(key: str, mean: float, std: float) -> str:
    return f"{mean:.2f}+-{std:.2f}" if key in DISTANCE_KEYS else f"{mean:.3f}+-{std:.3f}"


def format_table(rows: list[dict], keys=METRIC_KEYS) -> str:
    """Per-case rows (each with a "case_id"), then mean +- std per metric, as the reference
    write-up's results table, with the distances' unit below."""
    stats = summarise(rows, keys)
    table = [["case", *keys]]
    table += [[r["case_id"], *(_cell(k, r[k]) for k in keys)] for r in rows]
    table.append(["mean +- std", *(_summary_cell(k, *stats[k]) for k in keys)])
    return _render(table, keys)


def format_summary_table(groups: list[tuple[str, dict]], keys=METRIC_KEYS, title: str = "") -> str:
    """One line of mean +- std per group of cases (`(name, describe_cases(...))`, e.g. each fold
    and all folds pooled), with the number of cases; `title` heads the names' column."""
    table = [[title, "cases", *keys]]
    table += [[name, str(d["cases"]), *(_summary_cell(k, d[k]["mean"], d[k]["std"]) for k in keys)]
              for name, d in groups]
    return _render(table, keys)


def format_structure_table(rows: list[dict], keys=METRIC_KEYS) -> str:
    """One line per structure of per-structure rows: the number of cases and mean +- std of
    each metric (`describe_structures`)."""
    return format_summary_table(list(describe_structures(rows, keys).items()), keys, title=STRUCTURE)


def _render(table: list[list[str]], keys) -> str:
    """Columns padded to their widest cell, the first left-aligned; the distances' unit below."""
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))).rstrip()
             for line in table]
    distances = [k for k in keys if k in DISTANCE_KEYS]
    if distances:
        lines.append(f"({', '.join(distances)} in mm, between surface voxels)")
    return "\n".join(lines)


# Instance label maps (one label per vertebra, say): 0 background, 1..N one value per instance.
# Predicted and reference instances are paired one-to-one by overlap, maximising the summed Dice
# (Hungarian assignment), then scored per pair with the metrics above and per case as VerSe does.
INSTANCE_KEYS = ("dice", "hd95", "assd")
DETECTION_DICE = 0.5  # a reference instance is detected when its match has Dice above this
CENTROID_MM = 20.0  # VerSe's identification radius
INSTANCE_RULE = (
    "instances paired one-to-one maximising total Dice (Hungarian; only pairs that overlap); detected: "
    f"matched with Dice > {DETECTION_DICE}; false instance: a prediction not matched with Dice > {DETECTION_DICE}; "
    "identified: matched and centroids within the radius in mm (VerSe); complete: a reference instance "
    "that does not reach a face of the volume; a missed reference or a false "
    "instance scores Dice 0 and the volume's diagonal as distance; rates with no reference instance are 1 "
    "when nothing was predicted either, else 0")


def check_instances(label: np.ndarray, name: str = "label") -> int:
    """The number N of instances of an integer label map numbered 1..N without gaps; raises
    ValueError naming `name`, the missing numbers, a negative or non-integer label."""
    a = np.asarray(label)
    if a.dtype.kind not in "iu":
        raise ValueError(f"{name}: an instance label map must hold integers, got {a.dtype}")
    if a.size and a.min() < 0:
        raise ValueError(f"{name}: instance labels must be >= 0 (0 background), found {int(a.min())}")
    counts = np.bincount(a.ravel()) if a.size else np.zeros(1, np.int64)
    gaps = np.flatnonzero(counts[1:] == 0) + 1
    if gaps.size:
        shown = ", ".join(str(int(g)) for g in gaps[:10]) + (" ..." if gaps.size > 10 else "")
        raise ValueError(f"{name}: instances must be numbered 1..N without gaps (N = {counts.size - 1}); "
                         f"missing {shown}")
    return counts.size - 1


_LOOKUP_LIMIT = 1 << 20  # largest predicted label value compacted with a lookup table


class _Instances:
    """The foreground of two instance maps of one grid, read once: for each voxel non-zero in
    either map its coordinates and its (compacted) predicted and reference label. `pred_ids[i]`
    is the value of predicted instance i + 1; reference instances keep their values 1..R."""

    def __init__(self, pred: np.ndarray, ref: np.ndarray):
        p, r = _label_maps(pred, ref)
        self.num_ref = check_instances(r, "ref")
        if p.size and p.min() < 0:
            raise ValueError(f"pred: instance labels must be >= 0 (0 background), found {int(p.min())}")
        self.coords = np.nonzero((p != 0) | (r != 0))
        p_values, self.r = p[self.coords].astype(np.int64), r[self.coords].astype(np.int64)
        # A prediction may skip numbers (a vertebra not found): compact its values to 1..P, with
        # a lookup table (no sort) unless the values are too large to index one.
        top = int(p_values.max()) if p_values.size else 0
        if top <= _LOOKUP_LIMIT:
            self.pred_ids = np.flatnonzero(np.bincount(p_values, minlength=1)[1:]) + 1
            lookup = np.zeros(top + 1, np.int64)
            lookup[self.pred_ids] = np.arange(1, self.pred_ids.size + 1)
            self.p = lookup[p_values]
        else:
            values, inverse = np.unique(p_values, return_inverse=True)
            self.pred_ids, self.p = values[values > 0], inverse.ravel() + int(values[0] > 0)
        self.num_pred = int(self.pred_ids.size)

    def joint_counts(self) -> np.ndarray:
        """(P + 1, R + 1) voxel counts of each (predicted, reference) label pair, 0 the background;
        the (0, 0) count is left 0, as those voxels are never read."""
        cols = self.num_ref + 1
        flat = np.bincount(self.p * cols + self.r, minlength=(self.num_pred + 1) * cols)
        return flat.reshape(self.num_pred + 1, cols)

    def centroids(self, labels: np.ndarray, n: int) -> np.ndarray:
        """(n, ndim) mean voxel index of instances 1..n of `labels` (one value per foreground voxel)."""
        size = np.bincount(labels, minlength=n + 1)[1:]
        sums = [np.bincount(labels, weights=c, minlength=n + 1)[1:] for c in self.coords]
        return np.stack(sums, axis=1) / np.maximum(size, 1)[:, None]

    def boxes(self, labels: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(n, ndim) first and one-past-last index of the bounding box of instances 1..n."""
        ndim = len(self.coords)
        lo, hi = np.full((n + 1, ndim), np.iinfo(np.int64).max), np.full((n + 1, ndim), -1)
        for axis, c in enumerate(self.coords):
            np.minimum.at(lo[:, axis], labels, c)
            np.maximum.at(hi[:, axis], labels, c)
        return lo[1:], hi[1:] + 1


def _dice_matrix(joint: np.ndarray) -> np.ndarray:
    """(P, R) Dice of each predicted and reference instance from their joint counts."""
    size_p, size_r = joint[1:].sum(axis=1), joint[:, 1:].sum(axis=0)
    den = size_p[:, None] + size_r[None, :]
    return 2 * joint[1:, 1:] / np.maximum(den, 1)


def _assign(d: np.ndarray) -> list[tuple[int, int]]:
    """0-based (pred, ref) index pairs maximising the total of `d`, pairs with d = 0 dropped."""
    if d.size == 0:
        return []
    rows, cols = linear_sum_assignment(d, maximize=True)
    return sorted(((int(i), int(j)) for i, j in zip(rows, cols) if d[i, j] > 0), key=lambda ij: ij[1])


def match_instances(pred: np.ndarray, ref: np.ndarray) -> list[tuple[int, int, float]]:
    """Pair predicted and reference instances one-to-one, maximising the total Dice.

    pred, ref: (D, H, W) integer label maps of one grid, 0 background; `ref` numbered 1..N
    without gaps, `pred` any non-negative values (each one instance). Dice of every pair comes
    from one pass over the voxels non-zero in either map (a bincount of label pairs), the
    assignment from scipy's `linear_sum_assignment`; only overlapping pairs (Dice > 0) are
    matched. Returns `(pred_value, ref_value, dice)` sorted by reference value; instances left
    out on either side are unmatched. Raises ValueError for maps of different shapes, non-integer
    maps, negative labels, or reference instances not numbered 1..N.
    """
    inst = _Instances(pred, ref)
    d = _dice_matrix(inst.joint_counts())
    return [(int(inst.pred_ids[i]), j + 1, float(d[i, j])) for i, j in _assign(d)]


def instance_metrics(pred: np.ndarray, ref: np.ndarray, *, spacing,
                     centroid_mm: float = CENTROID_MM) -> tuple[list[dict], dict]:
    """Instance segmentation scores of one case (`INSTANCE_RULE`).

    pred, ref: (D, H, W) instance label maps as `match_instances` takes them. spacing: (sz, sy,
    sx) mm, array order. Returns `(rows, summary)`:

    - rows, one per reference instance (by value) then one per unmatched predicted instance:
      `ref_id` (0 for a false instance), `pred_id` (0 for a missed one), `dice`, `hd95` and
      `assd` (mm) of the pair as `compute_metrics` scores the two isolated masks, `centroid_mm`
      (distance between the instances' centroids, voxel indices scaled by the spacing),
      `detected` (Dice > 0.5) and `identified` (matched, centroids within `centroid_mm`), and
      `complete` for a reference instance that does not reach a face of the volume (one the
      field of view cuts off is incomplete; 0 for a false instance). A missed or false instance
      scores Dice 0 and `worst_distance` for every distance.
    - summary: `ref_instances`, `pred_instances`, `matched`, `detected`, `detection_rate`
      (detected / reference instances), `complete_instances` and `complete_detection_rate`
      (the same over the complete reference instances), `false_instances` (predicted instances
      not matched with Dice > 0.5), `identified`, `identification_rate`, and `dice`, `hd95` and `assd`
      averaged over the reference instances (a missed one counted as above). With no reference
      instance the rates and Dice are 1 and the distances 0 when nothing is predicted either,
      else 0 and the diagonal, the module's empty-mask policy.
    """
    inst = _Instances(pred, ref)
    s = _check_spacing(spacing, len(inst.coords))
    if not centroid_mm > 0:
        raise ValueError(f"centroid_mm: expected a positive radius in mm, got {centroid_mm!r}")
    shape = np.asarray(pred).shape
    worst = worst_distance(shape, s)
    p_arr, r_arr = np.asarray(pred), np.asarray(ref)
    d = _dice_matrix(inst.joint_counts())
    pairs = _assign(d)
    c_p, c_r = inst.centroids(inst.p, inst.num_pred), inst.centroids(inst.r, inst.num_ref)
    lo_p, hi_p = inst.boxes(inst.p, inst.num_pred)
    lo_r, hi_r = inst.boxes(inst.r, inst.num_ref)
    missed = {"dice": 0.0, "hd95": worst, "assd": worst, "centroid_mm": worst, "detected": False, "identified": False}

    by_ref = {}
    for i, j in pairs:
        box = tuple(slice(int(a), int(b)) for a, b in zip(np.minimum(lo_p[i], lo_r[j]), np.maximum(hi_p[i], hi_r[j])))
        m = _metrics_in_box(p_arr[box] == inst.pred_ids[i], r_arr[box] == j + 1, shape, s)
        gap = float(np.linalg.norm((c_p[i] - c_r[j]) * s))
        by_ref[j] = {"pred_id": int(inst.pred_ids[i]), **{k: m[k] for k in INSTANCE_KEYS}, "centroid_mm": gap,
                     "detected": m["dice"] > DETECTION_DICE, "identified": gap <= centroid_mm}
    whole = [bool(np.all(lo_r[j] > 0) and np.all(hi_r[j] < np.asarray(shape))) for j in range(inst.num_ref)]
    rows = [{"ref_id": j + 1, **by_ref.get(j, {"pred_id": 0, **missed}), "complete": whole[j]}
            for j in range(inst.num_ref)]
    paired = {i for i, _ in pairs}
    rows += [{"ref_id": 0, "pred_id": int(inst.pred_ids[i]), **missed, "complete": False}
             for i in range(inst.num_pred) if i not in paired]

    n_ref, n_pred = inst.num_ref, inst.num_pred
    detected = sum(r["detected"] for r in rows)
    identified = sum(r["identified"] for r in rows)
    ref_rows = rows[:n_ref]
    if n_ref:
        means = {k: float(np.mean([r[k] for r in ref_rows])) for k in INSTANCE_KEYS}
    else:
        means = {"dice": 0.0, "hd95": worst, "assd": worst} if n_pred else {"dice": 1.0, "hd95": 0.0, "assd": 0.0}
    n_whole = sum(whole)
    whole_detected = sum(r["detected"] for r in ref_rows if r["complete"])
    summary = {"ref_instances": n_ref, "pred_instances": n_pred, "matched": len(pairs), "detected": detected,
               "detection_rate": _ratio(detected, n_ref, n_pred == 0), "complete_instances": n_whole,
               "complete_detection_rate": _ratio(whole_detected, n_whole, n_pred == detected),
               "false_instances": n_pred - detected,
               "identified": identified, "identification_rate": _ratio(identified, n_ref, n_pred == 0), **means}
    return rows, summary


INSTANCE_TABLE_KEYS = ("ref_instances", "pred_instances", "detection_rate", "complete_detection_rate",
                       "false_instances", "identification_rate", "dice", "hd95", "assd")
_COUNT_KEYS = ("ref_instances", "pred_instances", "false_instances")


def format_instance_table(summaries: list[dict], keys=INSTANCE_TABLE_KEYS) -> str:
    """Per-case summaries of `instance_metrics` (each with a "case_id"), then mean +- std over
    the cases, with the distances' unit below."""
    stats = summarise(summaries, keys)
    table = [["case", *keys]]
    table += [[r["case_id"], *(str(r[k]) if k in _COUNT_KEYS else _cell(k, r[k]) for k in keys)] for r in summaries]
    table.append(["mean +- std", *(_summary_cell(k, *stats[k]) for k in keys)])
    return _render(table, keys)
