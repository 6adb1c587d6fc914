"""Analyse a routed checkpoint on LR/HR folders: the steps behind ``tools/analyze_routing.py``."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, Sequence

import torch
from basicsr.archs import build_network
from tqdm import tqdm

from cdnsr_plugin.analysis.routing import DEFAULT_BUDGETS, ROUTERS, Analysis, ImageTiles, analyze, collect
from cdnsr_plugin.inference.costs import CostTable, cost_table
from cdnsr_plugin.inference.engine import EngineOptions, RoutedEngine
from cdnsr_plugin.utils.checkpoint import load_weights
from cdnsr_plugin.utils.image import to_tensor
from cdnsr_plugin.utils.io import list_images, read_image


def load_routed(network: dict, checkpoint: Optional[Path]) -> torch.nn.Module:
    """The ``CDNSRNet`` of ``network`` with the weights of ``checkpoint`` (random weights without one)."""
    if network.get('type') != 'CDNSRNet':
        raise ValueError(f"network_g.type is {network.get('type')!r}: the analysis compares the branches and the "
                         'classifier of a CDNSRNet')
    net = build_network(dict(network))
    if checkpoint is not None:
        load_weights(net, checkpoint)
    return net.eval()


def collect_folders(engine: RoutedEngine,
                    lr_dir: Path,
                    gt_dir: Path,
                    classifier: bool = True,
                    limit: Optional[int] = None) -> list[ImageTiles]:
    """Every LR image of ``lr_dir`` with its namesake in ``gt_dir`` (exactly ``scale`` x the LR), every branch
    run on every tile (``routing.collect``); ``classifier``: also the network's classifier logits."""
    net = engine.net
    coefficients = engine.coefficients[-1]
    images = []
    for path in tqdm(list_images(lr_dir)[:limit], desc='branches on every tile', unit='image', file=sys.stderr):
        lr, _ = read_image(path)
        gt, _ = read_image(Path(gt_dir) / path.name)
        if gt.shape[:2] != (lr.shape[0] * net.scale, lr.shape[1] * net.scale):
            raise ValueError(f'{Path(gt_dir) / path.name}: ground truth is not {net.scale} x {path}')
        images.append(
            collect(engine, path.stem, to_tensor(lr), gt, classifier=classifier, full_coefficients=coefficients))
    return images


def analyze_images(images: Sequence[ImageTiles],
                   table: CostTable,
                   scale: int,
                   budgets: Sequence[float] = DEFAULT_BUDGETS,
                   routers: Sequence[str] = ROUTERS,
                   convention: str = 'paper',
                   seed: int = 0,
                   scope: str = 'image') -> Analysis:
    """``routing.analyze`` with a progress bar."""
    progress = tqdm(desc='routers at budgets', total=len(routers) * len(budgets), file=sys.stderr)

    def step(message: str) -> None:
        progress.set_postfix_str(message)
        progress.update()

    try:
        return analyze(images, table, scale, budgets, routers, convention, seed, step, scope)
    finally:
        progress.close()


def analyze_folders(net: torch.nn.Module,
                    lr_dir: Path,
                    gt_dir: Path,
                    budgets: Sequence[float] = DEFAULT_BUDGETS,
                    routers: Sequence[str] = ROUTERS,
                    convention: str = 'paper',
                    seed: int = 0,
                    limit: Optional[int] = None,
                    options: EngineOptions = EngineOptions(),
                    scope: str = 'image') -> Analysis:
    """Every LR image of ``lr_dir`` with its namesake in ``gt_dir`` (exactly ``scale`` x the LR), analysed.
    ``options``: the engine's tiling (default: regions, scored as with the exact halo; the executed costs
    count the halo of ``options``, by default the backbone's); ``scope``: budgets met per image or over the
    set (``routing.analyze``)."""
    engine = RoutedEngine(net, options)
    table = cost_table(net, patch=engine.options.patch)
    images = collect_folders(engine, lr_dir, gt_dir, 'learned' in routers, limit)
    return analyze_images(images, table, net.scale, budgets, routers, convention, seed, scope)
