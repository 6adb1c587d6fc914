"""The routed engine of tools/test_patches.py: exact output sizes, batched == one-tile loop, baselines,
full-image cost extrapolation."""
import pytest
import torch
from basicsr.archs import build_network

from cdnsr_plugin.routing.flops import count_macs, count_paper_flops, full_image_cost
from cdnsr_plugin.routing.inference import super_resolve_patches
from cdnsr_plugin.tester.engine import EngineOptions, RoutedEngine, measure


def make_net(branches=None):
    torch.manual_seed(0)
    branches = branches or [{'type': 'FSRCNN', 'd': d, 'upscale': 4} for d in (16, 36, 56)]
    return build_network({'type': 'CDNSRNet', 'classifier': {'type': 'PatchClassifier', 'num_classes': len(branches)},
                          'branches': branches})


@pytest.fixture(scope='module')
def engine():
    return RoutedEngine(make_net(), EngineOptions(max_batch=3, chunk=8), 'cpu')


@pytest.mark.parametrize('height,width', [(97, 250), (33, 31), (1, 1), (32, 29)])
def test_every_output_is_exactly_scale_times_the_input(engine, height, width):
    lr = torch.rand(3, height, width)
    logits, grid = engine.classify(lr)
    assert logits.shape == (len(grid), 3)
    labels = logits.argmax(1)
    for sr in (engine.render(lr, labels, grid), engine.render_loop(lr, labels, grid),
               engine.backbone_patchwise(lr), engine.backbone_full(lr)):
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


def test_backbone_patchwise_is_the_largest_branch_on_every_tile(engine, lr_image):
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


@pytest.mark.parametrize('arch', [
    {'type': 'FSRCNN', 'd': 56, 'upscale': 4},
    {'type': 'MSRResNet', 'num_feat': 16, 'num_block': 2, 'upscale': 4},
    {'type': 'RCAN', 'num_in_ch': 3, 'num_out_ch': 3, 'num_feat': 16, 'num_group': 1, 'num_block': 2, 'squeeze_factor': 4, 'upscale': 4},
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
