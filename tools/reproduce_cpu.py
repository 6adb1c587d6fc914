"""CPU reproduction: FSRCNN-O, ClassSR-FSRCNN, CDNSR-FSRCNN (R/M/S) and this plugin's recipe, same budget.

    python tools/reproduce_cpu.py --train-photos datasets/train_photos --test-photos ../shared/data/photos \\
        --work experiments/cpu_repro --iters 6000

1. Data. The training photos become difficulty-labelled sub-image pairs (tools/prepare_data.py's pipeline,
   x4, LR 32 / HR 128, stride 16, 3 classes). ClassSR ranks sub-images by the PSNR of a trained MSRResNet;
   no pretrained network can be downloaded here, so FSRCNN-O is trained first (on a set labelled by the
   bicubic reference; its training ignores labels) and then labels the set the other models train on. The
   test photos become HR/LR pairs (MATLAB bicubic x4).
2. Training: every model gets the same number of iterations (``--iters``) and batch size, through the real
   pipeline (``python -m cdnsr_plugin.train``) from the option files in ``options/demo/``:

   * ``FSRCNN-O``: FSRCNN-56 on all data (ClassSR's FSRCNN recipe, lr 1e-3).
   * ``ClassSR-FSRCNN``: each branch on its class (lr 1e-3), then the classifier with the branches frozen and
     a joint fine-tuning, both ClassSR eq. 2 (L1 x 2000 + Class-Loss + Average-Loss x 6, soft routing, lr 2e-4);
     Average-Loss normalised as ClassSR's code does, the classifier initialised to see content.
   * ``CDNSR-FSRCNN (R/M/S)``: CDNSR's four stages (branches pruned from the backbone and pre-trained on their
     classes, classifier with Gumbel-softmax routing, distillation, fine-tuning; lr 2e-4 as the paper), with the
     FLOPs term as a per-patch price that meets alpha = 0.75 / 0.55 / 0.45 in the argmax (``DualFLOPsLoss``):
     with the paper's lambda_reg the term has no effect (see docs/RESULTS.md).
   * ``ours``: the three branches trained together on all data (5/6 of the iterations), then a classifier
     trained on the oracle's labels at half the backbone's FLOPs (``train_CDNSR_FSRCNN_oracle_demo.yml``);
     chosen on a validation split of the training photos (docs/RESULTS.md).

3. Evaluation on the test photos with ``cdnsr_plugin.analysis`` (every branch on every tile, images merged as
   the engine merges them, BasicSR's PSNR on Y, crop 4): each routed model's argmax routing, the cost knob at
   the budgets, the oracle, Laplacian and random routers at the same budgets, the branch x class table, the
   soft-vs-hard gap, the Spearman correlation; FSRCNN-O patch-wise and on the whole image.

Prints a Markdown report and writes ``<work>/results.json``, ``<work>/results.md`` and per model
``<work>/analysis/<model>/analysis.{json,md,png}``. Everything is under ``--work``; a finished step is not
redone when the script is run again (delete its folder to redo it).
"""
import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from basicsr.archs import build_network
from basicsr.metrics import calculate_psnr, calculate_ssim
from basicsr.utils import tensor2img

import cdnsr_plugin  # noqa: F401  (registers the plugin's archs)
from cdnsr_plugin.analysis.report import to_markdown, write
from cdnsr_plugin.analysis.run import analyze_folders, load_routed
from cdnsr_plugin.data.prepared_set import GT_LMDB, LQ_LMDB
from cdnsr_plugin.inference.costs import CONVENTIONS, cost_table
from cdnsr_plugin.inference.engine import EngineOptions
from cdnsr_plugin.inference.tiling import super_resolve_patches
from cdnsr_plugin.preparation.prepare import PrepareOptions, build_reference, prepare
from cdnsr_plugin.preparation.test_sets import Tier, build_test_sets
from cdnsr_plugin.utils.checkpoint import load_weights
from cdnsr_plugin.utils.image import to_tensor
from cdnsr_plugin.utils.io import atomic_write, list_images, read_image, write_json
from cdnsr_plugin.utils.options import load_options, set_data, set_logging, set_schedule, write_options

REPO = Path(__file__).resolve().parents[1]
DEMOS = REPO / 'options' / 'demo'
BUDGETS = (0.4, 0.5, 0.55, 0.65, 0.8)
VARIANTS = {'R': 0.75, 'M': 0.55, 'S': 0.45}  # CDNSR Table II's alpha


def split(iters: int, fractions: tuple) -> list[int]:
    """``iters`` split by ``fractions`` (the first stage takes the rounding)."""
    lengths = [int(iters * f) for f in fractions]
    lengths[0] += iters - sum(lengths)
    return lengths


def fsrcnn_o(opt_file: Path, iters: int) -> dict:
    opt = load_options(opt_file)
    set_schedule(opt, iters)
    return opt


def classsr(iters: int) -> dict:
    opt = load_options(DEMOS / 'train_ClassSR_FSRCNN_demo.yml')
    set_schedule(opt, split(iters, (0.5, 0.25, 0.25)))
    return opt


def cdnsr(iters: int, alpha: float) -> dict:
    opt = load_options(DEMOS / 'train_CDNSR_FSRCNN_demo.yml')
    for loss in opt['train']['losses'].values():
        if loss['type'] == 'DualFLOPsLoss':
            loss['alpha'] = alpha
    set_schedule(opt, split(iters, (0.4, 0.2, 0.2, 0.1, 0.1)))
    return opt


def ours(iters: int) -> dict:
    opt = load_options(DEMOS / 'train_CDNSR_FSRCNN_oracle_demo.yml')
    set_schedule(opt, split(iters, (5 / 6, 1 / 6)))
    return opt


def recipes(iters: int) -> dict:
    """name -> option dict, before data and logging are set."""
    models = {'ClassSR-FSRCNN': classsr(iters)}
    models.update({f'CDNSR-FSRCNN ({v})': cdnsr(iters, alpha) for v, alpha in VARIANTS.items()})
    models['ours (joint branches, oracle router)'] = ours(iters)
    return models


def slug(name: str) -> str:
    return ''.join(c if c.isalnum() else '_' for c in name).strip('_')


def train(name: str, opt: dict, work: Path, train_set: Path, batch: int) -> tuple[Path, float]:
    """Train ``opt`` through ``python -m cdnsr_plugin.train`` (skipped if its checkpoint exists)."""
    opt['name'] = slug(name)
    set_data(opt, train=(train_set / LQ_LMDB, train_set / GT_LMDB), batch=batch)
    opt['datasets'].pop('val', None)
    opt.pop('val', None)
    total = opt['train']['total_iter']
    set_logging(opt, print_freq=max(total // 20, 1), checkpoint_freq=total, tensorboard=False)
    checkpoint = work / 'experiments' / opt['name'] / 'models' / 'net_g_latest.pth'
    timing = checkpoint.with_name('train_seconds.txt')
    if checkpoint.is_file() and timing.is_file():
        return checkpoint, float(timing.read_text())
    options = write_options(work / 'options' / f"{opt['name']}.yml", opt)
    started = time.perf_counter()
    log = open(work / 'options' / f"{opt['name']}.out", 'w')
    subprocess.run([sys.executable, '-m', 'cdnsr_plugin.train', '-opt',
                    str(options)],
                   cwd=work,
                   check=True,
                   stdout=log,
                   stderr=subprocess.STDOUT,
                   env={**os.environ, 'CDNSR_PLUGIN_AUTOLOAD': '0'})
    seconds = time.perf_counter() - started
    atomic_write(timing, f'{seconds:.1f}'.encode())
    print(f'trained {name} in {seconds:.0f} s', flush=True)
    return checkpoint, seconds


def prepare_sets(args: argparse.Namespace, work: Path) -> tuple[Path, Path, Path, float]:
    """The bicubic-labelled set, FSRCNN-O trained on it, the FSRCNN-O-labelled set, and the test pairs."""
    bicubic = work / 'train_bicubic_x4'
    if not bicubic.exists():
        prepare(
            PrepareOptions(input=str(args.train_photos), output=str(bicubic), workers=2),
            build_reference(4, 'cpu', bicubic=True))
    base, seconds = train('FSRCNN-O', fsrcnn_o(DEMOS / 'train_FSRCNN_demo.yml', args.iters), work, bicubic, args.batch)
    labelled = work / 'train_x4'
    if not labelled.exists():
        arch = load_options(DEMOS / 'train_FSRCNN_demo.yml')['network_g']
        prepare(
            PrepareOptions(input=str(args.train_photos), output=str(labelled), workers=2),
            build_reference(4, 'cpu', arch=arch, checkpoint=str(base)))
    test = work / 'test'
    if not test.exists():
        build_test_sets(args.test_photos, test, [Tier('full', 0)], scale=4, split='all', progress=False)
    return labelled, base, test / 'Testfull', seconds


@torch.inference_mode()
def backbone_scores(checkpoint: Path, test: Path) -> dict:
    """FSRCNN-O patch-wise (the papers' 32/28 tiling) and on the whole image: Y PSNR and SSIM, crop 4."""
    net = build_network(load_options(DEMOS / 'train_FSRCNN_demo.yml')['network_g'])
    load_weights(net, checkpoint)
    net.eval()
    scores = {'patchwise': ([], []), 'whole image': ([], [])}
    for path in list_images(test / 'LR_bicubic' / 'X4'):
        lr = to_tensor(read_image(path)[0])
        gt = read_image(test / 'HR' / path.name)[0]
        for kind, sr in (('patchwise', super_resolve_patches(lr, net, 4)[0]), ('whole image', net(lr[None])[0])):
            image = tensor2img(sr, rgb2bgr=True, min_max=(0, 1))
            scores[kind][0].append(calculate_psnr(image, gt, 4, test_y_channel=True))
            scores[kind][1].append(calculate_ssim(image, gt, 4, test_y_channel=True))
    return {kind: {'psnr': float(np.mean(p)), 'ssim': float(np.mean(s))} for kind, (p, s) in scores.items()}


def logged_at_stage_end(work: Path, name: str, stage: str) -> dict:
    """The last values the training log printed in the (last) stage called ``stage``: ``{'max_prob': ...}``."""
    log = '\n'.join(p.read_text() for p in sorted((work / 'experiments' / slug(name)).glob('train_*.log')))
    options = load_options(work / 'options' / f'{slug(name)}.yml')
    index = max(i for i, s in enumerate(options['train']['stages']) if s['name'] == stage) + 1
    lines = [line for line in log.splitlines() if f'stage: {index:.4e}' in line]
    if not lines:
        return {}
    values = re.findall(r'(\w+): ([-+0-9.e]+)', lines[-1].split(']')[-1])
    return {key: float(value) for key, value in values}


def point(analysis: dict, router: str, budget) -> dict:
    return next(p for p in analysis['points'] if p['router'] == router and p['budget'] == budget)


def row(name: str, analysis: dict, net: torch.nn.Module, seconds: float) -> dict:
    """The table's row of a routed model: its argmax routing, the cost knob at 55%, regrets, measures."""
    argmax = point(analysis, 'learned', None)
    table = cost_table(net)
    counts = np.asarray(argmax['class_shares']) * analysis['tiles']
    return {
        'model': name, 'psnr': argmax['psnr'], 'ssim': argmax['ssim'],
        'flops_pct': {c: table.routed_percent(counts, c)
                      for c in CONVENTIONS}, 'class_mix': argmax['class_shares'],
        'psnr_at_55': point(analysis, 'learned',
                            0.55)['psnr'], 'regret': {b: point(analysis, 'learned', b)['regret']
                                                      for b in (0.5, 0.65)},
        'random_regret': {b: point(analysis, 'random', b)['regret']
                          for b in (0.5, 0.65)}, 'soft_hard_gap': analysis['soft_psnr'] - analysis['hard_psnr'],
        'spearman': analysis['spearman'],
        'simple_class': analysis['branch_class_psnr'][0][0] - analysis['branch_class_psnr'][-1][0],
        'max_probability_test': analysis['mean_max_probability'], 'train_seconds': seconds
    }


def markdown(rows: list, backbone: dict, base_seconds: float) -> str:
    """The results table: FSRCNN-O patch-wise and on the whole image, then every routed model."""
    lines = [
        '| model | PSNR / SSIM (Y), argmax | FLOPs % paper / MACs, argmax | class mix | PSNR at 55% (knob) | '
        'regret to oracle 50% / 65% (random) | soft - hard | Spearman | branch 0 - branch 2, simple class | '
        'train time |', '| --- |' + ' --- |' * 9
    ]
    for kind in ('patchwise', 'whole image'):
        flops = '100.0 / 100.0' if kind == 'patchwise' else '-'
        lines.append(f"| FSRCNN-O, {kind} | {backbone[kind]['psnr']:.3f} / {backbone[kind]['ssim']:.4f} | {flops} | "
                     f'- | - | - | - | - | - | {base_seconds:.0f} s |')
    for r in rows:
        mix = '/'.join(f'{100 * s:.0f}%' for s in r['class_mix'])
        regret = (f"{r['regret'][0.5]:+.3f} / {r['regret'][0.65]:+.3f} ({r['random_regret'][0.5]:+.3f} / "
                  f"{r['random_regret'][0.65]:+.3f})")
        lines.append(f"| {r['model']} | {r['psnr']:.3f} / {r['ssim']:.4f} | {r['flops_pct']['paper']:.1f} / "
                     f"{r['flops_pct']['macs']:.1f} | {mix} | {r['psnr_at_55']:.3f} | {regret} | "
                     f"{r['soft_hard_gap']:+.3f} | {r['spearman']:.2f} | {r['simple_class']:+.2f} dB | "
                     f"{r['train_seconds']:.0f} s |")
    return '\n'.join(lines) + '\n'


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        '--train-photos',
        type=Path,
        default=REPO / 'datasets' / 'train_photos',
        help='training photos (../shared/data/train/get_train_photos.py rebuilds them)')
    parser.add_argument(
        '--test-photos', type=Path, default=REPO.parent / 'shared' / 'data' / 'photos', help='held-out test photos')
    parser.add_argument('--work', type=Path, default=Path('experiments/cpu_repro'))
    parser.add_argument('--iters', type=int, default=6000, help='iterations per model (all stages together)')
    parser.add_argument('--batch', type=int, default=16)
    parser.add_argument('--models', help='comma-separated subset of the routed models (default: all)')
    args = parser.parse_args(argv)
    work = args.work.resolve()
    (work / 'options').mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    train_set, base, test, base_seconds = prepare_sets(args, work)
    backbone = backbone_scores(base, test)
    models = recipes(args.iters)
    chosen = args.models.split(',') if args.models else list(models)
    rows, analyses = [], {}
    for name in chosen:
        checkpoint, seconds = train(name, models[name], work, train_set, args.batch)
        network = load_options(work / 'options' / f'{slug(name)}.yml')['network_g']
        net = load_routed(network, checkpoint)
        # the papers' protocol (docs/RESULTS.md's reproduction tables); tools/analyze_routing.py defaults to regions
        analysis = analyze_folders(
            net, test / 'LR_bicubic' / 'X4', test / 'HR', BUDGETS, options=EngineOptions(tiling='paper'))
        write(analysis, work / 'analysis' / slug(name), f'{name}: routing on the test photos')
        analyses[name] = analysis.to_dict()
        rows.append(row(name, analyses[name], net, seconds))
        rows[-1]['logged_after_classifier_stage'] = logged_at_stage_end(work, name, 'classifier')
        print(to_markdown(analysis, name), flush=True)
    report = markdown(rows, backbone, base_seconds)
    write_json(
        work / 'results.json', {
            'args': {k: str(v)
                     for k, v in vars(args).items()}, 'backbone': backbone, 'rows': rows, 'analyses': analyses,
            'minutes': (time.perf_counter() - started) / 60
        })
    atomic_write(work / 'results.md', report.encode())
    print(report)
    print(f'total {(time.perf_counter() - started) / 60:.1f} min')
    return 0


if __name__ == '__main__':
    sys.exit(main())
