"""The iterative FCN for instance segmentation (Lessmann, van Ginneken, de Jong and Išgum,
"Iterative fully convolutional neural networks for automatic vertebra segmentation", MIDL 2018):
a 3D U-Net of constant width that sees an image patch and the instance memory (the instances
found so far) as two channels, segments the next instance, and says whether that instance lies
wholly inside the patch. `inference.iterative_instances` runs the search with it."""
from __future__ import annotations

import torch
from torch import nn


class ConvBlock(nn.Sequential):
    """Two 3x3x3 convolutions, each followed by instance normalisation and a leaky ReLU. Instance,
    not batch, normalisation: the seed trains with batches of one patch, where batch statistics
    are those of a single sample and differ between training and evaluation. Leaky (slope 0.01,
    nnU-Net's choice beside instance normalisation), not the paper's ReLU: at the four channels a
    CPU run affords, a channel a ReLU silences is a quarter of the block, and a leaky one keeps a
    gradient through it."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__(nn.Conv3d(in_ch, out_ch, 3, padding=1), nn.InstanceNorm3d(out_ch, affine=True),
                         nn.LeakyReLU(0.01, inplace=True), nn.Conv3d(out_ch, out_ch, 3, padding=1),
                         nn.InstanceNorm3d(out_ch, affine=True), nn.LeakyReLU(0.01, inplace=True))


class IterativeFCN(nn.Module):
    """Args:
        in_channels: 2, the image and the instance memory (0/1).
        base_channels: the constant width of every block (64 in the paper).
        levels: resolution levels; the patch's sides must divide by 2 ** (levels - 1).

    `forward(x)` with x (B, in_channels, D, H, W) returns `(segmentation logits (B, 1, D, H, W),
    completeness logits (B,))`: the second by one linear layer from the coarsest features averaged
    over the patch (the paper's classification branch) and one more input, the highest
    segmentation probability on the patch's faces (detached: it informs the branch, the branch
    does not bend the segmentation). An instance the patch cuts reaches a face; averaged deep
    features alone, at the few channels of a CPU run, called every instance complete
    (docs/instances.md)."""

    def __init__(self, in_channels: int = 2, base_channels: int = 64, levels: int = 4):
        super().__init__()
        if in_channels < 1 or base_channels < 1 or levels < 2:
            raise ValueError(f"in_channels and base_channels must be >= 1 and levels >= 2, got {in_channels}, "
                             f"{base_channels}, {levels}")
        self.arch = dict(in_channels=in_channels, base_channels=base_channels, levels=levels)
        self.spatial_dims = 3
        c = base_channels
        self.down = nn.ModuleList([ConvBlock(in_channels, c)] + [ConvBlock(c, c) for _ in range(levels - 1)])
        self.up = nn.ModuleList([ConvBlock(2 * c, c) for _ in range(levels - 1)])
        self.segmentation = nn.Conv3d(c, 1, 1)
        self.completeness = nn.Linear(c + 1, 1)

    def forward(self, x):
        factor = 2 ** (len(self.down) - 1)
        assert all(s % factor == 0 for s in x.shape[2:]), f"D, H, W must divide by {factor}, got {tuple(x.shape)}"
        skips = []
        for k, block in enumerate(self.down):
            x = block(x if k == 0 else nn.functional.max_pool3d(x, 2))
            skips.append(x)
        pooled = x.mean(dim=(2, 3, 4))
        for block, skip in zip(self.up, reversed(skips[:-1])):
            x = block(torch.cat([nn.functional.interpolate(x, scale_factor=2, mode="nearest"), skip], dim=1))
        seg = self.segmentation(x)
        complete = self.completeness(torch.cat([pooled, face_maximum(torch.sigmoid(seg.detach().float()))], 1))
        return seg, complete.squeeze(1)


def face_maximum(prob: torch.Tensor) -> torch.Tensor:
    """(B, 1) the highest value of `prob (B, 1, D, H, W)` on the six faces of its volume."""
    faces = [prob[:, :, i].flatten(1) for i in (0, -1)] + [prob[:, :, :, i].flatten(1) for i in (0, -1)]
    faces += [prob[..., i].flatten(1) for i in (0, -1)]
    return torch.cat(faces, 1).amax(1, keepdim=True).to(prob.dtype)
