"""Build Test2K / Test4K / Test8K (HR + bicubic LR) from a folder of large HR images.

    python tools/make_test_sets.py --input DIV8K_1201-1500 --output datasets/ClassSR_test \\
        [--scale 4] [--tiers 2K=2048,4K=4096,8K=0] [--split sequential|all] [--workers 2] [--overwrite]

The ClassSR / CDNSR protocol (DIV8K 1201-1500): the first third of the sorted images is
downsampled to 2K wide (Test2K), the next third to 4K (Test4K), the last third kept (Test8K).
Writes OUT/Test<NAME>/HR/<stem>.png and OUT/Test<NAME>/LR_bicubic/X<scale>/<stem>.png (load them
with BasicSR's PairedImageDataset, filename_tmpl: '{}') and OUT/summary.json. Unusable files are
skipped and listed; exit status 0, 2 when the options, the input or the output are refused (nothing written), 1
when the run could not be completed, 130 on Ctrl-C (one line).
"""
import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # tools/: also when loaded as a module
import _ctrl_c  # noqa: E402 (standard library only: installed before anything heavy is imported)

if __name__ == '__main__':
    _ctrl_c.install()
PROGRAM = _ctrl_c.Program('make_test_sets')


def tiers_arg(text: str):
    """argparse type for --tiers: the parse error names the bad item."""
    from cdnsr_plugin.preparation.test_sets import parse_tiers
    try:
        return parse_tiers(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_args(argv=None) -> argparse.Namespace:
    import cdnsr_plugin  # noqa: F401  (torchvision alias before basicsr)
    from cdnsr_plugin.preparation.test_sets import DEFAULT_TIERS, SPLITS, parse_tiers
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--input', required=True, type=Path, help='folder of HR images (files directly in it)')
    parser.add_argument(
        '--output',
        required=True,
        type=Path,
        help='folder to create; built in OUTPUT.incomplete and renamed when complete')
    parser.add_argument('--scale', type=int, default=4, help='LR downsampling factor (default 4)')
    parser.add_argument(
        '--tiers',
        type=tiers_arg,
        default=parse_tiers(DEFAULT_TIERS),
        help=f'comma-separated NAME=WIDTH: HR width in pixels, aspect ratio kept, never '
        f'upsampled; 0 keeps the original size; folders are Test<NAME> (default {DEFAULT_TIERS})')
    parser.add_argument(
        '--split',
        choices=SPLITS,
        default='sequential',
        help='sequential (default, the papers\' protocol): sorted images are cut into one '
        'consecutive group per tier; all: every image goes into every tier')
    parser.add_argument(
        '--workers', type=int, default=2, help='processes that read and resize images (default 2; 0 = in this process)')
    parser.add_argument(
        '--overwrite', action='store_true', help='replace an existing OUTPUT (only after the new one is complete)')
    args = parser.parse_args(argv)
    if args.scale < 1:
        parser.error(f'argument --scale: must be >= 1, got {args.scale}')
    for tier in args.tiers:
        if 0 < tier.width < args.scale:
            parser.error(f'argument --tiers: {tier.name}={tier.width} is narrower than --scale {args.scale}')
    if args.workers < 0:
        parser.error(f'argument --workers: must be >= 0, got {args.workers}')
    return args


def main(argv=None) -> int:
    PROGRAM.output = None
    try:
        args = parse_args(argv)
        PROGRAM.output = args.output
        from concurrent.futures.process import BrokenProcessPool

        from cdnsr_plugin.preparation.test_sets import build_test_sets, format_summary
        try:
            summary = build_test_sets(
                args.input,
                args.output,
                args.tiers,
                scale=args.scale,
                split=args.split,
                workers=args.workers,
                overwrite=args.overwrite)
        except (ValueError, FileExistsError) as exc:  # refused input or output (a busy or foreign lock included)
            print(f'make_test_sets: error: {exc}', file=sys.stderr)
            return 2
        except OSError as exc:  # the run could not be completed (disk full, unreadable folder)
            print(f'make_test_sets: error: {exc}', file=sys.stderr)
            return 1
        except BrokenProcessPool as exc:
            print(
                f'make_test_sets: error: a worker process died ({exc}); out of memory? try fewer --workers',
                file=sys.stderr)
            return 1
        print(format_summary(summary))
    except KeyboardInterrupt:
        return PROGRAM.interrupted()
    return 0


if __name__ == '__main__':
    sys.exit(PROGRAM.run(main))
