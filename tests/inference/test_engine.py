"""The one routed executor (validation, tester, benchmark): exact output sizes, batched == one-tile loop,
baselines, the network left untouched, seams of the papers' tiling, full-image cost extrapolation."""
import copy

import pytest
import torch
from basicsr.archs import build_network

from cdnsr_plugin.inference.costs import count_macs, count_paper_flops, full_image_cost
from cdnsr_plugin.inference.engine import EngineOptions, RoutedEngine
from cdnsr_plugin.inference.tiling import PatchGrid, extract, super_resolve_patches
from cdnsr_plugin.utils.timing import measure

from helpers import brightness_router, make_net


@pytest.fixture(scope='module', params=['regions', 'paper'])
def engine(request):
    """The default execution (regions, the backbone's default halo) and the papers' tiling."""
    return RoutedEngine(make_net(), EngineOptions(max_batch=3, chunk=8, tiling=request.param), 'cpu')


@pytest.mark.parametrize('height,width', [(97, 250), (33, 31), (1, 1), (32, 29)])
def test_every_output_is_exactly_scale_times_the_input(engine, height, width):
    lr = torch.rand(3, height, width)
    logits, grid = engine.classify(lr)
    assert logits.shape == (len(grid), 3)
    labels = logits.argmax(1)
    for sr in (engine.render(lr, labels,
                             grid), engine.render_loop(lr, labels,
                                                       grid), engine.backbone_patchwise(lr), engine.backbone_full(lr)):
        assert tuple(sr.shape) == (3, 4 * height, 4 * width)
        assert torch.isfinite(sr).all()


def test_batched_routing_equals_one_tile_at_a_time(engine, lr_image):
    logits, grid = engine.classify(lr_image)
    labels = torch.arange(len(grid)) % 3  # every branch used, interleaved, across chunk boundaries
    batched = engine.render(lr_image, labels, grid)
    loop = engine.render_loop(lr_image, labels, grid)
    assert len(grid) > engine.options.chunk  # several chunks and several max_batch groups per chunk
    assert (batched - loop).abs().max() < 1e-5


def test_channels_last_changes_nothing_but_speed(lr_image):
    labels = None
    results = []
    for channels_last in (True, False):
        eng = RoutedEngine(make_net(), EngineOptions(channels_last=channels_last), 'cpu')
        logits, grid = eng.classify(lr_image)
        labels = logits.argmax(1) if labels is None else labels
        results.append(eng.render(lr_image, labels, grid))
    assert (results[0] - results[1]).abs().max() < 1e-5


def test_backbone_patchwise_is_the_largest_branch_on_every_tile(lr_image):
    engine = RoutedEngine(make_net(), EngineOptions(max_batch=3, chunk=8, tiling='paper'), 'cpu')
    expected, _ = super_resolve_patches(lr_image, engine.net.branches[-1], 4)
    assert (engine.backbone_patchwise(lr_image) - expected).abs().max() < 1e-5


def test_labels_are_checked(engine, lr_image):
    grid = engine.grid(lr_image)
    with pytest.raises(ValueError, match='tiles'):
        engine.render(lr_image, torch.zeros(len(grid) - 1, dtype=torch.long), grid)
    with pytest.raises(ValueError, match=r'\[0, 3\)'):
        engine.render(lr_image, torch.full((len(grid), ), 3), grid)


def test_half_precision_on_cpu_is_refused_with_advice():
    with pytest.raises(ValueError, match='fp32 on CPU'):
        RoutedEngine(make_net(), EngineOptions(precision='fp16'), 'cpu')


def test_engine_leaves_the_network_as_it_was(lr_image):
    """Validation runs the network being trained: its training flags, weights, dtype and memory format stay."""
    net = make_net().train()
    before = {key: value.clone() for key, value in net.state_dict().items()}
    engine = RoutedEngine(net, EngineOptions(channels_last=True))
    assert engine.net is net  # same device and precision: no copy
    result = engine.super_resolve(lr_image)
    assert all(module.training for module in net.modules())
    assert all(torch.equal(before[key], value) for key, value in net.state_dict().items())
    assert all(p.is_contiguous() and p.dtype == torch.float32 for p in net.parameters())
    assert torch.equal(result.labels, result.logits.argmax(1))
    with torch.no_grad():  # and the result is the eval-mode network's
        expected = engine.render(lr_image, result.labels, result.grid)
    assert torch.equal(result.sr, expected)


@pytest.fixture(scope='module')
def identical_branches(lr_image):
    """A container whose three branches are copies of one FSRCNN, and that FSRCNN."""
    net = make_net(branches=[{'type': 'FSRCNN', 'd': 36, 'upscale': 4}] * 3)
    grid = PatchGrid.for_image(*lr_image.shape[-2:])
    brightness_router(net, extract(lr_image, grid))
    for layer in net.branches[2].modules():  # weights in a range where seams are visible
        if isinstance(layer, torch.nn.ConvTranspose2d):
            torch.nn.init.normal_(layer.weight, 0, 0.05)
    for branch in net.branches[:2]:
        branch.load_state_dict(net.branches[2].state_dict())
    return net, copy.deepcopy(net.branches[2])


def test_identical_branches_equal_single_network_patchwise(identical_branches, lr_image):
    net, single = identical_branches
    result = RoutedEngine(net, EngineOptions(max_batch=7, tiling='paper')).super_resolve(lr_image)
    routed, labels, grid = result.sr, result.labels, result.grid
    with torch.no_grad():
        patchwise, _ = super_resolve_patches(lr_image, single, scale=4)
    assert routed.shape == (3, 90 * 4, 120 * 4)
    assert len(labels) == len(grid) and len(labels.unique()) >= 2
    assert (routed - patchwise).abs().max() < 1e-5


# FSRCNN's receptive radius in LR pixels: 2 (5x5 head) + 4 (four 3x3 maps) + 1 (9x9 stride-4 deconv).
SEAM_MARGIN = 7


def interior_mask(grid: PatchGrid, scale: int, margin: int) -> torch.Tensor:
    """HR pixels that every covering tile sees at least ``margin`` LR pixels away from its inner edges."""
    ok = torch.ones(grid.height, grid.width, dtype=torch.bool)
    cover = torch.zeros(grid.height, grid.width, dtype=torch.bool)
    for y in grid.ys:
        for x in grid.xs:
            inside = torch.zeros_like(ok)
            inside[y:y + grid.patch, x:x + grid.patch] = True
            safe = torch.zeros_like(ok)
            top = y if y == 0 else y + margin
            left = x if x == 0 else x + margin
            bottom = y + grid.patch if y + grid.patch >= grid.height else y + grid.patch - margin
            right = x + grid.patch if x + grid.patch >= grid.width else x + grid.patch - margin
            safe[top:bottom, left:right] = True
            ok &= ~inside | safe
            cover |= inside
    assert cover.all()
    return ok.repeat_interleave(scale, 0).repeat_interleave(scale, 1)


def test_patchwise_differs_from_full_image_only_near_seams(identical_branches, lr_image):
    """Measured bound (FSRCNN-36, random weights, 90x120 crop of a real photo, float32 on [0, 1]):
    farther than 7 LR pixels (28 HR pixels) from every inner tile edge, the merged patch-wise output
    equals the full-image output to 2.1e-7 (asserted < 1e-5); at 6 LR pixels it already differs by
    0.033, and inside the band by up to 0.21 (asserted < 0.5). Zero padding at tile edges is the cause;
    the band is the network's receptive radius, so it is arch-dependent."""
    _, single = identical_branches
    with torch.no_grad():
        patchwise, grid = super_resolve_patches(lr_image, single, scale=4)
        full = single(lr_image[None])[0]
    diff = (patchwise - full).abs().amax(0)
    far = interior_mask(grid, 4, SEAM_MARGIN)
    assert far.float().mean() > 0.4  # the bound is tested on a real share of the image
    assert diff[far].max() < 1e-5
    assert 1e-5 < diff[~far].max() < 0.5
    assert diff[~interior_mask(grid, 4, SEAM_MARGIN - 1)].max() > 1e-3  # and the margin is tight


@pytest.mark.parametrize('arch', [
    {'type': 'FSRCNN', 'd': 56, 'upscale': 4},
    {'type': 'MSRResNet', 'num_feat': 16, 'num_block': 2, 'upscale': 4},
    {
        'type': 'RCAN', 'num_in_ch': 3, 'num_out_ch': 3, 'num_feat': 16, 'num_group': 1, 'num_block': 2,
        'squeeze_factor': 4, 'upscale': 4
    },
])
def test_full_image_cost_matches_counting_the_whole_image(arch):
    net = build_network(dict(arch))
    cost = full_image_cost(net, 40, 56)
    assert cost['macs'] == pytest.approx(count_macs(net, (3, 40, 56)), rel=1e-6)
    assert cost['paper'] == pytest.approx(count_paper_flops(net, (3, 40, 56)), rel=1e-6)


def test_measure_times_and_reports_process_memory():
    with measure(torch.device('cpu')) as before:
        pass
    with measure(torch.device('cpu')) as m:
        block = torch.ones(64, 2**20)  # 256 MiB held during the block
        block.sum()
    assert m.seconds > 0
    assert m.memory_kind == 'process_rss' and m.peak_memory_mb - before.peak_memory_mb >= 240
