"""Pictures: class maps over SR images (ClassSR Fig. 1/5), PSNR-FLOPs plots, labelled sample tiles.

Everything returns arrays or writes through ``utils.io.atomic_write``; matplotlib is used through its
object API on an Agg canvas (no global pyplot state, no display).
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Optional, Sequence

import cv2
import numpy as np

from cdnsr_plugin.utils.io import atomic_write

POINT_MARKERS = ('*', 'D', 'P', 'X', 's')
GREEN, YELLOW, RED = (0, 255, 0), (0, 255, 255), (0, 0, 255)

# ----------------------------------------------------------------------------- class maps


def class_colors(num_classes: int) -> list[tuple[int, int, int]]:
    """BGR colour per class, simple to hard: green -> yellow -> red (ClassSR Fig. 1/5).

    Three classes give exactly green, yellow, red; two give green, red; one gives red; other
    counts are interpolated linearly along green -> yellow -> red.
    """
    if num_classes < 1:
        raise ValueError(f'num_classes must be >= 1, got {num_classes}')
    if num_classes == 1:
        return [RED]
    colors = []
    for i in range(num_classes):
        t = i / (num_classes - 1)
        colors.append((0, round(255 * min(1.0, 2 * (1 - t))), round(255 * min(1.0, 2 * t))))
    return colors


def _as_numpy(array: Any) -> np.ndarray:
    if hasattr(array, 'detach'):  # torch tensor, on any device
        array = array.detach().cpu().numpy()
    return np.asarray(array)


def _tile_grid(positions: Any, labels: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unique sorted tile rows/columns and the label of each grid cell, from ``(N, 2)`` positions."""
    pos = _as_numpy(positions).astype(np.int64).reshape(-1, 2)
    lab = _as_numpy(labels).astype(np.int64).reshape(-1)
    if len(pos) == 0 or len(pos) != len(lab):
        raise ValueError(f'need one label per tile position, got {len(lab)} labels for {len(pos)} positions')
    ys, iy = np.unique(pos[:, 0], return_inverse=True)
    xs, ix = np.unique(pos[:, 1], return_inverse=True)
    grid = np.full((len(ys), len(xs)), -1, dtype=np.int64)
    grid[iy, ix] = lab
    if len(pos) != grid.size or len(np.unique(iy * len(xs) + ix)) != len(pos):
        raise ValueError('tile positions must form a full grid (every row start x every column start, each '
                         'once), as PatchGrid.positions() gives')
    return ys, xs, grid


def _nearest_tile(length: int, starts: np.ndarray, patch: int, scale: int) -> np.ndarray:
    """Per SR index along one axis, the index of the tile start whose tile centre is nearest.

    Doubled integer coordinates keep it exact: pixel ``i`` has centre ``2i + 1``, a tile starting
    at LR ``s`` has centre ``2 s scale + patch scale``. Ties go to the earlier tile.
    """
    pixels = 2 * np.arange(length, dtype=np.int64) + 1
    centres = 2 * scale * starts + patch * scale
    return np.abs(pixels[:, None] - centres[None, :]).argmin(axis=1)


def _cells(positions: Any, labels: Any, patch: int, scale: int,
           shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if patch < 1 or scale < 1:
        raise ValueError(f'patch and scale must be >= 1, got patch={patch}, scale={scale}')
    ys, xs, grid = _tile_grid(positions, labels)
    return _nearest_tile(shape[0], ys, patch, scale), _nearest_tile(shape[1], xs, patch, scale), grid


def pixel_classes(positions: Any, labels: Any, patch: int, scale: int, shape: tuple[int, int]) -> np.ndarray:
    """Class of every SR pixel: that of the tile whose centre is nearest.

    Tiles overlap; giving each pixel to the nearest-centre tile splits the overlaps at their
    midpoints, so the map does not depend on the order of the tiles. On a grid of tiles the
    nearest centre is the nearest row centre times the nearest column centre, computed per axis.
    Exact ties (odd scales) go to the upper / left tile.

    Args:
        positions: ``(N, 2)`` top-left ``(y, x)`` of the LR tiles (array or tensor), a full grid.
        labels: ``(N,)`` class of each tile.
        patch: LR tile side.
        scale: SR factor; positions are in LR pixels, the map in SR pixels.
        shape: ``(H, W)`` of the SR image (tiles may extend past it).

    Returns:
        ``(H, W)`` int64 array of classes.
    """
    rows, cols, grid = _cells(positions, labels, patch, scale, shape)
    return grid[rows[:, None], cols[None, :]]


def _line_mask(cells: np.ndarray, width: int) -> np.ndarray:
    """Indices within ``width`` pixels of a change of cell along one axis (lines centred on it)."""
    mask = np.zeros(len(cells), dtype=bool)
    starts = np.flatnonzero(cells[1:] != cells[:-1]) + 1
    for k in range(width):
        index = starts - width // 2 + k
        mask[index[(index >= 0) & (index < len(cells))]] = True
    return mask


def draw_class_map(sr_bgr: np.ndarray,
                   positions: Any,
                   patch: int,
                   scale: int,
                   labels: Any,
                   num_classes: int,
                   alpha: float = 0.4,
                   line_width: int = 1) -> np.ndarray:
    """Tint an SR image with the class of the tile covering each pixel (ClassSR Fig. 5 style).

    Each pixel gets the class of the tile whose centre is nearest (see :func:`pixel_classes`), is
    blended as ``(1 - alpha) * pixel + alpha * class_colour`` (rounded), and cell borders are drawn
    as lines of halved brightness so individual patches stay visible.

    Args:
        sr_bgr: uint8 ``(H, W, 3)`` SR image; not modified.
        positions: ``(N, 2)`` top-left ``(y, x)`` of each LR tile (numpy array or tensor).
        patch: LR tile side.
        scale: SR factor.
        labels: ``(N,)`` class of each tile, in ``[0, num_classes)``.
        num_classes: number of classes (colours from :func:`class_colors`).
        alpha: tint strength in ``[0, 1]``.
        line_width: border line width in SR pixels, 0 (none) to ``max(1, scale // 2)``.

    Returns:
        A new uint8 ``(H, W, 3)`` image.
    """
    image = np.asarray(sr_bgr)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f'sr_bgr must be a uint8 (H, W, 3) image, got {image.dtype} {image.shape}')
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f'alpha must lie in [0, 1], got {alpha}')
    if not 0 <= line_width <= max(1, scale // 2):
        raise ValueError(f'line_width must lie in [0, {max(1, scale // 2)}] at x{scale}, got {line_width}')
    rows, cols, grid = _cells(positions, labels, patch, scale, image.shape[:2])
    if grid.min() < 0 or grid.max() >= num_classes:
        raise ValueError(f'labels must lie in [0, {num_classes}), got {grid.min()}..{grid.max()}')
    palette = np.array(class_colors(num_classes), dtype=np.uint8)
    tint = palette[grid[rows[:, None], cols[None, :]]]
    out = cv2.addWeighted(np.ascontiguousarray(image), 1.0 - alpha, tint, alpha, 0.0)
    if line_width:
        lines = _line_mask(rows, line_width)[:, None] | _line_mask(cols, line_width)[None, :]
        out[lines] //= 2
    return out


def draw_region_map(sr_bgr: np.ndarray,
                    owner: np.ndarray,
                    branches: Sequence[int],
                    scale: int,
                    num_classes: int,
                    alpha: float = 0.4) -> np.ndarray:
    """Tint an SR image with the branch that ran each pixel and outline the executed regions (tiling
    ``regions``: ``inference.regions.Plan``), so a promoted cell shows the branch it ran on.

    Args:
        sr_bgr: uint8 ``(H, W, 3)`` SR image, ``H = scale * h``; not modified.
        owner: ``(h, w)`` index of the region owning each LR pixel (``Plan.region_map``).
        branches: the branch of each region.
        scale: SR factor.
        num_classes: number of branches (colours from :func:`class_colors`).
        alpha: tint strength in ``[0, 1]``.

    Returns:
        A new uint8 image; region borders are drawn one SR pixel wide at halved brightness.
    """
    image = np.asarray(sr_bgr)
    owner = np.asarray(owner)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[:2] != (scale * owner.shape[0],
                                                                         scale * owner.shape[1]):
        raise ValueError(f'sr_bgr must be a uint8 ({scale} x {owner.shape}, 3) image, got {image.dtype} {image.shape}')
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f'alpha must lie in [0, 1], got {alpha}')
    branch = np.asarray(branches, dtype=np.int64)[owner]
    if branch.min() < 0 or branch.max() >= num_classes:
        raise ValueError(f'branches must lie in [0, {num_classes}), got {branch.min()}..{branch.max()}')
    big = owner.repeat(scale, 0).repeat(scale, 1)
    palette = np.array(class_colors(num_classes), dtype=np.uint8)
    tint = palette[branch.repeat(scale, 0).repeat(scale, 1)]
    out = cv2.addWeighted(np.ascontiguousarray(image), 1.0 - alpha, tint, alpha, 0.0)
    edge = np.zeros(big.shape, dtype=bool)
    edge[1:] |= big[1:] != big[:-1]
    edge[:, 1:] |= big[:, 1:] != big[:, :-1]
    out[edge] //= 2
    return out


# ----------------------------------------------------------------------------- plots


def _points(item: dict) -> list[tuple[float, float, Optional[str]]]:
    points = []
    for point in item.get('points', []):
        if point[0] is None or point[1] is None:  # no ground truth: nothing to plot
            continue
        points.append((float(point[0]), float(point[1]), str(point[2]) if len(point) > 2 else None))
    return points


def _plot_series(ax: Any, item: dict, points: list[tuple[float, float, Optional[str]]], style: str, index: int,
                 marker: str) -> None:
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    color = f'C{index % 10}'  # one colour per series, whatever its style
    if style == 'point':
        ax.scatter(xs, ys, marker=marker, s=180 if marker == '*' else 70, color=color, zorder=3, label=item['label'])
    else:
        ax.plot(xs, ys, marker='o', markersize=4, color=color, label=item['label'])
    for x, y, text in points:
        text = text if text is not None else (item['label'] if style == 'point' else None)
        if text:
            ax.annotate(text, (x, y), textcoords='offset points', xytext=(4, 4), fontsize=7)


def plot_psnr_flops(series: Sequence[dict],
                    path: Path | str,
                    convention: str = 'paper',
                    title: str = '',
                    xlabel: Optional[str] = None) -> Path:
    """PSNR against FLOPs (by default per patch, in % of the largest branch), written atomically as a PNG.

    Args:
        series: items ``{"label", "points": [(flops_percent, psnr_db[, annotation]), ...],
            "style": "line" | "point"}``; a point series (default for one point, e.g. the
            backbone) is drawn as a large marker, the first a star. Points with a null PSNR (no ground
            truth) are left out; an optional third element of a point is written beside it (e.g. ``"eta=0.5"``).
        path: PNG to write (150 dpi).
        convention: FLOPs convention named on the x axis (``paper`` or ``macs``).
        title: figure title.
        xlabel: x-axis label, where the points are another percentage (``{convention}`` is filled in).

    Returns:
        ``path``.

    Raises:
        ValueError: no series has a point to plot.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    figure = Figure(figsize=(6.4, 4.8))
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    plotted = 0
    point_series = 0  # drawn so far: each gets its own marker, the first a star
    for index, item in enumerate(series):
        points = _points(item)
        if not points:
            continue
        style = item.get('style') or ('point' if len(points) == 1 else 'line')
        _plot_series(ax, item, points, style, index, POINT_MARKERS[point_series % len(POINT_MARKERS)])
        point_series += style == 'point'
        plotted += 1
    if not plotted:
        raise ValueError('nothing to plot: no series has a point with both FLOPs and PSNR (ground truth missing?)')
    ax.set_xlabel((xlabel or 'FLOPs per patch, % of largest branch ({convention})').format(convention=convention))
    ax.set_ylabel('PSNR (dB)')
    ax.grid(True, alpha=0.3)
    ax.margins(x=0.1, y=0.1)  # room for the annotations
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format='png', dpi=150)
    return atomic_write(path, buffer.getvalue())


# ----------------------------------------------------------------------------- montages


def caption_tile(img: np.ndarray, caption: str, side: int = 128) -> np.ndarray:
    """``img`` (uint8 BGR) resized to ``side x side`` (nearest neighbour, pixels stay visible) with
    ``caption`` in white on a black strip at the bottom."""
    tile = cv2.resize(img, (side, side), interpolation=cv2.INTER_NEAREST)
    cv2.rectangle(tile, (0, side - 18), (side, side), (0, 0, 0), -1)
    cv2.putText(tile, caption, (4, side - 5), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1, cv2.LINE_AA)
    return tile


def montage(rows: Sequence[Sequence[np.ndarray]],
            headers: Sequence[Sequence[str]],
            title: str,
            side: int = 128,
            per_row: Optional[int] = None) -> np.ndarray:
    """A picture of labelled rows: per row a white header with its text lines, then its tiles
    (``side x side``, padded with black to ``per_row``), under a one-line title.

    Returns:
        uint8 BGR image.
    """
    per_row = per_row or max(len(tiles) for tiles in rows)
    lines = []
    for tiles, texts in zip(rows, headers):
        header = np.full((side, 150, 3), 255, np.uint8)
        for number, text in enumerate(texts):
            cv2.putText(header, text, (6, 28 + 26 * number), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (0, 0, 0), 1, cv2.LINE_AA)
        padding = [np.zeros((side, side, 3), np.uint8)] * (per_row - len(tiles))
        lines.append(np.hstack([header, *tiles, *padding]))
    banner = np.full((34, lines[0].shape[1], 3), 255, np.uint8)
    cv2.putText(banner, title, (6, 23), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 1, cv2.LINE_AA)
    return np.vstack([banner, *lines])
