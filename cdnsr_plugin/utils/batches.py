"""The batches of BasicSR's iteration-based training loop: every epoch runs the iterations BasicSR counted, and
every batch is as large as its iteration's stage asks (``train.stages[i].batch_size_per_gpu``).

Two problems of basicsr 1.4.2's loop, solved by the one batch sampler ``compat.full_epochs`` gives its training
loader:

* **Stages cut short.** ``create_train_val_dataloader`` counts ``ceil(N * enlarge / (batch * world))``
  iterations per epoch and sizes the run in epochs from that count, but its loader drops the last partial batch:
  whenever a rank's share of the samples is not a multiple of the batch, every epoch runs one iteration fewer
  than counted, and the run ends before ``train.total_iter`` with "End of training" and no warning. The
  iterations lost are the LAST stage's (measured: ``cdnsr-demo --train --quick`` ran about 46 of its classifier
  stage's 100 iterations; a 5-stage file cut to 70 iterations on 68 sub-images never ran its fine-tuning).
  ``IterationBatchSampler`` yields exactly the counted number of batches every epoch, so the loop reaches
  ``total_iter``.
* **One batch size for all stages.** ClassSR trains its branches at batch 16 and its classifier at 96, because
  the Average-Loss balances the classes within a batch (ClassSR Sec. 4.1.3). The loop has one loader for the
  whole run, so the sampler decides each batch's size from the iteration it will feed: batch ``i`` of the epoch
  that starts at iteration ``s`` feeds iteration ``s + i + 1`` (1-based, as BasicSR counts), and its size is
  that iteration's stage's. An epoch is then a count of iterations, not one pass over the data.

Samples come from the epoch's permutation of BasicSR's ``EnlargedSampler`` (so with one batch size and a set
that divides evenly the batches are BasicSR's own), and when an epoch needs more samples than one permutation
holds (the rounding, or a larger batch), from further permutations seeded by the epoch and their number, each
split over the ranks as ``EnlargedSampler`` splits its own (disjoint within a permutation, the same on every
rank).

The iteration an epoch starts at is ``resumed + (epoch - resumed_epoch) * iters_per_epoch``: a fresh run starts
at (0, 0); a resumed one restarts BasicSR's loop at the saved ``epoch`` with the saved ``iter``, which the model
reports through ``resume`` (``CDNSRModel.resume_training``). It is computed from the epoch BasicSR sets on the
sampler at every epoch's start, not counted, so iterators the loop makes and drops (its prefetcher makes one
before the first epoch) change nothing. ``IterationBatchSampler.current()`` is how the model, which BasicSR
builds after the loader and never hands it, finds this process's training sampler: the one place a batch sampler
and a model meet, documented here rather than hidden.
"""
from __future__ import annotations

import math
import weakref
from typing import Iterator, Optional, Sequence

import torch
from torch.utils.data import Sampler

_PERMUTATION_SEED = 1_000_003  # further permutations of an epoch: seed epoch * this + their number


class IterationBatchSampler(Sampler[list[int]]):
    """Exactly ``iters_per_epoch`` batches per epoch, each of its iteration's batch size (see the module doc).

    Args:
        sampler: BasicSR's ``EnlargedSampler`` of the training set (its ``epoch``, ``num_replicas``, ``rank``,
            ``num_samples`` and permutation are used).
        batch_size: the batch of this process when no stage sets one (BasicSR's ``batch_size_per_gpu``, times the
            GPU count of a one-process DataParallel run).
        iters_per_epoch: BasicSR's count, ``ceil(N * enlarge / (batch_size_per_gpu * world))``.
        multiplier: batches per stage setting (the GPU count of a one-process DataParallel run, else 1).
    """

    _current: Optional[weakref.ref] = None

    def __init__(self, sampler, batch_size: int, iters_per_epoch: int, multiplier: int = 1) -> None:
        if batch_size < 1 or iters_per_epoch < 1 or multiplier < 1:
            raise ValueError(f'batch_size, iters_per_epoch and multiplier must be >= 1, got {batch_size}, '
                             f'{iters_per_epoch}, {multiplier}')
        self.sampler = sampler
        self.batch_size, self.iters_per_epoch, self.multiplier = int(batch_size), int(iters_per_epoch), multiplier
        self.sizes: list[tuple[int, int]] = []  # (first iteration, batch size of this process), sorted
        self.resumed = (0, 0)  # (epoch, iteration) the loop started from
        IterationBatchSampler._current = weakref.ref(self)

    @classmethod
    def current(cls, dataset_opt: dict) -> Optional['IterationBatchSampler']:
        """The training batch sampler built last in this process, if its dataset is the one ``dataset_opt`` (a
        run's ``datasets.train``) describes; ``None`` otherwise."""
        latest = cls._current() if cls._current is not None else None
        theirs = getattr(getattr(latest, 'sampler', None), 'dataset', None)
        keys = ('type', 'name', 'dataroot_gt', 'dataroot_lq')
        if latest is None or not isinstance(getattr(theirs, 'opt', None), dict):
            return None
        return latest if all(theirs.opt.get(key) == dataset_opt.get(key) for key in keys) else None

    def set_stage_sizes(self, sizes: Sequence[tuple[int, Optional[int]]]) -> None:
        """``(first iteration, batch_size_per_gpu or None)`` per stage, in order; ``None`` keeps the loader's batch."""
        self.sizes = [(int(start), self.batch_size if size is None else int(size) * self.multiplier)
                      for start, size in sizes]

    def resume(self, epoch: int, iteration: int) -> None:
        """The loop restarts at ``epoch`` having run ``iteration`` iterations (BasicSR's saved state)."""
        self.resumed = (int(epoch), int(iteration))

    def size_at(self, iteration: int) -> int:
        """The batch of this process for 1-based ``iteration``."""
        size = self.batch_size
        for start, stage_size in self.sizes:
            if iteration >= start:
                size = stage_size
        return size

    def first_iteration(self, epoch: int) -> int:
        """How many iterations have run when ``epoch`` starts."""
        resumed_epoch, resumed_iter = self.resumed
        return resumed_iter + (epoch - resumed_epoch) * self.iters_per_epoch

    def __len__(self) -> int:
        return self.iters_per_epoch

    def __iter__(self) -> Iterator[list[int]]:
        epoch = self.sampler.epoch
        start = self.first_iteration(epoch)
        samples = self._samples(epoch)
        for i in range(self.iters_per_epoch):
            yield [next(samples) for _ in range(self.size_at(start + i + 1))]

    def _samples(self, epoch: int) -> Iterator[int]:
        """This rank's sample indices for ``epoch``: the ``EnlargedSampler``'s permutation, then further ones."""
        yield from iter(self.sampler)
        replicas, rank = self.sampler.num_replicas, self.sampler.rank
        total, size = self.sampler.num_samples * replicas, len(self.sampler.dataset)
        for number in range(1, 2**62):
            generator = torch.Generator().manual_seed(epoch * _PERMUTATION_SEED + number)
            yield from (int(v) % size for v in torch.randperm(total, generator=generator)[rank:total:replicas])


def iterations_per_epoch(num_samples: int, batch_size_per_gpu: int) -> int:
    """BasicSR's count, ``ceil(N * enlarge / (batch * world))``, from a rank's ``ceil(N * enlarge / world)``
    samples (``ceil(ceil(x / w) / b) == ceil(x / (w b))`` for positive integers)."""
    return math.ceil(num_samples / batch_size_per_gpu)
