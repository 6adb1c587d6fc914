"""The patch classifier: ClassSR's Class-Module, CDNSR's Module-CL."""
from __future__ import annotations

import torch
from basicsr.archs.arch_util import default_init_weights
from basicsr.utils.registry import ARCH_REGISTRY
from torch import nn

from cdnsr_plugin.registry import register


@register(ARCH_REGISTRY)
class PatchClassifier(nn.Module):
    """Conv layers, global average pooling and one fully connected layer to ``num_classes`` logits.

    The default is ClassSR's Class-Module (Sec. 3.3: "five convolution layers, an average pooling
    layer and a fully-connected layer"): a 4x4 stride-4 conv to 128 channels, 1x1 convs at 128,
    a 1x1 conv to 32, each followed by LeakyReLU(0.1) except the last, then average pool and FC.
    ``num_conv`` (3 to 6) sets the number of conv layers as in CDNSR Table III, which uses five.
    On a 32x32 patch that costs 3.87M MACs (CDNSR Table III) and 7.6M paper FLOPs (ClassSR).
    Parameter names follow ClassSR's ``Classifier`` (``CondNet``, ``lastOut``) so its weights load.

    ``forward`` returns logits; the routing container applies the softmax.

    Initialisation (``init``): ClassSR's reference code scales a Kaiming init by 0.1 in every conv
    (``classsr``). Through five layers that leaves the logits nearly constant across patches: measured on
    the 256 32x32 tiles of scikit-image's ``astronaut``, the spread (std over patches) of the difference of two
    logits is 2e-6, so the FC bias alone decides the class and every early gradient moves all patches
    together. The default ``content`` uses He (fan-in) init for LeakyReLU(0.1) in every conv, where that
    spread is 0.74: from the first iteration the classifier's outputs depend on the patch.

    Args:
        num_in_ch: input channels.
        num_classes: M, the number of classes (branches).
        num_conv: number of convolution layers, 3 to 6.
        num_feat: width of the hidden conv layers.
        out_feat: channels of the last conv layer (input of the FC layer).
        first_kernel: kernel size and stride of the first conv.
        init: ``content`` (default) or ``classsr`` (the reference code's 0.1-scaled init), see above.

    Examples:
        >>> PatchClassifier(num_classes=3)(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 3])
    """

    def __init__(self,
                 num_in_ch: int = 3,
                 num_classes: int = 3,
                 num_conv: int = 5,
                 num_feat: int = 128,
                 out_feat: int = 32,
                 first_kernel: int = 4,
                 init: str = 'content') -> None:
        super().__init__()
        if not 3 <= num_conv <= 6:
            raise ValueError(f'PatchClassifier num_conv must be between 3 and 6 (CDNSR Table III), got {num_conv}')
        if num_classes < 2:
            raise ValueError(f'PatchClassifier num_classes must be at least 2, got {num_classes}')
        self.num_classes = num_classes
        layers: list[nn.Module] = [nn.Conv2d(num_in_ch, num_feat, first_kernel, first_kernel), nn.LeakyReLU(0.1, True)]
        for _ in range(num_conv - 2):
            layers += [nn.Conv2d(num_feat, num_feat, 1), nn.LeakyReLU(0.1, True)]
        layers.append(nn.Conv2d(num_feat, out_feat, 1))
        self.CondNet = nn.Sequential(*layers)
        self.lastOut = nn.Linear(out_feat, num_classes)
        if init == 'classsr':
            default_init_weights([self.CondNet], 0.1)
        elif init == 'content':
            for layer in self.CondNet:
                if isinstance(layer, nn.Conv2d):
                    nn.init.kaiming_normal_(layer.weight, a=0.1, mode='fan_in', nonlinearity='leaky_relu')
                    nn.init.zeros_(layer.bias)
        else:
            raise ValueError(f"PatchClassifier init must be 'content' or 'classsr', got {init!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lastOut(self.CondNet(x).mean(dim=(2, 3)))
