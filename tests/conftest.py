"""Shared fixtures: real photos that ship with scikit-image (the tests never read ../shared: users run
them on a clean clone without it)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault('CDNSR_PLUGIN_AUTOLOAD', '1')
import cdnsr_plugin  # noqa: E402,F401  (registers the plugin; also installs the torchvision alias)

REPO = Path(__file__).resolve().parents[1]
PHOTO_NAMES = ('astronaut', 'coffee', 'chelsea', 'rocket')  # 512x512, 400x600, 300x451, 427x640


def load_photos(limit: int = 4) -> list[np.ndarray]:
    """scikit-image's bundled colour photos as uint8 BGR arrays (OpenCV order, as BasicSR reads them)."""
    from skimage import data
    return [getattr(data, name)()[..., ::-1].copy() for name in PHOTO_NAMES[:limit]]


@pytest.fixture(scope='session')
def photos() -> list[np.ndarray]:
    return load_photos()


@pytest.fixture(scope='session')
def lr_image(photos) -> 'torch.Tensor':
    """A 90x120 crop of a real photo as a float (3, H, W) RGB tensor in [0, 1]."""
    import torch
    photo = photos[0]
    y, x = photo.shape[0] // 3, photo.shape[1] // 3
    crop = photo[y:y + 90, x:x + 120, ::-1].astype(np.float32) / 255.0
    return torch.from_numpy(crop.copy()).permute(2, 0, 1).contiguous()


@pytest.fixture(scope='session')
def paired_folder(tmp_path_factory, photos) -> Path:
    """GT 64x64 crops of real photos and their x4 bicubic LR (basicsr's MATLAB imresize), as PNGs."""
    import cv2

    from cdnsr_plugin.data.image_io import bicubic_resize
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
