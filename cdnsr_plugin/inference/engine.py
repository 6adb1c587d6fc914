"""The one routed executor: validation during training, ``tools/test_patches.py``, ``tools/benchmark.py``,
``tools/reproduce_cpu.py`` and the demo all super-resolve through ``RoutedEngine``.

Two tilings (``EngineOptions.tiling``): ``regions``, the default -- non-overlapping 32x32 cells are
classified and rectangles of same-class cells run once each with a halo of real context, nothing averaged
(``cdnsr_plugin.inference.regions``); ``paper`` -- the papers' 32x32 tiles at stride 28, zero-padded at
each tile border, overlaps averaged. The steps below are those of the papers' tiling; regions classify the
same way and render through ``_run_regions``.

One image goes through three named steps, each streaming over chunks of tiles so memory stays
bounded for 8K outputs (tiles are cut from the LR image chunk by chunk, and SR tiles are added to a
``PatchMerger`` as soon as they exist; no list of all SR tiles is ever held):

1. ``classify``: the classifier's logits for every tile (one batched pass per chunk). Cheap, and kept,
   so that several routing settings (``--eta``, ``--budget``, ``--sweep``) reuse one classification.
2. a decision turns logits into one class per tile (argmax, the cost knob, a training-free router, a
   forced mix) -- see ``cdnsr_plugin.inference.policies`` and ``.laplacian``;
3. ``render``: each chunk's tiles are grouped by class and every branch runs once per group, in
   batches of at most ``max_batch`` (``CDNSRNet.route``); the SR tiles are merged with the uniform
   weight map. ``render_loop`` is ClassSR's tester (one tile per forward pass), kept as the reference
   that the batched engine must reproduce and as the baseline ``tools/benchmark.py`` times.

``super_resolve`` chains the three with the classifier's argmax (what validation logs). Baselines on the
same input: ``backbone_patchwise`` (every tile through the largest branch, no classifier) and
``backbone_full`` (the largest branch on the whole image, no tiling).

The engine never changes the network it is given: each call runs it in eval mode and restores every
module's training flag afterwards, so validation can use the network being trained. Only when the
engine must run on another device or in another precision does it work on a converted copy, made once.

Speed settings: ``torch.inference_mode``; ``channels_last`` memory format for the tiles (measured on
this project's CPU machine: converting only the inputs gives the same speed as converting the weights too,
and bit-identical results, so the network's own memory format is left alone); ``precision``
``fp16``/``bf16`` on CUDA only (CPU half-precision convolutions are slower than fp32); the merge always
accumulates in float32.
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
from torch import nn

from cdnsr_plugin.inference.costs import full_image_coefficients
from cdnsr_plugin.inference.policies import check_labels
from cdnsr_plugin.inference.regions import EXACT, Plan, cell_grid, default_halo, plan_regions, receptive_radius
from cdnsr_plugin.inference.tiled import TileChoice, choose_tile, tiled_forward
from cdnsr_plugin.inference.tiling import PatchGrid, extract, super_resolve_patches

Decision = Callable[[torch.Tensor], torch.Tensor]  # logits (N, M) -> labels (N,)
PRECISIONS = {'fp32': torch.float32, 'fp16': torch.float16, 'bf16': torch.bfloat16}

# Largest batch per branch forward pass, by device. CPU: measured with tools/benchmark.py --max-batch-sweep
# (docs/RESULTS.md): for SRResNet branches on 2 threads, batches of 8-16 tiles are as fast as or faster than
# 64-256 (their feature maps stay in cache) and hold far less memory. CUDA: 128 is a conventional choice
# that fills a GPU with 32x32 tiles; it was NOT measured here (no GPU was available), measure with
# tools/benchmark.py --device cuda --max-batch-sweep 32,64,128,256,512.
DEFAULT_MAX_BATCH = {'cpu': 16, 'cuda': 128}
DEFAULT_CHUNK = 1024  # tiles cut, classified and merged per step
TILINGS = ('paper', 'regions')


def default_max_batch(device: torch.device | str) -> int:
    """``DEFAULT_MAX_BATCH`` for the device's type (the CPU value for other types)."""
    return DEFAULT_MAX_BATCH.get(torch.device(device).type, DEFAULT_MAX_BATCH['cpu'])


@dataclass(frozen=True)
class EngineOptions:
    """How the engine tiles and runs an image.

    Args:
        patch: LR tile side (the papers: 32).
        stride: step between tiles (the papers: 28); tiles cover every pixel.
        max_batch: largest number of tiles per branch forward pass; ``None``: ``DEFAULT_MAX_BATCH`` of the device.
        chunk: tiles cut from the image and merged per step (bounds memory).
        channels_last: run convolutions in channels-last memory format.
        precision: ``fp32``, or ``fp16`` / ``bf16`` on CUDA.
        tiling: ``paper`` (tiles at ``stride``, zero padding at every tile border, overlaps averaged: the
            papers' protocol) or ``regions`` (non-overlapping ``patch`` cells classified, rectangles of cells
            executed with ``halo`` pixels of real context; ``cdnsr_plugin.inference.regions``).
        halo: ``regions`` only: LR pixels of context per side; ``None``: the default of the backbone's
            architecture (``regions.DEFAULT_HALO``, within 0.01 dB of the whole image, measured), else the
            exact radius; ``'exact'``: the largest measured receptive radius over the branches, which makes
            the result equal each branch's on the whole image (``regions.default_halo``).
        max_region: ``regions`` only: largest region side, in cells.
        tile: LR side of the tiles of ``backbone_tiled`` (the speed baseline); ``None``: chosen by the measured
            rule of ``inference.tiled.choose_tile`` for the device.
    """

    patch: int = 32
    stride: int = 28
    max_batch: Optional[int] = None
    chunk: int = DEFAULT_CHUNK
    channels_last: bool = True
    precision: str = 'fp32'
    tiling: str = 'regions'
    halo: Optional[int | str] = None
    max_region: int = 8
    tile: Optional[int] = None

    @classmethod
    def from_val(cls, val_opt: Optional[dict]) -> 'EngineOptions':
        """The ``val`` section's ``patch``, ``stride``, ``max_batch``, ``channels_last`` and ``precision``
        (the defaults above where absent): how validation and ``tools/test_patches.py`` read them."""
        val_opt = val_opt or {}
        names = ('patch', 'stride', 'max_batch', 'channels_last', 'precision', 'tiling', 'halo', 'max_region', 'tile')
        return cls(**{name: val_opt[name] for name in names if val_opt.get(name) is not None})

    def validate(self, device: torch.device) -> None:
        """Raise ``ValueError`` naming the first option that is out of range for ``device``."""
        for name in ('patch', 'stride', 'max_batch', 'chunk', 'max_region', 'tile'):
            value = getattr(self, name)
            if name in ('max_batch', 'tile') and value is None:
                continue
            if not isinstance(value, int) or value < 1:
                raise ValueError(f'{name} must be a positive integer, got {value!r}')
        if self.stride > self.patch:
            raise ValueError(f'stride ({self.stride}) must be <= patch ({self.patch}) or pixels would be left out')
        if self.tiling not in TILINGS:
            raise ValueError(f'tiling must be one of {TILINGS}, got {self.tiling!r}')
        if self.halo not in (None, EXACT) and (not isinstance(self.halo, int) or isinstance(self.halo, bool)
                                               or self.halo < 0):
            raise ValueError(f'halo must be an integer >= 0, {EXACT!r} (the measured receptive radius) or empty '
                             f'(the backbone\'s default), got {self.halo!r}')
        if self.precision not in PRECISIONS:
            raise ValueError(f'precision must be one of {sorted(PRECISIONS)}, got {self.precision!r}')
        if self.precision != 'fp32' and device.type != 'cuda':
            raise ValueError(f'precision {self.precision} needs a CUDA device (this run uses {device}); '
                             'use --precision fp32 on CPU')


@dataclass
class RoutedResult:
    """What ``RoutedEngine.super_resolve`` returns for one image."""

    sr: torch.Tensor  # (C, H*scale, W*scale), float32
    labels: torch.Tensor  # (N,) class per tile, on the CPU
    logits: torch.Tensor  # (N, M) float32, on the CPU
    grid: PatchGrid
    plan: Optional[Plan] = None  # the executed regions (tiling ``regions``)


def _resolved(device: torch.device) -> torch.device:
    """``cuda`` as ``cuda:<current>``, so that equal devices compare equal."""
    if device.type == 'cuda' and device.index is None:
        return torch.device('cuda', torch.cuda.current_device())
    return device


def argmax_labels(logits: torch.Tensor) -> torch.Tensor:
    """The classifier's own choice (ClassSR Sec. 3.2, test time); ties go to the lower (cheaper) class."""
    return logits.argmax(dim=1)


class RoutedEngine:
    """Classify, route and merge whole images with a ``CDNSRNet`` (see the module docstring).

    Args:
        net: the routed container (its classifier and branches). Never modified; see the module docstring.
        options: tiling and speed settings.
        device: where to run; default: the device of ``net``'s parameters (the CPU for a network without any).

    Examples:
        >>> engine = RoutedEngine(net, EngineOptions(max_batch=16))
        >>> result = engine.super_resolve(lr)                  # lr: (3, H, W) in [0, 1]; argmax routing
        >>> logits, grid = engine.classify(lr)                 # or step by step
        >>> sr = engine.render(lr, logits.argmax(1), grid)    # (3, 4H, 4W)
    """

    def __init__(self,
                 net: nn.Module,
                 options: EngineOptions = EngineOptions(),
                 device: Optional[torch.device | str] = None) -> None:
        parameter = next(net.parameters(), None)  # None: no torch weights (an exported network, deploy.onnx_runtime)
        own_device = parameter.device if parameter is not None else torch.device('cpu')
        self.device = _resolved(torch.device(device) if device is not None else own_device)
        options.validate(self.device)
        self.options = options
        self.max_batch = options.max_batch or default_max_batch(self.device)
        self.dtype = PRECISIONS[options.precision]
        if parameter is not None and (_resolved(parameter.device) != self.device or parameter.dtype != self.dtype):
            net = copy.deepcopy(net).to(device=self.device, dtype=self.dtype)
        self.net = net
        self.scale, self.num_classes = net.scale, net.num_classes
        self._halo = options.halo
        self._coefficients: Optional[list[dict]] = None
        self._tile_choice: Optional[TileChoice] = None
        self.last_plan: Optional[Plan] = None

    @property
    def coefficients(self) -> list[dict]:
        """Each branch's whole-image cost model ``a * pixels + b`` per convention
        (``costs.full_image_coefficients``, ptflops), measured once: what executed-cost reports multiply by the
        pixels each branch processed, and (the last one) the backbone on the whole image. A network that carries
        them (``cost_coefficients``: an exported one, measured at export) is not measured again."""
        if self._coefficients is None:
            known = getattr(self.net, 'cost_coefficients', None)
            self._coefficients = list(known) if known is not None else [
                full_image_coefficients(b, self.options.patch) for b in self.net.branches
            ]
        return self._coefficients

    @property
    def per_pixel(self) -> list[float]:
        """Each branch's cost per LR pixel in MACs: what the region planner weighs."""
        return [c['macs'][0] for c in self.coefficients]

    @property
    def halo(self) -> int:
        """Context per region side (``regions``), resolved once by ``regions.default_halo``, or by the network's
        ``resolve_halo`` where it has one (an exported network: the halos measured at export)."""
        if not isinstance(self._halo, int):
            resolve = getattr(self.net, 'resolve_halo', None)
            self._halo = resolve(self._halo) if resolve is not None else default_halo(
                self.net.branches, self._halo, size=max(64, 4 * self.options.patch))
        return self._halo

    # ------------------------------------------------------------------ helpers
    @contextmanager
    def _running(self) -> Iterator[None]:
        """Inference mode with the network in eval mode; every module's training flag restored after."""
        modes = [(module, module.training) for module in self.net.modules()]
        self.net.eval()
        try:
            with torch.inference_mode():
                yield
        finally:
            for module, training in modes:
                module.training = training

    def _prepare(self, tiles: torch.Tensor) -> torch.Tensor:
        tiles = tiles.to(device=self.device, dtype=self.dtype)
        if self.options.channels_last:
            tiles = tiles.contiguous(memory_format=torch.channels_last)
        return tiles

    def _image(self, lr: torch.Tensor) -> torch.Tensor:
        image = lr[0] if lr.dim() == 4 else lr
        if image.dim() != 3:
            raise ValueError(f'lr must be (C, H, W) or (1, C, H, W), got {tuple(lr.shape)}')
        return image.to(self.device)

    def grid(self, lr: torch.Tensor) -> PatchGrid:
        """The tile layout of ``lr`` (every pixel covered)."""
        image = self._image(lr)
        height, width = image.shape[-2:]
        if self.options.tiling == 'regions':
            return cell_grid(height, width, self.options.patch)
        return PatchGrid.for_image(height, width, self.options.patch, self.options.stride)

    def map_tiles(self,
                  lr: torch.Tensor,
                  fn: Callable[[torch.Tensor], torch.Tensor],
                  grid: Optional[PatchGrid] = None) -> torch.Tensor:
        """``fn`` applied to every tile of ``lr`` chunk by chunk, results concatenated in grid order."""
        image = self._image(lr)
        grid = grid or self.grid(image)
        with self._running():
            parts = [fn(extract(image, grid, index)) for index in torch.arange(len(grid)).split(self.options.chunk)]
        return torch.cat(parts)

    # ------------------------------------------------------------------ steps
    def classify(self, lr: torch.Tensor, grid: Optional[PatchGrid] = None) -> tuple[torch.Tensor, PatchGrid]:
        """Classifier logits of every tile, float32 (N, M), on the CPU; and the grid."""
        grid = grid or self.grid(lr)
        logits = self.map_tiles(lr, lambda tiles: self.net.classify(self._prepare(tiles)).float().cpu(), grid)
        return logits, grid

    def render(self, lr: torch.Tensor, labels: torch.Tensor, grid: Optional[PatchGrid] = None) -> torch.Tensor:
        """SR image (C, H*scale, W*scale), float32, with tile ``k`` run by branch ``labels[k]``."""
        if self.options.tiling == 'regions':
            return self._run_regions(lr, labels, batched=True)
        return self._merge_tiles(
            lr, labels, grid,
            lambda tiles, chunk_labels: self.net.route(tiles, chunk_labels.to(self.device), max_batch=self.max_batch))

    def render_loop(self, lr: torch.Tensor, labels: torch.Tensor, grid: Optional[PatchGrid] = None) -> torch.Tensor:
        """As ``render``, but one tile (or region) per forward pass (ClassSR's tester): the reference and
        baseline."""
        if self.options.tiling == 'regions':
            return self._run_regions(lr, labels, batched=False)
        return self._merge_tiles(
            lr, labels, grid, lambda tiles, chunk_labels: torch.cat(
                [self.net.branches[j](tiles[i:i + 1]) for i, j in enumerate(chunk_labels.tolist())]))

    def branch_tiles(self, lr: torch.Tensor, branch: int, grid: Optional[PatchGrid] = None) -> torch.Tensor:
        """Every tile of ``lr`` through branch ``branch`` (batched), float32 on the CPU, in grid order:
        ``(N, C, patch * scale, patch * scale)``. For analyses that compare branches tile by tile."""
        if not 0 <= branch < self.num_classes:
            raise ValueError(f'branch must lie in [0, {self.num_classes}), got {branch}')

        def run(tiles: torch.Tensor) -> torch.Tensor:
            labels = torch.full((len(tiles), ), branch, dtype=torch.long, device=self.device)
            return self.net.route(self._prepare(tiles), labels, max_batch=self.max_batch).float().cpu()

        return self.map_tiles(lr, run, grid)

    def super_resolve(self, lr: torch.Tensor, decide: Decision = argmax_labels) -> RoutedResult:
        """Classify every tile, route by ``decide(logits)`` (default: the argmax) and render."""
        logits, grid = self.classify(lr)
        labels = decide(logits).cpu()
        sr = self.render(lr, labels, grid)
        return RoutedResult(sr, labels, logits, grid, self.last_plan if self.options.tiling == 'regions' else None)

    def plan(self, lr: torch.Tensor, labels: torch.Tensor, per_pixel: Optional[list[float]] = None) -> Plan:
        """The regions that ``render`` executes for ``labels`` (tiling ``regions``); with each branch's cost
        per pixel (``per_pixel``), isolated cells are promoted to a larger branch where that is cheaper."""
        image = self._image(lr)
        height, width = image.shape[-2:]
        grid = cell_grid(height, width, self.options.patch)
        labels = check_labels(torch.as_tensor(labels, dtype=torch.long).reshape(-1), self.num_classes, len(grid))
        per_pixel = per_pixel if per_pixel is not None else self.per_pixel
        return plan_regions(labels, height, width, self.options.patch, self.halo, self.options.max_region, per_pixel)

    def _run_regions(self, lr: torch.Tensor, labels: torch.Tensor, batched: bool) -> torch.Tensor:
        """Execute the plan: regions grouped by branch and input shape, batched up to ``max_batch`` tiles'
        worth of pixels per pass; only each region's interior is written (no averaging)."""
        image = self._image(lr)
        plan = self.plan(image, labels)
        self.last_plan = plan
        s = self.scale
        out = torch.zeros(image.shape[0], plan.height * s, plan.width * s, dtype=torch.float32, device=image.device)
        groups: dict[tuple, list] = {}
        for region in plan.regions:
            groups.setdefault((region.branch, region.input_shape), []).append(region)
        budget = self.max_batch * self.options.patch**2
        with self._running():
            for (branch, (height, width)), regions in groups.items():
                per_pass = max(1, budget // (height * width)) if batched else 1
                for start in range(0, len(regions), per_pass):
                    batch = regions[start:start + per_pass]
                    inputs = torch.stack([image[:, r.iy0:r.iy1, r.ix0:r.ix1] for r in batch])
                    sr = self.net.branches[branch](self._prepare(inputs)).float()
                    for r, result in zip(batch, sr):
                        rows = slice((r.y0 - r.iy0) * s, (r.y1 - r.iy0) * s)  # the interior, halo dropped
                        cols = slice((r.x0 - r.ix0) * s, (r.x1 - r.ix0) * s)
                        out[:, r.y0 * s:r.y1 * s, r.x0 * s:r.x1 * s] = result[:, rows, cols]
        return out

    def _merge_tiles(self, lr: torch.Tensor, labels: torch.Tensor, grid: Optional[PatchGrid],
                     run: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Stream the tiles of ``lr`` chunk by chunk through ``run(tiles, their labels)`` and merge the SR tiles."""
        image = self._image(lr)
        grid = grid or self.grid(image)
        labels = check_labels(torch.as_tensor(labels, dtype=torch.long).reshape(-1), self.num_classes, len(grid))
        done = [0]  # super_resolve_patches hands over the chunks in grid order

        def sr_fn(tiles: torch.Tensor) -> torch.Tensor:
            chunk_labels = labels[done[0]:done[0] + len(tiles)]
            done[0] += len(tiles)
            return run(self._prepare(tiles), chunk_labels).float()

        with self._running():
            sr, _ = super_resolve_patches(image, sr_fn, self.scale, self.options.patch, self.options.stride,
                                          self.options.chunk)
        return sr

    def backbone_patchwise(self, lr: torch.Tensor, grid: Optional[PatchGrid] = None) -> torch.Tensor:
        """Every tile through the largest (last) branch, batched; no classifier."""
        grid = grid or self.grid(lr)
        return self.render(lr, torch.full((len(grid), ), self.num_classes - 1, dtype=torch.long), grid)

    def backbone_full(self, lr: torch.Tensor) -> torch.Tensor:
        """The largest branch on the whole image at once (no tiles, no seams)."""
        return self.branch_full(lr, self.num_classes - 1)

    @property
    def tile_choice(self) -> TileChoice:
        """How ``backbone_tiled`` runs: the backbone's exact context (its measured receptive radius; a network
        without a finite one, e.g. RCAN's global channel attention, uses the engine's ``halo`` and is not
        exact) and the tile side (``options.tile``, else measured once by ``tiled.choose_tile``)."""
        if self._tile_choice is None:
            backbone = self.net.branches[-1]
            resolve = getattr(self.net, 'resolve_halo', None)  # an exported network: the radius measured at export
            try:
                halo = resolve(EXACT) if resolve is not None else receptive_radius(backbone, size=128)
                exact = True
            except ValueError:  # no finite radius (e.g. RCAN's global channel attention)
                halo, exact = self.halo, False
            if self.options.tile is not None:
                self._tile_choice = TileChoice(self.options.tile, halo, exact, {})
            else:
                with self._running():
                    self._tile_choice = choose_tile(backbone, halo, exact, self.device, self.dtype)
        return self._tile_choice

    def backbone_tiled(self, lr: torch.Tensor) -> torch.Tensor:
        """The largest branch on non-overlapping tiles with exact context (``inference.tiled``): the same image
        as ``backbone_full`` (within float rounding) at the speed of tiles; the speed baseline."""
        choice = self.tile_choice
        image = self._prepare(self._image(lr)[None])
        with self._running():
            return tiled_forward(self.net.branches[-1], image, choice.tile, choice.halo, self.scale)[0].float()

    def branch_full(self, lr: torch.Tensor, branch: int) -> torch.Tensor:
        """Branch ``branch`` on the whole image at once: what regions give with the exact halo."""
        if not 0 <= branch < self.num_classes:
            raise ValueError(f'branch must lie in [0, {self.num_classes}), got {branch}')
        image = self._prepare(self._image(lr)[None])
        with self._running():
            return self.net.branches[branch](image)[0].float()
