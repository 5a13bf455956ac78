"""3D bottleneck attention module (BAM: Park, Woo, Lee and Kweon, BMVC 2018), the gate the
reference write-up (VNet_PyTorch-Atriaseg2018, see the README) places after the V-Net's input
stage and each of its encoder stages."""
from __future__ import annotations

import torch
from torch import nn

CONV = {2: nn.Conv2d, 3: nn.Conv3d}


class ChannelGate(nn.Module):
    """What to look for: global average pooling over D, H, W, then an MLP
    `channels -> channels // reduction -> channels`. (B, C, D, H, W) -> (B, C, 1, 1, 1), or
    (B, C, H, W) -> (B, C, 1, 1)."""

    def __init__(self, channels: int, reduction: int):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, channels))

    def forward(self, x):
        # A mean over the spatial dimensions pools any D, H, W; BAM's published code pooled
        # with a square kernel of size H and so only worked on square inputs.
        pooled = x.mean(dim=tuple(range(2, x.dim())))                 # (B, C)
        return self.mlp(pooled).reshape(*pooled.shape, *[1] * (x.dim() - 2))  # (B, C, 1, 1[, 1])


class SpatialGate(nn.Module):
    """Where to look: a 1x1x1 convolution to `channels // reduction`, two 3x3x3 convolutions
    dilated by `dilation` (a wide context at little cost), a 1x1x1 convolution to one map.
    (B, C, D, H, W) -> (B, 1, D, H, W); the padding keeps D, H, W whatever their size. 2D
    convolutions when `dims` is 2."""

    def __init__(self, channels: int, reduction: int, dilation: int, dims: int = 3):
        super().__init__()
        hidden = max(1, channels // reduction)
        conv = CONV[dims]
        self.body = nn.Sequential(
            conv(channels, hidden, 1), nn.ReLU(inplace=True),
            conv(hidden, hidden, 3, padding=dilation, dilation=dilation), nn.ReLU(inplace=True),
            conv(hidden, hidden, 3, padding=dilation, dilation=dilation), nn.ReLU(inplace=True),
            conv(hidden, 1, 1),
        )

    def forward(self, x):
        return self.body(x)


class BottleneckAttention3d(nn.Module):
    """`x * (1 + sigmoid(channel_gate(x) + spatial_gate(x)))`, the two gates broadcast to
    (B, C, D, H, W).

    The gates are summed inside one sigmoid, as in the BAM paper (its equation 1), rather than
    applied one after the other as the reference code did: the sum lets a channel's response
    and a location's response trade off against each other in one attention map, which is the
    module that the paper evaluated. The `1 +` keeps an identity path: the module can
    emphasise features by up to 2x but never erase them.

    BAM's gates contain batch normalisation; these have none, like the rest of our V-Net:
    with the segmenter's batch of 3 its statistics would be noise, a batch of 1 would make the
    channel gate's normalisation fail in training, and the network would behave differently in
    training and evaluation.

    Args:
        channels: C, the width of the features it gates.
        reduction: width divisor of both gates' hidden layers (at least one channel remains).
        dilation: dilation of the spatial gate's two 3x3x3 convolutions.
        dims: 3, or 2 for the gate of a 2D network (3x3 convolutions).

    Input and output (B, C, D, H, W), any D, H, W; (B, C, H, W) in 2D.
    """

    def __init__(self, channels: int, reduction: int = 4, dilation: int = 4, dims: int = 3):
        super().__init__()
        if channels < 1 or reduction < 1 or dilation < 1:
            raise ValueError(f"channels, reduction and dilation must be >= 1, got {channels}, {reduction}, {dilation}")
        self.channel = ChannelGate(channels, reduction)
        self.spatial = SpatialGate(channels, reduction, dilation, dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.channel(x) + self.spatial(x))  # (B, C, D, H, W) or (B, C, H, W)
        return x * (1 + gate)
