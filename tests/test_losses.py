import io
import itertools
import math

import numpy as np
import pytest
import torch

from losses import (
    LOSS_NAMES,
    LOSSES,
    BoundarySchedule,
    SegmentationLoss,
    boundary_loss,
    dice_loss,
    focal_loss,
    hybrid_loss,
    signed_distance_map,
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
                "Boundary": boundary_loss(logits, dist), "Hybrid": hybrid_loss(logits, target, dist, 0.25)}
    assert sorted(LOSSES) == sorted(LOSS_NAMES) == sorted(expected)
    for name, value in expected.items():
        assert torch.equal(LOSSES[name](logits, target, dist, 0.25), value), name
    assert torch.equal(SegmentationLoss("Dice", squared_dice=True)(logits, target),
                       dice_loss(logits, target, squared=True))
    assert torch.equal(SegmentationLoss("Focal", focal_alpha=0.2, focal_gamma=1)(logits, target),
                       focal_loss(logits, target, alpha=0.2, gamma=1))


def test_segmentation_loss_names_what_it_needs():
    assert [LOSSES[n].needs_distance_map for n in LOSS_NAMES] == [False, False, True, True]
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
