"""Throughput and peak memory of tools/prepare_data.py (a benchmark, not a test).

    python tools/benchmark_prepare.py --input ../shared/data/photos --reference bicubic --repeat 3
    python tools/benchmark_prepare.py --input ../shared/data/photos --limit 3 --reference msrresnet --repeat 3

Each repeat prepares a fresh set in a temporary folder; prints sub-images per second (median of the
repeats) and the peak resident memory of this process and of the worker processes. ``msrresnet``
uses a randomly initialised paper-sized MSRResNet x4 (64 channels, 16 blocks) as the reference, so
the cost of a real reference network is measured without needing its weights.
"""
import argparse
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from basicsr.archs import build_network

import cdnsr_plugin  # noqa: F401
from cdnsr_plugin.preparation.prepare import PrepareOptions, Reference, build_reference, prepare


def reference_for(kind: str, device: str) -> Reference:
    if kind == 'bicubic':
        return build_reference(4, device, bicubic=True)
    arch = {'type': 'MSRResNet', 'num_feat': 64, 'num_block': 16, 'upscale': 4}
    return Reference(build_network(arch), {'kind': 'network', 'arch': arch, 'checkpoint': 'random'}, 4, device)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--input', required=True)
    parser.add_argument('--limit', type=int, default=0, help='use only the first N images (0 = all)')
    parser.add_argument('--reference', choices=['bicubic', 'msrresnet'], default='bicubic')
    parser.add_argument('--multiscale', default='1', help='e.g. 0.6,0.7,0.8,0.9')
    parser.add_argument('--workers', type=int, default=2)
    parser.add_argument('--repeat', type=int, default=3)
    args = parser.parse_args(argv)
    factors = tuple(float(f) for f in args.multiscale.split(','))
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(args.input)
        if args.limit:
            source = Path(tmp) / 'input'
            source.mkdir()
            for path in sorted(Path(args.input).glob('*.png'))[:args.limit]:
                shutil.copy(path, source / path.name)
        rates, pairs = [], 0
        for repeat in range(args.repeat):
            out = Path(tmp) / f'set{repeat}'
            opts = PrepareOptions(input=str(source), output=str(out), multiscale=factors, workers=args.workers)
            start = time.perf_counter()
            summary = prepare(opts, reference_for(args.reference, 'cpu'))
            rates.append(summary['num_pairs'] / (time.perf_counter() - start))
            pairs = summary['num_pairs']
            shutil.rmtree(out)
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f'input {args.input} (limit {args.limit or "none"}), multiscale {factors}, reference {args.reference}, '
          f'workers {args.workers}, torch threads {torch.get_num_threads()}')
    print(f'{pairs} sub-image pairs per run; sub-images/s over {args.repeat} runs: '
          f'{", ".join(f"{r:.0f}" for r in rates)}; median {statistics.median(rates):.0f}')
    print(f'peak RSS: main process {own:.0f} MiB, largest worker {children:.0f} MiB')
    return 0


if __name__ == '__main__':
    sys.exit(main())
