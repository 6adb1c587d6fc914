"""Import an official ClassSR (XPixelGroup/ClassSR) or CDNSR (fangvv/CDNSR) checkpoint as a plugin CDNSRNet.

    python tools/convert_checkpoint.py --input ClassSR_CARN.pth --arch carn --output ClassSR_CARN_plugin.pth \\
        --network-out ClassSR_CARN_plugin.yml
    python tools/test_patches.py --input LR_DIR --gt HR_DIR --network ClassSR_CARN_plugin.yml \\
        --checkpoint ClassSR_CARN_plugin.pth --scale 4

The input is the file the official code saves (``network.state_dict()``: ``classifier.*``, ``net1.*`` ...
``net3.*``, maybe ``module.``-prefixed). ``--arch`` (fsrcnn, carn, srresnet, rcan) is detected from the keys
when omitted. Every branch's width is read from the tensor shapes and the whole file is checked against the
official layout; widths must increase net1 < net2 < net3 (net1, the simple branch, becomes branches[0]).
Writes ``{'params': state_dict}`` (BasicSR's checkpoint format) to ``--output`` and the network option file
(``options/networks/*.yml`` shape) to ``--network-out`` (default: ``--output`` with ``.yml``), each through a
temporary name and a rename; existing files are kept unless ``--overwrite``. The converted network takes RGB
in [0, 1] like every plugin network (the official RCAN took 0-255: the conversion rescales it). What is folded
or cannot be converted: cdnsr_plugin/deploy/convert.py.

Exit status 0 on success, 2 with a one-line ``error: ...`` on bad input (missing or unreadable file, not a
state dict, unknown layout, a key or shape that does not match, NaN or inf weights: the part, e.g.
``net2 (becomes branch1)``, and its key are named); nothing is written then.
"""
import argparse
import io
import sys
from pathlib import Path

import torch
import yaml

import cdnsr_plugin  # noqa: F401  (registers the plugin's archs)
from cdnsr_plugin.deploy.convert import ARCHS, convert_checkpoint, option_document
from cdnsr_plugin.utils.io import atomic_write


def _check_outputs(args: argparse.Namespace) -> None:
    source = args.input.resolve()
    for path in (args.output, args.network_out):
        if path.resolve() == source:
            raise ValueError(f'{path} is the input file; write the converted checkpoint elsewhere')
        if path.exists() and not args.overwrite:
            raise ValueError(f'{path} already exists; pass --overwrite to replace it')
        if path.is_dir():
            raise ValueError(f'{path} is a folder; give a file name')
    if args.output.resolve() == args.network_out.resolve():
        raise ValueError('--output and --network-out name the same file')


def option_text(document: dict, source: Path, output: Path, notes: list[str]) -> str:
    header = [
        f'# {document["name"]}: converted by tools/convert_checkpoint.py from {source.name}',
        '# (official ClassSR / CDNSR container). Input RGB in [0, 1]; branch 0 is the official net1 (simple).',
        f'#   python tools/test_patches.py --input LR_DIR --network <this file> --checkpoint {output.name} '
        f'--scale {document["scale"]}',
    ] + [f'# {note}' for note in notes]
    body = yaml.safe_dump(document, sort_keys=False, default_flow_style=None, width=120)
    return '\n'.join(header) + '\n' + body


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--input', type=Path, required=True, help='official ClassSR / CDNSR checkpoint (.pth)')
    parser.add_argument('--arch', choices=ARCHS, help='branch architecture (default: detected from the keys)')
    parser.add_argument('--output', type=Path, required=True, help='converted checkpoint (.pth), {"params": ...}')
    parser.add_argument('--network-out', type=Path, help='network option file (default: --output with .yml)')
    parser.add_argument('--overwrite', action='store_true', help='replace existing output files')
    args = parser.parse_args(argv)
    if args.network_out is None:
        args.network_out = args.output.with_suffix('.yml')
    try:
        _check_outputs(args)
        converted = convert_checkpoint(args.input, args.arch)
        document = option_document(converted, args.output.stem)
        buffer = io.BytesIO()
        torch.save({'params': converted.state_dict}, buffer)
        atomic_write(args.output, buffer.getvalue())
        text = option_text(document, args.input, args.output, converted.notes)
        atomic_write(args.network_out, text.encode('utf-8'))
    except (ValueError, FileNotFoundError, OSError) as exc:
        print(f'error: {" ".join(str(exc).split())}', file=sys.stderr)
        return 2
    widths = ' < '.join(str(w) for w in converted.widths)
    print(f'{args.input}: {converted.arch}, {len(converted.widths)} branches (widths {widths}), x{converted.scale}')
    for note in converted.notes:
        print(f'  {note}')
    print(f'wrote {args.output} and {args.network_out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
