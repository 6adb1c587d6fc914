"""Fit a GainRouter to a trained routed network, its branches frozen (cdnsr_plugin/analysis/router_fit.py).

    python tools/fit_router.py --checkpoint cdnsr_plugin/weights/cdnsr_carn_x4_long.pth \\
        --network cdnsr_plugin/weights/cdnsr_carn_x4_long.yml --photos datasets/srcsplit/train \\
        --val-lr datasets/srcsets/val/Testfull/LR_bicubic/X4 --val-gt datasets/srcsets/val/Testfull/HR \\
        --out experiments/router_fit [--target y,mixed --num-feat 0,16 ...] [--scales 1,0.6] [--rotations 2]

Settings given as comma-separated lists are all fitted; each is scored on the validation source (one eta over
the set at each of --budgets, the regions engine as it runs: oracle, this router, the Laplacian router; regret
on Y, RGB beside it), and the one with the least mean regret is kept. Choose on a source the router was not
fitted on (tools/source_split.py), never on the held-out photos.

Writes OUT/net_g.pth (the branches unchanged, the router as classifier; BasicSR's {'params': ...} layout),
OUT/network.yml (network_g with classifier type GainRouter), OUT/cells.npz (the branches' errors on every
training cell: reused by a later fit with --cells) and OUT/fit.json (every candidate's settings, loss and
validation; the kept one's photos and loss per epoch).
"""
import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
import yaml

import cdnsr_plugin  # noqa: F401  (registers the plugin's archs)
from cdnsr_plugin.analysis.router_fit import (LOSSES, TARGETS, CellData, collect_cells, compare_router, describe_fit,
                                              fit_router, photo_paths, routed_state, with_router)
from cdnsr_plugin.analysis.run import collect_folders, load_routed
from cdnsr_plugin.inference.engine import EngineOptions, RoutedEngine
from cdnsr_plugin.tester.config import network_options
from cdnsr_plugin.utils.io import atomic_write, write_json


def floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(',')]
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected comma-separated numbers, got {text!r}') from None
    return values


def ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(',')]
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected comma-separated integers, got {text!r}') from None


def choices(allowed):

    def parse(text: str) -> list[str]:
        values = text.split(',')
        bad = [v for v in values if v not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f'{bad}: choose among {allowed}')
        return values

    return parse


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--checkpoint', type=Path, required=True, help='weights of the routed network (.pth)')
    parser.add_argument('--network', type=Path, required=True, help='option file with its network_g')
    parser.add_argument('--photos', type=Path, nargs='+', help='folders of HR training photos')
    parser.add_argument('--cells', type=Path, help='cells.npz of an earlier fit of the same network (skips --photos)')
    parser.add_argument('--out', type=Path, required=True, help='output folder (must not exist, or be empty)')
    parser.add_argument('--scales', type=floats, default=[1.0, 0.6], help='photo sizes used (default 1,0.6)')
    parser.add_argument('--rotations', type=int, choices=(1, 2), default=2, help='2: also each photo rotated 90')
    grid = parser.add_argument_group('settings (comma-separated lists: every combination is fitted and, with '
                                     '--val-lr/--val-gt, the one with the least mean regret is kept)')
    grid.add_argument('--target', type=choices(TARGETS), default=['y'], help='error the gains are measured on')
    grid.add_argument('--loss', type=choices(LOSSES), default=['l2'])
    grid.add_argument('--num-feat', type=ints, default=[16], help='conv trunk width; 0: hand features only')
    grid.add_argument('--hidden', type=ints, default=[64])
    grid.add_argument('--seed', type=ints, default=[0])
    parser.add_argument('--epochs', type=int, default=20)
    parser.add_argument('--batch', type=int, default=256)
    parser.add_argument('--lr', type=float, default=1e-3)
    parser.add_argument('--val-lr', type=Path, help='LR folder of the validation source')
    parser.add_argument('--val-gt', type=Path, help='HR folder of the validation source')
    parser.add_argument('--budgets', type=floats, default=[0.6, 0.7], help='set budgets compared (default 0.6,0.7)')
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.out.exists() and any(args.out.iterdir()):
            raise ValueError(f'--out {args.out} exists and is not empty: give a new folder')
        if (args.val_lr is None) != (args.val_gt is None):
            raise ValueError('give both --val-lr and --val-gt, or neither')
        if args.cells is None and not args.photos:
            raise ValueError('give --photos (folders of HR training photos) or --cells (an earlier fit\'s cells.npz)')
        network = network_options(args.network)
        net = load_routed(network, args.checkpoint)
        combos = list(itertools.product(args.target, args.loss, args.num_feat, args.hidden, args.seed))
        if len(combos) > 1 and args.val_lr is None:
            raise ValueError('several settings need --val-lr/--val-gt to choose among them')
        args.out.mkdir(parents=True, exist_ok=True)
        failures = []
        if args.cells is not None:
            data = CellData.load(args.cells)
        else:
            data, failures = collect_cells(net, photo_paths(args.photos), args.scales, args.rotations)
            data.save(args.out / 'cells.npz')
        if data.se_y.shape[1] != net.num_classes:
            raise ValueError(f'{args.cells}: cells of a network with {data.se_y.shape[1]} branches, this one has '
                             f'{net.num_classes}')
        engine = RoutedEngine(net, EngineOptions())
        images = collect_folders(engine, args.val_lr, args.val_gt, classifier=False) if args.val_lr else None
        candidates = []
        for target, loss, num_feat, hidden, seed in combos:
            result = fit_router(data, net.num_classes, target, loss, num_feat, hidden, args.epochs, args.batch, args.lr,
                                seed)
            new_network = with_router(network, result.router, num_feat, hidden)
            routed = load_routed(new_network, None)
            routed.load_state_dict(routed_state(net, result.router))
            settings = {'target': target, 'loss': loss, 'num_feat': num_feat, 'hidden': hidden, 'seed': seed}
            validation = compare_router(routed, images, args.budgets, engine) if images else None
            candidates.append((settings, result, new_network, routed, validation))
            if validation:
                print(
                    f"{settings}: mean regret {validation['mean_learned_regret']:+.4f} dB; " + ', '.join(
                        f"{row['budget']}: {row['learned_regret']:+.4f} vs laplacian {row['laplacian_regret']:+.4f}"
                        for row in validation['budgets']),
                    file=sys.stderr)
    except (ValueError, FileNotFoundError, KeyError) as exc:
        print(f'fit_router: {exc}', file=sys.stderr)
        return 2
    best = min(candidates, key=lambda c: c[4]['mean_learned_regret'] if c[4] else 0.0)
    settings, result, new_network, routed, validation = best
    tmp = args.out / 'net_g.pth.tmp'
    torch.save({'params': routed.state_dict()}, tmp)
    tmp.replace(args.out / 'net_g.pth')
    plain = json.loads(json.dumps(new_network))  # option loaders give OrderedDicts; YAML wants plain ones
    atomic_write(
        args.out / 'network.yml',
        yaml.safe_dump({'name': args.out.name, 'scale': routed.scale, 'network_g': plain}, sort_keys=False).encode())
    common = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    record = describe_fit(data, failures, result, {**common, **settings}, validation)
    record['candidates'] = [{
        'settings': c[0], 'fit_seconds': c[1].seconds, 'final_loss': c[1].history[-1], 'validation': c[4]
    } for c in candidates]
    write_json(args.out / 'fit.json', record)
    print(f'kept {settings}: fitted on {len(data.cells)} cells of {len(data.names)} photo variants in '
          f'{result.seconds:.0f} s; final loss {result.history[-1]:.4f}')
    for row in (validation or {}).get('budgets', []):
        print(f"set budget {row['budget']}: regret learned {row['learned_regret']:+.4f} dB, laplacian "
              f"{row['laplacian_regret']:+.4f} dB (ratio {row['regret_ratio']:.2f})")
    for failure in failures:
        print(f'skipped {failure}', file=sys.stderr)
    print(f'written: {args.out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
