"""How well does a router route? Per-tile branch quality, the oracle frontier, and routers compared at equal
budgets (``tools/analyze_routing.py``).

For every image every branch super-resolves every tile once, as the engine's tiling cuts it:

* ``regions`` (the default): each branch runs once on the whole image, and each non-overlapping 32x32 cell
  keeps its own part of that output. That is what the seam-free engine gives with the exact halo; the
  default halo is within 0.01 dB of it for the backbone alone (``tools/measure_halo.py``). A routing is
  planned as the engine plans it (``inference.regions.plan_regions``: isolated cells promoted to a larger
  branch where that is cheaper), and its executed cost (halos included) is reported beside the per-tile cost;
* ``paper``: every 32x32 tile at stride 28 with zero padding, overlaps averaged (the papers' protocol).

Per tile and branch the squared error on Y (BasicSR's BT.601 luma, 8-bit range, as its PSNR) is kept,
and so are the SR tiles, so that any assignment of branches to tiles can be merged into the image it gives
without running a network again. Then:

* **branch x class table** (ClassSR Table 1 style): tiles of the whole set are split into M equal classes
  by the largest branch's tile PSNR (highest = simple, as ``tools/prepare_data.py`` labels); each cell is
  the PSNR of one branch over one class (from the pooled MSE);
* **routers at equal budgets**: for each budget (per-tile cost as a fraction of the largest branch, the
  router's own cost included: the classifier's, the Laplacian's, none for the oracle and random) each
  router's decision is solved per image with ``policies.solve_budget``:

  - *oracle*: scores ``-SE_tj`` (squared error of branch j on tile t), so the solver picks
    ``argmin_j (SE_tj + mu * C_j / C_max)`` with ``mu`` bisected to the budget: the best any router could do
    tile by tile (seams included, as the merged image is scored);
  - *learned*: the classifier's logits, i.e. the cost knob ``eta``;
  - *laplacian*: edge energy as a ranking (scores ``j * z_t``, ``z`` the standardised edge energy);
  - *random*: seeded standard-normal scores, a random ranking;

  with ``scope='set'`` each router's ``eta`` is solved once for all images (``policies.solve_shared_eta``: the
  mean per-tile cost over the set stays within the budget; tied tiles are not split, so a router may land a
  little under it), so images that need the larger branches more get more of them. The tester's
  ``--set-budget`` does the same on the executed cost relative to the backbone on the whole images;

  and the merged image is scored (BasicSR's PSNR on Y, ``crop_border = scale``); **regret** is the oracle's
  PSNR minus the router's at the same budget;
* the classifier's argmax (no knob), its **soft-vs-hard gap** (ClassSR eq. 1's probability-weighted
  mixture vs the argmax branch, both merged), and the **Spearman correlation** between the classifier's
  preference for larger branches (its expected class index) and what the largest branch gains on the tile
  over the smallest (the drop in Y MSE: what the oracle trades against cost; a PSNR difference would rank
  flat tiles, where a few grey levels are many dB, above textured ones);
* the backbone patch-wise and on the whole image (the honest baseline). Each router point also carries its
  cost in % of that baseline (``percent_of_full_image``: what ran, in MACs, router included).
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from basicsr.metrics import calculate_psnr, calculate_ssim
from basicsr.utils import tensor2img

from cdnsr_plugin.inference.costs import CostTable, executed_cost, full_image_cost
from cdnsr_plugin.inference.engine import RoutedEngine
from cdnsr_plugin.inference.laplacian import LAPLACIAN_MACS_PER_PIXEL, laplacian_scores
from cdnsr_plugin.inference.policies import cost_aware_labels, eta_limit, solve_budget, solve_shared_eta
from cdnsr_plugin.inference.regions import plan_regions
from cdnsr_plugin.inference.tiling import PatchGrid, PatchMerger

ROUTERS = ('oracle', 'learned', 'laplacian', 'random')
SCOPES = ('image', 'set')
DEFAULT_BUDGETS = (0.4, 0.5, 0.55, 0.65, 0.8)
_Y = (65.481, 128.553, 24.966)  # BasicSR's rgb2ycbcr(y_only=True) on [0, 1] RGB, times 255


@dataclass(frozen=True)
class Execution:
    """How tiling ``regions`` runs one image (as ``RoutedEngine.plan``): which branch each cell ends up on,
    and what a routing executes."""

    height: int  # LR size
    width: int
    cell: int
    halo: int
    max_cells: int
    per_pixel: tuple[float, ...]  # MACs per LR pixel per branch (the planner's promotion)
    coefficients: tuple[dict, ...]  # costs.full_image_coefficients per branch

    def run(self, labels: np.ndarray) -> tuple[np.ndarray, float]:
        """The branch each cell runs on (labels, isolated cells promoted) and the MACs the branches execute."""
        plan = plan_regions(labels, self.height, self.width, self.cell, self.halo, self.max_cells, self.per_pixel)
        cols = -(-self.width // self.cell)
        ran = np.empty(len(labels), dtype=np.int64)
        for region in plan.regions:
            rows = range(region.y0 // self.cell, -(-region.y1 // self.cell))
            columns = np.arange(region.x0 // self.cell, -(-region.x1 // self.cell))
            for row in rows:
                ran[row * cols + columns] = region.branch
        count = len(self.per_pixel)
        cost = executed_cost(plan.processed(count), plan.passes(count), list(self.coefficients), 0, None)
        return ran, cost['macs']


@dataclass
class ImageTiles:
    """One image's tiles under every branch: what the routers are compared on."""

    name: str
    lr: torch.Tensor  # (3, h, w) RGB in [0, 1]
    gt: np.ndarray  # uint8 BGR, scale x the LR
    grid: PatchGrid
    sr_tiles: torch.Tensor  # (M, N, 3, patch * scale, patch * scale), float32
    squared_error: np.ndarray  # (N, M): sum over the tile's valid pixels of the Y error, 8-bit range
    pixels: np.ndarray  # (N,): valid HR pixels per tile (tiles at a small image's border are padded)
    logits: Optional[np.ndarray]  # (N, M) classifier logits
    edge: np.ndarray  # (N,) Laplacian edge energy
    full_psnr: float  # the largest branch on the whole image (no tiles): the honest baseline
    full_psnr_rgb: Optional[float] = None  # the same on RGB
    full_cost: Optional[dict[str, float]] = None  # its cost on the whole image, per convention
    boxes: Optional[np.ndarray] = None  # (N, 4) LR y0, y1, x0, x1 each tile owns (regions); None: papers' tiles
    execution: Optional[Execution] = None  # regions: how a routing runs
    paper_patchwise_psnr: Optional[float] = None  # regions: the largest branch on the papers' tiles
    paper_patchwise_macs: Optional[float] = None  # and its cost
    branch_colour: Optional[list[dict]] = None  # regions: each branch on the whole image (``colour_errors``)

    def run(self, labels: np.ndarray) -> tuple[np.ndarray, Optional[float]]:
        """The branch each tile is rendered by under ``labels`` (regions may promote isolated cells) and, under
        regions, the MACs the branches execute (``None`` for the papers' tiles: per-tile costs apply)."""
        return (labels, None) if self.execution is None else self.execution.run(labels)

    def tile_psnr(self) -> np.ndarray:
        """(N, M) PSNR of each branch on each tile (Y, 8-bit); an exact tile gets 100 dB."""
        mse = self.squared_error / self.pixels[:, None]
        return 10 * np.log10(255.0**2 / np.maximum(mse, 255.0**2 * 1e-10))


def _luma(rgb: torch.Tensor) -> torch.Tensor:
    """Y in the 8-bit range of (..., 3, H, W) RGB in [0, 1], as BasicSR computes it (before the +16)."""
    weights = torch.tensor(_Y, dtype=rgb.dtype, device=rgb.device).view(3, 1, 1)
    return (rgb * weights).sum(dim=-3)


def tile_boxes(grid: PatchGrid) -> np.ndarray:
    """(N, 4) LR boxes ``y0, y1, x0, x1`` of the papers' tiles, clipped to the image."""
    positions = grid.positions().numpy()
    return np.stack([
        positions[:, 0],
        np.minimum(positions[:, 0] + grid.patch, grid.height), positions[:, 1],
        np.minimum(positions[:, 1] + grid.patch, grid.width)
    ],
                    axis=1)


def cell_boxes(grid: PatchGrid) -> np.ndarray:
    """(N, 4) LR boxes of the non-overlapping cells of a regions grid (the last row/column may be narrower)."""
    ys = np.arange(0, grid.height, grid.patch)
    xs = np.arange(0, grid.width, grid.patch)
    y0, x0 = np.meshgrid(ys, xs, indexing='ij')
    y0, x0 = y0.reshape(-1), x0.reshape(-1)
    return np.stack([y0, np.minimum(y0 + grid.patch, grid.height), x0, np.minimum(x0 + grid.patch, grid.width)], 1)


def tile_errors(sr_tiles: torch.Tensor, gt: np.ndarray, boxes: np.ndarray, scale: int) -> tuple[np.ndarray, np.ndarray]:
    """Per tile and branch the summed squared Y error against the ground truth, and each tile's pixel count.

    ``boxes``: the LR box each tile is scored on (``tile_boxes`` / ``cell_boxes``); SR tiles hold it at their
    top left. SR tiles are rounded to 8 bits first, as the images are scored; pixels of a tile that lie beyond
    the image (replicate padding of images smaller than a tile) are left out.
    """
    gt_rgb = torch.from_numpy(np.ascontiguousarray(gt[..., ::-1])).permute(2, 0, 1).float() / 255.0
    errors, pixels = [], []
    for (y0, y1, x0, x1) in boxes.tolist():
        top, left = y0 * scale, x0 * scale
        h, w = (y1 - y0) * scale, (x1 - x0) * scale
        target = _luma(gt_rgb[:, top:top + h, left:left + w])
        sr = _luma(sr_tiles[:, len(errors), :, :h, :w].clamp(0, 1).mul(255).round().div(255))
        errors.append(((sr - target)**2).sum(dim=(-2, -1)).numpy())
        pixels.append(h * w)
    return np.stack(errors).astype(np.float64), np.asarray(pixels, dtype=np.float64)


def collect(engine: RoutedEngine,
            name: str,
            lr: torch.Tensor,
            gt: np.ndarray,
            classifier: bool = True,
            full_coefficients: Optional[dict] = None) -> ImageTiles:
    """Run every branch on every tile of one image (and the classifier), keep the SR tiles and their errors;
    with ``full_coefficients`` (``costs.full_image_coefficients`` of the largest branch) also the cost of the
    largest branch on the whole image. Tiles as the engine's tiling cuts them (see the module docstring)."""
    grid = engine.grid(lr)
    execution, paper_patchwise, paper_macs = None, None, None
    colour = None
    if engine.options.tiling == 'regions':
        boxes = cell_boxes(grid)
        outputs = [engine.branch_full(lr, b).cpu() for b in range(engine.num_classes)]
        colour = [colour_errors(out, gt, engine.scale) for out in outputs]
        sr_tiles = torch.stack([_cell_tiles(out, boxes, grid.patch, engine.scale) for out in outputs])
        del outputs
        coefficients = tuple(engine.coefficients)  # measured once per engine
        execution = Execution(grid.height, grid.width, grid.patch, engine.halo, engine.options.max_region,
                              tuple(engine.per_pixel), coefficients)
        paper = RoutedEngine(engine.net, dataclasses.replace(engine.options, tiling='paper'), engine.device)
        patchwise = tensor2img(paper.backbone_patchwise(lr).cpu(), rgb2bgr=True, min_max=(0, 1))
        paper_patchwise = float(calculate_psnr(patchwise, gt, engine.scale, test_y_channel=True))
        slope, constant = coefficients[-1]['macs']
        paper_macs = len(paper.grid(lr)) * (slope * grid.patch**2 + constant)
    else:
        boxes = tile_boxes(grid)
        sr_tiles = torch.stack([engine.branch_tiles(lr, branch, grid) for branch in range(engine.num_classes)])
    errors, pixels = tile_errors(sr_tiles, gt, boxes, engine.scale)
    logits = engine.classify(lr, grid)[0].numpy().astype(np.float64) if classifier else None
    edge = engine.map_tiles(lr, lambda tiles: laplacian_scores(tiles.float()).cpu(), grid).numpy()
    full = tensor2img(engine.backbone_full(lr).cpu(), rgb2bgr=True, min_max=(0, 1))
    full_psnr = float(calculate_psnr(full, gt, engine.scale, test_y_channel=True))
    full_psnr_rgb = float(calculate_psnr(full, gt, engine.scale))
    full_cost = full_image_cost(full_coefficients, *lr.shape[-2:]) if full_coefficients else None
    return ImageTiles(name, lr, gt, grid, sr_tiles, errors, pixels, logits, edge.astype(np.float64), full_psnr,
                      full_psnr_rgb, full_cost, boxes if execution is not None else None, execution, paper_patchwise,
                      paper_macs, colour)


_CBCR = ((-37.797, -74.203, 112.0), (112.0, -93.786, -18.214))  # BT.601 chroma, as BasicSR's rgb2ycbcr, x 255


def colour_errors(sr: torch.Tensor, gt: np.ndarray, scale: int) -> dict[str, float]:
    """One branch's whole-image output (3, H, W) RGB in [0, 1] against the uint8 BGR ground truth, border
    ``scale`` cropped as BasicSR's PSNR: MSE on Y, Cb and Cr and on RGB (8-bit range), and the mean signed error
    per RGB channel (a colour bias). Where the routed image's RGB falls further below its backbone than its Y,
    these say whether the smaller branches' chroma or a colour shift is why."""
    out = torch.from_numpy(tensor2img(sr, rgb2bgr=False, min_max=(0, 1)).astype(np.float64))  # RGB uint8 values
    target = torch.from_numpy(np.ascontiguousarray(gt[..., ::-1]).astype(np.float64))
    out, target = (t[scale:-scale, scale:-scale] for t in (out, target))
    diff = (out - target).reshape(-1, 3)
    y = diff @ torch.tensor(_Y, dtype=torch.float64) / 255.0
    cbcr = diff @ torch.tensor(_CBCR, dtype=torch.float64).T / 255.0
    return {
        'mse_y': float((y**2).mean()), 'mse_cb': float((cbcr[:, 0]**2).mean()), 'mse_cr': float((cbcr[:, 1]**2).mean()),
        'mse_rgb': float((diff**2).mean()), 'bias_rgb': [float(v) for v in diff.mean(dim=0)]
    }


def _cell_tiles(sr: torch.Tensor, boxes: np.ndarray, patch: int, scale: int) -> torch.Tensor:
    """(N, C, patch * scale, patch * scale): each cell's part of a whole-image output at the top left, zeros
    beyond a narrower cell."""
    side = patch * scale
    tiles = sr.new_zeros(len(boxes), sr.shape[0], side, side)
    for index, (y0, y1, x0, x1) in enumerate(boxes.tolist()):
        tiles[index, :, :(y1 - y0) * scale, :(x1 - x0) * scale] = sr[:, y0 * scale:y1 * scale, x0 * scale:x1 * scale]
    return tiles


def merge(image: ImageTiles, weights: torch.Tensor, scale: int) -> np.ndarray:
    """The uint8 BGR image whose tile ``t`` is ``sum_j weights[t, j] * branch_j(t)`` (one-hot: a routing),
    merged as the engine merges (papers' tiles: overlaps averaged; regions: each cell's own part)."""
    tiles = torch.einsum('nm,mnchw->nchw', weights.to(image.sr_tiles.dtype), image.sr_tiles)
    if image.boxes is None:
        merger = PatchMerger(image.grid, scale, channels=3)
        merger.add(None, tiles)
        return tensor2img(merger.result(), rgb2bgr=True, min_max=(0, 1))
    out = tiles.new_zeros(3, image.grid.height * scale, image.grid.width * scale)
    for tile, (y0, y1, x0, x1) in zip(tiles, image.boxes.tolist()):
        out[:, y0 * scale:y1 * scale, x0 * scale:x1 * scale] = tile[:, :(y1 - y0) * scale, :(x1 - x0) * scale]
    return tensor2img(out, rgb2bgr=True, min_max=(0, 1))


def _rendered(image: ImageTiles, ran: np.ndarray, scale: int) -> np.ndarray:
    """The uint8 BGR image with tile ``t`` from branch ``ran[t]``."""
    weights = torch.nn.functional.one_hot(torch.as_tensor(ran, dtype=torch.long), image.sr_tiles.shape[0])
    return merge(image, weights.float(), scale)


def routed_image(image: ImageTiles, labels: np.ndarray, scale: int) -> np.ndarray:
    """The uint8 BGR image the engine renders for ``labels`` (regions: after promotion)."""
    return _rendered(image, image.run(np.asarray(labels, dtype=np.int64))[0], scale)


def psnr_of(image: ImageTiles, labels: np.ndarray, scale: int) -> float:
    """BasicSR's Y PSNR (crop ``scale``) of the image routed by ``labels``."""
    return float(calculate_psnr(routed_image(image, labels, scale), image.gt, scale, test_y_channel=True))


@dataclass
class RouterPoint:
    """One router at one budget, over the whole set."""

    router: str
    budget: Optional[float]  # None: the router's own choice (the classifier's argmax)
    psnr: float  # mean over images of the merged image's Y PSNR
    flops_fraction: float  # mean per-tile cost / the largest branch's, the router's own cost included
    class_shares: list[float]
    regret: Optional[float] = None  # oracle PSNR - this PSNR at the same budget
    ssim: Optional[float] = None  # BasicSR's SSIM on Y (computed for the classifier's argmax only)
    percent_of_full_image: Optional[float] = None  # MACs that ran (router included), % of the backbone on the
    # whole image, summed over the images
    psnr_rgb: Optional[float] = None  # mean over images of BasicSR's PSNR on RGB (crop ``scale``)


@dataclass
class Analysis:
    """Everything ``analyze`` measured; ``to_dict`` is the JSON layout."""

    images: list[str]
    tiles: int
    convention: str
    tiling: str  # how the routings were executed: regions (cells, exact halo) or paper (32/28 tiles)
    branch_costs: list[float]  # per tile, in the convention
    router_costs: dict[str, float]  # per tile, each router's own cost
    branch_class_psnr: list[list[float]]  # [branch][difficulty class]
    class_psnr_bounds: list[tuple[float, float]]  # largest branch's tile PSNR range per class
    points: list[RouterPoint] = field(default_factory=list)
    backbone_patchwise_psnr: Optional[float] = None
    backbone_full_psnr: Optional[float] = None
    backbone_full_psnr_rgb: Optional[float] = None
    backbone_full_flops_fraction: Optional[float] = None  # its cost per tile / the largest branch's
    backbone_patchwise_percent_of_full: Optional[float] = None  # papers' tiles, MACs in % of the whole image
    soft_psnr: Optional[float] = None
    hard_psnr: Optional[float] = None
    spearman: Optional[float] = None
    branch_colour: Optional[list[dict]] = None  # per branch, on the whole images: mean MSE on Y, Cb, Cr, RGB and the
    # mean colour bias per RGB channel (``colour_errors``; regions only)
    mean_max_probability: Optional[float] = None  # the classifier's confidence on the test tiles
    scope: str = 'image'  # budgets met per image, or over the set with one eta (``analyze``)

    def to_dict(self) -> dict:
        from dataclasses import asdict
        return asdict(self)


def _largest_first_classes(psnr: np.ndarray, num_classes: int) -> np.ndarray:
    """Class per tile by rank of ``psnr``: the highest ``1/M`` is class 0 (simple) ... lowest is M-1."""
    order = np.argsort(-psnr, kind='stable')
    labels = np.empty(len(psnr), dtype=np.int64)
    for label, members in enumerate(np.array_split(order, num_classes)):
        labels[members] = label
    return labels


def branch_class_table(images: Sequence[ImageTiles]) -> tuple[list[list[float]], list[tuple[float, float]]]:
    """PSNR of each branch (rows) on each difficulty class of tiles (columns); classes by the largest
    branch's tile PSNR over the whole set. Also the largest branch's PSNR range per class."""
    errors = np.concatenate([image.squared_error for image in images])
    pixels = np.concatenate([image.pixels for image in images])
    psnr = np.concatenate([image.tile_psnr() for image in images])
    classes = _largest_first_classes(psnr[:, -1], errors.shape[1])
    table = [[
        float(10 * math.log10(255.0**2 * pixels[classes == k].sum() / errors[classes == k, j].sum()))
        for k in range(errors.shape[1])
    ] for j in range(errors.shape[1])]
    bounds = [(float(psnr[classes == k, -1].min()), float(psnr[classes == k, -1].max()))
              for k in range(errors.shape[1])]
    return table, bounds


def router_scores(image: ImageTiles, router: str, seed: int = 0) -> np.ndarray:
    """(N, M) scores whose cost-aware argmax is the router's decision (see the module docstring)."""
    num_classes = image.squared_error.shape[1]
    if router == 'oracle':
        return -image.squared_error / image.pixels[:, None]
    if router == 'learned':
        if image.logits is None:
            raise ValueError('the learned router needs the classifier logits (a network with a trained classifier)')
        return image.logits
    if router == 'laplacian':
        z = (image.edge - image.edge.mean()) / (image.edge.std() + 1e-12)
        return z[:, None] * np.arange(num_classes)[None, :]
    if router == 'random':
        return np.random.default_rng(seed).standard_normal(image.squared_error.shape)
    raise ValueError(f'router must be one of {ROUTERS}, got {router!r}')


def _point(router: str,
           budget: Optional[float],
           images: Sequence[ImageTiles],
           labels: list[np.ndarray],
           per_class: np.ndarray,
           largest: float,
           scale: int,
           macs: Optional[tuple[np.ndarray, float]] = None) -> RouterPoint:
    """One router's point; ``macs``: per-tile MACs of each branch and of the router, for the executed cost."""
    runs = [image.run(np.asarray(label, dtype=np.int64)) for image, label in zip(images, labels)]  # planned once
    rendered = [_rendered(image, ran, scale) for image, (ran, _) in zip(images, runs)]
    psnr = float(
        np.mean([calculate_psnr(out, image.gt, scale, test_y_channel=True) for out, image in zip(rendered, images)]))
    psnr_rgb = float(np.mean([calculate_psnr(out, image.gt, scale) for out, image in zip(rendered, images)]))
    every = np.concatenate(labels)
    shares = np.bincount(every, minlength=len(per_class)) / len(every)
    point = RouterPoint(
        router, budget, psnr, float(per_class[every].mean() / largest), shares.round(4).tolist(), psnr_rgb=psnr_rgb)
    if macs is not None and all(image.full_cost for image in images):
        branch_macs, router_macs = macs
        executed = sum((float(branch_macs[label].sum()) if ran_macs is None else ran_macs) + router_macs * len(label)
                       for label, (_, ran_macs) in zip(labels, runs))
        point.percent_of_full_image = float(100.0 * executed / sum(image.full_cost['macs'] for image in images))
    return point


def analyze(images: Sequence[ImageTiles],
            table: CostTable,
            scale: int,
            budgets: Sequence[float] = DEFAULT_BUDGETS,
            routers: Sequence[str] = ROUTERS,
            convention: str = 'paper',
            seed: int = 0,
            progress: Callable[[str], None] = lambda message: None,
            scope: str = 'image') -> Analysis:
    """Compare the routers on ``images`` (see the module docstring); ``scope``: ``image`` (each image meets the
    budget) or ``set`` (one eta for all images, the set meets it)."""
    if scope not in SCOPES:
        raise ValueError(f'scope must be one of {SCOPES}, got {scope!r}')
    branch_costs = np.asarray([branch.value(convention) for branch in table.branches], dtype=np.float64)
    largest = float(branch_costs.max())
    patch_pixels = table.patch * table.patch
    overheads = {
        'oracle': 0.0, 'random': 0.0, 'learned': float(table.classifier.value(convention)),
        'laplacian': float(LAPLACIAN_MACS_PER_PIXEL * patch_pixels * (2 if convention == 'paper' else 1))
    }
    branch_macs = np.asarray([branch.macs for branch in table.branches], dtype=np.float64)
    router_macs = {
        'oracle': 0.0, 'random': 0.0, 'learned': float(table.classifier.macs),
        'laplacian': float(LAPLACIAN_MACS_PER_PIXEL * patch_pixels)
    }
    matrix, bounds = branch_class_table(images)
    tiling = 'paper' if any(image.execution is None for image in images) else 'regions'
    result = Analysis([image.name for image in images], int(sum(len(image.grid) for image in images)), convention,
                      tiling, branch_costs.tolist(), {router: overheads[router]
                                                      for router in routers}, matrix, bounds)
    oracle: dict[float, float] = {}
    for router in routers:
        per_class = branch_costs + overheads[router]
        for budget in budgets:
            progress(f'{router} at budget {budget}')
            scores = [torch.from_numpy(router_scores(image, router, seed + i)) for i, image in enumerate(images)]
            with np.errstate(all='ignore'):
                if scope == 'set':
                    labels = _shared_labels(scores, per_class, largest, budget)
                else:
                    labels = [solve_budget(score, per_class, largest, budget).labels.numpy() for score in scores]
            point = _point(router, budget, images, labels, per_class, largest, scale,
                           (branch_macs, router_macs[router]))
            if router == 'oracle':
                oracle[budget] = point.psnr
            point.regret = oracle[budget] - point.psnr if budget in oracle else None
            result.points.append(point)
    if 'learned' in routers:
        _classifier_measures(result, images, branch_costs + overheads['learned'], largest, scale,
                             (branch_macs, router_macs['learned']))
    num = len(branch_costs)
    backbone = [np.full(len(image.grid), num - 1) for image in images]
    if all(image.paper_patchwise_psnr is not None for image in images):  # regions: the papers' tiles, run apart
        result.backbone_patchwise_psnr = float(np.mean([image.paper_patchwise_psnr for image in images]))
        if all(image.full_cost for image in images):  # collect() was given the whole-image coefficients
            paper_macs = sum(image.paper_patchwise_macs for image in images)
            full_macs = sum(image.full_cost['macs'] for image in images)
            result.backbone_patchwise_percent_of_full = float(100 * paper_macs / full_macs)
    else:
        result.backbone_patchwise_psnr = float(np.mean([psnr_of(i, b, scale) for i, b in zip(images, backbone)]))
    result.backbone_full_psnr = float(np.mean([image.full_psnr for image in images]))
    if all(image.branch_colour for image in images):
        result.branch_colour = [{
            key: (np.mean([image.branch_colour[j][key] for image in images], axis=0).tolist())
            for key in images[0].branch_colour[j]
        } for j in range(len(images[0].branch_colour))]
    if all(image.full_psnr_rgb is not None for image in images):
        result.backbone_full_psnr_rgb = float(np.mean([image.full_psnr_rgb for image in images]))
    if all(image.full_cost for image in images):
        full = sum(image.full_cost[convention] for image in images)
        result.backbone_full_flops_fraction = float(full / (result.tiles * largest))
    result.scope = scope
    return result


def _shared_labels(scores: Sequence[torch.Tensor], per_class: np.ndarray, largest: float,
                   budget: float) -> list[np.ndarray]:
    """Every image's labels under the one eta at which the mean per-tile cost over all images meets ``budget``."""

    def fraction(eta: float) -> float:
        chosen = np.concatenate([cost_aware_labels(score, per_class, eta).numpy() for score in scores])
        return float(per_class[chosen].mean() / largest)

    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # an unreachable budget routes to the nearest end, as solve_budget does
        eta = solve_shared_eta(fraction, budget, eta_limit(scores, per_class)).eta
    return [cost_aware_labels(score, per_class, eta).numpy() for score in scores]


def _classifier_measures(result: Analysis, images: Sequence[ImageTiles], per_class: np.ndarray, largest: float,
                         scale: int, macs: tuple[np.ndarray, float]) -> None:
    """The classifier's own argmax, its soft-vs-hard gap and the Spearman correlation of its preference."""
    from scipy.stats import spearmanr
    argmax = [image.logits.argmax(axis=1) for image in images]
    point = _point('learned', None, images, argmax, per_class, largest, scale, macs)
    point.ssim = float(
        np.mean([
            calculate_ssim(routed_image(image, labels, scale), image.gt, scale, test_y_channel=True)
            for image, labels in zip(images, argmax)
        ]))
    result.points.append(point)
    result.hard_psnr = point.psnr
    soft = []
    for image in images:
        probs = torch.softmax(torch.from_numpy(image.logits), dim=1).float()
        soft.append(calculate_psnr(merge(image, probs, scale), image.gt, scale, test_y_channel=True))
    result.soft_psnr = float(np.mean(soft))
    logits = np.concatenate([image.logits for image in images])
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    result.mean_max_probability = float(probs.max(axis=1).mean())
    preference = probs @ np.arange(logits.shape[1])
    errors = np.concatenate([image.squared_error / image.pixels[:, None] for image in images])
    gain = errors[:, 0] - errors[:, -1]  # what the largest branch saves over the smallest (MSE, as the oracle)
    result.spearman = float(spearmanr(preference, gain).statistic) if np.ptp(preference) > 0 else 0.0
