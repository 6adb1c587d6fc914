"""Files: the one atomic write, and reading user images robustly.

``atomic_write`` is how every file the plugin produces reaches the disk (SR images, class maps, reports,
plots, router files): the bytes go to a temporary name beside the target, then ``os.replace`` renames it,
so an interrupted run never leaves a half-written file under the final name. Images are encoded in memory
(``cv2.imencode``) and decoded from bytes (``cv2.imdecode``), so paths never pass through OpenCV's path
functions.

Every tool that reads a folder of photos (data preparation, test-set building, the tester) uses
``list_images`` and ``read_image`` so that bad input is handled the same way everywhere:

* not an image (by extension)              -> skipped, reason recorded
* unreadable / corrupt file                -> skipped, reason recorded
* grayscale                                -> converted to 3 channels, note recorded
* RGBA / grey+alpha                        -> alpha dropped, note recorded
* 16-bit                                   -> converted to 8-bit (rounded /257), note recorded
* animated (GIF, WebP, PNG) or multi-page TIFF -> the first frame is used, note recorded
* smaller than a minimum size (caller's)   -> skipped, reason recorded

Images are returned as uint8 BGR arrays (H, W, 3), OpenCV's and BasicSR's order.
"""
from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import cv2
import numpy as np

IMAGE_EXTENSIONS = frozenset({'.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff', '.webp', '.ppm', '.pgm', '.gif'})

# ----------------------------------------------------------------------------- writing


def atomic_write(path: Path | str, data: bytes) -> Path:
    """Write ``data`` to a temporary name beside ``path`` (same folder, so the rename is atomic), then
    rename it over ``path``. The parent folder is created if missing; the temporary file is removed if
    anything fails.

    Returns:
        ``path`` as a ``Path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f'.{path.name}.{os.getpid()}.tmp')
    try:
        with open(tmp, 'wb') as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OSError(
                exc.errno, f'no space left on the disk of {path.parent} for {path.name} '
                f'({len(data) / 2**20:.1f} MB): free some space or write elsewhere') from exc
        raise
    return path


def readable_size(size: float) -> str:
    """A byte count as people read it: ``512 B``, ``37.2 KB``, ``4.81 MB``, ``1.25 GB`` (powers of 1024, three
    significant digits)."""
    value = float(size)
    for unit in ('B', 'KB', 'MB', 'GB', 'TB'):
        if abs(value) < 1024 or unit == 'TB':
            break
        value /= 1024
    if unit == 'B':
        return f'{int(value)} B'
    return f'{value:.3g} {unit}' if value < 1000 else f'{value:.0f} {unit}'


def jsonable(value: Any) -> Any:
    """Plain JSON types: numpy scalars/arrays and tensors unwrapped, paths as strings, and non-finite
    floats (e.g. the infinite PSNR of an exact copy) as null (strict JSON has none)."""
    if isinstance(value, dict):
        return {str(key): jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(item) for item in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, 'tolist') and not isinstance(value, (str, bytes)):
        return jsonable(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: Path | str, value: Any) -> Path:
    """``value`` as strict JSON (indent 2, see ``jsonable``), written with ``atomic_write``."""
    text = json.dumps(jsonable(value), indent=2, allow_nan=False) + '\n'
    return atomic_write(path, text.encode('utf-8'))


def write_image(path: Path | str, img: np.ndarray) -> Path:
    """Encode ``img`` (uint8 BGR) in the format of ``path``'s suffix and write it with ``atomic_write``.

    Raises:
        OSError: the image cannot be encoded in that format.
    """
    path = Path(path)
    try:
        ok, buffer = cv2.imencode(path.suffix or '.png', img)
    except cv2.error as exc:  # e.g. no encoder for the suffix
        raise OSError(f'could not encode an image for {path} ({exc.err})') from exc
    if not ok:
        raise OSError(f'could not encode an image for {path}')
    return atomic_write(path, buffer.tobytes())


# ----------------------------------------------------------------------------- reading


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


def write_bicubic_pair(photo: np.ndarray, name: str, hr_dir: Path, lr_dir: Path, scale: int = 4) -> None:
    """``hr_dir/<name>.png`` and ``lr_dir/<name>.png``: ``utils.image.bicubic_pair`` of ``photo``, each written
    atomically (folders created)."""
    from cdnsr_plugin.utils.image import bicubic_pair
    lr, hr = bicubic_pair(photo, scale)
    write_image(Path(hr_dir) / f'{name}.png', hr)
    write_image(Path(lr_dir) / f'{name}.png', lr)


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
            if not path.is_file():  # follows links: a dangling link or a loop is not a file
                reason = 'a symbolic link that leads nowhere (dangling, or a loop)' if path.is_symlink() else \
                    'not a regular file'
                if skipped is not None:
                    skipped.add(path, reason)
            elif not os.access(path, os.R_OK):
                if skipped is not None:
                    skipped.add(path, 'not readable (permissions)')
            else:
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


def decode_image(data: Optional[bytes]) -> Optional[np.ndarray]:
    """uint8 BGR image from encoded bytes (PNG, JPEG, ...), or ``None`` if they are not an image."""
    if not data:
        return None
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)


def _exif_oriented(data: np.ndarray) -> Optional[np.ndarray]:
    """The image turned as its EXIF orientation says, or ``None`` when it has none to apply. OpenCV applies
    the tag when decoding to colour but not with ``IMREAD_UNCHANGED`` (used to keep 16-bit and alpha), so a
    phone photo would come out sideways; EXIF images are 8-bit colour (JPEG), so nothing else is lost."""
    if b'Exif' not in data[:65536].tobytes():
        return None
    oriented = cv2.imdecode(data, cv2.IMREAD_COLOR)
    plain = cv2.imdecode(data, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if oriented is None or plain is None or (oriented.shape == plain.shape and np.array_equal(oriented, plain)):
        return None
    return oriented


def _frames(path: Path | str, data: np.ndarray) -> Optional[tuple[int, str]]:
    """``(count, 'frames' or 'pages')`` of the image file ``path`` (its bytes: ``data``) if it holds more than one
    picture (an animated GIF, WebP or PNG, a multi-page TIFF), else ``None``. Pillow only counts them (it reads
    headers); OpenCV decodes the first."""
    head = data[:64].tobytes()
    if head.startswith(b'GIF8'):
        unit = 'frames'
    elif head.startswith((b'II*\x00', b'MM\x00*')):
        unit = 'pages'
    elif head.startswith(b'RIFF') and head[8:16] == b'WEBPVP8X' and head[20] & 0x02:  # the animation flag
        unit = 'frames'
    elif head.startswith(b'\x89PNG') and b'acTL' in data[:1 << 16].tobytes().split(b'IDAT', 1)[0]:  # APNG
        unit = 'frames'
    else:
        return None
    try:
        from PIL import Image
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')  # Pillow's size warnings: OpenCV has read the image already
            with open(path, 'rb') as handle, Image.open(handle) as img:
                count = int(getattr(img, 'n_frames', 1))
    except Exception:  # noqa: BLE001 (Pillow cannot read what OpenCV could: no note)
        return None
    return (count, unit) if count > 1 else None


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
    if data[:4].tobytes() == b'GIF8' and img.ndim == 3 and img.shape[2] == 4 and img[:, :, 3].min() == 255:
        img = np.ascontiguousarray(img[:, :, :3])  # OpenCV gives every GIF an alpha channel: drop an opaque one
    oriented = _exif_oriented(data)
    img, notes = to_bgr8(img) if oriented is None else (oriented,
                                                        ['EXIF orientation applied (as photo viewers show it)'])
    frames = _frames(path, data)
    if frames is not None:
        count, unit = frames
        kind = 'multi-page' if unit == 'pages' else 'animated'
        notes.append(f'{kind} ({count} {unit}): only the first {unit[:-1]} was used')
    if min(img.shape[:2]) < min_size:
        raise SkipImage(f'{img.shape[1]}x{img.shape[0]} is smaller than {min_size}x{min_size}')
    return img, notes
