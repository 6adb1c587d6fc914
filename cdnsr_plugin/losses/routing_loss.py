"""Losses on the classifier's probabilities: ClassSR's Class-Loss and Average-Loss, CDNSR's FLOPs
regulariser. Every input ``probs`` is a (B, M) tensor of class probabilities (rows sum to 1)."""
from __future__ import annotations

from typing import Sequence, Union

import torch
from basicsr.utils.registry import LOSS_REGISTRY
from mmengine import dist
from torch import Tensor, nn

from cdnsr_plugin.registry import register


def _check_probs(probs: Tensor, name: str) -> None:
    if probs.dim() != 2 or probs.shape[1] < 2:
        raise ValueError(f'{name}: probs must have shape (B, M) with M >= 2, got {tuple(probs.shape)}')


@register(LOSS_REGISTRY)
class ClassLoss(nn.Module):
    """Class-Loss, ClassSR eq. (3): ``L_c = -sum_{i<j} |P_i(x) - P_j(x)|``, averaged over the batch.

    Minimal (``-(M-1)``) for a one-hot vector, 0 for the uniform one: it pushes each patch's
    largest probability towards 1.

    Args:
        loss_weight: multiplies the loss (``w_2`` of ClassSR eq. 2).
    """

    def __init__(self, loss_weight: float = 1.0) -> None:
        super().__init__()
        self.loss_weight = float(loss_weight)

    def forward(self, probs: Tensor) -> Tensor:
        _check_probs(probs, 'ClassLoss')
        gaps = (probs.unsqueeze(2) - probs.unsqueeze(1)).abs()  # (B, M, M), symmetric, zero diagonal
        return self.loss_weight * -(gaps.sum(dim=(1, 2)) / 2).mean()


@register(LOSS_REGISTRY)
class AverageLoss(nn.Module):
    """Average-Loss, ClassSR eq. (4): ``L_a = sum_i |sum_j P_i(x_j) - B/M|``, B the batch size.

    The value scales with B, as in the paper (whose ``w_3 = 6`` goes with B = 96).

    Distributed training (``gather`` and ``mmengine.dist.get_world_size() > 1``): the loss is taken
    over the global batch. The per-class sums ``S_loc`` and the batch size are all-reduced (sum), and
    the gradient flows through the local share scaled by the world size W:
    ``S = W * S_loc - (W * S_loc).detach() + S_global.detach()``. Its value is ``S_global``, and
    each rank's gradient w.r.t. its own probabilities is W times that of the global-batch loss;
    DDP averages gradients over the W ranks, so the parameters get exactly the global-batch
    gradient. Without ``gather`` (or in one process) each rank uses its own batch, plain eq. (4).

    Args:
        loss_weight: multiplies the loss (``w_3`` of ClassSR eq. 2).
        gather: balance classes over the global batch when distributed.
    """

    def __init__(self, loss_weight: float = 1.0, gather: bool = True) -> None:
        super().__init__()
        self.loss_weight = float(loss_weight)
        self.gather = bool(gather)

    def forward(self, probs: Tensor) -> Tensor:
        _check_probs(probs, 'AverageLoss')
        sums = probs.sum(dim=0)  # soft count of patches per class, (M,)
        batch: Union[int, Tensor] = probs.shape[0]
        world = dist.get_world_size() if self.gather else 1
        if world > 1:
            global_sums = sums.detach().clone()
            dist.all_reduce(global_sums, op='sum')
            batch = torch.tensor(float(batch), dtype=probs.dtype, device=probs.device)
            dist.all_reduce(batch, op='sum')
            local = world * sums
            sums = local - local.detach() + global_sums
        return self.loss_weight * (sums - batch / probs.shape[1]).abs().sum()


@register(LOSS_REGISTRY)
class FLOPsRegLoss(nn.Module):
    """FLOPs regulariser, CDNSR eqs. (2)-(3): ``max(0, E[F] / C_max - alpha)`` with
    ``F = sum_j C_j p_j`` per patch and ``E`` the batch mean.

    Zero (and zero gradient) while the expected cost is within the budget ``alpha * C_max``.

    Args:
        alpha: target fraction of the backbone's FLOPs, in (0, 1].
        loss_weight: multiplies the loss (``lambda_reg`` of CDNSR eq. 4).

    Raises:
        ValueError: ``alpha`` outside (0, 1]; in ``forward``, ``costs`` not M positive numbers.
    """

    def __init__(self, alpha: float = 0.55, loss_weight: float = 1.0) -> None:
        super().__init__()
        if not 0 < alpha <= 1:
            raise ValueError(f'FLOPsRegLoss: alpha must be in (0, 1] (a fraction of the backbone FLOPs), got {alpha}')
        self.alpha = float(alpha)
        self.loss_weight = float(loss_weight)

    def forward(self, probs: Tensor, costs: Union[Tensor, Sequence[float]]) -> Tensor:
        """``costs``: the M branches' FLOPs (any unit), in branch order."""
        _check_probs(probs, 'FLOPsRegLoss')
        costs = torch.as_tensor(costs, dtype=probs.dtype, device=probs.device)
        if costs.shape != (probs.shape[1], ) or not bool((costs > 0).all()):
            raise ValueError(f'FLOPsRegLoss: costs must be {probs.shape[1]} positive numbers (one per branch), '
                             f'got {costs.tolist()}')
        expected = (probs * costs).sum(dim=1).mean()
        return self.loss_weight * torch.clamp(expected / costs.max() - self.alpha, min=0)
