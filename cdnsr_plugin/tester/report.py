"""Reports of routed patch-wise tests: per-set aggregation, JSON/CSV files, a text summary,
class-map overlays and PSNR-vs-FLOPs plots.

The data model is plain JSON-ready dicts (see ``tools/test_patches.py``):

* an *image record*: one image under one routing setting (``dataset``, ``image``, ``lr_size``,
  ``sr_size``, ``patches``, ``counts``, ``eta``, ``psnr``/``ssim``/``psnr_y``/``ssim_y`` (null
  without ground truth), ``flops`` per convention (``total``, ``per_patch``,
  ``percent_of_largest``), ``time_s``, ``peak_memory_mb``, ``sr_path``, ``overlay_path``);
* a *set record*: the same quantities over one dataset, made by :func:`aggregate`;
* a *report*: run metadata, ``settings`` (each with ``images`` and ``sets``), ``comparison``
  (made by :func:`compare`) and ``failures``.

FLOPs conventions: ``paper`` = 2 x weight MACs, transposed convs on the output grid (the ClassSR
/ CDNSR tables); ``macs`` = ptflops MACs, what the hardware runs (see ``routing/flops.py``).

Every file is written atomically (temporary name beside the target, then ``os.replace``), so an
interrupted run never leaves a half-written report, CSV, overlay or plot.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from cdnsr_plugin.data.image_io import write_image

METRICS = ('psnr', 'ssim', 'psnr_y', 'ssim_y')
CSV_COLUMNS = ('setting', 'kind', 'dataset', 'image', 'lr_h', 'lr_w', 'patches', 'counts', 'psnr', 'ssim',
               'psnr_y', 'ssim_y', 'paper_per_patch', 'paper_pct', 'macs_per_patch', 'macs_pct', 'time_s',
               'peak_memory_mb')
CONVENTION_NOTE = ('paper = 2 x weight MACs, transposed convs on the output grid (ClassSR/CDNSR tables); '
                   'MACs = ptflops, what the hardware runs.')
POINT_MARKERS = ('*', 'D', 'P', 'X', 's')
GREEN, YELLOW, RED = (0, 255, 0), (0, 255, 255), (0, 0, 255)


# ----------------------------------------------------------------------------- files

def _atomic_write(path: Path | str, data: bytes) -> Path:
    """Write ``data`` to a temporary name beside ``path``, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f'.{path.name}.{os.getpid()}.tmp')
    try:
        with open(tmp, 'wb') as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    return path


def _jsonable(value: Any) -> Any:
    """Plain JSON types: numpy scalars/arrays and tensors unwrapped, paths as strings, and
    non-finite floats (e.g. the infinite PSNR of an exact copy) as null (strict JSON has none)."""
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, 'tolist') and not isinstance(value, (str, bytes)):
        return _jsonable(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# ----------------------------------------------------------------------------- aggregation

def _mean_or_none(values: list[Optional[float]]) -> Optional[float]:
    scored = [value for value in values if value is not None and math.isfinite(value)]  # inf: an exact copy
    return float(sum(scored) / len(scored)) if scored else None


def _sum_counts(records: list[dict]) -> list[int]:
    lengths = {len(record['counts']) for record in records}
    if len(lengths) != 1:
        raise ValueError(f"image records of dataset {records[0]['dataset']!r} have counts of different "
                         f'lengths {sorted(lengths)}; every record of a setting needs one count per class')
    return [int(sum(column)) for column in zip(*(record['counts'] for record in records))]


def _aggregate_flops(records: list[dict], patches: int) -> dict:
    """Per convention: total summed; per-patch and percent weighted by each image's patches."""
    result = {}
    for convention in (records[0].get('flops') or {}):
        entries = [(record.get('flops') or {}).get(convention) for record in records]
        if any(entry is None or entry.get('total') is None for entry in entries):
            result[convention] = None
            continue
        total = float(sum(entry['total'] for entry in entries))
        weighted = [(entry.get('percent_of_largest'), record['patches']) for entry, record in zip(entries, records)]
        percent = (None if patches == 0 or any(pct is None for pct, _ in weighted)
                   else float(sum(pct * n for pct, n in weighted) / patches))
        result[convention] = {'total': total, 'per_patch': total / patches if patches else None,
                              'percent_of_largest': percent}
    return result


def _aggregate_set(dataset: str, records: list[dict]) -> dict:
    patches = int(sum(record['patches'] for record in records))
    result = {'dataset': dataset, 'images': len(records), 'patches': patches, 'counts': _sum_counts(records)}
    for key in METRICS:
        result[key] = _mean_or_none([record.get(key) for record in records])
    result['scored_images'] = sum(record.get('psnr') is not None for record in records)
    result['flops'] = _aggregate_flops(records, patches)
    times = [record.get('time_s') for record in records]
    result['time_s'] = None if any(t is None for t in times) else float(sum(times))
    memories = [record['peak_memory_mb'] for record in records if record.get('peak_memory_mb') is not None]
    result['peak_memory_mb'] = float(max(memories)) if memories else None
    return result


def aggregate(images: list[dict]) -> list[dict]:
    """One set record per dataset, in first-seen order.

    Metrics are means over the images that have them (``scored_images`` of them; an image has none
    without ground truth or when it is too small to score after cropping ``scale`` pixels); null if
    no image has them. FLOPs
    ``total`` is the sum, ``per_patch`` the sum of totals over the sum of patches and
    ``percent_of_largest`` the patch-weighted mean of the images' percents (the same thing, as
    every image shares the largest branch) -- ClassSR/CDNSR average over all patches of a set.
    Times add up; peak memory is the maximum (null if no image measured it).

    Args:
        images: image records of one setting.

    Returns:
        Set records: ``dataset``, ``images``, ``patches``, ``counts``, the metrics, ``flops``,
        ``time_s``, ``peak_memory_mb``.
    """
    groups: dict[str, list[dict]] = {}
    for record in images:
        groups.setdefault(record['dataset'], []).append(record)
    return [_aggregate_set(dataset, records) for dataset, records in groups.items()]


def _ratio(numerator: Optional[float], denominator: Optional[float]) -> Optional[float]:
    if numerator is None or denominator is None or denominator == 0:
        return None
    return float(numerator / denominator)


def _sets_of(setting: dict) -> list[dict]:
    return setting.get('sets') or aggregate(setting.get('images', []))


def compare(routed: dict, baseline: dict) -> list[dict]:
    """Comparison entries of a routed setting against a baseline, one per shared dataset.

    Args:
        routed: a setting (``name`` and ``sets``, or ``images`` to aggregate).
        baseline: the setting to compare with, e.g. ``backbone full image``.

    Returns:
        ``{"dataset", "routed", "baseline", "time_ratio", "flops_ratio": {convention: ratio},
        "psnr_diff", "psnr_y_diff"}`` per dataset; ratios are routed / baseline, differences
        routed - baseline (null where either side lacks the value).
    """
    base_sets = {record['dataset']: record for record in _sets_of(baseline)}
    entries = []
    for mine in _sets_of(routed):
        other = base_sets.get(mine['dataset'])
        if other is None:
            continue
        flops = {convention: _ratio((cost or {}).get('per_patch'),
                                    ((other.get('flops') or {}).get(convention) or {}).get('per_patch'))
                 for convention, cost in (mine.get('flops') or {}).items()}
        diffs = {f'{key}_diff': None if mine.get(key) is None or other.get(key) is None
                 else float(mine[key] - other[key]) for key in ('psnr', 'psnr_y')}
        entries.append({'dataset': mine['dataset'], 'routed': routed['name'], 'baseline': baseline['name'],
                        'time_ratio': _ratio(mine.get('time_s'), other.get('time_s')),
                        'flops_ratio': flops, **diffs})
    return entries


# ----------------------------------------------------------------------------- JSON / CSV

def _cell(value: Any) -> str:
    return '' if value is None else str(value)


def _flops_cells(record: dict, convention: str) -> list[str]:
    cost = (record.get('flops') or {}).get(convention) or {}
    return [_cell(cost.get('per_patch')), _cell(cost.get('percent_of_largest'))]


def _csv_row(setting: dict, record: dict, image: str) -> list[str]:
    lr_h, lr_w = record.get('lr_size') or (None, None)
    return [setting['name'], setting.get('kind', ''), record['dataset'], image, _cell(lr_h), _cell(lr_w),
            _cell(record['patches']), '/'.join(str(int(n)) for n in record['counts']),
            *(_cell(record.get(key)) for key in METRICS), *_flops_cells(record, 'paper'),
            *_flops_cells(record, 'macs'), _cell(record.get('time_s')), _cell(record.get('peak_memory_mb'))]


def _csv_rows(setting: dict) -> list[list[str]]:
    """Per dataset of a setting: its image rows, then its set row (image ``ALL``)."""
    images, sets = setting.get('images', []), _sets_of(setting)
    datasets = list(dict.fromkeys([r['dataset'] for r in images] + [r['dataset'] for r in sets]))
    rows = []
    for dataset in datasets:
        rows += [_csv_row(setting, r, str(r['image'])) for r in images if r['dataset'] == dataset]
        rows += [_csv_row(setting, r, 'ALL') for r in sets if r['dataset'] == dataset]
    return rows


def report_csv(report: dict) -> str:
    """The report as CSV text (see :data:`CSV_COLUMNS`; empty cells for null)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator='\n')
    writer.writerow(CSV_COLUMNS)
    for setting in report.get('settings', []):
        writer.writerows(_csv_rows(setting))
    return buffer.getvalue()


def write_report(folder: Path | str, report: dict) -> tuple[Path, Path]:
    """Write ``report.json`` (indent 2) and ``report.csv`` into ``folder``, each atomically.

    An existing report there is replaced as a whole. Non-finite floats are written as null.

    Args:
        folder: output folder (created if missing).
        report: the report dict.

    Returns:
        The paths of the JSON and the CSV file.
    """
    folder = Path(folder)
    text = json.dumps(_jsonable(report), indent=2, allow_nan=False) + '\n'
    json_path = _atomic_write(folder / 'report.json', text.encode('utf-8'))
    csv_path = _atomic_write(folder / 'report.csv', report_csv(_jsonable(report)).encode('utf-8'))
    return json_path, csv_path


# ----------------------------------------------------------------------------- text summary

def _fmt(value: Optional[float], spec: str, missing: str = 'n/a') -> str:
    return missing if value is None else format(value, spec)


def _quality(record: dict) -> str:
    for suffix, label in (('_y', 'Y'), ('', 'RGB')):
        if record.get('psnr' + suffix) is not None:
            return f"{record['psnr' + suffix]:.2f}/{_fmt(record.get('ssim' + suffix), '.4f')} {label}"
    return 'no GT'


def _percent(record: dict, convention: str) -> Optional[float]:
    return ((record.get('flops') or {}).get(convention) or {}).get('percent_of_largest')


def _set_line(setting_name: str, record: dict) -> str:
    patches = record['patches']
    shares = '/'.join(f'{100 * n / patches:.0f}' if patches else '-' for n in record['counts'])
    return (f"{setting_name:<22} {record['dataset']:<12} {record['images']:>6} {shares:>12} "
            f'{_quality(record):>20} {_fmt(_percent(record, "paper"), ".1f"):>8} '
            f'{_fmt(_percent(record, "macs"), ".1f"):>7} {_fmt(record.get("time_s"), ".2f"):>9}')


def _comparison_line(entry: dict) -> str:
    flops = entry.get('flops_ratio') or {}
    names = {'paper': 'paper', 'macs': 'MACs'}
    flops_text = ' / '.join(f"x{_fmt(ratio, '.2f')} ({names.get(key, key)})" for key, ratio in flops.items())
    psnr = entry.get('psnr_diff')
    psnr_text = 'PSNR n/a (no GT)' if psnr is None else f'PSNR {psnr:+.2f} dB'
    if entry.get('psnr_y_diff') is not None:
        psnr_text += f" (Y {entry['psnr_y_diff']:+.2f} dB)"
    return (f"{entry['dataset']}: {entry['routed']} vs {entry['baseline']}: "
            f"time x{_fmt(entry.get('time_ratio'), '.2f')}, FLOPs {flops_text or 'n/a'}, {psnr_text}")


def format_summary(report: dict) -> str:
    """A one-screen plain-text summary: one line per setting and dataset (images, class shares in
    %, PSNR/SSIM (Y if present), FLOPs per patch in % of the largest branch in both conventions,
    total time), then the comparisons, the failures and what the two conventions mean."""
    lines = [f"{report.get('created', '')}  device {report.get('device', '?')}, torch {report.get('torch', '?')}, "
             f"{report.get('threads', '?')} threads",
             f"{'setting':<22} {'dataset':<12} {'images':>6} {'classes %':>12} {'PSNR/SSIM':>20} "
             f"{'paper %':>8} {'MACs %':>7} {'time s':>9}"]
    for setting in report.get('settings', []):
        lines += [_set_line(setting['name'], record) for record in _sets_of(setting)]
    if report.get('comparison'):
        lines += ['', *(_comparison_line(entry) for entry in report['comparison'])]
    failures = report.get('failures') or []
    if failures:
        lines += ['', f"{len(failures)} file{'s' if len(failures) != 1 else ''} failed:"]
        lines += [f"  {failure['file']}: {failure['error']}" for failure in failures]
    lines += ['', 'FLOPs %: cost per patch, in % of the largest branch on one patch.', CONVENTION_NOTE]
    return '\n'.join(lines)


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


def draw_class_map(sr_bgr: np.ndarray, positions: Any, patch: int, scale: int, labels: Any, num_classes: int,
                   alpha: float = 0.4, line_width: int = 1) -> np.ndarray:
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
    import cv2
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


def write_overlay(path: Path | str, sr_bgr: np.ndarray, positions: Any, patch: int, scale: int, labels: Any,
                  num_classes: int, alpha: float = 0.4, line_width: int = 1) -> Path:
    """Draw :func:`draw_class_map` and write it atomically as an image (PNG by the suffix)."""
    write_image(path, draw_class_map(sr_bgr, positions, patch, scale, labels, num_classes, alpha, line_width))
    return Path(path)


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


def plot_psnr_flops(series: Sequence[dict], path: Path | str, convention: str = 'paper', title: str = '') -> Path:
    """PSNR against FLOPs per patch (in % of the largest branch), written atomically as a PNG.

    Args:
        series: items ``{"label", "points": [(flops_percent, psnr_db[, annotation]), ...],
            "style": "line" | "point"}``; a point series (default for one point, e.g. the
            backbone) is drawn as a large marker, the first a star. Points with a null PSNR (no ground truth) are left out; an optional third
            element of a point is written beside it (e.g. ``"eta=0.5"``).
        path: PNG to write (150 dpi).
        convention: FLOPs convention named on the x axis (``paper`` or ``macs``).
        title: figure title.

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
    ax.set_xlabel(f'FLOPs per patch, % of largest branch ({convention})')
    ax.set_ylabel('PSNR (dB)')
    ax.grid(True, alpha=0.3)
    ax.margins(x=0.1, y=0.1)  # room for the annotations
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format='png', dpi=150)
    return _atomic_write(path, buffer.getvalue())
