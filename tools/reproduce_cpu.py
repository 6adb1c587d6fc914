"""CPU reproduction: FSRCNN-O, ClassSR-FSRCNN, CDNSR-FSRCNN (R/M/S, and an alpha sweep) and this plugin's recipe.

    python tools/reproduce_cpu.py --train-photos datasets/train_photos --test-photos ../shared/data/photos \\
        --work experiments/cpu_repro --length 0.5 --json docs/results/reproduce_cpu.json

(the figures in docs/RESULTS.md: about 65 minutes on 2 cores). Choosing a recipe (never on the test photos): the
same script on the validation split that holds out a whole source (docs/RESULTS.md), with the settling experiments
of issue 23 beside the recipes they change:

    python tools/reproduce_cpu.py --train-photos datasets/srcsplit/train --test-photos datasets/srcsplit/val \\
        --work experiments/settle --length 0.5 --models ablations

On GPUs, ``--gpus 1 --length 20`` trains each stage 20x longer (the analyses stay on the CPU).

1. Data. The training photos become difficulty-labelled sub-image pairs (tools/prepare_data.py's pipeline,
   x4, LR 32 / HR 128, stride 16, 3 classes). ClassSR ranks sub-images by the PSNR of a trained MSRResNet;
   no pretrained network can be downloaded here, so FSRCNN-O is trained first (on a set labelled by the
   bicubic reference; its training ignores labels) and then labels the set the other models train on. The
   test photos become HR/LR pairs (MATLAB bicubic x4).
2. Training, through the real pipeline (``python -m cdnsr_plugin.train``) from the option files in
   ``options/demo/``, with the stage lengths of ``LENGTHS`` (times ``--length``). A recipe is cut into
   *segments*, one training run each, that start from the previous segment's checkpoint, so that what two
   recipes share is trained once: the CDNSR variants share their base SR-Net (FSRCNN-O itself: the papers'
   FSRCNN-56 on all data, trained the same way) and their pruned, class-wise pre-trained branches; ClassSR's
   ablations share its pre-trained branches. Each segment's own stage settings (batch, lr, routing) are the
   option file's.

   * ``FSRCNN-O``: FSRCNN-56 on all data (ClassSR's FSRCNN recipe, lr 1e-3, batch 16).
   * ``ClassSR-FSRCNN``: the branches on their classes (lr 1e-3, batch 16), then the classifier with the
     branches frozen (batch 96, the branch-output cache) and a joint fine-tuning (batch 96), both ClassSR eq. 2
     with soft routing.
   * ``CDNSR-FSRCNN (R/M/S)`` and the sweep: pruned branches pre-trained on their classes, classifier with
     soft Gumbel-softmax weights (tau 1 -> 0.4) and the FLOPs price that meets alpha in the argmax
     (``DualFLOPsLoss``), distillation and fine-tuning, lr 2e-4 as the paper.
   * ``ours``: the three branches trained together on all data, then a classifier trained on the oracle's
     labels at half the backbone's FLOPs (``train_CDNSR_FSRCNN_oracle_demo.yml``).

3. Evaluation on the test photos with ``cdnsr_plugin.analysis`` (every branch on every tile, BasicSR's PSNR on
   Y, crop 4), twice: in the papers' tiling (32/28 tiles, overlaps averaged: the papers' patch-wise figures,
   ``flops_pct`` per tile as alpha is defined, classifier included) and in the seam-free regions the engine
   runs (PSNR against the same image, ``executed_flops_pct``: what ran, in % of FSRCNN-O on the whole image).
   FSRCNN-O patch-wise and on the whole image.

Writes ``<work>/results.json`` (``--json`` also to another path, e.g. docs/results/reproduce_cpu.json),
``<work>/results.md``, ``<work>/alpha_sweep.png`` and per model ``<work>/analysis/<model>/<tiling>/``. A
finished step is not redone when the script runs again (delete its folder to redo it).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from basicsr.archs import build_network
from basicsr.metrics import calculate_psnr, calculate_ssim
from basicsr.utils import tensor2img

import cdnsr_plugin  # noqa: F401  (registers the plugin's archs)
from cdnsr_plugin.analysis.report import write
from cdnsr_plugin.analysis.run import analyze_folders, load_routed
from cdnsr_plugin.data.prepared_set import GT_LMDB, LQ_LMDB
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
BUDGETS = (0.5, 0.65)
VARIANTS = {'R': 0.75, 'M': 0.55, 'S': 0.45}  # CDNSR Table II's alpha
SWEEP = (0.75, 0.65, 0.55, 0.45)  # CDNSR Table II
TILINGS = ('paper', 'regions')

# Stage lengths at --length 1 (--length 0.5: about 65 minutes for everything on 2 cores). The classifier stages are
# long relative to the papers' ratio because they are cheap (frozen branches, their outputs cached) and they decide
# whether routing works.
LENGTHS = {
    'FSRCNN-O': 4000,
    'ClassSR': {'pretrain': 2000, 'classifier': 1500, 'finetune': 200},
    'CDNSR': {'pretrain': 1000, 'classifier': 800, 'distill': 300, 'finetune': 300},
    'ours': {'pretrain': 2000, 'classifier': 400},
}


@dataclass
class Segment:
    """One training run: ``stages`` (indices into the recipe's option file) of ``opt``, started from ``after``'s
    checkpoint (another segment's name) or with ``parts`` loaded (``path.pretrain_network_<part>``)."""

    name: str
    opt: dict
    stages: list[int]
    after: Optional[str] = None
    parts: dict = field(default_factory=dict)
    evaluate: bool = False  # analysed on the test photos as a model of its own (a recipe's last segment)
    optim: dict = field(default_factory=dict)  # train.optim_g overrides for this run (e.g. betas)


@dataclass
class Recipe:
    name: str
    segments: list[Segment]
    alpha: Optional[float] = None
    settles: str = ''  # what an ablation changes and which cause of issue 23 it settles

    @property
    def final(self) -> Segment:
        return self.segments[-1]


def scaled(count: int, length: float) -> int:
    return max(int(round(count * length)), 1)


def stage_index(opt: dict, name: str) -> int:
    """The last stage called ``name``."""
    return max(i for i, stage in enumerate(opt['train']['stages']) if stage['name'] == name)


def lengths_for(opt: dict, table: dict, length: float) -> dict:
    """Per stage index, its scaled length (stages named alike share the name's length)."""
    return {i: scaled(table[stage['name']], length) for i, stage in enumerate(opt['train']['stages'])}


def classsr_segments(length: float,
                     prefix: str = 'ClassSR-FSRCNN',
                     edit: Optional[Callable] = None,
                     finetune: bool = True,
                     optim: Optional[dict] = None) -> list[Segment]:
    """ClassSR's three steps; ``edit(opt)`` changes the classifier and fine-tuning stages of an ablation (the
    pre-trained branches are shared)."""
    base = load_options(DEMOS / 'train_ClassSR_FSRCNN_demo.yml')
    set_schedule(base, [lengths_for(base, LENGTHS['ClassSR'], length)[i] for i in range(len(base['train']['stages']))])
    opt = copy.deepcopy(base)
    if edit is not None:
        edit(opt)
    classifier, tune = stage_index(opt, 'classifier'), stage_index(opt, 'finetune')
    segments = [
        Segment('ClassSR-FSRCNN branches', base, [0]),
        Segment(
            f'{prefix} classifier stage',
            opt, [classifier],
            after='ClassSR-FSRCNN branches',
            optim=optim or {},
            evaluate=True)
    ]
    if finetune:
        segments.append(Segment(prefix, opt, [tune], after=segments[-1].name, optim=optim or {}, evaluate=True))
    return segments


def cdnsr_segments(alpha: float,
                   length: float,
                   name: str,
                   edit: Optional[Callable] = None,
                   inspect: bool = False,
                   split: bool = False) -> list[Segment]:
    """CDNSR's stages per alpha after the shared pruned branches (the base SR-Net is FSRCNN-O): the classifier
    stage, distillation and fine-tuning in one run, so that the price carries over into fine-tuning (the option
    file's ``keep_price``); ``split``: the classifier stage as a run of its own, ``inspect``: analysed too."""
    base = load_options(DEMOS / 'train_CDNSR_FSRCNN_demo.yml')
    set_schedule(base, [lengths_for(base, LENGTHS['CDNSR'], length)[i] for i in range(len(base['train']['stages']))])
    opt = copy.deepcopy(base)
    for loss in opt['train']['losses'].values():
        if loss['type'] in ('DualFLOPsLoss', 'FLOPsRegLoss'):
            loss['alpha'] = alpha
    if edit is not None:
        edit(opt)
    first = stage_index(base, 'pretrain')  # the pruned branches (the base SR-Net's stage is FSRCNN-O)
    classifier = stage_index(opt, 'classifier')
    if not split:
        return [
            Segment('CDNSR-FSRCNN branches', base, [first], parts={'branch2': 'FSRCNN-O'}),
            Segment(
                name,
                opt,
                list(range(classifier, len(opt['train']['stages']))),
                after='CDNSR-FSRCNN branches',
                evaluate=True)
        ]
    return [
        Segment('CDNSR-FSRCNN branches', base, [first], parts={'branch2': 'FSRCNN-O'}),
        Segment(f'{name} classifier stage', opt, [classifier], after='CDNSR-FSRCNN branches', evaluate=inspect),
        Segment(
            name,
            opt,
            list(range(classifier + 1, len(opt['train']['stages']))),
            after=f'{name} classifier stage',
            evaluate=True)
    ]


def ours_segments(length: float) -> list[Segment]:
    opt = load_options(DEMOS / 'train_CDNSR_FSRCNN_oracle_demo.yml')
    set_schedule(opt, [lengths_for(opt, LENGTHS['ours'], length)[i] for i in range(len(opt['train']['stages']))])
    return [
        Segment('ours (joint branches, oracle router)', opt, list(range(len(opt['train']['stages']))), evaluate=True)
    ]


def _set_stage(name: str, **values) -> Callable:

    def edit(opt: dict) -> None:
        opt['train']['stages'][stage_index(opt, name)].update(values)

    return edit


def _old_cdnsr(opt: dict) -> None:
    """The CDNSR recipe before issue 23: straight-through Gumbel everywhere, distillation at 1e-3, the price
    carried over from the classifier stage into fine-tuning."""
    for stage in opt['train']['stages']:
        stage.pop('hard_gumbel', None)
        if stage['name'] == 'distill':
            stage.pop('lr', None)
            stage.update(routing='hard')
            stage.pop('tau', None)
    opt['network_g']['hard_gumbel'] = True
    opt['train']['optim_g']['lr'] = 1e-3
    for stage in opt['train']['stages']:
        if stage['name'] in ('classifier', 'finetune'):
            stage['lr'] = 2e-4
    opt['train']['losses']['flops']['keep_price'] = True
    opt['train']['losses']['flops'].pop('step', None)


def _reference_flops(opt: dict) -> None:
    """fangvv/CDNSR's FLOPs term: flops_loss_w 0.55 next to l1w 1000, on the Gumbel sample."""
    opt['train']['losses']['flops'] = {
        'type': 'FLOPsRegLoss', 'alpha': opt['train']['losses']['flops']['alpha'], 'loss_weight': 0.55,
        'apply_to': 'sample', 'units': 'reference'
    }


def _price_step(step: float) -> Callable:

    def edit(opt: dict) -> None:
        opt['train']['losses']['flops']['step'] = step

    return edit


def _straight_through(opt: dict) -> None:
    """Straight-through (one-hot forward) Gumbel weights in every stage: tau shapes only the gradient."""
    for stage in opt['train']['stages']:
        stage.pop('hard_gumbel', None)
    opt['network_g']['hard_gumbel'] = True


def recipes(length: float) -> dict[str, Recipe]:
    """The models of the report, by name."""
    models = {'ClassSR-FSRCNN': Recipe('ClassSR-FSRCNN', classsr_segments(length))}
    for variant, alpha in VARIANTS.items():
        name = f'CDNSR-FSRCNN ({variant})'
        models[name] = Recipe(name, cdnsr_segments(alpha, length, name), alpha)
    for alpha in SWEEP:
        if alpha not in VARIANTS.values():
            name = f'CDNSR-FSRCNN (alpha {alpha})'
            models[name] = Recipe(name, cdnsr_segments(alpha, length, name), alpha)
    models['ours (joint branches, oracle router)'] = Recipe('ours (joint branches, oracle router)',
                                                            ours_segments(length))
    return models


def ablations(length: float) -> dict[str, Recipe]:
    """The settling experiments of issue 23, each a change to a recipe (run on the validation split with the recipes
    they change: ``--models ablations``)."""
    found = {
        'ClassSR classifier at batch 16': Recipe(
            '',
            classsr_segments(length, 'ClassSR B16', _set_stage('classifier', batch_size_per_gpu=16), False),
            settles='cause 1: the Average-Loss at a small batch'),
        'ClassSR classifier with a decaying rate and beta2 0.999': Recipe(
            '',
            classsr_segments(length, 'ClassSR decaying', _set_stage('classifier', lr_period=None), False,
                             {'betas': [0.9, 0.999]}),
            settles='cause 2: schedule and beta2'),
        'ClassSR classifier at lr 1e-3 (the paper: as pre-training)': Recipe(
            '',
            classsr_segments(length, 'ClassSR lr 1e-3', _set_stage('classifier', lr=1e-3), False),
            settles='cause 2: summed learning rate'),
        'CDNSR (M) as before issue 23': Recipe(
            '', cdnsr_segments(0.55, length, 'CDNSR M old', _old_cdnsr), 0.55, settles='causes 4 and 5'),
        'CDNSR (M) with the reference code\'s FLOPs term (FLOPsRegLoss units reference weight 0.55)': Recipe(
            '',
            cdnsr_segments(0.55, length, 'CDNSR M reference FLOPs', _reference_flops),
            0.55,
            settles='cause 6: the reference FLOPs weighting, tried'),
        'CDNSR (M) with straight-through Gumbel in every stage': Recipe(
            '',
            cdnsr_segments(0.55, length, 'CDNSR M straight-through', _straight_through),
            0.55,
            settles='cause 5: routing whose temperature matters'),
    }
    found['CDNSR-FSRCNN (M) after its classifier stage'] = Recipe(
        '',
        cdnsr_segments(0.55, length, 'CDNSR-FSRCNN (M) split', inspect=True, split=True)[:2],
        0.55,
        settles='cause 4: the price and the branches before distillation')
    found['CDNSR (M) with the default price step 0.005'] = Recipe(
        '',
        cdnsr_segments(0.55, length, 'CDNSR M step 0.005', _price_step(0.005)),
        0.55,
        settles='CDNSR: a price that moves within a short stage (the recipe: 0.05)')
    pruned = cdnsr_segments(0.55, length, 'unused')[0]
    classsr = classsr_segments(length)[1]
    found['ClassSR classifier on CDNSR\'s pruned branches'] = Recipe(
        '', [
            pruned,
            Segment(
                'ClassSR on pruned branches classifier stage',
                classsr.opt,
                classsr.stages,
                after=pruned.name,
                evaluate=True)
        ],
        settles='ClassSR: is it the classifier stage or its from-scratch branches')
    for name, recipe in found.items():
        recipe.name = name
    return found


def slug(name: str) -> str:
    return ''.join(c if c.isalnum() else '_' for c in name).strip('_')


class Trainer:
    """Trains segments through ``python -m cdnsr_plugin.train``; a segment with a checkpoint is not retrained."""

    def __init__(self, work: Path, train_set: Path, checkpoints: dict[str, Path], gpus: int = 0) -> None:
        self.work, self.train_set, self.checkpoints, self.gpus = work, train_set, dict(checkpoints), gpus
        self.seconds: dict[str, float] = {}

    def checkpoint(self, name: str) -> Path:
        return self.work / 'experiments' / slug(name) / 'models' / 'net_g_latest.pth'

    def run(self, segment: Segment, segments: dict[str, Segment]) -> Path:
        if segment.name in self.checkpoints:
            return self.checkpoints[segment.name]
        if segment.after is not None:
            self.run(segments[segment.after], segments)
        opt = copy.deepcopy(segment.opt)
        opt['name'] = slug(segment.name)
        opt['num_gpu'] = self.gpus
        if opt['train'].get('stages'):
            stages = [opt['train']['stages'][i] for i in segment.stages]
            opt['train']['stages'] = stages
            opt['train']['total_iter'] = sum(stage['iters'] for stage in stages)
            # only the losses this run uses: what a shared run is does not change with the others' losses
            used = {name for stage in stages for name in stage.get('losses', {})}
            opt['train']['losses'] = {k: v for k, v in opt['train']['losses'].items() if k in used}
        opt['train']['optim_g'].update(segment.optim)
        set_data(opt, train=(self.train_set / LQ_LMDB, self.train_set / GT_LMDB))
        opt['datasets'].pop('val', None)
        opt.pop('val', None)
        opt['path']['pretrain_network_g'] = str(self.checkpoints[segment.after]) if segment.after else None
        for part, model in segment.parts.items():
            opt['path'][f'pretrain_network_{part}'] = str(self.checkpoints[model])
        total = opt['train']['total_iter']
        set_logging(opt, print_freq=max(total // 20, 1), checkpoint_freq=total, tensorboard=False)
        checkpoint, timing = self.checkpoint(segment.name), self.checkpoint(segment.name).with_name('seconds.txt')
        written = self.work / 'options' / f"{opt['name']}.yml"
        if checkpoint.is_file() and timing.is_file():
            if load_options(written) != json.loads(json.dumps(opt)):
                raise SystemExit(f'{checkpoint} was trained from other options than {segment.name!r} has now '
                                 f'({written}): use another --work, or delete {checkpoint.parents[1]} to retrain')
        else:
            options = write_options(written, opt)
            started = time.perf_counter()
            with open(self.work / 'options' / f"{opt['name']}.out", 'w') as log:
                subprocess.run([sys.executable, '-m', 'cdnsr_plugin.train', '-opt',
                                str(options)],
                               cwd=self.work,
                               check=True,
                               stdout=log,
                               stderr=subprocess.STDOUT,
                               env={**os.environ, 'CDNSR_PLUGIN_AUTOLOAD': '0'})
            atomic_write(timing, f'{time.perf_counter() - started:.1f}'.encode())
            print(f'trained {segment.name} ({total} iterations) in {float(timing.read_text()):.0f} s', flush=True)
        self.seconds[segment.name] = float(timing.read_text())
        self.checkpoints[segment.name] = checkpoint
        return checkpoint


def prepare_sets(args: argparse.Namespace, work: Path, trainer_for: Callable) -> tuple[Trainer, Path]:
    """The bicubic-labelled set, FSRCNN-O trained on it, the FSRCNN-O-labelled set, and the test pairs."""
    bicubic = work / 'train_bicubic_x4'
    if not bicubic.exists():
        prepare(
            PrepareOptions(input=str(args.train_photos), output=str(bicubic), workers=2),
            build_reference(4, 'cpu', bicubic=True))
    base_opt = load_options(DEMOS / 'train_FSRCNN_demo.yml')
    set_schedule(base_opt, LENGTHS['FSRCNN-O'])  # not scaled: the labeller and base SR-Net of every --length
    first = trainer_for(bicubic, {})
    base = first.run(Segment('FSRCNN-O', base_opt, []), {})
    labelled = work / 'train_x4'
    if not labelled.exists():
        prepare(
            PrepareOptions(input=str(args.train_photos), output=str(labelled), workers=2),
            build_reference(4, 'cpu', arch=base_opt['network_g'], checkpoint=str(base)))
    test = work / 'test'
    if not test.exists():
        build_test_sets(args.test_photos, test, [Tier('full', 0)], scale=4, split='all', progress=False)
    trainer = trainer_for(labelled, {'FSRCNN-O': base})
    trainer.seconds.update(first.seconds)
    return trainer, test / 'Testfull'


def logged_at_end(work: Path, segment: str) -> dict:
    """The last values the training log of ``segment`` printed (its last stage): ``{'max_prob': ...}``."""
    logs = sorted((work / 'experiments' / slug(segment)).glob('train_*.log'))
    lines = [line for p in logs for line in p.read_text().splitlines() if 'stage: ' in line]
    if not lines:
        return {}
    return {key: float(value) for key, value in re.findall(r'(\w+): ([-+0-9.e]+)', lines[-1].split(']')[-1])}


def point(analysis: dict, router: str, budget) -> dict:
    return next(p for p in analysis['points'] if p['router'] == router and p['budget'] == budget)


def model_row(recipe: Recipe, segment: Segment, analyses: dict, seconds: float, logged: dict) -> dict:
    """One model in the issue's schema, both tilings (``paper``: the papers' protocol; ``regions``: seam-free)."""
    paper, regions = analyses['paper'], analyses['regions']
    hard, seamless = point(paper, 'learned', None), point(regions, 'learned', None)
    return {
        'name': segment.name if segment is not recipe.final else recipe.name,
        'alpha': recipe.alpha,
        'flops_pct': 100 * hard['flops_fraction'],
        'executed_flops_pct': seamless['percent_of_full_image'],
        'psnr_y': hard['psnr'],
        'ssim_y': hard['ssim'],
        'psnr_y_seam_free': seamless['psnr'],
        'class_shares': hard['class_shares'],
        'max_prob': paper['mean_max_probability'],
        'soft_hard_gap_db': paper['soft_psnr'] - paper['hard_psnr'],
        'spearman': paper['spearman'],
        'regret_db': {str(b): point(regions, 'learned', b)['regret']
                      for b in BUDGETS},
        'laplacian_regret_db': {str(b): point(regions, 'laplacian', b)['regret']
                                for b in BUDGETS},
        'branch_class_psnr': paper['branch_class_psnr'],
        'largest_branch_patchwise_psnr_y': paper['backbone_patchwise_psnr'],  # this model's own largest branch
        'largest_branch_whole_image_psnr_y': regions['backbone_full_psnr'],
        'train_seconds': seconds,
        'logged_at_end_of_training': logged,
        'settles': recipe.settles or None,
    }


@torch.inference_mode()
def backbone_scores(checkpoint: Path, test: Path, cache: Path) -> dict:
    """FSRCNN-O patch-wise (the papers' 32/28 tiling) and on the whole image: Y PSNR and SSIM, crop 4 (cached)."""
    if cache.is_file():
        return json.loads(cache.read_text())
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
    found = {kind: {'psnr': float(np.mean(p)), 'ssim': float(np.mean(s))} for kind, (p, s) in scores.items()}
    write_json(cache, found)
    return found


def evaluate(net: torch.nn.Module, test: Path, folder: Path, title: str) -> dict:
    """Both tilings' analyses (cached as JSON under ``folder``)."""
    found = {}
    for tiling in TILINGS:
        path = folder / tiling / 'analysis.json'
        if not path.is_file():
            analysis = analyze_folders(
                net,
                test / 'LR_bicubic' / 'X4',
                test / 'HR',
                BUDGETS,
                routers=('oracle', 'learned', 'laplacian'),
                options=EngineOptions(tiling=tiling))
            write(analysis, folder / tiling, f'{title}: {tiling} tiling')
        found[tiling] = json.loads(path.read_text())
    return found


def markdown(models: list[dict], backbone: dict) -> str:
    lines = [
        '| model | alpha | FLOPs % (paper, per tile, argmax) | executed % of FSRCNN-O (seam-free) | '
        'PSNR Y patch-wise | PSNR Y seam-free | class mix | max prob | soft - hard (dB) | train time |',
        '| --- |' + ' --- |' * 9,
        f"| FSRCNN-O | - | 100.0 | 100.0 (whole image) | {backbone['patchwise']:.3f} | {backbone['full']:.3f} "
        f"(whole image) | - | - | - | {backbone['seconds']:.0f} s |"
    ]
    for m in models:
        mix = '/'.join(f'{100 * s:.0f}' for s in m['class_shares'])
        alpha = '-' if m['alpha'] is None else f"{m['alpha']:.2f}"
        lines.append(f"| {m['name']} | {alpha} | {m['flops_pct']:.1f} | {m['executed_flops_pct']:.1f} | "
                     f"{m['psnr_y']:.3f} | {m['psnr_y_seam_free']:.3f} | {mix} | {m['max_prob']:.2f} | "
                     f"{m['soft_hard_gap_db']:+.3f} | {m['train_seconds']:.0f} s |")
    return '\n'.join(lines) + '\n'


def plot_sweep(models: list[dict], backbone: dict, path: Path) -> Optional[Path]:
    """PSNR (patch-wise) against FLOPs % for the CDNSR alphas, FSRCNN-O at 100%: CDNSR's Table II as a curve."""
    sweep = sorted((m for m in models if m['name'].startswith('CDNSR-FSRCNN') and m['alpha'] is not None),
                   key=lambda m: m['alpha'])
    if not sweep:
        return None
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.plot([m['flops_pct'] for m in sweep], [m['psnr_y'] for m in sweep], 'o-', label='CDNSR-FSRCNN, argmax')
    for m in sweep:
        ax.annotate(
            f"alpha {m['alpha']:.2f}", (m['flops_pct'], m['psnr_y']),
            textcoords='offset points',
            xytext=(4, -10),
            fontsize=8)
    ax.plot([100], [backbone['patchwise']], 's', label='FSRCNN-O')
    ax.set_xlabel('FLOPs, % of FSRCNN-O per tile (paper convention, classifier included)')
    ax.set_ylabel('PSNR Y (dB), papers\' tiles')
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(path.stem + '.part.png')
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        '--train-photos',
        type=Path,
        default=REPO / 'datasets' / 'train_photos',
        help='training photos (../shared/data/train/get_train_photos.py rebuilds them)')
    parser.add_argument(
        '--test-photos',
        type=Path,
        default=REPO.parent / 'shared' / 'data' / 'photos',
        help='test photos (the held-out set; for choosing recipes, the validation split)')
    parser.add_argument('--work', type=Path, default=Path('experiments/cpu_repro'))
    parser.add_argument(
        '--length',
        type=float,
        default=1.0,
        help='the routed models\' stage lengths (LENGTHS) times this; FSRCNN-O keeps its length')
    parser.add_argument(
        '--models', default='recipes', help='comma-separated model names, "recipes" (default), "ablations" or "all"')
    parser.add_argument('--json', type=Path, help='also write the results JSON here (docs/results/...)')
    parser.add_argument(
        '--gpus', type=int, default=0, help='train on this many GPUs (num_gpu; the analyses stay on the CPU); 0: CPU')
    args = parser.parse_args(argv)
    work = args.work.resolve()
    (work / 'options').mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    trainer, test = prepare_sets(args, work, lambda data, found: Trainer(work, data, found, args.gpus))
    found = {**recipes(args.length), **ablations(args.length)}
    if args.models in ('recipes', 'ablations'):
        chosen = list(recipes(args.length)) if args.models == 'recipes' else [
            'ClassSR-FSRCNN', 'CDNSR-FSRCNN (M)', *ablations(args.length)
        ]
    else:
        chosen = list(found) if args.models == 'all' else args.models.split(',')
    unknown = [name for name in chosen if name not in found]
    if unknown:
        parser.error(f'unknown models {unknown}; known: {sorted(found)}')
    scores = backbone_scores(trainer.checkpoints['FSRCNN-O'], test, work / 'analysis' / 'FSRCNN_O' / 'scores.json')
    models, backbone = [], {'patchwise': scores['patchwise']['psnr'], 'full': scores['whole image']['psnr']}

    def report(final: bool) -> None:
        """results.json (and --json), results.md and the sweep plot of what is measured so far: a run stopped
        part-way keeps every finished model (``complete`` false until the end)."""
        base = {**backbone, 'seconds': trainer.seconds.get('FSRCNN-O', 0.0)}
        sweep = plot_sweep(models, base, work / 'alpha_sweep.png') if final else None
        result = {
            'command': 'python tools/reproduce_cpu.py ' + ' '.join(argv if argv is not None else sys.argv[1:]),
            'machine': f'{os.cpu_count()} CPU cores, torch {torch.__version__}, {torch.get_num_threads()} threads',
            'train_photos': str(args.train_photos),
            'test_photos': str(args.test_photos),
            'length': args.length,
            'stage_lengths': {
                k: (v if isinstance(v, int) else {s: scaled(n, args.length)
                                                  for s, n in v.items()})
                for k, v in LENGTHS.items()
            },
            'backbone': {
                'name': 'FSRCNN-O', 'psnr_y_patchwise': base['patchwise'], 'psnr_y_whole_image': base['full'],
                'ssim_y_patchwise': scores['patchwise']['ssim'], 'ssim_y_whole_image': scores['whole image']['ssim'],
                'train_seconds': base['seconds']
            },
            'models': models,
            'complete': final,
            'minutes': (time.perf_counter() - started) / 60,
            'alpha_sweep_plot': str(sweep) if sweep else None,
        }
        write_json(work / 'results.json', result)
        if args.json:
            write_json(args.json, result)
        atomic_write(work / 'results.md', markdown(models, base).encode())

    for name in chosen:
        recipe = found[name]
        segments = {segment.name: segment for segment in recipe.segments}
        for segment in recipe.segments:
            if not segment.evaluate:
                continue
            checkpoint = trainer.run(segment, segments)
            net = load_routed(segment.opt['network_g'], checkpoint)
            analyses = evaluate(net, test, work / 'analysis' / slug(segment.name), segment.name)
            done = recipe.segments[:recipe.segments.index(segment) + 1]
            seconds = sum(trainer.seconds.get(s.name, 0.0) for s in done)
            models.append(model_row(recipe, segment, analyses, seconds, logged_at_end(work, segment.name)))
            print(markdown(models[-1:], {**backbone, 'seconds': 0.0}).splitlines()[-1], flush=True)
            report(final=False)
    report(final=True)
    print((work / 'results.md').read_text())
    print(f'total {(time.perf_counter() - started) / 60:.1f} min')
    return 0


if __name__ == '__main__':
    sys.exit(main())
