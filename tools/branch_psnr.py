"""PSNR of every branch of a CDNSRNet on its own, on whole images, for one or more checkpoints.

    python tools/branch_psnr.py --network cdnsr_demo/train_CDNSR_FSRCNN_demo.yml \
        --checkpoints cdnsr_demo/experiments/CDNSR_FSRCNN_x4_demo/models \
        --lr cdnsr_demo/test/LR_bicubic/X4/coffee.png --gt cdnsr_demo/test/HR/coffee.png

A diagnostic for training: a branch that the classifier stops using can drift (docs/RESULTS.md, "Training
pitfall"), which routed PSNR hides until a cost knob or another router sends patches to it. Each branch
runs on the whole LR image (no tiles); PSNR is BasicSR's on Y with ``crop_border = scale``.
"""
import argparse
import re
import sys
from pathlib import Path

import torch
from basicsr.archs import build_network
from basicsr.metrics import calculate_psnr
from basicsr.utils import tensor2img

import cdnsr_plugin  # noqa: F401
from cdnsr_plugin.tester.config import network_options
from cdnsr_plugin.utils.checkpoint import load_weights
from cdnsr_plugin.utils.image import to_tensor
from cdnsr_plugin.utils.io import read_image


def checkpoints(paths: list[Path]) -> list[Path]:
    """Files as given; folders expanded to their net_g_<iter>.pth files in iteration order."""
    found = []
    for path in paths:
        if path.is_dir():
            files = list(path.glob('net_g_*.pth'))
            found += sorted(
                files, key=lambda p: (not re.fullmatch(r'net_g_\d+\.pth', p.name), int(re.sub(r'\D', '', p.stem) or 0)))
        else:
            found.append(path)
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--network', type=Path, required=True, help='option file with network_g (a CDNSRNet)')
    parser.add_argument('--checkpoints', type=Path, nargs='+', required=True, help='.pth files or models/ folders')
    parser.add_argument('--lr', type=Path, required=True, help='LR image')
    parser.add_argument('--gt', type=Path, required=True, help='HR image, scale x the LR')
    args = parser.parse_args(argv)
    net = build_network(network_options(args.network)).eval()
    lr, gt = to_tensor(read_image(args.lr)[0])[None], read_image(args.gt)[0]
    print('checkpoint'.ljust(24) + ''.join(f'branch {j}'.rjust(10) for j in range(len(net.branches))))
    for path in checkpoints(args.checkpoints):
        load_weights(net, path)
        with torch.inference_mode():
            scores = [
                calculate_psnr(tensor2img(branch(lr)), gt, net.scale, test_y_channel=True) for branch in net.branches
            ]
        print(path.name.ljust(24) + ''.join(f'{score:10.2f}' for score in scores))
    return 0


if __name__ == '__main__':
    sys.exit(main())
