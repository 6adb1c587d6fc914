"""Pictures: class maps over SR images, PSNR-FLOPs plots, montages."""
import cv2
import numpy as np
import pytest
import torch

from cdnsr_plugin.inference.tiling import PatchGrid
from cdnsr_plugin.utils.io import write_image
from cdnsr_plugin.utils.viz import (caption_tile, class_colors, draw_class_map, draw_region_map, montage, pixel_classes,
                                    plot_psnr_flops)

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
    distance = (yy[..., None] + 0.5 - centres[:, 0])**2 + (xx[..., None] + 0.5 - centres[:, 1])**2
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
    path = write_image(tmp_path / 'overlay.png', out)
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
              {'label': 'backbone', 'points': [(100.0, 30.5)],
               'style': 'point'}, {'label': 'no GT', 'points': [(50.0, None)]}]
    path = plot_psnr_flops(series, tmp_path / 'psnr_flops.png', convention='macs', title='Test2K')
    assert path.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    image = cv2.imread(str(path))
    assert image is not None and image.shape[0] > 300 and image.shape[1] > 400
    assert [p.name for p in tmp_path.iterdir()] == ['psnr_flops.png']
    with pytest.raises(ValueError, match='nothing to plot'):
        plot_psnr_flops(series[2:], tmp_path / 'empty.png')
    assert not (tmp_path / 'empty.png').exists()


def test_montage_lays_out_rows_headers_and_padding():
    tile = caption_tile(np.full((32, 32, 3), 200, np.uint8), '31.0 dB')
    assert tile.shape == (128, 128, 3) and (tile[-1] == 0).any() and (tile[:100] == 200).all()
    picture = montage([[tile, tile], [tile]], [('class 0', 'simple'), ('class 1', 'hard')], 'title', per_row=3)
    assert picture.shape == (34 + 2 * 128, 150 + 3 * 128, 3)
    assert (picture[34 + 128:, 150 + 128:] == 0).all()  # the second row is padded with black
    assert (picture[34:34 + 128, 150:150 + 128] == tile).all()


def test_region_map_tints_by_executed_branch_and_outlines_regions():
    from cdnsr_plugin.inference.regions import plan_regions
    labels = np.array([0, 0, 2, 1, 1, 2])  # 2 x 3 cells of 8 LR pixels, last column 4 wide
    plan = plan_regions(labels, 16, 20, 8, halo=1, max_cells=2, per_pixel=[1.0, 2.0, 3.0])
    owner = plan.region_map()
    sr = np.full((64, 80, 3), 200, dtype=np.uint8)
    out = draw_region_map(sr, owner, [r.branch for r in plan.regions], 4, 3, alpha=1.0)
    palette = class_colors(3)
    for region in plan.regions:  # inside a region (away from its top/left border): the branch's colour
        y, x = 4 * region.y1 - 1, 4 * region.x1 - 1
        assert tuple(out[y, x]) == tuple(palette[region.branch])
    edges = np.zeros(owner.repeat(4, 0).repeat(4, 1).shape, dtype=bool)
    big = owner.repeat(4, 0).repeat(4, 1)
    edges[1:] |= big[1:] != big[:-1]
    edges[:, 1:] |= big[:, 1:] != big[:, :-1]
    assert edges.any() and (out[edges] < out[~edges].max()).all()  # outlines are darkened
    with pytest.raises(ValueError, match='uint8'):
        draw_region_map(sr[:-4], owner, [r.branch for r in plan.regions], 4, 3)
