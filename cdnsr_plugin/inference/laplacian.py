"""The training-free router (ARM's idea): edge energy with thresholds.

The mean absolute Laplacian of a patch's Y channel ("edge energy") is compared with ``M - 1``
thresholds. :meth:`LaplacianRouter.fit` sets the thresholds so the router reproduces the class
proportions of a labelled set, e.g. one prepared by ``tools/prepare_data.py``
(:meth:`LaplacianRouter.from_prepared`). Its cost, ``LAPLACIAN_MACS_PER_PIXEL`` per LR pixel, replaces the
classifier's in the FLOPs accounts.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from cdnsr_plugin.data.prepared_set import SUMMARY, PreparedSet
from cdnsr_plugin.inference.policies import check_labels, check_scores
from cdnsr_plugin.utils.io import write_json

FORMAT_VERSION = 1
LAPLACIAN_MACS_PER_PIXEL = 8  # Y conversion (3) + 5-tap Laplacian; the paper convention counts 2x
_LAPLACIAN = ((0.0, 1.0, 0.0), (1.0, -4.0, 1.0), (0.0, 1.0, 0.0))
_Y_WEIGHTS = (65.481 / 255.0, 128.553 / 255.0, 24.966 / 255.0)  # BT.601, basicsr's rgb2ycbcr(y_only=True)
_Y_OFFSET = 16.0 / 255.0


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
        scores = check_scores(scores)
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
        scores = check_scores(scores).detach().cpu().to(torch.float64)
        labels = check_labels(labels, num_classes).detach().cpu()
        if labels.numel() != scores.numel():
            raise ValueError(f'scores ({scores.numel()}) and labels ({labels.numel()}) must have one entry per sample')
        ordered = scores.sort().values.tolist()
        cumulative = torch.bincount(labels, minlength=num_classes).cumsum(0).tolist()
        thresholds = tuple(ordered[n - 1] if n > 0 else math.nextafter(ordered[0], -math.inf) for n in cumulative[:-1])
        router = cls(thresholds)
        agreement = float((router.labels_from_scores(scores) == labels).double().mean())
        return cls(thresholds, agreement, fitted_on or f'{scores.numel()} scores')

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description; :meth:`from_dict` reads it back."""
        return {
            'type': type(self).__name__, 'format_version': FORMAT_VERSION, 'thresholds': list(self.thresholds),
            'num_classes': self.num_classes, 'agreement': self.agreement, 'fitted_on': self.fitted_on
        }

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
        """Write :meth:`to_dict` as JSON to ``path`` atomically; returns the path."""
        return write_json(path, self.to_dict())

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
    def from_prepared(cls,
                      root: Path | str,
                      num_classes: int | None = None,
                      max_samples: int = 20000,
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
        prepared = PreparedSet(root)
        expected = prepared.num_classes
        if num_classes is not None and num_classes != expected:
            raise ValueError(f'num_classes={num_classes} but {prepared.root / SUMMARY} has {expected} classes; '
                             'leave num_classes out or prepare the set with that many classes')
        if max_samples < 1:
            raise ValueError(f'max_samples must be at least 1, got {max_samples}')
        labelled = prepared.labels
        keys = _subsample(sorted(labelled), max_samples, seed)
        labels = torch.tensor([labelled[key][0] for key in keys], dtype=torch.long)
        scores = _scores_of(prepared, keys)
        fitted_on = f'{prepared.root} ({len(keys)} of {len(labelled)} sub-images, seed {seed})'
        return cls.fit(scores, labels, expected, fitted_on)


def _subsample(keys: list[str], max_samples: int, seed: int) -> list[str]:
    if len(keys) <= max_samples:
        return keys
    chosen = np.sort(np.random.default_rng(seed).choice(len(keys), max_samples, replace=False))
    return [keys[i] for i in chosen]


def _scores_of(prepared: PreparedSet, keys: list[str], batch: int = 1024) -> Tensor:
    """:func:`laplacian_scores` of the set's LR sub-images stored under ``keys``."""
    scores = []
    for start in range(0, len(keys), batch):
        bgr = np.stack(list(prepared.images('lq', keys[start:start + batch])))
        tiles = torch.from_numpy(np.ascontiguousarray(bgr[..., ::-1])).permute(0, 3, 1, 2).float().div_(255.0)
        scores.append(laplacian_scores(tiles))
    return torch.cat(scores)
