"""Editing BasicSR option files in code: the demo, the reproduction script and the tests start from a shipped
option file and point it at their own data and schedule, all through these few functions."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

from cdnsr_plugin.compat import load_yaml
from cdnsr_plugin.utils.io import atomic_write


def load_options(path: Path | str) -> dict[str, Any]:
    """An option file as plain dicts and lists (safe YAML loader; no ``OrderedDict``), ready to edit."""
    return json.loads(json.dumps(load_yaml(str(path))))


def write_options(path: Path | str, opt: dict[str, Any]) -> Path:
    """``opt`` as YAML, keys in their order, written atomically."""
    return atomic_write(path, yaml.safe_dump(opt, sort_keys=False).encode('utf-8'))


def set_data(opt: dict[str, Any],
             *,
             train: Optional[tuple[Path | str, Path | str]] = None,
             val: Optional[tuple[Path | str, Path | str]] = None,
             batch: Optional[int] = None) -> None:
    """Point ``datasets.train`` at ``train = (dataroot_lq, dataroot_gt)`` and ``datasets.val`` at ``val``;
    ``batch`` sets ``batch_size_per_gpu``. ``None`` leaves an entry as it is."""
    datasets = opt['datasets']
    if train is not None:
        datasets['train'].update(dataroot_lq=str(train[0]), dataroot_gt=str(train[1]))
    if val is not None:
        datasets['val'].update(dataroot_lq=str(val[0]), dataroot_gt=str(val[1]))
    if batch is not None:
        datasets['train']['batch_size_per_gpu'] = batch


def set_schedule(opt: dict[str, Any], iters: Sequence[int] | int) -> int:
    """Set the training length; returns ``total_iter``.

    With ``train.stages`` (CDNSRModel): ``iters`` is one count per stage, or one count for every stage; a stage's
    ``lr_period`` keeps its ratio to the stage's length (ClassSR's classifier stage: 2.5 x its length).
    Without (BasicSR's SRModel): ``iters`` is the total, and a ``periods`` scheduler gets one period.
    """
    train = opt['train']
    stages = train.get('stages')
    if stages:
        counts = [int(iters)] * len(stages) if isinstance(iters, int) else [int(n) for n in iters]
        if len(counts) != len(stages):
            raise ValueError(f'{len(counts)} stage lengths for {len(stages)} stages')
        for stage, count in zip(stages, counts):
            if stage.get('lr_period'):
                stage['lr_period'] = max(round(stage['lr_period'] * count / stage['iters']), 1)
            stage['iters'] = count
        total = sum(counts)
    else:
        total = int(iters) if isinstance(iters, int) else sum(int(n) for n in iters)
        if 'periods' in train.get('scheduler', {}):
            train['scheduler']['periods'] = [total]
    train['total_iter'] = total
    return total


def set_logging(opt: dict[str, Any],
                *,
                print_freq: Optional[int] = None,
                checkpoint_freq: Optional[int] = None,
                val_freq: Optional[int] = None,
                tensorboard: Optional[bool] = None) -> None:
    """``logger.print_freq``, ``logger.save_checkpoint_freq``, ``val.val_freq``, ``logger.use_tb_logger``;
    ``None`` leaves an entry as it is."""
    logger = opt.setdefault('logger', {})
    values = {'print_freq': print_freq, 'save_checkpoint_freq': checkpoint_freq, 'use_tb_logger': tensorboard}
    logger.update({key: value for key, value in values.items() if value is not None})
    if val_freq is not None and opt.get('val') is not None:
        opt['val']['val_freq'] = val_freq
