"""Writers of a ``records.Report``: ``report.json``, ``report.csv``, the one-screen text summary, and the
series of the PSNR-FLOPs plot (drawn by ``utils.viz.plot_psnr_flops``).

Every file is written with ``utils.io.atomic_write``, so an interrupted run never leaves a half-written
report. FLOPs conventions: ``paper`` = 2 x weight MACs, transposed convs on the output grid (the ClassSR /
CDNSR tables); ``macs`` = ptflops MACs, what the hardware runs (see ``inference/costs.py``).
"""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Optional, Union

from cdnsr_plugin.tester.records import METRICS, Comparison, ImageRecord, Report, SetRecord, SettingResult
from cdnsr_plugin.utils.io import atomic_write, jsonable, write_json

CSV_COLUMNS = ('setting', 'kind', 'dataset', 'image', 'lr_h', 'lr_w', 'patches', 'counts', 'psnr', 'ssim', 'psnr_y',
               'ssim_y', 'paper_per_patch', 'paper_pct', 'paper_pct_full', 'macs_per_patch', 'macs_pct',
               'macs_pct_full', 'time_s', 'peak_memory_mb')
CONVENTION_NOTE = ('paper = 2 x weight MACs, transposed convs on the output grid (ClassSR/CDNSR tables); '
                   'MACs = ptflops, what the hardware runs.')
Row = Union[ImageRecord, SetRecord]

# ----------------------------------------------------------------------------- JSON / CSV


def _cell(value: Any) -> str:
    value = jsonable(value)  # numpy scalars unwrapped, non-finite floats empty
    return '' if value is None else str(value)


def _flops_cells(record: Row, convention: str) -> list[str]:
    cost = record.flops.get(convention)
    if cost is None:
        return ['', '', '']
    return [_cell(cost.per_patch), _cell(cost.percent_of_largest), _cell(cost.percent_of_full_image)]


def _csv_row(setting: SettingResult, record: Row, image: str) -> list[str]:
    lr_h, lr_w = getattr(record, 'lr_size', None) or (None, None)
    return [
        setting.name, setting.kind, record.dataset, image,
        _cell(lr_h),
        _cell(lr_w),
        _cell(record.patches), '/'.join(str(int(n)) for n in record.counts),
        *(_cell(getattr(record, key)) for key in METRICS), *_flops_cells(record, 'paper'),
        *_flops_cells(record, 'macs'),
        _cell(record.time_s),
        _cell(record.peak_memory_mb)
    ]


def _csv_rows(setting: SettingResult) -> list[list[str]]:
    """Per dataset of a setting: its image rows, then its set row (image ``ALL``)."""
    images, sets = setting.images, setting.sets
    datasets = list(dict.fromkeys([r.dataset for r in images] + [r.dataset for r in sets]))
    rows = []
    for dataset in datasets:
        rows += [_csv_row(setting, r, str(r.image)) for r in images if r.dataset == dataset]
        rows += [_csv_row(setting, r, 'ALL') for r in sets if r.dataset == dataset]
    return rows


def report_csv(report: Report) -> str:
    """The report as CSV text (see :data:`CSV_COLUMNS`; empty cells for null)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator='\n')
    writer.writerow(CSV_COLUMNS)
    for setting in report.settings:
        writer.writerows(_csv_rows(setting))
    return buffer.getvalue()


def write_report(folder: Path | str, report: Report) -> tuple[Path, Path]:
    """Write ``report.json`` (``Report.to_dict``, indent 2, non-finite floats as null) and ``report.csv``
    into ``folder``, each atomically; an existing report there is replaced as a whole.

    Returns:
        The paths of the JSON and the CSV file.
    """
    folder = Path(folder)
    json_path = write_json(folder / 'report.json', report.to_dict())
    # file names that are not valid UTF-8 come back as the bytes they were (surrogateescape), as the OS has them
    csv_path = atomic_write(folder / 'report.csv', report_csv(report).encode('utf-8', 'surrogateescape'))
    return json_path, csv_path


# ----------------------------------------------------------------------------- text summary


def _fmt(value: Optional[float], spec: str, missing: str = 'n/a') -> str:
    return missing if value is None else format(value, spec)


def _quality(record: SetRecord) -> str:
    """PSNR on Y and on RGB, and SSIM on Y (BasicSR's, ``crop_border = scale``)."""
    if record.psnr is None and record.psnr_y is None:
        return 'no GT'
    return f"{_fmt(record.psnr_y, '.2f')} {_fmt(record.psnr, '.2f')} {_fmt(record.ssim_y, '.4f')}"


def _percent(record: SetRecord, convention: str, of: str = 'percent_of_largest') -> Optional[float]:
    cost = record.flops.get(convention)
    return None if cost is None else getattr(cost, of)


def _set_line(setting_name: str, record: SetRecord) -> str:
    patches = record.patches
    shares = '/'.join(f'{100 * n / patches:.0f}' if patches else '-' for n in record.counts)
    return (f'{setting_name:<22} {record.dataset:<12} {record.images:>6} {shares:>12} '
            f'{_quality(record):>22} {_fmt(_percent(record, "paper"), ".1f"):>8} '
            f'{_fmt(_percent(record, "macs"), ".1f"):>7} '
            f'{_fmt(_percent(record, "macs", "percent_of_full_image"), ".1f"):>7} {_fmt(record.time_s, ".2f"):>9}')


def _comparison_line(entry: Comparison) -> str:
    names = {'paper': 'paper', 'macs': 'MACs'}
    flops_text = ' / '.join(f"x{_fmt(ratio, '.2f')} ({names.get(key, key)})"
                            for key, ratio in entry.flops_ratio.items())
    if entry.psnr_diff is None:
        psnr_text = 'PSNR n/a (no GT)'
    else:
        psnr_text = f"PSNR Y {_fmt(entry.psnr_y_diff, '+.2f')} dB, RGB {entry.psnr_diff:+.2f} dB"
    return (f'{entry.dataset}: {entry.routed} vs {entry.baseline}: '
            f"time x{_fmt(entry.time_ratio, '.2f')}, FLOPs {flops_text or 'n/a'}, {psnr_text}")


def _fastest_line(entry: Comparison) -> str:
    return (f'{entry.dataset}: {entry.routed} takes x{entry.time_ratio:.2f} the time of the faster backbone '
            f'({entry.baseline})')


def format_summary(report: Report) -> str:
    """A one-screen plain-text summary: one line per setting and dataset (images, class shares in
    %, PSNR/SSIM (Y if present), FLOPs per patch in % of the largest branch in both conventions, MACs in %
    of the backbone on the whole image, total time), then the comparisons, the failures and what the
    figures mean."""
    lines = [
        f'{report.created}  device {report.device}, torch {report.torch}, {report.threads} threads',
        f"{'setting':<22} {'dataset':<12} {'images':>6} {'classes %':>12} {'PSNR Y / RGB, SSIM Y':>22} "
        f"{'paper %':>8} {'MACs %':>7} {'full %':>7} {'time s':>9}"
    ]
    for setting in report.settings:
        lines += [_set_line(setting.name, record) for record in setting.sets]
    comparison = report.comparison
    if comparison:
        lines += ['', *(_comparison_line(entry) for entry in comparison)]
        lines += [_fastest_line(entry) for entry in report.against_fastest_backbone]
    if report.failures:
        lines += ['', f"{len(report.failures)} file{'s' if len(report.failures) != 1 else ''} failed:"]
        lines += [f'  {failure.file}: {failure.error}' for failure in report.failures]
    lines += [
        '', 'paper % / MACs %: cost per patch, in % of the largest branch on one patch (the papers\' tables); '
        'full %: MACs executed, in % of the largest branch on the whole image.', CONVENTION_NOTE
    ]
    return '\n'.join(lines)


# ----------------------------------------------------------------------------- plot series

FULL_IMAGE_XLABEL = 'FLOPs executed, % of the largest branch on the whole image ({convention})'


def sweep_series(report: Report, convention: str = 'paper') -> list[dict]:
    """PSNR-FLOPs series for ``utils.viz.plot_psnr_flops``: per dataset the routed settings as one curve,
    each baseline as a point (PSNR on Y; settings without ground truth are left out). x: the FLOPs executed
    in % of the backbone on the whole image (``FULL_IMAGE_XLABEL``)."""
    series = []
    routed = [s for s in report.settings if s.kind == 'routed']
    datasets = dict.fromkeys(row.dataset for s in report.settings for row in s.sets)
    for dataset in datasets:

        def point(setting: SettingResult) -> Optional[tuple[float, float]]:
            row = next((r for r in setting.sets if r.dataset == dataset), None)
            if row is None or row.psnr_y is None:
                return None
            return (row.flops[convention].percent_of_full_image, row.psnr_y)

        points = sorted(p for p in map(point, routed) if p is not None)
        if points:
            series.append({'label': f'{dataset}: routed (eta / budget)', 'points': points, 'style': 'line'})
        for base in (s for s in report.settings if s.kind != 'routed'):
            p = point(base)
            if p is not None:
                series.append({'label': f'{dataset}: {base.name}', 'points': [p], 'style': 'point'})
    return series
