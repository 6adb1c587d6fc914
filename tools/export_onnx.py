"""Export a trained routed network to ONNX: the classifier and each branch apart, and a routing manifest.

    python tools/export_onnx.py --network options/networks/CDNSR_FSRCNN_x4.yml \\
        --checkpoint experiments/<name>/models/net_g_latest.pth --out exports/CDNSR_FSRCNN_x4
    python tools/test_patches.py --input LR_DIR --backend onnxruntime --onnx exports/CDNSR_FSRCNN_x4

Writes classifier.onnx, branch0.onnx, ... (dynamic batch, height and width; each records its role, branch
index, scale and costs in its ONNX metadata) and manifest.json (scale, branch order and options, halo, costs,
sha256 of each file, the command, a checksum of its own content), after checking every file with onnxruntime
against PyTorch (max abs difference <= 1e-4 at two input sizes): see cdnsr_plugin/deploy/onnx_export.py. The
tester refuses an export whose manifest was edited or whose files do not match it. Files are written into
--out only once all of them passed the check; a second export into the same --out while one runs fails at
once (lock <out>.lock). --overwrite replaces an earlier export (its manifest.json and the files it names)
and refuses, changing nothing, a folder holding anything else.
Needs the optional extra: pip install '.[onnx]'. Exit status 2 on bad input, a non-empty --out (without
--overwrite, or with files --overwrite may not replace), another export running into --out, a part that
fails the check, or onnx missing.
"""
import argparse
import logging
import sys
from pathlib import Path

from basicsr.archs import build_network

import cdnsr_plugin  # noqa: F401  (registers the plugin's archs)
from cdnsr_plugin.deploy.onnx_export import DEFAULT_OPSET, export, require_onnx
from cdnsr_plugin.deploy.onnx_runtime import MANIFEST, require_onnxruntime
from cdnsr_plugin.tester.config import network_options
from cdnsr_plugin.utils.checkpoint import load_weights


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--network', type=Path, required=True, help='option file with a CDNSRNet network_g')
    parser.add_argument('--checkpoint', type=Path, required=True, help='weights of the routed network (.pth)')
    parser.add_argument('--out', type=Path, required=True, help='folder for the export, new or empty')
    parser.add_argument('--opset', type=int, default=DEFAULT_OPSET, help='ONNX opset (default %(default)s)')
    parser.add_argument('--patch', type=int, default=32, help='LR tile side the costs are measured at (default 32)')
    parser.add_argument('--stride', type=int, default=28, help='the papers\' tile step, recorded (default 28)')
    parser.add_argument(
        '--overwrite',
        action='store_true',
        help='replace an earlier export in --out (refused if --out holds anything else: nothing is changed)')
    parser.add_argument(
        '--no-exact-halo',
        action='store_true',
        help='do not measure the branches\' receptive radius (float64 passes: minutes for large branches, and RCAN has '
        'none); the export then runs with the default halo or --halo N, not --halo exact')
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.getLogger('basicsr').setLevel(logging.WARNING)
    try:
        require_onnx()
        require_onnxruntime()
        network = network_options(args.network)
        if network.get('type') != 'CDNSRNet':
            raise ValueError(f"{args.network}: network_g.type is {network.get('type')!r}; the export routes a "
                             'CDNSRNet (classifier + branches)')
        try:
            net = build_network(dict(network))
        except TypeError as exc:  # an option the arch does not take
            raise ValueError(f'{args.network}: network_g: {exc}') from None
        load_weights(net, args.checkpoint)
        command = ' '.join(['export_onnx.py', *(sys.argv[1:] if argv is None else [str(a) for a in argv])])
        manifest = export(
            net,
            args.out,
            network=network,
            opset=args.opset,
            patch=args.patch,
            stride=args.stride,
            overwrite=args.overwrite,
            command=command,
            exact_halo=not args.no_exact_halo)
    except (ValueError, OSError, KeyError) as exc:  # OSError: the lock (another export), a full disk, a bad path
        print(f'export_onnx: error: {" ".join(str(exc).split())}', file=sys.stderr)
        return 2
    worst = max(entry['max_abs_diff'] for entry in [manifest['classifier'], *manifest['branches']])
    print(f"Exported the classifier and {manifest['num_classes']} branches (x{manifest['scale']}, opset "
          f"{manifest['opset']}) to {args.out}/; onnxruntime matches PyTorch within {worst:.2g}. "
          f"Manifest: {args.out / MANIFEST}")
    return 0


if __name__ == '__main__':
    sys.exit(main())
