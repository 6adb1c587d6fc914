"""Seam-free routed execution: classify per tile, execute per rectangle with real image context.

The papers' protocol (``cdnsr_plugin.inference.tiling``) zero-pads every 32x32 tile at its own border and
averages the overlaps of tiles at stride 28. Against the network run on the whole image that loses quality
(FSRCNN-56 on the 12 held-out photos: -0.165 dB, worst photo -0.375 dB; tools/measure_halo.py, docs/RESULTS.md)
and processes (32 / 28)^2 = 1.31x the image's pixels. Here:

* **Cells.** The LR image is cut into non-overlapping ``cell x cell`` cells (the last row/column of cells
  is narrower when the size is not a multiple). Each cell is classified from the ``cell x cell`` tile that
  covers it: the cell itself, or for a narrower last cell the border-aligned tile ending at the image
  border, i.e. ``PatchGrid.for_image(h, w, cell, cell)`` -- the unit the classifier is trained on.
* **Regions.** ``plan_regions`` covers the cell map with rectangles of cells, each executed once by one
  branch, at most ``max_cells`` cells per side. Greedy, row-major: from the first unassigned cell, grow
  right while the label matches, then down while the whole row matches. Before that, an optional
  promotion pass gives a cell a LARGER branch when it is isolated (its up/down/left/right neighbours all
  have larger labels) and running it on its own, with its halo, would cost more than running it with
  its smallest-label neighbour's branch without a halo of its own. Never a smaller branch.
* **Halo.** Each region is cut from the LR image with ``halo`` extra pixels on every side and only the
  interior of its output is kept; nothing is averaged. At the image border there is no extra padding:
  the region simply ends there and the network pads as it does on the whole image. (The issue's
  suggestion was replicate padding at the border; without it a halo at least as large as the network's
  receptive-field radius reproduces the whole-image output exactly, which is the property tests check.)
* **Executed cost.** ``Plan.processed`` counts, per branch, the LR pixels its forward passes saw (halos
  included); with a network's cost per pixel (``costs.full_image_coefficients``) that is what ran.

``receptive_radius`` measures how far, in LR pixels, a network's output moves when one input pixel
changes; a halo of that radius makes regions exact (``halo: exact``). That radius is far more than a trained
network needs: its influence decays long before it ends. ``DEFAULT_HALO`` holds, per backbone architecture,
the smallest halo measured to keep the backbone alone within 0.01 dB of the whole image (``default_halo``).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from cdnsr_plugin.inference.tiling import PatchGrid

#: Context per region side (LR pixels) by backbone class: the smallest halo whose backbone-only result
#: (every cell to the largest branch) stays within 0.01 dB (mean over the photos; the worst photo within
#: 0.02 dB) of the same network on the whole image, on the 12 held-out photos of ../shared/data/photos
#: (``tools/measure_halo.py``, docs/RESULTS.md, "Seam-free regions: how much context"). Trained weights:
#: FSRCNN-56 of the CPU reproduction; CARN-64 and MSRResNet-64 trained briefly on the training photos
#: (experiments recorded there). RCAN has no finite radius (its channel attention pools over the whole input,
#: so a region never equals the whole image exactly) and no trained weights here: 16 is a choice, with the
#: bound measured on random weights (``tests/inference/test_regions.py``: a 2-group RCAN differs from the whole
#: image by at most 3.2e-4 on [0, 1] at halo 16, 8.2e-4 at 8, 0.18 at 0). A network not listed gets its
#: measured receptive radius: exact, and costly.
DEFAULT_HALO = {'FSRCNN': 2, 'CARN': 1, 'MSRResNet': 1, 'RCAN': 16}
EXACT = 'exact'


@dataclass(frozen=True)
class Region:
    """One rectangle executed by one branch: it owns LR rows ``y0:y1`` and columns ``x0:x1`` of the output
    and is run on the input box ``iy0:iy1, ix0:ix1`` (the owned box plus the halo, clipped to the image)."""

    branch: int
    y0: int
    y1: int
    x0: int
    x1: int
    iy0: int
    iy1: int
    ix0: int
    ix1: int

    @property
    def input_shape(self) -> tuple[int, int]:
        return self.iy1 - self.iy0, self.ix1 - self.ix0

    @property
    def input_pixels(self) -> int:
        return (self.iy1 - self.iy0) * (self.ix1 - self.ix0)


@dataclass
class Plan:
    """The regions of one image and what they process."""

    height: int
    width: int
    cell: int
    halo: int
    regions: list[Region] = field(default_factory=list)
    promoted: int = 0  # cells run by a larger branch than their label

    def processed(self, num_branches: int) -> np.ndarray:
        """LR pixels each branch processed (halos included), ``(num_branches,)`` int64."""
        counts = np.zeros(num_branches, dtype=np.int64)
        for region in self.regions:
            counts[region.branch] += region.input_pixels
        return counts

    def passes(self, num_branches: int) -> np.ndarray:
        """Regions each branch ran, ``(num_branches,)`` int64."""
        return np.bincount([r.branch for r in self.regions], minlength=num_branches).astype(np.int64)

    def pixel_ratio(self) -> float:
        """Processed pixels of all branches / image pixels (1.0 = no overhead; the papers' tiling: 1.31)."""
        return float(sum(r.input_pixels for r in self.regions)) / (self.height * self.width)

    def region_map(self) -> np.ndarray:
        """Index of the region owning every LR pixel, ``(height, width)`` int32 (for drawing outlines)."""
        owner = np.full((self.height, self.width), -1, dtype=np.int32)
        for index, r in enumerate(self.regions):
            owner[r.y0:r.y1, r.x0:r.x1] = index
        return owner


def cell_grid(height: int, width: int, cell: int = 32) -> PatchGrid:
    """The classification tiles of the region mode: one ``cell x cell`` tile per non-overlapping cell."""
    return PatchGrid.for_image(height, width, cell, cell)


def _cell_edges(size: int, cell: int) -> np.ndarray:
    """Start of every cell along one axis, plus ``size`` at the end."""
    count = -(-size // cell)
    return np.minimum(np.arange(count + 1) * cell, size)


def promote_isolated(labels: np.ndarray, cell_pixels: float, alone_pixels: float,
                     per_pixel: Sequence[float]) -> tuple[np.ndarray, int]:
    """Give each isolated cell (all 4-neighbours larger) its smallest neighbour's label when
    ``per_pixel[neighbour] * cell_pixels < per_pixel[own] * alone_pixels``. Decided on the input labels,
    one pass (no cascades). Returns the new labels and how many cells changed."""
    rows, cols = labels.shape
    padded = np.pad(labels, 1, constant_values=np.iinfo(labels.dtype).max)
    neighbours = np.stack([padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]])
    has_neighbour = (neighbours != np.iinfo(labels.dtype).max).any(0)
    smallest = np.where(neighbours == np.iinfo(labels.dtype).max, np.iinfo(labels.dtype).max, neighbours).min(0)
    costs = np.asarray(per_pixel, dtype=np.float64)
    isolated = has_neighbour & (smallest > labels)
    target = np.where(isolated, smallest, labels).clip(max=len(costs) - 1)
    cheaper = costs[target] * cell_pixels < costs[labels] * alone_pixels
    change = isolated & cheaper
    return np.where(change, target, labels), int(change.sum())


def plan_regions(labels: torch.Tensor | np.ndarray,
                 height: int,
                 width: int,
                 cell: int = 32,
                 halo: int = 8,
                 max_cells: int = 8,
                 per_pixel: Optional[Sequence[float]] = None) -> Plan:
    """Cover the cell map with rectangles (see the module docstring).

    Args:
        labels: class per cell, row-major, ``(rows * cols,)`` or ``(rows, cols)``, as ``cell_grid`` orders them.
        height, width: LR image size.
        cell: cell side.
        halo: LR pixels of context on each side of a region (clipped at the image border).
        max_cells: largest region side, in cells (bounds memory and keeps feature maps in cache).
        per_pixel: each branch's cost per LR pixel; given, isolated cells are promoted where that is cheaper.

    Raises:
        ValueError: a negative halo, ``max_cells < 1`` or a label count that does not match the image.
    """
    if not isinstance(halo, int) or halo < 0:
        raise ValueError(f'halo must be an integer >= 0, got {halo!r}')
    if not isinstance(max_cells, int) or max_cells < 1:
        raise ValueError(f'max_cells must be an integer >= 1, got {max_cells!r}')
    ys, xs = _cell_edges(height, cell), _cell_edges(width, cell)
    rows, cols = len(ys) - 1, len(xs) - 1
    grid = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels, dtype=np.int64)
    if grid.size != rows * cols:
        raise ValueError(f'{grid.size} labels for a {height}x{width} image with {rows}x{cols} cells of {cell}')
    grid = grid.reshape(rows, cols)
    plan = Plan(height, width, cell, halo)
    if per_pixel is not None:
        grid, plan.promoted = promote_isolated(grid, cell * cell, (cell + 2 * halo)**2, per_pixel)
    taken = np.zeros_like(grid, dtype=bool)
    for r in range(rows):
        for c in range(cols):
            if taken[r, c]:
                continue
            label = grid[r, c]
            c1 = c + 1
            while c1 < cols and c1 - c < max_cells and not taken[r, c1] and grid[r, c1] == label:
                c1 += 1
            r1 = r + 1
            while (r1 < rows and r1 - r < max_cells and not taken[r1, c:c1].any() and (grid[r1, c:c1] == label).all()):
                r1 += 1
            taken[r:r1, c:c1] = True
            y0, y1, x0, x1 = int(ys[r]), int(ys[r1]), int(xs[c]), int(xs[c1])
            plan.regions.append(
                Region(
                    int(label), y0, y1, x0, x1, max(0, y0 - halo), min(height, y1 + halo), max(0, x0 - halo),
                    min(width, x1 + halo)))
    return plan


def receptive_radius(net: nn.Module, num_in_ch: int = 3, size: int = 64, seed: int = 0) -> int:
    """How far (in LR pixels) the output of ``net`` moves when one input pixel changes.

    One input pixel in the middle of a random ``size x size`` image is changed; every output pixel that
    moves is mapped to its LR position (``floor(y / scale)``); the radius is the largest distance, per axis,
    from the changed pixel, plus 1 for the rounding of sub-pixel layers. Measured on a float64 copy (so
    rounding noise is not taken for influence; the network itself is not touched). Raises ``ValueError`` when
    the change reaches the image border: the radius is then at least ``size // 2``; pass a larger ``size``.
    """
    parameter = next(net.parameters(), None)
    device = parameter.device if parameter is not None else torch.device('cpu')
    probe = copy.deepcopy(net).double().eval()  # the caller's network is left as it is
    generator = torch.Generator().manual_seed(seed)
    base = torch.rand(1, num_in_ch, size, size, generator=generator, dtype=torch.float64)
    moved = base.clone()
    centre = size // 2
    moved[..., centre, centre] += 0.5
    with torch.no_grad():
        out_a = probe(base.to(device))
        out_b = probe(moved.to(device))
    scale = out_a.shape[-1] // size
    changed = ((out_a - out_b).abs().amax(dim=(0, 1)) > 0).nonzero()
    if not len(changed):
        return 0
    lr_positions = changed // scale
    radius = int((lr_positions - centre).abs().max()) + 1
    if radius >= centre:
        raise ValueError(f'the receptive field reaches the border of the {size}x{size} probe; '
                         f'probe with size >= {4 * radius}, or set the halo yourself (tester --halo, '
                         f'options val.halo)')
    return radius


def parse_halo(text: str) -> int | str:
    """A command line's ``--halo``: a non-negative integer or ``exact``."""
    if text == EXACT:
        return EXACT
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise ValueError(f'--halo must be an integer >= 0 or {EXACT!r}, got {text!r}')
    return value


def default_halo(branches: Sequence[nn.Module], halo: Optional[int | str] = None, size: int = 128) -> int:
    """The halo a routed run uses: ``halo`` when it is a number; ``'exact'``: the largest measured receptive
    radius over ``branches`` (the routed output then equals each branch's on the whole image); ``None``:
    ``DEFAULT_HALO`` of the backbone's (last branch's) class, else the exact radius.

    A network whose output depends on the whole input (global pooling, e.g. RCAN's channel attention) has
    no finite radius: give it a number.
    """
    if isinstance(halo, int) and not isinstance(halo, bool):
        return halo
    if halo is None and type(branches[-1]).__name__ in DEFAULT_HALO:
        return DEFAULT_HALO[type(branches[-1]).__name__]
    if halo not in (None, EXACT):
        raise ValueError(f'halo must be an integer >= 0, {EXACT!r} or empty (the default), got {halo!r}')
    try:
        return max(receptive_radius(branch, size=size) for branch in branches)
    except ValueError as error:
        name = type(branches[-1]).__name__
        raise ValueError(f'{name}: no default halo ({error}). Set one: tester --halo N, option val.halo: N; '
                         f'tools/measure_halo.py finds the smallest that keeps the whole image\'s PSNR') from None
