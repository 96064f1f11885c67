"""A small U-Net for periodic fields: circular padding everywhere, width and depth from the config."""

import math

import torch
from torch import nn

from .run import UserError


def conv_block(in_channels, out_channels):
    """Two 3x3 convolutions that wrap around the edges, as the periodic box does."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, padding_mode="circular"),
        nn.GroupNorm(math.gcd(8, out_channels), out_channels),  # per sample: no batch statistics to sync in DDP
        nn.GELU(),
        nn.Conv2d(out_channels, out_channels, 3, padding=1, padding_mode="circular"),
        nn.GroupNorm(math.gcd(8, out_channels), out_channels),
        nn.GELU(),
    )


class UNet(nn.Module):
    """depth levels; level i has base_channels * 2**i channels and 1/2**i of the grid."""

    def __init__(self, base_channels=16, depth=4, in_channels=1, out_channels=1):
        super().__init__()
        widths = [base_channels * 2**level for level in range(depth)]
        self.down = nn.ModuleList()
        for width in widths:
            self.down.append(conv_block(in_channels, width))
            in_channels = width
        self.upsample = nn.ModuleList(
            nn.ConvTranspose2d(wide, narrow, 2, stride=2) for wide, narrow in zip(widths[:0:-1], widths[-2::-1])
        )
        self.up = nn.ModuleList(conv_block(2 * narrow, narrow) for narrow in widths[-2::-1])
        self.head = nn.Conv2d(base_channels, out_channels, 1)
        self.pool = nn.AvgPool2d(2)

    def forward(self, x):
        skips = []
        for level, block in enumerate(self.down):
            if level > 0:
                x = self.pool(x)
            x = block(x)
            skips.append(x)
        for upsample, block, skip in zip(self.upsample, self.up, reversed(skips[:-1])):
            x = block(torch.cat([upsample(x), skip], dim=1))
        return self.head(x)


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())


def check_depth(depth, grid):
    """A U-Net of `depth` levels halves the grid depth - 1 times: the grid must divide by 2**(depth - 1)."""
    if grid % 2 ** (depth - 1):
        deepest = next(d for d in range(depth, 0, -1) if grid % 2 ** (d - 1) == 0)
        raise UserError(f"--depth {depth} is too deep for a {grid}x{grid} grid (it must divide by {2 ** (depth - 1)}): "
                        f"use --depth {deepest} or less, or a larger --data_preset")  # fmt: skip
