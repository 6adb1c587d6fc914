"""The backbone in non-overlapping tiles with exact context: the fastest correct way to run one network.

Each ``tile x tile`` LR tile runs with ``halo`` LR pixels of real context on every side (clipped at the image
border, where the whole-image forward pass sees the same border), and only the tile's own ``tile * scale``
square of the output is kept. With ``halo`` at least the network's receptive radius
(``regions.receptive_radius``) the result is the whole-image output up to float rounding: no seams, no
averaging. This is the speed baseline of issue 24: on a CPU a whole-image forward pass is slow per FLOP
(its feature maps leave the caches), and a user who knows ``--tile`` runs the backbone this way.

Tiles of one shape (all inner tiles) run in batches of ``batch``; border tiles of other shapes run apart.

Tile size (``choose_tile``): a measured rule. Each candidate side is timed once on a random input after a
warm-up pass, and the side with the least time per LR pixel it delivers (the halo's extra work included) is
chosen; the timings are returned so reports can show them. Candidates default per device type
(``TILE_CANDIDATES``).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn

TILE_CANDIDATES = {'cpu': (64, 96, 128, 192), 'cuda': (128, 256, 512)}


@dataclass(frozen=True)
class TileChoice:
    """The tile side chosen for a network on a device, and what each candidate measured."""

    tile: int
    halo: int
    exact: bool  # halo >= the network's receptive radius: the output equals the whole image's
    seconds_per_megapixel: dict[int, float]  # candidate side -> seconds per LR megapixel delivered


def tile_boxes(height: int, width: int, tile: int) -> list[tuple[int, int, int, int]]:
    """LR boxes ``(y0, y1, x0, x1)`` of the non-overlapping tiles covering an image, row by row."""
    if tile < 1:
        raise ValueError(f'tile must be a positive integer, got {tile}')
    return [(y, min(y + tile, height), x, min(x + tile, width)) for y in range(0, height, tile)
            for x in range(0, width, tile)]


def tiled_forward(net: nn.Module,
                  image: torch.Tensor,
                  tile: int,
                  halo: int,
                  scale: int,
                  batch: int = 4) -> torch.Tensor:
    """``net`` on ``image`` (1, C, H, W) in non-overlapping ``tile`` tiles with ``halo`` pixels of context;
    returns (1, C, H * scale, W * scale) in the network's dtype. The caller sets eval and inference mode."""
    if halo < 0:
        raise ValueError(f'halo must be >= 0, got {halo}')
    _, _, height, width = image.shape
    out = None
    groups: dict[tuple[int, ...], list[tuple]] = {}
    for y0, y1, x0, x1 in tile_boxes(height, width, tile):
        top, bottom = max(0, y0 - halo), min(height, y1 + halo)
        left, right = max(0, x0 - halo), min(width, x1 + halo)
        key = (bottom - top, right - left, y0 - top, x0 - left, y1 - y0, x1 - x0)
        groups.setdefault(key, []).append((y0, x0, top, left))
    for (h, w, dy, dx, th, tw), members in groups.items():
        for start in range(0, len(members), batch):
            part = members[start:start + batch]
            crops = torch.cat([image[:, :, top:top + h, left:left + w] for _, _, top, left in part])
            result = net(crops)
            if out is None:
                out = result.new_empty(1, result.shape[1], height * scale, width * scale)
            for k, (y0, x0, _, _) in enumerate(part):
                out[0, :, y0 * scale:(y0 + th) * scale, x0 * scale:(x0 + tw) * scale] = \
                    result[k, :, dy * scale:(dy + th) * scale, dx * scale:(dx + tw) * scale]
    return out


def choose_tile(net: nn.Module,
                halo: int,
                exact: bool,
                device: torch.device,
                dtype: torch.dtype = torch.float32,
                candidates: Optional[Sequence[int]] = None,
                channels: int = 3) -> TileChoice:
    """Time each candidate side once (after a warm-up) and pick the least seconds per LR pixel delivered."""
    candidates = tuple(candidates or TILE_CANDIDATES.get(device.type, TILE_CANDIDATES['cpu']))
    if not candidates or any(c < 1 for c in candidates):
        raise ValueError(f'tile candidates must be positive integers, got {candidates}')
    timings = {}
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for side in candidates:
            x = torch.rand(1, channels, side + 2 * halo, side + 2 * halo, generator=generator).to(device, dtype)
            net(x)  # warm-up: allocator and kernel choice
            if device.type == 'cuda':
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            net(x)
            if device.type == 'cuda':
                torch.cuda.synchronize(device)
            timings[side] = (time.perf_counter() - start) / (side * side) * 1e6
    best = min(timings, key=lambda side: (timings[side], -side))
    return TileChoice(best, halo, exact, {k: float(v) for k, v in timings.items()})


def tiled_input_sizes(height: int, width: int, tile: int, halo: int) -> list[tuple[int, int]]:
    """The LR input size of every tile's forward pass (the tile with its context, clipped at the border): what a
    tiled run computes, for its cost (``costs.full_image_cost`` of each)."""
    return [(min(height, y1 + halo) - max(0, y0 - halo), min(width, x1 + halo) - max(0, x0 - halo))
            for y0, y1, x0, x1 in tile_boxes(height, width, tile)]
