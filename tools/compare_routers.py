"""Routers of one set of branches compared on one folder: regret to the oracle and to the Laplacian router.

    python tools/compare_routers.py --model long=W/cdnsr_carn_x4_long.yml:W/cdnsr_carn_x4_long.pth \\
        --model gain=experiments/router_fit/network.yml:experiments/router_fit/net_g.pth \\
        --lr LR_DIR --gt HR_DIR --budgets 0.6,0.7 --json docs/results/routers.json

Every ``--model NAME=NETWORK.yml:WEIGHTS.pth`` must hold the same branches (checked, weight by weight); they
differ in their classifier or router. The branches run once on every image (seam-free regions, as the engine
executes them); then each model's router is the learned router of ``tools/analyze_routing.py --scope set``
(one eta over the folder at each budget; regret = the oracle's Y PSNR minus the router's), beside the oracle
and the Laplacian router. Prints one table; writes the JSON (every point, Y and RGB). (W: cdnsr_plugin/weights.)
"""
import argparse
import sys
from pathlib import Path

import torch

import cdnsr_plugin  # noqa: F401  (registers the plugin's archs)
from cdnsr_plugin.analysis.router_fit import compare_router
from cdnsr_plugin.analysis.run import collect_folders, load_routed
from cdnsr_plugin.inference.engine import EngineOptions, RoutedEngine
from cdnsr_plugin.tester.config import network_options
from cdnsr_plugin.utils.io import write_json


def model_arg(text: str) -> tuple[str, Path, Path]:
    name, sep, rest = text.partition('=')
    network, sep2, weights = rest.rpartition(':')
    if not (sep and sep2 and name and network and weights):
        raise argparse.ArgumentTypeError(f'--model takes NAME=NETWORK.yml:WEIGHTS.pth, got {text!r}')
    return name, Path(network), Path(weights)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', type=model_arg, action='append', required=True)
    parser.add_argument('--lr', type=Path, required=True)
    parser.add_argument('--gt', type=Path, required=True)
    parser.add_argument('--budgets', default='0.6,0.7')
    parser.add_argument('--json', type=Path, help='write every figure here')
    args = parser.parse_args(argv)
    try:
        budgets = [float(v) for v in args.budgets.split(',')]
        models = {name: load_routed(network_options(network), weights) for name, network, weights in args.model}
        first_name, first = next(iter(models.items()))
        for name, net in models.items():
            theirs, mine = first.branches.state_dict(), net.branches.state_dict()
            if theirs.keys() != mine.keys() or any(not torch.equal(theirs[k], mine[k]) for k in theirs):
                raise ValueError(f'--model {name}: its branches differ from {first_name}\'s; compare routers of '
                                 'one set of branches')
        engine = RoutedEngine(first, EngineOptions())
        images = collect_folders(engine, args.lr, args.gt, classifier=False)
        results = {name: compare_router(net, images, budgets, engine) for name, net in models.items()}
    except (ValueError, FileNotFoundError, KeyError) as exc:
        print(f'compare_routers: {exc}', file=sys.stderr)
        return 2
    print(f'{len(images)} images of {args.lr}; one eta per router over the set; regret on Y (dB)')
    print(f"{'model':<14}{'budget':>7}{'executed %':>11}{'PSNR Y':>9}{'PSNR RGB':>9}{'regret':>9}"
          f"{'laplacian':>10}{'ratio':>7}")
    for name, result in results.items():
        for row in result['budgets']:
            print(f"{name:<14}{row['budget']:>7.2f}{row['learned_executed_pct']:>11.1f}{row['learned_psnr']:>9.3f}"
                  f"{row['learned_psnr_rgb']:>9.3f}{row['learned_regret']:>+9.4f}{row['laplacian_regret']:>+10.4f}"
                  f"{row['regret_ratio']:>7.2f}")
    any_result = next(iter(results.values()))
    print(f"backbone on the whole image: Y {any_result['backbone_full_psnr']:.3f}, "
          f"RGB {any_result['backbone_full_psnr_rgb']:.3f} dB")
    if args.json:
        write_json(
            args.json, {
                'command': 'python tools/compare_routers.py ' + ' '.join(sys.argv[1:] if argv is None else argv),
                'lr': str(
                    args.lr), 'models': {name: {'network': str(n), 'weights': str(w)}
                                         for name, n, w in args.model}, 'results': results
            })
    return 0


if __name__ == '__main__':
    sys.exit(main())
