"""Fixtures of the inference tests."""
import numpy as np
import pytest
import torch

from cdnsr_plugin.inference.tiling import PatchGrid, extract


@pytest.fixture(scope='session')
def photo_tiles(photos) -> torch.Tensor:
    """Tiles (32 / 28) of a crop of at most 360x480 of a real photo, RGB in [0, 1]."""
    photo = photos[0]
    y, x = photo.shape[0] // 3, photo.shape[1] // 3
    crop = photo[y:y + 360, x:x + 480, ::-1].astype(np.float32) / 255.0
    image = torch.from_numpy(crop.copy()).permute(2, 0, 1).contiguous()
    return extract(image, PatchGrid.for_image(*image.shape[-2:], 32, 28))
