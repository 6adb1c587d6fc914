"""Per-branch FLOPs table of the network in an option file.

    python tools/count_flops.py -opt options/networks/CDNSR_FSRCNN_x4.yml [--patch 32] [--json]

Reads ``network_g`` (a ``CDNSRNet`` or any single registered arch) and prints the classifier's and
each branch's cost on one LR patch in two conventions, ``paper`` and ``macs`` (see
cdnsr_plugin/routing/flops.py). ``--json`` prints one JSON object instead.
"""
import argparse
import json
import logging
import sys
from pathlib import Path

from basicsr.archs import build_network

import cdnsr_plugin  # noqa: F401  (registers the plugin's archs)
from cdnsr_plugin.compat import load_yaml
from cdnsr_plugin.inference.costs import cost_table, format_table


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('-opt', required=True, help='option YAML file with a network_g section')
    parser.add_argument('--patch', type=int, default=32, help='LR patch side (default 32)')
    parser.add_argument('--json', action='store_true', help='print one JSON object')
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        print(describe(Path(args.opt), args))
    except ValueError as exc:  # an unreadable option file included (compat.OptionFileError)
        print(f'count_flops: {exc}', file=sys.stderr)
        return 2
    return 0


def describe(path: Path, args: argparse.Namespace) -> str:
    if not path.is_file():
        raise ValueError(f'option file {path} does not exist')
    opt = load_yaml(str(path))
    if not isinstance(opt, dict) or 'network_g' not in opt:
        raise ValueError(f'{path} has no network_g section; add network_g: {{type: CDNSRNet, ...}}')
    logging.getLogger('basicsr').setLevel(logging.WARNING)
    try:
        net = build_network(opt['network_g'])
        table = cost_table(net, patch=args.patch)
    except ValueError as exc:
        raise ValueError(f'{path}: network_g.{exc}') from None
    return json.dumps(table.to_dict(), indent=2) if args.json else format_table(table)


if __name__ == '__main__':
    sys.exit(main())
