"""Segmentation losses on logits, for one foreground class (the atrium): Dice, focal, boundary
(Kervadec et al.) and the hybrid Dice + boundary of the reference write-up
(VNet_PyTorch-Atriaseg2018), the signed distance map the boundary loss needs (computed in the
data pipeline, in numpy), the schedule that shifts the hybrid's weight towards the boundary
term, and `SegmentationLoss`, which puts the four behind one call for training. Functions first;
each returns a value to minimise (`1 - dice`, never `-dice`).

Shapes: logits (B, 1, D, H, W); target (B, 1, D, H, W) float in {0, 1}; distance_map
(B, 1, D, H, W) float, millimetres. `reduction` acts over the batch: "mean" (default) or
"sum" of the per-sample losses, or "none" for the per-sample losses, shape (B,).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

REDUCTIONS = ("mean", "sum", "none")

# Weight of the foreground class in the focal loss. 0.5 weighs both classes alike: the
# segmenter's crops are cut around the atrium, which the write-up says "levels this
# imbalance", and gamma already mutes the many easy background voxels. RetinaNet's 0.25 was
# tuned for about one positive in a thousand anchors and would down-weight the atrium, the
# class we care about. `--focal_alpha` sets it.
FOCAL_ALPHA = 0.5
FOCAL_GAMMA = 2.0

# The hybrid loss's Dice weight never drops below this: past 0.5 the boundary term takes
# precedence, as the write-up asks, and a remaining tenth of Dice keeps the overlap term that
# stops training from sticking when the prediction is empty or misses (the write-up's reason
# for the hybrid). Kervadec et al.'s published schedule likewise keeps the weight of the
# regional loss at 0.1 or more.
BOUNDARY_FLOOR = 0.1


def _reduce(per_sample: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    if reduction == "none":
        return per_sample
    raise ValueError(f"reduction {reduction!r}: must be one of {', '.join(REDUCTIONS)}")


def _check_shapes(logits: torch.Tensor, other: torch.Tensor, name: str) -> None:
    assert logits.dim() >= 3 and logits.shape == other.shape, \
        f"logits {tuple(logits.shape)} vs {name} {tuple(other.shape)}: expected equal (B, 1, D, H, W)"


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0, squared: bool = False,
              reduction: str = "mean") -> torch.Tensor:
    """Soft Dice loss `1 - (2 sum(p g) + eps) / (sum(p) + sum(g) + eps)`, p = sigmoid(logits).

    logits: (B, 1, D, H, W); target: (B, 1, D, H, W) float in {0, 1}. Computed per sample
    and then reduced over the batch, so a small atrium counts as much as a large one. The `eps`
    in the numerator makes a perfect empty prediction score 0 rather than 1.

    `squared=True` uses the V-Net paper's denominator `sum(p^2) + sum(g^2)` instead.
    """
    _check_shapes(logits, target, "target")
    probs = torch.sigmoid(logits.float()).flatten(1)   # (B, N)
    target = target.float().flatten(1)                 # (B, N)
    inter = (probs * target).sum(1)
    if squared:
        denom = (probs * probs).sum(1) + (target * target).sum(1)
    else:
        denom = probs.sum(1) + target.sum(1)
    dice = (2 * inter + eps) / (denom + eps)           # (B,)
    return _reduce(1 - dice, reduction)


def focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = FOCAL_ALPHA, gamma: float = FOCAL_GAMMA,
               reduction: str = "mean") -> torch.Tensor:
    """Focal loss (Lin et al.) `-alpha_t (1 - p_t)^gamma log(p_t)`, averaged over the voxels
    of each sample, then reduced over the batch.

    p_t is the probability of the true class (p for foreground, 1 - p for background) and
    alpha_t is `alpha` for foreground voxels, `1 - alpha` for background (FOCAL_ALPHA says why
    0.5). logits: (B, 1, D, H, W); target: (B, 1, D, H, W) float in {0, 1}.

    Both factors come from log-sigmoids of the logit signed by the class, so nothing is a log
    of an underflowed probability: the loss and its gradient are finite for logits of +-100
    and beyond, and for any gamma >= 0 (a power of `1 - p_t` would have an infinite slope at
    0 when gamma < 1).
    """
    _check_shapes(logits, target, "target")
    if not 0 <= alpha <= 1 or gamma < 0:
        raise ValueError(f"focal_loss: alpha {alpha} must lie in [0, 1] and gamma {gamma} must be >= 0")
    logits, target = logits.float(), target.float()
    signed = logits * (2 * target - 1)                  # logit of the true class: p_t = sigmoid(signed)
    log_pt = F.logsigmoid(signed)                       # log(p_t)
    log_one_minus_pt = F.logsigmoid(-signed)            # log(1 - p_t)
    alpha_t = alpha * target + (1 - alpha) * (1 - target)
    loss = -alpha_t * torch.exp(gamma * log_one_minus_pt) * log_pt
    return _reduce(loss.flatten(1).mean(1), reduction)


def signed_distance_map(label: np.ndarray, spacing) -> np.ndarray:
    """Signed Euclidean distance, in millimetres, from each voxel to the boundary of `label`.

    label: (D, H, W) binary (any number of dimensions works); spacing: (sz, sy, sx) mm, array
    order. Returns float32 of the label's shape: positive outside the atrium, negative inside,
    zero on the boundary.

    The boundary is the set of foreground voxels with at least one of their 6 face neighbours
    in the background (the surface voxels of `metrics.py`): the voxels Kervadec et al. set to
    zero. They then approximate the depth inside as the distance to the background minus one
    voxel, which is off under anisotropic spacing; here both sides are exact distances to
    those boundary voxels, from one distance transform: a background voxel's nearest
    foreground voxel is always a boundary voxel, so the same distance serves outside too.
    Example, spacing 2 mm along the row:

        label  0 0 1 1 1 1 1 0        map  4 2 0 -2 -4 -2 0 2

    The array's edge is no boundary (a crop cuts the atrium, it does not end it). A label with
    no boundary has its boundary beyond the array, so every voxel gets the array's diagonal
    (sum of (size * spacing)^2, square-rooted), longer than any distance inside it: positive
    for an empty label, so that any predicted foreground costs the most; negative for a
    full one.
    """
    mask = np.asarray(label).astype(bool)
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != mask.ndim or min(spacing) <= 0:
        raise ValueError(f"spacing {spacing}: need one positive value per axis of the {mask.shape} label")
    if not mask.any() or mask.all():
        far = float(np.linalg.norm(np.multiply(mask.shape, spacing)))
        return np.full(mask.shape, -far if mask.any() else far, dtype=np.float32)
    faces = ndimage.generate_binary_structure(mask.ndim, 1)
    inside = ndimage.binary_erosion(mask, structure=faces, border_value=1)  # foreground, not boundary
    dist = ndimage.distance_transform_edt(inside | ~mask, sampling=spacing)  # to the nearest boundary voxel
    return np.where(inside, -dist, dist).astype(np.float32)


def boundary_loss(logits: torch.Tensor, distance_map: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Boundary loss (Kervadec et al.): the mean over voxels of `sigmoid(logits) * distance_map`,
    per sample, then reduced over the batch; millimetres.

    logits: (B, 1, D, H, W); distance_map: (B, 1, D, H, W) from `signed_distance_map` of the
    target. It goes negative: the best prediction is 1 wherever the map is negative (inside)
    and 0 wherever it is positive, which scores minus the mean depth of the atrium. Boundary
    voxels have distance 0 and get no gradient from it, which is why it is paired with Dice.
    """
    _check_shapes(logits, distance_map, "distance_map")
    probs = torch.sigmoid(logits.float())
    return _reduce((probs * distance_map.float()).flatten(1).mean(1), reduction)


def hybrid_loss(logits: torch.Tensor, target: torch.Tensor, distance_map: torch.Tensor, weight: float,
                eps: float = 1.0, squared: bool = False, reduction: str = "mean") -> torch.Tensor:
    """`weight * dice_loss + (1 - weight) * boundary_loss`; `weight` in [0, 1] comes from a
    `BoundarySchedule`. Shapes as `dice_loss` and `boundary_loss`."""
    if not 0 <= weight <= 1:
        raise ValueError(f"hybrid_loss: weight {weight} must lie in [0, 1]")
    dice = dice_loss(logits, target, eps=eps, squared=squared, reduction=reduction)
    return weight * dice + (1 - weight) * boundary_loss(logits, distance_map, reduction=reduction)


class BoundarySchedule:
    """The Dice weight `w` of the hybrid loss, lowered so that the boundary term takes
    precedence as training goes on (the write-up: "after a threshold Dice score has been
    attained or towards latter epochs of training").

    mode "epoch": every `step()` lowers `w` by `step`, down to `floor`.
    mode "dice": `w` stays put until a validation Dice reaches `start_dice`; from that epoch
        on it falls by `step` per epoch as in "epoch" mode, also when a later validation
        dips back under the threshold (one noisy epoch should not stall the schedule).

    Call `step(val_dice)` once at the end of each epoch; `weight` is the value for the next
    epoch. `state_dict()` / `load_state_dict()` carry it through a resume. The floor's default
    is BOUNDARY_FLOOR (see there).
    """

    MODES = ("epoch", "dice")

    def __init__(self, mode: str = "epoch", step: float = 0.01, floor: float = BOUNDARY_FLOOR,
                 start_dice: float = 0.8, weight: float = 1.0):
        if mode not in self.MODES:
            raise ValueError(f"boundary schedule {mode!r}: must be one of {', '.join(self.MODES)}")
        if not 0 <= floor <= weight <= 1:
            raise ValueError(f"boundary schedule: need 0 <= floor ({floor}) <= weight ({weight}) <= 1")
        if not 0 <= step <= 1 or not 0 <= start_dice <= 1:
            raise ValueError(f"boundary schedule: step ({step}) and start_dice ({start_dice}) must lie in [0, 1]")
        self.mode, self.step_size, self.floor, self.start_dice = mode, step, floor, start_dice
        self.weight = weight
        self.started = mode == "epoch"

    def step(self, val_dice: float | None = None) -> float:
        """End of an epoch: update and return the weight for the next one. `val_dice` is
        required in mode "dice" and ignored in mode "epoch"."""
        if not self.started:
            if val_dice is None:
                raise ValueError("boundary schedule 'dice' needs the epoch's validation Dice")
            self.started = val_dice >= self.start_dice
        if self.started:
            # Rounded so that a hundred steps of 0.01 land on the floor, not a hair above it.
            self.weight = max(self.floor, round(self.weight - self.step_size, 10))
        return self.weight

    def state_dict(self) -> dict:
        return {"weight": self.weight, "started": self.started}

    def load_state_dict(self, state: dict) -> None:
        self.weight, self.started = float(state["weight"]), bool(state["started"])


LOSS_NAMES = ("Dice", "Focal", "Boundary", "Hybrid")


@dataclass(frozen=True)
class SegmentationLoss:
    """The loss named on the command line behind one call:

        loss = SegmentationLoss("Hybrid")(logits, target, distance_map, weight)

    logits, target, distance_map: (B, 1, D, H, W); distance_map is needed by "Boundary" and
    "Hybrid" (`needs_distance_map`) and may be None otherwise; `weight` is the hybrid's Dice
    weight (from `BoundarySchedule.weight`) and is ignored by the other three. Returns the
    batch mean.
    """

    name: str = "Dice"
    focal_alpha: float = FOCAL_ALPHA
    focal_gamma: float = FOCAL_GAMMA
    squared_dice: bool = False

    def __post_init__(self):
        if self.name not in LOSS_NAMES:
            raise ValueError(f"loss {self.name!r}: must be one of {', '.join(LOSS_NAMES)}")
        if not 0 <= self.focal_alpha <= 1 or self.focal_gamma < 0:
            raise ValueError(f"focal alpha {self.focal_alpha} must lie in [0, 1] and gamma {self.focal_gamma} be >= 0")

    @property
    def needs_distance_map(self) -> bool:
        return self.name in ("Boundary", "Hybrid")

    def __call__(self, logits: torch.Tensor, target: torch.Tensor, distance_map: torch.Tensor | None = None,
                 weight: float = 1.0) -> torch.Tensor:
        if self.needs_distance_map and distance_map is None:
            raise ValueError(f"the {self.name} loss needs the target's signed distance map "
                             "(losses.signed_distance_map)")
        if self.name == "Dice":
            return dice_loss(logits, target, squared=self.squared_dice)
        if self.name == "Focal":
            return focal_loss(logits, target, alpha=self.focal_alpha, gamma=self.focal_gamma)
        if self.name == "Boundary":
            return boundary_loss(logits, distance_map)
        return hybrid_loss(logits, target, distance_map, weight, squared=self.squared_dice)


# Each loss at its defaults, by name (train.py's `--loss_criterion` choices).
LOSSES = {name: SegmentationLoss(name) for name in LOSS_NAMES}
