"""``cdnsr-sr`` (``python -m cdnsr_plugin.run``): super-resolve a photo or a folder with a shipped model.

    cdnsr-sr photo.png                         # results/<model>/photo/: SR image, class map, report
    cdnsr-sr photos/ --out sr/                 # every image of the folder
    cdnsr-sr photos/ --gt hr/ --compare-backbone   # PSNR, and the backbone (whole image, exact tiles) beside it
    cdnsr-sr photos/ --set-budget 0.4          # the cost knob over the folder: cheaper, a little lower quality
    cdnsr-sr photos/ --argmax                  # the classifier's own decision instead of the model's routing
    cdnsr-sr --list                            # the shipped models and their measured figures

No option file and no download: the model's network, weights (sha256-checked) and default routing come with
the package (``cdnsr_plugin/weights/``). The run is ``tools/test_patches.py``'s (seam-free regions, every
pixel covered, the same safety checks: ``--out`` is never an input folder, a non-empty ``--out`` needs
``--overwrite``; an input image given alone is never an output), so its report.json/csv and class maps are
the tester's. Exit status as the tester's: 0 all images done, 1 some failed (listed), 2 bad options, a damaged
shipped model or another run writing into ``--out``, 130 interrupted (Ctrl-C: one line; rerun with
``--overwrite`` to replace what it wrote). ``--list`` exits 1 when a shipped manifest is damaged (named on
stderr; the other models are listed).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from cdnsr_plugin import weights


def describe(name: str) -> str:
    """``--list``'s lines for ``name``; ``ValueError`` naming the manifest if it cannot be used."""
    info = weights.manifest(name)
    try:
        return _describe(name, info)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ValueError(f'{weights.manifest_path(name)}: its routing or figures are incomplete or not numbers '
                         f'({type(exc).__name__}: {exc}); reinstall the package (pip install .)') from None


def _describe(name: str, info: dict) -> str:
    figures = info.get('figures', {})
    default = ' (default)' if name == weights.DEFAULT_MODEL else ''
    lines = [f"{name}{default}: {info.get('description', '')}", f'  routing: {weights.routing(name)}']
    if figures:
        photos = figures.get('photos', 'the held-out photos')
        rgb = ''
        if figures.get('psnr_rgb_routed') is not None:
            rgb = f" (RGB {figures['psnr_rgb_routed']:.3f} vs {figures['psnr_rgb_backbone_full']:.3f} dB)"
        speed = (f"{figures['time_ratio_fastest']:.2f}x the time of the faster backbone run (whole image or tiles)"
                 if 'time_ratio_fastest' in figures else f"{figures['time_ratio']:.2f}x its time on the whole image")
        lines.append(f"  on {photos}: routed {figures['psnr_routed']:.3f} dB (Y) vs "
                     f"{figures['psnr_backbone_full']:.3f} dB for its backbone on the whole image{rgb}, "
                     f"{figures['executed_flops_pct']:.1f}% of its FLOPs, {speed}")
    return '\n'.join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog='cdnsr-sr', description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('input', nargs='?', type=Path, help='an image, or a folder of images (LR)')
    p.add_argument('--model', default=weights.DEFAULT_MODEL, help='shipped model (default %(default)s; see --list)')
    p.add_argument('--list', action='store_true', help='list the shipped models and exit')
    p.add_argument('--out', type=Path, help='results folder, new or empty (default results/<model>/<input name>)')
    knob = p.add_mutually_exclusive_group()
    knob.add_argument(
        '--set-budget',
        type=float,
        help="FLOPs over the whole folder as a fraction of the backbone's on the whole images, spent where the "
        "classifier sees most need (default: the model's routing, from its manifest; see --list)")
    knob.add_argument(
        '--budget', type=float, help="FLOPs per cell as a fraction of the backbone's, met on every image alone")
    knob.add_argument('--argmax', action='store_true', help="the classifier's own decision, no cost target")
    p.add_argument('--gt', type=Path, help='HR images named like the inputs: adds PSNR/SSIM to the report')
    p.add_argument(
        '--compare-backbone',
        action='store_true',
        help='also run the backbone on the whole image, in tiles with exact context (the same image, often faster) '
        'and patch-wise, and print quality, FLOPs and time side by side (time against the faster backbone run)')
    p.add_argument('--device', help='cpu, cuda or auto (default auto)')
    p.add_argument('--threads', type=int, help="CPU threads (default: torch's choice)")
    p.add_argument('--overwrite', action='store_true', help="replace an earlier run's results in --out")
    p.add_argument('--no-save-images', action='store_true', help='write the reports only')
    return p


def tester_args(args: argparse.Namespace) -> list[str]:
    """The ``tools/test_patches.py`` command line this run is."""
    source = args.input.resolve()
    out = args.out or Path('results') / args.model / (source.stem if source.is_file() else source.name)
    argv = [
        '--input',
        str(args.input), *weights.tester_args(args.model, args.budget, args.set_budget, args.argmax), '--out',
        str(out), '--name', args.model
    ]
    for flag, value in (('--gt', args.gt), ('--device', args.device), ('--threads', args.threads)):
        if value is not None:
            argv += [flag, str(value)]
    for flag in ('compare_backbone', 'overwrite', 'no_save_images'):
        if getattr(args, flag):
            argv.append('--' + flag.replace('_', '-'))
    return argv


def list_models() -> int:
    """``--list``: every usable shipped model on stdout; a damaged manifest named on stderr (exit 1), the others
    still listed."""
    lines, broken = [], []
    for name in weights.names():
        try:
            lines.append(describe(name))
        except ValueError as exc:
            broken.append(str(exc))
    print('\n'.join(lines) or 'no usable shipped models')
    for message in broken:
        print(f'error: {message}', file=sys.stderr)
    return 1 if broken else 0


def main(argv: Optional[list[str]] = None) -> int:
    args = parser().parse_args(argv)
    try:
        return _main(args)
    except KeyboardInterrupt:  # the tester's part prints its own line; this is the set-up's (checksums)
        print('cdnsr-sr: interrupted before any image was written: nothing to clean up', file=sys.stderr)
        return 130


def _main(args: argparse.Namespace) -> int:
    try:
        if args.list:
            return list_models()
        if args.input is None:
            raise ValueError('give an image or a folder of images (cdnsr-sr photo.png), or --list')
        if not args.input.exists():
            raise FileNotFoundError(f'{args.input} does not exist')
        argv_tester = tester_args(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f'error: {exc}', file=sys.stderr)
        return 2
    from cdnsr_plugin.tester.cli import main as test_patches
    return test_patches(argv_tester)


if __name__ == '__main__':
    sys.exit(main())
