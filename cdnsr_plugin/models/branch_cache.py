"""The frozen branches' outputs, kept per training sub-image, so that a stage that trains only the classifier runs
the branches once per sub-image instead of once per iteration.

In the classifier stage (ClassSR Sec. 3.7, CDNSR Sec. III-D) the branches are fixed and the loss needs every
branch's output on every patch of the batch (the soft or Gumbel mixture); those forward passes are most of the
stage's time (FSRCNN 16/36/56 at batch 96 on this 2-core CPU: 295 ms of a 349 ms step). A sub-image is seen
many times (200k iterations x 96 in the paper), each time flipped or rotated by BasicSR's ``augment`` (horizontal
flip, vertical flip, transpose: one of 8). The cache keeps, per sub-image key (the LMDB key the dataset returns),
the LR patch as first seen and the branches' outputs on it (float16, CPU memory). When the key comes again, the
transform that maps the kept patch onto the new one is found by exact comparison (flips and transposes move
pixels, they do not change them) and applied to the kept outputs.

What changes: a hit returns ``T(branch(x))`` where recomputing would give ``branch(T(x))``. For the soft loss
these are the same training sample seen through the classifier's augmented input: the L1 of the mixture against
``T(gt)`` equals that of the unaugmented mixture against ``gt``, so the classifier learns from the augmented patch
with the unaugmented patch's loss (and float16 rounds outputs to about 5e-4 at 1.0). A patch symmetric under
several transforms matches the first. Entries are kept until ``limit_bytes``; beyond that, misses are computed and
not kept. The cache is emptied whenever a stage starts (the branches may have changed).
"""
from __future__ import annotations

from itertools import product
from typing import Callable, Hashable, Optional, Sequence

import torch

# BasicSR's augment: horizontal flip, then vertical flip, then transpose; each of the 8 as (hflip, vflip, rot90)
TRANSFORMS = tuple(product((False, True), repeat=3))


def dihedral(x: torch.Tensor, hflip: bool, vflip: bool, rot90: bool) -> torch.Tensor:
    """``x`` (..., H, W) flipped and transposed as ``basicsr.data.transforms.augment`` does an HWC image."""
    if hflip:
        x = x.flip(-1)
    if vflip:
        x = x.flip(-2)
    if rot90:
        x = x.transpose(-1, -2)
    return x


class BranchOutputCache:
    """Branch outputs per sub-image key, looked up through the flip/rotation that relates two views of a patch.

    Args:
        limit_bytes: memory for kept entries (patch plus outputs); 0 keeps nothing.
    """

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = int(limit_bytes)
        self.entries: dict[Hashable, tuple[torch.Tensor, torch.Tensor]] = {}
        self.bytes = 0
        self.hits = self.lookups = 0
        self._out: Optional[torch.Tensor] = None

    def clear(self) -> None:
        self.entries.clear()
        self.bytes = 0

    def _transforms(self, keys: Sequence[Hashable], patches: torch.Tensor) -> list[Optional[int]]:
        """Per patch, the index in ``TRANSFORMS`` that maps its key's kept patch onto it; ``None`` for a key not
        kept or kept with another patch (a different crop). Square patches (BasicSR's crops) are compared all at
        once."""
        found: list[Optional[int]] = [None] * len(keys)
        kept = [(i, self.entries[key][0]) for i, key in enumerate(keys) if key in self.entries]
        kept = [(i, patch) for i, patch in kept if patch.shape == patches[i].shape]
        if not kept or patches.shape[-1] != patches.shape[-2]:
            return found
        index = [i for i, _ in kept]
        stacked = torch.stack([patch for _, patch in kept])
        views = torch.stack([dihedral(stacked, *t) for t in TRANSFORMS], dim=1)  # (n, 8, C, h, w)
        match = (views == patches[index].unsqueeze(1)).flatten(2).all(dim=2)  # (n, 8)
        for row, i in enumerate(index):
            if bool(match[row].any()):
                found[i] = int(match[row].int().argmax())  # the first transform that matches
        return found

    def outputs(self, keys: Sequence[Hashable], lq: torch.Tensor,
                branches: Callable[[torch.Tensor], list[torch.Tensor]]) -> list[torch.Tensor]:
        """Every branch's output on every patch of ``lq`` (N, C, h, w), float32 on ``lq``'s device: kept ones
        reused, the others computed with ``branches`` (one batched call) and kept while memory allows."""
        cpu = lq.detach().cpu()
        transforms = self._transforms(keys, cpu)
        missing = [i for i, t in enumerate(transforms) if t is None]
        self.lookups += len(keys)
        self.hits += len(keys) - len(missing)
        if missing:
            with torch.no_grad():
                computed = torch.stack(branches(lq[missing]), dim=1)  # (n, M, C, H, W)
            for row, i in enumerate(missing):
                self._keep(keys[i], cpu[i], computed[row])
            shape = computed.shape[1:]
        else:  # every patch a hit: square patches (see _transforms), so every view has the kept shape
            shape = self.entries[keys[0]][1].shape
        out = self._buffer((len(keys), *shape), lq.device)
        if missing:
            out[missing] = computed
        for i, t in enumerate(transforms):  # hits: float16 -> float32 into the reused buffer
            if t is not None:
                out[i].copy_(dihedral(self.entries[keys[i]][1], *TRANSFORMS[t]))
        return list(out.unbind(dim=1))

    def _buffer(self, shape: tuple, device: torch.device) -> torch.Tensor:
        """A float32 tensor of ``shape``, reused from the previous call when it fits: allocating ~50 MB per batch
        cost more than filling it (fresh pages), 24 vs 4 ms on this CPU. The previous call's outputs are then
        overwritten, which the training step allows (one forward and backward per batch)."""
        if self._out is None or tuple(self._out.shape) != tuple(shape) or self._out.device != device:
            self._out = torch.empty(shape, dtype=torch.float32, device=device)
        return self._out

    def _keep(self, key: Hashable, patch: torch.Tensor, outputs: torch.Tensor) -> None:
        half = outputs.detach().to('cpu', torch.float16)
        size = patch.numel() * patch.element_size() + half.numel() * half.element_size()
        if key not in self.entries and self.bytes + size <= self.limit_bytes:
            self.entries[key] = (patch.clone(), half)
            self.bytes += size

    def hit_rate(self) -> float:
        """Share of lookups served from memory since the last call (then reset)."""
        rate = self.hits / self.lookups if self.lookups else 0.0
        self.hits = self.lookups = 0
        return rate
