"""Patch-wise super-resolution of a whole image: decompose, run, merge (every pixel covered).

The routed version classifies every tile, then runs each branch once per chunk of its tiles
(``CDNSRNet.route``), so no branch ever sees one patch at a time as in ClassSR's tester.
Tiles are processed in chunks of ``chunk`` tiles and merged into a ``PatchMerger`` as they come,
so memory stays bounded for 8K outputs.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from cdnsr_plugin.routing.patches import PatchGrid, PatchMerger, extract

SRFunction = Callable[[torch.Tensor], torch.Tensor]


def super_resolve_patches(lr: torch.Tensor, sr_fn: SRFunction, scale: int, patch: int = 32, stride: int = 28,
                          chunk: int = 1024) -> tuple[torch.Tensor, PatchGrid]:
    """Apply ``sr_fn`` (tiles -> SR tiles) to overlapping tiles of ``lr`` and merge them.

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
    image = lr[0] if lr.dim() == 4 else lr
    grid = PatchGrid.for_image(image.shape[-2], image.shape[-1], patch, stride)
    merger = PatchMerger(grid, scale, channels=image.shape[0], device=image.device)
    for index in torch.arange(len(grid)).split(chunk):
        merger.add(index, sr_fn(extract(image, grid, index)))
    return merger.result(), grid


def routed_super_resolve(net: torch.nn.Module, lr: torch.Tensor, patch: int = 32, stride: int = 28,
                         max_batch: Optional[int] = None, chunk: int = 1024,
                         labels: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor, PatchGrid]:
    """Routed SR of a whole image with a ``CDNSRNet`` (hard routing).

    Args:
        net: the routed container.
        lr: LR image (C, H, W) or (1, C, H, W).
        patch, stride, chunk: see ``super_resolve_patches``.
        max_batch: largest batch per branch forward pass.
        labels: optional class per tile (N,), bypassing the classifier (forced mixes, other routers).

    Returns:
        SR image, the class of every tile (N,), and the grid.
    """
    chosen: list[torch.Tensor] = []

    def sr_fn(tiles: torch.Tensor) -> torch.Tensor:
        start = sum(len(c) for c in chosen)
        if labels is None:
            tile_labels = net.classify(tiles).argmax(dim=1)
        else:
            tile_labels = labels[start:start + len(tiles)].to(tiles.device)
        chosen.append(tile_labels)
        return net.route(tiles, tile_labels, max_batch=max_batch)

    sr, grid = super_resolve_patches(lr, sr_fn, net.scale, patch, stride, chunk)
    return sr, torch.cat(chosen), grid
