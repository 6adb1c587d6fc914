"""Iterations per second of one training stage through the real pipeline, with and without the branch-output cache.

    python tools/benchmark_stage.py -opt options/demo/train_ClassSR_FSRCNN_demo.yml --stage classifier \\
        --data datasets/demo_x4 --batch 96 --iters 400 --warmup 200 --cache-gb 0,8 --out results/stage_speed.json

Runs the option file's stage named ``--stage`` alone (its routing, losses and learning rate; the network's weights
random, which does not change the time) for ``--iters`` iterations at ``--batch`` through ``python -m
cdnsr_plugin.train``, once per ``--cache-gb`` value (``train.branch_cache_gb``; 0 = no cache), and times the
iterations after ``--warmup`` from the timestamps of the training log (printed every 10 iterations): with the cache
the first pass over the data fills it, so the warmup should cover one epoch (``N / batch`` iterations) for the
steady state. Prints seconds per iteration, iterations per second and the speed-up against the first setting, and
writes them as JSON. One run at a time, on an idle machine.
"""
import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from cdnsr_plugin.data.prepared_set import GT_LMDB, LQ_LMDB, PreparedSet
from cdnsr_plugin.utils.io import atomic_write
from cdnsr_plugin.utils.options import load_options, set_data, set_logging, write_options

STAMP = re.compile(r'^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) INFO: \[.*iter:\s*([\d,]+),')


def stage_options(opt_file: Path, stage_name: str, data: Path, batch: int, iters: int, cache_gb: float,
                  workers: int) -> dict:
    """The option file reduced to its stage ``stage_name``, on ``data`` at ``batch``, for ``iters`` iterations."""
    opt = load_options(opt_file)
    stages = [s for s in opt['train']['stages'] if s['name'] == stage_name]
    if not stages:
        raise SystemExit(f'{opt_file}: no stage named {stage_name!r}')
    stage = dict(stages[0], iters=iters)
    stage.pop('prune', None)
    stage.pop('batch_size_per_gpu', None)
    opt['train'].update(stages=[stage], total_iter=iters, branch_cache_gb=cache_gb)
    set_data(opt, train=(data / LQ_LMDB, data / GT_LMDB), batch=batch)
    opt['datasets']['train']['num_worker_per_gpu'] = workers
    opt['datasets'].pop('val', None)
    opt.pop('val', None)
    for key in list(opt['path']):
        if key.startswith('pretrain_network'):
            opt['path'][key] = None
    set_logging(opt, print_freq=10, checkpoint_freq=10**9, tensorboard=False)
    opt['name'] = f'stage_speed_{cache_gb:g}gb'
    return opt


def seconds_per_iteration(log: str, warmup: int) -> tuple[float, int]:
    """Mean seconds per iteration after ``warmup``, from the logged timestamps; and how many iterations that is."""
    points = []
    for line in log.splitlines():
        match = STAMP.match(line)
        if match:
            when = datetime.datetime.strptime(match.group(1), '%Y-%m-%d %H:%M:%S,%f')
            points.append((int(match.group(2).replace(',', '')), when))
    after = [(i, t) for i, t in points if i >= warmup]
    if len(after) < 2:
        raise SystemExit(f'fewer than two logged iterations after --warmup {warmup}: raise --iters')
    (first, start), (last, end) = after[0], after[-1]
    return (end - start).total_seconds() / (last - first), last - first


def run(opt: dict, folder: Path) -> str:
    options = write_options(folder / f"{opt['name']}.yml", opt)
    env = {**os.environ, 'CDNSR_PLUGIN_AUTOLOAD': '0'}
    subprocess.run([sys.executable, '-m', 'cdnsr_plugin.train', '-opt',
                    str(options)],
                   cwd=folder,
                   check=True,
                   env=env,
                   stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return '\n'.join(p.read_text() for p in (folder / 'experiments' / opt['name']).glob('train_*.log'))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('-opt', type=Path, required=True, help='a training option file with train.stages')
    parser.add_argument('--stage', default='classifier', help='the name of the stage to time (its first one)')
    parser.add_argument('--data', type=Path, required=True, help='a prepared set (tools/prepare_data.py)')
    parser.add_argument('--batch', type=int, default=96)
    parser.add_argument('--iters', type=int, default=400)
    parser.add_argument('--warmup', type=int, default=200, help='iterations not timed (fill the cache: one epoch)')
    parser.add_argument('--cache-gb', default='0,8', help='train.branch_cache_gb values to compare')
    parser.add_argument('--workers', type=int, default=0, help='datasets.train.num_worker_per_gpu')
    parser.add_argument('--out', type=Path, help='JSON of the figures')
    args = parser.parse_args(argv)
    PreparedSet(args.data)  # a missing or incomplete set is named before anything runs
    sizes = [float(v) for v in args.cache_gb.split(',')]
    rows = []
    with tempfile.TemporaryDirectory(prefix='stage_speed_') as folder:
        for size in sizes:
            opt = stage_options(args.opt, args.stage, args.data.resolve(), args.batch, args.iters, size, args.workers)
            seconds, timed = seconds_per_iteration(run(opt, Path(folder)), args.warmup)
            rows.append({
                'branch_cache_gb': size, 'seconds_per_iteration': seconds, 'iterations_per_second': 1 / seconds,
                'timed_iterations': timed
            })
            print(
                f'branch_cache_gb {size:g}: {seconds * 1000:.0f} ms per iteration, {1 / seconds:.2f} it/s '
                f'({timed} iterations after {args.warmup})',
                flush=True)
    for row in rows:
        row['speedup'] = rows[0]['seconds_per_iteration'] / row['seconds_per_iteration']
    print(' '.join(f"{r['branch_cache_gb']:g} GB: {r['speedup']:.2f}x" for r in rows), f'(against {sizes[0]:g} GB)')
    if args.out:
        result = {
            'command': ' '.join([Path(sys.argv[0]).name, *sys.argv[1:]]), 'stage': args.stage, 'batch': args.batch,
            'options': str(args.opt), 'rows': rows
        }
        atomic_write(args.out, (json.dumps(result, indent=2) + '\n').encode())
    return 0


if __name__ == '__main__':
    sys.exit(main())
