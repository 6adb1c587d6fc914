"""tools/analyze_routing.py's measurements: merged images as the engine makes them, the oracle's optimality,
the branch x class table, the reports."""
import json

import numpy as np
import pytest
import torch
from basicsr.metrics import calculate_psnr
from basicsr.utils import tensor2img

from cdnsr_plugin.analysis.report import to_markdown, write
from cdnsr_plugin.analysis.routing import (ROUTERS, analyze, branch_class_table, collect, psnr_of, router_scores,
                                           tile_boxes, tile_errors)
from cdnsr_plugin.inference.costs import cost_table, full_image_coefficients
from cdnsr_plugin.inference.engine import EngineOptions, RoutedEngine
from cdnsr_plugin.inference.policies import solve_budget
from cdnsr_plugin.utils.image import bicubic_resize, to_tensor

from helpers import make_net


@pytest.fixture(scope='module')
def engine():
    return RoutedEngine(make_net(), EngineOptions(max_batch=8, tiling='paper'))


def collect_crops(engine, photos, sizes=((400, 480), (256, 320))):
    collected = []
    for index, (h, w) in enumerate(sizes):
        gt = np.ascontiguousarray(photos[index][:h, :w])
        lr = to_tensor(bicubic_resize(gt, 0.25))
        coefficients = full_image_coefficients(engine.net.branches[-1])
        collected.append(collect(engine, f'crop{index}', lr, gt, full_coefficients=coefficients))
    return collected


@pytest.fixture(scope='module')
def images(engine, photos):
    """Two real crops (HR 400x480 and 256x320: 20 and 9 tiles) with their x4 bicubic LR, every branch run on
    every tile (the papers' tiling)."""
    return collect_crops(engine, photos)


@pytest.fixture(scope='module')
def regions(photos):
    """The same under the default tiling (regions) with the exact halo; the second crop's last cell column
    is 16 LR pixels wide."""
    engine = RoutedEngine(make_net(), EngineOptions(max_batch=8, halo='exact', max_region=2))
    return engine, collect_crops(engine, photos)


def test_regions_routing_scores_the_image_the_engine_renders_and_costs_what_it_ran(regions):
    engine, images = regions
    rng = np.random.default_rng(1)
    for image in images:
        labels = rng.integers(0, 3, len(image.grid))
        sr = engine.render(image.lr, torch.from_numpy(labels), image.grid)
        rendered = tensor2img(sr, rgb2bgr=True, min_max=(0, 1))
        # the engine's regions with the exact halo equal each branch on the whole image to float rounding
        assert psnr_of(image, labels, 4) == pytest.approx(
            calculate_psnr(rendered, image.gt, 4, test_y_channel=True), abs=2e-3)
        plan = engine.last_plan
        ran, macs = image.execution.run(labels)
        assert (ran >= labels).all() and (ran > labels).sum() == plan.promoted
        coefficients = [full_image_coefficients(b) for b in engine.net.branches]
        expected = sum(c['macs'][0] * n + c['macs'][1] * k
                       for c, n, k in zip(coefficients, plan.processed(3), plan.passes(3)))
        assert macs == pytest.approx(expected, rel=1e-6)
    assert images[1].pixels.tolist().count(128 * 64) == 2  # narrow cells are scored on their own pixels


def test_regions_analysis_reports_executed_costs_beside_the_papers_tiles(tmp_path, regions):
    engine, images = regions
    analysis = analyze(images, cost_table(engine.net), 4, budgets=(0.5, ))
    assert analysis.tiling == 'regions'
    for point in analysis.points:
        assert point.percent_of_full_image is not None and point.percent_of_full_image > 0
    oracle = next(p for p in analysis.points if p.router == 'oracle')
    learned = next(p for p in analysis.points if p.router == 'learned' and p.budget == 0.5)
    assert learned.percent_of_full_image > oracle.percent_of_full_image  # the classifier's own cost is counted
    assert analysis.backbone_patchwise_percent_of_full > 100  # the papers' tiles overlap
    # RGB beside Y: the merged image's RGB PSNR, and the backbone's on the whole image
    for point in analysis.points:
        assert 0 < point.psnr_rgb < 100 and point.psnr_rgb != point.psnr
    whole = [
        calculate_psnr(tensor2img(engine.backbone_full(image.lr), rgb2bgr=True, min_max=(0, 1)), image.gt, 4)
        for image in images
    ]
    assert analysis.backbone_full_psnr_rgb == pytest.approx(np.mean(whole), abs=1e-9)
    assert analysis.backbone_full_psnr_rgb != analysis.backbone_full_psnr
    text = write(analysis, tmp_path, 'regions')[1].read_text()
    assert 'seam-free regions' in text and "papers' tiles" in text


def test_a_routing_scores_the_image_the_engine_renders(engine, images):
    image = images[0]
    labels = np.arange(len(image.grid)) % 3
    rendered = tensor2img(engine.render(image.lr, torch.from_numpy(labels), image.grid), rgb2bgr=True, min_max=(0, 1))
    assert psnr_of(image, labels, 4) == pytest.approx(
        calculate_psnr(rendered, image.gt, 4, test_y_channel=True), abs=1e-6)


def test_tile_errors_are_the_y_errors_of_each_branch(engine, images):
    image = images[1]
    errors, pixels = tile_errors(image.sr_tiles, image.gt, tile_boxes(image.grid), 4)
    assert errors.shape == (len(image.grid), 3) and (pixels == 128 * 128).all()
    y, x = image.grid.positions()[0].tolist()
    sr = tensor2img(image.sr_tiles[2, 0], rgb2bgr=True, min_max=(0, 1)).astype(np.float64)
    gt = image.gt[y * 4:(y + 32) * 4, x * 4:(x + 32) * 4].astype(np.float64)
    luma = lambda bgr: bgr @ np.array([24.966, 128.553, 65.481]) / 255.0  # noqa: E731 (BasicSR's Y, BGR order)
    assert errors[0, 2] == pytest.approx(((luma(sr) - luma(gt))**2).sum(), rel=1e-4)


def test_the_oracle_is_optimal_among_routings_that_cost_no_more(images):
    """Its labels minimise SE + mu C per tile, so no labelling of equal or lower cost has a lower total SE."""
    image = images[0]
    costs = np.array([1.0, 2.0, 4.0])
    labels = solve_budget(torch.from_numpy(router_scores(image, 'oracle')), costs, 4.0, 0.6).labels.numpy()
    total = image.squared_error[np.arange(len(labels)), labels].sum()
    rng = np.random.default_rng(0)
    for _ in range(300):
        other = rng.integers(0, 3, len(labels))
        if costs[other].sum() <= costs[labels].sum():
            assert image.squared_error[np.arange(len(other)), other].sum() >= total - 1e-6


def test_branch_class_table_splits_tiles_by_the_largest_branch(images):
    table, bounds = branch_class_table(images)
    assert len(table) == 3 and all(len(row) == 3 for row in table)
    assert bounds[0][0] >= bounds[1][1] >= bounds[2][0] and bounds[1][0] >= bounds[2][1]  # simple > medium > hard
    assert table[2][0] > table[2][1] > table[2][2]  # the largest branch is best on its simplest class


def test_analyze_compares_every_router_at_every_budget_and_writes_reports(tmp_path, engine, images):
    table = cost_table(engine.net)
    analysis = analyze(images, table, 4, budgets=(0.5, 0.8))
    budgeted = [p for p in analysis.points if p.budget is not None]
    assert sorted({(p.router, p.budget) for p in budgeted}) == sorted((r, b) for r in ROUTERS for b in (0.5, 0.8))
    for point in budgeted:
        assert point.flops_fraction == pytest.approx(point.budget, abs=0.04)  # within half a tile's cost step
        assert sum(point.class_shares) == pytest.approx(1.0)
        if point.router == 'oracle':
            assert point.regret == 0
    assert analysis.backbone_full_flops_fraction < 1  # no tile overlap on the whole image
    paths = write(analysis, tmp_path / 'out', 'test')
    assert [p.name for p in paths] == ['analysis.json', 'analysis.md', 'analysis.png']
    data = json.loads(paths[0].read_text())
    assert data['tiles'] == sum(len(image.grid) for image in images) and len(data['points']) == len(analysis.points)
    assert '| 0.50 |' in paths[1].read_text() and paths[2].read_bytes()[:4] == b'\x89PNG'


def test_set_scope_meets_each_budget_over_the_whole_set(engine, images):
    """scope='set': one eta per router and budget for all images; the set's mean per-tile cost stays within the
    budget, and for the oracle (distinct scores) within one tile's cost step below it."""
    table = cost_table(engine.net)
    analysis = analyze(images, table, 4, budgets=(0.5, 0.8), routers=('oracle', 'learned'), scope='set')
    assert analysis.scope == 'set'
    costs = [branch.value('paper') for branch in table.branches]
    step = (max(costs) - min(costs)) / max(costs) / analysis.tiles
    for point in (p for p in analysis.points if p.budget is not None):
        assert point.flops_fraction <= point.budget + 1e-9
        if point.router == 'oracle':
            assert point.flops_fraction > point.budget - step
    assert 'one eta per router over the whole set' in to_markdown(analysis)
    with pytest.raises(ValueError, match='scope'):
        analyze(images, table, 4, budgets=(0.5, ), routers=('oracle', ), scope='folder')
