"""The tester's records and their writers: aggregation, comparisons, JSON/CSV, the summary text."""
from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cdnsr_plugin.tester.records import Failure, Flops, ImageRecord, Report, SettingResult, aggregate
from cdnsr_plugin.tester.report import format_summary, write_report

LARGEST = {'paper': 1000.0, 'macs': 400.0}  # cost of the largest branch on one patch


def image_record(dataset: str,
                 image: str,
                 patches: int,
                 counts: list[int],
                 paper_total: float,
                 macs_total: float,
                 psnr: float | None = 30.0,
                 time_s: float = 1.0,
                 memory: float | None = None) -> ImageRecord:
    """An image record as the runner writes it, percent derived from the largest branch; the whole image
    costs 80% of its tiles through the largest branch."""
    flops = {
        key: Flops(total, total / patches, 100 * total / patches / LARGEST[key],
                   100 * total / (0.8 * patches * LARGEST[key]))
        for key, total in (('paper', paper_total), ('macs', macs_total))
    }
    quality = {
        key: None if psnr is None else psnr + offset
        for key, offset in (('psnr', 0.0), ('ssim', -29.2), ('psnr_y', 1.0), ('ssim_y', -29.1))
    }
    return ImageRecord(
        dataset,
        image, [40, 60], [160, 240],
        patches,
        counts,
        None,
        **quality,
        flops=flops,
        time_s=time_s,
        peak_memory_mb=memory)


@pytest.fixture
def images() -> list[ImageRecord]:
    return [
        image_record('Test2K', '0801', 10, [5, 3, 2], 4000.0, 1000.0, psnr=30.0, time_s=1.0, memory=50.0),
        image_record('Test4K', '1201', 4, [0, 0, 4], 4000.0, 1600.0, psnr=None, time_s=0.5),
        image_record('Test2K', '0802', 30, [10, 10, 10], 18000.0, 6000.0, psnr=32.0, time_s=2.0, memory=70.0)
    ]


def make_report(images: list[ImageRecord]) -> Report:
    backbone = [
        dataclasses.replace(
            r, counts=[0, 0, r.patches], time_s=2 * r.time_s, psnr=None if r.psnr is None else r.psnr + 0.1)
        for r in images
    ]
    settings = [
        SettingResult('argmax', 'routed', images),
        SettingResult('backbone full image', 'backbone-full', backbone)
    ]
    return Report('2025-01-01T00:00:00', 'tools/test_patches.py x', 'cpu', torch.__version__, 2,
                  {'router': 'classifier', 'patch': 32}, settings,
                  [Failure('lq/broken.png', 'unreadable or corrupt image file'),
                   Failure('lq/tiny.png', '0x0 image')])


# ----------------------------------------------------------------------------- aggregate


def test_aggregate_weights_per_patch_by_patches(images):
    sets = aggregate(images)
    assert [s.dataset for s in sets] == ['Test2K', 'Test4K']  # first-seen order
    test2k = sets[0]
    assert test2k.images == 2 and test2k.patches == 40 and test2k.counts == [15, 13, 12]
    paper = test2k.flops['paper']
    assert paper.total == 22000.0
    assert paper.per_patch == pytest.approx(550.0)  # 22000 / 40, not the mean of 400 and 600 (= 500)
    assert paper.percent_of_largest == pytest.approx(55.0)
    assert test2k.flops['macs'].per_patch == pytest.approx(175.0)
    assert test2k.flops['macs'].percent_of_largest == pytest.approx(43.75)
    assert test2k.psnr == pytest.approx(31.0) and test2k.psnr_y == pytest.approx(32.0)
    assert test2k.ssim == pytest.approx(1.8)
    assert test2k.time_s == pytest.approx(3.0) and test2k.peak_memory_mb == 70.0


def test_aggregate_means_over_scored_images_and_keeps_nulls(images):
    test4k = aggregate(images)[1]
    assert test4k.psnr is None and test4k.ssim_y is None and test4k.peak_memory_mb is None
    assert test4k.scored_images == 0
    mixed = aggregate([images[0], dataclasses.replace(images[2], psnr=None)])[0]  # e.g. one image too small
    assert mixed.psnr == pytest.approx(30.0) and mixed.scored_images == 1


def test_aggregate_rejects_mismatched_counts(images):
    with pytest.raises(ValueError, match='counts'):
        aggregate([images[0], dataclasses.replace(images[2], counts=[1, 29])])


def test_compare_ratios_and_differences(images):
    report = make_report(images)
    first = report.comparison[0]
    assert first.dataset == 'Test2K' and first.baseline == 'backbone full image'
    assert first.time_ratio == pytest.approx(0.5)
    assert first.flops_ratio == {'paper': pytest.approx(1.0), 'macs': pytest.approx(1.0)}
    assert first.psnr_diff == pytest.approx(-0.1)
    assert report.comparison[1].psnr_diff is None


# ----------------------------------------------------------------------------- files


def read_csv(path: Path) -> list[dict]:
    with open(path, newline='') as handle:
        return list(csv.DictReader(handle))


def test_write_report_json_round_trips_and_csv_rows(tmp_path, images):
    report = make_report(images)
    json_path, csv_path = write_report(tmp_path / 'out', report)
    assert json.loads(json_path.read_text()) == report.to_dict()
    rows = read_csv(csv_path)
    assert len(rows) == 2 * (3 + 2)  # per setting: one row per image and one per set
    argmax = [row for row in rows if row['setting'] == 'argmax']
    assert [(row['dataset'], row['image']) for row in argmax] == [('Test2K', '0801'), ('Test2K', '0802'),
                                                                  ('Test2K', 'ALL'), ('Test4K', '1201'),
                                                                  ('Test4K', 'ALL')]
    first, total = argmax[0], argmax[2]
    assert first['kind'] == 'routed' and (first['lr_h'], first['lr_w']) == ('40', '60')
    assert first['counts'] == '5/3/2' and float(first['paper_per_patch']) == 400.0
    assert float(first['macs_pct']) == pytest.approx(25.0) and float(first['peak_memory_mb']) == 50.0
    assert total['counts'] == '15/13/12' and float(total['paper_pct']) == pytest.approx(55.0)
    assert total['lr_h'] == '' and float(total['time_s']) == pytest.approx(3.0)
    assert argmax[3]['psnr'] == '' and argmax[3]['peak_memory_mb'] == ''
    data = json.loads(json_path.read_text())  # the report.json layout
    assert list(data) == [
        'created', 'command', 'device', 'torch', 'threads', 'network', 'settings', 'comparison',
        'against_fastest_backbone', 'failures', 'notes'
    ]
    assert list(data['settings'][0]['images'][0]) == [
        'dataset', 'image', 'lr_size', 'sr_size', 'patches', 'counts', 'eta', 'psnr', 'ssim', 'psnr_y', 'ssim_y',
        'flops', 'time_s', 'peak_memory_mb', 'sr_path', 'overlay_path', 'pixel_ratio'
    ]
    assert data['settings'][0]['sets'][0]['flops']['paper'] == {
        'total': 22000.0, 'per_patch': 550.0, 'percent_of_largest': 55.0, 'percent_of_full_image': 55.0 / 0.8
    }
    assert float(total['paper_pct_full']) == pytest.approx(55.0 / 0.8)  # sum of totals / sum of whole-image costs


def test_write_report_replaces_existing_fully(tmp_path, images):
    write_report(tmp_path, make_report(images))
    smaller = make_report(images[:1])
    smaller.failures = []
    json_path, csv_path = write_report(tmp_path, smaller)
    assert json.loads(json_path.read_text()) == smaller.to_dict()
    assert len(read_csv(csv_path)) == 2 * 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ['report.csv', 'report.json']  # no temp files left


def test_write_report_writes_strict_json(tmp_path, images):
    report = make_report(images)
    report.settings[0].images[0].psnr = float('inf')  # an exact copy of the ground truth
    report.threads = np.int64(2)
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
           'PSNR Y +0.00 dB, RGB -0.10 dB' in text
    assert 'Test4K: argmax vs backbone full image' in text and 'PSNR n/a' in text
    assert '38/32/30' in text and '55.0' in text and '32.00 31.00 ' in text  # shares, paper %, PSNR Y and RGB
    assert 'paper = 2 x weight MACs' in text and 'ptflops' in text
    assert 'the faster backbone' not in text  # only with both the whole image and the tiles
    assert len(text.splitlines()) < 25
    # with the tiled backbone (here 1.5x the routed time, faster than the whole image's 2x) the speed claim is
    # against the faster of the two, per routed setting and dataset
    tiled = [dataclasses.replace(r, time_s=0.75 * r.time_s) for r in report.settings[1].images]
    report.settings.append(SettingResult('backbone tiled', 'backbone-tiled', tiled))
    text = format_summary(report)
    assert 'Test2K: argmax takes x0.67 the time of the faster backbone (backbone tiled)' in text
    assert [(c.dataset, c.baseline) for c in report.against_fastest_backbone] == [('Test2K', 'backbone tiled'),
                                                                                  ('Test4K', 'backbone tiled')]
