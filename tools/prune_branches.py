"""Build a routed network's smaller branches by channel pruning a trained largest one (CDNSR Sec. III-A).

    python tools/prune_branches.py --network options/networks/CDNSR_FSRCNN_x4.yml \\
        --checkpoint experiments/FSRCNN_x4/models/net_g_latest.pth --out experiments/pruned_branches

``--checkpoint`` holds the trained largest branch: a plain checkpoint of that arch (e.g. a BasicSR MSRResNet or
the plugin's FSRCNN trained alone) or a CDNSRNet checkpoint (its last branch is used). Writes
OUT/branch<i>.pth for every branch (the largest unchanged, the others its largest-L1 channels at their widths;
cdnsr_plugin/archs/pruning.py says which layers each arch prunes) and prints the path.* lines to put in a
training option file, whose stages then fine-tune each branch (e.g. on its class with routing: labels).
A training stage with ``prune: true`` does the same inside one training run.
"""
import argparse
import io
import sys
from pathlib import Path

import torch
from basicsr.archs import build_network

import cdnsr_plugin  # noqa: F401  (registers the plugin's archs)
from cdnsr_plugin.archs.pruning import DEFAULT_WIDTHS, WIDTH_KEYS, prune
from cdnsr_plugin.tester.config import network_options
from cdnsr_plugin.utils.checkpoint import load_weights, read_state_dict
from cdnsr_plugin.utils.io import atomic_write


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--network', type=Path, required=True, help='option file with network_g (a CDNSRNet)')
    parser.add_argument('--checkpoint', type=Path, required=True, help='the trained largest branch (.pth)')
    parser.add_argument('--out', type=Path, required=True, help='folder for branch<i>.pth')
    args = parser.parse_args(argv)
    try:
        network = network_options(args.network)
        branch_opts = network.get('branches') or []
        if network.get('type') != 'CDNSRNet' or not branch_opts:
            raise ValueError(f'{args.network}: network_g must be a CDNSRNet with branches')
        largest_opt = dict(branch_opts[-1])
        largest = build_network(dict(largest_opt))
        state = read_state_dict(args.checkpoint)
        if any(key.startswith('branches.') for key in state):  # a CDNSRNet checkpoint: its last branch
            prefix = f'branches.{len(branch_opts) - 1}.'
            state = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
            largest.load_state_dict(state)
        else:
            load_weights(largest, args.checkpoint)
        key = WIDTH_KEYS.get(largest_opt['type'])
        if key is None:
            raise ValueError(f'{largest_opt["type"]} has no pruning layout (see cdnsr_plugin/archs/pruning.py)')
        args.out.mkdir(parents=True, exist_ok=True)
        lines = []
        for index, opt in enumerate(branch_opts):
            width = int(opt.get(key, DEFAULT_WIDTHS[largest_opt['type']]))
            _, branch = prune(largest_opt, largest, width)
            path = args.out / f'branch{index}.pth'
            buffer = io.BytesIO()
            torch.save({'params': branch.state_dict()}, buffer)
            atomic_write(path, buffer.getvalue())
            lines.append(f'  pretrain_network_branch{index}: {path}')
    except (ValueError, FileNotFoundError, KeyError) as exc:
        print(f'prune_branches: {exc}', file=sys.stderr)
        return 2
    print('path:\n' + '\n'.join(lines))
    return 0


if __name__ == '__main__':
    sys.exit(main())
