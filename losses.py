"""Segmentation losses on logits, for C output channels: Dice, Dice + cross-entropy, focal,
boundary (Kervadec et al.) and the hybrid Dice + boundary of the reference write-up
(VNet_PyTorch-Atriaseg2018), the signed distance maps the boundary loss needs (computed in the
data pipeline, in numpy), the schedule that shifts the hybrid's weight towards the boundary
term, and `SegmentationLoss`, which puts them behind one call for training. Functions first;
each returns a value to minimise (`1 - dice`, never `-dice`).

`activation` says what the C channels are:
    "sigmoid" (default): each channel an independent binary problem, K = C foreground
        channels: the atrium's one channel, or R overlapping regions (whole tumour, tumour
        core, enhancing). target is multi-hot.
    "softmax": C = K + 1 mutually exclusive classes, channel 0 the background, channels 1..K
        the foreground. target is one-hot.

Shapes, spatial dims (D, H, W) or (H, W), any number: logits (B, C, *spatial); target
(B, C, *spatial) float in {0, 1}, multi-hot (sigmoid) or one-hot (softmax); distance_map
(B, K, *spatial) float, millimetres, one per foreground channel. The Dice, focal and boundary
terms are computed per sample and averaged over the foreground channels (Dice, boundary) or
channels and voxels (focal); `reduction` then acts over the batch: "mean" (default) or "sum" of
the per-sample losses, or "none" for the per-sample losses, shape (B,). For (B, 1, ...) under
sigmoid every value is that of the one-class losses this module held before.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

REDUCTIONS = ("mean", "sum", "none")
ACTIVATIONS = ("sigmoid", "softmax")

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


def foreground_channels(logits_channels: int, activation: str) -> int:
    """K, the number of foreground channels of C = `logits_channels`: C under sigmoid, C - 1
    under softmax (channel 0 is the background); the channels of a distance map."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation {activation!r}: must be one of {', '.join(ACTIVATIONS)}")
    if activation == "softmax" and logits_channels < 2:
        raise ValueError(f"softmax over {logits_channels} channel(s): needs the background and at least one "
                         "class (C >= 2); use sigmoid for one channel")
    return logits_channels if activation == "sigmoid" else logits_channels - 1


def _check_shapes(logits: torch.Tensor, other: torch.Tensor, name: str) -> None:
    assert logits.dim() >= 3 and logits.shape == other.shape, \
        f"logits {tuple(logits.shape)} vs {name} {tuple(other.shape)}: expected equal (B, C, *spatial)"


def _check_target(logits: torch.Tensor, target: torch.Tensor, activation: str) -> None:
    """Activation known, shapes equal, target float in {0, 1}, one class per voxel under softmax."""
    _check_shapes(logits, target, "target")
    foreground_channels(logits.shape[1], activation)
    assert target.is_floating_point(), f"target dtype {target.dtype}: expected a float tensor in {{0, 1}}"
    binary = (target == 0) | (target == 1)
    assert binary.all(), \
        f"target holds {target[~binary].unique()[:5].tolist()}: expected {{0, 1}} (multi-hot or one-hot)"
    if activation == "softmax":
        classes = target.sum(1)                        # (B, *spatial)
        one_hot = classes == 1
        assert one_hot.all(), (f"softmax target is not one-hot: {int((~one_hot).sum())} voxel(s) have "
                               f"{classes[~one_hot].unique().tolist()} classes set, expected exactly 1")


def _probs(logits: torch.Tensor, activation: str) -> torch.Tensor:
    """Probabilities of the K foreground channels, (B, K, *spatial) float32."""
    logits = logits.float()
    if activation == "sigmoid":
        return torch.sigmoid(logits)
    return torch.softmax(logits, dim=1)[:, 1:]


def _foreground(target: torch.Tensor, activation: str) -> torch.Tensor:
    """The K foreground channels of a (B, C, *spatial) target."""
    return target if activation == "sigmoid" else target[:, 1:]


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0, squared: bool = False,
              reduction: str = "mean", activation: str = "sigmoid") -> torch.Tensor:
    """Soft Dice loss `1 - (2 sum(p g) + eps) / (sum(p) + sum(g) + eps)`, per sample and per
    foreground channel, averaged over the channels, then reduced over the batch.

    logits: (B, C, *spatial); target: (B, C, *spatial) float in {0, 1}, multi-hot (sigmoid)
    or one-hot (softmax). p = sigmoid(logits) on every channel, or softmax(logits) over the
    channels, of which channels 1..K count (the background's Dice would be near 1 and hide the
    classes). Per sample, so a small atrium counts as much as a large one. The `eps` in the
    numerator makes a perfect empty prediction score 0 rather than 1, channel by channel.

    `squared=True` uses the V-Net paper's denominator `sum(p^2) + sum(g^2)` instead.
    """
    _check_target(logits, target, activation)
    probs = _probs(logits, activation).flatten(2)                 # (B, K, N)
    target = _foreground(target.float(), activation).flatten(2)   # (B, K, N)
    inter = (probs * target).sum(2)
    if squared:
        denom = (probs * probs).sum(2) + (target * target).sum(2)
    else:
        denom = probs.sum(2) + target.sum(2)
    dice = (2 * inter + eps) / (denom + eps)                      # (B, K)
    return _reduce((1 - dice).mean(1), reduction)


def dice_ce_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0, squared: bool = False,
                 reduction: str = "mean", activation: str = "sigmoid") -> torch.Tensor:
    """`dice_loss` plus the cross-entropy averaged over the voxels (and, under sigmoid, the
    channels) of each sample, then reduced over the batch: nnU-Net's default, the Dice term
    for the overlap, the cross-entropy for a gradient at every voxel.

    Cross-entropy: under softmax `F.cross_entropy` against each voxel's class (the index of
    its one-hot target, background included); under sigmoid the binary cross-entropy of each
    channel (`F.binary_cross_entropy_with_logits`). Shapes as `dice_loss`.
    """
    dice = dice_loss(logits, target, eps=eps, squared=squared, reduction="none", activation=activation)  # (B,)
    logits, target = logits.float(), target.float()
    if activation == "softmax":
        ce = F.cross_entropy(logits, target.argmax(1), reduction="none")                  # (B, *spatial)
    else:
        ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")         # (B, C, *spatial)
    return _reduce(dice + ce.flatten(1).mean(1), reduction)


def focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = FOCAL_ALPHA, gamma: float = FOCAL_GAMMA,
               reduction: str = "mean", activation: str = "sigmoid") -> torch.Tensor:
    """Focal loss (Lin et al.) `-alpha_t (1 - p_t)^gamma log(p_t)`, averaged over the voxels
    (and, under sigmoid, the channels) of each sample, then reduced over the batch.

    p_t is the probability of the true class and alpha_t is `alpha` for a foreground class,
    `1 - alpha` for the background (FOCAL_ALPHA says why 0.5). logits: (B, C, *spatial);
    target: (B, C, *spatial) float in {0, 1}.
        sigmoid: one term per channel and voxel: p_t = p where the channel's target is 1,
            1 - p where it is 0.
        softmax: one term per voxel: p_t the softmax probability of its class (one-hot
            target), the background being channel 0. With C = 2 this is the sigmoid form on
            the one channel `logits[:, 1] - logits[:, 0]`.

    Both factors come from log-sigmoids (log-softmaxes) of the logits, so nothing is a log of
    an underflowed probability: the loss and its gradient are finite for logits of +-100 and
    beyond, and for any gamma >= 0 (a power of `1 - p_t` would have an infinite slope at 0
    when gamma < 1).
    """
    _check_target(logits, target, activation)
    if not 0 <= alpha <= 1 or gamma < 0:
        raise ValueError(f"focal_loss: alpha {alpha} must lie in [0, 1] and gamma {gamma} must be >= 0")
    logits, target = logits.float(), target.float()
    if activation == "sigmoid":
        signed = logits * (2 * target - 1)              # logit of the true class: p_t = sigmoid(signed)
        log_pt = F.logsigmoid(signed)                   # log(p_t)
        log_one_minus_pt = F.logsigmoid(-signed)        # log(1 - p_t)
        alpha_t = alpha * target + (1 - alpha) * (1 - target)
    else:
        true = target.bool()                            # (B, C, *spatial), one True per voxel
        log_total = torch.logsumexp(logits, 1)          # (B, *spatial)
        log_pt = (logits * target).sum(1) - log_total   # the true class's logit, less the normaliser
        # 1 - p_t is the other classes' share: a log-sum-exp of their logits, never log(1 - p_t)
        # of a rounded p_t (C >= 2, so at least one logit stays finite)
        log_one_minus_pt = torch.logsumexp(logits.masked_fill(true, -torch.inf), 1) - log_total
        alpha_t = torch.where(target[:, 0] == 1, 1 - alpha, alpha)
    loss = -alpha_t * torch.exp(gamma * log_one_minus_pt) * log_pt
    return _reduce(loss.flatten(1).mean(1), reduction)


def iterative_loss(seg_logits: torch.Tensor, complete_logits: torch.Tensor, target: torch.Tensor,
                   weights: torch.Tensor, complete: torch.Tensor, dice: bool = False) -> torch.Tensor:
    """The iterative strategy's loss (Lessmann et al., MIDL 2018): per sample, the voxel-weighted
    binary cross-entropy of the segmentation `sum(w bce) / sum(w)` (weights from
    `instances.border_weights`), plus the soft Dice loss when `dice`, plus the binary
    cross-entropy of the completeness logit; the batch mean.

    seg_logits, target, weights: (B, 1, D, H, W); complete_logits, complete: (B,)."""
    _check_shapes(seg_logits, target, "target")
    _check_shapes(seg_logits, weights, "weights")
    bce = F.binary_cross_entropy_with_logits(seg_logits.float(), target.float(), reduction="none")
    per_sample = (bce * weights).flatten(1).sum(1) / weights.flatten(1).sum(1)
    if dice:
        per_sample = per_sample + dice_loss(seg_logits, target, reduction="none")
    per_sample = per_sample + F.binary_cross_entropy_with_logits(complete_logits.float(), complete.float(),
                                                                 reduction="none")
    return per_sample.mean()


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


def signed_distance_maps(masks: np.ndarray, spacing) -> np.ndarray:
    """`signed_distance_map` of each of K masks: masks (K, *spatial) binary, the foreground
    channels of a target (under softmax `target[1:]`, not the background); spacing one value
    per spatial axis, mm, array order. Returns float32 (K, *spatial)."""
    masks = np.asarray(masks)
    if masks.ndim < 2 or len(masks) == 0:
        raise ValueError(f"masks {masks.shape}: expected (K, *spatial) with K >= 1")
    return np.stack([signed_distance_map(mask, spacing) for mask in masks])


def boundary_loss(logits: torch.Tensor, distance_map: torch.Tensor, reduction: str = "mean",
                  activation: str = "sigmoid") -> torch.Tensor:
    """Boundary loss (Kervadec et al.): per sample, the mean over the K foreground channels of
    the mean over voxels of `p_c * distance_map_c`, then reduced over the batch; millimetres.

    logits: (B, C, *spatial); distance_map: (B, K, *spatial) from `signed_distance_maps` of
    the target's foreground channels: K = C under sigmoid, C - 1 under softmax (p from
    channels 1..K). It goes negative: the best prediction is 1 wherever the map is negative
    (inside) and 0 wherever it is positive, which scores minus the mean depth of the
    structure. Boundary voxels have distance 0 and get no gradient from it, which is why it
    is paired with Dice.
    """
    assert logits.dim() >= 3, f"logits {tuple(logits.shape)}: expected (B, C, *spatial)"
    k = foreground_channels(logits.shape[1], activation)
    assert distance_map.shape == (logits.shape[0], k, *logits.shape[2:]), \
        (f"logits {tuple(logits.shape)} vs distance_map {tuple(distance_map.shape)}: expected (B, K, *spatial) "
         f"with K = {k} foreground channel(s) under {activation}")
    probs = _probs(logits, activation)                  # (B, K, *spatial)
    # Every channel has the same voxel count, so the mean over all is the mean of the channels' means.
    return _reduce((probs * distance_map.float()).flatten(1).mean(1), reduction)


def hybrid_loss(logits: torch.Tensor, target: torch.Tensor, distance_map: torch.Tensor, weight: float,
                eps: float = 1.0, squared: bool = False, reduction: str = "mean",
                activation: str = "sigmoid") -> torch.Tensor:
    """`weight * dice_loss + (1 - weight) * boundary_loss`; `weight` in [0, 1] comes from a
    `BoundarySchedule`. Shapes as `dice_loss` and `boundary_loss`."""
    if not 0 <= weight <= 1:
        raise ValueError(f"hybrid_loss: weight {weight} must lie in [0, 1]")
    dice = dice_loss(logits, target, eps=eps, squared=squared, reduction=reduction, activation=activation)
    return weight * dice + (1 - weight) * boundary_loss(logits, distance_map, reduction=reduction,
                                                        activation=activation)


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


LOSS_NAMES = ("Dice", "Focal", "Boundary", "Hybrid", "DiceCE")


@dataclass(frozen=True)
class SegmentationLoss:
    """The loss named on the command line behind one call:

        loss = SegmentationLoss("Hybrid")(logits, target, distance_map, weight)

    activation "sigmoid" (default): logits, target: (B, C, *spatial), target multi-hot;
        distance_map: (B, C, *spatial), one per channel.
    activation "softmax": logits, target: (B, C, *spatial), target one-hot, channel 0 the
        background; distance_map: (B, C - 1, *spatial), one per class 1..C-1.
    The atrium: (B, 1, D, H, W) throughout, sigmoid. distance_map is needed by "Boundary" and
    "Hybrid" (`needs_distance_map`) and may be None otherwise; `weight` is the hybrid's Dice
    weight (from `BoundarySchedule.weight`) and is ignored by the others. Returns the batch
    mean.
    """

    name: str = "Dice"
    focal_alpha: float = FOCAL_ALPHA
    focal_gamma: float = FOCAL_GAMMA
    squared_dice: bool = False
    activation: str = "sigmoid"

    def __post_init__(self):
        if self.name not in LOSS_NAMES:
            raise ValueError(f"loss {self.name!r}: must be one of {', '.join(LOSS_NAMES)}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation {self.activation!r}: must be one of {', '.join(ACTIVATIONS)}")
        if not 0 <= self.focal_alpha <= 1 or self.focal_gamma < 0:
            raise ValueError(f"focal alpha {self.focal_alpha} must lie in [0, 1] and gamma {self.focal_gamma} be >= 0")

    @property
    def needs_distance_map(self) -> bool:
        return self.name in ("Boundary", "Hybrid")

    def __call__(self, logits: torch.Tensor, target: torch.Tensor, distance_map: torch.Tensor | None = None,
                 weight: float = 1.0) -> torch.Tensor:
        if self.needs_distance_map and distance_map is None:
            raise ValueError(f"the {self.name} loss needs the target's signed distance map "
                             "(losses.signed_distance_maps)")
        act = self.activation
        if self.name == "Dice":
            return dice_loss(logits, target, squared=self.squared_dice, activation=act)
        if self.name == "DiceCE":
            return dice_ce_loss(logits, target, squared=self.squared_dice, activation=act)
        if self.name == "Focal":
            return focal_loss(logits, target, alpha=self.focal_alpha, gamma=self.focal_gamma, activation=act)
        if self.name == "Boundary":
            return boundary_loss(logits, distance_map, activation=act)
        return hybrid_loss(logits, target, distance_map, weight, squared=self.squared_dice, activation=act)


# The iterative strategy's segmentation terms: the paper's border-weighted cross-entropy, alone or
# with the soft Dice; the completeness cross-entropy is added to either.
ITERATIVE_LOSSES = ("WeightedBCE", "WeightedBCEDice")


@dataclass(frozen=True)
class IterativeLoss:
    """`iterative_loss` behind the training loop's call, for a model of two outputs:

        loss = IterativeLoss("WeightedBCE")(seg_logits, complete_logits, target, weights, complete)

    `weight` is accepted for the loop's sake and unused (no schedule)."""

    name: str = "WeightedBCE"

    def __post_init__(self):
        if self.name not in ITERATIVE_LOSSES:
            raise ValueError(f"loss {self.name!r}: must be one of {', '.join(ITERATIVE_LOSSES)}")

    @property
    def needs_distance_map(self) -> bool:
        return False

    def __call__(self, seg_logits: torch.Tensor, complete_logits: torch.Tensor, target: torch.Tensor,
                 weights: torch.Tensor, complete: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
        return iterative_loss(seg_logits, complete_logits, target, weights, complete,
                              dice=self.name == "WeightedBCEDice")


# Each loss at its defaults, by name (train.py's `--loss_criterion` choices).
LOSSES = {name: SegmentationLoss(name) for name in LOSS_NAMES}
