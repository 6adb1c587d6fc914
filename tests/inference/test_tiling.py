"""cdnsr_plugin.inference.tiling (the papers' tiling): full coverage, exact round trip, streaming merge."""
import math
import random

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from cdnsr_plugin.inference.tiling import PatchGrid, PatchMerger, extract, super_resolve_patches

SIZES = [(1, 1), (31, 33), (32, 32), (97, 250), (33, 31), (28, 57)]


def int_image(channels: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """Integer-valued float image, so averaging identical overlaps is exact."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (channels, height, width), generator=gen).float()


def nearest_sr(x: torch.Tensor, scale: int) -> torch.Tensor:
    """Identity "SR": nearest-neighbour upsampling of (N, C, H, W) or (C, H, W)."""
    batched = x if x.dim() == 4 else x[None]
    out = F.interpolate(batched, scale_factor=scale, mode='nearest')
    return out if x.dim() == 4 else out[0]


def decompose(img: torch.Tensor, patch: int = 32, stride: int = 28) -> tuple[torch.Tensor, PatchGrid]:
    """Every tile of ``img`` at once: the grid the engine builds, cut with ``extract``."""
    grid = PatchGrid.for_image(img.shape[-2], img.shape[-1], patch, stride)
    return extract(img, grid), grid


def merge(sr_tiles: torch.Tensor, grid: PatchGrid, scale: int) -> torch.Tensor:
    """All SR tiles merged in one ``add``, accumulated in float64 for float64 tiles (else float32)."""
    dtype = torch.float64 if sr_tiles.dtype == torch.float64 else torch.float32
    merger = PatchMerger(grid, scale, channels=sr_tiles.shape[1], dtype=dtype)
    merger.add(None, sr_tiles)
    return merger.result()


def coverage(grid: PatchGrid) -> torch.Tensor:
    """Tiles covering each LR pixel, as the merger divides by it: its weight map at scale 1."""
    return PatchMerger(grid, 1, channels=1).weight()[:grid.height, :grid.width].long()


def rows(grid: PatchGrid) -> list[slice]:
    """The tile indices of each row of tiles, top to bottom (row-major grid order)."""
    return [slice(r * len(grid.xs), (r + 1) * len(grid.xs)) for r in range(len(grid.ys))]


def brute_coverage(grid: PatchGrid) -> torch.Tensor:
    """Reference coverage map painted tile by tile."""
    cover = torch.zeros(grid.padded_height, grid.padded_width, dtype=torch.long)
    for y, x in grid.positions().tolist():
        cover[y:y + grid.patch, x:x + grid.patch] += 1
    return cover[:grid.height, :grid.width]


def assert_round_trip(height, width, scale, patch=32, stride=28, channels=3, seed=0):
    img = int_image(channels, height, width, seed)
    tiles, grid = decompose(img, patch, stride)
    assert tiles.shape == (len(grid), channels, patch, patch)
    out = merge(nearest_sr(tiles, scale), grid, scale)
    assert out.shape == (channels, height * scale, width * scale)
    assert torch.equal(out, nearest_sr(img, scale))


@pytest.mark.parametrize('scale', [2, 3, 4])
@pytest.mark.parametrize('height,width', SIZES)
def test_round_trip_is_exact(height, width, scale):
    assert_round_trip(height, width, scale)


@settings(max_examples=60, derandomize=True, deadline=None)
@given(
    height=st.integers(1, 120),
    width=st.integers(1, 120),
    patch=st.integers(1, 40),
    stride_frac=st.floats(0.0, 1.0),
    scale=st.integers(1, 4),
    channels=st.integers(1, 3),
)
def test_round_trip_random_sweep(height, width, patch, stride_frac, scale, channels):
    stride = max(1, round(stride_frac * patch))
    assert_round_trip(height, width, scale, patch, stride, channels, seed=height * 1000 + width)


@pytest.mark.parametrize('height,width', SIZES + [(100, 100), (57, 29)])
@pytest.mark.parametrize('patch,stride', [(32, 28), (32, 32), (8, 3), (5, 1)])
def test_every_pixel_covered_and_border_touched(height, width, patch, stride):
    grid = PatchGrid.for_image(height, width, patch, stride)
    cover = coverage(grid)
    assert cover.shape == (height, width)
    assert torch.equal(cover, brute_coverage(grid))
    assert cover.min() >= 1
    for starts, padded in ((grid.ys, grid.padded_height), (grid.xs, grid.padded_width)):
        assert starts[0] == 0
        assert starts[-1] + patch == padded  # last tile touches the bottom/right border
        steps = [b - a for a, b in zip(starts, starts[1:])]
        assert all(0 < s <= stride for s in steps)  # increasing, no gaps


def test_merger_weight_is_lr_coverage_upsampled():
    grid = PatchGrid.for_image(45, 70, 16, 12)
    merger = PatchMerger(grid, scale=3, channels=1)
    weight = merger.weight()[:45 * 3, :70 * 3]
    expected = brute_coverage(grid).repeat_interleave(3, 0).repeat_interleave(3, 1).float()
    assert torch.equal(weight, expected)


def test_positions_in_bounds_and_row_major():
    grid = PatchGrid.for_image(97, 250)
    pos = grid.positions()
    assert pos.dtype == torch.long and pos.shape == (len(grid), 2)
    assert (pos >= 0).all()
    assert (pos[:, 0] + grid.patch <= grid.padded_height).all()
    assert (pos[:, 1] + grid.patch <= grid.padded_width).all()
    expected = [(y, x) for y in grid.ys for x in grid.xs]
    assert [tuple(p) for p in pos.tolist()] == expected
    rows_ = rows(grid)
    assert len(rows_) == len(grid.ys)
    for r, sl in enumerate(rows_):
        assert (pos[sl, 0] == grid.ys[r]).all() and len(range(len(grid))[sl]) == len(grid.xs)


@pytest.mark.parametrize('height,width', [(1080, 1920), (2160, 3840), (2240, 2240), (33, 1000)])
def test_tile_count_formula_and_pixel_ratio(height, width):
    grid = PatchGrid.for_image(height, width)
    ny = math.ceil((height - 32) / 28) + 1
    nx = math.ceil((width - 32) / 28) + 1
    assert (len(grid.ys), len(grid.xs), len(grid)) == (ny, nx, ny * nx)
    assert grid.pixel_ratio == pytest.approx(ny * nx * 32 * 32 / (height * width))
    if min(height, width) >= 1000:
        assert grid.pixel_ratio == pytest.approx((32 / 28)**2, rel=0.03)


def test_small_image_is_padded_to_one_tile():
    grid = PatchGrid.for_image(5, 40)
    assert (grid.padded_height, grid.padded_width) == (32, 40)
    assert grid.ys == (0, ) and grid.xs == (0, 8)
    img = int_image(2, 5, 40)
    tiles = extract(img, grid)
    assert torch.equal(tiles[0, :, :5], img[:, :, :32])
    assert torch.equal(tiles[0, :, 5:], img[:, 4:5, :32].expand(2, 27, 32))  # replicate padding


def test_stride_equal_patch_has_no_overlap():
    grid = PatchGrid.for_image(96, 128, patch=32, stride=32)
    assert len(grid) == 3 * 4
    assert torch.equal(coverage(grid), torch.ones(96, 128, dtype=torch.long))
    assert torch.equal(PatchMerger(grid, 2, 1).weight(), torch.ones(192, 256))


def test_overlaps_are_averaged_uniformly():
    grid = PatchGrid.for_image(40, 61, patch=16, stride=10)
    scale = 2
    values = torch.arange(len(grid), dtype=torch.float64)
    sr_tiles = values.view(-1, 1, 1, 1).expand(-1, 1, 32, 32)
    total = torch.zeros(grid.padded_height * scale, grid.padded_width * scale, dtype=torch.float64)
    count = torch.zeros_like(total)
    for v, (y, x) in zip(values, grid.positions().tolist()):
        total[y * scale:(y + 16) * scale, x * scale:(x + 16) * scale] += v
        count[y * scale:(y + 16) * scale, x * scale:(x + 16) * scale] += 1
    expected = (total / count)[:80, :122]
    out = merge(sr_tiles, grid, scale)
    assert out.dtype == torch.float64
    assert torch.allclose(out[0], expected)


def test_streaming_rows_in_shuffled_order_equals_one_shot():
    img = int_image(3, 97, 250, seed=1)
    tiles, grid = decompose(img)
    scale = 3
    one_shot = merge(nearest_sr(tiles, scale), grid, scale)
    merger = PatchMerger(grid, scale)
    shuffled = rows(grid)
    random.Random(0).shuffle(shuffled)
    for sl in shuffled:
        merger.add(sl, nearest_sr(extract(img, grid, sl), scale))
    assert torch.equal(merger.result(), one_shot)


def test_add_with_index_tensor_and_other_dtype():
    img = int_image(3, 50, 70, seed=2)
    tiles, grid = decompose(img, 16, 12)
    sr = nearest_sr(tiles, 2)
    perm = torch.randperm(len(grid), generator=torch.Generator().manual_seed(0))
    merger = PatchMerger(grid, 2, dtype=torch.float64)
    for chunk in perm.split(7):
        merger.add(chunk, sr[chunk].to(torch.int16))  # cast on add
    out = merger.result()
    assert out.dtype == torch.float64
    assert torch.equal(out, nearest_sr(img, 2).double())


def test_result_before_all_tiles_raises():
    img = int_image(3, 64, 64)
    tiles, grid = decompose(img)
    merger = PatchMerger(grid, 2)
    merger.add(slice(0, len(grid) - 2), nearest_sr(tiles[:-2], 2))
    with pytest.raises(RuntimeError, match=r'2 of \d+ tiles are missing'):
        merger.result()


def test_adding_a_tile_twice_raises():
    tiles, grid = decompose(int_image(1, 40, 40))
    merger = PatchMerger(grid, 1, channels=1)
    merger.add([0], tiles[:1])
    with pytest.raises(ValueError, match='twice'):
        merger.add([0], tiles[:1])
    with pytest.raises(ValueError, match='twice'):
        merger.add([1, 1], tiles[[1, 1]])  # duplicate within one chunk


def test_add_rejects_wrong_tile_shape():
    tiles, grid = decompose(int_image(3, 40, 40))
    with pytest.raises(ValueError, match='sr_tiles must have shape'):
        PatchMerger(grid, 2).add(None, tiles)  # LR tiles, not SR


@pytest.mark.parametrize('kwargs,name', [
    (dict(height=10, width=10, patch=32, stride=33), 'stride'),
    (dict(height=10, width=10, patch=32, stride=0), 'stride'),
    (dict(height=10, width=10, patch=0, stride=1), 'patch'),
    (dict(height=0, width=10), 'height'),
    (dict(height=10, width=0), 'width'),
])
def test_bad_grid_arguments_raise(kwargs, name):
    with pytest.raises(ValueError, match=name):
        PatchGrid.for_image(**kwargs)


def test_stride_larger_than_patch_message_explains_gaps():
    with pytest.raises(ValueError, match='gaps'):
        decompose(torch.zeros(3, 64, 64), patch=16, stride=20)


@pytest.mark.parametrize('shape,name', [((3, 0, 5), 'height'), ((3, 5, 0), 'width')])
def test_empty_image_raises(shape, name):
    with pytest.raises(ValueError, match=name):
        decompose(torch.zeros(shape))


def test_bad_shapes_and_merger_arguments_raise():
    with pytest.raises(ValueError, match='img must have shape'):
        decompose(torch.zeros(2, 3, 8, 8))
    grid = PatchGrid.for_image(8, 8)
    with pytest.raises(ValueError, match='scale'):
        PatchMerger(grid, 0)
    with pytest.raises(ValueError, match='dtype'):
        PatchMerger(grid, 2, dtype=torch.float16)
    with pytest.raises(ValueError, match='grid was built for'):
        extract(torch.zeros(3, 9, 8), grid)


def test_extract_matches_decompose_at_indices():
    img = int_image(3, 97, 250, seed=3)
    tiles, grid = decompose(img[None])  # (1, C, H, W) accepted
    idx = torch.tensor([len(grid) - 1, 0, 5, 17])
    assert torch.equal(extract(img, grid, idx), tiles[idx])
    assert torch.equal(extract(img, grid, [3, 4]), tiles[3:5])
    row = rows(grid)[0]
    assert torch.equal(extract(img, grid, row), tiles[row])
    for (y, x), tile in zip(grid.positions()[idx].tolist(), tiles[idx]):
        assert torch.equal(tile, img[:, y:y + 32, x:x + 32])


def test_super_resolve_patches_streams_chunks_in_grid_order():
    img = int_image(3, 97, 250, seed=4)
    seen = []

    def sr_fn(tiles):
        seen.append(len(tiles))
        return nearest_sr(tiles, 2)

    out, grid = super_resolve_patches(img, sr_fn, 2, chunk=50)
    assert seen == [50] * (len(grid) // 50) + ([len(grid) % 50] if len(grid) % 50 else [])
    assert torch.equal(out, nearest_sr(img, 2))
