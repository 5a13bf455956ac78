import torch

from losses import dice_loss

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
