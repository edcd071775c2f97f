"""Backbones: IResNet-18/34/50 (InsightFace's ArcFace backbone) and a small CPU-friendly one, adapted to
whatever the defence feeds them.

Inputs by defence (see defences.Defence.out_shape):
    none (RGB baseline)     (C, 112, 112) pixels
    frequency, upsample 8   (n_kept, 112, 112) channels, e.g. 189 for RGB with the DC dropped (TFace's layout)
    frequency, upsample 1   (n_kept, 14, 14) channels, e.g. C*63: the plain 8x8 block DCT

Stem adaptation: the stem conv takes ``in_channels``; the stages downsample by 2 until the map is 7x7, as
IResNet does at 112x112 (strides 2, 2, 2, 2). A 14x14 frequency input has already been downsampled by the
8x8 blocks, so only stage 2 keeps stride 2 (1, 2, 1, 1): stage 1 still sees the 14x14 grid, and the final
7x7x512 map and fc layer are those of the published network. The small backbone maps any input to the 14x14
grid first (space-to-depth for 112x112 pixels), so the RGB baseline and the frequency defences run the same
network on the same geometry.
"""
from __future__ import annotations

import math

import torch
from torch import nn

LAYERS = {"iresnet18": (2, 2, 2, 2), "iresnet34": (3, 4, 6, 3), "iresnet50": (3, 4, 14, 3)}
FINAL = 7  # the spatial size of IResNet's last map at 112x112


def conv3x3(i, o, stride=1):
    return nn.Conv2d(i, o, 3, stride, 1, bias=False)


class IBasicBlock(nn.Module):
    """InsightFace's pre-activation-style block: BN-conv-BN-PReLU-conv(stride)-BN (+ shortcut)."""

    def __init__(self, inplanes, planes, stride=1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=1e-5)
        self.conv1 = conv3x3(inplanes, planes)
        self.bn2 = nn.BatchNorm2d(planes, eps=1e-5)
        self.prelu = nn.PReLU(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn3 = nn.BatchNorm2d(planes, eps=1e-5)
        self.down = None
        if stride != 1 or inplanes != planes:
            self.down = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes, eps=1e-5))

    def forward(self, x):
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + (x if self.down is None else self.down(x))


def stage_strides(size: int) -> tuple[int, ...]:
    """Strides of the 4 stages that bring a ``size`` x ``size`` map to 7x7 (size = 7 * 2^d, d <= 4)."""
    d = math.log2(size / FINAL)
    if size % FINAL or d != int(d) or not 0 <= d <= 4:
        raise ValueError(f"input size must be 7 * 2^d (d = 0..4), e.g. 112 or 14; got {size}")
    d = int(d)
    if d == 1:
        return (1, 2, 1, 1)
    return tuple([2] * d + [1] * (4 - d))


class IResNet(nn.Module):
    """IResNet with a stem for ``in_channels`` and strides for ``in_size``; returns (N, embedding) features."""

    def __init__(self, layers, in_channels=3, in_size=112, embedding=512, widths=(64, 128, 256, 512), dropout=0.0, space_to_depth=1):
        super().__init__()
        self.s2d = nn.PixelUnshuffle(space_to_depth) if space_to_depth > 1 else nn.Identity()
        c0 = in_channels * space_to_depth**2
        size = in_size // space_to_depth
        self.stem = nn.Sequential(conv3x3(c0, widths[0]), nn.BatchNorm2d(widths[0], eps=1e-5), nn.PReLU(widths[0]))
        blocks, inp = [], widths[0]
        for n, w, s in zip(layers, widths, stage_strides(size)):
            for b in range(n):
                blocks.append(IBasicBlock(inp, w, s if b == 0 else 1))
                inp = w
        self.body = nn.Sequential(*blocks)
        self.bn2 = nn.BatchNorm2d(inp, eps=1e-5)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(inp * FINAL * FINAL, embedding)
        self.features = nn.BatchNorm1d(embedding, eps=1e-5)
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad = False  # as InsightFace: a fixed-scale final BN
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0, 0.1)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        # Zero the last BN of every residual branch: each block starts as the identity (stabler early training).
        for m in self.modules():
            if isinstance(m, IBasicBlock):
                nn.init.constant_(m.bn3.weight, 0)

    def forward(self, x):
        x = self.body(self.stem(self.s2d(x)))
        x = self.dropout(torch.flatten(self.bn2(x), 1))
        return self.features(self.fc(x))


def build_model(arch: str, in_channels: int, in_size: int, embedding: int = 512, width: float = 1.0, dropout: float = 0.0) -> IResNet:
    """IResNet-18/34/50, or "small": one block per stage, widths (32, 64, 128, 128) x width, on the 14x14 grid.

    Example: ``build_model("iresnet50", 189, 112)`` is TFace's frequency-domain backbone; ``build_model(
    "small", 63, 14, 128)`` trains on a 2-core CPU.
    """
    if arch in LAYERS:
        widths = tuple(max(8, int(round(c * width))) for c in (64, 128, 256, 512))
        return IResNet(LAYERS[arch], in_channels, in_size, embedding, widths, dropout)
    if arch in ("small", "tiny"):
        base = (32, 64, 128, 128) if arch == "small" else (8, 16, 16, 16)
        widths = tuple(max(4, int(round(c * width))) for c in base)
        s2d = in_size // 14 if in_size > 14 and in_size % 14 == 0 else 1
        return IResNet((1, 1, 1, 1), in_channels, in_size, embedding, widths, dropout, space_to_depth=s2d)
    raise ValueError(f"model.arch must be one of {sorted(LAYERS) + ['small', 'tiny']}, got {arch!r}")
