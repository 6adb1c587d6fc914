"""Routing against static networks of the same cost: the equal-cost frontier (cdnsr_plugin/analysis/frontier.py).

    python tools/equal_cost_frontier.py --network ROUTED.yml --checkpoint ROUTED.pth \\
        --branches-as-statics \\
        --static carn52=options/reference/train_static_carn52_x4.yml:STATIC_WEIGHTS.pth \\
        --lr LR_DIR --gt HR_DIR --out results/frontier [--budgets 0.4,0.5,0.6,0.7,0.8] [--json docs/results/X.json]

Statics: ``--static NAME=OPTIONS.yml:WEIGHTS.pth`` (an option file with network_g, BasicSR weights; repeat),
and with ``--branches-as-statics`` the routed model's own branches (static networks trained like the statics
when the branches were pretrained on every sub-image, as this project's recipes do). Each static runs on the
whole image; the routed model runs at each set budget with its learned router, the oracle and the Laplacian
router. Writes OUT/frontier.json, OUT/frontier.png (PSNR Y and RGB against MACs in % of the backbone on the
whole image) and, with --json, the same JSON there.
"""
import argparse
import sys
from pathlib import Path

from basicsr.archs import build_network

import cdnsr_plugin  # noqa: F401  (registers the plugin's archs)
from cdnsr_plugin.analysis.frontier import frontier, plot, static_points
from cdnsr_plugin.analysis.run import analyze_folders, load_routed
from cdnsr_plugin.inference.engine import EngineOptions
from cdnsr_plugin.tester.config import network_options
from cdnsr_plugin.utils.checkpoint import load_weights
from cdnsr_plugin.utils.io import write_json


def static_arg(text: str) -> tuple[str, Path, Path]:
    name, sep, rest = text.partition('=')
    options, sep2, weights = rest.rpartition(':')
    if not (sep and sep2 and name and options and weights):
        raise argparse.ArgumentTypeError(f'--static takes NAME=OPTIONS.yml:WEIGHTS.pth, got {text!r}')
    return name, Path(options), Path(weights)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--network', type=Path, required=True, help='option file of the routed network')
    parser.add_argument('--checkpoint', type=Path, required=True, help='its weights')
    parser.add_argument('--static', type=static_arg, action='append', default=[], help='NAME=OPTIONS.yml:WEIGHTS.pth')
    parser.add_argument('--branches-as-statics', action='store_true', help='the routed model\'s branches as statics')
    parser.add_argument('--lr', type=Path, required=True)
    parser.add_argument('--gt', type=Path, required=True)
    parser.add_argument('--budgets', default='0.4,0.5,0.6,0.7,0.8', help='set budgets of the routed model')
    parser.add_argument('--out', type=Path, required=True)
    parser.add_argument('--json', type=Path, help='also write the JSON here (e.g. docs/results/)')
    parser.add_argument('--title', default='')
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        budgets = [float(v) for v in args.budgets.split(',')]
        net = load_routed(network_options(args.network), args.checkpoint)
        statics = {}
        if args.branches_as_statics:
            for index, branch in enumerate(net.branches):
                width = getattr(branch, 'num_feat', None) or net.branch_opts[index].get('num_feat', index)
                statics[f'{type(branch).__name__}-{width} (branch {index})'] = branch
        for name, options, weights in args.static:
            static = build_network(dict(network_options(options)))
            load_weights(static, weights)
            statics[name] = static
        if not statics:
            raise ValueError('give --static NAME=OPTIONS.yml:WEIGHTS.pth or --branches-as-statics')
        points, names = static_points(statics, net.branches[-1], args.lr, args.gt, net.scale)
        analysis = analyze_folders(net, args.lr, args.gt, budgets, ['oracle', 'learned', 'laplacian'], 'macs', 0, None,
                                   EngineOptions(), 'set')
    except (ValueError, FileNotFoundError, KeyError) as exc:
        print(f'equal_cost_frontier: {exc}', file=sys.stderr)
        return 2
    result = frontier(analysis, points, names)
    result.notes.append(f'network {args.network}, checkpoint {args.checkpoint}; images {args.lr}')
    args.out.mkdir(parents=True, exist_ok=True)
    written = [
        write_json(args.out / 'frontier.json', result.to_dict()),
        plot(result, args.out / 'frontier.png', args.title)
    ]
    if args.json:
        written.append(write_json(args.json, result.to_dict()))
    for p in result.statics:
        print(f'static {p.name:<28} {p.macs_percent:6.1f}% MACs  Y {p.psnr:.3f}  RGB {p.psnr_rgb:.3f}')
    for p in result.routed:
        gain = '' if p.gain_over_static is None else f'  vs static at equal cost: Y {p.gain_over_static:+.3f}'
        if p.gain_over_static_rgb is not None:
            gain += f', RGB {p.gain_over_static_rgb:+.3f}'
        print(f'routed {p.router:<9} budget {p.budget:.2f} {p.macs_percent or 0:6.1f}% MACs  Y {p.psnr:.3f}  '
              f'RGB {p.psnr_rgb:.3f}{gain}')
    print('written: ' + ', '.join(map(str, written)))
    return 0


if __name__ == '__main__':
    sys.exit(main())
