"""Shared set-up for the training tests: a small prepared set from real photos and demo options."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import cv2
import yaml

from cdnsr_plugin.compat import load_yaml
from cdnsr_plugin.data.image_io import bicubic_resize
from cdnsr_plugin.data.prepare import PrepareOptions, build_reference, prepare

REPO = Path(__file__).resolve().parents[1]


def make_train_set(root: Path, photos: list) -> Path:
    """Difficulty-labelled LMDBs (bicubic reference, 3 classes) from crops of at most 300x400 of three photos."""
    hr = root / 'hr'
    hr.mkdir(parents=True)
    for i, photo in enumerate(photos[:3]):
        y, x = photo.shape[0] // 3, photo.shape[1] // 3
        cv2.imwrite(str(hr / f'{i}.png'), photo[y:y + 300, x:x + 400])
    out = root / 'train_x4'
    prepare(PrepareOptions(input=str(hr), output=str(out), workers=0), build_reference(4, 'cpu', bicubic=True))
    return out


def make_val_set(root: Path, photos: list) -> Path:
    """Two 96x120 HR crops and their x4 bicubic LR, in the layout tools/make_test_sets.py writes."""
    (root / 'HR').mkdir(parents=True)
    (root / 'LR_bicubic' / 'X4').mkdir(parents=True)
    for i, photo in enumerate(photos[-2:]):
        y, x = photo.shape[0] // 2, photo.shape[1] // 2
        gt = photo[y:y + 96, x:x + 120]
        cv2.imwrite(str(root / 'HR' / f'v{i}.png'), gt)
        cv2.imwrite(str(root / 'LR_bicubic' / 'X4' / f'v{i}.png'), bicubic_resize(gt, 0.25))
    return root


def demo_options(name: str, run_name: str, train_set: Path, val_set: Path, stage_iters: int = 2,
                 checkpoint_every: int = 1000) -> dict:
    """A demo option file pointed at the test data, with ``stage_iters`` iterations per stage."""
    opt = load_yaml(str(REPO / 'options' / name))
    opt['name'] = run_name
    train = opt['datasets']['train']
    if train['type'] == 'DifficultyPairedDataset' or train['io_backend']['type'] == 'lmdb':
        train.update(dataroot_gt=str(train_set / 'gt.lmdb'), dataroot_lq=str(train_set / 'lq.lmdb'))
    train['batch_size_per_gpu'] = 8
    val = opt['datasets']['val']
    val.update(dataroot_gt=str(val_set / 'HR'), dataroot_lq=str(val_set / 'LR_bicubic' / 'X4'))
    stages = opt['train'].get('stages')
    if stages:
        for stage in stages:
            stage['iters'] = stage_iters
        opt['train']['total_iter'] = stage_iters * len(stages)
    else:
        opt['train']['total_iter'] = stage_iters * 2
        opt['train']['scheduler']['periods'] = [stage_iters * 2]
    opt['val']['val_freq'] = 10 ** 6  # validate once, at the end (BasicSR always does)
    opt['logger'].update(print_freq=1, save_checkpoint_freq=checkpoint_every, use_tb_logger=False)
    return to_plain(opt)


def to_plain(value):
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [to_plain(v) for v in value]
    return value


def write_options(path: Path, opt: dict) -> Path:
    path.write_text(yaml.safe_dump(opt, sort_keys=False))
    return path


def run(args: list, cwd: Path, timeout: int = 600, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, 'CUDA_VISIBLE_DEVICES': '', 'OMP_NUM_THREADS': '1'}
    result = subprocess.run([sys.executable, *args], cwd=cwd,
                            capture_output=True, text=True, env=env, timeout=timeout)
    if check:
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result


def read_log(folder: Path) -> str:
    return '\n'.join(path.read_text() for path in sorted(folder.glob('*.log')))
