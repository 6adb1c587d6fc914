"""Reading user images robustly: one place that decides what is converted and what is skipped.

Every tool that reads a folder of photos (data preparation, test-set building, the tester) uses
``list_images`` and ``read_image`` so that bad input is handled the same way everywhere:

* not an image (by extension)              -> skipped, reason recorded
* unreadable / corrupt file                -> skipped, reason recorded
* grayscale                                -> converted to 3 channels, note recorded
* RGBA / grey+alpha                        -> alpha dropped, note recorded
* 16-bit                                   -> converted to 8-bit (rounded /257), note recorded
* smaller than a minimum size (caller's)   -> skipped, reason recorded

Images are returned as uint8 BGR arrays (H, W, 3), OpenCV's and BasicSR's order.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import cv2
import numpy as np

if TYPE_CHECKING:
    import torch

IMAGE_EXTENSIONS = frozenset({'.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff', '.webp', '.ppm', '.pgm'})


class SkipImage(Exception):
    """Raised by ``read_image`` for a file that cannot be used; the message says why."""


@dataclass
class Skipped:
    """Files passed over, with their reasons, for a run's summary."""

    items: list[tuple[str, str]] = field(default_factory=list)

    def add(self, path: Path | str, reason: str) -> None:
        warnings.warn(f'skipping {path}: {reason}', stacklevel=2)
        self.items.append((str(path), reason))

    def as_dict(self) -> dict[str, str]:
        return dict(self.items)


def list_images(folder: Path | str, skipped: Optional[Skipped] = None) -> list[Path]:
    """Image files directly in ``folder``, sorted; other files go to ``skipped``.

    Raises:
        FileNotFoundError: ``folder`` does not exist or is not a directory.
        ValueError: ``folder`` holds no image file.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f'{folder} is not a folder of images; pass the folder that holds the photos')
    images = []
    for path in sorted(folder.iterdir()):
        if path.is_dir():
            continue
        if path.suffix.lower() in IMAGE_EXTENSIONS:
            images.append(path)
        elif skipped is not None:
            skipped.add(path, f'not an image (extension {path.suffix or "none"!r})')
    if not images:
        raise ValueError(f'{folder} holds no image files ({", ".join(sorted(IMAGE_EXTENSIONS))})')
    return images


def to_bgr8(img: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Convert a decoded image to uint8 BGR (H, W, 3); returns the notes of what was converted."""
    notes = []
    if img.dtype == np.uint16:
        img = np.clip(np.round(img.astype(np.float64) / 257.0), 0, 255).astype(np.uint8)
        notes.append('16-bit converted to 8-bit')
    elif img.dtype != np.uint8:
        raise SkipImage(f'unsupported pixel type {img.dtype}')
    if img.ndim == 2:
        img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
        notes.append('grayscale converted to 3 channels')
    elif img.shape[2] == 2:
        img = cv2.cvtColor(np.ascontiguousarray(img[:, :, 0]), cv2.COLOR_GRAY2BGR)
        notes.append('grayscale+alpha: alpha dropped')
    elif img.shape[2] == 4:
        img = np.ascontiguousarray(img[:, :, :3])
        notes.append('RGBA: alpha dropped')
    elif img.shape[2] != 3:
        raise SkipImage(f'{img.shape[2]} channels; expected 1, 3 or 4')
    return img, notes


def read_image(path: Path | str, min_size: int = 1) -> tuple[np.ndarray, list[str]]:
    """Read ``path`` as uint8 BGR; raise ``SkipImage`` (with the reason) if it cannot be used.

    Args:
        path: image file.
        min_size: smallest accepted height and width.

    Returns:
        The image and the list of conversions applied (empty for a plain 8-bit colour image).
    """
    data = np.fromfile(str(path), dtype=np.uint8)
    img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if img is None:
        raise SkipImage('unreadable or corrupt image file')
    img, notes = to_bgr8(img)
    if min(img.shape[:2]) < min_size:
        raise SkipImage(f'{img.shape[1]}x{img.shape[0]} is smaller than {min_size}x{min_size}')
    return img, notes


def write_image(path: Path | str, img: np.ndarray) -> None:
    """Write ``img`` atomically: to a temporary name beside ``path``, then rename."""
    path = Path(path)
    tmp = path.with_name(f'.{path.stem}.tmp{path.suffix}')
    if not cv2.imwrite(str(tmp), img):
        raise OSError(f'could not write {path}')
    tmp.replace(path)


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


def to_tensor(img: np.ndarray) -> torch.Tensor:
    """uint8 BGR (H, W, 3) -> float32 RGB tensor (3, H, W) in [0, 1], as BasicSR's ``img2tensor`` makes it."""
    from basicsr.utils import img2tensor  # after cdnsr_plugin's torchvision alias
    return img2tensor(img.astype(np.float32) / 255.0, bgr2rgb=True, float32=True)
