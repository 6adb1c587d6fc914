"""Put a trained routed model into the package as a reference model, with its manifest and measured figures.

    python tools/ship_model.py --name cdnsr_carn_x4 --options options/reference/train_cdnsr_carn_x4.yml \
        --experiment experiments/cdnsr_carn_x4 \
        --photos datasets/heldout/Testfull --threads 2

    # a model made otherwise (e.g. branches of one training and a router from tools/fit_router.py):
    python tools/ship_model.py --name NAME --network FIT/network.yml --checkpoint FIT/net_g.pth \
        --training TRAINING.json --set-budget 0.6 --photos datasets/heldout/Testfull --threads 2

Writes ``cdnsr_plugin/weights/<name>.pth`` (``{'params': ...}``, the network's weights only),
``<name>.yml`` (its ``network_g``) and ``<name>.json`` (the manifest; see ``cdnsr_plugin.weights``), each
atomically. The figures are measured here, by the tester (``tools/test_patches.py --compare-backbone``, the
routed model (its classifier's own decision, or a cost knob: ``--set-budget`` over the photos, ``--budget`` per
image) against its own largest branch on
the whole image, in tiles with exact context (the same image; the speed baseline is the faster of the two)
and on the papers' tiles):

* on ``--photos`` (LR_bicubic/X4 + HR, as ``tools/make_test_sets.py`` writes them; the held-out photos of
  ../shared/data/photos): mean PSNR (Y and RGB), executed FLOPs in % of the backbone on the whole image, and
  the routed time against the whole image, the tiled backbone and the faster of the two (one timed run per
  image and setting after a warm-up, ``--threads`` threads; the ratio of the summed times and the median of
  the per-image ratios);
* on the scikit-image photo ``weights.CHECK_PHOTO`` (``weights.check_pair``): the PSNR (Y) that
  ``tests/test_weights.py`` reproduces.

The training facts (command, options, iterations, data and its terms, date, train time) are read from the
option file and the experiment's log (``--options``), or given as JSON (``--training``). Choose the routing
(argmax, ``--set-budget`` or ``--budget``) on a validation split of the training photos, never on the held-out
photos (README, "Shipped models").
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import statistics
import sys
import tempfile
from pathlib import Path

import torch

import cdnsr_plugin  # noqa: F401  (registers the archs)
from cdnsr_plugin import weights
from cdnsr_plugin.tester.cli import main as test_patches
from cdnsr_plugin.utils.io import atomic_write, write_json
from cdnsr_plugin.utils.options import load_options

REPO = Path(__file__).resolve().parents[1]
DATA = ('../shared/data/train: 98 training photos (88 trained; every tenth name from the sixth kept out as a '
        'validation split), rebuilt by get_train_photos.py from Kodak, Urban100, McMaster, '
        'Wikimedia Commons and other sources; terms per photo in ../shared/data/train/SOURCES.md')


def run_tester(argv: list[str]) -> dict:
    with tempfile.TemporaryDirectory(prefix='ship_model_') as scratch:
        out = Path(scratch) / 'run'
        code = test_patches([*argv, '--out', str(out), '--no-save-images'])
        if code != 0:
            raise RuntimeError(f'the tester exited with status {code}')
        return json.loads((out / 'report.json').read_text())


def setting(report: dict, kind: str) -> dict:
    return next(s for s in report['settings'] if s['kind'] == kind)


def figures(report: dict) -> dict:
    """The manifest's figures from one tester report: Y and RGB PSNR of the routed model and of its backbone on
    the whole image; times against the whole image, the backbone in tiles with exact context (the same image)
    and the faster of the two (``time_ratio_fastest``: the speed claim)."""
    kinds = ('routed', 'backbone-full', 'backbone-tiled', 'backbone-patch')
    routed, full, tiled, patch = (setting(report, kind) for kind in kinds)
    per_image = [
        r['time_s'] / min(f['time_s'], t['time_s'])
        for r, f, t in zip(routed['images'], full['images'], tiled['images'])
        if r['time_s'] and f['time_s'] and t['time_s']
    ]
    rows = [s['sets'][0] for s in (routed, full, tiled, patch)]
    fastest = min(rows[1]['time_s'], rows[2]['time_s'])
    return {
        'psnr_routed': rows[0]['psnr_y'], 'psnr_backbone_full': rows[1]['psnr_y'],
        'psnr_backbone_patch': rows[3]['psnr_y'], 'psnr_rgb_routed': rows[0]['psnr'],
        'psnr_rgb_backbone_full': rows[1]['psnr'], 'ssim_routed': rows[0]['ssim_y'],
        'ssim_backbone_full': rows[1]['ssim_y'],
        'executed_flops_pct': rows[0]['flops']['paper']['percent_of_full_image'],
        'executed_macs_pct': rows[0]['flops']['macs']['percent_of_full_image'], 'class_counts': rows[0]['counts'],
        'time_routed_s': rows[0]['time_s'], 'time_backbone_full_s': rows[1]['time_s'],
        'time_backbone_tiled_s': rows[2]['time_s'], 'backbone_tiled': report['network'].get('backbone_tiled'),
        'time_ratio': rows[0]['time_s'] / rows[1]['time_s'], 'time_ratio_tiled': rows[0]['time_s'] / rows[2]['time_s'],
        'time_ratio_fastest': rows[0]['time_s'] / fastest,
        'time_ratio_fastest_median_per_image': statistics.median(per_image), 'images': rows[0]['images']
    }


def training_facts(options: Path, experiment: Path) -> dict:
    opt = load_options(options)
    logs = sorted(experiment.glob('train_*.log'))
    facts = {
        'command': f'python -m cdnsr_plugin.train -opt {options}', 'options': str(options), 'data': DATA,
        'iterations': opt['train']['total_iter'], 'stages': opt['train'].get('stages')
    }
    if logs:
        text = logs[-1].read_text(errors='replace')
        stamps = re.findall(r'^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)', text, flags=re.M)
        if stamps:
            began, ended = (datetime.datetime.strptime(s, '%Y-%m-%d %H:%M:%S') for s in (stamps[0], stamps[-1]))
            facts.update(date=stamps[-1][:10], train_time_s=(ended - began).total_seconds())
    return facts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--name', required=True)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument('--options', type=Path, help='the training option file (with --experiment)')
    source.add_argument(
        '--network',
        type=Path,
        help='option file with network_g of a model made otherwise (with '
        '--checkpoint and --training), e.g. tools/fit_router.py\'s network.yml')
    parser.add_argument('--experiment', type=Path, help='experiments/<name> of that training')
    parser.add_argument('--checkpoint', type=Path, help='weights of --network')
    parser.add_argument(
        '--training',
        type=Path,
        help='JSON of the training facts of --network (the manifest\'s '
        '"training" section: command, data, iterations, stages, date, ...)')
    knob = parser.add_mutually_exclusive_group()
    knob.add_argument(
        '--set-budget',
        type=float,
        help="default routing: FLOPs over a folder as a fraction of the backbone's on the whole images (the "
        "tester's --set-budget), chosen on validation")
    knob.add_argument(
        '--budget',
        type=float,
        help="default routing: FLOPs per cell, met per image (default: neither, the classifier's own decision)")
    parser.add_argument('--photos', type=Path, required=True, help='test set with HR/ and LR_bicubic/X4/')
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--description', default='')
    parser.add_argument('--why', default='', help='why this backbone and recipe (kept in the manifest)')
    parser.add_argument(
        '--into',
        type=Path,
        default=REPO / 'cdnsr_plugin' / 'weights',
        help='folder of the shipped models (default: this checkout\'s cdnsr_plugin/weights, not the installed copy; '
        'pip install . then ships them)')
    args = parser.parse_args(argv)
    if args.options is not None and args.experiment is None:
        parser.error('--options needs --experiment (the folder of that training)')
    if args.network is not None and (args.checkpoint is None or args.training is None):
        parser.error('--network needs --checkpoint and --training')

    if args.options is not None:
        opt = load_options(args.options)
        weights_path = args.experiment / 'models' / 'net_g_latest.pth'
        training = training_facts(args.options, args.experiment)
    else:
        opt = load_options(args.network)
        weights_path = args.checkpoint
        training = json.loads(args.training.read_text())
    state = torch.load(weights_path, map_location='cpu', weights_only=True)
    params = state.get('params', state)
    folder = args.into
    # everything is written and measured in a staging folder beside the shipped models and moved in only when
    # both measurements succeeded: a failed run leaves the shipped model as it was
    staging = Path(tempfile.mkdtemp(dir=folder, prefix=f'.{args.name}.staging.'))
    pth, yml = staging / f'{args.name}.pth', staging / f'{args.name}.yml'
    with tempfile.TemporaryFile() as handle:
        torch.save({'params': params}, handle)
        handle.seek(0)
        atomic_write(pth, handle.read())
    network = {'name': args.name, 'scale': opt['scale'], 'network_g': opt['network_g']}
    import yaml
    atomic_write(yml, yaml.safe_dump(network, sort_keys=False).encode('utf-8'))
    common = ['--network', str(yml), '--checkpoint', str(pth), '--threads', str(args.threads), '--compare-backbone']
    if args.budget is not None:
        common += ['--budget', str(args.budget)]
    if args.set_budget is not None:
        common += ['--set-budget', str(args.set_budget)]
    held_out = figures(
        run_tester([
            '--input',
            str(args.photos / 'LR_bicubic' / 'X4'), '--gt',
            str(args.photos / 'HR'), '--name', 'heldout', *common
        ]))
    with tempfile.TemporaryDirectory(prefix='ship_check_') as check_dir:
        lr_dir, hr_dir = weights.write_check_pair(Path(check_dir))
        check = figures(run_tester(['--input', str(lr_dir), '--gt', str(hr_dir), '--name', 'check', *common]))
    today = datetime.date.today().isoformat()
    manifest = {
        'name': args.name,
        'description': args.description,
        'why': args.why,
        'network': yml.name,
        'checkpoint': pth.name,
        'sha256': weights.sha256(pth),
        'network_sha256': weights.sha256(yml),
        'scale': opt['scale'],
        'routing': {'budget': args.budget, 'set_budget': args.set_budget, 'convention': 'paper'},
        'training': training,
        'figures': {
            'photos': f'{args.photos} ({held_out["images"]} photos, MATLAB-bicubic x4 LR)',
            **held_out, 'threads': args.threads, 'machine': f'{platform.machine()}, {os.cpu_count()} CPU cores, '
            f'torch {torch.__version__}', 'date': today,
            'command': shlex.join(['python', 'tools/ship_model.py', *(sys.argv[1:] if argv is None else argv)])
        },
        'check': {
            'photo': f'scikit-image {weights.CHECK_PHOTO}, mod-4 crop, MATLAB-bicubic x4 LR (weights.check_pair)',
            'psnr_y_routed': check['psnr_routed'], 'psnr_y_backbone_full': check['psnr_backbone_full']
        },
    }
    write_json(staging / f'{args.name}.json', manifest)
    for path in (pth, yml, staging / f'{args.name}.json'):
        os.replace(path, folder / path.name)
    staging.rmdir()
    f = held_out
    print(f"{args.name}: routed {f['psnr_routed']:.3f} dB vs backbone whole image {f['psnr_backbone_full']:.3f} dB "
          f"({f['psnr_routed'] - f['psnr_backbone_full']:+.3f}), executed FLOPs {f['executed_flops_pct']:.1f}%, "
          f"time x{f['time_ratio_fastest']:.2f} the faster backbone (whole x{f['time_ratio']:.2f}, tiled "
          f"x{f['time_ratio_tiled']:.2f}; median per image {f['time_ratio_fastest_median_per_image']:.2f}); "
          f"check photo {check['psnr_routed']:.3f} dB")
    return 0


if __name__ == '__main__':
    sys.exit(main())
