"""Writers of a routing ``Analysis``: ``analysis.json``, ``analysis.md`` and the PSNR-FLOPs plot of every router."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from cdnsr_plugin.analysis.routing import ROUTERS, Analysis
from cdnsr_plugin.utils.io import atomic_write, write_json
from cdnsr_plugin.utils.viz import plot_psnr_flops

CLASS_NAMES = {2: ('simple', 'hard'), 3: ('simple', 'medium', 'hard')}


def _number(value: Optional[float], spec: str = '.2f') -> str:
    return '-' if value is None else format(value, spec)


def branch_table_markdown(analysis: Analysis) -> list[str]:
    classes = len(analysis.branch_class_psnr)
    names = CLASS_NAMES.get(classes, tuple(f'class {k}' for k in range(classes)))
    header = ' | '.join(f'{name} ({low:.1f}-{high:.1f} dB)'
                        for name, (low, high) in zip(names, analysis.class_psnr_bounds))
    lines = [f'| branch | {header} |', '| --- |' + ' --- |' * classes]
    for j, row in enumerate(analysis.branch_class_psnr):
        lines.append(f'| {j} | ' + ' | '.join(f'{value:.2f}' for value in row) + ' |')
    return lines


def routers_markdown(analysis: Analysis) -> list[str]:
    routers = [router for router in ROUTERS if any(p.router == router for p in analysis.points)]
    budgets = sorted({p.budget for p in analysis.points if p.budget is not None})
    lines = [
        '| budget | ' + ' | '.join(f'{router} PSNR Y / RGB (FLOPs %, executed % of whole image, regret)'
                                   for router in routers) + ' |', '| --- |' + ' --- |' * len(routers)
    ]
    for budget in budgets:
        cells = []
        for router in routers:
            point = next((p for p in analysis.points if p.router == router and p.budget == budget), None)
            cells.append('-' if point is None else f'{point.psnr:.3f} / {_number(point.psnr_rgb, ".3f")} '
                         f'({100 * point.flops_fraction:.1f}, '
                         f'{_number(point.percent_of_full_image, ".1f")}, {_number(point.regret, "+.3f")})')
        lines.append(f'| {budget:.2f} | ' + ' | '.join(cells) + ' |')
    return lines


SCOPE_TEXT = {'image': 'each image meeting the budget', 'set': 'one eta per router over the whole set'}


def to_markdown(analysis: Analysis, title: str = 'Routing analysis') -> str:
    """The analysis as Markdown tables (PSNR: BasicSR's, on Y and on RGB, crop = scale, mean over images; the
    regret is on Y, what the routers are compared on)."""
    tiles = ('non-overlapping 32x32 LR cells, executed as seam-free regions (exact halo)'
             if analysis.tiling == 'regions' else '32x32 LR, stride 28, overlaps averaged')
    lines = [
        f'## {title}', '', f'{len(analysis.images)} images, {analysis.tiles} tiles ({tiles}); FLOPs '
        f'in the {analysis.convention} convention, per tile, as % of the largest branch, the router\'s own cost '
        'included; executed %: the MACs that ran (halos, promotions and the router included) in % of the '
        'largest branch on the whole image.', '',
        '**Branch x difficulty class** (classes: terciles of the largest branch\'s tile PSNR; '
        'cells: PSNR over the class\'s tiles):', '', *branch_table_markdown(analysis), '',
        f'**Routers at equal budgets**, {SCOPE_TEXT[analysis.scope]} (regret: oracle PSNR minus the router\'s):', '',
        *routers_markdown(analysis), ''
    ]
    argmax = next((p for p in analysis.points if p.router == 'learned' and p.budget is None), None)
    if argmax is not None:
        shares = '/'.join(f'{100 * s:.0f}%' for s in argmax.class_shares)
        gap = None if analysis.soft_psnr is None else analysis.soft_psnr - analysis.hard_psnr
        lines += [
            f'- learned router, its own argmax: {argmax.psnr:.3f} dB at {100 * argmax.flops_fraction:.1f}% '
            f'(classes {shares})', f'- soft (ClassSR eq. 1) vs hard routing: {_number(analysis.soft_psnr, ".3f")} vs '
            f'{_number(analysis.hard_psnr, ".3f")} dB (gap {_number(gap, ".3f")})',
            f'- Spearman correlation, classifier preference vs oracle gain: {_number(analysis.spearman, ".3f")}',
            f'- mean largest class probability: {_number(analysis.mean_max_probability, ".3f")}'
        ]
    if analysis.branch_colour:
        lines += [
            '', '**Each branch on the whole images** (mean MSE, 8-bit range; bias: mean signed error per channel, '
            'output minus ground truth):', '', '| branch | Y | Cb | Cr | RGB | bias R, G, B |',
            '| --- | --- | --- | --- | --- | --- |'
        ]
        for j, row in enumerate(analysis.branch_colour):
            bias = ', '.join(f'{v:+.2f}' for v in row['bias_rgb'])
            lines.append(f"| {j} | {row['mse_y']:.2f} | {row['mse_cb']:.2f} | {row['mse_cr']:.2f} | "
                         f"{row['mse_rgb']:.2f} | {bias} |")
        lines.append('')
    full = analysis.backbone_full_flops_fraction
    lines.append(f'- backbone patch-wise (papers\' tiles): {_number(analysis.backbone_patchwise_psnr, ".3f")} dB at '
                 f'100% (executed {_number(analysis.backbone_patchwise_percent_of_full, ".1f")}% of the whole image); '
                 f'on the whole image: {_number(analysis.backbone_full_psnr, ".3f")} dB '
                 f'(RGB {_number(analysis.backbone_full_psnr_rgb, ".3f")} dB) at '
                 f'{_number(None if full is None else 100 * full, ".1f")}%')
    return '\n'.join(lines) + '\n'


def plot(analysis: Analysis, path: Path, title: str = '') -> Path:
    """PSNR against FLOPs % for every router, with the argmax and the backbone (patch-wise, whole image).
    Regions: x is the MACs executed in % of the backbone on the whole image; papers' tiling: the per-tile cost
    in % of the largest branch (the papers' axis)."""
    executed = analysis.tiling == 'regions'

    def x(point) -> Optional[float]:
        return point.percent_of_full_image if executed else 100 * point.flops_fraction

    series = []
    for router in ROUTERS:
        points = sorted(
            (x(p), p.psnr) for p in analysis.points if p.router == router and p.budget is not None and x(p) is not None)
        if points:
            series.append({'label': router, 'points': points, 'style': 'line'})
    argmax = next((p for p in analysis.points if p.router == 'learned' and p.budget is None), None)
    if argmax is not None and x(argmax) is not None:
        series.append({'label': 'learned, argmax', 'points': [(x(argmax), argmax.psnr)], 'style': 'point'})
    patchwise_x = analysis.backbone_patchwise_percent_of_full if executed else 100.0
    if analysis.backbone_patchwise_psnr is not None and patchwise_x is not None:
        series.append({
            'label': 'backbone patch-wise (papers\' tiles)',
            'points': [(patchwise_x, analysis.backbone_patchwise_psnr)], 'style': 'point'
        })
    full_x = 100.0 if executed else (None if analysis.backbone_full_flops_fraction is None else 100 *
                                     analysis.backbone_full_flops_fraction)
    if full_x is not None and analysis.backbone_full_psnr is not None:
        series.append(
            {'label': 'backbone whole image', 'points': [(full_x, analysis.backbone_full_psnr)], 'style': 'point'})
    xlabel = 'MACs executed, % of the largest branch on the whole image' if executed else None
    return plot_psnr_flops(series, path, analysis.convention, title, xlabel=xlabel)


def write(analysis: Analysis, folder: Path, title: str = 'Routing analysis') -> list[Path]:
    """``analysis.json``, ``analysis.md`` and ``analysis.png`` in ``folder``, each written atomically."""
    folder = Path(folder)
    return [
        write_json(folder / 'analysis.json', analysis.to_dict()),
        atomic_write(folder / 'analysis.md',
                     to_markdown(analysis, title).encode('utf-8')),
        plot(analysis, folder / 'analysis.png', title)
    ]
