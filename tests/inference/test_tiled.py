"""The backbone in non-overlapping tiles with exact context: the same image as the whole-image pass."""
import pytest
import torch
from basicsr.archs.rrdbnet_arch import RRDBNet  # noqa: F401  (registers BasicSR's archs)

from cdnsr_plugin.archs.cdnsr_arch import CDNSRNet
from cdnsr_plugin.inference.engine import EngineOptions, RoutedEngine
from cdnsr_plugin.inference.tiled import choose_tile, tile_boxes, tiled_forward, tiled_input_sizes

BRANCHES = {
    'FSRCNN': [{'type': 'FSRCNN', 'd': 16, 'upscale': 4}, {'type': 'FSRCNN', 'd': 24, 'upscale': 4}],
    'CARN': [{'type': 'CARN', 'num_feat': 16, 'groups': 4, 'upscale': 4},
             {'type': 'CARN', 'num_feat': 24, 'groups': 4, 'upscale': 4}],
    'MSRResNet': [{'type': 'MSRResNet', 'num_feat': 16, 'num_block': 2, 'upscale': 4},
                  {'type': 'MSRResNet', 'num_feat': 24, 'num_block': 3, 'upscale': 4}],
}


def routed(kind: str) -> CDNSRNet:
    torch.manual_seed(0)
    return CDNSRNet(classifier={'type': 'PatchClassifier', 'num_classes': 2}, branches=BRANCHES[kind]).eval()


@pytest.mark.parametrize('kind', sorted(BRANCHES))
@pytest.mark.parametrize('tile', [17, 64])
def test_tiles_with_exact_context_give_the_whole_image(kind, tile, photos):
    """Odd image sizes, tiles that do not divide them and a tile larger than one side: within 1e-5 of the
    whole image everywhere (the context is the measured receptive radius)."""
    net = routed(kind)
    photo = photos[1][:53, :91, ::-1].copy()
    lr = torch.from_numpy(photo).permute(2, 0, 1).float() / 255
    engine = RoutedEngine(net, EngineOptions(tile=tile))
    assert engine.tile_choice.exact and engine.tile_choice.tile == tile
    whole, tiled = engine.backbone_full(lr), engine.backbone_tiled(lr)
    assert tiled.shape == whole.shape == (3, 4 * 53, 4 * 91)
    assert (tiled - whole).abs().max() < 1e-5


def test_too_little_context_shows_seams():
    """The test above could not pass by accident: with no context the tiles differ from the whole image."""
    net = routed('CARN')
    lr = torch.rand(3, 40, 40, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        whole = net.branches[-1](lr[None])
        seamed = tiled_forward(net.branches[-1], lr[None], 20, 0, 4)
    assert (seamed - whole).abs().max() > 1e-3


def test_tile_boxes_cover_every_pixel_once_and_sizes_include_the_clipped_context():
    boxes = tile_boxes(53, 91, 20)
    covered = torch.zeros(53, 91, dtype=torch.int64)
    for y0, y1, x0, x1 in boxes:
        covered[y0:y1, x0:x1] += 1
    assert bool((covered == 1).all())
    sizes = tiled_input_sizes(53, 91, 20, 5)
    assert sizes[0] == (25, 25)  # top-left: context only inward
    assert sizes[len(boxes) // 2 - 1][0] <= 30 and max(h for h, _ in sizes) == 30  # inner rows: 5 + 20 + 5
    with pytest.raises(ValueError, match='tile'):
        tile_boxes(10, 10, 0)


def test_the_rule_picks_a_measured_candidate():
    net = routed('FSRCNN')
    choice = choose_tile(net.branches[-1], 4, True, torch.device('cpu'), candidates=(16, 32))
    assert set(choice.seconds_per_megapixel) == {16, 32}
    assert choice.tile == min(choice.seconds_per_megapixel, key=choice.seconds_per_megapixel.get)
    with pytest.raises(ValueError, match='candidates'):
        choose_tile(net.branches[-1], 4, True, torch.device('cpu'), candidates=(0, ))
