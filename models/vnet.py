"""V-Net (Milletari, Navab and Ahmadi, 3DV 2016) as configured in the reference left-atrium
write-up (VNet_PyTorch-Atriaseg2018, see the README): 5x5x5 convolutions with PReLU, residual
stages, 2x2x2 stride-2 down-convolutions and transposed up-convolutions, no normalisation
layers, logits out. `spatial_dims=2` builds the same network of 5x5 convolutions for slices."""
from __future__ import annotations

import math

import torch
from torch import nn

from models.attention import CONV, BottleneckAttention3d

UP_CONV = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}


class ConvStack(nn.Sequential):
    """`n` times (5x5x5 convolution, PReLU) at constant width `channels` (5x5 in 2D)."""

    def __init__(self, channels: int, n: int, dilation: int = 1, dims: int = 3):
        layers = []
        for _ in range(n):
            layers += [CONV[dims](channels, channels, 5, padding=2 * dilation, dilation=dilation),
                       nn.PReLU(channels)]
        super().__init__(*layers)


class InputStage(nn.Module):
    """One 5x5x5 convolution to `out_ch` channels, with the input added back (broadcast
    over channels, as V-Net does with its single-channel input). With `context` neighbouring
    slices on each side stacked into the channels (a 2D model's slice and its neighbours), the
    convolution sees all of them and the slice's own `in_ch` channels are added back."""

    def __init__(self, in_ch: int, out_ch: int, dilation: int = 1, dims: int = 3, context: int = 0):
        super().__init__()
        self.conv = CONV[dims](in_ch * (2 * context + 1), out_ch, 5, padding=2 * dilation, dilation=dilation)
        self.act = nn.PReLU(out_ch)
        self.residual = out_ch % in_ch == 0
        self.repeat = out_ch // in_ch
        self.own = slice(context * in_ch, (context + 1) * in_ch)  # the centre slice's channels

    def forward(self, x):
        out = self.act(self.conv(x))
        if self.residual:
            out = out + x[:, self.own].repeat_interleave(self.repeat, dim=1)
        return out


class DownStage(nn.Module):
    """Halve the resolution and double the channels with a 2x2x2 stride-2 convolution, then
    a residual stack of `n` convolutions."""

    def __init__(self, in_ch: int, n: int, dilation: int = 1, dims: int = 3):
        super().__init__()
        out_ch = 2 * in_ch
        self.down = CONV[dims](in_ch, out_ch, 2, stride=2)
        self.act = nn.PReLU(out_ch)
        self.convs = ConvStack(out_ch, n, dilation, dims)

    def forward(self, x):
        down = self.act(self.down(x))
        return self.convs(down) + down


class UpStage(nn.Module):
    """Double the resolution with a 2x2x2 transposed convolution to `out_ch // 2` channels,
    concatenate the skip connection (`out_ch // 2` channels), then a residual stack."""

    def __init__(self, in_ch: int, out_ch: int, n: int, dims: int = 3):
        super().__init__()
        self.up = UP_CONV[dims](in_ch, out_ch // 2, 2, stride=2)
        self.act = nn.PReLU(out_ch // 2)
        self.convs = ConvStack(out_ch, n, dims=dims)

    def forward(self, x, skip):
        cat = torch.cat([self.act(self.up(x)), skip], dim=1)
        return self.convs(cat) + cat


class VNet(nn.Module):
    """V-Net for binary 3D segmentation.

    Args:
        in_channels: image channels (1 for LGE-MRI).
        out_channels: logit channels (1 for a sigmoid foreground map).
        num_layers: convolutions per stage: `num_layers` in the two finest encoder stages,
            `num_layers + 1` in the two coarsest, mirrored in the decoder; the input stage
            has one. `num_layers=1` has 10,759,065 parameters, `num_layers=2` 16,200,025
            (the reference table's 10.75 M and 16.2 M; its code counts 241 more, from a
            PReLU per decoder stage it never calls and one it applies to the logits).
        dilation: dilation of the input stage's and the encoder's 5x5x5 convolutions.
        base_channels: width of the input stage (8 in the reference); the encoder doubles it
            at every stage (16/32/64/128). Smaller values are for tests and CPU demos.
        attention_module: put a 3D bottleneck attention module (`models.attention`) after the
            input stage and after each of the four encoder stages (on the features that go
            down the encoder and across the skip connections). At the defaults the five modules
            (8/16/32/64/128 channels) hold 283 + 1,093 + 4,297 + 17,041 + 67,873 = 90,587
            parameters: 10,849,652 in all, 16,290,612 with `num_layers=2`; the attention
            dilation adds no weights (the reference table prints 10.75 M for these rows too).
        reduction: width divisor of the attention gates' hidden layers (BAM's r).
        attention_dilation: dilation of the attention spatial gate's 3x3x3 convolutions.
        spatial_dims: 3, or 2 for the network of 2D convolutions (5x5, 2x2 strides, 2D
            attention) that segments slices; the same stages and widths, so a 2D and a 3D
            V-Net share their tensor names, and only the convolution kernels differ in shape.

    Input (B, in_channels, D, H, W) with D, H and W divisible by 16; output logits
    (B, out_channels, D, H, W). In 2D: (B, in_channels, H, W) -> (B, out_channels, H, W), or a
    (B, in_channels, D, H, W) stack whose D slices are each segmented on their own, so that
    the 3D pipeline (patches of depth 1, the sliding window) runs a 2D model unchanged.
    """

    def __init__(self, in_channels: int = 1, out_channels: int = 1, num_layers: int = 1,
                 dilation: int = 1, base_channels: int = 8, attention_module: bool = False,
                 reduction: int = 4, attention_dilation: int = 4, spatial_dims: int = 3,
                 context_slices: int = 0):
        super().__init__()
        if num_layers < 1 or dilation < 1 or base_channels < 1:
            raise ValueError(f"num_layers, dilation and base_channels must be >= 1, got "
                             f"{num_layers}, {dilation}, {base_channels}")
        if spatial_dims not in CONV:
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if context_slices < 0 or (context_slices and spatial_dims != 2):
            raise ValueError(f"context_slices must be 0, or >= 1 for a 2D model, got {context_slices}")
        if reduction < 1 or attention_dilation < 1:
            raise ValueError(f"reduction and attention_dilation must be >= 1, got {reduction}, {attention_dilation}")
        self.arch = dict(in_channels=in_channels, out_channels=out_channels, num_layers=num_layers,
                         dilation=dilation, base_channels=base_channels, attention_module=bool(attention_module),
                         reduction=reduction, attention_dilation=attention_dilation, spatial_dims=spatial_dims,
                         context_slices=context_slices)
        self.spatial_dims, self.context = d, k = spatial_dims, context_slices
        c, n = base_channels, num_layers
        self.input = InputStage(in_channels, c, dilation, d, k)
        self.down1 = DownStage(c, n, dilation, d)            # 2c,  1/2
        self.down2 = DownStage(2 * c, n, dilation, d)        # 4c,  1/4
        self.down3 = DownStage(4 * c, n + 1, dilation, d)    # 8c,  1/8
        self.down4 = DownStage(8 * c, n + 1, dilation, d)    # 16c, 1/16
        self.up4 = UpStage(16 * c, 16 * c, n + 1, d)         # 16c, 1/8
        self.up3 = UpStage(16 * c, 8 * c, n + 1, d)          # 8c,  1/4
        self.up2 = UpStage(8 * c, 4 * c, n, d)               # 4c,  1/2
        self.up1 = UpStage(4 * c, 2 * c, n, d)               # 2c,  1/1
        self.output = CONV[d](2 * c, out_channels, 1)
        # Built last, so the V-Net's own weights draw the same random numbers with or without
        # attention; Identity has no state, so plain checkpoints keep their keys.
        def gate(channels):
            return BottleneckAttention3d(channels, reduction, attention_dilation, d) if attention_module \
                else nn.Identity()
        self.gate0, self.gate1, self.gate2, self.gate3, self.gate4 = (gate(k * c) for k in (1, 2, 4, 8, 16))

    @torch.no_grad()
    def load_matching(self, state_dict: dict) -> int:
        """Copy every tensor of `state_dict` whose name and shape this model shares (the rest
        keep their values); returns how many were copied. The segmenter uses it to start from
        the trained locator, a V-Net of the same widths: all of its tensors carry over to a
        plain segmenter, the shared ones to a deeper (`num_layers`) or attention variant."""
        own = self.state_dict()
        shared = [k for k, v in state_dict.items() if k in own and own[k].shape == v.shape]
        for k in shared:
            own[k].copy_(state_dict[k])
        return len(shared)

    @torch.no_grad()
    def transfer_from(self, state_dict: dict, skip=(), apply: bool = True) -> dict[str, list[str]]:
        """Start from another V-Net's weights (another data set, other classes, 2D or 3D), tensor
        by tensor by name: one of the same shape is copied ("loaded"); a convolution kernel of
        the other dimensionality is converted ("converted"); the rest, and the names in `skip`,
        keep their values ("skipped": the other's names that did not fit, then this model's
        names it lacked). `apply=False` only sorts them, changing nothing.

        A 3D kernel becomes 2D by summing over its depth (a transposed one by averaging, since
        each output depth of a stride-2 up-convolution sees one depth of its kernel), a 2D one
        3D by spreading it evenly over the depth (I3D's inflation; a transposed one repeated):
        either way the network answers a volume that is constant along depth as the other did
        its slice, so the transferred filters keep what they detect."""
        own = self.state_dict()
        out = {"loaded": [], "converted": [], "skipped": []}
        for name, value in state_dict.items():
            target = own.get(name)
            if target is None or name in skip:
                out["skipped"].append(name)
            elif target.shape == value.shape:
                if apply:
                    target.copy_(value)
                out["loaded"].append(name)
            elif value.dim() == 5 and target.dim() == 4 and value.shape[:2] + value.shape[3:] == target.shape:
                if apply:
                    target.copy_(value.mean(2) if name.endswith("up.weight") else value.sum(2))
                out["converted"].append(name)
            elif value.dim() == 4 and target.dim() == 5 and target.shape[:2] + target.shape[3:] == value.shape:
                if apply:
                    spread = value if name.endswith("up.weight") else value / target.shape[2]
                    target.copy_(spread.unsqueeze(2).expand_as(target))
                out["converted"].append(name)
            else:
                out["skipped"].append(name)
        out["skipped"] += [k for k in own if k not in state_dict]
        return out

    @torch.no_grad()
    def unit_variance_init(self, batch: torch.Tensor, prior: float = 0.01) -> list[float]:
        """Rescale the V-Net's convolutions so that each one's output has unit standard deviation
        on `batch` (B, in_channels, D, H, W): layer-sequential unit-variance initialisation
        (LSUV; Mishkin and Matas, ICLR 2016), the variance-preserving start that a network
        without normalisation layers otherwise lacks. Then shift the logit layer's bias so that
        the mean logit on `batch` is log(prior / (1 - prior)): the network starts out predicting
        background nearly everywhere (the prior-probability start of Lin et al., ICCV 2017).

        Why: PyTorch's default initialisation shrinks the signal at every 5x5x5 convolution, so
        the logits start nearly constant; from an even start the Dice loss's gradient is then
        dominated by a push towards foreground everywhere, and the V-Net drifts into an
        all-foreground output where it stays for tens of steps before it learns any shape. From
        a background start with unit-variance features, the gradient is almost entirely "raise
        the foreground voxels", a signal about where the atrium is (measurements:
        docs/experiments.md, "Start of training").

        One forward pass: each convolution, in the order the forward pass reaches it, has its
        weight and bias divided by the standard deviation of its output, and that output is
        rescaled in place, so later layers see what the rescaled weights produce (convolution
        and PReLU are positively homogeneous). The attention gates keep their initialisation.
        Returns the factors applied to the convolutions, in order.
        """
        if not 0 < prior < 1:
            raise ValueError(f"prior must lie in (0, 1), got {prior}")
        stages = [self.input, self.down1, self.down2, self.down3, self.down4, self.up4, self.up3, self.up2, self.up1]
        convs = {m for stage in stages for m in stage.modules() if isinstance(m, (*CONV.values(), *UP_CONV.values()))}
        factors = []

        def rescale(module, inputs, output):
            if module not in convs:
                return None
            convs.discard(module)  # once per module, even if a forward pass reached it twice
            std = output.float().std().item()
            if not (math.isfinite(std) and std > 1e-8):
                return None
            module.weight.div_(std)
            if module.bias is not None:
                module.bias.div_(std)
            factors.append(1.0 / std)
            return output / std

        handles = [m.register_forward_hook(rescale) for m in list(convs)]
        try:
            logits = self(batch)  # already those of the rescaled network
        finally:
            for h in handles:
                h.remove()
        self.output.bias.add_(math.log(prior / (1 - prior)) - logits.float().mean())
        return factors

    @property
    def encoder(self) -> list[nn.Module]:
        """The input stage and the down stages, with their attention gates: what
        `--freeze_encoder_epochs` keeps fixed while the decoder adapts."""
        return [self.input, self.down1, self.down2, self.down3, self.down4,
                self.gate0, self.gate1, self.gate2, self.gate3, self.gate4]

    def forward(self, x):
        if self.spatial_dims == 2 and x.dim() == 5:  # a stack of slices: each slice on its own
            k = self.context  # each output slice sees k input slices on either side: D - 2k out
            b, c, depth = x.shape[0], x.shape[1], x.shape[2] - 2 * k
            assert depth >= 1, f"a stack of {x.shape[2]} slices is too short for {k} context slices a side"
            windows = x.unfold(2, 2 * k + 1, 1)                      # (B, C, D', H, W, 2k + 1)
            slices = windows.permute(0, 2, 5, 1, 3, 4).reshape(b * depth, (2 * k + 1) * c, *x.shape[3:])
            out = self(slices)
            return out.reshape(b, depth, -1, *x.shape[3:]).transpose(1, 2)
        assert x.dim() == 2 + self.spatial_dims, f"expected a {self.spatial_dims}D batch, got {tuple(x.shape)}"
        assert all(s % 16 == 0 for s in x.shape[2:]), f"D, H, W must divide by 16, got {tuple(x.shape)}"
        s0 = self.gate0(self.input(x))
        s1 = self.gate1(self.down1(s0))
        s2 = self.gate2(self.down2(s1))
        s3 = self.gate3(self.down3(s2))
        out = self.gate4(self.down4(s3))
        out = self.up4(out, s3)
        out = self.up3(out, s2)
        out = self.up2(out, s1)
        out = self.up1(out, s0)
        return self.output(out)
