"""Prepare a difficulty-classified training set (LR/HR sub-image LMDBs + class labels) from HR photos.

    python tools/prepare_data.py --input datasets/DIV2K/DIV2K_train_HR --output datasets/DIV2K_CDNSR_x4 \\
        --scale 4 --multiscale 0.6,0.7,0.8,0.9 --classes 3 \\
        --reference-arch "{type: MSRResNet, upscale: 4}" --reference-checkpoint MSRResNet_x4.pth --montage

Writes OUTPUT/lq.lmdb, OUTPUT/gt.lmdb (BasicSR LMDBs with meta_info.txt), OUTPUT/labels.txt
("key label psnr"; label 0 = simple = highest PSNR ... M-1 = hard), OUTPUT/summary.json and, with
--montage, OUTPUT/montage.png. Everything is written under OUTPUT.incomplete and renamed at the end;
an existing OUTPUT is refused unless --overwrite. See cdnsr_plugin/preparation/prepare.py for the
choices. Ctrl-C at any moment: one line, exit 130, no finished output.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # tools/: also when loaded as a module
import _ctrl_c  # noqa: E402 (standard library only: installed before anything heavy is imported)

if __name__ == '__main__':
    _ctrl_c.install()
PROGRAM = _ctrl_c.Program('prepare_data')


def parse_factors(text: str) -> tuple:
    try:
        return tuple(float(part) for part in text.split(',') if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f'--multiscale takes comma-separated numbers, got {text!r}')


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--input', required=True, help='folder of HR images (non-images are skipped and listed)')
    parser.add_argument('--output', required=True, help='folder to create for the prepared set')
    parser.add_argument('--scale', type=int, default=4, help='SR factor: LR = bicubic(HR, 1/scale) (default 4)')
    parser.add_argument('--patch', type=int, default=32, help='LR sub-image side; HR side = patch*scale (default 32)')
    parser.add_argument('--stride', type=int, default=16, help='LR step between sub-images (default 16)')
    parser.add_argument('--classes', type=int, default=3, help='M, number of difficulty classes, 2-5 (default 3)')
    parser.add_argument(
        '--multiscale',
        type=parse_factors,
        default=(1.0, ),
        help='HR copies at these factors, e.g. 0.6,0.7,0.8,0.9 as in ClassSR (default: 1)')
    parser.add_argument('--reference-opt', help='BasicSR option file: network_g + path.pretrain_network_g')
    parser.add_argument('--reference-arch', help='reference arch as YAML, e.g. "{type: MSRResNet, upscale: 4}"')
    parser.add_argument('--reference-checkpoint', help='weights of the reference network (.pth)')
    parser.add_argument(
        '--reference', choices=['bicubic'], help='explicit network-free fallback reference: PyTorch bicubic upsampling')
    parser.add_argument('--workers', type=int, default=2, help='processes reading/resizing images; 0 = none')
    parser.add_argument('--batch', type=int, default=128, help='sub-images per reference forward pass')
    parser.add_argument('--device', help='device of the reference network (default: cuda if available, else cpu)')
    parser.add_argument('--compress-level', type=int, default=1, help='PNG compression in the LMDBs, 0-9')
    parser.add_argument('--montage', action='store_true', help='also write montage.png: samples per class')
    parser.add_argument(
        '--overwrite',
        action='store_true',
        help='replace an existing OUTPUT (a prepared set, or an empty folder) once the new one is done')
    return parser.parse_args(argv)


def main(argv=None) -> int:
    PROGRAM.output = None
    try:
        args = parse_args(argv)
        PROGRAM.output = args.output
        import torch
        import yaml

        import cdnsr_plugin  # noqa: F401  (torchvision alias, registries)
        from cdnsr_plugin.preparation.prepare import PrepareOptions, build_reference, prepare
        device = args.device or ('cuda' if torch.cuda.is_available() else 'cpu')
        opts = PrepareOptions(
            input=args.input,
            output=args.output,
            scale=args.scale,
            patch=args.patch,
            stride=args.stride,
            num_classes=args.classes,
            multiscale=args.multiscale,
            compress_level=args.compress_level,
            batch=args.batch,
            workers=args.workers,
            device=device)
        opts.validate()
        arch = yaml.safe_load(args.reference_arch) if args.reference_arch else None
        reference = build_reference(
            args.scale,
            device,
            args.reference_opt,
            arch,
            args.reference_checkpoint,
            bicubic=args.reference == 'bicubic')
        summary = prepare(opts, reference, overwrite=args.overwrite, montage=args.montage)
        print(f"{summary['num_pairs']} sub-image pairs in {args.output} ({summary['seconds']} s)")
        for stats in summary['classes']:
            print(f"  class {stats['class']}: {stats['count']:7d} pairs, PSNR {stats['psnr_min']:.2f}-"
                  f"{stats['psnr_max']:.2f} dB (mean {stats['psnr_mean']:.2f})")
        for path, reason in summary['skipped'].items():
            print(f'  skipped {path}: {reason}')
    except KeyboardInterrupt:
        return PROGRAM.interrupted()
    except (ValueError, FileNotFoundError, FileExistsError, KeyError) as exc:
        print(f'prepare_data: {exc}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(PROGRAM.run(main))
