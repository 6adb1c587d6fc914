"""Shared fixtures: real photos that ship with scikit-image (the tests never read ../shared: users run
them on a clean clone without it)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault('CDNSR_PLUGIN_AUTOLOAD', '1')
import cdnsr_plugin  # noqa: E402,F401  (registers the plugin; also installs the torchvision alias)

from helpers import load_photos  # noqa: E402


@pytest.fixture(scope='session')
def photos() -> list[np.ndarray]:
    return load_photos()


@pytest.fixture(scope='session')
def lr_image(photos) -> torch.Tensor:
    """A 90x120 crop of a real photo as a float (3, H, W) RGB tensor in [0, 1]."""
    photo = photos[0]
    y, x = photo.shape[0] // 3, photo.shape[1] // 3
    crop = photo[y:y + 90, x:x + 120, ::-1].astype(np.float32) / 255.0
    return torch.from_numpy(crop.copy()).permute(2, 0, 1).contiguous()


@pytest.fixture(scope='session')
def paired_folder(tmp_path_factory, photos) -> Path:
    """GT 64x64 crops of real photos and their x4 bicubic LR (basicsr's MATLAB imresize), as PNGs."""
    import cv2

    from cdnsr_plugin.utils.image import bicubic_resize
    root = tmp_path_factory.mktemp('pairs')
    (root / 'gt').mkdir()
    (root / 'lq').mkdir()
    for i, photo in enumerate(photos):
        for j in range(2):
            y = photo.shape[0] // 4 + 64 * j
            x = photo.shape[1] // 4 + 96 * j
            gt = photo[y:y + 64, x:x + 64]
            cv2.imwrite(str(root / 'gt' / f'{i:02d}_{j}.png'), gt)
            cv2.imwrite(str(root / 'lq' / f'{i:02d}_{j}.png'), bicubic_resize(gt, 1 / 4))
    return root


@pytest.fixture(scope='session')
def hr_folder(tmp_path_factory, photos) -> Path:
    """Three real photos cropped to at most 300x400 (fast), as PNGs, a space in their names."""
    import cv2
    folder = tmp_path_factory.mktemp('hr')
    for i, photo in enumerate(photos[:3]):
        y, x = photo.shape[0] // 4, photo.shape[1] // 4
        cv2.imwrite(str(folder / f'photo {i}.png'), photo[y:y + 300, x:x + 400])
    return folder


@pytest.fixture(scope='session')
def hr_dir(tmp_path_factory, photos) -> Path:
    """The seven crops of ``helpers.TIER_CROPS`` of real photos, for tools/make_test_sets.py."""
    import cv2

    from helpers import TIER_CROPS
    folder = tmp_path_factory.mktemp('hr_tiers')
    for i, (h, w) in enumerate(TIER_CROPS):
        photo = photos[i % len(photos)]
        y, x = (photo.shape[0] - h) // 2, (photo.shape[1] - w) // 2
        cv2.imwrite(str(folder / f'img{i:02d}.png'), photo[y:y + h, x:x + w])
    return folder


@pytest.fixture(scope='session')
def setup(tmp_path_factory, photos):
    """The tester's network checkpoint and LR/HR pairs (``helpers.write_tester_pairs``)."""
    from helpers import write_tester_pairs
    return write_tester_pairs(tmp_path_factory.mktemp('tester'), photos)


@pytest.fixture(scope='session')
def training_data(tmp_path_factory, photos) -> tuple[Path, Path]:
    """A small prepared training set and a two-image validation set (``helpers``), from real photos."""
    from helpers import make_train_set, make_val_set
    root = tmp_path_factory.mktemp('training')
    return make_train_set(root / 'train', photos), make_val_set(root / 'val', photos)
