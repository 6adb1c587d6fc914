"""Fit a router to a trained routed network whose branches stay frozen (``tools/fit_router.py``).

The targets are what the engine executes: every branch runs once on each whole training image (regions
with the exact halo give each cell exactly that), and each non-overlapping 32x32 LR cell gets each branch's
squared error against the ground truth, on Y (BasicSR's BT.601 luma, 8-bit range) and on RGB, from the
8-bit rounded output. The router sees the cells as the engine's ``classify`` cuts them.

Why a fit outside the training stages: the classifier stage of ``CDNSRModel`` learns from 32x32 sub-images
of the prepared set, each run through the branches on its own (zero-padded borders), while the engine runs
cells inside their image; and its oracle-label loss fixes one price. Here the router regresses each larger
branch's gain on the errors the engine really gets (``GainRouter``), which serves every price of the cost
knob, and the frozen branches run once per image rather than once per iteration, so a fit over many more
cells (photos at several sizes and orientations) takes minutes.

Variants: each training photo is used at its own size and downscaled (``scales``), and rotated by 90 degrees
(``rotations`` 2): the LR of every variant is the MATLAB-bicubic ``1 / scale`` of its HR, as the test sets are
made. The fit itself augments cells with the 8 flips and rotations (a cell's branch errors are nearly
invariant under them).

Loss: the squared error of the predicted gains (``l2``), in MSE units: for a price ``mu`` drawn uniformly,
the expected loss of a wrong decision between two branches of cost gap ``dC`` is ``(g_hat - g)^2 / (2 dC)``,
so this is the loss of the routing decision averaged over prices. ``sqrt`` (signed square roots of the
gains) weights the many small gains more; ``tools/fit_router.py`` chooses on a validation source.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from cdnsr_plugin.analysis.routing import _luma, cell_boxes
from cdnsr_plugin.archs.gain_router_arch import GainRouter
from cdnsr_plugin.inference.engine import EngineOptions, RoutedEngine
from cdnsr_plugin.preparation.test_sets import make_pair
from cdnsr_plugin.utils.image import to_tensor
from cdnsr_plugin.utils.io import SkipImage, list_images, read_image

TARGETS = ('y', 'rgb', 'mixed')
LOSSES = ('l2', 'sqrt')


@dataclass
class CellData:
    """Every cell of every training variant: the LR cell and each branch's error on it."""

    cells: np.ndarray  # (N, 3, patch, patch) uint8 RGB, as the engine's classify cuts them
    se_y: np.ndarray  # (N, M) summed squared Y error, 8-bit range
    se_rgb: np.ndarray  # (N, M) summed squared error over R, G, B / 3, 8-bit range
    pixels: np.ndarray  # (N,) HR pixels of the cell
    photo: np.ndarray  # (N,) index into ``names``
    names: list[str]

    def mse(self, target: str) -> np.ndarray:
        """(N, M) per-pixel MSE of each branch on ``target`` (``y``, ``rgb`` or ``mixed``: their mean)."""
        if target not in TARGETS:
            raise ValueError(f'target must be one of {TARGETS}, got {target!r}')
        se = {'y': self.se_y, 'rgb': self.se_rgb, 'mixed': (self.se_y + self.se_rgb) / 2}[target]
        return se / self.pixels[:, None]

    def save(self, path: Path) -> None:
        tmp = path.with_name(path.name + '.tmp.npz')
        np.savez_compressed(
            tmp,
            cells=self.cells,
            se_y=self.se_y,
            se_rgb=self.se_rgb,
            pixels=self.pixels,
            photo=self.photo,
            names=np.asarray(self.names))
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> 'CellData':
        with np.load(path, allow_pickle=False) as data:
            return cls(data['cells'], data['se_y'], data['se_rgb'], data['pixels'], data['photo'],
                       [str(n) for n in data['names']])


def cell_errors(engine: RoutedEngine, lr: torch.Tensor, gt: np.ndarray) -> tuple[np.ndarray, ...]:
    """One LR image: its cells (uint8, as classified) and each branch's summed squared Y and RGB error per cell
    (whole-image outputs rounded to 8 bits), with each cell's HR pixel count."""
    scale = engine.scale
    grid = engine.grid(lr)
    boxes = cell_boxes(grid)
    target = torch.from_numpy(np.ascontiguousarray(gt[..., ::-1])).permute(2, 0, 1).float()  # RGB, 0-255
    target_y = _luma(target / 255.0)
    se_y = np.zeros((len(boxes), engine.num_classes))
    se_rgb = np.zeros_like(se_y)
    for branch in range(engine.num_classes):
        sr = engine.branch_full(lr, branch).cpu().clamp(0, 1).mul(255).round()
        err_y = (_luma(sr / 255.0) - target_y)**2
        err_rgb = ((sr - target)**2).mean(dim=0)
        for index, (y0, y1, x0, x1) in enumerate(boxes.tolist()):
            window = (slice(y0 * scale, y1 * scale), slice(x0 * scale, x1 * scale))
            se_y[index, branch] = float(err_y[window].sum())
            se_rgb[index, branch] = float(err_rgb[window].sum())
    pixels = ((boxes[:, 1] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 2]) * scale * scale).astype(np.float64)
    cells = engine.map_tiles(lr, lambda tiles: tiles.cpu(), grid).mul(255).round().to(torch.uint8).numpy()
    return cells, se_y, se_rgb, pixels


def collect_cells(net: torch.nn.Module,
                  photos: Sequence[Path],
                  scales: Sequence[float] = (1.0, ),
                  rotations: int = 1,
                  options: EngineOptions = EngineOptions()) -> tuple[CellData, list[str]]:
    """Cells and branch errors of every variant of every HR photo (see the module docstring); returns the data
    and the photos that could not be used, each with its reason."""
    engine = RoutedEngine(net, options)
    parts, names, failures = [], [], []
    jobs = [(path, s, r) for path in photos for s in scales for r in range(rotations)]
    for path, s, rotation in tqdm(jobs, desc='branches on training photos', unit='variant', file=sys.stderr):
        try:
            img, _ = read_image(path)
            img = np.ascontiguousarray(np.rot90(img, rotation))
            hr, lr, _ = make_pair(img, int(round(img.shape[1] * s)) if s < 1 else 0, engine.scale)
        except (SkipImage, ValueError) as exc:
            failures.append(f'{path}: {exc}')
            continue
        cells, se_y, se_rgb, pixels = cell_errors(engine, to_tensor(lr), hr)
        parts.append((cells, se_y, se_rgb, pixels, np.full(len(cells), len(names))))
        names.append(f'{path.name}@{s:g}r{rotation * 90}')
    if not parts:
        raise ValueError('no training photo could be used: ' + '; '.join(failures))
    joined = [np.concatenate([part[k] for part in parts]) for k in range(5)]
    return CellData(*joined, names), failures


def photo_paths(folders: Sequence[Path]) -> list[Path]:
    """Every image of ``folders`` (symlinks followed), sorted by folder then name."""
    paths = []
    for folder in folders:
        found = list_images(Path(folder))
        if not found:
            raise ValueError(f'{folder}: no images found (give a folder of HR photos)')
        paths += found
    return paths


def target_gains(mse: np.ndarray, loss: str) -> np.ndarray:
    """(N, M-1) gains ``mse_{j-1} - mse_j``, transformed for ``loss``."""
    gains = mse[:, :-1] - mse[:, 1:]
    if loss == 'sqrt':
        return np.sign(gains) * np.sqrt(np.abs(gains))
    if loss != 'l2':
        raise ValueError(f'loss must be one of {LOSSES}, got {loss!r}')
    return gains


def _dihedral(cells: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each cell flipped and rotated by one of the 8 symmetries of the square, chosen at random."""
    k = int(torch.randint(4, (1, ), generator=generator))
    cells = torch.rot90(cells, k, dims=(2, 3))
    return cells.flip(3) if bool(torch.randint(2, (1, ), generator=generator)) else cells


@dataclass
class FitResult:
    router: GainRouter
    history: list[float]  # mean training loss per epoch (target-scaled units)
    seconds: float


def fit_router(data: CellData,
               num_classes: int,
               target: str = 'y',
               loss: str = 'l2',
               num_feat: int = 16,
               hidden: int = 64,
               epochs: int = 20,
               batch: int = 256,
               lr: float = 1e-3,
               seed: int = 0) -> FitResult:
    """A ``GainRouter`` fitted to ``data`` (Adam, cosine rate, random flips and rotations of the cells)."""
    import time
    start = time.perf_counter()
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    router = GainRouter(num_classes=num_classes, num_feat=num_feat, hidden=hidden)
    cells = torch.from_numpy(data.cells)
    targets = target_gains(data.mse(target), loss)
    scale = float(np.sqrt((targets**2).mean())) or 1.0
    if loss == 'l2':
        router.gain_scale.fill_(scale)  # outputs in MSE units
    with torch.no_grad():
        feats = torch.cat([router.features(part.float() / 255) for part in cells.split(4096)])
        router.feature_mean.copy_(feats.mean(0))
        router.feature_std.copy_(feats.std(0).clamp_min(1e-6))
    targets_t = torch.from_numpy(targets / scale).float()
    optimizer = torch.optim.Adam(router.parameters(), lr=lr)
    steps = epochs * math.ceil(len(cells) / batch)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    history = []
    router.train()
    for _ in tqdm(range(epochs), desc='fitting the router', unit='epoch', file=sys.stderr):
        order = torch.randperm(len(cells), generator=generator)
        total = 0.0
        for index in order.split(batch):
            x = _dihedral(cells[index].float() / 255, generator)
            error = router.gains(x) - targets_t[index]
            step_loss = error.pow(2).mean()
            optimizer.zero_grad(set_to_none=True)
            step_loss.backward()
            optimizer.step()
            schedule.step()
            total += step_loss.item() * len(index)
        history.append(total / len(cells))
    router.eval()
    return FitResult(router, history, time.perf_counter() - start)


def with_router(network: dict, router: GainRouter, num_feat: int, hidden: int) -> dict:
    """``network`` (a CDNSRNet option dict) with its classifier replaced by ``router``'s options."""
    out = dict(network)
    out['classifier'] = {
        'type': 'GainRouter', 'num_classes': router.num_classes, 'num_feat': num_feat, 'hidden': hidden
    }
    return out


def routed_state(net: torch.nn.Module, router: GainRouter) -> dict[str, torch.Tensor]:
    """The state dict of ``net``'s branches with ``router`` as its classifier."""
    state = {k: v for k, v in net.state_dict().items() if not k.startswith('classifier.')}
    state.update({f'classifier.{k}': v for k, v in router.state_dict().items()})
    return state


def compare_router(routed: torch.nn.Module, images: list, budgets: Sequence[float], engine: RoutedEngine) -> dict:
    """The routers at set ``budgets`` over ``images`` (``analysis.run.collect_folders`` of the same branches,
    collected once; ``routed``'s classifier or router gives the learned router's scores): the oracle, this router
    and the Laplacian router, one eta each over the set, Y and RGB; regret on Y."""
    from cdnsr_plugin.analysis.run import analyze_images
    from cdnsr_plugin.inference.costs import cost_table
    for image in images:
        image.logits = engine.map_tiles(image.lr, lambda tiles: routed.classify(tiles.float()).double().cpu(),
                                        image.grid).numpy()
    analysis = analyze_images(images, cost_table(routed), routed.scale, budgets, ['oracle', 'learned', 'laplacian'],
                              'paper', 0, 'set')
    points = {(p.router, p.budget): p for p in analysis.points if p.budget is not None}
    rows = []
    for budget in budgets:
        learned, laplacian, oracle = (points[(r, budget)] for r in ('learned', 'laplacian', 'oracle'))
        rows.append({
            'budget': budget, 'oracle_psnr': oracle.psnr, 'learned_psnr': learned.psnr,
            'laplacian_psnr': laplacian.psnr, 'learned_regret': learned.regret, 'laplacian_regret': laplacian.regret,
            'regret_ratio': learned.regret / laplacian.regret if laplacian.regret else None,
            'oracle_psnr_rgb': oracle.psnr_rgb, 'learned_psnr_rgb': learned.psnr_rgb,
            'laplacian_psnr_rgb': laplacian.psnr_rgb, 'learned_executed_pct': learned.percent_of_full_image,
            'laplacian_executed_pct': laplacian.percent_of_full_image
        })
    return {
        'images': analysis.images, 'scope': 'set', 'tiling': analysis.tiling, 'budgets': rows,
        'mean_learned_regret': sum(r['learned_regret']
                                   for r in rows) / len(rows), 'backbone_full_psnr': analysis.backbone_full_psnr,
        'backbone_full_psnr_rgb': analysis.backbone_full_psnr_rgb, 'spearman': analysis.spearman,
        'branch_colour': analysis.branch_colour, 'branch_class_psnr': analysis.branch_class_psnr
    }


def describe_fit(data: CellData,
                 failures: list[str],
                 result: FitResult,
                 settings: dict,
                 validation: Optional[dict] = None) -> dict:
    """The fit's record (``fit.json``)."""
    return {
        'photos': sorted({name.split('@')[0]
                          for name in data.names}),
        'variants': len(data.names),
        'cells': int(len(data.cells)),
        'failures': failures,
        'settings': settings,
        'loss_per_epoch': result.history,
        'fit_seconds': result.seconds,
        'validation': validation,
    }
