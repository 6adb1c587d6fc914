"""Seam-free routed execution (tiling ``regions``): exact against the whole image with the measured halo,
plans that partition the image and never run a cell on a smaller branch, promotion only where cheaper,
the receptive radius of networks whose radius is known."""
import numpy as np
import pytest
import torch
from torch import nn

from cdnsr_plugin.archs.cdnsr_arch import CDNSRNet
from cdnsr_plugin.inference.engine import EngineOptions, RoutedEngine
from cdnsr_plugin.inference.regions import (DEFAULT_HALO, cell_grid, default_halo, parse_halo, plan_regions,
                                            promote_isolated, receptive_radius)

BRANCHES = {
    'FSRCNN': {'type': 'FSRCNN', 'd': 16, 's': 12, 'm': 4, 'upscale': 4},
    'CARN': {'type': 'CARN', 'num_feat': 8, 'upscale': 4},
    'MSRResNet': {'type': 'MSRResNet', 'num_feat': 8, 'num_block': 4, 'upscale': 4},
}


def identical_branches(branch: dict) -> CDNSRNet:
    torch.manual_seed(0)
    net = CDNSRNet(branches=[branch] * 3, classifier={'type': 'PatchClassifier', 'num_classes': 3}, scale=4)
    for other in net.branches[1:]:
        other.load_state_dict(net.branches[0].state_dict())
    return net


@pytest.mark.parametrize('name', sorted(BRANCHES))
def test_regions_with_the_measured_halo_equal_the_whole_image(name):
    options = EngineOptions(tiling='regions', halo='exact', max_region=3)
    engine = RoutedEngine(identical_branches(BRANCHES[name]), options, 'cpu')
    generator = torch.Generator().manual_seed(1)
    for height, width in [(1, 1), (31, 33), (97, 250)]:
        lr = torch.rand(3, height, width, generator=generator)
        grid = engine.grid(lr)
        rows, cols = len(grid.ys), len(grid.xs)
        checkerboard = ((torch.arange(rows)[:, None] + torch.arange(cols)[None, :]) % 2 * 2).reshape(-1)
        for labels in (checkerboard, torch.arange(rows * cols) % 3):
            routed = engine.render(lr, labels, grid)
            assert (routed - engine.backbone_full(lr)).abs().max() <= 1e-5, (name, height, width)
            assert torch.allclose(engine.render_loop(lr, labels, grid), routed, atol=1e-6)  # batch size only


@pytest.mark.parametrize('name', sorted(BRANCHES))
def test_each_region_is_its_own_branch_on_the_whole_image(name):
    """Different branches, exact halo: every output pixel is the branch that ran its region, as that branch
    gives it on the whole image; promotion may give a cell a larger branch, never a smaller one."""
    torch.manual_seed(3)
    net = CDNSRNet(branches=[BRANCHES[name]] * 3, classifier={'type': 'PatchClassifier', 'num_classes': 3}, scale=4)
    engine = RoutedEngine(net, EngineOptions(tiling='regions', halo='exact', max_region=2), 'cpu')
    lr = torch.rand(3, 97, 130, generator=torch.Generator().manual_seed(4))
    grid = engine.grid(lr)
    labels = torch.randint(0, 3, (len(grid), ), generator=torch.Generator().manual_seed(5))
    routed = engine.render(lr, labels, grid)
    with torch.no_grad():
        wholes = [branch(lr[None])[0] for branch in net.branches]
    plan = engine.last_plan
    used = set()
    for region in plan.regions:
        box = (slice(None), slice(4 * region.y0, 4 * region.y1), slice(4 * region.x0, 4 * region.x1))
        assert (routed[box] - wholes[region.branch][box]).abs().max() <= 1e-5
        used.add(region.branch)
    assert used == {0, 1, 2}
    branch_of_pixel = np.array([r.branch for r in plan.regions])[plan.region_map()]
    rows, cols = len(grid.ys), len(grid.xs)
    label_of_pixel = labels.reshape(rows, cols).numpy().repeat(32, 0).repeat(32, 1)[:97, :130]
    assert (branch_of_pixel >= label_of_pixel).all()


def test_rcan_pools_globally_so_regions_are_close_not_exact():
    """RCAN's channel attention averages over its whole input: no halo is exact once a region is smaller than
    the image; the difference shrinks with the halo. Measured (2-group RCAN, random weights, seed 0, 97x130,
    regions of at most 2x2 cells): max abs difference 0.18 at halo 0, 8.2e-4 at 8, 3.2e-4 at 16 (the default)."""
    rcan = {
        'type': 'RCAN', 'num_in_ch': 3, 'num_out_ch': 3, 'num_feat': 16, 'num_group': 2, 'num_block': 2,
        'squeeze_factor': 4, 'upscale': 4
    }
    net = identical_branches(rcan)
    with pytest.raises(ValueError, match='halo'):
        receptive_radius(net.branches[-1])  # no finite radius
    lr = torch.rand(3, 97, 130, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(len(cell_grid(97, 130))) % 3
    errors = {}
    for halo in (0, 8, None):
        engine = RoutedEngine(net, EngineOptions(halo=halo, max_region=2), 'cpu')
        errors[halo] = float((engine.render(lr, labels) - engine.backbone_full(lr)).abs().max())
    assert engine.halo == DEFAULT_HALO['RCAN']
    assert 1e-5 < errors[None] < 1e-3 and errors[None] < errors[8] < errors[0]


def test_default_halo_follows_the_backbone_and_exact_is_the_measured_radius():
    fsrcnn = CDNSRNet(branches=[BRANCHES['FSRCNN']] * 3, classifier={'type': 'PatchClassifier'}, scale=4)
    assert default_halo(fsrcnn.branches) == DEFAULT_HALO['FSRCNN']
    exact = default_halo(fsrcnn.branches, 'exact')
    assert exact == receptive_radius(fsrcnn.branches[-1], size=128) > DEFAULT_HALO['FSRCNN']
    assert default_halo(fsrcnn.branches, 3) == 3
    plain = nn.Sequential(nn.Conv2d(3, 48, 5, padding=2), nn.PixelShuffle(4))  # not in the table: exact
    assert default_halo([plain]) == 3
    with pytest.raises(ValueError, match='halo'):
        default_halo(fsrcnn.branches, 'wide')
    assert parse_halo('exact') == 'exact' and parse_halo('4') == 4
    for bad in ('-1', 'two', ''):
        with pytest.raises(ValueError, match='--halo'):
            parse_halo(bad)


def test_a_small_halo_is_not_exact_and_the_measured_one_is():
    net = identical_branches(BRANCHES['MSRResNet'])
    lr = torch.rand(3, 97, 120, generator=torch.Generator().manual_seed(2))
    labels = torch.arange(len(cell_grid(97, 120))) % 3
    errors = {}
    for halo in (0, 'exact'):
        engine = RoutedEngine(net, EngineOptions(tiling='regions', halo=halo, max_region=1), 'cpu')
        errors[halo] = float((engine.render(lr, labels) - engine.backbone_full(lr)).abs().max())
    assert errors[0] > 1e-3 and errors['exact'] <= 1e-5


def test_plan_partitions_the_image_and_never_runs_a_cell_on_a_smaller_branch():
    rng = np.random.default_rng(0)
    height, width, cell = 300, 370, 32
    labels = rng.integers(0, 3, size=len(cell_grid(height, width, cell)))
    plan = plan_regions(labels, height, width, cell, halo=4, max_cells=3, per_pixel=[1.0, 1.05, 1.1])
    owner = plan.region_map()
    assert (owner >= 0).all()
    assert sum((r.y1 - r.y0) * (r.x1 - r.x0) for r in plan.regions) == height * width  # no pixel twice
    grid = labels.reshape(-(-height // cell), -(-width // cell))
    for r in plan.regions:
        cells = grid[r.y0 // cell:-(-r.y1 // cell), r.x0 // cell:-(-r.x1 // cell)]
        assert (cells <= r.branch).all()
        assert -(-(r.y1 - r.y0) // cell) <= 3 and -(-(r.x1 - r.x0) // cell) <= 3
        assert r.iy0 == max(0, r.y0 - 4) and r.ix1 == min(width, r.x1 + 4)
    assert plan.promoted > 0  # with nearly equal costs, isolated cheap cells join their neighbours
    assert sum(plan.processed(3)) == sum(r.input_pixels for r in plan.regions)


def test_one_label_without_halo_processes_each_pixel_once():
    plan = plan_regions(np.ones(4 * 5, dtype=np.int64), 100, 150, 32, halo=0, max_cells=8)
    assert plan.pixel_ratio() == 1.0 and len(plan.regions) == 1


def test_promotion_happens_only_where_it_is_cheaper():
    labels = np.full((3, 3), 2)
    labels[1, 1] = 0
    alone, cell = (32 + 16)**2, 32 * 32
    kept, changed = promote_isolated(labels, cell, alone, [1.0, 2.0, 3.0])  # 1 * 2304 < 3 * 1024
    assert changed == 0 and kept[1, 1] == 0
    promoted, changed = promote_isolated(labels, cell, alone, [2.5, 2.6, 3.0])  # 2.5 * 2304 > 3 * 1024
    assert changed == 1 and promoted[1, 1] == 2 and (promoted == 2).all()
    labels[0, 1] = 1  # no longer isolated by larger labels only? still: neighbours 1, 2, 2, 2 -> smallest 1
    promoted, _ = promote_isolated(labels, cell, alone, [2.5, 2.6, 3.0])
    assert promoted[1, 1] == 1  # the smallest larger neighbour's branch, never a smaller one


@pytest.mark.parametrize('kernel,expected', [(3, 2), (5, 3), (9, 5)])
def test_receptive_radius_of_a_known_network(kernel, expected):
    # one k x k convolution then a x2 pixel shuffle: an input pixel moves LR positions within k // 2 (+1 rounding)
    net = nn.Sequential(nn.Conv2d(3, 12, kernel, padding=kernel // 2), nn.PixelShuffle(2))
    assert receptive_radius(net) == expected
    assert net[0].weight.dtype == torch.float32  # the network itself is untouched


def test_receptive_radius_refuses_a_global_network():

    class Pooled(nn.Module):

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 12, 3, padding=1)

        def forward(self, x):
            y = self.conv(x)
            return nn.functional.pixel_shuffle(y * y.mean(dim=(2, 3), keepdim=True), 2)

    with pytest.raises(ValueError, match='set the halo yourself'):
        receptive_radius(Pooled())


def test_region_options_are_checked():
    with pytest.raises(ValueError, match='tiling'):
        EngineOptions(tiling='tiles').validate(torch.device('cpu'))
    with pytest.raises(ValueError, match='halo'):
        EngineOptions(halo=-1).validate(torch.device('cpu'))
    with pytest.raises(ValueError, match='max_region'):
        EngineOptions(max_region=0).validate(torch.device('cpu'))
