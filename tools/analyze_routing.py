"""How well does a trained routed network route? Branch quality per tile, the oracle frontier, and routers
compared at equal budgets (see cdnsr_plugin/analysis/routing.py for every definition).

    python tools/analyze_routing.py --checkpoint experiments/NAME/models/net_g_latest.pth \\
        --lr LR_DIR --gt HR_DIR --out results/NAME_routing [--budgets 0.4,0.5,0.55,0.65,0.8] [--scope set]

Default tiling: seam-free regions (each branch once on the whole image, each 32x32 cell keeps its part;
costs as executed, halos and promotions included); ``--tiling paper`` for the papers' 32/28 tiles.
Writes OUT/analysis.json (every number), OUT/analysis.md (the tables) and OUT/analysis.png (PSNR against
FLOPs for the oracle, the learned router with its cost knob, the Laplacian router, random routing, the
classifier's argmax and the backbone patch-wise and on the whole image).
"""
import argparse
import sys
from pathlib import Path

import cdnsr_plugin  # noqa: F401  (registers the plugin's archs)
from cdnsr_plugin.analysis.report import to_markdown, write
from cdnsr_plugin.analysis.routing import DEFAULT_BUDGETS, ROUTERS
from cdnsr_plugin.analysis.run import analyze_folders, load_routed
from cdnsr_plugin.inference.engine import EngineOptions
from cdnsr_plugin.tester.config import find_experiment_options, halo_type, network_options


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--checkpoint', type=Path, required=True, help='weights of the routed network (.pth)')
    parser.add_argument(
        '--network',
        type=Path,
        help='option file with network_g (default: the option file BasicSR '
        'saved in the checkpoint\'s experiment folder)')
    parser.add_argument('--lr', type=Path, required=True, help='folder of LR images')
    parser.add_argument('--gt', type=Path, required=True, help='folder of HR images with the same names')
    parser.add_argument('--out', type=Path, required=True, help='folder for analysis.json/.md/.png')
    parser.add_argument(
        '--budgets',
        default=','.join(map(str, DEFAULT_BUDGETS)),
        help='comma-separated FLOPs budgets, fractions of the largest branch (default %(default)s)')
    parser.add_argument('--routers', default=','.join(ROUTERS), help='subset of ' + ', '.join(ROUTERS))
    parser.add_argument('--convention', choices=('paper', 'macs'), default='paper')
    parser.add_argument('--limit', type=int, help='only the first N images')
    parser.add_argument('--seed', type=int, default=0, help='seed of the random router')
    parser.add_argument(
        '--scope',
        choices=('image', 'set'),
        default='image',
        help='image (default): every image meets each budget (the tester\'s --budget); set: one eta for all '
        'images, the set\'s mean per-tile cost within each budget (as the tester\'s --set-budget does with the '
        'executed cost)')
    parser.add_argument(
        '--tiling',
        choices=('regions', 'paper'),
        default='regions',
        help='regions (default): seam-free cells, scored with the exact halo, costed with --halo; paper: 32/28 '
        'tiles, overlaps averaged (the papers)')
    parser.add_argument(
        '--halo', type=halo_type, help='regions: the halo the executed costs count (default: the backbone\'s)')
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        network = network_options(args.network or find_experiment_options(args.checkpoint))
        net = load_routed(network, args.checkpoint)
        budgets = [float(v) for v in args.budgets.split(',')]
        routers = [r.strip() for r in args.routers.split(',')]
        unknown = sorted(set(routers) - set(ROUTERS))
        if unknown:
            raise ValueError(f'--routers: unknown {unknown}; choose among {ROUTERS}')
        options = EngineOptions(tiling=args.tiling, halo=args.halo)
        analysis = analyze_folders(net, args.lr, args.gt, budgets, routers, args.convention, args.seed, args.limit,
                                   options, args.scope)
    except (ValueError, FileNotFoundError, KeyError) as exc:
        print(f'analyze_routing: {exc}', file=sys.stderr)
        return 2
    paths = write(analysis, args.out, f'Routing analysis of {args.checkpoint}')
    print(to_markdown(analysis, f'Routing analysis of {args.checkpoint}'))
    print('Written: ' + ', '.join(str(p) for p in paths))
    return 0


if __name__ == '__main__':
    sys.exit(main())
