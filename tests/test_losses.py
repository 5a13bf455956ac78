import io
import itertools
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from losses import (
    LOSS_NAMES,
    LOSSES,
    BoundarySchedule,
    SegmentationLoss,
    boundary_loss,
    dice_ce_loss,
    dice_loss,
    focal_loss,
    foreground_channels,
    hybrid_loss,
    signed_distance_map,
    signed_distance_maps,
)

BIG = 50.0  # sigmoid(50) == 1 and sigmoid(-50) == 0 in float32


def test_dice_loss_identical_masks_is_zero():
    target = torch.zeros(1, 1, 4, 4, 4)
    target[..., 1:3, 1:3, 1:3] = 1
    logits = (target * 2 - 1) * BIG
    assert dice_loss(logits, target).item() < 1e-6


def test_dice_loss_perfect_empty_prediction_is_zero():
    target = torch.zeros(2, 1, 4, 4, 4)
    assert dice_loss(torch.full_like(target, -BIG), target).item() < 1e-6


def test_dice_loss_disjoint_masks_approaches_one():
    target = torch.zeros(1, 1, 8, 8, 8)
    target[..., :4] = 1
    logits = torch.full_like(target, -BIG)
    logits[..., 4:] = BIG
    # 1 - eps / (256 + 256 + eps) with eps = 1
    assert abs(dice_loss(logits, target).item() - (1 - 1 / 513)) < 1e-6


def test_dice_loss_hand_computed_soft_value():
    # p = sigmoid(0) = 0.5 everywhere on 8 voxels, 2 of them foreground:
    # dice = (2 * 1 + 1) / (4 + 2 + 1) = 3 / 7
    target = torch.zeros(1, 1, 2, 2, 2)
    target[0, 0, 0, 0, :] = 1
    assert abs(dice_loss(torch.zeros_like(target), target).item() - (1 - 3 / 7)) < 1e-6


def test_dice_loss_is_averaged_per_sample():
    target = torch.zeros(2, 1, 4, 4, 4)
    target[0, ..., :2] = 1
    target[1, ..., 0, 0, 0] = 1
    logits = (target * 2 - 1) * BIG
    logits[1] = -BIG  # the second sample misses its single voxel entirely
    expected = (0 + (1 - 1 / 2)) / 2  # second: 1 - (0 + 1) / (0 + 1 + 1)
    assert abs(dice_loss(logits, target).item() - expected) < 1e-6


def test_dice_loss_gradient_is_finite_on_empty_target():
    logits = torch.randn(1, 1, 4, 4, 4, requires_grad=True)
    dice_loss(logits, torch.zeros(1, 1, 4, 4, 4)).backward()
    assert torch.isfinite(logits.grad).all()


def test_dice_loss_squared_denominator_hand_computed():
    # p = 0.5 on 8 voxels, 2 foreground: (2 * 1 + 1) / (8 * 0.25 + 2 + 1) = 3 / 5
    target = torch.zeros(1, 1, 2, 2, 2)
    target[0, 0, 0, 0, :] = 1
    assert abs(dice_loss(torch.zeros_like(target), target, squared=True).item() - (1 - 3 / 5)) < 1e-6


def test_dice_loss_squared_identical_masks_is_zero():
    target = torch.zeros(1, 1, 4, 4, 4)
    target[..., 1:3, :, 2:] = 1
    assert dice_loss((target * 2 - 1) * BIG, target, squared=True).item() < 1e-6


def test_dice_loss_reduction_none_gives_per_sample_values():
    target = torch.zeros(2, 1, 2, 2, 2)
    target[0, 0, 0, 0, :] = 1
    per_sample = dice_loss(torch.zeros_like(target), target, reduction="none")
    # second sample has no foreground, p = 0.5: (0 + 1) / (4 + 0 + 1)
    assert torch.allclose(per_sample, torch.tensor([1 - 3 / 7, 1 - 1 / 5]))
    assert abs(dice_loss(torch.zeros_like(target), target, reduction="sum").item() - (2 - 3 / 7 - 1 / 5)) < 1e-6


def test_unknown_reduction_raises_value_error():
    target = torch.zeros(1, 1, 2, 2, 2)
    with pytest.raises(ValueError, match="'avg'"):
        dice_loss(target, target, reduction="avg")


def test_ill_shape_is_refused():
    with pytest.raises(AssertionError, match="target"):
        dice_loss(torch.zeros(1, 1, 2, 2, 2), torch.zeros(1, 1, 2, 2, 3))
    with pytest.raises(AssertionError, match="distance_map"):
        boundary_loss(torch.zeros(1, 1, 2, 2, 2), torch.zeros(1, 1, 2, 2))


# Focal loss

def test_focal_loss_hand_computed_at_even_odds():
    # p = 0.5 everywhere: each voxel costs alpha_t * 0.5^2 * ln 2; 2 of 8 voxels are foreground
    target = torch.zeros(1, 1, 2, 2, 2)
    target[0, 0, 0, 0, :] = 1
    expected = (2 * 0.25 + 6 * 0.75) / 8 * 0.25 * math.log(2)
    assert abs(focal_loss(torch.zeros_like(target), target, alpha=0.25).item() - expected) < 1e-6


def test_focal_loss_hand_computed_at_three_to_one():
    # logit ln 3: p = 0.75. Foreground voxel: p_t = 0.75; background voxel: p_t = 0.25.
    logits = torch.full((1, 1, 1, 1, 2), math.log(3))
    target = torch.tensor([1.0, 0.0]).view(1, 1, 1, 1, 2)
    alpha = 0.3
    expected = (alpha * 0.25 ** 2 * -math.log(0.75) + (1 - alpha) * 0.75 ** 2 * -math.log(0.25)) / 2
    assert abs(focal_loss(logits, target, alpha=alpha, gamma=2).item() - expected) < 1e-6


def test_focal_loss_without_focusing_is_weighted_cross_entropy():
    logits = torch.linspace(-4, 4, 16).view(1, 1, 1, 4, 4)
    target = (torch.arange(16) % 3 == 0).float().view(1, 1, 1, 4, 4)
    p = torch.sigmoid(logits.double())
    bce = -(target * torch.log(p) + (1 - target) * torch.log(1 - p))
    expected = ((0.7 * target + 0.3 * (1 - target)) * bce).mean()
    assert abs(focal_loss(logits, target, alpha=0.7, gamma=0).item() - expected.item()) < 1e-5


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_focal_loss_is_finite_for_logits_of_plus_minus_100(gamma):
    logits = torch.tensor([100.0, -100.0, 100.0, -100.0]).view(1, 1, 1, 1, 4).requires_grad_()
    target = torch.tensor([1.0, 0.0, 0.0, 1.0]).view(1, 1, 1, 1, 4)
    loss = focal_loss(logits, target, alpha=0.25, gamma=gamma)
    loss.backward()
    assert torch.isfinite(logits.grad).all()
    # right with certainty costs 0; wrong with certainty costs alpha_t * 1 * 100
    assert abs(loss.item() - (0.75 * 100 + 0.25 * 100) / 4) < 1e-4


def test_focal_loss_bad_alpha_raises_value_error():
    target = torch.zeros(1, 1, 2, 2, 2)
    with pytest.raises(ValueError, match="alpha 1.5"):
        focal_loss(target, target, alpha=1.5)


# Signed distance map

def test_signed_distance_map_docstring_example():
    label = np.array([0, 0, 1, 1, 1, 1, 1, 0])
    np.testing.assert_array_equal(signed_distance_map(label, (2.0,)), [4, 2, 0, -2, -4, -2, 0, 2])


def brute_force_signed_distance(label: np.ndarray, spacing) -> np.ndarray:
    """Loops over the definition: boundary = foreground voxels with a background face
    neighbour inside the array; distance to the nearest one, negative strictly inside."""
    boundary = []
    for idx in zip(*np.nonzero(label)):
        for axis, step in itertools.product(range(label.ndim), (-1, 1)):
            n = list(idx)
            n[axis] += step
            if 0 <= n[axis] < label.shape[axis] and not label[tuple(n)]:
                boundary.append(idx)
                break
    boundary = np.array(boundary, dtype=float) * spacing                              # (K, 3) mm
    points = np.stack(np.indices(label.shape), -1).reshape(-1, label.ndim) * spacing  # (N, 3) mm
    dist = np.sqrt(((points[:, None, :] - boundary[None]) ** 2).sum(-1)).min(1).reshape(label.shape)
    return np.where(label.astype(bool), -dist, dist)


def test_signed_distance_map_matches_brute_force_on_anisotropic_spacing():
    rng = np.random.default_rng(0)
    spacing = np.array([2.5, 1.0, 0.7])
    z, y, x = np.indices((7, 10, 14))
    blob = ((z - 3.2) / 2.6) ** 2 + ((y - 4.6) / 3.9) ** 2 + ((x - 6.3) / 5.8) ** 2 < 1
    label = blob | (rng.random(blob.shape) < 0.08)   # plus stray voxels, some touching the edge
    label[:, :, -1] |= label[:, :, -2]              # atrium cut by the crop's edge
    expected = brute_force_signed_distance(label, spacing)
    got = signed_distance_map(label.astype(np.uint8), tuple(spacing))
    assert got.dtype == np.float32 and got.shape == label.shape
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert (got[~label] > 0).all() and (got[label] <= 0).all()


@pytest.mark.parametrize("fill, sign", [(0, 1), (1, -1)])
def test_signed_distance_map_without_a_boundary_is_the_array_diagonal(fill, sign):
    label = np.full((4, 5, 6), fill, dtype=np.uint8)
    got = signed_distance_map(label, (2.0, 1.0, 0.5))
    np.testing.assert_allclose(got, sign * math.sqrt(8 ** 2 + 5 ** 2 + 3 ** 2), rtol=1e-6)


def test_signed_distance_map_bad_spacing_raises_value_error():
    with pytest.raises(ValueError, match="spacing"):
        signed_distance_map(np.zeros((2, 2, 2)), (1.0, 1.0))
    with pytest.raises(ValueError, match="spacing"):
        signed_distance_map(np.zeros((2, 2, 2)), (1.0, 0.0, 1.0))


# Boundary loss

def sphere(shape=(16, 16, 16), centre=(7.5, 7.5, 7.5), radius=5.0) -> np.ndarray:
    grid = np.indices(shape).astype(float)
    return (sum((g - c) ** 2 for g, c in zip(grid, centre)) < radius ** 2).astype(np.float32)


def test_boundary_loss_hand_computed_at_even_odds():
    dist = torch.tensor([4.0, 2.0, 0.0, -2.0]).view(1, 1, 1, 1, 4)
    # p = 0.5: 0.5 * (4 + 2 + 0 - 2) / 4
    assert abs(boundary_loss(torch.zeros_like(dist), dist).item() - 0.5) < 1e-6


def test_boundary_loss_is_least_for_the_perfect_prediction():
    label = sphere()
    dist = torch.from_numpy(signed_distance_map(label, (1.5, 1.0, 1.0)))[None, None]
    perfect = boundary_loss(torch.from_numpy((label * 2 - 1) * BIG)[None, None], dist).item()
    assert abs(perfect - dist.clamp(max=0).mean().item()) < 1e-6   # minus the mean depth
    for axis, shift in itertools.product(range(3), (-2, -1, 1, 2)):
        moved = np.roll(label, shift, axis=axis)
        loss = boundary_loss(torch.from_numpy((moved * 2 - 1) * BIG)[None, None], dist).item()
        assert loss > perfect + 1e-3, (axis, shift, loss, perfect)
    grown = boundary_loss(torch.full_like(dist, BIG), dist).item()
    assert grown > perfect


# Hybrid loss

def test_hybrid_loss_mixes_dice_and_boundary_by_the_weight():
    target = torch.from_numpy(sphere((8, 8, 8), (3.5, 3.5, 3.5), 2.5))[None, None]
    dist = torch.from_numpy(signed_distance_map(target[0, 0].numpy(), (1.0, 1.0, 1.0)))[None, None]
    logits = torch.randn(1, 1, 8, 8, 8, generator=torch.Generator().manual_seed(0))
    d, b = dice_loss(logits, target).item(), boundary_loss(logits, dist).item()
    assert abs(hybrid_loss(logits, target, dist, 1.0).item() - d) < 1e-6
    assert abs(hybrid_loss(logits, target, dist, 0.0).item() - b) < 1e-6
    assert abs(hybrid_loss(logits, target, dist, 0.3).item() - (0.3 * d + 0.7 * b)) < 1e-6


def test_hybrid_loss_weight_outside_unit_interval_raises_value_error():
    t = torch.zeros(1, 1, 2, 2, 2)
    with pytest.raises(ValueError, match="weight 1.2"):
        hybrid_loss(t, t, t, 1.2)


# Boundary schedule

def test_boundary_schedule_epoch_mode_steps_down_to_the_floor():
    schedule = BoundarySchedule("epoch", step=0.25, floor=0.4)
    assert schedule.weight == 1.0
    assert [schedule.step() for _ in range(4)] == [0.75, 0.5, 0.4, 0.4]


def test_boundary_schedule_defaults_reach_the_floor_exactly():
    schedule = BoundarySchedule()
    weights = [schedule.step() for _ in range(100)]
    assert weights[0] == 0.99 and weights[49] == 0.5 and weights[89] == 0.1 and weights[-1] == 0.1


def test_boundary_schedule_dice_mode_waits_for_the_threshold_then_keeps_going():
    schedule = BoundarySchedule("dice", step=0.1, floor=0.5, start_dice=0.8)
    assert [schedule.step(d) for d in (0.5, 0.79, 0.8, 0.7, 0.9)] == [1.0, 1.0, 0.9, 0.8, 0.7]


def test_boundary_schedule_dice_mode_needs_the_validation_dice():
    with pytest.raises(ValueError, match="validation Dice"):
        BoundarySchedule("dice").step(None)


def save_and_reload(obj):
    """Through torch.save and a weights-only load, as a checkpoint travels."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_boundary_schedule_resumed_equals_uninterrupted():
    dice = [0.3, 0.85, 0.6, 0.9, 0.9, 0.9]
    whole = BoundarySchedule("dice", step=0.1, floor=0.2)
    expected = [whole.step(d) for d in dice]
    first = BoundarySchedule("dice", step=0.1, floor=0.2)
    got = [first.step(d) for d in dice[:3]]
    resumed = BoundarySchedule("dice", step=0.1, floor=0.2)
    resumed.load_state_dict(save_and_reload(first.state_dict()))
    got += [resumed.step(d) for d in dice[3:]]
    assert got == expected


def test_boundary_schedule_bad_settings_raise_value_error():
    with pytest.raises(ValueError, match="'linear'"):
        BoundarySchedule("linear")
    with pytest.raises(ValueError, match="floor"):
        BoundarySchedule(floor=0.5, weight=0.4)


# One call for every loss

def test_segmentation_loss_calls_the_named_function():
    target = torch.from_numpy(sphere((8, 8, 8), (3.5, 3.5, 3.5), 2.5))[None, None]
    dist = torch.from_numpy(signed_distance_map(target[0, 0].numpy(), (1.0, 1.0, 1.0)))[None, None]
    logits = torch.randn(1, 1, 8, 8, 8, generator=torch.Generator().manual_seed(1))
    expected = {"Dice": dice_loss(logits, target), "Focal": focal_loss(logits, target, alpha=0.5, gamma=2),
                "Boundary": boundary_loss(logits, dist), "Hybrid": hybrid_loss(logits, target, dist, 0.25),
                "DiceCE": dice_ce_loss(logits, target)}
    assert sorted(LOSSES) == sorted(LOSS_NAMES) == sorted(expected)
    for name, value in expected.items():
        assert torch.equal(LOSSES[name](logits, target, dist, 0.25), value), name
    assert torch.equal(SegmentationLoss("Dice", squared_dice=True)(logits, target),
                       dice_loss(logits, target, squared=True))
    assert torch.equal(SegmentationLoss("Focal", focal_alpha=0.2, focal_gamma=1)(logits, target),
                       focal_loss(logits, target, alpha=0.2, gamma=1))


def test_segmentation_loss_names_what_it_needs():
    assert [LOSSES[n].needs_distance_map for n in LOSS_NAMES] == [False, False, True, True, False]
    t = torch.zeros(1, 1, 2, 2, 2)
    with pytest.raises(ValueError, match="distance map"):
        LOSSES["Hybrid"](t, t)
    with pytest.raises(ValueError, match="'dice'"):
        SegmentationLoss("dice")


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_every_loss_is_finite_with_finite_gradients_on_an_empty_target(name):
    target = torch.zeros(2, 1, 4, 4, 4)
    dist = torch.from_numpy(signed_distance_map(target[0, 0].numpy(), (2.0, 1.0, 1.0)))
    dist = dist[None, None].repeat(2, 1, 1, 1, 1)
    logits = torch.randn(2, 1, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    logits[0, 0, 0] = 100
    logits[1, 0, 0] = -100
    logits.requires_grad_()
    loss = LOSSES[name](logits, target, dist, 0.5)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    assert logits.grad.abs().sum() > 0  # an invented atrium is pushed back


# C channels: softmax over background + K classes, or K independent sigmoid channels

def one_hot(classes: torch.Tensor, channels: int) -> torch.Tensor:
    """(B, *spatial) class indices -> (B, C, *spatial) float one-hot target."""
    return F.one_hot(classes, channels).movedim(-1, 1).float()


def random_case(activation: str, shape=(2, 3, 4, 5, 6), seed: int = 0):
    """Logits and a target of `shape`: one-hot under softmax, multi-hot under sigmoid."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape, generator=g) * 3
    if activation == "softmax":
        return logits, one_hot(torch.randint(shape[1], (shape[0], *shape[2:]), generator=g), shape[1])
    return logits, (torch.rand(shape, generator=g) < 0.4).float()


def distance_maps(target: torch.Tensor, activation: str, spacing) -> torch.Tensor:
    """(B, K, *spatial) signed distance maps of the target's foreground channels."""
    first = 1 if activation == "softmax" else 0
    return torch.stack([torch.from_numpy(signed_distance_maps(t[first:].numpy(), spacing)) for t in target])


def hand_softmax_case():
    """2 samples, 3 channels (background, 2 classes), 3 voxels, softmax probabilities
    (voxel by voxel) and classes:
        sample 0: (.5, .25, .25) (.25, .5, .25) (.25, .25, .5), classes 0 1 2
        sample 1: (.5, .25, .25) three times,                    classes 1 1 0
    """
    probs = torch.tensor([[[.5, .25, .25], [.25, .5, .25], [.25, .25, .5]],
                          [[.5, .25, .25], [.5, .25, .25], [.5, .25, .25]]])   # (B, voxel, C)
    logits = probs.log().permute(0, 2, 1).reshape(2, 3, 1, 1, 3)             # softmax(log p) = p
    target = one_hot(torch.tensor([[0, 1, 2], [1, 1, 0]]), 3).reshape(2, 3, 1, 1, 3)
    return logits, target


def test_softmax_dice_hand_computed():
    # sample 0, class 1: p (.25, .5, .25), g (0, 1, 0): (2 * .5 + 1) / (1 + 1 + 1) = 2/3; class 2 alike
    #   -> loss 1/3
    # sample 1, class 1: p (.25, .25, .25), g (1, 1, 0): (2 * .5 + 1) / (.75 + 2 + 1) = 8/15
    #           class 2: p (.25, .25, .25), g (0, 0, 0): (0 + 1) / (.75 + 0 + 1) = 4/7
    #   -> loss (7/15 + 3/7) / 2 = 47/105
    logits, target = hand_softmax_case()
    per_sample = dice_loss(logits, target, activation="softmax", reduction="none")
    assert torch.allclose(per_sample, torch.tensor([1 / 3, 47 / 105]), atol=1e-6)
    assert abs(dice_loss(logits, target, activation="softmax").item() - 41 / 105) < 1e-6


def test_softmax_dice_ignores_the_background_channel():
    # More background voxels, predicted background with certainty, leave every class's Dice
    # as it was; the background's own Dice would have risen.
    logits, target = hand_softmax_case()
    extra = torch.tensor([BIG, -BIG, -BIG]).view(1, 3, 1, 1, 1).expand(2, 3, 1, 1, 5)
    padded_logits = torch.cat([logits, extra], -1)
    padded_target = torch.cat([target, one_hot(torch.zeros(2, 1, 1, 5, dtype=torch.long), 3)], -1)
    before = dice_loss(logits, target, activation="softmax", reduction="none")
    after = dice_loss(padded_logits, padded_target, activation="softmax", reduction="none")
    assert torch.allclose(before, after, atol=1e-6)

    def background_dice(lg, tg):
        p, g = torch.softmax(lg, 1)[:, 0].flatten(1), tg[:, 0].flatten(1)
        return (2 * (p * g).sum(1) + 1) / (p.sum(1) + g.sum(1) + 1)
    assert (background_dice(padded_logits, padded_target) > background_dice(logits, target) + 0.05).all()


@pytest.mark.parametrize("squared", [False, True])
def test_multichannel_sigmoid_dice_is_the_mean_of_single_channel_losses(squared):
    logits, target = random_case("sigmoid")
    single = torch.stack([dice_loss(logits[:, c:c + 1], target[:, c:c + 1], squared=squared, reduction="none")
                          for c in range(3)])                                   # (C, B)
    got = dice_loss(logits, target, squared=squared, reduction="none")
    assert torch.allclose(got, single.mean(0), atol=1e-6)


def test_dice_ce_equals_dice_plus_cross_entropy_under_softmax():
    logits, target = random_case("softmax")
    ce = -(target.double() * torch.log_softmax(logits.double(), 1)).sum(1).flatten(1).mean(1)   # (B,)
    expected = dice_loss(logits, target, activation="softmax", reduction="none").double() + ce
    got = dice_ce_loss(logits, target, activation="softmax", reduction="none")
    assert torch.allclose(got.double(), expected, atol=1e-5)
    mean = dice_loss(logits, target, activation="softmax") + F.cross_entropy(logits, target.argmax(1))
    assert abs(dice_ce_loss(logits, target, activation="softmax").item() - mean.item()) < 1e-5


def test_dice_ce_equals_dice_plus_binary_cross_entropy_under_sigmoid():
    logits, target = random_case("sigmoid")
    p, t = torch.sigmoid(logits.double()), target.double()
    bce = -(t * torch.log(p) + (1 - t) * torch.log(1 - p)).flatten(1).mean(1)   # channels and voxels
    expected = dice_loss(logits, target, reduction="none").double() + bce
    assert torch.allclose(dice_ce_loss(logits, target, reduction="none").double(), expected, atol=1e-5)
    mean = dice_loss(logits, target) + F.binary_cross_entropy_with_logits(logits, target)
    assert abs(dice_ce_loss(logits, target, reduction="sum").item() - 2 * mean.item()) < 1e-5


def test_softmax_focal_loss_hand_computed():
    # probabilities (.5, .25, .25) on two voxels, of classes 2 and 0:
    # class 2: p_t = .25, alpha_t = alpha; background: p_t = .5, alpha_t = 1 - alpha
    logits = torch.tensor([.5, .25, .25]).log().view(1, 3, 1, 1, 1).expand(1, 3, 1, 1, 2)
    target = one_hot(torch.tensor([[[[2, 0]]]]), 3)
    alpha = 0.3
    expected = (alpha * 0.75 ** 2 * math.log(4) + (1 - alpha) * 0.5 ** 2 * math.log(2)) / 2
    assert abs(focal_loss(logits, target, alpha=alpha, gamma=2, activation="softmax").item() - expected) < 1e-6


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_softmax_focal_on_two_channels_is_the_sigmoid_focal_of_the_logit_difference(gamma):
    logits, target = random_case("softmax", shape=(2, 2, 3, 4, 5), seed=3)
    logits = logits * 2
    softmax = focal_loss(logits, target, alpha=0.3, gamma=gamma, activation="softmax", reduction="none")
    sigmoid = focal_loss(logits[:, 1:] - logits[:, :1], target[:, 1:], alpha=0.3, gamma=gamma, reduction="none")
    assert torch.allclose(softmax, sigmoid, atol=1e-6)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_softmax_focal_loss_is_finite_for_logits_of_plus_minus_100(gamma):
    logits = torch.tensor([[100.0, 100.0], [-100.0, -100.0], [-100.0, -100.0]]).view(1, 3, 1, 1, 2)
    target = one_hot(torch.tensor([[[[0, 1]]]]), 3)   # right with certainty, then wrong with certainty
    logits.requires_grad_()
    loss = focal_loss(logits, target, alpha=0.25, gamma=gamma, activation="softmax")
    loss.backward()
    assert torch.isfinite(logits.grad).all()
    # right costs 0; wrong costs alpha * 1 * -log p_t = 0.25 * 200 (log p_t = -100 - 100 - log(1 + 2e-200))
    assert abs(loss.item() - 0.25 * 200 / 2) < 1e-4


def test_signed_distance_maps_stack_the_single_maps():
    masks = np.stack([sphere((6, 7, 8), (2.5, 3.0, 3.5), 2.2), np.zeros((6, 7, 8), np.float32),
                      sphere((6, 7, 8), (1.0, 5.0, 2.0), 1.5)])
    got = signed_distance_maps(masks, (2.0, 1.0, 0.5))
    assert got.dtype == np.float32 and got.shape == masks.shape
    for mask, single in zip(masks, got):
        np.testing.assert_array_equal(single, signed_distance_map(mask, (2.0, 1.0, 0.5)))
    with pytest.raises(ValueError, match=re.escape("masks (3,)")):
        signed_distance_maps(np.zeros(3), (1.0,))


def test_boundary_loss_per_channel_is_the_mean_of_single_channel_losses():
    logits, target = random_case("sigmoid", shape=(2, 3, 6, 7, 8))
    dist = distance_maps(target, "sigmoid", (2.0, 1.0, 1.0))
    single = torch.stack([boundary_loss(logits[:, c:c + 1], dist[:, c:c + 1], reduction="none") for c in range(3)])
    assert torch.allclose(boundary_loss(logits, dist, reduction="none"), single.mean(0), atol=1e-5)


def test_softmax_boundary_loss_uses_the_foreground_classes():
    logits, target = random_case("softmax", shape=(2, 3, 6, 7, 8))
    dist = distance_maps(target, "softmax", (2.0, 1.0, 1.0))                     # (B, 2, ...)
    probs = torch.softmax(logits.double(), 1)
    per_class = [(probs[:, c] * dist[:, c - 1]).flatten(1).mean(1) for c in (1, 2)]
    expected = (per_class[0] + per_class[1]) / 2
    got = boundary_loss(logits, dist, reduction="none", activation="softmax")
    assert torch.allclose(got.double(), expected, atol=1e-5)
    hybrid = hybrid_loss(logits, target, dist, 0.3, activation="softmax")
    dice = dice_loss(logits, target, activation="softmax")
    assert abs(hybrid.item() - (0.3 * dice + 0.7 * got.mean()).item()) < 1e-5


@pytest.mark.parametrize("activation", ["sigmoid", "softmax"])
@pytest.mark.parametrize("name", LOSS_NAMES)
def test_every_loss_works_in_2d_as_in_3d_with_one_slice(name, activation):
    logits, target = random_case(activation, shape=(2, 3, 5, 6), seed=4)          # (B, C, H, W)
    dist = distance_maps(target, activation, (1.0, 2.0))
    loss = SegmentationLoss(name, activation=activation)
    flat = loss(logits, target, dist, 0.4)
    thick = loss(logits[:, :, None], target[:, :, None], dist[:, :, None], 0.4)
    assert flat.shape == () and abs(flat.item() - thick.item()) < 1e-6


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_segmentation_loss_passes_the_activation(name):
    logits, target = random_case("softmax", seed=5)
    dist = distance_maps(target, "softmax", (1.0, 1.0, 1.0))
    expected = {"Dice": dice_loss(logits, target, activation="softmax"),
                "DiceCE": dice_ce_loss(logits, target, activation="softmax"),
                "Focal": focal_loss(logits, target, activation="softmax"),
                "Boundary": boundary_loss(logits, dist, activation="softmax"),
                "Hybrid": hybrid_loss(logits, target, dist, 0.25, activation="softmax")}[name]
    assert torch.equal(SegmentationLoss(name, activation="softmax")(logits, target, dist, 0.25), expected)


@pytest.mark.parametrize("activation", ["sigmoid", "softmax"])
@pytest.mark.parametrize("name", LOSS_NAMES)
def test_every_loss_has_finite_gradients_under_both_activations(name, activation):
    logits, target = random_case(activation, shape=(2, 4, 4, 4, 4), seed=6)
    dist = distance_maps(target, activation, (2.0, 1.0, 1.0))
    logits[0, :, 0] = 100
    logits[1, 1:, 0] = -100
    logits.requires_grad_()
    loss = SegmentationLoss(name, activation=activation)(logits, target, dist, 0.5)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    assert logits.grad.abs().sum() > 0


def test_foreground_channels():
    assert foreground_channels(1, "sigmoid") == 1 and foreground_channels(3, "sigmoid") == 3
    assert foreground_channels(4, "softmax") == 3
    with pytest.raises(ValueError, match=re.escape("softmax over 1 channel(s)")):
        foreground_channels(1, "softmax")


@pytest.mark.parametrize("call", [
    lambda t, a: dice_loss(t, t, activation=a),
    lambda t, a: dice_ce_loss(t, t, activation=a),
    lambda t, a: focal_loss(t, t, activation=a),
    lambda t, a: boundary_loss(t, t, activation=a),
    lambda t, a: hybrid_loss(t, t, t, 0.5, activation=a),
    lambda t, a: SegmentationLoss("Dice", activation=a),
])
def test_bad_activation_raises_value_error_naming_it_and_the_choices(call):
    with pytest.raises(ValueError, match="'Softmax': must be one of sigmoid, softmax"):
        call(torch.zeros(1, 2, 2, 2, 2), "Softmax")


def test_softmax_target_of_the_wrong_shape_is_refused():
    logits = torch.zeros(1, 3, 2, 2, 2)
    with pytest.raises(AssertionError, match=re.escape("logits (1, 3, 2, 2, 2) vs target (1, 2, 2, 2, 2)")):
        dice_loss(logits, torch.zeros(1, 2, 2, 2, 2), activation="softmax")
    # one distance map per class, not one per channel
    with pytest.raises(AssertionError, match=re.escape("distance_map (1, 3, 2, 2, 2)") + ".*K = 2"):
        boundary_loss(logits, torch.zeros(1, 3, 2, 2, 2), activation="softmax")


def test_target_that_is_not_one_hot_is_refused_with_its_values():
    logits = torch.zeros(1, 3, 1, 2, 2)
    target = one_hot(torch.zeros(1, 1, 2, 2, dtype=torch.long), 3)
    two = target.clone()
    two[0, 1, 0, 0, 0] = 1                                  # background and class 1 at one voxel
    with pytest.raises(AssertionError, match=re.escape("not one-hot: 1 voxel(s) have [2.0] classes set")):
        focal_loss(logits, two, activation="softmax")
    none = target.clone()
    none[0, 0, 0, 1] = 0                                    # two voxels with no class
    with pytest.raises(AssertionError, match=re.escape("2 voxel(s) have [0.0] classes set")):
        dice_loss(logits, none, activation="softmax")
    soft = target * 0.5
    with pytest.raises(AssertionError, match=re.escape("target holds [0.5]")):
        dice_ce_loss(logits, soft, activation="softmax")
    with pytest.raises(AssertionError, match="torch.int64"):
        dice_loss(logits, target.long(), activation="softmax")
