"""Reports of routed tests: aggregation, JSON/CSV, summary text, class-map overlays, plots."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from cdnsr_plugin.routing.patches import PatchGrid
from cdnsr_plugin.tester.report import (aggregate, class_colors, compare, draw_class_map, format_summary,
                                        pixel_classes, plot_psnr_flops, write_overlay, write_report)

LARGEST = {'paper': 1000.0, 'macs': 400.0}  # cost of the largest branch on one patch


def image_record(dataset: str, image: str, patches: int, counts: list[int], paper_total: float,
                 macs_total: float, psnr: float | None = 30.0, time_s: float = 1.0,
                 memory: float | None = None) -> dict:
    """An image record as the engine writes it, percent derived from the largest branch."""
    flops = {}
    for key, total in (('paper', paper_total), ('macs', macs_total)):
        flops[key] = {'total': total, 'per_patch': total / patches,
                      'percent_of_largest': 100 * total / patches / LARGEST[key]}
    quality = {key: None if psnr is None else psnr + offset
               for key, offset in (('psnr', 0.0), ('ssim', -29.2), ('psnr_y', 1.0), ('ssim_y', -29.1))}
    return {'dataset': dataset, 'image': image, 'lr_size': [40, 60], 'sr_size': [160, 240], 'patches': patches,
            'counts': counts, 'eta': None, **quality, 'flops': flops, 'time_s': time_s,
            'peak_memory_mb': memory, 'sr_path': None, 'overlay_path': None}


@pytest.fixture
def images() -> list[dict]:
    return [image_record('Test2K', '0801', 10, [5, 3, 2], 4000.0, 1000.0, psnr=30.0, time_s=1.0, memory=50.0),
            image_record('Test4K', '1201', 4, [0, 0, 4], 4000.0, 1600.0, psnr=None, time_s=0.5),
            image_record('Test2K', '0802', 30, [10, 10, 10], 18000.0, 6000.0, psnr=32.0, time_s=2.0, memory=70.0)]


def make_report(images: list[dict]) -> dict:
    backbone = [dict(r, counts=[0, 0, r['patches']], time_s=2 * r['time_s'],
                     psnr=None if r['psnr'] is None else r['psnr'] + 0.1) for r in images]
    settings = [{'name': 'argmax', 'kind': 'routed', 'images': images, 'sets': aggregate(images)},
                {'name': 'backbone full image', 'kind': 'backbone-full', 'images': backbone,
                 'sets': aggregate(backbone)}]
    return {'created': '2025-01-01T00:00:00', 'command': 'tools/test_patches.py x', 'device': 'cpu',
            'torch': torch.__version__, 'threads': 2, 'network': {'router': 'classifier', 'patch': 32},
            'settings': settings, 'comparison': compare(settings[0], settings[1]),
            'failures': [{'file': 'lq/broken.png', 'error': 'unreadable or corrupt image file'},
                         {'file': 'lq/tiny.png', 'error': '0x0 image'}]}


# ----------------------------------------------------------------------------- aggregate

def test_aggregate_weights_per_patch_by_patches(images):
    sets = aggregate(images)
    assert [s['dataset'] for s in sets] == ['Test2K', 'Test4K']  # first-seen order
    test2k = sets[0]
    assert test2k['images'] == 2 and test2k['patches'] == 40 and test2k['counts'] == [15, 13, 12]
    paper = test2k['flops']['paper']
    assert paper['total'] == 22000.0
    assert paper['per_patch'] == pytest.approx(550.0)  # 22000 / 40, not the mean of 400 and 600 (= 500)
    assert paper['percent_of_largest'] == pytest.approx(55.0)
    assert test2k['flops']['macs']['per_patch'] == pytest.approx(175.0)
    assert test2k['flops']['macs']['percent_of_largest'] == pytest.approx(43.75)
    assert test2k['psnr'] == pytest.approx(31.0) and test2k['psnr_y'] == pytest.approx(32.0)
    assert test2k['ssim'] == pytest.approx(1.8)
    assert test2k['time_s'] == pytest.approx(3.0) and test2k['peak_memory_mb'] == 70.0


def test_aggregate_means_over_scored_images_and_keeps_nulls(images):
    test4k = aggregate(images)[1]
    assert test4k['psnr'] is None and test4k['ssim_y'] is None and test4k['peak_memory_mb'] is None
    assert test4k['scored_images'] == 0
    mixed = aggregate([images[0], dict(images[2], psnr=None)])[0]  # e.g. one image too small to score
    assert mixed['psnr'] == pytest.approx(30.0) and mixed['scored_images'] == 1


def test_aggregate_rejects_mismatched_counts(images):
    with pytest.raises(ValueError, match='counts'):
        aggregate([images[0], dict(images[2], counts=[1, 29])])


def test_compare_ratios_and_differences(images):
    report = make_report(images)
    first = report['comparison'][0]
    assert first['dataset'] == 'Test2K' and first['baseline'] == 'backbone full image'
    assert first['time_ratio'] == pytest.approx(0.5)
    assert first['flops_ratio'] == {'paper': pytest.approx(1.0), 'macs': pytest.approx(1.0)}
    assert first['psnr_diff'] == pytest.approx(-0.1)
    assert report['comparison'][1]['psnr_diff'] is None


# ----------------------------------------------------------------------------- files

def read_csv(path: Path) -> list[dict]:
    with open(path, newline='') as handle:
        return list(csv.DictReader(handle))


def test_write_report_json_round_trips_and_csv_rows(tmp_path, images):
    report = make_report(images)
    json_path, csv_path = write_report(tmp_path / 'out', report)
    assert json.loads(json_path.read_text()) == report
    rows = read_csv(csv_path)
    assert len(rows) == 2 * (3 + 2)  # per setting: one row per image and one per set
    argmax = [row for row in rows if row['setting'] == 'argmax']
    assert [(row['dataset'], row['image']) for row in argmax] == [
        ('Test2K', '0801'), ('Test2K', '0802'), ('Test2K', 'ALL'), ('Test4K', '1201'), ('Test4K', 'ALL')]
    first, total = argmax[0], argmax[2]
    assert first['kind'] == 'routed' and (first['lr_h'], first['lr_w']) == ('40', '60')
    assert first['counts'] == '5/3/2' and float(first['paper_per_patch']) == 400.0
    assert float(first['macs_pct']) == pytest.approx(25.0) and float(first['peak_memory_mb']) == 50.0
    assert total['counts'] == '15/13/12' and float(total['paper_pct']) == pytest.approx(55.0)
    assert total['lr_h'] == '' and float(total['time_s']) == pytest.approx(3.0)
    assert argmax[3]['psnr'] == '' and argmax[3]['peak_memory_mb'] == ''


def test_write_report_replaces_existing_fully(tmp_path, images):
    write_report(tmp_path, make_report(images))
    smaller = make_report(images[:1])
    smaller['failures'] = []
    json_path, csv_path = write_report(tmp_path, smaller)
    assert json.loads(json_path.read_text()) == smaller
    assert len(read_csv(csv_path)) == 2 * 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ['report.csv', 'report.json']  # no temp files left


def test_write_report_writes_strict_json(tmp_path, images):
    report = make_report(images)
    report['settings'][0]['images'][0]['psnr'] = float('inf')  # an exact copy of the ground truth
    report['threads'] = np.int64(2)
    json_path, _ = write_report(tmp_path, report)
    loaded = json.loads(json_path.read_text(), parse_constant=lambda name: pytest.fail(f'non-JSON {name}'))
    assert loaded['settings'][0]['images'][0]['psnr'] is None and loaded['threads'] == 2


def test_format_summary_mentions_everything(images):
    report = make_report(images)
    text = format_summary(report)
    for name in ('Test2K', 'Test4K', 'argmax', 'backbone full image', 'lq/broken.png', 'lq/tiny.png'):
        assert name in text
    assert '2 files failed:' in text and 'unreadable or corrupt image file' in text
    assert 'Test2K: argmax vs backbone full image: time x0.50, FLOPs x1.00 (paper) / x1.00 (MACs), ' \
           'PSNR -0.10 dB' in text
    assert 'Test4K: argmax vs backbone full image' in text and 'PSNR n/a' in text
    assert '38/32/30' in text and '55.0' in text and '32.00/' in text  # shares, paper %, PSNR-Y
    assert 'paper = 2 x weight MACs' in text and 'ptflops' in text
    assert len(text.splitlines()) < 25


# ----------------------------------------------------------------------------- class maps

def test_class_colors():
    assert class_colors(3) == [(0, 255, 0), (0, 255, 255), (0, 0, 255)]
    assert class_colors(2) == [(0, 255, 0), (0, 0, 255)]
    assert class_colors(1) == [(0, 0, 255)]
    five = class_colors(5)
    assert five[0] == (0, 255, 0) and five[2] == (0, 255, 255) and five[4] == (0, 0, 255)
    assert [c[2] for c in five] == sorted(c[2] for c in five)  # red rises, green falls
    assert [c[1] for c in five] == sorted((c[1] for c in five), reverse=True)


def blended(value: int, color: tuple[int, int, int], alpha: float) -> np.ndarray:
    return np.array([round((1 - alpha) * value + alpha * c) for c in color])


def test_tint_of_a_hard_tile_is_exact():
    grey = np.full((64, 64, 3), 128, np.uint8)
    out = draw_class_map(grey, np.array([[0, 0]]), 32, 2, np.array([2]), 3, alpha=0.4)
    assert out.shape == grey.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(out[32, 32], blended(128, (0, 0, 255), 0.4))  # (77, 77, 179)
    assert out[32, 32, 2] > 128 and out[32, 32, 1] < 128
    assert (grey == 128).all()  # input untouched


def two_tiles(scale: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """LR 32x60 at stride 28: tiles at x=0 and x=28 (centres 16 and 44, midpoint 30), labels 0 / 2."""
    grid = PatchGrid.for_image(32, 60)
    assert grid.xs == (0, 28)
    image = np.full((32 * scale, 60 * scale, 3), 100, np.uint8)
    return image, grid.positions().numpy(), np.array([0, 2])


def test_overlap_goes_to_nearest_centre_tile():
    image, positions, labels = two_tiles(scale=2)
    classes = pixel_classes(positions, labels, 32, 2, image.shape[:2])
    assert (classes[:, :60] == 0).all() and (classes[:, 60:] == 2).all()  # split at SR x = 2 * 30
    out = draw_class_map(image, torch.from_numpy(positions), 32, 2, torch.tensor(labels), 3, alpha=0.5)
    np.testing.assert_array_equal(out[10, 57], blended(100, (0, 255, 0), 0.5))  # green left of the midpoint
    np.testing.assert_array_equal(out[10, 62], blended(100, (0, 0, 255), 0.5))  # red right of it
    np.testing.assert_array_equal(out[10, 60], blended(100, (0, 0, 255), 0.5) // 2)  # the border line
    reversed_order = draw_class_map(image, positions[::-1].copy(), 32, 2, labels[::-1].copy(), 3, alpha=0.5)
    np.testing.assert_array_equal(out, reversed_order)  # independent of the order of the tiles


def test_pixel_classes_match_brute_force_on_border_aligned_grid():
    grid = PatchGrid.for_image(40, 45)  # ys (0, 8), xs (0, 13): border-aligned last tiles
    positions = grid.positions().numpy()
    labels = np.random.default_rng(0).integers(0, 4, len(positions))
    scale, patch = 3, 32
    classes = pixel_classes(positions, labels, patch, scale, (40 * scale, 45 * scale))
    yy, xx = np.mgrid[:40 * scale, :45 * scale]
    centres = positions * scale + patch * scale / 2
    distance = (yy[..., None] + 0.5 - centres[:, 0]) ** 2 + (xx[..., None] + 0.5 - centres[:, 1]) ** 2
    np.testing.assert_array_equal(classes, labels[distance.argmin(axis=-1)])


def test_small_image_single_tile(tmp_path):
    grid = PatchGrid.for_image(5, 7)  # smaller than one 32 tile: the tile extends past the image
    sr = np.random.default_rng(1).integers(0, 256, (20, 28, 3), dtype=np.uint8)
    before = sr.copy()
    out = draw_class_map(sr, grid.positions(), 32, 4, torch.tensor([1]), 3)
    assert out.shape == sr.shape
    np.testing.assert_array_equal(sr, before)
    expected = cv2.addWeighted(sr, 0.6, np.full_like(sr, 0) + np.array((0, 255, 255), np.uint8), 0.4, 0)
    np.testing.assert_array_equal(out, expected)  # one cell: tinted yellow everywhere, no lines
    path = write_overlay(tmp_path / 'overlay.png', sr, grid.positions(), 32, 4, [1], 3)
    np.testing.assert_array_equal(cv2.imread(str(path)), out)


def test_draw_class_map_rejects_bad_input():
    image, positions, labels = two_tiles(scale=2)
    with pytest.raises(ValueError, match='labels'):
        draw_class_map(image, positions, 32, 2, np.array([0, 3]), 3)
    with pytest.raises(ValueError, match='full grid'):
        draw_class_map(image, np.array([[0, 0], [4, 28]]), 32, 2, labels, 3)


# ----------------------------------------------------------------------------- plots

def test_plot_writes_png(tmp_path):
    series = [{'label': 'CDNSR eta sweep', 'points': [(40.0, 30.1, 'eta=0.0'), (55.0, 30.3), (70.0, 30.4)]},
              {'label': 'backbone', 'points': [(100.0, 30.5)], 'style': 'point'},
              {'label': 'no GT', 'points': [(50.0, None)]}]
    path = plot_psnr_flops(series, tmp_path / 'psnr_flops.png', convention='macs', title='Test2K')
    assert path.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    image = cv2.imread(str(path))
    assert image is not None and image.shape[0] > 300 and image.shape[1] > 400
    assert [p.name for p in tmp_path.iterdir()] == ['psnr_flops.png']
    with pytest.raises(ValueError, match='nothing to plot'):
        plot_psnr_flops(series[2:], tmp_path / 'empty.png')
    assert not (tmp_path / 'empty.png').exists()
