"""The training schedule: an ordered list of stages (ClassSR Sec. 3.7, CDNSR Sec. III-D).

Option file::

    train:
      total_iter: 4000                 # must equal the sum of the stages' iters
      losses:                          # every loss the stages use, by name
        pixel: {type: L1Loss}
        flops: {type: FLOPsRegLoss, alpha: 0.55}
      stages:
        - {name: pretrain, iters: 1000, losses: {pixel: 1}}
        - {name: classifier, iters: 1000, routing: gumbel, tau: [1.0, 0.4], losses: {pixel: 1, flops: 2.0e-4}}
        - ...

A stage's ``train`` (which parts learn) and ``routing`` default by name:

=========== =========================== ======================================================
name        train                       routing
=========== =========================== ======================================================
pretrain    branches                    labels: each patch goes to the branch of its data label
classifier  classifier                  soft (ClassSR eq. 1) or gumbel (CDNSR eqs. 5-6)
distill     branches                    hard: the frozen classifier's argmax
finetune    classifier, branches        soft
=========== =========================== ======================================================

Other routings: ``backbone`` sends every patch to the largest branch (training it on all data, e.g. before
pruning), ``all`` every patch through every branch (each branch trained on all data), ``hard`` the
classifier's argmax. ``tau: [start, min]`` anneals the Gumbel temperature over the
stage as ``max(min, start * (1 - t / T))`` (CDNSR: ``max(0.4, 1 - t/T)``). ``prune: true`` replaces, at the
stage's first iteration, every branch but the largest by the largest one channel-pruned to that branch's
width (``archs/pruning.py``, CDNSR Sec. III-A), so the stage fine-tunes pruned branches. ``lr`` sets the
stage's starting learning rate (default: ``train.optim_g.lr``), e.g. ClassSR's 1e-3 for pre-training the
branches and 2e-4 for the classifier; the rate follows one cosine per stage down to ``scheduler.eta_min`` over
``lr_period`` iterations (default: the stage's length; ClassSR's classifier stage: 200k iterations of a 500k
period, ``stage_rate``). ``hard_gumbel`` (``gumbel`` routing) chooses, for the stage, the paper's soft
Gumbel-softmax weights (false: the temperature shapes the mixture the loss sees, every branch gets a gradient) or
straight-through one-hot ones (true: each patch trains the branch it draws); default: ``network_g.hard_gumbel``.
``batch_size_per_gpu`` sets the stage's batch (default:
``datasets.train.batch_size_per_gpu``), e.g. ClassSR's 16 for the branches and 96 for the classifier, whose
Average-Loss balances the classes within a batch: the one training loader sizes every batch by its iteration's
stage (``utils/batches.py``), so a resumed run continues at the right size, and under DDP every rank takes that
many (the global batch, which the Average-Loss balances, is the world size times it).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

STAGE_NAMES = ('pretrain', 'classifier', 'distill', 'finetune')
PARTS = ('classifier', 'branches')
DEFAULT_TRAIN = {
    'pretrain': ('branches', ), 'classifier': ('classifier', ), 'distill': ('branches', ),
    'finetune': ('classifier', 'branches')
}
DEFAULT_ROUTING = {'pretrain': 'labels', 'classifier': 'soft', 'distill': 'hard', 'finetune': 'soft'}
ROUTINGS = ('labels', 'backbone', 'all', 'soft', 'gumbel', 'hard')


@dataclass(frozen=True)
class Stage:
    """One stage: iterations ``start .. start + iters - 1`` (1-based, as BasicSR counts)."""

    index: int
    name: str
    start: int
    iters: int
    train: tuple[str, ...]
    routing: str
    losses: dict[str, float]
    tau: Optional[tuple[float, float]] = None
    prune: bool = False
    lr: Optional[float] = None
    batch_size: Optional[int] = None
    hard_gumbel: Optional[bool] = None
    lr_period: Optional[int] = None

    @property
    def end(self) -> int:
        return self.start + self.iters - 1

    @property
    def frozen(self) -> Optional[str]:
        """The part that does not learn in this stage, if one."""
        missing = [part for part in PARTS if part not in self.train]
        return missing[0] if len(missing) == 1 else None

    def tau_at(self, current_iter: int) -> Optional[float]:
        if self.tau is None:
            return None
        start, minimum = self.tau
        return max(minimum, start * (1.0 - (current_iter - self.start) / self.iters))


STAGE_KEYS = ('name', 'iters', 'losses', 'train', 'routing', 'tau', 'prune', 'lr', 'lr_period', 'hard_gumbel',
              'batch_size_per_gpu')


def _is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _stage_errors(raw: Any, i: int, loss_names: set[str]) -> list[str]:
    key = f'train.stages[{i}]'
    if not isinstance(raw, dict):
        return [f'{key} must be a mapping with name, iters and losses']
    errors = []
    unknown = sorted(str(k) for k in raw if k not in STAGE_KEYS)
    if unknown:  # a misspelled key would be ignored and the stage run with its default: name it
        errors.append(f"{key}: unknown key(s) {', '.join(unknown)} (a stage takes {', '.join(STAGE_KEYS)})")
    if raw.get('name') not in STAGE_NAMES:
        errors.append(f"{key}.name {raw.get('name')!r} is not one of {STAGE_NAMES}")
    if not isinstance(raw.get('iters'), int) or raw['iters'] < 1:
        errors.append(f"{key}.iters must be a positive integer, got {raw.get('iters')!r}")
    losses = raw.get('losses')
    if not isinstance(losses, dict) or not losses:
        errors.append(f'{key}.losses must map loss names to weights, e.g. {{pixel: 1}}')
    else:
        errors += [
            f'{key}.losses.{name} is not configured in train.losses (configured: {sorted(loss_names)})'
            for name in losses if name not in loss_names
        ]
        errors += [
            f'{key}.losses.{name}: the weight must be a finite number, got {weight!r}'
            for name, weight in losses.items()
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight)
        ]
    parts = raw.get('train')
    if parts is not None and (not isinstance(parts, list) or not parts or any(p not in PARTS for p in parts)):
        errors.append(f'{key}.train must list parts among {PARTS}, got {parts!r}')
    if raw.get('routing', 'soft') not in ROUTINGS:
        errors.append(f"{key}.routing must be one of {ROUTINGS}, got {raw.get('routing')!r}")
    tau = raw.get('tau')
    if tau is not None and (not isinstance(tau, (list, tuple)) or len(tau) != 2
                            or not all(_is_finite_number(t) for t in tau) or not 0 < tau[1] <= tau[0]):
        errors.append(f'{key}.tau must be [start, min] with 0 < min <= start, got {tau!r}')
    if raw.get('prune') not in (None, True, False):
        errors.append(f"{key}.prune must be true or false, got {raw.get('prune')!r}")
    lr = raw.get('lr')
    if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr < float('inf')):
        errors.append(f'{key}.lr must be a positive learning rate, got {lr!r}')
    period = raw.get('lr_period')
    if period is not None and (isinstance(period, bool) or not isinstance(period, int) or period < 1):
        errors.append(f'{key}.lr_period must be a positive number of iterations, got {period!r}')
    if raw.get('hard_gumbel') not in (None, True, False):
        errors.append(f"{key}.hard_gumbel must be true or false, got {raw.get('hard_gumbel')!r}")
    batch = raw.get('batch_size_per_gpu')
    if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 1):
        errors.append(f'{key}.batch_size_per_gpu must be a positive integer, got {batch!r}')
    return errors


def parse_stages(train_opt: dict, loss_names: set[str]) -> tuple[list[Stage], list[str]]:
    """Stages from ``train_opt``, and every problem found (empty when valid)."""
    raws = train_opt.get('stages')
    if not isinstance(raws, list) or not raws:
        return [], ['train.stages must be a non-empty list of stages (pretrain, classifier, distill, finetune)']
    errors = [error for i, raw in enumerate(raws) for error in _stage_errors(raw, i, loss_names)]
    if errors:
        return [], errors
    stages, start = [], 1
    for i, raw in enumerate(raws):
        name = raw['name']
        routing = raw.get('routing', DEFAULT_ROUTING[name])
        tau = tuple(float(t) for t in raw['tau']) if raw.get('tau') else ((1.0, 0.4) if routing == 'gumbel' else None)
        losses = {key: float(weight) for key, weight in raw['losses'].items()}
        train = tuple(raw.get('train', DEFAULT_TRAIN[name]))
        lr = float(raw['lr']) if raw.get('lr') is not None else None
        stages.append(
            Stage(i, name, start, raw['iters'], train, routing, losses, tau, bool(raw.get('prune')), lr,
                  raw.get('batch_size_per_gpu'), raw.get('hard_gumbel'), raw.get('lr_period')))
        start += raw['iters']
    total = train_opt.get('total_iter')
    if isinstance(total, int) and not isinstance(total, bool) and total != start - 1:
        errors.append(f'train.total_iter is {total} but the stages add up to {start - 1} iterations')
    return stages, errors


def stage_rate(stages: list[Stage], current_iter: int, base_lr: float, eta_min: float) -> float:
    """The learning rate of 1-based ``current_iter``: one cosine per stage from the stage's ``lr`` (default
    ``base_lr``) towards ``eta_min`` over ``lr_period`` iterations (default: the stage's length, so it reaches
    ``eta_min`` at the stage's end; longer: it decays less, as ClassSR's classifier stage of 200k iterations under a
    500k period ends at 65% of its rate).

    The default replays BasicSR's ``CosineAnnealingRestartLR`` with one period per stage, stepped before each
    iteration as BasicSR's loop does: the first stage runs its rate at its first iteration and ``eta_min`` at its
    last (period ``iters - 1``); a later stage starts one step into its period (``cos(pi / iters)``).
    """
    stage = stage_at(stages, current_iter)
    step = current_iter - stage.start + (0 if stage.index == 0 else 1)
    period = stage.lr_period or (stage.iters - 1 if stage.index == 0 else stage.iters)
    fraction = min(step / period, 1.0) if period > 0 else 0.0
    top = base_lr if stage.lr is None else stage.lr
    return eta_min + (top - eta_min) * 0.5 * (1 + math.cos(math.pi * fraction))


def stage_at(stages: list[Stage], current_iter: int) -> Stage:
    """The stage that iteration ``current_iter`` (1-based) belongs to; the last one past the end."""
    for stage in stages:
        if current_iter <= stage.end:
            return stage
    return stages[-1]
