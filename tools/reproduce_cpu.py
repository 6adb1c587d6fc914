"""CPU reproduction: FSRCNN-O vs ClassSR-FSRCNN vs CDNSR-FSRCNN (R/M/S) on real photos, same budget.

    python tools/reproduce_cpu.py --photos ../shared/data/photos --work experiments/cpu_repro --iters 3000

1. The sorted photos are split: the last ``--test`` are held out, the rest become a difficulty-labelled
   training set (tools/prepare_data.py's pipeline; reference: ``--reference bicubic`` unless a
   network checkpoint is given, recorded in the output).
2. Each model trains through the real pipeline (``python -m cdnsr_plugin.train``) from the demo option
   files in ``options/demo/``, with the same number of iterations and batch size: FSRCNN-O
   (``train_FSRCNN_demo.yml``), ClassSR (``train_ClassSR_FSRCNN_demo.yml``), CDNSR R/M/S
   (``train_CDNSR_FSRCNN_demo.yml`` with alpha 0.75 / 0.55 / 0.45). Stage lengths are fixed fractions of ``--iters``.
3. Every model super-resolves the held-out LR photos patch by patch (32x32, stride 28, every pixel):
   routed models with hard routing, FSRCNN-O patch-wise. PSNR/SSIM are BasicSR's (Y, crop 4).
   FLOPs per patch include the classifier, as % of FSRCNN-56 patch-wise, in both conventions.

Prints a Markdown table and writes ``<work>/results.json``.
"""
import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from basicsr.archs import build_network
from basicsr.utils import tensor2img

import cdnsr_plugin  # noqa: F401
from cdnsr_plugin.data.prepared_set import GT_LMDB, LQ_LMDB
from cdnsr_plugin.inference.costs import CONVENTIONS, cost_table
from cdnsr_plugin.inference.engine import RoutedEngine
from cdnsr_plugin.inference.tiling import super_resolve_patches
from cdnsr_plugin.preparation.prepare import PrepareOptions, build_reference, prepare
from cdnsr_plugin.preparation.test_sets import Tier, build_test_sets
from cdnsr_plugin.tester.run import metrics
from cdnsr_plugin.utils.checkpoint import load_weights
from cdnsr_plugin.utils.image import to_tensor
from cdnsr_plugin.utils.io import read_image
from cdnsr_plugin.utils.options import load_options, set_data, set_logging, set_schedule, write_options

REPO = Path(__file__).resolve().parents[1]
# name -> (demo option file, alpha or None, stage fractions)
MODELS = {
    'FSRCNN-O': ('train_FSRCNN_demo.yml', None, None),
    'ClassSR-FSRCNN': ('train_ClassSR_FSRCNN_demo.yml', None, (0.5, 0.25, 0.25)),
    'CDNSR-FSRCNN (R)': ('train_CDNSR_FSRCNN_demo.yml', 0.75, (0.5, 0.2, 0.1, 0.2)),
    'CDNSR-FSRCNN (M)': ('train_CDNSR_FSRCNN_demo.yml', 0.55, (0.5, 0.2, 0.1, 0.2)),
    'CDNSR-FSRCNN (S)': ('train_CDNSR_FSRCNN_demo.yml', 0.45, (0.5, 0.2, 0.1, 0.2)),
}


def split_photos(photos: Path, work: Path, held_out: int) -> tuple[Path, Path]:
    paths = sorted(p for p in photos.iterdir() if p.suffix.lower() == '.png')
    train, test = work / 'photos_train', work / 'photos_test'
    for folder, chosen in ((train, paths[:-held_out]), (test, paths[-held_out:])):
        folder.mkdir(parents=True, exist_ok=True)
        for path in chosen:
            shutil.copy(path, folder / path.name)
    return train, test


def options_for(name: str, work: Path, train_set: Path, iters: int, batch: int, lambda_reg: float = None) -> dict:
    file, alpha, fractions = MODELS[name]
    opt = load_options(REPO / 'options' / 'demo' / file)
    opt['name'] = name.replace(' ', '_').replace('(', '').replace(')', '')
    set_data(opt, train=(train_set / LQ_LMDB, train_set / GT_LMDB), batch=batch)
    del opt['datasets']['val'], opt['val']
    if fractions is None:
        set_schedule(opt, iters)
    else:
        lengths = [int(iters * f) for f in fractions]
        lengths[0] += iters - sum(lengths)
        set_schedule(opt, lengths)
    if alpha is not None:
        opt['train']['losses']['flops']['alpha'] = alpha
        if lambda_reg is not None:
            opt['name'] += f'_reg{lambda_reg:g}'
            for stage in opt['train']['stages']:
                if 'flops' in stage['losses']:
                    stage['losses']['flops'] = lambda_reg
    set_logging(opt, print_freq=max(iters // 10, 1), checkpoint_freq=iters, tensorboard=False)
    return opt


def train(name: str, opt: dict, work: Path) -> tuple[Path, float]:
    options = write_options(work / 'options' / f"{opt['name']}.yml", opt)
    shutil.rmtree(work / 'experiments' / opt['name'], ignore_errors=True)
    start = time.perf_counter()
    subprocess.run([sys.executable, '-m', 'cdnsr_plugin.train', '-opt',
                    str(options)],
                   cwd=work,
                   check=True,
                   stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    print(f'trained {name} in {seconds:.0f} s', flush=True)
    return work / 'experiments' / opt['name'] / 'models' / 'net_g_latest.pth', seconds


@torch.inference_mode()
def evaluate(opt: dict, checkpoint: Path, test_dir: Path) -> dict:
    net = build_network(opt['network_g'])
    load_weights(net, checkpoint)
    net.eval()
    engine = RoutedEngine(net) if hasattr(net, 'branches') else None
    psnrs, ssims, counts = [], [], None
    for hr_path in sorted((test_dir / 'HR').glob('*.png')):
        hr, _ = read_image(hr_path)
        lr, _ = read_image(test_dir / 'LR_bicubic' / 'X4' / hr_path.name)
        lq = to_tensor(lr)
        if engine is not None:  # the tester's engine, argmax routing
            result = engine.super_resolve(lq)
            sr = result.sr
            found = torch.bincount(result.labels, minlength=net.num_classes)
            counts = found if counts is None else counts + found
        else:
            sr, _ = super_resolve_patches(lq, net, scale=4)
        scores = metrics(tensor2img(sr), hr, crop=4)  # the tester's BasicSR PSNR/SSIM
        psnrs.append(scores['psnr_y'])
        ssims.append(scores['ssim_y'])
    result = {'psnr': float(np.mean(psnrs)), 'ssim': float(np.mean(ssims))}
    if engine is not None:
        table = cost_table(net, patch=32)
        result['class_mix'] = [round(100.0 * c / counts.sum().item(), 1) for c in counts.tolist()]
        for convention in CONVENTIONS:
            result[f'flops_pct_{convention}'] = table.routed_percent(counts.tolist(), convention)
    else:
        result.update(class_mix=None, flops_pct_paper=100.0, flops_pct_macs=100.0)
    return result


def markdown(results: dict) -> str:
    lines = [
        '| model | PSNR (dB) | SSIM | FLOPs % paper | FLOPs % MACs | class mix (simple/medium/hard) | train time |',
        '| --- | --- | --- | --- | --- | --- | --- |'
    ]
    for name, r in results.items():
        mix = '/'.join(f'{v:.0f}%' for v in r['class_mix']) if r['class_mix'] else '— (one network)'
        lines.append(f"| {name} | {r['psnr']:.3f} | {r['ssim']:.4f} | {r['flops_pct_paper']:.1f} | "
                     f"{r['flops_pct_macs']:.1f} | {mix} | {r['train_seconds']:.0f} s |")
    return '\n'.join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--photos', default=str(REPO.parent / 'shared' / 'data' / 'photos'))
    parser.add_argument('--work', default='experiments/cpu_repro')
    parser.add_argument('--iters', type=int, default=3000, help='iterations per model (all stages together)')
    parser.add_argument('--batch', type=int, default=16)
    parser.add_argument('--test', type=int, default=3, help='photos held out for evaluation')
    parser.add_argument('--models', default=','.join(MODELS), help='comma-separated subset of ' + ', '.join(MODELS))
    parser.add_argument(
        '--lambda-reg',
        type=float,
        default=None,
        help="weight of FLOPsRegLoss in the CDNSR runs (default: the option file's, 2e-4)")
    args = parser.parse_args(argv)
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    train_photos, test_photos = split_photos(Path(args.photos), work, args.test)
    train_set, test_sets = work / 'train_x4', work / 'test'
    if not train_set.exists():
        prepare(PrepareOptions(input=str(train_photos), output=str(train_set)), build_reference(4, 'cpu', bicubic=True))
    if not test_sets.exists():
        build_test_sets(test_photos, test_sets, [Tier('full', 0)], scale=4, split='all', progress=False)
    results = {}
    for name in args.models.split(','):
        opt = options_for(name, work, train_set, args.iters, args.batch, args.lambda_reg)
        checkpoint, seconds = train(name, opt, work)
        results[name] = {**evaluate(opt, checkpoint, test_sets / 'Testfull'), 'train_seconds': seconds}
        print(f'{name}: {results[name]}', flush=True)
    suffix = f'_reg{args.lambda_reg:g}' if args.lambda_reg is not None else ''
    (work / f'results{suffix}.json').write_text(json.dumps({'args': vars(args), 'results': results}, indent=2))
    print(markdown(results))
    return 0


if __name__ == '__main__':
    sys.exit(main())
