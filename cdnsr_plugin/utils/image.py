"""Array-level image operations shared by the data tools, the tester and the demo."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch


def bicubic_resize(img: np.ndarray, factor: float) -> np.ndarray:
    """Resize a uint8 image by ``factor`` with basicsr's MATLAB-compatible bicubic ``imresize``
    (float64 in [0, 1], then rounded and clipped back to uint8).

    The output has ``ceil(factor * size)`` pixels per side (basicsr's rule); callers crop if needed.
    """
    from basicsr.utils.matlab_functions import imresize  # after cdnsr_plugin's torchvision alias
    out = imresize(img.astype(np.float64) / 255.0, factor)
    return np.clip(np.round(out * 255.0), 0, 255).astype(np.uint8)


def mod_crop(img: np.ndarray, scale: int) -> np.ndarray:
    """Crop bottom/right so that height and width are multiples of ``scale``."""
    height, width = img.shape[:2]
    return img[:height - height % scale, :width - width % scale]


def bicubic_pair(photo: np.ndarray, scale: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """``(lr, hr)``: ``photo`` cropped to a multiple of ``scale`` (the ground truth) and its MATLAB-bicubic
    ``1 / scale`` downscale (the LR), exactly ``scale`` times smaller: the test sets' degradation."""
    hr = mod_crop(photo, scale)
    return bicubic_resize(hr, 1.0 / scale), hr


def to_tensor(img: np.ndarray) -> torch.Tensor:
    """uint8 BGR (H, W, 3) -> float32 RGB tensor (3, H, W) in [0, 1], as BasicSR's ``img2tensor`` makes it."""
    from basicsr.utils import img2tensor  # after cdnsr_plugin's torchvision alias
    return img2tensor(img.astype(np.float32) / 255.0, bgr2rgb=True, float32=True)
