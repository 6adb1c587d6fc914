"""Losses on the classifier's decisions: ClassSR's Class-Loss and Average-Loss, CDNSR's FLOPs regulariser,
and two losses beyond the papers for routers that must meet a budget: oracle labels and a dual price.

Every input ``probs`` is a (B, M) tensor of class probabilities (rows sum to 1); ``weights`` are the routing
weights the forward pass mixed the branches with (the Gumbel-softmax sample, the soft probabilities, or a
one-hot choice). Each loss names what ``CDNSRModel`` must hand it in ``routing_inputs``, in call order.
"""
from __future__ import annotations

from typing import Sequence, Union

import torch
from basicsr.utils.registry import LOSS_REGISTRY
from mmengine import dist
from torch import Tensor, nn

from cdnsr_plugin.registry import register


def _all_reduce_mean(value: Tensor) -> Tensor:
    """The mean of ``value`` over the ranks of a distributed run (``value`` itself in one process)."""
    if dist.get_world_size() > 1:
        value = value.detach().clone()
        dist.all_reduce(value, op='mean')
    return value


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

    routing_inputs = ('probs', )

    def __init__(self, loss_weight: float = 1.0) -> None:
        super().__init__()
        self.loss_weight = float(loss_weight)

    def forward(self, probs: Tensor) -> Tensor:
        _check_probs(probs, 'ClassLoss')
        gaps = (probs.unsqueeze(2) - probs.unsqueeze(1)).abs()  # (B, M, M), symmetric, zero diagonal
        return self.loss_weight * -(gaps.sum(dim=(1, 2)) / 2).mean()


@register(LOSS_REGISTRY)
class AverageLoss(nn.Module):
    """Average-Loss, ClassSR eq. (4): ``L_a = sum_i |sum_j P_i(x_j) - B/M|``, B the batch size, divided by its
    largest value ``2 B (M - 1) / M`` (all patches in one class) as ClassSR's reference code does
    (``/ (4 n / m)`` for its M = 3), so that it lies in [0, 1] whatever the batch size.

    The normalisation matters: ClassSR's loss weights (w1 : w2 : w3 = 2000 : 1 : 6, code 1000 : 0.5 : 3) were
    tuned on the normalised loss. Literal eq. (4) (``normalize: false``) grows with B: at B = 16 it is 21 x
    the reference's value, at B = 96 128 x, which makes uniform probabilities the minimum of the total loss
    (every patch then routed at random).

    Distributed training (``gather`` and ``mmengine.dist.get_world_size() > 1``): the loss is taken
    over the global batch. The per-class sums ``S_loc`` and the batch size are all-reduced (sum), and
    the gradient flows through the local share scaled by the world size W:
    ``S = W * S_loc - (W * S_loc).detach() + S_global.detach()``. Its value is ``S_global``, and
    each rank's gradient w.r.t. its own probabilities is W times that of the global-batch loss;
    DDP averages gradients over the W ranks, so the parameters get exactly the global-batch
    gradient. Without ``gather`` (or in one process) each rank uses its own batch.

    Args:
        loss_weight: multiplies the loss (``w_3`` of ClassSR eq. 2).
        gather: balance classes over the global batch when distributed.
        normalize: divide by the largest value (the reference code); ``false``: the paper's eq. (4) as printed.
    """

    routing_inputs = ('probs', )

    def __init__(self, loss_weight: float = 1.0, gather: bool = True, normalize: bool = True) -> None:
        super().__init__()
        self.loss_weight = float(loss_weight)
        self.gather = bool(gather)
        self.normalize = bool(normalize)

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
        classes = probs.shape[1]
        value = (sums - batch / classes).abs().sum()
        if self.normalize:
            value = value / (2 * batch * (classes - 1) / classes)
        return self.loss_weight * value


def _check_costs(costs: Union[Tensor, Sequence[float]], like: Tensor, name: str) -> Tensor:
    costs = torch.as_tensor(costs, dtype=like.dtype, device=like.device)
    if costs.shape != (like.shape[1], ) or not bool((costs > 0).all()):
        raise ValueError(f'{name}: costs must be {like.shape[1]} positive numbers (one per branch), '
                         f'got {costs.tolist()}')
    return costs


def _check_fraction(value: float, name: str, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f'{name}: {key} must be a number in (0, 1] (a fraction of the backbone FLOPs), got {value!r}')
    return float(value)


@register(LOSS_REGISTRY)
class FLOPsRegLoss(nn.Module):
    """FLOPs regulariser, CDNSR eqs. (2)-(3): ``max(0, E[F] / C_max - alpha)`` with
    ``F = sum_j C_j p_j`` per patch and ``E`` the batch mean.

    Zero (and zero gradient) while the expected cost is within the budget ``alpha * C_max``.

    Args:
        alpha: target fraction of the backbone's FLOPs, in (0, 1].
        loss_weight: multiplies the loss (``lambda_reg`` of CDNSR eq. 4).
        apply_to: ``probs`` (eq. 2 as printed: the classifier's probabilities) or ``sample`` (the routing weights
            of the forward pass, the Gumbel-softmax sample, as CDNSR's reference code applies it).
        units: ``fraction`` (eq. 3) or ``reference``: the hinge divided by ``(C_max - C_min)`` in GFLOPs and
            by 1000, the reference code's scale relative to a unit-weight L1 (it weights its L1 by 1000), so
            that the paper's ``lambda_reg = 2e-4`` means there what it meant in the reference.

    Raises:
        ValueError: ``alpha`` outside (0, 1] or an unknown ``apply_to`` / ``units``; in ``forward``, ``costs`` not M
            positive numbers.
    """

    def __init__(self,
                 alpha: float = 0.55,
                 loss_weight: float = 1.0,
                 apply_to: str = 'probs',
                 units: str = 'fraction') -> None:
        super().__init__()
        self.alpha = _check_fraction(alpha, 'FLOPsRegLoss', 'alpha')
        if apply_to not in ('probs', 'sample') or units not in ('fraction', 'reference'):
            raise ValueError(f"FLOPsRegLoss: apply_to must be 'probs' or 'sample' and units 'fraction' or 'reference', "
                             f'got apply_to={apply_to!r}, units={units!r}')
        self.loss_weight = float(loss_weight)
        self.apply_to, self.units = apply_to, units
        self.routing_inputs = ('weights' if apply_to == 'sample' else 'probs', 'costs')

    def forward(self, probs: Tensor, costs: Union[Tensor, Sequence[float]]) -> Tensor:
        """``probs``: probabilities or routing weights (B, M); ``costs``: the branches' paper FLOPs, in order."""
        _check_probs(probs, 'FLOPsRegLoss')
        costs = _check_costs(costs, probs, 'FLOPsRegLoss')
        expected = (probs * costs).sum(dim=1).mean()
        hinge = torch.clamp(expected / costs.max() - self.alpha, min=0)
        if self.units == 'reference':
            hinge = hinge / ((costs.max() - costs.min()).clamp_min(1e-12) / 1e9) / 1000
        return self.loss_weight * hinge


@register(LOSS_REGISTRY)
class DualFLOPsLoss(nn.Module):
    """A per-patch FLOPs price that makes the classifier's ARGMAX meet a budget (beyond CDNSR).

    ``L = lambda * mean_b sum_j w_bj C_j / C_max``: every patch pays for the branch it is routed to, at a price
    ``lambda`` that is a dual variable, not a fixed weight. After each training step the price follows the gap
    between the batch's argmax cost and the budget, multiplicatively (exponentiated dual ascent):
    ``lambda <- lambda * exp(step * (mean_b C_argmax(p_b) / C_max - alpha))``. Too many expensive choices raise
    the price until cheaper branches win on the patches where they lose least, so the decision that is priced
    is the one the test makes, and how the patches are split follows from their content (the reconstruction
    loss), not from a fixed trade-off. The multiplicative step needs no tuning to the loss scale (the price
    finds its scale geometrically) and keeps the price positive. CDNSR's eq. (3) prices only the soft
    expectation above the budget, which its soft probabilities can meet while every argmax stays on the
    backbone.

    Under DDP the argmax cost is averaged over the ranks before the update, so all ranks hold the same price.
    The price is logged (``price_<name>``) and kept in this module (not in checkpoints: a resumed run restarts
    it from ``initial_price``). ``CDNSRModel`` restarts it from ``initial_price`` at the first iteration of every
    stage that uses the loss (``keep_price: false``, the default), as the papers ran their stages as separate
    trainings: a price carried from the classifier stage, where the branches were frozen, into fine-tuning after
    a distillation that lifted the small branches sent every patch to branch 0 and, once the argmax cost was under
    alpha, fell too slowly to recover (the CDNSR reproduction's M and S ended at the same cost).
    ``keep_price: true`` carries it over.

    Args:
        alpha: budget, a fraction of the backbone's FLOPs per patch, in (0, 1].
        step: log-price change per unit of budget violation per iteration; slow next to the classifier's
            learning (two time scales), or the argmax swings from all-cheap to all-expensive.
        initial_price: lambda at the start, > 0; 0.01 is the scale of what a larger branch saves in L1 on
            [0, 1] images per patch.
        loss_weight: multiplies the loss.
        apply_to: ``sample`` (the routing weights of the forward pass, e.g. the Gumbel sample) or ``probs``.
        keep_price: carry the price from one stage into the next (default: restart at ``initial_price``).
    """

    def __init__(self,
                 alpha: float = 0.55,
                 step: float = 0.005,
                 initial_price: float = 0.01,
                 loss_weight: float = 1.0,
                 apply_to: str = 'sample',
                 keep_price: bool = False) -> None:
        super().__init__()
        self.alpha = _check_fraction(alpha, 'DualFLOPsLoss', 'alpha')
        if step <= 0 or initial_price <= 0 or apply_to not in ('probs', 'sample'):
            raise ValueError(f"DualFLOPsLoss: step and initial_price must be > 0 and apply_to 'probs' or 'sample', got "
                             f'step={step}, initial_price={initial_price}, apply_to={apply_to!r}')
        self.step, self.loss_weight = float(step), float(loss_weight)
        self.initial_price, self.keep_price = float(initial_price), bool(keep_price)
        self.register_buffer('price', torch.tensor(float(initial_price), dtype=torch.float64))
        self.routing_inputs = ('weights' if apply_to == 'sample' else 'probs', 'probs', 'costs')

    def start_stage(self) -> None:
        """A stage that uses this loss begins: restart the price at ``initial_price`` unless ``keep_price``."""
        if not self.keep_price:
            self.price.fill_(self.initial_price)

    def forward(self, weights: Tensor, probs: Tensor, costs: Union[Tensor, Sequence[float]]) -> Tensor:
        _check_probs(weights, 'DualFLOPsLoss')
        costs = _check_costs(costs, weights, 'DualFLOPsLoss')
        relative = costs / costs.max()
        value = self.loss_weight * float(self.price) * (weights * relative).sum(dim=1).mean()
        if self.training and torch.is_grad_enabled():
            hard = _all_reduce_mean(relative[probs.detach().argmax(dim=1)].mean())
            self.price.mul_(torch.exp(torch.tensor(self.step * (float(hard) - self.alpha), dtype=torch.float64)))
        return value


def oracle_labels(errors: Tensor, costs: Tensor, target: float, iterations: int = 40) -> tuple[Tensor, Tensor]:
    """Per patch ``argmin_j (errors_bj + mu * costs_j / max(costs))``, with ``mu >= 0`` the smallest price (found
    by bisection) at which the mean relative cost of the labels is at most ``target``.

    ``mu = 0`` gives every patch its most accurate branch; raising ``mu`` moves patches, those that lose least
    first, to cheaper branches; the mean cost can only fall as ``mu`` grows (see ``policies.solve_budget``).
    If even ``mu = 0`` meets the target, ``mu = 0``; if no price does (a target below the cheapest branch),
    every patch gets the cheapest branch.

    Returns:
        The labels (B,) and ``mu``.
    """
    relative = costs / costs.max()
    labels_at = lambda mu: (errors + mu * relative).argmin(dim=1)  # noqa: E731
    fraction = lambda labels: float(relative[labels].mean())  # noqa: E731
    if fraction(labels_at(0.0)) <= target:
        return labels_at(0.0), errors.new_tensor(0.0)
    high = float((errors.max() - errors.min()) / (relative.max() - relative.min()).clamp_min(1e-12)) * 2 + 1e-12
    if fraction(labels_at(high)) > target:
        return torch.full_like(labels_at(0.0), int(relative.argmin())), errors.new_tensor(high)
    low = 0.0
    for _ in range(iterations):
        middle = (low + high) / 2
        low, high = (middle, high) if fraction(labels_at(middle)) > target else (low, middle)
    return labels_at(high), errors.new_tensor(high)


@register(LOSS_REGISTRY)
class OracleLabelLoss(nn.Module):
    """Cross-entropy to oracle labels: which branch a patch should take at the budget (beyond both papers).

    With the branches' outputs for the batch (frozen branches: the classifier stage), each patch's error on
    every branch (mean squared error against the ground truth) says what each choice costs in quality. The
    label of a patch is ``argmin_j (err_bj + mu * C_j / C_max)``, the price ``mu`` set per batch so that the
    labels' mean cost is the target fraction (``oracle_labels``); the classifier learns these labels with
    cross-entropy. It thereby learns which patches lose least on cheaper branches, the ranking the cost knob
    (``--eta``, ``--budget``) then uses at test time, instead of a decision that only balances classes
    (ClassSR) or only meets an expected cost (CDNSR).

    Args:
        target: the budget the labels meet, a fraction of the backbone's FLOPs per patch, in (0, 1].
        loss_weight: multiplies the loss.
    """

    routing_inputs = ('probs', 'outputs', 'gt', 'costs')

    def __init__(self, target: float = 0.5, loss_weight: float = 1.0) -> None:
        super().__init__()
        self.target = _check_fraction(target, 'OracleLabelLoss', 'target')
        self.loss_weight = float(loss_weight)

    def forward(self, probs: Tensor, outputs: Sequence[Tensor], gt: Tensor, costs: Union[Tensor,
                                                                                         Sequence[float]]) -> Tensor:
        _check_probs(probs, 'OracleLabelLoss')
        if len(outputs) != probs.shape[1]:
            raise ValueError(f'OracleLabelLoss: {len(outputs)} branch outputs for {probs.shape[1]} classes')
        costs = _check_costs(costs, probs, 'OracleLabelLoss')
        with torch.no_grad():
            errors = torch.stack([((out.detach() - gt)**2).flatten(1).mean(dim=1) for out in outputs], dim=1)
            labels, _ = oracle_labels(errors.to(costs.dtype), costs, self.target)
        return self.loss_weight * torch.nn.functional.nll_loss(probs.clamp_min(1e-12).log(), labels)
