"""Cut LR images into overlapping tiles and merge super-resolved tiles back (the papers' tiling).

ClassSR / CDNSR super-resolve large images patch by patch: the LR image is cut
into ``patch x patch`` tiles at a ``stride`` (32 / 28 by default), every tile is
super-resolved by the branch network its classifier picks, and the SR tiles are
merged by averaging the overlaps uniformly.

Differences from the ClassSR tester:

* ClassSR only placed tiles at ``0, stride, 2 * stride, ...`` and silently
  dropped the bottom/right remainder, cropping the ground truth to match.  Here,
  when the last regular tile does not reach the border, one more tile aligned to
  the border (start ``size - patch``) is added, so every pixel is covered and the
  output is exactly ``scale`` times the input size.
* An axis shorter than ``patch`` is replicate-padded at the bottom/right to
  ``patch`` (one tile along that axis); the padding is cropped away on merge, so
  any image of at least 1 x 1 pixel works.
* Overlap is not free: with the defaults the tiles hold about
  ``(32 / 28) ** 2 ~= 1.31`` times as many pixels as the image
  (``PatchGrid.pixel_ratio``); cost reports should account for it.

``PatchMerger`` accumulates SR tiles in place, in any order and in chunks, so 8K
outputs never need all SR tiles in memory at once; ``super_resolve_patches``
streams a whole image through a tile function that way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from numbers import Integral

import torch
from torch import Tensor

TileIndex = Tensor | slice | Sequence[int] | None


def _check_positive(name: str, value: int, hint: str) -> None:
    if not isinstance(value, Integral) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}; {hint}")


def _check_grid_args(height: int, width: int, patch: int, stride: int) -> None:
    _check_positive("patch", patch, "pass a positive tile size")
    _check_positive("stride", stride, "pass a step between tiles in 1..patch")
    if stride > patch:
        raise ValueError(f"stride must be <= patch, got stride={stride} > patch={patch}: "
                         "a stride larger than the patch would leave gaps of uncovered "
                         "pixels; use stride <= patch")
    for name, size in (("height", height), ("width", width)):
        _check_positive(name, size, "the image is empty; pass an image of at least 1x1 pixel")


def _axis_positions(size: int, patch: int, stride: int) -> tuple[int, ...]:
    """Tile starts along one axis: regular steps plus one border-aligned tile."""
    if size <= patch:
        return (0, )
    starts = list(range(0, size - patch + 1, stride))
    if starts[-1] + patch < size:
        starts.append(size - patch)
    return tuple(starts)


def _axis_coverage(starts: Sequence[int], patch: int, length: int) -> Tensor:
    """Number of tiles covering each position of one (padded) axis."""
    count = torch.zeros(length + 1, dtype=torch.long)
    begin = torch.tensor(starts, dtype=torch.long)
    count.index_add_(0, begin, torch.ones_like(begin))
    count.index_add_(0, begin + patch, -torch.ones_like(begin))
    return count.cumsum(0)[:length]


@dataclass(frozen=True)
class PatchGrid:
    """Tile layout of one image: top-left corners ``ys x xs``, row-major.

    Build it with :meth:`for_image`; direct construction is for trusted callers.
    """

    height: int
    width: int
    patch: int
    stride: int
    ys: tuple[int, ...]
    xs: tuple[int, ...]

    @classmethod
    def for_image(cls, height: int, width: int, patch: int = 32, stride: int = 28) -> PatchGrid:
        """Lay out tiles covering every pixel of a ``height x width`` image.

        Args:
            height: Image height in pixels (>= 1).
            width: Image width in pixels (>= 1).
            patch: Tile side in pixels (>= 1).
            stride: Step between tile starts, ``1 <= stride <= patch``.

        Returns:
            The grid; the last tile of each axis touches the (padded) border.

        Raises:
            ValueError: If an argument is out of range (the message names it).
        """
        _check_grid_args(height, width, patch, stride)
        return cls(
            height,
            width,
            patch,
            stride,
            _axis_positions(height, patch, stride),
            _axis_positions(width, patch, stride),
        )

    @property
    def padded_height(self) -> int:
        """Height after replicate padding (``max(height, patch)``)."""
        return max(self.height, self.patch)

    @property
    def padded_width(self) -> int:
        """Width after replicate padding (``max(width, patch)``)."""
        return max(self.width, self.patch)

    @property
    def pixel_ratio(self) -> float:
        """Total tile pixels / image pixels: the compute overhead of tiling."""
        return len(self) * self.patch**2 / (self.height * self.width)

    def __len__(self) -> int:
        return len(self.ys) * len(self.xs)

    def positions(self) -> Tensor:
        """Top-left ``(y, x)`` of every tile, row-major, as a LongTensor ``(N, 2)``."""
        ys = torch.tensor(self.ys, dtype=torch.long)
        xs = torch.tensor(self.xs, dtype=torch.long)
        return torch.stack([ys.repeat_interleave(len(xs)), xs.repeat(len(ys))], dim=1)


def _as_chw(img: Tensor) -> Tensor:
    if img.dim() == 4 and img.shape[0] == 1:
        return img[0]
    if img.dim() != 3:
        raise ValueError(f"img must have shape (C, H, W) or (1, C, H, W), got {tuple(img.shape)}")
    return img


def _tile_indices(indices: TileIndex, count: int, device: torch.device) -> Tensor:
    """Normalise ``indices`` (None = all, slice, sequence, tensor) to a 1-D LongTensor."""
    everything = torch.arange(count, device=device)
    if indices is None:
        return everything
    if isinstance(indices, slice):
        return everything[indices]
    idx = torch.as_tensor(indices, dtype=torch.long, device=device).reshape(-1)
    if idx.numel() and (idx.min() < 0 or idx.max() >= count):
        raise IndexError(f"tile indices must lie in [0, {count}), got min {idx.min()}, max {idx.max()}")
    return idx


def extract(img: Tensor, grid: PatchGrid, indices: TileIndex = None) -> Tensor:
    """Cut the tiles ``indices`` (default: all) of ``grid`` out of ``img``.

    Pixels beyond the image (axes shorter than a patch) replicate the last
    row/column. Works for any dtype; no Python loop over tiles.

    Args:
        img: Image ``(C, H, W)`` or ``(1, C, H, W)`` matching the grid size.
        grid: Tile layout built for this image.
        indices: Tile indices (slice, sequence or LongTensor), or None for all.

    Returns:
        Tiles ``(n, C, patch, patch)`` in the order of ``indices``.
    """
    img = _as_chw(img)
    if tuple(img.shape[-2:]) != (grid.height, grid.width):
        raise ValueError(f"img is {tuple(img.shape[-2:])} but the grid was built for "
                         f"{(grid.height, grid.width)}; build the grid with PatchGrid.for_image")
    pos = grid.positions().to(img.device)[_tile_indices(indices, len(grid), img.device)]
    offsets = torch.arange(grid.patch, device=img.device)
    rows = (pos[:, :1] + offsets).clamp_(max=grid.height - 1)  # (n, patch)
    cols = (pos[:, 1:] + offsets).clamp_(max=grid.width - 1)
    tiles = img[:, rows[:, :, None], cols[:, None, :]]  # (C, n, patch, patch)
    return tiles.transpose(0, 1)


class PatchMerger:
    """Streaming merge of SR tiles: ``add`` chunks in any order, then ``result``.

    Overlaps are averaged uniformly (each pixel divided by the number of tiles
    covering it), as in ClassSR / CDNSR.

    Args:
        grid: Layout the LR tiles were cut with.
        scale: Integer SR factor; SR tiles are ``patch * scale`` square.
        channels: Channels of the SR tiles.
        dtype: Accumulation dtype, ``torch.float32`` or ``torch.float64``.
        device: Device of the accumulation buffer (default: CPU).
    """

    def __init__(
        self,
        grid: PatchGrid,
        scale: int,
        channels: int = 3,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        _check_positive("scale", scale, "pass the integer SR factor")
        _check_positive("channels", channels, "pass the SR tiles' channel count")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        self.grid, self.scale, self.channels = grid, scale, channels
        self._sum = torch.zeros(
            channels, grid.padded_height * scale, grid.padded_width * scale, dtype=dtype, device=device)
        self._added = torch.zeros(len(grid), dtype=torch.bool, device=self._sum.device)
        self._pos = grid.positions().to(self._sum.device) * scale

    @property
    def missing(self) -> int:
        """Number of tiles not added yet."""
        return int((~self._added).sum())

    def add(self, indices: TileIndex, sr_tiles: Tensor) -> None:
        """Accumulate SR tiles (cast to the buffer's dtype/device).

        Args:
            indices: Grid indices of the tiles (slice, sequence, LongTensor; None = all).
            sr_tiles: ``(n, channels, patch * scale, patch * scale)``, same order as indices.

        Raises:
            ValueError: On a shape mismatch or a tile added twice.
        """
        idx = _tile_indices(indices, len(self.grid), self._sum.device)
        side = self.grid.patch * self.scale
        expected = (len(idx), self.channels, side, side)
        if tuple(sr_tiles.shape) != expected:
            raise ValueError(f"sr_tiles must have shape {expected}, got {tuple(sr_tiles.shape)}")
        if self._added[idx].any() or idx.unique().numel() != idx.numel():
            raise ValueError("some tiles were added twice; add every tile index exactly once")
        self._added[idx] = True
        self._sum.view(self.channels, -1).index_add_(1, self._flat_index(idx), self._as_columns(sr_tiles))

    def _flat_index(self, idx: Tensor) -> Tensor:
        """Flat buffer offsets of every pixel of the tiles ``idx``, tile-major."""
        offsets = torch.arange(self.grid.patch * self.scale, device=idx.device)
        pos = self._pos[idx]
        rows = pos[:, :1] + offsets  # (n, side)
        cols = pos[:, 1:] + offsets
        return (rows[:, :, None] * self._sum.shape[-1] + cols[:, None, :]).reshape(-1)

    def _as_columns(self, sr_tiles: Tensor) -> Tensor:
        tiles = sr_tiles.to(device=self._sum.device, dtype=self._sum.dtype)
        return tiles.transpose(0, 1).reshape(self.channels, -1)

    def weight(self) -> Tensor:
        """Per-pixel tile count at SR resolution, ``(padded_h * scale, padded_w * scale)``."""
        g, s = self.grid, self.scale
        cy = _axis_coverage(g.ys, g.patch, g.padded_height).repeat_interleave(s)
        cx = _axis_coverage(g.xs, g.patch, g.padded_width).repeat_interleave(s)
        return (cy[:, None] * cx[None, :]).to(self._sum)

    def result(self) -> Tensor:
        """Averaged SR image ``(channels, height * scale, width * scale)``, padding cropped.

        Raises:
            RuntimeError: If some tiles were never added (names how many).
        """
        if self.missing:
            raise RuntimeError(f"{self.missing} of {len(self.grid)} tiles are missing; add every tile before result()")
        out = self._sum / self.weight()
        return out[:, :self.grid.height * self.scale, :self.grid.width * self.scale]


SRFunction = Callable[[Tensor], Tensor]


def super_resolve_patches(lr: Tensor,
                          sr_fn: SRFunction,
                          scale: int,
                          patch: int = 32,
                          stride: int = 28,
                          chunk: int = 1024) -> tuple[Tensor, PatchGrid]:
    """Apply ``sr_fn`` (tiles -> SR tiles) to the overlapping tiles of ``lr``, ``chunk`` tiles at a time in
    grid order, and merge them as they come (memory stays bounded for 8K outputs).

    Args:
        lr: LR image (C, H, W) or (1, C, H, W), any size >= 1x1.
        sr_fn: maps (n, C, patch, patch) to (n, C, patch*scale, patch*scale).
        scale: upscaling factor.
        patch: LR tile side.
        stride: step between tiles (<= patch).
        chunk: tiles per call of ``sr_fn``.

    Returns:
        The SR image (C, H*scale, W*scale) as float32, and the grid.
    """
    image = _as_chw(lr)
    grid = PatchGrid.for_image(image.shape[-2], image.shape[-1], patch, stride)
    merger = PatchMerger(grid, scale, channels=image.shape[0], device=image.device)
    for index in torch.arange(len(grid)).split(chunk):
        merger.add(index, sr_fn(extract(image, grid, index)))
    return merger.result(), grid
