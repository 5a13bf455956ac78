"""The iterative strategy's pieces: instance label maps (the numbering 1..N, one piece per
instance), the one-instance-at-a-time search driven by oracle and adversarial models, the model,
its training samples and loss, CT intensities and the instances table."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

import dataset as ds
import inference
import instances
import losses
import prediction
import training
from models.iterative import IterativeFCN, face_maximum
from utils import UserError

# ITK's direction matrix, row-major: a rotation about x by 30 degrees.
OBLIQUE_3D = (1.0, 0.0, 0.0, 0.0, 0.8660254037844387, -0.5, 0.0, 0.5, 0.8660254037844387)


def spine(n: int = 4) -> np.ndarray:
    """n boxes one above the other along D, numbered 1..n from the top."""
    label = np.zeros((8 * n + 4, 12, 12), np.uint8)
    for k in range(n):
        label[2 + 8 * k:8 + 8 * k, 3:9, 3:9] = k + 1
    return label


def test_instances_numbered_one_to_n_in_one_piece_each_are_counted():
    assert ds.check_instances(spine(4), "x.nii.gz") == 4
    assert ds.check_instances(np.zeros((4, 4, 4), np.uint8), "x.nii.gz") == 0
    touching = spine(3)
    touching[8:10, 3:9, 3:9] = 1  # instance 1 reaches instance 2: touching instances are fine
    assert ds.check_instances(touching, "x.nii.gz") == 3
    diagonal = np.zeros((3, 3, 3), np.uint8)
    diagonal[0, 0, 0] = diagonal[1, 1, 1] = 1  # corners meet: one piece under 26-connectivity
    assert ds.check_instances(diagonal, "x.nii.gz") == 1


def test_a_gap_in_the_numbering_is_refused_naming_the_file():
    label = spine(4)
    label[label == 3] = 0
    with pytest.raises(UserError, match=r"x.nii.gz: instance values 1, 2, 4 .* \(missing 3\)"):
        ds.check_instances(label, "x.nii.gz")


def test_a_binary_mask_of_several_structures_is_refused():
    label = (spine(4) > 0).astype(np.uint8)
    assert ndimage.label(label)[1] == 4
    with pytest.raises(UserError, match="x.nii.gz: instance 1 is 4 separate pieces"):
        ds.check_instances(label, "x.nii.gz")


# ----------------------------------------------------------------------------- the search, with an oracle model

def column(n: int = 5, depth: int = 80, cut: bool = True) -> np.ndarray:
    """n boxes of 10 slices with 4-slice gaps down a (depth, 24, 24) volume, numbered from the
    top; with `cut` the last one runs past the volume's end."""
    label = np.zeros((depth, 24, 24), np.int32)
    top = depth - (14 * n - 4) + (5 if cut else 0)
    for k in range(n):
        z = top + 14 * k
        label[max(z, 0):z + 10, 6 + k % 2:16 + k % 2, 7:17] = k + 1
    return label


def oracle(reference: np.ndarray, complete: dict, patch):
    """A model that knows the answer: the lowest-numbered reference instance in the patch with
    voxels not yet in memory, and whether it lies wholly in the patch (and is whole)."""
    def segment(start, memory):
        ref = ds.crop(reference, start, patch, 0)
        left = set(np.unique(ref[memory == 0]).tolist()) - {0}
        if not left:
            return np.zeros(patch, bool), 0.0
        v = min(left)
        mask = ref == v
        return mask, float(complete[v] and mask.sum() == (reference == v).sum())
    return segment


def test_oracle_search_recovers_every_instance_and_flags_the_cut_one():
    reference, patch = column(5), (32, 24, 24)
    complete = {v: v < 5 for v in range(1, 6)}  # the fifth runs past the field of view
    labels, found, evaluations = inference.iterative_instances(oracle(reference, complete, patch),
                                                               reference.shape, patch)
    assert np.array_equal(labels, reference)  # every instance exactly: Dice 1, numbered in order
    assert [f.completeness >= 0.5 for f in found] == [True, True, True, True, False]
    starts = len(inference.search_starts(reference.shape, patch))
    assert evaluations <= starts + 3 * len(found)  # O(N) beside the search, no dense sliding window
    assert not any(f.oscillated for f in found)


def test_search_stops_on_an_empty_prediction():
    shape, patch = (64, 40, 40), (32, 24, 24)
    calls = []

    def nothing(start, memory):
        calls.append(start)
        return np.zeros(patch, bool), 0.0
    labels, found, evaluations = inference.iterative_instances(nothing, shape, patch)
    assert not labels.any() and found == [] and evaluations == len(calls)
    assert sorted(calls) == sorted(inference.search_starts(shape, patch))  # each search start once


def test_search_settles_a_model_that_oscillates_and_terminates():
    shape, patch = (64, 16, 16), (16, 16, 16)

    def oscillating(start, memory):  # a blob low in the patch near the top, high in it further down
        mask = np.zeros(patch, bool)
        if start[0] <= 10:
            mask[12:16, 4:8, 4:8] = True
        else:
            mask[0:4, 4:8, 4:8] = True
        return mask, 0.9
    labels, found, evaluations = inference.iterative_instances(oscillating, shape, patch, max_moves=20,
                                                               max_instances=3)
    assert found[0].oscillated and found[0].moves <= 20 and len(found) <= 3
    starts = len(inference.search_starts(shape, patch))
    assert evaluations <= starts + 3 * (20 + 1)
    assert set(np.unique(labels)) <= {0, 1, 2, 3} and (labels == 1).sum() == 4 * 4 * 4


def test_search_keeps_one_piece_per_answer_and_ignores_answers_below_the_smallest_instance():
    """A model that answers an instance plus a stray island, and a 2-voxel fragment: the island
    is never an instance, nor is the fragment with min_voxels 3; with 1 it is."""
    shape, patch = (32, 16, 16), (16, 16, 16)
    reference = np.zeros(shape, np.int32)
    reference[4:10, 4:10, 4:10] = 1
    island = (slice(12, 13), slice(1, 2), slice(1, 2))
    fragment = (slice(28, 29), slice(8, 10), slice(8, 9))

    def segment(start, memory):
        full = reference > 0
        full[island] = full[fragment] = True
        return ds.crop(full, start, patch, 0).astype(bool) & (memory == 0), 0.9
    labels, found, _ = inference.iterative_instances(segment, shape, patch, min_voxels=3)
    assert len(found) == 1 and np.array_equal(labels, reference)
    labels, found, _ = inference.iterative_instances(segment, shape, patch, min_voxels=1)
    assert len(found) == 3 and (labels == 1).sum() == 216 and labels[island] == 2 and (labels[fragment] == 3).all()


def test_the_smallest_instance_is_a_quarter_of_the_median_training_instance():
    assert instances.min_volume_ml([2.0, 8.0, 4.0, 0.1]) == pytest.approx(0.25 * 3.0)
    assert instances.min_volume_ml([]) == 0.0


def test_the_smallest_instance_in_voxels_follows_the_spacing():
    assert instances.min_voxels(1.0, (1.0, 1.0, 1.0)) == 1000
    assert instances.min_voxels(1.0, (2.0, 1.0, 1.0)) == 500
    assert instances.min_voxels(0.0, (1.0, 1.0, 1.0)) == 1


def test_search_bounds_are_checked():
    with pytest.raises(ValueError, match="max_moves"):
        inference.iterative_instances(lambda s, m: (np.zeros((4, 4, 4), bool), 0.0), (8, 8, 8), (4, 4, 4), max_moves=0)


# ----------------------------------------------------------------------------- the model

def test_iterative_fcn_counts_and_shapes_by_hand():
    def block(cin, c):  # two 3x3x3 convolutions with biases, two affine instance norms
        return cin * c * 27 + c + c * c * 27 + c + 4 * c
    c, levels = 8, 4
    # the segmentation's 1x1x1 convolution; the completeness layer on c pooled features and the face maximum
    expected = block(2, c) + (levels - 1) * block(c, c) + (levels - 1) * block(2 * c, c) + (c + 1) + (c + 2)
    model = IterativeFCN(2, c, levels)
    assert sum(p.numel() for p in model.parameters()) == expected
    seg, complete = model(torch.randn(2, 2, 16, 24, 32))
    assert seg.shape == (2, 1, 16, 24, 32) and complete.shape == (2,)
    with pytest.raises(AssertionError, match="divide by 8"):
        model(torch.randn(1, 2, 12, 16, 16))


def test_the_face_maximum_reads_the_six_faces_only():
    prob = torch.zeros(3, 1, 6, 7, 8)
    prob[0, 0, 3, 3, 4] = 0.9  # inside: not on a face
    prob[1, 0, 5, 2, 3] = 0.7  # the last D face
    prob[2, 0, 2, 6, 0] = 0.4  # an edge of two faces
    assert face_maximum(prob).flatten().tolist() == pytest.approx([0.0, 0.7, 0.4])


# ----------------------------------------------------------------------------- training samples

def test_a_sample_targets_the_first_instance_not_in_memory():
    label = column(5).astype(np.uint8)
    image = np.random.default_rng(0).normal(size=(1, *label.shape)).astype(np.float32)
    rng, seen = np.random.default_rng(1), set()
    for patch in [(32, 24, 24)] * 40 + [(16, 24, 24)] * 40:  # the smaller one cuts instances now and then
        start, target, memory = instances.draw(label, patch, rng, empty=False)
        s = instances.sample(image, np.zeros(1, np.float32), label, start, patch, target, memory)
        crop = ds.crop(label, start, patch, 0)
        assert memory == target - 1 and s.target.any() and np.array_equal(s.target > 0, crop == target)
        assert np.array_equal(s.memory > 0, (crop > 0) & (crop < target))  # the instances before it, no other
        whole = (crop == target).sum() == (label == target).sum() and target != 5
        assert s.complete == float(whole)  # the fifth runs past the scan; the patch may cut the others
        assert s.image.shape == (1, *patch)
        seen.add((target == 5, s.complete))
    assert seen == {(False, 1.0), (False, 0.0), (True, 0.0)}


def test_an_empty_sample_holds_every_instance_of_its_patch_in_memory():
    label = column(5).astype(np.uint8)
    rng, patch = np.random.default_rng(2), (32, 24, 24)
    for _ in range(20):
        start, target, memory = instances.draw(label, patch, rng, empty=True)
        s = instances.sample(label[None].astype(np.float32), 0.0, label, start, patch, target, memory)
        crop = ds.crop(label, start, patch, 0)
        assert target == 0 and not s.target.any() and s.complete == 0.0
        assert np.array_equal(s.memory > 0, crop > 0)


def test_border_weights_follow_the_papers_formula():
    mask = np.zeros((1, 40, 40), bool)
    mask[0, 10:30, 10:30] = True
    w = instances.border_weights(mask)
    assert w[0, 10, 20] == pytest.approx(1 + 8 * np.exp(-1 / 36))   # on the border, 1 voxel from outside
    assert w[0, 20, 20] == pytest.approx(1 + 8 * np.exp(-100 / 36))  # the centre, 10 voxels in
    assert w[0, 20, 7] == pytest.approx(1 + 8 * np.exp(-9 / 36))     # 3 voxels outside
    assert np.array_equal(instances.border_weights(np.zeros((4, 4, 4), bool)), np.ones((4, 4, 4), np.float32))


# ----------------------------------------------------------------------------- CT intensities

def test_ct_channels_keep_their_hounsfield_scale():
    assert ds.normalization_rules("auto", 2, ("CT", "T1")) == ("ct", "nonzero")
    image = np.array([-3000.0, -1000.0, 0.0, 40.0, 1000.0, 5000.0], np.float32).reshape(1, 1, 1, 6)
    other = image.copy() + 0.0
    other[..., :3] = 0.0  # another field of view: the same tissue keeps its value, unlike a z-score
    pads = ds.normalise(image, ("ct",))
    assert np.allclose(image.ravel(), [-1.0, -1.0, 0.0, 0.04, 1.0, 3.0]) and pads.tolist() == [-1.0]
    ds.normalise(other, ("ct",))
    assert np.allclose(other.ravel()[3:], [0.04, 1.0, 3.0])


# ----------------------------------------------------------------------------- a model in the search

class BrightNotInMemory(torch.nn.Module):
    """A stand-in iterative model: the voxels of its image channel above 0 that the memory
    channel does not hold, completeness logit 0 (probability 0.5)."""

    def forward(self, x):
        seg = torch.where((x[:, :1] > 0) & (x[:, 1:] == 0), 10.0, -10.0)
        return seg, torch.zeros(x.shape[0])


def test_model_segment_gives_the_model_its_patch_and_the_memory():
    image = np.full((1, 40, 20, 20), -1.0, np.float32)
    image[:, 4:10, 5:15, 5:15] = image[:, 24:30, 5:15, 5:15] = 1.0
    segment = inference.model_segment(BrightNotInMemory(), image, np.array([-1.0], np.float32), (16, 16, 16),
                                      torch.device("cpu"))
    memory = np.zeros((16, 16, 16), np.float32)
    memory[:8] = 1
    mask, complete = segment((0, 2, 2), memory)
    assert complete == 0.5 and mask.sum() == 2 * 10 * 10 and mask[8:10, 3:13, 3:13].all()  # only past the memory
    labels, found, _ = inference.iterative_instances(segment, image.shape[1:], (16, 16, 16))
    assert [int((labels == k).sum()) for k in (1, 2)] == [600, 600] and len(found) == 2
    assert found[0].completeness == 0.5 and labels[4, 10, 10] == 1 and labels[27, 10, 10] == 2


class LeftHalf(torch.nn.Module):
    """Certain of the patch's left half (W below the middle) whatever it shows, 0.8 complete on
    the original and 0.2 on anything else."""

    def forward(self, x):
        w = x.shape[-1]
        seg = torch.full((x.shape[0], 1, *x.shape[2:]), -50.0)
        seg[..., : w // 2] = 50.0
        return seg, torch.logit(torch.tensor([0.8] + [0.2] * (x.shape[0] - 1)))


def test_model_segment_averages_each_patch_with_its_mirror():
    image = np.zeros((1, 16, 16, 16), np.float32)
    segment = inference.model_segment(LeftHalf(), image, np.zeros(1, np.float32), (16, 16, 16), torch.device("cpu"))
    mask, complete = segment((0, 0, 0), np.zeros((16, 16, 16), np.float32))
    assert mask.all()  # left half from the patch, right half from its mirror flipped back: 0.5 each, kept
    assert complete == pytest.approx(0.5)


# ----------------------------------------------------------------------------- the loss

def test_iterative_loss_by_hand():
    seg = torch.tensor([[[[[2.0, -1.0]]]]])                    # (1, 1, 1, 1, 2)
    target = torch.tensor([[[[[1.0, 0.0]]]]])
    weights = torch.tensor([[[[[9.0, 1.0]]]]])
    complete_logit, complete = torch.tensor([0.5]), torch.tensor([1.0])
    bce = [np.log(1 + np.exp(-2.0)), np.log(1 + np.exp(-1.0))]  # -log sigmoid(2), -log(1 - sigmoid(-1))
    completeness = np.log(1 + np.exp(-0.5))
    expected = (9 * bce[0] + 1 * bce[1]) / 10 + completeness
    assert losses.iterative_loss(seg, complete_logit, target, weights, complete).item() == pytest.approx(expected)
    p = 1 / (1 + np.exp(-np.array([2.0, -1.0])))
    dice = 1 - (2 * p[0] + 1) / (p.sum() + 1 + 1)
    assert losses.iterative_loss(seg, complete_logit, target, weights, complete, dice=True).item() == \
        pytest.approx(expected + dice)


def test_iterative_set_items_and_its_empty_samples():
    label = column(5).astype(np.uint8)
    image = (label > 0)[None].astype(np.float32)  # the instances bright, so an item shows its crop
    patch = (32, 24, 24)
    sampler = training.EpochSampler(1, 10, seed=3)
    data = training.IterativeSet([(image, np.zeros(1, np.float32), label)], patch, sampler, lambda x, y, rng: (x, y))
    sampler.set_epoch(1)
    items = [data[j] for j in range(10)]
    for j, (x, target, weights, complete) in enumerate(items):
        assert x.shape == (2, *patch) and target.shape == weights.shape == (1, *patch)
        memory = x[1] > 0
        assert torch.equal(memory & (x[0] > 0), memory)  # the memory is made of instances
        if j % instances.EMPTY_EVERY == instances.EMPTY_EVERY - 1:
            assert not target.any() and complete == 0 and torch.equal(memory, x[0] > 0)  # all in memory
        else:
            assert target.any() and not (target[0].bool() & memory).any()
    again = training.IterativeSet([(image, np.zeros(1, np.float32), label)], patch, sampler, lambda x, y, rng: (x, y))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(items, (again[j] for j in range(10))))  # seeded by (epoch, j)


# ----------------------------------------------------------------------------- the instances table

def test_instance_rows_place_centroids_in_the_scanners_millimetres():
    labels = np.zeros((10, 12, 14), np.int32)
    labels[2:4, 3:7, 5:9] = 1
    labels[6:9, 1:2, 10:13] = 2
    props = {"spacing": (2.5, 0.8, 0.7), "origin": (-30.0, 12.5, 100.0), "direction": OBLIQUE_3D}
    rows = prediction.instance_rows(labels, props, [inference.Found(1, 0.97, 2), inference.Found(2, 0.2, 1)])
    image = ds.to_sitk(labels.astype(np.uint8), props)
    for row, v in zip(rows, (1, 2)):
        zyx = np.argwhere(labels == v).mean(0)
        expected = image.TransformContinuousIndexToPhysicalPoint([float(i) for i in zyx[::-1]])  # SimpleITK's rule
        assert [row[f"centroid_{a}_mm"] for a in "xyz"] == pytest.approx(expected, abs=1e-3)
        assert row["voxels"] == (labels == v).sum()
        assert row["volume_ml"] == pytest.approx((labels == v).sum() * 2.5 * 0.8 * 0.7 / 1000)
    assert [(r["instance"], r["complete"]) for r in rows] == [(1, 1), (2, 0)]
    assert list(rows[0]) == ["instance", "voxels", "volume_ml", "centroid_x_mm", "centroid_y_mm", "centroid_z_mm",
                             "completeness", "complete"]
