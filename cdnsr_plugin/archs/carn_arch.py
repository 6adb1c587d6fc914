"""CARN-M, the mobile CARN that ClassSR accelerates (Ahn et al., ECCV 2018; ClassSR Sec. 4.2)."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from basicsr.utils.registry import ARCH_REGISTRY
from torch import nn

from cdnsr_plugin.registry import register

# DIV2K RGB mean, as in CARN and ClassSR (images in [0, 1]).
_RGB_MEAN = (0.4488, 0.4371, 0.4040)


def _conv_relu(in_ch: int, out_ch: int, kernel: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, kernel, 1, kernel // 2, groups=groups), nn.ReLU(inplace=True))


class BasicBlock(nn.Module):
    """Conv + ReLU (the cascading 1x1 fusions). Wrapped in ``body`` to keep CARN's parameter names."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.body = _conv_relu(in_ch, out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class EResidualBlock(nn.Module):
    """Efficient residual block: two grouped 3x3 convs, a 1x1 conv, identity skip, ReLU."""

    def __init__(self, num_feat: int, groups: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(num_feat, num_feat, 3, 1, 1, groups=groups), nn.ReLU(inplace=True),
            nn.Conv2d(num_feat, num_feat, 3, 1, 1, groups=groups), nn.ReLU(inplace=True),
            nn.Conv2d(num_feat, num_feat, 1, 1, 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + x)


class CascadingBlock(nn.Module):
    """CARN-M local cascade: ONE efficient residual block applied three times (shared weights),
    each output concatenated with everything before it and fused by a 1x1 conv."""

    def __init__(self, num_feat: int, groups: int) -> None:
        super().__init__()
        self.b1 = EResidualBlock(num_feat, groups)
        self.c1 = BasicBlock(num_feat * 2, num_feat)
        self.c2 = BasicBlock(num_feat * 3, num_feat)
        self.c3 = BasicBlock(num_feat * 4, num_feat)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cascade(x, [self.b1] * 3, [self.c1, self.c2, self.c3])


def cascade(x: torch.Tensor, blocks: list[nn.Module], fusions: list[nn.Module]) -> torch.Tensor:
    """CARN's cascading connection: ``o_k = fuse_k(cat(x, b_1, ..., b_k))`` with ``b_k = block_k(o_{k-1})``."""
    features, out = x, x
    for block, fuse in zip(blocks, fusions):
        features = torch.cat([features, block(out)], dim=1)
        out = fuse(features)
    return out


class UpsampleBlock(nn.Module):
    """Grouped 3x3 conv + ReLU + pixel shuffle: log2(scale) stages of x2, or one x3 stage."""

    def __init__(self, num_feat: int, scale: int, groups: int) -> None:
        super().__init__()
        if scale == 3:
            factors = [3]
        elif scale >= 2 and scale & (scale - 1) == 0:
            factors = [2] * int(math.log2(scale))
        else:
            raise ValueError(f'CARN upscale must be 2, 3, 4 or 8, got {scale}')
        layers: list[nn.Module] = []
        for factor in factors:
            layers += [
                nn.Conv2d(num_feat, factor * factor * num_feat, 3, 1, 1, groups=groups),
                nn.ReLU(inplace=True),
                nn.PixelShuffle(factor)
            ]
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


@register(ARCH_REGISTRY)
class CARN(nn.Module):
    """CARN-M as used by ClassSR: entry conv, three cascading blocks (each one shared efficient
    residual block with grouped convs), global cascading 1x1 fusions, grouped sub-pixel upsampler.

    ClassSR's branches differ only in ``num_feat``: 36 / 52 / 64. The DIV2K mean is subtracted and
    added back as a fixed offset (CARN's ``MeanShift``) rather than as a 1x1 conv, which changes no
    output and is excluded from FLOPs as ClassSR's counter excluded it.

    Args:
        num_in_ch: input channels.
        num_out_ch: output channels.
        num_feat: width; must be divisible by ``groups``.
        upscale: 2, 3, 4 or 8.
        groups: groups of the grouped convolutions (CARN-M: 4).
        rgb_mean: the per-channel offset subtracted from the input and added to the output; default the
            DIV2K mean (3 channels; zero otherwise). Imported official ClassSR / CDNSR weights set it: their
            ``MeanShift`` 1x1 convs were trained along, and ``cdnsr_plugin/deploy/convert.py`` folds them into
            ``entry`` / ``exit`` exactly only with the offset they imply.

    Examples:
        >>> CARN(num_feat=36, upscale=2)(torch.zeros(1, 3, 8, 8)).shape
        torch.Size([1, 3, 16, 16])
    """

    def __init__(self,
                 num_in_ch: int = 3,
                 num_out_ch: int = 3,
                 num_feat: int = 64,
                 upscale: int = 4,
                 groups: int = 4,
                 rgb_mean: Optional[Sequence[float]] = None) -> None:
        super().__init__()
        if num_feat % groups:
            raise ValueError(f'CARN num_feat ({num_feat}) must be divisible by groups ({groups})')
        self.upscale = upscale
        if rgb_mean is None:
            mean = torch.tensor(_RGB_MEAN) if num_in_ch == num_out_ch == 3 else torch.zeros(1)
        elif num_in_ch != num_out_ch or len(rgb_mean) != num_in_ch:
            raise ValueError(f'CARN rgb_mean needs num_in_ch == num_out_ch and one value per channel, got '
                             f'{list(rgb_mean)} for {num_in_ch} -> {num_out_ch} channels')
        else:
            mean = torch.tensor([float(v) for v in rgb_mean])
        self.register_buffer('mean', mean.view(1, -1, 1, 1), persistent=False)
        self.entry = nn.Conv2d(num_in_ch, num_feat, 3, 1, 1)
        self.b1 = CascadingBlock(num_feat, groups)
        self.b2 = CascadingBlock(num_feat, groups)
        self.b3 = CascadingBlock(num_feat, groups)
        self.c1 = BasicBlock(num_feat * 2, num_feat)
        self.c2 = BasicBlock(num_feat * 3, num_feat)
        self.c3 = BasicBlock(num_feat * 4, num_feat)
        self.upsample = UpsampleBlock(num_feat, upscale, groups)
        self.exit = nn.Conv2d(num_feat, num_out_ch, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.entry(x - self.mean)
        out = cascade(out, [self.b1, self.b2, self.b3], [self.c1, self.c2, self.c3])
        return self.exit(self.upsample(out)) + self.mean
