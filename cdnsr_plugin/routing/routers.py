"""Routing decisions beyond the classifier's argmax: a cost knob, a budget solver, a training-free router.

ClassSR and CDNSR send every LR patch to the branch their classifier ranks highest; the compute a
test image costs is then whatever the classifier decides. Two additions here:

* **Cost-aware routing** (as ARM and PCSR offer, neither paper does): the label of a patch is
  ``argmax_j(log_softmax(logits)_j - eta * cost_j / max(cost))``. ``eta = 0`` is the plain argmax;
  a larger ``eta`` moves patches to cheaper branches. :func:`solve_budget` finds the ``eta`` that
  makes the mean per-patch cost of an image (as a fraction of the largest branch) meet a budget.
* **A training-free router** (ARM's idea): the mean absolute Laplacian of a patch's Y channel
  ("edge energy") with ``M - 1`` thresholds. :meth:`LaplacianRouter.fit` sets the thresholds so
  the router reproduces the class proportions of a labelled set, e.g. one prepared by
  ``tools/prepare_data.py`` (:meth:`LaplacianRouter.from_prepared`).

Classes are ordered by cost: class 0 is the cheapest ("simple") branch, class ``M - 1`` the backbone.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

FORMAT_VERSION = 1
_LAPLACIAN = ((0.0, 1.0, 0.0), (1.0, -4.0, 1.0), (0.0, 1.0, 0.0))
_Y_WEIGHTS = (65.481 / 255.0, 128.553 / 255.0, 24.966 / 255.0)  # BT.601, basicsr's rgb2ycbcr(y_only=True)
_Y_OFFSET = 16.0 / 255.0
_MAX_DOUBLINGS = 1000  # |eta| up to 2 ** 1000: brackets any finite logits short of float64 overflow


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


def _check_labels(labels: Tensor, num_classes: int) -> Tensor:
    if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.numel() == 0:
        shape = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
        raise ValueError(f'labels must be a non-empty 1-D tensor of class indices, one per patch, got {shape}')
    if labels.dtype.is_floating_point or labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f'labels must be integers in 0..{num_classes - 1}')
    return labels


def _check_largest(largest: float) -> None:
    if not (math.isfinite(largest) and largest > 0):
        raise ValueError(f'largest must be a positive cost (e.g. CostTable.largest()), got {largest}')


def routed_fraction(labels: Tensor, per_patch_costs: Sequence[float], largest: float,
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
    labels = _check_labels(labels, values.size)
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


class _Router:
    """Labels and fractions of one set of logits at any ``eta``, for the solver."""

    def __init__(self, logits: Tensor, costs: np.ndarray, largest: float) -> None:
        self.logits, self.costs, self.largest = logits, costs, largest

    def labels(self, eta: float) -> Tensor:
        return cost_aware_labels(self.logits, self.costs, eta)

    def fraction_of(self, labels: Tensor) -> float:
        return float(self.costs[labels.cpu().numpy()].mean() / self.largest)

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


def solve_budget(logits: Tensor, per_patch_costs: Sequence[float], largest: float, budget: float,
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
    router = _Router(logits, costs, largest)
    low, high = costs.min() / largest, costs.max() / largest
    if budget <= low or budget >= high:
        return _clamped(router, budget, (low, high))
    lo = router.expand(-1.0, lambda labels: router.fraction_of(labels) > budget)
    hi = router.expand(1.0, lambda labels: router.fraction_of(labels) < budget)
    eta = float(brentq(lambda e: router.fraction(e) - budget, lo, hi, xtol=tol))
    labels = _split_ties(router, eta, budget, max(tol, 1e-12 * abs(eta)))
    return BudgetSolution(eta, labels, router.fraction_of(labels), budget, (low, high))


def _clamped(router: _Router, budget: float, reachable: tuple[float, float]) -> BudgetSolution:
    """All patches on the cheapest or on the most expensive class, at an ``eta`` that routes them so."""
    low, high = reachable
    cheap = budget <= low
    if not math.isclose(budget, low if cheap else high, rel_tol=1e-9):
        warnings.warn(f'budget {budget:g} is outside the reachable range [{low:g}, {high:g}] of routed '
                      f'fractions; routing every patch to the {"cheapest" if cheap else "most expensive"} class',
                      stacklevel=3)
    target = router.costs.min() if cheap else router.costs.max()
    eta = router.expand(1.0 if cheap else -1.0,
                        lambda labels: bool(np.all(router.costs[labels.cpu().numpy()] == target)))
    labels = router.labels(eta)
    return BudgetSolution(eta, labels, router.fraction_of(labels), budget, reachable)


def _split_ties(router: _Router, eta: float, budget: float, eps: float) -> Tensor:
    """Labels around the jump at ``eta``: patches moved one by one from the choice below to the one above."""
    below, above = router.labels(eta - eps), router.labels(eta + eps)
    while not router.fraction_of(below) >= budget >= router.fraction_of(above):
        eps *= 2.0  # brentq's bracket is a little wider than eps; widen until the budget is inside
        below, above = router.labels(eta - eps), router.labels(eta + eps)
    changed = torch.nonzero(below != above).flatten()
    costs = torch.from_numpy(router.costs).to(below.device)
    steps = (costs[below[changed]] - costs[above[changed]]) / (below.numel() * router.largest)
    fractions = router.fraction_of(below) - torch.cat([steps.new_zeros(1), steps.cumsum(0)])
    count = int((fractions - budget).abs().argmin())
    labels = below.clone()
    labels[changed[:count]] = above[changed[:count]]
    return labels


# ----------------------------------------------------------------------------------------------
# The training-free router: edge energy with thresholds


def laplacian_scores(tiles: Tensor) -> Tensor:
    """Edge energy per tile: the mean absolute 3x3 Laplacian of its Y channel, on the valid interior.

    Y is BT.601 as basicsr's ``rgb2ycbcr(y_only=True)`` computes it, in [0, 1]:
    ``16/255 + (65.481 R + 128.553 G + 24.966 B) / 255``. The Laplacian ``[[0,1,0],[1,-4,1],[0,1,0]]``
    is applied without padding (one batched ``conv2d``), so an ``h x w`` tile gives ``(h-2) x (w-2)``
    responses. Computed in float32 on the tiles' device.

    Args:
        tiles: ``(N, 3, h, w)`` RGB in [0, 1], ``h, w >= 3``.

    Returns:
        ``(N,)`` float32 scores; 0 for a constant tile.

    Raises:
        ValueError: ``tiles`` is not ``(N, 3, h, w)`` with ``h, w >= 3``.

    Examples:
        >>> laplacian_scores(torch.full((1, 3, 8, 8), 0.5)).tolist()
        [0.0]
    """
    if not isinstance(tiles, Tensor) or tiles.dim() != 4 or tiles.shape[1] != 3 or min(tiles.shape[2:]) < 3:
        shape = tuple(tiles.shape) if isinstance(tiles, Tensor) else type(tiles).__name__
        raise ValueError(f'tiles must be an (N, 3, h, w) RGB tensor with h, w >= 3, got {shape}')
    tiles = tiles.to(torch.float32)
    weights = torch.tensor(_Y_WEIGHTS, dtype=torch.float32, device=tiles.device).view(1, 3, 1, 1)
    luma = (tiles * weights).sum(dim=1, keepdim=True) + _Y_OFFSET
    kernel = torch.tensor(_LAPLACIAN, dtype=torch.float32, device=tiles.device).view(1, 1, 3, 3)
    return F.conv2d(luma, kernel).abs().mean(dim=(1, 2, 3))


def _check_scores(scores: Tensor, name: str = 'scores') -> Tensor:
    if not isinstance(scores, Tensor) or scores.dim() != 1:
        shape = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
        raise ValueError(f'{name} must be a 1-D tensor with one score per patch, got {shape}')
    if not torch.isfinite(scores).all():
        raise ValueError(f'{name} must be finite')
    return scores


@dataclass(frozen=True)
class LaplacianRouter:
    """Training-free router: the class of a tile is the number of thresholds below its edge energy.

    High edge energy (:func:`laplacian_scores`) means a hard patch, so it goes to a high class.
    A score equal to a threshold goes to the lower class (``torch.bucketize``, ``right=False``).

    Attributes:
        thresholds: ``M - 1`` non-decreasing thresholds.
        agreement: fraction of the fitting samples whose routed class equals their label
            (``None`` for hand-set thresholds).
        fitted_on: what the thresholds were fitted on.

    Examples:
        >>> router = LaplacianRouter((0.01, 0.05))
        >>> router.labels_from_scores(torch.tensor([0.0, 0.01, 0.02, 0.3])).tolist()
        [0, 0, 1, 2]
    """

    thresholds: tuple[float, ...]
    agreement: float | None = None
    fitted_on: str = ''

    def __post_init__(self) -> None:
        values = tuple(float(t) for t in self.thresholds)
        if not values or not all(math.isfinite(t) for t in values) or any(b < a for a, b in zip(values, values[1:])):
            raise ValueError(f'thresholds must be one or more finite, ascending numbers (M - 1 for M classes), '
                             f'got {list(self.thresholds)}')
        object.__setattr__(self, 'thresholds', values)

    @property
    def num_classes(self) -> int:
        """M, the number of classes: one more than the number of thresholds."""
        return len(self.thresholds) + 1

    def __call__(self, tiles: Tensor) -> Tensor:
        """Labels of ``(N, 3, h, w)`` RGB tiles in [0, 1]."""
        return self.labels_from_scores(laplacian_scores(tiles))

    def labels_from_scores(self, scores: Tensor) -> Tensor:
        """Labels of precomputed :func:`laplacian_scores`: the number of thresholds strictly below each."""
        scores = _check_scores(scores)
        boundaries = torch.tensor(self.thresholds, dtype=torch.float64, device=scores.device)
        return torch.bucketize(scores.to(torch.float64), boundaries)

    @classmethod
    def fit(cls, scores: Tensor, labels: Tensor, num_classes: int, fitted_on: str = '') -> LaplacianRouter:
        """Thresholds that reproduce the class proportions of ``labels``.

        With ``n_k`` the number of labels ``<= k``, threshold ``k`` is the ``n_k``-th smallest score (the
        lower empirical quantile at share ``n_k / N``), so exactly ``n_k`` scores lie at or below it when
        scores are distinct; for ``n_k = 0`` it is the float just below the smallest score. Tied scores
        straddling a threshold all go to the lower class, so proportions can then shift. Which samples
        land in which class is up to the scores: ``agreement`` records how often that is their label.

        Args:
            scores: ``(N,)`` edge energies of the samples.
            labels: ``(N,)`` their classes, 0 (simple) to ``num_classes - 1`` (hard).
            num_classes: M, at least 2.
            fitted_on: a description kept with the router; default ``"N scores"``.

        Raises:
            ValueError: empty or mismatched inputs, labels out of range, ``num_classes < 2``.
        """
        if num_classes < 2:
            raise ValueError(f'num_classes must be at least 2, got {num_classes}')
        scores = _check_scores(scores).detach().cpu().to(torch.float64)
        labels = _check_labels(labels, num_classes).detach().cpu()
        if labels.numel() != scores.numel():
            raise ValueError(f'scores ({scores.numel()}) and labels ({labels.numel()}) must have one entry per sample')
        ordered = scores.sort().values.tolist()
        cumulative = torch.bincount(labels, minlength=num_classes).cumsum(0).tolist()
        thresholds = tuple(ordered[n - 1] if n > 0 else math.nextafter(ordered[0], -math.inf)
                           for n in cumulative[:-1])
        router = cls(thresholds)
        agreement = float((router.labels_from_scores(scores) == labels).double().mean())
        return cls(thresholds, agreement, fitted_on or f'{scores.numel()} scores')

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description; :meth:`from_dict` reads it back."""
        return {'type': type(self).__name__, 'format_version': FORMAT_VERSION, 'thresholds': list(self.thresholds),
                'num_classes': self.num_classes, 'agreement': self.agreement, 'fitted_on': self.fitted_on}

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = 'router description') -> LaplacianRouter:
        """The router ``to_dict`` described; ``source`` names it in error messages.

        Raises:
            ValueError: ``thresholds`` is missing or invalid.
        """
        if not isinstance(data, dict) or 'thresholds' not in data:
            raise ValueError(f"{source}: missing key 'thresholds'; expected the output of LaplacianRouter.to_dict()")
        try:
            return cls(tuple(data['thresholds']), data.get('agreement'), str(data.get('fitted_on', '')))
        except (TypeError, ValueError) as exc:
            raise ValueError(f'{source}: {exc}') from exc

    def save(self, path: Path | str) -> Path:
        """Write :meth:`to_dict` as JSON to ``path`` atomically (``<name>.tmp``, then renamed); returns the path."""
        path = Path(path)
        tmp = path.with_name(path.name + '.tmp')
        tmp.write_text(json.dumps(self.to_dict(), indent=2))
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: Path | str) -> LaplacianRouter:
        """Read a router :meth:`save` wrote.

        Raises:
            FileNotFoundError: ``path`` does not exist.
            ValueError: it is not JSON or lacks a key.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f'{path}: no such router file; write one with LaplacianRouter.save()')
        try:
            data = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f'{path}: not a JSON router file ({exc})') from exc
        return cls.from_dict(data, str(path))

    @classmethod
    def from_prepared(cls, root: Path | str, num_classes: int | None = None, max_samples: int = 20000,
                      seed: int = 0) -> LaplacianRouter:
        """Fit on a set written by ``tools/prepare_data.py``: its LR sub-images and their labels.

        Args:
            root: the prepared folder (``summary.json``, ``labels.txt``, ``lq.lmdb``).
            num_classes: M; default the set's ``num_classes``; must match it.
            max_samples: at most this many sub-images, drawn without replacement with
                ``numpy.random.default_rng(seed)``.
            seed: the subsampling seed.

        Raises:
            FileNotFoundError: the set is missing or incomplete, or has no LMDB.
            ValueError: ``num_classes`` or ``max_samples`` is wrong, or a key cannot be read.
        """
        from cdnsr_plugin.data.difficulty_dataset import LABELS, check_complete, read_labels
        root = Path(root)
        summary = check_complete(root)
        expected = int(summary['num_classes'])
        if num_classes is not None and num_classes != expected:
            raise ValueError(f'num_classes={num_classes} but {root / "summary.json"} has {expected} classes; '
                             'leave num_classes out or prepare the set with that many classes')
        if max_samples < 1:
            raise ValueError(f'max_samples must be at least 1, got {max_samples}')
        labelled = read_labels(root / LABELS)
        keys = _subsample(sorted(labelled), max_samples, seed)
        labels = torch.tensor([labelled[key][0] for key in keys], dtype=torch.long)
        scores = _lmdb_scores(root / summary.get('lq', 'lq.lmdb'), keys)
        fitted_on = f'{root} ({len(keys)} of {len(labelled)} sub-images, seed {seed})'
        return cls.fit(scores, labels, expected, fitted_on)


def _subsample(keys: list[str], max_samples: int, seed: int) -> list[str]:
    if len(keys) <= max_samples:
        return keys
    chosen = np.sort(np.random.default_rng(seed).choice(len(keys), max_samples, replace=False))
    return [keys[i] for i in chosen]


def _lmdb_scores(path: Path, keys: list[str], batch: int = 1024) -> Tensor:
    """:func:`laplacian_scores` of the PNG-encoded BGR sub-images stored under ``keys``."""
    import lmdb
    if not path.is_dir():
        raise FileNotFoundError(f'{path}: no LR LMDB; the prepared set is incomplete, prepare it again')
    scores = []
    env = lmdb.open(str(path), readonly=True, lock=False, readahead=False)
    try:
        with env.begin() as txn:
            for start in range(0, len(keys), batch):
                images = [_decode(txn.get(key.encode('ascii')), path, key) for key in keys[start:start + batch]]
                tiles = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div_(255.0)
                scores.append(laplacian_scores(tiles))
    finally:
        env.close()
    return torch.cat(scores)


def _decode(buffer: bytes | None, path: Path, key: str) -> np.ndarray:
    """RGB uint8 image from PNG bytes of a BGR image."""
    import cv2
    image = None if buffer is None else cv2.imdecode(np.frombuffer(buffer, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError(f'{path}: key {key!r} from labels.txt is missing or not an image; '
                         'labels.txt does not belong to this LMDB')
    return np.ascontiguousarray(image[..., ::-1])


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
    scores = _check_scores(scores)
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
