"""Routing decisions: from classifier logits (or scores) to one class per tile.

ClassSR and CDNSR send every LR patch to the branch their classifier ranks highest; the compute a
test image costs is then whatever the classifier decides. Beyond that argmax (``eta = 0``):

* **Cost-aware routing** (as ARM and PCSR offer, neither paper does): the label of a patch is
  ``argmax_j(log_softmax(logits)_j - eta * cost_j / max(cost))``. ``eta = 0`` is the plain argmax;
  a larger ``eta`` moves patches to cheaper branches. :func:`solve_budget` finds the ``eta`` that
  makes the mean per-patch cost of an image (as a fraction of the largest branch) meet a budget;
  :func:`solve_shared_eta` finds one ``eta`` for many images that meets a budget over them all (the tester's
  ``--set-budget``), so that the images that need the larger branches most get them.
* **Forced mixes** (:func:`forced_mix_labels`): prescribed class proportions by score rank, so that engine
  speed can be measured apart from how well a classifier was trained (``tools/benchmark.py``).

The training-free Laplacian router is in ``cdnsr_plugin.inference.laplacian``. Classes are ordered by
cost: class 0 is the cheapest ("simple") branch, class ``M - 1`` the backbone.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

_MAX_DOUBLINGS = 1000  # |eta| up to 2 ** 1000: brackets any finite logits short of float64 overflow


def check_labels(labels: Tensor, num_classes: int, count: int | None = None) -> Tensor:
    """``labels`` as given, checked: a non-empty 1-D integer tensor with values in ``[0, num_classes)``
    and, if ``count`` is given, ``count`` entries (one per tile).

    Raises:
        ValueError: naming what is wrong.
    """
    if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.numel() == 0:
        shape = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
        raise ValueError(f'labels must be a non-empty 1-D tensor of class indices, one per patch, got {shape}')
    if count is not None and labels.numel() != count:
        raise ValueError(f'labels has {labels.numel()} entries but the image has {count} tiles')
    if labels.dtype.is_floating_point or labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f'labels must be integers in [0, {num_classes}), got {labels.min()}..{labels.max()}')
    return labels


# ----------------------------------------------------------------------------------------------
# Cost-aware labels and the budget solver


def _as_costs(costs: Sequence[float] | Tensor, name: str, length: int | None = None) -> np.ndarray:
    """``costs`` as a float64 vector, checked: finite, non-negative, positive maximum, right length."""
    values = np.asarray(costs.detach().cpu() if isinstance(costs, Tensor) else costs, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f'{name} must be a non-empty 1-D sequence of per-class costs, got shape {values.shape}')
    if length is not None and values.size != length:
        raise ValueError(f'{name} must hold one cost per class ({length}), got {values.size}')
    if not np.all(np.isfinite(values)) or np.any(values < 0) or values.max() <= 0:
        raise ValueError(f'{name} must be finite, non-negative and not all zero, got {values.tolist()}')
    return values


def _check_logits(logits: Tensor) -> Tensor:
    if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[1] < 1:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f'logits must be a (N, M) tensor of classifier outputs, got {shape}')
    if not torch.isfinite(logits).all():
        raise ValueError('logits must be finite; the classifier produced inf or nan')
    return logits


def cost_aware_labels(logits: Tensor, costs: Sequence[float] | Tensor, eta: float) -> Tensor:
    """Labels ``argmax_j(log_softmax(logits)_j - eta * costs_j / max(costs))``, in float64.

    ``eta = 0`` is the classifier's plain argmax; a positive ``eta`` favours cheap classes, a negative
    one expensive classes. Exact ties are broken toward the cheaper class (the lower cost; among
    equal costs, the lower index), so e.g. identical logits go to the cheapest class at ``eta = 0``.

    Args:
        logits: ``(N, M)`` classifier outputs.
        costs: ``M`` non-negative per-class costs (any unit; only their ratio to the maximum matters).
        eta: the cost weight.

    Returns:
        ``(N,)`` int64 labels, on the device of ``logits``.

    Raises:
        ValueError: ``logits`` is not a finite ``(N, M)`` tensor, ``costs`` does not hold M valid costs,
            or ``eta`` is not finite.

    Examples:
        >>> cost_aware_labels(torch.tensor([[0.0, 1.0, 2.0]]), [1, 2, 4], 3.0).tolist()
        [1]
    """
    logits = _check_logits(logits)
    values = _as_costs(costs, 'costs', logits.shape[1])
    if not math.isfinite(eta):
        raise ValueError(f'eta must be a finite number, got {eta}')
    order = torch.from_numpy(np.argsort(values, kind='stable')).to(logits.device)
    penalty = torch.from_numpy(values / values.max()).to(logits.device)
    scores = torch.log_softmax(logits.to(torch.float64), dim=1) - float(eta) * penalty
    return order[scores[:, order].argmax(dim=1)]  # argmax takes the first maximum: the cheapest


def _check_largest(largest: float) -> None:
    if not (math.isfinite(largest) and largest > 0):
        raise ValueError(f'largest must be a positive cost (e.g. CostTable.largest()), got {largest}')


def routed_fraction(labels: Tensor,
                    per_patch_costs: Sequence[float],
                    largest: float,
                    num_classes: int | None = None) -> float:
    """Mean over patches of ``per_patch_costs[label] / largest``: the routed cost relative to the backbone.

    Args:
        labels: ``(N,)`` class per patch.
        per_patch_costs: cost of routing one patch to each class, typically classifier + branch
            (``CostTable.per_class()``).
        largest: the reference cost, typically the largest branch (``CostTable.largest()``).
        num_classes: M; if given it must equal ``len(per_patch_costs)``.

    Raises:
        ValueError: no labels, labels out of range, bad costs or a non-positive ``largest``.

    Examples:
        >>> routed_fraction(torch.tensor([0, 2]), [0.25, 0.5, 1.0], 1.0)
        0.625
    """
    values = _as_costs(per_patch_costs, 'per_patch_costs', num_classes)
    _check_largest(largest)
    labels = check_labels(labels, values.size)
    return float(values[labels.cpu().numpy()].mean() / largest)


@dataclass(frozen=True)
class BudgetSolution:
    """Result of :func:`solve_budget`.

    Attributes:
        eta: the cost weight at which the routed fraction crosses the budget (the jump point);
            ``labels`` equal ``cost_aware_labels(logits, costs, eta)`` except for the patches that
            switch class exactly there, which are split between their two choices. For a clamped
            (unreachable) budget: a finite eta at which every patch already sits at that end.
        labels: ``(N,)`` class per patch.
        fraction: ``routed_fraction`` of ``labels``.
        budget: the requested budget.
        reachable: the smallest and largest achievable fraction (all cheapest, all most expensive).
    """

    eta: float
    labels: Tensor
    fraction: float
    budget: float
    reachable: tuple[float, float]


class _BudgetEvaluator:
    """The routed fraction of one set of logits at any ``eta``, for the budget solver."""

    def __init__(self, logits: Tensor, costs: np.ndarray, largest: float) -> None:
        self.logits, self.costs, self.largest = logits, costs, largest

    def labels(self, eta: float) -> Tensor:
        return cost_aware_labels(self.logits, self.costs, eta)

    def fraction_of(self, labels: Tensor) -> float:
        return routed_fraction(labels, self.costs, self.largest)

    def fraction(self, eta: float) -> float:
        return self.fraction_of(self.labels(eta))

    def expand(self, sign: float, done: Callable[[Tensor], bool]) -> float:
        """``sign * 2**k`` for the smallest ``k >= 0`` at which ``done(labels)`` holds."""
        eta = sign
        for _ in range(_MAX_DOUBLINGS):
            if done(self.labels(eta)):
                return eta
            eta *= 2.0
        raise ValueError('no eta brackets the budget; the logits are too far apart to route by cost')


def solve_budget(logits: Tensor,
                 per_patch_costs: Sequence[float],
                 largest: float,
                 budget: float,
                 tol: float = 1e-9) -> BudgetSolution:
    """Route patches so that their mean cost, relative to ``largest``, is as close as possible to ``budget``.

    The fraction is a non-increasing step function of ``eta``. Per patch, take ``eta1 < eta2`` with
    choices ``j1``, ``j2`` and scores ``a_j`` (log-probabilities): optimality of each choice gives
    ``a_j1 - eta1 c_j1 >= a_j2 - eta1 c_j2`` and ``a_j2 - eta2 c_j2 >= a_j1 - eta2 c_j1``; adding them
    gives ``(eta2 - eta1)(c_j1 - c_j2) >= 0``, so ``c_j2 <= c_j1``: each patch's cost never rises
    as ``eta`` grows (whatever the tie rule), hence neither does their mean.

    The solver expands ``[-1, 1]`` by doubling until the fraction lies above the budget at the left
    end and below it at the right end (very negative ``eta``: every patch picks the most expensive
    class; very positive: the cheapest), then ``scipy.optimize.brentq`` converges to the jump point
    ``eta*``. The labelings just below and above ``eta*`` can differ in many patches at once
    (identical patches, e.g. of flat regions, have identical logits and switch at the same ``eta``),
    so those patches are moved from their expensive to their cheap choice one at a time, in patch
    index order, stopping at the count that brings the fraction closest to the budget. The result is
    therefore within half a patch's cost step, ``(max(c) - min(c)) / (N * largest) / 2``, of any
    reachable budget.

    A budget outside the reachable range is clamped to its nearest end (all patches cheapest, or
    all most expensive) with a warning that gives the range.

    Args:
        logits: ``(N, M)`` classifier outputs.
        per_patch_costs: cost of routing one patch to each class (classifier + branch).
        largest: reference cost, e.g. ``CostTable.largest()``.
        budget: the wanted ``routed_fraction``, e.g. 0.5 for half the backbone's cost.
        tol: ``brentq``'s absolute tolerance on ``eta``.

    Returns:
        The :class:`BudgetSolution`.

    Raises:
        ValueError: the budget or ``tol`` is not a positive finite number, or bad logits / costs.

    Examples:
        >>> sol = solve_budget(torch.zeros(4, 2), [0.5, 1.0], 1.0, 0.75)
        >>> sol.labels.tolist(), sol.fraction
        ([0, 0, 1, 1], 0.75)
    """
    from scipy.optimize import brentq

    logits = _check_logits(logits)
    costs = _as_costs(per_patch_costs, 'per_patch_costs', logits.shape[1])
    if not (math.isfinite(budget) and budget > 0):
        raise ValueError(f'budget must be a positive finite fraction of the largest branch cost, got {budget}')
    if not (math.isfinite(tol) and tol > 0):
        raise ValueError(f'tol must be a positive tolerance on eta, got {tol}')
    _check_largest(largest)
    evaluator = _BudgetEvaluator(logits, costs, largest)
    low, high = costs.min() / largest, costs.max() / largest
    if budget <= low or budget >= high:
        return _clamped(evaluator, budget, (low, high))
    lo = evaluator.expand(-1.0, lambda labels: evaluator.fraction_of(labels) > budget)
    hi = evaluator.expand(1.0, lambda labels: evaluator.fraction_of(labels) < budget)
    eta = float(brentq(lambda e: evaluator.fraction(e) - budget, lo, hi, xtol=tol))
    labels = _split_ties(evaluator, eta, budget, max(tol, 1e-12 * abs(eta)))
    return BudgetSolution(eta, labels, evaluator.fraction_of(labels), budget, (low, high))


def _clamped(evaluator: _BudgetEvaluator, budget: float, reachable: tuple[float, float]) -> BudgetSolution:
    """All patches on the cheapest or on the most expensive class, at an ``eta`` that routes them so."""
    low, high = reachable
    cheap = budget <= low
    if not math.isclose(budget, low if cheap else high, rel_tol=1e-9):
        warnings.warn(
            f'budget {budget:g} is outside the reachable range [{low:g}, {high:g}] of routed '
            f'fractions; routing every patch to the {"cheapest" if cheap else "most expensive"} class',
            stacklevel=3)
    target = evaluator.costs.min() if cheap else evaluator.costs.max()
    eta = evaluator.expand(1.0 if cheap else -1.0,
                           lambda labels: bool(np.all(evaluator.costs[labels.cpu().numpy()] == target)))
    labels = evaluator.labels(eta)
    return BudgetSolution(eta, labels, evaluator.fraction_of(labels), budget, reachable)


def _split_ties(evaluator: _BudgetEvaluator, eta: float, budget: float, eps: float) -> Tensor:
    """Labels around the jump at ``eta``: patches moved one by one from the choice below to the one above."""
    below, above = evaluator.labels(eta - eps), evaluator.labels(eta + eps)
    while not evaluator.fraction_of(below) >= budget >= evaluator.fraction_of(above):
        eps *= 2.0  # brentq's bracket is a little wider than eps; widen until the budget is inside
        below, above = evaluator.labels(eta - eps), evaluator.labels(eta + eps)
    changed = torch.nonzero(below != above).flatten()
    costs = torch.from_numpy(evaluator.costs).to(below.device)
    steps = (costs[below[changed]] - costs[above[changed]]) / (below.numel() * evaluator.largest)
    fractions = evaluator.fraction_of(below) - torch.cat([steps.new_zeros(1), steps.cumsum(0)])
    count = int((fractions - budget).abs().argmin())
    labels = below.clone()
    labels[changed[:count]] = above[changed[:count]]
    return labels


@dataclass(frozen=True)
class SharedEta:
    """Result of :func:`solve_shared_eta`: the ``eta`` and the cost fraction it gives."""

    eta: float
    fraction: float
    budget: float


def eta_limit(logits: Sequence[Tensor], costs: Sequence[float] | Tensor) -> float:
    """An ``|eta|`` beyond which ``cost_aware_labels`` no longer changes for any of ``logits`` (a list of
    ``(N, M)`` tensors): every tile on the cheapest class above ``+limit``, on the most expensive below
    ``-limit``. It is the largest spread of a tile's log-probabilities over the smallest non-zero gap between
    two relative costs, plus one."""
    values = _as_costs(costs, 'costs')
    relative = np.unique(values / values.max())
    gaps = np.diff(relative)
    spread = max((float((lp.max(dim=1).values - lp.min(dim=1).values).max()) if lp.numel() else 0.0)
                 for lp in (torch.log_softmax(_check_logits(x).double(), dim=1) for x in logits))
    return spread / float(gaps.min()) + 1.0 if gaps.size else 1.0


def solve_shared_eta(fraction_at: Callable[[float], float],
                     budget: float,
                     limit: float | None = None,
                     iterations: int = 32) -> SharedEta:
    """An ``eta`` whose routing's cost, ``fraction_at(eta)``, is as large as bisection finds without exceeding
    ``budget``.

    ``fraction_at`` routes every tile of every image with ``cost_aware_labels(logits, costs, eta)`` and returns
    the total cost as a fraction of a reference (e.g. the backbone on the whole images). Each tile's nominal
    cost never rises with ``eta`` (:func:`solve_budget`); a cost that counts what runs (halos, isolated cells
    promoted to a larger branch) can rise by a little where one cell moves to a cheaper class, so the result is
    within the budget but a slightly more expensive routing may also fit. The bracket around ``eta = 0``
    (argmax) is doubled until it holds the budget, then bisected ``iterations`` times; the returned ``eta`` is
    the bracket's side at or under the budget. ``limit`` (:func:`eta_limit`): the ``|eta|`` beyond which nothing
    changes; with it, a budget outside the reachable range costs two evaluations instead of up to a thousand
    doublings. Where even the most expensive routing fits the budget, that routing is returned; where even the
    cheapest exceeds it, the cheapest, with a warning.

    Examples:
        >>> logits = torch.tensor([[0.0, 1.0], [0.0, 3.0]])   # two tiles, the second surer of class 1
        >>> cost = lambda eta: routed_fraction(cost_aware_labels(logits, [0.5, 1.0], eta), [0.5, 1.0], 1.0)
        >>> sol = solve_shared_eta(cost, 0.8, eta_limit([logits], [0.5, 1.0]))
        >>> cost_aware_labels(logits, [0.5, 1.0], sol.eta).tolist(), sol.fraction
        ([0, 1], 0.75)
    """
    if not (math.isfinite(budget) and budget > 0):
        raise ValueError(f'budget must be a positive finite fraction, got {budget}')
    if limit is not None and not (math.isfinite(limit) and limit > 0):
        raise ValueError(f'limit must be a positive finite |eta|, got {limit}')
    cheaper = fraction_at(0.0) > budget  # argmax costs too much: search eta > 0; else eta < 0 for the most
    sign = 1.0 if cheaper else -1.0
    if limit is not None:
        end = fraction_at(sign * limit)
        if cheaper and end > budget:
            warnings.warn(f'budget {budget:g} is below the cheapest routing ({end:g}); routing so', stacklevel=2)
            return SharedEta(limit, end, budget)
        if not cheaper and end <= budget:
            return SharedEta(-limit, end, budget)  # even the most expensive routing fits
    inner, outer = 0.0, sign
    for _ in range(_MAX_DOUBLINGS):  # with a limit, the end checks above guarantee a bracket before |eta| > limit
        value = fraction_at(outer)
        if (value <= budget) if cheaper else (value > budget):
            break
        inner, outer = outer, outer * 2.0
    else:
        if cheaper:
            warnings.warn(f'budget {budget:g} is below the cheapest routing ({value:g}); routing so', stacklevel=2)
        return SharedEta(outer, value, budget)
    low, high = (inner, outer) if cheaper else (outer, inner)
    for _ in range(iterations):  # invariant: fraction_at(low) > budget >= fraction_at(high)
        middle = (low + high) / 2.0
        if fraction_at(middle) > budget:
            low = middle
        else:
            high = middle
    return SharedEta(high, fraction_at(high), budget)


def check_scores(scores: Tensor, name: str = 'scores') -> Tensor:
    """``scores`` as given, checked: a 1-D tensor of finite scores, one per patch."""
    if not isinstance(scores, Tensor) or scores.dim() != 1:
        shape = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
        raise ValueError(f'{name} must be a 1-D tensor with one score per patch, got {shape}')
    if not torch.isfinite(scores).all():
        raise ValueError(f'{name} must be finite')
    return scores


def forced_mix_labels(scores: Tensor, mix: Sequence[float]) -> Tensor:
    """Labels with prescribed class proportions: the lowest-scoring ``mix[0]`` share gets class 0, and so on.

    Patches are ranked by score ascending (ties by index). Class ``k`` receives the patches ranked
    ``round(N * sum(mix[:k]))`` to ``round(N * sum(mix[:k+1]))``, rounding halves up, so the counts
    always add up to N exactly.

    Args:
        scores: ``(N,)`` difficulty scores, e.g. :func:`laplacian_scores`.
        mix: M non-negative shares summing to 1 (within 1e-6).

    Returns:
        ``(N,)`` int64 labels on the device of ``scores``.

    Raises:
        ValueError: ``mix`` is empty, negative, not finite, or does not sum to 1.

    Examples:
        >>> forced_mix_labels(torch.tensor([0.3, 0.1, 0.2, 0.4]), [0.5, 0.5]).tolist()
        [1, 0, 0, 1]
    """
    scores = check_scores(scores)
    shares = np.asarray(mix, dtype=np.float64)
    if shares.ndim != 1 or shares.size == 0 or not np.all(np.isfinite(shares)) or np.any(shares < 0):
        raise ValueError(f'mix must be one or more non-negative shares, one per class, got {list(mix)}')
    if abs(shares.sum() - 1.0) > 1e-6:
        raise ValueError(f'mix must sum to 1 (within 1e-6), got {list(mix)} summing to {shares.sum():.9g}')
    count = scores.numel()
    bounds = np.minimum(np.floor(np.cumsum(shares) * count + 0.5).astype(np.int64), count)
    bounds[-1] = count
    order = torch.argsort(scores, stable=True)
    labels = torch.empty(count, dtype=torch.long, device=scores.device)
    for k, (start, end) in enumerate(zip([0, *bounds[:-1].tolist()], bounds.tolist())):
        labels[order[start:end]] = k
    return labels
