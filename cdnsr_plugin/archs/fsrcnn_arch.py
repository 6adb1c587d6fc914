"""FSRCNN in the layout ClassSR uses (Dong et al., ECCV 2016; ClassSR Sec. 4.2)."""
from __future__ import annotations

import math

import torch
from basicsr.utils.registry import ARCH_REGISTRY
from torch import nn

from cdnsr_plugin.registry import register


def deconv_padding(kernel: int, scale: int) -> tuple[int, int]:
    """Padding and output padding that make a stride-``scale`` transposed conv upsample exactly.

    Solves ``(H - 1) * scale - 2 * padding + kernel + output_padding = scale * H``.
    """
    padding = math.ceil((kernel - scale) / 2)
    return padding, 2 * padding - (kernel - scale)


@register(ARCH_REGISTRY)
class FSRCNN(nn.Module):
    """FSRCNN: 5x5 conv + PReLU, 1x1 shrink to ``s``, ``m`` 3x3 convs, PReLU, 1x1 expand to ``d``,
    9x9 transposed conv that upsamples by ``upscale``.

    ClassSR varies only ``d`` (the first conv and the deconv width): 16 / 36 / 56 for its three
    branches, ``s = 12``, ``m = 4``. Parameter names follow ClassSR's ``FSRCNN_net`` (``head_conv``,
    ``body_conv``, ``tail_conv``), so its released weights load unchanged.

    Args:
        num_in_ch: input channels.
        num_out_ch: output channels.
        d: width of the feature extraction and deconvolution layers.
        s: width of the shrunk mapping layers.
        m: number of 3x3 mapping convolutions.
        upscale: 2, 3 or 4.

    Examples:
        >>> net = FSRCNN(d=16, upscale=4)
        >>> net(torch.zeros(1, 3, 32, 32)).shape
        torch.Size([1, 3, 128, 128])
    """

    def __init__(self,
                 num_in_ch: int = 3,
                 num_out_ch: int = 3,
                 d: int = 56,
                 s: int = 12,
                 m: int = 4,
                 upscale: int = 4) -> None:
        super().__init__()
        if upscale < 1 or upscale > 8:
            raise ValueError(f'FSRCNN upscale must be between 1 and 8, got {upscale}')
        self.upscale = upscale
        self.head_conv = nn.Sequential(nn.Conv2d(num_in_ch, d, 5, 1, 2), nn.PReLU())
        layers: list[nn.Module] = [nn.Sequential(nn.Conv2d(d, s, 1, 1, 0), nn.PReLU())]
        layers += [nn.Conv2d(s, s, 3, 1, 1) for _ in range(m)]
        layers += [nn.PReLU(), nn.Sequential(nn.Conv2d(s, d, 1, 1, 0), nn.PReLU())]
        self.body_conv = nn.Sequential(*layers)
        padding, output_padding = deconv_padding(9, upscale)
        self.tail_conv = nn.ConvTranspose2d(d, num_out_ch, 9, upscale, padding, output_padding)
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.ConvTranspose2d):
                nn.init.normal_(module.weight, 0.0, 0.001)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Conv2d):
                fan_out = module.out_channels * module.weight[0][0].numel()
                nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail_conv(self.body_conv(self.head_conv(x)))
