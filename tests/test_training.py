"""training.py's pieces on small arrays: a case's crop region gives the crops and the whole-scan
Dice of the full volume, the survey reads shapes and boxes at the training spacing, the epoch
sampler, and which losses have a schedule."""
import numpy as np
import pytest

import dataset as ds
import training
from augment import Augmenter
from metrics import dice


@pytest.mark.parametrize("shape, size", [((20, 30, 40), (8, 16, 16)), ((12, 30, 40), (16, 16, 48))])
def test_region_crops_equal_crops_of_the_whole_volume(shape, size):
    rng = np.random.default_rng(0)
    image = rng.standard_normal(shape).astype(np.float32)
    label = (rng.random(shape) > 0.7).astype(np.uint8)
    for _ in range(20):
        centres = [tuple(rng.uniform(-3, n + 3) for n in shape) for _ in range(2)]
        region = training.cut_region(image, -9.0, label, centres, size)
        assert region.nbytes < image.nbytes + label.nbytes or size[0] > shape[0]
        for centre in centres:
            start = ds.crop_start(centre, size, shape)
            got_image, got_label = region.crop(centre, size)
            np.testing.assert_array_equal(got_image, ds.crop(image[None], start, size, -9.0))
            np.testing.assert_array_equal(got_label, ds.crop(label, start, size, 0))
            pred = rng.random(size) > 0.5
            assert region.dice(pred, centre) == pytest.approx(dice(ds.paste(pred, start, shape), label), abs=1e-12)


def test_region_dice_of_two_empty_masks_is_one_and_a_crop_outside_is_refused():
    image, label = np.zeros((8, 8, 8), np.float32), np.zeros((8, 8, 8), np.uint8)
    region = training.cut_region(image, 0.0, label, [(2, 2, 2)], (4, 4, 4))
    assert region.dice(np.zeros((4, 4, 4), bool), (2, 2, 2)) == 1.0
    with pytest.raises(AssertionError, match="outside its region"):
        region.crop((6, 6, 6), (4, 4, 4))


def test_survey_reads_shapes_and_boxes_at_the_median_spacing(tmp_path):
    label = np.zeros((10, 20, 20), np.uint8)
    label[2:6, 4:12, 8:16] = 255
    geometry = {"origin": (1.0, 2.0, 3.0), "direction": (1, 0, 0, 0, 1, 0, 0, 0, 1)}
    for name, spacing in (("a", 1.0), ("b", 1.0), ("c", 0.5)):  # c: twice as fine, so half as large
        props = {**geometry, "spacing": (spacing,) * 3}
        ds.write_image(label, props, tmp_path / name / "laendo.nrrd")
        ds.write_image(np.zeros(label.shape, np.uint8), props, tmp_path / name / "lgemri.nrrd")
    cases = ds.find_cases(tmp_path, require_labels=True)
    survey = training.read_survey(cases, ["a", "b", "c"])
    assert survey.spacing == (1.0, 1.0, 1.0)
    assert survey.shapes == {"a": (10, 20, 20), "b": (10, 20, 20), "c": (5, 10, 10)}
    assert survey.boxes["a"] == (slice(2, 6), slice(4, 12), slice(8, 16))
    assert survey.boxes["c"] == (slice(1, 3), slice(2, 6), slice(4, 8))
    assert survey.padded_shape((2, 4, 4)) == (32, 64, 64)
    assert survey.patch_size(["a"], (4, 4, 4), (2, 4, 4)) == (16, 16, 16)


def test_epoch_sampler_draws_every_case_as_often_as_possible_and_is_seeded():
    sampler = training.EpochSampler(num_cases=4, samples_per_epoch=10, seed=3)
    sampler.set_epoch(1)
    plan = list(sampler.plan)
    assert sorted(plan[:4]) == sorted(plan[4:8]) == [0, 1, 2, 3] and len(plan) == 10
    again = training.EpochSampler(4, 10, 3)
    again.set_epoch(1)
    assert again.plan == plan and again.draw(5)[1].random() == sampler.draw(5)[1].random()
    again.set_epoch(2)
    assert again.plan != plan


@pytest.mark.parametrize("loss, scheduled", [("Dice", False), ("Focal", False), ("Boundary", False),
                                             ("Hybrid", True)])
def test_only_the_hybrid_loss_has_a_dice_weight_schedule(loss, scheduled):
    settings = training.StageSettings(batch_size=1, learning_rate=1e-3, patience=1, reduce=0.5, max_epochs=1,
                                      samples_per_epoch=None, loss_criterion=loss, augment=Augmenter())
    assert (settings.schedule() is not None) is scheduled
    assert settings.samples(5) == 5 * training.SAMPLES_PER_CASE


@pytest.mark.parametrize("regions", [(), (("whole", (1, 2, 3)), ("core", (2, 3)), ("enhancing", (3,)))])
def test_region_dice_of_several_classes_is_the_mean_over_outputs_of_the_whole_volume(regions):
    from labels import Labels
    labels = Labels((1, 2, 3), ("a", "b", "c"))
    labels = labels.with_regions(regions) if regions else labels
    rng = np.random.default_rng(1)
    shape, size = (12, 30, 40), (8, 16, 16)
    image = rng.standard_normal((2, *shape)).astype(np.float32)
    label = rng.integers(0, 4, shape).astype(np.uint8)
    centre = (6, 15, 20)
    region = training.cut_region(image, [0.0, 0.0], label, [centre], size, num_classes=3)
    pred = rng.integers(0, 4, size).astype(np.uint8)
    full = ds.paste(pred, ds.crop_start(centre, size, shape), shape)
    groups = [(1,), (2,), (3,)] if not regions else [(1, 2, 3), (2, 3), (3,)]
    expected = np.mean([dice(np.isin(full, g), np.isin(label, g)) for g in groups])
    assert region.dice(pred, centre, labels) == pytest.approx(expected, abs=1e-12)
