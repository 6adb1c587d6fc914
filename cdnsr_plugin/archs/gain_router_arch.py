"""A router that regresses what each larger branch gains on a cell (``tools/fit_router.py`` fits it)."""
from __future__ import annotations

import torch
from basicsr.utils.registry import ARCH_REGISTRY
from torch import nn

from cdnsr_plugin.registry import register

_Y = (65.481 / 255.0, 128.553 / 255.0, 24.966 / 255.0)  # BT.601 as basicsr's rgb2ycbcr(y_only=True), no offset
_CB = (-37.797 / 255.0, -74.203 / 255.0, 112.0 / 255.0)
_CR = (112.0 / 255.0, -93.786 / 255.0, -18.214 / 255.0)
_LAPLACIAN = ((0.0, 1.0, 0.0), (1.0, -4.0, 1.0), (0.0, 1.0, 0.0))
_SOBEL_X = ((-1.0, 0.0, 1.0), (-2.0, 0.0, 2.0), (-1.0, 0.0, 1.0))
HAND_FEATURES = ('log_laplacian_y', 'log_laplacian_y_p90', 'log_gradient_y', 'log_std_y', 'mean_y',
                 'log_laplacian_chroma', 'log_gradient_chroma')
_EPS = 1e-4


def _fixed_conv(weight: torch.Tensor, groups: int = 1) -> nn.Conv2d:
    """A convolution with the given fixed weights and no bias, not trained (a module, so ptflops counts it)."""
    out_ch, in_per_group, k, _ = weight.shape
    conv = nn.Conv2d(in_per_group * groups, out_ch, k, bias=False, groups=groups)
    conv.weight.data.copy_(weight)
    conv.weight.requires_grad_(False)
    return conv


class HandFeatures(nn.Module):
    """(N, 7) cheap statistics of RGB cells in [0, 1] (``HAND_FEATURES``): the Laplacian edge energy of Y
    (mean absolute response, and the mean of its largest tenth, approximated as mean + 1.28 std), the mean
    Sobel gradient magnitude of Y, the std of Y, the mean of Y, and the Laplacian and gradient energy of the
    chroma (Cb and Cr); logs of energies. The colour transforms, Laplacians and Sobel filters are fixed
    convolutions (counted by ptflops as the router's cost; exportable to ONNX); the few element-wise operations
    after them (abs, squares, means, logs: about 15 per pixel) are not counted."""

    def __init__(self) -> None:
        super().__init__()
        lap = torch.tensor(_LAPLACIAN).view(1, 1, 3, 3)
        sobel = torch.tensor((_SOBEL_X, tuple(zip(*_SOBEL_X)))).view(2, 1, 3, 3)
        self.luma = _fixed_conv(torch.tensor(_Y).view(1, 3, 1, 1))
        self.chroma = _fixed_conv(torch.tensor((_CB, _CR)).view(2, 3, 1, 1))
        self.lap_y = _fixed_conv(lap)
        self.lap_c = _fixed_conv(lap.repeat(2, 1, 1, 1), groups=2)
        self.grad_y = _fixed_conv(sobel)
        self.grad_c = _fixed_conv(sobel.repeat(2, 1, 1, 1), groups=2)

    @staticmethod
    def _energy(lap: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        lap_abs = lap.abs().sum(1)
        magnitude = (grad.pow(2).sum(1) + 1e-8).sqrt()
        mean = lap_abs.mean(dim=(1, 2))
        spread = (lap_abs - mean.view(-1, 1, 1)).pow(2).mean(dim=(1, 2)).sqrt()
        return mean, mean + 1.28 * spread, magnitude.mean(dim=(1, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        luma, chroma = self.luma(x), self.chroma(x)
        lap_y, lap_y_top, grad_y = self._energy(self.lap_y(luma), self.grad_y(luma))
        lap_c, _, grad_c = self._energy(self.lap_c(chroma), self.grad_c(chroma))
        std_y = (luma - luma.mean(dim=(1, 2, 3), keepdim=True)).pow(2).mean(dim=(1, 2, 3)).sqrt()
        mean_y = luma.mean(dim=(1, 2, 3))
        return torch.stack([(lap_y + _EPS).log(), (lap_y_top + _EPS).log(), (grad_y + _EPS).log(),
                            (std_y + _EPS).log(), mean_y, (lap_c + _EPS).log(), (grad_c + _EPS).log()],
                           dim=1)


@register(ARCH_REGISTRY)
class GainRouter(nn.Module):
    """Scores ``[0, g_1, g_1 + g_2, ...]`` per LR cell, where ``g_j`` is the predicted drop of the cell's mean
    squared error (Y, 8-bit range, unless fitted on another target) from branch ``j-1`` to branch ``j``.

    With these scores the cost knob's decision ``argmax_j(s_j - eta * C_j / C_max)`` (``policies``; the
    log-softmax it applies shifts every score of a cell equally) is the oracle's ``argmin_j(MSE_j + eta * C_j /
    C_max)`` with predicted errors, so ``--budget`` and ``--set-budget`` work unchanged and one fit serves
    every budget. The scores are not class probabilities: the argmax at ``eta = 0`` picks the most accurate
    branch (nearly always the backbone), and ClassSR's soft mixture is meaningless for them.

    Inputs: the cheap statistics of ``HandFeatures`` (edge and gradient energy of Y and chroma), standardised
    with the training set's mean and std (buffers set by the fit), and, unless ``num_feat`` is 0, a small
    convolutional trunk (three 3x3 convolutions, the last two at stride 2; mean- and max-pooled). An MLP maps
    them to the ``num_classes - 1`` gains. Why: the learned PatchClassifier, fitted on the training photos,
    routed unseen photos four times worse than the Laplacian edge energy alone (issue 24), so the router is
    built on such statistics and learns how the branches' errors depend on them.

    Args:
        num_in_ch: input channels (3, RGB).
        num_classes: branches routed between.
        num_feat: width of the convolutional trunk; 0: hand features only.
        hidden: width of the MLP's hidden layer.
    """

    def __init__(self, num_in_ch: int = 3, num_classes: int = 3, num_feat: int = 16, hidden: int = 64) -> None:
        super().__init__()
        if num_in_ch != 3:
            raise ValueError(f'GainRouter needs RGB input (num_in_ch 3), got {num_in_ch}')
        if num_classes < 2:
            raise ValueError(f'GainRouter num_classes must be at least 2, got {num_classes}')
        if num_feat < 0 or hidden < 1:
            raise ValueError(f'GainRouter num_feat must be >= 0 and hidden >= 1, got {num_feat} and {hidden}')
        self.num_classes = num_classes
        count = len(HAND_FEATURES)
        self.register_buffer('feature_mean', torch.zeros(count))
        self.register_buffer('feature_std', torch.ones(count))
        self.register_buffer('gain_scale', torch.ones(()))  # the fit's target scale: outputs in MSE units
        self.features = HandFeatures()
        self.trunk = None
        if num_feat:
            self.trunk = nn.Sequential(
                nn.Conv2d(num_in_ch, num_feat, 3, 1, 1), nn.LeakyReLU(0.1, True),
                nn.Conv2d(num_feat, num_feat, 3, 2, 1), nn.LeakyReLU(0.1, True), nn.Conv2d(num_feat, num_feat, 3, 2, 1),
                nn.LeakyReLU(0.1, True))
        self.head = nn.Sequential(
            nn.Linear(count + 2 * num_feat, hidden), nn.LeakyReLU(0.1, True), nn.Linear(hidden, hidden),
            nn.LeakyReLU(0.1, True), nn.Linear(hidden, num_classes - 1))

    def gains(self, x: torch.Tensor) -> torch.Tensor:
        """(N, M-1) predicted gains in units of the fit's target scale (the regression output)."""
        features = (self.features(x) - self.feature_mean) / self.feature_std
        if self.trunk is not None:
            maps = self.trunk(x)
            features = torch.cat([features, maps.mean(dim=(2, 3)), maps.amax(dim=(2, 3))], dim=1)
        return self.head(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gains = self.gains(x) * self.gain_scale
        return torch.cat([gains.new_zeros(len(gains), 1), gains.cumsum(dim=1)], dim=1)
