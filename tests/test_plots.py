"""plots.py: each figure is a PNG written atomically, showing what it should."""
import matplotlib.image
import numpy as np
import pytest
import torch

import augment as A
import plots
from test_augment import phantom


def test_grid_slices_spread_through_the_label_or_the_volume():
    label = np.zeros((40, 4, 4), np.uint8)
    label[10:30, 1, 1] = 1
    assert plots.grid_slices(label, 3) == [15, 20, 24]
    assert plots.grid_slices(np.zeros((9, 4, 4), np.uint8), 3) == [2, 4, 6]


def test_save_augmentation_grid_writes_a_png_atomically(tmp_path):
    image, label = phantom()
    aug = A.Augmenter(p_elastic=1, elastic_magnitude=3)
    samples = [aug(image, label, np.random.default_rng(s)) for s in range(2)]
    samples.append((torch.from_numpy(image[None]), torch.from_numpy(label[None].astype(np.float32))))  # item form
    samples.append((image, np.zeros_like(label)))  # no label: slices spread through the volume
    path = tmp_path / "out" / "grid.png"
    plots.augmentation_grid(path, samples, num_slices=4, titles=["a", "b", "c", "d"])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image
    pixels = matplotlib.image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > pixels.shape[1] / 2  # four rows, four columns
    assert [p.name for p in path.parent.iterdir()] == ["grid.png"]  # no temporary file left




def colour_pixels(path, colour: str) -> int:
    rgb = matplotlib.image.imread(path)[..., :3]
    target = np.array([int(colour[i:i + 2], 16) for i in (1, 3, 5)]) / 255
    return int((np.abs(rgb - target).max(axis=-1) < 0.02).sum())


def test_overlay_draws_the_prediction_contour_and_the_label_only_when_given(tmp_path):
    image, label = phantom()
    mask = np.roll(label, 2, axis=2)
    plots.overlay(tmp_path / "o.png", image, mask, None, (2.0, 1.0, 1.0), "x")
    assert colour_pixels(tmp_path / "o.png", plots.PREDICTION_COLOUR) > 50
    assert colour_pixels(tmp_path / "o.png", plots.LABEL_COLOUR) == 0
    plots.overlay(tmp_path / "l.png", image, mask, label, (2.0, 1.0, 1.0), "x")
    assert colour_pixels(tmp_path / "l.png", plots.LABEL_COLOUR) > 50
    assert sorted(p.name for p in tmp_path.iterdir()) == ["l.png", "o.png"]  # temporary files renamed


def test_slice_centre_is_the_labels_box_centre_else_the_masks_else_the_volumes():
    label, mask = np.zeros((9, 9, 9), np.uint8), np.zeros((9, 9, 9), np.uint8)
    label[2:5, 1:2, 6:9] = 1
    mask[0:2, 0:2, 0:2] = 1
    assert plots.slice_centre(mask, label) == (3, 1, 7)
    assert plots.slice_centre(mask, None) == (0, 0, 0)
    assert plots.slice_centre(np.zeros_like(mask), None) == (4, 4, 4)


def test_box_plot_is_tagged_and_training_curves_skip_empty_columns(tmp_path):
    plots.box_plot(tmp_path / "b.png", [{"dice": 0.8, "hd95": 2.0}, {"dice": 0.9, "hd95": 1.0}])
    assert plots.png_software(tmp_path / "b.png") == plots.BOX_PLOT_TAG
    rows = [{"epoch": "1", "train_loss": "0.5", "val_dice": "", "boundary_weight": ""},
            {"epoch": "2", "train_loss": "0.4", "val_dice": "", "boundary_weight": ""}]
    assert plots.training_curves(tmp_path / "c.png", rows) == ["training loss"]
    assert plots.png_software(tmp_path / "c.png") != plots.BOX_PLOT_TAG  # not ours to replace


def test_box_plot_draws_one_box_per_structure_and_is_tagged(tmp_path):
    structures = ("whole tumour", "tumour core", "enhancing")
    rows = [{"case_id": c, "structure": s, "dice": d - 0.1 * i, "hd95": h + i}
            for c, d, h in (("a", 0.8, 2.0), ("b", 0.6, 5.0), ("c", 0.9, 1.0)) for i, s in enumerate(structures)]
    plots.box_plot(tmp_path / "s.png", rows)
    assert plots.png_software(tmp_path / "s.png") == plots.BOX_PLOT_TAG
    plots.box_plot(tmp_path / "p.png", [{k: r[k] for k in ("dice", "hd95")} for r in rows[::3]])
    # three boxes per panel need a wider figure than the one box of per-case rows
    assert matplotlib.image.imread(tmp_path / "s.png").shape[1] > matplotlib.image.imread(tmp_path / "p.png").shape[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.png", "s.png"]


def test_box_plot_rejects_rows_that_mix_structures_and_cases(tmp_path):
    rows = [{"dice": 0.8, "hd95": 2.0, "structure": "edema"}, {"dice": 0.9, "hd95": 1.0}]
    with pytest.raises(ValueError, match="mix"):
        plots.box_plot(tmp_path / "m.png", rows)
    assert not (tmp_path / "m.png").exists()
