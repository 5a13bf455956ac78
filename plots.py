"""The figures the scripts write, each a PNG written atomically: training curves, the box plot
of an evaluation, the Bland-Altman plot of cardiac function, a prediction's overlay on its scan,
and a grid of augmented training samples.
matplotlib is imported inside each function (its Agg canvas, no display), so that importing
this module costs nothing to a run that draws no figure."""
from __future__ import annotations

import math

import numpy as np

from cardiac import agreement
from dataset import bounding_box
from metrics import STRUCTURE, describe_structures
from utils import atomic_write

BOX_PLOT_TAG = "evaluate.py box plot"  # PNG "Software" text: marks a box plot as ours to replace
BLAND_ALTMAN_TAG = "evaluate.py Bland-Altman plot"  # likewise for evaluate.py --cardiac
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PREDICTION_COLOUR, LABEL_COLOUR = "#ffb000", "#00c8ff"


def _figure(**kwargs):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def training_curves(path, rows: list[dict]) -> list[str]:
    """curves.png: training loss and validation Dice per epoch, and the hybrid loss's Dice weight
    where the loss has one. `rows`: the log's rows (dicts of strings, "" where a value is
    absent). Returns the names of the curves drawn."""
    fig = _figure(figsize=(6, 3.5), layout="constrained")
    ax = fig.subplots()
    epochs = [int(r["epoch"]) for r in rows]
    drawn = []
    for key, name in (("train_loss", "training loss"), ("val_dice", "validation Dice"),
                      ("boundary_weight", "hybrid Dice weight")):
        points = [(e, float(r[key])) for e, r in zip(epochs, rows) if r[key] != ""]
        if points:
            ax.plot(*zip(*points), label=name, linestyle="--" if key == "boundary_weight" else "-")
            drawn.append(name)
    ax.set_xlabel("epoch")
    ax.grid(alpha=0.3)
    ax.legend()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    return drawn


def png_software(path) -> str | None:
    """The "Software" text chunk of a PNG file, or None (not a PNG, or no such chunk)."""
    with open(path, "rb") as f:
        data = f.read()
    if not data.startswith(PNG_SIGNATURE):
        return None
    pos = len(PNG_SIGNATURE)
    while pos + 8 <= len(data):  # chunks: 4-byte length, 4-byte type, data, 4-byte CRC
        length, kind = int.from_bytes(data[pos:pos + 4], "big"), data[pos + 4:pos + 8]
        if kind == b"tEXt":
            key, _, value = data[pos + 8:pos + 8 + length].partition(b"\0")
            if key == b"Software":
                return value.decode("latin-1")
        pos += 12 + length
    return None


def box_plot(path, rows: list[dict]) -> None:
    """Box plot of Dice and HD95 over cases, each case a dot beside its box, tagged with
    BOX_PLOT_TAG so that a later evaluation knows it may replace the file.

    Rows with a "structure" key (`metrics.structure_metrics`) get one box per structure in each
    panel, in order of first appearance, labelled with the structure's name and its mean +- std.
    """
    has_structure = [STRUCTURE in r for r in rows]
    if any(has_structure) and not all(has_structure):
        raise ValueError("box_plot: rows mix per-structure rows (with a 'structure' key) and per-case rows")
    if rows and all(has_structure):
        _structure_box_plot(path, rows)
        return
    fig = _figure(figsize=(6.4, 4.2), layout="constrained")
    for ax, key, name in zip(fig.subplots(1, 2), ("dice", "hd95"), ("Dice", "HD95 (mm)")):
        values = np.array([r[key] for r in rows])
        ax.boxplot(values, widths=0.4, positions=[0])
        ax.plot(_dot_offsets(len(values)), values, "o", ms=4, alpha=0.6, color="tab:blue")
        ax.set_xlim(-0.5, 0.8)
        ax.set_xticks([])
        ax.set_ylabel(name)
        ax.set_title(f"{name}: {values.mean():.3f} +- {values.std():.3f}" if key == "dice"
                     else f"{name}: {values.mean():.2f} +- {values.std():.2f}", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"{len(rows)} case(s)", fontsize=10)
    _save_box_plot(path, fig)


def _dot_offsets(n: int) -> np.ndarray:
    """x offsets of a box's case dots, to the right of the box."""
    return np.linspace(0.35, 0.55, n) if n > 1 else np.array([0.45])


def _save_box_plot(path, fig) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, metadata={"Software": BOX_PLOT_TAG}))


def _structure_box_plot(path, rows: list[dict]) -> None:
    stats = describe_structures(rows, ("dice", "hd95"))
    names = list(stats)
    fig = _figure(figsize=(max(6.4, 2.2 * len(names) + 1.6), 4.6), layout="constrained")
    for ax, key, name in zip(fig.subplots(1, 2), ("dice", "hd95"), ("Dice", "HD95 (mm)")):
        digits = 3 if key == "dice" else 2
        for i, structure in enumerate(names):
            values = np.array([r[key] for r in rows if r[STRUCTURE] == structure])
            ax.boxplot(values, widths=0.4, positions=[i])
            ax.plot(i + _dot_offsets(len(values)), values, "o", ms=3, alpha=0.6, color=f"C{i % 10}")
        ax.set_xlim(-0.5, len(names) - 0.2)
        ax.set_xticks(range(len(names)), [
            f"{n}\n{stats[n][key]['mean']:.{digits}f} +- {stats[n][key]['std']:.{digits}f}" for n in names],
            fontsize=8)
        ax.set_ylabel(name)
        ax.set_title(f"{name} per structure (mean +- std)", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    cases = max(stats[n]["cases"] for n in names)
    fig.suptitle(f"{cases} case(s), {len(names)} structure(s)", fontsize=10)
    _save_box_plot(path, fig)


def bland_altman(path, pairs: dict) -> dict[str, dict]:
    """Bland-Altman plot, one panel per quantity: each subject a dot at the mean of prediction
    and reference (x) and their difference, prediction - reference (y), with the bias (solid)
    and the limits of agreement (dashed) of `cardiac.agreement`. Tagged with BLAND_ALTMAN_TAG.

    pairs: name -> (pred values, ref values, unit), the values 1-D and paired by position; a
    pair with a NaN is not drawn and not counted. Returns name -> the agreement drawn.
    """
    if not pairs:
        raise ValueError("bland_altman: no quantities given")
    cols = min(3, len(pairs))
    rows = math.ceil(len(pairs) / cols)
    fig = _figure(figsize=(4.2 * cols, 3.6 * rows), layout="constrained")
    axes = np.asarray(fig.subplots(rows, cols, squeeze=False)).ravel()
    drawn = {}
    for ax, (name, (pred, ref, unit)) in zip(axes, pairs.items()):
        p, r = np.asarray(pred, dtype=np.float64).ravel(), np.asarray(ref, dtype=np.float64).ravel()
        stats = agreement(p, r)
        keep = np.isfinite(p) & np.isfinite(r)
        ax.plot((p[keep] + r[keep]) / 2, p[keep] - r[keep], "o", ms=4, alpha=0.7, color="tab:blue")
        ax.axhline(0, color="grey", linewidth=0.5)
        for y, style in ((stats["bias"], "-"), (stats["loa_low"], "--"), (stats["loa_high"], "--")):
            if math.isfinite(y):
                ax.axhline(y, color="tab:red", linestyle=style, linewidth=1)
        if stats["n"] == 0:
            ax.text(0.5, 0.5, "no subject with a reference", transform=ax.transAxes, ha="center", fontsize=9)
        ax.set_xlabel(f"mean of prediction and reference ({unit})", fontsize=8)
        ax.set_ylabel(f"prediction - reference ({unit})", fontsize=8)
        ax.set_title(f"{name} (n={stats['n']})\nbias {stats['bias']:.1f} (solid), "
                     f"LoA [{stats['loa_low']:.1f}, {stats['loa_high']:.1f}] (dashed)", fontsize=9)
        ax.grid(alpha=0.3)
        drawn[name] = stats
    for ax in axes[len(pairs):]:
        ax.set_axis_off()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100, metadata={"Software": BLAND_ALTMAN_TAG}))
    return drawn


def slice_centre(mask: np.ndarray, label: np.ndarray | None) -> tuple[int, int, int]:
    """Voxel through which the overlay's three slices pass: the centre of the label's bounding
    box (the atrium itself, when known), else the prediction's, else the volume's."""
    for m in (label, mask):
        box = bounding_box(m) if m is not None else None
        if box is not None:
            return tuple((s.start + s.stop - 1) // 2 for s in box)
    return tuple(s // 2 for s in mask.shape)


def overlay(path, image: np.ndarray, mask: np.ndarray, label: np.ndarray | None, spacing, title: str) -> None:
    """Axial, coronal and sagittal slices (array axes D, H, W; voxel order, not patient
    orientation) through the atrium with the prediction's contour and, when there is a label,
    the label's, drawn with the voxel spacing's aspect ratio."""
    from matplotlib.lines import Line2D

    z, y, x = slice_centre(mask, label)
    sz, sy, sx = spacing
    views = [(f"axial (D = {z})", np.s_[z, :, :], sy / sx), (f"coronal (H = {y})", np.s_[:, y, :], sz / sx),
             (f"sagittal (W = {x})", np.s_[:, :, x], sz / sy)]
    slices = [np.asarray(image[s], np.float32) for _, s, _ in views]
    lo, hi = np.percentile(np.concatenate([s.ravel() for s in slices]), (1, 99))
    fig = _figure(figsize=(13, 4.8), layout="constrained")
    for ax, (name, s, aspect), img in zip(fig.subplots(1, 3), views, slices):
        # axial keeps row 0 on top as viewers do; coronal and sagittal put D upwards
        origin = "upper" if name.startswith("axial") else "lower"
        ax.imshow(img, cmap="gray", vmin=lo, vmax=max(hi, lo + 1e-6), aspect=aspect, origin=origin,
                  interpolation="nearest")
        for m, colour in ((label, LABEL_COLOUR), (mask, PREDICTION_COLOUR)):
            part = None if m is None else m[s]
            if part is not None and part.any() and not part.all():
                ax.contour(part.astype(np.float32), levels=[0.5], colors=colour, linewidths=1.0, origin=origin)
        ax.set_title(name, fontsize=10)
        ax.set_axis_off()
    handles = [Line2D([], [], color=PREDICTION_COLOUR, label="prediction")]
    if label is not None:
        handles.append(Line2D([], [], color=LABEL_COLOUR, label="label"))
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), frameon=False)
    fig.suptitle(title, fontsize=11)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=90))


def grid_slices(label: np.ndarray, num_slices: int) -> list[int]:
    """`num_slices` axial indices spread evenly inside the label's D extent (the middle one
    through its centre), or inside the whole volume when the label is empty.
    Example: label on slices 10..29, 3 slices -> [15, 20, 24]."""
    present = np.flatnonzero(label.reshape(label.shape[0], -1).any(axis=1))
    lo, hi = (present[0], present[-1]) if present.size else (0, label.shape[0] - 1)
    return [int(round(lo + (hi - lo) * (k + 1) / (num_slices + 1))) for k in range(num_slices)]


def augmentation_grid(path, samples, *, num_slices: int = 3, titles=None) -> None:
    """Augmented samples, one row per sample: `num_slices` axial slices through the label (see
    `grid_slices`) with the label's contour in red.

    samples: (image, label) pairs, each (D, H, W) or (1, D, H, W), numpy arrays or CPU
    tensors (a training item's first two entries). All rows share one grey window (the 1st
    to 99th percentile over every sample), so intensity scaling shows between rows.
    """
    pairs = []
    for image, label in samples:
        image, label = np.asarray(image, dtype=np.float32), np.asarray(label)
        image, label = image.reshape(image.shape[-3:]), label.reshape(label.shape[-3:]) > 0.5
        assert image.shape == label.shape, f"image {image.shape} and label {label.shape} differ"
        pairs.append((image, label))
    if not pairs:
        raise ValueError("augmentation_grid: no samples given")
    vmin, vmax = np.percentile(np.concatenate([i.ravel()[::7] for i, _ in pairs]), (1, 99))
    h, w = pairs[0][0].shape[1:]
    fig = _figure(figsize=(2.2 * num_slices, 2.2 * len(pairs) * h / w + 0.3), layout="constrained")
    axes = np.asarray(fig.subplots(len(pairs), num_slices, squeeze=False))
    for r, (image, label) in enumerate(pairs):
        for c, d in enumerate(grid_slices(label, num_slices)):
            ax = axes[r, c]
            ax.imshow(image[d], cmap="gray", vmin=vmin, vmax=vmax, interpolation="nearest")
            if label[d].any() and not label[d].all():
                ax.contour(label[d], levels=[0.5], colors="tab:red", linewidths=0.8)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"slice {d}", fontsize=8)
        axes[r, 0].set_ylabel(titles[r] if titles else f"sample {r}", fontsize=8)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
