"""Wall time of one folder through ``cdnsr-sr`` as one process with T threads and as P processes (``torchrun``)
with T/P threads each; the SR images must be byte-identical. Prints the ratios and writes them as JSON.

    python tools/benchmark_shards.py --input datasets/heldout/LR_bicubic/X4 --processes 2 --threads 2 --runs 3 \
        --json docs/results/sharded_speedup.json

Each configuration runs ``--runs`` times, alternating (one process, then the sharded run, ...), each a fresh
command as a user types it, in a fresh temporary ``--out``; the wall time counts everything the user waits for
(start-up, loading the model, the set-budget solve, writing images and the report). Reported: the median of each,
and the speed-up = median one-process time / median sharded time. Run it on an idle machine.

The SR images are compared with the first one-process run: byte-identical files, else the largest difference in
grey levels and the share of differing pixels. Runs with equal threads per process give identical images
(tests/integration/test_sharded.py); here the thread count differs (T against T/P), and oneDNN's convolutions
sum in another order with another thread count, which can move a pixel by one grey level.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from cdnsr_plugin.utils.io import write_json


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--input', type=Path, required=True, help='a folder of LR images')
    parser.add_argument('--model', default=None, help='shipped model (default: cdnsr-sr\'s default)')
    parser.add_argument('--processes', type=int, default=2, help='processes of the sharded run (default 2)')
    parser.add_argument(
        '--threads',
        type=int,
        default=2,
        help='threads of the one-process run, split over the '
        'processes of the sharded run (default 2)')
    parser.add_argument('--runs', type=int, default=3, help='runs of each configuration (default 3; the median)')
    parser.add_argument('--json', type=Path, help='write the figures here')
    return parser.parse_args(argv)


def images(out: Path) -> dict[str, str]:
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.rglob('*.png'))}


def difference(first: Path, second: Path) -> tuple[int, float]:
    """The largest difference in grey levels between the SR images (not the class maps) of two runs, and the share
    of pixels that differ."""
    import numpy as np

    from cdnsr_plugin.utils.io import read_image
    worst, differing, total = 0, 0, 0
    for path in sorted(first.rglob('*.png')):
        if path.name.endswith('_classmap.png'):
            continue
        a = read_image(path)[0].astype(np.int16)
        b = read_image(second / path.relative_to(first))[0].astype(np.int16)
        delta = np.abs(a - b)
        worst, differing, total = max(worst, int(delta.max())), differing + int((delta > 0).sum()), total + delta.size
    return worst, differing / max(total, 1)


def timed(command: list[str], out: Path) -> float:
    env = {**os.environ, 'CUDA_VISIBLE_DEVICES': ''}
    start = time.perf_counter()
    result = subprocess.run(command + ['--out', str(out)], capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f'benchmark_shards: {" ".join(command)} failed (exit {result.returncode}):\n'
                         f'{result.stderr[-3000:]}')
    return seconds


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads % args.processes:
        raise SystemExit('benchmark_shards: --threads must be a multiple of --processes')
    sr = ['-m', 'cdnsr_plugin.run', str(args.input)] + (['--model', args.model] if args.model else [])
    one = [sys.executable, *sr, '--threads', str(args.threads)]
    sharded = [
        sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node',
        str(args.processes), *sr, '--threads',
        str(args.threads // args.processes)
    ]
    times: dict[str, list[float]] = {'one': [], 'sharded': []}
    with tempfile.TemporaryDirectory() as work:
        for run in range(args.runs):
            for name, command in (('one', one), ('sharded', sharded)):
                out = Path(work) / f'{name}{run}'
                times[name].append(timed(command, out))
                print(f'run {run + 1}/{args.runs} {name}: {times[name][-1]:.1f} s', flush=True)
        reference = images(Path(work) / 'one0')
        identical = all(images(Path(work) / f'{name}{run}') == reference for name in times for run in range(args.runs))
        worst, share = max(difference(Path(work) / 'one0', Path(work) / f'sharded{run}') for run in range(args.runs))
    medians = {name: statistics.median(values) for name, values in times.items()}
    figures = {
        'command': ' '.join(['python', 'tools/benchmark_shards.py', *(sys.argv[1:] if argv is None else argv)]),
        'input': str(args.input),
        'images': len(reference) // 2,
        'one_process': {'threads': args.threads, 'seconds': times['one'], 'median_s': medians['one']},
        'sharded': {
            'processes': args.processes,
            'threads_each': args.threads // args.processes,
            'seconds': times['sharded'],
            'median_s': medians['sharded'],
        },
        'speedup': medians['one'] / medians['sharded'],
        'images_identical': identical,
        'largest_difference_grey_levels': worst,
        'share_of_pixels_differing': share,
        'machine': f'{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}',
        'date': time.strftime('%Y-%m-%d'),
    }
    print(f"{figures['images']} images: 1 process x {args.threads} threads {medians['one']:.1f} s, "
          f"{args.processes} processes x {args.threads // args.processes} {medians['sharded']:.1f} s (medians of "
          f"{args.runs}): speed-up x{figures['speedup']:.2f}; SR images identical: {identical} (largest difference "
          f"{worst} grey level(s), {100 * share:.4f}% of the pixels)")
    if args.json:
        write_json(args.json, figures)
    return 0 if worst <= 1 else 1


if __name__ == '__main__':
    sys.exit(main())
