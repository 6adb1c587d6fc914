"""Does routing beat a static network of the same cost? (``tools/equal_cost_frontier.py``)

Static networks of one family (e.g. CARN-M at several widths), trained with the same data and the same
training as the routed model's branches, each run on the whole image: their PSNR (Y and RGB) against their
MACs in % of the routed model's backbone on the whole image. Beside them the routed model at set budgets
(``analysis.routing``, scope ``set``: one eta for the folder, as the tester's ``--set-budget``; the images
as the engine renders them, x = the MACs that ran, halos, promotions and the router included), its oracle
and the Laplacian router.

The routed model's own branches are static networks of that kind when they were pretrained as this
project's recipes do (``routing: all``: every branch on every sub-image with its own loss; with Adam each
branch's updates are exactly those of training it alone on the same batches), so they are frontier points
too (``branches_as_statics``).

``gain_over_static``: per routed point, its PSNR minus the statics' PSNR interpolated linearly in cost at the
point's cost (between the two nearest statics; ``None`` outside their range). Positive: routing adds quality
that a static network of the same cost does not have.
"""
from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from basicsr.metrics import calculate_psnr
from basicsr.utils import tensor2img
from tqdm import tqdm

from cdnsr_plugin.analysis.routing import Analysis
from cdnsr_plugin.inference.costs import full_image_coefficients, full_image_cost
from cdnsr_plugin.utils.image import to_tensor
from cdnsr_plugin.utils.io import list_images, read_image


@dataclass
class StaticPoint:
    name: str
    macs_percent: float  # MACs on the whole images, % of the routed model's backbone on them
    psnr: float  # Y, mean over images
    psnr_rgb: float


@dataclass
class RoutedPoint:
    router: str
    budget: float
    macs_percent: Optional[float]
    psnr: float
    psnr_rgb: Optional[float]
    gain_over_static: Optional[float] = None  # Y, against the statics interpolated at this cost
    gain_over_static_rgb: Optional[float] = None


@dataclass
class Frontier:
    images: list[str]
    statics: list[StaticPoint]
    routed: list[RoutedPoint]
    backbone_full_psnr: Optional[float]
    backbone_full_psnr_rgb: Optional[float]
    branch_colour: Optional[list[dict]] = None  # each branch on the whole images (``routing.colour_errors``)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def static_points(statics: dict[str, torch.nn.Module], backbone: torch.nn.Module, lr_dir: Path, gt_dir: Path,
                  scale: int) -> tuple[list[StaticPoint], list[str]]:
    """Each static network on every whole LR image of ``lr_dir``, scored against ``gt_dir`` (Y and RGB)."""
    paths = list_images(lr_dir)
    backbone_coefficients = full_image_coefficients(backbone)
    coefficients = {name: full_image_coefficients(net) for name, net in statics.items()}
    scores = {name: ([], []) for name in statics}
    macs = dict.fromkeys(statics, 0.0)
    reference = 0.0
    for path in tqdm(paths, desc='static networks on whole images', unit='image', file=sys.stderr):
        lr, _ = read_image(path)
        gt, _ = read_image(Path(gt_dir) / path.name)
        if gt.shape[:2] != (lr.shape[0] * scale, lr.shape[1] * scale):
            raise ValueError(f'{Path(gt_dir) / path.name}: ground truth is not {scale} x {path}')
        x = to_tensor(lr)[None]
        reference += full_image_cost(backbone_coefficients, *lr.shape[:2])['macs']
        for name, net in statics.items():
            with torch.inference_mode():
                sr = tensor2img(net.eval()(x)[0], rgb2bgr=True, min_max=(0, 1))
            scores[name][0].append(calculate_psnr(sr, gt, scale, test_y_channel=True))
            scores[name][1].append(calculate_psnr(sr, gt, scale))
            macs[name] += full_image_cost(coefficients[name], *lr.shape[:2])['macs']
    points = [
        StaticPoint(name, 100.0 * macs[name] / reference, float(np.mean(y)), float(np.mean(rgb)))
        for name, (y, rgb) in scores.items()
    ]
    return sorted(points, key=lambda p: p.macs_percent), [p.stem for p in paths]


def interpolate(statics: Sequence[StaticPoint], cost: float, attribute: str) -> Optional[float]:
    """The statics' ``attribute`` at ``cost``, linear between the two nearest in cost; None outside."""
    xs = [p.macs_percent for p in statics]
    if len(xs) < 2 or not min(xs) <= cost <= max(xs):
        return None
    return float(np.interp(cost, xs, [getattr(p, attribute) for p in statics]))


def frontier(analysis: Analysis, statics: list[StaticPoint], names: list[str]) -> Frontier:
    """The routed points of ``analysis`` (set budgets) beside ``statics``, each with its gain over them."""
    routed = []
    for point in analysis.points:
        if point.budget is None:
            continue
        entry = RoutedPoint(point.router, point.budget, point.percent_of_full_image, point.psnr, point.psnr_rgb)
        if entry.macs_percent is not None:
            y = interpolate(statics, entry.macs_percent, 'psnr')
            rgb = interpolate(statics, entry.macs_percent, 'psnr_rgb')
            entry.gain_over_static = None if y is None else entry.psnr - y
            entry.gain_over_static_rgb = None if rgb is None or entry.psnr_rgb is None else entry.psnr_rgb - rgb
        routed.append(entry)
    return Frontier(names, statics, routed, analysis.backbone_full_psnr, analysis.backbone_full_psnr_rgb,
                    analysis.branch_colour)


def plot(result: Frontier, path: Path, title: str = '') -> Path:
    """Two panels, Y and RGB PSNR against MACs in % of the backbone on the whole image."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from cdnsr_plugin.utils.io import atomic_write
    figure = Figure(figsize=(11, 4.6))
    FigureCanvasAgg(figure)
    for index, (attribute, label) in enumerate((('psnr', 'PSNR Y (dB)'), ('psnr_rgb', 'PSNR RGB (dB)'))):
        ax = figure.add_subplot(1, 2, index + 1)
        ax.plot([p.macs_percent for p in result.statics], [getattr(p, attribute) for p in result.statics],
                'k-s',
                label='static networks (whole image)')
        for p in result.statics:
            ax.annotate(
                p.name, (p.macs_percent, getattr(p, attribute)),
                textcoords='offset points',
                xytext=(4, -10),
                fontsize=7)
        for router, style in (('learned', 'C0-o'), ('oracle', 'C2--^'), ('laplacian', 'C1:v')):
            points = sorted((p.macs_percent, getattr(p, attribute)) for p in result.routed
                            if p.router == router and p.macs_percent is not None and getattr(p, attribute) is not None)
            if points:
                ax.plot(*zip(*points), style, label=f'routed, {router} router')
        ax.set_xlabel('MACs executed, % of the backbone on the whole image')
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if index == 0:
            ax.legend(fontsize=8, loc='lower right')
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    import io
    buffer = io.BytesIO()
    figure.savefig(buffer, format='png', dpi=130)
    return atomic_write(path, buffer.getvalue())
